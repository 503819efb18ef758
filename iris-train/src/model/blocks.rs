//! The convolutional building block of the encoder and decoder: the
//! pre-activation residual `BasicBlock` of the reference (`conv_blocks.py`).
//!
//! One pre-activation unit is InstanceNorm (eps 1e-4, no affine), ReLU, then a
//! 3x3x3 convolution without bias (padding 1). A block is two units plus a
//! residual; when the channel count changes the residual is itself a
//! pre-activation unit.

use burn::nn::{InstanceNorm, InstanceNormConfig};
use burn::prelude::*;

use super::conv::{Conv3x3, Conv3x3Config, conv3x3};
use super::ops::instance_norm_relu;

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
    pub(crate) norm: InstanceNorm,
    pub(crate) conv: Conv3x3,
}

impl PreActConvConfig {
    /// Builds the unit with freshly initialised weights on `device`.
    pub fn init(&self, device: &Device) -> PreActConv {
        PreActConv {
            norm: InstanceNormConfig::new(self.channels_in)
                .with_epsilon(BLOCK_NORM_EPSILON)
                .with_affine(false)
                .init(device),
            conv: Conv3x3Config::new(self.channels_in, self.channels_out).init(device),
        }
    }
}

impl PreActConv {
    /// # Shapes
    /// - `x`: `[B, channels_in, D, H, W]`
    /// - output: `[B, channels_out, D, H, W]`
    pub fn forward(&self, x: Tensor<5>) -> Tensor<5> {
        self.conv.forward(instance_norm_relu(&self.norm, x))
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
    pub(crate) conv1: PreActConv,
    pub(crate) conv2: PreActConv,
    pub(crate) shortcut: Option<PreActConv>,
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
        let Some(shortcut) = &self.shortcut else {
            return self.conv2.forward(self.conv1.forward(x.clone())) + x;
        };
        let (norm, other) = (&self.conv1.norm, &shortcut.norm);
        if norm.affine || other.affine || norm.epsilon != other.epsilon {
            return self.conv2.forward(self.conv1.forward(x.clone())) + shortcut.forward(x);
        }
        // `conv1` and the shortcut normalise the same input identically
        // (instance norm, no affine parameters, same epsilon), so one
        // normalisation and one convolution with both weight sets stacked
        // serve both.
        let [channels_out, ..] = self.conv1.conv.weight.dims();
        let weight = Tensor::cat(
            vec![self.conv1.conv.weight.val(), shortcut.conv.weight.val()],
            0,
        );
        let both = conv3x3(instance_norm_relu(norm, x), weight);
        let residual = both.clone().narrow(1, channels_out, channels_out);
        self.conv2.forward(both.narrow(1, 0, channels_out)) + residual
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
    pub(crate) blocks: Vec<BasicBlock>,
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

    #[test]
    fn the_shared_normalisation_of_conv1_and_the_shortcut_changes_nothing() {
        let device = device().autodiff();
        let block = BasicBlockConfig::new(3, 5).init(&device);
        let shortcut = block.shortcut.as_ref().expect("channels change");
        let x = random([2, 3, 4, 5, 6], &device).require_grad();
        let upstream = random([2, 5, 4, 5, 6], &device);
        let fused = block.forward(x.clone());
        let separate =
            block.conv2.forward(block.conv1.forward(x.clone())) + shortcut.forward(x.clone());
        let difference = (fused.clone() - separate.clone())
            .abs()
            .max()
            .into_scalar::<f32>();
        assert!(difference < 1e-5, "outputs differ by {difference}");
        let grads_fused = (fused * upstream.clone()).sum().backward();
        let grads_separate = (separate * upstream).sum().backward();
        for (got, expected) in [
            (x.grad(&grads_fused), x.grad(&grads_separate)),
            (
                shortcut.conv.weight.val().grad(&grads_fused),
                shortcut.conv.weight.val().grad(&grads_separate),
            ),
            (
                block.conv1.conv.weight.val().grad(&grads_fused),
                block.conv1.conv.weight.val().grad(&grads_separate),
            ),
        ] {
            let (got, expected) = (got.expect("gradient"), expected.expect("gradient"));
            let scale = expected.clone().abs().max().into_scalar::<f32>();
            let difference = (got - expected).abs().max().into_scalar::<f32>();
            assert!(
                difference <= 1e-4 * scale,
                "gradients differ by {difference}"
            );
        }
    }
}
