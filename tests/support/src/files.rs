//! Files the tests share: the workspace's real volumes (`data/`), python
//! with nibabel as an independent reference, and temporary folders.
//!
//! Tests that need `data/` or nibabel skip with a message when they are
//! absent, unless `IRIS_REQUIRE_DATA=1` / `IRIS_REQUIRE_NIBABEL=1` is set (as
//! `scripts/test.sh` and CI do): then their absence fails the test.
//!
//! This module needs only `std`, so `iris-core`'s own tests compile it too
//! (with `#[path]`): iris-core cannot depend on this crate, which depends on
//! iris-core, without switching `std` on for its `no_std` example.
#![allow(dead_code)] // each test binary uses its own subset

// Explicit, so that the module also compiles inside the `no_std` iris-core.
use std::ffi::OsStr;
use std::path::{Path, PathBuf};
use std::prelude::rust_2024::*;
use std::process::Command;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::{eprintln, format};

/// The workspace root (the folder holding `data/`, `models/` and `scripts/`):
/// the nearest folder above the compiling crate that holds `Cargo.lock`.
///
/// # Panics
/// If there is none (a crate built outside the workspace).
pub fn repo_root() -> PathBuf {
    let manifest = Path::new(env!("CARGO_MANIFEST_DIR"));
    manifest
        .ancestors()
        .find(|dir| dir.join("Cargo.lock").is_file())
        .expect("the crate sits inside the iris workspace")
        .to_path_buf()
}

/// True when the environment variable `var` is `1`.
fn required(var: &str) -> bool {
    std::env::var(var).is_ok_and(|v| v == "1")
}

/// Prints why the caller skips, or panics when `var=1` makes the missing
/// thing required.
#[track_caller]
fn skip_or_fail(var: &str, what: &str, remedy: &str) {
    assert!(!required(var), "{what} and {var}=1: {remedy}");
    eprintln!("skipping: {what}; {remedy}");
}

/// `data/<rel>` if it exists. Otherwise prints why the caller skips and
/// returns `None`, or panics when `IRIS_REQUIRE_DATA=1`.
#[track_caller]
pub fn data_file(rel: &str) -> Option<PathBuf> {
    let path = repo_root().join("data").join(rel);
    if path.is_file() {
        return Some(path);
    }
    skip_or_fail(
        "IRIS_REQUIRE_DATA",
        &format!("{} is missing", path.display()),
        "run scripts/fetch-data.sh",
    );
    None
}

/// The `data/` folder if every one of `files` (relative to it) exists;
/// otherwise as [`data_file`].
#[track_caller]
pub fn data_dir(files: &[&str]) -> Option<PathBuf> {
    let data = repo_root().join("data");
    let missing: Vec<&str> = files
        .iter()
        .copied()
        .filter(|f| !data.join(f).is_file())
        .collect();
    if missing.is_empty() {
        return Some(data);
    }
    skip_or_fail(
        "IRIS_REQUIRE_DATA",
        &format!("{missing:?} missing from {}", data.display()),
        "run scripts/fetch-data.sh",
    );
    None
}

/// A python interpreter that can `import nibabel, numpy`.
#[derive(Clone, Debug)]
pub struct Python {
    program: PathBuf,
}

/// The interpreter named by `IRIS_PYTHON` (default `python3`) if it has
/// nibabel and numpy. Otherwise prints why the caller skips and returns
/// `None`, or panics when `IRIS_REQUIRE_NIBABEL=1`.
#[track_caller]
pub fn python_with_nibabel() -> Option<Python> {
    let program = PathBuf::from(std::env::var_os("IRIS_PYTHON").unwrap_or("python3".into()));
    let ok = Command::new(&program)
        .args(["-c", "import nibabel, numpy"])
        .output()
        .is_ok_and(|o| o.status.success());
    if ok {
        return Some(Python { program });
    }
    skip_or_fail(
        "IRIS_REQUIRE_NIBABEL",
        &format!("{} cannot import nibabel and numpy", program.display()),
        "pip install nibabel numpy",
    );
    None
}

impl Python {
    /// Runs `script` with `args` (as `sys.argv[1:]`) and returns its stdout;
    /// panics with its stderr if it fails.
    pub fn run<S: AsRef<OsStr>>(&self, script: &str, args: &[S]) -> String {
        let out = Command::new(&self.program)
            .arg("-c")
            .arg(script)
            .args(args)
            .output()
            .expect("python runs");
        assert!(
            out.status.success(),
            "python failed:\n{}",
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8(out.stdout).expect("python prints UTF-8")
    }
}

/// A fresh folder under the system temp dir, removed on drop.
#[derive(Debug)]
pub struct TempDir {
    path: PathBuf,
}

impl TempDir {
    /// Creates `<tmp>/iris-test-<tag>-<pid>-<n>`.
    ///
    /// # Panics
    /// If the folder cannot be created.
    pub fn new(tag: &str) -> TempDir {
        static NEXT: AtomicUsize = AtomicUsize::new(0);
        let path = std::env::temp_dir().join(format!(
            "iris-test-{tag}-{}-{}",
            std::process::id(),
            NEXT.fetch_add(1, Ordering::Relaxed)
        ));
        std::fs::create_dir_all(&path).expect("create temp dir");
        TempDir { path }
    }

    /// The folder.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// `name` inside the folder.
    pub fn join(&self, name: impl AsRef<Path>) -> PathBuf {
        self.path.join(name)
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.path);
    }
}
