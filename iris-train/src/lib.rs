//! # iris-train
//!
//! The Iris model ("Show and Segment", CVPR 2025) in burn, following the
//! released reference code (Stanford-AIMI/MASS, `models/`), and everything
//! that makes its weights.
//!
//! | module | what it holds |
//! |---|---|
//! | [`model`] | [`IrisConfig`](model::IrisConfig) with presets, the [`Iris`](model::Iris) model and its blocks |
//! | [`loss`] | adaptive Dice + BCE on logits, per class |
//! | [`device`] | [`select_device`](device::select_device): the backend, chosen from cargo features |
//! | [`error`] | the crate's [`Error`] |
//! | [`training`] | the run's settings ([`TrainingConfig`](training::TrainingConfig)), the episodic training step, a whole run as one call ([`run`](training::run())), the model fingerprint |
//! | [`bank`] | the EMA memory bank of task embeddings, written as `.irisemb` |
//! | [`checkpoint`] | atomic checkpoints that resume exactly |
//! | [`tune`] | in-context tuning: the task embedding alone optimised on labelled cases, model frozen |
//!
//! In-context tuning ([`tune`], `iris-train tune`) optimises only a task
//! embedding, by Adam on the segmentation loss over a few labelled cases
//! with the model frozen, and saves it as a `.irisemb` (provenance
//! `Tuned`) that the engine uses like any other task embedding.
//!
//! All volumes are `[B, C, D, H, W]` tensors (W fastest), the same axis
//! order as `iris-core`.
//!
//! ```
//! use burn::prelude::*;
//! use iris_train::model::IrisConfig;
//!
//! let device = iris_train::device::select_device();
//! let config = IrisConfig::tiny();
//! let model = config.init(&device)?;
//! let [d, h, w] = config.patch_size;
//! let image = Tensor::<5>::random([1, 1, d, h, w], burn::tensor::Distribution::Default, &device);
//! let mask = image.clone().greater_elem(0.5).float();
//! let embedding = model.encode_task(image.clone(), mask)?; // one class
//! let logits = model.segment(image, &embedding)?;
//! assert_eq!(logits.dims(), [1, 1, d, h, w]);
//! # Ok::<(), iris_train::Error>(())
//! ```
#![cfg_attr(not(test), warn(clippy::unwrap_used, clippy::expect_used))]

pub mod bank;
pub mod checkpoint;
pub mod data;
pub mod device;
pub mod error;
pub mod export;
pub mod import;
pub mod loss;
pub mod model;
pub mod training;
pub mod tune;

pub use error::Error;
