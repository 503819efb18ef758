//! From per-class probabilities to a label map, and largest-component cleaning.
//!
//! # Decision rule
//! Iris predicts one sigmoid probability per class, independently. A voxel
//! gets the label of the class with the highest probability if that
//! probability is at least the threshold (0.5 in the released code), and
//! background (0) otherwise. On an exact tie the class listed first wins.
//! The [`Blender`](crate::window::Blender) applies the same rule slab by slab.
//!
//! # Connected components
//! [`keep_largest_components`] keeps, for every label, only its largest
//! 26-connected component (voxels touching by a face, an edge or a corner
//! are connected). It uses an iterative flood fill with an explicit stack and
//! one bit of bookkeeping per voxel, so it handles volumes of 10^8 voxels
//! without recursion.

use alloc::format;
use alloc::vec::Vec;
use ndarray::{Array3, ArrayView4};

use crate::error::{Error, Result};
use crate::volume::MAX_VOXELS;

/// Default probability a class needs to label a voxel.
pub const DEFAULT_THRESHOLD: f32 = 0.5;

/// Turns per-class probabilities `[K, D, H, W]` into a `[D, H, W]` label map:
/// class `k` writes `class_labels[k]` (see the module doc for the rule).
///
/// ```
/// use iris_core::labels::probabilities_to_labels;
/// use ndarray::Array4;
///
/// // Two classes over 1 x 1 x 3 voxels.
/// let p = Array4::from_shape_vec((2, 1, 1, 3), vec![0.9, 0.2, 0.6, 0.7, 0.4, 0.8])?;
/// let labels = probabilities_to_labels(p.view(), &[5, 9], 0.5)?;
/// assert_eq!(labels.as_slice().unwrap(), &[5, 0, 9]);
/// # Ok::<(), Box<dyn std::error::Error>>(())
/// ```
///
/// # Errors
/// [`Error::ShapeMismatch`] when `K != class_labels.len()`;
/// [`Error::InvalidArgument`] for invalid labels (see [`check_class_labels`])
/// or a threshold outside `(0, 1]`; [`Error::NonFinite`] for NaN or infinite
/// probabilities.
pub fn probabilities_to_labels(
    probs: ArrayView4<'_, f32>,
    class_labels: &[u16],
    threshold: f32,
) -> Result<Array3<u16>> {
    check_class_labels(class_labels)?;
    check_threshold(threshold)?;
    let (k, d, h, w) = probs.dim();
    if k != class_labels.len() {
        return Err(Error::ShapeMismatch {
            what: "number of probability maps vs class labels".into(),
            expected: alloc::vec![class_labels.len()],
            found: alloc::vec![k],
        });
    }
    let count = probs.iter().filter(|p| !p.is_finite()).count();
    if count > 0 {
        return Err(Error::NonFinite {
            what: "class probabilities",
            count,
        });
    }
    let probs = probs.as_standard_layout();
    let mut out = alloc::vec![0u16; d * h * w];
    let flat = probs.as_slice().unwrap_or(&[]);
    decide(flat, class_labels, threshold, &mut out);
    Array3::from_shape_vec((d, h, w), out)
        .map_err(|e| Error::invalid("probs", format!("cannot shape labels: {e}")))
}

/// Checks a list of output labels: at least one, none is 0 (background), no duplicates.
///
/// # Errors
/// [`Error::InvalidArgument`] naming the problem.
pub fn check_class_labels(class_labels: &[u16]) -> Result<()> {
    if class_labels.is_empty() {
        return Err(Error::invalid("class_labels", "no class labels given"));
    }
    for (i, &label) in class_labels.iter().enumerate() {
        if label == 0 {
            return Err(Error::invalid(
                "class_labels",
                format!("entry {i} is 0, which is reserved for background"),
            ));
        }
        if class_labels[..i].contains(&label) {
            return Err(Error::invalid(
                "class_labels",
                format!("label {label} appears more than once"),
            ));
        }
    }
    Ok(())
}

/// `value` as the value of a voxel in a label map, which holds 16 bits: a
/// class label (an `.irisemb` stores it in 32 bits) or a caller's label
/// argument, checked before it meets a [`LabelMap`](crate::volume::LabelMap).
///
/// ```
/// use iris_core::labels::label_value;
///
/// assert_eq!(label_value(65535)?, 65535);
/// let err = label_value(65536).unwrap_err();
/// assert_eq!(
///     err.to_string(),
///     "invalid label: 65536 does not fit a 16-bit label map (labels are 0 to 65535)"
/// );
/// # Ok::<(), iris_core::Error>(())
/// ```
///
/// # Errors
/// [`Error::InvalidArgument`] (`label`), naming `value`, when it is above 65535.
pub fn label_value(value: u32) -> Result<u16> {
    u16::try_from(value).map_err(|_| {
        Error::invalid(
            "label",
            format!(
                "{value} does not fit a 16-bit label map (labels are 0 to {})",
                u16::MAX
            ),
        )
    })
}

/// Checks that a probability threshold is in `(0, 1]`.
pub(crate) fn check_threshold(threshold: f32) -> Result<()> {
    if threshold > 0.0 && threshold <= 1.0 {
        Ok(())
    } else {
        Err(Error::invalid(
            "threshold",
            format!("{threshold} is outside (0, 1]"),
        ))
    }
}

/// The decision rule on `probs` laid out `[K, n]` (class-major), writing `n` labels.
pub(crate) fn decide(probs: &[f32], class_labels: &[u16], threshold: f32, out: &mut [u16]) {
    let n = out.len();
    for (i, label) in out.iter_mut().enumerate() {
        let mut best = (0, probs[i]);
        for k in 1..class_labels.len() {
            let p = probs[k * n + i];
            if p > best.1 {
                best = (k, p);
            }
        }
        *label = if best.1 >= threshold {
            class_labels[best.0]
        } else {
            0
        };
    }
}

/// What [`keep_largest_components`] did to one label.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ComponentSummary {
    /// The label value.
    pub label: u16,
    /// Number of 26-connected components it had.
    pub components: usize,
    /// Voxels kept (the largest component).
    pub kept: usize,
    /// Voxels set to background (all other components).
    pub removed: usize,
}

/// Keeps only the largest 26-connected component of every non-zero label in
/// `labels` (`[D, H, W]`); all other voxels of that label become 0. On a tie
/// the component reached first in C order is kept. Returns one summary per
/// label present, sorted by label. For a [`LabelMap`](crate::volume::LabelMap)
/// pass `map.data_mut()`.
///
/// Memory: two bits per voxel, a stack of at most one `u32` per voxel of the
/// component being filled, and a 2 MiB table indexed by label value. Time:
/// two passes over the volume whatever the number of labels.
///
/// # Errors
/// [`Error::TooLarge`] above [`MAX_VOXELS`].
pub fn keep_largest_components(labels: &mut Array3<u16>) -> Result<Vec<ComponentSummary>> {
    if labels.len() > MAX_VOXELS {
        return Err(Error::TooLarge {
            what: "label map",
            detail: format!("{} voxels exceeds {MAX_VOXELS}", labels.len()),
        });
    }
    if !labels.is_standard_layout() {
        *labels = labels.as_standard_layout().into_owned();
    }
    let (d, h, w) = labels.dim();
    let Some(voxels) = labels.as_slice_mut() else {
        return Err(Error::invalid("labels", "array is not contiguous"));
    };
    let filler = Filler { shape: [d, h, w] };
    // Per label value: seed and size of the largest component, counts.
    let mut stats = alloc::vec![(0usize, 0usize, 0usize, 0usize); usize::from(u16::MAX) + 1];
    // Pass 1: measure every component; remember the seed of each label's largest.
    let mut seen = BitSet::new(voxels.len());
    let mut stack = Vec::new();
    for seed in 0..voxels.len() {
        let label = voxels[seed];
        if label == 0 || seen.get(seed) {
            continue;
        }
        let size = filler.fill(voxels, seed, &mut seen, &mut stack);
        let (best_seed, best_size, components, _) = &mut stats[usize::from(label)];
        *components += 1;
        if size > *best_size {
            (*best_seed, *best_size) = (seed, size);
        }
    }
    // Pass 2: mark the kept components again, clear everything else.
    let mut keep = BitSet::new(voxels.len());
    for &(seed, _, components, _) in &stats {
        if components > 0 {
            filler.fill(voxels, seed, &mut keep, &mut stack);
        }
    }
    for (i, v) in voxels.iter_mut().enumerate() {
        if *v != 0 && !keep.get(i) {
            stats[usize::from(*v)].3 += 1;
            *v = 0;
        }
    }
    Ok((1..=u16::MAX)
        .filter_map(|label| {
            let (_, kept, components, removed) = stats[usize::from(label)];
            (components > 0).then_some(ComponentSummary {
                label,
                components,
                kept,
                removed,
            })
        })
        .collect())
}

/// One bit per voxel.
struct BitSet(Vec<u64>);

impl BitSet {
    fn new(n: usize) -> BitSet {
        BitSet(alloc::vec![0; n.div_ceil(64)])
    }
    fn get(&self, i: usize) -> bool {
        self.0[i / 64] >> (i % 64) & 1 == 1
    }
    fn set(&mut self, i: usize) {
        self.0[i / 64] |= 1 << (i % 64);
    }
}

/// 26-connected flood fill over a C-order `[D, H, W]` grid.
struct Filler {
    shape: [usize; 3],
}

impl Filler {
    /// Marks in `mark` every voxel 26-connected to `seed` with the same
    /// label and returns how many there are. `stack` is reused scratch.
    /// Indices fit in `u32` because volumes have at most 2^31 voxels.
    fn fill(&self, voxels: &[u16], seed: usize, mark: &mut BitSet, stack: &mut Vec<u32>) -> usize {
        let [d, h, w] = self.shape;
        let label = voxels[seed];
        let mut size = 0;
        stack.clear();
        mark.set(seed);
        stack.push(seed as u32);
        while let Some(i) = stack.pop() {
            size += 1;
            let i = i as usize;
            let (z, y, x) = (i / (h * w), (i / w) % h, i % w);
            for nz in z.saturating_sub(1)..=(z + 1).min(d - 1) {
                for ny in y.saturating_sub(1)..=(y + 1).min(h - 1) {
                    for nx in x.saturating_sub(1)..=(x + 1).min(w - 1) {
                        let j = (nz * h + ny) * w + nx;
                        if voxels[j] == label && !mark.get(j) {
                            mark.set(j);
                            stack.push(j as u32);
                        }
                    }
                }
            }
        }
        size
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use alloc::string::ToString;
    use ndarray::Array4;

    #[test]
    fn label_values_fit_16_bits() {
        assert_eq!(label_value(0).unwrap(), 0);
        assert_eq!(label_value(1).unwrap(), 1);
        assert_eq!(label_value(65535).unwrap(), u16::MAX);
        for value in [65536, u32::MAX] {
            let err = label_value(value).unwrap_err();
            assert!(
                matches!(err, Error::InvalidArgument { name: "label", .. }),
                "{err:?}"
            );
            assert_eq!(
                err.to_string(),
                format!(
                    "invalid label: {value} does not fit a 16-bit label map (labels are 0 to 65535)"
                )
            );
        }
    }

    #[test]
    fn threshold_argmax_and_ties() {
        // Three classes over four voxels.
        let p = Array4::from_shape_vec(
            (3, 1, 1, 4),
            alloc::vec![
                0.9, 0.3, 0.5, 0.6, //
                0.8, 0.4, 0.5, 0.7, //
                0.1, 0.45, 0.2, 0.7,
            ],
        )
        .expect("shape");
        let l = probabilities_to_labels(p.view(), &[3, 1, 7], 0.5).expect("valid");
        // argmax; all below 0.5 -> background; exactly 0.5 passes, tie -> first listed.
        assert_eq!(l.as_slice().expect("contiguous"), &[3, 0, 3, 1]);
        let l = probabilities_to_labels(p.view(), &[3, 1, 7], 0.4).expect("valid");
        assert_eq!(l.as_slice().expect("contiguous"), &[3, 7, 3, 1]);
        // Works on a non-standard layout too (permuted view of the same data).
        let q = p.view().permuted_axes([0, 1, 3, 2]);
        let t = Array4::from_shape_vec((3, 1, 4, 1), p.iter().copied().collect()).expect("s");
        let a = probabilities_to_labels(q, &[3, 1, 7], 0.5).expect("valid");
        let b = probabilities_to_labels(t.view(), &[3, 1, 7], 0.5).expect("valid");
        assert_eq!(a, b);
    }

    #[test]
    fn bad_input_is_rejected() {
        let p = Array4::<f32>::zeros((2, 1, 1, 2));
        assert!(matches!(
            probabilities_to_labels(p.view(), &[1], 0.5),
            Err(Error::ShapeMismatch { .. })
        ));
        for labels in [&[][..], &[0, 1], &[2, 2]] {
            assert!(matches!(
                probabilities_to_labels(p.view(), labels, 0.5),
                Err(Error::InvalidArgument {
                    name: "class_labels",
                    ..
                })
            ));
        }
        for t in [0.0, 1.5, f32::NAN] {
            assert!(matches!(
                probabilities_to_labels(p.view(), &[1, 2], t),
                Err(Error::InvalidArgument {
                    name: "threshold",
                    ..
                })
            ));
        }
        let mut q = p.clone();
        q[[1, 0, 0, 1]] = f32::NAN;
        assert!(matches!(
            probabilities_to_labels(q.view(), &[1, 2], 0.5),
            Err(Error::NonFinite { count: 1, .. })
        ));
    }

    #[test]
    fn largest_component_uses_26_connectivity() {
        let mut l = Array3::<u16>::zeros((4, 4, 4));
        // Label 1: a diagonal chain of 3 voxels (corner-connected only) and a
        // face-connected pair elsewhere. With 6-connectivity the pair would be
        // the largest; with 26-connectivity the chain is.
        for i in 0..3 {
            l[[i, i, i]] = 1;
        }
        l[[0, 3, 0]] = 1;
        l[[0, 3, 1]] = 1;
        // Label 2: edge-connected pair (largest), plus a lone voxel.
        l[[3, 0, 3]] = 2;
        l[[2, 1, 3]] = 2;
        l[[3, 3, 3]] = 2;
        let summary = keep_largest_components(&mut l).expect("valid");
        assert_eq!(
            summary,
            [
                ComponentSummary {
                    label: 1,
                    components: 2,
                    kept: 3,
                    removed: 2
                },
                ComponentSummary {
                    label: 2,
                    components: 2,
                    kept: 2,
                    removed: 1
                },
            ]
        );
        for i in 0..3 {
            assert_eq!(l[[i, i, i]], 1);
        }
        assert_eq!((l[[0, 3, 0]], l[[0, 3, 1]]), (0, 0));
        assert_eq!((l[[3, 0, 3]], l[[2, 1, 3]], l[[3, 3, 3]]), (2, 2, 0));
        assert_eq!(l.iter().filter(|&&v| v != 0).count(), 5);
    }

    #[test]
    fn touching_labels_stay_separate_and_big_fills_need_no_recursion() {
        // One 100 x 100 x 100 block of label 4 (10^6 voxels, a deep fill), cut
        // by a plane of label 5; a stray voxel of 4 elsewhere.
        let mut l = Array3::<u16>::from_elem((100, 100, 100), 4);
        l.slice_mut(ndarray::s![50, .., ..]).fill(5);
        l[[0, 0, 0]] = 0;
        l[[1, 1, 1]] = 0;
        l[[0, 0, 1]] = 0;
        l[[0, 1, 0]] = 0;
        l[[1, 0, 0]] = 0;
        l[[1, 1, 0]] = 0;
        l[[1, 0, 1]] = 0;
        l[[0, 1, 1]] = 0;
        l[[0, 0, 0]] = 4; // isolated: its 7 neighbours are 0
        let summary = keep_largest_components(&mut l).expect("valid");
        assert_eq!(summary.len(), 2);
        let four = summary[0];
        assert_eq!((four.label, four.components), (4, 3));
        // Two halves: d < 50 (50 * 10^4 - 8 voxels) and d > 50 (49 * 10^4).
        assert_eq!(four.kept, 50 * 10_000 - 8);
        assert_eq!(four.removed, 49 * 10_000 + 1);
        assert_eq!(
            summary[1],
            ComponentSummary {
                label: 5,
                components: 1,
                kept: 10_000,
                removed: 0
            }
        );
        assert_eq!(l[[0, 0, 0]], 0);
        assert_eq!(l[[99, 99, 99]], 0);
        assert_eq!(l[[49, 99, 99]], 4);
    }
}
