//! Loading an `IrisModel`: from a model folder or from memory buffers, with
//! the number of threads it may use and the precision it runs in.

use core::ffi::c_char;

use iris_core::engine::{ModelBuffers, ModelOptions, Precision};
use iris_core::{Error, Model};

use crate::args::{self, Versioned, check_reserved};
use crate::model::IrisModel;
use crate::status::{Failure, FfiResult, IrisStatus, guard};

/// The arithmetic of a model's convolutions (the `precision` field of
/// `IrisModelOptions`). ABI 0.4.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum IrisPrecision {
    /// f32 throughout: agrees with the training code and onnxruntime to
    /// 1e-4.
    F32 = 0,
    /// The products of the 3x3x3 convolutions with 16 or more channels
    /// (most of a window's work) in bfloat16, summed in f32: about 1.3
    /// times faster per window on CPUs with AVX-512 BF16, probabilities
    /// within about 0.04 of f32's (measured on random weights). Other CPUs
    /// run f32 (`iris_model_precision`).
    Bf16 = 1,
}

/// Settings of `iris_model_load_with` and `iris_model_load_buffers`.
/// Initialise with `iris_model_options_default`, then change fields. ABI 0.3;
/// `precision` ABI 0.4 (zero in 0.3's reserved words: f32).
#[repr(C)]
#[derive(Clone, Copy, Debug)]
pub struct IrisModelOptions {
    /// `sizeof(IrisModelOptions)` (set by the `_default` function).
    pub struct_size: u32,
    /// Threads of the model's own pool, on which all of its work runs;
    /// models do not share pools. 0 (the default): one per core.
    pub threads: u32,
    /// An `IrisPrecision`. Default `IRIS_PRECISION_F32`.
    pub precision: u32,
    /// Must be zero.
    pub reserved0: u32,
    /// Must be zero (room for later fields).
    pub reserved: [u64; 6],
}

impl Versioned for IrisModelOptions {
    const NAME: &'static str = "IrisModelOptions";
}

/// The files of a model folder in memory, for `iris_model_load_buffers`:
/// `manifest.json`, the three ONNX graphs and, when the manifest names one,
/// the memory bank. Every pointer with a non-zero length must be non-NULL.
/// The bytes are copied; the caller may free them once the call returns.
/// ABI 0.3.
#[repr(C)]
#[derive(Clone, Copy, Debug)]
pub struct IrisModelBuffers {
    /// `sizeof(IrisModelBuffers)`.
    pub struct_size: u32,
    /// Must be zero.
    pub reserved0: u32,
    /// `manifest.json` (UTF-8, not NUL-terminated).
    pub manifest: *const u8,
    /// Bytes at `manifest`.
    pub manifest_len: usize,
    /// `encoder.onnx`.
    pub encoder: *const u8,
    /// Bytes at `encoder`.
    pub encoder_len: usize,
    /// `task_encoder.onnx`.
    pub task_encoder: *const u8,
    /// Bytes at `task_encoder`.
    pub task_encoder_len: usize,
    /// `decoder.onnx`.
    pub decoder: *const u8,
    /// Bytes at `decoder`.
    pub decoder_len: usize,
    /// The memory bank `.irisemb`; NULL with length 0 when the manifest
    /// names none (required when it names one).
    pub memory_bank: *const u8,
    /// Bytes at `memory_bank`.
    pub memory_bank_len: usize,
    /// Must be zero (room for later fields).
    pub reserved: [u64; 4],
}

impl Versioned for IrisModelBuffers {
    const NAME: &'static str = "IrisModelBuffers";
}

/// Fills `options` with the defaults of every field (including
/// `struct_size`). ABI 0.3.
///
/// Returns `IRIS_OK` or `IRIS_ERROR_NULL_POINTER`.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn iris_model_options_default(options: *mut IrisModelOptions) -> IrisStatus {
    guard(|| {
        // SAFETY: `options` is valid or NULL per this function's contract
        // (a caller struct of this header's size; written, not read).
        let options = unsafe { args::borrow_mut(options, "options") }?;
        *options = IrisModelOptions {
            struct_size: size_of::<IrisModelOptions>() as u32,
            threads: 0,
            precision: IrisPrecision::F32 as u32,
            reserved0: 0,
            reserved: [0; 6],
        };
        Ok(())
    })
}

/// Loads a model folder (`manifest.json` and three ONNX graphs, as written
/// by `iris-train export`), with one thread per core. Optimised plans are
/// built on first use.
///
/// `dir`: NUL-terminated folder name. On success `*out` is a new model that
/// the caller owns and frees with `iris_model_free`; on failure `*out` is
/// NULL.
///
/// Returns `IRIS_OK`, `IRIS_ERROR_NULL_POINTER`, `IRIS_ERROR_IO` (no
/// manifest), `IRIS_ERROR_FORMAT` (a manifest or graph that breaks the
/// model-folder contract).
#[unsafe(no_mangle)]
pub unsafe extern "C" fn iris_model_load(
    dir: *const c_char,
    out: *mut *mut IrisModel,
) -> IrisStatus {
    // SAFETY: forwarded; NULL options are the defaults.
    unsafe { iris_model_load_with(dir, core::ptr::null(), out) }
}

/// `iris_model_load` with settings: `options` (nullable; NULL for the
/// defaults) sets the number of threads. ABI 0.3.
///
/// Returns as `iris_model_load`; `IRIS_ERROR_INVALID_ARGUMENT` for options
/// with a wrong `struct_size` or non-zero reserved words.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn iris_model_load_with(
    dir: *const c_char,
    options: *const IrisModelOptions,
    out: *mut *mut IrisModel,
) -> IrisStatus {
    guard(|| {
        // SAFETY: pointers are valid or NULL per this function's contract.
        let slot = unsafe { args::out_handle(out, "out") }?;
        // SAFETY: as above.
        let dir = unsafe { args::path(dir, "dir") }?;
        // SAFETY: as above.
        let options = unsafe { model_options(options) }?;
        let model = Model::load_with(&dir, &options).map_err(load_failure)?;
        args::give(slot, IrisModel { model });
        Ok(())
    })
}

/// Loads a model from its files' bytes (`buffers`, see `IrisModelBuffers`)
/// with the checks of `iris_model_load`; messages name the files as
/// `<memory>/encoder.onnx` and so on. `options` is nullable. ABI 0.3.
///
/// Returns `IRIS_OK`, `IRIS_ERROR_NULL_POINTER`,
/// `IRIS_ERROR_INVALID_ARGUMENT` (a struct's size or reserved words),
/// `IRIS_ERROR_FORMAT` (a manifest or graph that breaks the model-folder
/// contract, a memory bank missing that the manifest names or given when it
/// names none).
#[unsafe(no_mangle)]
pub unsafe extern "C" fn iris_model_load_buffers(
    buffers: *const IrisModelBuffers,
    options: *const IrisModelOptions,
    out: *mut *mut IrisModel,
) -> IrisStatus {
    guard(|| {
        // SAFETY: pointers are valid or NULL per this function's contract.
        let slot = unsafe { args::out_handle(out, "out") }?;
        // SAFETY: as above.
        let b = unsafe { args::versioned(buffers, "buffers") }?;
        if b.reserved0 != 0 {
            return Err(Failure::invalid(format!(
                "`buffers.reserved0` is {}, expected 0",
                b.reserved0
            )));
        }
        check_reserved(&b.reserved, "buffers")?;
        // SAFETY: each pointer holds its length per the struct's contract.
        let part = |p, len, name| unsafe { args::slice(p, len, name) };
        let bank = part(b.memory_bank, b.memory_bank_len, "buffers.memory_bank")?;
        let buffers = ModelBuffers {
            manifest: part(b.manifest, b.manifest_len, "buffers.manifest")?,
            encoder: part(b.encoder, b.encoder_len, "buffers.encoder")?,
            task_encoder: part(b.task_encoder, b.task_encoder_len, "buffers.task_encoder")?,
            decoder: part(b.decoder, b.decoder_len, "buffers.decoder")?,
            memory_bank: (!bank.is_empty()).then_some(bank),
        };
        // SAFETY: as above.
        let options = unsafe { model_options(options) }?;
        let model = Model::from_buffers(&buffers, &options).map_err(load_failure)?;
        args::give(slot, IrisModel { model });
        Ok(())
    })
}

/// The number of threads of `model`'s pool, in `*out`. ABI 0.3.
///
/// Returns `IRIS_OK` or `IRIS_ERROR_NULL_POINTER`.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn iris_model_threads(model: *const IrisModel, out: *mut u32) -> IrisStatus {
    guard(|| {
        // SAFETY: pointers are valid or NULL per this function's contract.
        let model = unsafe { args::borrow(model, "model") }?;
        // SAFETY: as above.
        let out = unsafe { args::borrow_mut(out, "out") }?;
        *out = u32::try_from(model.model.threads()).unwrap_or(u32::MAX);
        Ok(())
    })
}

/// The precision `model` runs in, an `IrisPrecision`, in `*out`: the one
/// its options asked for where this CPU runs it, else `IRIS_PRECISION_F32`.
/// ABI 0.4.
///
/// Returns `IRIS_OK` or `IRIS_ERROR_NULL_POINTER`.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn iris_model_precision(
    model: *const IrisModel,
    out: *mut u32,
) -> IrisStatus {
    guard(|| {
        // SAFETY: pointers are valid or NULL per this function's contract.
        let model = unsafe { args::borrow(model, "model") }?;
        // SAFETY: as above.
        let out = unsafe { args::borrow_mut(out, "out") }?;
        *out = match model.model.precision() {
            Precision::Float32 => IrisPrecision::F32,
            Precision::Bfloat16 => IrisPrecision::Bf16,
        } as u32;
        Ok(())
    })
}

/// The engine's settings from a caller's `IrisModelOptions` (NULL: the
/// defaults).
///
/// # Safety
/// A non-NULL `options` must point to a valid `IrisModelOptions`.
unsafe fn model_options(options: *const IrisModelOptions) -> FfiResult<ModelOptions> {
    if options.is_null() {
        return Ok(ModelOptions::default());
    }
    // SAFETY: a non-NULL `options` is a valid struct (the caller's guarantee).
    let o = unsafe { args::versioned(options, "options") }?;
    if o.reserved0 != 0 {
        return Err(Failure::invalid(format!(
            "`options.reserved0` is {}, expected 0",
            o.reserved0
        )));
    }
    check_reserved(&o.reserved, "options")?;
    let precision = match o.precision {
        p if p == IrisPrecision::F32 as u32 => Precision::Float32,
        p if p == IrisPrecision::Bf16 as u32 => Precision::Bfloat16,
        other => {
            return Err(Failure::invalid(format!(
                "`options.precision` is {other}, expected IRIS_PRECISION_F32 (0) or _BF16 (1)"
            )));
        }
    };
    Ok(ModelOptions {
        threads: o.threads as usize,
        precision,
    })
}

/// A model-folder failure while loading is a malformed folder, not an
/// inference failure.
pub(crate) fn load_failure(e: Error) -> Failure {
    match e {
        Error::Model { .. } => Failure::new(IrisStatus::IrisErrorFormat, e.to_string()),
        other => other.into(),
    }
}
