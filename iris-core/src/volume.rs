//! Dense 3-D volumes and their place in the world.
//!
//! # Axis order and coordinates
//! Every array in iris is in C order `[D, H, W]`: the last index (`W`) varies
//! fastest in memory. For a NIfTI file this means `D = k` (slices),
//! `H = j` (rows), `W = i` (columns): the `nifti` module converts.
//!
//! The [`Affine`] of a [`Geometry`] maps a voxel index **in the same
//! `[d, h, w]` order** to world coordinates in millimetres, RAS+ (x grows to
//! the subject's Right... no: x to the *Left-to-Right* direction, i.e. "R" is
//! +x, "A" is +y, "S" is +z), as NIfTI does. Voxel spacing is not stored
//! separately: it is the length of each affine column, so the two can never
//! disagree.
//!
//! ```
//! use iris_core::volume::{Affine, Geometry, Image};
//! use ndarray::Array3;
//!
//! let geometry = Geometry::new([2, 3, 4], Affine::from_spacing([2.0, 1.0, 0.5]))?;
//! let image = Image::new(Array3::zeros((2, 3, 4)), geometry.affine())?;
//! assert_eq!(image.geometry().spacing(), [2.0, 1.0, 0.5]);
//! assert_eq!(image.geometry().voxel_to_world([1.0, 1.0, 2.0]), [2.0, 1.0, 1.0]);
//! # Ok::<(), iris_core::Error>(())
//! ```

use alloc::format;
use alloc::vec::Vec;
use ndarray::Array3;

use crate::error::{Error, Result};

/// Largest number of voxels a volume may have: 2^31 (8 GiB of `f32`).
///
/// Anything larger is refused as [`Error::TooLarge`] before any allocation,
/// which protects against corrupt headers claiming absurd sizes.
pub const MAX_VOXELS: usize = 1 << 31;

/// Two affines closer than this (mm, largest entry difference) are the same grid.
pub const GRID_TOLERANCE_MM: f64 = 1e-4;

/// A 4x4 voxel-to-world transform, row-major, acting on `[d, h, w, 1]`
/// column vectors. The last row is always `[0, 0, 0, 1]`.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct Affine(pub [[f64; 4]; 4]);

impl Affine {
    /// The identity transform (1 mm spacing, origin at voxel 0).
    pub const IDENTITY: Affine = Affine([
        [1.0, 0.0, 0.0, 0.0],
        [0.0, 1.0, 0.0, 0.0],
        [0.0, 0.0, 1.0, 0.0],
        [0.0, 0.0, 0.0, 1.0],
    ]);

    /// An axis-aligned transform with the given spacing (mm, `[d, h, w]`
    /// order) and the origin at voxel `[0, 0, 0]`. Axis `d` maps to world x,
    /// `h` to y and `w` to z.
    pub fn from_spacing(spacing: [f64; 3]) -> Affine {
        let mut m = Affine::IDENTITY.0;
        for (axis, s) in spacing.iter().enumerate() {
            m[axis][axis] = *s;
        }
        Affine(m)
    }

    /// Applies the transform to a point given in voxel coordinates.
    pub fn apply(&self, p: [f64; 3]) -> [f64; 3] {
        let m = &self.0;
        core::array::from_fn(|r| m[r][0] * p[0] + m[r][1] * p[1] + m[r][2] * p[2] + m[r][3])
    }

    /// Applies only the linear part (no translation), e.g. to a direction.
    pub fn apply_linear(&self, v: [f64; 3]) -> [f64; 3] {
        let m = &self.0;
        core::array::from_fn(|r| m[r][0] * v[0] + m[r][1] * v[1] + m[r][2] * v[2])
    }

    /// `self * other`: first `other`, then `self`.
    pub fn compose(&self, other: &Affine) -> Affine {
        let (a, b) = (&self.0, &other.0);
        Affine(core::array::from_fn(|r| {
            core::array::from_fn(|c| (0..4).map(|k| a[r][k] * b[k][c]).sum())
        }))
    }

    /// The inverse transform, or `None` when the linear part is singular or
    /// not finite.
    pub fn inverse(&self) -> Option<Affine> {
        let m = &self.0;
        let det = self.determinant();
        if !det.is_finite() || det.abs() < 1e-12 {
            return None;
        }
        // Inverse of the 3x3 linear part by cofactors.
        let c = |r0: usize, c0: usize, r1: usize, c1: usize| {
            m[r0][c0] * m[r1][c1] - m[r0][c1] * m[r1][c0]
        };
        let inv3 = [
            [
                c(1, 1, 2, 2) / det,
                -c(0, 1, 2, 2) / det,
                c(0, 1, 1, 2) / det,
            ],
            [
                -c(1, 0, 2, 2) / det,
                c(0, 0, 2, 2) / det,
                -c(0, 0, 1, 2) / det,
            ],
            [
                c(1, 0, 2, 1) / det,
                -c(0, 0, 2, 1) / det,
                c(0, 0, 1, 1) / det,
            ],
        ];
        let t = [m[0][3], m[1][3], m[2][3]];
        let mut out = Affine::IDENTITY.0;
        for r in 0..3 {
            out[r][..3].copy_from_slice(&inv3[r]);
            out[r][3] = -(inv3[r][0] * t[0] + inv3[r][1] * t[1] + inv3[r][2] * t[2]);
        }
        Some(Affine(out))
    }

    /// Determinant of the linear part (negative for a left-handed voxel grid).
    pub fn determinant(&self) -> f64 {
        let m = &self.0;
        m[0][0] * (m[1][1] * m[2][2] - m[1][2] * m[2][1])
            - m[0][1] * (m[1][0] * m[2][2] - m[1][2] * m[2][0])
            + m[0][2] * (m[1][0] * m[2][1] - m[1][1] * m[2][0])
    }

    /// Length in mm of one voxel step along each axis (`[d, h, w]`).
    pub fn spacing(&self) -> [f64; 3] {
        let m = &self.0;
        core::array::from_fn(|c| {
            libm::sqrt(m[0][c] * m[0][c] + m[1][c] * m[1][c] + m[2][c] * m[2][c])
        })
    }

    /// True when every entry is finite and the last row is `[0, 0, 0, 1]`.
    pub fn is_valid(&self) -> bool {
        self.0.iter().flatten().all(|v| v.is_finite()) && self.0[3] == [0.0, 0.0, 0.0, 1.0]
    }
}

/// Shape and placement of a voxel grid: `[D, H, W]` sizes plus the
/// voxel-to-world [`Affine`].
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct Geometry {
    shape: [usize; 3],
    affine: Affine,
}

impl Geometry {
    /// A grid of `shape` voxels (`[D, H, W]`) placed by `affine`.
    ///
    /// # Errors
    /// [`Error::InvalidArgument`] for a zero dimension or an affine that is not
    /// finite or not invertible; [`Error::TooLarge`] above [`MAX_VOXELS`].
    pub fn new(shape: [usize; 3], affine: Affine) -> Result<Geometry> {
        if shape.contains(&0) {
            return Err(Error::invalid(
                "shape",
                format!("{shape:?} has a zero dimension"),
            ));
        }
        checked_voxel_count(shape)?;
        if !affine.is_valid() || affine.inverse().is_none() {
            return Err(Error::invalid(
                "affine",
                format!(
                    "{:?} is not a finite invertible voxel-to-world transform",
                    affine.0
                ),
            ));
        }
        Ok(Geometry { shape, affine })
    }

    /// Grid size `[D, H, W]`.
    pub fn shape(&self) -> [usize; 3] {
        self.shape
    }

    /// Voxel-to-world transform (voxel `[d, h, w]` to RAS+ mm).
    pub fn affine(&self) -> Affine {
        self.affine
    }

    /// Voxel spacing in mm, `[d, h, w]` order.
    pub fn spacing(&self) -> [f64; 3] {
        self.affine.spacing()
    }

    /// Number of voxels.
    pub fn len(&self) -> usize {
        self.shape.iter().product()
    }

    /// Always false: a geometry has at least one voxel.
    pub fn is_empty(&self) -> bool {
        false
    }

    /// World position (mm, RAS+) of a voxel position (`[d, h, w]`, may be fractional).
    pub fn voxel_to_world(&self, voxel: [f64; 3]) -> [f64; 3] {
        self.affine.apply(voxel)
    }

    /// Voxel position (`[d, h, w]`, fractional) of a world position (mm, RAS+).
    pub fn world_to_voxel(&self, world: [f64; 3]) -> [f64; 3] {
        // `new` guarantees invertibility.
        self.affine
            .inverse()
            .map_or([f64::NAN; 3], |inv| inv.apply(world))
    }

    /// World position of the centre of the grid.
    pub fn center_world(&self) -> [f64; 3] {
        self.voxel_to_world(core::array::from_fn(|a| (self.shape[a] as f64 - 1.0) / 2.0))
    }

    /// Checks that `other` is the same grid: equal shape and affines equal
    /// within [`GRID_TOLERANCE_MM`].
    ///
    /// # Errors
    /// [`Error::ShapeMismatch`] for another shape, [`Error::InvalidArgument`]
    /// for another placement; both name `what` (e.g. "label map vs image").
    pub fn ensure_same(&self, other: &Geometry, what: &str) -> Result<()> {
        if self.shape != other.shape {
            return Err(Error::ShapeMismatch {
                what: what.into(),
                expected: self.shape.to_vec(),
                found: other.shape.to_vec(),
            });
        }
        let (a, b) = (self.affine.0, other.affine.0);
        let worst = a
            .iter()
            .flatten()
            .zip(b.iter().flatten())
            .map(|(x, y)| (x - y).abs())
            .fold(0.0, f64::max);
        if worst > GRID_TOLERANCE_MM {
            return Err(Error::invalid(
                "affine",
                format!("{what}: grids differ by up to {worst:.4} mm ({a:?} vs {b:?})"),
            ));
        }
        Ok(())
    }
}

/// Number of voxels in `shape`, refusing overflow and anything above [`MAX_VOXELS`].
pub fn checked_voxel_count(shape: [usize; 3]) -> Result<usize> {
    shape
        .iter()
        .try_fold(1usize, |acc, &n| acc.checked_mul(n))
        .filter(|&n| n <= MAX_VOXELS)
        .ok_or_else(|| Error::TooLarge {
            what: "volume",
            detail: format!("{shape:?} voxels exceeds the limit of {MAX_VOXELS}"),
        })
}

/// An empty vector with room for `len` values, reserved without aborting:
/// when the system cannot provide the memory, [`Error::TooLarge`] names
/// `what` and the bytes. The budget of [`Limits`](crate::pipeline::Limits)
/// is checked before the large buffers are made; this covers a machine, or
/// a host process, with less memory than the budget allows.
pub(crate) fn try_with_capacity<T>(len: usize, what: &'static str) -> Result<Vec<T>> {
    let mut v = Vec::new();
    v.try_reserve_exact(len).map_err(|e| Error::TooLarge {
        what,
        detail: format!(
            "cannot allocate {} for {len} values: {e}",
            crate::pipeline::size_text((len as u128) * size_of::<T>() as u128)
        ),
    })?;
    Ok(v)
}

/// `len` copies of `value`, allocated as [`try_with_capacity`] does.
pub(crate) fn try_filled<T: Clone>(len: usize, value: T, what: &'static str) -> Result<Vec<T>> {
    let mut v = try_with_capacity(len, what)?;
    v.resize(len, value);
    Ok(v)
}

/// An owned C-order copy of `view`, allocated as [`try_with_capacity`] does.
pub(crate) fn try_standard<T: Clone>(
    view: ndarray::ArrayView3<'_, T>,
    what: &'static str,
) -> Result<Array3<T>> {
    let mut v = try_with_capacity(view.len(), what)?;
    v.extend(view.iter().cloned());
    Array3::from_shape_vec(view.raw_dim(), v).map_err(|e| Error::invalid(what, format!("{e}")))
}

/// A dense 3-D array of voxels (`[D, H, W]`, C order) with its [`Geometry`].
#[derive(Clone, Debug, PartialEq)]
pub struct Volume<T> {
    data: Array3<T>,
    geometry: Geometry,
}

/// An intensity image (CT in HU, MR in arbitrary units, or normalised values).
pub type Image = Volume<f32>;

/// A label map: 0 is background, every other value is a class.
pub type LabelMap = Volume<u16>;

impl<T> Volume<T> {
    /// Wraps `data`, placed in the world by `affine`.
    ///
    /// # Errors
    /// As [`Geometry::new`] for the data's shape.
    pub fn new(data: Array3<T>, affine: Affine) -> Result<Volume<T>> {
        let (d, h, w) = data.dim();
        let geometry = Geometry::new([d, h, w], affine)?;
        Ok(Volume { data, geometry })
    }

    /// Builds a volume from voxels in C order (`w` fastest).
    ///
    /// # Errors
    /// [`Error::ShapeMismatch`] when `voxels.len()` is not the product of
    /// `shape`; otherwise as [`Geometry::new`].
    pub fn from_vec(shape: [usize; 3], affine: Affine, voxels: Vec<T>) -> Result<Volume<T>> {
        let geometry = Geometry::new(shape, affine)?;
        if voxels.len() != geometry.len() {
            return Err(Error::ShapeMismatch {
                what: format!("voxel buffer for a {shape:?} volume"),
                expected: alloc::vec![geometry.len()],
                found: alloc::vec![voxels.len()],
            });
        }
        let data = Array3::from_shape_vec((shape[0], shape[1], shape[2]), voxels).map_err(|e| {
            Error::invalid("voxels", format!("cannot shape buffer as {shape:?}: {e}"))
        })?;
        Ok(Volume { data, geometry })
    }

    /// Wraps `data` with an existing geometry.
    ///
    /// # Errors
    /// [`Error::ShapeMismatch`] when the data's shape differs from the geometry's.
    pub fn with_geometry(data: Array3<T>, geometry: Geometry) -> Result<Volume<T>> {
        let (d, h, w) = data.dim();
        if [d, h, w] != geometry.shape() {
            return Err(Error::ShapeMismatch {
                what: "volume data vs geometry".into(),
                expected: geometry.shape().to_vec(),
                found: alloc::vec![d, h, w],
            });
        }
        Ok(Volume { data, geometry })
    }

    /// The voxels, `[D, H, W]`.
    pub fn data(&self) -> &Array3<T> {
        &self.data
    }

    /// Mutable access to the voxels (the shape cannot change through it).
    pub fn data_mut(&mut self) -> &mut Array3<T> {
        &mut self.data
    }

    /// Shape and placement.
    pub fn geometry(&self) -> &Geometry {
        &self.geometry
    }

    /// `[D, H, W]`.
    pub fn shape(&self) -> [usize; 3] {
        self.geometry.shape()
    }

    /// Splits into voxels and geometry.
    pub fn into_parts(self) -> (Array3<T>, Geometry) {
        (self.data, self.geometry)
    }

    /// A new volume on the same grid with `f` applied to every voxel.
    pub fn map<U>(&self, f: impl FnMut(&T) -> U) -> Volume<U> {
        Volume {
            data: self.data.map(f),
            geometry: self.geometry,
        }
    }

    /// Checks that `other` lies on exactly the same grid (see
    /// [`Geometry::ensure_same`]), as a label map must for its image.
    ///
    /// # Errors
    /// [`Error::ShapeMismatch`] or [`Error::InvalidArgument`] naming `what`.
    pub fn ensure_same_grid<U>(&self, other: &Volume<U>, what: &str) -> Result<()> {
        self.geometry.ensure_same(&other.geometry, what)
    }
}

impl Image {
    /// Fails with [`Error::NonFinite`] if any voxel is NaN or infinite.
    pub fn ensure_finite(&self, what: &'static str) -> Result<()> {
        let count = self.data.iter().filter(|v| !v.is_finite()).count();
        if count > 0 {
            return Err(Error::NonFinite { what, count });
        }
        Ok(())
    }
}

impl LabelMap {
    /// The non-zero label values present, sorted ascending.
    pub fn labels_present(&self) -> Vec<u16> {
        let mut seen = alloc::vec![false; usize::from(u16::MAX) + 1];
        for &v in self.data.iter() {
            seen[usize::from(v)] = true;
        }
        (1..=u16::MAX).filter(|&v| seen[usize::from(v)]).collect()
    }

    /// Number of voxels with value `label`.
    pub fn count(&self, label: u16) -> usize {
        self.data.iter().filter(|&&v| v == label).count()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn rotated() -> Affine {
        // 30 degrees about the world z axis, anisotropic spacing, an origin.
        let (s, c) = (0.5f64, libm::sqrt(3.0) / 2.0);
        Affine([
            [c * 0.8, -s * 1.2, 0.0, -90.0],
            [s * 0.8, c * 1.2, 0.0, 126.0],
            [0.0, 0.0, 3.0, -72.0],
            [0.0, 0.0, 0.0, 1.0],
        ])
    }

    #[test]
    fn inverse_round_trips_points() {
        let a = rotated();
        let inv = a.inverse().expect("invertible");
        for p in [[0.0, 0.0, 0.0], [10.5, -3.0, 7.25], [100.0, 200.0, 50.0]] {
            let q = inv.apply(a.apply(p));
            for k in 0..3 {
                assert!((q[k] - p[k]).abs() < 1e-9, "{p:?} -> {q:?}");
            }
        }
        let id = a.compose(&inv);
        for r in 0..4 {
            for c in 0..4 {
                let want = if r == c { 1.0 } else { 0.0 };
                assert!((id.0[r][c] - want).abs() < 1e-12);
            }
        }
    }

    #[test]
    fn spacing_is_column_length() {
        let sp = rotated().spacing();
        assert!(
            (sp[0] - 0.8).abs() < 1e-12
                && (sp[1] - 1.2).abs() < 1e-12
                && (sp[2] - 3.0).abs() < 1e-12
        );
    }

    #[test]
    fn geometry_rejects_bad_input() {
        assert!(matches!(
            Geometry::new([0, 4, 4], Affine::IDENTITY),
            Err(Error::InvalidArgument { .. })
        ));
        assert!(matches!(
            Geometry::new([1 << 20, 1 << 20, 4], Affine::IDENTITY),
            Err(Error::TooLarge { .. })
        ));
        assert!(matches!(
            Geometry::new([usize::MAX, 2, 2], Affine::IDENTITY),
            Err(Error::TooLarge { .. })
        ));
        let singular = Affine::from_spacing([1.0, 0.0, 1.0]);
        assert!(matches!(
            Geometry::new([2, 2, 2], singular),
            Err(Error::InvalidArgument { .. })
        ));
        let mut nan = Affine::IDENTITY;
        nan.0[0][3] = f64::NAN;
        assert!(Geometry::new([2, 2, 2], nan).is_err());
    }

    #[test]
    fn from_vec_checks_length_and_keeps_c_order() {
        assert!(matches!(
            Image::from_vec([2, 2, 2], Affine::IDENTITY, alloc::vec![0.0; 7]),
            Err(Error::ShapeMismatch { .. })
        ));
        let v = Image::from_vec(
            [1, 2, 3],
            Affine::IDENTITY,
            (0..6).map(|x| x as f32).collect(),
        )
        .expect("valid");
        assert_eq!(v.data()[[0, 1, 0]], 3.0);
        assert_eq!(v.data()[[0, 0, 2]], 2.0);
    }

    #[test]
    fn non_finite_and_labels() {
        let mut img = Image::new(Array3::zeros((2, 2, 2)), Affine::IDENTITY).expect("valid");
        assert!(img.ensure_finite("image").is_ok());
        img.data_mut()[[1, 1, 1]] = f32::NAN;
        img.data_mut()[[0, 1, 1]] = f32::INFINITY;
        assert!(matches!(
            img.ensure_finite("image"),
            Err(Error::NonFinite { count: 2, .. })
        ));

        let mut lab = LabelMap::new(Array3::zeros((2, 2, 2)), Affine::IDENTITY).expect("valid");
        lab.data_mut()[[0, 0, 1]] = 7;
        lab.data_mut()[[1, 0, 1]] = 7;
        lab.data_mut()[[1, 1, 1]] = 300;
        assert_eq!(lab.labels_present(), alloc::vec![7, 300]);
        assert_eq!(lab.count(7), 2);
    }

    #[test]
    fn same_grid_check() {
        let a = Image::new(Array3::zeros((2, 3, 4)), Affine::IDENTITY).expect("valid");
        let b = LabelMap::new(
            Array3::zeros((2, 3, 4)),
            Affine::from_spacing([1.0, 1.0, 2.0]),
        )
        .expect("valid");
        let c = LabelMap::new(Array3::zeros((2, 3, 5)), Affine::IDENTITY).expect("valid");
        assert!(a.ensure_same_grid(&a, "self").is_ok());
        assert!(a.ensure_same_grid(&b, "label vs image").is_err());
        assert!(matches!(
            a.ensure_same_grid(&c, "label vs image"),
            Err(Error::ShapeMismatch { .. })
        ));
    }
}
