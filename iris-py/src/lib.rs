//! `iris._native`: the Python extension module of iris (PyO3).
//!
//! This crate is the thin layer between Python and `iris-core`'s public API;
//! the Python package `iris` (in `python/iris`) wraps it with nibabel
//! support, NIfTI axis order and docstrings. Conventions of this layer:
//!
//! - Volumes cross it in iris's own order: C-order `[D, H, W]` arrays
//!   (`float32` images, `uint16` label maps) with a 4x4 `float64` affine
//!   acting on `[d, h, w]` (see `iris_core::volume`). The Python package
//!   converts from and to nibabel's `(i, j, k)` order.
//! - Inputs are copied into Rust-owned volumes before the engine runs, and
//!   the engine runs with the GIL released (`Python::detach`), so other
//!   Python threads run meanwhile and may call the same `Model`.
//! - Every `iris_core::Error` becomes an instance of the matching class of
//!   `iris._errors` with the error's own message (the `errors` module).
#![deny(missing_docs)]

mod convert;
mod errors;
mod model;
mod task;

use pyo3::prelude::*;

/// The extension module `iris._native`.
#[pymodule]
fn _native(m: &Bound<'_, PyModule>) -> PyResult<()> {
    m.add("__version__", env!("CARGO_PKG_VERSION"))?;
    m.add_class::<model::Model>()?;
    m.add_class::<model::SegmentOptions>()?;
    m.add_class::<task::Task>()?;
    m.add_class::<task::PoolReference>()?;
    m.add_function(wrap_pyfunction!(task::ensemble, m)?)?;
    m.add_function(wrap_pyfunction!(convert::read_image, m)?)?;
    m.add_function(wrap_pyfunction!(convert::read_labels, m)?)?;
    m.add_function(wrap_pyfunction!(convert::decode_image, m)?)?;
    m.add_function(wrap_pyfunction!(convert::decode_labels, m)?)?;
    m.add_function(wrap_pyfunction!(convert::write_image, m)?)?;
    m.add_function(wrap_pyfunction!(convert::write_labels, m)?)?;
    m.add_function(wrap_pyfunction!(convert::dice, m)?)?;
    Ok(())
}
