// The ABI version of libiris. This file is also `include!`d by build.rs,
// which names the shared library after the major number (libiris.so.0).

/// ABI major version: changes only with an incompatible change to an
/// existing function or struct, and names the shared library
/// (`libiris.so.<major>`). A program runs only on a library of its major.
pub const IRIS_ABI_VERSION_MAJOR: u32 = 0;

/// ABI minor version: grows when functions or struct fields are added. A
/// program runs on a library whose minor is at least its own.
pub const IRIS_ABI_VERSION_MINOR: u32 = 4;
