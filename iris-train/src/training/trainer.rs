//! [`Trainer`]: a run in progress (weights, optimizer state, memory bank,
//! step count); its checkpoints are in [`crate::checkpoint`].

use burn::optim::ModuleOptimizer;
use burn::prelude::*;

use super::step::{StepStats, episode_seed, train_step};
use super::{TrainingConfig, model_fingerprint};
use crate::bank::MemoryBank;
use crate::data::Episode;
use crate::error::Error;
use crate::model::Iris;

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
    /// As [`TrainingConfig::validate`] for an invalid configuration.
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
    /// As [`TrainingConfig::validate`] for an invalid configuration.
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
