//! Loads a task embedding from a byte buffer with the `no_std` core only, as
//! firmware on a device with no filesystem does.
//!
//! ```sh
//! cargo run -p iris-core --no-default-features --example embedded_irisemb
//! ```
//!
//! Built this way iris-core has no `std` and no NIfTI or ONNX code:
//! `.irisemb` parsing, class selection and the embedding maths need only
//! `core` and `alloc`. The `.irisemb` bytes are compiled into the program
//! (`include_bytes!`, as a flash image would hold them), checked against the
//! fingerprint of the model the device runs, and inspected; a damaged copy
//! is refused. Only [`on_device`] stands for firmware code; `main` prints
//! with `std` because this example runs on the host.
//! (`tests/no_std_smoke/` proves that the same calls link with no `std` at
//! all, in a `#![no_std]` binary.)

use std::process::ExitCode;

use iris_core::embedding::{ModelFingerprint, TaskEmbedding};
use iris_core::irisemb;

/// A two-class `.irisemb` (liver, spleen), as the device's flash holds it.
static TASK_FILE: &[u8] = include_bytes!("../tests/no_std_smoke/fixture.irisemb");

/// Fingerprint of the weights this device runs; an embedding made by any
/// other model is refused.
const MODEL: &str = "000102030405060708090a0b0c0d0e0f101112131415161718191a1b1c1d1e1f";

/// What firmware does with the bytes (`core` + `alloc` APIs only): parse
/// and check them against the model, pick the classes the study needs, and
/// compare two classes (cosine similarity over every stage, as object-level
/// retrieval does).
fn on_device(bytes: &[u8]) -> iris_core::Result<(TaskEmbedding, TaskEmbedding, f32)> {
    let model = ModelFingerprint::from_hex(MODEL)?;
    let task = irisemb::read_for_model(bytes, &model)?;
    let spleen = task.select_names(&["spleen"])?;
    let similarity = task.classes()[0].similarity(&spleen.classes()[0])?;
    Ok((task, spleen, similarity))
}

fn main() -> ExitCode {
    let (task, spleen, similarity) = match on_device(TASK_FILE) {
        Ok(parts) => parts,
        Err(e) => {
            eprintln!("embedded_irisemb: {e}");
            return ExitCode::FAILURE;
        }
    };
    println!(
        "{} bytes: model {}, {} classes, stages {:?}",
        TASK_FILE.len(),
        task.model(),
        task.classes().len(),
        task.stage_shapes()
            .iter()
            .map(|s| [s.tokens, s.channels])
            .collect::<Vec<_>>()
    );
    for class in task.classes() {
        println!(
            "  label {} {:?}: {}",
            class.label(),
            class.name(),
            class.provenance()
        );
    }
    println!(
        "selected {:?}; similarity of {:?} to it: {similarity:.3}",
        spleen.classes()[0].name(),
        task.classes()[0].name()
    );

    // Flash wears out and downloads get cut: a damaged copy is never used.
    let cut = &TASK_FILE[..TASK_FILE.len() - 1];
    match irisemb::read(cut) {
        Err(e) => println!("a truncated copy is refused: {e}"),
        Ok(_) => {
            eprintln!("embedded_irisemb: a truncated copy was accepted");
            return ExitCode::FAILURE;
        }
    }
    ExitCode::SUCCESS
}
