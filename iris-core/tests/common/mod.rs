//! Support shared by the integration tests: the real volumes in `data/`,
//! python with nibabel as an independent reference, and temporary folders,
//! from the one source every crate's tests use (iris-core cannot depend on
//! the support crate: see there).

#[path = "../../../tests/support/src/files.rs"]
mod files;

pub use files::*;
