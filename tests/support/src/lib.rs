//! What the tests of the iris crates share, without burn, so that the
//! tests of `iris-ffi`, `iris-cli` and `iris-eval` build on `iris-core`
//! alone:
//!
//! - [`files`]: the real volumes of `data/`, python with nibabel as an
//!   independent reference, temporary folders (std only; `iris-core`'s own
//!   tests compile this module too);
//! - [`fixture`]: phantom volumes, and a model folder of known maths
//!   (`iris_core::engine::testing::SyntheticModel`) with the phantoms on
//!   disk, for the C ABI's and the `iris` command's tests.
//!
//! Comparisons with the burn model (`iris-train`) live in `iris-tests`
//! (`tests/engine`).

pub mod files;
pub mod fixture;

pub use files::{Python, TempDir, data_dir, data_file, python_with_nibabel, repo_root};
