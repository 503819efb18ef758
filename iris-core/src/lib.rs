//! # iris-core
//!
//! The embeddable core of **iris**, universal 3-D medical image segmentation
//! by in-context learning ("Show and Segment", Iris, CVPR 2025).
//!
//! A reference image and its mask are distilled once into a compact *task
//! embedding* per class; that embedding then segments any number of query
//! volumes. This crate holds everything around the neural network that must
//! be exact and dependable:
//!
//! | module | what it holds | needs `std` |
//! |---|---|---|
//! | [`volume`] | [`Volume`](volume::Volume), [`Geometry`](volume::Geometry), [`Affine`](volume::Affine) | no |
//! | [`embedding`] | task embeddings and their maths: ensemble, EMA, cosine retrieval | no |
//! | [`irisemb`] | the `.irisemb` file format (read from `&[u8]`, write to `Vec<u8>`) | no |
//! | [`preprocess`] | intensity policy, resampling, canonical orientation, crops | no |
//! | [`window`] | sliding-window plan, Gaussian weights, low-memory blending | no |
//! | [`labels`] | probabilities to labels, largest connected component | no |
//! | [`metrics`] | Dice per class | no |
//! | [`pipeline`] | the whole segmentation around any network ("bring your own network") | no |
//! | `nifti` | NIfTI-1 read/write (`.nii`, `.nii.gz`) | `nifti` |
//! | `engine` | the ONNX inference engine: [`Model`] encodes references and segments queries | `onnx` |
//!
//! Features say what they bring (all on by default):
//!
//! | feature | brings | dependencies |
//! |---|---|---|
//! | `std` | files (`.irisemb` read/write by path), `std::error::Error` glue | none beyond std |
//! | `nifti` | the `nifti` module | nifti, flate2 |
//! | `onnx` | the `engine` module: tract runs the model folder's graphs | tract, rayon, serde |
//! | `testing` (off) | `engine::testing`: a model folder of known maths for tests | prost |
//!
//! Without default features the crate is `#![no_std]` + `alloc`, so an
//! embedded device can load and use `.irisemb` files with no filesystem.
#![no_std]
#![cfg_attr(not(test), warn(clippy::unwrap_used, clippy::expect_used))]

extern crate alloc;
#[cfg(feature = "std")]
extern crate std;

pub mod embedding;
#[cfg(feature = "onnx")]
pub mod engine;
pub mod error;
pub mod irisemb;
pub mod labels;
pub mod metrics;
#[cfg(feature = "nifti")]
pub mod nifti;
pub mod pipeline;
pub mod preprocess;
pub mod volume;
pub mod window;

#[cfg(test)]
mod test_support;

#[cfg(feature = "onnx")]
pub use engine::{
    EncodeOptions, Manifest, Model, PoolReference, RetrievalLevel, RetrieveOptions, TaskClass,
};
pub use error::{Error, FormatError, Result};
pub use pipeline::{Progress, SegmentOptions, Segmentation};

/// The types most programs need, in one import.
pub mod prelude {
    pub use crate::embedding::{ClassEmbedding, ModelFingerprint, TaskEmbedding};
    pub use crate::error::{Error, Result};
    pub use crate::volume::{Affine, Geometry, Image, LabelMap, Volume};
}

// The README's Rust snippets compile as doctests, so they cannot rot.
#[cfg(all(doctest, feature = "nifti", feature = "onnx"))]
#[doc = include_str!("../../README.md")]
struct ReadmeDoctests;
