//! Library and ABI versions, and the start-up compatibility check.

use core::ffi::c_char;

pub use crate::abi::{IRIS_ABI_VERSION_MAJOR, IRIS_ABI_VERSION_MINOR};
use crate::status::{Failure, IrisStatus, guard, shield};

/// Major version of the iris library this header belongs to.
pub const IRIS_VERSION_MAJOR: u32 = 0;
/// Minor version of the iris library this header belongs to.
pub const IRIS_VERSION_MINOR: u32 = 1;
/// Patch version of the iris library this header belongs to.
pub const IRIS_VERSION_PATCH: u32 = 0;

/// The ABI version this header describes, packed as
/// `(IRIS_ABI_VERSION_MAJOR << 16) | IRIS_ABI_VERSION_MINOR`. Pass it to
/// `iris_check_abi` at start-up.
pub const IRIS_ABI_VERSION: u32 = (IRIS_ABI_VERSION_MAJOR << 16) | IRIS_ABI_VERSION_MINOR;

/// Parses a decimal `u32` at compile time (Cargo's version numbers).
const fn parse_u32(s: &str) -> u32 {
    let bytes = s.as_bytes();
    let mut value = 0u32;
    let mut i = 0;
    while i < bytes.len() {
        assert!(bytes[i].is_ascii_digit(), "version is not a number");
        value = value * 10 + (bytes[i] - b'0') as u32;
        i += 1;
    }
    value
}

// The header's version macros are literals (cbindgen cannot evaluate
// `env!`); the build fails if they drift from Cargo.toml.
const _: () = assert!(
    IRIS_VERSION_MAJOR == parse_u32(env!("CARGO_PKG_VERSION_MAJOR"))
        && IRIS_VERSION_MINOR == parse_u32(env!("CARGO_PKG_VERSION_MINOR"))
        && IRIS_VERSION_PATCH == parse_u32(env!("CARGO_PKG_VERSION_PATCH")),
    "IRIS_VERSION_* in iris-ffi/src/version.rs differ from the crate version in Cargo.toml"
);

/// The version of the loaded library (not of the header the program was
/// built with), packed as `(major << 16) | (minor << 8) | patch`.
#[unsafe(no_mangle)]
pub extern "C" fn iris_version() -> u32 {
    shield(0, || {
        (IRIS_VERSION_MAJOR << 16) | (IRIS_VERSION_MINOR << 8) | IRIS_VERSION_PATCH
    })
}

/// The version of the loaded library as text, e.g. "0.1.0". Static: never
/// free it.
#[unsafe(no_mangle)]
pub extern "C" fn iris_version_string() -> *const c_char {
    const TEXT: &str = concat!(env!("CARGO_PKG_VERSION"), "\0");
    shield(c"".as_ptr(), || TEXT.as_ptr().cast())
}

/// The ABI version of the loaded library, packed as `IRIS_ABI_VERSION` is.
#[unsafe(no_mangle)]
pub extern "C" fn iris_abi_version() -> u32 {
    shield(0, || IRIS_ABI_VERSION)
}

/// Checks at start-up that the loaded library can serve a program built
/// with this header: call `iris_check_abi(IRIS_ABI_VERSION)`. Compatible
/// means the same ABI major and a library minor at least the header's.
///
/// Returns `IRIS_OK`, or `IRIS_ERROR_VERSION` with both versions in
/// `iris_last_error()`.
#[unsafe(no_mangle)]
pub extern "C" fn iris_check_abi(header_abi: u32) -> IrisStatus {
    guard(|| {
        let (major, minor) = (header_abi >> 16, header_abi & 0xffff);
        if major == IRIS_ABI_VERSION_MAJOR && minor <= IRIS_ABI_VERSION_MINOR {
            return Ok(());
        }
        Err(Failure::new(
            IrisStatus::IrisErrorVersion,
            format!(
                "the program was built for iris ABI {major}.{minor} but the loaded libiris {} \
                 provides ABI {IRIS_ABI_VERSION_MAJOR}.{IRIS_ABI_VERSION_MINOR} (needs the same \
                 major and a minor of at least {minor})",
                env!("CARGO_PKG_VERSION")
            ),
        ))
    })
}
