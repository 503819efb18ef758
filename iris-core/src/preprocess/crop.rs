//! Crops, padding, label bounding boxes and the reference crop.
//!
//! A crop keeps every voxel where it is in the world: the result's affine is
//! the source affine moved to the crop's first voxel, so voxel `v` of the
//! crop and voxel `start + v` of the source have the same world position.

use alloc::format;
use core::ops::Range;
use ndarray::{Array3, s};

use crate::error::{Error, Result};
use crate::volume::{Image, LabelMap, Volume, checked_voxel_count, try_filled};

/// Cuts a `size` box (voxels, `[D, H, W]`) out of `volume`, starting at
/// voxel `start` of the source (which may be negative or run past the end:
/// voxels outside the source are `fill`).
///
/// ```
/// use iris_core::preprocess::crop_or_pad;
/// use iris_core::volume::{Affine, Image};
/// use ndarray::Array3;
///
/// let image = Image::new(Array3::from_elem((4, 4, 4), 1.0), Affine::IDENTITY)?;
/// let padded = crop_or_pad(&image, [-2, 0, 1], [8, 4, 2], 0.0)?;
/// assert_eq!(padded.shape(), [8, 4, 2]);
/// assert_eq!(padded.data()[[0, 0, 0]], 0.0); // before the first slice
/// assert_eq!(padded.data()[[2, 0, 0]], 1.0); // source voxel [0, 0, 1]
/// assert_eq!(padded.geometry().voxel_to_world([2.0, 0.0, 0.0]), [0.0, 0.0, 1.0]);
/// # Ok::<(), iris_core::Error>(())
/// ```
///
/// # Errors
/// [`Error::InvalidArgument`] for a zero `size`; [`Error::TooLarge`] above
/// [`MAX_VOXELS`](crate::volume::MAX_VOXELS).
pub fn crop_or_pad<T: Clone>(
    volume: &Volume<T>,
    start: [isize; 3],
    size: [usize; 3],
    fill: T,
) -> Result<Volume<T>> {
    if size.contains(&0) {
        return Err(Error::invalid(
            "size",
            format!("{size:?} has a zero dimension"),
        ));
    }
    let len = checked_voxel_count(size)?;
    let mut data = Array3::from_shape_vec(dims(size), try_filled(len, fill, "crop")?)
        .map_err(|e| Error::invalid("crop", format!("{e}")))?;
    if let Some((src, dst)) = overlap(volume.shape(), start, size) {
        data.slice_mut(s![dst[0].clone(), dst[1].clone(), dst[2].clone()])
            .assign(
                &volume
                    .data()
                    .slice(s![src[0].clone(), src[1].clone(), src[2].clone()]),
            );
    }
    let mut m = volume.geometry().affine();
    let world = m.apply(start.map(|v| v as f64));
    for (row, w) in m.0.iter_mut().zip(world) {
        row[3] = w;
    }
    Volume::new(data, m)
}

/// One index range per axis, `[d, h, w]`.
type Spans = [Range<usize>; 3];

/// Index ranges `(source, destination)` per axis where the box
/// `[start, start + size)` meets `[0, shape)`, or `None` if it does not.
fn overlap(shape: [usize; 3], start: [isize; 3], size: [usize; 3]) -> Option<(Spans, Spans)> {
    let mut src = [0..0, 0..0, 0..0];
    let mut dst = [0..0, 0..0, 0..0];
    for a in 0..3 {
        // In i128 no start/size combination can overflow.
        let begin = start[a] as i128;
        let lo = begin.max(0);
        let hi = (begin + size[a] as i128).min(shape[a] as i128);
        if lo >= hi {
            return None;
        }
        // All within [0, max(shape, size)], so they fit usize.
        let offset = (lo - begin) as usize;
        let len = (hi - lo) as usize;
        src[a] = lo as usize..hi as usize;
        dst[a] = offset..offset + len;
    }
    Some((src, dst))
}

fn dims(size: [usize; 3]) -> (usize, usize, usize) {
    (size[0], size[1], size[2])
}

/// Which label values count as foreground.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum LabelSelection<'a> {
    /// Every non-zero label.
    AnyNonZero,
    /// Only these label values (0 in the list is ignored: it is background).
    Values(&'a [u16]),
}

impl LabelSelection<'_> {
    /// Whether a voxel with label `value` is foreground.
    pub fn contains(&self, value: u16) -> bool {
        value != 0
            && match self {
                LabelSelection::AnyNonZero => true,
                LabelSelection::Values(values) => values.contains(&value),
            }
    }

    /// The label named in an [`Error::EmptyMask`]: the smallest selected
    /// value, or 0 for "any non-zero label".
    fn error_label(&self) -> u32 {
        match self {
            LabelSelection::AnyNonZero => 0,
            LabelSelection::Values(values) => values
                .iter()
                .copied()
                .filter(|&v| v != 0)
                .min()
                .map_or(0, u32::from),
        }
    }
}

/// An axis-aligned box of voxels, `[d, h, w]`, bounds inclusive.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct BoundingBox {
    /// First voxel inside the box.
    pub min: [usize; 3],
    /// Last voxel inside the box (inclusive).
    pub max: [usize; 3],
}

impl BoundingBox {
    /// Size in voxels, `max - min + 1` per axis.
    pub fn size(&self) -> [usize; 3] {
        core::array::from_fn(|a| self.max[a] - self.min[a] + 1)
    }

    /// The centre voxel: `(min + max) / 2` rounded half to even per axis, as
    /// the released code's `round((min + max) / 2)` in Python.
    pub fn center(&self) -> [usize; 3] {
        core::array::from_fn(|a| {
            let sum = self.min[a] + self.max[a];
            let half = sum / 2;
            // An odd sum is a .5 tie: round to the even neighbour.
            if sum % 2 == 1 && half % 2 == 1 {
                half + 1
            } else {
                half
            }
        })
    }
}

/// The bounding box of the voxels of `labels` selected by `selection`.
///
/// # Errors
/// [`Error::EmptyMask`] when no voxel is selected (its `label` is the
/// smallest selected value, or 0 for [`LabelSelection::AnyNonZero`]).
pub fn label_bbox(labels: &LabelMap, selection: &LabelSelection) -> Result<BoundingBox> {
    let mut found: Option<BoundingBox> = None;
    for ((d, h, w), &v) in labels.data().indexed_iter() {
        if !selection.contains(v) {
            continue;
        }
        let p = [d, h, w];
        let b = found.get_or_insert(BoundingBox { min: p, max: p });
        for ((lo, hi), x) in b.min.iter_mut().zip(&mut b.max).zip(p) {
            *lo = (*lo).min(x);
            *hi = (*hi).max(x);
        }
    }
    found.ok_or(Error::EmptyMask {
        label: selection.error_label(),
    })
}

/// A reference image and its mask, cropped for the task encoder.
#[derive(Clone, Debug, PartialEq)]
pub struct ReferenceCrop {
    /// The image crop, `patch` voxels, in the image's own units (not yet
    /// normalised), 0 where the crop leaves the image.
    pub image: Image,
    /// The binary mask on the same grid: 1 where the label is selected, 0
    /// elsewhere (and outside the source).
    pub mask: LabelMap,
    /// Source voxel of the crop's voxel `[0, 0, 0]` (may be negative).
    pub start: [isize; 3],
    /// The selected label's bounding box in the source.
    pub bbox: BoundingBox,
    /// Foreground voxels inside the crop; fewer than in the source when the
    /// label is larger than `patch`.
    pub foreground_voxels: usize,
}

/// The reference crop of the released Iris code (`crop_arrays_centered`): a
/// `patch`-sized box (voxels, `[D, H, W]`) centred on the centre of the
/// selected label's bounding box ([`BoundingBox::center`]), starting at
/// `center - patch / 2` (integer division), zero padded where it leaves the
/// volume, cut identically from the image and the label map.
///
/// The image is returned raw: as in the released code, normalise the crop
/// itself (e.g. [`IntensityPolicy::normalize_in_place`](super::IntensityPolicy::normalize_in_place)
/// on `crop.image`), so that the statistics are those of the crop, padding
/// included.
///
/// # Errors
/// [`Error::ShapeMismatch`] or [`Error::InvalidArgument`] when `labels` is
/// not on the image's grid; [`Error::EmptyMask`] when nothing is selected;
/// as [`crop_or_pad`] for `patch`.
pub fn reference_crop(
    image: &Image,
    labels: &LabelMap,
    selection: &LabelSelection,
    patch: [usize; 3],
) -> Result<ReferenceCrop> {
    image.ensure_same_grid(labels, "reference label map vs its image")?;
    let bbox = label_bbox(labels, selection)?;
    let center = bbox.center();
    let mut start = [0isize; 3];
    for a in 0..3 {
        let (c, half) = (isize::try_from(center[a]), isize::try_from(patch[a] / 2));
        start[a] = match (c, half) {
            (Ok(c), Ok(half)) => c - half,
            _ => {
                return Err(Error::TooLarge {
                    what: "reference crop",
                    detail: format!("patch {patch:?} around voxel {center:?}"),
                });
            }
        };
    }
    let mask = crop_or_pad(labels, start, patch, 0)?.map(|&v| u16::from(selection.contains(v)));
    let foreground_voxels = mask.count(1);
    Ok(ReferenceCrop {
        image: crop_or_pad(image, start, patch, 0.0)?,
        mask,
        start,
        bbox,
        foreground_voxels,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::volume::Affine;

    #[test]
    fn centre_rounds_half_to_even_like_python() {
        let b = |min, max| BoundingBox {
            min: [min; 3],
            max: [max; 3],
        };
        // round(4.5) == 4, round(5.5) == 6, round(5.0) == 5 in Python 3.
        assert_eq!(b(3, 6).center(), [4; 3]);
        assert_eq!(b(5, 6).center(), [6; 3]);
        assert_eq!(b(4, 6).center(), [5; 3]);
        assert_eq!(b(0, 0).center(), [0; 3]);
        assert_eq!(b(3, 6).size(), [4; 3]);
    }

    #[test]
    fn crops_that_miss_the_volume_are_all_fill() {
        let vol = Volume::new(Array3::from_elem((3, 3, 3), 7u16), Affine::IDENTITY).expect("ok");
        let far = crop_or_pad(&vol, [isize::MAX, -5, 0], [2, 2, 2], 9).expect("ok");
        assert!(far.data().iter().all(|&v| v == 9));
        let far = crop_or_pad(&vol, [isize::MIN, 0, 0], [1, 1, 1], 9).expect("ok");
        assert_eq!(far.data()[[0, 0, 0]], 9);
        assert!(matches!(
            crop_or_pad(&vol, [0; 3], [0, 2, 2], 0),
            Err(Error::InvalidArgument { .. })
        ));
        assert!(matches!(
            crop_or_pad(&vol, [0; 3], [usize::MAX, 2, 2], 0),
            Err(Error::TooLarge { .. })
        ));
    }

    #[test]
    fn selection_ignores_background() {
        assert!(!LabelSelection::AnyNonZero.contains(0));
        assert!(LabelSelection::AnyNonZero.contains(65535));
        let sel = LabelSelection::Values(&[0, 3]);
        assert!(!sel.contains(0) && sel.contains(3) && !sel.contains(4));
    }
}
