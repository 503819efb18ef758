//! Reorientation to canonical RAS+ axis order and back, by axis permutation
//! and flips only (no interpolation), like nibabel's `as_closest_canonical`
//! or the released code's `sitk.DICOMOrient(image, "RAS")`.
//!
//! With arrays in `[D, H, W]` order, *canonical* means: the `w` axis points
//! most closely to +x (Right), `h` to +y (Anterior) and `d` to +z
//! (Superior). This is exactly how a canonical NIfTI file looks once read
//! in C order.

use ndarray::Axis;

use crate::error::Result;
use crate::volume::{Affine, Geometry, Volume, try_standard};

/// How a grid was reoriented to canonical RAS+ order, and how to go back.
///
/// Build it with [`Reorientation::plan`] (or get it from [`canonical`]);
/// [`Reorientation::apply`] moves a volume on the original grid to the
/// canonical grid and [`Reorientation::undo`] moves a volume on the canonical
/// grid back, restoring the original geometry bit for bit.
///
/// ```
/// use iris_core::preprocess::Reorientation;
/// use iris_core::volume::{Affine, Geometry};
///
/// // `d` runs along +x and `w` along -z: a sagittal stack.
/// let affine = Affine([
///     [2.0, 0.0, 0.0, -50.0],
///     [0.0, 1.0, 0.0, 0.0],
///     [0.0, 0.0, -1.0, 30.0],
///     [0.0, 0.0, 0.0, 1.0],
/// ]);
/// let plan = Reorientation::plan(&Geometry::new([10, 20, 30], affine)?)?;
/// assert_eq!(plan.canonical_geometry().shape(), [30, 20, 10]);
/// assert_eq!(plan.canonical_geometry().spacing(), [1.0, 1.0, 2.0]);
/// # Ok::<(), iris_core::Error>(())
/// ```
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct Reorientation {
    original: Geometry,
    canonical: Geometry,
    /// For each canonical axis `o` (`[d, h, w]`), the original axis it takes.
    source_axis: [usize; 3],
    /// For each canonical axis `o`, whether it runs against that original axis.
    flip: [bool; 3],
}

impl Reorientation {
    /// Plans the reorientation of a grid.
    ///
    /// Each voxel axis is assigned to the world axis its direction is
    /// closest to, greedily: the largest absolute direction cosine (affine
    /// column divided by its length) decides first, then the largest among
    /// the remaining axes, and so on. nibabel does the same after making the
    /// direction matrix orthogonal; both agree unless two axes are at 45
    /// degrees to a world axis, where either choice is equally close.
    ///
    /// # Errors
    /// [`Error::InvalidArgument`](crate::Error::InvalidArgument) only if the moved origin overflows `f64`
    /// (an affine with entries near `1e308`).
    pub fn plan(geometry: &Geometry) -> Result<Reorientation> {
        let m = geometry.affine().0;
        let spacing = geometry.spacing();
        // cos[r][k]: world axis r component of the unit direction of voxel axis k.
        let cos: [[f64; 3]; 3] =
            core::array::from_fn(|r| core::array::from_fn(|k| m[r][k] / spacing[k]));
        let mut world_used = [false; 3];
        let mut voxel_used = [false; 3];
        let mut source_axis = [0; 3];
        let mut flip = [false; 3];
        for _ in 0..3 {
            let mut best: Option<(usize, usize, f64)> = None;
            for (r, row) in cos.iter().enumerate() {
                for (k, &c) in row.iter().enumerate() {
                    if world_used[r] || voxel_used[k] {
                        continue;
                    }
                    if best.is_none_or(|(_, _, b)| c.abs() > b.abs()) {
                        best = Some((r, k, c));
                    }
                }
            }
            // Three rounds over a 3x3 matrix: a free pair always remains.
            let Some((r, k, c)) = best else { break };
            world_used[r] = true;
            voxel_used[k] = true;
            // World x (r = 0) is the `w` axis (2), z (r = 2) the `d` axis (0).
            source_axis[2 - r] = k;
            flip[2 - r] = c < 0.0;
        }
        let shape = geometry.shape();
        let canonical_shape = source_axis.map(|k| shape[k]);
        let mut out = Affine::IDENTITY.0;
        for r in 0..3 {
            out[r][3] = m[r][3];
        }
        for o in 0..3 {
            let k = source_axis[o];
            for r in 0..3 {
                out[r][o] = if flip[o] { -m[r][k] } else { m[r][k] };
                if flip[o] {
                    // Canonical index 0 is the original's last index on this axis.
                    out[r][3] += (shape[k] - 1) as f64 * m[r][k];
                }
            }
        }
        Ok(Reorientation {
            original: *geometry,
            canonical: Geometry::new(canonical_shape, Affine(out))?,
            source_axis,
            flip,
        })
    }

    /// The grid before reorientation.
    pub fn original_geometry(&self) -> &Geometry {
        &self.original
    }

    /// The canonical (RAS+) grid.
    pub fn canonical_geometry(&self) -> &Geometry {
        &self.canonical
    }

    /// True when the original grid is already canonical (nothing moves).
    pub fn is_identity(&self) -> bool {
        self.source_axis == [0, 1, 2] && self.flip == [false; 3]
    }

    /// Moves `volume`, which must lie on the original grid, to the canonical
    /// grid. Every voxel keeps its world position.
    ///
    /// # Errors
    /// [`Error::ShapeMismatch`](crate::Error::ShapeMismatch) or [`Error::InvalidArgument`](crate::Error::InvalidArgument) when `volume`
    /// is not on the original grid.
    pub fn apply<T: Clone>(&self, volume: &Volume<T>) -> Result<Volume<T>> {
        self.original.ensure_same(
            volume.geometry(),
            "volume vs the reorientation's original grid",
        )?;
        let mut view = volume.data().view();
        for o in 0..3 {
            if self.flip[o] {
                view.invert_axis(Axis(self.source_axis[o]));
            }
        }
        let data = try_standard(view.permuted_axes(self.source_axis), "reoriented volume")?;
        Volume::with_geometry(data, self.canonical)
    }

    /// Moves `volume`, which must lie on the canonical grid (e.g. a label map
    /// predicted there), back to the original grid; the result carries the
    /// original geometry exactly.
    ///
    /// # Errors
    /// [`Error::ShapeMismatch`](crate::Error::ShapeMismatch) or [`Error::InvalidArgument`](crate::Error::InvalidArgument) when `volume`
    /// is not on the canonical grid.
    pub fn undo<T: Clone>(&self, volume: &Volume<T>) -> Result<Volume<T>> {
        self.canonical
            .ensure_same(volume.geometry(), "volume vs the canonical grid")?;
        let mut back = [0; 3];
        for (o, &k) in self.source_axis.iter().enumerate() {
            back[k] = o;
        }
        let mut view = volume.data().view().permuted_axes(back);
        for o in 0..3 {
            if self.flip[o] {
                view.invert_axis(Axis(self.source_axis[o]));
            }
        }
        Volume::with_geometry(try_standard(view, "reoriented volume")?, self.original)
    }
}

/// Reorients `volume` to canonical RAS+ order (see the module docs) and
/// returns the plan that undoes it.
///
/// # Errors
/// As [`Reorientation::plan`].
pub fn canonical<T: Clone>(volume: &Volume<T>) -> Result<(Volume<T>, Reorientation)> {
    let plan = Reorientation::plan(volume.geometry())?;
    Ok((plan.apply(volume)?, plan))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::Error;
    use alloc::vec::Vec;
    use ndarray::Array3;

    /// All 48 grids whose axes are a permutation of the world axes with
    /// signs, with distinct spacings, an origin and a 10 degree tilt so that
    /// no direction is exactly axis-aligned.
    fn all_orientations() -> Vec<Affine> {
        let perms = [
            [0, 1, 2],
            [0, 2, 1],
            [1, 0, 2],
            [1, 2, 0],
            [2, 0, 1],
            [2, 1, 0],
        ];
        let (s, c) = (libm::sin(0.17), libm::cos(0.17));
        let tilt = [[c, -s, 0.0], [s, c, 0.0], [0.0, 0.0, 1.0]];
        let spacing = [0.7, 1.3, 2.9];
        let mut out = Vec::new();
        for perm in perms {
            for signs in 0..8 {
                let mut m = Affine::IDENTITY.0;
                for k in 0..3 {
                    let sign = if signs >> k & 1 == 1 { -1.0 } else { 1.0 };
                    // Voxel axis k along world axis perm[k], tilted.
                    for r in 0..3 {
                        m[r][k] = sign * spacing[k] * tilt[r][perm[k]];
                    }
                }
                m[0][3] = -31.5;
                m[1][3] = 12.25;
                m[2][3] = 80.0;
                out.push(Affine(m));
            }
        }
        out
    }

    #[test]
    fn canonical_then_undo_is_identity_for_all_48_orientations() {
        let shape = (3, 4, 5);
        let mut identities = 0;
        for affine in all_orientations() {
            // Each voxel stores its own original index.
            let vol = Volume::new(Array3::from_shape_fn(shape, |(d, h, w)| [d, h, w]), affine)
                .expect("valid grid");
            let (ras, plan) = canonical(&vol).expect("plan");
            identities += usize::from(plan.is_identity());

            // Columns point to +S (d), +A (h), +R (w): the largest component
            // of column o is on world axis 2 - o, and it is positive.
            let m = ras.geometry().affine().0;
            let columns: [[f64; 3]; 3] =
                core::array::from_fn(|o| core::array::from_fn(|r| m[r][o]));
            for (o, col) in columns.iter().enumerate() {
                let big = (0..3)
                    .max_by(|&a, &b| col[a].abs().total_cmp(&col[b].abs()))
                    .expect("three entries");
                assert_eq!(big, 2 - o, "{affine:?} column {o}: {col:?}");
                assert!(col[big] > 0.0, "{affine:?} column {o}: {col:?}");
            }
            // [d, h, w] along [z, y, x]: an odd permutation of RAS+, so the
            // determinant is negative in our axis order.
            assert!(ras.geometry().affine().determinant() < 0.0);

            // Every voxel keeps its world position.
            for ((d, h, w), idx) in ras.data().indexed_iter() {
                let now = ras
                    .geometry()
                    .voxel_to_world([d as f64, h as f64, w as f64]);
                let before = vol.geometry().voxel_to_world(idx.map(|i| i as f64));
                for a in 0..3 {
                    assert!(
                        (now[a] - before[a]).abs() < 1e-9,
                        "{affine:?}: {now:?} vs {before:?}"
                    );
                }
            }

            // Undo restores data and geometry bit for bit.
            assert_eq!(plan.undo(&ras).expect("on the canonical grid"), vol);
        }
        assert_eq!(identities, 1, "exactly one of the 48 is already canonical");
    }

    #[test]
    fn apply_and_undo_refuse_other_grids() {
        // Canonical but for `d` running inferior: only a flip is needed.
        let flipped_d = Affine([
            [0.0, 0.0, 1.0, 0.0],
            [0.0, 1.0, 0.0, 0.0],
            [-1.0, 0.0, 0.0, 0.0],
            [0.0, 0.0, 0.0, 1.0],
        ]);
        let vol = Volume::new(Array3::<u8>::zeros((2, 3, 4)), flipped_d).expect("valid");
        let (ras, plan) = canonical(&vol).expect("plan");
        let other = Volume::new(Array3::<u8>::zeros((2, 3, 5)), Affine::IDENTITY).expect("valid");
        assert!(matches!(
            plan.apply(&other),
            Err(Error::ShapeMismatch { .. })
        ));
        // The original grid is not the canonical one (an axis was flipped).
        assert!(matches!(
            plan.undo(&vol),
            Err(Error::InvalidArgument { .. })
        ));
        assert!(plan.apply(&ras).is_err());
    }
}
