//! `classes_per_forward`: a task decoded in groups of classes is exactly
//! the groups decoded as tasks of their own, and the manifest's value (the
//! most classes a training episode holds, written by the export) is the
//! default.

use iris_core::engine::{Model, SegmentOptions};
use iris_tests::TempDir;
use iris_tests::fixture::{encode, export_tiny_model, query, reference};

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
    // Exports record the most classes a training episode holds.
    let max_classes = iris_train::data::EpisodeConfig::new([32; 3]).max_classes;
    assert_eq!(model.manifest().classes_per_forward, Some(max_classes));
    let (image, labels) = reference();
    let (q, _) = query(0.0);
    let task = encode(&model, &image, &labels);
    let together = model.segment(&q, &task, &options(None)).expect("one run");
    let grouped = model
        .segment(&q, &task, &options(Some(1)))
        .expect("two runs");
    let grouped = grouped.probabilities.expect("asked");
    // One class per run is each class segmented alone.
    let alone: Vec<_> = [1, 2]
        .iter()
        .map(|&l| {
            let one = task.select_labels(&[l]).expect("class");
            let seg = model.segment(&q, &one, &options(None)).expect("alone");
            seg.probabilities.expect("asked").remove(0)
        })
        .collect();
    assert!(
        worst(&grouped, &alone) < 1e-6,
        "{}",
        worst(&grouped, &alone)
    );
    // The two classes see each other in one run (the decoder's token
    // self-attention), so grouping is a real change, not a no-op.
    let together = together.probabilities.expect("asked");
    assert!(worst(&together, &alone) > 1e-4);
    // A group as large as the task is the task in one run.
    let whole = model
        .segment(&q, &task, &options(Some(5)))
        .expect("one run");
    assert!(worst(&whole.probabilities.expect("asked"), &together) < 1e-6);

    // The manifest's value is the default; an explicit option overrides it.
    let manifest = dir.join("manifest.json");
    let text = std::fs::read_to_string(&manifest).expect("manifest");
    let recorded = format!("\"classes_per_forward\": {max_classes}");
    assert!(text.contains(&recorded), "{text}");
    let edit = |value: &str| {
        let edited = text.replace(&recorded, &format!("\"classes_per_forward\": {value}"));
        std::fs::write(&manifest, edited).expect("manifest");
    };
    edit("1");
    let model = Model::load(dir.path()).expect("model");
    assert_eq!(model.manifest().classes_per_forward, Some(1));
    let default = model.segment(&q, &task, &options(None)).expect("default");
    assert!(worst(&default.probabilities.expect("asked"), &alone) < 1e-6);
    let explicit = model
        .segment(&q, &task, &options(Some(2)))
        .expect("override");
    assert!(worst(&explicit.probabilities.expect("asked"), &together) < 1e-6);
    assert!(model.segment(&q, &task, &options(Some(0))).is_err());
    edit("0");
    let error = Model::load(dir.path())
        .expect_err("0 is refused")
        .to_string();
    assert!(error.contains("classes_per_forward"), "{error}");
}
