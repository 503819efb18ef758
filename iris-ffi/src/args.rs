//! Checked conversions of C arguments: every pointer is tested for NULL and
//! every length against what it must hold before anything is read.
//!
//! The functions are `unsafe` because a non-NULL pointer is trusted to point
//! at what the C declaration says (that cannot be checked); everything that
//! *can* be checked is, and answered with a [`Failure`].

use core::ffi::{CStr, c_char};
use std::path::PathBuf;

use crate::status::{Failure, FfiResult};

/// `&*p`, or a NULL-pointer failure naming `name`.
///
/// # Safety
/// A non-NULL `p` must point to a valid `T` that outlives `'a` and is not
/// written meanwhile.
pub(crate) unsafe fn borrow<'a, T>(p: *const T, name: &str) -> FfiResult<&'a T> {
    // SAFETY: the caller guarantees that a non-NULL `p` is valid for 'a.
    unsafe { p.as_ref() }.ok_or_else(|| Failure::null(name))
}

/// `&mut *p`, or a NULL-pointer failure naming `name`.
///
/// # Safety
/// A non-NULL `p` must point to a valid, writable `T`, used by nothing else
/// during `'a`.
pub(crate) unsafe fn borrow_mut<'a, T>(p: *mut T, name: &str) -> FfiResult<&'a mut T> {
    // SAFETY: the caller guarantees that a non-NULL `p` is valid and unaliased for 'a.
    unsafe { p.as_mut() }.ok_or_else(|| Failure::null(name))
}

/// A constructor's out-parameter: checks it, sets `*out = NULL` (so that a
/// failure never leaves a stale pointer behind) and returns it for the
/// result.
///
/// # Safety
/// As [`borrow_mut`].
pub(crate) unsafe fn out_handle<'a, T>(out: *mut *mut T, name: &str) -> FfiResult<&'a mut *mut T> {
    // SAFETY: forwarded to the caller.
    let slot = unsafe { borrow_mut(out, name) }?;
    *slot = core::ptr::null_mut();
    Ok(slot)
}

/// Moves `value` to the heap and hands it to C through `slot`; C frees it
/// with the matching `iris_*_free`, which calls [`free_handle`].
pub(crate) fn give<T>(slot: &mut *mut T, value: T) {
    *slot = Box::into_raw(Box::new(value));
}

/// Frees a handle made by [`give`] and nulls the caller's pointer; NULL and
/// `*p == NULL` do nothing.
///
/// # Safety
/// A non-NULL `p` must point to a pointer that is NULL or came from [`give`]
/// and has not been freed.
pub(crate) unsafe fn free_handle<T>(p: *mut *mut T) {
    // SAFETY: the caller guarantees `p` is NULL or valid.
    let Some(slot) = (unsafe { p.as_mut() }) else {
        return;
    };
    let handle = core::mem::replace(slot, core::ptr::null_mut());
    if !handle.is_null() {
        // SAFETY: `handle` came from `Box::into_raw` in `give` and is freed once:
        // the caller's pointer is already NULL.
        drop(unsafe { Box::from_raw(handle) });
    }
}

/// A NUL-terminated UTF-8 string.
///
/// # Safety
/// A non-NULL `p` must point to a NUL-terminated string valid for `'a`.
pub(crate) unsafe fn text<'a>(p: *const c_char, name: &str) -> FfiResult<&'a str> {
    if p.is_null() {
        return Err(Failure::null(name));
    }
    // SAFETY: non-NULL and NUL-terminated per the caller's guarantee.
    let c = unsafe { CStr::from_ptr(p) };
    c.to_str()
        .map_err(|e| Failure::invalid(format!("`{name}` is not valid UTF-8: {e}")))
}

/// A NUL-terminated file path: any bytes on Unix, UTF-8 elsewhere.
///
/// # Safety
/// As [`text`].
pub(crate) unsafe fn path(p: *const c_char, name: &str) -> FfiResult<PathBuf> {
    if p.is_null() {
        return Err(Failure::null(name));
    }
    // SAFETY: non-NULL and NUL-terminated per the caller's guarantee.
    let c = unsafe { CStr::from_ptr(p) };
    if c.is_empty() {
        return Err(Failure::invalid(format!("`{name}` is an empty path")));
    }
    #[cfg(unix)]
    {
        use std::os::unix::ffi::OsStrExt;
        Ok(PathBuf::from(std::ffi::OsStr::from_bytes(c.to_bytes())))
    }
    #[cfg(not(unix))]
    {
        // SAFETY: forwarded to the caller.
        unsafe { text(p, name) }.map(PathBuf::from)
    }
}

/// `len` elements at `p`; `p` may be NULL only when `len` is 0.
///
/// # Safety
/// A non-NULL `p` must point to `len` valid `T`s that outlive `'a`.
pub(crate) unsafe fn slice<'a, T>(p: *const T, len: usize, name: &str) -> FfiResult<&'a [T]> {
    if len == 0 {
        return Ok(&[]);
    }
    if p.is_null() {
        return Err(Failure::null(name));
    }
    check_span::<T>(len, name)?;
    // SAFETY: non-NULL, `len` elements per the caller's guarantee, and the
    // span fits in isize (checked above).
    Ok(unsafe { core::slice::from_raw_parts(p, len) })
}

/// `len` writable bytes at `p`; `p` may be NULL only when `len` is 0.
///
/// # Safety
/// A non-NULL `p` must point to `len` writable bytes, used by nothing else
/// during `'a`.
pub(crate) unsafe fn bytes_mut<'a>(p: *mut u8, len: usize, name: &str) -> FfiResult<&'a mut [u8]> {
    if len == 0 {
        return Ok(&mut []);
    }
    if p.is_null() {
        return Err(Failure::null(name));
    }
    check_span::<u8>(len, name)?;
    // SAFETY: non-NULL, `len` writable bytes per the caller's guarantee.
    Ok(unsafe { core::slice::from_raw_parts_mut(p, len) })
}

/// Refuses a length whose size in bytes does not fit in `isize` (no real
/// buffer is that large, so it is a wrong argument).
fn check_span<T>(len: usize, name: &str) -> FfiResult {
    len.checked_mul(size_of::<T>())
        .filter(|&n| isize::try_from(n).is_ok())
        .map(drop)
        .ok_or_else(|| Failure::invalid(format!("`{name}`: length {len} is larger than memory")))
}

/// A C length (`uint64_t`) as `usize`.
pub(crate) fn length(n: u64, name: &str) -> FfiResult<usize> {
    usize::try_from(n).map_err(|_| {
        Failure::invalid(format!(
            "`{name}` = {n} does not fit in this platform's memory"
        ))
    })
}

/// A struct that starts with `uint32_t struct_size`, which callers set to
/// `sizeof` of the struct as their header declares it. A size smaller than
/// this library's struct is refused (it cannot hold every field); a larger
/// one (a newer header) is accepted and its known fields are read.
pub(crate) trait Versioned: Copy {
    /// The struct's C name, for messages.
    const NAME: &'static str;
}

/// Checks the `struct_size` of a [`Versioned`] struct without reading the
/// rest (an output struct may be uninitialised).
///
/// # Safety
/// A non-NULL `p` must point to a struct whose first field is an
/// initialised `u32` holding its size.
pub(crate) unsafe fn check_size<T: Versioned>(p: *const T, name: &str) -> FfiResult {
    if p.is_null() {
        return Err(Failure::null(name));
    }
    // SAFETY: every Versioned struct starts with `uint32_t struct_size`, and
    // a non-NULL `p` points to such a struct.
    let size = unsafe { p.cast::<u32>().read_unaligned() };
    if (size as usize) < size_of::<T>() {
        return Err(Failure::invalid(format!(
            "`{name}->struct_size` is {size}, expected sizeof({}) = {} (set it to sizeof the struct)",
            T::NAME,
            size_of::<T>()
        )));
    }
    Ok(())
}

/// Reads a [`Versioned`] struct after checking its `struct_size`.
///
/// # Safety
/// A non-NULL `p` must point to an initialised struct of at least
/// `size_of::<T>()` bytes whose first field is a `u32` holding its size.
pub(crate) unsafe fn versioned<T: Versioned>(p: *const T, name: &str) -> FfiResult<T> {
    // SAFETY: forwarded to the caller.
    unsafe { check_size(p, name) }?;
    // SAFETY: the struct has at least `struct_size` >= size_of::<T>() initialised bytes.
    Ok(unsafe { p.read_unaligned() })
}

/// Checks the reserved words of an options struct: they must be zero, so
/// that a field added there later is never silently ignored by an older
/// library.
pub(crate) fn check_reserved(reserved: &[u64], name: &str) -> FfiResult {
    match reserved.iter().position(|&r| r != 0) {
        None => Ok(()),
        Some(i) => Err(Failure::invalid(format!(
            "`{name}.reserved[{i}]` is {}, expected 0 (initialise the struct with its _default function)",
            reserved[i]
        ))),
    }
}
