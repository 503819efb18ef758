//! [`TrainingConfig`]: every setting that shapes a run, saved as the
//! checkpoint's `config.json`, read back from files of any version
//! ([`TrainingConfig::from_json`]), and checked against the settings a
//! resumed run is given again ([`TrainingConfig::check_given`]).

use burn::optim::{LambConfig, ModuleOptimizer};
use burn::prelude::*;
use serde_json::{Map, Value, json};

use super::Curriculum;
use crate::data::EpisodeConfig;
use crate::data::atlas::check_zoom;
use crate::data::episode::DEFAULT_MAX_CLASSES;
use crate::error::Error;
use crate::model::IrisConfig;

#[cfg(doc)]
use super::Trainer;

/// Region counts of the coarse views of each atlas a run trains on unless
/// configured ([`TrainingConfig::regions`]).
pub const DEFAULT_REGIONS: [usize; 3] = [2, 6, 24];
/// Zooms of the macaque whole-brain view unless configured
/// ([`TrainingConfig::whole_brain_zooms`]).
pub const DEFAULT_WHOLE_BRAIN_ZOOMS: [f64; 1] = [2.0];
/// The curriculum's bound at step 0 unless configured
/// ([`TrainingConfig::curriculum_fraction`]).
pub const DEFAULT_CURRICULUM_FRACTION: f64 = 0.005;

/// Everything that shapes a training run; saved as `config.json` in each
/// checkpoint (`burn::config::Config::save`, pretty JSON, fields in this
/// order), so that a checkpoint says how its weights were trained and a
/// resumed run needs no setting repeated. Read it back with
/// [`TrainingConfig::from_json`], which also reads the files of runs
/// saved before the data and curriculum settings were.
///
/// What is not here controls one call, not the weights a step computes:
/// the target step count, a time limit, how often to evaluate and
/// checkpoint, where the data set lives ([`RunOptions`](super::RunOptions))
/// and the thread count.
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
    /// Most classes per episode: each task draws 1 to this many classes
    /// of one source, segmented in one decoder run
    /// ([`EpisodeConfig::max_classes`]).
    #[config(default = "DEFAULT_MAX_CLASSES")]
    pub max_classes: usize,
    /// Besides each atlas's parcels, its coarse views: its trainable
    /// classes merged by position into each of these numbers of regions
    /// ([`with_regions`](crate::data::atlas::with_regions); empty or 0:
    /// parcels only).
    #[config(default = "DEFAULT_REGIONS.to_vec()")]
    pub regions: Vec<usize>,
    /// The zooms at which the macaque whole-brain view is sampled (the
    /// atlas resampled at spacing / zoom), one subject per zoom
    /// ([`whole_brain_views`](crate::data::atlas::whole_brain_views));
    /// empty: no whole-brain view.
    #[config(default = "DEFAULT_WHOLE_BRAIN_ZOOMS.to_vec()")]
    pub whole_brain_zooms: Vec<f64>,
    /// The curriculum ([`Curriculum`]): at step 0 every class of an episode
    /// fills at least this fraction of the patch; the bound falls linearly
    /// to 0 at [`curriculum_steps`](Self::curriculum_steps) (0 or less: no
    /// curriculum).
    #[config(default = "DEFAULT_CURRICULUM_FRACTION")]
    pub curriculum_fraction: f64,
    /// Steps over which the curriculum's bound falls to 0 (0: no
    /// curriculum). `null` (or absent, in older configs): a third of
    /// `schedule_steps`, so that a schedule restarted to a later step
    /// takes its curriculum along.
    #[config(default = "None")]
    pub curriculum_steps: Option<usize>,
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
    /// [`Error::Config`] for the model, the schedule, the batch and the
    /// bank; then [`Error::Setting`] for the data and curriculum settings.
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
        let refused = |setting, e: Error| setting_error(self, setting, e.to_string());
        self.episode_config()
            .validate()
            .map_err(|e| refused(Setting::MaxClasses, e))?;
        for &zoom in &self.whole_brain_zooms {
            check_zoom(zoom).map_err(|e| refused(Setting::WholeBrainZooms, e))?;
        }
        // The bound only falls from its value at step 0.
        if let Some(bound) = self.curriculum().update(0, true) {
            let mut episodes = self.episode_config();
            episodes.min_foreground_fraction = bound;
            episodes
                .validate()
                .map_err(|e| refused(Setting::CurriculumFraction, e))?;
        }
        Ok(())
    }

    /// The episodes this run draws ([`EpisodeConfig::new`] for the model's
    /// patch, with [`max_classes`](Self::max_classes)), before the
    /// curriculum sets its bound.
    pub fn episode_config(&self) -> EpisodeConfig {
        EpisodeConfig {
            max_classes: self.max_classes,
            ..EpisodeConfig::new(self.model.patch_size)
        }
    }

    /// The curriculum of this run: [`curriculum_fraction`](Self::curriculum_fraction)
    /// falling to 0 over [`curriculum_steps`](Self::curriculum_steps), a
    /// third of `schedule_steps` when that is `None`.
    pub fn curriculum(&self) -> Curriculum {
        Curriculum {
            fraction: self.curriculum_fraction,
            steps: self.curriculum_steps.unwrap_or(self.schedule_steps / 3),
        }
    }

    /// Reads a configuration written by [`burn::config::Config::save`]
    /// (a checkpoint's `config.json`), also one saved before the data and
    /// curriculum settings were: those fields, when absent, take the value
    /// the runs that wrote such files used, which is what `iris-train
    /// train` took for a flag not given until then (`--max-classes 3`,
    /// `--regions 2,6,24`, `--whole-brain-zoom 2`,
    /// `--curriculum-fraction 0.005`; `curriculum_steps`, like the other
    /// optional fields, reads as `None`: a third of `schedule_steps`, which
    /// is the old binary's third of `--steps` whenever `--steps` was the
    /// schedule's length, as for every fresh or restarted run). These
    /// values are fixed here: they say what old runs did, whatever the
    /// defaults become. A flag such a run was given is not known (the
    /// shipped iris-tiny's last 40 000 steps, for one, were run with
    /// `--whole-brain-zoom 2.5`, and its file reads as zoom 2).
    ///
    /// # Errors
    /// When `json` is not a JSON object of a configuration.
    pub fn from_json(json: &str) -> Result<Self, serde_json::Error> {
        let mut value: Value = serde_json::from_str(json)?;
        if let Value::Object(fields) = &mut value {
            with_legacy_settings(fields);
        }
        serde_json::from_value(value)
    }

    /// Checks the settings a resumed run was given again (e.g. on the
    /// command line) against this, its saved configuration: each setting
    /// of `settings` must have the same value in `given` as here. The
    /// others, and the fields of `given` no setting covers, are not looked
    /// at.
    ///
    /// # Errors
    /// [`Error::Setting`] for the first setting that differs, with the
    /// value given and the value saved.
    pub fn check_given(&self, given: &TrainingConfig, settings: &[Setting]) -> Result<(), Error> {
        for &setting in settings {
            let (saved, wanted) = (setting.value(self), setting.value(given));
            if saved != wanted {
                let (saved, wanted) = differences(saved, wanted);
                return Err(Error::Setting {
                    setting,
                    value: wanted.to_string(),
                    reason: format!(
                        "the resumed run was saved with {saved}; a resumed run keeps the \
                         settings of its config.json"
                    ),
                });
            }
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

/// A setting of [`TrainingConfig`] that a user may give again when a run
/// resumes (see [`TrainingConfig::check_given`]), or that the run cannot
/// follow ([`Error::Setting`]).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[non_exhaustive]
pub enum Setting {
    /// The model's sizes other than its spacing and patch (a preset's:
    /// channels, blocks, tokens, stages, attention), in `model`.
    Architecture,
    /// `batch_size`.
    BatchSize,
    /// `max_classes`.
    MaxClasses,
    /// `regions`.
    Regions,
    /// `whole_brain_zooms`.
    WholeBrainZooms,
    /// `curriculum_fraction`.
    CurriculumFraction,
    /// The curriculum's length in steps: `curriculum_steps`, or a third of
    /// `schedule_steps` when it is `None`.
    CurriculumSteps,
}

impl Setting {
    /// The field of `config.json` that holds it.
    pub fn field(self) -> &'static str {
        match self {
            Setting::Architecture => "model",
            Setting::BatchSize => "batch_size",
            Setting::MaxClasses => "max_classes",
            Setting::Regions => "regions",
            Setting::WholeBrainZooms => "whole_brain_zooms",
            Setting::CurriculumFraction => "curriculum_fraction",
            Setting::CurriculumSteps => "curriculum_steps",
        }
    }

    /// Its value in `config`, as JSON.
    fn value(self, config: &TrainingConfig) -> Value {
        match self {
            Setting::Architecture => {
                let mut model = json!(config.model);
                if let Value::Object(fields) = &mut model {
                    fields.remove("spacing_mm");
                    fields.remove("patch_size");
                }
                model
            }
            Setting::BatchSize => json!(config.batch_size),
            Setting::MaxClasses => json!(config.max_classes),
            Setting::Regions => json!(config.regions),
            Setting::WholeBrainZooms => json!(config.whole_brain_zooms),
            Setting::CurriculumFraction => json!(config.curriculum_fraction),
            Setting::CurriculumSteps => json!(config.curriculum().steps),
        }
    }
}

/// An [`Error::Setting`] refusing `setting` of `config` for `reason`.
pub(crate) fn setting_error(config: &TrainingConfig, setting: Setting, reason: String) -> Error {
    Error::Setting {
        setting,
        value: setting.value(config).to_string(),
        reason,
    }
}

/// Two values that differ, reduced to the fields that differ when both are
/// objects (two models differing in their channels show only those).
fn differences(a: Value, b: Value) -> (Value, Value) {
    match (a, b) {
        (Value::Object(mut a), Value::Object(mut b)) => {
            let same: Vec<String> = a
                .iter()
                .filter(|(key, value)| b.get(key.as_str()) == Some(value))
                .map(|(key, _)| key.clone())
                .collect();
            for key in &same {
                a.remove(key);
                b.remove(key);
            }
            (Value::Object(a), Value::Object(b))
        }
        pair => pair,
    }
}

/// Adds to the fields of a saved configuration the settings configs did
/// not save until they all were, with the values the runs that wrote them
/// used (see [`TrainingConfig::from_json`]).
fn with_legacy_settings(fields: &mut Map<String, Value>) {
    let legacy = [
        ("max_classes", json!(3)),
        ("regions", json!([2, 6, 24])),
        ("whole_brain_zooms", json!([2.0])),
        ("curriculum_fraction", json!(0.005)),
    ];
    for (field, value) in legacy {
        fields.entry(field).or_insert(value);
    }
}
