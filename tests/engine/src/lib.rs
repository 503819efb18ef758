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

/// `data/<rel>` of the workspace (fetched by `scripts/fetch-data.sh`), or
/// `None` (with a message: the caller skips) when it is absent.
///
/// # Panics
/// When the file is absent and `IRIS_REQUIRE_DATA=1`.
pub fn data_file(rel: &str) -> Option<PathBuf> {
    let path = repo_root().join("data").join(rel);
    if path.is_file() {
        return Some(path);
    }
    assert!(
        std::env::var("IRIS_REQUIRE_DATA").as_deref() != Ok("1"),
        "{} is missing and IRIS_REQUIRE_DATA=1: run scripts/fetch-data.sh",
        path.display()
    );
    eprintln!(
        "skipping: {} is absent; run scripts/fetch-data.sh",
        path.display()
    );
    None
}

/// Colin27 (`data/mricron/ch2.nii.gz`) and its AAL label map, or `None`
/// (with a message) when `data/` is absent; with `IRIS_REQUIRE_DATA=1`
/// their absence is an error.
///
/// # Panics
/// When the files are absent and `IRIS_REQUIRE_DATA=1`, or cannot be read.
pub fn colin() -> Option<(Image, LabelMap)> {
    let image = data_file("mricron/ch2.nii.gz")?;
    let labels = data_file("mricron/aal.nii.gz")?;
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
