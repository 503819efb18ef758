//! Transformer pieces shared by the task encoder and the decoder's fusion
//! layers, as in the reference's `attention_blocks.py`: pre-norm residual
//! self-attention, cross-attention and feed-forward units.
//!
//! Every unit returns `x + f(norm(x))`. Attention uses `dim / head_dim` heads
//! (at least one) with biases on all four projections (PyTorch's
//! `nn.MultiheadAttention`); the feed-forward network is `Linear(dim, ratio *
//! dim)`, exact (erf) GELU, `Linear(ratio * dim, dim)`.

use burn::nn::attention::{MhaInput, MultiHeadAttention, MultiHeadAttentionConfig};
use burn::nn::{LayerNorm, LayerNormConfig, Linear, LinearConfig};
use burn::prelude::*;
use burn::tensor::activation::gelu;

/// Epsilon of the layer norm in front of self-attention and feed-forward
/// units (the reference's `PreNorm`).
pub(crate) const PRE_NORM_EPSILON: f64 = 1e-4;

/// Sizes shared by all attention units of one feature width.
#[derive(Config, Debug)]
pub struct AttentionConfig {
    /// Token width (channels).
    pub dim: usize,
    /// Width of one attention head; the unit has `max(dim / head_dim, 1)`
    /// heads.
    #[config(default = 32)]
    pub head_dim: usize,
    /// Hidden width of the feed-forward network as a multiple of `dim`.
    #[config(default = 4)]
    pub mlp_ratio: usize,
}

impl AttentionConfig {
    /// Number of attention heads: `max(dim / head_dim, 1)`.
    pub fn heads(&self) -> usize {
        (self.dim / self.head_dim.max(1)).max(1)
    }

    fn attention(&self, device: &Device) -> MultiHeadAttention {
        MultiHeadAttentionConfig::new(self.dim, self.heads())
            .with_dropout(0.0)
            .init(device)
    }
}

/// Two linear layers with an exact GELU between them.
#[derive(Module, Debug)]
pub struct Mlp {
    pub(crate) fc1: Linear,
    pub(crate) fc2: Linear,
}

/// Configuration of an [`Mlp`].
#[derive(Config, Debug)]
pub struct MlpConfig {
    /// Input width.
    pub dim_in: usize,
    /// Hidden width.
    pub dim_hidden: usize,
    /// Output width.
    pub dim_out: usize,
}

impl MlpConfig {
    /// Builds the network with freshly initialised weights on `device`.
    pub fn init(&self, device: &Device) -> Mlp {
        Mlp {
            fc1: LinearConfig::new(self.dim_in, self.dim_hidden).init(device),
            fc2: LinearConfig::new(self.dim_hidden, self.dim_out).init(device),
        }
    }
}

impl Mlp {
    /// # Shapes
    /// - `x`: `[..., dim_in]`
    /// - output: `[..., dim_out]`
    pub fn forward<const D: usize>(&self, x: Tensor<D>) -> Tensor<D> {
        self.fc2.forward(gelu(self.fc1.forward(x)))
    }
}

/// `x + Mlp(LayerNorm(x))`.
#[derive(Module, Debug)]
pub struct FeedForward {
    pub(crate) norm: LayerNorm,
    pub(crate) mlp: Mlp,
}

/// `x + SelfAttention(LayerNorm(x))`.
#[derive(Module, Debug)]
pub struct SelfAttention {
    pub(crate) norm: LayerNorm,
    pub(crate) attention: MultiHeadAttention,
}

/// `x + CrossAttention(LayerNorm(x), LayerNorm'(context))`: the tokens `x`
/// query the `context` tokens (the reference's `DualPreNorm`, layer norms
/// with eps 1e-5).
#[derive(Module, Debug)]
pub struct CrossAttention {
    pub(crate) norm_query: LayerNorm,
    pub(crate) norm_context: LayerNorm,
    pub(crate) attention: MultiHeadAttention,
}

impl AttentionConfig {
    /// A pre-norm feed-forward unit of this width.
    pub fn feed_forward(&self, device: &Device) -> FeedForward {
        FeedForward {
            norm: LayerNormConfig::new(self.dim)
                .with_epsilon(PRE_NORM_EPSILON)
                .init(device),
            mlp: MlpConfig::new(self.dim, self.dim * self.mlp_ratio, self.dim).init(device),
        }
    }

    /// A pre-norm self-attention unit of this width.
    pub fn self_attention(&self, device: &Device) -> SelfAttention {
        SelfAttention {
            norm: LayerNormConfig::new(self.dim)
                .with_epsilon(PRE_NORM_EPSILON)
                .init(device),
            attention: self.attention(device),
        }
    }

    /// A pre-norm cross-attention unit of this width.
    pub fn cross_attention(&self, device: &Device) -> CrossAttention {
        CrossAttention {
            norm_query: LayerNormConfig::new(self.dim).init(device),
            norm_context: LayerNormConfig::new(self.dim).init(device),
            attention: self.attention(device),
        }
    }
}

impl FeedForward {
    /// # Shapes
    /// - `x`: `[B, N, dim]`
    /// - output: `[B, N, dim]`
    pub fn forward(&self, x: Tensor<3>) -> Tensor<3> {
        self.mlp.forward(self.norm.forward(x.clone())) + x
    }
}

impl SelfAttention {
    /// # Shapes
    /// - `x`: `[B, N, dim]`
    /// - output: `[B, N, dim]`
    pub fn forward(&self, x: Tensor<3>) -> Tensor<3> {
        let normed = self.norm.forward(x.clone());
        self.attention.forward(MhaInput::self_attn(normed)).context + x
    }
}

impl CrossAttention {
    /// # Shapes
    /// - `x`: `[B, N, dim]` (queries)
    /// - `context`: `[B, M, dim]` (keys and values)
    /// - output: `[B, N, dim]`
    pub fn forward(&self, x: Tensor<3>, context: Tensor<3>) -> Tensor<3> {
        let query = self.norm_query.forward(x.clone());
        let context = self.norm_context.forward(context);
        self.attention
            .forward(MhaInput::new(query, context.clone(), context))
            .context
            + x
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::testing::{device, max_abs_diff, random, values};

    #[test]
    fn heads_are_width_over_32_at_least_one() {
        assert_eq!(AttentionConfig::new(512).heads(), 16);
        assert_eq!(AttentionConfig::new(128).heads(), 4);
        assert_eq!(AttentionConfig::new(16).heads(), 1);
        assert_eq!(AttentionConfig::new(96).heads(), 3);
    }

    #[test]
    fn units_keep_token_shapes() {
        let device = device();
        let config = AttentionConfig::new(64);
        let x = random([2, 5, 64], &device);
        let context = random([2, 9, 64], &device);
        assert_eq!(
            config.feed_forward(&device).forward(x.clone()).dims(),
            [2, 5, 64]
        );
        assert_eq!(
            config.self_attention(&device).forward(x.clone()).dims(),
            [2, 5, 64]
        );
        assert_eq!(
            config.cross_attention(&device).forward(x, context).dims(),
            [2, 5, 64]
        );
    }

    #[test]
    fn mlp_uses_exact_gelu() {
        let device = device();
        // With both layers set to the identity the MLP is GELU itself.
        let identity = |_| {
            LinearConfig::new(1, 1)
                .with_initializer(burn::nn::Initializer::Ones)
                .with_bias(false)
                .init(&device)
        };
        let mlp = Mlp {
            fc1: identity(()),
            fc2: identity(()),
        };
        let x = Tensor::<2>::from_floats([[-1.0], [0.5], [2.0]], &device);
        // x * Phi(x) from the error function, not the tanh approximation.
        let expected = [-0.158_655_25f32, 0.345_731_23, 1.954_499_7];
        for (got, want) in values(mlp.forward(x)).iter().zip(expected) {
            assert!((got - want).abs() < 1e-5, "{got} vs {want}");
        }
    }

    #[test]
    fn self_attention_is_permutation_equivariant() {
        let device = device();
        let unit = AttentionConfig::new(32).self_attention(&device);
        let x = random([1, 4, 32], &device);
        let order = Tensor::<1, Int>::from_data(TensorData::from([2i64, 0, 3, 1]), &device);
        let permuted_after = unit.forward(x.clone()).select(1, order.clone());
        let permuted_before = unit.forward(x.select(1, order));
        assert!(max_abs_diff(permuted_after, permuted_before) < 1e-5);
    }
}
