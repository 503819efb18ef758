//! The model's task embedding as burn tensors ([`TaskTensors`]), and its
//! conversions to and from `iris-core`'s stored form
//! ([`iris_core::embedding::TaskEmbedding`], what `.irisemb` files, the
//! memory bank and the engine hold).
//!
//! Both hold, per class and task level (deepest first), the `T + 1`
//! tokens of `C_level` values, token-major; [`TaskTensors`] keeps them as
//! one `[B, K, T + 1, C_level]` tensor per level, `iris-core` as one
//! `(T + 1) * C_level` vector per class and level, with the class's label,
//! name and provenance, the model's fingerprint and the preprocessing.

use burn::prelude::*;
use iris_core::embedding::{
    ClassEmbedding, ModelFingerprint, Preprocessing, Provenance, StageShape, TaskEmbedding,
};

/// A task embedding as the model computes it: for each level the task
/// encoder reads, deepest first, the tokens `[B, K, T + 1, C_level]` of `K`
/// classes (`T` query tokens, then the foreground token at index `T`).
///
/// It is a plain value: it can be stored ([`TaskTensors::to_core`], one
/// `[T + 1, C]` array per level and class), averaged over several
/// references, or optimised on its own. Not to be confused with
/// [`iris_core::embedding::TaskEmbedding`], the stored form, which
/// [`TaskTensors::from_core`] turns back into tensors.
#[derive(Clone, Debug)]
pub struct TaskTensors {
    /// Tokens per level, deepest (1/16) first: `[B, K, T + 1, C_level]`.
    pub stages: Vec<Tensor<4>>,
}

impl TaskTensors {
    /// Number of classes `K`.
    pub fn num_classes(&self) -> usize {
        self.stages.first().map_or(0, |tokens| tokens.dims()[1])
    }

    /// The embedding of the classes `indices` (in that order), e.g. to
    /// segment a subset or to reorder classes.
    ///
    /// # Panics
    /// If an index is `>= self.num_classes()`.
    pub fn select_classes(&self, indices: &[usize]) -> Self {
        let stages = self
            .stages
            .iter()
            .map(|tokens| {
                let device = tokens.device();
                let indices: Vec<i64> = indices.iter().map(|&i| i as i64).collect();
                let indices = Tensor::<1, Int>::from_data(
                    TensorData::new(indices.clone(), [indices.len()]),
                    &device,
                );
                tokens.clone().select(1, indices)
            })
            .collect();
        Self { stages }
    }

    /// An `iris-core` task embedding as tensors on `device`, batch 1,
    /// classes in the embedding's order: per level (deepest first)
    /// `[1, K, T + 1, C_level]`, from each class's token-major
    /// `(T + 1) * C_level` values. The inverse of [`TaskTensors::to_core`]
    /// (labels, names, provenance, fingerprint and preprocessing are not
    /// tensors and stay behind).
    pub fn from_core(embedding: &TaskEmbedding, device: &Device) -> Self {
        let classes = embedding.classes();
        let stages = embedding
            .stage_shapes()
            .iter()
            .enumerate()
            .map(|(level, shape)| {
                let values: Vec<f32> = classes
                    .iter()
                    .flat_map(|class| class.stages()[level].iter().copied())
                    .collect();
                let dims = [
                    1,
                    classes.len(),
                    shape.tokens as usize,
                    shape.channels as usize,
                ];
                Tensor::from_data(TensorData::new(values, dims), device)
            })
            .collect();
        TaskTensors { stages }
    }

    /// The values of batch item 0 per class and level: `out[k][level]`
    /// holds the `(T + 1) * C_level` values of class `k`, token-major (the
    /// layout of [`ClassEmbedding::stages`]). Detached from any graph.
    pub fn class_stages(&self) -> Vec<Vec<Vec<f32>>> {
        let classes = self.num_classes();
        let mut out = vec![Vec::with_capacity(self.stages.len()); classes];
        for level in &self.stages {
            let [_, k, tokens, channels] = level.dims();
            let values: Vec<f32> = level
                .clone()
                .detach()
                .narrow(0, 0, 1)
                .reshape([k * tokens * channels])
                .into_data()
                .iter::<f32>()
                .collect();
            for (class, chunk) in out.iter_mut().zip(values.chunks_exact(tokens * channels)) {
                class.push(chunk.to_vec());
            }
        }
        out
    }

    /// Batch item 0 as an `iris-core` task embedding of the model
    /// `model`, for queries prepared as `preprocessing` says, with levels
    /// of `stage_shapes` (the model's, [`IrisConfig::stage_shapes`](super::IrisConfig::stage_shapes)):
    /// class `k` gets the label, name and provenance of `classes[k]`, which
    /// are taken in order, one per class, and no further than the first
    /// class that fails.
    ///
    /// # Errors
    /// [`iris_core::Error::ShapeMismatch`] when `classes` does not give one
    /// entry per class (then none is taken) or the levels do not match
    /// `stage_shapes`; as [`ClassEmbedding::new`] (a name too long, NaN or
    /// infinite values) and [`TaskEmbedding::new`] (labels used twice, bad
    /// preprocessing).
    pub fn to_core<N: Into<String>>(
        &self,
        model: ModelFingerprint,
        preprocessing: Preprocessing,
        stage_shapes: Vec<StageShape>,
        classes: impl IntoIterator<Item = (u32, N, Provenance), IntoIter: ExactSizeIterator>,
    ) -> Result<TaskEmbedding, iris_core::Error> {
        let classes = classes.into_iter();
        if classes.len() != self.num_classes() {
            return Err(iris_core::Error::ShapeMismatch {
                what: "classes of the task embedding".to_string(),
                expected: vec![classes.len()],
                found: vec![self.num_classes()],
            });
        }
        let classes = classes
            .zip(self.class_stages())
            .map(|((label, name, provenance), stages)| {
                ClassEmbedding::new(label, name, provenance, stages)
            })
            .collect::<Result<Vec<_>, _>>()?;
        TaskEmbedding::new(model, preprocessing, stage_shapes, classes)
    }
}
