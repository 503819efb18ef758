//! Where the windows go: nnU-Net's even spreading with padding of small volumes.
//!
//! Along each axis the windows are spread exactly as nnU-Net v2's
//! `compute_steps_for_sliding_window` does: with a target step of
//! `window * (1 - overlap)` voxels, the number of windows is
//! `ceil((size - window) / step) + 1`, and their starts are evenly spaced
//! between `0` and `size - window`, so the first window starts at 0 and the
//! last one ends flush with the volume. Example from nnU-Net: size 110, window
//! 64, overlap 0.5 gives starts `[0, 23, 46]`.
//!
//! Starts are rounded half to even, as `np.round` does, so plans match
//! nnU-Net's exactly (181 / 64 / 0.5 gives `[0, 29, 58, 88, 117]`: 58.5 rounds
//! to 58). Consecutive starts are then at most one window apart (a gap is at
//! most the exact step + 1 and an integer, and the exact step is at most one
//! window), so every voxel is covered, even with `overlap = 0`. One
//! deliberate difference: the number of windows is capped at
//! `size - window + 1`, so tiny windows with a large overlap never produce
//! duplicate starts.
//!
//! # Padding
//! Along an axis where the volume is smaller than the window, the plan pads
//! it to the window size, **centred** as nnU-Net's `pad_nd_image` does
//! (`(window - size) / 2` voxels before, the rest after), so the network sees
//! the anatomy in the middle of its field of view. Window starts are in
//! *padded* coordinates; [`WindowPlan::offset`] says where voxel `[0, 0, 0]`
//! of the real volume sits. [`WindowPlan::extract`] cuts a window out of the
//! real volume and fills the padding, and the
//! [`Blender`](super::Blender) crops the padding away again, so no padded
//! copy of the volume is ever made.
//!
//! # Order
//! Windows are numbered in z-major order: the depth (`d`) window index varies
//! slowest and `w` fastest. The blender relies on this to finalise the output
//! slab by slab.

use alloc::format;
use alloc::vec::Vec;
use ndarray::{Array3, ArrayView3, s};

use crate::error::{Error, Result};
use crate::volume::checked_voxel_count;

/// Most windows a plan may have (2^24): far beyond any real use (a
/// 512^3 volume in 32^3 windows at 75 % overlap needs 226 981), it keeps a
/// degenerate request (1-voxel windows on a huge volume) from exhausting memory.
pub const MAX_WINDOWS: usize = 1 << 24;

/// The sliding windows covering one volume: shapes in voxels, `[D, H, W]` order.
///
/// ```
/// use iris_core::window::WindowPlan;
///
/// let plan = WindowPlan::new([110, 40, 64], [64, 64, 64], 0.5)?;
/// assert_eq!(plan.starts(0), &[0, 23, 46]);
/// assert_eq!(plan.padded_shape(), [110, 64, 64]); // 40 padded to 64, centred
/// assert_eq!(plan.offset(), [0, 12, 0]);
/// assert_eq!(plan.len(), 3);
/// # Ok::<(), iris_core::Error>(())
/// ```
#[derive(Clone, Debug, PartialEq)]
pub struct WindowPlan {
    volume_shape: [usize; 3],
    window: [usize; 3],
    padded_shape: [usize; 3],
    offset: [usize; 3],
    starts: [Vec<usize>; 3],
}

/// One window of a [`WindowPlan`].
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Window {
    /// Position in the plan's z-major order (`0..plan.len()`).
    pub index: usize,
    /// Index of the window along each axis (`[d, h, w]`), e.g. `grid[0]` is its depth row.
    pub grid: [usize; 3],
    /// First voxel of the window in *padded* coordinates (`[d, h, w]`).
    pub start: [usize; 3],
}

/// The part of a window that lies inside the real (unpadded) volume along one
/// axis: window-local voxels `local` map to volume voxels starting at `volume_start`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub(crate) struct Span {
    pub local: core::ops::Range<usize>,
    pub volume_start: usize,
}

impl WindowPlan {
    /// Plans windows of `window` voxels over a volume of `volume_shape`
    /// voxels (both `[D, H, W]`), neighbours overlapping by the fraction
    /// `overlap` of the window (0.5 in nnU-Net and Iris).
    ///
    /// # Errors
    /// [`Error::InvalidArgument`] for a zero dimension in either shape or an
    /// `overlap` outside `[0, 1)`; [`Error::TooLarge`] when either shape has
    /// more than [`MAX_VOXELS`](crate::volume::MAX_VOXELS) voxels or the plan
    /// more than [`MAX_WINDOWS`] windows.
    pub fn new(volume_shape: [usize; 3], window: [usize; 3], overlap: f32) -> Result<WindowPlan> {
        if volume_shape.contains(&0) {
            return Err(Error::invalid(
                "volume_shape",
                format!("{volume_shape:?} has a zero dimension"),
            ));
        }
        if window.contains(&0) {
            return Err(Error::invalid(
                "window",
                format!("{window:?} has a zero dimension"),
            ));
        }
        if !(overlap.is_finite() && (0.0..1.0).contains(&overlap)) {
            return Err(Error::invalid(
                "overlap",
                format!("{overlap} is outside [0, 1) (0.5 means half a window)"),
            ));
        }
        checked_voxel_count(volume_shape)?;
        checked_voxel_count(window)?;
        let padded_shape: [usize; 3] = core::array::from_fn(|a| volume_shape[a].max(window[a]));
        let offset = core::array::from_fn(|a| (padded_shape[a] - volume_shape[a]) / 2);
        let counts: [usize; 3] =
            core::array::from_fn(|a| axis_count(padded_shape[a], window[a], overlap));
        counts
            .iter()
            .try_fold(1usize, |acc, &n| acc.checked_mul(n))
            .filter(|&n| n <= MAX_WINDOWS)
            .ok_or_else(|| Error::TooLarge {
                what: "window plan",
                detail: format!(
                    "{counts:?} windows exceed the limit of {MAX_WINDOWS}; \
                     use larger windows or less overlap"
                ),
            })?;
        let starts = core::array::from_fn(|a| axis_starts(padded_shape[a], window[a], overlap));
        Ok(WindowPlan {
            volume_shape,
            window,
            padded_shape,
            offset,
            starts,
        })
    }

    /// Shape of the real volume, `[D, H, W]` voxels.
    pub fn volume_shape(&self) -> [usize; 3] {
        self.volume_shape
    }

    /// Shape of every window, `[D, H, W]` voxels.
    pub fn window_shape(&self) -> [usize; 3] {
        self.window
    }

    /// Shape after padding: `max(volume, window)` per axis.
    pub fn padded_shape(&self) -> [usize; 3] {
        self.padded_shape
    }

    /// Padding before the real volume per axis: real voxel `v` is padded voxel `v + offset`.
    pub fn offset(&self) -> [usize; 3] {
        self.offset
    }

    /// Window starts along `axis` (0 = d, 1 = h, 2 = w) in padded voxels,
    /// strictly increasing, first 0, last `padded - window`.
    ///
    /// # Panics
    /// If `axis > 2` (a programming error, not an input error).
    pub fn starts(&self, axis: usize) -> &[usize] {
        &self.starts[axis]
    }

    /// Number of windows along each axis, `[d, h, w]`.
    pub fn grid(&self) -> [usize; 3] {
        core::array::from_fn(|a| self.starts[a].len())
    }

    /// Total number of windows.
    pub fn len(&self) -> usize {
        self.grid().iter().product()
    }

    /// Always false: a plan has at least one window.
    pub fn is_empty(&self) -> bool {
        false
    }

    /// The window at position `index` of the z-major order, or `None` past the end.
    pub fn window(&self, index: usize) -> Option<Window> {
        if index >= self.len() {
            return None;
        }
        let [_, gh, gw] = self.grid();
        let grid = [index / (gh * gw), (index / gw) % gh, index % gw];
        Some(Window {
            index,
            grid,
            start: core::array::from_fn(|a| self.starts[a][grid[a]]),
        })
    }

    /// All windows in z-major order (`d` slowest, `w` fastest).
    pub fn windows(&self) -> impl Iterator<Item = Window> + '_ {
        (0..self.len()).filter_map(|i| self.window(i))
    }

    /// Largest number of windows that overlap at any one voxel of the real
    /// volume: 8 at 50 % overlap when the steps come out at exactly half a
    /// window, up to 27 when uneven steps let three windows meet along an axis.
    pub fn max_coverage(&self) -> usize {
        (0..3)
            .map(|a| {
                let (o, n, w, starts) = (
                    self.offset[a],
                    self.volume_shape[a],
                    self.window[a],
                    &self.starts[a],
                );
                // Windows covering padded voxel x: started at or before x, not yet ended.
                let cover = |x: usize| {
                    starts.partition_point(|&s| s <= x) - starts.partition_point(|&s| s + w <= x)
                };
                // Coverage only rises at a window start, so the maximum over the
                // real voxels is at the first one or at a start among them.
                core::iter::once(o)
                    .chain(starts.iter().copied().filter(|&s| s > o && s < o + n))
                    .map(cover)
                    .max()
                    .unwrap_or(1)
            })
            .product()
    }

    /// The input of window `index`: the window's voxels of `image` (which
    /// must have the plan's volume shape), with `pad_value` where the window
    /// lies in the padding. Returns a `[D, H, W]` array of the window shape.
    ///
    /// # Errors
    /// [`Error::InvalidArgument`] for an index past the end;
    /// [`Error::ShapeMismatch`] when `image` is not of the volume shape.
    pub fn extract(
        &self,
        image: ArrayView3<'_, f32>,
        index: usize,
        pad_value: f32,
    ) -> Result<Array3<f32>> {
        let (d, h, w) = image.dim();
        if [d, h, w] != self.volume_shape {
            return Err(Error::ShapeMismatch {
                what: "image vs window plan volume".into(),
                expected: self.volume_shape.to_vec(),
                found: alloc::vec![d, h, w],
            });
        }
        let win = self.window_checked(index)?;
        let [sd, sh, sw] = self.spans(&win);
        let [wd, wh, ww] = self.window;
        let mut out = Array3::from_elem((wd, wh, ww), pad_value);
        let src = |span: &Span| span.volume_start..span.volume_start + span.local.len();
        out.slice_mut(s![sd.local.clone(), sh.local.clone(), sw.local.clone()])
            .assign(&image.slice(s![src(&sd), src(&sh), src(&sw)]));
        Ok(out)
    }

    /// The window at `index`, or an error naming the valid range.
    pub(crate) fn window_checked(&self, index: usize) -> Result<Window> {
        self.window(index).ok_or_else(|| {
            Error::invalid(
                "window index",
                format!(
                    "{index} is past the end of a plan of {} windows",
                    self.len()
                ),
            )
        })
    }

    /// Per axis, the part of `win` inside the real volume.
    pub(crate) fn spans(&self, win: &Window) -> [Span; 3] {
        core::array::from_fn(|a| {
            let (s, o, n) = (win.start[a], self.offset[a], self.volume_shape[a]);
            // Either the volume is at least a window long (o = 0, s + window <= n)
            // or the window is the whole padded axis (s = 0, o + n <= window).
            let first = o.saturating_sub(s);
            let end = self.window[a].min(o + n - s);
            Span {
                local: first..end,
                volume_start: s + first - o,
            }
        })
    }
}

/// Window starts along one axis of `size >= window` voxels (see the module doc).
fn axis_starts(size: usize, window: usize, overlap: f32) -> Vec<usize> {
    let max_start = size - window;
    let count = axis_count(size, window, overlap);
    if count == 1 {
        return alloc::vec![0];
    }
    let actual = max_start as f64 / (count - 1) as f64;
    (0..count)
        .map(|i| libm::rint(actual * i as f64) as usize)
        .collect()
}

/// Number of windows along one axis of `size >= window` voxels.
fn axis_count(size: usize, window: usize, overlap: f32) -> usize {
    let max_start = size - window;
    if max_start == 0 {
        return 1;
    }
    let step = window as f64 * (1.0 - f64::from(overlap));
    // The small tolerance keeps e.g. overlap 0.1f32 (0.10000000149) from
    // adding a window when max_start / step is an integer in exact arithmetic.
    let steps = libm::ceil(max_start as f64 / step - 1e-6).max(1.0) as usize;
    steps.min(max_start) + 1
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn nnunet_worked_examples() {
        // compute_steps_for_sliding_window(image_size, tile_size, 0.5) in nnU-Net v2.
        assert_eq!(axis_starts(110, 64, 0.5), [0, 23, 46]);
        assert_eq!(axis_starts(64, 64, 0.5), [0]);
        assert_eq!(axis_starts(65, 64, 0.5), [0, 1]);
        assert_eq!(axis_starts(128, 64, 0.5), [0, 32, 64]);
        assert_eq!(axis_starts(512, 128, 0.5), [0, 64, 128, 192, 256, 320, 384]);
        assert_eq!(axis_starts(300, 128, 0.5), [0, 57, 115, 172]);
        assert_eq!(axis_starts(181, 64, 0.5), [0, 29, 58, 88, 117]); // 58.5 -> 58, as np.round
        assert_eq!(axis_starts(200, 64, 0.0), [0, 45, 91, 136]);
        assert_eq!(axis_starts(10, 1, 0.9), (0..10).collect::<Vec<_>>());
        // 0.1f32 is 0.10000000149: without the tolerance 18 / 8.99999998 would give 4 windows.
        assert_eq!(axis_starts(28, 10, 0.1f32), [0, 9, 18]);
    }

    #[test]
    fn plan_shape_order_and_flush_last_window() {
        let plan = WindowPlan::new([300, 512, 512], [128, 128, 128], 0.5).expect("valid");
        assert_eq!(plan.grid(), [4, 7, 7]);
        assert_eq!(plan.len(), 196);
        // Along d the starts 0, 57, 115 all cover voxels 115..128.
        assert_eq!(plan.max_coverage(), 3 * 2 * 2);
        let all: Vec<Window> = plan.windows().collect();
        assert_eq!(all.len(), 196);
        // z-major: d slowest, w fastest.
        assert_eq!(all[1].grid, [0, 0, 1]);
        assert_eq!(all[7].grid, [0, 1, 0]);
        assert_eq!(all[49].grid, [1, 0, 0]);
        assert_eq!(all[49].start, [57, 0, 0]);
        assert_eq!(
            all.iter().map(|w| w.index).collect::<Vec<_>>(),
            (0..196).collect::<Vec<_>>()
        );
        assert_eq!(all[195].start, [172, 384, 384]);
        for a in 0..3 {
            assert_eq!(all[195].start[a] + 128, plan.volume_shape()[a]);
        }
        assert_eq!(plan.window(196), None);
    }

    #[test]
    fn small_volumes_are_padded_centred() {
        let plan = WindowPlan::new([30, 64, 101], [64, 64, 64], 0.5).expect("valid");
        assert_eq!(plan.padded_shape(), [64, 64, 101]);
        assert_eq!(plan.offset(), [17, 0, 0]);
        assert_eq!(plan.starts(0), &[0]);
        assert_eq!(plan.starts(2), &[0, 18, 37]); // 18.5 rounds to even
        let win = plan.window(2).expect("exists");
        let [sd, sh, sw] = plan.spans(&win);
        assert_eq!((sd.local, sd.volume_start), (17..47, 0));
        assert_eq!((sh.local, sh.volume_start), (0..64, 0));
        assert_eq!((sw.local, sw.volume_start), (0..64, 37));

        let image =
            Array3::from_shape_fn((30, 64, 101), |(d, h, w)| (d * 10000 + h * 100 + w) as f32);
        let cut = plan.extract(image.view(), 2, -1.0).expect("valid");
        assert_eq!(cut.dim(), (64, 64, 64));
        assert_eq!(cut[[16, 5, 5]], -1.0);
        assert_eq!(cut[[47, 5, 5]], -1.0);
        assert_eq!(cut[[17, 5, 0]], image[[0, 5, 37]]);
        assert_eq!(cut[[46, 63, 63]], image[[29, 63, 100]]);
    }

    #[test]
    fn invalid_input_is_a_clear_error() {
        for (shape, window, overlap, name) in [
            ([0, 4, 4], [2, 2, 2], 0.5, "volume_shape"),
            ([4, 4, 4], [2, 0, 2], 0.5, "window"),
            ([4, 4, 4], [2, 2, 2], 1.0, "overlap"),
            ([4, 4, 4], [2, 2, 2], -0.1, "overlap"),
            ([4, 4, 4], [2, 2, 2], f32::NAN, "overlap"),
        ] {
            match WindowPlan::new(shape, window, overlap) {
                Err(Error::InvalidArgument { name: n, .. }) => assert_eq!(n, name),
                other => panic!("{shape:?} {window:?} {overlap}: {other:?}"),
            }
        }
        assert!(matches!(
            WindowPlan::new([usize::MAX, 2, 2], [2, 2, 2], 0.5),
            Err(Error::TooLarge { .. })
        ));
        // 2^31 one-voxel windows along d: refused before any allocation.
        assert!(matches!(
            WindowPlan::new([1 << 31, 1, 1], [1, 1, 1], 0.5),
            Err(Error::TooLarge {
                what: "window plan",
                ..
            })
        ));
        let plan = WindowPlan::new([8, 8, 8], [4, 4, 4], 0.5).expect("valid");
        assert!(matches!(
            plan.extract(Array3::zeros((8, 8, 7)).view(), 0, 0.0),
            Err(Error::ShapeMismatch { .. })
        ));
        assert!(matches!(
            plan.extract(Array3::zeros((8, 8, 8)).view(), 27, 0.0),
            Err(Error::InvalidArgument { .. })
        ));
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(256))]
        /// Every real voxel is inside at least one window, starts are strictly
        /// increasing from 0, the last window is flush, and the spans agree.
        #[test]
        fn every_voxel_is_covered(
            size in 1usize..300,
            window in 1usize..100,
            overlap in 0.0f32..0.95,
        ) {
            let plan = WindowPlan::new([size, 1, 1], [window, 1, 1], overlap).expect("valid");
            let starts = plan.starts(0);
            let padded = plan.padded_shape()[0];
            prop_assert_eq!(starts[0], 0);
            prop_assert_eq!(*starts.last().expect("non-empty") + window, padded);
            prop_assert!(starts.windows(2).all(|p| p[0] < p[1]));
            let mut covered = alloc::vec![0usize; size];
            for win in plan.windows() {
                let [sd, ..] = plan.spans(&win);
                for c in &mut covered[sd.volume_start..sd.volume_start + sd.local.len()] {
                    *c += 1;
                }
            }
            prop_assert!(covered.iter().all(|&c| c >= 1), "uncovered voxel: {:?}", covered);
            prop_assert_eq!(covered.iter().max().copied(), Some(plan.max_coverage()));
        }
    }
}
