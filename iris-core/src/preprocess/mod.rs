//! Preprocessing: intensity policy, canonical orientation, resampling and
//! crops, each with its inverse where one exists.

/// How intensities are normalised before they reach the network.
///
/// Both policies clip and then z-score (zero mean, unit standard deviation)
/// over the clipped volume. Stored in every `.irisemb` so that a reference and
/// a query are always normalised the same way.
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
