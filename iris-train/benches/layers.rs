//! Where a `small` training step spends its time, layer type by layer type:
//! each operation at the shapes the `small` preset (64³, channels
//! `[8, 16, 32, 64, 128]`) gives it in one episode, timed forward alone and
//! forward + backward (gradients of the input and the weights; the loss is
//! `<output, r>` for a fixed random `r`), best of 7 runs.
//!
//! The 3x3x3 convolutions are timed with burn's `conv3d` and with the
//! model's own [`conv3x3`], one by one (a block's `conv1` and shortcut
//! separately), and summed with how often one training step runs each;
//! instance norm + ReLU with burn's modules and fused. The other rows are
//! the full-resolution shapes, the largest of each layer type.
//!
//! Run: `cargo bench -p iris-train --bench layers` (2 threads unless
//! `RAYON_NUM_THREADS` says otherwise). Pass a word to run only the rows
//! whose name contains it, e.g. `-- conv`.

use std::time::Instant;

use burn::nn::InstanceNormConfig;
use burn::prelude::*;
use burn::tensor::Distribution;
use burn::tensor::activation::relu;
use burn::tensor::module::conv3d;
use burn::tensor::ops::ConvOptions;
use iris_train::model::conv::conv3x3;
use iris_train::model::ops::{instance_norm_relu, max_pool_2x, upsample_trilinear};

/// Timed repetitions after one warm-up run.
const REPEATS: usize = 7;

/// Fastest of `REPEATS` runs of `run` after one warm-up run, in seconds:
/// on a machine shared with other work the minimum is the steadiest
/// estimate of what the operation itself costs.
fn best_seconds(device: &Device, mut run: impl FnMut()) -> f64 {
    let mut timed = || {
        let start = Instant::now();
        run();
        device.sync().expect("device sync");
        start.elapsed().as_secs_f64()
    };
    timed();
    (0..REPEATS).map(|_| timed()).fold(f64::INFINITY, f64::min)
}

fn normal<const D: usize>(shape: [usize; D], device: &Device) -> Tensor<D> {
    Tensor::random(shape, Distribution::Normal(0.0, 1.0), device)
}

/// Forward and forward + backward seconds of `op` on inputs of the given
/// shapes (all made to require gradients), the loss being `<op(..), r>`
/// for a fixed random `r`.
fn time_op<const N: usize>(
    device: &Device,
    shapes: [[usize; 5]; N],
    op: impl Fn([Tensor<5>; N]) -> Tensor<5>,
) -> (f64, f64) {
    let autodiff = device.clone().autodiff();
    let inputs = shapes.map(|s| normal(s, &autodiff).require_grad());
    let plain = inputs.clone().map(|t| t.inner());
    let upstream = normal(op(plain.clone()).dims(), &autodiff);
    let forward = best_seconds(device, || {
        let _: f32 = op(plain.clone()).sum().into_scalar();
    });
    let backward = best_seconds(device, || {
        let grads = (op(inputs.clone()) * upstream.clone()).sum().backward();
        for input in &inputs {
            let _: f32 = input.grad(&grads).expect("gradient").sum().into_scalar();
        }
    });
    (forward, backward)
}

/// One 3x3x3 convolution of a `small` step: batch, channels in and out,
/// cube side, and how many of them one step runs.
struct ConvCase {
    batch: usize,
    channels: [usize; 2],
    side: usize,
    count: usize,
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
    let filter = std::env::args().skip(1).find(|a| !a.starts_with('-'));
    let wanted = |name: &str| filter.as_ref().is_none_or(|f| name.contains(f.as_str()));
    let device = iris_train::device::select_device();
    println!(
        "{:?}, {} threads, best of {REPEATS}; seconds forward / forward+backward, x count per step",
        device,
        std::env::var("RAYON_NUM_THREADS").unwrap_or_default()
    );

    let burn_conv =
        |[x, w]: [Tensor<5>; 2]| conv3d(x, w, None, ConvOptions::new([1; 3], [1; 3], [1; 3], 1));
    let ours = |[x, w]: [Tensor<5>; 2]| conv3x3(x, w);
    let mut totals = [0.0f64; 2];
    for case in small_convolutions() {
        let ConvCase {
            batch,
            channels: [cin, cout],
            side,
            count,
        } = case;
        let shapes = [[batch, cin, side, side, side], [cout, cin, 3, 3, 3]];
        let name = format!("conv B{batch} {cin}->{cout} {side}^3");
        if !wanted(&name) && !wanted("burn") && !wanted("conv3x3") {
            continue;
        }
        let mut line = format!("{name:<26} x{count}");
        for (total, (label, op)) in totals.iter_mut().zip([
            ("burn", &burn_conv as &dyn Fn([Tensor<5>; 2]) -> Tensor<5>),
            ("conv3x3", &ours),
        ]) {
            if !wanted(&name) && !wanted(label) {
                continue;
            }
            let (forward, backward) = time_op(&device, shapes, op);
            *total += backward * count as f64;
            line += &format!("  {label} {forward:.4} / {backward:.4}");
        }
        println!("{line}");
    }
    if totals.iter().any(|&t| t > 0.0) {
        println!(
            "all 3x3x3 convolutions of a step, forward+backward: burn {:.3} s, conv3x3 {:.3} s",
            totals[0], totals[1]
        );
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
    for (name, op) in others {
        if wanted(name) {
            let (forward, backward) = time_op(&device, [full], op);
            println!("{name:<26} B2 8 64^3  {forward:.4} / {backward:.4}");
        }
    }
}
