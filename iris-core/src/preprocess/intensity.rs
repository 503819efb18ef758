//! Intensity normalisation: clip per [`IntensityPolicy`], then z-score.
//!
//! This mirrors `normalize_image` of the released Iris inference code:
//! - CT is clipped to a fixed Hounsfield window. We use `[-991, 500]` HU, the
//!   window of the released code the weights were trained with; the paper's
//!   text says -990.
//! - Everything else (MR, PET) is clipped to its own 2nd and 98th percentiles
//!   (only when they differ, as in the released code).
//! - Then the volume is z-scored with its mean and population standard
//!   deviation (`ddof = 0`, as `numpy.std`). A volume whose standard
//!   deviation is at most `1e-6` (e.g. a constant image) is only centred:
//!   every voxel becomes `x - mean`, i.e. 0 for a constant image, never NaN.
//!
//! Unlike the released code, which silently skips non-finite voxels when
//! computing percentiles, NaN and infinite input is refused with
//! [`Error::NonFinite`]: a NaN would otherwise poison the mean.

use alloc::format;
use alloc::vec::Vec;

use super::IntensityPolicy;
use crate::error::{Error, Result};
use crate::volume::Image;

/// Standard deviation at or below which a volume is only centred, not scaled.
const MIN_STD: f64 = 1e-6;

impl IntensityPolicy {
    /// The released Iris CT window: clip to `[-991, 500]` HU (the paper says
    /// -990; we follow the code the weights came from), then z-score.
    pub const CT: IntensityPolicy = IntensityPolicy::Ct {
        min_hu: -991.0,
        max_hu: 500.0,
    };

    /// The released Iris MR/PET policy: clip to the 2nd and 98th
    /// percentiles of the volume, then z-score.
    pub const MR: IntensityPolicy = IntensityPolicy::Percentile {
        low: 2.0,
        high: 98.0,
    };

    /// Guesses the modality of `image` (raw, before any normalisation) with
    /// the rule of the released code's `guess_modality`: with `p0.5` and
    /// `p99.5` the 0.5th and 99.5th percentiles (see [`percentiles`]), the
    /// image is CT when `p0.5 < -200` and `p99.5 > 300` (air and bone on a HU
    /// scale), and [`IntensityPolicy::MR`] otherwise (the released code's
    /// "pet" branch normalises exactly like "mr").
    ///
    /// A caller who knows the modality should use [`IntensityPolicy::CT`] or
    /// [`IntensityPolicy::MR`] directly instead.
    ///
    /// # Errors
    /// [`Error::NonFinite`] if any voxel is NaN or infinite.
    pub fn detect(image: &Image) -> Result<IntensityPolicy> {
        image.ensure_finite("image")?;
        let p = image_percentiles(image, &[0.5, 99.5]);
        Ok(if p[0] < -200.0 && p[1] > 300.0 {
            IntensityPolicy::CT
        } else {
            IntensityPolicy::MR
        })
    }

    /// Checks the policy's parameters: CT bounds finite with
    /// `min_hu < max_hu`; percentiles finite with `0 <= low < high <= 100`.
    ///
    /// # Errors
    /// [`Error::InvalidArgument`] naming the policy and its values.
    pub fn validate(&self) -> Result<()> {
        let ok = match *self {
            IntensityPolicy::Ct { min_hu, max_hu } => {
                min_hu.is_finite() && max_hu.is_finite() && min_hu < max_hu
            }
            IntensityPolicy::Percentile { low, high } => {
                (0.0..=100.0).contains(&low) && (0.0..=100.0).contains(&high) && low < high
            }
        };
        if ok {
            Ok(())
        } else {
            Err(Error::invalid(
                "intensity policy",
                format!(
                    "{self:?}: bounds must be finite and increasing (percentiles within 0-100)"
                ),
            ))
        }
    }

    /// The clip interval this policy gives for `image`, in the image's units:
    /// the HU window for CT, the percentile values for MR. `None` means no
    /// clipping (percentiles that coincide, as in the released code).
    ///
    /// # Errors
    /// As [`IntensityPolicy::validate`]; [`Error::NonFinite`] for NaN or
    /// infinite voxels.
    pub fn clip_bounds(&self, image: &Image) -> Result<Option<(f32, f32)>> {
        self.validate()?;
        image.ensure_finite("image")?;
        Ok(match *self {
            IntensityPolicy::Ct { min_hu, max_hu } => Some((min_hu, max_hu)),
            IntensityPolicy::Percentile { low, high } => {
                let p = image_percentiles(image, &[f64::from(low), f64::from(high)]);
                (p[1] > p[0]).then_some((p[0], p[1]))
            }
        })
    }

    /// Clips `image` per this policy and z-scores it, in place (see the
    /// module documentation for the exact rule and the constant-image case).
    /// The geometry is unchanged.
    ///
    /// # Errors
    /// As [`IntensityPolicy::clip_bounds`]; on error the image is unchanged.
    pub fn normalize_in_place(&self, image: &mut Image) -> Result<()> {
        if let Some((lo, hi)) = self.clip_bounds(image)? {
            image.data_mut().mapv_inplace(|v| v.clamp(lo, hi));
        }
        let data = image.data_mut();
        let n = data.len() as f64;
        let mean = data.iter().map(|&v| f64::from(v)).sum::<f64>() / n;
        let var = data
            .iter()
            .map(|&v| {
                let d = f64::from(v) - mean;
                d * d
            })
            .sum::<f64>()
            / n;
        let std = libm::sqrt(var);
        let scale = if std > MIN_STD { 1.0 / std } else { 1.0 };
        data.mapv_inplace(|v| ((f64::from(v) - mean) * scale) as f32);
        Ok(())
    }

    /// Like [`IntensityPolicy::normalize_in_place`], on a copy.
    ///
    /// # Errors
    /// As [`IntensityPolicy::clip_bounds`].
    pub fn normalize(&self, image: &Image) -> Result<Image> {
        let mut out = image.clone();
        self.normalize_in_place(&mut out)?;
        Ok(out)
    }
}

/// Percentiles of `values` with numpy's default ("linear") method: for
/// percentile `q` (0-100) of `n` sorted values `v`, with `x = q / 100 * (n -
/// 1)`, the result is `v[floor(x)]` interpolated linearly towards
/// `v[floor(x) + 1]` by the fraction of `x`. Computed exactly, with a
/// selection (`O(n)` per percentile) on a copy of `values`, not a sort.
///
/// # Errors
/// [`Error::InvalidArgument`] for an empty `values` or a `q` outside 0-100;
/// [`Error::NonFinite`] if any value is NaN or infinite.
pub fn percentiles(values: &[f32], qs: &[f64]) -> Result<Vec<f32>> {
    if values.is_empty() {
        return Err(Error::invalid("values", "no values to take percentiles of"));
    }
    if let Some(q) = qs.iter().find(|q| !(0.0..=100.0).contains(*q)) {
        return Err(Error::invalid(
            "percentile",
            format!("{q} is outside 0-100"),
        ));
    }
    let bad = values.iter().filter(|v| !v.is_finite()).count();
    if bad > 0 {
        return Err(Error::NonFinite {
            what: "values",
            count: bad,
        });
    }
    Ok(select_percentiles(&mut values.to_vec(), qs))
}

/// [`percentiles`] on a buffer it may reorder; `work` must be non-empty and
/// finite, and every `q` within 0-100.
fn select_percentiles(work: &mut [f32], qs: &[f64]) -> Vec<f32> {
    let last = work.len() - 1;
    qs.iter()
        .map(|&q| {
            let x = q / 100.0 * last as f64;
            // `x` is within [0, last], so truncation is `floor` and exact.
            let lo = (x as usize).min(last);
            let frac = x - lo as f64;
            let (_, &mut below, above) = work.select_nth_unstable_by(lo, f32::total_cmp);
            // Everything after index `lo` is >= `below`; the next order
            // statistic is the smallest of them.
            let next = above.iter().copied().fold(f32::INFINITY, f32::min);
            if frac == 0.0 || above.is_empty() {
                below
            } else {
                let (a, b) = (f64::from(below), f64::from(next));
                (a + frac * (b - a)) as f32
            }
        })
        .collect()
}

/// Percentiles of a finite image's voxels, with one copy of the voxels.
fn image_percentiles(image: &Image, qs: &[f64]) -> Vec<f32> {
    let mut work: Vec<f32> = image.data().iter().copied().collect();
    select_percentiles(&mut work, qs)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::volume::Affine;
    use alloc::vec;
    use ndarray::Array3;
    use proptest::prelude::*;

    fn image(values: Vec<f32>) -> Image {
        let n = values.len();
        Image::from_vec([1, 1, n], Affine::IDENTITY, values).expect("valid")
    }

    /// numpy's linear percentile computed the slow, obvious way.
    fn brute_percentile(values: &[f32], q: f64) -> f32 {
        let mut s = values.to_vec();
        s.sort_by(f32::total_cmp);
        let x = q / 100.0 * (s.len() - 1) as f64;
        let lo = libm::floor(x) as usize;
        let hi = (lo + 1).min(s.len() - 1);
        let f = x - lo as f64;
        (f64::from(s[lo]) * (1.0 - f) + f64::from(s[hi]) * f) as f32
    }

    proptest! {
        #[test]
        fn percentiles_match_sorting(
            values in prop::collection::vec(-1e4f32..1e4, 1..300),
            qs in prop::collection::vec(0.0f64..=100.0, 1..6),
        ) {
            let got = percentiles(&values, &qs).expect("valid input");
            for (q, g) in qs.iter().zip(&got) {
                let want = brute_percentile(&values, *q);
                prop_assert!((g - want).abs() <= 1e-3 * (1.0 + want.abs()), "q {q}: {g} vs {want}");
            }
        }

        #[test]
        fn zscore_has_zero_mean_unit_std(values in prop::collection::vec(-3000f32..3000.0, 2..400)) {
            prop_assume!(values.iter().any(|v| (v - values[0]).abs() > 1.0));
            let out = IntensityPolicy::Ct { min_hu: -1e6, max_hu: 1e6 }
                .normalize(&image(values.clone()))
                .expect("finite input");
            let n = values.len() as f64;
            let mean = out.data().iter().map(|&v| f64::from(v)).sum::<f64>() / n;
            let var = out.data().iter().map(|&v| (f64::from(v) - mean).powi(2)).sum::<f64>() / n;
            prop_assert!(mean.abs() < 1e-5, "mean {mean}");
            prop_assert!((var - 1.0).abs() < 1e-4, "var {var}");
        }
    }

    #[test]
    fn percentile_examples_match_numpy() {
        // np.percentile([1, 2, 3, 4], [0, 25, 50, 90, 100]) == [1, 1.75, 2.5, 3.7, 4]
        let got =
            percentiles(&[4.0, 1.0, 3.0, 2.0], &[0.0, 25.0, 50.0, 90.0, 100.0]).expect("valid");
        let want = [1.0, 1.75, 2.5, 3.7, 4.0];
        for (g, w) in got.iter().zip(want) {
            assert!((g - w).abs() < 1e-6, "{got:?}");
        }
        assert_eq!(
            percentiles(&[7.0], &[0.0, 50.0, 100.0]).expect("valid"),
            vec![7.0; 3]
        );
    }

    #[test]
    fn percentiles_reject_bad_input() {
        assert!(matches!(
            percentiles(&[], &[50.0]),
            Err(Error::InvalidArgument { .. })
        ));
        assert!(matches!(
            percentiles(&[1.0], &[100.5]),
            Err(Error::InvalidArgument { .. })
        ));
        assert!(matches!(
            percentiles(&[1.0, f32::NAN, f32::INFINITY], &[50.0]),
            Err(Error::NonFinite { count: 2, .. })
        ));
    }

    #[test]
    fn ct_clips_to_the_released_window_before_zscore() {
        let raw = vec![-3000.0, -991.0, -500.0, 0.0, 500.0, 3000.0];
        let policy = IntensityPolicy::CT;
        assert_eq!(
            policy.clip_bounds(&image(raw.clone())).expect("ok"),
            Some((-991.0, 500.0))
        );
        let out = policy.normalize(&image(raw)).expect("ok");
        let clipped = [-991.0f64, -991.0, -500.0, 0.0, 500.0, 500.0];
        let mean = clipped.iter().sum::<f64>() / 6.0;
        let std = libm::sqrt(clipped.iter().map(|v| (v - mean).powi(2)).sum::<f64>() / 6.0);
        for (o, c) in out.data().iter().zip(clipped) {
            assert!((f64::from(*o) - (c - mean) / std).abs() < 1e-5);
        }
        // Clipped extremes land exactly on the clipped bounds' scores.
        assert_eq!(out.data()[[0, 0, 0]], out.data()[[0, 0, 1]]);
        assert_eq!(out.data()[[0, 0, 4]], out.data()[[0, 0, 5]]);
    }

    #[test]
    fn mr_clips_at_percentiles() {
        // 0..=100: p2 = 2, p98 = 98.
        let raw: Vec<f32> = (0..=100).map(|v| v as f32).collect();
        let img = image(raw);
        assert_eq!(
            IntensityPolicy::MR.clip_bounds(&img).expect("ok"),
            Some((2.0, 98.0))
        );
        let out = IntensityPolicy::MR.normalize(&img).expect("ok");
        let d = out.data();
        assert_eq!(d[[0, 0, 0]], d[[0, 0, 2]]);
        assert_eq!(d[[0, 0, 100]], d[[0, 0, 98]]);
        assert!(d[[0, 0, 2]] < d[[0, 0, 3]] && d[[0, 0, 97]] < d[[0, 0, 98]]);
    }

    #[test]
    fn constant_image_becomes_zero_not_nan() {
        for policy in [IntensityPolicy::CT, IntensityPolicy::MR] {
            let img = Image::new(Array3::from_elem((3, 4, 5), 42.0), Affine::IDENTITY).expect("ok");
            let out = policy
                .normalize(&img)
                .expect("constant images are accepted");
            assert!(out.data().iter().all(|&v| v == 0.0), "{policy:?}");
        }
    }

    #[test]
    fn non_finite_input_is_refused() {
        let mut img = image(vec![1.0, 2.0, 3.0]);
        img.data_mut()[[0, 0, 1]] = f32::NAN;
        let before = img.clone();
        for policy in [IntensityPolicy::CT, IntensityPolicy::MR] {
            assert!(matches!(
                policy.normalize_in_place(&mut img),
                Err(Error::NonFinite { count: 1, .. })
            ));
        }
        assert!(matches!(
            IntensityPolicy::detect(&img),
            Err(Error::NonFinite { .. })
        ));
        // Unchanged (compare bit patterns, NaN != NaN).
        let bits = |i: &Image| i.data().iter().map(|v| v.to_bits()).collect::<Vec<_>>();
        assert_eq!(bits(&img), bits(&before));
    }

    #[test]
    fn invalid_policies_are_refused() {
        let img = image(vec![1.0, 2.0]);
        for bad in [
            IntensityPolicy::Ct {
                min_hu: 500.0,
                max_hu: -991.0,
            },
            IntensityPolicy::Ct {
                min_hu: f32::NAN,
                max_hu: 1.0,
            },
            IntensityPolicy::Percentile {
                low: 98.0,
                high: 2.0,
            },
            IntensityPolicy::Percentile {
                low: -1.0,
                high: 50.0,
            },
            IntensityPolicy::Percentile {
                low: 1.0,
                high: 101.0,
            },
        ] {
            assert!(
                matches!(bad.normalize(&img), Err(Error::InvalidArgument { .. })),
                "{bad:?}"
            );
        }
    }

    #[test]
    fn detection_follows_the_released_rule() {
        // CT-like: air (-1000), soft tissue (40), bone (1200).
        let ct: Vec<f32> = (0..1000)
            .map(|i| match i % 4 {
                0 => -1000.0,
                1 | 2 => 40.0,
                _ => 1200.0,
            })
            .collect();
        assert_eq!(
            IntensityPolicy::detect(&image(ct)).expect("ok"),
            IntensityPolicy::CT
        );
        // MR-like: non-negative arbitrary units.
        let mr: Vec<f32> = (0..1000).map(|i| (i % 700) as f32).collect();
        assert_eq!(
            IntensityPolicy::detect(&image(mr)).expect("ok"),
            IntensityPolicy::MR
        );
        // Negative values but no bone range: not CT.
        let signed: Vec<f32> = (0..1000).map(|i| (i % 500) as f32 - 250.0).collect();
        assert_eq!(
            IntensityPolicy::detect(&image(signed)).expect("ok"),
            IntensityPolicy::MR
        );
    }
}
