//! Tests that need more than one iris crate: the `iris-core` ONNX engine
//! running the graphs `iris-train` exports, checked against the burn model
//! they came from. This library holds the tiny burn model those tests
//! share; what every crate's tests share without burn (files, phantoms, a
//! model of known maths) is in `iris-test-support` (`tests/support`).

use std::path::Path;
use std::sync::{Mutex, PoisonError};

use iris_core::embedding::ModelFingerprint;
use iris_train::model::{Iris, IrisConfig};

/// Runs `f` on the `tiny` preset with weights drawn from `seed`.
///
/// The device's random generator is shared by every test running in
/// parallel in one binary, and burn draws some weights lazily: `f` runs
/// under one lock with the seeded draws, so a seed always gives the same
/// weights however the tests interleave.
///
/// # Panics
/// If the preset cannot be built (a bug).
pub fn with_tiny_model<R>(seed: u64, f: impl FnOnce(Iris, &IrisConfig) -> R) -> R {
    static RNG: Mutex<()> = Mutex::new(());
    let _guard = RNG.lock().unwrap_or_else(PoisonError::into_inner);
    let config = IrisConfig::tiny();
    let device = iris_train::device::select_device();
    device.seed(seed);
    f(
        config.init(&device).expect("the tiny preset builds"),
        &config,
    )
}

/// Exports the tiny preset with weights drawn from `seed` into `dir`, with
/// the default `classes_per_forward`.
///
/// # Panics
/// If the export fails.
pub fn export_tiny_model(dir: &Path, seed: u64) -> ModelFingerprint {
    with_tiny_model(seed, |model, config| {
        iris_train::export::export(
            &model,
            config,
            "iris-tiny-random",
            dir,
            None,
            iris_train::export::DEFAULT_CLASSES_PER_FORWARD,
        )
    })
    .expect("export")
}
