//! `iris_core::Error` to Python exceptions.
//!
//! The classes live in `iris/_errors.py` (so that they can also derive from
//! `ValueError` or `OSError`); this module picks the class of each error
//! kind, raises it with the error's `Display` text, the very message the
//! `iris` command prints, and attaches the variant's data as attributes.

use iris_core::Error;
use pyo3::exceptions::PyRuntimeError;
use pyo3::prelude::*;
use pyo3::types::PyDict;

/// The name of the `iris._errors` class for `error`.
fn class_name(error: &Error) -> &'static str {
    match error {
        Error::Format(_) => "FormatError",
        Error::ModelMismatch { .. } => "ModelMismatchError",
        Error::ShapeMismatch { .. } => "ShapeMismatchError",
        Error::InvalidArgument { .. } => "InvalidArgumentError",
        Error::TooLarge { .. } => "TooLargeError",
        Error::NonFinite { .. } => "NonFiniteError",
        Error::EmptyMask { .. } => "EmptyMaskError",
        Error::Cancelled => "CancelledError",
        Error::Io { .. } => "IoError",
        Error::Nifti { .. } => "NiftiError",
        Error::Model { .. } => "ModelError",
        // `Error` is non-exhaustive: a kind added later is still an IrisError.
        _ => "IrisError",
    }
}

/// The variant's data, as keyword attributes of the exception.
fn details<'py>(py: Python<'py>, error: &Error) -> PyResult<Bound<'py, PyDict>> {
    let d = PyDict::new(py);
    match error {
        Error::Format(format) => d.set_item("reason", format.to_string())?,
        Error::ModelMismatch { expected, found } => {
            d.set_item("expected", expected)?;
            d.set_item("found", found)?;
        }
        Error::ShapeMismatch {
            what,
            expected,
            found,
        } => {
            d.set_item("what", what)?;
            d.set_item("expected", expected.clone())?;
            d.set_item("found", found.clone())?;
        }
        Error::InvalidArgument { name, reason } => {
            d.set_item("name", *name)?;
            d.set_item("reason", reason)?;
        }
        Error::TooLarge { what, detail } => {
            d.set_item("what", *what)?;
            d.set_item("detail", detail)?;
        }
        Error::NonFinite { what, count } => {
            d.set_item("what", *what)?;
            d.set_item("count", *count)?;
        }
        Error::EmptyMask { label } => d.set_item("label", *label)?,
        Error::Io { path, source } => {
            d.set_item("path", path.display().to_string())?;
            d.set_item("reason", source.to_string())?;
            if let Some(code) = source.raw_os_error() {
                d.set_item("errno", code)?;
            }
        }
        Error::Nifti { path, reason } | Error::Model { path, reason } => {
            d.set_item("path", path.display().to_string())?;
            d.set_item("reason", reason)?;
        }
        _ => {}
    }
    Ok(d)
}

/// `error` as the matching `iris._errors` exception.
pub fn to_py(error: Error) -> PyErr {
    Python::attach(|py| {
        build(py, &error).unwrap_or_else(|lookup| {
            // Only when the Python package is broken (no iris._errors):
            // still an exception with the message, never a crash.
            let err = PyRuntimeError::new_err(error.to_string());
            err.set_cause(py, Some(lookup));
            err
        })
    })
}

fn build(py: Python<'_>, error: &Error) -> PyResult<PyErr> {
    let class = py.import("iris._errors")?.getattr(class_name(error))?;
    let instance = class.call((error.to_string(),), Some(&details(py, error)?))?;
    Ok(PyErr::from_value(instance))
}

/// `Result<T, iris_core::Error>` to `PyResult<T>`.
pub trait IntoPy<T> {
    /// Converts the error, if any, with [`to_py`].
    fn py_err(self) -> PyResult<T>;
}

impl<T> IntoPy<T> for Result<T, Error> {
    fn py_err(self) -> PyResult<T> {
        self.map_err(to_py)
    }
}

/// An `iris_core::Error::InvalidArgument`, raised as Python's
/// `InvalidArgumentError`, for checks made in this layer.
pub fn invalid(name: &'static str, reason: impl Into<String>) -> PyErr {
    to_py(Error::invalid(name, reason))
}
