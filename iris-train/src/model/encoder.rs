//! The image encoder (the reference's `UNet_Encoder`): a 3x3x3 stem
//! convolution and one [`BasicBlock`], then four stages of 2x max pooling and
//! a stack of basic blocks.

use burn::prelude::*;

use super::blocks::{BasicBlock, BasicBlockConfig, BlockStack, BlockStackConfig};
use super::conv::{Conv3x3, Conv3x3Config};
use super::ops::max_pool_2x;

/// Configuration of the [`Encoder`].
#[derive(Config, Debug)]
pub struct EncoderConfig {
    /// Channels of the five levels, full resolution first (paper:
    /// `[32, 64, 128, 256, 512]`).
    pub channels: [usize; 5],
    /// Basic blocks in each of the four pooled stages (paper: 2).
    #[config(default = 2)]
    pub blocks: usize,
}

/// Image encoder producing features at five resolutions.
#[derive(Module, Debug)]
pub struct Encoder {
    pub(crate) stem: Conv3x3,
    pub(crate) stem_block: BasicBlock,
    pub(crate) stages: Vec<BlockStack>,
}

impl EncoderConfig {
    /// Builds the encoder with freshly initialised weights on `device`.
    pub fn init(&self, device: &Device) -> Encoder {
        let c = self.channels;
        Encoder {
            stem: Conv3x3Config::new(1, c[0]).init(device),
            stem_block: BasicBlockConfig::new(c[0], c[0]).init(device),
            stages: (1..5)
                .map(|level| {
                    BlockStackConfig::new(c[level - 1], c[level], self.blocks).init(device)
                })
                .collect(),
        }
    }
}

impl Encoder {
    /// Encodes an image into features at full, 1/2, 1/4, 1/8 and 1/16
    /// resolution (in that order: index = level).
    ///
    /// # Shapes
    /// - `image`: `[B, 1, D, H, W]`, each of `D, H, W` divisible by 16
    /// - output: five tensors, level `l` being
    ///   `[B, channels[l], D / 2^l, H / 2^l, W / 2^l]`
    pub fn forward(&self, image: Tensor<5>) -> Vec<Tensor<5>> {
        let mut x = self.stem_block.forward(self.stem.forward(image));
        let mut levels = Vec::with_capacity(5);
        for stage in &self.stages {
            let next = stage.forward(max_pool_2x(x.clone()));
            levels.push(x);
            x = next;
        }
        levels.push(x);
        levels
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::testing::{device, random};

    #[test]
    fn encoder_returns_five_levels_full_resolution_first() {
        let device = device();
        let encoder = EncoderConfig::new([4, 8, 16, 32, 32]).init(&device);
        let levels = encoder.forward(random([2, 1, 32, 16, 48], &device));
        let dims: Vec<[usize; 5]> = levels.iter().map(Tensor::dims).collect();
        assert_eq!(
            dims,
            vec![
                [2, 4, 32, 16, 48],
                [2, 8, 16, 8, 24],
                [2, 16, 8, 4, 12],
                [2, 32, 4, 2, 6],
                [2, 32, 2, 1, 3],
            ]
        );
    }
}
