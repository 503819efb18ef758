//! The task encoder (the reference's `TaskEncodingLayer_SubPixel`): turns a
//! reference image's features and one binary mask per class into a task
//! embedding, one `[T + 1, C]` token set per encoder level it reads.
//!
//! Per level (scale `s = 2^level`, channels `C`):
//! - **foreground token**: the mean, over the mask's voxels, of the features
//!   trilinearly upsampled (`align_corners`) to full resolution. Upsampling
//!   `U` is linear, so `sum(U F * m) / sum(m) = <F, U^T m> / sum(m)`: we pool
//!   the features at low resolution with the adjoint-upsampled mask and never
//!   build the `C x D x H x W` upsampled tensor (4.3 GB for the paper model).
//! - **context tokens**: IN, ReLU, 1x1 conv `C -> s³`, pixel shuffle to one
//!   full-resolution channel, concat the mask, IN, ReLU, 3x3x3 conv `2 -> 1`,
//!   add a learnable positional embedding the size of the patch, pixel
//!   unshuffle, IN, ReLU, 1x1 conv `s³ -> C`, add the features, flatten to
//!   `d * h * w` tokens.
//! - **queries**: `T` learnable queries followed by the foreground token
//!   (index `T`) go through blocks of self-attention, cross-attention to the
//!   context tokens and self-attention, each followed by a feed-forward unit.
//!
//! Classes are independent: class `k`'s tokens depend only on mask `k`.

use burn::module::Param;
use burn::nn::conv::{Conv3d, Conv3dConfig};
use burn::nn::{
    Initializer, InstanceNorm, InstanceNormConfig, LayerNorm, LayerNormConfig, PaddingConfig3d,
};
use burn::prelude::*;
use burn::tensor::activation::relu;

use super::attention::{AttentionConfig, CrossAttention, FeedForward, SelfAttention};
use super::ops::{pixel_shuffle_3d, pixel_unshuffle_3d, upsample_trilinear_adjoint};
use super::task_tensors::TaskTensors;

/// Configuration of the [`TaskEncoder`].
#[derive(Config, Debug)]
pub struct TaskEncoderConfig {
    /// Channels of the five encoder levels, full resolution first.
    pub channels: [usize; 5],
    /// Number of levels encoded, deepest first (paper: 3, i.e. 1/16, 1/8,
    /// 1/4).
    #[config(default = 3)]
    pub stages: usize,
    /// Largest reference patch `[D, H, W]` in voxels; sets the size of the
    /// learnable positional embedding.
    pub patch_size: [usize; 3],
    /// Learnable query tokens `T` per level (paper: 10).
    #[config(default = 10)]
    pub query_tokens: usize,
    /// Query attention blocks per level (paper: 2).
    #[config(default = 2)]
    pub blocks: usize,
    /// Width of one attention head.
    #[config(default = 32)]
    pub head_dim: usize,
    /// Feed-forward hidden width as a multiple of the token width.
    #[config(default = 4)]
    pub mlp_ratio: usize,
}

/// One query attention block: self-attention, cross-attention to the context
/// tokens, self-attention, each followed by a feed-forward unit (the
/// reference's `TaskQueryAttentionBlock`).
#[derive(Module, Debug)]
pub struct TaskQueryBlock {
    pub(crate) self_attention_1: SelfAttention,
    pub(crate) feed_forward_1: FeedForward,
    pub(crate) cross_attention: CrossAttention,
    pub(crate) feed_forward_cross: FeedForward,
    pub(crate) self_attention_2: SelfAttention,
    pub(crate) feed_forward_2: FeedForward,
}

impl TaskQueryBlock {
    fn new(config: &AttentionConfig, device: &Device) -> Self {
        Self {
            self_attention_1: config.self_attention(device),
            feed_forward_1: config.feed_forward(device),
            cross_attention: config.cross_attention(device),
            feed_forward_cross: config.feed_forward(device),
            self_attention_2: config.self_attention(device),
            feed_forward_2: config.feed_forward(device),
        }
    }

    /// # Shapes
    /// - `queries`: `[N, T + 1, C]`
    /// - `context`: `[N, M, C]`
    /// - output: `[N, T + 1, C]`
    pub fn forward(&self, queries: Tensor<3>, context: Tensor<3>) -> Tensor<3> {
        let x = self
            .feed_forward_1
            .forward(self.self_attention_1.forward(queries));
        let x = self
            .feed_forward_cross
            .forward(self.cross_attention.forward(x, context));
        self.feed_forward_2
            .forward(self.self_attention_2.forward(x))
    }
}

/// The task encoding of one encoder level.
#[derive(Module, Debug)]
pub struct TaskEncoderStage {
    /// Learnable queries `[T, C]`.
    pub(crate) queries: Param<Tensor<2>>,
    pub(crate) expand_norm: InstanceNorm,
    pub(crate) expand: Conv3d,
    pub(crate) merge_norm: InstanceNorm,
    pub(crate) merge: Conv3d,
    /// Learnable positional embedding `[1, 1, D, H, W]` (patch size).
    pub(crate) position: Param<Tensor<5>>,
    pub(crate) squeeze_norm: InstanceNorm,
    pub(crate) squeeze: Conv3d,
    pub(crate) norm_foreground: LayerNorm,
    pub(crate) norm_query: LayerNorm,
    pub(crate) norm_combined: LayerNorm,
    pub(crate) norm_post: LayerNorm,
    pub(crate) blocks: Vec<TaskQueryBlock>,
    /// Upsampling factor `s` from this level to full resolution.
    pub(crate) scale: usize,
}

impl TaskEncoderConfig {
    /// Builds the task encoder with freshly initialised weights on `device`.
    pub fn init(&self, device: &Device) -> TaskEncoder {
        TaskEncoder {
            stages: (0..self.stages)
                .map(|i| self.init_stage(4 - i, device))
                .collect(),
        }
    }

    fn init_stage(&self, level: usize, device: &Device) -> TaskEncoderStage {
        let dim = self.channels[level];
        let scale = 1usize << level;
        let sub = scale * scale * scale;
        let attention = AttentionConfig::new(dim)
            .with_head_dim(self.head_dim)
            .with_mlp_ratio(self.mlp_ratio);
        let norm = |channels| {
            InstanceNormConfig::new(channels)
                .with_affine(false)
                .init(device)
        };
        let [pd, ph, pw] = self.patch_size;
        TaskEncoderStage {
            queries: Initializer::XavierUniform { gain: 1.0 }.init_with(
                [self.query_tokens, dim],
                Some(dim),
                Some(self.query_tokens),
                device,
            ),
            expand_norm: norm(dim),
            expand: Conv3dConfig::new([dim, sub], [1, 1, 1]).init(device),
            merge_norm: norm(2),
            // Its bias is inert (the instance norm after the unshuffle
            // removes any constant) but kept, as in the reference, so the
            // parameters match the released model one to one.
            merge: Conv3dConfig::new([2, 1], [3, 3, 3])
                .with_padding(PaddingConfig3d::Explicit(1, 1, 1))
                .init(device),
            position: Initializer::Normal {
                mean: 0.0,
                std: 1.0,
            }
            .init([1, 1, pd, ph, pw], device),
            squeeze_norm: norm(sub),
            squeeze: Conv3dConfig::new([sub, dim], [1, 1, 1]).init(device),
            norm_foreground: LayerNormConfig::new(dim).init(device),
            norm_query: LayerNormConfig::new(dim).init(device),
            norm_combined: LayerNormConfig::new(dim).init(device),
            norm_post: LayerNormConfig::new(dim).init(device),
            blocks: (0..self.blocks)
                .map(|_| TaskQueryBlock::new(&attention, device))
                .collect(),
            scale,
        }
    }
}

/// Mean of the trilinearly upsampled `features` under each full-resolution
/// mask, computed at low resolution as `<F, U^T m> / max(sum(m), 1)`.
///
/// # Shapes
/// - `features`: `[B, C, d, h, w]`
/// - `masks`: `[B, K, D, H, W]` (values in `[0, 1]`)
/// - output: `[B, K, C]`
pub fn foreground_mean(features: Tensor<5>, masks: Tensor<5>) -> Tensor<3> {
    let [b, c, d, h, w] = features.dims();
    let [_, k, dd, hh, ww] = masks.dims();
    let counts = masks
        .clone()
        .reshape([b, k, dd * hh * ww])
        .sum_dim(2)
        .clamp_min(1.0);
    let weights = upsample_trilinear_adjoint(masks, [d, h, w]).reshape([b, k, d * h * w]);
    let features = features.reshape([b, c, d * h * w]).swap_dims(1, 2);
    weights.matmul(features) / counts
}

impl TaskEncoderStage {
    /// Encodes `K` masks of one reference at this level.
    ///
    /// # Shapes
    /// - `features`: `[B, C, d, h, w]` (this level's reference features)
    /// - `masks`: `[B, K, D, H, W]` with `D = d * s` etc. and `D, H, W` no
    ///   larger than the patch size
    /// - output: `[B, K, T + 1, C]`, foreground token last
    pub fn forward(&self, features: Tensor<5>, masks: Tensor<5>) -> Tensor<4> {
        let [b, c, d, h, w] = features.dims();
        let [_, k, dd, hh, ww] = masks.dims();
        let s = self.scale;
        let foreground = foreground_mean(features.clone(), masks.clone());

        // Context path: the shuffled features are shared by all K classes.
        let x = self
            .expand
            .forward(relu(self.expand_norm.forward(features.clone())));
        let x = pixel_shuffle_3d(x, s)
            .reshape([b, 1, dd * hh * ww])
            .repeat_dim(1, k)
            .reshape([b * k, 1, dd, hh, ww]);
        let masks = masks.reshape([b * k, 1, dd, hh, ww]);
        let merged = Tensor::cat(vec![x, masks], 1);
        let merged = super::conv::conv3d_forward(
            &self.merge,
            super::ops::instance_norm_relu(&self.merge_norm, merged),
        );
        let position = self.position.val().slice([0..1, 0..1, 0..dd, 0..hh, 0..ww]);
        let merged = pixel_unshuffle_3d(merged + position, s);
        let merged = self
            .squeeze
            .forward(relu(self.squeeze_norm.forward(merged)));
        let residual = features
            .reshape([b, 1, c * d * h * w])
            .repeat_dim(1, k)
            .reshape([b * k, c, d, h, w]);
        let context = (merged + residual)
            .reshape([b * k, c, d * h * w])
            .swap_dims(1, 2);

        // Queries: T learnable tokens, then the foreground token.
        let [t, _] = self.queries.dims();
        let queries = self
            .norm_query
            .forward(self.queries.val())
            .unsqueeze_dim::<3>(0)
            .repeat_dim(0, b * k);
        let foreground = self
            .norm_foreground
            .forward(foreground.reshape([b * k, 1, c]));
        let mut tokens = self
            .norm_combined
            .forward(Tensor::cat(vec![queries, foreground], 1));
        for block in &self.blocks {
            tokens = block.forward(tokens, context.clone());
        }
        self.norm_post.forward(tokens).reshape([b, k, t + 1, c])
    }
}

/// The task encoder: one [`TaskEncoderStage`] per encoded level, deepest
/// first.
#[derive(Module, Debug)]
pub struct TaskEncoder {
    pub(crate) stages: Vec<TaskEncoderStage>,
}

impl TaskEncoder {
    /// Number of encoded levels.
    pub fn num_stages(&self) -> usize {
        self.stages.len()
    }

    /// Encodes the reference masks into a [`TaskTensors`].
    ///
    /// # Shapes
    /// - `features`: the encoder's five levels, full resolution first
    ///   (see [`Encoder::forward`](super::encoder::Encoder::forward))
    /// - `masks`: `[B, K, D, H, W]`, the reference image's full-resolution
    ///   binary masks, one channel per class
    pub fn forward(&self, features: &[Tensor<5>], masks: Tensor<5>) -> TaskTensors {
        let stages = self
            .stages
            .iter()
            .enumerate()
            .map(|(i, stage)| stage.forward(features[4 - i].clone(), masks.clone()))
            .collect();
        TaskTensors { stages }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::ops::upsample_trilinear;
    use crate::model::testing::{device, max_abs_diff, random};

    /// Binary masks: voxels where a uniform draw exceeds `threshold`.
    fn masks(shape: [usize; 5], threshold: f64, device: &Device) -> Tensor<5> {
        random(shape, device).greater_elem(threshold).float()
    }

    /// The reference's foreground token: upsample the features to full
    /// resolution, then average them under each mask.
    fn naive_foreground_mean(features: Tensor<5>, masks: Tensor<5>) -> Tensor<3> {
        let [b, c, ..] = features.dims();
        let [_, k, d, h, w] = masks.dims();
        let full = upsample_trilinear(features, [d, h, w]).reshape([b, c, d * h * w]);
        let masks = masks.reshape([b, k, d * h * w]);
        let counts = masks.clone().sum_dim(2).clamp_min(1.0);
        masks.matmul(full.swap_dims(1, 2)) / counts
    }

    #[test]
    fn low_resolution_pooling_equals_upsample_then_pool() {
        let device = device();
        // Scale 4 on an anisotropic grid, two batches, three classes (one
        // empty, which divides by the clamped count 1).
        let features = random([2, 5, 4, 3, 2], &device);
        let mut masks = masks([2, 3, 16, 12, 8], 0.2, &device);
        masks = masks.slice_fill([0..1, 2..3, 0..16, 0..12, 0..8], 0.0);
        let fast = foreground_mean(features.clone(), masks.clone());
        let naive = naive_foreground_mean(features, masks);
        assert_eq!(fast.dims(), [2, 3, 5]);
        let diff = max_abs_diff(fast, naive);
        assert!(diff < 1e-5, "max abs difference {diff}");
    }

    #[test]
    fn low_resolution_pooling_equals_naive_at_scale_16() {
        let device = device();
        let features = random([1, 8, 2, 2, 2], &device);
        let masks = masks([1, 2, 32, 32, 32], 0.6, &device);
        let diff = max_abs_diff(
            foreground_mean(features.clone(), masks.clone()),
            naive_foreground_mean(features, masks),
        );
        assert!(diff < 1e-5, "max abs difference {diff}");
    }

    fn tiny_features(device: &Device) -> Vec<Tensor<5>> {
        let channels = [4, 8, 16, 32, 32];
        (0..5)
            .map(|l| {
                let side = 32 >> l;
                random([1, channels[l], side, side, side], device)
            })
            .collect()
    }

    #[test]
    fn task_embedding_has_t_plus_one_tokens_per_level() {
        let device = device();
        let encoder = TaskEncoderConfig::new([4, 8, 16, 32, 32], [32; 3]).init(&device);
        let embedding = encoder.forward(
            &tiny_features(&device),
            masks([1, 3, 32, 32, 32], 0.5, &device),
        );
        let dims: Vec<[usize; 4]> = embedding.stages.iter().map(Tensor::dims).collect();
        assert_eq!(dims, vec![[1, 3, 11, 32], [1, 3, 11, 32], [1, 3, 11, 16]]);
        assert_eq!(embedding.num_classes(), 3);
    }

    #[test]
    fn classes_are_encoded_independently() {
        let device = device();
        let encoder = TaskEncoderConfig::new([4, 8, 16, 32, 32], [32; 3])
            .with_blocks(1)
            .init(&device);
        let features = tiny_features(&device);
        let masks = masks([1, 3, 32, 32, 32], 0.3, &device);
        let together = encoder.forward(&features, masks.clone());
        for k in 0..3 {
            let alone = encoder.forward(&features, masks.clone().narrow(1, k, 1));
            let selected = together.select_classes(&[k]);
            for (a, b) in alone.stages.into_iter().zip(selected.stages) {
                let diff = max_abs_diff(a, b);
                assert!(diff < 1e-5, "class {k}: max abs difference {diff}");
            }
        }
    }
}
