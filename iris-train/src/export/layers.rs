//! ONNX versions of the model's blocks, one function per block type.
//!
//! Each function appends the nodes (and the block's weights as
//! initializers named by `name`, the block's path in the model) that compute
//! exactly what the burn block's `forward` computes, and returns the name of
//! the result. Batch-like leading dimensions stay symbolic: reshapes copy
//! them (`0`) or infer them (`-1`).

use burn::nn::attention::MultiHeadAttention;
use burn::nn::conv::Conv3d;
use burn::nn::{InstanceNorm, LayerNorm, LayerNormConfig, Linear, PaddingConfig3d};
use burn::prelude::*;
use std::ops::Range;

use super::graph::{Graph, attr_float, attr_int, attr_ints, attr_string, int};
use crate::Error;
use crate::model::attention::{CrossAttention, FeedForward, Mlp, PRE_NORM_EPSILON, SelfAttention};
use crate::model::blocks::{BasicBlock, BlockStack, PreActConv};
use crate::model::ops::interpolation_matrix;

/// Result of appending nodes: the name of the output value.
type Value = Result<String, Error>;

/// Epsilon of the layer norms built with burn's default (cross-attention,
/// task encoder, classifier head).
fn default_layer_norm_epsilon() -> f64 {
    LayerNormConfig::new(1).epsilon
}

pub(crate) fn reshape(g: &mut Graph, x: &str, shape: &[i64]) -> String {
    let shape = g.ints("shape", shape);
    g.op("Reshape", &[x, &shape], vec![])
}

pub(crate) fn transpose(g: &mut Graph, x: &str, perm: &[i64]) -> String {
    g.op("Transpose", &[x], vec![attr_ints("perm", perm)])
}

pub(crate) fn add(g: &mut Graph, a: &str, b: &str) -> String {
    g.op("Add", &[a, b], vec![])
}

/// `x` with size-1 axes inserted at `axes`.
pub(crate) fn unsqueeze(g: &mut Graph, x: &str, axes: &[i64]) -> String {
    let axes = g.ints("axes", axes);
    g.op("Unsqueeze", &[x, &axes], vec![])
}

/// The 1-D `i64` shape of `x` restricted to axes `start..end`.
pub(crate) fn shape_of(g: &mut Graph, x: &str, start: i64, end: i64) -> String {
    g.op(
        "Shape",
        &[x],
        vec![attr_int("start", start), attr_int("end", end)],
    )
}

/// The 1-D `i64` shape made of the dynamic leading dimensions `prefix` (a
/// 1-D `i64` value) followed by the fixed `rest`.
pub(crate) fn shape_with(g: &mut Graph, prefix: &str, rest: &[i64]) -> String {
    let rest = g.ints("shape", rest);
    g.op("Concat", &[prefix, &rest], vec![attr_int("axis", 0)])
}

/// `x` reshaped to [`shape_with`]`(prefix, rest)`.
pub(crate) fn reshape_after(g: &mut Graph, x: &str, prefix: &str, rest: &[i64]) -> String {
    let shape = shape_with(g, prefix, rest);
    g.op("Reshape", &[x, &shape], vec![])
}

/// A stride-1 3-D convolution with "same" zero padding (`kernel / 2` on
/// each side), as every convolution of the model.
///
/// # Shapes
/// - `weight`: `[C_out, C_in, kd, kh, kw]` (odd kernel sides)
/// - `x`: `[N, C_in, D, H, W]`, output `[N, C_out, D, H, W]`
pub(crate) fn conv(
    g: &mut Graph,
    name: &str,
    weight: Tensor<5>,
    bias: Option<Tensor<1>>,
    x: &str,
) -> Value {
    let [_, _, kd, kh, kw] = weight.dims();
    let kernel = [kd, kh, kw];
    if kernel.iter().any(|k| k % 2 == 0) {
        return Err(Error::Export {
            what: format!("convolution {name}"),
            reason: format!("kernel {kernel:?} has an even side (only odd 'same' kernels export)"),
        });
    }
    let pads: Vec<i64> = kernel.iter().chain(&kernel).map(|&k| int(k / 2)).collect();
    let weight = g.weight(&format!("{name}.weight"), weight)?;
    let mut inputs = vec![x.to_string(), weight];
    if let Some(bias) = bias {
        inputs.push(g.weight(&format!("{name}.bias"), bias)?);
    }
    let inputs: Vec<&str> = inputs.iter().map(String::as_str).collect();
    Ok(g.op(
        "Conv",
        &inputs,
        vec![
            attr_ints("kernel_shape", &kernel.map(int)),
            attr_ints("pads", &pads),
        ],
    ))
}

/// A burn [`Conv3d`] (the task encoder's convolutions, with bias), which
/// must be the stride-1 "same" convolution [`conv`] writes.
fn burn_conv(g: &mut Graph, name: &str, module: &Conv3d, x: &str) -> Value {
    check_same(name, module)?;
    conv(
        g,
        name,
        module.weight.val(),
        module.bias.as_ref().map(|b| b.val()),
        x,
    )
}

/// Whether `module` is a stride-1 "same" convolution, as [`conv`] writes.
fn check_same(name: &str, module: &Conv3d) -> Result<(), Error> {
    let same = module.kernel_size.map(|k| k / 2);
    let padded = match module.padding {
        PaddingConfig3d::Same => true,
        PaddingConfig3d::Valid => same == [0; 3],
        PaddingConfig3d::Explicit(d, h, w) => [d, h, w] == same,
    };
    if !padded || module.stride != [1; 3] || module.dilation != [1; 3] || module.groups != 1 {
        return Err(Error::Export {
            what: format!("convolution {name}"),
            reason: format!(
                "only stride-1 'same' convolutions export, found stride {:?}, dilation {:?}, groups {}, padding {:?}",
                module.stride, module.dilation, module.groups, module.padding
            ),
        });
    }
    Ok(())
}

/// Instance normalisation over each channel's voxels (affine or not), of
/// the norm's `channels` (all of them but where a unit is exported one
/// input channel at a time, see [`norm_relu_conv_channel`]).
///
/// # Shapes
/// - `x`: `[N, channels.len(), D, H, W]`, output the same
fn instance_norm(
    g: &mut Graph,
    name: &str,
    norm: &InstanceNorm,
    channels: Range<usize>,
    x: &str,
) -> Value {
    let c = channels.len();
    let (scale, bias) = match (&norm.gamma, &norm.beta) {
        (Some(gamma), Some(beta)) if norm.affine => (
            g.weight(
                &format!("{name}.gamma"),
                gamma.val().slice([channels.clone()]),
            )?,
            g.weight(&format!("{name}.beta"), beta.val().slice([channels]))?,
        ),
        _ => (
            g.constant(&format!("{name}.ones"), &[c], &vec![1.0; c]),
            g.constant(&format!("{name}.zeros"), &[c], &vec![0.0; c]),
        ),
    };
    Ok(g.op(
        "InstanceNormalization",
        &[x, &scale, &bias],
        vec![attr_float("epsilon", norm.epsilon as f32)],
    ))
}

/// InstanceNorm of the norm's `channels` (see [`instance_norm`]), then
/// ReLU.
fn norm_relu(
    g: &mut Graph,
    name: &str,
    norm: &InstanceNorm,
    channels: Range<usize>,
    x: &str,
) -> Value {
    let normed = instance_norm(g, name, norm, channels, x)?;
    Ok(g.op("Relu", &[&normed], vec![]))
}

/// A [`PreActConv`]: InstanceNorm, ReLU, 3x3x3 convolution.
fn pre_act_conv(g: &mut Graph, name: &str, unit: &PreActConv, x: &str) -> Value {
    let norm = &unit.norm;
    let x = norm_relu(g, &format!("{name}.norm"), norm, 0..norm.num_channels, x)?;
    conv(g, &format!("{name}.conv"), unit.conv.weight.val(), None, &x)
}

/// The task encoder's units: InstanceNorm, ReLU, then a burn convolution.
pub(crate) fn norm_relu_conv(
    g: &mut Graph,
    name: &str,
    norm: &InstanceNorm,
    module: &Conv3d,
    x: &str,
) -> Value {
    let x = norm_relu(g, &format!("{name}_norm"), norm, 0..norm.num_channels, x)?;
    burn_conv(g, name, module, &x)
}

/// The part of [`norm_relu_conv`] that reads input channel `channel`:
/// each of InstanceNorm, ReLU and the convolution's products acts on one
/// input channel, so the unit's output is the sum of these parts over its
/// input channels (the convolution's bias added once: where `bias`).
///
/// # Shapes
/// - `x`: `[N, 1, D, H, W]`, the input's channel `channel`; output
///   `[N, C_out, D, H, W]`
pub(crate) fn norm_relu_conv_channel(
    g: &mut Graph,
    name: &str,
    norm: &InstanceNorm,
    (module, channel, bias): (&Conv3d, usize, bool),
    x: &str,
) -> Value {
    check_same(name, module)?;
    let channels = channel..channel + 1;
    let x = norm_relu(
        g,
        &format!("{name}_norm.{channel}"),
        norm,
        channels.clone(),
        x,
    )?;
    let [out, _, kd, kh, kw] = module.weight.dims();
    let weight = module
        .weight
        .val()
        .slice([0..out, channels, 0..kd, 0..kh, 0..kw]);
    let bias = module.bias.as_ref().filter(|_| bias).map(|b| b.val());
    conv(g, &format!("{name}.{channel}"), weight, bias, &x)
}

/// A [`BasicBlock`]: `conv2(conv1(x)) + shortcut(x)`.
pub(crate) fn basic_block(g: &mut Graph, name: &str, block: &BasicBlock, x: &str) -> Value {
    let residual = match &block.shortcut {
        Some(shortcut) => pre_act_conv(g, &format!("{name}.shortcut"), shortcut, x)?,
        None => x.to_string(),
    };
    let y = pre_act_conv(g, &format!("{name}.conv1"), &block.conv1, x)?;
    let y = pre_act_conv(g, &format!("{name}.conv2"), &block.conv2, &y)?;
    Ok(add(g, &y, &residual))
}

/// A [`BlockStack`]: its basic blocks in order.
pub(crate) fn block_stack(g: &mut Graph, name: &str, stack: &BlockStack, x: &str) -> Value {
    let mut x = x.to_string();
    for (i, block) in stack.blocks.iter().enumerate() {
        x = basic_block(g, &format!("{name}.blocks.{i}"), block, &x)?;
    }
    Ok(x)
}

/// Max pooling over non-overlapping 2x2x2 blocks.
pub(crate) fn max_pool_2x(g: &mut Graph, x: &str) -> String {
    g.op(
        "MaxPool",
        &[x],
        vec![
            attr_ints("kernel_shape", &[2, 2, 2]),
            attr_ints("strides", &[2, 2, 2]),
        ],
    )
}

/// Trilinear upsampling with `align_corners` of `[N, C, d, h, w]` to
/// `[N, C, 2d, 2h, 2w]`.
pub(crate) fn upsample_2x(g: &mut Graph, x: &str) -> String {
    let scales = [1.0, 1.0, 2.0, 2.0, 2.0];
    let scales = g.constant("scales", &[5], &scales);
    g.op(
        "Resize",
        &[x, "", &scales],
        vec![
            attr_string("mode", "linear"),
            attr_string("coordinate_transformation_mode", "align_corners"),
        ],
    )
}

/// 3-D pixel shuffle by `s` of `[N, C * s³, d, h, w]` to `[N, C, d * s,
/// h * s, w * s]`: channel `c * s³ + i * s² + j * s + k` at `(z, y, x)`
/// moves to voxel `(z * s + i, y * s + j, x * s + k)` of channel `c`.
pub(crate) fn pixel_shuffle(
    g: &mut Graph,
    x: &str,
    channels: usize,
    low: [usize; 3],
    s: usize,
) -> String {
    let [d, h, w] = low.map(int);
    let (c, s) = (int(channels), int(s));
    let x = reshape(g, x, &[0, c, s, s, s, d, h, w]);
    let x = transpose(g, &x, &[0, 1, 5, 2, 6, 3, 7, 4]);
    reshape(g, &x, &[0, c, d * s, h * s, w * s])
}

/// The inverse of [`pixel_shuffle`]: `[N, C, D, H, W]` to `[N, C * s³,
/// D / s, H / s, W / s]`.
pub(crate) fn pixel_unshuffle(
    g: &mut Graph,
    x: &str,
    channels: usize,
    low: [usize; 3],
    s: usize,
) -> String {
    let [d, h, w] = low.map(int);
    let (c, s) = (int(channels), int(s));
    let x = reshape(g, x, &[0, c, d, s, h, s, w, s]);
    let x = transpose(g, &x, &[0, 1, 3, 5, 7, 2, 4, 6]);
    reshape(g, &x, &[0, c * s * s * s, d, h, w])
}

/// Mean of the trilinearly upsampled `features` under each mask, pooled at
/// low resolution with the adjoint of upsampling (as
/// [`foreground_mean`](crate::model::task_encoder::foreground_mean)): the
/// masks are carried to the low grid one axis at a time by matrix products
/// with the transposed interpolation matrices, then dotted with the
/// features and divided by `max(sum(mask), 1)`.
///
/// # Shapes
/// - `features`: `[B, C, d, h, w]` with `[d, h, w] = low`
/// - `masks`: `[B, K, D, H, W]` with `[D, H, W] = high`
/// - output: `[B, K, C]`
pub(crate) fn foreground_mean(
    g: &mut Graph,
    name: &str,
    features: &str,
    channels: usize,
    masks: &str,
    low: [usize; 3],
    high: [usize; 3],
) -> String {
    // Moving axis `a` last before its product: W is already last; then H,
    // then D. Each product maps the last axis from `high[a]` to `low[a]`.
    // Afterwards the spatial axes are in the order (w, h, d).
    let perms: [&[i64]; 3] = [&[], &[0, 1, 2, 4, 3], &[0, 1, 3, 4, 2]];
    let mut weights = masks.to_string();
    for (a, perm) in [2usize, 1, 0].into_iter().zip(perms) {
        if !perm.is_empty() {
            weights = transpose(g, &weights, perm);
        }
        // `[high, low]`, the forward interpolation matrix: right-multiplying
        // by it applies its transpose along the last axis.
        let matrix = interpolation_matrix(low[a], high[a]);
        let matrix = g.constant(&format!("{name}.adjoint_{a}"), &[high[a], low[a]], &matrix);
        weights = g.op("MatMul", &[&weights, &matrix], vec![]);
    }
    let [d, h, w] = low.map(int);
    let weights = transpose(g, &weights, &[0, 1, 4, 3, 2]);
    let weights = reshape(g, &weights, &[0, 0, d * h * w]);
    let features = reshape(g, features, &[0, int(channels), d * h * w]);
    // The features as they lie, channels first: tract reads them in place
    // for an `Einsum`, where a `MatMul` would need them transposed (a copy
    // of every voxel).
    let sums = g.op(
        "Einsum",
        &[&weights, &features],
        vec![attr_string("equation", "nkt,nct->nkc")],
    );

    let axes = g.ints("axes", &[2, 3, 4]);
    let counts = g.op("ReduceSum", &[masks, &axes], vec![attr_int("keepdims", 0)]);
    let one = g.scalar(1.0);
    let counts = g.op("Max", &[&counts, &one], vec![]);
    let counts = unsqueeze(g, &counts, &[2]);
    g.op("Div", &[&sums, &counts], vec![])
}

/// Layer normalisation over the last axis with `epsilon`.
fn layer_norm(g: &mut Graph, name: &str, norm: &LayerNorm, epsilon: f64, x: &str) -> Value {
    let gamma = g.weight(&format!("{name}.gamma"), norm.gamma.val())?;
    let mut inputs = vec![x.to_string(), gamma];
    if let Some(beta) = &norm.beta {
        inputs.push(g.weight(&format!("{name}.beta"), beta.val())?);
    }
    let inputs: Vec<&str> = inputs.iter().map(String::as_str).collect();
    Ok(g.op(
        "LayerNormalization",
        &inputs,
        vec![attr_int("axis", -1), attr_float("epsilon", epsilon as f32)],
    ))
}

/// A layer norm with burn's default epsilon (cross-attention, task
/// encoder, classifier head).
pub(crate) fn default_layer_norm(g: &mut Graph, name: &str, norm: &LayerNorm, x: &str) -> Value {
    layer_norm(g, name, norm, default_layer_norm_epsilon(), x)
}

/// `x W + b` over the last axis (burn stores `W` as `[d_in, d_out]`).
fn linear(g: &mut Graph, name: &str, layer: &Linear, x: &str) -> Value {
    let weight = g.weight(&format!("{name}.weight"), layer.weight.val())?;
    let y = g.op("MatMul", &[x, &weight], vec![]);
    Ok(match &layer.bias {
        Some(bias) => {
            let bias = g.weight(&format!("{name}.bias"), bias.val())?;
            add(g, &y, &bias)
        }
        None => y,
    })
}

/// Exact GELU, in burn's order of operations: `x (1 + erf(x / √2)) / 2`.
fn gelu(g: &mut Graph, x: &str) -> String {
    let sqrt2 = g.scalar(std::f32::consts::SQRT_2);
    let one = g.scalar(1.0);
    let two = g.scalar(2.0);
    let y = g.op("Div", &[x, &sqrt2], vec![]);
    let y = g.op("Erf", &[&y], vec![]);
    let y = add(g, &y, &one);
    let y = g.op("Mul", &[x, &y], vec![]);
    g.op("Div", &[&y, &two], vec![])
}

/// An [`Mlp`]: linear, GELU, linear.
pub(crate) fn mlp(g: &mut Graph, name: &str, mlp: &Mlp, x: &str) -> Value {
    let y = linear(g, &format!("{name}.fc1"), &mlp.fc1, x)?;
    let y = gelu(g, &y);
    linear(g, &format!("{name}.fc2"), &mlp.fc2, &y)
}

/// What a [`cross_attention`] unit reads.
#[derive(Clone, Copy)]
pub(crate) enum Context<'a> {
    /// Context tokens `[N, M, C]`, layer-normed by the unit, then each
    /// projected to a key and a value: the textbook form, and burn's.
    Tokens(&'a str),
    /// A level's voxels `[N, C, T]`, channels first, already normalised by
    /// [`channel_norm`] (no scale or shift yet), for few queries against
    /// many voxels (a class's `T + 1` tokens in the task encoder). The
    /// unit's context norm and the key and value projections move to the
    /// queries' side; see [`folded_attention`].
    NormalisedVoxels(&'a str),
}

/// How [`attention`] meets its context.
#[derive(Clone, Copy)]
enum Keys<'a> {
    /// Normed context tokens `[N, M, C]`, each projected to a key and a
    /// value.
    Projected(&'a str),
    /// Normalised voxels (see [`Context::NormalisedVoxels`]) and the norm
    /// whose scale and shift [`folded_attention`] folds into the weights.
    Folded {
        voxels: &'a str,
        norm: &'a LayerNorm,
    },
}

/// burn's multi-head attention of `query` tokens `[N, L, C]` over a
/// context met as `keys` says: per-head scaled dot products, softmax over
/// the context, output projection.
fn attention(
    g: &mut Graph,
    name: &str,
    mha: &MultiHeadAttention,
    query: &str,
    keys: Keys,
) -> Value {
    if mha.quiet_softmax {
        return Err(Error::Export {
            what: format!("attention {name}"),
            reason: "quiet softmax has no standard ONNX operator".into(),
        });
    }
    let (heads, dk) = (int(mha.n_heads), int(mha.d_k));
    // Project, split the heads and move them in front: `perm` picks the
    // order of (tokens, head width) after `[N, heads]`.
    let heads_of = |g: &mut Graph, part: &str, layer: &Linear, x: &str, perm: &[i64]| {
        let y = linear(g, &format!("{name}.{part}"), layer, x)?;
        let y = reshape(g, &y, &[0, 0, heads, dk]);
        Ok::<_, Error>(transpose(g, &y, perm))
    };
    let q = heads_of(g, "query", &mha.query, query, &[0, 2, 1, 3])?;
    let (out, value_bias) = match keys {
        Keys::Projected(context) => {
            let k = heads_of(g, "key", &mha.key, context, &[0, 2, 3, 1])?;
            let v = heads_of(g, "value", &mha.value, context, &[0, 2, 1, 3])?;
            let scores = g.op("MatMul", &[&q, &k], vec![]);
            let scale = g.scalar((mha.d_k as f32).sqrt());
            let scores = g.op("Div", &[&scores, &scale], vec![]);
            let weights = g.op("Softmax", &[&scores], vec![attr_int("axis", 3)]);
            (g.op("MatMul", &[&weights, &v], vec![]), None)
        }
        Keys::Folded { voxels, norm } => {
            let out = folded_attention(g, name, mha, norm, &q, voxels)?;
            (out, folded_value_bias(mha, norm))
        }
    };
    let out = transpose(g, &out, &[0, 2, 1, 3]);
    let out = reshape(g, &out, &[0, 0, int(mha.d_model)]);
    let out = match value_bias {
        Some(bias) => {
            let bias = g.weight(&format!("{name}.folded_value.bias"), bias)?;
            add(g, &out, &bias)
        }
        None => out,
    };
    linear(g, &format!("{name}.output"), &mha.output, &out)
}

/// `x` `[N, C, T]` normalised over its channels at each voxel, with burn's
/// default layer-norm epsilon and without scale or shift: the part of a
/// layer norm of the voxels' tokens that every cross-attention of a task
/// stage shares (each folds its own scale and shift into its weights, see
/// [`Context::NormalisedVoxels`]). Channels first, as the convolutions
/// leave them: no transposition of the level's voxels.
pub(crate) fn channel_norm(g: &mut Graph, x: &str) -> String {
    let mean_over_channels = |g: &mut Graph, x: &str| {
        g.op(
            "ReduceMean",
            &[x],
            vec![attr_ints("axes", &[1]), attr_int("keepdims", 1)],
        )
    };
    let mean = mean_over_channels(g, x);
    let centred = g.op("Sub", &[x, &mean], vec![]);
    let squares = g.op("Mul", &[&centred, &centred], vec![]);
    let variance = mean_over_channels(g, &squares);
    let epsilon = g.scalar(default_layer_norm_epsilon() as f32);
    let variance = add(g, &variance, &epsilon);
    let deviation = g.op("Sqrt", &[&variance], vec![]);
    g.op("Div", &[&centred, &deviation], vec![])
}

/// The heads' attention outputs `[N, heads, Q, d_k]` of the queries `q`
/// over `voxels` (see [`Context::NormalisedVoxels`]), before the value
/// bias ([`folded_value_bias`]). Per head, with `X̂` the normalised voxels
/// `[T, C]`, `γ` and `β` the context norm's scale and shift, `W` the
/// projections' columns of the head and `b` their biases, the context
/// tokens are `X̂ diag(γ) + β` and:
///
/// - the scores `q ((X̂ diag(γ) + β) Wk + bk)ᵀ / √d_k` are
///   `(q (diag(γ) Wk)ᵀ / √d_k) X̂ᵀ` plus a term that is the same for every
///   voxel of a query's row, which the softmax cancels;
/// - `softmax(..) ((X̂ diag(γ) + β) Wv + bv)` is
///   `(softmax(..) X̂) diag(γ) Wv + β Wv + bv`, since each row of the
///   softmax sums to one.
///
/// Equal in exact arithmetic. The products then cost `2 Q C T` per head
/// instead of `2 C d_k T` for the projections, fewer where `Q < d_k`; the
/// heads' queries are stacked into one product, so the voxels are read
/// once per product, in the layout the convolutions left them; no keys,
/// values or normed copies of every voxel are stored.
fn folded_attention(
    g: &mut Graph,
    name: &str,
    mha: &MultiHeadAttention,
    norm: &LayerNorm,
    q: &str,
    voxels: &str,
) -> Value {
    let (heads, dk) = (mha.n_heads, mha.d_k);
    let [c, _] = mha.key.weight.dims();
    // `diag(γ) W` as `[C, heads * d_k]`, viewed `[heads, d_k, C]` (keys)
    // or `[heads, C, d_k]` (values).
    let per_head = |layer: &Linear, axes: [usize; 3]| {
        let gamma = norm.gamma.val().reshape([c, 1]);
        (layer.weight.val() * gamma)
            .reshape([c, heads, dk])
            .permute(axes)
    };
    let key = g.weight(
        &format!("{name}.folded_key.weight"),
        per_head(&mha.key, [1, 2, 0]),
    )?;
    let value = g.weight(
        &format!("{name}.folded_value.weight"),
        per_head(&mha.value, [1, 0, 2]),
    )?;
    let scale = g.scalar((dk as f32).sqrt());
    let q = g.op("Div", &[q, &scale], vec![]);
    let q = g.op("MatMul", &[&q, &key], vec![]);
    // All heads' queries in one product: `[N, heads * Q, C]`.
    let q = reshape(g, &q, &[0, -1, int(c)]);
    let scores = g.op("MatMul", &[&q, voxels], vec![]);
    let weights = g.op("Softmax", &[&scores], vec![attr_int("axis", 2)]);
    // `weights · voxelsᵀ` without transposing the voxels (see
    // `foreground_mean`).
    let read = g.op(
        "Einsum",
        &[&weights, voxels],
        vec![attr_string("equation", "nqt,nct->nqc")],
    );
    let read = reshape(g, &read, &[0, int(heads), -1, int(c)]);
    Ok(g.op("MatMul", &[&read, &value], vec![]))
}

/// `β Wv + bv`, the value bias of [`folded_attention`] (absent where the
/// norm has no shift and the projection no bias).
fn folded_value_bias(mha: &MultiHeadAttention, norm: &LayerNorm) -> Option<Tensor<1>> {
    let shift = norm.beta.as_ref().map(|beta| {
        let [c, width] = mha.value.weight.dims();
        beta.val()
            .reshape([1, c])
            .matmul(mha.value.weight.val())
            .reshape([width])
    });
    let bias = mha.value.bias.as_ref().map(|bias| bias.val());
    match (shift, bias) {
        (Some(shift), Some(bias)) => Some(shift + bias),
        (shift, bias) => shift.or(bias),
    }
}

/// A [`FeedForward`] unit: `x + Mlp(LayerNorm(x))`.
pub(crate) fn feed_forward(g: &mut Graph, name: &str, unit: &FeedForward, x: &str) -> Value {
    let normed = layer_norm(g, &format!("{name}.norm"), &unit.norm, PRE_NORM_EPSILON, x)?;
    let y = mlp(g, &format!("{name}.mlp"), &unit.mlp, &normed)?;
    Ok(add(g, &y, x))
}

/// A [`SelfAttention`] unit: `x + Attention(LayerNorm(x))`.
pub(crate) fn self_attention(g: &mut Graph, name: &str, unit: &SelfAttention, x: &str) -> Value {
    let normed = layer_norm(g, &format!("{name}.norm"), &unit.norm, PRE_NORM_EPSILON, x)?;
    let y = attention(
        g,
        &format!("{name}.attention"),
        &unit.attention,
        &normed,
        Keys::Projected(&normed),
    )?;
    Ok(add(g, &y, x))
}

/// A [`CrossAttention`] unit: `x + Attention(LayerNorm(x),
/// LayerNorm'(context))`, the context in the form `context` names.
pub(crate) fn cross_attention(
    g: &mut Graph,
    name: &str,
    unit: &CrossAttention,
    x: &str,
    context: Context,
) -> Value {
    let query = default_layer_norm(g, &format!("{name}.norm_query"), &unit.norm_query, x)?;
    let norm = &unit.norm_context;
    let normed;
    let keys = match context {
        Context::Tokens(tokens) => {
            normed = default_layer_norm(g, &format!("{name}.norm_context"), norm, tokens)?;
            Keys::Projected(&normed)
        }
        Context::NormalisedVoxels(voxels) => Keys::Folded { voxels, norm },
    };
    let y = attention(
        g,
        &format!("{name}.attention"),
        &unit.attention,
        &query,
        keys,
    )?;
    Ok(add(g, &y, x))
}
