//! The model shipped in `models/iris-tiny`: within the size budget, its ONNX
//! graphs are exactly what its committed training checkpoint exports, and
//! its memory bank loads. (That `docs/results.md` reports what it computes
//! is checked in `iris-eval/tests/results.rs`.)

use std::path::{Path, PathBuf};

use iris_core::embedding::Provenance;
use iris_core::engine::Model;
use iris_test_support::{TempDir, repo_root};
use iris_train::training::Trainer;

/// The shipped model folder.
fn shipped() -> PathBuf {
    repo_root().join("models/iris-tiny")
}

/// Total bytes of the files under `dir`.
fn folder_bytes(dir: &Path) -> u64 {
    std::fs::read_dir(dir)
        .expect("readable folder")
        .map(|e| {
            let path = e.expect("entry").path();
            if path.is_dir() {
                folder_bytes(&path)
            } else {
                path.metadata().expect("metadata").len()
            }
        })
        .sum()
}

#[test]
fn shipped_model_fits_the_budget_and_is_its_checkpoint_exported() {
    let dir = shipped();
    let bytes = folder_bytes(&dir);
    assert!(bytes <= 40_000_000, "models/iris-tiny holds {bytes} bytes");
    let model = Model::load(&dir).expect("the shipped model loads");
    assert_eq!(model.manifest().name, "iris-tiny");
    // It decodes one class per decoder run: in one run of several classes
    // it gives them all the same map (docs/results.md).
    assert_eq!(model.manifest().classes_per_forward, Some(1));

    // Re-export the committed checkpoint: the graphs must be byte for byte
    // the shipped ones (the weights ship once, in two forms).
    let trainer = Trainer::resume(&dir, &iris_train::device::select_device())
        .expect("the shipped checkpoint resumes");
    let out = TempDir::new("shipped-export");
    let fingerprint = iris_train::export::export(
        trainer.model(),
        &trainer.config().model,
        "iris-tiny",
        out.path(),
        Some(trainer.bank()),
        iris_train::export::DEFAULT_CLASSES_PER_FORWARD,
    )
    .expect("export");
    assert_eq!(fingerprint, model.manifest().fingerprint);
    for graph in ["encoder.onnx", "task_encoder.onnx", "decoder.onnx"] {
        let shipped = std::fs::read(dir.join(graph)).expect("shipped graph");
        let fresh = std::fs::read(out.join(graph)).expect("exported graph");
        assert!(
            shipped == fresh,
            "{graph} differs from the checkpoint's export"
        );
    }

    // The memory bank: entries of the classes training saw, EMA provenance.
    let bank = model
        .memory_bank()
        .expect("bank reads")
        .expect("the shipped model has a bank");
    assert!(
        bank.classes().len() >= 100,
        "{} entries",
        bank.classes().len()
    );
    let precentral = bank
        .classes()
        .iter()
        .find(|c| c.name() == "aal:1 Precentral_L")
        .expect("a seen AAL class");
    assert!(matches!(
        precentral.provenance(),
        Provenance::MemoryBank { updates, .. } if updates > 0
    ));
    // No held-out class reached the bank.
    for held_out in ["Hippocampus", "Thalamus", "Caudate", "Putamen", "Amygdala"] {
        assert!(
            !bank.classes().iter().any(|c| c.name().contains(held_out)),
            "{held_out} is in the bank"
        );
    }
}
