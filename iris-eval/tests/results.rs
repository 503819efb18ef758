//! `iris-eval` on the real volumes of `data/` (skipped with a message when
//! absent; an error under `IRIS_REQUIRE_DATA=1`) and a model of known maths (untrained).

use std::path::Path;
use std::process::Command;

use iris_core::embedding::{ClassEmbedding, TaskEmbedding};
use iris_core::engine::Model;
use iris_core::irisemb::{self, Payload};
use iris_core::metrics::dice_per_class;
use iris_core::preprocess::resample_labels;
use iris_eval::tasks::{self, HELD_OUT_AAL, Kind, Limits};
use iris_test_support::TempDir;

mod common;
use common::{csv_dice, data_dir};

#[test]
fn aal3_names_map_the_twelve_held_out_structures() {
    let Some(data) = data_dir() else { return };
    let aal = tasks::read_names(&data.join(tasks::AAL_NAMES)).expect("AAL names");
    let aal3 = tasks::read_names(&data.join(tasks::AAL3_NAMES)).expect("AAL3 names");
    let (volume, _) = iris_core::nifti::read_labels(data.join(tasks::AAL3)).expect("AAL3");
    let present = volume.labels_present();
    let held: Vec<(u16, String)> = aal
        .iter()
        .filter(|(v, _)| HELD_OUT_AAL.contains(v))
        .cloned()
        .collect();
    assert_eq!(held.len(), 12);
    let m = tasks::map_aal_to_aal3(&held, &aal3, |v| present.contains(&v));
    assert!(m.unmapped.is_empty(), "unmapped: {:?}", m.unmapped);
    let mapped: Vec<u16> = m.mapped.iter().map(|(l, _)| *l).collect();
    assert_eq!(mapped, HELD_OUT_AAL);
    for (label, values) in &m.mapped {
        let name = &held.iter().find(|(v, _)| v == label).expect("held").1;
        if name.starts_with("Thalamus_") {
            // The 15 nuclei of one side (AAL3v1 has no voxels of label 81/82).
            assert_eq!(values.len(), 15, "{name}: {values:?}");
        } else {
            assert_eq!(values.len(), 1, "{name}: {values:?}");
            let aal3_name = &aal3.iter().find(|(v, _)| *v == values[0]).expect("named").1;
            assert_eq!(aal3_name, name);
        }
    }
    // Over all 116 AAL names, those AAL3 renamed or split are reported.
    let all = tasks::map_aal_to_aal3(&aal, &aal3, |v| present.contains(&v));
    assert_eq!(all.mapped.len() + all.unmapped.len(), aal.len());
    for renamed in ["Frontal_Sup_L", "Cingulum_Ant_L", "Frontal_Sup_Orb_L"] {
        assert!(
            all.unmapped.iter().any(|n| n == renamed),
            "{renamed} should be unmapped: {:?}",
            all.unmapped
        );
    }
}

#[test]
fn tasks_have_their_structures_in_reference_and_truth() {
    let Some(data) = data_dir() else { return };
    let tasks = tasks::build(&data, Limits::default()).expect("tasks build");
    let kinds: Vec<Kind> = tasks.iter().map(|t| t.kind).collect();
    assert_eq!(
        kinds,
        [
            Kind::BrainMask,
            Kind::BrainMask,
            Kind::Tissue,
            Kind::HeldOutAal,
            Kind::CrossSpecies,
            Kind::SeenAal
        ]
    );
    for task in &tasks {
        task.query
            .image
            .ensure_same_grid(&task.query.truth, task.id)
            .expect("truth on the query grid");
        for s in &task.structures {
            assert!(
                task.reference_labels.count(s.label) > 100,
                "{}: {} small in the reference",
                task.id,
                s.name
            );
            assert!(
                task.query.truth.count(s.label) > 100,
                "{}: {} small in the truth",
                task.id,
                s.name
            );
        }
    }
    assert_eq!(tasks[3].structures.len(), 12);
    assert_eq!(tasks[5].structures.len(), 10);
    // Where reference and query are the same volume, the position copy is exact.
    for task in &tasks[2..] {
        if matches!(task.kind, Kind::HeldOutAal | Kind::SeenAal) {
            continue;
        }
        let copied =
            resample_labels(&task.reference_labels, task.query.image.geometry()).expect("copies");
        let labels = task.labels();
        let dice = dice_per_class(&copied, &task.query.truth, &labels).expect("same grid");
        assert!(
            dice.iter().all(|d| *d == Some(1.0)),
            "{}: {dice:?}",
            task.id
        );
    }
}

/// Runs `iris-eval results --quick` with `args` into `dir`; the report
/// and the CSV.
fn quick_results(model: &Path, data: &Path, dir: &Path, args: &[&str]) -> (String, String) {
    let out = dir.join("results.md");
    let status = Command::new(env!("CARGO_BIN_EXE_iris-eval"))
        .args(["results", "--quick"])
        .args(args)
        .arg("--model")
        .arg(model)
        .arg("--data")
        .arg(data)
        .arg("--out")
        .arg(&out)
        .status()
        .expect("runs");
    assert!(status.success());
    let md = std::fs::read_to_string(&out).expect("report written");
    let csv = std::fs::read_to_string(out.with_extension("csv")).expect("csv written");
    (md, csv)
}

#[test]
fn quick_results_on_an_untrained_model_write_every_table() {
    let Some(data) = data_dir() else { return };
    let dir = TempDir::new("iris-eval");
    let model = dir.join("model");
    // Named as `iris-train export --random` names its models, so that the
    // report flags its model columns as meaningless.
    let fingerprint = iris_test_support::fixture::named_model(&model, 7, "synthetic-random");
    let (md, csv) = quick_results(
        &model,
        &data,
        dir.path(),
        &["--moves", "2", "--references", "2"],
    );
    for needle in [
        "synthetic-random",
        "RANDOM weights",
        "`--quick`",
        "## Goals of issue 7",
        "## Brain mask: Colin27 -> MNI152",
        "## Brain mask: MNI152 -> Colin27",
        "## Grey and white matter",
        "## 12 held-out AAL structures",
        "## Cross-species",
        "Truth is APPROXIMATE",
        "## Context ensemble",
        "| 2 refs aligned | 2 refs moved |",
        "## Timings",
        "One window",
    ] {
        assert!(md.contains(needle), "report lacks {needle:?}:\n{md}");
    }
    assert!(md.contains(&fingerprint.to_string()));
    let tables = md.matches("| structure | label | model aligned |").count();
    assert_eq!(tables, 6);
    // The synthetic model has no memory bank: the bank task says so.
    assert!(md.contains("**Memory bank not scored:** the model folder has no memory bank"));
    assert!(!csv.contains(",bank,"));

    // The baseline is real: Colin27's brain copied onto MNI152 scores about
    // 0.93 aligned and drops on the moved query; a volume copied onto
    // itself is exact.
    let brain = csv_dice(&csv, "brain-colin27-to-mni152", "aligned", "copy");
    assert_eq!(brain.len(), 1);
    assert!((0.88..0.97).contains(&brain[0]), "{brain:?}");
    let moved = csv_dice(&csv, "brain-colin27-to-mni152", "moved", "copy");
    assert_eq!(moved.len(), 1, "--quick keeps one move");
    assert!(moved[0] < brain[0] - 0.05, "{moved:?} vs {brain:?}");
    for task in [
        "tissue-mni152-to-inverted-mni152",
        "neuromaps-inia19-to-inia19",
    ] {
        let d = csv_dice(&csv, task, "aligned", "copy");
        assert_eq!(d, [1.0, 1.0], "{task}");
    }
    // The resolution ceiling (truth at 6 mm and back): near 0.95 for the
    // brain, about 0.7 for small deep structures, never above 1; a row per
    // structure and query.
    let brain = csv_dice(&csv, "brain-colin27-to-mni152", "aligned", "ceiling");
    assert!((0.92..0.98).contains(&brain[0]), "{brain:?}");
    let aal = csv_dice(&csv, "aal-colin27-to-mni152", "aligned", "ceiling");
    assert!(aal.iter().all(|d| (0.5..0.85).contains(d)), "{aal:?}");
    assert_eq!(csv.matches(",ceiling,").count(), 10 * 2);
    assert!(md.contains("| goal | measured (model) | copy baseline | ceiling at 6 mm | reached |"));
    // One ensemble of 2 references (no ensemble of 3 out of 2): a row per
    // structure and query, (1 + 1 + 2 + 2 + 2 + 2) structures, aligned + 1 move.
    assert_eq!(csv.matches(",ensemble-2,").count(), 10 * 2);
    assert!(!csv.contains(",ensemble-3,"));
    // The model column holds the model's own scores, in [0, 1].
    let model_dice = csv_dice(&csv, "aal-colin27-to-mni152", "aligned", "model");
    assert_eq!(model_dice.len(), 2);
    assert!(model_dice.iter().all(|d| (0.0..=1.0).contains(d)));
}

#[test]
fn the_memory_bank_is_scored_on_seen_structures() {
    let Some(data) = data_dir() else { return };
    let dir = TempDir::new("iris-eval-bank");
    let model_dir = dir.join("model");
    iris_test_support::fixture::model(&model_dir, 7);
    // A bank as training names it ("aal:<label> <name>"), made of the very
    // embedding one-shot computes for the task's first two structures (as
    // --quick keeps): the bank column must then equal the model column.
    let task = tasks::build(
        &data,
        Limits {
            structures: Some(2),
        },
    )
    .expect("tasks")
    .into_iter()
    .find(|t| t.kind == Kind::SeenAal)
    .expect("the seen-AAL task");
    let model = Model::load(&model_dir).expect("model");
    let one_shot = task.encode(&model).expect("encode");
    let entries = one_shot
        .classes()
        .iter()
        .enumerate()
        .map(|(i, c)| {
            let name = format!("aal:{} {}", c.label(), c.name());
            ClassEmbedding::new(100 + i as u32, name, c.provenance(), c.stages().to_vec())
                .expect("entry")
        })
        .collect();
    let bank = TaskEmbedding::new(
        *one_shot.model(),
        *one_shot.preprocessing(),
        one_shot.stage_shapes().to_vec(),
        entries,
    )
    .expect("bank");
    irisemb::write_file(model_dir.join("memory_bank.irisemb"), &bank, Payload::F32).expect("bank");
    let manifest = model_dir.join("manifest.json");
    let text = std::fs::read_to_string(&manifest).expect("manifest");
    let text = text.replacen('{', "{\"memory_bank\": \"memory_bank.irisemb\", ", 1);
    std::fs::write(&manifest, text).expect("manifest");

    let notes = dir.join("notes.md");
    std::fs::write(&notes, "## About this model\n\nWritten by hand.\n").expect("notes");
    let notes_arg = notes.to_str().expect("utf-8 path");
    let (md, csv) = quick_results(
        &model_dir,
        &data,
        dir.path(),
        &["--moves", "1", "--references", "1", "--notes", notes_arg],
    );
    // The hand-written notes follow the goals table.
    let goals = md.find("## Goals of issue 7").expect("goals");
    let about = md
        .find("## About this model\n\nWritten by hand.")
        .expect("notes included");
    assert!(about > goals);
    assert!(md.contains("| structure | label | bank aligned | model aligned | copy aligned |"));
    let id = "seen-aal-colin27-to-mni152";
    for query in ["aligned", "moved"] {
        let bank = csv_dice(&csv, id, query, "bank");
        assert_eq!(bank.len(), 2, "{query}");
        assert_eq!(bank, csv_dice(&csv, id, query, "model"), "{query}");
    }
    // Only the seen task uses the bank.
    assert_eq!(csv.matches(",bank,").count(), 2 * 2);
}

#[test]
fn a_missing_notes_file_is_named() {
    let dir = TempDir::new("iris-eval-notes");
    let missing = dir.join("absent.md");
    let out = Command::new(env!("CARGO_BIN_EXE_iris-eval"))
        .args(["results", "--notes"])
        .arg(&missing)
        .arg("--out")
        .arg(dir.join("r.md"))
        .output()
        .expect("runs");
    assert!(!out.status.success());
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        stderr.contains("--notes") && stderr.contains("absent.md"),
        "{stderr}"
    );
    assert!(!dir.join("r.md").exists());
}

#[test]
fn missing_data_is_an_error_naming_the_files() {
    let dir = TempDir::new("iris-eval-nodata");
    let err = tasks::build(dir.path(), Limits::default()).expect_err("no data");
    let text = err.to_string();
    assert!(
        text.contains("ch2.nii.gz") && text.contains("fetch-data.sh"),
        "{text}"
    );
    assert_eq!(tasks::missing_files(dir.path()).len(), 11);
}
