//! Status codes, the per-thread error message, and the guard every exported
//! function runs its body in.

use core::ffi::{CStr, c_char, c_int};
use std::cell::RefCell;
use std::ffi::CString;
use std::panic::{AssertUnwindSafe, catch_unwind};

use iris_core::Error;

/// What an iris call returned. Every function that can fail returns one;
/// `IRIS_OK` (0) is success and every other value is an error whose
/// details `iris_last_error()` gives. The values are fixed and will never
/// be renumbered; new codes may be added at the end.
///
/// cbindgen:prefix-with-name=false
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[allow(
    clippy::enum_variant_names,
    reason = "the C names are IRIS_OK, IRIS_ERROR_...: cbindgen turns IrisOk into IRIS_OK"
)]
pub enum IrisStatus {
    /// Success.
    IrisOk = 0,
    /// A required pointer argument was NULL.
    IrisErrorNullPointer = 1,
    /// An argument or struct field is outside its valid range (zero
    /// dimension, unknown data type, label that does not fit, wrong
    /// `struct_size`, invalid UTF-8...).
    IrisErrorInvalidArgument = 2,
    /// A caller buffer is shorter than needed; where the function has a
    /// size out-parameter it now holds the size required.
    IrisErrorBufferTooSmall = 3,
    /// A file could not be opened, read or written.
    IrisErrorIo = 4,
    /// A file or buffer is malformed: a damaged `.irisemb`, a NIfTI file
    /// that cannot be read, a model folder that breaks its manifest.
    IrisErrorFormat = 5,
    /// A task embedding was made by another model than the one given.
    IrisErrorModelMismatch = 6,
    /// Shapes that must agree do not (image vs label map grids, parts of
    /// an ensemble with different stage shapes).
    IrisErrorShape = 7,
    /// The inference engine failed while running the model.
    IrisErrorInference = 8,
    /// A bug inside libiris was caught before it could cross into the
    /// caller; the message says where. Please report it.
    IrisErrorPanic = 9,
    /// The library's ABI is not compatible with the header the caller was
    /// built with (see `iris_check_abi`).
    IrisErrorVersion = 10,
    /// A size is above a limit (more than 2^31 voxels, dimensions whose
    /// product overflows).
    IrisErrorTooLarge = 11,
    /// An input holds NaN or infinite values.
    IrisErrorNonFinite = 12,
    /// A reference label map has no voxel of a requested class, or a Dice
    /// score was asked for a label absent from both maps.
    IrisErrorEmptyMask = 13,
    /// The caller's `cancel` callback asked to stop; nothing was returned
    /// or written (ABI 0.2).
    IrisErrorCancelled = 14,
}

impl IrisStatus {
    const ALL: [IrisStatus; 15] = [
        IrisStatus::IrisOk,
        IrisStatus::IrisErrorNullPointer,
        IrisStatus::IrisErrorInvalidArgument,
        IrisStatus::IrisErrorBufferTooSmall,
        IrisStatus::IrisErrorIo,
        IrisStatus::IrisErrorFormat,
        IrisStatus::IrisErrorModelMismatch,
        IrisStatus::IrisErrorShape,
        IrisStatus::IrisErrorInference,
        IrisStatus::IrisErrorPanic,
        IrisStatus::IrisErrorVersion,
        IrisStatus::IrisErrorTooLarge,
        IrisStatus::IrisErrorNonFinite,
        IrisStatus::IrisErrorEmptyMask,
        IrisStatus::IrisErrorCancelled,
    ];

    /// The C name, NUL-terminated.
    fn name(self) -> &'static CStr {
        match self {
            IrisStatus::IrisOk => c"IRIS_OK",
            IrisStatus::IrisErrorNullPointer => c"IRIS_ERROR_NULL_POINTER",
            IrisStatus::IrisErrorInvalidArgument => c"IRIS_ERROR_INVALID_ARGUMENT",
            IrisStatus::IrisErrorBufferTooSmall => c"IRIS_ERROR_BUFFER_TOO_SMALL",
            IrisStatus::IrisErrorIo => c"IRIS_ERROR_IO",
            IrisStatus::IrisErrorFormat => c"IRIS_ERROR_FORMAT",
            IrisStatus::IrisErrorModelMismatch => c"IRIS_ERROR_MODEL_MISMATCH",
            IrisStatus::IrisErrorShape => c"IRIS_ERROR_SHAPE",
            IrisStatus::IrisErrorInference => c"IRIS_ERROR_INFERENCE",
            IrisStatus::IrisErrorPanic => c"IRIS_ERROR_PANIC",
            IrisStatus::IrisErrorVersion => c"IRIS_ERROR_VERSION",
            IrisStatus::IrisErrorTooLarge => c"IRIS_ERROR_TOO_LARGE",
            IrisStatus::IrisErrorNonFinite => c"IRIS_ERROR_NON_FINITE",
            IrisStatus::IrisErrorEmptyMask => c"IRIS_ERROR_EMPTY_MASK",
            IrisStatus::IrisErrorCancelled => c"IRIS_ERROR_CANCELLED",
        }
    }
}

/// A failed call: the status to return and the message to keep.
#[derive(Debug)]
pub(crate) struct Failure {
    pub(crate) status: IrisStatus,
    pub(crate) message: String,
}

/// What the body of an exported function returns.
pub(crate) type FfiResult<T = ()> = Result<T, Failure>;

impl Failure {
    pub(crate) fn new(status: IrisStatus, message: impl Into<String>) -> Failure {
        Failure {
            status,
            message: message.into(),
        }
    }

    /// `name` was NULL.
    pub(crate) fn null(name: &str) -> Failure {
        Failure::new(
            IrisStatus::IrisErrorNullPointer,
            format!("`{name}` is NULL"),
        )
    }

    pub(crate) fn invalid(message: impl Into<String>) -> Failure {
        Failure::new(IrisStatus::IrisErrorInvalidArgument, message)
    }

    /// A caller buffer `name` holds `got` units but `expected` are needed.
    pub(crate) fn too_small(name: &str, expected: u64, got: u64, unit: &str) -> Failure {
        Failure::new(
            IrisStatus::IrisErrorBufferTooSmall,
            format!("`{name}` is too small: expected {expected} {unit}, got {got}"),
        )
    }
}

impl From<Error> for Failure {
    fn from(e: Error) -> Failure {
        let status = match &e {
            Error::Format(_) | Error::Nifti { .. } => IrisStatus::IrisErrorFormat,
            Error::ModelMismatch { .. } => IrisStatus::IrisErrorModelMismatch,
            Error::ShapeMismatch { .. } => IrisStatus::IrisErrorShape,
            Error::InvalidArgument { .. } => IrisStatus::IrisErrorInvalidArgument,
            Error::TooLarge { .. } => IrisStatus::IrisErrorTooLarge,
            Error::NonFinite { .. } => IrisStatus::IrisErrorNonFinite,
            Error::EmptyMask { .. } => IrisStatus::IrisErrorEmptyMask,
            Error::Io { .. } => IrisStatus::IrisErrorIo,
            Error::Cancelled => IrisStatus::IrisErrorCancelled,
            // The engine's own failures, and any variant added later.
            _ => IrisStatus::IrisErrorInference,
        };
        Failure::new(status, e.to_string())
    }
}

thread_local! {
    /// The message of the last failed call on this thread.
    static LAST_ERROR: RefCell<CString> = RefCell::new(CString::default());
}

fn set_last_error(message: &str) {
    // An interior NUL would end the C string early; show it instead.
    let text = CString::new(message.replace('\0', "\\0")).unwrap_or_default();
    // During thread teardown the slot may be gone: the message is dropped.
    let _ = LAST_ERROR.try_with(|last| *last.borrow_mut() = text);
}

/// Runs the body of an exported function: a returned [`Failure`] becomes
/// its status and this thread's last error, and a panic is caught (it must
/// never unwind into C) and reported as `IRIS_ERROR_PANIC` with its message.
pub(crate) fn guard(body: impl FnOnce() -> FfiResult) -> IrisStatus {
    let failure = match catch_unwind(AssertUnwindSafe(body)) {
        Ok(Ok(())) => return IrisStatus::IrisOk,
        Ok(Err(failure)) => failure,
        Err(payload) => {
            let what = payload
                .downcast_ref::<&str>()
                .map(|s| s.to_string())
                .or_else(|| payload.downcast_ref::<String>().cloned())
                .unwrap_or_else(|| "a panic with no message".to_string());
            Failure::new(
                IrisStatus::IrisErrorPanic,
                format!("internal error (panic) in libiris: {what}"),
            )
        }
    };
    set_last_error(&failure.message);
    failure.status
}

/// [`guard`] for the few functions that return a value instead of a status
/// and cannot fail: a panic (which would be a bug) gives `fallback`.
pub(crate) fn shield<T>(fallback: T, body: impl FnOnce() -> T) -> T {
    catch_unwind(AssertUnwindSafe(body)).unwrap_or(fallback)
}

/// The message of the last call that failed on the calling thread, in
/// English and UTF-8, naming the argument or field at fault and what was
/// expected versus found; "" when no call has failed on this thread.
///
/// Ownership: the string belongs to libiris. It stays valid until the next
/// iris call on the same thread; copy it to keep it. Each thread has its
/// own message, so errors on one thread never overwrite another's.
#[unsafe(no_mangle)]
pub extern "C" fn iris_last_error() -> *const c_char {
    // While the thread is being torn down there is no message to give.
    shield(c"".as_ptr(), || {
        LAST_ERROR
            .try_with(|last| last.borrow().as_ptr())
            .unwrap_or(c"".as_ptr())
    })
}

/// The name of a status code as a static string ("IRIS_OK",
/// "IRIS_ERROR_NULL_POINTER"...), or "IRIS_ERROR_UNKNOWN" for a value that
/// is not a status code. Never NULL; the string is static (never free it).
#[unsafe(no_mangle)]
pub extern "C" fn iris_status_name(status: c_int) -> *const c_char {
    shield(c"IRIS_ERROR_UNKNOWN".as_ptr(), || {
        IrisStatus::ALL
            .iter()
            .find(|s| **s as c_int == status)
            .map_or(c"IRIS_ERROR_UNKNOWN", |s| s.name())
            .as_ptr()
    })
}
