//! The convolutional building block of the encoder and decoder: the
//! pre-activation residual `BasicBlock` of the reference (`conv_blocks.py`).
//!
//! One pre-activation unit is InstanceNorm (eps 1e-4, no affine), ReLU, then a
//! 3x3x3 convolution without bias (padding 1). A block is two units plus a
//! residual; when the channel count changes the residual is itself a
//! pre-activation unit.

use burn::nn::conv::{Conv3d, Conv3dConfig};
use burn::nn::{InstanceNorm, InstanceNormConfig, PaddingConfig3d};
use burn::prelude::*;
use burn::tensor::activation::relu;

/// Epsilon of every instance norm in the encoder and decoder blocks.
const BLOCK_NORM_EPSILON: f64 = 1e-4;

/// Configuration of a [`PreActConv`]: InstanceNorm, ReLU, 3x3x3 conv.
#[derive(Config, Debug)]
pub struct PreActConvConfig {
    /// Input channels.
    pub channels_in: usize,
    /// Output channels.
    pub channels_out: usize,
}

/// InstanceNorm (eps 1e-4, no affine), ReLU, 3x3x3 convolution (no bias,
/// padding 1).
#[derive(Module, Debug)]
pub struct PreActConv {
    norm: InstanceNorm,
    conv: Conv3d,
}

impl PreActConvConfig {
    /// Builds the unit with freshly initialised weights on `device`.
    pub fn init(&self, device: &Device) -> PreActConv {
        PreActConv {
            norm: InstanceNormConfig::new(self.channels_in)
                .with_epsilon(BLOCK_NORM_EPSILON)
                .with_affine(false)
                .init(device),
            conv: Conv3dConfig::new([self.channels_in, self.channels_out], [3, 3, 3])
                .with_padding(PaddingConfig3d::Explicit(1, 1, 1))
                .with_bias(false)
                .init(device),
        }
    }
}

impl PreActConv {
    /// # Shapes
    /// - `x`: `[B, channels_in, D, H, W]`
    /// - output: `[B, channels_out, D, H, W]`
    pub fn forward(&self, x: Tensor<5>) -> Tensor<5> {
        self.conv.forward(relu(self.norm.forward(x)))
    }
}

/// Configuration of a [`BasicBlock`].
#[derive(Config, Debug)]
pub struct BasicBlockConfig {
    /// Input channels.
    pub channels_in: usize,
    /// Output channels.
    pub channels_out: usize,
}

/// Pre-activation residual block: `conv2(conv1(x)) + shortcut(x)`, where the
/// shortcut is the identity when the channel count is unchanged and a
/// [`PreActConv`] otherwise.
#[derive(Module, Debug)]
pub struct BasicBlock {
    conv1: PreActConv,
    conv2: PreActConv,
    shortcut: Option<PreActConv>,
}

impl BasicBlockConfig {
    /// Builds the block with freshly initialised weights on `device`.
    pub fn init(&self, device: &Device) -> BasicBlock {
        let (cin, cout) = (self.channels_in, self.channels_out);
        BasicBlock {
            conv1: PreActConvConfig::new(cin, cout).init(device),
            conv2: PreActConvConfig::new(cout, cout).init(device),
            shortcut: (cin != cout).then(|| PreActConvConfig::new(cin, cout).init(device)),
        }
    }
}

impl BasicBlock {
    /// # Shapes
    /// - `x`: `[B, channels_in, D, H, W]`
    /// - output: `[B, channels_out, D, H, W]`
    pub fn forward(&self, x: Tensor<5>) -> Tensor<5> {
        let residual = match &self.shortcut {
            Some(shortcut) => shortcut.forward(x.clone()),
            None => x.clone(),
        };
        self.conv2.forward(self.conv1.forward(x)) + residual
    }
}

/// Configuration of a [`BlockStack`]: `count` basic blocks, the first from
/// `channels_in` to `channels_out`, the rest keeping `channels_out`.
#[derive(Config, Debug)]
pub struct BlockStackConfig {
    /// Input channels of the first block.
    pub channels_in: usize,
    /// Output channels of every block.
    pub channels_out: usize,
    /// Number of blocks (at least 1).
    pub count: usize,
}

/// A sequence of [`BasicBlock`]s: one encoder stage after its pooling, or one
/// decoder stage after its upsampling and skip concatenation.
#[derive(Module, Debug)]
pub struct BlockStack {
    blocks: Vec<BasicBlock>,
}

impl BlockStackConfig {
    /// Builds the stack with freshly initialised weights on `device`.
    pub fn init(&self, device: &Device) -> BlockStack {
        let blocks = (0..self.count.max(1))
            .map(|i| {
                let cin = if i == 0 {
                    self.channels_in
                } else {
                    self.channels_out
                };
                BasicBlockConfig::new(cin, self.channels_out).init(device)
            })
            .collect();
        BlockStack { blocks }
    }
}

impl BlockStack {
    /// # Shapes
    /// - `x`: `[B, channels_in, D, H, W]`
    /// - output: `[B, channels_out, D, H, W]`
    pub fn forward(&self, x: Tensor<5>) -> Tensor<5> {
        self.blocks.iter().fold(x, |x, block| block.forward(x))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::testing::{device, random};

    #[test]
    fn basic_block_keeps_size_and_changes_channels() {
        let device = device();
        let same = BasicBlockConfig::new(4, 4).init(&device);
        assert!(same.shortcut.is_none());
        assert_eq!(
            same.forward(random([2, 4, 4, 6, 8], &device)).dims(),
            [2, 4, 4, 6, 8]
        );
        let wider = BasicBlockConfig::new(4, 6).init(&device);
        assert!(wider.shortcut.is_some());
        assert_eq!(
            wider.forward(random([1, 4, 4, 4, 4], &device)).dims(),
            [1, 6, 4, 4, 4]
        );
        // Three convolutions of 4*6*27, 6*6*27 and 4*6*27 weights, no biases.
        assert_eq!(wider.num_params(), (24 + 36 + 24) * 27);
    }

    #[test]
    fn block_stack_has_count_blocks() {
        let device = device();
        let stack = BlockStackConfig::new(3, 5, 3).init(&device);
        assert_eq!(stack.blocks.len(), 3);
        assert_eq!(
            stack.forward(random([1, 3, 4, 4, 4], &device)).dims(),
            [1, 5, 4, 4, 4]
        );
    }
}
