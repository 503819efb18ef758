//! Preprocessing: intensity policy, canonical orientation, resampling and
//! crops, each with its inverse where one exists.
//!
//! The steps follow the released Iris inference code (`inference.py` of
//! Stanford-AIMI/MASS), so that volumes reach the network exactly as they
//! did in training:
//!
//! | step | function | released code |
//! |---|---|---|
//! | orientation | [`canonical`], [`Reorientation::undo`] | `sitk.DICOMOrient(img, "RAS")` |
//! | spacing | [`target_geometry`], [`resample_image`], [`resample_labels`] | `ResampleImageFilter`, 1.5 mm, linear / nearest |
//! | reference crop | [`reference_crop`] | `crop_arrays_centered`, 128^3, zero padded |
//! | intensities | [`IntensityPolicy::normalize`] | `normalize_image`: CT `[-991, 500]`, else 2nd/98th pct, z-score |
//!
//! All arrays are `[D, H, W]` (C order) and every [`Affine`](crate::volume::Affine)
//! maps a voxel `[d, h, w]` to world RAS+ millimetres.
//!
//! ```
//! use iris_core::preprocess::{canonical, resample_image, target_geometry, IntensityPolicy};
//! use iris_core::volume::{Affine, Image};
//! use ndarray::Array3;
//!
//! // A 1 mm volume stored with the `w` axis running right-to-left.
//! let affine = Affine([
//!     [0.0, 0.0, -1.0, 20.0],
//!     [0.0, 1.0, 0.0, 0.0],
//!     [1.0, 0.0, 0.0, 0.0],
//!     [0.0, 0.0, 0.0, 1.0],
//! ]);
//! let image = Image::new(Array3::from_shape_fn((20, 24, 21), |(d, h, w)| (d + h + w) as f32), affine)?;
//!
//! let (ras, plan) = canonical(&image)?;
//! let grid = target_geometry(ras.geometry(), 1.5)?;
//! let mut resampled = resample_image(&ras, &grid)?;
//! IntensityPolicy::MR.normalize_in_place(&mut resampled)?;
//! assert_eq!(resampled.shape(), [13, 16, 14]);
//! assert_eq!(plan.undo(&ras)?, image);
//! # Ok::<(), iris_core::Error>(())
//! ```

mod crop;
mod intensity;
mod orient;
mod resample;

pub use crop::{
    BoundingBox, LabelSelection, ReferenceCrop, crop_or_pad, label_bbox, reference_crop,
};
pub use intensity::percentiles;
pub use orient::{Reorientation, canonical};
pub use resample::{resample_image, resample_labels, target_geometry};

/// How intensities are normalised before they reach the network.
///
/// Both policies clip and then z-score (zero mean, unit standard deviation)
/// over the clipped volume. Stored in every `.irisemb` so that a reference and
/// a query are always normalised the same way.
///
/// The constructors [`IntensityPolicy::CT`] and [`IntensityPolicy::MR`] are
/// the released Iris settings; [`IntensityPolicy::detect`] chooses between
/// them, and [`IntensityPolicy::normalize`] applies a policy.
#[derive(Clone, Copy, Debug, PartialEq)]
pub enum IntensityPolicy {
    /// CT in Hounsfield units: clip to `[min_hu, max_hu]`, then z-score.
    Ct {
        /// Lower clip in HU.
        min_hu: f32,
        /// Upper clip in HU.
        max_hu: f32,
    },
    /// MR, PET and anything not in calibrated units: clip to the `low`-th and
    /// `high`-th percentiles (0-100), then z-score.
    Percentile {
        /// Lower percentile, 0-100.
        low: f32,
        /// Upper percentile, 0-100.
        high: f32,
    },
}
