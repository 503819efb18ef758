//! Where a `small` training step spends its time, layer type by layer type:
//! each operation at the shapes the `small` preset (64³, channels
//! `[8, 16, 32, 64, 128]`) gives it in one episode, timed forward alone and
//! forward + backward (gradients of the input and the weights; the loss is
//! `<output, r>` for a fixed random `r`).
//!
//! The 3x3x3 convolutions are timed with burn's `conv3d` and with the
//! model's own [`conv3x3`], one by one (a block's `conv1` and shortcut
//! separately), and summed with how often one training step runs each
//! (from each benchmark's fastest iteration);
//! instance norm + ReLU with burn's modules and fused. The other rows are
//! the full-resolution shapes, the largest of each layer type.
//!
//! Criterion times every row (10 samples in about 2 s each), so a run is
//! compared with the last one, or with a saved baseline.
//!
//! Run: `cargo bench -p iris-train --bench layers` (2 threads unless
//! `RAYON_NUM_THREADS` says otherwise). Criterion's options follow `--`:
//! a name filter (`-- conv3x3`), `--save-baseline NAME`, `--baseline NAME`.

mod common;

use burn::nn::InstanceNormConfig;
use burn::prelude::*;
use burn::tensor::Distribution;
use burn::tensor::activation::relu;
use burn::tensor::module::conv3d;
use burn::tensor::ops::ConvOptions;
use common::Best;
use criterion::BenchmarkGroup;
use criterion::measurement::WallTime;
use iris_train::model::conv::conv3x3;
use iris_train::model::ops::{instance_norm_relu, max_pool_2x, upsample_trilinear};

fn normal<const D: usize>(shape: [usize; D], device: &Device) -> Tensor<D> {
    Tensor::random(shape, Distribution::Normal(0.0, 1.0), device)
}

/// Benchmarks `op` on inputs of the given shapes as `name/forward` and
/// `name/forward+backward` (gradients of every input, all made to require
/// them; the loss is `<op(..), r>` for a fixed random `r`).
fn bench_op<const N: usize>(
    group: &mut BenchmarkGroup<'_, WallTime>,
    best: &Best,
    device: &Device,
    name: &str,
    shapes: [[usize; 5]; N],
    op: impl Fn([Tensor<5>; N]) -> Tensor<5>,
) {
    let autodiff = device.clone().autodiff();
    let inputs = shapes.map(|s| normal(s, &autodiff).require_grad());
    let plain = inputs.clone().map(|t| t.inner());
    let upstream = normal(op(plain.clone()).dims(), &autodiff);
    best.bench(group, &format!("{name}/forward"), device, || {
        let _: f32 = op(plain.clone()).sum().into_scalar();
    });
    best.bench(group, &format!("{name}/forward+backward"), device, || {
        let grads = (op(inputs.clone()) * upstream.clone()).sum().backward();
        for input in &inputs {
            let _: f32 = input.grad(&grads).expect("gradient").sum().into_scalar();
        }
    });
}

/// One 3x3x3 convolution of a `small` step: batch, channels in and out,
/// cube side, and how many of them one step runs.
struct ConvCase {
    batch: usize,
    channels: [usize; 2],
    side: usize,
    count: usize,
}

impl ConvCase {
    /// `B2 8->16 32^3 x2 conv3x3`: the shape, how often a step runs it, and
    /// which implementation.
    fn name(&self, implementation: &str) -> String {
        let [cin, cout] = self.channels;
        format!(
            "B{} {cin}->{cout} {}^3 x{} {implementation}",
            self.batch, self.side, self.count
        )
    }
}

/// Every 3x3x3 convolution of the `small` preset's encoder (query and
/// reference as one batch of 2) and decoder (batch 1), grouped by shape.
fn small_convolutions() -> Vec<ConvCase> {
    let case = |batch, cin, cout, side, count| ConvCase {
        batch,
        channels: [cin, cout],
        side,
        count,
    };
    vec![
        // Encoder: stem, stem block, then per stage 2 blocks (the first
        // with a shortcut convolution).
        case(2, 1, 8, 64, 1),
        case(2, 8, 8, 64, 2),
        case(2, 8, 16, 32, 2),
        case(2, 16, 16, 32, 3),
        case(2, 16, 32, 16, 2),
        case(2, 32, 32, 16, 3),
        case(2, 32, 64, 8, 2),
        case(2, 64, 64, 8, 3),
        case(2, 64, 128, 4, 2),
        case(2, 128, 128, 4, 3),
        // Decoder up blocks: [skip, upsampled] in, 2 blocks each.
        case(1, 192, 64, 8, 2),
        case(1, 64, 64, 8, 3),
        case(1, 96, 32, 16, 2),
        case(1, 32, 32, 16, 3),
        case(1, 48, 16, 32, 2),
        case(1, 16, 16, 32, 3),
        case(1, 24, 8, 64, 2),
        case(1, 8, 8, 64, 3),
    ]
}

fn main() {
    if std::env::var_os("RAYON_NUM_THREADS").is_none() {
        // SAFETY: set before any other thread exists (burn's rayon pool is
        // created lazily on the first tensor operation below).
        unsafe { std::env::set_var("RAYON_NUM_THREADS", "2") };
    }
    let device = iris_train::device::select_device();
    println!(
        "{:?}, {} threads",
        device,
        std::env::var("RAYON_NUM_THREADS").unwrap_or_default()
    );
    let mut criterion = common::criterion(2);
    let best = Best::default();

    let burn_conv =
        |[x, w]: [Tensor<5>; 2]| conv3d(x, w, None, ConvOptions::new([1; 3], [1; 3], [1; 3], 1));
    let ours = |[x, w]: [Tensor<5>; 2]| conv3x3(x, w);
    let mut group = criterion.benchmark_group("conv3d");
    for case in small_convolutions() {
        let [cin, cout] = case.channels;
        let shapes = [
            [case.batch, cin, case.side, case.side, case.side],
            [cout, cin, 3, 3, 3],
        ];
        bench_op(
            &mut group,
            &best,
            &device,
            &case.name("burn"),
            shapes,
            burn_conv,
        );
        bench_op(
            &mut group,
            &best,
            &device,
            &case.name("conv3x3"),
            shapes,
            ours,
        );
    }
    group.finish();
    for label in ["burn", "conv3x3"] {
        let per_step: Option<f64> = small_convolutions()
            .iter()
            .map(|case| {
                let id = format!("{}/forward+backward", case.name(label));
                best.get(&id).map(|s| s * case.count as f64)
            })
            .sum();
        if let Some(seconds) = per_step {
            println!(
                "all 3x3x3 convolutions of a step, forward+backward, {label}: {seconds:.3} s \
                 (fastest iterations x how often a step runs each)"
            );
        }
    }

    // The other layer types at their largest (full-resolution) shapes.
    let norm = InstanceNormConfig::new(8)
        .with_epsilon(1e-4)
        .with_affine(false)
        .init(&device.clone().autodiff());
    let full = [2, 8, 64, 64, 64];
    type Op<'a> = &'a dyn Fn([Tensor<5>; 1]) -> Tensor<5>;
    let others: [(&str, Op); 5] = [
        ("norm + relu, burn", &|[x]| relu(norm.forward(x))),
        ("norm + relu, fused", &|[x]| instance_norm_relu(&norm, x)),
        ("relu alone", &|[x]| relu(x)),
        ("max pool 2x", &|[x]| max_pool_2x(x)),
        ("upsample from 32^3", &|[x]| {
            upsample_trilinear(x.slice([0..2, 0..8, 0..32, 0..32, 0..32]), [64; 3])
        }),
    ];
    let mut group = criterion.benchmark_group("layers B2 8 64^3");
    for (name, op) in others {
        bench_op(&mut group, &best, &device, name, [full], op);
    }
    group.finish();
    criterion.final_summary();
}
