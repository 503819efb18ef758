//! The whole Iris model at the `tiny` preset: shapes, gradient flow to every
//! parameter, class permutation, parameter counts against the reference, and
//! input validation.

use burn::module::{Module, ModuleVisitor, Param};
use burn::prelude::*;
use burn::tensor::{Distribution, Gradients};
use iris_train::Error;
use iris_train::model::{Iris, IrisConfig, TaskTensors};

fn device() -> Device {
    let device = Device::flex();
    device.seed(11);
    device
}

/// A query image, a reference image and `k` reference masks at `size`.
fn episode(k: usize, size: [usize; 3], device: &Device) -> (Tensor<5>, Tensor<5>, Tensor<5>) {
    let [d, h, w] = size;
    let image = |_| Tensor::<5>::random([1, 1, d, h, w], Distribution::Normal(0.0, 1.0), device);
    let masks = Tensor::<5>::random([1, k, d, h, w], Distribution::Default, device)
        .greater_elem(0.6)
        .float();
    (image(()), image(()), masks)
}

fn tiny(device: &Device) -> Iris {
    IrisConfig::tiny()
        .init(device)
        .expect("tiny preset is valid")
}

fn max_abs_diff<const D: usize>(a: Tensor<D>, b: Tensor<D>) -> f32 {
    assert_eq!(a.dims(), b.dims());
    (a - b).abs().max().into_scalar()
}

#[test]
fn episode_gives_one_logit_map_per_class() {
    let device = device();
    let model = tiny(&device);
    let (query, reference, masks) = episode(3, [32, 32, 32], &device);
    let logits = model
        .forward(query.clone(), reference.clone(), masks.clone())
        .expect("valid shapes");
    assert_eq!(logits.dims(), [1, 3, 32, 32, 32]);
    assert!(!logits.clone().is_nan().any().into_scalar::<bool>());

    // Encoding the task once and segmenting with it gives the same logits as
    // the batched episode.
    let embedding = model.encode_task(reference, masks).expect("valid shapes");
    let dims: Vec<[usize; 4]> = embedding.stages.iter().map(Tensor::dims).collect();
    assert_eq!(dims, vec![[1, 3, 11, 32], [1, 3, 11, 32], [1, 3, 11, 16]]);
    let separate = model.segment(query, &embedding).expect("valid shapes");
    let diff = max_abs_diff(logits, separate);
    assert!(diff < 1e-4, "max abs difference {diff}");
}

#[test]
fn smaller_windows_than_the_patch_are_accepted() {
    let device = device();
    let model = tiny(&device);
    let (query, reference, masks) = episode(1, [16, 32, 16], &device);
    let logits = model
        .forward(query, reference, masks)
        .expect("valid shapes");
    assert_eq!(logits.dims(), [1, 1, 16, 32, 16]);
}

/// Gradients at or below this size (largest absolute entry) count as zero.
/// The smallest genuine one in the tiny model is a positional embedding's,
/// about 7e-7 (one voxel of 32^3 each); the inert parameters below get
/// rounding noise that depends on the order of parallel sums (seen up to
/// 1.1e-8). The line sits between the two, with a margin of ~7x on each side.
const ZERO_GRADIENT: f32 = 1e-7;

/// Parameters of the reference architecture whose gradient is zero by
/// construction, with the reason.
fn inert_reason(path: &str) -> Option<&'static str> {
    if path.ends_with("attention.key.bias") {
        Some("adds the same q.b to all scores of a query; softmax cancels it")
    } else if path.ends_with("merge.bias") {
        Some("a constant removed by the instance norm after the pixel unshuffle")
    } else if path.contains(".blocks.1.image_feed_forward.mlp.fc2.bias") {
        Some(
            "the fusion layer's last per-channel constant, removed by the next up block's instance norm",
        )
    } else {
        None
    }
}

/// Records, per parameter path, whether backward gave it a gradient and
/// whether that gradient is non-zero exactly when it should be.
struct GradientReport<'a> {
    grads: &'a Gradients,
    path: Vec<String>,
    checked: usize,
    inert: usize,
    without_gradient: Vec<String>,
    zero_gradient: Vec<String>,
    inert_with_gradient: Vec<String>,
}

impl<'a> GradientReport<'a> {
    fn new(grads: &'a Gradients) -> Self {
        Self {
            grads,
            path: Vec::new(),
            checked: 0,
            inert: 0,
            without_gradient: Vec::new(),
            zero_gradient: Vec::new(),
            inert_with_gradient: Vec::new(),
        }
    }
}

impl ModuleVisitor for GradientReport<'_> {
    fn enter_module(&mut self, name: &str, _container_type: &str) {
        self.path.push(name.to_string());
    }

    fn exit_module(&mut self, _name: &str, _container_type: &str) {
        self.path.pop();
    }

    fn visit_float<const D: usize>(&mut self, param: &Param<Tensor<D>>) {
        let name = self.path.join(".");
        self.checked += 1;
        let Some(grad) = param.val().grad(self.grads) else {
            self.without_gradient.push(name);
            return;
        };
        let largest: f32 = grad.abs().max().into_scalar();
        match inert_reason(&name) {
            Some(reason) => {
                self.inert += 1;
                if largest > ZERO_GRADIENT {
                    self.inert_with_gradient
                        .push(format!("{name} ({reason}): {largest:e}"));
                }
            }
            None if largest <= ZERO_GRADIENT => {
                self.zero_gradient.push(format!("{name}: {largest:e}"))
            }
            None => {}
        }
    }
}

#[test]
fn every_parameter_receives_a_gradient() {
    let device = device().autodiff();
    let model = tiny(&device);
    let (query, reference, masks) = episode(2, [32, 32, 32], &device);
    let target = Tensor::<5>::random([1, 2, 32, 32, 32], Distribution::Default, &device)
        .greater_elem(0.5)
        .float();
    let logits = model
        .forward(query, reference, masks)
        .expect("valid shapes");
    let loss = (logits - target).powi_scalar(2).mean();
    let grads = loss.backward();
    let mut report = GradientReport::new(&grads);
    model.visit(&mut report);
    // 712 parameter tensors, of which 36 key biases, 3 merge biases and 3
    // final image feed-forward biases are inert.
    assert_eq!((report.checked, report.inert), (712, 42));
    assert!(
        report.without_gradient.is_empty()
            && report.zero_gradient.is_empty()
            && report.inert_with_gradient.is_empty(),
        "no gradient: {:?}\nzero gradient: {:?}\ninert but with gradient: {:?}",
        report.without_gradient,
        report.zero_gradient,
        report.inert_with_gradient
    );
}

#[test]
fn permuting_classes_permutes_the_logits() {
    let device = device();
    let model = tiny(&device);
    let (query, reference, masks) = episode(3, [32, 32, 32], &device);
    let embedding = model.encode_task(reference, masks).expect("valid shapes");
    let logits = model
        .segment(query.clone(), &embedding)
        .expect("valid shapes");
    let order = [2, 0, 1];
    let permuted: TaskTensors = embedding.select_classes(&order);
    let permuted_logits = model
        .segment(query.clone(), &permuted)
        .expect("valid shapes");
    for (position, &class) in order.iter().enumerate() {
        let diff = max_abs_diff(
            permuted_logits.clone().narrow(1, position, 1),
            logits.clone().narrow(1, class, 1),
        );
        assert!(diff < 1e-4, "class {class}: max abs difference {diff}");
    }
    // Classes do interact (self-attention over all K x 11 tokens), so
    // class 0 segmented alone differs from class 0 segmented among three.
    let alone = model
        .segment(query, &embedding.select_classes(&[0]))
        .expect("valid shapes");
    let diff = max_abs_diff(alone, logits.narrow(1, 0, 1));
    assert!(
        diff > 1e-6,
        "classes do not interact: max abs difference {diff}"
    );
}

#[test]
fn grouped_decoding_segments_each_group_on_its_own() {
    let device = device();
    let model = tiny(&device);
    let (query, reference, masks) = episode(3, [32, 32, 32], &device);
    let embedding = model.encode_task(reference, masks).expect("valid shapes");
    let all = model
        .segment(query.clone(), &embedding)
        .expect("valid shapes");
    let grouped = |g: usize| {
        model
            .segment_grouped(query.clone(), &embedding, g)
            .expect("valid shapes")
    };
    // One group of all classes (or larger) is plain `segment`.
    for g in [3, 8] {
        let diff = max_abs_diff(grouped(g), all.clone());
        assert!(diff < 1e-5, "{g} per run: max abs difference {diff}");
    }
    // Groups of 2: classes 0-1 together, then class 2 alone, in order.
    let pairs = grouped(2);
    let first = model
        .segment(query.clone(), &embedding.select_classes(&[0, 1]))
        .expect("valid shapes");
    let last = model
        .segment(query.clone(), &embedding.select_classes(&[2]))
        .expect("valid shapes");
    assert!(max_abs_diff(pairs.clone().narrow(1, 0, 2), first) < 1e-5);
    assert!(max_abs_diff(pairs.narrow(1, 2, 1), last.clone()) < 1e-5);
    assert!(max_abs_diff(grouped(1).narrow(1, 2, 1), last.clone()) < 1e-5);
    // Features encoded once decode any embedding as a full run would.
    let features = model.encode_query(query.clone()).expect("valid shape");
    let decoded = |e: &TaskTensors| model.decode_grouped(&features, e, 1).expect("fits");
    assert!(max_abs_diff(decoded(&embedding), grouped(1)) < 1e-6);
    assert!(max_abs_diff(decoded(&embedding.select_classes(&[2])), last) < 1e-6);
    let doubled = TaskTensors {
        stages: embedding
            .stages
            .iter()
            .map(|s| Tensor::cat(vec![s.clone(), s.clone()], 0))
            .collect(),
    };
    let error = model
        .decode_grouped(&features, &doubled, 1)
        .expect_err("batch 2 embedding for a batch 1 query");
    assert!(matches!(error, Error::Shape { .. }), "{error}");
    let error = model
        .segment_grouped(query, &embedding, 0)
        .expect_err("0 per run");
    assert!(
        matches!(
            error,
            Error::Config {
                field: "classes_per_forward",
                ..
            }
        ),
        "{error}"
    );
}

#[test]
fn parameter_counts_match_the_reference_model() {
    // Counted from the reference code (Stanford-AIMI/MASS 156e866, models/;
    // `scripts/mass_reference.py --full-size` prints the total): 120,126,373
    // for the paper model (encoder 37,657,440, task encoder 35,632,229,
    // decoder 46,000,384, head 836,320). `tests/import.rs` checks the
    // mapping tensor for tensor.
    let device = device();
    let paper = IrisConfig::paper().init(&device).expect("valid preset");
    assert_eq!(paper.encoder.num_params(), 37_657_440);
    assert_eq!(paper.task_encoder.num_params(), 35_632_229);
    assert_eq!(paper.decoder.num_params(), 46_000_384);
    assert_eq!(paper.head.num_params(), 836_320);
    assert_eq!(paper.num_params(), 120_126_373);
    let small = IrisConfig::small().init(&device).expect("valid preset");
    assert_eq!(small.num_params(), 8_776_405);
    assert_eq!(tiny(&device).num_params(), 1_285_741);
}

#[test]
fn invalid_configurations_name_the_field() {
    let device = device();
    let bad_patch = IrisConfig {
        patch_size: [32, 24, 32],
        ..IrisConfig::tiny()
    }
    .init(&device);
    assert!(matches!(
        bad_patch,
        Err(Error::Config {
            field: "patch_size",
            ..
        })
    ));
    let bad_stages = IrisConfig::tiny().with_task_stages(0).init(&device);
    assert!(matches!(
        bad_stages,
        Err(Error::Config {
            field: "task_stages",
            ..
        })
    ));
    let bad_spacing = IrisConfig {
        spacing_mm: f64::NAN,
        ..IrisConfig::tiny()
    }
    .validate();
    assert!(matches!(
        bad_spacing,
        Err(Error::Config {
            field: "spacing_mm",
            ..
        })
    ));
    let message = IrisConfig {
        channels: [4, 8, 0, 32, 32],
        ..IrisConfig::tiny()
    }
    .validate()
    .expect_err("zero channels")
    .to_string();
    assert!(
        message.contains("channels") && message.contains("[4, 8, 0, 32, 32]"),
        "{message}"
    );
}

#[test]
fn wrong_input_shapes_are_errors_not_panics() {
    let device = device();
    let model = tiny(&device);
    // Larger than the 32^3 patch.
    let (query, reference, masks) = episode(1, [48, 32, 32], &device);
    assert!(matches!(
        model.forward(query, reference, masks),
        Err(Error::Shape {
            tensor: "query image",
            ..
        })
    ));
    // Not a multiple of 16.
    let (query, _, _) = episode(1, [24, 32, 32], &device);
    let (_, reference, masks) = episode(2, [32, 32, 32], &device);
    let embedding = model
        .encode_task(reference.clone(), masks)
        .expect("valid shapes");
    assert!(matches!(
        model.segment(query, &embedding),
        Err(Error::Shape {
            tensor: "query image",
            ..
        })
    ));
    // Masks of another size than the reference.
    let (_, _, small_masks) = episode(2, [16, 32, 32], &device);
    assert!(matches!(
        model.encode_task(reference.clone(), small_masks),
        Err(Error::Shape {
            tensor: "reference masks",
            ..
        })
    ));
    // No class at all.
    let no_class = Tensor::<5>::zeros([1, 0, 32, 32, 32], &device);
    assert!(matches!(
        model.encode_task(reference.clone(), no_class),
        Err(Error::Shape {
            tensor: "reference masks",
            ..
        })
    ));
    // An embedding with the wrong batch size.
    let batch_of_two = Tensor::cat(vec![reference.clone(), reference], 0);
    assert!(matches!(
        model.segment(batch_of_two, &embedding),
        Err(Error::Shape {
            tensor: "task embedding",
            ..
        })
    ));
}

#[test]
fn the_embedding_alone_can_be_optimised() {
    // In-context tuning: freeze the model, make the embedding the only
    // tensor that requires gradients.
    let device = device().autodiff();
    let model = tiny(&device).no_grad();
    let (query, reference, masks) = episode(2, [32, 32, 32], &device);
    let embedding = model
        .encode_task(reference, masks.clone())
        .expect("valid shapes");
    let embedding = TaskTensors {
        stages: embedding
            .stages
            .into_iter()
            .map(|tokens| tokens.detach().require_grad())
            .collect(),
    };
    let logits = model.segment(query, &embedding).expect("valid shapes");
    let grads = (logits - masks).powi_scalar(2).mean().backward();
    for tokens in &embedding.stages {
        let grad = tokens.grad(&grads).expect("embedding requires grad");
        assert_eq!(grad.dims(), tokens.dims());
        assert!(grad.abs().max().into_scalar::<f32>() > 0.0);
    }
    let mut report = GradientReport::new(&grads);
    model.visit(&mut report);
    assert_eq!(
        report.without_gradient.len(),
        report.checked,
        "frozen parameters received gradients"
    );
}
