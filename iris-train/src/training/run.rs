//! A whole training run as one call ([`run`]): the training data of the
//! run's configuration, the steps with their curriculum, held-out
//! evaluations, `metrics.csv` and checkpoints, reported to an observer as
//! [`Event`]s (the `iris-train` binary draws its progress bar from them).

use std::fs;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use super::config::setting_error;
use super::metrics::{METRICS_FILE, Metrics};
use super::{Setting, StepStats, Trainer, TrainingConfig, evaluate, held_out_episodes};
use crate::checkpoint::CHECKPOINT_DIR;
use crate::data::EpisodeSampler;
use crate::data::atlas::{AtlasSource, load_atlases, whole_brain_views, with_regions};
use crate::error::Error;

/// Held-out classes evaluated (one episode each).
const HELD_OUT_EPISODES: usize = 8;
/// Smallest held-out class evaluated, in voxels of the training grid.
const HELD_OUT_MIN_VOXELS: usize = 64;
/// Seed of the held-out episodes (the same for every run, so that runs
/// compare).
const HELD_OUT_SEED: u64 = 1;

/// How one call of [`run`] proceeds, besides the run's configuration:
/// how far and how long it goes, how often it evaluates and checkpoints,
/// and where the data set lives. None of it is saved; each call gives it
/// anew.
#[derive(Clone, Debug, PartialEq)]
pub struct RunOptions {
    /// Train until this many steps are done in total.
    pub steps: usize,
    /// Stop (with a checkpoint) once this much time has passed since the
    /// loop started; `None`: no limit.
    pub time_limit: Option<Duration>,
    /// Evaluate on held-out classes every this many steps (0: never).
    pub eval_every: usize,
    /// Write a checkpoint every this many steps (at least 1), and at the
    /// end.
    pub checkpoint_every: usize,
    /// The atlases folder made by `scripts/fetch-data.sh`.
    pub data_dir: PathBuf,
}

/// What [`run`] reports to its observer, in this order per step: the
/// step, its evaluation, its checkpoint (each written before it is
/// reported).
#[derive(Clone, Debug, PartialEq)]
#[non_exhaustive]
pub enum Event {
    /// The data is loaded and the loop starts after `step` steps (more
    /// than 0 for a resumed run), to stop at `steps`.
    Started {
        /// Steps already done.
        step: usize,
        /// The target, [`RunOptions::steps`].
        steps: usize,
    },
    /// Step `step` (counted from 1) is done and its row of `metrics.csv`
    /// (with its evaluation, if any) written.
    Step {
        /// The step's number.
        step: usize,
        /// What it measured.
        stats: StepStats,
        /// Its speed: episodes (the batch) per second.
        episodes_per_s: f64,
    },
    /// The model was evaluated on the held-out classes after step `step`.
    Evaluated {
        /// The step's number.
        step: usize,
        /// Mean held-out Dice ([`evaluate`]); `None` when the data has no
        /// held-out class large enough.
        dice: Option<f32>,
    },
    /// A checkpoint of step `step` was written to `<out>/checkpoint/`.
    Checkpoint {
        /// The step's number.
        step: usize,
    },
    /// The time limit stopped the run after step `step`, before the
    /// target (a checkpoint follows).
    TimeLimit {
        /// The step's number.
        step: usize,
    },
}

/// How a [`run`] ended.
#[derive(Clone, Debug, PartialEq)]
pub struct RunSummary {
    /// Steps done in total, those of the last checkpoint.
    pub step: usize,
    /// What the last step of this call measured; `None` when it took no
    /// step (the target was already reached).
    pub last: Option<StepStats>,
    /// Whether the time limit stopped it before the target.
    pub timed_out: bool,
    /// The checkpoint folder, `<out>/checkpoint/`.
    pub checkpoint: PathBuf,
}

/// Trains `trainer` (a fresh run, or one [resumed](Trainer::resume) from
/// `out`) on the training data of its configuration until
/// `options.steps` steps are done or the time limit passes, writing to the
/// output folder `out`: `metrics.csv` (rows past the trainer's step are
/// dropped first), a checkpoint every `options.checkpoint_every` steps
/// and one at the end ([`Trainer::save_checkpoint`]). `observer` gets
/// each [`Event`].
///
/// Before the first step the data's trainable classes are
/// [registered](crate::bank::MemoryBank::register) in the memory bank in
/// key order, so that their ids follow the data, and the curriculum's
/// bound is set for the step the run starts at.
///
/// ```no_run
/// use iris_train::model::IrisConfig;
/// use iris_train::training::{self, Event, RunOptions, Trainer, TrainingConfig};
///
/// let device = iris_train::device::select_device();
/// let out = std::path::Path::new("runs/tiny");
/// let mut trainer = Trainer::new(TrainingConfig::new(IrisConfig::tiny(), 1000), &device)?;
/// let options = RunOptions {
///     steps: 1000,
///     time_limit: None,
///     eval_every: 500,
///     checkpoint_every: 100,
///     data_dir: "data".into(),
/// };
/// let summary = training::run(out, &mut trainer, &options, |event| {
///     if let Event::Evaluated { step, dice: Some(dice) } = event {
///         println!("step {step}: held-out Dice {dice:.3}");
///     }
/// })?;
/// println!("{} steps done", summary.step);
/// // Later, in another process: continue where it stopped.
/// let mut trainer = Trainer::resume(out, &device)?;
/// training::run(out, &mut trainer, &RunOptions { steps: 2000, ..options }, |_| {})?;
/// # Ok::<(), iris_train::Error>(())
/// ```
///
/// # Errors
/// [`Error::Config`] when `options.checkpoint_every` is 0;
/// [`Error::Dataset`] naming `options.data_dir` when it is missing or its
/// data cannot be used; [`Error::Setting`] for a curriculum bound that no
/// class of the data meets; [`Error::Checkpoint`] when `out` or a
/// checkpoint cannot be written; [`iris_core::Error::Io`] (as
/// [`Error::Core`]) for `metrics.csv`; as [`Trainer::train_with`] and
/// [`evaluate`] for a step or an evaluation. Steps done before an error
/// are kept only up to the last checkpoint.
pub fn run(
    out: &Path,
    trainer: &mut Trainer,
    options: &RunOptions,
    mut observer: impl FnMut(Event),
) -> Result<RunSummary, Error> {
    if options.checkpoint_every == 0 {
        return Err(Error::Config {
            field: "checkpoint_every",
            expected: "at least 1".into(),
            found: "0".into(),
        });
    }
    let config = trainer.config().clone();
    let mut sampler = training_data(&options.data_dir, &config)?;
    let mut classes: Vec<_> = sampler
        .trainable_classes()
        .map(|c| (c.key.clone(), c.name.clone()))
        .collect();
    classes.sort();
    for (key, name) in &classes {
        trainer.bank_mut().register(key, name);
    }
    let held_out = if options.eval_every > 0 {
        held_out_episodes(
            &sampler,
            HELD_OUT_EPISODES,
            HELD_OUT_MIN_VOXELS,
            HELD_OUT_SEED,
        )?
    } else {
        Vec::new()
    };

    fs::create_dir_all(out).map_err(|e| Error::Checkpoint {
        path: out.to_path_buf(),
        reason: e.to_string(),
    })?;
    let mut metrics = Metrics::open(&out.join(METRICS_FILE), trainer.step())?;
    observer(Event::Started {
        step: trainer.step(),
        steps: options.steps,
    });

    let start = Instant::now();
    let curriculum = config.curriculum();
    let first_step = trainer.step();
    let mut last = None;
    while trainer.step() < options.steps && options.time_limit.is_none_or(|l| start.elapsed() < l) {
        if let Some(bound) = curriculum.update(trainer.step(), trainer.step() == first_step) {
            sampler
                .set_min_foreground_fraction(bound)
                .map_err(|e| setting_error(&config, Setting::CurriculumFraction, e.to_string()))?;
        }
        let step_start = Instant::now();
        let stats = trainer.train_with(&|seed| sampler.episode(seed))?;
        let episodes_per_s = config.batch_size as f64 / step_start.elapsed().as_secs_f64();
        let step = trainer.step();
        let evaluated = options.eval_every > 0 && step.is_multiple_of(options.eval_every);
        let eval = if evaluated {
            evaluate(trainer.model(), &held_out)?
        } else {
            None
        };
        metrics.row(
            step,
            &stats,
            episodes_per_s,
            start.elapsed().as_secs_f64(),
            eval,
        )?;
        observer(Event::Step {
            step,
            stats: stats.clone(),
            episodes_per_s,
        });
        if evaluated {
            observer(Event::Evaluated { step, dice: eval });
        }
        if step.is_multiple_of(options.checkpoint_every) {
            trainer.save_checkpoint(out)?;
            observer(Event::Checkpoint { step });
        }
        last = Some(stats);
    }
    let step = trainer.step();
    let timed_out = step < options.steps;
    if timed_out {
        observer(Event::TimeLimit { step });
    }
    trainer.save_checkpoint(out)?;
    observer(Event::Checkpoint { step });
    Ok(RunSummary {
        step,
        last,
        timed_out,
        checkpoint: out.join(CHECKPOINT_DIR),
    })
}

/// The training data of a run of `config`: the training atlases of
/// `data_dir` ([`AtlasSource::TRAINING`]) at the model's spacing, with the
/// macaque whole-brain view at each of `config.whole_brain_zooms` and the
/// coarse views of `config.regions`, sampled as
/// [`TrainingConfig::episode_config`] says.
///
/// # Errors
/// [`Error::Dataset`] naming `data_dir` when it is not a folder or its
/// data cannot be loaded or sampled, with how to fetch it.
pub fn training_data(data_dir: &Path, config: &TrainingConfig) -> Result<EpisodeSampler, Error> {
    if !data_dir.is_dir() {
        return Err(Error::dataset(
            data_dir,
            "training data folder not found: run scripts/fetch-data.sh (or pass --data DIR)",
        ));
    }
    let unusable = |e: Error| {
        Error::dataset(
            data_dir,
            format!("training data: {e} (run scripts/fetch-data.sh to fetch it)"),
        )
    };
    let spacing = config.model.spacing_mm;
    let atlases = AtlasSource::TRAINING;
    let sources = load_atlases(data_dir, &atlases, spacing)
        .and_then(|mut sources| {
            if !config.whole_brain_zooms.is_empty() {
                sources.extend(whole_brain_views(
                    data_dir,
                    &atlases,
                    spacing,
                    &config.whole_brain_zooms,
                )?);
            }
            Ok(sources)
        })
        .and_then(|sources| with_regions(sources, &config.regions))
        .map_err(unusable)?;
    EpisodeSampler::new(sources, config.episode_config()).map_err(unusable)
}
