//! One step of Algorithm 1 ([`train_step`]), the seeds of its episodes
//! ([`episode_seed`]) and what it measures ([`StepStats`],
//! [`thresholded_dice`]).

use burn::optim::{GradientsParams, ModuleOptimizer};
use burn::prelude::*;
use ndarray::{Array3, Array4};

use crate::data::Episode;
use crate::error::Error;
use crate::loss::segmentation_loss;
use crate::model::{Iris, TaskTensors};

/// The seed of episode `index` of step `step` of a run seeded `seed`
/// (SplitMix64 of the three, so neighbouring steps get unrelated streams).
pub fn episode_seed(seed: u64, step: usize, index: usize) -> u64 {
    let mut x = seed;
    for v in [step as u64, index as u64] {
        x = splitmix64(x ^ splitmix64(v));
    }
    x
}

fn splitmix64(mut x: u64) -> u64 {
    x = x.wrapping_add(0x9e37_79b9_7f4a_7c15);
    x = (x ^ (x >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    x = (x ^ (x >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    x ^ (x >> 31)
}

/// What one training step measured.
#[derive(Clone, Debug, PartialEq)]
pub struct StepStats {
    /// The loss (adaptive Dice + BCE), averaged over the batch's episodes.
    pub loss: f32,
    /// Dice of the query predictions thresholded at probability 0.5,
    /// averaged over classes then episodes (a class empty in both
    /// prediction and target counts as 1).
    pub dice: f32,
    /// The learning rate the step used.
    pub learning_rate: f64,
}

/// What one step returns besides the updated model.
#[derive(Debug)]
pub struct StepOutput {
    /// Loss, Dice and learning rate.
    pub stats: StepStats,
    /// Per episode, the task embedding of its reference (detached, on the
    /// plain device), for the memory bank.
    pub embeddings: Vec<TaskTensors>,
}

/// One step of Algorithm 1 on `episodes` (at least one, each at most the
/// patch size, sides multiples of 16): encode each reference, segment each
/// query, average the losses, backward, and one optimizer step with
/// learning rate `learning_rate`. `model` must live on an autodiff device.
///
/// # Errors
/// [`Error::Shape`] for episodes of the wrong shape,
/// [`Error::Diverged`] for a NaN or infinite loss (no step is taken).
pub fn train_step(
    model: Iris,
    optimizer: &mut ModuleOptimizer,
    learning_rate: f64,
    episodes: &[Episode],
) -> Result<(Iris, StepOutput), Error> {
    let device = model.devices().first().cloned().ok_or(Error::Config {
        field: "model",
        expected: "parameters on a device".into(),
        found: "none".into(),
    })?;
    let mut total: Option<Tensor<1>> = None;
    let mut embeddings = Vec::with_capacity(episodes.len());
    let mut dice = 0.0;
    for episode in episodes {
        let reference = image_tensor(&episode.reference_image, &device);
        let masks = masks_tensor(&episode.reference_masks, &device);
        let query = image_tensor(&episode.query_image, &device);
        let targets = masks_tensor(&episode.query_masks, &device);
        let embedding = model.encode_task(reference, masks)?;
        let logits = model.segment(query, &embedding)?;
        dice += thresholded_dice(logits.clone().detach(), targets.clone());
        let loss = segmentation_loss(logits, targets);
        total = Some(match total {
            Some(t) => t + loss,
            None => loss,
        });
        embeddings.push(TaskTensors {
            stages: embedding.stages.into_iter().map(Tensor::inner).collect(),
        });
    }
    let Some(total) = total else {
        return Err(Error::Shape {
            tensor: "episodes",
            expected: "at least one episode".into(),
            found: "none".into(),
        });
    };
    let n = episodes.len() as f32;
    let loss = total / n;
    let loss_value: f32 = loss.clone().into_scalar();
    if !loss_value.is_finite() {
        return Err(Error::Diverged { loss: loss_value });
    }
    let grads = GradientsParams::from_grads(loss.backward(), &model);
    let model = optimizer.step(learning_rate, model, grads);
    Ok((
        model,
        StepOutput {
            stats: StepStats {
                loss: loss_value,
                dice: dice / n,
                learning_rate,
            },
            embeddings,
        },
    ))
}

/// `[D, H, W]` to a `[1, 1, D, H, W]` tensor.
pub(super) fn image_tensor(image: &Array3<f32>, device: &Device) -> Tensor<5> {
    let (d, h, w) = image.dim();
    let values: Vec<f32> = image.iter().copied().collect();
    Tensor::from_data(TensorData::new(values, [1, 1, d, h, w]), device)
}

/// `[K, D, H, W]` 0/1 masks to a `[1, K, D, H, W]` float tensor.
pub(super) fn masks_tensor(masks: &Array4<u8>, device: &Device) -> Tensor<5> {
    let (k, d, h, w) = masks.dim();
    let values: Vec<f32> = masks.iter().map(|&m| f32::from(m.min(1))).collect();
    Tensor::from_data(TensorData::new(values, [1, k, d, h, w]), device)
}

/// Mean over classes of the Dice of `logits > 0` (probability > 0.5)
/// against `targets`, both `[1, K, D, H, W]`; 1 for a class empty in both.
pub fn thresholded_dice(logits: Tensor<5>, targets: Tensor<5>) -> f32 {
    let [b, k, d, h, w] = logits.dims();
    let predicted = logits.greater_elem(0.0).float().reshape([b * k, d * h * w]);
    let targets = targets.reshape([b * k, d * h * w]);
    let sum = |t: Tensor<2>| -> Vec<f32> { t.sum_dim(1).into_data().iter::<f32>().collect() };
    let overlap = sum(predicted.clone() * targets.clone());
    let sizes: Vec<f32> = sum(predicted)
        .into_iter()
        .zip(sum(targets))
        .map(|(p, t)| p + t)
        .collect();
    let scores = overlap
        .iter()
        .zip(&sizes)
        .map(|(&o, &s)| if s == 0.0 { 1.0 } else { 2.0 * o / s });
    scores.sum::<f32>() / (b * k).max(1) as f32
}
