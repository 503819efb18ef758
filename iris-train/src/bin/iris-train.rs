//! `iris-train`: episodic training of the Iris model on the atlases of
//! `data/` (real label maps, synthetic contrast), with exact resume.
//!
//! ```text
//! iris-train train --preset small --steps 20000 --out runs/small [--resume]
//!     [--threads N] [--minutes M] [--seed S] [--episode-seed S] [--data DIR]
//!     [--eval-every N] [--checkpoint-every N] [--batch-size B] [--curriculum-fraction F]
//!     [--curriculum-steps N] [--regions 2,6,24] [--spacing-mm MM] [--patch N]
//!     [--bank-momentum A] [--restart-lr LR] [--whole-brain-zoom 2,2.5 | --no-whole-brain]
//!     [--max-classes N] [--quiet]
//! iris-train export --checkpoint runs/small --out models/iris-small [--name NAME]
//!                    [--classes-per-forward N] [--quiet]
//! iris-train export --random --preset tiny [--seed S] --out models/iris-tiny-random
//! iris-train tune --checkpoint runs/small --task init.irisemb --images a.nii.gz,b.nii.gz
//!     --labels a_labels.nii.gz,b_labels.nii.gz [--steps N] [--lr X]
//!     [--classes-per-forward N] --out tuned.irisemb [--quiet]
//! iris-train import --checkpoint mass_base.pth --out models/mass-base [--name NAME]
//!     [--weights ema|model] [--window D,H,W] [--spacing MM] [--with-checkpoint] [--quiet]
//! ```
//!
//! `train` saves every setting that shapes the weights in
//! `<out>/checkpoint/config.json` (`iris_train::training::TrainingConfig`):
//! the model's sizes (--preset, --spacing-mm, --patch), the schedule
//! (--steps of a fresh run, --restart-lr), --batch-size, --seed,
//! --episode-seed, --bank-momentum, --max-classes, --regions, the
//! whole-brain zooms (--whole-brain-zoom, --no-whole-brain: none) and the
//! curriculum (--curriculum-fraction, --curriculum-steps: `null` for a
//! third of the schedule). `--resume` reads them back: --spacing-mm,
//! --patch, --seed and --bank-momentum cannot be given with it, and the
//! other setting flags, when given, must repeat the saved value (exit 2
//! naming the flag, the value given and the value saved); --restart-lr and
//! --episode-seed change the saved schedule and episode stream. A
//! config.json written before the data and curriculum settings were saved
//! reads as the flags' defaults of then, what those runs used (see
//! `TrainingConfig::from_json`). --steps, --minutes, --threads, --data
//! (where the data set lives), --eval-every, --checkpoint-every and
//! --quiet control one call and are given anew on each.
//!
//! Exit codes: 0 done (the step count or the time limit was reached and a
//! checkpoint written; or the model folder written; or the tuned embedding
//! written), 1 training, export or tuning failed (for tuning also a task
//! embedding of another model, or a case without one of the task's labels),
//! 2 bad arguments, 3 training data (or a file given to `tune`, or the
//! manifest beside its checkpoint, or a PyTorch checkpoint given to `import`)
//! missing, unreadable, of another model or of an architecture the model
//! cannot represent,
//! 4 checkpoint problem (nothing to resume, export or tune
//! with, or a checkpoint in the way of a fresh run, or a write failed).

use std::fs;
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::time::{Duration, Instant};

use clap::builder::TypedValueParser;
use clap::parser::ValueSource;
use clap::{ArgMatches, CommandFactory, FromArgMatches, Parser, Subcommand, ValueEnum};
use indicatif::{ProgressBar, ProgressStyle};
use iris_core::embedding::ModelFingerprint;
use iris_core::engine::Manifest;
use iris_core::irisemb::{self, Payload};
use iris_core::nifti;
use iris_train::Error;
use iris_train::data::atlas::check_zoom;
use iris_train::data::episode::DEFAULT_MAX_CLASSES;
use iris_train::export::MANIFEST_FILE;
use iris_train::import::{ImportOptions, Weights, import_checkpoint};
use iris_train::model::IrisConfig;
use iris_train::training::{
    self, DEFAULT_CURRICULUM_FRACTION, DEFAULT_REGIONS, DEFAULT_WHOLE_BRAIN_ZOOMS, Event,
    RunOptions, Setting, Trainer, TrainingConfig,
};
use iris_train::tune::{TuneOptions, tune};
use iris_train::{checkpoint, export};

#[derive(Parser)]
#[command(
    name = "iris-train",
    version,
    about = "Train the Iris segmentation model"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Episodic training (Algorithm 1) with checkpoints, metrics and the
    /// EMA memory bank written to the output folder.
    ///
    /// Every setting that shapes the weights is saved in the checkpoint's
    /// config.json; --resume reads them from there and refuses a flag given
    /// again with another value. Free on each call: --steps, --minutes,
    /// --threads, --data, --eval-every, --checkpoint-every, --quiet, and
    /// the changes --resume allows (--restart-lr, --episode-seed).
    Train(TrainArgs),
    /// Export a checkpoint (or fresh weights) as the model folder the
    /// engine loads: three ONNX graphs, manifest.json and the memory bank.
    Export(ExportArgs),
    /// In-context tuning: optimise a task embedding (.irisemb) on labelled
    /// cases with the checkpoint's model frozen, and write it as .irisemb.
    Tune(TuneArgs),
    /// Import the released Iris weights (a MASS / Iris PyTorch checkpoint
    /// such as mass_base.pth, or a bare state_dict) as a model folder.
    Import(ImportArgs),
}

#[derive(Clone, Copy, ValueEnum)]
enum Preset {
    Tiny,
    Small,
    Paper,
}

impl Preset {
    fn config(self) -> IrisConfig {
        match self {
            Preset::Tiny => IrisConfig::tiny(),
            Preset::Small => IrisConfig::small(),
            Preset::Paper => IrisConfig::paper(),
        }
    }
}

#[derive(clap::Args)]
struct TrainArgs {
    /// Model size (required for a fresh run; a resumed run keeps its own,
    /// and refuses another preset).
    #[arg(long, value_enum, required_unless_present = "resume")]
    preset: Option<Preset>,
    /// Resample the data to this isotropic spacing in mm instead of the
    /// preset's (fresh runs only), e.g. `--preset small --spacing-mm 6
    /// --patch 32` to measure the small model's width at tiny's resolution.
    #[arg(long, conflicts_with = "resume")]
    spacing_mm: Option<f64>,
    /// Cubic window side in voxels instead of the preset's (fresh runs
    /// only; a multiple of 16).
    #[arg(long, conflicts_with = "resume")]
    patch: Option<usize>,
    /// Momentum of the memory bank's EMA (fresh runs only; default 0.999,
    /// the paper's). The shipped model used 0.95: at batch 1 over hundreds
    /// of classes each class is updated a few hundred times, and 0.999
    /// keeps its early, untrained embeddings.
    #[arg(long, conflicts_with = "resume")]
    bank_momentum: Option<f64>,
    /// Restart the learning-rate schedule of a resumed run: cosine decay
    /// from this rate at the checkpoint's step to the final rate at
    /// --steps, without warm-up (to train a finished run further).
    #[arg(long, requires = "resume")]
    restart_lr: Option<f64>,
    /// Train until this many steps are done in total (also the length of a
    /// fresh run's learning-rate schedule).
    #[arg(long)]
    steps: usize,
    /// Output folder: checkpoint/, metrics.csv, memory_bank.irisemb.
    #[arg(long)]
    out: PathBuf,
    /// Continue the run saved in --out.
    #[arg(long)]
    resume: bool,
    /// Worker threads (default: all cores).
    #[arg(long)]
    threads: Option<usize>,
    /// Stop (with a checkpoint) after this many minutes.
    #[arg(long)]
    minutes: Option<f64>,
    /// Seed of the weights and episodes of a fresh run (a resumed run
    /// keeps its own).
    #[arg(long, default_value_t = 0, conflicts_with = "resume")]
    seed: u64,
    /// Seed of the episodes from this run's current step on (default: a
    /// fresh run's --seed, or the checkpoint's). With --resume it draws a
    /// new episode stream from the checkpoint's step, e.g. a second draw
    /// of a recipe's last steps; the checkpoint saves it for later resumes.
    #[arg(long)]
    episode_seed: Option<u64>,
    /// The atlases folder made by scripts/fetch-data.sh.
    #[arg(long, default_value = "data")]
    data: PathBuf,
    /// Evaluate on held-out classes every N steps (0: never).
    #[arg(long, default_value_t = 500)]
    eval_every: usize,
    /// Write a checkpoint every N steps (and at the end).
    #[arg(long, default_value_t = 100)]
    checkpoint_every: usize,
    /// Episodes per step.
    #[arg(long, default_value_t = 1)]
    batch_size: usize,
    /// Curriculum: at step 0 every class of an episode fills at least this
    /// fraction of the patch; the bound falls linearly to 0 at
    /// --curriculum-steps (0: no curriculum).
    #[arg(long, default_value_t = DEFAULT_CURRICULUM_FRACTION)]
    curriculum_fraction: f64,
    /// Steps over which the curriculum's bound falls to 0 (default: a
    /// third of the learning-rate schedule, i.e. of a fresh run's --steps,
    /// following a restarted schedule).
    #[arg(long)]
    curriculum_steps: Option<usize>,
    /// Also train on coarse views of each atlas: its trainable classes
    /// merged by position into this many regions (large targets, up to
    /// half a brain; 0 or none: parcels only).
    #[arg(long, value_delimiter = ',', default_values_t = DEFAULT_REGIONS)]
    regions: Vec<usize>,
    /// Leave out the macaque whole-brain view (one target the size of a
    /// brain; the human brain mask stays out of training either way).
    #[arg(long)]
    no_whole_brain: bool,
    /// Sample the macaque whole-brain view at these zooms (the atlas
    /// resampled at spacing / zoom), one subject per zoom: 2 makes it half
    /// a human brain in voxels, 2.5 about as large as one.
    #[arg(long, value_delimiter = ',', default_values_t = DEFAULT_WHOLE_BRAIN_ZOOMS, conflicts_with = "no_whole_brain")]
    whole_brain_zoom: Vec<f64>,
    /// Most classes per episode: each task draws 1 to N classes of one
    /// source, segmented in one decoder run (inference decodes up to the
    /// manifest's `classes_per_forward` per run).
    #[arg(long, default_value_t = DEFAULT_MAX_CLASSES)]
    max_classes: usize,
    /// No progress bar or summary.
    #[arg(long)]
    quiet: bool,
}

#[derive(clap::Args)]
struct ExportArgs {
    /// The training output folder (the --out of `train`) or its
    /// checkpoint/ folder.
    #[arg(long, required_unless_present = "random")]
    checkpoint: Option<PathBuf>,
    /// Export freshly initialised weights of --preset instead of a
    /// checkpoint (for tests and engine development).
    #[arg(long, conflicts_with = "checkpoint", requires = "preset")]
    random: bool,
    /// Model size of --random.
    #[arg(long, value_enum, conflicts_with = "checkpoint")]
    preset: Option<Preset>,
    /// Seed of the --random weights.
    #[arg(long, default_value_t = 0, conflicts_with = "checkpoint")]
    seed: u64,
    /// The model folder to write, e.g. models/iris-small.
    #[arg(long)]
    out: PathBuf,
    /// The model's name in the manifest (default: the --out folder's name).
    #[arg(long)]
    name: Option<String>,
    /// The most classes the engine decodes in one decoder run (written to
    /// the manifest). 1 decodes each class alone; raise it only for a model
    /// that keeps the classes of one run apart (all at once is faster).
    #[arg(long, default_value_t = export::DEFAULT_CLASSES_PER_FORWARD,
          value_parser = clap::value_parser!(u16).range(1..).map(usize::from))]
    classes_per_forward: usize,
    /// No summary.
    #[arg(long)]
    quiet: bool,
}

#[derive(Clone, Copy, ValueEnum)]
enum WeightsArg {
    /// The EMA weights (`ema_model`), as the reference inference uses.
    Ema,
    /// The raw weights (`model`).
    Model,
}

#[derive(clap::Args)]
struct ImportArgs {
    /// The PyTorch checkpoint (.pth): a training checkpoint of the
    /// reference code or a bare state_dict.
    #[arg(long)]
    checkpoint: PathBuf,
    /// The model folder to write, e.g. models/mass-base.
    #[arg(long)]
    out: PathBuf,
    /// The model's name in the manifest (default: the --out folder's name).
    #[arg(long)]
    name: Option<String>,
    /// Which copy of a training checkpoint's weights to import.
    #[arg(long, value_enum, default_value = "ema")]
    weights: WeightsArg,
    /// Sliding window D,H,W in voxels, multiples of 16 within the stored
    /// positional embedding (default: the checkpoint's window, 128,128,128
    /// for the release).
    #[arg(long, value_delimiter = ',', num_args = 3)]
    window: Option<Vec<usize>>,
    /// Isotropic spacing in mm (default: the checkpoint's target_spacing,
    /// 1.5 for the release).
    #[arg(long)]
    spacing: Option<f64>,
    /// Also write the burn weights to <out>/checkpoint/, so that `iris-train
    /// tune --checkpoint <out>` tunes task embeddings of this model.
    #[arg(long)]
    with_checkpoint: bool,
    /// No summary.
    #[arg(long)]
    quiet: bool,
}

#[derive(clap::Args)]
struct TuneArgs {
    /// The training output folder (the --out of `train`) or its
    /// checkpoint/ folder: the model the task embedding belongs to.
    #[arg(long)]
    checkpoint: PathBuf,
    /// The task embedding to start from (.irisemb made by this model).
    #[arg(long)]
    task: PathBuf,
    /// The cases' images (NIfTI), comma-separated.
    #[arg(long, value_delimiter = ',', required = true)]
    images: Vec<PathBuf>,
    /// Their label maps (NIfTI), comma-separated, in the same order.
    #[arg(long, value_delimiter = ',', required = true)]
    labels: Vec<PathBuf>,
    /// Adam steps.
    #[arg(long, default_value_t = TuneOptions::default().steps)]
    steps: usize,
    /// Adam learning rate.
    #[arg(long, default_value_t = TuneOptions::default().learning_rate)]
    lr: f64,
    /// Classes per decoder run while tuning, as inference will decode
    /// them. Default: the `classes_per_forward` of the model folder's
    /// manifest.json when --checkpoint is a model folder's checkpoint/
    /// (all classes in one run when it has none), else 1.
    #[arg(long, value_parser = clap::value_parser!(u16).range(1..).map(usize::from))]
    classes_per_forward: Option<usize>,
    /// The tuned task embedding to write (.irisemb, exact f32).
    #[arg(long)]
    out: PathBuf,
    /// No progress bar or summary.
    #[arg(long)]
    quiet: bool,
}

/// A failure with the exit code it maps to.
struct Failure {
    code: u8,
    message: String,
}

impl Failure {
    fn new(code: u8, message: impl Into<String>) -> Self {
        Failure {
            code,
            message: message.into(),
        }
    }
}

impl From<Error> for Failure {
    fn from(e: Error) -> Self {
        let code = match e {
            Error::Checkpoint { .. } => 4,
            Error::Dataset { .. } | Error::Import { .. } => 3,
            _ => 1,
        };
        Failure::new(code, e.to_string())
    }
}

fn main() -> ExitCode {
    let matches = Cli::command().get_matches();
    let cli = Cli::from_arg_matches(&matches).unwrap_or_else(|e| e.exit());
    let result = match cli.command {
        Command::Train(args) => train(
            &args,
            matches.subcommand_matches("train").unwrap_or(&matches),
        ),
        Command::Export(args) => export(&args),
        Command::Tune(args) => tune_task(&args),
        Command::Import(args) => import(&args),
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(failure) => {
            eprintln!("iris-train: {}", failure.message);
            ExitCode::from(failure.code)
        }
    }
}

/// The saved settings that `train` flags set, with each flag's clap id
/// (the flag is `--` and the id with `-` for `_`): given again with
/// `--resume`, they must match the checkpoint's config.json.
const SETTING_FLAGS: [(Setting, &str); 8] = [
    (Setting::Architecture, "preset"),
    (Setting::BatchSize, "batch_size"),
    (Setting::MaxClasses, "max_classes"),
    (Setting::Regions, "regions"),
    (Setting::WholeBrainZooms, "whole_brain_zoom"),
    (Setting::WholeBrainZooms, "no_whole_brain"),
    (Setting::CurriculumFraction, "curriculum_fraction"),
    (Setting::CurriculumSteps, "curriculum_steps"),
];

/// The flag that sets `setting` (its field of config.json if none does).
fn flag(setting: Setting) -> String {
    SETTING_FLAGS
        .iter()
        .find(|(s, _)| *s == setting)
        .map_or_else(
            || format!("`{}`", setting.field()),
            |(_, id)| format!("--{}", id.replace('_', "-")),
        )
}

/// A failure of `train`: a refused setting is a bad argument (exit 2),
/// named by its flag; other errors as [`Failure::from`].
fn train_failure(e: Error) -> Failure {
    match e {
        Error::Setting {
            setting,
            value,
            reason,
        } => Failure::new(2, format!("{} {value}: {reason}", flag(setting))),
        e => e.into(),
    }
}

/// The run configuration the flags describe, as a fresh run saves it.
fn training_config(args: &TrainArgs) -> TrainingConfig {
    let mut model = args.preset.unwrap_or(Preset::Paper).config();
    if let Some(spacing) = args.spacing_mm {
        model.spacing_mm = spacing;
    }
    if let Some(side) = args.patch {
        model.patch_size = [side; 3];
    }
    let mut config = TrainingConfig::new(model, args.steps)
        .with_seed(args.seed)
        .with_episode_seed(args.episode_seed)
        .with_batch_size(args.batch_size)
        .with_max_classes(args.max_classes)
        .with_regions(args.regions.clone())
        .with_whole_brain_zooms(if args.no_whole_brain {
            Vec::new()
        } else {
            args.whole_brain_zoom.clone()
        })
        .with_curriculum_fraction(args.curriculum_fraction)
        .with_curriculum_steps(args.curriculum_steps);
    if let Some(momentum) = args.bank_momentum {
        config.bank_momentum = momentum;
    }
    config
}

fn train(args: &TrainArgs, matches: &ArgMatches) -> Result<(), Failure> {
    if let Some(threads) = args.threads {
        rayon::ThreadPoolBuilder::new()
            .num_threads(threads)
            .build_global()
            .map_err(|e| Failure::new(2, format!("--threads {threads}: {e}")))?;
    }
    if args.checkpoint_every == 0 {
        return Err(Failure::new(2, "--checkpoint-every must be at least 1"));
    }
    for &zoom in &args.whole_brain_zoom {
        check_zoom(zoom).map_err(|e| Failure::new(2, format!("--whole-brain-zoom {zoom}: {e}")))?;
    }
    let device = iris_train::device::select_device();
    let mut trainer = if args.resume {
        let mut trainer = Trainer::resume(&args.out, &device)?;
        let given: Vec<Setting> = SETTING_FLAGS
            .iter()
            .filter(|(_, id)| matches.value_source(id) == Some(ValueSource::CommandLine))
            .map(|&(setting, _)| setting)
            .collect();
        trainer
            .config()
            .check_given(&training_config(args), &given)
            .map_err(train_failure)?;
        if let Some(rate) = args.restart_lr {
            trainer
                .restart_schedule(rate, args.steps)
                .map_err(|e| Failure::new(2, format!("--restart-lr {rate}: {e}")))?;
        }
        if let Some(seed) = args.episode_seed {
            trainer.reseed_episodes(seed);
        }
        trainer
    } else {
        if let Some(found) = checkpoint::find(&args.out) {
            return Err(Failure::new(
                4,
                format!(
                    "{} already holds a checkpoint: pass --resume to continue it, or choose another --out",
                    found.display()
                ),
            ));
        }
        let config = training_config(args);
        config.validate().map_err(|e| match e {
            Error::Setting { .. } => train_failure(e),
            e => Failure::new(2, e.to_string()),
        })?;
        Trainer::new(config, &device)?
    };

    let options = RunOptions {
        steps: args.steps,
        // No limit for one too long to represent.
        time_limit: args
            .minutes
            .and_then(|m| Duration::try_from_secs_f64(m.max(0.0) * 60.0).ok()),
        eval_every: args.eval_every,
        checkpoint_every: args.checkpoint_every,
        data_dir: args.data.clone(),
    };
    let bar = step_bar(args.steps, args.quiet);
    let summary = training::run(&args.out, &mut trainer, &options, |event| match event {
        Event::Started { step, .. } => bar.set_position(step as u64),
        Event::Step {
            step,
            stats,
            episodes_per_s,
        } => {
            bar.set_position(step as u64);
            bar.set_message(format!(
                "loss {:.4}  Dice {:.3}  {episodes_per_s:.2} episodes/s",
                stats.loss, stats.dice
            ));
        }
        _ => {}
    })
    .map_err(train_failure)?;
    bar.finish();
    if !args.quiet {
        let (loss, dice) = summary
            .last
            .map_or((f32::NAN, f32::NAN), |stats| (stats.loss, stats.dice));
        println!(
            "step {} of {}: loss {loss:.4}, Dice {dice:.3}; checkpoint in {}",
            summary.step,
            args.steps,
            summary.checkpoint.display()
        );
    }
    Ok(())
}

fn export(args: &ExportArgs) -> Result<(), Failure> {
    let start = Instant::now();
    let name = folder_name(args.name.as_ref(), &args.out)?;
    let device = iris_train::device::select_device();
    let fingerprint = match (&args.checkpoint, args.random, args.preset) {
        (Some(dir), ..) => {
            let trainer = Trainer::resume(run_folder(dir)?, &device)?;
            export::export(
                trainer.model(),
                &trainer.config().model,
                &name,
                &args.out,
                Some(trainer.bank()),
                args.classes_per_forward,
            )?
        }
        (None, true, Some(preset)) => {
            let config = preset.config();
            device.seed(args.seed);
            let model = config.init(&device)?;
            export::export(
                &model,
                &config,
                &name,
                &args.out,
                None,
                args.classes_per_forward,
            )?
        }
        _ => {
            return Err(Failure::new(
                2,
                "pass --checkpoint DIR or --random --preset P",
            ));
        }
    };
    if !args.quiet {
        let sizes: Vec<String> = [
            export::ENCODER_FILE,
            export::TASK_ENCODER_FILE,
            export::DECODER_FILE,
            export::BANK_FILE,
        ]
        .iter()
        .filter_map(|file| {
            let bytes = fs::metadata(args.out.join(file)).ok()?.len();
            Some(format!("{file} {:.2} MB", bytes as f64 / 1e6))
        })
        .collect();
        println!(
            "exported {name} to {} in {:.1} s: {}; fingerprint {fingerprint}",
            args.out.display(),
            start.elapsed().as_secs_f64(),
            sizes.join(", ")
        );
    }
    Ok(())
}

fn import(args: &ImportArgs) -> Result<(), Failure> {
    let start = Instant::now();
    let name = folder_name(args.name.as_ref(), &args.out)?;
    let options = ImportOptions {
        weights: match args.weights {
            WeightsArg::Ema => Weights::Ema,
            WeightsArg::Model => Weights::Model,
        },
        window: args.window.as_ref().map(|w| [w[0], w[1], w[2]]),
        spacing_mm: args.spacing,
    };
    let device = iris_train::device::select_device();
    // The burn checkpoint is a training state: its weights live on the
    // autodiff device.
    let device = if args.with_checkpoint {
        device.autodiff()
    } else {
        device
    };
    let imported = import_checkpoint(&args.checkpoint, &options, &device)?;
    let fingerprint = export::export_imported(&imported, &name, &args.out)?;
    if args.with_checkpoint {
        let config = TrainingConfig::new(imported.config.clone(), 1);
        Trainer::with_model(config, imported.model.clone())?.save_checkpoint(&args.out)?;
    }
    if !args.quiet {
        let config = &imported.config;
        println!(
            "imported {} ({} weights, sha256 {}): {} parameters, channels {:?}, window {:?} at {} mm",
            imported.source.file,
            imported.source.weights,
            imported.source.sha256,
            imported.parameters,
            config.channels,
            config.patch_size,
            config.spacing_mm
        );
        for (key, why) in &imported.ignored {
            println!("  ignored {key}: {why}");
        }
        println!(
            "wrote {name} to {} in {:.1} s; fingerprint {fingerprint}",
            args.out.display(),
            start.elapsed().as_secs_f64()
        );
    }
    Ok(())
}

/// The model's name: `name` if given, else the name of the folder `out`.
fn folder_name(name: Option<&String>, out: &Path) -> Result<String, Failure> {
    match (name, out.file_name()) {
        (Some(name), _) => Ok(name.clone()),
        (None, Some(folder)) => Ok(folder.to_string_lossy().into_owned()),
        (None, None) => Err(Failure::new(
            2,
            format!("--out {} has no folder name: pass --name", out.display()),
        )),
    }
}

/// A progress bar over `steps` steps on stderr (hidden when `quiet`).
fn step_bar(steps: usize, quiet: bool) -> ProgressBar {
    let bar = if quiet {
        ProgressBar::hidden()
    } else {
        ProgressBar::new(steps as u64)
    };
    bar.set_style(
        ProgressStyle::with_template("{bar:30} {pos}/{len} [{elapsed_precise} < {eta}] {msg}")
            .unwrap_or_else(|_| ProgressStyle::default_bar()),
    );
    bar
}

/// The training output folder of `dir`: `dir` itself when it holds a
/// checkpoint/, else its parent when `dir` is that checkpoint/ folder.
fn run_folder(dir: &Path) -> Result<&Path, Failure> {
    [Some(dir), dir.parent()]
        .into_iter()
        .flatten()
        .find(|run| checkpoint::find(run).is_some())
        .ok_or_else(|| {
            Failure::new(
                4,
                format!(
                    "{}: no checkpoint found (pass the --out folder of `iris-train train`)",
                    dir.display()
                ),
            )
        })
}

fn tune_task(args: &TuneArgs) -> Result<(), Failure> {
    let start = Instant::now();
    if args.images.len() != args.labels.len() {
        return Err(Failure::new(
            2,
            format!(
                "{} --images but {} --labels: give one label map per image",
                args.images.len(),
                args.labels.len()
            ),
        ));
    }
    let mut options = TuneOptions {
        steps: args.steps,
        learning_rate: args.lr,
        ..TuneOptions::default()
    };
    options
        .validate()
        .map_err(|e| Failure::new(2, e.to_string()))?;
    let unreadable = |path: &Path, e: iris_core::Error| match e {
        // I/O errors name the file already.
        iris_core::Error::Io { .. } => Failure::new(3, e.to_string()),
        e => Failure::new(3, format!("{}: {e}", path.display())),
    };
    let init = irisemb::read_file(&args.task).map_err(|e| unreadable(&args.task, e))?;
    let cases = args
        .images
        .iter()
        .zip(&args.labels)
        .map(|(image, labels)| {
            let (image_volume, _) = nifti::read_image(image).map_err(|e| unreadable(image, e))?;
            let (label_map, _) = nifti::read_labels(labels).map_err(|e| unreadable(labels, e))?;
            Ok((image_volume, label_map))
        })
        .collect::<Result<Vec<_>, Failure>>()?;
    let device = iris_train::device::select_device();
    let run = run_folder(&args.checkpoint)?;
    let trainer = Trainer::resume(run, &device)?;
    options.classes_per_forward = match args.classes_per_forward {
        Some(n) => n,
        None => manifest_grouping(run, trainer.fingerprint())?,
    };

    let bar = step_bar(args.steps, args.quiet);
    let tuned = tune(
        trainer.model(),
        &trainer.config().model,
        &init,
        &cases,
        &options,
        |step, loss| {
            bar.set_position(step as u64);
            bar.set_message(format!("loss {loss:.4}"));
        },
    )?;
    bar.finish();
    irisemb::write_file(&args.out, &tuned.embedding, Payload::F32)
        .map_err(|e| Failure::new(1, e.to_string()))?;
    if !args.quiet {
        println!(
            "tuned {} class(es) on {} case(s) in {:.1} s: loss {:.4} -> {:.4} after {} steps; \
             written to {}",
            tuned.embedding.classes().len(),
            cases.len(),
            start.elapsed().as_secs_f64(),
            tuned.initial_loss,
            tuned.final_loss,
            args.steps,
            args.out.display()
        );
    }
    Ok(())
}

/// How inference groups the classes of the model folder `run` (its
/// manifest's `classes_per_forward`; all classes in one run when the
/// manifest sets none), or the tuning default for a training folder
/// without a manifest.
///
/// A manifest of another model than the checkpoint's is refused (exit 3):
/// the folder was assembled from two models.
fn manifest_grouping(run: &Path, fingerprint: ModelFingerprint) -> Result<usize, Failure> {
    if !run.join(MANIFEST_FILE).is_file() {
        return Ok(TuneOptions::default().classes_per_forward);
    }
    let manifest = Manifest::read(run).map_err(|e| Failure::new(3, e.to_string()))?;
    if manifest.fingerprint != fingerprint {
        return Err(Failure::new(
            3,
            format!(
                "{}: model {} does not match its checkpoint's weights ({fingerprint}); \
                 re-export the checkpoint or pass --classes-per-forward",
                run.join(MANIFEST_FILE).display(),
                manifest.fingerprint
            ),
        ));
    }
    Ok(manifest.classes_per_forward.unwrap_or(usize::MAX))
}
