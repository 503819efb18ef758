//! Segmentation metrics: Dice per class and volume per label.
//!
//! # Empty classes
//! Dice is `2 |A ∩ B| / (|A| + |B|)`. When a class is absent from both maps
//! the ratio is `0 / 0`; nnU-Net reports NaN and MONAI (with
//! `ignore_empty=True`) NaN as well. Here it is `None`, so the caller must
//! decide (skip it when averaging, or count it as a perfect 1) and a NaN
//! cannot silently poison a mean. A class present in only one map scores 0.

use alloc::vec::Vec;

use crate::error::Result;
use crate::volume::LabelMap;

/// Dice coefficient of every label in `labels` between `prediction` and
/// `reference`, in the same order: `Some(score)` in `[0, 1]`, or `None` when
/// the label is absent from both maps.
///
/// ```
/// use iris_core::metrics::dice_per_class;
/// use iris_core::volume::{Affine, LabelMap};
///
/// let a = LabelMap::from_vec([1, 1, 4], Affine::IDENTITY, vec![1, 1, 0, 2])?;
/// let b = LabelMap::from_vec([1, 1, 4], Affine::IDENTITY, vec![1, 0, 0, 2])?;
/// // label 1: 2 * 1 / (2 + 1); label 2: identical; label 3: absent from both.
/// assert_eq!(dice_per_class(&a, &b, &[1, 2, 3])?, [Some(2.0 / 3.0), Some(1.0), None]);
/// # Ok::<(), iris_core::Error>(())
/// ```
///
/// # Errors
/// [`Error::ShapeMismatch`](crate::Error::ShapeMismatch) or
/// [`Error::InvalidArgument`](crate::Error::InvalidArgument) when the two
/// maps are not on the same grid (shape, and affine within 1e-4 mm).
pub fn dice_per_class(
    prediction: &LabelMap,
    reference: &LabelMap,
    labels: &[u16],
) -> Result<Vec<Option<f64>>> {
    reference.ensure_same_grid(prediction, "prediction vs reference label map")?;
    // slot[label] = position in `labels` + 1 (0: not asked for).
    let mut slot = alloc::vec![0usize; usize::from(u16::MAX) + 1];
    for (i, &l) in labels.iter().enumerate().rev() {
        slot[usize::from(l)] = i + 1;
    }
    // Per requested label: voxels in prediction, in reference, in both.
    let mut counts = alloc::vec![[0u64; 3]; labels.len()];
    for (&p, &r) in prediction.data().iter().zip(reference.data().iter()) {
        let (sp, sr) = (slot[usize::from(p)], slot[usize::from(r)]);
        if sp != 0 {
            counts[sp - 1][0] += 1;
        }
        if sr != 0 {
            counts[sr - 1][1] += 1;
            if p == r {
                counts[sr - 1][2] += 1;
            }
        }
    }
    Ok(labels
        .iter()
        .map(|&l| {
            let [p, r, both] = counts[slot[usize::from(l)] - 1];
            (p + r > 0).then(|| 2.0 * both as f64 / (p + r) as f64)
        })
        .collect())
}

/// Volume in millilitres of every non-zero label present, sorted by label.
///
/// One voxel is `|det(affine)|` mm³ (the product of the spacings for an
/// axis-aligned grid, and still right for an oblique one); 1 mL = 1000 mm³.
pub fn label_volumes_ml(labels: &LabelMap) -> Vec<(u16, f64)> {
    let voxel_mm3 = labels.geometry().affine().determinant().abs();
    let mut counts = alloc::vec![0u64; usize::from(u16::MAX) + 1];
    for &v in labels.data().iter() {
        counts[usize::from(v)] += 1;
    }
    (1..=u16::MAX)
        .filter(|&l| counts[usize::from(l)] > 0)
        .map(|l| (l, counts[usize::from(l)] as f64 * voxel_mm3 / 1000.0))
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::Error;
    use crate::volume::Affine;
    use ndarray::{Array3, s};

    fn map(data: Array3<u16>, spacing: [f64; 3]) -> LabelMap {
        LabelMap::new(data, Affine::from_spacing(spacing)).expect("valid")
    }

    #[test]
    fn known_values() {
        let mut a = Array3::<u16>::zeros((10, 10, 10));
        a.slice_mut(s![0..5, .., ..]).fill(1); // 500 voxels
        a.slice_mut(s![8.., 0..2, ..]).fill(2); // 40 voxels
        let mut b = Array3::<u16>::zeros((10, 10, 10));
        b.slice_mut(s![3..8, .., ..]).fill(1); // 500 voxels, 200 shared with a
        b.slice_mut(s![8.., 5..7, ..]).fill(2); // 40 voxels, disjoint from a's
        let (a, b) = (map(a, [1.0; 3]), map(b, [1.0; 3]));
        let d = dice_per_class(&a, &b, &[1, 2, 3]).expect("same grid");
        assert_eq!(d, [Some(2.0 * 200.0 / 1000.0), Some(0.0), None]);
        let d = dice_per_class(&a, &a, &[2, 1, 2]).expect("same grid");
        assert_eq!(d, [Some(1.0), Some(1.0), Some(1.0)]);
        // Background is a label like any other when asked for: 460 vs 460, 120 shared.
        let d = dice_per_class(&a, &b, &[0]).expect("same grid");
        assert_eq!(d, [Some(2.0 * 120.0 / 920.0)]);
    }

    #[test]
    fn grids_must_match() {
        let a = map(Array3::zeros((4, 4, 4)), [1.0; 3]);
        let b = map(Array3::zeros((4, 4, 5)), [1.0; 3]);
        let c = map(Array3::zeros((4, 4, 4)), [2.0, 1.0, 1.0]);
        assert!(matches!(
            dice_per_class(&a, &b, &[1]),
            Err(Error::ShapeMismatch { .. })
        ));
        assert!(matches!(
            dice_per_class(&a, &c, &[1]),
            Err(Error::InvalidArgument { .. })
        ));
    }

    #[test]
    fn volumes_use_the_voxel_size() {
        let mut a = Array3::<u16>::zeros((10, 10, 10));
        a.slice_mut(s![0..5, .., ..]).fill(1);
        a[[9, 9, 9]] = 300;
        let v = label_volumes_ml(&map(a, [2.0, 1.0, 0.5]));
        assert_eq!(v, [(1, 0.5), (300, 0.001)]);
    }
}
