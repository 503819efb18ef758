//! Queries moved off the atlas pose: a seeded random similarity transform
//! applied to a real volume so that its *content* moves on its own grid.
//!
//! A [`Move`] is a rotation about an axis through the volume's world
//! centre `c`, an isotropic scale about `c` and a shift:
//! `T(x) = c + s R (x - c) + t` (world RAS+ mm). Moving a volume with
//! affine `A` means resampling the same voxels, placed by `T * A`, back
//! onto the grid of `A` (images trilinear, labels nearest neighbour, both
//! with `iris_core::preprocess`): what was at world position `x` is then
//! at `T(x)`, and the grid, shape and affine are unchanged. Moving the
//! truth with the same `T` keeps it on its image.

use iris_core::Result;
use iris_core::preprocess::{resample_image, resample_labels};
use iris_core::volume::{Affine, Geometry, Image, LabelMap, Volume};
use rand::rngs::ChaCha8Rng;
use rand::{RngExt, SeedableRng};

/// Largest rotation of [`Move::random`], degrees.
pub const MAX_ROTATION_DEG: f64 = 20.0;
/// Largest shift of [`Move::random`], mm.
pub const MAX_SHIFT_MM: f64 = 20.0;
/// Scales of [`Move::random`] lie in `[1 - MAX_SCALE_CHANGE, 1 + MAX_SCALE_CHANGE]`.
pub const MAX_SCALE_CHANGE: f64 = 0.1;

/// A similarity transform about a volume's world centre (see the module docs).
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct Move {
    /// Rotation angle, degrees (right-handed about `axis`).
    pub angle_deg: f64,
    /// Unit rotation axis in world RAS+ coordinates.
    pub axis: [f64; 3],
    /// Shift, world mm `[x, y, z]`.
    pub shift_mm: [f64; 3],
    /// Isotropic scale factor.
    pub scale: f64,
}

impl Move {
    /// No move at all.
    pub const IDENTITY: Move = Move {
        angle_deg: 0.0,
        axis: [0.0, 0.0, 1.0],
        shift_mm: [0.0; 3],
        scale: 1.0,
    };

    /// The move drawn from `seed`: a uniformly random axis, an angle
    /// uniform in `[0, 20]` degrees, a shift in a uniformly random
    /// direction with a length uniform in `[0, 20]` mm, and a scale
    /// uniform in `[0.9, 1.1]`. The same seed always gives the same move.
    pub fn random(seed: u64) -> Move {
        let mut rng = ChaCha8Rng::seed_from_u64(seed);
        let direction = |rng: &mut ChaCha8Rng| {
            // Uniform on the sphere: z uniform in [-1, 1], longitude uniform.
            let z: f64 = rng.random_range(-1.0..=1.0);
            let phi: f64 = rng.random_range(0.0..core::f64::consts::TAU);
            let r = (1.0 - z * z).max(0.0).sqrt();
            [r * phi.cos(), r * phi.sin(), z]
        };
        let axis = direction(&mut rng);
        let angle_deg = rng.random_range(0.0..=MAX_ROTATION_DEG);
        let shift_dir = direction(&mut rng);
        let shift_len = rng.random_range(0.0..=MAX_SHIFT_MM);
        let scale = rng.random_range(1.0 - MAX_SCALE_CHANGE..=1.0 + MAX_SCALE_CHANGE);
        Move {
            angle_deg,
            axis,
            shift_mm: shift_dir.map(|v| v * shift_len),
            scale,
        }
    }

    /// A pure shift by `shift_mm` (world mm).
    pub fn shift(shift_mm: [f64; 3]) -> Move {
        Move {
            shift_mm,
            ..Move::IDENTITY
        }
    }

    /// The world transform `T(x) = c + s R (x - c) + t` as an affine.
    pub fn world_transform(&self, centre: [f64; 3]) -> Affine {
        let r = rotation(self.axis, self.angle_deg.to_radians());
        let mut m = Affine::IDENTITY.0;
        for i in 0..3 {
            let mut rc = 0.0;
            for j in 0..3 {
                m[i][j] = self.scale * r[i][j];
                rc += m[i][j] * centre[j];
            }
            m[i][3] = centre[i] - rc + self.shift_mm[i];
        }
        Affine(m)
    }

    /// A one-line description, e.g. `12.3° about (0.12, -0.80, 0.59), shift (…) mm, scale 1.043`.
    pub fn describe(&self) -> String {
        let [ax, ay, az] = self.axis;
        let [sx, sy, sz] = self.shift_mm;
        let len = (sx * sx + sy * sy + sz * sz).sqrt();
        format!(
            "{:.1}° about ({ax:.2}, {ay:.2}, {az:.2}), shift ({sx:.1}, {sy:.1}, {sz:.1}) mm \
             (|t| = {len:.1} mm), scale {:.3}",
            self.angle_deg, self.scale
        )
    }
}

/// Rotation matrix of `angle` radians about the unit vector `axis` (Rodrigues).
fn rotation(axis: [f64; 3], angle: f64) -> [[f64; 3]; 3] {
    let norm = (axis[0] * axis[0] + axis[1] * axis[1] + axis[2] * axis[2]).sqrt();
    let [x, y, z] = if norm > 0.0 {
        axis.map(|a| a / norm)
    } else {
        [0.0, 0.0, 1.0]
    };
    let (s, c) = angle.sin_cos();
    let t = 1.0 - c;
    [
        [t * x * x + c, t * x * y - s * z, t * x * z + s * y],
        [t * x * y + s * z, t * y * y + c, t * y * z - s * x],
        [t * x * z - s * y, t * y * z + s * x, t * z * z + c],
    ]
}

/// The voxels of `volume` placed by `transform * affine` (same shape).
fn placed<T: Clone>(volume: &Volume<T>, transform: &Affine) -> Result<Volume<T>> {
    let affine = transform.compose(&volume.geometry().affine());
    Volume::new(volume.data().clone(), affine)
}

/// `image` with its content moved by the world transform `transform`
/// (see [`Move::world_transform`]), on its own grid (trilinear; outside
/// the volume the nearest edge value).
///
/// # Errors
/// [`iris_core::Error::InvalidArgument`] for a singular transform.
pub fn move_image(image: &Image, transform: &Affine) -> Result<Image> {
    resample_image(&placed(image, transform)?, image.geometry())
}

/// `labels` with their content moved by `transform` on their own grid
/// (nearest neighbour; 0 where nothing maps).
///
/// # Errors
/// As [`move_image`].
pub fn move_labels(labels: &LabelMap, transform: &Affine) -> Result<LabelMap> {
    resample_labels(&placed(labels, transform)?, labels.geometry())
}

/// The world transform of `mv` about the centre of `grid`.
pub fn about_centre(mv: &Move, grid: &Geometry) -> Affine {
    mv.world_transform(grid.center_world())
}

#[cfg(test)]
mod tests {
    use super::*;
    use iris_core::metrics::dice_per_class;
    use ndarray::Array3;

    /// A 40^3 grid of 2 mm voxels with a ball (label 1) and a box (label 2)
    /// and a smooth image.
    fn phantom() -> (Image, LabelMap) {
        let affine = Affine([
            [2.0, 0.0, 0.0, -40.0],
            [0.0, 2.0, 0.0, -30.0],
            [0.0, 0.0, 2.0, -35.0],
            [0.0, 0.0, 0.0, 1.0],
        ]);
        let labels = Array3::from_shape_fn((40, 40, 40), |(d, h, w)| {
            let r2 = [d, h, w]
                .iter()
                .zip([18.0, 20.0, 21.0])
                .map(|(&i, c)| (i as f64 - c).powi(2))
                .sum::<f64>();
            if r2 < 64.0 {
                1
            } else if (8..16).contains(&d) && (10..30).contains(&h) && (12..20).contains(&w) {
                2
            } else {
                0
            }
        });
        let image = labels.mapv(|l| f32::from(l) * 50.0 + 10.0);
        (
            Image::new(image, affine).expect("valid"),
            LabelMap::new(labels, affine).expect("valid"),
        )
    }

    fn centroid(labels: &LabelMap, label: u16) -> [f64; 3] {
        let mut sum = [0.0; 3];
        let mut n = 0.0;
        for ((d, h, w), &l) in labels.data().indexed_iter() {
            if l == label {
                sum[0] += d as f64;
                sum[1] += h as f64;
                sum[2] += w as f64;
                n += 1.0;
            }
        }
        sum.map(|s| s / n)
    }

    #[test]
    fn identity_gives_the_volume_back() {
        let (image, labels) = phantom();
        let t = about_centre(&Move::IDENTITY, image.geometry());
        assert_eq!(move_image(&image, &t).expect("moves"), image);
        assert_eq!(move_labels(&labels, &t).expect("moves"), labels);
    }

    #[test]
    fn a_shift_of_k_voxels_moves_the_centroid_by_k_voxels() {
        let (_, labels) = phantom();
        // 2 mm voxels, axis d is world x, h is y: 3 voxels along d, -2 along h.
        let t = about_centre(&Move::shift([6.0, -4.0, 0.0]), labels.geometry());
        let moved = move_labels(&labels, &t).expect("moves");
        let (before, after) = (centroid(&labels, 1), centroid(&moved, 1));
        let delta: Vec<f64> = (0..3).map(|a| after[a] - before[a]).collect();
        for (got, want) in delta.iter().zip([3.0, -2.0, 0.0]) {
            assert!((got - want).abs() < 1e-9, "centroid moved by {delta:?}");
        }
        assert_eq!(moved.count(1), labels.count(1));
    }

    #[test]
    fn a_move_and_its_inverse_give_the_labels_back() {
        let (image, labels) = phantom();
        for seed in 0..4 {
            let t = about_centre(&Move::random(seed), labels.geometry());
            let back = t.inverse().expect("invertible");
            let moved = move_labels(&labels, &t).expect("moves");
            assert_ne!(moved, labels, "seed {seed} moved nothing");
            let round = move_labels(&moved, &back).expect("moves");
            let dice = dice_per_class(&round, &labels, &[1, 2]).expect("same grid");
            for d in dice {
                let d = d.expect("present");
                assert!(d > 0.95, "seed {seed}: Dice {d} after T then T^-1");
            }
            // Images move alike: the moved image is bright where the moved labels are.
            let moved_image = move_image(&image, &t).expect("moves");
            let mean_in = |label: u16| {
                let (mut s, mut n) = (0.0f64, 0.0f64);
                for (&v, &l) in moved_image.data().iter().zip(moved.data().iter()) {
                    if l == label {
                        s += f64::from(v);
                        n += 1.0;
                    }
                }
                s / n
            };
            assert!(mean_in(1) > 50.0 && mean_in(2) > 100.0 && mean_in(0) < 20.0);
        }
    }

    #[test]
    fn seeds_are_reproducible_and_within_bounds() {
        for seed in 0..200 {
            let m = Move::random(seed);
            assert_eq!(m, Move::random(seed));
            assert_ne!(m, Move::random(seed + 1));
            assert!((0.0..=MAX_ROTATION_DEG).contains(&m.angle_deg));
            let norm = |v: [f64; 3]| (v[0] * v[0] + v[1] * v[1] + v[2] * v[2]).sqrt();
            assert!((norm(m.axis) - 1.0).abs() < 1e-12);
            assert!(norm(m.shift_mm) <= MAX_SHIFT_MM + 1e-9);
            assert!((0.9..=1.1).contains(&m.scale));
            // A similarity about the centre: the centre moves by the shift only.
            let c = [3.0, -7.0, 11.0];
            let moved = m.world_transform(c).apply(c);
            for a in 0..3 {
                assert!((moved[a] - c[a] - m.shift_mm[a]).abs() < 1e-9);
            }
            // The linear part is s times a rotation: det = s^3.
            let det = m.world_transform(c).determinant();
            assert!((det - m.scale.powi(3)).abs() < 1e-9);
        }
    }
}
