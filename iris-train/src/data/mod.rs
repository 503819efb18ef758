//! Training data: real label maps with synthetic contrast (SynthSeg style),
//! augmentation, episode sampling (the paper's Algorithm 1) and a loader for
//! datasets in the Medical Segmentation Decathlon / nnU-Net layout.
//!
//! Everything here works on `ndarray` arrays `[D, H, W]` (W fastest, the
//! axis order of `iris-core`) at the training spacing; the training loop
//! turns [`Episode`]s into tensors.
//!
//! | module | what it holds |
//! |---|---|
//! | [`atlas`] | label-map [`Source`]s with stable [`ClassKey`]s, the built-in atlases ([`AtlasSource`]) and the held-out classes |
//! | [`augment`] | the spatial [`Warp`] (affine + smooth deformation) and intensity augmentation |
//! | [`synth`] | synthetic contrast: a random image drawn from a label map |
//! | [`episode`] | [`Task`] sampling (cheap) and [`Episode`] generation (two independent draws) |
//! | [`msd`] | [`MsdDataset`]: `imagesTr/`, `labelsTr/`, `dataset.json` |
//!
//! What is held out of training, and why, is documented in
//! `docs/training-data.md` and decided in one place, [`AtlasSource::is_held_out`].
//!
//! ```
//! use iris_train::data::{EpisodeConfig, EpisodeSampler, Source, Subject};
//! use ndarray::Array3;
//! use std::collections::BTreeMap;
//!
//! // A toy label map: two boxes.
//! let labels = Array3::from_shape_fn((24, 24, 24), |(d, h, w)| match (d, h, w) {
//!     (4..=11, 4..=19, 4..=19) => 1,
//!     (12..=19, 6..=17, 6..=17) => 2,
//!     _ => 0,
//! });
//! let names = BTreeMap::from([(1, "upper".to_string()), (2, "lower".to_string())]);
//! let source = Source::new("toy", &names, vec![Subject::new(labels, None)?], |_, _| false)?;
//! let sampler = EpisodeSampler::new(vec![source], EpisodeConfig::new([16, 16, 16]))?;
//! let episode = sampler.episode(7)?;
//! assert_eq!(episode.query_image.dim(), (16, 16, 16));
//! assert_eq!(episode.reference_masks.dim().0, episode.classes.len());
//! # Ok::<(), iris_train::Error>(())
//! ```

pub mod atlas;
pub mod augment;
pub mod episode;
pub mod msd;
pub mod synth;

pub use atlas::{AtlasSource, ClassInfo, ClassKey, Source, Subject};
pub use augment::{IntensityConfig, SpatialConfig, Warp};
pub use episode::{Episode, EpisodeConfig, EpisodeSampler, Task};
pub use msd::{MsdCase, MsdDataset};
pub use synth::SynthConfig;

pub(crate) use crate::error::{Error, Result};
