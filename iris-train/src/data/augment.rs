//! Spatial and intensity augmentation (the paper's section 7).
//!
//! Spatial: a [`Warp`] maps every voxel of the output patch to a position in
//! the source volume, `source = center + L (x - c) + u(x)`, where `c` is the
//! patch centre, `L` a random rotation (about every axis) times a random
//! per-axis scale, and `u` a smooth random displacement (a coarse grid of
//! Gaussian displacements upsampled trilinearly). Images are sampled
//! trilinearly (clamped to the edge, as `iris-core` resamples), label maps by
//! nearest neighbour (0 outside), so the same warp moves both alike. Warping
//! straight into the patch is the crop: only `patch` voxels are computed.
//!
//! Intensity ([`augment_intensity`]): Gaussian blur, gamma, the inference
//! normalisation of `iris-core`, then contrast, multiplicative and additive
//! brightness and Gaussian noise in normalised units.

use iris_core::preprocess::{IntensityPolicy, resample_image};
use iris_core::volume::{Affine, Geometry, Image};
use ndarray::{Array3, ArrayViewMut1, Axis};
use rand::{Rng, RngExt};
use rand_distr::StandardNormal;

use super::{Error, Result};

/// Ranges of the random spatial transform. Defaults follow the paper:
/// scale 0.9-1.1, rotation ±10 degrees, plus a mild smooth deformation.
#[derive(Clone, Debug, PartialEq)]
pub struct SpatialConfig {
    /// Per-axis zoom range `[min, max]` (>1 enlarges the anatomy). Default `[0.9, 1.1]`.
    pub scale: [f64; 2],
    /// Largest rotation about each axis, degrees. Default 10.
    pub rotation_deg: f64,
    /// Standard deviation of the control-point displacements, in voxels of
    /// the training grid. Default 1.5 (4.5 mm at 3 mm spacing). 0 disables.
    pub deformation_std: f32,
    /// Control points per axis of the deformation grid (>= 2). Default 4.
    pub deformation_grid: usize,
}

impl Default for SpatialConfig {
    fn default() -> Self {
        SpatialConfig {
            scale: [0.9, 1.1],
            rotation_deg: 10.0,
            deformation_std: 1.5,
            deformation_grid: 4,
        }
    }
}

impl SpatialConfig {
    /// No rotation, scaling or deformation: warps are pure translations.
    pub fn none() -> Self {
        SpatialConfig {
            scale: [1.0, 1.0],
            rotation_deg: 0.0,
            deformation_std: 0.0,
            deformation_grid: 2,
        }
    }

    /// Checks the ranges.
    ///
    /// # Errors
    /// [`Error::Core`] naming the field.
    pub fn validate(&self) -> Result<()> {
        let [lo, hi] = self.scale;
        if !(lo.is_finite() && hi.is_finite() && 0.0 < lo && lo <= hi) {
            return Err(Error::invalid(
                "spatial.scale",
                format!("{:?} must be a positive, increasing range", self.scale),
            ));
        }
        if !(self.rotation_deg.is_finite() && (0.0..=180.0).contains(&self.rotation_deg)) {
            return Err(Error::invalid(
                "spatial.rotation_deg",
                format!("{} must be within 0-180", self.rotation_deg),
            ));
        }
        if !(self.deformation_std.is_finite() && self.deformation_std >= 0.0) {
            return Err(Error::invalid(
                "spatial.deformation_std",
                format!("{} must be >= 0", self.deformation_std),
            ));
        }
        if self.deformation_grid < 2 {
            return Err(Error::invalid(
                "spatial.deformation_grid",
                format!("{} must be at least 2", self.deformation_grid),
            ));
        }
        Ok(())
    }
}

/// A map from the voxels of a `patch` (`[D, H, W]`) to positions in a
/// source volume (fractional voxel indices `[d, h, w]`).
#[derive(Clone, Debug)]
pub struct Warp {
    patch: [usize; 3],
    /// Source voxels moved per patch voxel step: column `j` is the step along patch axis `j`.
    linear: [[f64; 3]; 3],
    /// Source position of the patch centre `(patch - 1) / 2`.
    center: [f64; 3],
    /// Smooth displacement per source axis, each `patch` voxels in C order.
    displacement: Option<[Vec<f32>; 3]>,
}

impl Warp {
    /// The translation that puts the patch centre at source position
    /// `center` (voxels): patch voxel `x` reads source `x + center - (patch - 1) / 2`.
    pub fn translation(patch: [usize; 3], center: [f64; 3]) -> Warp {
        Warp {
            patch,
            linear: [[1.0, 0.0, 0.0], [0.0, 1.0, 0.0], [0.0, 0.0, 1.0]],
            center,
            displacement: None,
        }
    }

    /// A random rotation, scale and smooth deformation per `config`, with
    /// the patch centre at source position `center`.
    ///
    /// # Errors
    /// [`Error::Core`] for an invalid `config` or a zero `patch` dimension.
    pub fn random(
        rng: &mut impl Rng,
        config: &SpatialConfig,
        patch: [usize; 3],
        center: [f64; 3],
    ) -> Result<Warp> {
        config.validate()?;
        let max = config.rotation_deg.to_radians();
        let angles: [f64; 3] = std::array::from_fn(|_| uniform(rng, -max, max));
        let scale: [f64; 3] =
            std::array::from_fn(|_| uniform(rng, config.scale[0], config.scale[1]));
        let r = rotation(angles);
        let linear = std::array::from_fn(|i| std::array::from_fn(|j| r[i][j] / scale[j]));
        let displacement = if config.deformation_std > 0.0 {
            let g = config.deformation_grid;
            let mut field = || -> Result<Vec<f32>> {
                Ok(smooth_field(rng, [g; 3], patch, config.deformation_std)?
                    .iter()
                    .copied()
                    .collect())
            };
            Some([field()?, field()?, field()?])
        } else {
            check_patch(patch)?;
            None
        };
        Ok(Warp {
            patch,
            linear,
            center,
            displacement,
        })
    }

    /// The output shape, `[D, H, W]`.
    pub fn patch(&self) -> [usize; 3] {
        self.patch
    }

    /// Calls `f(index, source position)` for every patch voxel in C order.
    fn for_each_position(&self, mut f: impl FnMut(usize, [f64; 3])) {
        let [pd, ph, pw] = self.patch;
        let c: [f64; 3] = std::array::from_fn(|a| (self.patch[a] as f64 - 1.0) / 2.0);
        let l = &self.linear;
        let disp = self.displacement.as_ref();
        let mut i = 0;
        for d in 0..pd {
            for h in 0..ph {
                let x = [d as f64 - c[0], h as f64 - c[1], -c[2]];
                let base: [f64; 3] = std::array::from_fn(|a| {
                    self.center[a] + l[a][0] * x[0] + l[a][1] * x[1] + l[a][2] * x[2]
                });
                for w in 0..pw {
                    let mut p: [f64; 3] = std::array::from_fn(|a| base[a] + l[a][2] * w as f64);
                    if let Some(u) = disp {
                        for a in 0..3 {
                            p[a] += f64::from(u[a][i]);
                        }
                    }
                    f(i, p);
                    i += 1;
                }
            }
        }
    }

    /// The source position of patch voxel `voxel` (`[d, h, w]`).
    pub fn source_position(&self, voxel: [usize; 3]) -> [f64; 3] {
        let c: [f64; 3] = std::array::from_fn(|a| (self.patch[a] as f64 - 1.0) / 2.0);
        let x: [f64; 3] = std::array::from_fn(|a| voxel[a] as f64 - c[a]);
        let mut p: [f64; 3] = std::array::from_fn(|a| {
            self.center[a] + (0..3).map(|j| self.linear[a][j] * x[j]).sum::<f64>()
        });
        if let Some(u) = &self.displacement {
            let i = (voxel[0] * self.patch[1] + voxel[1]) * self.patch[2] + voxel[2];
            for a in 0..3 {
                p[a] += f64::from(u[a][i]);
            }
        }
        p
    }

    /// Warps a label map by nearest neighbour: the result (shape `patch`)
    /// holds only values of `labels`, and 0 where the position falls more
    /// than half a voxel outside it.
    pub fn labels(&self, labels: &Array3<u16>) -> Array3<u16> {
        let (sd, sh, sw) = labels.dim();
        let n = [sd, sh, sw];
        let mut out = vec![0u16; self.patch.iter().product()];
        self.for_each_position(|i, p| {
            let mut idx = [0usize; 3];
            for a in 0..3 {
                let r = (p[a] + 0.5).floor();
                if !(r >= 0.0 && r < n[a] as f64) {
                    return;
                }
                idx[a] = r as usize;
            }
            out[i] = labels[idx];
        });
        to_array(self.patch, out)
    }

    /// Warps an image trilinearly (positions outside take the nearest edge
    /// value, as `iris-core`'s resampling does); shape `patch`.
    pub fn image(&self, image: &Array3<f32>) -> Array3<f32> {
        let (sd, sh, sw) = image.dim();
        let n = [sd, sh, sw];
        let mut out = vec![0f32; self.patch.iter().product()];
        self.for_each_position(|i, p| {
            let mut i0 = [0usize; 3];
            let mut i1 = [0usize; 3];
            let mut t = [0f32; 3];
            for a in 0..3 {
                let x = p[a].clamp(0.0, (n[a] - 1) as f64);
                let f = x.floor();
                i0[a] = f as usize;
                i1[a] = (i0[a] + 1).min(n[a] - 1);
                t[a] = (x - f) as f32;
            }
            let at = |d: usize, h: usize, w: usize| image[[d, h, w]];
            let plane = |d: usize| {
                lerp(
                    lerp(at(d, i0[1], i0[2]), at(d, i0[1], i1[2]), t[2]),
                    lerp(at(d, i1[1], i0[2]), at(d, i1[1], i1[2]), t[2]),
                    t[1],
                )
            };
            out[i] = lerp(plane(i0[0]), plane(i1[0]), t[0]);
        });
        to_array(self.patch, out)
    }
}

fn lerp(a: f32, b: f32, t: f32) -> f32 {
    a + (b - a) * t
}

fn to_array<T>(shape: [usize; 3], data: Vec<T>) -> Array3<T> {
    // `data` has exactly `shape`'s product of elements by construction.
    Array3::from_shape_vec(shape, data).unwrap_or_else(|_| unreachable!("patch-sized buffer"))
}

fn check_patch(patch: [usize; 3]) -> Result<()> {
    if patch.contains(&0) {
        return Err(Error::invalid(
            "patch",
            format!("{patch:?} has a zero dimension"),
        ));
    }
    iris_core::volume::checked_voxel_count(patch)?;
    Ok(())
}

/// Rotation matrix `Rz(c) Ry(b) Rx(a)` for angles `[a, b, c]` (radians)
/// about the `d`, `h` and `w` axes.
fn rotation([a, b, c]: [f64; 3]) -> [[f64; 3]; 3] {
    let rx = [
        [1.0, 0.0, 0.0],
        [0.0, a.cos(), -a.sin()],
        [0.0, a.sin(), a.cos()],
    ];
    let ry = [
        [b.cos(), 0.0, b.sin()],
        [0.0, 1.0, 0.0],
        [-b.sin(), 0.0, b.cos()],
    ];
    let rz = [
        [c.cos(), -c.sin(), 0.0],
        [c.sin(), c.cos(), 0.0],
        [0.0, 0.0, 1.0],
    ];
    matmul(&rz, &matmul(&ry, &rx))
}

fn matmul(x: &[[f64; 3]; 3], y: &[[f64; 3]; 3]) -> [[f64; 3]; 3] {
    std::array::from_fn(|i| std::array::from_fn(|j| (0..3).map(|k| x[i][k] * y[k][j]).sum()))
}

/// Uniform draw in `[lo, hi]` (returns `lo` for an empty range).
pub(crate) fn uniform<T>(rng: &mut impl Rng, lo: T, hi: T) -> T
where
    T: Copy + PartialOrd + rand::distr::uniform::SampleUniform,
{
    if lo < hi {
        rng.random_range(lo..=hi)
    } else {
        lo
    }
}

/// A smooth random field of shape `patch`: a `grid` of independent
/// `N(0, std^2)` values whose corners sit on the patch corners, upsampled
/// trilinearly (by `iris-core`'s separable resampling).
pub(crate) fn smooth_field(
    rng: &mut impl Rng,
    grid: [usize; 3],
    patch: [usize; 3],
    std: f32,
) -> Result<Array3<f32>> {
    check_patch(patch)?;
    let coarse = Array3::from_shape_fn(grid, |_| std * rng.sample::<f32, _>(StandardNormal));
    let spacing =
        std::array::from_fn(|a| (patch[a].max(2) - 1) as f64 / (grid[a].max(2) - 1) as f64);
    let coarse = Image::new(coarse, Affine::from_spacing(spacing))?;
    let target = Geometry::new(patch, Affine::IDENTITY)?;
    Ok(resample_image(&coarse, &target)?.into_parts().0)
}

/// Ranges of the intensity augmentation, in the paper's values.
#[derive(Clone, Debug, PartialEq)]
pub struct IntensityConfig {
    /// Probability of blurring. Default 0.5.
    pub blur_probability: f64,
    /// Gaussian blur standard deviation range per axis, voxels. Default `[0.7, 1.3]`.
    pub blur_sigma: [f32; 2],
    /// Gamma range, applied to intensities rescaled to `[0, 1]`. Default `[0.8, 1.2]`.
    pub gamma: [f32; 2],
    /// Contrast factor range (about the mean). Default `[0.8, 1.2]`.
    pub contrast: [f32; 2],
    /// Multiplicative brightness range. Default `[0.9, 1.1]`.
    pub brightness_scale: [f32; 2],
    /// Standard deviation of the additive brightness shift. Default 0.1.
    pub brightness_shift_std: f32,
    /// Largest Gaussian noise standard deviation (drawn uniformly in
    /// `[0, max]`). Default 0.02.
    pub noise_std_max: f32,
}

impl Default for IntensityConfig {
    fn default() -> Self {
        IntensityConfig {
            blur_probability: 0.5,
            blur_sigma: [0.7, 1.3],
            gamma: [0.8, 1.2],
            contrast: [0.8, 1.2],
            brightness_scale: [0.9, 1.1],
            brightness_shift_std: 0.1,
            noise_std_max: 0.02,
        }
    }
}

impl IntensityConfig {
    /// Checks the ranges.
    ///
    /// # Errors
    /// [`Error::Core`] naming the field.
    pub fn validate(&self) -> Result<()> {
        let range = |name: &'static str, [lo, hi]: [f32; 2], min: f32| {
            if lo.is_finite() && hi.is_finite() && min <= lo && lo <= hi {
                Ok(())
            } else {
                Err(Error::invalid(
                    name,
                    format!("[{lo}, {hi}] must be an increasing range >= {min}"),
                ))
            }
        };
        range("intensity.blur_sigma", self.blur_sigma, 0.0)?;
        range("intensity.gamma", self.gamma, f32::MIN_POSITIVE)?;
        range("intensity.contrast", self.contrast, 0.0)?;
        range("intensity.brightness_scale", self.brightness_scale, 0.0)?;
        for (name, v) in [
            ("intensity.brightness_shift_std", self.brightness_shift_std),
            ("intensity.noise_std_max", self.noise_std_max),
        ] {
            if !(v.is_finite() && v >= 0.0) {
                return Err(Error::invalid(name, format!("{v} must be >= 0")));
            }
        }
        if !(0.0..=1.0).contains(&self.blur_probability) {
            return Err(Error::invalid(
                "intensity.blur_probability",
                format!("{} is not a probability", self.blur_probability),
            ));
        }
        Ok(())
    }
}

/// Augments an image `[D, H, W]` in place and normalises it: blur (with
/// `blur_probability`), gamma on the image rescaled to `[0, 1]`, then
/// `iris-core`'s MR normalisation (percentile clip and z-score, exactly as
/// at inference), then contrast, brightness and noise in those normalised
/// units (so that they are not undone by a later normalisation).
///
/// # Errors
/// [`Error::Core`] for an invalid `config` or a non-finite image.
pub fn augment_intensity(
    image: &mut Array3<f32>,
    rng: &mut impl Rng,
    config: &IntensityConfig,
) -> Result<()> {
    config.validate()?;
    if rng.random_bool(config.blur_probability) {
        let sigma =
            std::array::from_fn(|_| uniform(rng, config.blur_sigma[0], config.blur_sigma[1]));
        gaussian_blur(image, sigma);
    }
    let (lo, hi) = image
        .iter()
        .fold((f32::INFINITY, f32::NEG_INFINITY), |(lo, hi), &v| {
            (lo.min(v), hi.max(v))
        });
    let gamma = uniform(rng, config.gamma[0], config.gamma[1]);
    if hi > lo {
        let inv = 1.0 / (hi - lo);
        image.mapv_inplace(|v| ((v - lo) * inv).clamp(0.0, 1.0).powf(gamma));
    }
    let mut volume = Image::new(std::mem::take(image), Affine::IDENTITY)?;
    IntensityPolicy::MR.normalize_in_place(&mut volume)?;
    *image = volume.into_parts().0;
    let contrast = uniform(rng, config.contrast[0], config.contrast[1]);
    let scale = uniform(rng, config.brightness_scale[0], config.brightness_scale[1]);
    let shift = config.brightness_shift_std * rng.sample::<f32, _>(StandardNormal);
    let noise = uniform(rng, 0.0, config.noise_std_max);
    // After the z-score the mean is 0, so contrast about the mean is a scale.
    let gain = contrast * scale;
    image.mapv_inplace(|v| v * gain + shift + noise * rng.sample::<f32, _>(StandardNormal));
    Ok(())
}

/// Separable Gaussian blur with standard deviation `sigma` (voxels) per
/// axis `[d, h, w]`, kernels truncated at 3 sigma and normalised to sum 1,
/// edges replicated (so a constant image stays constant).
pub fn gaussian_blur(image: &mut Array3<f32>, sigma: [f32; 3]) {
    for (axis, &s) in sigma.iter().enumerate() {
        if s.is_nan() || s <= 0.0 {
            continue;
        }
        let radius = (3.0 * s).ceil() as usize;
        let mut kernel: Vec<f32> = (0..=2 * radius)
            .map(|i| {
                let x = i as f32 - radius as f32;
                (-0.5 * x * x / (s * s)).exp()
            })
            .collect();
        let sum: f32 = kernel.iter().sum();
        kernel.iter_mut().for_each(|k| *k /= sum);
        let mut line = Vec::new();
        for lane in image.lanes_mut(Axis(axis)) {
            convolve(lane, &kernel, radius, &mut line);
        }
    }
}

/// Convolves one line in place with replicated edges; `line` is scratch.
fn convolve(mut lane: ArrayViewMut1<f32>, kernel: &[f32], radius: usize, line: &mut Vec<f32>) {
    let n = lane.len();
    line.clear();
    line.extend(lane.iter().copied());
    let last = n - 1;
    for (i, out) in lane.iter_mut().enumerate() {
        let mut acc = 0.0;
        for (k, &weight) in kernel.iter().enumerate() {
            let j = (i + k).saturating_sub(radius).min(last);
            acc += weight * line[j];
        }
        *out = acc;
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use rand::SeedableRng;
    use rand::rngs::ChaCha8Rng;

    #[test]
    fn blur_keeps_constants_and_mass() {
        let mut flat = Array3::from_elem((5, 6, 7), 2.5f32);
        gaussian_blur(&mut flat, [1.0, 1.3, 0.7]);
        assert!(flat.iter().all(|&v| (v - 2.5).abs() < 1e-5));
        let mut spike = Array3::zeros((15, 15, 15));
        spike[[7, 7, 7]] = 1.0f32;
        gaussian_blur(&mut spike, [1.0; 3]);
        let total: f32 = spike.sum();
        assert!((total - 1.0).abs() < 1e-4, "{total}");
        assert!(spike[[7, 7, 7]] < 0.1 && spike[[7, 7, 8]] > 0.0);
        // Symmetric spread.
        assert!((spike[[7, 7, 8]] - spike[[7, 7, 6]]).abs() < 1e-7);
    }

    #[test]
    fn smooth_field_hits_control_points_at_corners() {
        let mut rng = ChaCha8Rng::seed_from_u64(1);
        let field = smooth_field(&mut rng, [3; 3], [9, 9, 9], 1.0).unwrap();
        let mut rng = ChaCha8Rng::seed_from_u64(1);
        let coarse: Vec<f32> = (0..27).map(|_| rng.sample(StandardNormal)).collect();
        assert!((field[[0, 0, 0]] - coarse[0]).abs() < 1e-5);
        assert!((field[[8, 8, 8]] - coarse[26]).abs() < 1e-5);
        assert!((field[[4, 0, 0]] - coarse[9]).abs() < 1e-5);
    }

    #[test]
    fn rotation_is_orthonormal() {
        let r = rotation([0.1, -0.2, 0.15]);
        let rt: [[f64; 3]; 3] = std::array::from_fn(|i| std::array::from_fn(|j| r[j][i]));
        let p = matmul(&r, &rt);
        for (i, row) in p.iter().enumerate() {
            for (j, v) in row.iter().enumerate() {
                assert!((v - f64::from(u8::from(i == j))).abs() < 1e-12);
            }
        }
    }

    #[test]
    fn normalised_output_is_near_unit_scale() {
        let mut rng = ChaCha8Rng::seed_from_u64(3);
        let mut image = Array3::from_shape_fn((16, 16, 16), |(d, h, w)| (d * 3 + h + w) as f32);
        augment_intensity(&mut image, &mut rng, &IntensityConfig::default()).unwrap();
        let n = image.len() as f32;
        let mean = image.sum() / n;
        let std = (image.iter().map(|v| (v - mean) * (v - mean)).sum::<f32>() / n).sqrt();
        assert!(mean.abs() < 0.4, "{mean}");
        assert!((0.6..1.4).contains(&std), "{std}");
    }
}
