//! The checkpoint's tensors onto the burn model: one function per block of
//! the reference code, named after it, each naming the keys it reads.

use std::collections::{BTreeMap, HashMap};

use burn::module::{Param, ParamId};
use burn::nn::attention::MultiHeadAttention;
use burn::nn::conv::Conv3d;
use burn::nn::{LayerNorm, Linear};
use burn::prelude::*;
use pytorch_reader::DType;

use crate::model::Iris;
use crate::model::attention::{CrossAttention, FeedForward, Mlp, SelfAttention};
use crate::model::blocks::{BasicBlock, BlockStack, PreActConv};
use crate::model::conv::Conv3x3;
use crate::model::decoder::FusionBlock;
use crate::model::task_encoder::{TaskEncoderStage, TaskQueryBlock};

/// The checkpoint's tensors, taken one by one.
pub(super) struct TensorSource<'a> {
    pub(super) tensors: HashMap<String, pytorch_reader::Tensor>,
    /// Keys taken so far, with the parameters they went to.
    pub(super) params: BTreeMap<String, Vec<ParamId>>,
    /// Elements taken so far.
    pub(super) parameters: usize,
    pub(super) device: &'a Device,
}

impl TensorSource<'_> {
    /// The values of `key` as `f32` (row-major), checked against `shape`.
    fn values(&mut self, key: &str, shape: &[usize]) -> Result<Vec<f32>, String> {
        let tensor = self
            .tensors
            .remove(key)
            .ok_or_else(|| format!("`{key}`: missing (expected shape {shape:?})"))?;
        if tensor.shape() != shape {
            return Err(format!(
                "`{key}`: expected shape {shape:?}, found {:?}",
                tensor.shape()
            ));
        }
        let bytes = tensor.read().map_err(|e| format!("`{key}`: {e}"))?;
        let values = to_f32(&bytes, tensor.dtype()).ok_or_else(|| {
            format!(
                "`{key}`: expected floating-point values, found {:?}",
                tensor.dtype()
            )
        })?;
        if let Some(bad) = values.iter().position(|v| !v.is_finite()) {
            return Err(format!("`{key}`: element {bad} is {}", values[bad]));
        }
        self.parameters += values.len();
        Ok(values)
    }

    fn tensor<const D: usize>(
        &mut self,
        key: &str,
        shape: [usize; D],
    ) -> Result<Tensor<D>, String> {
        let values = self.values(key, &shape)?;
        Ok(Tensor::from_data(
            TensorData::new(values, shape),
            self.device,
        ))
    }

    /// Sets `param` to `value`, loaded from the tensor `key` (trainable, so
    /// that a model imported onto an autodiff device can be tuned).
    fn set<const D: usize>(&mut self, param: &mut Param<Tensor<D>>, key: &str, value: Tensor<D>) {
        *param = Param::from_tensor(value);
        self.params
            .entry(key.to_string())
            .or_default()
            .push(param.id);
    }

    /// Replaces `param` by the tensor `key`, of the same shape.
    fn param<const D: usize>(
        &mut self,
        param: &mut Param<Tensor<D>>,
        key: &str,
    ) -> Result<(), String> {
        let shape: [usize; D] = param.lazy_shape().dims();
        let tensor = self.tensor(key, shape)?;
        self.set(param, key, tensor);
        Ok(())
    }

    /// Replaces `param` by the transpose of the 2-D tensor `key`.
    fn transposed(&mut self, param: &mut Param<Tensor<2>>, key: &str) -> Result<(), String> {
        let [rows, cols] = param.lazy_shape().dims();
        let tensor = self.tensor(key, [cols, rows])?.transpose();
        self.set(param, key, tensor);
        Ok(())
    }
}

fn to_f32(bytes: &[u8], dtype: DType) -> Option<Vec<f32>> {
    let values = match dtype {
        DType::F32 => bytes
            .chunks_exact(4)
            .map(|b| f32::from_ne_bytes([b[0], b[1], b[2], b[3]]))
            .collect(),
        DType::F64 => bytes
            .chunks_exact(8)
            .map(|b| f64::from_ne_bytes([b[0], b[1], b[2], b[3], b[4], b[5], b[6], b[7]]) as f32)
            .collect(),
        DType::F16 => bytes
            .chunks_exact(2)
            .map(|b| half::f16::from_ne_bytes([b[0], b[1]]).to_f32())
            .collect(),
        DType::BF16 => bytes
            .chunks_exact(2)
            .map(|b| half::bf16::from_ne_bytes([b[0], b[1]]).to_f32())
            .collect(),
        _ => return None,
    };
    Some(values)
}

// ---------------------------------------------------------------------------
// The mapping, one function per block (names as in the reference code)
// ---------------------------------------------------------------------------

/// Loads every parameter of `model` from `src`.
pub(super) fn load_model(model: &mut Iris, src: &mut TensorSource) -> Result<(), String> {
    let encoder = &mut model.encoder;
    src.param(&mut encoder.stem.weight, "encoder.inc.conv1.weight")?;
    load_basic_block(src, &mut encoder.stem_block, "encoder.inc.conv2")?;
    for (i, stage) in encoder.stages.iter_mut().enumerate() {
        // `conv.0` is the max pool.
        load_block_stack(src, stage, &format!("encoder.down{}.conv", i + 1), 1)?;
    }
    for (i, stage) in model.task_encoder.stages.iter_mut().enumerate() {
        load_task_stage(src, stage, &format!("task_embedding.{i}"))?;
    }
    let decoder = &mut model.decoder;
    for (i, up) in decoder.ups.iter_mut().enumerate() {
        load_block_stack(src, &mut up.blocks, &format!("decoder.up{}.conv", i + 1), 0)?;
    }
    for (i, fusion) in decoder.fusions.iter_mut().enumerate() {
        for (j, block) in fusion.blocks.iter_mut().enumerate() {
            load_fusion_block(
                src,
                block,
                &format!("decoder.prior_fuse.{i}.attn_layers.{j}"),
            )?;
        }
    }
    let head = &mut model.head;
    load_layer_norm(src, &mut head.norm, "out.norm")?;
    load_mlp(src, &mut head.mlp_1, "out.classifier_pred.0")?;
    load_mlp(src, &mut head.mlp_2, "out.classifier_pred.1")
}

/// `nn.Sequential` of BasicBlocks whose first block is `prefix.{first}`.
fn load_block_stack(
    src: &mut TensorSource,
    stack: &mut BlockStack,
    prefix: &str,
    first: usize,
) -> Result<(), String> {
    for (j, block) in stack.blocks.iter_mut().enumerate() {
        load_basic_block(src, block, &format!("{prefix}.{}", first + j))?;
    }
    Ok(())
}

/// `BasicBlock`: two pre-activation convolutions and, when the width
/// changes, a pre-activation shortcut (instance norms without weights).
fn load_basic_block(
    src: &mut TensorSource,
    block: &mut BasicBlock,
    prefix: &str,
) -> Result<(), String> {
    load_preact(src, &mut block.conv1, &format!("{prefix}.conv1"))?;
    load_preact(src, &mut block.conv2, &format!("{prefix}.conv2"))?;
    if let Some(shortcut) = &mut block.shortcut {
        load_preact(src, shortcut, &format!("{prefix}.shortcut"))?;
    }
    Ok(())
}

fn load_preact(src: &mut TensorSource, unit: &mut PreActConv, prefix: &str) -> Result<(), String> {
    load_conv3x3(src, &mut unit.conv, &format!("{prefix}.conv"))
}

fn load_conv3x3(src: &mut TensorSource, conv: &mut Conv3x3, prefix: &str) -> Result<(), String> {
    src.param(&mut conv.weight, &format!("{prefix}.weight"))
}

fn load_conv3d(src: &mut TensorSource, conv: &mut Conv3d, prefix: &str) -> Result<(), String> {
    src.param(&mut conv.weight, &format!("{prefix}.weight"))?;
    match &mut conv.bias {
        Some(bias) => src.param(bias, &format!("{prefix}.bias")),
        None => Ok(()),
    }
}

/// `TaskEncodingLayer_SubPixel`.
fn load_task_stage(
    src: &mut TensorSource,
    stage: &mut TaskEncoderStage,
    prefix: &str,
) -> Result<(), String> {
    src.param(&mut stage.queries, &format!("{prefix}.task_query"))?;
    for (j, block) in stage.blocks.iter_mut().enumerate() {
        load_task_query_block(src, block, &format!("{prefix}.attn_layers.{j}"))?;
    }
    load_layer_norm(
        src,
        &mut stage.norm_foreground,
        &format!("{prefix}.norm_foreground"),
    )?;
    load_layer_norm(src, &mut stage.norm_query, &format!("{prefix}.norm_query"))?;
    load_layer_norm(
        src,
        &mut stage.norm_combined,
        &format!("{prefix}.norm_combined"),
    )?;
    load_layer_norm(src, &mut stage.norm_post, &format!("{prefix}.norm_post"))?;
    // `expand`, `merge`, `squeeze` are (InstanceNorm3d, ReLU, Conv3d).
    load_conv3d(src, &mut stage.expand, &format!("{prefix}.expand.2"))?;
    load_conv3d(src, &mut stage.merge, &format!("{prefix}.merge.2"))?;
    load_conv3d(src, &mut stage.squeeze, &format!("{prefix}.squeeze.2"))?;
    load_position(
        src,
        &mut stage.position,
        &format!("{prefix}.pos_embed.embedding"),
    )
}

/// The learnable positional embedding, stored at its full size (128³ in the
/// release) and sliced to the window from the origin, as the reference
/// `LearnablePositionalEncoding3D` slices it for a smaller input.
fn load_position(
    src: &mut TensorSource,
    position: &mut Param<Tensor<5>>,
    key: &str,
) -> Result<(), String> {
    let window: [usize; 5] = position.lazy_shape().dims();
    let stored = src
        .tensors
        .get(key)
        .map(|tensor| tensor.shape().to_vec())
        .ok_or_else(|| {
            format!(
                "`{key}`: missing (expected shape [1, 1, D, H, W] covering {:?})",
                &window[2..]
            )
        })?;
    let fits = stored.len() == 5
        && stored[..2] == window[..2]
        && stored[2..].iter().zip(&window[2..]).all(|(s, w)| s >= w);
    if !fits {
        return Err(format!(
            "`{key}`: expected shape [1, 1, D, H, W] at least as large as the window {:?}, found \
             {stored:?} (choose a smaller window)",
            &window[2..]
        ));
    }
    let stored: [usize; 5] = [stored[0], stored[1], stored[2], stored[3], stored[4]];
    let full = src.tensor(key, stored)?;
    let sliced = full.slice([0..1, 0..1, 0..window[2], 0..window[3], 0..window[4]]);
    src.set(position, key, sliced);
    Ok(())
}

/// `TaskQueryAttentionBlock`.
fn load_task_query_block(
    src: &mut TensorSource,
    block: &mut TaskQueryBlock,
    prefix: &str,
) -> Result<(), String> {
    load_self_attention(
        src,
        &mut block.self_attention_1,
        &format!("{prefix}.query_attn_block_1"),
    )?;
    load_feed_forward(
        src,
        &mut block.feed_forward_1,
        &format!("{prefix}.query_ffn_1"),
    )?;
    load_cross_attention(
        src,
        &mut block.cross_attention,
        &format!("{prefix}.query_aggregate_block"),
    )?;
    load_feed_forward(
        src,
        &mut block.feed_forward_cross,
        &format!("{prefix}.query_aggregate_ffn"),
    )?;
    load_self_attention(
        src,
        &mut block.self_attention_2,
        &format!("{prefix}.query_attn_block_2"),
    )?;
    load_feed_forward(
        src,
        &mut block.feed_forward_2,
        &format!("{prefix}.query_ffn_2"),
    )
}

/// `MultiPriorAttentionBlock`.
fn load_fusion_block(
    src: &mut TensorSource,
    block: &mut FusionBlock,
    prefix: &str,
) -> Result<(), String> {
    load_cross_attention(
        src,
        &mut block.tokens_read_image,
        &format!("{prefix}.prior_aggregate_block"),
    )?;
    load_feed_forward(
        src,
        &mut block.tokens_feed_forward,
        &format!("{prefix}.prior_ffn"),
    )?;
    load_cross_attention(
        src,
        &mut block.image_read_tokens,
        &format!("{prefix}.feat_aggregate_block"),
    )?;
    load_feed_forward(
        src,
        &mut block.image_feed_forward,
        &format!("{prefix}.feat_ffn"),
    )?;
    load_self_attention(
        src,
        &mut block.tokens_self_attention,
        &format!("{prefix}.prior_attn_block"),
    )?;
    load_feed_forward(
        src,
        &mut block.tokens_feed_forward_2,
        &format!("{prefix}.prior_ffn_2"),
    )
}

/// `PreNorm(LayerNorm, Attention)`.
fn load_self_attention(
    src: &mut TensorSource,
    unit: &mut SelfAttention,
    prefix: &str,
) -> Result<(), String> {
    load_layer_norm(src, &mut unit.norm, &format!("{prefix}.norm"))?;
    load_attention(src, &mut unit.attention, &format!("{prefix}.fn.mha"))
}

/// `DualPreNorm(LayerNorm, LayerNorm, CrossAttention)`: `norm1` normalises
/// the queries, `norm2` the context.
fn load_cross_attention(
    src: &mut TensorSource,
    unit: &mut CrossAttention,
    prefix: &str,
) -> Result<(), String> {
    load_layer_norm(src, &mut unit.norm_query, &format!("{prefix}.norm1"))?;
    load_layer_norm(src, &mut unit.norm_context, &format!("{prefix}.norm2"))?;
    load_attention(src, &mut unit.attention, &format!("{prefix}.fn.mha"))
}

/// `PreNorm(LayerNorm, Mlp)`.
fn load_feed_forward(
    src: &mut TensorSource,
    unit: &mut FeedForward,
    prefix: &str,
) -> Result<(), String> {
    load_layer_norm(src, &mut unit.norm, &format!("{prefix}.norm"))?;
    load_mlp(src, &mut unit.mlp, &format!("{prefix}.fn"))
}

fn load_mlp(src: &mut TensorSource, mlp: &mut Mlp, prefix: &str) -> Result<(), String> {
    load_linear(src, &mut mlp.fc1, &format!("{prefix}.fc1"))?;
    load_linear(src, &mut mlp.fc2, &format!("{prefix}.fc2"))
}

fn load_linear(src: &mut TensorSource, linear: &mut Linear, prefix: &str) -> Result<(), String> {
    src.transposed(&mut linear.weight, &format!("{prefix}.weight"))?;
    match &mut linear.bias {
        Some(bias) => src.param(bias, &format!("{prefix}.bias")),
        None => Ok(()),
    }
}

fn load_layer_norm(
    src: &mut TensorSource,
    norm: &mut LayerNorm,
    prefix: &str,
) -> Result<(), String> {
    src.param(&mut norm.gamma, &format!("{prefix}.weight"))?;
    match &mut norm.beta {
        Some(beta) => src.param(beta, &format!("{prefix}.bias")),
        None => Ok(()),
    }
}

/// `nn.MultiheadAttention`: the packed `in_proj` `[3C, C]` holds the query,
/// key and value projections in that order.
fn load_attention(
    src: &mut TensorSource,
    attention: &mut MultiHeadAttention,
    prefix: &str,
) -> Result<(), String> {
    let dim = attention.d_model;
    let weight_key = format!("{prefix}.in_proj_weight");
    let bias_key = format!("{prefix}.in_proj_bias");
    let weight = src.tensor(&weight_key, [3 * dim, dim])?;
    let bias = src.tensor(&bias_key, [3 * dim])?;
    for (i, linear) in [
        &mut attention.query,
        &mut attention.key,
        &mut attention.value,
    ]
    .into_iter()
    .enumerate()
    {
        let rows = i * dim..(i + 1) * dim;
        let part = weight.clone().slice([rows.clone(), 0..dim]).transpose();
        src.set(&mut linear.weight, &weight_key, part);
        match &mut linear.bias {
            Some(b) => src.set(b, &bias_key, bias.clone().slice([rows])),
            None => return Err(format!("`{bias_key}`: the model's projection has no bias")),
        }
    }
    load_linear(src, &mut attention.output, &format!("{prefix}.out_proj"))
}
