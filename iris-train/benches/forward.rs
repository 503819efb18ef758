//! Seconds per episode of the Iris model on the backend the cargo features
//! select (`flex` on the CPU by default, `--features vulkan` for a GPU): the
//! forward pass alone (no autodiff) and forward + backward of a loss, for the
//! `tiny` and `small` presets, one episode of one query, one reference and
//! `CLASSES` classes at the preset's full window.
//!
//! For each preset it also splits one training step into its parts, each
//! timed as forward + backward of that part alone: the encoder (query and
//! reference as one batch), the task encoder, and the decoder with the head.
//!
//! Criterion times each (10 samples in about 10 s), so a run is compared
//! with the last one, or with a saved baseline.
//!
//! Run: `cargo bench -p iris-train --bench forward` (2 threads unless
//! `RAYON_NUM_THREADS` says otherwise). Criterion's options follow `--`:
//! a name filter (`-- small`), `--save-baseline NAME`, `--baseline NAME`.

mod common;

use burn::prelude::*;
use burn::tensor::Distribution;
use common::Best;
use criterion::BenchmarkGroup;
use criterion::measurement::WallTime;
use iris_train::device::select_device;
use iris_train::model::{Iris, IrisConfig, TaskTensors};

/// Classes per episode.
const CLASSES: usize = 2;
fn episode(config: &IrisConfig, device: &Device) -> [Tensor<5>; 4] {
    let [d, h, w] = config.patch_size;
    let image = || Tensor::<5>::random([1, 1, d, h, w], Distribution::Normal(0.0, 1.0), device);
    let mask = || {
        Tensor::<5>::random([1, CLASSES, d, h, w], Distribution::Default, device)
            .greater_elem(0.7)
            .float()
    };
    [image(), image(), mask(), mask()]
}

/// Sum of the means of `tensors`: a scalar that depends on every output.
fn mean_sum<const D: usize>(tensors: &[Tensor<D>]) -> Tensor<1> {
    tensors
        .iter()
        .map(|t| t.clone().mean())
        .reduce(|a, b| a + b)
        .expect("at least one tensor")
}

/// Benchmarks forward + backward of the encoder, the task encoder and the
/// decoder with the head, each on detached inputs, as `parts/...`.
fn breakdown(
    group: &mut BenchmarkGroup<'_, WallTime>,
    best: &Best,
    model: &Iris,
    inputs: &[Tensor<5>; 4],
) {
    let [query, reference, masks, target] = inputs;
    let device = query.device();
    let batch = Tensor::cat(vec![query.clone(), reference.clone()], 0);
    best.bench(group, "parts/encoder (2 images)", &device, || {
        let _grads = mean_sum(&model.encoder.forward(batch.clone())).backward();
    });
    let detached = |levels: Vec<Tensor<5>>| -> Vec<Tensor<5>> {
        levels.into_iter().map(Tensor::detach).collect()
    };
    let reference_features = detached(model.encoder.forward(reference.clone()));
    best.bench(group, "parts/task encoder", &device, || {
        let embedding = model
            .task_encoder
            .forward(&reference_features, masks.clone());
        let _grads = mean_sum(&embedding.stages).backward();
    });
    let embedding = TaskTensors {
        stages: model
            .task_encoder
            .forward(&reference_features, masks.clone())
            .stages
            .into_iter()
            .map(Tensor::detach)
            .collect(),
    };
    let query_features = detached(model.encoder.forward(query.clone()));
    best.bench(group, "parts/decoder + head", &device, || {
        let (decoded, summaries) = model.decoder.forward(&query_features, &embedding);
        let logits = model.head.forward(decoded, summaries);
        let _grads = (logits - target.clone()).powi_scalar(2).mean().backward();
    });
}

fn main() {
    if std::env::var_os("RAYON_NUM_THREADS").is_none() {
        // SAFETY: set before any other thread exists (burn's rayon pool is
        // created lazily on the first tensor operation below).
        unsafe { std::env::set_var("RAYON_NUM_THREADS", "2") };
    }
    let threads = std::env::var("RAYON_NUM_THREADS").unwrap_or_default();
    let device = select_device();
    println!("backend {device:?}, {threads} CPU threads, {CLASSES} classes per episode");
    let mut criterion = common::criterion(10);
    for (name, config) in [("tiny", IrisConfig::tiny()), ("small", IrisConfig::small())] {
        let best = Best::default();
        let [d, h, w] = config.patch_size;
        let mut group = criterion.benchmark_group(format!("episode {name} {d}x{h}x{w}"));
        device.seed(1);
        let model = config.init(&device).expect("valid preset");
        let [query, reference, masks, _] = episode(&config, &device);
        best.bench(&mut group, "forward", &device, || {
            let logits = model
                .forward(query.clone(), reference.clone(), masks.clone())
                .expect("valid shapes");
            let _: f32 = logits.sum().into_scalar();
        });

        let autodiff = device.clone().autodiff();
        let model = config.init(&autodiff).expect("valid preset");
        let inputs = episode(&config, &autodiff);
        let [query, reference, masks, target] = &inputs;
        best.bench(&mut group, "forward+backward", &device, || {
            let logits = model
                .forward(query.clone(), reference.clone(), masks.clone())
                .expect("valid shapes");
            let loss = (logits - target.clone()).powi_scalar(2).mean();
            let _grads = loss.backward();
        });
        breakdown(&mut group, &best, &model, &inputs);
        group.finish();
        if let Some(train) = best.get("forward+backward") {
            println!(
                "{name} ({:.2} M params): {:.2} episodes/s (fastest forward+backward)",
                model.num_params() as f64 / 1e6,
                1.0 / train,
            );
        }
    }
    criterion.final_summary();
    if let Some(peak) = common::peak_rss_mib() {
        println!("peak resident memory {peak:.0} MiB");
    }
}
