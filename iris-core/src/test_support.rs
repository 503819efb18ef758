//! What this crate's unit tests share: the workspace's test files, from the
//! one source every crate's tests use (`tests/support/src/files.rs`; this
//! crate cannot depend on the support crate, see there), and Colin27 read
//! with this crate's own NIfTI reader.

#[path = "../../tests/support/src/files.rs"]
mod files;

pub use files::*;

#[cfg(feature = "nifti")]
use crate::volume::{Image, LabelMap};

/// Colin27 (`ch2`) and its AAL labels from `data/mricron`, or `None` (with
/// a message) when they are absent; with `IRIS_REQUIRE_DATA=1` their
/// absence fails the test.
///
/// # Panics
/// If a file is present but cannot be read.
#[cfg(feature = "nifti")]
pub fn colin() -> Option<(Image, LabelMap)> {
    let image = data_file("mricron/ch2.nii.gz")?;
    let labels = data_file("mricron/aal.nii.gz")?;
    let (image, _) = crate::nifti::read_image(image).expect("ch2 reads");
    let (labels, _) = crate::nifti::read_labels(labels).expect("aal reads");
    Some((image, labels))
}
