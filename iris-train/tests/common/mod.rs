//! What the `iris-train` test binaries share.

use std::path::{Path, PathBuf};

/// `data/` if `data/<probe>` exists. Otherwise prints why the caller skips
/// and returns `None`, or panics when `IRIS_REQUIRE_DATA=1`.
pub fn data_dir(probe: &str) -> Option<PathBuf> {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("../data");
    if dir.join(probe).is_file() {
        return Some(dir);
    }
    assert!(
        std::env::var("IRIS_REQUIRE_DATA").ok().as_deref() != Some("1"),
        "data/{probe} is missing and IRIS_REQUIRE_DATA=1: run scripts/fetch-data.sh"
    );
    eprintln!("skipping: data/{probe} is absent; run scripts/fetch-data.sh");
    None
}
