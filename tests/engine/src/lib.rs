//! Tests that need more than one iris crate (see `tests/`): the
//! `iris-core` ONNX engine running the graphs `iris-train` exports, checked
//! against the burn model they came from. This library holds what the tests
//! of every crate share: the real volumes of `data/`, temporary folders, and
//! (in [`fixture`]) a tiny exported model with phantom volumes, which the
//! C ABI's and the `iris` command's tests use too.

pub mod fixture;

use std::path::{Path, PathBuf};

use iris_core::nifti;
use iris_core::volume::{Image, LabelMap};

/// The workspace root (the folder holding `data/`).
pub fn repo_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../..")
        .to_path_buf()
}

/// Colin27 (`data/mricron/ch2.nii.gz`) and its AAL label map, or `None`
/// (with a message) when `data/` is absent; with `IRIS_REQUIRE_DATA=1`
/// their absence is an error.
///
/// # Panics
/// When the files are absent and `IRIS_REQUIRE_DATA=1`, or cannot be read.
pub fn colin() -> Option<(Image, LabelMap)> {
    let dir = repo_root().join("data/mricron");
    let (image, labels) = (dir.join("ch2.nii.gz"), dir.join("aal.nii.gz"));
    if !(image.is_file() && labels.is_file()) {
        assert!(
            std::env::var("IRIS_REQUIRE_DATA").map_or(true, |v| v != "1"),
            "{} is missing and IRIS_REQUIRE_DATA=1: run scripts/fetch-data.sh",
            dir.display()
        );
        eprintln!(
            "skipping: {} is absent; run scripts/fetch-data.sh",
            dir.display()
        );
        return None;
    }
    let (image, _) = nifti::read_image(&image).expect("ch2 reads");
    let (labels, _) = nifti::read_labels(&labels).expect("aal reads");
    Some((image, labels))
}

/// A fresh folder under the system temp dir, removed on drop.
#[derive(Debug)]
pub struct TempDir(PathBuf);

impl TempDir {
    /// Creates `<tmp>/iris-tests-<tag>-<pid>-<n>`.
    ///
    /// # Panics
    /// If the folder cannot be created.
    pub fn new(tag: &str) -> TempDir {
        use std::sync::atomic::{AtomicUsize, Ordering};
        static NEXT: AtomicUsize = AtomicUsize::new(0);
        let path = std::env::temp_dir().join(format!(
            "iris-tests-{tag}-{}-{}",
            std::process::id(),
            NEXT.fetch_add(1, Ordering::Relaxed)
        ));
        std::fs::create_dir_all(&path).expect("create temp dir");
        TempDir(path)
    }

    /// The folder.
    pub fn path(&self) -> &Path {
        &self.0
    }

    /// `name` inside the folder.
    pub fn join(&self, name: impl AsRef<Path>) -> PathBuf {
        self.0.join(name)
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}
