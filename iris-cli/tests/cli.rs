//! The `iris` binary run as a user runs it: on `.irisemb` files made through
//! iris-core's API, on the real volumes of `data/` (fetched by
//! `scripts/fetch-data.sh`; tests that need them skip when absent, and fail
//! under `IRIS_REQUIRE_DATA=1`), and end to end on a model folder of known
//! maths (`iris_test_support::fixture`), every output compared with the Rust
//! API's.

use std::ffi::{OsStr, OsString};
use std::path::{Path, PathBuf};
use std::process::{Command, Output};

use iris_core::embedding::{
    ClassEmbedding, ModelFingerprint, Preprocessing, Provenance, StageShape, TaskEmbedding,
};
use iris_core::engine::{
    EncodeOptions, Model, PoolReference, Precision, Retrieval, RetrievalLevel, RetrieveOptions,
    SegmentOptions, TaskClass,
};
use iris_core::irisemb::{self, Payload};
use iris_core::nifti;
use iris_core::preprocess::IntensityPolicy;
use iris_core::volume::{Affine, Image, LabelMap};
use iris_test_support::{TempDir, data_file, fixture};
use serde_json::Value;

/// Runs `iris args...` with IRIS_MODEL unset.
fn iris<S: AsRef<std::ffi::OsStr>>(args: &[S]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_iris"))
        .args(args)
        .env_remove("IRIS_MODEL")
        .output()
        .expect("the iris binary runs")
}

fn stdout(o: &Output) -> String {
    String::from_utf8_lossy(&o.stdout).into_owned()
}

fn stderr(o: &Output) -> String {
    String::from_utf8_lossy(&o.stderr).into_owned()
}

/// Asserts the exit code, showing the output otherwise.
fn expect_code(o: &Output, code: i32) {
    assert_eq!(
        o.status.code(),
        Some(code),
        "stdout:\n{}\nstderr:\n{}",
        stdout(o),
        stderr(o)
    );
}

fn json(o: &Output) -> Value {
    expect_code(o, 0);
    serde_json::from_slice(&o.stdout).expect("valid JSON on stdout")
}

const SHAPES: [StageShape; 2] = [
    StageShape {
        tokens: 3,
        channels: 4,
    },
    StageShape {
        tokens: 3,
        channels: 2,
    },
];

fn preprocessing() -> Preprocessing {
    Preprocessing {
        spacing_mm: [1.5, 1.5, 2.0],
        patch: [64, 64, 32],
        intensity: IntensityPolicy::CT,
    }
}

/// A task embedding of `classes` (label, name), every value of class `i`
/// equal to `value + i`, made by model `model`.
fn task(model: u8, classes: &[(u32, &str)], value: f32) -> TaskEmbedding {
    let classes = classes
        .iter()
        .enumerate()
        .map(|(i, &(label, name))| {
            let v = value + i as f32;
            ClassEmbedding::new(
                label,
                name,
                Provenance::OneShot,
                vec![vec![v; 12], vec![-v; 6]],
            )
            .unwrap()
        })
        .collect();
    TaskEmbedding::new(
        ModelFingerprint::new([model; 32]),
        preprocessing(),
        SHAPES.to_vec(),
        classes,
    )
    .unwrap()
}

fn write_task(dir: &TempDir, name: &str, t: &TaskEmbedding) -> PathBuf {
    let path = dir.join(name);
    irisemb::write_file(&path, t, Payload::F32).unwrap();
    path
}

#[test]
fn help_documents_the_exit_codes_and_usage_errors_exit_2() {
    let o = iris(&["--help"]);
    expect_code(&o, 0);
    let help = stdout(&o);
    for line in [
        "0  success",
        "2  usage error",
        "3  bad input file",
        "4  model problem",
    ] {
        assert!(help.contains(line), "{help}");
    }
    expect_code(&iris(&["eval", "--pred", "x.nii"]), 2);
    expect_code(&iris(&["no-such-command"]), 2);
    // --task and --bank are alternatives.
    let o = iris(&[
        "segment",
        "--image",
        "q.nii",
        "--task",
        "t.irisemb",
        "--bank",
        "--out",
        "s.nii",
    ]);
    expect_code(&o, 2);
    // An unknown precision, named with the ones there are.
    let o = iris(&[
        "segment",
        "--precision",
        "fp16",
        "--image",
        "q.nii",
        "--out",
        "s.nii",
    ]);
    expect_code(&o, 2);
    assert!(
        stderr(&o).contains("`fp16`: expected f32 or bf16"),
        "{}",
        stderr(&o)
    );
}

#[test]
fn inspect_reports_what_the_file_holds() {
    let dir = TempDir::new("inspect");
    let t = task(7, &[(1, "liver"), (5, "spleen")], 0.5);
    let path = write_task(&dir, "task.irisemb", &t);
    let v = json(&iris(&[Path::new("inspect"), &path, Path::new("--json")]));
    assert_eq!(v["model"], "07".repeat(32));
    assert_eq!(
        v["preprocessing"]["spacing_mm"],
        serde_json::json!([1.5, 1.5, 2.0])
    );
    assert_eq!(v["preprocessing"]["patch"], serde_json::json!([64, 64, 32]));
    assert_eq!(
        v["preprocessing"]["intensity"],
        serde_json::json!({"policy": "ct", "min_hu": -991.0, "max_hu": 500.0})
    );
    assert_eq!(
        v["stages"],
        serde_json::json!([{"tokens": 3, "channels": 4}, {"tokens": 3, "channels": 2}])
    );
    assert_eq!(
        v["classes"],
        serde_json::json!([
            {"label": 1, "name": "liver", "provenance": {"kind": "one-shot"}},
            {"label": 5, "name": "spleen", "provenance": {"kind": "one-shot"}},
        ])
    );
    let o = iris(&[Path::new("inspect"), &path]);
    expect_code(&o, 0);
    let text = stdout(&o);
    for part in [
        "07070707",
        "1.5 x 1.5 x 2 mm",
        "64 x 64 x 32 voxels",
        "[3, 4], [3, 2]",
        "spleen",
        "one-shot",
    ] {
        assert!(text.contains(part), "{part:?} missing from\n{text}");
    }

    // A name from a file cannot drive the terminal or break the table: it
    // is printed escaped (JSON keeps it exact, escaped by JSON's rules).
    let hostile = "red\u{1b}[31m\nfake row\u{202e}";
    let t = task(7, &[(1, hostile)], 0.5);
    let path = write_task(&dir, "hostile.irisemb", &t);
    let text = stdout(&iris(&[Path::new("inspect"), &path]));
    assert!(!text.contains(['\u{1b}', '\u{202e}']), "{text:?}");
    assert!(
        text.contains("red\\u{1b}[31m\\nfake row\\u{202e}"),
        "{text}"
    );
    assert_eq!(text.lines().filter(|l| l.contains("fake row")).count(), 1);
    let v = json(&iris(&[Path::new("inspect"), &path, Path::new("--json")]));
    assert_eq!(v["classes"][0]["name"], hostile);

    // Reading stops at the header: a device without an end is refused.
    if Path::new("/dev/zero").exists() {
        let o = iris(&["inspect", "/dev/zero"]);
        expect_code(&o, 3);
        assert!(stderr(&o).contains("/dev/zero"), "{}", stderr(&o));
    }
}

#[test]
fn damaged_or_foreign_embedding_files_exit_3_naming_the_file() {
    let dir = TempDir::new("corrupt");
    let path = write_task(&dir, "task.irisemb", &task(7, &[(1, "liver")], 0.5));
    let mut bytes = std::fs::read(&path).unwrap();
    let middle = bytes.len() / 2;
    bytes[middle] ^= 0x40;
    let flipped = dir.join("flipped.irisemb");
    std::fs::write(&flipped, &bytes).unwrap();
    let o = iris(&[Path::new("inspect"), &flipped]);
    expect_code(&o, 3);
    let err = stderr(&o);
    assert!(
        err.contains("flipped.irisemb") && err.contains("checksum"),
        "{err}"
    );
    assert_eq!(err.lines().count(), 1, "one line: {err}");

    let text = dir.join("notes.irisemb");
    std::fs::write(&text, "just some text, not an embedding").unwrap();
    let o = iris(&[Path::new("inspect"), &text]);
    expect_code(&o, 3);
    assert!(stderr(&o).contains("notes.irisemb") && stderr(&o).contains("not an .irisemb file"));

    let missing = dir.join("absent.irisemb");
    let o = iris(&[Path::new("inspect"), &missing]);
    expect_code(&o, 3);
    assert!(stderr(&o).contains("absent.irisemb"), "{}", stderr(&o));
}

#[test]
fn ensemble_averages_and_refuses_mixed_models() {
    let dir = TempDir::new("ensemble");
    let classes = [(1, "liver"), (5, "spleen")];
    let a = write_task(&dir, "a.irisemb", &task(7, &classes, 1.0));
    let b = write_task(&dir, "b.irisemb", &task(7, &classes, 3.0));
    let c = write_task(&dir, "c.irisemb", &task(7, &classes, 8.0));
    let merged = dir.join("merged.irisemb");
    let o = iris(&[
        Path::new("ensemble"),
        Path::new("--out"),
        &merged,
        &a,
        &b,
        &c,
    ]);
    expect_code(&o, 0);
    let m = irisemb::read_file(&merged).unwrap();
    // Class 0: mean of 1, 3, 8 = 4; class 1: mean of 2, 4, 9 = 5.
    assert_eq!(m.class(1).unwrap().stages()[0], [4.0; 12]);
    assert_eq!(m.class(5).unwrap().stages()[1], [-5.0; 6]);
    assert_eq!(
        m.class(5).unwrap().provenance(),
        Provenance::Ensemble { references: 3 }
    );
    let v = json(&iris(&[Path::new("inspect"), &merged, Path::new("--json")]));
    assert_eq!(
        v["classes"][0]["provenance"],
        serde_json::json!({"kind": "ensemble", "references": 3})
    );
    let text = stdout(&iris(&[Path::new("inspect"), &merged]));
    assert!(text.contains("ensemble of 3 references"), "{text}");

    // Another model: exit 4, both files named, nothing written.
    let other = write_task(&dir, "other.irisemb", &task(9, &classes, 1.0));
    let out = dir.join("mixed.irisemb");
    let o = iris(&[Path::new("ensemble"), Path::new("--out"), &out, &a, &other]);
    expect_code(&o, 4);
    let err = stderr(&o);
    assert!(
        err.contains("a.irisemb") && err.contains("other.irisemb"),
        "{err}"
    );
    assert!(
        err.contains(&"09".repeat(32)) && err.contains(&"07".repeat(32)),
        "{err}"
    );
    assert!(!out.exists());

    // Other classes: exit 3 naming the classes.
    let liver = write_task(&dir, "liver.irisemb", &task(7, &[(1, "liver")], 1.0));
    let o = iris(&[Path::new("ensemble"), Path::new("--out"), &out, &a, &liver]);
    expect_code(&o, 3);
    assert!(stderr(&o).contains("spleen"), "{}", stderr(&o));
    assert!(!out.exists());

    // One file is not an ensemble.
    expect_code(
        &iris(&[Path::new("ensemble"), Path::new("--out"), &out, &a]),
        2,
    );
}

/// Dice of `label` between two maps, counted here independently of iris-core.
fn dice(a: &LabelMap, b: &LabelMap, label: u16) -> Option<f64> {
    let (mut na, mut nb, mut both) = (0u64, 0u64, 0u64);
    for (&x, &y) in a.data().iter().zip(b.data().iter()) {
        na += u64::from(x == label);
        nb += u64::from(y == label);
        both += u64::from(x == label && y == label);
    }
    (na + nb > 0).then(|| 2.0 * both as f64 / (na + nb) as f64)
}

#[test]
fn eval_scores_a_real_atlas_against_itself_and_a_shifted_copy() {
    let Some(aal) = data_file("mricron/aal.nii.gz") else {
        return;
    };
    let dir = TempDir::new("eval");
    let v = json(&iris(&[
        Path::new("eval"),
        Path::new("--pred"),
        &aal,
        Path::new("--truth"),
        &aal,
        Path::new("--json"),
    ]));
    let classes = v["classes"].as_array().unwrap();
    assert_eq!(classes.len(), 116, "AAL has 116 regions");
    let (atlas, info) = nifti::read_labels(&aal).unwrap();
    for c in classes {
        assert_eq!(c["dice"], 1.0, "{c}");
        assert_eq!(c["prediction_ml"], c["truth_ml"]);
        // 1 mm voxels: mL = voxels / 1000.
        let label = c["label"].as_u64().unwrap() as u16;
        let ml = atlas.count(label) as f64 / 1000.0;
        assert!((c["truth_ml"].as_f64().unwrap() - ml).abs() < 1e-9, "{c}");
    }
    assert_eq!(v["mean_dice"], 1.0);

    // The same atlas moved by 3 voxels along w (and its grid kept).
    let mut data = ndarray::Array3::<u16>::zeros(atlas.data().dim());
    let w = atlas.shape()[2];
    data.slice_mut(ndarray::s![.., .., 3..])
        .assign(&atlas.data().slice(ndarray::s![.., .., ..w - 3]));
    let shifted = LabelMap::with_geometry(data, *atlas.geometry()).unwrap();
    let shifted_path = dir.join("shifted.nii.gz");
    nifti::write_labels(&shifted_path, &shifted, Some(&info)).unwrap();
    let v = json(&iris(&[
        Path::new("eval"),
        Path::new("--pred"),
        &shifted_path,
        Path::new("--truth"),
        &aal,
        Path::new("--classes"),
        Path::new("1,2,45,200"),
        Path::new("--json"),
    ]));
    let classes = v["classes"].as_array().unwrap();
    assert_eq!(classes.len(), 4);
    for c in &classes[..3] {
        let label = c["label"].as_u64().unwrap() as u16;
        let d = c["dice"].as_f64().unwrap();
        let want = dice(&shifted, &atlas, label).unwrap();
        assert!(d < 1.0 && d > 0.3, "{c}");
        assert!((d - want).abs() < 1e-12, "{c}: independent Dice {want}");
    }
    // Label 200 is in neither map.
    assert_eq!(classes[3]["dice"], Value::Null);
    let o = iris(&[
        Path::new("eval"),
        Path::new("--pred"),
        &shifted_path,
        Path::new("--truth"),
        &aal,
        Path::new("--classes"),
        Path::new("1"),
    ]);
    expect_code(&o, 0);
    assert!(stdout(&o).contains("mean Dice"), "{}", stdout(&o));
}

#[test]
fn eval_refuses_label_maps_on_other_grids() {
    let dir = TempDir::new("grids");
    let affine = Affine([
        [-1.0, 0.0, 0.0, 10.0],
        [0.0, 1.0, 0.0, -20.0],
        [0.0, 0.0, 1.0, 5.0],
        [0.0, 0.0, 0.0, 1.0],
    ]);
    let map = |shape: [usize; 3], affine| {
        let n = shape.iter().product();
        LabelMap::from_vec(shape, affine, (0..n).map(|i| (i % 3) as u16).collect()).unwrap()
    };
    let truth = dir.join("truth.nii.gz");
    nifti::write_labels(&truth, &map([8, 9, 10], affine), None).unwrap();
    let cropped = dir.join("cropped.nii.gz");
    nifti::write_labels(&cropped, &map([8, 9, 9], affine), None).unwrap();
    let mut moved_affine = affine;
    moved_affine.0[1][3] += 5.0;
    let moved = dir.join("moved.nii.gz");
    nifti::write_labels(&moved, &map([8, 9, 10], moved_affine), None).unwrap();

    let o = iris(&[
        Path::new("eval"),
        Path::new("--pred"),
        &cropped,
        Path::new("--truth"),
        &truth,
    ]);
    expect_code(&o, 3);
    let err = stderr(&o);
    assert!(
        err.contains("shape") && err.contains("cropped.nii.gz") && err.contains("truth.nii.gz"),
        "{err}"
    );
    assert!(
        err.contains("[8, 9, 10]") && err.contains("[8, 9, 9]"),
        "{err}"
    );

    let o = iris(&[
        Path::new("eval"),
        Path::new("--pred"),
        &moved,
        Path::new("--truth"),
        &truth,
    ]);
    expect_code(&o, 3);
    let err = stderr(&o);
    assert!(
        err.contains("affine") && err.contains("moved.nii.gz"),
        "{err}"
    );

    let not_nifti = dir.join("fake.nii.gz");
    std::fs::write(&not_nifti, "hello").unwrap();
    let o = iris(&[
        Path::new("eval"),
        Path::new("--pred"),
        &not_nifti,
        Path::new("--truth"),
        &truth,
    ]);
    expect_code(&o, 3);
    assert!(stderr(&o).contains("fake.nii.gz"), "{}", stderr(&o));

    // The same grid: fine, and Dice 1 for itself.
    let v = json(&iris(&[
        Path::new("eval"),
        Path::new("--pred"),
        &truth,
        Path::new("--truth"),
        &truth,
        Path::new("--json"),
    ]));
    assert_eq!(v["mean_dice"], 1.0);
}

#[test]
fn commands_that_need_a_model_say_where_they_looked() {
    let dir = TempDir::new("model");
    let missing = dir.join("no-model-here");
    let out = dir.join("task.irisemb");
    let o = iris(&[
        Path::new("encode"),
        Path::new("--image"),
        Path::new("ref.nii.gz"),
        Path::new("--label"),
        Path::new("ref_label.nii.gz"),
        Path::new("--out"),
        &out,
        Path::new("--model"),
        &missing,
    ]);
    expect_code(&o, 4);
    let err = stderr(&o);
    assert!(
        err.contains(&format!(
            "no model at {}: pass --model DIR or set IRIS_MODEL",
            missing.display()
        )),
        "{err}"
    );
    // IRIS_MODEL is read when --model is absent.
    let o = Command::new(env!("CARGO_BIN_EXE_iris"))
        .args(["segment", "--image", "q.nii.gz", "--bank", "--out"])
        .arg(dir.join("seg.nii.gz"))
        .env("IRIS_MODEL", &missing)
        .output()
        .unwrap();
    expect_code(&o, 4);
    assert!(
        stderr(&o).contains(&missing.display().to_string()),
        "{}",
        stderr(&o)
    );
    // Bad output names are usage errors, found before any work.
    let o = iris(&[
        Path::new("segment"),
        Path::new("--image"),
        Path::new("q.nii.gz"),
        Path::new("--bank"),
        Path::new("--out"),
        &dir.join("seg.png"),
    ]);
    expect_code(&o, 2);
    assert!(stderr(&o).contains(".nii or .nii.gz"), "{}", stderr(&o));
    assert!(!out.exists());
}

/// The user's whole journey on a model folder (of known maths, untrained):
/// encode a reference, inspect the task, segment a query from the task and
/// straight from the reference (labels, probabilities, preview), score it,
/// and refuse another model's task. Every output equals what the Rust API
/// computes from the same files.
#[test]
fn encode_segment_eval_on_an_exported_model_match_the_rust_api() {
    let files = fixture::fixture("cli-journey");
    let model_dir = files.model.as_os_str();
    let (reference, reference_labels) = (files.file("ref.nii.gz"), files.file("ref_labels.nii.gz"));
    let (query_path, truth_path) = (files.file("query.nii.gz"), files.file("query_truth.nii.gz"));
    let out = |name: &str| files.root.join(name);

    let task_path = out("task.irisemb");
    expect_code(
        &iris(&[
            "encode".as_ref(),
            "--model".as_ref(),
            model_dir,
            "--image".as_ref(),
            reference.as_os_str(),
            "--label".as_ref(),
            reference_labels.as_os_str(),
            "--classes".as_ref(),
            "1,2".as_ref(),
            "--names".as_ref(),
            "ball,box".as_ref(),
            "--out".as_ref(),
            task_path.as_os_str(),
            "--quiet".as_ref(),
        ]),
        0,
    );
    let model = Model::load(&files.model).unwrap();
    let (image, _) = nifti::read_image(&reference).unwrap();
    let (labels, _) = nifti::read_labels(&reference_labels).unwrap();
    let classes = [TaskClass::new(1, "ball"), TaskClass::new(2, "box")];
    let task = model
        .encode_task(&image, &labels, &classes, &EncodeOptions::default())
        .unwrap();
    assert_eq!(irisemb::read_file(&task_path).unwrap(), task);

    let v = json(&iris(&[
        "inspect".as_ref(),
        task_path.as_os_str(),
        "--json".as_ref(),
    ]));
    assert_eq!(v["model"], model.fingerprint().to_string());
    assert_eq!(v["classes"][0]["name"], "ball");
    assert_eq!(v["classes"][1]["label"], 2);

    // From the task file, with probabilities and a preview; bf16 changes
    // only the products of Winograd's convolutions, which this model has
    // none of, so the labels are f32's.
    let (seg, probs, png) = (out("seg.nii.gz"), out("p.nii.gz"), out("seg.png"));
    let summary = json(&iris(&[
        "segment".as_ref(),
        "--model".as_ref(),
        model_dir,
        "--threads".as_ref(),
        "1".as_ref(),
        "--precision".as_ref(),
        "bf16".as_ref(),
        "--image".as_ref(),
        query_path.as_os_str(),
        "--task".as_ref(),
        task_path.as_os_str(),
        "--out".as_ref(),
        seg.as_os_str(),
        "--probabilities".as_ref(),
        probs.as_os_str(),
        "--preview".as_ref(),
        png.as_os_str(),
        "--json".as_ref(),
    ]));
    let ran = Precision::Bfloat16.on_this_cpu();
    assert_eq!(summary["precision"], ran.name());
    let (query, _) = nifti::read_image(&query_path).unwrap();
    let options = SegmentOptions {
        probabilities: true,
        ..SegmentOptions::default()
    };
    let expected = model.segment(&query, &task, &options).unwrap();
    let (written, _) = nifti::read_labels(&seg).unwrap();
    query
        .geometry()
        .ensure_same(written.geometry(), "seg.nii.gz")
        .expect("labels on the query's grid");
    assert_eq!(written.data(), expected.labels.data());
    for (i, class) in summary["classes"].as_array().unwrap().iter().enumerate() {
        let label = [1u16, 2][i];
        let voxels = expected
            .labels
            .data()
            .iter()
            .filter(|&&l| l == label)
            .count();
        assert_eq!(class["voxels"], voxels, "class {label}");
    }
    let maps = expected.probabilities.as_ref().unwrap();
    for (label, map) in [1, 2].iter().zip(maps) {
        let (p, _) = nifti::read_image(out(&format!("p-{label}.nii.gz"))).unwrap();
        assert_eq!(p.data(), map.data(), "probabilities of class {label}");
    }
    let bytes = std::fs::read(&png).unwrap();
    assert_eq!(&bytes[..8], b"\x89PNG\r\n\x1a\n");
    let ihdr = |at: usize| u32::from_be_bytes(bytes[at..at + 4].try_into().unwrap());
    assert_eq!(
        (ihdr(16), ihdr(20)),
        (
            summary["preview"]["width"].as_u64().unwrap() as u32,
            summary["preview"]["height"].as_u64().unwrap() as u32
        )
    );

    // Straight from the reference: the same task, so the same labels.
    let seg2 = out("seg2.nii.gz");
    expect_code(
        &iris(&[
            "segment".as_ref(),
            "--model".as_ref(),
            model_dir,
            "--image".as_ref(),
            query_path.as_os_str(),
            "--ref-image".as_ref(),
            reference.as_os_str(),
            "--ref-label".as_ref(),
            reference_labels.as_os_str(),
            "--classes".as_ref(),
            "1,2".as_ref(),
            "--out".as_ref(),
            seg2.as_os_str(),
            "--quiet".as_ref(),
        ]),
        0,
    );
    assert_eq!(
        nifti::read_labels(&seg2).unwrap().0.data(),
        expected.labels.data()
    );

    // Dice against the truth, as iris-core computes it.
    let report = json(&iris(&[
        "eval".as_ref(),
        "--pred".as_ref(),
        seg.as_os_str(),
        "--truth".as_ref(),
        truth_path.as_os_str(),
        "--classes".as_ref(),
        "1,2".as_ref(),
        "--json".as_ref(),
    ]));
    let (truth, _) = nifti::read_labels(&truth_path).unwrap();
    for (i, label) in [1, 2].into_iter().enumerate() {
        let got = report["classes"][i]["dice"].as_f64();
        assert_eq!(got, dice(&expected.labels, &truth, label), "class {label}");
    }

    // Another model's task: exit 4, naming the file, and no output left.
    let refused = out("refused.nii.gz");
    let foreign = files.file("foreign.irisemb");
    let o = iris(&[
        "segment".as_ref(),
        "--model".as_ref(),
        model_dir,
        "--image".as_ref(),
        query_path.as_os_str(),
        "--task".as_ref(),
        foreign.as_os_str(),
        "--out".as_ref(),
        refused.as_os_str(),
    ]);
    expect_code(&o, 4);
    assert!(stderr(&o).contains("foreign.irisemb"), "{}", stderr(&o));
    assert!(!refused.exists());
}

/// `iris encode` and `iris segment` on real anatomy from the fetch script:
/// Colin27's precentral gyri (AAL 1 and 2) as the reference, the MNI152
/// brain (another grid) and the skull-stripped Colin27 as queries, on a
/// model of known maths (untrained: this checks the plumbing, not
/// quality). The label maps keep each query's grid and header, hold the
/// task's labels and no other, and `iris eval` gives the Dice counted here.
/// `--memory-budget` and `--max-windows` reach the reading and the
/// pipeline: too small, the command exits 3 naming the file and the limit
/// and writes nothing; large enough, it runs; a malformed size is a usage
/// error.
#[test]
fn memory_budget_and_max_windows_limit_each_volume() {
    let files = fixture::fixture("cli-limits");
    let model_dir = files.model.as_os_str();
    let (reference, reference_labels) = (files.file("ref.nii.gz"), files.file("ref_labels.nii.gz"));
    let query = files.file("query.nii.gz");
    let (task, seg) = (
        files.root.join("task.irisemb"),
        files.root.join("seg.nii.gz"),
    );
    let encode = |limits: &[&str]| {
        let mut args = vec![
            "encode",
            "--image",
            reference.to_str().unwrap(),
            "--label",
            reference_labels.to_str().unwrap(),
            "--out",
            task.to_str().unwrap(),
            "--quiet",
            "--model",
            model_dir.to_str().unwrap(),
        ];
        args.extend_from_slice(limits);
        iris(&args)
    };
    let segment = |limits: &[&str]| {
        let mut args = vec![
            "segment",
            "--image",
            query.to_str().unwrap(),
            "--task",
            task.to_str().unwrap(),
            "--out",
            seg.to_str().unwrap(),
            "--quiet",
            "--model",
            model_dir.to_str().unwrap(),
        ];
        args.extend_from_slice(limits);
        iris(&args)
    };

    let o = encode(&["--memory-budget", "1K"]);
    expect_code(&o, 3);
    assert!(
        stderr(&o).contains("ref.nii.gz") && stderr(&o).contains("budget of 1.00 KiB"),
        "{}",
        stderr(&o)
    );
    assert!(!task.exists());
    expect_code(
        &encode(&["--memory-budget", "1G", "--max-windows", "100"]),
        0,
    );

    let o = segment(&["--memory-budget", "64K"]);
    expect_code(&o, 3);
    assert!(
        stderr(&o).contains("query.nii.gz") && stderr(&o).contains("budget of 64.00 KiB"),
        "{}",
        stderr(&o)
    );
    let o = segment(&["--max-windows", "1"]);
    expect_code(&o, 3);
    assert!(
        stderr(&o).contains("query.nii.gz") && stderr(&o).contains("window"),
        "{}",
        stderr(&o)
    );
    assert!(!seg.exists());
    expect_code(
        &segment(&["--memory-budget", "1g", "--max-windows", "100"]),
        0,
    );
    assert!(seg.exists());

    for bad in ["8X", "0", "1.5G", "99999999999T", ""] {
        let o = segment(&["--memory-budget", bad]);
        expect_code(&o, 2);
        assert!(
            stderr(&o).contains("--memory-budget"),
            "{bad}: {}",
            stderr(&o)
        );
    }
}

#[test]
fn encode_and_segment_real_anatomy_then_eval() {
    let (Some(ch2), Some(aal), Some(bet), Some(mni)) = (
        data_file("mricron/ch2.nii.gz"),
        data_file("mricron/aal.nii.gz"),
        data_file("mricron/ch2bet.nii.gz"),
        data_file("mni152/mni_icbm152_t1_tal_nlin_sym_09a_converted.nii.gz"),
    ) else {
        return;
    };
    let dir = TempDir::new("real");
    let model = dir.join("model");
    fixture::model(&model, 11);
    let task = dir.join("precentral.irisemb");
    let encode = iris(&[
        "encode".as_ref(),
        "--model".as_ref(),
        model.as_os_str(),
        "--image".as_ref(),
        ch2.as_os_str(),
        "--label".as_ref(),
        aal.as_os_str(),
        "--classes".as_ref(),
        "1,2".as_ref(),
        "--out".as_ref(),
        task.as_os_str(),
        "--quiet".as_ref(),
    ]);
    expect_code(&encode, 0);
    let labels: Vec<u32> = irisemb::read_file(&task)
        .unwrap()
        .classes()
        .iter()
        .map(|c| c.label())
        .collect();
    assert_eq!(labels, [1, 2], "the task holds the chosen classes");

    for (name, query) in [("mni152", &mni), ("ch2bet", &bet)] {
        let seg = dir.join(format!("{name}-seg.nii.gz"));
        expect_code(
            &iris(&[
                "segment".as_ref(),
                "--model".as_ref(),
                model.as_os_str(),
                "--image".as_ref(),
                query.as_os_str(),
                "--task".as_ref(),
                task.as_os_str(),
                "--out".as_ref(),
                seg.as_os_str(),
                "--quiet".as_ref(),
            ]),
            0,
        );
        let (image, image_info) = nifti::read_image(query).unwrap();
        let (labels, labels_info) = nifti::read_labels(&seg).unwrap();
        image
            .geometry()
            .ensure_same(labels.geometry(), name)
            .expect("the label map lies on the query's grid");
        assert_eq!(labels_info.sform_code, image_info.sform_code, "{name}");
        assert!(
            labels.data().iter().all(|&l| l <= 2),
            "{name}: only the task's labels"
        );
        // The weights are random, so this says only that labels reach the
        // file (this seed labels both classes in both queries).
        for label in [1, 2] {
            assert!(labels.count(label) > 0, "{name}: label {label} present");
        }
    }

    let pred = dir.join("ch2bet-seg.nii.gz");
    let report = json(&iris(&[
        "eval".as_ref(),
        "--pred".as_ref(),
        pred.as_os_str(),
        "--truth".as_ref(),
        aal.as_os_str(),
        "--classes".as_ref(),
        "1,2".as_ref(),
        "--json".as_ref(),
    ]));
    let (pred, _) = nifti::read_labels(&pred).unwrap();
    let (truth, _) = nifti::read_labels(&aal).unwrap();
    for (i, label) in [1, 2].into_iter().enumerate() {
        let got = report["classes"][i]["dice"].as_f64();
        assert_eq!(got, dice(&pred, &truth, label), "class {label}");
    }
}

/// A reference like the fixture's, with the ball moved by `shift` voxels and
/// given `radius`; `relabel` maps each label value of its map.
fn pool_case(shift: f64, radius: f64, relabel: fn(u16) -> u16) -> (Image, LabelMap) {
    let (image, _) = fixture::reference();
    let (image, mut labels) = fixture::phantom(
        [40, 40, 40],
        image.geometry().affine(),
        [20.0 + shift, 18.0 - shift, 21.0],
        radius,
        ([5, 26, 8], [14, 34, 30]),
    );
    labels.data_mut().mapv_inplace(relabel);
    (image, labels)
}

/// Writes a case of an nnU-Net pool: `labelsTr/NAME.nii.gz` and the image
/// as `imagesTr/IMAGE_FILE`.
fn write_case(pool: &Path, name: &str, image_file: &str, case: &(Image, LabelMap)) {
    for sub in ["imagesTr", "labelsTr"] {
        std::fs::create_dir_all(pool.join(sub)).unwrap();
    }
    nifti::write_image(pool.join("imagesTr").join(image_file), &case.0, None).unwrap();
    nifti::write_labels(
        pool.join("labelsTr").join(format!("{name}.nii.gz")),
        &case.1,
        None,
    )
    .unwrap();
}

/// Asserts that the summary's references per class are `result`'s choices:
/// the same names in the same order, the same similarities (null for NaN).
fn assert_choices(summary: &Value, result: &Retrieval, pool: &[PoolReference]) {
    let classes = summary["classes"].as_array().unwrap();
    assert_eq!(classes.len(), result.choices.len(), "{summary:#}");
    for (class, choice) in classes.iter().zip(&result.choices) {
        assert_eq!(class["label"], choice.label);
        let references = class["references"].as_array().unwrap();
        assert_eq!(references.len(), choice.chosen.len(), "{class}");
        for (reference, chosen) in references.iter().zip(&choice.chosen) {
            assert_eq!(
                reference["name"],
                pool[chosen.index].name.as_str(),
                "{class}"
            );
            match reference["similarity"].as_f64() {
                Some(s) => assert_eq!(s as f32, chosen.similarity, "{class}"),
                None => assert!(chosen.similarity.is_nan(), "{class}: {chosen:?}"),
            }
        }
    }
}

/// Reads the label map `path` and asserts it is `expected`'s, on the
/// query's grid.
fn assert_labels(path: &Path, query: &Image, expected: &LabelMap) {
    let (written, _) = nifti::read_labels(path).unwrap();
    query
        .geometry()
        .ensure_same(written.geometry(), "the retrieved labels")
        .expect("labels on the query's grid");
    assert_eq!(written.data(), expected.data());
}

/// `iris retrieve` on a pool in the nnU-Net layout, at object and image
/// level: the label map, the references chosen per class (JSON) and the
/// saved task equal `Model::retrieve` on the same files through the Rust
/// API. The pool mixes both image names, a case with one class only, a case
/// with none of the classes asked for (skipped with a note), an AppleDouble
/// file to ignore, and a dataset.json naming the labels.
#[test]
fn retrieve_from_an_image_pool_matches_model_retrieve_at_both_levels() {
    let files = fixture::fixture("cli-retrieve");
    let model_dir = files.model.as_os_str();
    let pool_dir = files.root.join("pool");
    let cases = [
        ("case_a", "case_a_0000.nii.gz", pool_case(0.0, 7.0, |l| l)),
        ("case_b", "case_b.nii.gz", pool_case(3.0, 5.0, |l| l)),
        // The ball only.
        (
            "case_c",
            "case_c_0000.nii.gz",
            pool_case(-4.0, 9.0, |l| l % 2),
        ),
        // The box only, as label 3.
        (
            "case_d",
            "case_d_0000.nii.gz",
            pool_case(0.0, 6.0, |l| 3 * (l / 2)),
        ),
    ];
    for (name, image_file, case) in &cases {
        write_case(&pool_dir, name, image_file, case);
    }
    std::fs::write(pool_dir.join("labelsTr/._case_a.nii.gz"), "resource fork").unwrap();
    std::fs::write(
        pool_dir.join("dataset.json"),
        r#"{"name": "phantoms", "labels": {"0": "background", "1": "ball", "2": "box", "3": "slab"}}"#,
    )
    .unwrap();
    let model = Model::load(&files.model).unwrap();
    let query_path = files.file("query.nii.gz");
    let (query, _) = nifti::read_image(&query_path).unwrap();
    let names = ["", "ball", "box", "slab"];
    // The pool as the command builds it: per case, the classes of `wanted`
    // it has (every label when empty), named by dataset.json.
    let pool_of = |wanted: &[u16]| -> Vec<PoolReference> {
        cases
            .iter()
            .filter_map(|(name, _, (image, labels))| {
                let classes: Vec<TaskClass> = labels
                    .labels_present()
                    .into_iter()
                    .filter(|l| wanted.is_empty() || wanted.contains(l))
                    .map(|l| TaskClass::new(l, names[usize::from(l)]))
                    .collect();
                (!classes.is_empty()).then(|| {
                    model
                        .encode_pool_reference(
                            *name,
                            image,
                            labels,
                            &classes,
                            &EncodeOptions::default(),
                        )
                        .unwrap()
                })
            })
            .collect()
    };
    let out = |name: &str| files.root.join(name);

    // Object level, classes by name, the first pass with case_b, k = 2.
    let (seg, task_path) = (out("object.nii.gz"), out("retrieved.irisemb"));
    let o = iris(&[
        "retrieve".as_ref(),
        "--model".as_ref(),
        model_dir,
        "--image".as_ref(),
        query_path.as_os_str(),
        "--pool".as_ref(),
        pool_dir.as_os_str(),
        "--top-k".as_ref(),
        "2".as_ref(),
        "--classes".as_ref(),
        "ball,box".as_ref(),
        "--initial".as_ref(),
        "case_b".as_ref(),
        "--out".as_ref(),
        seg.as_os_str(),
        "--save-task".as_ref(),
        task_path.as_os_str(),
        "--json".as_ref(),
    ]);
    let summary = json(&o);
    assert!(
        stderr(&o).contains("skipping case \"case_d\"")
            && stderr(&o).contains("none of the classes 1, 2"),
        "{}",
        stderr(&o)
    );
    let pool = pool_of(&[1, 2]);
    assert_eq!(pool.len(), 3, "case_d has neither class");
    let options = RetrieveOptions {
        top_k: 2,
        initial: 1,
        ..RetrieveOptions::default()
    };
    let expected = model.retrieve(&query, &pool, &[1, 2], &options).unwrap();
    assert_labels(&seg, &query, &expected.segmentation.labels);
    assert_choices(&summary, &expected, &pool);
    assert_eq!(irisemb::read_file(&task_path).unwrap(), expected.task);
    assert_eq!(summary["classes"][0]["name"], "ball");
    assert_eq!(summary["classes"][1]["name"], "box");
    let retrieval = &summary["retrieval"];
    assert_eq!(retrieval["level"], "object");
    assert_eq!(retrieval["top_k"], 2);
    assert_eq!(retrieval["initial"], "case_b");
    assert_eq!(
        retrieval["references"],
        serde_json::json!(["case_a", "case_b", "case_c"])
    );
    assert_eq!(retrieval["skipped"], serde_json::json!(["case_d"]));
    // The first pass finds the ball, so its choice is by similarity (the
    // model of known maths finds no box: that class keeps the pool's
    // order), and only case_a and case_b have the box.
    assert!(
        summary["classes"][0]["references"][0]["similarity"].is_f64(),
        "{summary}"
    );
    assert_eq!(
        summary["classes"][1]["references"]
            .as_array()
            .unwrap()
            .iter()
            .map(|r| r["name"].as_str().unwrap())
            .filter(|&n| n == "case_c")
            .count(),
        0
    );

    // Image level, every label of the pool (case_d takes part), the text
    // summary names the references.
    let seg = out("image.nii.gz");
    let args = |json: bool| {
        let mut args = vec![
            "retrieve".as_ref(),
            "--model".as_ref(),
            model_dir,
            "--image".as_ref(),
            query_path.as_os_str(),
            "--pool".as_ref(),
            pool_dir.as_os_str(),
            "--top-k".as_ref(),
            "2".as_ref(),
            "--level".as_ref(),
            "image".as_ref(),
            "--out".as_ref(),
            seg.as_os_str(),
        ];
        if json {
            args.push("--json".as_ref());
        }
        iris(&args)
    };
    let summary = json(&args(true));
    let pool = pool_of(&[]);
    assert_eq!(pool.len(), 4);
    let options = RetrieveOptions {
        level: RetrievalLevel::Image,
        top_k: 2,
        ..RetrieveOptions::default()
    };
    let expected = model.retrieve(&query, &pool, &[1, 2, 3], &options).unwrap();
    assert_labels(&seg, &query, &expected.segmentation.labels);
    assert_choices(&summary, &expected, &pool);
    assert_eq!(summary["retrieval"]["level"], "image");
    assert_eq!(summary["retrieval"]["skipped"], serde_json::json!([]));
    assert_eq!(summary["task"], Value::Null);
    let o = args(false);
    expect_code(&o, 0);
    let text = stdout(&o);
    let box_row = text
        .lines()
        .find(|l| l.split_whitespace().take(2).eq(["2", "box"]))
        .unwrap_or_else(|| panic!("no row for the box in\n{text}"));
    for chosen in &expected.choices[1].chosen {
        let name = &pool[chosen.index].name;
        let cell = format!("{name} ({:.3})", chosen.similarity);
        assert!(box_row.contains(&cell), "{cell:?} missing from {box_row:?}");
    }
    assert!(text.contains("image level, top 2"), "{text}");

    // --initial naming a case skipped for want of the classes; and a pool
    // where every case is skipped. Nothing written.
    let refused = out("refused.nii.gz");
    let run = |classes: &str, initial: Option<&str>| {
        let mut args = vec![
            "retrieve".as_ref(),
            "--model".as_ref(),
            model_dir,
            "--image".as_ref(),
            query_path.as_os_str(),
            "--pool".as_ref(),
            pool_dir.as_os_str(),
            "--top-k".as_ref(),
            "1".as_ref(),
            "--classes".as_ref(),
            classes.as_ref(),
            "--out".as_ref(),
            refused.as_os_str(),
            "--quiet".as_ref(),
        ];
        if let Some(name) = initial {
            args.extend([OsStr::new("--initial"), OsStr::new(name)]);
        }
        iris(&args)
    };
    let o = run("1,2", Some("case_d"));
    expect_code(&o, 3);
    assert!(
        stderr(&o).contains("--initial \"case_d\"") && stderr(&o).contains("skipped"),
        "{}",
        stderr(&o)
    );
    let o = run("7", None);
    expect_code(&o, 3);
    assert!(
        stderr(&o).contains("the pool is empty: no case has any of the classes 7"),
        "{}",
        stderr(&o)
    );
    let o = run("kidney", None);
    expect_code(&o, 2);
    assert!(
        stderr(&o).contains("\"kidney\"") && stderr(&o).contains("ball, box, slab"),
        "{}",
        stderr(&o)
    );
    assert!(!refused.exists());
}

/// `iris retrieve` on a folder of `.irisemb` files (object level): labels,
/// probability maps and choices equal `Model::retrieve` on the same
/// embeddings; image level is refused, since such files keep no image.
#[test]
fn retrieve_from_irisemb_files_matches_model_retrieve() {
    let files = fixture::fixture("cli-retrieve-emb");
    let model_dir = files.model.as_os_str();
    let model = Model::load(&files.model).unwrap();
    let pool_dir = files.root.join("embeddings");
    std::fs::create_dir_all(&pool_dir).unwrap();
    let mut pool = Vec::new();
    for (name, shift, radius) in [
        ("alpha", 0.0, 7.0),
        ("beta", 3.0, 5.0),
        ("gamma", -4.0, 9.0),
    ] {
        let (image, labels) = pool_case(shift, radius, |l| l);
        let task = fixture::encode(&model, &image, &labels);
        irisemb::write_file(
            pool_dir.join(format!("{name}.irisemb")),
            &task,
            Payload::F32,
        )
        .unwrap();
        pool.push(PoolReference {
            name: name.into(),
            task,
            descriptor: None,
        });
    }
    let query_path = files.file("query2.nii.gz");
    let (query, _) = nifti::read_image(&query_path).unwrap();
    let out = |name: &str| files.root.join(name);
    let (seg, probs) = (out("seg.nii.gz"), out("p.nii.gz"));
    let run = |level: &str, seg: &Path| {
        iris(&[
            "retrieve".as_ref(),
            "--model".as_ref(),
            model_dir,
            "--image".as_ref(),
            query_path.as_os_str(),
            "--pool".as_ref(),
            pool_dir.as_os_str(),
            "--top-k".as_ref(),
            "2".as_ref(),
            "--level".as_ref(),
            level.as_ref(),
            "--initial".as_ref(),
            "gamma".as_ref(),
            "--out".as_ref(),
            seg.as_os_str(),
            "--probabilities".as_ref(),
            probs.as_os_str(),
            "--json".as_ref(),
        ])
    };
    let summary = json(&run("object", &seg));
    let options = RetrieveOptions {
        top_k: 2,
        initial: 2,
        segment: SegmentOptions {
            probabilities: true,
            ..SegmentOptions::default()
        },
        ..RetrieveOptions::default()
    };
    let expected = model.retrieve(&query, &pool, &[1, 2], &options).unwrap();
    assert_labels(&seg, &query, &expected.segmentation.labels);
    assert_choices(&summary, &expected, &pool);
    assert_eq!(summary["retrieval"]["pool_kind"], "embeddings");
    let maps = expected.segmentation.probabilities.as_ref().unwrap();
    for (label, map) in [1, 2].iter().zip(maps) {
        let (p, _) = nifti::read_image(out(&format!("p-{label}.nii.gz"))).unwrap();
        assert_eq!(p.data(), map.data(), "probabilities of class {label}");
    }

    let refused = out("refused.nii.gz");
    // Another model's embedding in the pool: exit 4, naming the file.
    let foreign = pool_dir.join("delta.irisemb");
    std::fs::copy(files.file("foreign.irisemb"), &foreign).unwrap();
    let o = run("object", &refused);
    expect_code(&o, 4);
    assert!(stderr(&o).contains("delta.irisemb"), "{}", stderr(&o));
    assert!(!refused.exists());

    let o = run("image", &refused);
    expect_code(&o, 2);
    let err = stderr(&o);
    assert!(
        err.contains("--level image") && err.contains(".irisemb") && err.contains("--level object"),
        "{err}"
    );
    assert!(!refused.exists());
}

/// Pools and options `iris retrieve` refuses before any work, each with its
/// exit code and a message naming the problem, leaving nothing behind.
#[test]
fn retrieve_refuses_bad_pools_and_options_naming_the_problem() {
    let dir = TempDir::new("retrieve-bad");
    let out = dir.join("seg.nii.gz");
    let run = |pool: &Path, more: &[&str]| {
        let mut args: Vec<&OsStr> = vec![
            "retrieve".as_ref(),
            "--image".as_ref(),
            "query.nii.gz".as_ref(),
            "--pool".as_ref(),
            pool.as_os_str(),
            "--out".as_ref(),
            out.as_os_str(),
        ];
        args.extend(more.iter().map(OsStr::new));
        let o = iris(&args);
        assert!(!out.exists());
        o
    };
    let top = ["--top-k", "1"];

    let empty = dir.join("empty");
    std::fs::create_dir_all(&empty).unwrap();
    std::fs::write(empty.join("notes.txt"), "not a reference").unwrap();
    let o = run(&empty, &top);
    expect_code(&o, 3);
    let err = stderr(&o);
    assert!(
        err.contains(&empty.display().to_string())
            && err.contains("the pool is empty")
            && err.contains("neither labelsTr/"),
        "{err}"
    );

    std::fs::create_dir_all(empty.join("labelsTr")).unwrap();
    let o = run(&empty, &top);
    expect_code(&o, 3);
    assert!(stderr(&o).contains("holds no label map"), "{}", stderr(&o));

    let o = run(&dir.join("absent"), &top);
    expect_code(&o, 3);
    assert!(
        stderr(&o).contains("absent: no such folder"),
        "{}",
        stderr(&o)
    );

    // A label map whose image is missing.
    let orphan = dir.join("orphan");
    std::fs::create_dir_all(orphan.join("labelsTr")).unwrap();
    std::fs::write(orphan.join("labelsTr/liver_7.nii.gz"), "").unwrap();
    let o = run(&orphan, &top);
    expect_code(&o, 3);
    let err = stderr(&o);
    assert!(
        err.contains("case \"liver_7\" has no image") && err.contains("liver_7_0000.nii.gz"),
        "{err}"
    );

    let embeddings = dir.join("embeddings");
    std::fs::create_dir_all(&embeddings).unwrap();
    for name in ["a", "b"] {
        write_task(
            &dir,
            &format!("embeddings/{name}.irisemb"),
            &task(7, &[(1, "liver")], 1.0),
        );
    }
    let o = run(&embeddings, &["--top-k", "1", "--level", "image"]);
    expect_code(&o, 2);
    assert!(
        stderr(&o).contains("keep no image descriptor"),
        "{}",
        stderr(&o)
    );

    let o = run(&embeddings, &["--top-k", "1", "--initial", "c"]);
    expect_code(&o, 2);
    let err = stderr(&o);
    assert!(
        err.contains("--initial \"c\": no reference of that name")
            && err.contains("references: a, b"),
        "{err}"
    );

    let o = run(&embeddings, &["--top-k", "0"]);
    expect_code(&o, 2);
    assert!(stderr(&o).contains("--top-k"), "{}", stderr(&o));
    expect_code(&run(&embeddings, &[]), 2);
}

/// Every file under `dir` (`None` for a folder) with its bytes.
type Snapshot = std::collections::BTreeMap<PathBuf, Option<Vec<u8>>>;

/// The files under `dir` now.
fn snapshot(dir: &Path) -> Snapshot {
    let mut files = Snapshot::new();
    for entry in std::fs::read_dir(dir).unwrap() {
        let path = entry.unwrap().path();
        if path.is_dir() && !path.is_symlink() {
            files.insert(path.clone(), None);
            files.extend(snapshot(&path));
        } else {
            files.insert(path.clone(), Some(std::fs::read(&path).unwrap()));
        }
    }
    files
}

/// Asserts that the files under `dir` are those of `before`, byte for byte,
/// listing the paths that differ otherwise.
fn assert_unchanged(dir: &Path, before: &Snapshot, what: &str) {
    let after = snapshot(dir);
    let changed: Vec<_> = before
        .keys()
        .chain(after.keys())
        .filter(|p| before.get(*p) != after.get(*p))
        .collect();
    assert!(changed.is_empty(), "{what}: changed {changed:?}");
}

/// Outputs that name an input, however spelt, or another output: exit 2
/// before any work, naming both options, and every file as it was (the
/// model folder, the data, the pool). Each case replaced or deleted a file
/// before outputs were claimed.
#[test]
fn outputs_that_name_an_input_or_each_other_are_refused() {
    let files = fixture::fixture("cli-clash");
    let model = Model::load(&files.model).unwrap();
    let pool = files.root.join("pool");
    std::fs::create_dir_all(&pool).unwrap();
    let (image, labels) = fixture::reference();
    let task = fixture::encode(&model, &image, &labels);
    irisemb::write_file(pool.join("a.irisemb"), &task, Payload::F32).unwrap();
    irisemb::write_file(files.file("b.irisemb"), &task, Payload::F32).unwrap();
    std::fs::create_dir_all(files.data.join("sub")).unwrap();
    #[cfg(unix)]
    std::os::unix::fs::symlink("query.nii.gz", files.file("link.nii.gz")).unwrap();
    let before = snapshot(files.root.path());

    let data = |name: &str| files.file(name).into_os_string();
    let model_dir = files.model.as_os_str().to_owned();
    let segment = |out: &str, more: &[&str]| {
        let mut args: Vec<OsString> = vec![
            "segment".into(),
            "--model".into(),
            model_dir.clone(),
            "--ref-image".into(),
            data("ref.nii.gz"),
            "--ref-label".into(),
            data("ref_labels.nii.gz"),
            "--out".into(),
            out.into(),
        ];
        args.extend(more.iter().map(Into::into));
        args
    };
    let encode = |out: OsString| -> Vec<OsString> {
        vec![
            "encode".into(),
            "--model".into(),
            model_dir.clone(),
            "--image".into(),
            data("ref.nii.gz"),
            "--label".into(),
            data("ref_labels.nii.gz"),
            "--out".into(),
            out,
        ]
    };
    let retrieve = |more: &[OsString]| {
        let mut args: Vec<OsString> = vec![
            "retrieve".into(),
            "--model".into(),
            model_dir.clone(),
            "--image".into(),
            data("query.nii.gz"),
            "--pool".into(),
            pool.clone().into_os_string(),
            "--top-k".into(),
            "1".into(),
        ];
        args.extend(more.iter().cloned());
        args
    };
    let seg = data("seg.nii.gz");
    let mut cases: Vec<(Vec<OsString>, [&str; 2])> = vec![
        // --out is the query, by the same relative name, through `..`, and
        // by its absolute path (the command runs in the data folder).
        (
            segment("query.nii.gz", &["--image", "query.nii.gz"]),
            ["--out query.nii.gz", "--image query.nii.gz"],
        ),
        (
            segment("./sub/../query.nii.gz", &["--image", "query.nii.gz"]),
            ["--out ./sub/../query.nii.gz", "--image query.nii.gz"],
        ),
        (
            segment(
                &files.file("query.nii.gz").display().to_string(),
                &["--image", "./query.nii.gz"],
            ),
            ["--out /", "--image ./query.nii.gz"],
        ),
        // One class: the probability map would be the label map.
        (
            segment(
                "seg.nii.gz",
                &[
                    "--image",
                    "query.nii.gz",
                    "--classes",
                    "1",
                    "--probabilities",
                    "seg.nii.gz",
                ],
            ),
            ["--out seg.nii.gz", "--probabilities seg.nii.gz"],
        ),
        // Two classes: --out is one of the files written per class.
        (
            segment(
                "p-2.nii.gz",
                &["--image", "query.nii.gz", "--probabilities", "p.nii.gz"],
            ),
            ["--out p-2.nii.gz", "--probabilities writes p-LABEL.nii.gz"],
        ),
        (
            encode("ref_labels.nii.gz".into()),
            ["--out ref_labels.nii.gz", "--label "],
        ),
        (encode(data("ref.nii.gz")), ["--out ", "--image "]),
        (
            encode(files.model.join("manifest.json").into_os_string()),
            ["--out ", "a --model file "],
        ),
        (
            vec![
                "ensemble".into(),
                "--out".into(),
                data("b.irisemb"),
                pool.join("a.irisemb").into_os_string(),
                "b.irisemb".into(),
            ],
            ["--out /", "the input b.irisemb"],
        ),
        // Two outputs of one command.
        (
            retrieve(&[
                "--out".into(),
                seg.clone(),
                "--save-task".into(),
                seg.clone(),
            ]),
            ["--out ", "--save-task "],
        ),
        (
            retrieve(&[
                "--out".into(),
                seg.clone(),
                "--save-task".into(),
                pool.join("a.irisemb").into_os_string(),
            ]),
            ["--save-task ", "a --pool file "],
        ),
    ];
    #[cfg(unix)]
    cases.push((
        segment("query.nii.gz", &["--image", "link.nii.gz"]),
        ["--out query.nii.gz", "--image link.nii.gz"],
    ));
    for (args, flags) in cases {
        let o = Command::new(env!("CARGO_BIN_EXE_iris"))
            .args(&args)
            .current_dir(&files.data)
            .env_remove("IRIS_MODEL")
            .output()
            .unwrap();
        expect_code(&o, 2);
        let err = stderr(&o);
        for flag in flags {
            assert!(err.contains(flag), "{args:?}: {err}");
        }
        assert!(err.contains("name the same file"), "{args:?}: {err}");
        assert_unchanged(files.root.path(), &before, &format!("{args:?}"));
    }
}

/// A command whose last output cannot be put in place (a folder holds its
/// name) fails with exit 1 and leaves every file as it was: the existing
/// label map and preview keep their bytes, no new file and no temporary is
/// left. Without the obstacle, every output is written and nothing else.
#[test]
fn a_failed_output_leaves_every_file_as_it_was() {
    let files = fixture::fixture("cli-all-or-nothing");
    let out = files.root.join("out");
    std::fs::create_dir_all(out.join("p-2.nii.gz/inside")).unwrap();
    std::fs::write(out.join("seg.nii.gz"), b"the user's label map").unwrap();
    std::fs::write(out.join("seg.png"), b"the user's picture").unwrap();
    let run = || {
        iris(&[
            "segment".as_ref(),
            "--model".as_ref(),
            files.model.as_os_str(),
            "--image".as_ref(),
            files.file("query.nii.gz").as_os_str(),
            "--ref-image".as_ref(),
            files.file("ref.nii.gz").as_os_str(),
            "--ref-label".as_ref(),
            files.file("ref_labels.nii.gz").as_os_str(),
            "--out".as_ref(),
            out.join("seg.nii.gz").as_os_str(),
            "--probabilities".as_ref(),
            out.join("p.nii.gz").as_os_str(),
            "--preview".as_ref(),
            out.join("seg.png").as_os_str(),
            "--quiet".as_ref(),
        ])
    };
    let before = snapshot(files.root.path());
    let o = run();
    expect_code(&o, 1);
    assert!(stderr(&o).contains("p-2.nii.gz"), "{}", stderr(&o));
    assert_unchanged(files.root.path(), &before, "after the failure");

    std::fs::remove_dir_all(out.join("p-2.nii.gz")).unwrap();
    expect_code(&run(), 0);
    let mut names: Vec<_> = std::fs::read_dir(&out)
        .unwrap()
        .map(|e| e.unwrap().file_name().into_string().unwrap())
        .collect();
    names.sort();
    assert_eq!(names, ["p-1.nii.gz", "p-2.nii.gz", "seg.nii.gz", "seg.png"]);
    assert!(nifti::read_labels(out.join("seg.nii.gz")).is_ok());
}
