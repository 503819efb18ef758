//! What the C ABI's tests share: the thread's last error message, and the
//! check of a status with the words its message must hold. The crate's unit
//! tests compile this module too (`src/tests.rs`), where `iris` names the
//! crate itself.

use core::ffi::CStr;

use iris::{IrisStatus, iris_last_error};

/// The calling thread's last error message.
pub fn last_error() -> String {
    // SAFETY: iris_last_error always returns a valid NUL-terminated string.
    unsafe { CStr::from_ptr(iris_last_error()) }
        .to_string_lossy()
        .into_owned()
}

/// Asserts `status` and that the thread's message contains every `words`.
#[track_caller]
pub fn expect(status: IrisStatus, want: IrisStatus, words: &[&str]) {
    let message = last_error();
    assert_eq!(status, want, "message: {message}");
    for w in words {
        assert!(message.contains(w), "{message:?} lacks {w:?}");
    }
}
