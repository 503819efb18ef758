//! Resampling onto another voxel grid, in world coordinates.
//!
//! Every target voxel centre is mapped to world millimetres by the target
//! affine and back into the source grid by the inverse source affine, so
//! oblique and rotated grids are handled exactly; nothing assumes the two
//! grids share axes. When they do (the usual case after
//! [`canonical`](super::canonical) and [`target_geometry`]: the transform
//! between the grids is diagonal), the work is separable and runs on
//! per-axis index/weight tables; otherwise each voxel is mapped on its own.
//!
//! Positions within `1e-6` voxel of a source voxel centre are taken as that
//! centre, so resampling onto the source's own grid returns the input
//! unchanged, bit for bit.
//!
//! Outside the source:
//! - images ([`resample_image`], trilinear) take the value of the nearest
//!   edge voxel (coordinates are clamped to the source extent). Raw zero is
//!   not "nothing" on every scale (it is water in CT) and the volume is
//!   z-scored later, so an artificial zero border would both look like
//!   tissue and shift the statistics. Within half a voxel of the edge this
//!   is also what SimpleITK's linear interpolator does.
//! - label maps ([`resample_labels`], nearest neighbour) are 0 (background)
//!   beyond half a voxel past the edge.

use alloc::format;
use alloc::vec::Vec;

use crate::error::{Error, Result};
use crate::volume::{
    Affine, Geometry, Image, LabelMap, MAX_VOXELS, Volume, checked_voxel_count, try_with_capacity,
};

/// What a failed allocation of resampling names.
const RESAMPLED: &str = "resampled volume";

/// Distance (in source voxels) within which a position snaps to a voxel centre.
const SNAP: f64 = 1e-6;

/// Largest off-diagonal entry (source voxels per target voxel) of the
/// grid-to-grid transform for which the grids count as sharing axes.
const ALIGNED: f64 = 1e-9;

/// The grid the released Iris code resamples to: the same origin (the centre
/// of voxel `[0, 0, 0]` stays where it is) and the same direction cosines as
/// `source`, every axis with `spacing_mm`, and `max(1, round(N * s /
/// spacing_mm))` voxels along an axis that had `N` voxels of `s` mm (rounding
/// half to even, like Python's `round` in `inference.py`). The new grid thus
/// covers the same physical extent `N * s` to within half a new voxel.
///
/// ```
/// use iris_core::preprocess::target_geometry;
/// use iris_core::volume::{Affine, Geometry};
///
/// let source = Geometry::new([181, 217, 181], Affine::from_spacing([1.0, 1.0, 1.0]))?;
/// let grid = target_geometry(&source, 1.5)?;
/// assert_eq!(grid.shape(), [121, 145, 121]);
/// assert_eq!(grid.spacing(), [1.5, 1.5, 1.5]);
/// # Ok::<(), iris_core::Error>(())
/// ```
///
/// # Errors
/// [`Error::InvalidArgument`] for a spacing that is not finite and
/// positive; [`Error::TooLarge`] when the new grid would exceed
/// [`MAX_VOXELS`].
pub fn target_geometry(source: &Geometry, spacing_mm: f64) -> Result<Geometry> {
    if !(spacing_mm.is_finite() && spacing_mm > 0.0) {
        return Err(Error::invalid(
            "spacing_mm",
            format!("{spacing_mm} is not a positive number of millimetres"),
        ));
    }
    let old_spacing = source.spacing();
    let old_shape = source.shape();
    let mut shape = [0; 3];
    let mut m = source.affine().0;
    for axis in 0..3 {
        let n = libm::rint(old_shape[axis] as f64 * old_spacing[axis] / spacing_mm).max(1.0);
        // `n` is finite or +inf (a huge extent over a tiny spacing), never NaN.
        if n > MAX_VOXELS as f64 {
            return Err(Error::TooLarge {
                what: "resampled volume",
                detail: format!(
                    "axis {axis}: {} voxels of {} mm at {spacing_mm} mm spacing",
                    old_shape[axis], old_spacing[axis]
                ),
            });
        }
        shape[axis] = n as usize;
        let scale = spacing_mm / old_spacing[axis];
        for row in m.iter_mut().take(3) {
            row[axis] *= scale;
        }
    }
    Geometry::new(shape, Affine(m))
}

/// Resamples an intensity image onto `target` by trilinear interpolation in
/// world coordinates (see the module docs for positions outside the
/// source: they take the nearest edge value).
///
/// # Errors
/// [`Error::TooLarge`] when an intermediate buffer would exceed
/// [`MAX_VOXELS`].
pub fn resample_image(image: &Image, target: &Geometry) -> Result<Image> {
    let map = GridMap::new(image.geometry(), target)?;
    let data = image.data().as_standard_layout();
    let src = contiguous(data.as_slice())?;
    let s = image.shape();
    let voxels = if map.aligned {
        let taps: [Vec<Tap>; 3] =
            core::array::from_fn(|a| map.axis_positions(a).map(|x| Tap::new(x, s[a])).collect());
        separable_linear(src, s, &taps)?
    } else {
        map.each_voxel(|p| {
            let [td, th, tw] = core::array::from_fn(|a| Tap::new(p[a], s[a]));
            let at = |d: usize, h: usize, w: usize| src[(d * s[1] + h) * s[2] + w];
            let plane = |d: usize| {
                lerp(
                    lerp(at(d, th.i0, tw.i0), at(d, th.i0, tw.i1), tw.w),
                    lerp(at(d, th.i1, tw.i0), at(d, th.i1, tw.i1), tw.w),
                    th.w,
                )
            };
            lerp(plane(td.i0), plane(td.i1), td.w)
        })?
    };
    Volume::from_vec(target.shape(), target.affine(), voxels)
}

/// Resamples a label map onto `target` by nearest neighbour in world
/// coordinates; positions more than half a voxel outside the source get 0.
/// Only label values present in `labels` (and 0) can appear in the result.
///
/// Going back from the model's grid to the original grid is this same call
/// with the original geometry as `target`.
///
/// # Errors
/// As [`resample_image`].
pub fn resample_labels(labels: &LabelMap, target: &Geometry) -> Result<LabelMap> {
    let map = GridMap::new(labels.geometry(), target)?;
    let data = labels.data().as_standard_layout();
    let src = contiguous(data.as_slice())?;
    let s = labels.shape();
    let at = |i: [Option<usize>; 3]| match i {
        [Some(d), Some(h), Some(w)] => src[(d * s[1] + h) * s[2] + w],
        _ => 0,
    };
    let voxels = if map.aligned {
        let [td, th, tw]: [Vec<Option<usize>>; 3] =
            core::array::from_fn(|a| map.axis_positions(a).map(|x| nearest(x, s[a])).collect());
        let mut out = try_with_capacity(target.len(), RESAMPLED)?;
        for &d in &td {
            for &h in &th {
                out.extend(tw.iter().map(|&w| at([d, h, w])));
            }
        }
        out
    } else {
        map.each_voxel(|p| at(core::array::from_fn(|a| nearest(p[a], s[a]))))?
    };
    Volume::from_vec(target.shape(), target.affine(), voxels)
}

/// The transform from target voxel indices to source voxel positions.
struct GridMap {
    /// Target `[d, h, w]` to fractional source `[d, h, w]`.
    m: Affine,
    /// Target shape.
    shape: [usize; 3],
    /// True when target axis `a` moves along source axis `a` only.
    aligned: bool,
}

impl GridMap {
    fn new(source: &Geometry, target: &Geometry) -> Result<GridMap> {
        let inverse = source
            .affine()
            .inverse()
            .ok_or_else(|| Error::invalid("source affine", "is not invertible"))?;
        let m = inverse.compose(&target.affine());
        let aligned = (0..3).all(|r| (0..3).all(|c| r == c || m.0[r][c].abs() <= ALIGNED));
        Ok(GridMap {
            m,
            shape: target.shape(),
            aligned,
        })
    }

    /// Source positions along axis `a` of each target index on that axis
    /// (only meaningful when `aligned`).
    fn axis_positions(&self, a: usize) -> impl Iterator<Item = f64> + '_ {
        (0..self.shape[a]).map(move |t| snap(self.m.0[a][a] * t as f64 + self.m.0[a][3]))
    }

    /// Calls `f` with the source position of every target voxel, in C order.
    fn each_voxel<T>(&self, mut f: impl FnMut([f64; 3]) -> T) -> Result<Vec<T>> {
        let [nd, nh, nw] = self.shape;
        let mut out = try_with_capacity(nd * nh * nw, RESAMPLED)?;
        let step = self.m.apply_linear([0.0, 0.0, 1.0]);
        for d in 0..nd {
            for h in 0..nh {
                let row = self.m.apply([d as f64, h as f64, 0.0]);
                for w in 0..nw {
                    let w = w as f64;
                    out.push(f(core::array::from_fn(|a| snap(row[a] + w * step[a]))));
                }
            }
        }
        Ok(out)
    }
}

/// Interpolation along one axis: `(1 - w) * v[i0] + w * v[i1]`.
#[derive(Clone, Copy)]
struct Tap {
    i0: usize,
    i1: usize,
    w: f32,
}

impl Tap {
    /// The tap for position `x` on an axis of `n >= 1` voxels, clamped to it.
    fn new(x: f64, n: usize) -> Tap {
        let last = (n - 1) as f64;
        let x = x.clamp(0.0, last);
        // `x >= 0`, so truncation is `floor` (and much cheaper than libm's).
        let i0 = (x as usize).min(n.saturating_sub(2));
        Tap {
            i0,
            i1: (i0 + 1).min(n - 1),
            w: (x - i0 as f64) as f32,
        }
    }
}

fn lerp(a: f32, b: f32, w: f32) -> f32 {
    // Exact at both ends: w = 0 gives a, w = 1 gives b.
    (1.0 - w) * a + w * b
}

/// The index of the voxel nearest to `x` on an axis of `n` voxels, if any.
fn nearest(x: f64, n: usize) -> Option<usize> {
    let y = x + 0.5;
    // For `y >= 0` truncation is `floor`; huge `y` saturates and fails `< n`.
    let i = y as usize;
    (y >= 0.0 && i < n).then_some(i)
}

/// `x`, or the integer within [`SNAP`] of it. Uses casts rather than libm's
/// software rounding: this runs three times per voxel on the general path.
fn snap(x: f64) -> f64 {
    // Truncation towards zero, then the neighbour on the side of `x` if
    // nearer. Far beyond `i64` the cast saturates and `x` is returned as is.
    let t = x as i64 as f64;
    let f = x - t;
    let r = if f >= 0.5 {
        t + 1.0
    } else if f <= -0.5 {
        t - 1.0
    } else {
        t
    };
    if (x - r).abs() < SNAP { r } else { x }
}

fn contiguous<T>(slice: Option<&[T]>) -> Result<&[T]> {
    slice.ok_or_else(|| Error::invalid("volume", "voxels are not in one contiguous buffer"))
}

/// Trilinear resampling as three passes of linear interpolation (along `w`,
/// then `h`, then `d`), each over contiguous rows or planes.
fn separable_linear(src: &[f32], s: [usize; 3], taps: &[Vec<Tap>; 3]) -> Result<Vec<f32>> {
    let t = [taps[0].len(), taps[1].len(), taps[2].len()];
    let mut along_w = try_with_capacity(checked_voxel_count([s[0], s[1], t[2]])?, RESAMPLED)?;
    for row in src.chunks_exact(s[2]) {
        along_w.extend(taps[2].iter().map(|k| lerp(row[k.i0], row[k.i1], k.w)));
    }
    let mut along_h = try_with_capacity(checked_voxel_count([s[0], t[1], t[2]])?, RESAMPLED)?;
    for plane in along_w.chunks_exact(s[1] * t[2]) {
        for k in &taps[1] {
            let (r0, r1) = (&plane[k.i0 * t[2]..][..t[2]], &plane[k.i1 * t[2]..][..t[2]]);
            along_h.extend(r0.iter().zip(r1).map(|(&a, &b)| lerp(a, b, k.w)));
        }
    }
    drop(along_w);
    let plane = t[1] * t[2];
    let mut out = try_with_capacity(checked_voxel_count(t)?, RESAMPLED)?;
    for k in &taps[0] {
        let (p0, p1) = (
            &along_h[k.i0 * plane..][..plane],
            &along_h[k.i1 * plane..][..plane],
        );
        out.extend(p0.iter().zip(p1).map(|(&a, &b)| lerp(a, b, k.w)));
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;
    use ndarray::Array3;

    fn ramp(shape: (usize, usize, usize), affine: Affine) -> Image {
        Image::new(
            Array3::from_shape_fn(shape, |(d, h, w)| (d * 100 + h * 10 + w) as f32),
            affine,
        )
        .expect("valid")
    }

    #[test]
    fn target_geometry_keeps_origin_and_directions() {
        let m = Affine([
            [0.0, 0.0, -0.8, 12.0],
            [0.0, 1.2, 0.0, -7.0],
            [2.5, 0.0, 0.0, 3.0],
            [0.0, 0.0, 0.0, 1.0],
        ]);
        let g =
            target_geometry(&Geometry::new([10, 20, 31], m).expect("valid"), 1.5).expect("valid");
        // 10 * 2.5 / 1.5 = 16.67 -> 17; 20 * 1.2 / 1.5 = 16; 31 * 0.8 / 1.5 = 16.53 -> 17.
        assert_eq!(g.shape(), [17, 16, 17]);
        let a = g.affine().0;
        assert_eq!([a[0][3], a[1][3], a[2][3]], [12.0, -7.0, 3.0]);
        assert_eq!([a[2][0], a[1][1], a[0][2]], [1.5, 1.5, -1.5]);
        // Ties round half to even like Python: 2.5 -> 2, 3.5 -> 4, 0.5 -> 0 -> at least 1.
        let g = Geometry::new([5, 7, 1], Affine::from_spacing([0.5, 0.5, 0.5])).expect("valid");
        assert_eq!(target_geometry(&g, 1.0).expect("valid").shape(), [2, 4, 1]);
    }

    #[test]
    fn outside_the_source_images_take_the_edge_and_labels_zero() {
        let image = ramp((2, 3, 4), Affine::IDENTITY);
        // One voxel before and two after the source on every axis.
        let mut m = Affine::IDENTITY;
        for r in 0..3 {
            m.0[r][3] = -1.0;
        }
        let big = Geometry::new([5, 6, 7], m).expect("valid");
        let out = resample_image(&image, &big).expect("ok");
        for ((d, h, w), &v) in out.data().indexed_iter() {
            let clamp = |x: usize, n: usize| x.saturating_sub(1).min(n - 1);
            let want = image.data()[[clamp(d, 2), clamp(h, 3), clamp(w, 4)]];
            assert_eq!(v, want, "{:?}", [d, h, w]);
        }
        let labels = image.map(|&v| v as u16 + 1);
        let out = resample_labels(&labels, &big).expect("ok");
        for ((d, h, w), &v) in out.data().indexed_iter() {
            let inside = (1..3).contains(&d) && (1..4).contains(&h) && (1..5).contains(&w);
            let want = if inside {
                labels.data()[[d - 1, h - 1, w - 1]]
            } else {
                0
            };
            assert_eq!(v, want, "{:?}", [d, h, w]);
        }
    }

    #[test]
    fn general_path_agrees_with_the_separable_one() {
        let image = ramp((5, 6, 7), Affine::from_spacing([1.0, 2.0, 1.5]));
        let aligned = target_geometry(image.geometry(), 0.7).expect("valid");
        // The same grid with `d` and `w` swapped: no longer diagonal.
        let [d, h, w] = aligned.shape();
        let mut swapped = aligned.affine();
        for row in swapped.0.iter_mut().take(3) {
            row.swap(0, 2);
        }
        let swapped = Geometry::new([w, h, d], swapped).expect("valid");
        assert!(
            GridMap::new(image.geometry(), &aligned)
                .expect("ok")
                .aligned
        );
        assert!(
            !GridMap::new(image.geometry(), &swapped)
                .expect("ok")
                .aligned
        );

        let a = resample_image(&image, &aligned).expect("ok");
        let b = resample_image(&image, &swapped).expect("ok");
        let labels = image.map(|&v| (v as u16) % 13);
        let la = resample_labels(&labels, &aligned).expect("ok");
        let lb = resample_labels(&labels, &swapped).expect("ok");
        for ((i, j, k), &v) in a.data().indexed_iter() {
            assert!((v - b.data()[[k, j, i]]).abs() < 1e-3, "{:?}", [i, j, k]);
            assert_eq!(la.data()[[i, j, k]], lb.data()[[k, j, i]]);
        }
    }

    #[test]
    fn taps_clamp_and_round() {
        let t = Tap::new(-3.0, 4);
        assert_eq!((t.i0, t.i1, t.w), (0, 1, 0.0));
        let t = Tap::new(3.0, 4);
        assert_eq!((t.i0, t.i1, t.w), (2, 3, 1.0));
        let t = Tap::new(1.25, 4);
        assert_eq!((t.i0, t.i1, t.w), (1, 2, 0.25));
        let t = Tap::new(0.7, 1);
        assert_eq!((t.i0, t.i1, t.w), (0, 0, 0.0));
        assert_eq!(nearest(-0.49, 3), Some(0));
        assert_eq!(nearest(-0.51, 3), None);
        assert_eq!(nearest(2.49, 3), Some(2));
        assert_eq!(nearest(2.5, 3), None);
        assert_eq!(snap(2.0 + 1e-9), 2.0);
        assert_eq!(snap(-3.0 - 1e-9), -3.0);
        assert_eq!(snap(-2.6), -2.6);
        assert_eq!(snap(2.0 + 1e-3), 2.001);
        assert_eq!(snap(1e300), 1e300);
        assert!(snap(f64::NAN).is_nan());
        assert_eq!(nearest(1e300, 3), None);
    }
}
