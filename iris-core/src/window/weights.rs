//! Gaussian importance weights for one window shape.
//!
//! A voxel near a window's border sees less context than one in its middle,
//! so its prediction counts less: nnU-Net and MONAI weight each window's
//! output by a Gaussian centred on the window with `sigma = 0.125 * size`
//! per axis. The Gaussian is separable, so it is stored as three 1-D
//! profiles (`w_d[i] * w_h[j] * w_w[k]` is the weight of voxel `[i, j, k]`)
//! and never needs a full `D x H x W` array, though [`GaussianWeights::to_array`]
//! gives one.
//!
//! Each profile is centred at `(n - 1) / 2` (between the two middle voxels
//! for even `n`, so it is symmetric, unlike nnU-Net's `n // 2`) and scaled to
//! a maximum of exactly 1. No weight is zero: the farthest voxel is less than
//! `n / 2 = 4 sigma` from the centre, so each profile stays above `e^-8` and
//! the product above `e^-24 ~ 3.8e-11`, well inside `f32`'s normal range.
//! nnU-Net needs its "replace zeros by the smallest non-zero value" step
//! because it truncates the filter and stores weights in `f16`; here the
//! weights are `f32` and the blender works with weight *ratios* (see
//! [`Blender`](super::Blender)), so no such step is needed.

use alloc::vec::Vec;
use ndarray::Array3;

use crate::error::Result;
use crate::volume::checked_voxel_count;

/// Standard deviation of the Gaussian as a fraction of the window size (nnU-Net, MONAI, Iris).
pub const SIGMA_SCALE: f64 = 0.125;

/// Separable Gaussian importance weights for a window of `[D, H, W]` voxels.
///
/// ```
/// use iris_core::window::GaussianWeights;
///
/// let g = GaussianWeights::new([64, 64, 64])?;
/// assert_eq!(g.weight([31, 32, 31]), Some(1.0)); // the centre
/// assert!(g.weight([0, 0, 0]).unwrap() > 0.0);  // never zero
/// # Ok::<(), iris_core::Error>(())
/// ```
#[derive(Clone, Debug, PartialEq)]
pub struct GaussianWeights {
    profiles: [Vec<f32>; 3],
}

impl GaussianWeights {
    /// Weights for windows of `window` voxels (`[D, H, W]`).
    ///
    /// # Errors
    /// [`Error::InvalidArgument`](crate::Error::InvalidArgument) for a zero
    /// dimension, [`Error::TooLarge`](crate::Error::TooLarge) above
    /// [`MAX_VOXELS`](crate::volume::MAX_VOXELS).
    pub fn new(window: [usize; 3]) -> Result<GaussianWeights> {
        if window.contains(&0) {
            return Err(crate::Error::invalid(
                "window",
                alloc::format!("{window:?} has a zero dimension"),
            ));
        }
        checked_voxel_count(window)?;
        Ok(GaussianWeights {
            profiles: window.map(profile),
        })
    }

    /// The window shape, `[D, H, W]` voxels.
    pub fn window_shape(&self) -> [usize; 3] {
        core::array::from_fn(|a| self.profiles[a].len())
    }

    /// The 1-D profiles along `d`, `h` and `w`; each has maximum 1 and no zero.
    pub fn profiles(&self) -> [&[f32]; 3] {
        core::array::from_fn(|a| self.profiles[a].as_slice())
    }

    /// The weight of window voxel `[d, h, w]`, or `None` outside the window.
    pub fn weight(&self, voxel: [usize; 3]) -> Option<f32> {
        let [d, h, w] = self.profiles();
        Some(*d.get(voxel[0])? * *h.get(voxel[1])? * *w.get(voxel[2])?)
    }

    /// The full `[D, H, W]` weight map (for callers that want one; the
    /// blender does not).
    pub fn to_array(&self) -> Array3<f32> {
        let [d, h, w] = self.profiles();
        Array3::from_shape_fn((d.len(), h.len(), w.len()), |(i, j, k)| d[i] * h[j] * w[k])
    }
}

/// One normalised 1-D Gaussian of `n` samples centred at `(n - 1) / 2`.
fn profile(n: usize) -> Vec<f32> {
    let centre = (n as f64 - 1.0) / 2.0;
    let sigma = SIGMA_SCALE * n as f64;
    let raw = |i: usize| {
        let x = (i as f64 - centre) / sigma;
        libm::exp(-0.5 * x * x)
    };
    // The largest sample is at the middle voxel (or the two middle voxels).
    let peak = raw(n / 2);
    (0..n).map(|i| (raw(i) / peak) as f32).collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn no_zeros_symmetric_peak_at_centre() {
        for window in [
            [1, 1, 1],
            [2, 3, 4],
            [64, 64, 64],
            [128, 96, 17],
            [1, 200, 5],
        ] {
            let g = GaussianWeights::new(window).expect("valid");
            let map = g.to_array();
            let min = map.iter().copied().fold(f32::INFINITY, f32::min);
            let max = map.iter().copied().fold(0.0, f32::max);
            assert!(min > 3.0e-11, "{window:?}: min {min}");
            assert_eq!(max, 1.0, "{window:?}");
            let [d, h, w] = window;
            for ((i, j, k), &v) in map.indexed_iter() {
                // Mirror symmetry along every axis.
                assert_eq!(v, map[[d - 1 - i, j, k]]);
                assert_eq!(v, map[[i, h - 1 - j, k]]);
                assert_eq!(v, map[[i, j, w - 1 - k]]);
                // The centre voxel(s) carry the maximum.
                let central = |x: usize, n: usize| 2 * x + 1 == n || 2 * x == n || 2 * x + 2 == n;
                assert_eq!(v == 1.0, central(i, d) && central(j, h) && central(k, w));
            }
        }
    }

    #[test]
    fn sigma_is_an_eighth_of_the_window() {
        let g = GaussianWeights::new([1, 1, 33]).expect("valid");
        let p = g.profiles()[2];
        // Centre 16, sigma 33 / 8 = 4.125: sample 16 + x weighs exp(-x^2 / (2 sigma^2)).
        assert_eq!(p[16], 1.0);
        for (i, x) in [(20usize, 4.0f64), (0, -16.0), (32, 16.0), (10, -6.0)] {
            let expected = libm::exp(-0.5 * (x / 4.125) * (x / 4.125));
            assert!(
                (f64::from(p[i]) - expected).abs() < 1e-6,
                "{i}: {} vs {expected}",
                p[i]
            );
        }
        assert_eq!(g.weight([1, 0, 0]), None);
        assert!(GaussianWeights::new([4, 0, 4]).is_err());
    }
}
