//! The one error type of `iris-train`.

use std::fmt;
use std::path::PathBuf;

use crate::training::Setting;

/// Result alias used throughout `iris-train`.
pub type Result<T, E = Error> = std::result::Result<T, E>;

/// Everything that can go wrong in `iris-train`, with the offending field,
/// tensor or file and what was expected.
#[derive(Debug)]
#[non_exhaustive]
pub enum Error {
    /// A configuration value is out of range.
    Config {
        /// The field, e.g. `"patch_size"`.
        field: &'static str,
        /// What the field must satisfy.
        expected: String,
        /// The value found.
        found: String,
    },
    /// A tensor handed to the model has the wrong shape.
    Shape {
        /// The tensor, e.g. `"reference masks"`.
        tensor: &'static str,
        /// The expected shape, axes named (`[B, K, D, H, W]`).
        expected: String,
        /// The shape found.
        found: String,
    },
    /// An `iris-core` operation failed (NIfTI reading, resampling, an
    /// invalid argument, a `.irisemb` file), with that error's own details.
    Core(iris_core::Error),
    /// A training dataset file is missing, unreadable or inconsistent.
    Dataset {
        /// The file (or folder) at fault.
        path: PathBuf,
        /// What is wrong with it, with the values found.
        reason: String,
    },
    /// The loss is NaN or infinite (the weights were left unchanged).
    Diverged {
        /// The loss value.
        loss: f32,
    },
    /// A checkpoint file could not be written or read.
    Checkpoint {
        /// The file or folder at fault.
        path: PathBuf,
        /// What went wrong.
        reason: String,
    },
    /// The model could not be exported to ONNX (a part with no ONNX
    /// equivalent, a model that does not match its configuration, or a
    /// file that could not be written).
    Export {
        /// The part of the model or the file at fault.
        what: String,
        /// What went wrong.
        reason: String,
    },
    /// A setting of a training run that the run cannot follow: invalid
    /// (see [`TrainingConfig::validate`](crate::training::TrainingConfig::validate)),
    /// given to a resumed run with another value than the one it was saved
    /// with ([`TrainingConfig::check_given`](crate::training::TrainingConfig::check_given)),
    /// or a curriculum bound that no class of the training data meets.
    Setting {
        /// The setting.
        setting: Setting,
        /// Its value at fault (JSON; for a resumed run, the value given).
        value: String,
        /// What is wrong, with the values concerned.
        reason: String,
    },
    /// A reference (PyTorch) checkpoint that cannot be imported: the reason
    /// names the key, what was expected and what was found.
    Import {
        /// The checkpoint file.
        path: PathBuf,
        /// What is wrong.
        reason: String,
    },
}

impl Error {
    /// An [`Error::Dataset`] about `path`.
    pub(crate) fn dataset(path: impl Into<PathBuf>, reason: impl Into<String>) -> Self {
        Error::Dataset {
            path: path.into(),
            reason: reason.into(),
        }
    }

    /// An invalid argument or data-generation setting, reported as
    /// `iris-core` reports invalid arguments.
    pub(crate) fn invalid(name: &'static str, reason: impl Into<String>) -> Self {
        Error::Core(iris_core::Error::invalid(name, reason))
    }
}

impl fmt::Display for Error {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::Config {
                field,
                expected,
                found,
            } => write!(
                f,
                "invalid model configuration: `{field}` must be {expected}, found {found}"
            ),
            Self::Shape {
                tensor,
                expected,
                found,
            } => write!(f, "{tensor} must have shape {expected}, found {found:?}"),
            Self::Core(e) => e.fmt(f),
            Self::Dataset { path, reason } => write!(f, "{}: {reason}", path.display()),
            Self::Diverged { loss } => write!(
                f,
                "training diverged: the loss is {loss} (try a lower learning rate)"
            ),
            Self::Checkpoint { path, reason } => {
                write!(f, "checkpoint {}: {reason}", path.display())
            }
            Self::Export { what, reason } => write!(f, "ONNX export, {what}: {reason}"),
            Self::Setting {
                setting,
                value,
                reason,
            } => write!(f, "run setting `{}` = {value}: {reason}", setting.field()),
            Self::Import { path, reason } => write!(f, "import {}: {reason}", path.display()),
        }
    }
}

impl std::error::Error for Error {
    fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
        match self {
            Self::Core(e) => Some(e),
            _ => None,
        }
    }
}

impl From<iris_core::Error> for Error {
    fn from(e: iris_core::Error) -> Self {
        Error::Core(e)
    }
}
