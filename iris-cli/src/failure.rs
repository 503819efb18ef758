//! Failures with the exit code scripts can rely on, and output files that
//! never outlive a failed run.

use std::fs;
use std::io::Write;
use std::path::{Path, PathBuf};

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
leaves no output file behind.";

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

    /// `error` met while writing the output `path`: always [`RUNTIME`].
    pub fn output(path: &Path, error: Error) -> Failure {
        Failure::new(RUNTIME, naming(path, &error))
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

/// Checks before any work that `path` can be an output: its folder exists
/// and its name ends with one of `extensions` (any, when empty).
///
/// # Errors
/// A [`USAGE`] failure naming the option and the path.
pub fn check_output(option: &str, path: &Path, extensions: &[&str]) -> Result<(), Failure> {
    let name = path
        .file_name()
        .map(|n| n.to_string_lossy().to_lowercase())
        .unwrap_or_default();
    if name.is_empty() {
        return Err(Failure::new(
            USAGE,
            format!("{option} {}: not a file name", path.display()),
        ));
    }
    if !extensions.is_empty() && !extensions.iter().any(|e| name.ends_with(e)) {
        return Err(Failure::new(
            USAGE,
            format!(
                "{option} {}: the name must end with {}",
                path.display(),
                extensions.join(" or ")
            ),
        ));
    }
    let folder = match path.parent() {
        Some(p) if !p.as_os_str().is_empty() => p,
        _ => Path::new("."),
    };
    if !folder.is_dir() {
        return Err(Failure::new(
            USAGE,
            format!(
                "{option} {}: folder {} does not exist",
                path.display(),
                folder.display()
            ),
        ));
    }
    Ok(())
}

/// The output files of one run. Each is written atomically; if the run
/// fails before [`Outputs::keep`], those already written are removed, so a
/// failed run leaves nothing behind.
#[derive(Debug, Default)]
pub struct Outputs {
    written: Vec<PathBuf>,
}

impl Outputs {
    /// Records that `path` was written by this run.
    pub fn add(&mut self, path: &Path) {
        self.written.push(path.to_path_buf());
    }

    /// Writes `bytes` to `path` atomically (temporary file in the same
    /// folder, synced, renamed) and records it.
    ///
    /// # Errors
    /// A [`RUNTIME`] failure naming `path`.
    pub fn write_bytes(&mut self, path: &Path, bytes: &[u8]) -> Result<(), Failure> {
        let name = path.file_name().unwrap_or_default().to_string_lossy();
        let tmp = path.with_file_name(format!(".{name}.tmp-{}", std::process::id()));
        let result = fs::File::create(&tmp)
            .and_then(|mut f| {
                f.write_all(bytes)?;
                f.sync_all()
            })
            .and_then(|()| fs::rename(&tmp, path));
        if let Err(e) = result {
            // Best effort: the temporary file may not exist.
            let _ = fs::remove_file(&tmp);
            return Err(Failure::new(RUNTIME, format!("{}: {e}", path.display())));
        }
        self.add(path);
        Ok(())
    }

    /// The run succeeded: keep every file.
    pub fn keep(mut self) {
        self.written.clear();
    }
}

impl Drop for Outputs {
    fn drop(&mut self) {
        for path in &self.written {
            // Best effort: report nothing more than the failure already printed.
            let _ = fs::remove_file(path);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn outputs_are_removed_unless_kept() {
        let dir = std::env::temp_dir().join(format!("iris-cli-outputs-{}", std::process::id()));
        fs::create_dir_all(&dir).unwrap();
        let (a, b) = (dir.join("a.bin"), dir.join("b.bin"));
        {
            let mut out = Outputs::default();
            out.write_bytes(&a, b"first").unwrap();
            assert_eq!(fs::read(&a).unwrap(), b"first");
            // Dropped without keep(): a failed run.
        }
        assert!(!a.exists());
        let mut out = Outputs::default();
        out.write_bytes(&b, b"second").unwrap();
        out.keep();
        assert_eq!(fs::read(&b).unwrap(), b"second");
        // Only the named file is left: no temporary.
        assert_eq!(fs::read_dir(&dir).unwrap().count(), 1);
        fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn outputs_are_checked_before_work() {
        let here = std::env::temp_dir().join("seg.nii.gz");
        assert!(check_output("--out", &here, &[".nii", ".nii.gz"]).is_ok());
        let e = check_output(
            "--out",
            &here.with_file_name("seg.png"),
            &[".nii", ".nii.gz"],
        )
        .unwrap_err();
        assert_eq!(e.code, USAGE);
        assert!(e.message.contains(".nii or .nii.gz"), "{}", e.message);
        let e = check_output("--out", Path::new("/no/such/folder/x.nii"), &[]).unwrap_err();
        assert!(e.message.contains("/no/such/folder"), "{}", e.message);
    }

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
        let f = Failure::output(Path::new("x.nii"), io);
        assert_eq!((f.code, f.message.as_str()), (RUNTIME, "x.nii: disk full"));
    }
}
