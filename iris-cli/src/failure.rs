//! Failures with the exit code scripts can rely on.

use std::path::Path;

use iris_core::Error;

/// The command failed while running (the engine failed, an output could not
/// be written).
pub const RUNTIME: u8 = 1;
/// Bad or missing arguments (clap uses the same code for its own errors).
pub const USAGE: u8 = 2;
/// An input file is unreadable or unusable: not NIfTI or `.irisemb`,
/// corrupt, grids that do not match, an empty mask, a class that is not
/// there, NaNs.
pub const BAD_INPUT: u8 = 3;
/// No model at the path, a model that cannot be loaded, or an embedding made
/// by another model.
pub const MODEL: u8 = 4;

/// The exit codes as `--help` and the README state them.
pub const EXIT_CODES_HELP: &str = "\
Exit status:
  0  success
  1  runtime failure (the engine failed, an output could not be written)
  2  usage error (bad or missing arguments)
  3  bad input file (unreadable, not NIfTI or .irisemb, corrupt, grids that
     do not match, an empty reference mask, a class that is not there, NaNs)
  4  model problem (no model at the path, a model that cannot be loaded, a
     task embedding made by another model)
Every failure prints one line on stderr naming the file and the problem, and
leaves every file as it was: the outputs of a command are written together or
not at all, and an output may not name an input or another output (2).";

/// A failure: the exit code and the one line printed on stderr.
#[derive(Debug)]
pub struct Failure {
    /// One of [`RUNTIME`], [`USAGE`], [`BAD_INPUT`], [`MODEL`].
    pub code: u8,
    /// What went wrong, naming the file involved.
    pub message: String,
}

impl Failure {
    /// A failure with an explicit code.
    pub fn new(code: u8, message: impl Into<String>) -> Failure {
        Failure {
            code,
            message: message.into(),
        }
    }

    /// `error` met while reading or checking the input file `path`: the code
    /// follows the kind of error ([`code_of`]), the message names the file.
    pub fn input(path: &Path, error: Error) -> Failure {
        Failure::new(code_of(&error), naming(path, &error))
    }
}

/// The exit code of an `iris_core` error met on user input:
/// [`MODEL`] for an embedding of another model, [`BAD_INPUT`] for anything
/// wrong with the data, [`RUNTIME`] for the rest.
pub fn code_of(error: &Error) -> u8 {
    match error {
        Error::ModelMismatch { .. } => MODEL,
        Error::Format(_)
        | Error::ShapeMismatch { .. }
        | Error::InvalidArgument { .. }
        | Error::TooLarge { .. }
        | Error::NonFinite { .. }
        | Error::EmptyMask { .. }
        | Error::Io { .. }
        | Error::Nifti { .. } => BAD_INPUT,
        // `Error::Model` here is a graph that failed to run; a model that
        // cannot be loaded is reported as MODEL where it is loaded.
        _ => RUNTIME,
    }
}

/// The error's text, starting with `path` unless the error already does.
fn naming(path: &Path, error: &Error) -> String {
    match error {
        Error::Io { .. } | Error::Nifti { .. } | Error::Model { .. } => error.to_string(),
        _ => format!("{}: {error}", path.display()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn errors_map_to_codes_and_name_the_file() {
        let f = Failure::input(
            Path::new("t.irisemb"),
            Error::invalid("class", "no class 3"),
        );
        assert_eq!(
            (f.code, f.message.as_str()),
            (BAD_INPUT, "t.irisemb: invalid class: no class 3")
        );
        let mismatch = Error::ModelMismatch {
            expected: "aa".into(),
            found: "bb".into(),
        };
        assert_eq!(Failure::input(Path::new("t"), mismatch).code, MODEL);
        let io = Error::Io {
            path: "x.nii".into(),
            source: std::io::Error::other("disk full"),
        };
        let f = Failure::input(Path::new("x.nii"), io);
        assert_eq!(
            (f.code, f.message.as_str()),
            (BAD_INPUT, "x.nii: disk full")
        );
    }
}
