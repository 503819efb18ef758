//! `classes_per_forward`: a task decoded in groups of classes is exactly
//! the groups decoded as tasks of their own, and the manifest's value
//! (written by the export, one class per run by default) is the default.

use iris_core::engine::{Model, SegmentOptions};
use iris_test_support::TempDir;
use iris_test_support::fixture::{encode, query, reference};
use iris_tests::export_tiny_model;

fn options(classes_per_forward: Option<usize>) -> SegmentOptions {
    SegmentOptions {
        probabilities: true,
        largest_component: false,
        classes_per_forward,
        ..SegmentOptions::default()
    }
}

/// Largest absolute difference between two lists of probability maps.
fn worst(a: &[iris_core::volume::Image], b: &[iris_core::volume::Image]) -> f32 {
    assert_eq!(a.len(), b.len());
    a.iter()
        .zip(b)
        .flat_map(|(x, y)| x.data().iter().zip(y.data()).map(|(p, q)| (p - q).abs()))
        .fold(0.0, f32::max)
}

#[test]
fn groups_decode_like_tasks_of_their_own_and_the_manifest_sets_the_default() {
    let dir = TempDir::new("class-groups");
    export_tiny_model(dir.path(), 7);
    let model = Model::load(dir.path()).expect("model");
    // Exports record the default unless told otherwise: one class per run.
    let default_group = iris_train::export::DEFAULT_CLASSES_PER_FORWARD;
    assert_eq!(default_group, 1);
    assert_eq!(model.manifest().classes_per_forward, Some(default_group));
    let (image, labels) = reference();
    let (q, _) = query(0.0);
    let task = encode(&model, &image, &labels);
    let alone: Vec<_> = [1, 2]
        .iter()
        .map(|&l| {
            let one = task.select_labels(&[l]).expect("class");
            let seg = model.segment(&q, &one, &options(None)).expect("alone");
            seg.probabilities.expect("asked").remove(0)
        })
        .collect();
    // The manifest's default: one class per run is each class segmented alone.
    let default = model.segment(&q, &task, &options(None)).expect("two runs");
    let default = default.probabilities.expect("asked");
    assert!(
        worst(&default, &alone) < 1e-6,
        "{}",
        worst(&default, &alone)
    );
    // A group as large as the task (or larger) is the task in one run.
    let together = model
        .segment(&q, &task, &options(Some(2)))
        .expect("one run")
        .probabilities
        .expect("asked");
    let larger = model
        .segment(&q, &task, &options(Some(5)))
        .expect("one run");
    assert!(worst(&larger.probabilities.expect("asked"), &together) < 1e-6);
    // The two classes see each other in one run (the decoder's token
    // self-attention), so grouping is a real change, not a no-op.
    assert!(worst(&together, &alone) > 1e-4);
    assert!(model.segment(&q, &task, &options(Some(0))).is_err());

    // A manifest that allows two classes per run decodes the task in one.
    let manifest = dir.join("manifest.json");
    let text = std::fs::read_to_string(&manifest).expect("manifest");
    let recorded = format!("\"classes_per_forward\": {default_group}");
    assert!(text.contains(&recorded), "{text}");
    let edit = |value: &str| {
        let edited = text.replace(&recorded, &format!("\"classes_per_forward\": {value}"));
        std::fs::write(&manifest, edited).expect("manifest");
    };
    edit("2");
    let model = Model::load(dir.path()).expect("model");
    assert_eq!(model.manifest().classes_per_forward, Some(2));
    let default = model.segment(&q, &task, &options(None)).expect("default");
    assert!(worst(&default.probabilities.expect("asked"), &together) < 1e-6);
    // An explicit option overrides the manifest.
    let explicit = model
        .segment(&q, &task, &options(Some(1)))
        .expect("override");
    assert!(worst(&explicit.probabilities.expect("asked"), &alone) < 1e-6);
    edit("0");
    let error = Model::load(dir.path())
        .expect_err("0 is refused")
        .to_string();
    assert!(error.contains("classes_per_forward"), "{error}");
}
