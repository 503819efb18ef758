//! The decoder (the reference's `UNet_Decoder`, `MultiPriorFusionLayer` and
//! `HierarchyPriorClassifier`).
//!
//! Starting at 1/16 resolution it alternates task fusion and upsampling:
//! fuse at 1/16, up, fuse at 1/8, up, fuse at 1/4 (for three task levels),
//! then up to full resolution. A fusion layer lets the `K x (T + 1)` task
//! tokens of all classes read the image (cross-attention), the image read the
//! tokens, and the tokens attend to each other, so all classes are decoded in
//! one pass and can interact. An up block upsamples trilinearly
//! (`align_corners`) to the skip's size, concatenates `[skip, upsampled]` and
//! applies basic blocks. Finally token 0 of each fused level is
//! concatenated, normalised and mapped by two MLPs to a `channels[0]`-wide
//! weight per class, and the logits are the full-resolution features dotted
//! with that weight.

use burn::nn::{LayerNorm, LayerNormConfig};
use burn::prelude::*;

use super::attention::{
    AttentionConfig, CrossAttention, FeedForward, Mlp, MlpConfig, SelfAttention,
};
use super::blocks::{BlockStack, BlockStackConfig};
use super::ops::upsample_trilinear;
use super::task_tensors::TaskTensors;

/// Configuration of the [`Decoder`].
#[derive(Config, Debug)]
pub struct DecoderConfig {
    /// Channels of the five levels, full resolution first.
    pub channels: [usize; 5],
    /// Basic blocks per up block (paper: 2).
    #[config(default = 2)]
    pub blocks: usize,
    /// Levels fused with the task embedding, deepest first (paper: 3).
    #[config(default = 3)]
    pub task_stages: usize,
    /// Fusion blocks per fused level (paper: 2).
    #[config(default = 2)]
    pub fusion_blocks: usize,
    /// Width of one attention head.
    #[config(default = 32)]
    pub head_dim: usize,
    /// Feed-forward hidden width as a multiple of the token width.
    #[config(default = 4)]
    pub mlp_ratio: usize,
}

/// One bidirectional fusion block (the reference's
/// `MultiPriorAttentionBlock`).
#[derive(Module, Debug)]
pub struct FusionBlock {
    pub(crate) tokens_read_image: CrossAttention,
    pub(crate) tokens_feed_forward: FeedForward,
    pub(crate) image_read_tokens: CrossAttention,
    pub(crate) image_feed_forward: FeedForward,
    pub(crate) tokens_self_attention: SelfAttention,
    pub(crate) tokens_feed_forward_2: FeedForward,
}

impl FusionBlock {
    fn new(config: &AttentionConfig, device: &Device) -> Self {
        Self {
            tokens_read_image: config.cross_attention(device),
            tokens_feed_forward: config.feed_forward(device),
            image_read_tokens: config.cross_attention(device),
            image_feed_forward: config.feed_forward(device),
            tokens_self_attention: config.self_attention(device),
            tokens_feed_forward_2: config.feed_forward(device),
        }
    }

    /// # Shapes
    /// - `image`: `[B, N, C]` (flattened voxels)
    /// - `tokens`: `[B, K * (T + 1), C]`
    /// - output: `(image, tokens)` with the same shapes
    pub fn forward(&self, image: Tensor<3>, tokens: Tensor<3>) -> (Tensor<3>, Tensor<3>) {
        let tokens = self
            .tokens_feed_forward
            .forward(self.tokens_read_image.forward(tokens, image.clone()));
        let image = self
            .image_feed_forward
            .forward(self.image_read_tokens.forward(image, tokens.clone()));
        let tokens = self
            .tokens_feed_forward_2
            .forward(self.tokens_self_attention.forward(tokens));
        (image, tokens)
    }
}

/// The fusion of one decoder level with its task tokens.
#[derive(Module, Debug)]
pub struct FusionLayer {
    pub(crate) blocks: Vec<FusionBlock>,
}

impl FusionLayer {
    /// # Shapes
    /// - `x`: `[B, C, d, h, w]`
    /// - `tokens`: `[B, K, T + 1, C]`
    /// - output: `(x, tokens)` with the same shapes
    pub fn forward(&self, x: Tensor<5>, tokens: Tensor<4>) -> (Tensor<5>, Tensor<4>) {
        let [b, c, d, h, w] = x.dims();
        let [_, k, t, _] = tokens.dims();
        let mut image = x.reshape([b, c, d * h * w]).swap_dims(1, 2);
        let mut tokens = tokens.reshape([b, k * t, c]);
        for block in &self.blocks {
            (image, tokens) = block.forward(image, tokens);
        }
        (
            image.swap_dims(1, 2).reshape([b, c, d, h, w]),
            tokens.reshape([b, k, t, c]),
        )
    }
}

/// Upsample to the skip's size, concatenate `[skip, upsampled]`, basic
/// blocks.
#[derive(Module, Debug)]
pub struct UpBlock {
    pub(crate) blocks: BlockStack,
}

impl UpBlock {
    /// # Shapes
    /// - `x`: `[B, C_in, d, h, w]`
    /// - `skip`: `[B, C_out, D, H, W]`
    /// - output: `[B, C_out, D, H, W]`
    pub fn forward(&self, x: Tensor<5>, skip: Tensor<5>) -> Tensor<5> {
        let [_, _, d, h, w] = skip.dims();
        let x = upsample_trilinear(x, [d, h, w]);
        self.blocks.forward(Tensor::cat(vec![skip, x], 1))
    }
}

/// The decoder: fusion layers and up blocks.
#[derive(Module, Debug)]
pub struct Decoder {
    /// Fusion layers, deepest level first.
    pub(crate) fusions: Vec<FusionLayer>,
    /// Up blocks from level 4 to 3, 3 to 2, 2 to 1 and 1 to 0.
    pub(crate) ups: Vec<UpBlock>,
}

impl DecoderConfig {
    /// Builds the decoder with freshly initialised weights on `device`.
    pub fn init(&self, device: &Device) -> Decoder {
        let c = self.channels;
        let fusions = (0..self.task_stages)
            .map(|i| {
                let attention = AttentionConfig::new(c[4 - i])
                    .with_head_dim(self.head_dim)
                    .with_mlp_ratio(self.mlp_ratio);
                FusionLayer {
                    blocks: (0..self.fusion_blocks)
                        .map(|_| FusionBlock::new(&attention, device))
                        .collect(),
                }
            })
            .collect();
        let ups = (0..4)
            .rev()
            .map(|level| UpBlock {
                blocks: BlockStackConfig::new(c[level + 1] + c[level], c[level], self.blocks)
                    .init(device),
            })
            .collect();
        Decoder { fusions, ups }
    }
}

impl Decoder {
    /// Decodes the query features with the task embedding.
    ///
    /// # Shapes
    /// - `features`: the query's five encoder levels, full resolution first
    /// - `embedding`: `task_stages` levels `[B, K, T + 1, C_level]`, deepest
    ///   first
    /// - output: full-resolution features `[B, channels[0], D, H, W]` and,
    ///   per fused level (deepest first), the fused token 0 of every class
    ///   `[B, K, C_level]`
    pub fn forward(
        &self,
        features: &[Tensor<5>],
        embedding: &TaskTensors,
    ) -> (Tensor<5>, Vec<Tensor<3>>) {
        let mut x = features[4].clone();
        let mut summaries = Vec::with_capacity(self.fusions.len());
        for level in (0..5).rev() {
            if level < 4 {
                x = self.ups[3 - level].forward(x, features[level].clone());
            }
            let stage = 4 - level;
            if let (Some(fusion), Some(tokens)) =
                (self.fusions.get(stage), embedding.stages.get(stage))
            {
                let (fused, tokens) = fusion.forward(x, tokens.clone());
                x = fused;
                let [b, k, _, c] = tokens.dims();
                summaries.push(tokens.narrow(2, 0, 1).reshape([b, k, c]));
            }
        }
        (x, summaries)
    }
}

/// Configuration of the [`ClassifierHead`].
#[derive(Config, Debug)]
pub struct ClassifierHeadConfig {
    /// Width of the concatenated summaries (sum of the fused levels'
    /// channels; paper: 512 + 256 + 128 = 896).
    pub dim_in: usize,
    /// Channels of the full-resolution features (`channels[0]`).
    pub dim_out: usize,
}

/// Maps the fused token-0 summaries of each class to a per-class weight and
/// dots it with the full-resolution features.
#[derive(Module, Debug)]
pub struct ClassifierHead {
    pub(crate) norm: LayerNorm,
    pub(crate) mlp_1: Mlp,
    pub(crate) mlp_2: Mlp,
}

impl ClassifierHeadConfig {
    /// Builds the head with freshly initialised weights on `device`.
    pub fn init(&self, device: &Device) -> ClassifierHead {
        ClassifierHead {
            norm: LayerNormConfig::new(self.dim_in).init(device),
            mlp_1: MlpConfig::new(self.dim_in, self.dim_in, self.dim_out).init(device),
            mlp_2: MlpConfig::new(self.dim_out, self.dim_out, self.dim_out).init(device),
        }
    }
}

impl ClassifierHead {
    /// Per-class logits (apply a sigmoid per class for probabilities).
    ///
    /// # Shapes
    /// - `features`: `[B, dim_out, D, H, W]`
    /// - `summaries`: per fused level `[B, K, C_level]`, the `C_level`
    ///   summing to `dim_in`
    /// - output: `[B, K, D, H, W]`
    pub fn forward(&self, features: Tensor<5>, summaries: Vec<Tensor<3>>) -> Tensor<5> {
        let [b, c, d, h, w] = features.dims();
        let weights = self.mlp_2.forward(
            self.mlp_1
                .forward(self.norm.forward(Tensor::cat(summaries, 2))),
        );
        let [_, k, _] = weights.dims();
        weights
            .matmul(features.reshape([b, c, d * h * w]))
            .reshape([b, k, d, h, w])
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::testing::{device, random};

    #[test]
    fn decoder_and_head_shapes() {
        let device = device();
        let channels = [4, 8, 16, 32, 32];
        let decoder = DecoderConfig::new(channels).init(&device);
        let features: Vec<Tensor<5>> = (0..5)
            .map(|l| random([2, channels[l], 32 >> l, 16 >> l, 32 >> l], &device))
            .collect();
        let embedding = TaskTensors {
            stages: vec![
                random([2, 3, 11, 32], &device),
                random([2, 3, 11, 32], &device),
                random([2, 3, 11, 16], &device),
            ],
        };
        let (decoded, summaries) = decoder.forward(&features, &embedding);
        assert_eq!(decoded.dims(), [2, 4, 32, 16, 32]);
        let dims: Vec<[usize; 3]> = summaries.iter().map(Tensor::dims).collect();
        assert_eq!(dims, vec![[2, 3, 32], [2, 3, 32], [2, 3, 16]]);
        let head = ClassifierHeadConfig::new(80, 4).init(&device);
        assert_eq!(head.forward(decoded, summaries).dims(), [2, 3, 32, 16, 32]);
    }

    #[test]
    fn up_block_upsamples_to_the_skip() {
        let device = device();
        let up = UpBlock {
            blocks: BlockStackConfig::new(6 + 3, 3, 2).init(&device),
        };
        let out = up.forward(
            random([1, 6, 2, 3, 4], &device),
            random([1, 3, 4, 6, 8], &device),
        );
        assert_eq!(out.dims(), [1, 3, 4, 6, 8]);
    }
}
