//! The `iris-core` engine on graphs exported by `iris-train`: what it
//! computes equals the burn model it came from, embeddings of another
//! export are refused, and concurrent use changes nothing.
//!
//! Each test exports a tiny randomly initialised (and perturbed) model to a
//! temporary folder with `iris_train::export::export`, then runs the same
//! real reference and query (Colin27 with its AAL labels, `data/`) through
//! `iris_core::Model` and, preprocessed with the same `iris-core` functions,
//! through the burn model.

use burn::module::{Module, ModuleMapper, Param};
use burn::prelude::*;
use burn::tensor::{Distribution, TensorData};
use iris_core::Error;
use iris_core::embedding::TaskEmbedding;
use iris_core::engine::{EncodeOptions, Model, SegmentOptions, Segmentation, TaskClass};
use iris_core::preprocess::{
    IntensityPolicy, LabelSelection, canonical, crop_or_pad, reference_crop, resample_image,
    resample_labels, target_geometry,
};
use iris_core::volume::{Image, LabelMap};
use iris_test_support::TempDir;
use iris_test_support::fixture::colin;
use iris_tests::with_tiny_model;
use iris_train::model::{Iris, IrisConfig, TaskTensors};

/// Largest difference allowed between the engine and burn: probabilities
/// absolute, task tokens relative to their largest magnitude.
const TOLERANCE: f32 = 1e-4;

/// Largest absolute difference allowed on logits, which are unbounded and
/// drift more through the deep network in f32 (measured: 8e-5 to 3.5e-4
/// over several seeds, logits up to about 1 in magnitude).
const LOGIT_TOLERANCE: f32 = 1e-3;

/// Adds noise (uniform in +-0.1) to every weight, so that no layer is still
/// at an initialisation that hides mistakes (zero biases, identity norms).
struct Perturb;

impl ModuleMapper for Perturb {
    fn map_float<const D: usize>(&mut self, param: Param<Tensor<D>>) -> Param<Tensor<D>> {
        param.map(|t| {
            let noise = Tensor::random(t.shape(), Distribution::Uniform(-0.1, 0.1), &t.device());
            t + noise
        })
    }
}

struct Exported {
    dir: TempDir,
    model: Iris,
    config: IrisConfig,
}

fn export(seed: u64) -> Exported {
    // Perturb touches every weight, so none is left to draw lazily later.
    let (model, config) = with_tiny_model(seed, |model, config| {
        (model.map(&mut Perturb), config.clone())
    });
    let dir = TempDir::new("model");
    // Every task of these tests is decoded in one run, as burn decodes it.
    let classes_per_forward = 16;
    iris_train::export::export(
        &model,
        &config,
        "iris-tiny-test",
        dir.path(),
        None,
        classes_per_forward,
    )
    .expect("export");
    Exported { dir, model, config }
}

fn tensor<const D: usize>(values: Vec<f32>, shape: [usize; D]) -> Tensor<D> {
    Tensor::from_data(TensorData::new(values, shape), &Device::flex())
}

fn values<const D: usize>(tensor: Tensor<D>) -> Vec<f32> {
    tensor.into_data().try_to_vec::<f32>().expect("f32 tensor")
}

fn max_abs_diff(a: &[f32], b: &[f32]) -> f32 {
    assert_eq!(a.len(), b.len());
    a.iter()
        .zip(b)
        .map(|(x, y)| (x - y).abs())
        .fold(0.0, f32::max)
}

fn classes(labels: &[u16]) -> Vec<TaskClass> {
    labels
        .iter()
        .map(|&l| TaskClass::new(l, format!("aal-{l}")))
        .collect()
}

/// The burn task embedding of `labels`: the reference prepared as the
/// engine documents it (RAS, model spacing, patch crop around all labels,
/// z-scored over the crop with the detected policy, one mask per class).
fn burn_embedding(
    exported: &Exported,
    image: &Image,
    label_map: &LabelMap,
    labels: &[u16],
) -> Vec<Vec<f32>> {
    let patch = exported.config.patch_size;
    let policy = IntensityPolicy::detect(image).expect("policy");
    let (ras, plan) = canonical(image).expect("canonical");
    let ras_labels = plan.apply(label_map).expect("labels");
    let grid = target_geometry(ras.geometry(), exported.config.spacing_mm).expect("grid");
    let ras = resample_image(&ras, &grid).expect("resample");
    let ras_labels = resample_labels(&ras_labels, &grid).expect("resample");
    let crop =
        reference_crop(&ras, &ras_labels, &LabelSelection::Values(labels), patch).expect("crop");
    let values_in_crop = crop_or_pad(&ras_labels, crop.start, patch, 0).expect("labels");
    let mut x = crop.image;
    policy.normalize_in_place(&mut x).expect("normalise");
    let masks: Vec<f32> = labels
        .iter()
        .flat_map(|&l| {
            values_in_crop
                .data()
                .iter()
                .map(move |&v| f32::from(v == l))
        })
        .collect();
    let [d, h, w] = patch;
    let embedding = exported
        .model
        .encode_task(
            tensor(x.data().iter().copied().collect(), [1, 1, d, h, w]),
            tensor(masks, [1, labels.len(), d, h, w]),
        )
        .expect("burn encodes");
    embedding.stages.into_iter().map(values).collect()
}

/// A query exactly one window large, at the model's spacing and canonical:
/// the engine decodes it in one window with no padding, so its
/// probabilities are the network's own.
fn one_window_query(exported: &Exported, image: &Image) -> Image {
    let grid = target_geometry(image.geometry(), exported.config.spacing_mm).expect("grid");
    let at_model = resample_image(image, &grid).expect("resample");
    crop_or_pad(&at_model, [-1, 2, -1], exported.config.patch_size, 0.0).expect("crop")
}

fn probabilities_options() -> SegmentOptions {
    SegmentOptions {
        probabilities: true,
        largest_component: false,
        ..SegmentOptions::default()
    }
}

#[test]
fn engine_equals_burn_on_the_exported_graphs() {
    let Some((image, label_map)) = colin() else {
        return;
    };
    let exported = export(3);
    let model = Model::load(exported.dir.path()).expect("loads");
    let query = one_window_query(&exported, &image);
    // Thalamus L; thalamus L and R and caudate L.
    for labels in [&[77u16][..], &[77, 78, 71]] {
        let k = labels.len();
        let task = model
            .encode_task(
                &image,
                &label_map,
                &classes(labels),
                &EncodeOptions::default(),
            )
            .expect("engine encodes");
        let burn_task = burn_embedding(&exported, &image, &label_map, labels);
        for (s, burn_stage) in burn_task.iter().enumerate() {
            let engine_stage: Vec<f32> = task
                .classes()
                .iter()
                .flat_map(|c| c.stages()[s].iter().copied())
                .collect();
            // Tokens are not bounded like probabilities: compare relative to
            // the largest magnitude (at least 1).
            let scale = burn_stage.iter().fold(1.0f32, |m, v| m.max(v.abs()));
            let diff = max_abs_diff(&engine_stage, burn_stage) / scale;
            println!("K = {k}, task stage {s}: max abs diff {diff:e} x {scale}");
            assert!(
                diff < TOLERANCE,
                "K = {k}, task stage {s}: {diff} x {scale}"
            );
        }

        let got = model
            .segment(&query, &task, &probabilities_options())
            .expect("engine segments");
        assert_eq!(got.windows, 1);
        assert_eq!(got.labels.geometry(), query.geometry());

        // burn on the same window with the same embedding (the engine's, so
        // that this compares the query path alone; the embeddings were
        // compared above).
        let mut x = query.clone();
        task.preprocessing()
            .intensity
            .normalize_in_place(&mut x)
            .expect("normalise");
        let [d, h, w] = exported.config.patch_size;
        let embedding = TaskTensors::from_core(&task, &Device::flex());
        let logits = exported
            .model
            .segment(
                tensor(x.data().iter().copied().collect(), [1, 1, d, h, w]),
                &embedding,
            )
            .expect("burn segments");
        let burn_logits = values(logits.clone());
        // The window-level calls alone give the same logits.
        let features = model.encode_window(x.data().view()).expect("features");
        let engine_logits: Vec<f32> = model
            .decode_window(&features, &task)
            .expect("logits")
            .iter()
            .copied()
            .collect();
        let diff = max_abs_diff(&engine_logits, &burn_logits);
        println!("K = {k}, logits: max abs diff {diff:e}");
        assert!(diff < LOGIT_TOLERANCE, "K = {k}, logits: {diff}");
        let burn_probs = values(burn::tensor::activation::sigmoid(logits));
        let engine_probs: Vec<f32> = got
            .probabilities
            .as_ref()
            .expect("asked for")
            .iter()
            .flat_map(|p| p.data().iter().copied())
            .collect();
        let diff = max_abs_diff(&engine_probs, &burn_probs);
        println!("K = {k}, probabilities: max abs diff {diff:e}");
        assert!(diff < TOLERANCE, "K = {k}, probabilities: {diff}");
        let spread = burn_probs.iter().fold(0.0f32, |m, p| m.max(*p))
            - burn_probs.iter().fold(1.0f32, |m, p| m.min(*p));
        assert!(spread > 0.05, "the network output is not flat ({spread})");
        check_labels(&got, &burn_probs, labels);
    }
}

/// The engine's labels are burn's threshold + argmax, except where burn's
/// winning probability is within the tolerance of 0.5 or of the runner-up.
fn check_labels(got: &Segmentation, burn_probs: &[f32], labels: &[u16]) {
    let voxels = got.labels.data().len();
    for (i, &label) in got.labels.data().iter().enumerate() {
        let p: Vec<f32> = (0..labels.len())
            .map(|k| burn_probs[k * voxels + i])
            .collect();
        let (best, &pb) = p
            .iter()
            .enumerate()
            .max_by(|a, b| a.1.total_cmp(b.1))
            .expect("a class");
        let want = if pb >= 0.5 { labels[best] } else { 0 };
        if label != want {
            let runner_up = p
                .iter()
                .enumerate()
                .filter(|&(k, _)| k != best)
                .map(|(_, &q)| q)
                .fold(0.0f32, f32::max);
            let near = (pb - 0.5).abs() < 2.0 * TOLERANCE || pb - runner_up < 2.0 * TOLERANCE;
            assert!(near, "voxel {i}: engine {label}, burn {want} ({p:?})");
        }
    }
}

#[test]
fn embeddings_of_another_export_are_refused() {
    let Some((image, label_map)) = colin() else {
        return;
    };
    let (a, b) = (export(5), export(6));
    let model_a = Model::load(a.dir.path()).expect("loads");
    let model_b = Model::load(b.dir.path()).expect("loads");
    assert_ne!(model_a.fingerprint(), model_b.fingerprint());
    assert_eq!(
        *model_a.fingerprint(),
        iris_train::training::model_fingerprint(&a.model, &a.config)
    );
    let task: TaskEmbedding = model_a
        .encode_task(
            &image,
            &label_map,
            &classes(&[77]),
            &EncodeOptions::default(),
        )
        .expect("encodes");
    let query = one_window_query(&a, &image);
    let err = model_b
        .segment(&query, &task, &SegmentOptions::default())
        .expect_err("another model's embedding");
    assert!(matches!(err, Error::ModelMismatch { .. }), "{err}");
    assert!(
        model_a
            .segment(&query, &task, &SegmentOptions::default())
            .is_ok()
    );
}

#[test]
fn two_threads_segment_like_one() {
    let Some((image, label_map)) = colin() else {
        return;
    };
    let exported = export(7);
    let model = Model::load(exported.dir.path()).expect("loads");
    let one = model
        .encode_task(
            &image,
            &label_map,
            &classes(&[77]),
            &EncodeOptions::default(),
        )
        .expect("encodes");
    let three = model
        .encode_task(
            &image,
            &label_map,
            &classes(&[77, 78, 71]),
            &EncodeOptions::default(),
        )
        .expect("encodes");
    // The 1 mm head: several windows, resampled in and out.
    let options = probabilities_options();
    let alone: Vec<Segmentation> = [&one, &three]
        .iter()
        .map(|task| model.segment(&image, task, &options).expect("segments"))
        .collect();
    assert!(alone[0].windows > 1);
    assert_eq!(alone[0].labels.geometry(), image.geometry());
    let together: Vec<Segmentation> = std::thread::scope(|scope| {
        let handles: Vec<_> = [&three, &one]
            .into_iter()
            .map(|task| {
                let (model, image, options) = (&model, &image, &options);
                scope.spawn(move || model.segment(image, task, options).expect("segments"))
            })
            .collect();
        handles
            .into_iter()
            .map(|h| h.join().expect("thread"))
            .collect()
    });
    assert_eq!(together[0], alone[1]);
    assert_eq!(together[1], alone[0]);
}
