//! Running the report's tasks: every task on its aligned and moved
//! queries, the model, the position-copy baseline, the resolution ceiling
//! and the memory bank scored, timings measured; everything in a [`Run`].

use std::path::PathBuf;
use std::time::Instant;

use iris_core::Result;
use iris_core::embedding::{ClassEmbedding, TaskEmbedding};
use iris_core::engine::{EncodeOptions, Model, SegmentOptions};
use iris_core::metrics::dice_per_class;
use iris_core::preprocess::{resample_labels, target_geometry};
use iris_core::volume::{Image, LabelMap};

use super::render::mean_text;
use crate::moves::{Move, about_centre, move_image, move_labels};
use crate::tasks::{self, Kind, Limits, Structure, Task};

/// Structures per task with `--quick`.
pub const QUICK_STRUCTURES: usize = 2;

/// References of the largest ensemble with `--quick`.
pub const QUICK_REFERENCES: usize = 3;

/// The moved copies of a reference for the context ensemble use seeds
/// `ENSEMBLE_SEED + 1`, `+ 2`, ... (the queries use 1, 2, ...).
pub const ENSEMBLE_SEED: u64 = 1000;

/// What to run.
#[derive(Clone, Debug)]
pub struct Options {
    /// The model folder (`manifest.json` and graphs).
    pub model: PathBuf,
    /// The data folder of `scripts/fetch-data.sh`.
    pub data: PathBuf,
    /// Moved queries per task (seeds 1 to `moves`).
    pub moves: usize,
    /// References of the largest context ensemble: the reference and
    /// `references - 1` moved copies of it (seeds from
    /// [`ENSEMBLE_SEED`]); ensembles of 1, 3 and all are scored. 1: none.
    pub references: usize,
    /// At most [`QUICK_STRUCTURES`] structures per task, one move and
    /// ensembles of at most [`QUICK_REFERENCES`] references.
    pub quick: bool,
    /// The command line that made the report, printed in it.
    pub command: String,
    /// Markdown written by hand about the model (how it was trained, why it
    /// falls short), included after the goals table.
    pub notes: Option<String>,
}

/// One query of a task: aligned (`seed` `None`) or moved.
#[derive(Clone, Debug)]
pub struct QueryResult {
    /// The move's seed, `None` for the aligned query.
    pub seed: Option<u64>,
    /// The move applied (identity for the aligned query).
    pub motion: Move,
    /// Model Dice per structure (task order); `None`: absent from both maps
    /// or the model failed (see [`TaskResult::model_error`]).
    pub model: Vec<Option<f64>>,
    /// Position-copy Dice per structure.
    pub baseline: Vec<Option<f64>>,
    /// Resolution ceiling per structure: Dice of the truth resampled to the
    /// model's spacing and back (nearest neighbour both ways), what a model
    /// perfect at its own spacing would score (see [`spacing_ceiling`]).
    pub ceiling: Vec<Option<f64>>,
    /// Memory-bank Dice per structure (the model's bank entries of the
    /// structures, no reference); empty when the task does not use the bank
    /// (see [`TaskResult::bank_note`]).
    pub bank: Vec<Option<f64>>,
    /// Seconds of `Model::segment` on this query.
    pub segment_s: f64,
    /// Windows the query was decoded in.
    pub windows: usize,
}

/// One task's results.
#[derive(Clone, Debug)]
pub struct TaskResult {
    /// Task identifier.
    pub id: &'static str,
    /// Heading.
    pub title: String,
    /// What it measures.
    pub kind: Kind,
    /// Reference description.
    pub reference: String,
    /// Query description.
    pub query: String,
    /// The structures scored.
    pub structures: Vec<Structure>,
    /// Caveats.
    pub notes: Vec<String>,
    /// Why the model could not run this task, if it could not.
    pub model_error: Option<String>,
    /// For the memory-bank task: why the bank was not scored, if it was not.
    pub bank_note: Option<String>,
    /// Seconds of `Model::encode_task`.
    pub encode_s: f64,
    /// Seconds of the position copy (one resampling for all queries).
    pub baseline_s: f64,
    /// Seconds for the whole task (moves and scoring included).
    pub total_s: f64,
    /// Aligned query first, then the moved ones.
    pub queries: Vec<QueryResult>,
    /// Context ensembles of more than one reference: the number of
    /// references and the model's Dice per query (as `queries`) and structure.
    pub ensembles: Vec<(usize, Vec<Vec<Option<f64>>>)>,
}

/// Everything the report shows.
#[derive(Clone, Debug)]
pub struct Run {
    /// What was asked.
    pub options: Options,
    /// The manifest's model name.
    pub model_name: String,
    /// The weights' fingerprint (hex).
    pub fingerprint: String,
    /// The model's patch, voxels `[D, H, W]`.
    pub patch: [usize; 3],
    /// The model's spacing, mm.
    pub spacing_mm: f64,
    /// Whether the model folder ships a memory bank.
    pub memory_bank: bool,
    /// Logical CPUs available.
    pub cpus: usize,
    /// CPU model from `/proc/cpuinfo`.
    pub cpu_model: String,
    /// Median seconds of one window (encoder + decoder, one class), if measured.
    pub window_s: Option<f64>,
    /// Per task.
    pub tasks: Vec<TaskResult>,
    /// Seconds for the whole run (data loading included).
    pub total_s: f64,
    /// UTC date and time the run started.
    pub started: String,
}

impl Run {
    /// True when the manifest names a random-weight export.
    pub fn random_model(&self) -> bool {
        self.model_name.contains("random")
    }
}

/// Runs every task; `progress` gets one line per step.
///
/// # Errors
/// A model folder that does not load; missing or unreadable data (see
/// [`tasks::build`]). A model that fails on one task is recorded in that
/// task ([`TaskResult::model_error`]) and the run goes on.
pub fn run(options: &Options, mut progress: impl FnMut(&str)) -> Result<Run> {
    let started = utc_now();
    let start = Instant::now();
    let model = Model::load(&options.model)?;
    let manifest = model.manifest().clone();
    progress(&format!(
        "model {} ({}), patch {:?} at {} mm",
        manifest.name,
        options.model.display(),
        manifest.patch_size,
        manifest.spacing_mm
    ));
    let limits = Limits {
        structures: options.quick.then_some(QUICK_STRUCTURES),
    };
    let tasks = tasks::build(&options.data, limits)?;
    progress(&format!(
        "read data in {:.1} s",
        start.elapsed().as_secs_f64()
    ));
    let (moves, references) = if options.quick {
        (
            options.moves.min(1),
            options.references.min(QUICK_REFERENCES),
        )
    } else {
        (options.moves, options.references)
    };
    let bank = model.memory_bank()?;
    let mut results = Vec::new();
    let mut one_class: Option<TaskEmbedding> = None;
    for task in &tasks {
        let from_bank = match (&bank, task.kind) {
            (_, kind) if kind != Kind::SeenAal => None,
            (None, _) => Some(Err("the model folder has no memory bank".to_string())),
            (Some(bank), _) => Some(bank_task(bank, &task.structures)?),
        };
        let (result, embedding) =
            run_task(&model, task, from_bank, moves, references, &mut progress)?;
        if one_class.is_none() {
            one_class = embedding.and_then(|e| {
                let first = e.classes().first().map(|c| c.label())?;
                e.select_labels(&[first]).ok()
            });
        }
        results.push(result);
    }
    let window_s = match &one_class {
        Some(task) => Some(time_window(&model, task)?),
        None => None,
    };
    Ok(Run {
        options: options.clone(),
        model_name: manifest.name.clone(),
        fingerprint: manifest.fingerprint.to_string(),
        patch: manifest.patch_size,
        spacing_mm: manifest.spacing_mm,
        memory_bank: manifest.memory_bank.is_some(),
        cpus: std::thread::available_parallelism().map_or(1, usize::from),
        cpu_model: cpu_model(),
        window_s,
        tasks: results,
        total_s: start.elapsed().as_secs_f64(),
        started,
    })
}

/// Ensemble sizes scored for `references` references: 3 and all, above 1.
pub fn ensemble_sizes(references: usize) -> Vec<usize> {
    let mut sizes: Vec<usize> = [3, references]
        .into_iter()
        .filter(|&n| n > 1 && n <= references)
        .collect();
    sizes.dedup();
    sizes
}

/// Runs one task on its aligned query and `moves` moved ones, with the
/// one-shot embedding, ensembles of up to `references` references and,
/// when given, the memory bank's entries (or why there are none).
fn run_task(
    model: &Model,
    task: &Task,
    bank: Option<std::result::Result<TaskEmbedding, String>>,
    moves: usize,
    references: usize,
    progress: &mut impl FnMut(&str),
) -> Result<(TaskResult, Option<TaskEmbedding>)> {
    let start = Instant::now();
    let labels = task.labels();
    let classes = task.classes();
    let encode = |image: &Image, labels: &LabelMap| {
        model.encode_task(image, labels, &classes, &EncodeOptions::default())
    };
    let t = Instant::now();
    let encoded = encode(&task.reference, &task.reference_labels);
    let encode_s = t.elapsed().as_secs_f64();
    let (embedding, mut model_error) = match encoded {
        Ok(e) => (Some(e), None),
        Err(e) => (None, Some(e.to_string())),
    };
    // The context ensembles: the reference and moved copies of it.
    let sizes = ensemble_sizes(references);
    let mut ensembles = Vec::new();
    if let (Some(first), Some(&largest)) = (&embedding, sizes.last()) {
        let mut parts = vec![first.clone()];
        for seed in (1..largest as u64).map(|i| ENSEMBLE_SEED + i) {
            let transform = about_centre(&Move::random(seed), task.reference.geometry());
            let image = move_image(&task.reference, &transform)?;
            let labels = move_labels(&task.reference_labels, &transform)?;
            match encode(&image, &labels) {
                Ok(e) => parts.push(e),
                Err(e) => {
                    model_error = Some(format!("moved reference (seed {seed}): {e}"));
                    break;
                }
            }
        }
        for &n in sizes.iter().filter(|&&n| n <= parts.len()) {
            ensembles.push((n, TaskEmbedding::ensemble(&parts[..n])?));
        }
    }
    let t = Instant::now();
    let copied = resample_labels(&task.reference_labels, task.query.image.geometry())?;
    let baseline_s = t.elapsed().as_secs_f64();

    let motions = std::iter::once((None, Move::IDENTITY))
        .chain((1..=moves as u64).map(|seed| (Some(seed), Move::random(seed))));
    let mut queries = Vec::new();
    let mut ensemble_dice = vec![Vec::new(); ensembles.len()];
    for (seed, motion) in motions {
        let (image, truth) = if seed.is_some() {
            let transform = about_centre(&motion, task.query.image.geometry());
            (
                move_image(&task.query.image, &transform)?,
                move_labels(&task.query.truth, &transform)?,
            )
        } else {
            (task.query.image.clone(), task.query.truth.clone())
        };
        let baseline = dice_per_class(&copied, &truth, &labels)?;
        let ceiling = spacing_ceiling(&truth, model.manifest().spacing_mm, &labels)?;
        let (model_dice, segment_s, windows) = match &embedding {
            Some(e) => segment(model, &image, e, &truth, &labels)?,
            None => (vec![None; labels.len()], 0.0, 0),
        };
        let query = seed.map_or_else(|| "aligned".to_string(), |s| format!("moved #{s}"));
        progress(&format!(
            "{} {query}: model {} | copy {} ({segment_s:.1} s, {windows} windows)",
            task.id,
            mean_text(&model_dice),
            mean_text(&baseline),
        ));
        let bank_dice = match &bank {
            Some(Ok(entries)) => {
                let (d, _, _) = segment(model, &image, entries, &truth, &labels)?;
                progress(&format!(
                    "{} {query}: memory bank {}",
                    task.id,
                    mean_text(&d)
                ));
                d
            }
            _ => Vec::new(),
        };
        for ((n, ensemble), dice) in ensembles.iter().zip(&mut ensemble_dice) {
            let (d, _, _) = segment(model, &image, ensemble, &truth, &labels)?;
            progress(&format!(
                "{} {query}: ensemble of {n} {}",
                task.id,
                mean_text(&d)
            ));
            dice.push(d);
        }
        queries.push(QueryResult {
            seed,
            motion,
            model: model_dice,
            baseline,
            ceiling,
            bank: bank_dice,
            segment_s,
            windows,
        });
    }
    let result = TaskResult {
        id: task.id,
        title: task.title.clone(),
        kind: task.kind,
        reference: task.reference_name.clone(),
        query: task.query.name.clone(),
        structures: task.structures.clone(),
        notes: task.notes.clone(),
        model_error,
        bank_note: bank.and_then(|b| b.err()),
        encode_s,
        baseline_s,
        total_s: start.elapsed().as_secs_f64(),
        queries,
        ensembles: ensembles
            .iter()
            .map(|(n, _)| *n)
            .zip(ensemble_dice)
            .collect(),
    };
    Ok((result, embedding))
}

/// The bank entries of AAL `structures` (training names them
/// `"aal:<label> <name>"`), relabelled to the AAL values so that they
/// score against AAL truth; `Err` naming the first structure the bank
/// lacks.
///
/// # Errors
/// An entry that does not form a valid embedding.
fn bank_task(
    bank: &TaskEmbedding,
    structures: &[Structure],
) -> Result<std::result::Result<TaskEmbedding, String>> {
    let mut classes = Vec::with_capacity(structures.len());
    for s in structures {
        let prefix = format!("aal:{} ", s.label);
        let Some(entry) = bank
            .classes()
            .iter()
            .find(|c| c.name().starts_with(&prefix))
        else {
            return Ok(Err(format!(
                "the memory bank has no entry aal:{} ({})",
                s.label, s.name
            )));
        };
        classes.push(ClassEmbedding::new(
            u32::from(s.label),
            entry.name(),
            entry.provenance(),
            entry.stages().to_vec(),
        )?);
    }
    Ok(Ok(TaskEmbedding::new(
        *bank.model(),
        *bank.preprocessing(),
        bank.stage_shapes().to_vec(),
        classes,
    )?))
}

/// The model's Dice per label on one query, the seconds and the windows.
fn segment(
    model: &Model,
    image: &Image,
    task: &TaskEmbedding,
    truth: &LabelMap,
    labels: &[u16],
) -> Result<(Vec<Option<f64>>, f64, usize)> {
    let t = Instant::now();
    let seg = model.segment(image, task, &SegmentOptions::default())?;
    let seconds = t.elapsed().as_secs_f64();
    Ok((
        dice_per_class(&seg.labels, truth, labels)?,
        seconds,
        seg.windows,
    ))
}

/// Dice per class of `truth` against itself resampled onto a
/// `spacing_mm` grid over the same field of view and back onto its own
/// grid, both by nearest neighbour: the best a model that labels every
/// voxel of its `spacing_mm` grid right can score on `truth`'s grid.
///
/// # Errors
/// An invalid spacing; `labels` absent from `truth` give `None` entries.
pub fn spacing_ceiling(
    truth: &LabelMap,
    spacing_mm: f64,
    labels: &[u16],
) -> Result<Vec<Option<f64>>> {
    let coarse = resample_labels(truth, &target_geometry(truth.geometry(), spacing_mm)?)?;
    let back = resample_labels(&coarse, truth.geometry())?;
    dice_per_class(&back, truth, labels)
}

/// Median seconds of one encoder + decoder run on a window (one class),
/// after one warm-up run.
fn time_window(model: &Model, task: &TaskEmbedding) -> Result<f64> {
    let [d, h, w] = model.manifest().patch_size;
    let window = ndarray_window(d, h, w);
    let once = || -> Result<f64> {
        let t = Instant::now();
        let features = model.encode_window(window.view())?;
        model.decode_window(&features, task)?;
        Ok(t.elapsed().as_secs_f64())
    };
    once()?;
    let mut times = (0..3).map(|_| once()).collect::<Result<Vec<_>>>()?;
    times.sort_by(f64::total_cmp);
    Ok(times[times.len() / 2])
}

/// A smooth z-scored-like test window `[D, H, W]`.
fn ndarray_window(d: usize, h: usize, w: usize) -> ndarray::Array3<f32> {
    ndarray::Array3::from_shape_fn((d, h, w), |(i, j, k)| {
        ((i as f32 * 0.3).sin() + (j as f32 * 0.2).cos() + (k as f32 * 0.1).sin()) / 1.5
    })
}

fn cpu_model() -> String {
    std::fs::read_to_string("/proc/cpuinfo")
        .ok()
        .and_then(|text| {
            text.lines()
                .find(|l| l.starts_with("model name"))
                .and_then(|l| l.split_once(':'))
                .map(|(_, v)| v.trim().to_string())
        })
        .unwrap_or_else(|| "unknown".into())
}

/// The current UTC time as `YYYY-MM-DD HH:MM UTC`.
pub(crate) fn utc_now() -> String {
    utc_text(
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.as_secs()),
    )
}

/// `secs` since the Unix epoch as `YYYY-MM-DD HH:MM UTC`.
fn utc_text(secs: u64) -> String {
    let (days, rem) = (secs / 86_400, secs % 86_400);
    // Civil date from days since 1970-01-01 (H. Hinnant's algorithm).
    let z = days as i64 + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z - era * 146_097;
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let day = doy - (153 * mp + 2) / 5 + 1;
    let month = if mp < 10 { mp + 3 } else { mp - 9 };
    let year = yoe + era * 400 + i64::from(month <= 2);
    format!(
        "{year:04}-{month:02}-{day:02} {:02}:{:02} UTC",
        rem / 3600,
        rem % 3600 / 60
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ensemble_sizes_are_three_and_all() {
        assert!(ensemble_sizes(1).is_empty());
        assert_eq!(ensemble_sizes(2), [2]);
        assert_eq!(ensemble_sizes(3), [3]);
        assert_eq!(ensemble_sizes(5), [3, 5]);
    }

    #[test]
    fn utc_dates() {
        assert_eq!(utc_text(0), "1970-01-01 00:00 UTC");
        // 2000-02-29 12:34 (a leap day) and 2026-11-28 09:43.
        assert_eq!(utc_text(951_827_640), "2000-02-29 12:34 UTC");
        assert_eq!(utc_text(1_795_858_980), "2026-11-28 09:43 UTC");
    }

    #[test]
    fn the_spacing_ceiling_is_exact_at_the_truth_spacing_and_falls_for_thin_structures() {
        use iris_core::volume::Affine;
        // 1 mm voxels: a 24 mm cube (label 1) and a 2 mm thin slab (label 2).
        let labels = ndarray::Array3::from_shape_fn((48, 48, 48), |(d, h, w)| {
            if (8..32).contains(&d) && (8..32).contains(&h) && (8..32).contains(&w) {
                1
            } else if (40..42).contains(&d) {
                2
            } else {
                0
            }
        });
        let affine = Affine([
            [1.0, 0.0, 0.0, -20.0],
            [0.0, 1.0, 0.0, -24.0],
            [0.0, 0.0, 1.0, 3.0],
            [0.0, 0.0, 0.0, 1.0],
        ]);
        let truth = LabelMap::new(labels, affine).expect("valid");
        let same = spacing_ceiling(&truth, 1.0, &[1, 2, 3]).expect("1 mm");
        assert_eq!(same, [Some(1.0), Some(1.0), None]);
        let coarse = spacing_ceiling(&truth, 6.0, &[1, 2]).expect("6 mm");
        let (cube, slab) = (coarse[0].expect("cube"), coarse[1].expect("slab"));
        assert!(cube > 0.8 && cube < 1.0, "cube {cube}");
        assert!(slab < 0.6, "a 2 mm slab on a 6 mm grid: {slab}");
    }
}
