//! `iris-eval strategies`: the inference strategies of the paper's figure 4
//! on held-out real anatomy (issue 6) — one-shot, context ensembles of
//! 1..N references, object- vs image-level retrieval at several top-k, and
//! in-context tuning on 1..N cases.
//!
//! The task is one of [`tasks`] (by default the held-out AAL structures:
//! reference Colin27 with AAL, query MNI152 with AAL3 mapped to AAL by
//! name, approximate truth).
//! The pool of references is the Colin27 reference and moved copies of it
//! (seeds from [`POOL_SEED`]): the data hold one labelled human subject, so
//! the moves stand in for further subjects. The queries are the aligned
//! MNI152 and moved copies of it (seeds 1, 2, ...), moved as in
//! [`report`](crate::report).
//!
//! Tuning needs burn, which this crate does not link: `--write-pool`
//! writes the pool (nnU-Net layout) and the one-shot embedding, `iris-train
//! tune` tunes it on the first n pool cases, and `--tuned n=FILE` scores
//! the result as a row. `scripts/strategies.sh` runs the whole figure.

use std::fmt::Write as _;
use std::path::{Path, PathBuf};
use std::time::Instant;

use iris_core::embedding::TaskEmbedding;
use iris_core::engine::{
    EncodeOptions, Model, PoolReference, RetrievalLevel, RetrieveOptions, SegmentOptions,
};
use iris_core::irisemb::{self, Payload};
use iris_core::metrics::dice_per_class;
use iris_core::nifti::{write_image, write_labels};
use iris_core::volume::{Image, LabelMap};
use iris_core::{Error, Result};

use crate::moves::{Move, about_centre, move_image, move_labels};
use crate::report::utc_now;
use crate::tasks::{self, Limits, Structure};

/// Pool references 2.. are the reference moved with seeds `POOL_SEED + i`
/// (the queries use 1, 2, ...; the ensembles of `report` use 1000 + i).
pub const POOL_SEED: u64 = 2000;

/// The default task: the 12 held-out AAL structures.
pub const DEFAULT_TASK: &str = "aal-colin27-to-mni152";

/// What to run.
#[derive(Clone, Debug)]
pub struct Options {
    /// The task's id (see [`tasks::build`]), e.g. [`DEFAULT_TASK`].
    pub task: String,
    /// The model folder.
    pub model: PathBuf,
    /// The data folder of `scripts/fetch-data.sh`.
    pub data: PathBuf,
    /// References in the pool (the reference and `pool - 1` moved copies).
    pub pool: usize,
    /// Moved queries besides the aligned one.
    pub moves: usize,
    /// Top-k values of the retrieval rows (those above `pool` are skipped).
    pub top_ks: Vec<usize>,
    /// Tuned embeddings to score: (number of tuning cases, file).
    pub tuned: Vec<(usize, PathBuf)>,
    /// At most this many structures (`None`: all 12).
    pub structures: Option<usize>,
    /// Where to write the pool for `iris-train tune`, if anywhere.
    pub write_pool: Option<PathBuf>,
    /// The command line, printed in the report.
    pub command: String,
}

/// One row of the figure: a strategy with a number of references and its
/// mean Dice over the structures, per query.
#[derive(Clone, Debug, PartialEq)]
pub struct Row {
    /// "one-shot", "ensemble", "object retrieval", "image retrieval" or
    /// "in-context tuning".
    pub strategy: &'static str,
    /// References used: ensemble size, top-k, or tuning cases.
    pub references: usize,
    /// Mean Dice over the structures, per query (aligned first); `None`
    /// where no structure is in the query's truth or prediction.
    pub dice: Vec<Option<f64>>,
}

impl Row {
    /// Mean over the moved queries (all but the first).
    pub fn moved_mean(&self) -> Option<f64> {
        mean(self.dice.iter().skip(1).copied())
    }
}

/// A query with its truth.
#[derive(Clone, Debug)]
pub struct Scored {
    /// e.g. "MNI152 (aligned)" or "MNI152 moved (seed 2)".
    pub name: String,
    /// The query image.
    pub image: Image,
    /// Its truth.
    pub truth: LabelMap,
}

/// The result of a run.
#[derive(Clone, Debug)]
pub struct Figure {
    /// What ran.
    pub options: Options,
    /// The model's name and fingerprint.
    pub model_name: String,
    /// Hex fingerprint of the model.
    pub fingerprint: String,
    /// The task's title, reference and caveats.
    pub task_title: String,
    /// What the reference is.
    pub reference_name: String,
    /// Caveats of the task (approximate truths...).
    pub notes: Vec<String>,
    /// The structures scored.
    pub structures: Vec<Structure>,
    /// The queries' names, aligned first.
    pub queries: Vec<String>,
    /// The rows, in figure order.
    pub rows: Vec<Row>,
    /// Wall time of the run, seconds.
    pub total_s: f64,
    /// Start time (UTC).
    pub started: String,
}

/// Runs the figure: builds the task, its pool and queries,
/// optionally writes the pool, then scores every strategy.
///
/// # Errors
/// Missing data or model, unreadable tuned files (naming them), an
/// embedding of another model, and engine errors.
pub fn run(options: &Options, mut progress: impl FnMut(&str)) -> Result<Figure> {
    let started = utc_now();
    let start = Instant::now();
    if options.pool == 0 {
        return Err(Error::invalid("pool", "must hold at least one reference"));
    }
    let model = Model::load(&options.model)?;
    let limits = Limits {
        structures: options.structures,
    };
    let task = tasks::find(tasks::build(&options.data, limits)?, &options.task)?;
    let labels = task.labels();
    progress(&format!(
        "{}: {} structures, pool of {}, {} queries",
        task.title,
        labels.len(),
        options.pool,
        options.moves + 1
    ));
    let references = pool_volumes(&task.reference, &task.reference_labels, options.pool)?;
    if let Some(dir) = &options.write_pool {
        write_pool(dir, &task.title, &references, &task.structures)?;
    }
    let classes = task.classes();
    let mut pool = Vec::with_capacity(references.len());
    for (i, (name, image, labels)) in references.iter().enumerate() {
        progress(&format!(
            "encoding pool reference {}/{}",
            i + 1,
            references.len()
        ));
        pool.push(model.encode_pool_reference(
            name.clone(),
            image,
            labels,
            &classes,
            &EncodeOptions::default(),
        )?);
    }
    if let Some(dir) = &options.write_pool {
        irisemb::write_file(dir.join("reference.irisemb"), &pool[0].task, Payload::F32)?;
    }
    let mut queries = vec![Scored {
        name: format!("{} (aligned)", task.query.name),
        image: task.query.image.clone(),
        truth: task.query.truth.clone(),
    }];
    for seed in 1..=options.moves as u64 {
        let transform = about_centre(&Move::random(seed), task.query.image.geometry());
        queries.push(Scored {
            name: format!("{} moved (seed {seed})", task.query.name),
            image: move_image(&task.query.image, &transform)?,
            truth: move_labels(&task.query.truth, &transform)?,
        });
    }
    let mut rows = rows(
        &model,
        &pool,
        &queries,
        &labels,
        &options.top_ks,
        &mut progress,
    )?;
    for (cases, path) in &options.tuned {
        let bytes = std::fs::read(path).map_err(|source| Error::Io {
            path: path.clone(),
            source,
        })?;
        let tuned = irisemb::read_for_model(&bytes, &model.manifest().fingerprint)
            .map_err(|e| Error::invalid("tuned", format!("{}: {e}", path.display())))?;
        progress(&format!("scoring the embedding tuned on {cases} cases"));
        rows.push(Row {
            strategy: "in-context tuning",
            references: *cases,
            dice: score_task(&model, &tuned, &queries, &labels)?,
        });
    }
    Ok(Figure {
        options: options.clone(),
        model_name: model.manifest().name.clone(),
        fingerprint: model.manifest().fingerprint.to_string(),
        task_title: task.title.clone(),
        reference_name: task.reference_name.clone(),
        notes: task.notes.clone(),
        structures: task.structures.clone(),
        queries: queries.into_iter().map(|q| q.name).collect(),
        rows,
        total_s: start.elapsed().as_secs_f64(),
        started,
    })
}

/// The pool's volumes: `(name, image, labels)` of the reference and
/// `count - 1` moved copies of it.
///
/// # Errors
/// As the resampling of the moves.
pub fn pool_volumes(
    reference: &Image,
    labels: &LabelMap,
    count: usize,
) -> Result<Vec<(String, Image, LabelMap)>> {
    let mut pool = vec![("reference".to_string(), reference.clone(), labels.clone())];
    for i in 1..count as u64 {
        let transform = about_centre(&Move::random(POOL_SEED + i), reference.geometry());
        pool.push((
            format!("moved {i}"),
            move_image(reference, &transform)?,
            move_labels(labels, &transform)?,
        ));
    }
    Ok(pool)
}

/// Writes the pool in the nnU-Net layout (`imagesTr/pool_NNN_0000.nii.gz`,
/// `labelsTr/pool_NNN.nii.gz`, `dataset.json` with the structures' names),
/// which `iris retrieve --pool` and `iris-train tune` read.
///
/// # Errors
/// [`Error::Io`] naming the path.
pub fn write_pool(
    dir: &Path,
    title: &str,
    pool: &[(String, Image, LabelMap)],
    structures: &[Structure],
) -> Result<()> {
    for sub in ["imagesTr", "labelsTr"] {
        let path = dir.join(sub);
        std::fs::create_dir_all(&path).map_err(|source| Error::Io { path, source })?;
    }
    for (i, (_, image, labels)) in pool.iter().enumerate() {
        write_image(
            dir.join(format!("imagesTr/pool_{i:03}_0000.nii.gz")),
            image,
            None,
        )?;
        write_labels(
            dir.join(format!("labelsTr/pool_{i:03}.nii.gz")),
            labels,
            None,
        )?;
    }
    let clean = |text: &str| -> String {
        text.chars()
            .filter(|c| !matches!(c, '"' | '\\') && !c.is_control())
            .collect()
    };
    let mut json = format!("{{\n  \"name\": \"iris pool: {}\",\n", clean(title));
    json.push_str("  \"channel_names\": {\"0\": \"T1\"},\n  \"labels\": {\"background\": 0");
    for s in structures {
        let _ = write!(json, ", \"{}\": {}", clean(&s.name), s.label);
    }
    let _ = write!(
        json,
        "}},\n  \"numTraining\": {},\n  \"file_ending\": \".nii.gz\"\n}}\n",
        pool.len()
    );
    let path = dir.join("dataset.json");
    std::fs::write(&path, json).map_err(|source| Error::Io { path, source })
}

/// Mean Dice over `labels` of `task` on each query.
///
/// # Errors
/// As [`Model::segment`].
pub fn score_task(
    model: &Model,
    task: &TaskEmbedding,
    queries: &[Scored],
    labels: &[u16],
) -> Result<Vec<Option<f64>>> {
    queries
        .iter()
        .map(|q| {
            let seg = model.segment(&q.image, task, &SegmentOptions::default())?;
            Ok(mean(dice_per_class(&seg.labels, &q.truth, labels)?))
        })
        .collect()
}

/// Every row of the figure but tuning, for `pool` on `queries`: one-shot
/// (each reference alone, averaged over the references), ensembles of the
/// first 2..N references, then object- and image-level retrieval at each
/// top-k of `top_ks` up to the pool's size.
///
/// # Errors
/// As [`Model::segment`] and [`Model::retrieve`].
pub fn rows(
    model: &Model,
    pool: &[PoolReference],
    queries: &[Scored],
    labels: &[u16],
    top_ks: &[usize],
    progress: &mut impl FnMut(&str),
) -> Result<Vec<Row>> {
    let mut rows = Vec::new();
    progress("one-shot");
    let singles = pool
        .iter()
        .map(|reference| score_task(model, &reference.task, queries, labels))
        .collect::<Result<Vec<_>>>()?;
    rows.push(Row {
        strategy: "one-shot",
        references: 1,
        dice: (0..queries.len())
            .map(|q| mean(singles.iter().map(|s| s[q])))
            .collect(),
    });
    for n in 2..=pool.len() {
        progress(&format!("ensemble of {n}"));
        let parts: Vec<TaskEmbedding> = pool[..n].iter().map(|r| r.task.clone()).collect();
        rows.push(Row {
            strategy: "ensemble",
            references: n,
            dice: score_task(model, &TaskEmbedding::ensemble(&parts)?, queries, labels)?,
        });
    }
    let classes: Vec<u32> = labels.iter().map(|&l| u32::from(l)).collect();
    for (strategy, level) in [
        ("object retrieval", RetrievalLevel::Object),
        ("image retrieval", RetrievalLevel::Image),
    ] {
        for &k in top_ks.iter().filter(|&&k| k >= 1 && k <= pool.len()) {
            progress(&format!("{strategy}, top {k}"));
            let options = RetrieveOptions {
                level,
                top_k: k,
                ..RetrieveOptions::default()
            };
            let dice = queries
                .iter()
                .map(|q| {
                    let result = model.retrieve(&q.image, pool, &classes, &options)?;
                    Ok(mean(dice_per_class(
                        &result.segmentation.labels,
                        &q.truth,
                        labels,
                    )?))
                })
                .collect::<Result<Vec<_>>>()?;
            rows.push(Row {
                strategy,
                references: k,
                dice,
            });
        }
    }
    Ok(rows)
}

/// The Markdown report: how it was made, then one table (rows: strategies;
/// columns: queries and the mean over moved ones).
pub fn markdown(figure: &Figure) -> String {
    let o = &figure.options;
    let mut md = String::from("# Inference strategies (paper, figure 4)\n\n");
    let _ = writeln!(
        md,
        "Model `{}` (fingerprint `{}`), run {} in {:.0} s. Regenerate with \
         `scripts/strategies.sh` (the plot: `scripts/plot_strategies.py`); this table came from\n\n```\n{}\n```\n",
        figure.model_name, figure.fingerprint, figure.started, figure.total_s, o.command
    );
    let names: Vec<&str> = figure.structures.iter().map(|s| s.name.as_str()).collect();
    let _ = writeln!(
        md,
        "Task `{}`: {} ({} structures: {}). Pool: the reference ({}) and {} moved copies of it \
         (rotation <= 20 deg, shift <= 20 mm, scale 0.9-1.1; the data hold one labelled subject \
         per species). Queries: aligned and moved. Each cell is the mean Dice over the \
         structures. One-shot is averaged over the pool's references; ensembles and tuning use \
         the first n pool references; retrieval picks the top k per class (object level) or per \
         image (image level) from the whole pool.\n",
        o.task,
        figure.task_title,
        names.len(),
        names.join(", "),
        figure.reference_name,
        o.pool.saturating_sub(1)
    );
    for note in &figure.notes {
        let _ = writeln!(md, "- {note}");
    }
    md.push('\n');
    md.push_str("| strategy | n / k |");
    for q in &figure.queries {
        let _ = write!(md, " {q} |");
    }
    md.push_str(" moved mean |\n|---|---|");
    md.push_str(&"---|".repeat(figure.queries.len() + 1));
    md.push('\n');
    let cell = |d: Option<f64>| d.map_or_else(|| "-".to_string(), |d| format!("{d:.3}"));
    for row in &figure.rows {
        let _ = write!(md, "| {} | {} |", row.strategy, row.references);
        for &d in &row.dice {
            let _ = write!(md, " {} |", cell(d));
        }
        let _ = writeln!(md, " {} |", cell(row.moved_mean()));
    }
    md
}

/// The rows as CSV: `strategy,references,query,dice`, one line per cell.
pub fn csv(figure: &Figure) -> String {
    let mut out = String::from("strategy,references,query,dice\n");
    for row in &figure.rows {
        for (query, d) in figure.queries.iter().zip(&row.dice) {
            let d = d.map_or_else(String::new, |d| format!("{d:.4}"));
            let _ = writeln!(out, "{},{},{query},{d}", row.strategy, row.references);
        }
    }
    out
}

fn mean(values: impl IntoIterator<Item = Option<f64>>) -> Option<f64> {
    let present: Vec<f64> = values.into_iter().flatten().collect();
    (!present.is_empty()).then(|| present.iter().sum::<f64>() / present.len() as f64)
}
