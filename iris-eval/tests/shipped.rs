//! The report in `docs/` against the model shipped in `models/iris-tiny`
//! (needs `data/`; skipped with a message when absent, an error under
//! `IRIS_REQUIRE_DATA=1`).

use iris_core::engine::{Model, SegmentOptions};
use iris_core::metrics::dice_per_class;
use iris_eval::tasks::{self, Limits};

mod common;
use common::{csv_dice, data_dir};

/// `docs/results.md` and its CSV must come from the model shipped in
/// `models/iris-tiny`: same fingerprint, and its one-shot Dice on the
/// held-out AAL structures (aligned query) recomputed here agree.
#[test]
fn docs_results_report_what_the_shipped_model_computes() {
    let Some(data) = data_dir() else { return };
    let root = iris_test_support::repo_root();
    let model = Model::load(root.join("models/iris-tiny")).expect("the shipped model");
    let md = std::fs::read_to_string(root.join("docs/results.md")).expect("docs/results.md");
    let fingerprint = model.manifest().fingerprint.to_string();
    assert!(
        md.contains(&fingerprint),
        "docs/results.md was made by another model than models/iris-tiny ({fingerprint}): \
         regenerate it"
    );
    let csv = std::fs::read_to_string(root.join("docs/results.csv")).expect("docs/results.csv");
    let id = "aal-colin27-to-mni152";
    let reported = csv_dice(&csv, id, "aligned", "model");
    let task = tasks::build(&data, Limits::default())
        .expect("tasks")
        .into_iter()
        .find(|t| t.id == id)
        .expect("the held-out AAL task");
    assert_eq!(reported.len(), task.structures.len());
    let embedding = task.encode(&model).expect("encode");
    let seg = model
        .segment(&task.query.image, &embedding, &SegmentOptions::default())
        .expect("segment");
    let labels = task.labels();
    let dice = dice_per_class(&seg.labels, &task.query.truth, &labels).expect("same grid");
    for ((s, want), got) in task.structures.iter().zip(&reported).zip(dice) {
        let got = got.unwrap_or(0.0);
        assert!(
            (got - want).abs() < 0.01,
            "{}: computed {got}, reported {want}",
            s.name
        );
    }
}
