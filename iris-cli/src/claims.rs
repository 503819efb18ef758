//! The files one command reads and writes, checked before any work: every
//! output must be a usable file name in an existing folder, and no output
//! may name an input or another output.
//!
//! Two paths name the same file when, after resolving `.`, `..` and
//! symbolic links, they have the same folder and file name (the only way to
//! compare an output that does not exist yet), or when both exist and are
//! one file (same device and inode, on Unix). Outputs are later written by
//! [`crate::commit::Staged`], which renames over its targets: a clash found
//! here is the only way an output could replace an input.

use std::fs;
use std::path::{Path, PathBuf};

use crate::failure::{Failure, USAGE};

/// The inputs and outputs of one command, as the user named them.
#[derive(Debug, Default)]
pub struct Claims {
    claims: Vec<Claim>,
}

/// One file a command reads or writes.
#[derive(Debug)]
struct Claim {
    /// How the user named it: `--image`, `the input`, ...
    what: String,
    /// The path as given.
    path: PathBuf,
    output: bool,
    /// Its canonical folder joined with its file name, and, when it exists,
    /// its canonical path (every symbolic link resolved).
    places: Vec<PathBuf>,
    /// The `(device, inode)` of an existing file.
    file: Option<(u64, u64)>,
    /// For an output that may become one file per class: the stem and
    /// extension of `STEM-LABEL.EXT`.
    per_class: Option<(String, String)>,
}

impl Claims {
    /// Records a file the command reads, named `what` in messages (an
    /// option such as `--image`, or words such as `the input`).
    pub fn input(&mut self, what: &str, path: &Path) {
        self.claims.push(Claim::new(what, path, false, None));
    }

    /// Checks that `path` can be the output `option` (see [`check_output`])
    /// and records it.
    ///
    /// # Errors
    /// As [`check_output`].
    pub fn output(
        &mut self,
        option: &str,
        path: &Path,
        extensions: &[&str],
    ) -> Result<(), Failure> {
        check_output(option, path, extensions)?;
        self.claims.push(Claim::new(option, path, true, None));
        Ok(())
    }

    /// As [`Claims::output`] for an output written to `path` itself or, one
    /// file per class, to `STEM-LABEL.EXT` beside it: the names of every
    /// label are claimed.
    ///
    /// # Errors
    /// As [`check_output`].
    pub fn per_class_output(
        &mut self,
        option: &str,
        path: &Path,
        extensions: &[&str],
        (stem, extension): (&str, &str),
    ) -> Result<(), Failure> {
        check_output(option, path, extensions)?;
        let pattern = (stem.to_owned(), extension.to_owned());
        self.claims
            .push(Claim::new(option, path, true, Some(pattern)));
        Ok(())
    }

    /// Checks that no output names an input or another output.
    ///
    /// # Errors
    /// A [`USAGE`] failure naming both and the paths.
    pub fn check(&self) -> Result<(), Failure> {
        for (i, output) in self.claims.iter().enumerate() {
            if !output.output {
                continue;
            }
            // Each pair of outputs once; every input against every output.
            let mut others = self
                .claims
                .iter()
                .enumerate()
                .filter(|&(j, other)| !other.output || j > i);
            if let Some((_, other)) = others.find(|(_, other)| output.clashes(other)) {
                return Err(clash(output, other));
            }
        }
        Ok(())
    }
}

/// The failure for `output` naming the same file as `other`.
fn clash(output: &Claim, other: &Claim) -> Failure {
    let why = if other.output {
        "each output needs a path of its own"
    } else {
        "an output must never overwrite an input"
    };
    let per_class = [output, other]
        .iter()
        .find_map(|c| {
            let (stem, extension) = c.per_class.as_ref()?;
            Some(format!(
                " ({} writes {stem}-LABEL{extension} per class when there are several)",
                c.what
            ))
        })
        .unwrap_or_default();
    Failure::new(
        USAGE,
        format!(
            "{} {} and {} {} name the same file{per_class}: {why}",
            output.what,
            output.path.display(),
            other.what,
            other.path.display()
        ),
    )
}

impl Claim {
    fn new(what: &str, path: &Path, output: bool, per_class: Option<(String, String)>) -> Claim {
        let mut places = Vec::new();
        if let Some(name) = path.file_name()
            && let Ok(folder) = fs::canonicalize(folder(path))
        {
            places.push(folder.join(name));
        }
        if let Ok(real) = fs::canonicalize(path) {
            places.push(real);
        }
        Claim {
            what: what.to_owned(),
            path: path.to_path_buf(),
            output,
            places,
            file: file_id(path),
            per_class,
        }
    }

    /// Whether `self` and `other` may be one file.
    fn clashes(&self, other: &Claim) -> bool {
        let same_file = self.file.is_some() && self.file == other.file;
        same_file
            || self.places.iter().any(|a| {
                other
                    .places
                    .iter()
                    .any(|b| a == b || self.covers(a, b) || other.covers(b, a))
            })
    }

    /// Whether `place`, one of this claim's, stands for a file per class
    /// of which `candidate` is one.
    fn covers(&self, place: &Path, candidate: &Path) -> bool {
        let Some((stem, extension)) = &self.per_class else {
            return false;
        };
        let Some(name) = candidate.file_name().and_then(|n| n.to_str()) else {
            return false;
        };
        let label = name
            .strip_prefix(stem.as_str())
            .and_then(|rest| rest.strip_prefix('-'))
            .and_then(|rest| rest.strip_suffix(extension.as_str()));
        place.parent() == candidate.parent()
            && label.is_some_and(|l| !l.is_empty() && l.bytes().all(|b| b.is_ascii_digit()))
    }
}

/// The folder `path` is in (`.` for a bare file name).
fn folder(path: &Path) -> &Path {
    match path.parent() {
        Some(p) if !p.as_os_str().is_empty() => p,
        _ => Path::new("."),
    }
}

/// The `(device, inode)` of the existing file `path` leads to.
#[cfg(unix)]
fn file_id(path: &Path) -> Option<(u64, u64)> {
    use std::os::unix::fs::MetadataExt;
    fs::metadata(path).ok().map(|m| (m.dev(), m.ino()))
}

/// Without Unix inodes, files are told apart by their canonical paths only.
#[cfg(not(unix))]
fn file_id(_path: &Path) -> Option<(u64, u64)> {
    None
}

/// Checks before any work that `path` can be the output `option`: its
/// folder exists, it is not a folder itself, and its name ends with one of
/// `extensions` (any, when empty).
///
/// # Errors
/// A [`USAGE`] failure naming the option and the path.
pub fn check_output(option: &str, path: &Path, extensions: &[&str]) -> Result<(), Failure> {
    let usage =
        |problem: String| Failure::new(USAGE, format!("{option} {}: {problem}", path.display()));
    let name = path
        .file_name()
        .map(|n| n.to_string_lossy().to_lowercase())
        .unwrap_or_default();
    if name.is_empty() {
        return Err(usage("not a file name".into()));
    }
    if !extensions.is_empty() && !extensions.iter().any(|e| name.ends_with(e)) {
        return Err(usage(format!(
            "the name must end with {}",
            extensions.join(" or ")
        )));
    }
    let folder = folder(path);
    if !folder.is_dir() {
        return Err(usage(format!("folder {} does not exist", folder.display())));
    }
    if path.is_dir() {
        return Err(usage("that is a folder".into()));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A fresh folder under the system's temporary folder.
    fn scratch(tag: &str) -> PathBuf {
        let dir =
            std::env::temp_dir().join(format!("iris-cli-claims-{tag}-{}", std::process::id()));
        let _ = fs::remove_dir_all(&dir);
        fs::create_dir_all(dir.join("sub")).unwrap();
        dir
    }

    #[test]
    fn outputs_are_checked_before_work() {
        let dir = scratch("names");
        let here = dir.join("seg.nii.gz");
        assert!(check_output("--out", &here, &[".nii", ".nii.gz"]).is_ok());
        let e = check_output("--out", &dir.join("seg.png"), &[".nii", ".nii.gz"]).unwrap_err();
        assert_eq!(e.code, USAGE);
        assert!(e.message.contains(".nii or .nii.gz"), "{}", e.message);
        let e = check_output("--out", Path::new("/no/such/folder/x.nii"), &[]).unwrap_err();
        assert!(e.message.contains("/no/such/folder"), "{}", e.message);
        let e = check_output("--out", &dir.join("sub"), &[]).unwrap_err();
        assert!(e.message.ends_with("that is a folder"), "{}", e.message);
        fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn an_output_may_not_name_an_input_however_spelt() {
        let dir = scratch("clash");
        let image = dir.join("q.nii");
        fs::write(&image, b"image").unwrap();
        let link = dir.join("link.nii");
        #[cfg(unix)]
        std::os::unix::fs::symlink(&image, &link).unwrap();
        #[cfg(not(unix))]
        fs::copy(&image, &link).unwrap();
        for (spelling, clash) in [
            (dir.join("sub/../q.nii"), true),
            (dir.join("./q.nii"), true),
            (link.clone(), cfg!(unix)),
            (dir.join("other.nii"), false),
        ] {
            let mut claims = Claims::default();
            claims.input("--image", &image);
            claims.output("--out", &spelling, &[]).unwrap();
            let result = claims.check();
            assert_eq!(result.is_err(), clash, "{}", spelling.display());
            if let Err(e) = result {
                assert_eq!(e.code, USAGE);
                assert!(e.message.starts_with("--out "), "{}", e.message);
                assert!(e.message.contains(" and --image "), "{}", e.message);
                assert!(e.message.ends_with("overwrite an input"), "{}", e.message);
            }
        }
        // Inputs may repeat; outputs may not.
        let mut claims = Claims::default();
        claims.input("--image", &image);
        claims.input("--ref-image", &image);
        assert!(claims.check().is_ok());
        let new = dir.join("new.nii");
        claims.output("--out", &new, &[]).unwrap();
        claims
            .output("--preview", &dir.join("sub/../new.nii"), &[])
            .unwrap();
        let e = claims.check().unwrap_err();
        assert!(e.message.starts_with("--out "), "{}", e.message);
        assert!(e.message.ends_with("a path of its own"), "{}", e.message);
        fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn a_per_class_output_claims_every_label() {
        let dir = scratch("per-class");
        let claims_with = |other: &str| {
            let mut claims = Claims::default();
            let p = dir.join("p.nii.gz");
            claims
                .per_class_output("--probabilities", &p, &[], ("p", ".nii.gz"))
                .unwrap();
            claims.output("--out", &dir.join(other), &[]).unwrap();
            claims.check()
        };
        for clash in ["p.nii.gz", "p-1.nii.gz", "sub/../p-12.nii.gz"] {
            let e = claims_with(clash).unwrap_err();
            assert!(
                e.message
                    .contains("--probabilities writes p-LABEL.nii.gz per class"),
                "{}",
                e.message
            );
        }
        for fine in [
            "p-.nii.gz",
            "p-1x.nii.gz",
            "p-1.nii",
            "q-1.nii.gz",
            "sub/p-1.nii.gz",
        ] {
            assert!(claims_with(fine).is_ok(), "{fine}");
        }
        fs::remove_dir_all(&dir).unwrap();
    }
}
