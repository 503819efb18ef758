//! `IrisTask`: a task embedding (one or more classes), loaded from and saved
//! to `.irisemb` files or memory, ensembled, selected and inspected.

use core::ffi::c_char;

use iris_core::embedding::TaskEmbedding;
use iris_core::irisemb::{self, Payload};

use crate::args;
use crate::status::{Failure, FfiResult, IrisStatus, guard};

/// A task embedding: for each class, what the model distilled from a
/// reference image and its mask, with the fingerprint of the model that
/// made it. Opaque; made by `iris_task_encode`, `iris_task_load*`,
/// `iris_task_ensemble`, `iris_task_select_*` or `iris_model_memory_bank`,
/// and freed with `iris_task_free`. A task is never modified after it is
/// made, so one task may be used from several threads at once.
pub struct IrisTask {
    pub(crate) embedding: TaskEmbedding,
}

/// Hands a new task to C.
pub(crate) fn give_task(slot: &mut *mut IrisTask, embedding: TaskEmbedding) {
    args::give(slot, IrisTask { embedding });
}

/// Loads a `.irisemb` file.
///
/// `path`: NUL-terminated file name (bytes on POSIX). On success `*out` is a
/// new task that the caller owns and frees with `iris_task_free`; on failure
/// `*out` is NULL.
///
/// Returns `IRIS_OK`, `IRIS_ERROR_NULL_POINTER`, `IRIS_ERROR_IO` (cannot
/// read), `IRIS_ERROR_FORMAT` (truncated, corrupt, bad checksum, newer
/// format version, invalid field).
#[unsafe(no_mangle)]
pub unsafe extern "C" fn iris_task_load(
    path: *const c_char,
    out: *mut *mut IrisTask,
) -> IrisStatus {
    guard(|| {
        // SAFETY: `out` and `path` are valid or NULL per this function's contract.
        let slot = unsafe { args::out_handle(out, "out") }?;
        // SAFETY: as above.
        let path = unsafe { args::path(path, "path") }?;
        give_task(slot, irisemb::read_file(&path)?);
        Ok(())
    })
}

/// Parses a `.irisemb` held in memory (e.g. a file embedded in firmware).
///
/// `data`: `size` bytes, borrowed during the call only (may be NULL only
/// when `size` is 0). On success `*out` is a new task that the caller owns
/// and frees with `iris_task_free`; on failure `*out` is NULL.
///
/// Returns `IRIS_OK`, `IRIS_ERROR_NULL_POINTER`, `IRIS_ERROR_FORMAT` (empty,
/// truncated or corrupt bytes, with the offset and field in the message).
#[unsafe(no_mangle)]
pub unsafe extern "C" fn iris_task_load_buffer(
    data: *const u8,
    size: usize,
    out: *mut *mut IrisTask,
) -> IrisStatus {
    guard(|| {
        // SAFETY: `out` is valid or NULL per this function's contract.
        let slot = unsafe { args::out_handle(out, "out") }?;
        // SAFETY: `data` holds `size` bytes per this function's contract.
        let bytes = unsafe { args::slice(data, size, "data") }?;
        give_task(slot, irisemb::read(bytes)?);
        Ok(())
    })
}

/// Writes `task` to a `.irisemb` file (values as exact 32-bit floats). The
/// write is atomic: `path` never holds a partial file.
///
/// Returns `IRIS_OK`, `IRIS_ERROR_NULL_POINTER`, `IRIS_ERROR_IO`.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn iris_task_save(task: *const IrisTask, path: *const c_char) -> IrisStatus {
    guard(|| {
        // SAFETY: `task` and `path` are valid or NULL per this function's contract.
        let task = unsafe { args::borrow(task, "task") }?;
        // SAFETY: as above.
        let path = unsafe { args::path(path, "path") }?;
        Ok(irisemb::write_file(&path, &task.embedding, Payload::F32)?)
    })
}

/// Serialises `task` as `.irisemb` bytes into the caller's buffer.
///
/// `buffer`: `capacity` writable bytes owned by the caller (may be NULL when
/// `capacity` is 0). `written` (required): receives the number of bytes
/// written, or, with `IRIS_ERROR_BUFFER_TOO_SMALL`, the capacity needed:
/// call once with capacity 0 to learn the size, then again.
///
/// Returns `IRIS_OK`, `IRIS_ERROR_NULL_POINTER`, `IRIS_ERROR_BUFFER_TOO_SMALL`.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn iris_task_save_buffer(
    task: *const IrisTask,
    buffer: *mut u8,
    capacity: usize,
    written: *mut usize,
) -> IrisStatus {
    guard(|| {
        // SAFETY: pointers are valid or NULL per this function's contract.
        let written = unsafe { args::borrow_mut(written, "written") }?;
        *written = 0;
        // SAFETY: as above.
        let task = unsafe { args::borrow(task, "task") }?;
        let bytes = irisemb::write(&task.embedding, Payload::F32)?;
        if capacity < bytes.len() {
            *written = bytes.len();
            return Err(Failure::too_small(
                "buffer",
                bytes.len() as u64,
                capacity as u64,
                "bytes",
            ));
        }
        // SAFETY: `buffer` holds `capacity` writable bytes per this function's contract.
        let buffer = unsafe { args::bytes_mut(buffer, capacity, "buffer") }?;
        buffer[..bytes.len()].copy_from_slice(&bytes);
        *written = bytes.len();
        Ok(())
    })
}

/// Context ensemble: averages `count` tasks made from different references
/// of the same classes (per class, weighted by the references behind each
/// part, so ensembles of ensembles stay exact). The tasks must come from
/// the same model and hold the same labels with the same names.
///
/// `tasks`: `count` (>= 1) task pointers, borrowed during the call. On
/// success `*out` is a new task that the caller owns and frees with
/// `iris_task_free`; on failure `*out` is NULL.
///
/// Returns `IRIS_OK`, `IRIS_ERROR_NULL_POINTER`, `IRIS_ERROR_INVALID_ARGUMENT`
/// (count 0, different classes), `IRIS_ERROR_MODEL_MISMATCH` (different
/// models), `IRIS_ERROR_SHAPE`.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn iris_task_ensemble(
    tasks: *const *const IrisTask,
    count: usize,
    out: *mut *mut IrisTask,
) -> IrisStatus {
    guard(|| {
        // SAFETY: pointers are valid or NULL per this function's contract.
        let slot = unsafe { args::out_handle(out, "out") }?;
        // SAFETY: `tasks` holds `count` pointers per this function's contract.
        let pointers = unsafe { args::slice(tasks, count, "tasks") }?;
        if pointers.is_empty() {
            return Err(Failure::invalid("`count` is 0: nothing to ensemble"));
        }
        let parts = pointers
            .iter()
            .enumerate()
            .map(|(i, &p)| {
                // SAFETY: each entry is a valid task or NULL per this function's contract.
                unsafe { args::borrow(p, &format!("tasks[{i}]")) }.map(|t| t.embedding.clone())
            })
            .collect::<FfiResult<Vec<_>>>()?;
        give_task(slot, TaskEmbedding::ensemble(&parts)?);
        Ok(())
    })
}

/// Picks classes by label value from a task or memory bank, in the order
/// asked (e.g. the organs a study needs from `iris_model_memory_bank`).
///
/// `labels`: `count` (>= 1) label values, borrowed. On success `*out` is a
/// new task that the caller owns and frees with `iris_task_free`.
///
/// Returns `IRIS_OK`, `IRIS_ERROR_NULL_POINTER`, `IRIS_ERROR_INVALID_ARGUMENT`
/// (a label absent, repeated, or count 0; the message lists the classes
/// present).
#[unsafe(no_mangle)]
pub unsafe extern "C" fn iris_task_select_labels(
    task: *const IrisTask,
    labels: *const u32,
    count: usize,
    out: *mut *mut IrisTask,
) -> IrisStatus {
    guard(|| {
        // SAFETY: pointers are valid or NULL per this function's contract.
        let slot = unsafe { args::out_handle(out, "out") }?;
        // SAFETY: as above.
        let task = unsafe { args::borrow(task, "task") }?;
        // SAFETY: `labels` holds `count` values per this function's contract.
        let labels = unsafe { args::slice(labels, count, "labels") }?;
        give_task(slot, task.embedding.select_labels(labels)?);
        Ok(())
    })
}

/// Picks classes by exact name, as `iris_task_select_labels` does by label.
///
/// `names`: `count` (>= 1) NUL-terminated UTF-8 strings, borrowed.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn iris_task_select_names(
    task: *const IrisTask,
    names: *const *const c_char,
    count: usize,
    out: *mut *mut IrisTask,
) -> IrisStatus {
    guard(|| {
        // SAFETY: pointers are valid or NULL per this function's contract.
        let slot = unsafe { args::out_handle(out, "out") }?;
        // SAFETY: as above.
        let task = unsafe { args::borrow(task, "task") }?;
        // SAFETY: `names` holds `count` pointers per this function's contract.
        let pointers = unsafe { args::slice(names, count, "names") }?;
        let names = pointers
            .iter()
            .enumerate()
            // SAFETY: each entry is a string or NULL per this function's contract.
            .map(|(i, &p)| unsafe { args::text(p, &format!("names[{i}]")) })
            .collect::<FfiResult<Vec<&str>>>()?;
        give_task(slot, task.embedding.select_names(&names)?);
        Ok(())
    })
}

/// The number of classes in `task` (at least 1), into `*count`.
///
/// Returns `IRIS_OK` or `IRIS_ERROR_NULL_POINTER`.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn iris_task_num_classes(
    task: *const IrisTask,
    count: *mut usize,
) -> IrisStatus {
    guard(|| {
        // SAFETY: pointers are valid or NULL per this function's contract.
        let count = unsafe { args::borrow_mut(count, "count") }?;
        // SAFETY: as above.
        let task = unsafe { args::borrow(task, "task") }?;
        *count = task.embedding.classes().len();
        Ok(())
    })
}

/// Describes class `index` (0-based, in the task's order, which is also the
/// order of `iris_segment`'s probabilities).
///
/// `label` (required) receives its label value. `name` receives its name,
/// NUL-terminated UTF-8 (may be empty), in a caller buffer of `name_capacity`
/// bytes (`name` may be NULL when `name_capacity` is 0). `name_size`
/// (nullable) receives the bytes the name needs including the NUL, also
/// with `IRIS_ERROR_BUFFER_TOO_SMALL`, when `*label` is still set.
///
/// Returns `IRIS_OK`, `IRIS_ERROR_NULL_POINTER`, `IRIS_ERROR_INVALID_ARGUMENT`
/// (index out of range), `IRIS_ERROR_BUFFER_TOO_SMALL`.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn iris_task_class(
    task: *const IrisTask,
    index: usize,
    label: *mut u32,
    name: *mut c_char,
    name_capacity: usize,
    name_size: *mut usize,
) -> IrisStatus {
    guard(|| {
        // SAFETY: pointers are valid or NULL per this function's contract.
        let task = unsafe { args::borrow(task, "task") }?;
        // SAFETY: as above.
        let label = unsafe { args::borrow_mut(label, "label") }?;
        let classes = task.embedding.classes();
        let class = classes.get(index).ok_or_else(|| {
            Failure::invalid(format!(
                "`index` {index} is out of range: the task has {} classes",
                classes.len()
            ))
        })?;
        *label = class.label();
        let text = class.name().as_bytes();
        let needed = text.len() + 1;
        // SAFETY: `name_size` is valid or NULL per this function's contract.
        if let Some(size) = unsafe { name_size.as_mut() } {
            *size = needed;
        }
        if name_capacity < needed {
            return Err(Failure::too_small(
                "name",
                needed as u64,
                name_capacity as u64,
                "bytes",
            ));
        }
        // SAFETY: `name` holds `name_capacity` writable bytes per this function's contract.
        let buffer = unsafe { args::bytes_mut(name.cast::<u8>(), name_capacity, "name") }?;
        buffer[..text.len()].copy_from_slice(text);
        buffer[text.len()] = 0;
        Ok(())
    })
}

/// Frees a task and sets `*task` to NULL. `task == NULL` and
/// `*task == NULL` are allowed and do nothing.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn iris_task_free(task: *mut *mut IrisTask) {
    guard(|| {
        // SAFETY: `task` is NULL or points to NULL or a live task (this function's contract).
        unsafe { args::free_handle(task) };
        Ok(())
    });
}
