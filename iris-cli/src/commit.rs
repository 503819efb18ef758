//! All-or-nothing outputs: a command writes each of its outputs to a
//! temporary file beside it, and only when every one was written are they
//! renamed over their targets, together. A failure at any point leaves every
//! existing file as it was, in content and existence, and no temporary
//! behind.

use std::fs;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};

use crate::failure::{Failure, RUNTIME};

/// Temporary names of this process are numbered from here.
static NEXT: AtomicU64 = AtomicU64::new(0);

/// The outputs of one command, written but not yet in place.
///
/// [`Staged::write`] and [`Staged::write_bytes`] write an output to a
/// temporary file in its target's folder; [`Staged::commit`] renames them
/// all over their targets, putting back the files it replaced if one rename
/// fails. Dropping a `Staged` that was not committed removes its temporary
/// files, so a command that fails half way touches nothing.
///
/// Only a crash between two renames of `commit` can leave a target missing
/// (its old content is then in a `.iris-old-*` file beside it).
#[derive(Debug, Default)]
pub struct Staged {
    files: Vec<Entry>,
}

/// One output: where it goes and where it is written first.
#[derive(Debug)]
struct Entry {
    target: PathBuf,
    temporary: PathBuf,
}

impl Staged {
    /// Writes the output `target` through `write`, which is given the
    /// temporary path to write (it keeps the target's extensions, for
    /// writers that go by them).
    ///
    /// # Errors
    /// A [`RUNTIME`] failure naming `target`.
    pub fn write(
        &mut self,
        target: &Path,
        write: impl FnOnce(&Path) -> iris_core::Result<()>,
    ) -> Result<(), Failure> {
        let temporary = self.stage(target);
        write(&temporary).map_err(|e| match e {
            iris_core::Error::Io { source, .. } => cannot_write(target, source),
            iris_core::Error::Nifti { reason, .. } => cannot_write(target, reason),
            other => cannot_write(target, other),
        })
    }

    /// Writes `bytes` as the output `target`.
    ///
    /// # Errors
    /// A [`RUNTIME`] failure naming `target`.
    pub fn write_bytes(&mut self, target: &Path, bytes: &[u8]) -> Result<(), Failure> {
        let temporary = self.stage(target);
        fs::File::create(&temporary)
            .and_then(|mut f| {
                f.write_all(bytes)?;
                f.sync_all()
            })
            .map_err(|e| cannot_write(target, e))
    }

    /// Puts every output in place, or none: a target that existed is kept
    /// aside until all renames succeeded, and put back if one fails.
    ///
    /// # Errors
    /// A [`RUNTIME`] failure naming the target that could not be replaced;
    /// every target then is as it was before the command.
    pub fn commit(mut self) -> Result<(), Failure> {
        let mut done: Vec<(&Path, Option<PathBuf>)> = Vec::new();
        for entry in &self.files {
            match entry.replace() {
                Ok(old) => done.push((&entry.target, old)),
                Err(e) => {
                    for (target, old) in done.into_iter().rev() {
                        // Best effort, like every clean-up: report the failure
                        // that caused it.
                        let _ = match old {
                            Some(old) => fs::rename(old, target),
                            None => fs::remove_file(target),
                        };
                    }
                    return Err(cannot_write(&entry.target, e));
                }
            }
        }
        for old in done.into_iter().filter_map(|(_, old)| old) {
            let _ = fs::remove_file(old);
        }
        self.files.clear();
        Ok(())
    }

    /// A new temporary path for `target`, removed on drop until committed.
    fn stage(&mut self, target: &Path) -> PathBuf {
        let temporary = beside(target, "out");
        self.files.push(Entry {
            target: target.to_path_buf(),
            temporary: temporary.clone(),
        });
        temporary
    }
}

impl Entry {
    /// Renames the temporary over the target, first moving an existing
    /// target file aside; returns where it went. On failure the target is
    /// as it was.
    fn replace(&self) -> std::io::Result<Option<PathBuf>> {
        // A folder is never moved aside: the rename then fails.
        let existing = fs::symlink_metadata(&self.target).is_ok_and(|m| !m.is_dir());
        let old = if existing {
            let old = beside(&self.target, "old");
            fs::rename(&self.target, &old)?;
            Some(old)
        } else {
            None
        };
        if let Err(e) = fs::rename(&self.temporary, &self.target) {
            if let Some(old) = &old {
                let _ = fs::rename(old, &self.target);
            }
            return Err(e);
        }
        Ok(old)
    }
}

impl Drop for Staged {
    fn drop(&mut self) {
        for entry in &self.files {
            // Best effort: the file may never have been created.
            let _ = fs::remove_file(&entry.temporary);
        }
    }
}

/// A hidden name in `target`'s folder, unique to this process and call,
/// `.iris-KIND-PID-N` followed by the target's extensions (`.nii.gz`):
/// short, whatever the length of the target's name.
fn beside(target: &Path, kind: &str) -> PathBuf {
    let name = target
        .file_name()
        .map(|n| n.to_string_lossy())
        .unwrap_or_default();
    let bare = name.trim_start_matches('.');
    let extensions = bare.find('.').map_or("", |at| &bare[at..]);
    let n = NEXT.fetch_add(1, Ordering::Relaxed);
    target.with_file_name(format!(
        ".iris-{kind}-{}-{n}{extensions}",
        std::process::id()
    ))
}

/// The failure to write `target`.
fn cannot_write(target: &Path, detail: impl std::fmt::Display) -> Failure {
    Failure::new(RUNTIME, format!("{}: {detail}", target.display()))
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A fresh folder under the system's temporary folder.
    fn scratch(tag: &str) -> PathBuf {
        let dir =
            std::env::temp_dir().join(format!("iris-cli-commit-{tag}-{}", std::process::id()));
        let _ = fs::remove_dir_all(&dir);
        fs::create_dir_all(&dir).unwrap();
        dir
    }

    /// The names in `dir`, sorted.
    fn names(dir: &Path) -> Vec<String> {
        let mut names: Vec<String> = fs::read_dir(dir)
            .unwrap()
            .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
            .collect();
        names.sort();
        names
    }

    #[test]
    fn temporaries_keep_the_extensions() {
        let t = beside(Path::new("out/seg.nii.gz"), "out");
        let name = t.file_name().unwrap().to_string_lossy().into_owned();
        assert!(name.starts_with(".iris-out-"), "{name}");
        assert!(name.ends_with(".nii.gz"), "{name}");
        assert_eq!(t.parent(), Some(Path::new("out")));
        let hidden = beside(Path::new(".x"), "old");
        assert!(
            !hidden.to_string_lossy().ends_with(".x"),
            "{}",
            hidden.display()
        );
    }

    #[test]
    fn nothing_changes_until_commit_and_all_at_once() {
        let dir = scratch("all");
        let (a, b) = (dir.join("a.bin"), dir.join("b.bin"));
        fs::write(&a, b"old a").unwrap();
        {
            let mut staged = Staged::default();
            staged.write_bytes(&a, b"new a").unwrap();
            staged.write_bytes(&b, b"new b").unwrap();
            assert_eq!(fs::read(&a).unwrap(), b"old a");
            assert!(!b.exists());
            // Dropped without commit: a failed run.
        }
        assert_eq!(names(&dir), ["a.bin"]);
        assert_eq!(fs::read(&a).unwrap(), b"old a");
        let mut staged = Staged::default();
        staged.write_bytes(&a, b"new a").unwrap();
        staged.write_bytes(&b, b"new b").unwrap();
        staged.commit().unwrap();
        assert_eq!(names(&dir), ["a.bin", "b.bin"]);
        assert_eq!(fs::read(&a).unwrap(), b"new a");
        assert_eq!(fs::read(&b).unwrap(), b"new b");
        fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn a_failed_write_or_rename_puts_everything_back() {
        let dir = scratch("back");
        let (a, b) = (dir.join("a.bin"), dir.join("b.bin"));
        fs::write(&a, b"old a").unwrap();
        // A write fails: into a folder that does not exist.
        let mut staged = Staged::default();
        staged.write_bytes(&a, b"new a").unwrap();
        staged.write_bytes(&b, b"new b").unwrap();
        let e = staged
            .write_bytes(&dir.join("no/such.bin"), b"x")
            .unwrap_err();
        assert_eq!(e.code, RUNTIME);
        assert!(e.message.contains("no/such.bin"), "{}", e.message);
        drop(staged);
        assert_eq!(names(&dir), ["a.bin"]);
        // The last rename fails: its target is a folder (with a file, so
        // that no rename can replace it).
        let folder = dir.join("c.bin");
        fs::create_dir_all(folder.join("inside")).unwrap();
        let mut staged = Staged::default();
        staged.write_bytes(&a, b"new a").unwrap();
        staged.write_bytes(&b, b"new b").unwrap();
        staged.write_bytes(&folder, b"new c").unwrap();
        let e = staged.commit().unwrap_err();
        assert!(
            e.message.starts_with(&folder.display().to_string()),
            "{}",
            e.message
        );
        assert_eq!(names(&dir), ["a.bin", "c.bin"]);
        assert_eq!(fs::read(&a).unwrap(), b"old a");
        assert_eq!(names(&folder), ["inside"]);
        // A writer's error names the target, not the temporary.
        let mut staged = Staged::default();
        let e = staged
            .write(&a, |tmp| {
                Err(iris_core::Error::Io {
                    path: tmp.to_path_buf(),
                    source: std::io::Error::other("disk full"),
                })
            })
            .unwrap_err();
        assert_eq!(e.message, format!("{}: disk full", a.display()));
        fs::remove_dir_all(&dir).unwrap();
    }
}
