//! The pipeline around the network (stages 2 to 11 of `docs/pipeline.md`):
//! the reference prepared for the task encoder ([`prepare_reference`]), and
//! the query taken through the sliding window and back to its own grid
//! ([`segment_with`]).
//!
//! The network is not called here: [`segment_with`] takes the per-window
//! work as a function (a normalised window in, `K` logit maps out). The
//! ONNX engine ([`Model::segment`](crate::engine::Model::segment), feature
//! `onnx`) is one such function; bring your own (another runtime, a GPU
//! service, a classical method) and get the same orientation handling,
//! resampling, normalisation, Gaussian blending, labels and way back to the
//! query's grid. Needs no `std`.
//!
//! ```
//! use iris_core::pipeline::{SegmentOptions, segment_with};
//! use iris_core::preprocess::IntensityPolicy;
//! use iris_core::volume::{Affine, Image};
//!
//! // A 32^3 query of 4 mm voxels, bright in its lower half (d < 16).
//! let data = (0..32 * 32 * 32).map(|i| if i < 16 * 32 * 32 { 100.0 } else { 0.0 }).collect();
//! let query = Image::from_vec([32; 3], Affine::from_spacing([4.0; 3]), data)?;
//! // "The network": one class, bright voxels (normalised > 0) are in.
//! let threshold_network = |window: &ndarray::Array3<f32>| {
//!     Ok(window.iter().map(|&x| if x > 0.0 { 8.0 } else { -8.0 }).collect())
//! };
//! let seg = segment_with(
//!     &query,
//!     4.0,          // the network's spacing, mm
//!     [16, 16, 16], // its window, voxels
//!     &[5],         // label values of its classes
//!     IntensityPolicy::MR,
//!     &SegmentOptions::default(),
//!     threshold_network,
//! )?;
//! assert_eq!(seg.labels.shape(), [32, 32, 32]);
//! assert_eq!(seg.labels.count(5), 16 * 32 * 32);
//! assert_eq!(seg.windows, 27); // 3 x 3 x 3 windows, half overlapping
//! # Ok::<(), iris_core::Error>(())
//! ```

use alloc::string::String;
use alloc::sync::Arc;
use alloc::vec::Vec;
use alloc::{format, vec};

use ndarray::{Array3, Axis, s};

use crate::error::{Error, Result};
use crate::labels::{check_class_labels, keep_largest_components};
use crate::preprocess::{
    IntensityPolicy, LabelSelection, Reorientation, crop_or_pad, reference_crop, resample_image,
    resample_labels, target_geometry,
};
use crate::volume::{Image, LabelMap, MAX_VOXELS, checked_voxel_count, try_filled};
use crate::window::{BlendOptions, Blender, WindowPlan};

/// What one input may ask of the pipeline, checked before any large
/// allocation or any window runs: a header cannot make a library inside a
/// viewer take more memory or time than its caller allows. Exceeding a limit
/// is [`Error::TooLarge`] naming what was needed.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Limits {
    /// Most bytes the pipeline may hold at once for one call: the volumes it
    /// makes (canonical copy, resampled volume, blending, labels and
    /// probability maps), estimated from the geometry before allocating.
    /// The network's own working memory is not counted. Default
    /// [`DEFAULT_MEMORY_BUDGET`] (4 GiB).
    pub memory_bytes: u64,
    /// Most sliding windows one query may need. Default
    /// [`DEFAULT_MAX_WINDOWS`].
    pub windows: usize,
}

/// [`Limits::memory_bytes`] by default: 4 GiB, what a viewer can lend one
/// segmentation (a 512 x 512 x 300 CT with ten classes at 1.5 mm needs
/// about 1.1 GiB; a 2000-slice whole-body CT needs a larger budget).
pub const DEFAULT_MEMORY_BUDGET: u64 = 4 << 30;

/// [`Limits::windows`] by default: 10 000 windows (a whole-body CT at 1.5 mm
/// takes about 500 windows of 128^3).
pub const DEFAULT_MAX_WINDOWS: usize = 10_000;

impl Default for Limits {
    fn default() -> Self {
        Limits {
            memory_bytes: DEFAULT_MEMORY_BUDGET,
            windows: DEFAULT_MAX_WINDOWS,
        }
    }
}

impl Limits {
    /// [`Error::TooLarge`] when `bytes` (a `u128` sum that cannot overflow)
    /// exceed the memory budget.
    fn check_memory(&self, what: &'static str, bytes: u128, detail: &str) -> Result<()> {
        if bytes <= u128::from(self.memory_bytes) {
            return Ok(());
        }
        Err(Error::TooLarge {
            what,
            detail: format!(
                "{detail} needs about {} of memory, over the budget of {} \
                 (Limits::memory_bytes)",
                size_text(bytes),
                size_text(u128::from(self.memory_bytes))
            ),
        })
    }

    /// [`Error::TooLarge`] when `plan` has more windows than allowed.
    fn check_windows(&self, plan: &WindowPlan, spacing_mm: f64) -> Result<()> {
        if plan.len() <= self.windows {
            return Ok(());
        }
        Err(Error::TooLarge {
            what: "sliding windows",
            detail: format!(
                "the query needs {} windows ({:?} per axis over {:?} voxels at {spacing_mm} \
                 mm), over the limit of {} (Limits::windows)",
                plan.len(),
                plan.grid(),
                plan.volume_shape(),
                self.windows
            ),
        })
    }
}

/// `bytes` for messages: in GiB, MiB or KiB with two decimals, in bytes
/// below 1 KiB.
pub(crate) fn size_text(bytes: u128) -> String {
    match bytes {
        0..1024 => format!("{bytes} bytes"),
        1024..0x10_0000 => format!("{:.2} KiB", bytes as f64 / 1024.0),
        0x10_0000..0x4000_0000 => format!("{:.2} MiB", bytes as f64 / f64::from(1u32 << 20)),
        _ => format!("{:.2} GiB", bytes as f64 / f64::from(1u32 << 30)),
    }
}

/// Voxels of a shape, without overflow.
fn voxels(shape: [usize; 3]) -> u128 {
    shape.iter().map(|&n| n as u128).product()
}

/// Settings of a segmentation: of [`segment_with`] and of the engine's
/// [`Model::segment`](crate::engine::Model::segment).
#[derive(Clone)]
pub struct SegmentOptions {
    /// How to normalise the query's intensities; `None` uses the policy
    /// recorded in the task embedding (that of its reference). Read by
    /// `Model::segment`; [`segment_with`] takes the policy as an argument.
    pub intensity: Option<IntensityPolicy>,
    /// Overlap of neighbouring windows, a fraction of the window in `[0, 1)`. Default 0.5.
    pub overlap: f64,
    /// Probability the best class needs to label a voxel, in `(0, 1]`. Default 0.5.
    pub threshold: f32,
    /// Keep only the largest 26-connected component of each label. Default true.
    pub largest_component: bool,
    /// Also return the blended probability map of every class. Default false.
    pub probabilities: bool,
    /// Most classes per decoder run; a larger task is decoded in groups
    /// (the encoder still runs once per window). `None` (the default): the
    /// manifest's `classes_per_forward`, else all classes in one run. Read
    /// by `Model::segment`; with [`segment_with`] the network decides.
    pub classes_per_forward: Option<usize>,
    /// Called after every window with the windows done so far and the total.
    pub progress: Option<Arc<dyn Fn(Progress) + Send + Sync>>,
    /// Asked before every window (and before the work after the last one)
    /// whether to stop: `true` ends the run with [`Error::Cancelled`],
    /// nothing half-done is returned. For a viewer's "cancel" button: keep
    /// it cheap (read a flag).
    pub cancel: Option<Arc<dyn Fn() -> bool + Send + Sync>>,
    /// Memory and windows one query may ask for (see [`Limits`]).
    pub limits: Limits,
}

impl Default for SegmentOptions {
    fn default() -> Self {
        SegmentOptions {
            intensity: None,
            overlap: 0.5,
            threshold: crate::labels::DEFAULT_THRESHOLD,
            largest_component: true,
            probabilities: false,
            classes_per_forward: None,
            progress: None,
            cancel: None,
            limits: Limits::default(),
        }
    }
}

impl core::fmt::Debug for SegmentOptions {
    fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        f.debug_struct("SegmentOptions")
            .field("intensity", &self.intensity)
            .field("overlap", &self.overlap)
            .field("threshold", &self.threshold)
            .field("largest_component", &self.largest_component)
            .field("probabilities", &self.probabilities)
            .field("classes_per_forward", &self.classes_per_forward)
            .field("progress", &self.progress.as_ref().map(|_| "Fn(Progress)"))
            .field("cancel", &self.cancel.as_ref().map(|_| "Fn() -> bool"))
            .field("limits", &self.limits)
            .finish()
    }
}

impl SegmentOptions {
    /// [`Error::Cancelled`] if [`cancel`](Self::cancel) says to stop.
    ///
    /// # Errors
    /// [`Error::Cancelled`] when the caller asked to stop.
    pub fn check_cancel(&self) -> Result<()> {
        match &self.cancel {
            Some(cancel) if cancel() => Err(Error::Cancelled),
            _ => Ok(()),
        }
    }
}

/// How far a segmentation is: windows decoded so far, out of `total`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Progress {
    /// Windows decoded so far (1 to `total`).
    pub done: usize,
    /// Windows in the whole volume.
    pub total: usize,
}

/// The result of a segmentation ([`segment_with`], `Model::segment`), on
/// the query's own grid.
#[derive(Clone, Debug, PartialEq)]
pub struct Segmentation {
    /// Labels on the query's original grid and affine: each voxel holds the
    /// label value of its class, 0 for background.
    pub labels: LabelMap,
    /// The label value of each class, in the embedding's order.
    pub classes: Vec<u32>,
    /// With [`SegmentOptions::probabilities`]: per class (same order), the
    /// blended probability in `[0, 1]` on the original grid.
    pub probabilities: Option<Vec<Image>>,
    /// Number of windows the query was decoded in.
    pub windows: usize,
}

/// A reference ready for the encoder and the task encoder (made by
/// [`prepare_reference`]).
#[derive(Clone, Debug)]
pub struct ReferenceInput {
    /// The patch-sized crop at the model's spacing, normalised (z-scored
    /// over the crop, padding included), `[D, H, W]` = the patch.
    pub image: Image,
    /// One binary mask per class, `[K, D, H, W]` in C order, on the crop's grid.
    pub masks: Vec<f32>,
    /// The intensity policy applied (given, or detected on the reference).
    pub intensity: IntensityPolicy,
}

/// Prepares a reference for task encoding: canonical orientation, resampling
/// to `spacing_mm` (trilinear image, nearest labels), the `patch` crop
/// centred on the bounding box of all `class_labels` together, intensity
/// normalisation of the crop with `intensity` (detected on the raw
/// reference when `None`), and one mask per class.
///
/// This is what [`Model::encode_task`](crate::engine::Model::encode_task) feeds
/// the graphs; it is public so that other runtimes of the same model
/// (`iris-train`'s in-context tuning) see references exactly as the engine
/// does.
///
/// # Errors
/// [`Error::InvalidArgument`] for invalid class labels (none, 0, repeated),
/// a label that vanishes at the model's spacing, or one that lies outside
/// the crop; [`Error::EmptyMask`] for a label absent from `labels`;
/// [`Error::NonFinite`] for NaN or infinite voxels; grid mismatches between
/// image and labels as [`Volume::ensure_same_grid`](crate::volume::Volume::ensure_same_grid);
/// [`Error::TooLarge`] when preparing would take more memory than
/// `limits` allow (checked before any large allocation).
pub fn prepare_reference(
    reference: &Image,
    labels: &LabelMap,
    class_labels: &[u16],
    spacing_mm: f64,
    patch: [usize; 3],
    intensity: Option<IntensityPolicy>,
    limits: &Limits,
) -> Result<ReferenceInput> {
    check_class_labels(class_labels)?;
    reference.ensure_finite("reference image")?;
    reference.ensure_same_grid(labels, "reference label map vs reference image")?;
    let present = labels.labels_present();
    if let Some(&label) = class_labels
        .iter()
        .find(|l| present.binary_search(l).is_err())
    {
        return Err(Error::EmptyMask {
            label: label.into(),
        });
    }
    let intensity = match intensity {
        Some(policy) => {
            policy.validate()?;
            policy
        }
        None => IntensityPolicy::detect(reference)?,
    };
    let reorientation = Reorientation::plan(reference.geometry())?;
    let grid = target_geometry(reorientation.canonical_geometry(), spacing_mm)?;
    // Canonical copies of image (f32) and labels (u16), both resampled.
    let source = voxels(reference.shape());
    let target = voxels(grid.shape());
    limits.check_memory(
        "reference",
        6 * source + 6 * target,
        &format!(
            "a reference of {:?} voxels, resampled to {:?} at {spacing_mm} mm,",
            reference.shape(),
            grid.shape()
        ),
    )?;
    let image = reorientation.apply(reference)?;
    let labels = reorientation.apply(labels)?;
    let image = resample_image(&image, &grid)?;
    let resampled = resample_labels(&labels, &grid)?;
    let kept = resampled.labels_present();
    if let Some(&label) = class_labels.iter().find(|l| kept.binary_search(l).is_err()) {
        return Err(Error::invalid(
            "reference label",
            format!(
                "label {label} has {} voxel(s) in the reference but none once resampled to the \
                 model's {spacing_mm} mm spacing: it is too small for this model",
                labels.count(label)
            ),
        ));
    }
    let crop = reference_crop(
        &image,
        &resampled,
        &LabelSelection::Values(class_labels),
        patch,
    )?;
    let values = crop_or_pad(&resampled, crop.start, patch, 0)?;
    let voxels = checked_voxel_count(patch)?;
    let total = voxels
        .checked_mul(class_labels.len())
        .filter(|&n| n <= MAX_VOXELS)
        .ok_or_else(|| Error::TooLarge {
            what: "reference masks",
            detail: format!("{} classes x {patch:?} voxels", class_labels.len()),
        })?;
    // slot[label] = class index + 1 (0: not a class).
    let mut slot = vec![0usize; usize::from(u16::MAX) + 1];
    for (k, &label) in class_labels.iter().enumerate() {
        slot[usize::from(label)] = k + 1;
    }
    let mut masks = try_filled(total, 0f32, "reference masks")?;
    let mut counts = vec![0usize; class_labels.len()];
    for (i, &v) in values.data().iter().enumerate() {
        if let Some(k) = slot[usize::from(v)].checked_sub(1) {
            masks[k * voxels + i] = 1.0;
            counts[k] += 1;
        }
    }
    if let Some(k) = counts.iter().position(|&c| c == 0) {
        return Err(Error::invalid(
            "reference label",
            format!(
                "label {} lies outside the {patch:?}-voxel reference crop centred on the labels \
                 {class_labels:?} (together they span voxels {:?} to {:?} at {spacing_mm} mm); \
                 encode it from its own reference",
                class_labels[k], crop.bbox.min, crop.bbox.max
            ),
        ));
    }
    let mut image = crop.image;
    intensity.normalize_in_place(&mut image)?;
    Ok(ReferenceInput {
        image,
        masks,
        intensity,
    })
}

/// A query ready for the sliding window.
pub(crate) struct QueryInput {
    /// The query in canonical orientation at the model's spacing,
    /// normalised.
    pub image: Image,
    /// How to take results back to the query's own grid.
    pub reorientation: Reorientation,
    /// The windows over `image`.
    pub plan: WindowPlan,
}

/// What a query will hold besides the input: `classes` maps blended, and
/// with `probabilities` a map per class on both grids.
#[derive(Clone, Copy, Debug)]
pub(crate) struct QueryOutputs {
    pub classes: usize,
    pub probabilities: bool,
}

/// Prepares a query: canonical orientation, resampling to `spacing_mm`
/// (trilinear), normalisation of the whole volume with `intensity`, and
/// windows of `patch` overlapping by `overlap`; before any of it, the
/// windows and the memory that `outputs` will need are checked against
/// `limits`.
///
/// # Errors
/// [`Error::NonFinite`] for NaN or infinite voxels; [`Error::TooLarge`] for
/// volumes or plans past the limits; an invalid `overlap` as
/// [`WindowPlan::new`].
pub(crate) fn prepare_query(
    query: &Image,
    spacing_mm: f64,
    patch: [usize; 3],
    intensity: IntensityPolicy,
    overlap: f64,
    outputs: QueryOutputs,
    limits: &Limits,
) -> Result<QueryInput> {
    query.ensure_finite("query image")?;
    if !overlap.is_finite() {
        return Err(Error::invalid(
            "overlap",
            format!("{overlap} is not a fraction in [0, 1)"),
        ));
    }
    let reorientation = Reorientation::plan(query.geometry())?;
    let grid = target_geometry(reorientation.canonical_geometry(), spacing_mm)?;
    let plan = WindowPlan::new(grid.shape(), patch, overlap as f32)?;
    limits.check_windows(&plan, spacing_mm)?;
    limits.check_memory(
        "query",
        query_bytes(query.shape(), &plan, outputs),
        &format!(
            "a query of {:?} voxels, resampled to {:?} at {spacing_mm} mm with {} class(es),",
            query.shape(),
            grid.shape(),
            outputs.classes
        ),
    )?;
    let canonical_query = reorientation.apply(query)?;
    let mut image = resample_image(&canonical_query, &grid)?;
    drop(canonical_query);
    intensity.normalize_in_place(&mut image)?;
    Ok(QueryInput {
        image,
        reorientation,
        plan,
    })
}

/// The most bytes a query of `source` voxels holds at once on its way
/// through `plan` (see `docs/memory.md` for the blending term): the
/// canonical copy (f32) and the resampled volume (f32), the blender's live
/// rows (at most a window deep, 16 bits per class) and its label map, the
/// labels on the way back (u16, three times), and with probabilities a map
/// per class on both grids (f32).
fn query_bytes(source: [usize; 3], plan: &WindowPlan, outputs: QueryOutputs) -> u128 {
    let source = voxels(source);
    let [d, h, w] = plan.volume_shape();
    let target = voxels([d, h, w]);
    let k = outputs.classes as u128;
    let depth = plan.window_shape()[0].min(d) as u128;
    let blending = 2 * k * depth * (h as u128) * (w as u128);
    let probabilities = if outputs.probabilities {
        4 * k * (target + source)
    } else {
        0
    };
    4 * source + 4 * target + blending + 2 * target + 2 * target + 4 * source + probabilities
}

/// The logistic function, `1 / (1 + e^-x)`.
fn sigmoid(x: f32) -> f32 {
    1.0 / (1.0 + libm::expf(-x))
}

/// Segments `query` with a network given as `run`: a normalised window
/// (`[D, H, W]` = `patch`, padding 0) to the `K` logit maps of
/// `class_labels`, `[K, D, H, W]` in C order.
///
/// Canonical orientation, resampling to `spacing_mm` (trilinear),
/// normalisation of the whole volume with `intensity`, windows of `patch`
/// with `options.overlap`, sigmoid, Gaussian blending, threshold + argmax,
/// optionally the largest component per label, then nearest-neighbour
/// resampling to the canonical source grid and the reorientation undone.
/// Probabilities, when asked for, go back by trilinear resampling.
///
/// # Errors
/// [`Error::NonFinite`] for NaN or infinite query voxels or NaN logits;
/// [`Error::TooLarge`] for volumes, plans or probability maps past the
/// limits; whatever `run` returns; invalid options as
/// [`WindowPlan::new`] and [`Blender::new`].
pub fn segment_with(
    query: &Image,
    spacing_mm: f64,
    patch: [usize; 3],
    class_labels: &[u16],
    intensity: IntensityPolicy,
    options: &SegmentOptions,
    mut run: impl FnMut(&Array3<f32>) -> Result<Vec<f32>>,
) -> Result<Segmentation> {
    let QueryInput {
        image,
        reorientation,
        plan,
    } = prepare_query(
        query,
        spacing_mm,
        patch,
        intensity,
        options.overlap,
        QueryOutputs {
            classes: class_labels.len(),
            probabilities: options.probabilities,
        },
        &options.limits,
    )?;
    let grid = *image.geometry();
    let blend = BlendOptions {
        threshold: options.threshold,
        ..BlendOptions::default()
    };
    let classes = class_labels.len();
    let [d, h, w] = grid.shape();
    let mut maps = if options.probabilities {
        classes
            .checked_mul(grid.len())
            .filter(|&n| n <= MAX_VOXELS)
            .ok_or_else(|| Error::TooLarge {
                what: "probability maps",
                detail: format!("{classes} classes x {:?} voxels", grid.shape()),
            })?;
        (0..classes)
            .map(|_| {
                let zeros = try_filled(grid.len(), 0.0, "probability maps")?;
                Array3::from_shape_vec((d, h, w), zeros)
                    .map_err(|e| Error::invalid("probability maps", format!("{e}")))
            })
            .collect::<Result<Vec<_>>>()?
    } else {
        Vec::new()
    };
    let mut blender = Blender::new(&plan, class_labels, blend)?;
    if options.probabilities {
        let maps = &mut maps;
        blender = blender.with_probability_sink(move |z, rows, block| {
            for (map, class) in maps.iter_mut().zip(block.axis_iter(Axis(0))) {
                map.slice_mut(s![z, rows.clone(), ..]).assign(&class);
            }
        })?;
    }
    let total = plan.len();
    for window in plan.windows() {
        options.check_cancel()?;
        let input = plan.extract(image.data().view(), window.index, 0.0)?;
        let mut logits = run(&input)?;
        let nan = logits.iter().filter(|v| v.is_nan()).count();
        if nan > 0 {
            return Err(Error::NonFinite {
                what: "decoder logits",
                count: nan,
            });
        }
        logits.iter_mut().for_each(|v| *v = sigmoid(*v));
        blender.add(window.index, &logits)?;
        if let Some(progress) = &options.progress {
            progress(Progress {
                done: window.index + 1,
                total,
            });
        }
    }
    options.check_cancel()?;
    drop(image);
    let mut labels = LabelMap::with_geometry(blender.finish()?, grid)?;
    if options.largest_component {
        keep_largest_components(labels.data_mut())?;
    }
    let source = reorientation.canonical_geometry();
    let labels = reorientation.undo(&resample_labels(&labels, source)?)?;
    let probabilities = if options.probabilities {
        let back = maps
            .into_iter()
            .map(|map| {
                let map = Image::with_geometry(map, grid)?;
                reorientation.undo(&resample_image(&map, source)?)
            })
            .collect::<Result<Vec<_>>>()?;
        Some(back)
    } else {
        None
    };
    Ok(Segmentation {
        labels,
        classes: class_labels.iter().map(|&l| u32::from(l)).collect(),
        probabilities,
        windows: total,
    })
}

// On real volumes (read with the `nifti` feature).
#[cfg(all(test, feature = "nifti"))]
mod tests {
    use alloc::string::ToString;
    use std::sync::Mutex;

    use ndarray::{Array4, s};

    use super::*;
    use crate::labels::probabilities_to_labels;
    use crate::preprocess::{Reorientation, canonical};
    use crate::test_support::colin;
    use crate::volume::Affine;

    const SPACING: f64 = 6.0;
    const PATCH: [usize; 3] = [16, 16, 16];
    const LABELS: [u16; 3] = [7, 300, 2];

    /// A network whose logits depend on the voxel's own intensity only: each
    /// class owns a band of normalised intensities (+6 inside, -6 outside),
    /// so every probability is 0.0025 or 0.9975 and no decision is near a
    /// tie or the threshold.
    fn band_logit(k: usize, x: f32) -> f32 {
        let inside = match k {
            0 => x < -0.5,
            1 => (0.2..1.0).contains(&x),
            _ => x > 1.5,
        };
        if inside { 6.0 } else { -6.0 }
    }

    /// A smooth pointwise network, for probabilities.
    fn smooth_logit(k: usize, x: f32) -> f32 {
        (k as f32 + 1.0) * x - 0.3 * k as f32
    }

    fn network(logit: fn(usize, f32) -> f32) -> impl FnMut(&Array3<f32>) -> Result<Vec<f32>> {
        move |window: &Array3<f32>| {
            Ok((0..LABELS.len())
                .flat_map(|k| window.iter().map(move |&x| logit(k, x)))
                .collect())
        }
    }

    /// What a pointwise network gives on `image` (at the model spacing,
    /// canonical): probabilities `[K, D, H, W]` and labels, without windows.
    fn pointwise(image: &Image, logit: fn(usize, f32) -> f32) -> (Array4<f32>, LabelMap) {
        let mut x = image.clone();
        IntensityPolicy::MR
            .normalize_in_place(&mut x)
            .expect("normalise");
        let [d, h, w] = x.shape();
        let probs = Array4::from_shape_fn((LABELS.len(), d, h, w), |(k, i, j, l)| {
            sigmoid(logit(k, x.data()[[i, j, l]]))
        });
        let labels = probabilities_to_labels(probs.view(), &LABELS, 0.5).expect("labels");
        let labels = LabelMap::with_geometry(labels, *image.geometry()).expect("grid");
        (probs, labels)
    }

    fn options(probabilities: bool, largest_component: bool) -> SegmentOptions {
        SegmentOptions {
            probabilities,
            largest_component,
            ..SegmentOptions::default()
        }
    }

    fn run(query: &Image, options: &SegmentOptions, logit: fn(usize, f32) -> f32) -> Segmentation {
        segment_with(
            query,
            SPACING,
            PATCH,
            &LABELS,
            IntensityPolicy::MR,
            options,
            network(logit),
        )
        .expect("segments")
    }

    /// Colin27 resampled to the model's spacing: already canonical, so the
    /// pipeline's own resampling and reorientation are the identity.
    fn colin_at_model_spacing() -> Option<Image> {
        let (image, _) = colin()?;
        let grid = target_geometry(image.geometry(), SPACING).expect("grid");
        Some(resample_image(&image, &grid).expect("resample"))
    }

    #[test]
    fn windows_blend_to_the_pointwise_answer() {
        let Some(query) = colin_at_model_spacing() else {
            return;
        };
        // The whole head (many overlapping windows) and a piece smaller than
        // one window (padded, centred).
        let small =
            crate::preprocess::crop_or_pad(&query, [10, 12, 9], [5, 7, 6], 0.0).expect("small");
        for (image, many) in [(&query, true), (&small, false)] {
            let plan = WindowPlan::new(image.shape(), PATCH, 0.5).expect("plan");
            let (_, labels) = pointwise(image, band_logit);
            let got = run(image, &options(false, false), band_logit);
            assert_eq!(got.windows, plan.len());
            assert_eq!(got.windows > 1, many, "{:?}", image.shape());
            assert_eq!(got.classes, [7, 300, 2]);
            assert_eq!(got.labels, labels, "labels of {:?}", image.shape());
            if many {
                assert_eq!(
                    got.labels.labels_present(),
                    [2, 7, 300],
                    "every class appears"
                );
            }
            assert!(got.probabilities.is_none());

            let (probs_smooth, _) = pointwise(image, smooth_logit);
            let got = run(image, &options(true, false), smooth_logit);
            let maps = got.probabilities.expect("asked for");
            assert_eq!(maps.len(), 3);
            for (k, map) in maps.iter().enumerate() {
                assert_eq!(map.geometry(), image.geometry());
                let worst = map
                    .data()
                    .iter()
                    .zip(probs_smooth.index_axis(Axis(0), k))
                    .map(|(a, b)| (a - b).abs())
                    .fold(0.0f32, f32::max);
                // Blending stores running means in 16 bits: c / 65535, c <= 27.
                assert!(worst < 5e-4, "class {k}: {worst}");
            }
        }
    }

    #[test]
    fn labels_return_to_the_querys_own_grid_and_orientation() {
        let Some((canonical_query, _)) = colin() else {
            return;
        };
        // The same head stored sideways: d <- w (reversed), w <- d.
        let [_, _, n] = canonical_query.shape();
        let mut view = canonical_query.data().view().permuted_axes([2, 1, 0]);
        view.invert_axis(Axis(0));
        let to_canonical = Affine([
            [0.0, 0.0, 1.0, 0.0],
            [0.0, 1.0, 0.0, 0.0],
            [-1.0, 0.0, 0.0, (n - 1) as f64],
            [0.0, 0.0, 0.0, 1.0],
        ]);
        let affine = canonical_query.geometry().affine().compose(&to_canonical);
        let sideways = Image::new(view.to_owned(), affine).expect("sideways");
        assert!(
            !Reorientation::plan(sideways.geometry())
                .expect("plan")
                .is_identity()
        );

        let straight = run(&canonical_query, &options(false, true), band_logit);
        let turned = run(&sideways, &options(false, true), band_logit);
        assert_eq!(straight.labels.geometry(), canonical_query.geometry());
        assert_eq!(turned.labels.geometry(), sideways.geometry());
        let (back, _) = canonical(&turned.labels).expect("canonical");
        assert_eq!(back, straight.labels);

        // Back on the 1 mm grid: the model-grid labels, nearest-resampled.
        let grid = target_geometry(canonical_query.geometry(), SPACING).expect("grid");
        let at_model = resample_image(&canonical_query, &grid).expect("resample");
        let (_, mut expected) = pointwise(&at_model, band_logit);
        keep_largest_components(expected.data_mut()).expect("lcc");
        let expected = resample_labels(&expected, canonical_query.geometry()).expect("back");
        assert_eq!(straight.labels, expected);
    }

    #[test]
    fn largest_component_keeps_one_component_per_label() {
        let Some(query) = colin_at_model_spacing() else {
            return;
        };
        let all = run(&query, &options(false, false), band_logit);
        let kept = run(&query, &options(false, true), band_logit);
        let mut expected = all.labels.data().clone();
        let summary = keep_largest_components(&mut expected).expect("lcc");
        assert!(summary.iter().any(|c| c.components > 1 && c.removed > 0));
        assert_eq!(kept.labels.data(), &expected);
    }

    #[test]
    fn progress_counts_every_window() {
        let Some(query) = colin_at_model_spacing() else {
            return;
        };
        let seen = Arc::new(Mutex::new(Vec::new()));
        let log = Arc::clone(&seen);
        let options = SegmentOptions {
            progress: Some(Arc::new(move |p: Progress| {
                log.lock().expect("log").push((p.done, p.total))
            })),
            ..SegmentOptions::default()
        };
        let got = run(&query, &options, band_logit);
        let seen = seen.lock().expect("log").clone();
        let total = got.windows;
        assert_eq!(seen, (1..=total).map(|d| (d, total)).collect::<Vec<_>>());
    }

    /// `cancel` is asked before every window and after the last: once it
    /// says stop, no further window runs and the run ends in
    /// `Error::Cancelled`; asked too late (after the last window) it still
    /// returns nothing.
    #[test]
    fn cancel_stops_before_the_next_window() {
        let data = (0..40 * 40 * 40).map(|i| (i % 7) as f32).collect();
        let query = Image::from_vec([40; 3], Affine::from_spacing([SPACING; 3]), data)
            .expect("valid image");
        let calls = Arc::new(Mutex::new(0usize));
        let stop_after = |windows: usize| {
            let calls = Arc::clone(&calls);
            *calls.lock().expect("calls") = 0;
            let cancel: Arc<dyn Fn() -> bool + Send + Sync> =
                Arc::new(move || *calls.lock().expect("calls") >= windows);
            SegmentOptions {
                cancel: Some(cancel),
                ..SegmentOptions::default()
            }
        };
        let counting = |window: &Array3<f32>| {
            *calls.lock().expect("calls") += 1;
            Ok(vec![-1.0; LABELS.len() * window.len()])
        };
        let go = |options: &SegmentOptions| {
            segment_with(
                &query,
                SPACING,
                PATCH,
                &LABELS,
                IntensityPolicy::MR,
                options,
                counting,
            )
        };
        let all = go(&SegmentOptions::default()).expect("segments").windows;
        assert!(all > 3);
        for stop in [0, 2, all] {
            let err = go(&stop_after(stop)).expect_err("cancelled");
            assert!(matches!(err, Error::Cancelled), "{err}");
            assert_eq!(*calls.lock().expect("calls"), stop, "windows run");
        }
        assert!(go(&stop_after(all + 1)).is_ok());
    }

    /// A header can ask for hours or for gigabytes (an 80^3 volume whose
    /// pixdim says 80 mm is 1067^3 voxels at 6 mm): refused up front with
    /// what it needed, before the network runs once or anything large is
    /// allocated.
    #[test]
    fn limits_refuse_what_a_header_asks_before_any_work() {
        let huge = Image::from_vec(
            [80; 3],
            Affine::from_spacing([80.0; 3]),
            vec![1.0; 80 * 80 * 80],
        )
        .expect("valid image");
        let never = |_: &Array3<f32>| -> Result<Vec<f32>> { panic!("no window may run") };
        let go = |image: &Image, limits: Limits| {
            let options = SegmentOptions {
                limits,
                ..SegmentOptions::default()
            };
            segment_with(
                image,
                SPACING,
                PATCH,
                &LABELS,
                IntensityPolicy::MR,
                &options,
                never,
            )
        };
        let err = go(&huge, Limits::default())
            .expect_err("too many windows")
            .to_string();
        assert!(
            err.contains("2352637 windows") && err.contains("limit of 10000"),
            "{err}"
        );
        // The same volume is refused for its memory when windows are free.
        let windows_free = Limits {
            windows: usize::MAX,
            ..Limits::default()
        };
        let err = go(&huge, windows_free).expect_err("too large").to_string();
        assert!(
            err.contains("[1067, 1067, 1067]") && err.contains("GiB"),
            "{err}"
        );
        assert!(err.contains("budget of 4.00 GiB"), "{err}");

        // A small query against tight limits: both checks name the limit.
        let small = Image::from_vec(
            [40; 3],
            Affine::from_spacing([SPACING; 3]),
            vec![0.5; 64_000],
        )
        .expect("valid image");
        let err = go(
            &small,
            Limits {
                windows: 3,
                ..Limits::default()
            },
        )
        .expect_err("windows")
        .to_string();
        assert!(
            err.contains("64 windows") && err.contains("limit of 3"),
            "{err}"
        );
        let err = go(
            &small,
            Limits {
                memory_bytes: 1 << 20,
                ..Limits::default()
            },
        )
        .expect_err("memory")
        .to_string();
        assert!(
            err.contains("needs about 1.12 MiB of memory, over the budget of 1.00 MiB"),
            "{err}"
        );

        // The reference is bounded the same way.
        let labels = LabelMap::from_vec(
            [80; 3],
            Affine::from_spacing([80.0; 3]),
            vec![7; 80 * 80 * 80],
        )
        .expect("valid labels");
        let err = prepare_reference(
            &huge,
            &labels,
            &[7],
            SPACING,
            PATCH,
            None,
            &Limits::default(),
        )
        .expect_err("too large")
        .to_string();
        assert!(err.contains("reference") && err.contains("GiB"), "{err}");
    }

    #[test]
    fn bad_queries_options_and_networks_are_refused() {
        let Some(query) = colin_at_model_spacing() else {
            return;
        };
        let go = |image: &Image, options: &SegmentOptions, logit: fn(usize, f32) -> f32| {
            segment_with(
                image,
                SPACING,
                PATCH,
                &LABELS,
                IntensityPolicy::MR,
                options,
                network(logit),
            )
        };
        let mut nan = query.clone();
        nan.data_mut()[[3, 4, 5]] = f32::NAN;
        assert!(matches!(
            go(&nan, &SegmentOptions::default(), band_logit),
            Err(Error::NonFinite {
                what: "query image",
                count: 1
            })
        ));
        for overlap in [1.0, -0.1, f64::NAN] {
            let options = SegmentOptions {
                overlap,
                ..SegmentOptions::default()
            };
            let err = go(&query, &options, band_logit).expect_err("overlap");
            assert!(err.to_string().contains("overlap"), "{err}");
        }
        let options = SegmentOptions {
            threshold: 0.0,
            ..SegmentOptions::default()
        };
        let err = go(&query, &options, band_logit).expect_err("threshold");
        assert!(err.to_string().contains("threshold"), "{err}");
        assert!(matches!(
            go(&query, &SegmentOptions::default(), |_, _| f32::NAN),
            Err(Error::NonFinite {
                what: "decoder logits",
                ..
            })
        ));
        let short = segment_with(
            &query,
            SPACING,
            PATCH,
            &LABELS,
            IntensityPolicy::MR,
            &SegmentOptions::default(),
            |_| Ok(vec![0.0; 10]),
        );
        assert!(
            matches!(short, Err(Error::ShapeMismatch { .. })),
            "{short:?}"
        );
        let failing = segment_with(
            &query,
            SPACING,
            PATCH,
            &LABELS,
            IntensityPolicy::MR,
            &SegmentOptions::default(),
            |_| Err(Error::invalid("network", "broken")),
        );
        assert!(failing.is_err_and(|e| e.to_string() == "invalid network: broken"));
    }

    /// AAL labels 77 and 78 (left and right thalamus) fit one 96 mm crop.
    const NEAR: [u16; 2] = [77, 78];

    #[test]
    fn reference_masks_are_one_per_class_on_the_normalised_crop() {
        let Some((image, labels)) = colin() else {
            return;
        };
        let input = prepare_reference(
            &image,
            &labels,
            &NEAR,
            SPACING,
            PATCH,
            None,
            &Limits::default(),
        )
        .expect("prepared");
        assert_eq!(input.intensity, IntensityPolicy::MR, "a T1 is not CT");
        assert_eq!(input.image.shape(), PATCH);
        assert_eq!(input.image.geometry().spacing(), [SPACING; 3]);
        let n = input.image.data().len() as f64;
        let mean = input
            .image
            .data()
            .iter()
            .map(|&v| f64::from(v))
            .sum::<f64>()
            / n;
        let var = input
            .image
            .data()
            .iter()
            .map(|&v| (f64::from(v) - mean).powi(2))
            .sum::<f64>()
            / n;
        assert!(
            mean.abs() < 1e-4 && (var - 1.0).abs() < 1e-3,
            "{mean} {var}"
        );

        // The masks are the labels of the resampled map at the crop's voxels.
        let grid = target_geometry(image.geometry(), SPACING).expect("grid");
        let resampled = resample_labels(&labels, &grid).expect("labels");
        let start = grid
            .world_to_voxel(input.image.geometry().voxel_to_world([0.0; 3]))
            .map(|v| v.round() as isize);
        let voxels = input.image.data().len();
        assert_eq!(input.masks.len(), 2 * voxels);
        let (mut seen, mut total) = ([0usize; 2], [0usize; 2]);
        for ((d, h, w), _) in input.image.data().indexed_iter() {
            let i = (d * PATCH[1] + h) * PATCH[2] + w;
            let at = [d, h, w].map(|v| v as isize);
            let source: [isize; 3] = core::array::from_fn(|a| start[a] + at[a]);
            let inside = source
                .iter()
                .zip(grid.shape())
                .all(|(&v, n)| v >= 0 && (v as usize) < n);
            let value = if inside {
                resampled.data()[source.map(|v| v as usize)]
            } else {
                0
            };
            for (k, &label) in NEAR.iter().enumerate() {
                let m = input.masks[k * voxels + i];
                assert!(m == 0.0 || m == 1.0);
                assert_eq!(m == 1.0, value == label, "class {k} at {at:?}");
                seen[k] += usize::from(m == 1.0);
            }
        }
        for (k, &label) in NEAR.iter().enumerate() {
            total[k] = resampled.count(label);
            // Each thalamus (about 40 voxels at 6 mm) fits the 96 mm crop whole.
            assert_eq!(seen[k], total[k], "label {label}");
            assert!(seen[k] > 20, "label {label}: {}", seen[k]);
        }
        // Masks follow the order asked for.
        let swapped = prepare_reference(
            &image,
            &labels,
            &[78, 77],
            SPACING,
            PATCH,
            None,
            &Limits::default(),
        )
        .expect("prepared");
        assert_eq!(swapped.masks[..voxels], input.masks[voxels..]);
        let ct = prepare_reference(
            &image,
            &labels,
            &NEAR,
            SPACING,
            PATCH,
            Some(IntensityPolicy::CT),
            &Limits::default(),
        )
        .expect("prepared");
        assert_eq!(ct.intensity, IntensityPolicy::CT);
        assert_ne!(ct.image, input.image);
    }

    #[test]
    fn bad_references_are_refused_with_the_label() {
        let Some((image, labels)) = colin() else {
            return;
        };
        let prep = |labels_wanted: &[u16], l: &LabelMap| {
            prepare_reference(
                &image,
                l,
                labels_wanted,
                SPACING,
                PATCH,
                None,
                &Limits::default(),
            )
        };
        assert!(matches!(
            prep(&[1, 999], &labels),
            Err(Error::EmptyMask { label: 999 })
        ));
        for bad in [&[][..], &[0], &[3, 3]] {
            assert!(matches!(
                prep(bad, &labels),
                Err(Error::InvalidArgument {
                    name: "class_labels",
                    ..
                })
            ));
        }
        // Two blobs in opposite corners of the head: too far apart for one crop.
        let mut far = labels.map(|_| 0u16);
        far.data_mut().slice_mut(s![5..12, 5..12, 5..12]).fill(1);
        far.data_mut()
            .slice_mut(s![170..177, 200..207, 170..177])
            .fill(2);
        let err = prep(&[1, 2], &far).expect_err("far apart").to_string();
        assert!(err.contains("label 1 lies outside"), "{err}");
        // One voxel that no 6 mm sample lands on.
        let mut speck = labels.map(|_| 0u16);
        speck.data_mut()[[3, 3, 3]] = 5;
        let err = prep(&[5], &speck).expect_err("vanishes").to_string();
        assert!(err.contains("label 5 has 1 voxel(s)"), "{err}");
        let mut nan = image.clone();
        nan.data_mut()[[0, 0, 0]] = f32::INFINITY;
        assert!(matches!(
            prepare_reference(
                &nan,
                &labels,
                &NEAR,
                SPACING,
                PATCH,
                None,
                &Limits::default()
            ),
            Err(Error::NonFinite { .. })
        ));
        let other_grid = labels.map(|&v| v);
        let moved = LabelMap::new(
            other_grid.data().clone(),
            Affine::from_spacing([1.0, 1.0, 2.0]),
        )
        .expect("moved");
        assert!(prep(&NEAR, &moved).is_err());
    }
}
