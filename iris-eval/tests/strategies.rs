//! `iris-eval strategies` on the real volumes of `data/` (skipped with a
//! message when absent; an error under `IRIS_REQUIRE_DATA=1`) and models
//! of known maths (untrained).

use std::path::Path;
use std::process::{Command, Output};

use iris_test_support::TempDir;

mod common;
use common::data_dir;

fn strategies(model: &Path, data: &Path, out: &Path, extra: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_iris-eval"))
        .args([
            "strategies",
            "--structures",
            "2",
            "--pool",
            "3",
            "--moves",
            "1",
        ])
        .arg("--model")
        .arg(model)
        .arg("--data")
        .arg(data)
        .arg("--out")
        .arg(out)
        .args(extra)
        .output()
        .expect("runs")
}

/// `(strategy, references) -> Dice per query` from the CSV.
fn cells(csv: &str, strategy: &str, references: usize) -> Vec<Option<f64>> {
    csv.lines()
        .skip(1)
        .map(|l| l.split(',').collect::<Vec<_>>())
        .filter(|f| f[0] == strategy && f[1] == references.to_string())
        .map(|f| f[3].parse::<f64>().ok())
        .collect()
}

#[test]
fn strategies_score_every_row_and_write_the_pool() {
    let Some(data) = data_dir() else { return };
    let dir = TempDir::new("iris-eval-strategies");
    let model = dir.join("model");
    let fingerprint = iris_test_support::fixture::model(&model, 7);
    let pool = dir.join("pool");
    let out = dir.join("strategies.md");
    let pool_arg = pool.to_str().expect("utf-8 path");
    let run = strategies(
        &model,
        &data,
        &out,
        &["--top-k", "1,3,9", "--write-pool", pool_arg],
    );
    assert!(
        run.status.success(),
        "{}",
        String::from_utf8_lossy(&run.stderr)
    );
    let md = std::fs::read_to_string(&out).expect("table written");
    let csv = std::fs::read_to_string(out.with_extension("csv")).expect("csv written");
    assert!(md.contains(&fingerprint.to_string()));
    assert!(md.contains("Hippocampus_L, Hippocampus_R"), "{md}");
    // one-shot, ensembles of 2 and 3, object and image retrieval at top 1
    // and 3 (9 exceeds the pool): 7 rows of 2 queries.
    let rows = md
        .lines()
        .filter(|l| l.starts_with("| ") && !l.starts_with("| strategy"))
        .count();
    assert_eq!(rows, 7, "{md}");
    assert_eq!(csv.lines().count(), 1 + 7 * 2);
    assert!(!csv.contains(",9,"));
    for (strategy, n) in [("one-shot", 1), ("ensemble", 3), ("object retrieval", 3)] {
        let dice = cells(&csv, strategy, n);
        assert_eq!(dice.len(), 2, "{strategy} {n}");
        assert!(dice.iter().flatten().all(|d| (0.0..=1.0).contains(d)));
    }
    // Object retrieval of the whole pool is the ensemble of the whole pool.
    assert_eq!(
        cells(&csv, "object retrieval", 3),
        cells(&csv, "ensemble", 3)
    );

    // The pool on disk: the reference and two moved copies, with the names.
    for i in 0..3 {
        let (labels, _) =
            iris_core::nifti::read_labels(pool.join(format!("labelsTr/pool_{i:03}.nii.gz")))
                .expect("pool labels");
        assert!(labels.labels_present().contains(&37), "case {i}");
        assert!(
            pool.join(format!("imagesTr/pool_{i:03}_0000.nii.gz"))
                .is_file()
        );
    }
    let (first, _) =
        iris_core::nifti::read_labels(pool.join("labelsTr/pool_000.nii.gz")).expect("0");
    let (moved, _) =
        iris_core::nifti::read_labels(pool.join("labelsTr/pool_001.nii.gz")).expect("1");
    assert_ne!(first.data(), moved.data(), "the copies are moved");
    let json = std::fs::read_to_string(pool.join("dataset.json")).expect("dataset.json");
    assert!(json.contains("\"Hippocampus_L\": 37") && json.contains("\"numTraining\": 3"));
    let reference = iris_core::irisemb::read_file(pool.join("reference.irisemb")).expect("irisemb");
    assert_eq!(reference.model(), &fingerprint);
    assert_eq!(reference.classes().len(), 2);

    // A tuned embedding is scored as a row; one of another model is refused,
    // naming the file.
    let tuned = format!("2={}", pool.join("reference.irisemb").display());
    let run = strategies(&model, &data, &out, &["--top-k", "1", "--tuned", &tuned]);
    assert!(
        run.status.success(),
        "{}",
        String::from_utf8_lossy(&run.stderr)
    );
    let csv = std::fs::read_to_string(out.with_extension("csv")).expect("csv");
    assert_eq!(cells(&csv, "in-context tuning", 2).len(), 2);
    let other = dir.join("other-model");
    iris_test_support::fixture::model(&other, 8);
    let run = strategies(&other, &data, &out, &["--top-k", "1", "--tuned", &tuned]);
    assert!(!run.status.success());
    let stderr = String::from_utf8_lossy(&run.stderr);
    assert!(stderr.contains("reference.irisemb"), "{stderr}");
}

#[test]
fn unknown_tasks_are_refused_listing_the_tasks() {
    let Some(data) = data_dir() else { return };
    let dir = TempDir::new("iris-eval-strategies-task");
    let model = dir.join("model");
    iris_test_support::fixture::model(&model, 7);
    let run = strategies(&model, &data, &dir.join("s.md"), &["--task", "liver"]);
    assert!(!run.status.success());
    let stderr = String::from_utf8_lossy(&run.stderr);
    assert!(
        stderr.contains("no task \"liver\"") && stderr.contains("seen-aal-colin27-to-mni152"),
        "{stderr}"
    );
}

#[test]
fn malformed_tuned_arguments_are_refused() {
    let run = Command::new(env!("CARGO_BIN_EXE_iris-eval"))
        .args(["strategies", "--tuned", "three=x.irisemb"])
        .output()
        .expect("runs");
    assert!(!run.status.success());
    let stderr = String::from_utf8_lossy(&run.stderr);
    assert!(stderr.contains("not a number of cases"), "{stderr}");
}
