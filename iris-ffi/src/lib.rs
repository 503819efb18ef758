//! # libiris
//!
//! The C ABI of iris, built as `libiris.so` (soname `libiris.so.0`) and
//! `libiris.a` over [`iris_core`]; its header is `include/iris.h`, generated
//! from this crate by cbindgen (`tests/header.rs` keeps it current).
//!
//! Conventions (those of ONNX Runtime, tract, dav1d and rav1e):
//! - every function that can fail returns an [`IrisStatus`]; the message is
//!   kept per thread and read with [`iris_last_error`];
//! - objects are opaque handles ([`IrisModel`], [`IrisTask`],
//!   [`IrisPool`], [`IrisVolume`]) made through `IrisX **out` (set to NULL on failure)
//!   and released with `iris_x_free(IrisX **)`, which accepts NULL and nulls
//!   the pointer;
//! - volumes in caller memory are described by an [`IrisVolumeView`];
//!   settings structs carry `struct_size` and reserved words so they can grow;
//! - every pointer is checked for NULL and every length against what it
//!   must hold; no panic crosses the boundary (each body runs in one guard
//!   with `catch_unwind`).
//!
//! # Safety
//! Every function is `unsafe extern "C"` with one contract, stated here once
//! rather than in each function: a non-NULL pointer argument must point to
//! what the function's documentation says (a live handle of the named type,
//! a NUL-terminated string, a buffer of the stated length, a struct whose
//! `struct_size` is set) for the duration of the call, and an output buffer
//! must not overlap an input. That is the only thing the functions cannot
//! check; NULL, lengths, sizes and values are all checked and reported.
#![deny(missing_docs)]
#![allow(
    clippy::missing_safety_doc,
    reason = "the one safety contract of every exported function is in the crate docs"
)]
#![cfg_attr(not(test), warn(clippy::unwrap_used, clippy::expect_used))]

// cbindgen writes the header's items in the order it reads these modules:
// versions and errors, then volumes, tasks and models.
mod abi;

mod version;

mod status;

mod view;

mod volume;

mod task;

mod model;

mod loading;

mod pool;

mod args;

pub use loading::{
    IrisModelBuffers, IrisModelOptions, IrisPrecision, iris_model_load, iris_model_load_buffers,
    iris_model_load_with, iris_model_options_default, iris_model_precision, iris_model_threads,
};
pub use model::{
    IrisEncodeOptions, IrisModality, IrisModel, IrisProgressFn, IrisSegmentOptions,
    iris_encode_options_default, iris_model_free, iris_model_memory_bank, iris_segment,
    iris_segment_options_default, iris_task_check_model, iris_task_encode,
};
pub use pool::{
    IrisPool, IrisRetrievalLevel, IrisRetrieveOptions, iris_pool_add_reference, iris_pool_add_task,
    iris_pool_free, iris_pool_new, iris_pool_size, iris_retrieve, iris_retrieve_options_default,
};
pub use status::{IrisStatus, iris_last_error, iris_status_name};
pub use task::{
    IrisTask, iris_task_class, iris_task_ensemble, iris_task_free, iris_task_load,
    iris_task_load_buffer, iris_task_num_classes, iris_task_save, iris_task_save_buffer,
    iris_task_select_labels, iris_task_select_names,
};
pub use version::{
    IRIS_ABI_VERSION, IRIS_ABI_VERSION_MAJOR, IRIS_ABI_VERSION_MINOR, IRIS_VERSION_MAJOR,
    IRIS_VERSION_MINOR, IRIS_VERSION_PATCH, iris_abi_version, iris_check_abi, iris_version,
    iris_version_string,
};
pub use view::{IrisDataType, IrisVolumeView};
pub use volume::{
    IrisReadOptions, IrisVolume, iris_dice, iris_read_options_default, iris_volume_free,
    iris_volume_read_nifti, iris_volume_read_nifti_with, iris_volume_view,
    iris_volume_write_nifti_labels,
};

// The unit tests share helpers with the integration tests, written against
// the crate's name (`tests/common`).
#[cfg(test)]
extern crate self as iris;
#[cfg(test)]
mod tests;
