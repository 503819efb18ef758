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
//! Run: `cargo bench -p iris-train --bench forward` (2 threads unless
//! `RAYON_NUM_THREADS` says otherwise).

mod common;

use std::time::Instant;

use burn::prelude::*;
use burn::tensor::Distribution;
use iris_train::device::select_device;
use iris_train::model::{Iris, IrisConfig, TaskTensors};

/// Classes per episode.
const CLASSES: usize = 2;
/// Timed repetitions after one warm-up run.
const REPEATS: usize = 3;

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

/// Median seconds of `REPEATS` runs of `run`, after one warm-up run. Each
/// run ends with a device sync, so queued GPU work is counted.
fn median_seconds(device: &Device, mut run: impl FnMut()) -> f64 {
    let mut timed = || {
        let start = Instant::now();
        run();
        device.sync().expect("device sync");
        start.elapsed().as_secs_f64()
    };
    timed();
    let mut times: Vec<f64> = (0..REPEATS).map(|_| timed()).collect();
    times.sort_by(f64::total_cmp);
    times[REPEATS / 2]
}

/// Sum of the means of `tensors`: a scalar that depends on every output.
fn mean_sum<const D: usize>(tensors: &[Tensor<D>]) -> Tensor<1> {
    tensors
        .iter()
        .map(|t| t.clone().mean())
        .reduce(|a, b| a + b)
        .expect("at least one tensor")
}

/// Median forward + backward seconds of the encoder, the task encoder and
/// the decoder with the head, each on detached inputs.
fn breakdown(model: &Iris, inputs: &[Tensor<5>; 4]) -> [f64; 3] {
    let [query, reference, masks, target] = inputs;
    let device = query.device();
    let batch = Tensor::cat(vec![query.clone(), reference.clone()], 0);
    let encoder = median_seconds(&device, || {
        let _grads = mean_sum(&model.encoder.forward(batch.clone())).backward();
    });
    let detached = |levels: Vec<Tensor<5>>| -> Vec<Tensor<5>> {
        levels.into_iter().map(Tensor::detach).collect()
    };
    let reference_features = detached(model.encoder.forward(reference.clone()));
    let task_encoder = median_seconds(&device, || {
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
    let decoder = median_seconds(&device, || {
        let (decoded, summaries) = model.decoder.forward(&query_features, &embedding);
        let logits = model.head.forward(decoded, summaries);
        let _grads = (logits - target.clone()).powi_scalar(2).mean().backward();
    });
    [encoder, task_encoder, decoder]
}

fn main() {
    if std::env::var_os("RAYON_NUM_THREADS").is_none() {
        // SAFETY: set before any other thread exists (burn's rayon pool is
        // created lazily on the first tensor operation below).
        unsafe { std::env::set_var("RAYON_NUM_THREADS", "2") };
    }
    let threads = std::env::var("RAYON_NUM_THREADS").unwrap_or_default();
    let device = select_device();
    println!(
        "backend {device:?}, {threads} CPU threads, {CLASSES} classes per episode, median of {REPEATS}"
    );
    for (name, config) in [("tiny", IrisConfig::tiny()), ("small", IrisConfig::small())] {
        device.seed(1);
        let model = config.init(&device).expect("valid preset");
        let [query, reference, masks, _] = episode(&config, &device);
        let forward = median_seconds(&device, || {
            let logits = model
                .forward(query.clone(), reference.clone(), masks.clone())
                .expect("valid shapes");
            let _: f32 = logits.sum().into_scalar();
        });

        let autodiff = device.clone().autodiff();
        let model = config.init(&autodiff).expect("valid preset");
        let inputs = episode(&config, &autodiff);
        let [query, reference, masks, target] = &inputs;
        let train = median_seconds(&device, || {
            let logits = model
                .forward(query.clone(), reference.clone(), masks.clone())
                .expect("valid shapes");
            let loss = (logits - target.clone()).powi_scalar(2).mean();
            let _grads = loss.backward();
        });
        let [encoder, task_encoder, decoder] = breakdown(&model, &inputs);
        let [d, h, w] = config.patch_size;
        println!(
            "{name:>5} ({:.2} M params, {d}x{h}x{w}): forward {forward:.3} s, forward+backward {train:.3} s ({:.2} episodes/s)",
            model.num_params() as f64 / 1e6,
            1.0 / train,
        );
        println!(
            "       forward+backward parts: encoder (2 images) {encoder:.3} s, task encoder {task_encoder:.3} s, decoder + head {decoder:.3} s"
        );
    }
    if let Some(peak) = common::peak_rss_mib() {
        println!("peak resident memory {peak:.0} MiB");
    }
}
