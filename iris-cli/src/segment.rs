//! `iris segment`: a query volume to a label map, with optional probability
//! maps and a PNG preview.

use std::path::{Path, PathBuf};
use std::time::Instant;

use clap::ArgGroup;
use iris_core::Model;
use iris_core::embedding::TaskEmbedding;

use crate::claims::Claims;
use crate::commit::Staged;
use crate::failure::{Failure, MODEL, USAGE};
use crate::input::{ModelArgs, read_image, read_task_for_model};
use crate::output::{
    Extra, OutputArgs, SettingsArgs, Summary, WINDOWS, progress_bar, window_progress,
};
use crate::reference::Reference;

/// Arguments of `iris segment`.
#[derive(clap::Args)]
#[command(group(
    ArgGroup::new("source").required(true).args(["task", "bank", "ref_image"])
))]
pub struct Args {
    /// The volume to segment (NIfTI).
    #[arg(long, value_name = "QUERY.nii.gz")]
    image: PathBuf,
    /// A task embedding (from `iris encode` or `iris ensemble`, or a memory
    /// bank file).
    #[arg(long, value_name = "TASK.irisemb")]
    task: Option<PathBuf>,
    /// Use the memory bank shipped with the model (pick classes with --classes).
    #[arg(long)]
    bank: bool,
    /// A reference image to encode on the fly (with --ref-label).
    #[arg(long, value_name = "REF.nii.gz", requires = "ref_label")]
    ref_image: Option<PathBuf>,
    /// The reference's label map, on its grid.
    #[arg(long, value_name = "REF_LABEL.nii.gz", requires = "ref_image")]
    ref_label: Option<PathBuf>,
    /// Classes, comma-separated. With --ref-label: label values to encode
    /// (default: every label). With --task or --bank: label values or class
    /// names to use (default: every class).
    #[arg(
        long,
        alias = "bank-classes",
        value_delimiter = ',',
        value_name = "IDS_OR_NAMES"
    )]
    classes: Vec<String>,
    /// With --ref-label: a name for each encoded class, in order.
    #[arg(
        long,
        value_delimiter = ',',
        value_name = "NAME1,NAME2,..",
        requires = "ref_label"
    )]
    names: Vec<String>,
    #[command(flatten)]
    model: ModelArgs,
    #[command(flatten)]
    outputs: OutputArgs,
    #[command(flatten)]
    settings: SettingsArgs,
}

/// Runs `iris segment`.
pub fn run(args: &Args, quiet: bool) -> Result<(), Failure> {
    let mut claims = Claims::default();
    args.outputs.claim(&mut claims)?;
    args.settings.check()?;
    claims.input("--image", &args.image);
    for (option, path) in [
        ("--task", &args.task),
        ("--ref-image", &args.ref_image),
        ("--ref-label", &args.ref_label),
    ] {
        if let Some(path) = path {
            claims.input(option, path);
        }
    }
    args.model.claim(&mut claims);
    claims.check()?;
    let model = args.model.load()?;
    let (query, query_info) = read_image(&args.image, &args.model.limits())?;
    let task = task(args, &model, quiet)?;

    let start = Instant::now();
    let bar = progress_bar(quiet, WINDOWS);
    let options =
        args.settings
            .options(&args.outputs, args.model.limits(), window_progress(&bar, 1));
    let result = model.segment(&query, &task, &options);
    bar.finish_and_clear();
    let segmentation = result.map_err(|e| Failure::input(&args.image, e))?;
    let seconds = start.elapsed().as_secs_f64();

    let mut staged = Staged::default();
    let written = args
        .outputs
        .write(&query, &query_info, &segmentation, &mut staged)?;
    staged.commit()?;
    let summary = Summary {
        image: &args.image,
        task: &task,
        segmentation: &segmentation,
        written: &written,
        seconds,
        precision: model.precision(),
        extra: Extra::default(),
    };
    args.outputs.report(&summary, quiet);
    Ok(())
}

/// The task embedding asked for: a file, the model's bank, or the
/// reference encoded now; with --classes, only those classes.
fn task(args: &Args, model: &Model, quiet: bool) -> Result<TaskEmbedding, Failure> {
    if let (Some(image), Some(labels)) = (&args.ref_image, &args.ref_label) {
        let classes = args
            .classes
            .iter()
            .map(|c| {
                c.parse::<u16>().map_err(|_| {
                    Failure::new(
                        USAGE,
                        format!(
                            "--classes {c:?}: with --ref-label, classes are label values \
                             (name them with --names)"
                        ),
                    )
                })
            })
            .collect::<Result<Vec<_>, _>>()?;
        let reference = Reference {
            image,
            labels,
            classes: &classes,
            names: &args.names,
            modality: args.settings.modality,
            limits: args.model.limits(),
        };
        return reference.encode(model, quiet);
    }
    let (task, source) = match &args.task {
        Some(path) => (read_task_for_model(path, model)?, path.clone()),
        None => {
            let bank = model
                .memory_bank()
                .map_err(|e| Failure::new(MODEL, format!("the model's memory bank: {e}")))?;
            let bank = bank.ok_or_else(|| {
                Failure::new(
                    MODEL,
                    "the model has no memory bank (its manifest names none): use --task or --ref-image",
                )
            })?;
            (bank, PathBuf::from("the model's memory bank"))
        }
    };
    select(task, &args.classes, &source)
}

/// The classes of `task` named by `keys` (label values or names), in that
/// order; all of them when `keys` is empty.
fn select(task: TaskEmbedding, keys: &[String], source: &Path) -> Result<TaskEmbedding, Failure> {
    if keys.is_empty() {
        return Ok(task);
    }
    let bad = |e| Failure::input(source, e);
    let labels = keys
        .iter()
        .map(|key| match key.parse::<u32>() {
            Ok(label) => Ok(label),
            Err(_) => task
                .select_names(&[key.as_str()])
                .map(|one| one.classes()[0].label())
                .map_err(bad),
        })
        .collect::<Result<Vec<_>, _>>()?;
    task.select_labels(&labels).map_err(bad)
}
