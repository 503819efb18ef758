//! `IrisPool`: references to retrieve from, and `iris_retrieve`.

use core::ffi::{c_char, c_void};

use iris_core::engine::{PoolReference, RetrievalLevel, RetrieveOptions};

use crate::args::{self, Versioned, check_reserved};
use crate::model::{
    IrisEncodeOptions, IrisModel, IrisSegmentOptions, SegmentOutputs, encode_settings,
    segment_settings, task_classes,
};
use crate::status::{Failure, FfiResult, IrisStatus, guard};
use crate::task::{IrisTask, give_task};
use crate::view::{IrisVolumeView, check_view};

/// A pool of encoded references for context retrieval (`iris_retrieve`).
/// Opaque; made by `iris_pool_new`, filled with `iris_pool_add_reference`
/// or `iris_pool_add_task`, freed with `iris_pool_free`.
///
/// Thread safety: adding to a pool must not run while another call uses
/// it; a pool that is no longer changed may be used by several
/// `iris_retrieve` calls at once.
pub struct IrisPool {
    references: Vec<PoolReference>,
}

/// How `iris_retrieve` chooses references (the `level` field of
/// `IrisRetrieveOptions`).
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum IrisRetrievalLevel {
    /// Per class: segment the query with the initial reference, encode its
    /// predicted masks, and pick the references whose embedding of that
    /// class is most similar (the paper's object-level retrieval).
    Object = 0,
    /// Per query: pick the references whose whole image is most similar
    /// (global image descriptors; needs references added from images).
    Image = 1,
}

/// Settings of `iris_retrieve`. Initialise with
/// `iris_retrieve_options_default`, then change fields.
#[repr(C)]
#[derive(Clone, Copy, Debug)]
pub struct IrisRetrieveOptions {
    /// `sizeof(IrisRetrieveOptions)` (set by the `_default` function).
    pub struct_size: u32,
    /// An `IrisRetrievalLevel`. Default `IRIS_RETRIEVAL_LEVEL_OBJECT`.
    pub level: u32,
    /// References averaged per class (object level) or images chosen
    /// (image level), at least 1; more than the pool holds takes all of
    /// it. Default 1.
    pub top_k: u32,
    /// Index (in the order added) of the reference that segments the query
    /// first at object level. Default 0.
    pub initial: u32,
    /// Must be zero (room for later fields).
    pub reserved: [u64; 8],
}

impl Versioned for IrisRetrieveOptions {
    const NAME: &'static str = "IrisRetrieveOptions";
}

/// Fills `options` with the defaults of every field (including
/// `struct_size`).
///
/// Returns `IRIS_OK` or `IRIS_ERROR_NULL_POINTER`.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn iris_retrieve_options_default(
    options: *mut IrisRetrieveOptions,
) -> IrisStatus {
    guard(|| {
        // SAFETY: `options` is valid or NULL per this function's contract
        // (a caller struct of this header's size; written, not read).
        let options = unsafe { args::borrow_mut(options, "options") }?;
        let defaults = RetrieveOptions::default();
        *options = IrisRetrieveOptions {
            struct_size: size_of::<IrisRetrieveOptions>() as u32,
            level: IrisRetrievalLevel::Object as u32,
            top_k: defaults.top_k as u32,
            initial: defaults.initial as u32,
            reserved: [0; 8],
        };
        Ok(())
    })
}

/// Makes an empty pool. On success `*out` is a new pool that the caller
/// owns and frees with `iris_pool_free`; on failure `*out` is NULL.
///
/// Returns `IRIS_OK` or `IRIS_ERROR_NULL_POINTER`.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn iris_pool_new(out: *mut *mut IrisPool) -> IrisStatus {
    guard(|| {
        // SAFETY: `out` is valid or NULL per this function's contract.
        let slot = unsafe { args::out_handle(out, "out") }?;
        args::give(
            slot,
            IrisPool {
                references: Vec::new(),
            },
        );
        Ok(())
    })
}

/// Frees a pool and sets `*pool` to NULL. `pool == NULL` and
/// `*pool == NULL` are allowed and do nothing.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn iris_pool_free(pool: *mut *mut IrisPool) {
    guard(|| {
        // SAFETY: `pool` is NULL or points to NULL or a live pool (this function's contract).
        unsafe { args::free_handle(pool) };
        Ok(())
    });
}

/// Encodes a reference image and its label map (as `iris_task_encode`
/// does, same arguments) together with its global image descriptor, and
/// adds it to `pool` under `name` (NUL-terminated UTF-8, copied). Such a
/// reference serves both retrieval levels. Nothing is added on failure.
///
/// Returns what `iris_task_encode` returns, and `IRIS_ERROR_NULL_POINTER`
/// for a NULL `pool` or `name`.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn iris_pool_add_reference(
    pool: *mut IrisPool,
    model: *const IrisModel,
    name: *const c_char,
    image: *const IrisVolumeView,
    labels: *const IrisVolumeView,
    label_values: *const u16,
    names: *const *const c_char,
    count: usize,
    options: *const IrisEncodeOptions,
) -> IrisStatus {
    guard(|| {
        // SAFETY: every pointer is valid or NULL per this function's contract.
        let pool = unsafe { args::borrow_mut(pool, "pool") }?;
        // SAFETY: as above.
        let model = unsafe { args::borrow(model, "model") }?;
        // SAFETY: as above.
        let name = unsafe { args::text(name, "name") }?;
        // SAFETY: as above.
        let image = unsafe { check_view(image, "image") }?.to_image()?;
        // SAFETY: as above.
        let labels = unsafe { check_view(labels, "labels") }?.to_labels("labels")?;
        // SAFETY: as above.
        let classes = unsafe { task_classes(label_values, names, count) }?;
        // SAFETY: as above.
        let settings = unsafe { encode_settings(options) }?;
        let reference = model
            .model
            .encode_pool_reference(name, &image, &labels, &classes, &settings)?;
        pool.references.push(reference);
        Ok(())
    })
}

/// Adds a task made from one reference (e.g. an `.irisemb` file loaded
/// with `iris_task_load`) to `pool` under `name` (NUL-terminated UTF-8);
/// both are copied. Such a reference has no image descriptor: it serves
/// object-level retrieval only.
///
/// Returns `IRIS_OK`, `IRIS_ERROR_NULL_POINTER`, `IRIS_ERROR_INVALID_ARGUMENT`
/// (a name that is not UTF-8).
#[unsafe(no_mangle)]
pub unsafe extern "C" fn iris_pool_add_task(
    pool: *mut IrisPool,
    name: *const c_char,
    task: *const IrisTask,
) -> IrisStatus {
    guard(|| {
        // SAFETY: every pointer is valid or NULL per this function's contract.
        let pool = unsafe { args::borrow_mut(pool, "pool") }?;
        // SAFETY: as above.
        let name = unsafe { args::text(name, "name") }?;
        // SAFETY: as above.
        let task = unsafe { args::borrow(task, "task") }?;
        pool.references.push(PoolReference {
            name: name.to_owned(),
            task: task.embedding.clone(),
            descriptor: None,
        });
        Ok(())
    })
}

/// The number of references in `pool`, into `*count`.
///
/// Returns `IRIS_OK` or `IRIS_ERROR_NULL_POINTER`.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn iris_pool_size(pool: *const IrisPool, count: *mut usize) -> IrisStatus {
    guard(|| {
        // SAFETY: pointers are valid or NULL per this function's contract.
        let count = unsafe { args::borrow_mut(count, "count") }?;
        // SAFETY: as above.
        let pool = unsafe { args::borrow(pool, "pool") }?;
        *count = pool.references.len();
        Ok(())
    })
}

/// Segments `query` with references retrieved from `pool`: for each class,
/// the average of the `top_k` most similar references that have it (see
/// `IrisRetrievalLevel`).
///
/// `labels` / `label_count`: the classes to segment (label values), or
/// NULL / 0 for every class of the initial reference.
/// `retrieve_options` and `segment_options` (both nullable): NULL for the
/// defaults; object level segments twice and reports progress for each
/// pass. `label_dtype`, `labels_out`, `probabilities_out` and their sizes
/// are as in `iris_segment`, for the classes in the order asked (or of the
/// initial reference). `task_out` (nullable): on success receives a new
/// task holding the embeddings used (per class, the average of the chosen
/// references), owned by the caller and freed with `iris_task_free`; set
/// to NULL on failure. Outputs are complete only when `IRIS_OK` is
/// returned.
///
/// Returns `IRIS_OK`, `IRIS_ERROR_NULL_POINTER`, `IRIS_ERROR_INVALID_ARGUMENT`
/// (empty pool, `top_k` 0, `initial` past the pool, a class no reference
/// has, image level with a reference added as a task), what `iris_segment`
/// returns.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn iris_retrieve(
    model: *const IrisModel,
    pool: *const IrisPool,
    query: *const IrisVolumeView,
    labels: *const u32,
    label_count: usize,
    retrieve_options: *const IrisRetrieveOptions,
    segment_options: *const IrisSegmentOptions,
    label_dtype: u32,
    labels_out: *mut c_void,
    labels_out_bytes: u64,
    probabilities_out: *mut f32,
    probabilities_count: u64,
    task_out: *mut *mut IrisTask,
) -> IrisStatus {
    guard(|| {
        // SAFETY: a non-NULL `task_out` is valid per this function's contract.
        let task_slot = match unsafe { task_out.as_mut() } {
            Some(slot) => {
                *slot = core::ptr::null_mut();
                Some(slot)
            }
            None => None,
        };
        // SAFETY: every pointer is valid or NULL per this function's contract.
        let model = unsafe { args::borrow(model, "model") }?;
        // SAFETY: as above.
        let pool = unsafe { args::borrow(pool, "pool") }?;
        // SAFETY: as above.
        let query = unsafe { check_view(query, "query") }?;
        // SAFETY: `labels` holds `label_count` values per this function's contract.
        let labels = unsafe { args::slice(labels, label_count, "labels") }?;
        // SAFETY: a non-NULL options struct is valid per this function's contract.
        let mut settings = unsafe { retrieve_settings(retrieve_options) }?;
        let initial = pool.references.get(settings.initial).ok_or_else(|| {
            Failure::invalid(format!(
                "`retrieve_options.initial` is {} but the pool holds {} reference(s)",
                settings.initial,
                pool.references.len()
            ))
        })?;
        // The classes, in output order, to size the buffers before running.
        let classes: Vec<(u32, &str)> = if labels.is_empty() {
            initial
                .task
                .classes()
                .iter()
                .map(|c| (c.label(), c.name()))
                .collect()
        } else {
            labels.iter().map(|&l| (l, "")).collect()
        };
        // SAFETY: the output pointers and sizes are as this function's contract says.
        let outputs = unsafe {
            SegmentOutputs::check(
                &query,
                classes.into_iter(),
                label_dtype,
                labels_out,
                labels_out_bytes,
                probabilities_out,
                probabilities_count,
            )
        }?;
        // SAFETY: as above.
        settings.segment =
            unsafe { segment_settings(segment_options, outputs.wants_probabilities()) }?;
        let result =
            model
                .model
                .retrieve(&query.to_image()?, &pool.references, labels, &settings)?;
        outputs.write(&query, &result.segmentation)?;
        if let Some(slot) = task_slot {
            give_task(slot, result.task);
        }
        Ok(())
    })
}

/// The engine's retrieval settings from a caller's `IrisRetrieveOptions`
/// (NULL: the defaults); the segmentation settings are set by the caller.
///
/// # Safety
/// A non-NULL `options` must point to a valid `IrisRetrieveOptions`.
unsafe fn retrieve_settings(options: *const IrisRetrieveOptions) -> FfiResult<RetrieveOptions> {
    let mut settings = RetrieveOptions::default();
    if options.is_null() {
        return Ok(settings);
    }
    // SAFETY: a non-NULL `options` is a valid struct (the caller's guarantee).
    let o = unsafe { args::versioned(options, "retrieve_options") }?;
    check_reserved(&o.reserved, "retrieve_options")?;
    settings.level = match o.level {
        l if l == IrisRetrievalLevel::Object as u32 => RetrievalLevel::Object,
        l if l == IrisRetrievalLevel::Image as u32 => RetrievalLevel::Image,
        other => {
            return Err(Failure::invalid(format!(
                "`retrieve_options.level` is {other}, expected IRIS_RETRIEVAL_LEVEL_OBJECT (0) \
                 or _IMAGE (1)"
            )));
        }
    };
    if o.top_k == 0 {
        return Err(Failure::invalid(
            "`retrieve_options.top_k` is 0: retrieve at least 1 reference",
        ));
    }
    settings.top_k = o.top_k as usize;
    settings.initial = o.initial as usize;
    Ok(settings)
}
