//! In-context tuning at the `tiny` preset with seeded weights, on phantom
//! volumes (a ball and a box on a textured background, on grids of other
//! spacings and orientations than the model's): the loss goes down, the
//! model's weights stay bit-identical, the result round-trips through
//! `.irisemb` with `Tuned` provenance, bad input is refused naming the
//! problem, and the `iris-train tune` command does the same from files.

use std::path::Path;
use std::sync::{Mutex, PoisonError};

use burn::module::{Module, ModuleVisitor, Param};
use burn::prelude::*;
use burn::tensor::Distribution;
use iris_core::embedding::{
    ModelFingerprint, Preprocessing, Provenance, StageShape, TaskEmbedding,
};
use iris_core::irisemb::{self, Payload};
use iris_core::nifti;
use iris_core::preprocess::IntensityPolicy;
use iris_core::volume::{Affine, Image, LabelMap};
use iris_test_support::TempDir;
use iris_test_support::fixture::phantom;
use iris_train::model::{Iris, IrisConfig, TaskTensors};
use iris_train::training::{Trainer, TrainingConfig, model_fingerprint};
use iris_train::tune::{TuneOptions, loss_on_cases, tune};
use iris_train::{Error, export};

/// The tiny preset with weights drawn from `seed`, on the CPU (plain, or
/// autodiff when `autodiff`). The device's generator is shared by the
/// tests running in parallel and burn draws weights lazily, so the weights
/// are drawn (by fingerprinting them) under one lock.
fn tiny_model(seed: u64, autodiff: bool) -> (Iris, IrisConfig) {
    static RNG: Mutex<()> = Mutex::new(());
    let _guard = RNG.lock().unwrap_or_else(PoisonError::into_inner);
    let config = IrisConfig::tiny();
    let device = Device::flex();
    device.seed(seed);
    let device = if autodiff { device.autodiff() } else { device };
    let model = config.init(&device).expect("tiny preset");
    model_fingerprint(&model, &config);
    (model, config)
}

/// Two labelled cases: 40^3 voxels of 4 mm, and 36 x 44 x 40 voxels of
/// 3.5 x 2.5 x 3 mm with axis `d` flipped; ball and box elsewhere in each.
fn cases() -> Vec<(Image, LabelMap)> {
    let a = phantom(
        [40; 3],
        Affine::from_spacing([4.0; 3]),
        [20.0, 18.0, 21.0],
        7.0,
        ([5, 26, 8], [14, 34, 30]),
    );
    let flipped = Affine([
        [-3.5, 0.0, 0.0, 60.0],
        [0.0, 2.5, 0.0, -50.0],
        [0.0, 0.0, 3.0, -55.0],
        [0.0, 0.0, 0.0, 1.0],
    ]);
    let b = phantom(
        [36, 44, 40],
        flipped,
        [17.0, 24.0, 19.0],
        6.0,
        ([4, 30, 6], [12, 40, 26]),
    );
    vec![a, b]
}

/// The task's stage shapes for `config`: `[T + 1, C_level]` per level.
fn stage_shapes(config: &IrisConfig) -> Vec<StageShape> {
    config
        .task_channels()
        .into_iter()
        .map(|channels| StageShape {
            tokens: (config.query_tokens + 1) as u32,
            channels: channels as u32,
        })
        .collect()
}

/// The model's one-shot embedding of labels 1 ("ball") and 2 ("box") of a
/// reference phantom drawn directly on the model's grid (the patch at the
/// model's spacing), normalised with the MR policy.
fn one_shot(model: &Iris, config: &IrisConfig) -> TaskEmbedding {
    let [d, h, w] = config.patch_size;
    let spacing = config.spacing_mm;
    let (mut image, labels) = phantom(
        config.patch_size,
        Affine::from_spacing([spacing; 3]),
        [14.0, 17.0, 15.0],
        5.0,
        ([4, 6, 20], [10, 12, 28]),
    );
    IntensityPolicy::MR
        .normalize_in_place(&mut image)
        .expect("normalise");
    let device = model.devices()[0].clone();
    let image = Tensor::<5>::from_data(
        TensorData::new(image.data().iter().copied().collect(), [1, 1, d, h, w]),
        &device,
    );
    let masks: Vec<f32> = [1u16, 2]
        .iter()
        .flat_map(|&l| labels.data().iter().map(move |&v| f32::from(v == l)))
        .collect();
    let masks = Tensor::<5>::from_data(TensorData::new(masks, [1, 2, d, h, w]), &device);
    let embedding = model.encode_task(image, masks).expect("encodes");
    embedding
        .to_core(
            model_fingerprint(model, config),
            Preprocessing {
                spacing_mm: [spacing as f32; 3],
                patch: config.patch_size.map(|p| p as u32),
                intensity: IntensityPolicy::MR,
            },
            stage_shapes(config),
            [
                (1, "ball", Provenance::OneShot),
                (2, "box", Provenance::OneShot),
            ],
        )
        .expect("valid embedding")
}

/// Every float parameter's values, in visit order.
fn parameters(model: &Iris) -> Vec<Vec<f32>> {
    struct Collect(Vec<Vec<f32>>);
    impl ModuleVisitor for Collect {
        fn visit_float<const D: usize>(&mut self, param: &Param<Tensor<D>>) {
            self.0.push(param.val().into_data().iter::<f32>().collect());
        }
    }
    let mut collect = Collect(Vec::new());
    model.visit(&mut collect);
    collect.0
}

/// Reads the task embedding back from a `.irisemb` file written exactly.
fn round_trip(task: &TaskEmbedding, dir: &Path) -> TaskEmbedding {
    let path = dir.join("task.irisemb");
    irisemb::write_file(&path, task, Payload::F32).expect("writes");
    irisemb::read_file(&path).expect("reads")
}

#[test]
fn tuning_lowers_the_loss_and_leaves_the_model_bit_identical() {
    let (model, config) = tiny_model(5, false);
    let init = one_shot(&model, &config);
    let cases = cases();
    let before = parameters(&model);
    let fingerprint = model_fingerprint(&model, &config);

    let options = TuneOptions {
        steps: 10,
        learning_rate: 0.1,
        ..TuneOptions::default()
    };
    let mut progress = Vec::new();
    let tuned = tune(&model, &config, &init, &cases, &options, |step, loss| {
        progress.push((step, loss))
    })
    .expect("tunes");
    println!(
        "loss {} -> {} in {} steps: {progress:?}",
        tuned.initial_loss, tuned.final_loss, options.steps
    );

    // Every parameter is untouched, value for value.
    assert_eq!(parameters(&model), before);
    assert_eq!(model_fingerprint(&model, &config), fingerprint);

    // One report per step, the first being the starting embedding's loss,
    // which the independent evaluation reproduces.
    assert_eq!(
        progress.iter().map(|p| p.0).collect::<Vec<_>>(),
        (1..=10).collect::<Vec<_>>()
    );
    assert_eq!(progress[0].1, tuned.initial_loss);
    let init_loss = loss_on_cases(&model, &config, &init, &cases, 1).expect("evaluates");
    assert!(
        (init_loss - tuned.initial_loss).abs() < 1e-5,
        "{init_loss} vs {}",
        tuned.initial_loss
    );
    // The tuned embedding, read back from its file, has the lower loss.
    let dir = TempDir::new("tune-loss");
    let read_back = round_trip(&tuned.embedding, dir.path());
    let tuned_loss = loss_on_cases(&model, &config, &read_back, &cases, 1).expect("evaluates");
    assert!(
        (tuned_loss - tuned.final_loss).abs() < 1e-5,
        "{tuned_loss} vs {}",
        tuned.final_loss
    );
    assert!(
        tuned_loss < 0.98 * init_loss,
        "loss {init_loss} -> {tuned_loss}"
    );
    assert!(progress[9].1 < progress[0].1, "{progress:?}");
}

#[test]
fn tuned_embedding_round_trips_with_tuned_provenance() {
    // A model on an autodiff device (as `Trainer` holds it) works the same.
    let (model, config) = tiny_model(6, true);
    let init = one_shot(&model, &config);
    let cases = cases();
    let fingerprint = model_fingerprint(&model, &config);
    let options = TuneOptions {
        steps: 2,
        ..TuneOptions::default()
    };
    let tuned = tune(&model, &config, &init, &cases, &options, |_, _| {}).expect("tunes");
    assert_eq!(model_fingerprint(&model, &config), fingerprint);
    let loss = loss_on_cases(&model, &config, &tuned.embedding, &cases, 1).expect("evaluates");
    assert!(
        (loss - tuned.final_loss).abs() < 1e-5,
        "{loss} vs {}",
        tuned.final_loss
    );

    let dir = TempDir::new("tune-round-trip");
    let task = round_trip(&tuned.embedding, dir.path());
    assert_eq!(task, tuned.embedding);
    assert_eq!(task.model(), init.model());
    assert_eq!(task.preprocessing(), init.preprocessing());
    assert_eq!(task.stage_shapes(), init.stage_shapes());
    assert_eq!(task.classes().len(), 2);
    for (class, start) in task.classes().iter().zip(init.classes()) {
        assert_eq!((class.label(), class.name()), (start.label(), start.name()));
        assert_eq!(
            class.provenance(),
            Provenance::Tuned {
                steps: 2,
                references: 1
            }
        );
        // The tokens moved, by about the learning rate per Adam step.
        let moved = class
            .stages()
            .iter()
            .flatten()
            .zip(start.stages().iter().flatten())
            .map(|(a, b)| (a - b).abs())
            .fold(0.0f32, f32::max);
        assert!(moved > 0.0 && moved < 0.05, "largest change {moved}");
    }
}

#[test]
fn task_tensors_round_trip_through_the_core_embedding() {
    let config = IrisConfig::tiny();
    let device = Device::flex();
    let stages = config
        .task_channels()
        .into_iter()
        .map(|c| Tensor::<4>::random([1, 3, 11, c], Distribution::Normal(0.0, 1.0), &device))
        .collect();
    let embedding = TaskTensors { stages };
    let classes = (0..3).map(|k| (k + 4, format!("class {k}"), Provenance::OneShot));
    let task = embedding
        .to_core(
            ModelFingerprint::new([1; 32]),
            Preprocessing {
                spacing_mm: [6.0; 3],
                patch: [32; 3],
                intensity: IntensityPolicy::MR,
            },
            stage_shapes(&config),
            classes,
        )
        .expect("valid");
    assert_eq!(task.classes()[2].label(), 6);
    assert_eq!(task.classes()[2].name(), "class 2");
    assert_eq!(
        task.classes()
            .iter()
            .map(|class| class.stages().to_vec())
            .collect::<Vec<_>>(),
        embedding.class_stages()
    );
    let back = TaskTensors::from_core(&task, &device);
    assert_eq!(back.stages.len(), embedding.stages.len());
    for (a, b) in back.stages.into_iter().zip(embedding.stages.clone()) {
        assert_eq!(a.dims(), b.dims());
        assert_eq!(a.into_data(), b.into_data());
    }
    // One label, name and provenance per class, or none is taken.
    let error = embedding
        .to_core(
            ModelFingerprint::new([1; 32]),
            *task.preprocessing(),
            stage_shapes(&config),
            [(1, "one", Provenance::OneShot)],
        )
        .expect_err("three classes, one entry");
    assert!(
        matches!(error, iris_core::Error::ShapeMismatch { .. }),
        "{error}"
    );
}

/// The error text of a tuning run that must fail.
fn refusal(
    model: &Iris,
    config: &IrisConfig,
    init: &TaskEmbedding,
    cases: &[(Image, LabelMap)],
    options: &TuneOptions,
) -> (Error, String) {
    let error = tune(model, config, init, cases, options, |_, _| {
        panic!("a refused run must not take a step")
    })
    .expect_err("refused");
    let message = error.to_string();
    (error, message)
}

#[test]
fn bad_input_is_refused_naming_the_problem() {
    let (model, config) = tiny_model(5, false);
    let init = one_shot(&model, &config);
    let cases = cases();
    let options = TuneOptions::default();

    // An embedding of another model.
    let foreign = TaskEmbedding::new(
        ModelFingerprint::new([0xee; 32]),
        *init.preprocessing(),
        init.stage_shapes().to_vec(),
        init.classes().to_vec(),
    )
    .expect("valid");
    let (error, message) = refusal(&model, &config, &foreign, &cases, &options);
    assert!(
        matches!(error, Error::Core(iris_core::Error::ModelMismatch { .. })),
        "{message}"
    );
    assert!(message.contains(&"ee".repeat(32)), "{message}");

    // A case without one of the task's labels (the box, label 2).
    let (image, labels) = &cases[1];
    let no_box = labels.map(|&v| if v == 2 { 0 } else { v });
    let (_, message) = refusal(
        &model,
        &config,
        &init,
        &[cases[0].clone(), (image.clone(), no_box)],
        &options,
    );
    assert!(
        message.contains("case 2 of 2") && message.contains("label 2"),
        "{message}"
    );

    // Image and label map on different grids.
    let (image, _) = &cases[0];
    let (_, other_grid) = &cases[1];
    let (_, message) = refusal(
        &model,
        &config,
        &init,
        &[(image.clone(), other_grid.clone())],
        &options,
    );
    assert!(
        message.contains("case 1 of 1") && message.contains("label map vs reference image"),
        "{message}"
    );

    // No case at all.
    let (_, message) = refusal(&model, &config, &init, &[], &options);
    assert!(message.contains("0 cases"), "{message}");

    // No step, a learning rate that is not a positive number, or no class
    // per decoder run: each refused by name.
    for (bad, field) in [
        (
            TuneOptions {
                steps: 0,
                ..options.clone()
            },
            "steps",
        ),
        (
            TuneOptions {
                learning_rate: f64::NAN,
                ..options.clone()
            },
            "learning_rate",
        ),
        (
            TuneOptions {
                classes_per_forward: 0,
                ..options.clone()
            },
            "classes_per_forward",
        ),
    ] {
        let (error, message) = refusal(&model, &config, &init, &cases, &bad);
        assert!(
            matches!(error, Error::Config { field: found, .. } if found == field),
            "{field}: {message}"
        );
    }
}

#[test]
fn command_line_tunes_a_task_from_files() {
    let dir = TempDir::new("tune-cli");
    // A one-step training run gives the checkpoint the command loads.
    let run = dir.join("run");
    let (model, config) = tiny_model(8, true);
    let trainer =
        Trainer::with_model(TrainingConfig::new(config.clone(), 1), model).expect("trainer");
    trainer.save_checkpoint(&run).expect("checkpoint");
    let init = one_shot(trainer.model(), &config);
    let task = dir.join("init.irisemb");
    irisemb::write_file(&task, &init, Payload::F32).expect("writes");
    let mut images = Vec::new();
    let mut labels = Vec::new();
    for (i, (image, label_map)) in cases().iter().enumerate() {
        let image_path = dir.join(format!("case{i}.nii.gz"));
        let labels_path = dir.join(format!("case{i}_labels.nii.gz"));
        nifti::write_image(&image_path, image, None).expect("writes");
        nifti::write_labels(&labels_path, label_map, None).expect("writes");
        images.push(image_path.display().to_string());
        labels.push(labels_path.display().to_string());
    }
    let (images, labels) = (images.join(","), labels.join(","));
    let out = dir.join("tuned.irisemb");
    let out_arg = out.display().to_string();
    let tune_from = |checkpoint: &Path, task: &Path, labels: &str, extra: &[&str]| {
        let output = std::process::Command::new(env!("CARGO_BIN_EXE_iris-train"))
            .args(["tune", "--checkpoint"])
            .arg(checkpoint)
            .arg("--task")
            .arg(task)
            .args(["--images", &images, "--labels", labels])
            .args(["--steps", "3", "--out", &out_arg])
            .args(extra)
            .output()
            .expect("runs");
        (
            output.status.code(),
            String::from_utf8_lossy(&output.stdout).into_owned(),
            String::from_utf8_lossy(&output.stderr).into_owned(),
        )
    };
    let iris_train = |task: &Path, labels: &str| tune_from(&run, task, labels, &[]);

    let (code, stdout, stderr) = iris_train(&task, &labels);
    assert_eq!(code, Some(0), "{stderr}");
    assert!(
        stdout.contains("loss") && stdout.contains("after 3 steps"),
        "{stdout}"
    );
    let tuned = irisemb::read_file(&out).expect("written");
    assert_eq!(tuned.model(), &trainer.fingerprint());
    assert!(tuned.classes().iter().all(|c| c.provenance()
        == Provenance::Tuned {
            steps: 3,
            references: 1
        }));
    assert_ne!(tuned.classes()[0].stages(), init.classes()[0].stages());
    let one_per_run = std::fs::read(&out).expect("written");

    // From a model folder's checkpoint/, tuning decodes the classes as the
    // manifest groups them (here both in one run), unless told otherwise.
    let folder = dir.join("model");
    export::export(trainer.model(), &config, "tiny", &folder, None, 2).expect("exports");
    trainer.save_checkpoint(&folder).expect("checkpoint");
    let shipped = folder.join("checkpoint");
    let (code, _, stderr) = tune_from(&shipped, &task, &labels, &[]);
    assert_eq!(code, Some(0), "{stderr}");
    let grouped = std::fs::read(&out).expect("written");
    assert_ne!(grouped, one_per_run, "the manifest's grouping was used");
    let (code, _, stderr) = tune_from(&run, &task, &labels, &["--classes-per-forward", "2"]);
    assert_eq!(code, Some(0), "{stderr}");
    assert_eq!(std::fs::read(&out).expect("written"), grouped);
    let (code, _, stderr) = tune_from(&shipped, &task, &labels, &["--classes-per-forward", "1"]);
    assert_eq!(code, Some(0), "{stderr}");
    assert_eq!(std::fs::read(&out).expect("written"), one_per_run);
    let (code, _, stderr) = tune_from(&shipped, &task, &labels, &["--classes-per-forward", "0"]);
    assert_eq!(code, Some(2), "{stderr}");
    // A manifest of other weights beside the checkpoint: refused by name.
    let (other_model, _) = tiny_model(9, false);
    export::export(&other_model, &config, "tiny", &folder, None, 2).expect("exports");
    std::fs::remove_file(&out).expect("removes");
    let (code, _, stderr) = tune_from(&shipped, &task, &labels, &[]);
    assert_eq!(code, Some(3), "{stderr}");
    assert!(
        stderr.contains("manifest.json") && stderr.contains("does not match"),
        "{stderr}"
    );
    assert!(!out.exists(), "nothing written");

    // One label map short: a usage error, nothing written.
    let first_only = labels.split(',').next().expect("two label maps");
    let (code, _, stderr) = iris_train(&task, first_only);
    assert_eq!(code, Some(2), "{stderr}");
    assert!(stderr.contains("2 --images but 1 --labels"), "{stderr}");
    // A task of another model: refused, nothing written.
    let foreign = dir.join("foreign.irisemb");
    let other = TaskEmbedding::new(
        ModelFingerprint::new([0xee; 32]),
        *init.preprocessing(),
        init.stage_shapes().to_vec(),
        init.classes().to_vec(),
    )
    .expect("valid");
    irisemb::write_file(&foreign, &other, Payload::F32).expect("writes");
    let (code, _, stderr) = iris_train(&foreign, &labels);
    assert_eq!(code, Some(1), "{stderr}");
    assert!(stderr.contains("another model"), "{stderr}");
    // A task file that is not there.
    let (code, _, stderr) = iris_train(&dir.join("missing.irisemb"), &labels);
    assert_eq!(code, Some(3), "{stderr}");
    assert!(stderr.contains("missing.irisemb"), "{stderr}");
    assert!(!out.exists());
}
