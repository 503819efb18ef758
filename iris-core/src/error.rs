//! The one error type of `iris-core`.
//!
//! Every fallible function returns [`Result<T>`]. Variants carry the data a
//! user needs to fix the problem (which field, which offset, expected versus
//! found), and their [`Display`](core::fmt::Display) text says it in words.
//! Errors about the bytes of a `.irisemb` file are grouped in [`FormatError`]
//! so that a caller can tell "this file is damaged" from "this call was wrong".

use alloc::string::String;
use alloc::vec::Vec;
use core::fmt;

/// Result alias used throughout `iris-core`.
pub type Result<T, E = Error> = core::result::Result<T, E>;

/// Everything that can go wrong in `iris-core`.
#[derive(Debug)]
#[non_exhaustive]
pub enum Error {
    /// A `.irisemb` byte stream is malformed (truncated, corrupt, wrong version...).
    Format(FormatError),
    /// A task embedding was produced by a different model than the one asked to use it.
    ModelMismatch {
        /// Fingerprint of the model in use, as lowercase hex.
        expected: String,
        /// Fingerprint stored in the embedding, as lowercase hex.
        found: String,
    },
    /// Two things whose shapes must agree do not (volume vs geometry, image vs label...).
    ShapeMismatch {
        /// What was being compared, e.g. "label map vs image".
        what: String,
        /// The shape that was required.
        expected: Vec<usize>,
        /// The shape that was given.
        found: Vec<usize>,
    },
    /// An argument is outside its valid range.
    InvalidArgument {
        /// Name of the argument or field.
        name: &'static str,
        /// Why the value is not accepted, including the value.
        reason: String,
    },
    /// A size computation overflowed or exceeds a stated limit.
    TooLarge {
        /// What was being sized.
        what: &'static str,
        /// Human-readable detail (the dimensions involved, the limit).
        detail: String,
    },
    /// Input data contains NaN or infinite values where finite values are required.
    NonFinite {
        /// Which input.
        what: &'static str,
        /// Number of non-finite values found.
        count: usize,
    },
    /// A mask that must contain foreground is empty.
    EmptyMask {
        /// The label value that has no voxels (0: no non-zero label at all).
        label: u32,
    },
    /// The caller asked to stop (`SegmentOptions::cancel`); nothing was
    /// returned or written.
    Cancelled,
    /// An operating-system level I/O error, with the path involved.
    #[cfg(feature = "std")]
    Io {
        /// The file being read or written.
        path: std::path::PathBuf,
        /// The underlying error.
        source: std::io::Error,
    },
    /// A NIfTI file could not be read or written.
    #[cfg(feature = "std")]
    Nifti {
        /// The file involved.
        path: std::path::PathBuf,
        /// What is wrong with it.
        reason: String,
    },
    /// A model folder (its `manifest.json` or an ONNX graph) cannot be
    /// loaded, or a graph failed to run.
    #[cfg(feature = "std")]
    Model {
        /// The file involved (the manifest or the graph).
        path: std::path::PathBuf,
        /// What is wrong, in words.
        reason: String,
    },
}

/// Ways in which the bytes of a `.irisemb` file can be wrong.
///
/// Each variant is distinct so that tools (and tests) can tell a truncated
/// download from bit rot from a file written by a newer version of iris.
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub enum FormatError {
    /// The data ends before a section that the header says is there.
    Truncated {
        /// The section being read.
        section: &'static str,
        /// Byte offset where the section starts.
        offset: usize,
        /// Bytes the section needs.
        needed: usize,
        /// Bytes left in the input.
        available: usize,
    },
    /// The first bytes are not the `.irisemb` magic.
    BadMagic {
        /// The bytes found instead (up to 8).
        found: Vec<u8>,
    },
    /// The file's format version is not one this library reads.
    UnsupportedVersion {
        /// The version in the file.
        found: u16,
        /// The newest version this library reads.
        supported: u16,
    },
    /// The checksum stored in the file does not match its contents.
    ChecksumMismatch {
        /// Checksum stored in the file.
        stored: u32,
        /// Checksum computed over the bytes read.
        computed: u32,
    },
    /// A field has a value that is not allowed.
    InvalidField {
        /// Field name as in the format specification.
        field: &'static str,
        /// Byte offset of the field.
        offset: usize,
        /// What is wrong, with the value found.
        reason: String,
    },
    /// Bytes remain after the end of the last section.
    TrailingBytes {
        /// Offset where the expected end is.
        offset: usize,
        /// Number of extra bytes.
        extra: usize,
    },
}

impl fmt::Display for Error {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Error::Format(e) => write!(f, "invalid .irisemb data: {e}"),
            Error::ModelMismatch { expected, found } => write!(
                f,
                "task embedding was made by another model (embedding fingerprint {found}, \
                 model fingerprint {expected}); re-encode the reference with this model"
            ),
            Error::ShapeMismatch {
                what,
                expected,
                found,
            } => write!(
                f,
                "shape mismatch for {what}: expected {expected:?}, found {found:?}"
            ),
            Error::InvalidArgument { name, reason } => write!(f, "invalid {name}: {reason}"),
            Error::TooLarge { what, detail } => write!(f, "{what} is too large: {detail}"),
            Error::NonFinite { what, count } => {
                write!(f, "{what} contains {count} NaN or infinite value(s)")
            }
            Error::Cancelled => write!(f, "cancelled by the caller"),
            Error::EmptyMask { label: 0 } => {
                write!(f, "the reference mask has no foreground (non-zero) voxels")
            }
            Error::EmptyMask { label } => {
                write!(f, "label {label} has no voxels in the reference mask")
            }
            #[cfg(feature = "std")]
            Error::Io { path, source } => write!(f, "{}: {source}", path.display()),
            #[cfg(feature = "std")]
            Error::Nifti { path, reason } | Error::Model { path, reason } => {
                write!(f, "{}: {reason}", path.display())
            }
        }
    }
}

impl fmt::Display for FormatError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            FormatError::Truncated {
                section,
                offset,
                needed,
                available,
            } => write!(
                f,
                "truncated in {section} at byte {offset}: needs {needed} bytes, {available} left"
            ),
            FormatError::BadMagic { found } => {
                write!(f, "not an .irisemb file (magic bytes {found:02x?})")
            }
            FormatError::UnsupportedVersion { found, supported } => write!(
                f,
                "format version {found} is not supported (this library reads up to version {supported})"
            ),
            FormatError::ChecksumMismatch { stored, computed } => write!(
                f,
                "checksum mismatch (stored {stored:#010x}, computed {computed:#010x}): the file is corrupt"
            ),
            FormatError::InvalidField {
                field,
                offset,
                reason,
            } => write!(f, "field `{field}` at byte {offset}: {reason}"),
            FormatError::TrailingBytes { offset, extra } => {
                write!(
                    f,
                    "{extra} unexpected byte(s) after the end at byte {offset}"
                )
            }
        }
    }
}

impl core::error::Error for FormatError {}

impl core::error::Error for Error {
    fn source(&self) -> Option<&(dyn core::error::Error + 'static)> {
        match self {
            Error::Format(e) => Some(e),
            #[cfg(feature = "std")]
            Error::Io { source, .. } => Some(source),
            _ => None,
        }
    }
}

impl From<FormatError> for Error {
    fn from(e: FormatError) -> Self {
        Error::Format(e)
    }
}

impl Error {
    /// Shorthand for [`Error::InvalidArgument`].
    pub fn invalid(name: &'static str, reason: impl Into<String>) -> Self {
        Error::InvalidArgument {
            name,
            reason: reason.into(),
        }
    }
}
