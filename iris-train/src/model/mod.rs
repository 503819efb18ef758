//! The Iris model: [`IrisConfig`] (sizes, with `paper`, `small` and `tiny`
//! presets) and [`Iris`] (encoder, task encoder, decoder, classifier head).
//!
//! One file per block, as in the released reference code:
//!
//! | file | block | reference |
//! |---|---|---|
//! | [`ops`] | trilinear upsampling and its adjoint, pixel (un)shuffle, max pool | `F.interpolate`, `pixel_ops.py` |
//! | [`conv`] | 3x3x3 convolution with a fast CPU path | `nn.Conv3d` |
//! | [`blocks`] | pre-activation `BasicBlock` | `conv_blocks.py` |
//! | [`attention`] | pre-norm self/cross-attention and feed-forward units | `attention_blocks.py` |
//! | [`encoder`] | image encoder, five levels | `encoder.py` |
//! | [`task_encoder`] | reference + masks to [`TaskTensors`] | `task_encoding.py` |
//! | [`task_tensors`] | the task embedding as tensors ([`TaskTensors`]), to and from `iris-core`'s stored form | |
//! | [`decoder`] | fusion layers, up blocks, classifier head | `decoder.py`, `fusion.py` |
//!
//! Data flow for one episode with `K` classes: `encoder(reference)` and
//! `task_encoder(features, masks)` give a [`TaskTensors`] (per task level
//! `[B, K, T + 1, C]`); `encoder(query)`, `decoder(features, embedding)` and
//! `head` give logits `[B, K, D, H, W]`.

pub mod attention;
pub mod blocks;
pub mod conv;
pub mod decoder;
pub mod encoder;
pub mod ops;
pub mod task_encoder;
pub mod task_tensors;

use burn::prelude::*;

use crate::Error;
use decoder::{ClassifierHead, ClassifierHeadConfig, Decoder, DecoderConfig};
use encoder::{Encoder, EncoderConfig};
use iris_core::embedding::StageShape;
use task_encoder::{TaskEncoder, TaskEncoderConfig};
pub use task_tensors::TaskTensors;

/// Total downsampling of the deepest level: patch sides must be multiples.
const DEEPEST_SCALE: usize = 16;

/// Sizes of an Iris model. Build one with [`IrisConfig::init`]; save it as
/// JSON next to the weights (`burn::config::Config::save`).
#[derive(Config, Debug)]
pub struct IrisConfig {
    /// Channels of the five encoder/decoder levels, full resolution first
    /// (paper: `[32, 64, 128, 256, 512]`).
    pub channels: [usize; 5],
    /// Window (patch) size `[D, H, W]` in voxels: the size of the learnable
    /// positional embeddings and the sliding window. Multiples of 16.
    pub patch_size: [usize; 3],
    /// Isotropic voxel spacing in mm that images are resampled to.
    pub spacing_mm: f64,
    /// Basic blocks per encoder stage and per decoder up block (paper: 2).
    #[config(default = 2)]
    pub blocks: usize,
    /// Learnable query tokens `T` per task level (paper: 10); the task
    /// embedding has `T + 1` tokens, the foreground token last.
    #[config(default = 10)]
    pub query_tokens: usize,
    /// Encoder levels turned into task tokens and fused in the decoder,
    /// deepest first (paper: 3, i.e. 1/16, 1/8 and 1/4 resolution).
    #[config(default = 3)]
    pub task_stages: usize,
    /// Attention blocks per task-encoding level and per fusion layer
    /// (paper: 2).
    #[config(default = 2)]
    pub attention_blocks: usize,
    /// Width of one attention head: a level of width `C` has
    /// `max(C / head_dim, 1)` heads (paper: 32).
    #[config(default = 32)]
    pub head_dim: usize,
    /// Feed-forward hidden width as a multiple of the token width (paper: 4).
    #[config(default = 4)]
    pub mlp_ratio: usize,
}

impl IrisConfig {
    /// The released model: channels `[32, 64, 128, 256, 512]`, 128³ windows
    /// at 1.5 mm, about 120 M parameters.
    pub fn paper() -> Self {
        Self::new([32, 64, 128, 256, 512], [128; 3], 1.5)
    }

    /// A model for CPU training: channels `[8, 16, 32, 64, 128]`, 64³
    /// windows at 3 mm (192 mm, a whole adult brain in one or two windows).
    pub fn small() -> Self {
        Self::new([8, 16, 32, 64, 128], [64; 3], 3.0)
    }

    /// A very small model for tests: channels `[4, 8, 16, 32, 32]`, 32³
    /// windows at 6 mm.
    pub fn tiny() -> Self {
        Self::new([4, 8, 16, 32, 32], [32; 3], 6.0)
    }

    /// Channels of the task levels, deepest first (`T + 1` tokens of each
    /// width per class in a task embedding).
    pub fn task_channels(&self) -> Vec<usize> {
        (0..self.task_stages)
            .map(|i| self.channels[4 - i])
            .collect()
    }

    /// The task embedding's stages, deepest first: `T + 1` tokens of
    /// [`task_channels`](Self::task_channels) each (what the manifest and
    /// every `.irisemb` of this model record).
    pub fn stage_shapes(&self) -> Vec<StageShape> {
        self.task_channels()
            .into_iter()
            .map(|channels| StageShape {
                tokens: (self.query_tokens + 1) as u32,
                channels: channels as u32,
            })
            .collect()
    }

    /// Checks every field, naming the first one out of range.
    pub fn validate(&self) -> Result<(), Error> {
        let fail = |field, expected: &str, found: String| {
            Err(Error::Config {
                field,
                expected: expected.to_string(),
                found,
            })
        };
        if self.channels.contains(&0) {
            return fail("channels", "all positive", format!("{:?}", self.channels));
        }
        if self
            .patch_size
            .iter()
            .any(|&s| s == 0 || s % DEEPEST_SCALE != 0)
        {
            return fail(
                "patch_size",
                "positive multiples of 16 voxels",
                format!("{:?}", self.patch_size),
            );
        }
        if !(self.spacing_mm.is_finite() && self.spacing_mm > 0.0) {
            return fail(
                "spacing_mm",
                "a positive number of mm",
                self.spacing_mm.to_string(),
            );
        }
        if self.blocks == 0 {
            return fail("blocks", "at least 1", "0".into());
        }
        if self.query_tokens == 0 {
            return fail("query_tokens", "at least 1", "0".into());
        }
        if !(1..=5).contains(&self.task_stages) {
            return fail(
                "task_stages",
                "between 1 and 5",
                self.task_stages.to_string(),
            );
        }
        if self.head_dim == 0 || self.mlp_ratio == 0 {
            return fail(
                "head_dim, mlp_ratio",
                "both positive",
                format!("{}, {}", self.head_dim, self.mlp_ratio),
            );
        }
        for dim in self.task_channels() {
            let heads = (dim / self.head_dim).max(1);
            if dim % heads != 0 {
                return fail(
                    "channels",
                    "task-level widths divisible by their head count max(C / head_dim, 1)",
                    format!("{dim} with {heads} heads"),
                );
            }
        }
        Ok(())
    }

    /// Builds the model with freshly initialised weights on `device`
    /// (weights are created lazily, on first use).
    pub fn init(&self, device: &Device) -> Result<Iris, Error> {
        self.validate()?;
        let encoder = EncoderConfig::new(self.channels)
            .with_blocks(self.blocks)
            .init(device);
        let task_encoder = TaskEncoderConfig::new(self.channels, self.patch_size)
            .with_stages(self.task_stages)
            .with_query_tokens(self.query_tokens)
            .with_blocks(self.attention_blocks)
            .with_head_dim(self.head_dim)
            .with_mlp_ratio(self.mlp_ratio)
            .init(device);
        let decoder = DecoderConfig::new(self.channels)
            .with_blocks(self.blocks)
            .with_task_stages(self.task_stages)
            .with_fusion_blocks(self.attention_blocks)
            .with_head_dim(self.head_dim)
            .with_mlp_ratio(self.mlp_ratio)
            .init(device);
        let head = ClassifierHeadConfig::new(self.task_channels().iter().sum(), self.channels[0])
            .init(device);
        Ok(Iris {
            encoder,
            task_encoder,
            decoder,
            head,
            channels: self.channels,
            patch_size: self.patch_size,
            query_tokens: self.query_tokens,
        })
    }
}

/// The Iris model.
#[derive(Module, Debug)]
pub struct Iris {
    /// Image encoder (shared by reference and query).
    pub encoder: Encoder,
    /// Reference features + masks to task embedding.
    pub task_encoder: TaskEncoder,
    /// Query features + task embedding to full-resolution features.
    pub decoder: Decoder,
    /// Per-class weights dotted with the decoder's features.
    pub head: ClassifierHead,
    channels: [usize; 5],
    patch_size: [usize; 3],
    query_tokens: usize,
}

/// A query's encoder features ([`Iris::encode_query`]), one tensor per
/// level, ready to be decoded with any task embedding.
#[derive(Clone, Debug)]
pub struct QueryFeatures {
    levels: Vec<Tensor<5>>,
    batch: usize,
}

fn shape_error<const D: usize>(tensor: &'static str, expected: String, found: [usize; D]) -> Error {
    Error::Shape {
        tensor,
        expected,
        found: format!("{found:?}"),
    }
}

impl Iris {
    /// Checks that `image` is `[B, 1, D, H, W]` with `D, H, W` positive
    /// multiples of 16 no larger than the patch size.
    fn check_image(&self, tensor: &'static str, image: &Tensor<5>) -> Result<(), Error> {
        let dims = image.dims();
        let spatial_ok = dims[2..]
            .iter()
            .zip(self.patch_size)
            .all(|(&s, p)| s > 0 && s % DEEPEST_SCALE == 0 && s <= p);
        if dims[1] != 1 || !spatial_ok {
            return Err(shape_error(
                tensor,
                format!(
                    "[B, 1, D, H, W] with D, H, W multiples of 16 and at most {:?}",
                    self.patch_size
                ),
                dims,
            ));
        }
        Ok(())
    }

    /// Checks that `masks` is `[B, K, D, H, W]` (`K >= 1`) for the image
    /// shape `image = [B, 1, D, H, W]`.
    fn check_masks(&self, image: [usize; 5], masks: &Tensor<5>) -> Result<(), Error> {
        let m = masks.dims();
        if m[0] != image[0] || m[1] == 0 || m[2..] != image[2..] {
            return Err(shape_error(
                "reference masks",
                format!(
                    "[{}, K >= 1, {}, {}, {}]",
                    image[0], image[2], image[3], image[4]
                ),
                m,
            ));
        }
        Ok(())
    }

    /// Encodes a reference image and its `K` class masks into a task
    /// embedding.
    ///
    /// # Shapes
    /// - `reference`: `[B, 1, D, H, W]`, `D, H, W` multiples of 16 and at
    ///   most the patch size
    /// - `masks`: `[B, K, D, H, W]`, one binary (0/1) mask per class
    /// - output: per task level (deepest first) `[B, K, T + 1, C_level]`
    pub fn encode_task(
        &self,
        reference: Tensor<5>,
        masks: Tensor<5>,
    ) -> Result<TaskTensors, Error> {
        self.check_image("reference image", &reference)?;
        self.check_masks(reference.dims(), &masks)?;
        let features = self.encoder.forward(reference);
        Ok(self.task_encoder.forward(&features, masks))
    }

    /// Segments a query image with a task embedding: one logit map per class
    /// (sigmoid gives the probability of each class independently).
    ///
    /// # Shapes
    /// - `query`: `[B, 1, D, H, W]`, `D, H, W` multiples of 16 and at most the
    ///   patch size
    /// - `embedding`: per task level `[B, K, T + 1, C_level]`
    /// - output: logits `[B, K, D, H, W]`
    pub fn segment(&self, query: Tensor<5>, embedding: &TaskTensors) -> Result<Tensor<5>, Error> {
        self.check_image("query image", &query)?;
        self.check_embedding(query.dims()[0], embedding)?;
        let features = self.encoder.forward(query);
        Ok(self.decode(&features, embedding))
    }

    /// [`Iris::segment`] decoding `classes_per_forward` classes per decoder
    /// run, as the engine does (the manifest's `classes_per_forward`): the
    /// encoder runs once, the decoder once per group of classes, and the
    /// logits are concatenated in class order. Classes of one run attend
    /// to each other in the decoder, so whatever optimises an embedding
    /// for inference (in-context tuning) must decode in the same groups.
    ///
    /// # Errors
    /// As [`Iris::segment`]; [`Error::Config`] when `classes_per_forward`
    /// is 0.
    pub fn segment_grouped(
        &self,
        query: Tensor<5>,
        embedding: &TaskTensors,
        classes_per_forward: usize,
    ) -> Result<Tensor<5>, Error> {
        let features = self.encode_query(query)?;
        self.decode_grouped(&features, embedding, classes_per_forward)
    }

    /// Runs the encoder on a query `[B, 1, D, H, W]` (`D, H, W` multiples
    /// of 16, at most the patch size), for [`Iris::decode_grouped`]: the
    /// features do not depend on the task, so a query segmented with
    /// several embeddings (in-context tuning) is encoded once.
    ///
    /// # Errors
    /// [`Error::Shape`] for a query of another shape.
    pub fn encode_query(&self, query: Tensor<5>) -> Result<QueryFeatures, Error> {
        self.check_image("query image", &query)?;
        let batch = query.dims()[0];
        Ok(QueryFeatures {
            levels: self.encoder.forward(query),
            batch,
        })
    }

    /// The second half of [`Iris::segment_grouped`]: decodes encoded query
    /// features with `embedding`, `classes_per_forward` classes per decoder
    /// run, into logits `[B, K, D, H, W]`.
    ///
    /// # Errors
    /// [`Error::Shape`] for an embedding that does not fit the model or the
    /// query's batch; [`Error::Config`] when `classes_per_forward` is 0.
    pub fn decode_grouped(
        &self,
        features: &QueryFeatures,
        embedding: &TaskTensors,
        classes_per_forward: usize,
    ) -> Result<Tensor<5>, Error> {
        if classes_per_forward == 0 {
            return Err(Error::Config {
                field: "classes_per_forward",
                expected: "at least 1".into(),
                found: "0".into(),
            });
        }
        self.check_embedding(features.batch, embedding)?;
        let k = embedding.num_classes();
        let groups = (0..k)
            .step_by(classes_per_forward)
            .map(|first| {
                let n = classes_per_forward.min(k - first);
                let group = TaskTensors {
                    stages: embedding
                        .stages
                        .iter()
                        .map(|stage| stage.clone().narrow(1, first, n))
                        .collect(),
                };
                self.decode(&features.levels, &group)
            })
            .collect();
        Ok(Tensor::cat(groups, 1))
    }

    /// One episode: encodes the reference and its masks, then segments the
    /// query. Both images go through the encoder as one batch.
    ///
    /// # Shapes
    /// - `query`, `reference`: `[B, 1, D, H, W]` (same shape)
    /// - `masks`: `[B, K, D, H, W]`, the reference's class masks
    /// - output: query logits `[B, K, D, H, W]`
    pub fn forward(
        &self,
        query: Tensor<5>,
        reference: Tensor<5>,
        masks: Tensor<5>,
    ) -> Result<Tensor<5>, Error> {
        self.check_image("query image", &query)?;
        self.check_image("reference image", &reference)?;
        let q = query.dims();
        if reference.dims() != q {
            return Err(shape_error(
                "reference image",
                format!("{q:?} (the query's shape)"),
                reference.dims(),
            ));
        }
        self.check_masks(q, &masks)?;
        let batch = q[0];
        let features = self.encoder.forward(Tensor::cat(vec![query, reference], 0));
        let (query_features, reference_features): (Vec<_>, Vec<_>) = features
            .into_iter()
            .map(|level| {
                (
                    level.clone().narrow(0, 0, batch),
                    level.narrow(0, batch, batch),
                )
            })
            .unzip();
        let embedding = self.task_encoder.forward(&reference_features, masks);
        Ok(self.decode(&query_features, &embedding))
    }

    fn decode(&self, features: &[Tensor<5>], embedding: &TaskTensors) -> Tensor<5> {
        let (decoded, summaries) = self.decoder.forward(features, embedding);
        self.head.forward(decoded, summaries)
    }

    /// Checks an embedding against this model's task levels.
    fn check_embedding(&self, batch: usize, embedding: &TaskTensors) -> Result<(), Error> {
        let k = embedding.num_classes();
        let tokens = self.query_tokens + 1;
        let expected: Vec<[usize; 4]> = (0..self.task_encoder.num_stages())
            .map(|i| [batch, k, tokens, self.channels[4 - i]])
            .collect();
        let found: Vec<[usize; 4]> = embedding.stages.iter().map(Tensor::dims).collect();
        if k == 0 || found != expected {
            return Err(Error::Shape {
                tensor: "task embedding",
                expected: format!("{expected:?} (K >= 1)"),
                found: format!("{found:?}"),
            });
        }
        Ok(())
    }
}

/// Helpers shared by the unit tests of the model's modules.
#[cfg(test)]
pub(crate) mod testing {
    use burn::prelude::*;
    use burn::tensor::Distribution;

    /// The CPU test device, seeded for reproducible weights.
    pub fn device() -> Device {
        let device = Device::flex();
        device.seed(7);
        device
    }

    /// A tensor of uniform `[-1, 1)` values.
    pub fn random<const D: usize>(shape: [usize; D], device: &Device) -> Tensor<D> {
        Tensor::random(shape, Distribution::Uniform(-1.0, 1.0), device)
    }

    /// The tensor's values in row-major order.
    pub fn values<const D: usize>(tensor: Tensor<D>) -> Vec<f32> {
        tensor.into_data().try_to_vec::<f32>().expect("f32 tensor")
    }

    /// Largest absolute difference of two equally shaped tensors.
    pub fn max_abs_diff<const D: usize>(a: Tensor<D>, b: Tensor<D>) -> f32 {
        assert_eq!(a.dims(), b.dims());
        (a - b).abs().max().into_scalar()
    }
}
