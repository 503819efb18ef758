//! Episodic training, the paper's Algorithm 1: per step, `batch_size`
//! episodes (reference image + `K` masks, query image + `K` masks); the
//! reference goes through [`Iris::encode_task`], the query through
//! [`Iris::segment`] with that embedding, [`segmentation_loss`] (adaptive
//! Dice + BCE) against the query masks, backward, one LAMB step. After the
//! step each episode's (detached) task embedding updates the EMA
//! [`MemoryBank`].
//!
//! Everything a step does is a function of the weights, the optimizer
//! state, the step number and the seed: episode `b` of step `s` is drawn
//! from seed [`episode_seed`]`(seed, s, b)` (`seed` is
//! [`TrainingConfig::episode_stream_seed`]) and the learning rate is
//! [`TrainingConfig::learning_rate`]`(s)`, so a checkpoint needs only the
//! step to resume exactly (see [`crate::checkpoint`]).
//!
//! ```no_run
//! use std::path::Path;
//! use iris_train::data::atlas::{load_atlases, AtlasSource};
//! use iris_train::data::{EpisodeConfig, EpisodeSampler};
//! use iris_train::model::IrisConfig;
//! use iris_train::training::{Trainer, TrainingConfig};
//!
//! let model = IrisConfig::tiny();
//! let atlases = load_atlases(Path::new("data"), &AtlasSource::TRAINING, model.spacing_mm)?;
//! let sampler = EpisodeSampler::new(atlases, EpisodeConfig::new(model.patch_size))?;
//! let config = TrainingConfig::new(model, 100);
//! let mut trainer = Trainer::new(config, &iris_train::device::select_device())?;
//! while trainer.step() < 100 {
//!     let stats = trainer.train_with(&|seed| sampler.episode(seed))?;
//!     println!("step {}: loss {:.3}, Dice {:.3}", trainer.step(), stats.loss, stats.dice);
//! }
//! # Ok::<(), iris_train::Error>(())
//! ```

use burn::optim::{GradientsParams, LambConfig, ModuleOptimizer};
use burn::prelude::*;
use ndarray::{Array3, Array4};
use sha2::{Digest, Sha256};

use crate::bank::MemoryBank;
use crate::data::{Episode, EpisodeSampler, Task};
use crate::error::Error;
use crate::loss::segmentation_loss;
use crate::model::{Iris, IrisConfig};
use rand::SeedableRng;
use rand::rngs::ChaCha8Rng;

/// Everything that shapes a training run; saved as `config.json` in each
/// checkpoint (`burn::config::Config::save`).
#[derive(Config, Debug)]
pub struct TrainingConfig {
    /// The model's sizes.
    pub model: IrisConfig,
    /// Length of the learning-rate schedule in steps: warm-up, then cosine
    /// decay to `final_learning_rate` at this step (constant after it).
    pub schedule_steps: usize,
    /// Peak learning rate of LAMB (paper: 2e-3).
    #[config(default = 2e-3)]
    pub learning_rate: f64,
    /// Learning rate at the end of the schedule.
    #[config(default = 1e-5)]
    pub final_learning_rate: f64,
    /// Linear warm-up steps, from `learning_rate / warmup_steps` to
    /// `learning_rate`.
    #[config(default = 200)]
    pub warmup_steps: usize,
    /// LAMB weight decay.
    #[config(default = 1e-5)]
    pub weight_decay: f64,
    /// Episodes per step (losses averaged, one optimizer step).
    #[config(default = 1)]
    pub batch_size: usize,
    /// Seed of the weight initialisation and, unless `episode_seed` is
    /// set, of every episode.
    #[config(default = 0)]
    pub seed: u64,
    /// Seed of the episodes when it differs from `seed`: set by
    /// [`Trainer::reseed_episodes`] (a resumed run drawing a new episode
    /// stream from its current step on). `null` (or absent, in older
    /// configs): `seed`.
    #[config(default = "None")]
    pub episode_seed: Option<u64>,
    /// Momentum `a` of the EMA memory bank (paper 0.999, released code 0.99).
    #[config(default = 0.999)]
    pub bank_momentum: f64,
    /// The step at which [`Trainer::restart_schedule`] restarted the
    /// schedule, if it did: from it, cosine decay from `learning_rate` to
    /// `final_learning_rate` at `schedule_steps`, without warm-up. `null`
    /// (or absent, in older configs) for a run never restarted.
    #[config(default = "None")]
    pub schedule_start: Option<usize>,
}

impl TrainingConfig {
    /// The learning rate of step `step` (0-based): linear warm-up over
    /// `warmup_steps`, then cosine decay from `learning_rate` to
    /// `final_learning_rate` at `schedule_steps`, constant after it. After
    /// a restart the decay starts at `schedule_start` instead, with no
    /// warm-up. A pure function of the step, so resuming needs no
    /// scheduler state.
    pub fn learning_rate(&self, step: usize) -> f64 {
        let start = match self.schedule_start {
            Some(start) => start,
            None if step < self.warmup_steps => {
                return self.learning_rate * (step + 1) as f64 / self.warmup_steps as f64;
            }
            None => self.warmup_steps,
        };
        let decay = self.schedule_steps.saturating_sub(start).max(1);
        let t = step.saturating_sub(start).min(decay) as f64 / decay as f64;
        let (high, low) = (self.learning_rate, self.final_learning_rate);
        low + 0.5 * (high - low) * (1.0 + (std::f64::consts::PI * t).cos())
    }

    /// The seed episodes are drawn from: `episode_seed`, else `seed`.
    pub fn episode_stream_seed(&self) -> u64 {
        self.episode_seed.unwrap_or(self.seed)
    }

    /// Checks the fields (and the model's), naming the first one out of
    /// range.
    ///
    /// # Errors
    /// [`Error::Config`].
    pub fn validate(&self) -> Result<(), Error> {
        self.model.validate()?;
        let fail = |field, expected: &str, found: String| {
            Err(Error::Config {
                field,
                expected: expected.to_string(),
                found,
            })
        };
        let rate_ok = |r: f64| r.is_finite() && r >= 0.0;
        if !(rate_ok(self.learning_rate) && self.learning_rate > 0.0) {
            return fail(
                "learning_rate",
                "a positive number",
                self.learning_rate.to_string(),
            );
        }
        if !rate_ok(self.final_learning_rate) || !rate_ok(self.weight_decay) {
            return fail(
                "final_learning_rate, weight_decay",
                "finite and >= 0",
                format!("{}, {}", self.final_learning_rate, self.weight_decay),
            );
        }
        if self.batch_size == 0 {
            return fail("batch_size", "at least 1", "0".into());
        }
        if let Some(start) = self.schedule_start.filter(|&s| s >= self.schedule_steps) {
            return fail(
                "schedule_steps",
                &format!("more than the restart step {start}"),
                self.schedule_steps.to_string(),
            );
        }
        if !(0.0..=1.0).contains(&self.bank_momentum) {
            return fail(
                "bank_momentum",
                "within [0, 1]",
                self.bank_momentum.to_string(),
            );
        }
        Ok(())
    }

    /// The LAMB optimizer of this run.
    pub fn optimizer(&self) -> ModuleOptimizer {
        LambConfig::new()
            .with_weight_decay(self.weight_decay as f32)
            .init()
    }
}

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
    pub embeddings: Vec<crate::model::TaskTensors>,
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
        embeddings.push(crate::model::TaskTensors {
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
fn image_tensor(image: &Array3<f32>, device: &Device) -> Tensor<5> {
    let (d, h, w) = image.dim();
    let values: Vec<f32> = image.iter().copied().collect();
    Tensor::from_data(TensorData::new(values, [1, 1, d, h, w]), device)
}

/// `[K, D, H, W]` 0/1 masks to a `[1, K, D, H, W]` float tensor.
fn masks_tensor(masks: &Array4<u8>, device: &Device) -> Tensor<5> {
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

/// Mean thresholded Dice ([`thresholded_dice`]) of `model` over
/// `episodes`, each segmented from its own reference (one-shot), without
/// gradients; `None` for no episodes.
///
/// # Errors
/// [`Error::Shape`] for episodes of the wrong shape.
pub fn evaluate(model: &Iris, episodes: &[Episode]) -> Result<Option<f32>, Error> {
    let model = model.valid();
    let Some(device) = model.devices().first().cloned() else {
        return Ok(None);
    };
    let mut total = 0.0;
    for episode in episodes {
        let logits = model.forward(
            image_tensor(&episode.query_image, &device),
            image_tensor(&episode.reference_image, &device),
            masks_tensor(&episode.reference_masks, &device),
        )?;
        total += thresholded_dice(logits, masks_tensor(&episode.query_masks, &device));
    }
    Ok((!episodes.is_empty()).then(|| total / episodes.len() as f32))
}

/// Fixed evaluation episodes on classes held out of training: for up to
/// `count` held-out classes (in source order) with at least `min_voxels`
/// voxels in a subject, one single-class episode drawn from seed
/// `seed + i` (reference and query: two draws of that subject). The same
/// arguments give the same episodes, so evaluations along a run compare.
///
/// # Errors
/// [`Error::Dataset`] or [`Error::Core`] if an episode cannot be generated.
pub fn held_out_episodes(
    sampler: &EpisodeSampler,
    count: usize,
    min_voxels: usize,
    seed: u64,
) -> Result<Vec<Episode>, Error> {
    let mut tasks = Vec::new();
    for (s, source) in sampler.sources().iter().enumerate() {
        for class in source.classes().iter().filter(|c| c.held_out) {
            let subject = source.subjects().iter().position(|subject| {
                subject
                    .stats(class.label)
                    .is_some_and(|st| st.voxels >= min_voxels)
            });
            if let Some(subject) = subject {
                tasks.push(Task {
                    source: s,
                    reference_subject: subject,
                    query_subject: subject,
                    labels: vec![class.label],
                    classes: vec![class.key.clone()],
                });
            }
        }
    }
    tasks
        .iter()
        .take(count)
        .enumerate()
        .map(|(i, task)| {
            let mut rng = ChaCha8Rng::seed_from_u64(seed.wrapping_add(i as u64));
            sampler.generate(task, &mut rng)
        })
        .collect()
}

/// A training run in progress: the model (on an autodiff device), LAMB's
/// state, the memory bank and the number of steps done.
pub struct Trainer {
    pub(crate) config: TrainingConfig,
    pub(crate) model: Iris,
    pub(crate) optimizer: ModuleOptimizer,
    pub(crate) bank: MemoryBank,
    pub(crate) step: usize,
}

impl Trainer {
    /// A fresh run: seeds `device` with `config.seed`, initialises the
    /// model on `device.autodiff()`, an empty bank, step 0.
    ///
    /// # Errors
    /// [`Error::Config`] for an invalid configuration.
    pub fn new(config: TrainingConfig, device: &Device) -> Result<Self, Error> {
        config.validate()?;
        device.seed(config.seed);
        let model = config.model.init(&device.clone().autodiff())?;
        Self::with_model(config, model)
    }

    /// A fresh run (step 0, empty bank, new optimizer state) from given
    /// weights, which must live on an autodiff device.
    ///
    /// # Errors
    /// [`Error::Config`] for an invalid configuration.
    pub fn with_model(config: TrainingConfig, model: Iris) -> Result<Self, Error> {
        config.validate()?;
        let bank = MemoryBank::new(&config.model, config.bank_momentum as f32)?;
        Ok(Trainer {
            optimizer: config.optimizer(),
            config,
            model,
            bank,
            step: 0,
        })
    }

    /// The run's configuration.
    pub fn config(&self) -> &TrainingConfig {
        &self.config
    }

    /// The model (autodiff device).
    pub fn model(&self) -> &Iris {
        &self.model
    }

    /// The memory bank.
    pub fn bank(&self) -> &MemoryBank {
        &self.bank
    }

    /// Mutable access to the bank, e.g. to [register](MemoryBank::register)
    /// the data's classes up front so that their ids follow the data set.
    pub fn bank_mut(&mut self) -> &mut MemoryBank {
        &mut self.bank
    }

    /// Steps done so far.
    pub fn step(&self) -> usize {
        self.step
    }

    /// Restarts the learning-rate schedule at the current step: cosine
    /// decay from `learning_rate` now to the final rate at
    /// `schedule_steps`, without warm-up (see
    /// [`TrainingConfig::schedule_start`]), e.g. to train a finished run
    /// further or on new data. The next checkpoint saves it, so a later
    /// resume continues the same schedule.
    ///
    /// # Errors
    /// [`Error::Config`] when `learning_rate` is not positive or
    /// `schedule_steps` is not after the current step; the trainer is then
    /// unchanged.
    pub fn restart_schedule(
        &mut self,
        learning_rate: f64,
        schedule_steps: usize,
    ) -> Result<(), Error> {
        let mut config = self.config.clone();
        config.learning_rate = learning_rate;
        config.schedule_steps = schedule_steps;
        config.schedule_start = Some(self.step);
        config.validate()?;
        self.config = config;
        Ok(())
    }

    /// Draws the episodes from `seed` from the current step on (episode `b`
    /// of step `s` is then [`episode_seed`]`(seed, s, b)`), e.g. for a
    /// second draw of a recipe's last steps from one checkpoint. The
    /// weights' seed is unchanged; the next checkpoint saves the new one as
    /// [`TrainingConfig::episode_seed`], so a later resume keeps drawing
    /// from it.
    pub fn reseed_episodes(&mut self, seed: u64) {
        self.config.episode_seed = Some(seed);
    }

    /// One step on given episodes: [`train_step`] with this step's learning
    /// rate, then the bank update; the step count advances.
    ///
    /// # Errors
    /// As [`train_step`] (the step is not taken); [`Error::Core`] if
    /// the bank refuses an embedding (non-finite values; the weights have
    /// then been updated and the step counted).
    pub fn train_on(&mut self, episodes: &[Episode]) -> Result<StepStats, Error> {
        let lr = self.config.learning_rate(self.step);
        let (model, output) = train_step(self.model.clone(), &mut self.optimizer, lr, episodes)?;
        self.model = model;
        self.step += 1;
        for (episode, embedding) in episodes.iter().zip(&output.embeddings) {
            self.bank.observe(&episode.classes, embedding)?;
        }
        Ok(output.stats)
    }

    /// One step with the episodes this step owns: episode `b` is
    /// `episodes(episode_seed(seed, step, b))` for `b < batch_size`, where
    /// `seed` is [`TrainingConfig::episode_stream_seed`].
    ///
    /// # Errors
    /// [`Error::Dataset`] or [`Error::Core`] from `episodes`; otherwise as [`Trainer::train_on`].
    pub fn train_with(
        &mut self,
        episodes: &dyn Fn(u64) -> Result<Episode, Error>,
    ) -> Result<StepStats, Error> {
        let seed = self.config.episode_stream_seed();
        let batch = (0..self.config.batch_size)
            .map(|b| episodes(episode_seed(seed, self.step, b)))
            .collect::<Result<Vec<_>, _>>()?;
        self.train_on(&batch)
    }

    /// The model's fingerprint (see [`model_fingerprint`]).
    pub fn fingerprint(&self) -> iris_core::embedding::ModelFingerprint {
        model_fingerprint(&self.model, &self.config.model)
    }
}

/// SHA-256 fingerprint of a model's exact weights and configuration, the
/// value `.irisemb` files carry to refuse embeddings of other weights.
///
/// The digest covers, in this order (all integers little-endian):
/// 1. `u64` byte length of the configuration JSON, then the JSON itself:
///    `serde_json::to_vec(config)` (compact, fields in declaration order);
/// 2. for each float parameter in `burn`'s `Module::visit` order (the
///    order of the fields of `Iris` and its sub-modules, depth first):
///    `u32` rank, each dimension as `u64`, then every value as `f32`
///    little-endian bytes in row-major (C) order.
///
/// An exporter that does not run this crate must reproduce exactly this
/// byte stream (or rewrite the fingerprint of the banks it ships).
pub fn model_fingerprint(
    model: &Iris,
    config: &IrisConfig,
) -> iris_core::embedding::ModelFingerprint {
    struct Hasher(Sha256);
    impl burn::module::ModuleVisitor for Hasher {
        fn visit_float<const D: usize>(&mut self, param: &burn::module::Param<Tensor<D>>) {
            let tensor = param.val();
            self.0.update((D as u32).to_le_bytes());
            for dim in tensor.dims() {
                self.0.update((dim as u64).to_le_bytes());
            }
            let data = tensor.into_data();
            let mut bytes = Vec::with_capacity(data.num_elements() * 4);
            for v in data.iter::<f32>() {
                bytes.extend_from_slice(&v.to_le_bytes());
            }
            self.0.update(&bytes);
        }
    }
    // Serialising a derived `Config` of numbers cannot fail.
    let json = serde_json::to_vec(config).unwrap_or_default();
    let mut hasher = Hasher(Sha256::new());
    hasher.0.update((json.len() as u64).to_le_bytes());
    hasher.0.update(&json);
    model.visit(&mut hasher);
    iris_core::embedding::ModelFingerprint::new(hasher.0.finalize().into())
}
