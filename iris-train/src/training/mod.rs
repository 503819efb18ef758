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
//! [`run()`] is a whole run as one call (what `iris-train train` does): the
//! training data of the run's [`TrainingConfig`], its curriculum, held-out
//! evaluations, `metrics.csv` and checkpoints, with progress reported as
//! [`Event`]s. The steps themselves can also be driven by hand:
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
//!
//! | module | what it holds |
//! |---|---|
//! | [`config`] | [`TrainingConfig`], every setting of a run, as saved in `config.json` |
//! | [`step`] | one step ([`train_step`]), its episodes' seeds and [`StepStats`] |
//! | [`trainer`] | [`Trainer`], a run in progress |
//! | [`curriculum`] | [`Curriculum`], the size bound that falls over the first steps |
//! | [`evaluation`] | held-out episodes and [`evaluate`] |
//! | [`metrics`] | the `metrics.csv` writer |
//! | [`run`](mod@run) | [`run()`], a whole run, and its [`Event`]s |
//! | [`fingerprint`] | [`model_fingerprint`] |

pub mod config;
pub mod curriculum;
pub mod evaluation;
pub mod fingerprint;
pub mod metrics;
pub mod run;
pub mod step;
pub mod trainer;

pub use config::{
    DEFAULT_CURRICULUM_FRACTION, DEFAULT_REGIONS, DEFAULT_WHOLE_BRAIN_ZOOMS, Setting,
    TrainingConfig,
};
pub use curriculum::Curriculum;
pub use evaluation::{evaluate, held_out_episodes};
pub use fingerprint::model_fingerprint;
pub use metrics::METRICS_FILE;
pub use run::{Event, RunOptions, RunSummary, run, training_data};
pub use step::{StepOutput, StepStats, episode_seed, thresholded_dice, train_step};
pub use trainer::Trainer;

#[cfg(doc)]
use crate::{bank::MemoryBank, loss::segmentation_loss, model::Iris};
