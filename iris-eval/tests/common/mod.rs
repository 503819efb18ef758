//! What the `iris-eval` test binaries share.

use std::path::PathBuf;

use iris_eval::tasks;

/// The data folder, or `None` (with a message) when a file is missing.
pub fn data_dir() -> Option<PathBuf> {
    let data = iris_tests::repo_root().join("data");
    let missing = tasks::missing_files(&data);
    if missing.is_empty() {
        return Some(data);
    }
    assert!(
        std::env::var("IRIS_REQUIRE_DATA").as_deref() != Ok("1"),
        "{missing:?} missing and IRIS_REQUIRE_DATA=1: run scripts/fetch-data.sh"
    );
    eprintln!("skipping: {missing:?} absent; run scripts/fetch-data.sh");
    None
}
