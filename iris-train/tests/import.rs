//! The import of the reference code's checkpoints: a MASS / Iris training
//! checkpoint made by `scripts/mass_reference.py` with the authors' own code
//! (reduced width, every parameter perturbed, `model` and `ema_model`
//! different) is imported, and the burn model, the exported graphs run by
//! tract, and one training step agree with the outputs the reference code
//! recorded (`tests/fixtures/mass/`). No Python runs here.
//!
//! Tolerances: task tokens and logits within 1e-4 of the output's scale
//! (its largest magnitude); the loss within 1e-5 relative; gradients within
//! 1e-3 of each tensor's scale (they pass through the whole network twice).

use std::collections::BTreeSet;
use std::fs;
use std::io::Read;
use std::path::{Path, PathBuf};
use std::process::Command;

use burn::module::ParamId;
use burn::optim::GradientsParams;
use burn::prelude::*;
use iris_core::embedding::Preprocessing;
use iris_core::embedding::{ClassEmbedding, Provenance, StageShape, TaskEmbedding as CoreTask};
use iris_core::engine::Model;
use iris_core::preprocess::IntensityPolicy;
use iris_test_support::TempDir;
use iris_train::checkpoint;
use iris_train::export::{self, MANIFEST_FILE};
use iris_train::import::{ImportOptions, Imported, Weights, import_checkpoint};
use iris_train::loss::{adaptive_dice_loss, bce_with_logits};
use iris_train::training::Trainer;
use ndarray::{ArrayView3, ArrayView4};
use pytorch_reader::PytorchReader;

const FIXTURE: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/tests/fixtures/mass");
/// Outputs: largest difference allowed, relative to the output's scale.
const TOLERANCE: f32 = 1e-4;
/// Gradients, likewise.
const GRADIENT_TOLERANCE: f32 = 1e-3;
/// The fixture's window (`scripts/mass_reference.py`).
const WINDOW: [usize; 3] = [32, 48, 32];

/// The fixtures, gunzipped into a temporary folder.
struct Fixture {
    dir: TempDir,
}

impl Fixture {
    fn new(tag: &str) -> Fixture {
        let dir = TempDir::new(tag);
        for name in ["checkpoint.pth", "reference.pth"] {
            let packed = fs::File::open(Path::new(FIXTURE).join(format!("{name}.gz")))
                .expect("the fixture is committed");
            let mut bytes = Vec::new();
            flate2::read::GzDecoder::new(packed)
                .read_to_end(&mut bytes)
                .expect("gunzips");
            fs::write(dir.join(name), bytes).expect("writes");
        }
        Fixture { dir }
    }

    fn checkpoint(&self) -> PathBuf {
        self.dir.join("checkpoint.pth")
    }

    fn reference(&self) -> Reference {
        Reference(PytorchReader::new(self.dir.join("reference.pth")).expect("reads"))
    }
}

/// The reference code's inputs and outputs.
struct Reference(PytorchReader);

impl Reference {
    fn shape(&self, key: &str) -> Vec<usize> {
        self.0
            .get(key)
            .unwrap_or_else(|| panic!("{key}"))
            .shape()
            .to_vec()
    }

    fn values(&self, key: &str) -> Vec<f32> {
        let tensor = self.0.get(key).unwrap_or_else(|| panic!("no {key}"));
        tensor
            .read()
            .expect("reads")
            .chunks_exact(4)
            .map(|b| f32::from_ne_bytes([b[0], b[1], b[2], b[3]]))
            .collect()
    }

    fn tensor<const D: usize>(&self, key: &str, device: &Device) -> Tensor<D> {
        let shape: [usize; D] = self.shape(key).try_into().expect("rank");
        Tensor::from_data(TensorData::new(self.values(key), shape), device)
    }

    fn scalar(&self, key: &str) -> f32 {
        self.values(key)[0]
    }
}

fn device() -> Device {
    iris_train::device::select_device()
}

fn values<const D: usize>(tensor: Tensor<D>) -> Vec<f32> {
    tensor.into_data().try_into_vec_as::<f32>().expect("f32")
}

/// The largest difference over the scale of `expected`.
fn relative_difference(found: &[f32], expected: &[f32]) -> f32 {
    assert_eq!(found.len(), expected.len(), "lengths differ");
    let scale = expected.iter().fold(0f32, |m, v| m.max(v.abs())).max(1e-12);
    let diff = found
        .iter()
        .zip(expected)
        .fold(0f32, |m, (a, b)| m.max((a - b).abs()));
    diff / scale
}

fn assert_close(what: &str, found: &[f32], expected: &[f32], tolerance: f32) {
    let difference = relative_difference(found, expected);
    println!("{what}: {difference:.2e} of the reference's scale");
    assert!(
        difference <= tolerance,
        "{what}: differs from the reference by {difference:e} of its scale (allowed {tolerance:e})"
    );
}

fn import(fixture: &Fixture, weights: Weights, device: &Device) -> Imported {
    let options = ImportOptions {
        weights,
        ..ImportOptions::default()
    };
    import_checkpoint(&fixture.checkpoint(), &options, device).expect("imports")
}

#[test]
fn the_ema_weights_compute_what_the_reference_code_computes() {
    let fixture = Fixture::new("import-ema");
    let reference = fixture.reference();
    let device = device();
    let imported = import(&fixture, Weights::Ema, &device);
    assert_eq!(imported.source.weights, "ema_model");
    assert_eq!(imported.config.patch_size, WINDOW);
    assert_eq!(imported.config.channels, [4, 8, 32, 32, 32]);
    let model = &imported.model;
    let embedding = model
        .encode_task(
            reference.tensor("reference_image", &device),
            reference.tensor("reference_masks", &device),
        )
        .expect("encodes");
    for (i, tokens) in embedding.stages.iter().enumerate() {
        let key = format!("ema.task.{i}");
        assert_eq!(tokens.dims().to_vec(), reference.shape(&key));
        assert_close(
            &key,
            &values(tokens.clone()),
            &reference.values(&key),
            TOLERANCE,
        );
    }
    // Both classes in one decoder run, as the reference decodes them.
    let logits = model
        .segment(reference.tensor("query_image", &device), &embedding)
        .expect("segments");
    assert_eq!(logits.dims().to_vec(), reference.shape("ema.logits"));
    assert_close(
        "logits",
        &values(logits),
        &reference.values("ema.logits"),
        TOLERANCE,
    );
}

#[test]
fn weights_model_imports_the_other_copy() {
    let fixture = Fixture::new("import-raw");
    let reference = fixture.reference();
    let device = device();
    let imported = import(&fixture, Weights::Model, &device);
    assert_eq!(imported.source.weights, "model");
    let embedding = imported
        .model
        .encode_task(
            reference.tensor("reference_image", &device),
            reference.tensor("reference_masks", &device),
        )
        .expect("encodes");
    for (i, tokens) in embedding.stages.iter().enumerate() {
        let found = values(tokens.clone());
        assert_close(
            &format!("model.task.{i}"),
            &found,
            &reference.values(&format!("model.task.{i}")),
            TOLERANCE,
        );
        let ema = reference.values(&format!("ema.task.{i}"));
        assert!(
            relative_difference(&found, &ema) > 100.0 * TOLERANCE,
            "stage {i}: the raw weights give the EMA weights' tokens"
        );
    }
}

/// The tract engine's task embedding for `stages` (`[K, tokens, channels]`
/// each), made by the imported model.
fn core_task(model: &Model, stages: &[ndarray::Array3<f32>]) -> CoreTask {
    let classes = (0..stages[0].dim().0)
        .map(|k| {
            let per_stage = stages
                .iter()
                .map(|stage| {
                    stage
                        .index_axis(ndarray::Axis(0), k)
                        .iter()
                        .copied()
                        .collect()
                })
                .collect();
            ClassEmbedding::new(
                k as u32 + 1,
                format!("class {}", k + 1),
                Provenance::OneShot,
                per_stage,
            )
            .expect("class")
        })
        .collect();
    let manifest = model.manifest();
    let preprocessing = Preprocessing {
        spacing_mm: [manifest.spacing_mm as f32; 3],
        patch: manifest.patch_size.map(|p| p as u32),
        intensity: IntensityPolicy::MR,
    };
    let shapes: Vec<StageShape> = manifest.stages.clone();
    CoreTask::new(*model.fingerprint(), preprocessing, shapes, classes).expect("task")
}

#[test]
fn the_exported_graphs_compute_what_the_reference_code_computes_in_tract() {
    let fixture = Fixture::new("import-tract");
    let reference = fixture.reference();
    let imported = import(&fixture, Weights::Ema, &device());
    let out = fixture.dir.join("model");
    let fingerprint = export::export_imported(&imported, "mass-fixture", &out).expect("exports");

    let manifest: serde_json::Value =
        serde_json::from_str(&fs::read_to_string(out.join(MANIFEST_FILE)).expect("manifest"))
            .expect("json");
    assert_eq!(manifest["source"]["file"], "checkpoint.pth");
    assert_eq!(manifest["source"]["weights"], "ema_model");
    assert_eq!(
        manifest["source"]["sha256"],
        imported.source.sha256.as_str()
    );
    assert_eq!(imported.source.sha256.len(), 64);
    assert!(
        manifest.get("classes_per_forward").is_none(),
        "all classes in one run"
    );
    assert!(!out.join(export::BANK_FILE).exists());

    let model = Model::load(&out).expect("the engine loads the folder");
    assert_eq!(*model.fingerprint(), fingerprint);
    assert_eq!(model.manifest().classes_per_forward, None);
    assert_engine_matches(&model, &reference, WINDOW);
}

/// Runs the engine on the reference code's windows (`window` voxels) and
/// checks its task stages and logits against the reference's, within
/// [`TOLERANCE`].
fn assert_engine_matches(model: &Model, reference: &Reference, [d, h, w]: [usize; 3]) {
    let window = |key: &str| reference.values(key);
    let image = window("reference_image");
    let features = model
        .encode_window(ArrayView3::from_shape((d, h, w), &image).expect("shape"))
        .expect("encodes");
    let masks = window("reference_masks");
    let classes = masks.len() / (d * h * w);
    let stages = model
        .encode_masks(
            &features,
            ArrayView4::from_shape((classes, d, h, w), &masks).expect("shape"),
        )
        .expect("encodes the masks");
    for (i, stage) in stages.iter().enumerate() {
        let found: Vec<f32> = stage.iter().copied().collect();
        assert_close(
            &format!("tract task stage {i}"),
            &found,
            &reference.values(&format!("ema.task.{i}")),
            TOLERANCE,
        );
    }
    let query = window("query_image");
    let query_features = model
        .encode_window(ArrayView3::from_shape((d, h, w), &query).expect("shape"))
        .expect("encodes");
    let logits = model
        .decode_window(&query_features, &core_task(model, &stages))
        .expect("decodes");
    let found: Vec<f32> = logits.iter().copied().collect();
    assert_close(
        "tract logits",
        &found,
        &reference.values("ema.logits"),
        TOLERANCE,
    );
}

#[test]
fn every_tensor_is_imported_or_named_with_a_reason() {
    let fixture = Fixture::new("import-keys");
    let imported = import(&fixture, Weights::Ema, &device());
    let stored =
        PytorchReader::with_top_level_key(fixture.checkpoint(), "ema_model").expect("reads");
    let imported_keys: BTreeSet<&String> = imported.params.keys().collect();
    let ignored: BTreeSet<&String> = imported.ignored.iter().map(|(key, _)| key).collect();
    for key in stored.keys() {
        assert!(
            imported_keys.contains(&key) ^ ignored.contains(&key),
            "{key} is neither imported nor listed as ignored (or both)"
        );
    }
    let buffers: Vec<&String> = ignored
        .iter()
        .copied()
        .filter(|k| k.starts_with("task_prior_"))
        .collect();
    assert_eq!(
        buffers.len(),
        3,
        "the three untrained prior buffers: {ignored:?}"
    );
    for entry in [
        "model",
        "optimizer",
        "scheduler",
        "epoch",
        "iteration",
        "best_metric",
    ] {
        assert!(
            ignored.iter().any(|k| *k == entry),
            "top-level entry {entry} not listed"
        );
    }
    assert!(
        !ignored.iter().any(|k| *k == "config"),
        "config is read, not ignored"
    );
    assert!(imported.ignored.iter().all(|(_, why)| !why.is_empty()));
    let expected: usize = stored
        .tensors()
        .iter()
        .filter(|(key, _)| !key.starts_with("task_prior_"))
        .map(|(_, tensor)| tensor.num_elements())
        .sum();
    assert_eq!(imported.parameters, expected);
    // A packed attention projection feeds three burn parameters.
    let packed = "decoder.prior_fuse.0.attn_layers.0.prior_attn_block.fn.mha.in_proj_weight";
    assert_eq!(imported.params[packed].len(), 3);
}

#[test]
fn a_checkpoint_that_cannot_be_imported_is_refused_naming_the_problem() {
    let fixture = Fixture::new("import-refused");
    let device = device();
    let refuse = |path: &Path, options: &ImportOptions, needles: &[&str]| {
        let Err(error) = import_checkpoint(path, options, &device) else {
            panic!("{} was imported, expected {needles:?}", path.display());
        };
        let message = error.to_string();
        assert!(
            matches!(error, iris_train::Error::Import { .. }),
            "{message}"
        );
        assert!(message.contains(&path.display().to_string()), "{message}");
        for needle in needles {
            assert!(
                message.contains(needle),
                "{message:?} does not say {needle:?}"
            );
        }
    };
    let defaults = ImportOptions::default();
    let refused = |name: &str| Path::new(FIXTURE).join(name);
    refuse(
        &refused("refused-missing.pth"),
        &defaults,
        &["`encoder.inc.conv2.conv1.conv.weight`", "missing"],
    );
    refuse(
        &refused("refused-shape.pth"),
        &defaults,
        &[
            "`encoder.inc.conv1.weight`",
            "expected shape [1, 1, 3, 3, 3]",
            "found [1, 1, 3, 3, 5]",
        ],
    );
    refuse(
        &refused("refused-block.pth"),
        &defaults,
        &["`config.model.block`", "\"BasicBlock\"", "\"Bottleneck\""],
    );
    let model_of_bare = ImportOptions {
        weights: Weights::Model,
        ..ImportOptions::default()
    };
    refuse(
        &refused("refused-missing.pth"),
        &model_of_bare,
        &["bare state_dict"],
    );
    let too_large = ImportOptions {
        window: Some([64, 64, 64]),
        ..ImportOptions::default()
    };
    refuse(
        &fixture.checkpoint(),
        &too_large,
        &["pos_embed.embedding", "[1, 1, 48, 64, 48]"],
    );

    let bytes = fs::read(fixture.checkpoint()).expect("reads");
    let truncated = fixture.dir.join("truncated.pth");
    fs::write(&truncated, &bytes[..bytes.len() / 2]).expect("writes");
    refuse(&truncated, &defaults, &[]);
    let junk = fixture.dir.join("junk.pth");
    fs::write(&junk, b"not a checkpoint at all").expect("writes");
    refuse(&junk, &defaults, &["not a readable PyTorch checkpoint"]);
    // Bytes flipped all through the weights: the ZIP checksums of the
    // storages read fail.
    let mut corrupt = bytes.clone();
    for start in (corrupt.len() / 8..corrupt.len() * 7 / 8).step_by(64 * 1024) {
        corrupt[start] ^= 0x5a;
    }
    let corrupted = fixture.dir.join("corrupt.pth");
    fs::write(&corrupted, corrupt).expect("writes");
    refuse(&corrupted, &defaults, &[]);
}

#[test]
fn iris_train_import_writes_a_model_folder_and_a_checkpoint_to_tune() {
    let fixture = Fixture::new("import-cli");
    let out = fixture.dir.join("mass-fixture");
    let run = |args: &[&str]| {
        Command::new(env!("CARGO_BIN_EXE_iris-train"))
            .arg("import")
            .args(args)
            .output()
            .expect("runs")
    };
    let checkpoint = fixture.checkpoint();
    let output = run(&[
        "--checkpoint",
        checkpoint.to_str().expect("utf-8"),
        "--out",
        out.to_str().expect("utf-8"),
        "--with-checkpoint",
    ]);
    let stdout = String::from_utf8_lossy(&output.stdout);
    assert!(
        output.status.success(),
        "{stdout}{}",
        String::from_utf8_lossy(&output.stderr)
    );
    for needle in [
        "ema_model weights",
        "ignored task_prior_0",
        "ignored optimizer: training state",
        "mass-fixture",
    ] {
        assert!(
            stdout.contains(needle),
            "{stdout:?} does not say {needle:?}"
        );
    }
    for file in [
        MANIFEST_FILE,
        export::ENCODER_FILE,
        export::TASK_ENCODER_FILE,
        export::DECODER_FILE,
    ] {
        assert!(out.join(file).is_file(), "{file} missing");
    }
    // The burn checkpoint is the same model: `tune --checkpoint <out>` starts from it.
    let trainer = Trainer::resume(&out, &device().autodiff()).expect("resumes");
    let manifest = Model::load(&out).expect("loads");
    assert_eq!(trainer.fingerprint(), *manifest.fingerprint());
    assert!(checkpoint::find(&out).is_some());

    // A refused checkpoint writes nothing.
    let nothing = fixture.dir.join("nothing");
    let refused = Path::new(FIXTURE).join("refused-block.pth");
    let output = run(&[
        "--checkpoint",
        refused.to_str().expect("utf-8"),
        "--out",
        nothing.to_str().expect("utf-8"),
    ]);
    assert_eq!(output.status.code(), Some(3));
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(stderr.contains("config.model.block"), "{stderr}");
    assert!(!nothing.exists());
}

/// One burn gradient in the layout of the reference tensor `key` (`[out,
/// in]` linear weights, packed attention projections, positional embeddings
/// at their stored size).
fn reference_layout(
    grads: &GradientsParams,
    key: &str,
    ids: &[ParamId],
    shape: &[usize],
) -> Vec<f32> {
    let get2 = |id: ParamId| grads.get::<2>(id).expect("gradient");
    match (ids, shape.len()) {
        // q, k, v of `in_proj_weight` [3C, C]: each burn weight is [C, C] transposed.
        ([q, k, v], 2) => values(Tensor::cat(
            vec![
                get2(*q).transpose(),
                get2(*k).transpose(),
                get2(*v).transpose(),
            ],
            0,
        )),
        ([q, k, v], 1) => values(Tensor::cat(
            [q, k, v]
                .iter()
                .map(|id| grads.get::<1>(**id).expect("gradient"))
                .collect(),
            0,
        )),
        ([id], 1) => values(grads.get::<1>(*id).expect("gradient")),
        // The learned queries [T, C] as they are; linear weights transposed.
        ([id], 2) if key.ends_with("task_query") => values(get2(*id)),
        ([id], 2) => values(get2(*id).transpose()),
        ([id], 5) => {
            let grad = grads.get::<5>(*id).expect("gradient");
            let dims = grad.dims();
            if dims.to_vec() == shape {
                return values(grad);
            }
            // The positional embedding: the window's corner of the stored one.
            let full = Tensor::<5>::zeros(
                [shape[0], shape[1], shape[2], shape[3], shape[4]],
                &grad.device(),
            );
            values(full.slice_assign([0..1, 0..1, 0..dims[2], 0..dims[3], 0..dims[4]], grad))
        }
        _ => panic!("no layout for {} parameters of shape {shape:?}", ids.len()),
    }
}

#[test]
fn one_training_step_matches_the_reference_code() {
    let fixture = Fixture::new("import-train");
    let reference = fixture.reference();
    let device = device().autodiff();
    let imported = import(&fixture, Weights::Model, &device);
    let model = &imported.model;
    let masks: Tensor<5> = reference.tensor("query_masks", &device);
    let logits = model
        .forward(
            reference.tensor("query_image", &device),
            reference.tensor("reference_image", &device),
            reference.tensor("reference_masks", &device),
        )
        .expect("runs");
    let dice = adaptive_dice_loss(logits.clone(), masks.clone()).mean();
    let bce = bce_with_logits(logits, masks).mean();
    let loss = dice.clone() + bce.clone();
    for (what, found, key) in [
        ("Dice loss", &dice, "train.dice"),
        ("BCE", &bce, "train.bce"),
        ("loss", &loss, "train.loss"),
    ] {
        let found = values(found.clone())[0];
        let expected = reference.scalar(key);
        assert!(
            (found - expected).abs() <= 1e-5 * expected.abs(),
            "{what}: {found} here, {expected} in the reference code"
        );
    }
    let grads = GradientsParams::from_grads(loss.backward(), model);
    let stored = PytorchReader::with_top_level_key(fixture.checkpoint(), "model").expect("reads");
    // A bias followed by an instance norm has no gradient in exact
    // arithmetic; both sides then return float noise (~1e-8 against norms
    // of 1e-4 to 10), so norms are compared down to a floor of 1e-4 of the
    // largest.
    let largest = imported
        .params
        .keys()
        .map(|key| reference.scalar(&format!("train.grad_norm.{key}")))
        .fold(0f32, f32::max);
    let mut compared = 0;
    for (key, ids) in &imported.params {
        let norm_key = format!("train.grad_norm.{key}");
        let shape = stored.get(key).expect("stored").shape();
        let found = reference_layout(&grads, key, ids, shape);
        let norm = found.iter().map(|v| v * v).sum::<f32>().sqrt();
        let expected = reference.scalar(&norm_key);
        assert!(
            (norm - expected).abs() <= GRADIENT_TOLERANCE * expected.max(1e-4 * largest),
            "{key}: gradient norm {norm} here, {expected} in the reference code"
        );
        let full_key = format!("train.grad.{key}");
        if reference.0.get(&full_key).is_some() {
            assert_close(
                &full_key,
                &found,
                &reference.values(&full_key),
                GRADIENT_TOLERANCE,
            );
            compared += 1;
        }
    }
    assert_eq!(
        compared, 20,
        "every full gradient the fixture keeps was compared"
    );
}

/// The released checkpoint itself, for users and maintainers who have it:
/// `IRIS_MASS_CHECKPOINT=mass_base.pth cargo test -p iris-train --release
/// --test import -- --ignored` checks its keys, shapes and parameter count;
/// with `IRIS_MASS_REFERENCE` pointing at the `reference.pth` that
/// `scripts/mass_reference.py --checkpoint mass_base.pth` records, also one
/// 128³ window against the reference code, in burn and in the engine (the
/// exported graphs, with the engine's own convolutions at the released
/// size).
#[test]
#[ignore = "needs IRIS_MASS_CHECKPOINT=path/to/mass_base.pth"]
fn the_released_checkpoint_imports_and_matches_the_reference_code() {
    let Some(path) = std::env::var_os("IRIS_MASS_CHECKPOINT") else {
        panic!("set IRIS_MASS_CHECKPOINT to the released mass_base.pth");
    };
    let device = device();
    let imported = import_checkpoint(Path::new(&path), &ImportOptions::default(), &device)
        .expect("the released checkpoint imports");
    assert_eq!(imported.config.channels, [32, 64, 128, 256, 512]);
    assert_eq!(imported.config.patch_size, [128; 3]);
    assert_eq!(imported.config.spacing_mm, 1.5);
    assert_eq!(imported.parameters, 120_126_373);
    assert_eq!(imported.params.len(), 569);
    let Some(reference) = std::env::var_os("IRIS_MASS_REFERENCE") else {
        return;
    };
    let reference = Reference(PytorchReader::new(reference).expect("reads the reference"));
    let model = &imported.model;
    let embedding = model
        .encode_task(
            reference.tensor("reference_image", &device),
            reference.tensor("reference_masks", &device),
        )
        .expect("encodes");
    for (i, tokens) in embedding.stages.iter().enumerate() {
        let key = format!("ema.task.{i}");
        assert_close(
            &key,
            &values(tokens.clone()),
            &reference.values(&key),
            TOLERANCE,
        );
    }
    let logits = model
        .segment(reference.tensor("query_image", &device), &embedding)
        .expect("segments");
    assert_close(
        "logits",
        &values(logits),
        &reference.values("ema.logits"),
        TOLERANCE,
    );
    let out = TempDir::new("import-released");
    export::export_imported(&imported, "mass-base", out.path()).expect("exports");
    let engine = Model::load(out.path()).expect("the engine loads the folder");
    assert_engine_matches(&engine, &reference, imported.config.patch_size);
}
