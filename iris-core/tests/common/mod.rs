//! Support shared by the integration tests: the real volumes in `data/`,
//! python with nibabel as an independent reference, and temporary folders.
//!
//! Tests that need `data/` or nibabel skip with a message when they are
//! absent, unless `IRIS_REQUIRE_DATA=1` / `IRIS_REQUIRE_NIBABEL=1` is set
//! (as `scripts/test.sh` and CI do): then their absence fails the test.
#![allow(dead_code)] // each test binary uses its own subset

use std::ffi::OsStr;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::atomic::{AtomicUsize, Ordering};

/// The workspace root (the folder holding `data/` and `scripts/`).
pub fn repo_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("iris-core sits inside the workspace")
        .to_path_buf()
}

fn required(var: &str) -> bool {
    std::env::var(var).is_ok_and(|v| v == "1")
}

/// `data/<rel>` if it exists. Otherwise prints why the caller skips and
/// returns `None`, or panics when `IRIS_REQUIRE_DATA=1`.
pub fn data_file(rel: &str) -> Option<PathBuf> {
    let path = repo_root().join("data").join(rel);
    if path.is_file() {
        return Some(path);
    }
    assert!(
        !required("IRIS_REQUIRE_DATA"),
        "{} is missing and IRIS_REQUIRE_DATA=1: run scripts/fetch-data.sh",
        path.display()
    );
    eprintln!(
        "skipping: {} is absent; run scripts/fetch-data.sh",
        path.display()
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
pub fn python_with_nibabel() -> Option<Python> {
    let program = PathBuf::from(std::env::var_os("IRIS_PYTHON").unwrap_or("python3".into()));
    let ok = Command::new(&program)
        .args(["-c", "import nibabel, numpy"])
        .output()
        .is_ok_and(|o| o.status.success());
    if ok {
        return Some(Python { program });
    }
    assert!(
        !required("IRIS_REQUIRE_NIBABEL"),
        "{} cannot import nibabel and numpy and IRIS_REQUIRE_NIBABEL=1: \
         pip install nibabel numpy",
        program.display()
    );
    eprintln!(
        "skipping: {} cannot import nibabel and numpy (pip install nibabel numpy)",
        program.display()
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
    pub fn new(tag: &str) -> TempDir {
        static COUNTER: AtomicUsize = AtomicUsize::new(0);
        let path = std::env::temp_dir().join(format!(
            "iris-test-{tag}-{}-{}",
            std::process::id(),
            COUNTER.fetch_add(1, Ordering::Relaxed)
        ));
        std::fs::create_dir_all(&path).expect("create temp dir");
        TempDir { path }
    }

    /// The folder.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// `path()/name`.
    pub fn join(&self, name: &str) -> PathBuf {
        self.path.join(name)
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.path);
    }
}
