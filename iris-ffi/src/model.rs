//! `IrisModel`: loading a model folder, encoding tasks from references and
//! segmenting queries.

use core::ffi::{c_char, c_int, c_void};
use std::sync::Arc;

use iris_core::engine::Limits;
use iris_core::preprocess::IntensityPolicy;
use iris_core::{EncodeOptions, Model, Progress, SegmentOptions, Segmentation, TaskClass};

use crate::args::{self, Versioned, check_reserved};
use crate::loading::load_failure;
use crate::status::{Failure, FfiResult, IrisStatus, guard};
use crate::task::{IrisTask, give_task};
use crate::view::{CheckedView, IrisDataType, IrisVolumeView, check_view};

/// An Iris model loaded from a model folder. Opaque; made by
/// `iris_model_load` and freed with `iris_model_free`.
///
/// Thread safety: a model may be used from several threads at once (encode
/// and segment concurrently with one model); only `iris_model_free` must
/// not run while another call uses it.
pub struct IrisModel {
    pub(crate) model: Model,
}

/// How to normalise intensities (the `modality` field of the options).
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum IrisModality {
    /// Encoding: detect CT (air and bone on a Hounsfield scale) or MR from
    /// the reference's intensities. Segmenting: use what the task's
    /// reference used.
    Auto = 0,
    /// CT: clip to the Hounsfield window [-991, 500], then z-score.
    Ct = 1,
    /// MR (and PET): clip to the 2nd-98th percentiles, then z-score.
    Mr = 2,
}

fn intensity(modality: u32, name: &str) -> FfiResult<Option<IntensityPolicy>> {
    match modality {
        m if m == IrisModality::Auto as u32 => Ok(None),
        m if m == IrisModality::Ct as u32 => Ok(Some(IntensityPolicy::CT)),
        m if m == IrisModality::Mr as u32 => Ok(Some(IntensityPolicy::MR)),
        other => Err(Failure::invalid(format!(
            "`{name}.modality` is {other}, expected IRIS_MODALITY_AUTO (0), _CT (1) or _MR (2)"
        ))),
    }
}

/// Settings of `iris_task_encode`. Initialise with
/// `iris_encode_options_default`, then change fields.
#[repr(C)]
#[derive(Clone, Copy, Debug)]
pub struct IrisEncodeOptions {
    /// `sizeof(IrisEncodeOptions)` (set by the `_default` function).
    pub struct_size: u32,
    /// An `IrisModality`. Default `IRIS_MODALITY_AUTO`.
    pub modality: u32,
    /// Most bytes encoding may hold at once (the reference in canonical
    /// orientation and resampled), checked before it allocates: more is
    /// `IRIS_ERROR_TOO_LARGE` with the size needed. 0 (the default): 4 GiB.
    /// ABI 0.2, in ABI 0.1's first reserved word.
    pub memory_budget: u64,
    /// Must be zero (room for later fields).
    pub reserved: [u64; 7],
}

impl Versioned for IrisEncodeOptions {
    const NAME: &'static str = "IrisEncodeOptions";
}

/// Called by `iris_segment` after every sliding window with the windows
/// done so far and the total, and `progress_user`. It may be called from a
/// thread other than the caller's and must return normally (no longjmp, no
/// C++ exception).
pub type IrisProgressFn = Option<unsafe extern "C" fn(done: u64, total: u64, user: *mut c_void)>;

/// Asked by `iris_segment` and `iris_retrieve` before every sliding window
/// (and once after the last) with `cancel_user`: non-zero stops the run,
/// which returns `IRIS_ERROR_CANCELLED` and writes none of its outputs. It
/// may be called from a thread other than the caller's, should return
/// quickly (read a flag the viewer's cancel button sets) and must return
/// normally (no longjmp, no C++ exception). ABI 0.2.
pub type IrisCancelFn = Option<unsafe extern "C" fn(user: *mut c_void) -> c_int>;

/// Settings of `iris_segment`. Initialise with
/// `iris_segment_options_default`, then change fields.
#[repr(C)]
#[derive(Clone, Copy, Debug)]
pub struct IrisSegmentOptions {
    /// `sizeof(IrisSegmentOptions)` (set by the `_default` function).
    pub struct_size: u32,
    /// An `IrisModality`. Default `IRIS_MODALITY_AUTO`: the task's own.
    pub modality: u32,
    /// Probability the best class needs to label a voxel, in (0, 1].
    /// Default 0.5.
    pub threshold: f32,
    /// Non-zero: keep only the largest 26-connected component of each
    /// label. Default 1.
    pub largest_component: u32,
    /// Overlap of neighbouring windows, a fraction of the window in [0, 1).
    /// Default 0.5.
    pub overlap: f64,
    /// Progress callback, or NULL (the default).
    pub progress: IrisProgressFn,
    /// Passed to `progress` unchanged; borrowed. Default NULL.
    pub progress_user: *mut c_void,
    /// Cancellation callback, or NULL (the default). ABI 0.2: in the first
    /// two reserved words of ABI 0.1, so older callers (zeros there) get
    /// NULL.
    pub cancel: IrisCancelFn,
    /// Passed to `cancel` unchanged; borrowed. Default NULL.
    pub cancel_user: *mut c_void,
    /// Most bytes a segmentation may hold at once (canonical copy,
    /// resampled volume, blending, labels and probability maps; not the
    /// network's working memory), estimated from the query's header before
    /// anything is allocated: more is `IRIS_ERROR_TOO_LARGE` with the size
    /// needed. 0 (the default): 4 GiB. ABI 0.2.
    pub memory_budget: u64,
    /// Most sliding windows a query may need (its header sets how many):
    /// more is `IRIS_ERROR_TOO_LARGE`, before any window runs. 0 (the
    /// default): 10 000. ABI 0.2.
    pub max_windows: u64,
    /// Most classes per decoder run: a larger task is decoded in groups
    /// (the encoder still runs once per window). 0 (the default): the
    /// model manifest's `classes_per_forward`, else all classes in one run.
    /// ABI 0.2.
    pub classes_per_forward: u64,
    /// Must be zero (room for later fields).
    pub reserved: [u64; 3],
}

impl Versioned for IrisSegmentOptions {
    const NAME: &'static str = "IrisSegmentOptions";
}

/// A caller's `user` pointer, handed back to its callbacks (`progress`,
/// `cancel`), which the header requires to be callable from any thread.
#[derive(Clone, Copy)]
struct UserPointer(*mut c_void);

impl UserPointer {
    /// The pointer (a method, so that closures capture the whole `Send`
    /// wrapper rather than its raw field).
    fn get(self) -> *mut c_void {
        self.0
    }
}

// SAFETY: `IrisProgressFn`'s and `IrisCancelFn`'s contracts make the
// callbacks and their user pointers usable from any thread; libiris never
// dereferences `user`.
unsafe impl Send for UserPointer {}
// SAFETY: as above.
unsafe impl Sync for UserPointer {}

/// Fills `options` with the defaults of every field (including
/// `struct_size`).
///
/// Returns `IRIS_OK` or `IRIS_ERROR_NULL_POINTER`.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn iris_encode_options_default(
    options: *mut IrisEncodeOptions,
) -> IrisStatus {
    guard(|| {
        // SAFETY: `options` is valid or NULL per this function's contract
        // (a caller struct of this header's size; written, not read).
        let options = unsafe { args::borrow_mut(options, "options") }?;
        *options = IrisEncodeOptions {
            struct_size: size_of::<IrisEncodeOptions>() as u32,
            modality: IrisModality::Auto as u32,
            memory_budget: 0,
            reserved: [0; 7],
        };
        Ok(())
    })
}

/// Fills `options` with the defaults of every field (including
/// `struct_size`).
///
/// Returns `IRIS_OK` or `IRIS_ERROR_NULL_POINTER`.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn iris_segment_options_default(
    options: *mut IrisSegmentOptions,
) -> IrisStatus {
    guard(|| {
        // SAFETY: `options` is valid or NULL per this function's contract
        // (a caller struct of this header's size; written, not read).
        let options = unsafe { args::borrow_mut(options, "options") }?;
        let defaults = SegmentOptions::default();
        *options = IrisSegmentOptions {
            struct_size: size_of::<IrisSegmentOptions>() as u32,
            modality: IrisModality::Auto as u32,
            threshold: defaults.threshold,
            largest_component: u32::from(defaults.largest_component),
            overlap: defaults.overlap,
            progress: None,
            progress_user: core::ptr::null_mut(),
            cancel: None,
            cancel_user: core::ptr::null_mut(),
            memory_budget: 0,
            max_windows: 0,
            classes_per_forward: 0,
            reserved: [0; 3],
        };
        Ok(())
    })
}

/// Frees a model and sets `*model` to NULL. `model == NULL` and
/// `*model == NULL` are allowed and do nothing. No other call may be using
/// the model.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn iris_model_free(model: *mut *mut IrisModel) {
    guard(|| {
        // SAFETY: `model` is NULL or points to NULL or a live model (this function's contract).
        unsafe { args::free_handle(model) };
        Ok(())
    });
}

/// The memory bank shipped with the model: the embeddings of every class
/// seen in training, to pick from with `iris_task_select_labels` /
/// `iris_task_select_names` instead of encoding a reference.
///
/// On success `*out` is a new task that the caller owns and frees with
/// `iris_task_free`; on failure `*out` is NULL.
///
/// Returns `IRIS_OK`, `IRIS_ERROR_NULL_POINTER`, `IRIS_ERROR_INVALID_ARGUMENT`
/// (the model ships no memory bank), `IRIS_ERROR_IO`, `IRIS_ERROR_FORMAT`,
/// `IRIS_ERROR_MODEL_MISMATCH`.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn iris_model_memory_bank(
    model: *const IrisModel,
    out: *mut *mut IrisTask,
) -> IrisStatus {
    guard(|| {
        // SAFETY: pointers are valid or NULL per this function's contract.
        let slot = unsafe { args::out_handle(out, "out") }?;
        // SAFETY: as above.
        let model = unsafe { args::borrow(model, "model") }?;
        let bank = model
            .model
            .memory_bank()
            .map_err(load_failure)?
            .ok_or_else(|| {
                Failure::invalid(format!(
                    "model {:?} ships no memory bank (its manifest names none)",
                    model.model.manifest().name
                ))
            })?;
        give_task(slot, bank);
        Ok(())
    })
}

/// Checks that `task` was made by `model` (same weights fingerprint).
///
/// Returns `IRIS_OK`, `IRIS_ERROR_NULL_POINTER`, `IRIS_ERROR_MODEL_MISMATCH`
/// (both fingerprints in the message).
#[unsafe(no_mangle)]
pub unsafe extern "C" fn iris_task_check_model(
    task: *const IrisTask,
    model: *const IrisModel,
) -> IrisStatus {
    guard(|| {
        // SAFETY: pointers are valid or NULL per this function's contract.
        let task = unsafe { args::borrow(task, "task") }?;
        // SAFETY: as above.
        let model = unsafe { args::borrow(model, "model") }?;
        Ok(task.embedding.ensure_model(model.model.fingerprint())?)
    })
}

/// Encodes classes of a reference image and its label map into a one-shot
/// task (all classes in one run of the task encoder).
///
/// `image`: the reference intensities (any `IrisDataType`; CT in Hounsfield
/// units). `labels`: its label map on the same grid (same dims, affines
/// equal within 1e-4 mm; any integer type, values in 0..65535). Both are
/// borrowed during the call only; any orientation and spacing.
/// `label_values`: `count` (>= 1) distinct non-zero labels to encode.
/// `names` (nullable): `count` NUL-terminated UTF-8 class names (an entry
/// may be NULL for an empty name); stored in the task. `options`
/// (nullable): NULL for the defaults.
///
/// On success `*out` is a new task that the caller owns and frees with
/// `iris_task_free`; on failure `*out` is NULL.
///
/// Returns `IRIS_OK`, `IRIS_ERROR_NULL_POINTER`, `IRIS_ERROR_INVALID_ARGUMENT`,
/// `IRIS_ERROR_BUFFER_TOO_SMALL` (`data_bytes` short), `IRIS_ERROR_SHAPE` (grids
/// differ), `IRIS_ERROR_TOO_LARGE`, `IRIS_ERROR_NON_FINITE`,
/// `IRIS_ERROR_EMPTY_MASK` (a label absent from the label map),
/// `IRIS_ERROR_INFERENCE`.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn iris_task_encode(
    model: *const IrisModel,
    image: *const IrisVolumeView,
    labels: *const IrisVolumeView,
    label_values: *const u16,
    names: *const *const c_char,
    count: usize,
    options: *const IrisEncodeOptions,
    out: *mut *mut IrisTask,
) -> IrisStatus {
    guard(|| {
        // SAFETY: every pointer is valid or NULL per this function's contract.
        let slot = unsafe { args::out_handle(out, "out") }?;
        // SAFETY: as above.
        let model = unsafe { args::borrow(model, "model") }?;
        // SAFETY: as above.
        let image = unsafe { check_view(image, "image") }?.to_image()?;
        // SAFETY: as above.
        let labels = unsafe { check_view(labels, "labels") }?.to_labels("labels")?;
        // SAFETY: `label_values` and `names` are as this function's contract says.
        let classes = unsafe { task_classes(label_values, names, count) }?;
        // SAFETY: a non-NULL `options` is a valid struct per this function's contract.
        let settings = unsafe { encode_settings(options) }?;
        give_task(
            slot,
            model
                .model
                .encode_task(&image, &labels, &classes, &settings)?,
        );
        Ok(())
    })
}

/// The classes to encode: `count` (>= 1) label values with their names
/// (`names` NULL, or `count` strings of which any may be NULL for "").
///
/// # Safety
/// `label_values` must hold `count` values and a non-NULL `names` `count`
/// pointers, each NULL or a NUL-terminated string.
pub(crate) unsafe fn task_classes(
    label_values: *const u16,
    names: *const *const c_char,
    count: usize,
) -> FfiResult<Vec<TaskClass>> {
    if count == 0 {
        return Err(Failure::invalid(
            "`count` is 0: name at least one label to encode",
        ));
    }
    // SAFETY: `label_values` holds `count` values (the caller's guarantee).
    let values = unsafe { args::slice(label_values, count, "label_values") }?;
    // SAFETY: a non-NULL `names` holds `count` pointers (the caller's guarantee).
    let names = unsafe { args::slice(names, if names.is_null() { 0 } else { count }, "names") }?;
    values
        .iter()
        .enumerate()
        .map(|(i, &label)| {
            let name = match names.get(i) {
                // SAFETY: a non-NULL entry is a NUL-terminated string (the caller's guarantee).
                Some(&p) if !p.is_null() => unsafe { args::text(p, &format!("names[{i}]")) }?,
                _ => "",
            };
            Ok(TaskClass::new(label, name))
        })
        .collect()
}

/// The engine's settings from a caller's `IrisEncodeOptions` (NULL: the
/// defaults).
///
/// # Safety
/// A non-NULL `options` must point to a valid `IrisEncodeOptions`.
pub(crate) unsafe fn encode_settings(
    options: *const IrisEncodeOptions,
) -> FfiResult<EncodeOptions> {
    let mut settings = EncodeOptions::default();
    if !options.is_null() {
        // SAFETY: a non-NULL `options` is a valid struct (the caller's guarantee).
        let o = unsafe { args::versioned(options, "options") }?;
        check_reserved(&o.reserved, "options")?;
        settings.intensity = intensity(o.modality, "options")?;
        settings.limits = limits(o.memory_budget, 0);
    }
    Ok(settings)
}

/// The pipeline's limits from a C struct's fields (0: the default).
pub(crate) fn limits(memory_budget: u64, max_windows: u64) -> Limits {
    let defaults = Limits::default();
    Limits {
        memory_bytes: if memory_budget == 0 {
            defaults.memory_bytes
        } else {
            memory_budget
        },
        windows: match usize::try_from(max_windows) {
            Ok(0) => defaults.windows,
            Ok(n) => n,
            Err(_) => usize::MAX,
        },
    }
}

/// Segments a query volume with every class of `task`, on the query's own
/// grid.
///
/// `query`: the image (any `IrisDataType`, orientation and spacing),
/// borrowed. `task`: made by this model. `options` (nullable): NULL for the
/// defaults. `label_dtype`: `IRIS_DATA_TYPE_U8` or `IRIS_DATA_TYPE_U16`, the
/// type of `labels_out`; every label of the task must fit it.
/// `labels_out`: caller memory of `labels_out_bytes` bytes (at least D*H*W
/// times the size of `label_dtype`), any alignment; receives the label
/// value of each voxel (0: background), C order `[D, H, W]` like `query`.
/// `probabilities_out` (nullable): caller memory of `probabilities_count`
/// floats, at least K*D*H*W for K classes; receives for each class in the
/// task's order (`iris_task_class`) its probability in [0, 1] per voxel,
/// class-major (`[K, D, H, W]`). Every size is checked before the model
/// runs. Outputs are complete only when `IRIS_OK` is returned.
///
/// Several threads may segment with one model at once.
///
/// Returns `IRIS_OK`, `IRIS_ERROR_NULL_POINTER`, `IRIS_ERROR_INVALID_ARGUMENT`,
/// `IRIS_ERROR_BUFFER_TOO_SMALL`, `IRIS_ERROR_MODEL_MISMATCH` (task of another
/// model), `IRIS_ERROR_SHAPE`, `IRIS_ERROR_TOO_LARGE`, `IRIS_ERROR_NON_FINITE`,
/// `IRIS_ERROR_INFERENCE`.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn iris_segment(
    model: *const IrisModel,
    query: *const IrisVolumeView,
    task: *const IrisTask,
    options: *const IrisSegmentOptions,
    label_dtype: u32,
    labels_out: *mut c_void,
    labels_out_bytes: u64,
    probabilities_out: *mut f32,
    probabilities_count: u64,
) -> IrisStatus {
    guard(|| {
        // SAFETY: every pointer is valid or NULL per this function's contract.
        let model = unsafe { args::borrow(model, "model") }?;
        // SAFETY: as above.
        let task = unsafe { args::borrow(task, "task") }?;
        // SAFETY: as above.
        let query = unsafe { check_view(query, "query") }?;
        let labels = task
            .embedding
            .classes()
            .iter()
            .map(|c| (c.label(), c.name()));
        // SAFETY: the output pointers and sizes are as this function's contract says.
        let outputs = unsafe {
            SegmentOutputs::check(
                &query,
                labels,
                label_dtype,
                labels_out,
                labels_out_bytes,
                probabilities_out,
                probabilities_count,
            )
        }?;
        // SAFETY: a non-NULL `options` is a valid struct per this function's contract.
        let settings = unsafe { segment_settings(options, outputs.wants_probabilities()) }?;
        let result = model
            .model
            .segment(&query.to_image()?, &task.embedding, &settings)?;
        outputs.write(&query, &result)
    })
}

/// The caller's output buffers of a segmentation, checked against the query
/// and the classes before the model runs.
pub(crate) struct SegmentOutputs<'a> {
    dtype: IrisDataType,
    classes: usize,
    labels: &'a mut [u8],
    probabilities: Option<&'a mut [u8]>,
}

impl<'a> SegmentOutputs<'a> {
    /// Checks `label_dtype` (U8 or U16, fitting every class label) and the
    /// buffer sizes for `query` and `classes` (label, name).
    ///
    /// # Safety
    /// `labels_out` must hold `labels_out_bytes` writable bytes and a
    /// non-NULL `probabilities_out` `probabilities_count` writable floats,
    /// used by nothing else during `'a`.
    pub(crate) unsafe fn check<'n>(
        query: &CheckedView<'_>,
        classes: impl ExactSizeIterator<Item = (u32, &'n str)>,
        label_dtype: u32,
        labels_out: *mut c_void,
        labels_out_bytes: u64,
        probabilities_out: *mut f32,
        probabilities_count: u64,
    ) -> FfiResult<SegmentOutputs<'a>> {
        let voxels = query.geometry.len() as u64;
        let count = classes.len();
        let dtype = IrisDataType::from_code(label_dtype, "label_dtype")?;
        let limit = match dtype {
            IrisDataType::U8 => u32::from(u8::MAX),
            IrisDataType::U16 => u32::from(u16::MAX),
            _ => {
                return Err(Failure::invalid(format!(
                    "`label_dtype` is {dtype:?}: labels are written as IRIS_DATA_TYPE_U8 or _U16"
                )));
            }
        };
        for (label, name) in classes {
            if label > limit {
                return Err(Failure::invalid(format!(
                    "class {name:?} has label {label}, which does not fit `label_dtype` {dtype:?}: \
                     use IRIS_DATA_TYPE_U16"
                )));
            }
        }
        let label_bytes = voxels * dtype.size() as u64;
        if labels_out.is_null() {
            return Err(Failure::null("labels_out"));
        }
        if labels_out_bytes < label_bytes {
            return Err(Failure::too_small(
                "labels_out",
                label_bytes,
                labels_out_bytes,
                "bytes",
            ));
        }
        let probability_count = voxels.checked_mul(count as u64).ok_or_else(|| {
            Failure::new(IrisStatus::IrisErrorTooLarge, "probabilities are too large")
        })?;
        let probabilities = if probabilities_out.is_null() {
            if probabilities_count != 0 {
                return Err(Failure::new(
                    IrisStatus::IrisErrorNullPointer,
                    format!(
                        "`probabilities_out` is NULL but `probabilities_count` is \
                         {probabilities_count}: pass 0 when no probabilities are wanted"
                    ),
                ));
            }
            None
        } else {
            if probabilities_count < probability_count {
                return Err(Failure::too_small(
                    "probabilities_out",
                    probability_count,
                    probabilities_count,
                    "floats (classes x voxels)",
                ));
            }
            let floats = args::length(probability_count, "probabilities")?;
            // SAFETY: `probabilities_out` holds at least `floats` writable floats (checked above).
            Some(unsafe {
                args::bytes_mut(
                    probabilities_out.cast(),
                    floats * size_of::<f32>(),
                    "probabilities_out",
                )
            }?)
        };
        let n = args::length(voxels, "query voxels")?;
        // SAFETY: `labels_out` holds `labels_out_bytes` >= n * size writable bytes.
        let labels = unsafe { args::bytes_mut(labels_out.cast(), n * dtype.size(), "labels_out") }?;
        Ok(SegmentOutputs {
            dtype,
            classes: count,
            labels,
            probabilities,
        })
    }

    /// Whether the caller asked for probabilities.
    pub(crate) fn wants_probabilities(&self) -> bool {
        self.probabilities.is_some()
    }

    /// Copies `result` into the buffers, after checking its shapes.
    pub(crate) fn write(self, query: &CheckedView<'_>, result: &Segmentation) -> FfiResult {
        let shape = query.geometry.shape();
        if result.labels.shape() != shape {
            return Err(Failure::new(
                IrisStatus::IrisErrorShape,
                format!(
                    "the engine returned labels of shape {:?} for a query of {shape:?}",
                    result.labels.shape()
                ),
            ));
        }
        let labels = result.labels.data().iter();
        match self.dtype {
            IrisDataType::U8 => self
                .labels
                .iter_mut()
                .zip(labels)
                .for_each(|(o, &l)| *o = l as u8),
            _ => self
                .labels
                .chunks_exact_mut(2)
                .zip(labels)
                .for_each(|(o, &l)| o.copy_from_slice(&l.to_ne_bytes())),
        }
        if let Some(out) = self.probabilities {
            let maps = result.probabilities.as_deref().unwrap_or_default();
            if maps.len() != self.classes || maps.iter().any(|m| m.shape() != shape) {
                return Err(Failure::new(
                    IrisStatus::IrisErrorShape,
                    format!(
                        "the engine returned {} probability maps for {} classes",
                        maps.len(),
                        self.classes
                    ),
                ));
            }
            let values = maps.iter().flat_map(|m| m.data().iter());
            out.chunks_exact_mut(4)
                .zip(values)
                .for_each(|(o, p)| o.copy_from_slice(&p.to_ne_bytes()));
        }
        Ok(())
    }
}

/// The engine's settings from a caller's `IrisSegmentOptions` (NULL: the
/// defaults), with probabilities as asked.
///
/// # Safety
/// A non-NULL `options` must point to a valid `IrisSegmentOptions`.
pub(crate) unsafe fn segment_settings(
    options: *const IrisSegmentOptions,
    probabilities: bool,
) -> FfiResult<SegmentOptions> {
    let mut settings = SegmentOptions {
        probabilities,
        ..SegmentOptions::default()
    };
    if !options.is_null() {
        // SAFETY: a non-NULL `options` is a valid struct (the caller's guarantee).
        let o = unsafe { args::versioned(options, "options") }?;
        check_reserved(&o.reserved, "options")?;
        settings.intensity = intensity(o.modality, "options")?;
        settings.threshold = o.threshold;
        settings.overlap = o.overlap;
        settings.largest_component = o.largest_component != 0;
        settings.limits = limits(o.memory_budget, o.max_windows);
        settings.classes_per_forward = match o.classes_per_forward {
            0 => None,
            n => Some(usize::try_from(n).unwrap_or(usize::MAX)),
        };
        if let Some(callback) = o.progress {
            let user = UserPointer(o.progress_user);
            settings.progress = Some(Arc::new(move |p: Progress| {
                // SAFETY: the caller's callback, called as IrisProgressFn documents.
                unsafe { callback(p.done as u64, p.total as u64, user.get()) }
            }));
        }
        if let Some(callback) = o.cancel {
            let user = UserPointer(o.cancel_user);
            // SAFETY: the caller's callback, called as IrisCancelFn documents.
            settings.cancel = Some(Arc::new(move || unsafe { callback(user.get()) } != 0));
        }
    }
    Ok(settings)
}
