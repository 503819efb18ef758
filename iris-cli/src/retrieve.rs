//! `iris retrieve`: segment a query with the references of a pool chosen
//! for it (context retrieval, the paper's section 3.3), with the outputs of
//! `iris segment`.

use std::path::PathBuf;
use std::time::Instant;

use iris_core::Error;
use iris_core::engine::{EncodeOptions, Retrieval, RetrievalLevel, RetrieveOptions};
use iris_core::irisemb::{self, Payload};
use serde_json::{Map, Value, json};

use crate::claims::Claims;
use crate::commit::Staged;
use crate::failure::{BAD_INPUT, Failure, USAGE};
use crate::input::{ModelArgs, read_image};
use crate::inspect::class_list;
use crate::output::{
    Column, Extra, OutputArgs, SettingsArgs, Summary, WINDOWS, progress_bar, window_progress,
};
use crate::pool::{Layout, Pool};

/// Arguments of `iris retrieve`.
#[derive(clap::Args)]
pub struct Args {
    /// The volume to segment (NIfTI).
    #[arg(long, value_name = "QUERY.nii.gz")]
    image: PathBuf,
    /// The references: a folder in the nnU-Net layout (labelsTr/CASE.nii.gz
    /// with imagesTr/CASE_0000.nii.gz or imagesTr/CASE.nii.gz, optional
    /// dataset.json naming the labels), or a folder of .irisemb files
    /// (object level only).
    #[arg(long, value_name = "DIR")]
    pool: PathBuf,
    /// References averaged per class (object level) or images chosen
    /// (image level), at least 1; more than the pool takes all of it.
    #[arg(long, value_name = "N", value_parser = clap::value_parser!(u32).range(1..))]
    top_k: u32,
    /// How references are chosen.
    #[arg(long, value_enum, default_value_t)]
    level: Level,
    /// Classes to segment, comma-separated: label values, or names (of the
    /// .irisemb files, or of the pool's dataset.json). Default: every label
    /// in the pool.
    #[arg(long, value_delimiter = ',', value_name = "IDS_OR_NAMES")]
    classes: Vec<String>,
    /// The reference that segments the query first (object level) and
    /// names the classes: a case name or file stem. Default: the first in
    /// sorted order.
    #[arg(long, value_name = "NAME")]
    initial: Option<String>,
    #[command(flatten)]
    model: ModelArgs,
    #[command(flatten)]
    outputs: OutputArgs,
    /// Also write the task embedding retrieved (per class, the average of
    /// the references chosen), for `iris segment --task`.
    #[arg(long, value_name = "TASK.irisemb", help_heading = "Outputs")]
    save_task: Option<PathBuf>,
    #[command(flatten)]
    settings: SettingsArgs,
}

/// `--level`.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, clap::ValueEnum)]
enum Level {
    /// Per class: segment once with the initial reference, encode the
    /// query's predicted masks, and take the references whose class
    /// embeddings are most similar (the paper's method).
    #[default]
    Object,
    /// Per query: take the references whose whole images are most similar
    /// (mean deepest encoder features); needs an image pool.
    Image,
}

impl Level {
    fn engine(self) -> RetrievalLevel {
        match self {
            Level::Object => RetrievalLevel::Object,
            Level::Image => RetrievalLevel::Image,
        }
    }

    fn name(self) -> &'static str {
        match self {
            Level::Object => "object",
            Level::Image => "image",
        }
    }
}

/// Runs `iris retrieve`.
pub fn run(args: &Args, quiet: bool) -> Result<(), Failure> {
    let mut claims = Claims::default();
    args.outputs.claim(&mut claims)?;
    args.settings.check()?;
    if let Some(path) = &args.save_task {
        claims.output("--save-task", path, &[])?;
    }
    let layout = Layout::scan(&args.pool)?;
    claims.input("--image", &args.image);
    layout.claim(&args.pool, &mut claims);
    args.model.claim(&mut claims);
    claims.check()?;
    if args.level == Level::Image && !layout.has_descriptors() {
        return Err(Failure::new(
            USAGE,
            format!(
                "--level image compares whole images, but the pool {} holds .irisemb files, \
                 which keep no image descriptor: use --level object, or a pool of images \
                 and label maps (imagesTr/, labelsTr/)",
                args.pool.display()
            ),
        ));
    }
    if let Some(name) = &args.initial {
        let names = layout.names();
        if !names.contains(&name.as_str()) {
            let shown: Vec<&str> = names.iter().take(40).copied().collect();
            let more = if names.len() > 40 { ", ..." } else { "" };
            return Err(Failure::new(
                USAGE,
                format!(
                    "--initial {name:?}: no reference of that name in {} (references: {}{more})",
                    args.pool.display(),
                    shown.join(", ")
                ),
            ));
        }
    }
    let model = args.model.load()?;
    let limits = args.model.limits();
    let (query, query_info) = read_image(&args.image, &limits)?;

    let start = Instant::now();
    let pool = layout.load(
        &args.pool,
        &model,
        &args.classes,
        &EncodeOptions {
            intensity: args.settings.modality.policy(),
            limits,
        },
        quiet,
    )?;
    let pool_seconds = start.elapsed().as_secs_f64();
    let initial = match &args.initial {
        Some(name) => pool
            .references
            .iter()
            .position(|r| r.name == *name)
            .ok_or_else(|| {
                Failure::new(
                    BAD_INPUT,
                    format!(
                        "--initial {name:?}: that case was skipped (it has none of the classes)"
                    ),
                )
            })?,
        None => 0,
    };

    let start = Instant::now();
    let passes = match args.level {
        Level::Object => 2,
        Level::Image => 1,
    };
    let bar = progress_bar(quiet, WINDOWS);
    let options = RetrieveOptions {
        level: args.level.engine(),
        top_k: args.top_k as usize,
        initial,
        segment: args
            .settings
            .options(&args.outputs, limits, window_progress(&bar, passes)),
    };
    let result = model.retrieve(&query, &pool.references, &pool.classes, &options);
    bar.finish_and_clear();
    let retrieval = result.map_err(|e| match e {
        // About the pool: the classes, the references, the options.
        Error::InvalidArgument { .. }
        | Error::ModelMismatch { .. }
        | Error::ShapeMismatch { .. } => Failure::input(&args.pool, e),
        _ => Failure::input(&args.image, e),
    })?;
    let seconds = start.elapsed().as_secs_f64();

    let mut staged = Staged::default();
    let written = args
        .outputs
        .write(&query, &query_info, &retrieval.segmentation, &mut staged)?;
    if let Some(path) = &args.save_task {
        staged.write(path, |tmp| {
            irisemb::write_file(tmp, &retrieval.task, Payload::F32)
        })?;
    }
    staged.commit()?;
    let summary = Summary {
        image: &args.image,
        task: &retrieval.task,
        segmentation: &retrieval.segmentation,
        written: &written,
        seconds,
        precision: model.precision(),
        extra: extra(args, &layout, &pool, initial, &retrieval, pool_seconds),
    };
    args.outputs.report(&summary, quiet);
    Ok(())
}

/// What the summary adds: the pool, level and k, and per class the
/// references chosen with their similarities (`-` / null when the first
/// pass found nothing of the class to compare).
fn extra(
    args: &Args,
    layout: &Layout,
    pool: &Pool,
    initial: usize,
    retrieval: &Retrieval,
    pool_seconds: f64,
) -> Extra {
    let name = |index: usize| pool.references[index].name.as_str();
    let first = name(initial);
    let mut lines = vec![format!(
        "{} {} references from {} in {pool_seconds:.2} s{}",
        if layout.has_descriptors() {
            "encoded"
        } else {
            "read"
        },
        pool.references.len(),
        args.pool.display(),
        if pool.skipped.is_empty() {
            String::new()
        } else {
            format!(" (skipped {})", pool.skipped.join(", "))
        }
    )];
    lines.push(match args.level {
        Level::Object => format!(
            "object level, top {}: first pass with {first}, then per class the most similar",
            args.top_k
        ),
        Level::Image => format!(
            "image level, top {}: the references whose whole images are most similar",
            args.top_k
        ),
    });
    let cells = retrieval
        .segmentation
        .classes
        .iter()
        .map(|&label| {
            let chosen = retrieval
                .choices
                .iter()
                .find(|c| c.label == label)
                .map_or(&[][..], |c| c.chosen.as_slice());
            if !chosen.is_empty() && chosen.iter().all(|r| r.similarity.is_nan()) {
                lines.push(format!(
                    "label {label}: the first pass found none of it, so every reference \
                     that has it was averaged"
                ));
            }
            let text = chosen
                .iter()
                .map(|r| match r.similarity {
                    s if s.is_nan() => format!("{} (-)", name(r.index)),
                    s => format!("{} ({s:.3})", name(r.index)),
                })
                .collect::<Vec<_>>()
                .join(", ");
            let value = chosen
                .iter()
                .map(|r| {
                    json!({
                        "name": name(r.index),
                        "similarity": (!r.similarity.is_nan()).then_some(r.similarity),
                    })
                })
                .collect();
            (text, Value::Array(value))
        })
        .collect();
    if let Some(path) = &args.save_task {
        lines.push(format!(
            "wrote {}: {} class(es) ({})",
            path.display(),
            retrieval.task.classes().len(),
            class_list(&retrieval.task)
        ));
    }
    let mut fields = Map::new();
    fields.insert(
        "retrieval".into(),
        json!({
            "pool": args.pool.display().to_string(),
            "pool_kind": layout.kind(),
            "level": args.level.name(),
            "top_k": args.top_k,
            "initial": first,
            "references": pool.references.iter().map(|r| r.name.as_str()).collect::<Vec<_>>(),
            "skipped": pool.skipped,
            "pool_seconds": pool_seconds,
        }),
    );
    fields.insert(
        "task".into(),
        json!(args.save_task.as_ref().map(|p| p.display().to_string())),
    );
    Extra {
        fields,
        lines,
        column: Some(Column {
            heading: "references (similarity)",
            key: "references",
            cells,
        }),
    }
}
