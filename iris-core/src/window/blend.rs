//! Blending window outputs into one label map, keeping only the rows still in play.
//!
//! Each window's output is `K` per-class probability maps (sigmoid already
//! applied). The blended probability of class `k` at voxel `v` is the
//! Gaussian-weighted mean over the windows `i` covering `v`:
//! `P_k(v) = sum_i g_i(v) p_ik(v) / sum_i g_i(v)`, and the label follows the
//! [`labels`](crate::labels) rule (highest class if `>= threshold`).
//!
//! # How memory stays small
//! 1. **The denominator needs no buffer.** The windows form a full grid and
//!    the Gaussian is separable, so `sum_i g_i(v)` is a product of three 1-D
//!    sums, one per axis. The blender precomputes, for every window start
//!    along every axis, the 1-D ratio `g(t) / S(x)` of the profile to that
//!    sum, and adds `r_d * r_h * r_w * p` straight into the running *mean*.
//!    Stored values stay in `[0, 1]` whatever the weights, which is what
//!    makes 16-bit storage safe: no underflow of tiny corner weights, the
//!    problem nnU-Net works around by flooring its `f16` weights.
//! 2. **Only unfinished rows are live.** Windows come in z-major order
//!    (depth row `i` with start `s_i`, then band `j` of rows with start
//!    `h_j`). No later window touches slices below `s_{i+1}`, and once band
//!    `j` and every band before it in row `i` are complete, no later window
//!    touches rows below `h_{j+1}` either: the block
//!    `[s_i, s_{i+1}) x [h_j, h_{j+1})` is final. The blender stores running
//!    means per volume row `(d, h)` (`K x W` values), allocates a row when a
//!    window first touches it, labels it when its block is final, and
//!    recycles its memory. Within a depth row windows may come in any order
//!    (an early band just stays live longer); a window from a later depth
//!    row before the current one is complete is an error.
//! 3. **Means take 16 bits.** Because they lie in `[0, 1]`, the default
//!    [`Precision::Fixed16`] stores `round(65535 * mean)`: uniform steps of
//!    1.5e-5, 16 to 32 times finer than `f16` near 0.5, at the same size and
//!    speed. [`Precision::F16`] (as nnU-Net) and [`Precision::F32`] exist too.
//!
//! Working memory, for `K` classes, a `[D, H, W]` volume, a `[wd, wh, ww]`
//! window, windows added in z-major order, `wd' = min(wd, D)` and `s` the
//! smallest step between depth starts (`s = wd'` with one depth row):
//!
//! ```text
//! bytes = ((wd' - s) * H + s * min(wh, H)) * K * W * b   live rows (b = 2, or 4 for F32)
//!       + D * H * W * 2                  the u16 label map returned by finish()
//!       + 4 * K * min(wh, H) * W         one f32 block, only with a probability sink
//!       + 4 * (K + 1) * W + 4 * D * H    scratch rows and the row index
//! ```
//!
//! For 15 classes on 512 x 512 x 300 with 128^3 windows at 50 % overlap
//! (`s` = 57) that is 43 648 rows = 0.67 GB, plus 0.16 GB of labels, against
//! 4.7 GB for a naive `f32` `K x volume` accumulator (plus 0.3 GB for its
//! weight sum) and 1.0 GB for a ring of whole slices one window deep.
//! `docs/memory.md` has the measured peak.
//!
//! # Precision
//! Each addition rounds the stored mean once: by at most half a step of the
//! storage (`0.5 / 65535` for `Fixed16`; half an ulp, at most `2^-12` below 1,
//! for `f16`), plus `f32` arithmetic (about `2^-24` relative). With at most
//! `c` windows on a voxel ([`WindowPlan::max_coverage`], 8 to 12 at 50 %
//! overlap) the blended probability is within [`Blender::error_bound`] of the
//! exact value. A label can therefore differ from an exact computation only
//! where the winning probability is within that bound of the threshold, or
//! two classes are within twice the bound of each other (`c = 12`:
//! 1.8e-4 for `Fixed16`, 2.9e-3 for `F16`).

use alloc::boxed::Box;
use alloc::format;
use alloc::vec::Vec;
use core::ops::Range;
use half::f16;
use half::slice::HalfFloatSliceExt;
use ndarray::{Array3, ArrayView3};

use super::plan::{Span, WindowPlan};
use super::weights::GaussianWeights;
use crate::error::{Error, Result};
use crate::labels::{DEFAULT_THRESHOLD, check_class_labels, check_threshold, decide};
use crate::volume::{MAX_VOXELS, try_filled};

/// How the running per-class means are stored.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum Precision {
    /// 2 bytes per class and voxel: a 16-bit fixed point `q / 65535`
    /// (uniform steps of 1.5e-5 over `[0, 1]`); error bound `c / 65535`.
    #[default]
    Fixed16,
    /// 2 bytes per class and voxel: IEEE half precision (`half::f16`, as
    /// nnU-Net); steps of 2.4e-4 to 4.9e-4 near 0.5; error bound `c * 2^-12`.
    F16,
    /// 4 bytes per class and voxel of the slab; error bound about `c * 2^-21`.
    F32,
}

/// Settings of a [`Blender`].
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct BlendOptions {
    /// Probability the best class needs to label a voxel, in `(0, 1]`. Default 0.5.
    pub threshold: f32,
    /// Storage of the running means. Default [`Precision::Fixed16`].
    pub precision: Precision,
}

impl Default for BlendOptions {
    fn default() -> Self {
        BlendOptions {
            threshold: DEFAULT_THRESHOLD,
            precision: Precision::Fixed16,
        }
    }
}

/// Receives each finished block of blended probabilities: the slice index
/// `d`, the rows `h` it covers, and a `[K, rows, W]` view of the `K` class
/// maps on those rows.
pub type ProbabilitySink<'s> = Box<dyn FnMut(usize, Range<usize>, ArrayView3<'_, f32>) + 's>;

/// Accumulates window outputs into a label map, like MONAI's `Merger`:
/// [`Blender::add`] each window, then [`Blender::finish`].
///
/// ```
/// use iris_core::window::{BlendOptions, Blender, WindowPlan};
///
/// let plan = WindowPlan::new([20, 16, 16], [8, 8, 8], 0.5)?;
/// let mut blender = Blender::new(&plan, &[3, 7], BlendOptions::default())?;
/// for window in plan.windows() {
///     // A network would predict here: [2 classes, 8, 8, 8], sigmoid applied.
///     let mut probs = vec![0.1f32; 2 * 8 * 8 * 8];
///     probs[512..].fill(0.8); // class 1 (label 7) everywhere
///     blender.add(window.index, &probs)?;
/// }
/// let labels = blender.finish()?;
/// assert_eq!(labels.dim(), (20, 16, 16));
/// assert!(labels.iter().all(|&l| l == 7));
/// # Ok::<(), iris_core::Error>(())
/// ```
pub struct Blender<'s> {
    plan: WindowPlan,
    class_labels: Vec<u16>,
    threshold: f32,
    /// Per axis, `grid[a]` rows of `window[a]` ratios `g(t) / S(start + t)`.
    ratios: [Vec<f32>; 3],
    rows: Rows,
    labels: Vec<u16>,
    added: Vec<bool>,
    /// The depth row being accumulated, windows added per band of it, and
    /// the first band not yet finalised.
    row: usize,
    band_added: Vec<usize>,
    next_band: usize,
    /// One window row being added (`ww` values).
    row_scratch: Vec<f32>,
    /// One finished volume row, `[K, W]` probabilities.
    scratch: Vec<f32>,
    /// With a sink: one finished block, `[K, rows, W]`.
    block_scratch: Vec<f32>,
    sink: Option<ProbabilitySink<'s>>,
}

/// The live rows of running means, in the chosen [`Precision`].
enum Rows {
    Fixed16(RowPool<u16>),
    F16(RowPool<f16>),
    F32(RowPool<f32>),
}

/// Runs `$body` with `$r` bound to the row pool, whatever its type.
macro_rules! with_rows {
    ($rows:expr, $r:ident => $body:expr) => {
        match $rows {
            Rows::Fixed16($r) => $body,
            Rows::F16($r) => $body,
            Rows::F32($r) => $body,
        }
    };
}

impl<'s> Blender<'s> {
    /// A blender for the windows of `plan`; window outputs have one map per
    /// entry of `class_labels`, and class `k` is written as `class_labels[k]`.
    ///
    /// # Errors
    /// [`Error::InvalidArgument`] for invalid class labels or threshold;
    /// [`Error::TooLarge`] when a window output or a row of the volume
    /// overflows memory arithmetic.
    pub fn new(
        plan: &WindowPlan,
        class_labels: &[u16],
        options: BlendOptions,
    ) -> Result<Blender<'s>> {
        check_class_labels(class_labels)?;
        check_threshold(options.threshold)?;
        let k = class_labels.len();
        let [d, h, w] = plan.volume_shape();
        let window = plan.window_shape();
        let too_large = |what: &'static str| Error::TooLarge {
            what,
            detail: format!("{k} classes x window {window:?} or volume [{d}, {h}, {w}]"),
        };
        let row_len = k.checked_mul(w).ok_or_else(|| too_large("blending row"))?;
        k.checked_mul(window.iter().product())
            .ok_or_else(|| too_large("window output"))?;
        // The 1-D weight ratios: one window's worth per start along each axis.
        for (n, w) in plan.grid().into_iter().zip(window) {
            n.checked_mul(w)
                .filter(|&len| len <= MAX_VOXELS)
                .ok_or_else(|| too_large("window weight table"))?;
        }
        let rows = match options.precision {
            Precision::Fixed16 => Rows::Fixed16(RowPool::new(row_len, d * h)?),
            Precision::F16 => Rows::F16(RowPool::new(row_len, d * h)?),
            Precision::F32 => Rows::F32(RowPool::new(row_len, d * h)?),
        };
        let gaussian = GaussianWeights::new(window)?;
        let profiles = gaussian.profiles();
        let ratios = core::array::from_fn(|a| axis_ratios(plan, a, profiles[a]));
        Ok(Blender {
            plan: plan.clone(),
            class_labels: class_labels.to_vec(),
            threshold: options.threshold,
            ratios,
            rows,
            labels: try_filled(d * h * w, 0, "label map")?,
            added: try_filled(plan.len(), false, "window table")?,
            row: 0,
            band_added: alloc::vec![0; plan.grid()[1]],
            next_band: 0,
            row_scratch: alloc::vec![0.0; window[2]],
            scratch: alloc::vec![0.0; row_len],
            block_scratch: Vec::new(),
            sink: None,
        })
    }

    /// Also hands every finished block of blended probabilities to `sink`:
    /// slice index `d`, the range of rows `h`, and a `[K, rows, W]` view
    /// valid during the call. Every voxel is delivered exactly once, and the
    /// blocks of one slice come in increasing `h`. Blocks are final as soon
    /// as a band of windows (one `h` start, all `w` starts) of a depth row is
    /// complete, so for each depth row the sink sees its slices for the
    /// first band of rows, then for the next band, and so on. The blender
    /// holds no probability map: the sink keeps what it wants. Costs one
    /// `f32` block of `K x window height x W`.
    ///
    /// # Errors
    /// [`Error::InvalidArgument`] if windows were already added;
    /// [`Error::TooLarge`] if the block size overflows.
    pub fn with_probability_sink(
        mut self,
        sink: impl FnMut(usize, Range<usize>, ArrayView3<'_, f32>) + 's,
    ) -> Result<Blender<'s>> {
        if self.added.iter().any(|&a| a) {
            return Err(Error::invalid(
                "probability sink",
                "must be set before the first window is added",
            ));
        }
        let [_, h, w] = self.plan.volume_shape();
        let rows = self.plan.window_shape()[1].min(h);
        let len = self
            .class_labels
            .len()
            .checked_mul(rows * w)
            .ok_or_else(|| Error::TooLarge {
                what: "probability block",
                detail: format!("{} classes x {rows} x {w}", self.class_labels.len()),
            })?;
        self.block_scratch = try_filled(len, 0.0, "probability block")?;
        self.sink = Some(Box::new(sink));
        Ok(self)
    }

    /// Largest difference between a blended probability and its exact value
    /// (see the module doc): `c / 65535 + c * 2^-21` for [`Precision::Fixed16`],
    /// `c * 2^-12 + c * 2^-21` for [`Precision::F16`], `c * 2^-21` for
    /// [`Precision::F32`], where `c` = [`WindowPlan::max_coverage`].
    pub fn error_bound(&self) -> f32 {
        let c = self.plan.max_coverage() as f32;
        let f32_part = c / 2_097_152.0; // 2^-21
        match self.rows {
            Rows::Fixed16(_) => c / FIXED16_ONE + f32_part,
            Rows::F16(_) => c / 4096.0 + f32_part, // 2^-12
            Rows::F32(_) => f32_part,
        }
    }

    /// Adds the output of window `index` (see [`WindowPlan::windows`]):
    /// `probs` is `[K, wd, wh, ww]` in C order, values in `[0, 1]`.
    ///
    /// Windows must arrive depth row by depth row (`Window::grid[0]`
    /// non-decreasing, as in z-major order); within a row any order works.
    /// When a row is complete its finished slices are labelled (and given to
    /// the probability sink, if any).
    ///
    /// # Errors
    /// [`Error::InvalidArgument`] for an index past the end, a window added
    /// twice, a window of a later row while the current row is incomplete,
    /// or a value outside `[0, 1]` (logits instead of probabilities);
    /// [`Error::ShapeMismatch`] for a wrong length; [`Error::NonFinite`] for
    /// NaN or infinite values. On error nothing is changed.
    pub fn add(&mut self, index: usize, probs: &[f32]) -> Result<()> {
        let win = self.plan.window_checked(index)?;
        if self.added[index] {
            return Err(Error::invalid(
                "window index",
                format!("window {index} was already added"),
            ));
        }
        let [_, gh, gw] = self.plan.grid();
        if win.grid[0] != self.row {
            return Err(Error::invalid(
                "window index",
                format!(
                    "window {index} is in depth row {} but row {} still misses {} of its {} \
                     windows; add windows row by row (z-major order, any order within a row)",
                    win.grid[0],
                    self.row,
                    gh * gw - self.band_added.iter().sum::<usize>(),
                    gh * gw
                ),
            ));
        }
        let window = self.plan.window_shape();
        let expected = self.class_labels.len() * window.iter().product::<usize>();
        if probs.len() != expected {
            return Err(Error::ShapeMismatch {
                what: format!("probabilities of window {index} ([K, wd, wh, ww])"),
                expected: alloc::vec![self.class_labels.len(), window[0], window[1], window[2]],
                found: alloc::vec![probs.len()],
            });
        }
        // One branch-free pass finds NaN, infinities and out-of-range values
        // alike; only on failure is the offending value located.
        let valid = |p: &f32| (0.0..=1.0).contains(p);
        let all_valid = probs
            .chunks(4096)
            .all(|chunk| chunk.iter().fold(true, |ok, p| ok & valid(p)));
        if !all_valid && let Some(at) = probs.iter().position(|p| !valid(p)) {
            let count = probs.iter().filter(|p| !p.is_finite()).count();
            if count > 0 {
                return Err(Error::NonFinite {
                    what: "window probabilities",
                    count,
                });
            }
            return Err(Error::invalid(
                "probs",
                format!(
                    "value {} at offset {at} of window {index} is not a probability in [0, 1]; \
                     apply the sigmoid to logits first",
                    probs[at]
                ),
            ));
        }

        let spans = self.plan.spans(&win);
        let ratios: [&[f32]; 3] =
            core::array::from_fn(|a| &self.ratios[a][win.grid[a] * window[a]..][..window[a]]);
        let layout = Layout {
            classes: self.class_labels.len(),
            window,
            plane: [self.plan.volume_shape()[1], self.plan.volume_shape()[2]],
        };
        let scratch = &mut self.row_scratch;
        // A failed allocation leaves the window half-added: the blender is
        // then dropped with the error, and nothing of it is returned.
        with_rows!(&mut self.rows, rows => layout.accumulate(rows, probs, &spans, ratios, scratch))?;
        self.added[index] = true;
        self.band_added[win.grid[1]] += 1;
        // Bands are final once they and every band above them are complete.
        while self.next_band < gh && self.band_added[self.next_band] == gw {
            self.finish_block(self.next_band);
            self.next_band += 1;
        }
        if self.next_band == gh {
            self.row += 1;
            self.next_band = 0;
            self.band_added.fill(0);
        }
        Ok(())
    }

    /// Number of windows added so far.
    pub fn windows_added(&self) -> usize {
        self.added.iter().filter(|&&a| a).count()
    }

    /// Returns the `[D, H, W]` label map once every window has been added.
    ///
    /// # Errors
    /// [`Error::InvalidArgument`] naming the first missing window.
    pub fn finish(self) -> Result<Array3<u16>> {
        if let Some(missing) = self.added.iter().position(|&a| !a) {
            return Err(Error::invalid(
                "blender",
                format!(
                    "{} of {} windows were never added (first missing: window {missing})",
                    self.added.iter().filter(|&&a| !a).count(),
                    self.added.len()
                ),
            ));
        }
        let [d, h, w] = self.plan.volume_shape();
        Array3::from_shape_vec((d, h, w), self.labels)
            .map_err(|e| Error::invalid("blender", format!("cannot shape labels: {e}")))
    }

    /// Labels the block that band `band` of the current depth row made
    /// final: padded slices `[s_row, s_row+1)` by padded rows
    /// `[h_band, h_band+1)` (to the end for the last row or band), clipped to
    /// the volume. Gives it to the sink and frees its rows.
    fn finish_block(&mut self, band: usize) {
        let [d, h, w] = self.plan.volume_shape();
        let offset = self.plan.offset();
        let range = |axis: usize, i: usize, size: usize| {
            let starts = self.plan.starts(axis);
            let to = starts.get(i + 1).copied().unwrap_or(usize::MAX);
            let clip = |x: usize| x.saturating_sub(offset[axis]).min(size);
            clip(starts[i])..clip(to)
        };
        let (zs, ys) = (range(0, self.row, d), range(1, band, h));
        let k = self.class_labels.len();
        let rows = ys.len();
        for z in zs {
            for y in ys.clone() {
                let row = &mut self.scratch;
                with_rows!(&mut self.rows, pool => pool.take(z * h + y, row));
                let out = &mut self.labels[(z * h + y) * w..][..w];
                decide(row, &self.class_labels, self.threshold, out);
                if self.sink.is_some() {
                    for c in 0..k {
                        self.block_scratch[(c * rows + y - ys.start) * w..][..w]
                            .copy_from_slice(&row[c * w..][..w]);
                    }
                }
            }
            // With a sink the block scratch holds K maps of `rows` rows.
            if let Some(sink) = &mut self.sink
                && let Ok(view) =
                    ArrayView3::from_shape((k, rows, w), &self.block_scratch[..k * rows * w])
            {
                sink(z, ys.clone(), view);
            }
        }
    }
}

impl core::fmt::Debug for Blender<'_> {
    fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        f.debug_struct("Blender")
            .field("plan", &self.plan)
            .field("class_labels", &self.class_labels)
            .field("threshold", &self.threshold)
            .field("windows_added", &self.windows_added())
            .field("live_rows", &with_rows!(&self.rows, pool => pool.live()))
            .field("sink", &self.sink.is_some())
            .finish_non_exhaustive()
    }
}

/// For every start along `axis`, the window-local ratios `g(t) / S(start + t)`,
/// where `S(x)` sums the profile over all windows covering padded voxel `x`.
fn axis_ratios(plan: &WindowPlan, axis: usize, profile: &[f32]) -> Vec<f32> {
    let starts = plan.starts(axis);
    let mut sum = alloc::vec![0.0f64; plan.padded_shape()[axis]];
    for &s in starts {
        for (t, &g) in profile.iter().enumerate() {
            sum[s + t] += f64::from(g);
        }
    }
    starts
        .iter()
        .flat_map(|&s| {
            let sum = &sum;
            profile
                .iter()
                .enumerate()
                .map(move |(t, &g)| (f64::from(g) / sum[s + t]) as f32)
        })
        .collect()
}

/// Sizes needed to address window outputs and volume rows.
struct Layout {
    classes: usize,
    window: [usize; 3],
    plane: [usize; 2],
}

impl Layout {
    /// Adds `r_d * r_h * r_w * probs` to the rows of the window's part inside
    /// the volume, allocating rows on first touch.
    fn accumulate<T: Store>(
        &self,
        pool: &mut RowPool<T>,
        probs: &[f32],
        spans: &[Span; 3],
        ratios: [&[f32]; 3],
        scratch: &mut [f32],
    ) -> Result<()> {
        let [wd, wh, ww] = self.window;
        let [h, w] = self.plane;
        let [sd, sh, sw] = spans;
        let n = sw.local.len();
        let rw = &ratios[2][sw.local.clone()];
        for td in sd.local.clone() {
            let z = sd.volume_start + td - sd.local.start;
            for th in sh.local.clone() {
                let y = sh.volume_start + th - sh.local.start;
                let row = pool.get(z * h + y)?;
                let scale = ratios[0][td] * ratios[1][th];
                for c in 0..self.classes {
                    let src = ((c * wd + td) * wh + th) * ww + sw.local.start;
                    let dst = c * w + sw.volume_start;
                    T::add_row(
                        &mut row[dst..dst + n],
                        &probs[src..src + n],
                        scale,
                        rw,
                        &mut scratch[..n],
                    );
                }
            }
        }
        Ok(())
    }
}

/// Rows of running means (`[K, W]` each) for the `(d, h)` rows of the volume
/// that are live: allocated on first touch, recycled once labelled. Storage
/// grows in blocks of [`POOL_BLOCK_ROWS`] rows and never moves.
struct RowPool<T> {
    row_len: usize,
    blocks: Vec<Vec<T>>,
    /// Slot of each volume row `d * H + h`, or [`NO_SLOT`].
    slot_of: Vec<u32>,
    free: Vec<u32>,
    used: usize,
}

/// Rows per storage block of a [`RowPool`].
const POOL_BLOCK_ROWS: usize = 64;
const NO_SLOT: u32 = u32::MAX;

impl<T: Store> RowPool<T> {
    fn new(row_len: usize, volume_rows: usize) -> Result<RowPool<T>> {
        Ok(RowPool {
            row_len,
            blocks: Vec::new(),
            slot_of: try_filled(volume_rows, NO_SLOT, "row table")?,
            free: Vec::new(),
            used: 0,
        })
    }

    /// Number of rows holding data.
    fn live(&self) -> usize {
        self.used - self.free.len()
    }

    fn row_mut(&mut self, slot: u32) -> &mut [T] {
        let slot = slot as usize;
        let block = &mut self.blocks[slot / POOL_BLOCK_ROWS];
        &mut block[(slot % POOL_BLOCK_ROWS) * self.row_len..][..self.row_len]
    }

    /// The row of volume row `index`, zeroed when first touched.
    fn get(&mut self, index: usize) -> Result<&mut [T]> {
        let slot = match self.slot_of[index] {
            NO_SLOT => {
                let slot = match self.free.pop() {
                    Some(slot) => slot,
                    None => {
                        if self.used.is_multiple_of(POOL_BLOCK_ROWS) {
                            let len = POOL_BLOCK_ROWS * self.row_len;
                            self.blocks.push(try_filled(len, T::ZERO, "blending rows")?);
                        }
                        self.used += 1;
                        // Fewer slots than volume rows, which are at most MAX_VOXELS = 2^31.
                        (self.used - 1) as u32
                    }
                };
                self.slot_of[index] = slot;
                let row = self.row_mut(slot);
                row.fill(T::ZERO);
                return Ok(row);
            }
            slot => slot,
        };
        Ok(self.row_mut(slot))
    }

    /// Converts volume row `index` into `out` (`[K, W]` probabilities) and
    /// frees it. A row no window touched reads as zeros.
    fn take(&mut self, index: usize, out: &mut [f32]) {
        match core::mem::replace(&mut self.slot_of[index], NO_SLOT) {
            NO_SLOT => out.fill(0.0),
            slot => {
                T::load(self.row_mut(slot), out);
                self.free.push(slot);
            }
        }
    }
}

/// A storage type for running means (probabilities in `[0, 1]`).
trait Store: Copy {
    /// The stored form of probability 0.
    const ZERO: Self;
    /// `dst[i] += scale * ratio[i] * src[i]`, using `scratch` as needed.
    fn add_row(dst: &mut [Self], src: &[f32], scale: f32, ratio: &[f32], scratch: &mut [f32]);
    /// Converts stored values to probabilities.
    fn load(src: &[Self], dst: &mut [f32]);
}

/// Scale of [`Precision::Fixed16`]: stored `q` means probability `q / 65535`.
const FIXED16_ONE: f32 = 65535.0;

impl Store for u16 {
    const ZERO: u16 = 0;
    fn add_row(dst: &mut [u16], src: &[f32], scale: f32, ratio: &[f32], _: &mut [f32]) {
        let scale = scale * FIXED16_ONE;
        for ((d, &p), &r) in dst.iter_mut().zip(src).zip(ratio) {
            // Round to nearest; `as` saturates, so f32 rounding just above 1 stays 65535.
            *d = (f32::from(*d) + scale * r * p + 0.5) as u16;
        }
    }
    fn load(src: &[u16], dst: &mut [f32]) {
        for (d, &q) in dst.iter_mut().zip(src) {
            *d = f32::from(q) * (1.0 / FIXED16_ONE);
        }
    }
}

impl Store for f32 {
    const ZERO: f32 = 0.0;
    fn add_row(dst: &mut [f32], src: &[f32], scale: f32, ratio: &[f32], _: &mut [f32]) {
        for ((d, &p), &r) in dst.iter_mut().zip(src).zip(ratio) {
            *d += scale * r * p;
        }
    }
    fn load(src: &[f32], dst: &mut [f32]) {
        dst.copy_from_slice(src);
    }
}

impl Store for f16 {
    const ZERO: f16 = f16::ZERO;
    fn add_row(dst: &mut [f16], src: &[f32], scale: f32, ratio: &[f32], scratch: &mut [f32]) {
        dst.convert_to_f32_slice(scratch);
        f32::add_row(scratch, src, scale, ratio, &mut []);
        dst.convert_from_f32_slice(scratch);
    }
    fn load(src: &[f16], dst: &mut [f32]) {
        src.convert_to_f32_slice(dst);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use alloc::rc::Rc;
    use core::cell::RefCell;
    use proptest::prelude::*;

    /// A small deterministic generator (xorshift64*), uniform in `[0, 1)`.
    struct Rng(u64);
    impl Rng {
        fn next(&mut self) -> f32 {
            self.0 ^= self.0 >> 12;
            self.0 ^= self.0 << 25;
            self.0 ^= self.0 >> 27;
            (self.0.wrapping_mul(0x2545_f491_4f6c_dd1d) >> 40) as f32 / (1u64 << 24) as f32
        }
    }

    /// Random window outputs for every window of `plan` (`[K, wd, wh, ww]` each),
    /// `centre +- spread` clamped to `[0, 1]`.
    fn random_outputs(
        plan: &WindowPlan,
        k: usize,
        seed: u64,
        centre: f32,
        spread: f32,
    ) -> Vec<Vec<f32>> {
        let mut rng = Rng(seed | 1);
        let n = k * plan.window_shape().iter().product::<usize>();
        plan.windows()
            .map(|_| {
                (0..n)
                    .map(|_| (centre + spread * (2.0 * rng.next() - 1.0)).clamp(0.0, 1.0))
                    .collect()
            })
            .collect()
    }

    /// The naive full-volume reference in f64: `sum g p / sum g` per class and voxel.
    fn reference(plan: &WindowPlan, k: usize, outputs: &[Vec<f32>]) -> Vec<f64> {
        let [d, h, w] = plan.volume_shape();
        let window = plan.window_shape();
        let g = GaussianWeights::new(window).expect("valid");
        let n = d * h * w;
        let (mut num, mut den) = (alloc::vec![0.0f64; k * n], alloc::vec![0.0f64; n]);
        for (win, probs) in plan.windows().zip(outputs) {
            for td in 0..window[0] {
                for th in 0..window[1] {
                    for tw in 0..window[2] {
                        let t = [td, th, tw];
                        let v: [isize; 3] = core::array::from_fn(|a| {
                            (win.start[a] + t[a]) as isize - plan.offset()[a] as isize
                        });
                        if (0..3).any(|a| v[a] < 0 || v[a] >= plan.volume_shape()[a] as isize) {
                            continue;
                        }
                        let [p0, p1, p2] = g.profiles();
                        let weight = f64::from(p0[td]) * f64::from(p1[th]) * f64::from(p2[tw]);
                        let i = (v[0] as usize * h + v[1] as usize) * w + v[2] as usize;
                        den[i] += weight;
                        for c in 0..k {
                            let p = probs[((c * window[0] + td) * window[1] + th) * window[2] + tw];
                            num[c * n + i] += weight * f64::from(p);
                        }
                    }
                }
            }
        }
        assert!(
            den.iter().all(|&x| x > 0.0),
            "a voxel has zero total weight"
        );
        (0..k * n).map(|j| num[j] / den[j % n]).collect()
    }

    /// Blends `outputs` in plan order, returning the labels and the `[K, D, H, W]`
    /// probabilities collected through the sink.
    fn blend(
        plan: &WindowPlan,
        labels: &[u16],
        options: BlendOptions,
        outputs: &[Vec<f32>],
        order: &[usize],
    ) -> (Array3<u16>, Vec<f32>, f32) {
        let [d, h, w] = plan.volume_shape();
        let k = labels.len();
        let probs = Rc::new(RefCell::new(alloc::vec![f32::NAN; k * d * h * w]));
        // Per slice, the next row the sink must deliver: blocks of a slice
        // must tile it in increasing h, each row exactly once.
        let next_row = Rc::new(RefCell::new(alloc::vec![0usize; d]));
        let (p2, n2) = (probs.clone(), next_row.clone());
        let mut blender = Blender::new(plan, labels, options)
            .expect("valid")
            .with_probability_sink(move |z, ys: Range<usize>, block: ArrayView3<'_, f32>| {
                assert_eq!(block.dim(), (k, ys.len(), w));
                let mut next = n2.borrow_mut();
                assert_eq!(next[z], ys.start, "slice {z}: rows out of order");
                next[z] = ys.end;
                let mut p = p2.borrow_mut();
                for ((c, r, x), &v) in block.indexed_iter() {
                    p[((c * d + z) * h + ys.start + r) * w + x] = v;
                }
            })
            .expect("no window added yet");
        let bound = blender.error_bound();
        for &i in order {
            blender.add(i, &outputs[i]).expect("valid window");
        }
        let out = blender.finish().expect("complete");
        assert!(
            next_row.borrow().iter().all(|&r| r == h),
            "every row delivered"
        );
        let probs = probs.borrow().clone();
        (out, probs, bound)
    }

    /// Checks blended probabilities against the f64 reference within `bound`,
    /// and labels equal except at near-ties the bound allows.
    fn check_against_reference(
        plan: &WindowPlan,
        labels: &[u16],
        threshold: f32,
        got: &Array3<u16>,
        probs: &[f32],
        bound: f32,
        exact: &[f64],
    ) -> usize {
        let k = labels.len();
        let n = got.len();
        let bound = f64::from(bound);
        for (j, (&p, &e)) in probs.iter().zip(exact).enumerate() {
            assert!(
                (f64::from(p) - e).abs() <= bound,
                "voxel {j}: {p} vs exact {e} (bound {bound})"
            );
        }
        let mut near_ties = 0;
        for (i, &label) in got.as_slice().expect("contiguous").iter().enumerate() {
            let mut order: Vec<(usize, f64)> = (0..k).map(|c| (c, exact[c * n + i])).collect();
            order.sort_by(|a, b| b.1.total_cmp(&a.1).then(a.0.cmp(&b.0)));
            let (best, p) = order[0];
            let want = if p >= f64::from(threshold) {
                labels[best]
            } else {
                0
            };
            if label != want {
                let margin_threshold = (p - f64::from(threshold)).abs();
                let margin_classes = order.get(1).map_or(f64::INFINITY, |s| p - s.1);
                assert!(
                    margin_threshold <= bound || margin_classes <= 2.0 * bound,
                    "voxel {i} of {:?}: label {label}, exact {want} (p {p}, margins {margin_threshold} {margin_classes})",
                    plan.volume_shape()
                );
                near_ties += 1;
            }
        }
        near_ties
    }

    #[test]
    fn constant_window_outputs_are_reproduced() {
        // Padded along d, several windows along h and w, uneven steps.
        let plan = WindowPlan::new([9, 37, 23], [16, 16, 8], 0.5).expect("valid");
        let window: usize = plan.window_shape().iter().product();
        let constants = [0.7f32, 0.25, 0.5];
        let outputs: Vec<Vec<f32>> = plan
            .windows()
            .map(|_| {
                constants
                    .iter()
                    .flat_map(|&c| core::iter::repeat_n(c, window))
                    .collect()
            })
            .collect();
        let order: Vec<usize> = (0..plan.len()).collect();
        for precision in [Precision::F32, Precision::Fixed16, Precision::F16] {
            let options = BlendOptions {
                precision,
                ..BlendOptions::default()
            };
            let (labels, probs, bound) = blend(&plan, &[4, 5, 6], options, &outputs, &order);
            let n = labels.len();
            // The weights of a voxel sum to 1 up to f32 rounding (a few 1e-7);
            // 16-bit storage adds its own rounding, within the bound.
            let tolerance = if precision == Precision::F32 {
                1e-6
            } else {
                bound
            };
            for (c, &want) in constants.iter().enumerate() {
                for &p in &probs[c * n..(c + 1) * n] {
                    assert!(
                        (p - want).abs() <= tolerance,
                        "{precision:?} class {c}: {p} vs {want}"
                    );
                }
            }
            assert!(labels.iter().all(|&l| l == 4));
        }
    }

    #[test]
    fn shuffled_order_within_rows_gives_the_same_result() {
        let plan = WindowPlan::new([30, 20, 20], [12, 12, 12], 0.5).expect("valid");
        let outputs = random_outputs(&plan, 2, 7, 0.5, 0.5);
        let sorted: Vec<usize> = (0..plan.len()).collect();
        let per_row = plan.grid()[1] * plan.grid()[2];
        let shuffled: Vec<usize> = sorted
            .chunks(per_row)
            .flat_map(|row| row.iter().rev().copied().collect::<Vec<_>>())
            .collect();
        let options = BlendOptions {
            precision: Precision::F32,
            ..BlendOptions::default()
        };
        let (a, pa, _) = blend(&plan, &[1, 2], options, &outputs, &sorted);
        let (b, pb, bound) = blend(&plan, &[1, 2], options, &outputs, &shuffled);
        let exact = reference(&plan, 2, &outputs);
        check_against_reference(&plan, &[1, 2], 0.5, &a, &pa, bound, &exact);
        check_against_reference(&plan, &[1, 2], 0.5, &b, &pb, bound, &exact);
    }

    #[test]
    fn sixteen_bit_decisions_only_differ_at_bounded_near_ties() {
        // Probabilities crowded around 0.5 so that many voxels are close calls.
        let plan = WindowPlan::new([40, 33, 30], [16, 16, 16], 0.5).expect("valid");
        // Up to 2 x 3 x 3 windows meet on a voxel (uneven steps along h and w).
        assert_eq!(plan.max_coverage(), 18);
        let labels = [1, 2, 3];
        let outputs = random_outputs(&plan, 3, 99, 0.5, 0.02);
        let exact = reference(&plan, 3, &outputs);
        let order: Vec<usize> = (0..plan.len()).collect();
        let mut near = [0; 2];
        for (i, (precision, step)) in [
            (Precision::Fixed16, 1.0 / 65535.0),
            (Precision::F16, 1.0 / 4096.0),
        ]
        .into_iter()
        .enumerate()
        {
            let options = BlendOptions {
                precision,
                ..BlendOptions::default()
            };
            let (got, probs, bound) = blend(&plan, &labels, options, &outputs, &order);
            assert_eq!(bound, 18.0 * step + 18.0 / 2_097_152.0);
            // Without a sink the blender labels row by row instead of slice by slice: same result.
            let mut plain = Blender::new(&plan, &labels, options).expect("valid");
            for &w in &order {
                plain.add(w, &outputs[w]).expect("valid window");
            }
            assert_eq!(plain.finish().expect("complete"), got);
            near[i] = check_against_reference(&plan, &labels, 0.5, &got, &probs, bound, &exact);
        }
        // Close calls are rare even in this adversarial input, and rarer with
        // the finer fixed-point steps.
        let voxels = 40 * 33 * 30;
        assert!(
            near[0] <= near[1] && near[1] < voxels / 20,
            "{near:?} of {voxels} voxels"
        );
    }

    #[test]
    fn misuse_is_a_clear_error_and_changes_nothing() {
        let plan = WindowPlan::new([24, 8, 8], [8, 8, 8], 0.5).expect("valid");
        assert_eq!(plan.grid(), [5, 1, 1]);
        let ok = alloc::vec![0.9f32; 512];
        let mut b = Blender::new(&plan, &[1], BlendOptions::default()).expect("valid");
        let err = |r: Result<()>| match r {
            Err(e) => alloc::string::ToString::to_string(&e),
            Ok(()) => panic!("accepted"),
        };
        assert!(err(b.add(5, &ok)).contains("past the end"));
        assert!(err(b.add(1, &ok)).contains("row 0 still misses 1"));
        assert!(matches!(
            b.add(0, &ok[..511]),
            Err(Error::ShapeMismatch { .. })
        ));
        let mut bad = ok.clone();
        bad[3] = f32::NAN;
        assert!(matches!(
            b.add(0, &bad),
            Err(Error::NonFinite { count: 1, .. })
        ));
        bad[3] = 2.5;
        assert!(err(b.add(0, &bad)).contains("apply the sigmoid"));
        assert_eq!(b.windows_added(), 0);
        b.add(0, &ok).expect("valid");
        assert!(err(b.add(0, &ok)).contains("already added"));
        assert!(b.with_probability_sink(|_, _, _| {}).is_err());
        let mut b = Blender::new(&plan, &[1], BlendOptions::default()).expect("valid");
        b.add(0, &ok).expect("valid");
        assert!(
            err(b.finish().map(|_| ()))
                .contains("4 of 5 windows were never added (first missing: window 1)")
        );
        assert!(Blender::new(&plan, &[1, 1], BlendOptions::default()).is_err());
        let options = BlendOptions {
            threshold: 0.0,
            ..BlendOptions::default()
        };
        assert!(Blender::new(&plan, &[1], options).is_err());
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(40))]
        /// Random shapes (including volumes smaller than the window, i.e.
        /// padding), overlaps, classes and thresholds: the slab blender equals
        /// the naive f64 full-volume computation within its error bound, and
        /// its labels equal the exact labels except at bounded near-ties.
        #[test]
        fn equals_naive_full_volume_reference(
            shape in prop::array::uniform3(1usize..28),
            window in prop::array::uniform3(1usize..14),
            overlap in prop::sample::select(alloc::vec![0.0f32, 0.25, 0.5, 0.75]),
            k in 1usize..4,
            precision in prop::sample::select(alloc::vec![Precision::Fixed16, Precision::F16, Precision::F32]),
            threshold in 0.3f32..0.7,
            seed in any::<u64>(),
        ) {
            let plan = WindowPlan::new(shape, window, overlap).expect("valid");
            let labels: Vec<u16> = (0..k as u16).map(|c| 10 + c).collect();
            let outputs = random_outputs(&plan, k, seed, 0.5, 0.5);
            let options = BlendOptions { threshold, precision };
            let order: Vec<usize> = (0..plan.len()).collect();
            let (got, probs, bound) = blend(&plan, &labels, options, &outputs, &order);
            prop_assert_eq!(got.dim(), (shape[0], shape[1], shape[2]));
            let exact = reference(&plan, k, &outputs);
            check_against_reference(&plan, &labels, threshold, &got, &probs, bound, &exact);
        }
    }
}
