//! The one error type of `iris-train`.

use std::fmt;

/// Everything that can go wrong in `iris-train`, with the offending field or
/// tensor and what was expected.
#[derive(Debug, Clone, PartialEq, Eq)]
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
        }
    }
}

impl std::error::Error for Error {}
