//! Rendering a [`Run`]: the Markdown report and the CSV of every Dice.

use std::fmt::Write as _;
use std::path::{Path, PathBuf};

use super::run::{ENSEMBLE_SEED, QUICK_STRUCTURES, QueryResult, Run, TaskResult};
use crate::tasks::Kind;

/// Mean of the present values.
fn mean(values: impl IntoIterator<Item = Option<f64>>) -> Option<f64> {
    let v: Vec<f64> = values.into_iter().flatten().collect();
    (!v.is_empty()).then(|| v.iter().sum::<f64>() / v.len() as f64)
}

/// A Dice to 3 decimals, `–` when absent.
fn fmt(value: Option<f64>) -> String {
    value.map_or_else(|| "–".into(), |v| format!("{v:.3}"))
}

/// The mean of the present values, as the report shows it.
pub(super) fn mean_text(values: &[Option<f64>]) -> String {
    fmt(mean(values.iter().copied()))
}

/// Which Dice column of a query.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Method {
    /// One-shot from the reference.
    Model,
    /// The position-copy baseline.
    Copy,
    /// The memory bank.
    Bank,
    /// The truth at the model's spacing.
    Ceiling,
}

impl QueryResult {
    fn dice(&self, method: Method) -> &[Option<f64>] {
        match method {
            Method::Model => &self.model,
            Method::Copy => &self.baseline,
            Method::Bank => &self.bank,
            Method::Ceiling => &self.ceiling,
        }
    }
}

impl TaskResult {
    fn aligned(&self) -> Option<&QueryResult> {
        self.queries.iter().find(|q| q.seed.is_none())
    }

    fn moved(&self) -> impl Iterator<Item = &QueryResult> {
        self.queries.iter().filter(|q| q.seed.is_some())
    }

    /// Whether the memory bank was scored on this task.
    fn has_bank(&self) -> bool {
        self.queries.iter().any(|q| !q.bank.is_empty())
    }

    /// Dice of structure `i` on the aligned query.
    fn aligned_one(&self, i: usize, method: Method) -> Option<f64> {
        self.aligned()
            .and_then(|q| q.dice(method).get(i).copied().flatten())
    }

    /// Mean Dice over the moved queries of structure `i`.
    fn moved_mean(&self, i: usize, method: Method) -> Option<f64> {
        mean(
            self.moved()
                .map(|q| q.dice(method).get(i).copied().flatten()),
        )
    }

    /// Mean over structures of the aligned query.
    fn aligned_mean(&self, method: Method) -> Option<f64> {
        self.aligned()
            .and_then(|q| mean(q.dice(method).iter().copied()))
    }

    /// Mean over structures and moved queries.
    fn moved_all(&self, method: Method) -> Option<f64> {
        mean((0..self.structures.len()).map(|i| self.moved_mean(i, method)))
    }
}

/// The Markdown report.
pub fn markdown(run: &Run) -> String {
    let mut md = String::new();
    let o = &run.options;
    let _ = writeln!(md, "# Iris quality report (issue 7)\n");
    let _ = writeln!(
        md,
        "Generated {} by\n\n```sh\n{}\n```\n\n(from the repository root, as `cargo run \
         --release -p iris-eval -- results ...`; the CSV next to this file has every Dice).\n",
        run.started, o.command
    );
    if run.random_model() {
        let _ = writeln!(
            md,
            "> **This report ran a model with RANDOM weights (`{}`).** Its model columns say \
             nothing about Iris's quality; they only show the report's shape. The position-copy \
             baseline columns are real measurements on real volumes.\n",
            run.model_name
        );
    }
    if o.quick {
        let _ = writeln!(
            md,
            "> **`--quick`**: at most {QUICK_STRUCTURES} structures per task and one moved \
             query; not the full report.\n"
        );
    }
    let _ = writeln!(md, "## Setup\n");
    let _ = writeln!(md, "| | |\n|---|---|");
    let _ = writeln!(md, "| model folder | `{}` |", o.model.display());
    let _ = writeln!(md, "| manifest name | `{}` |", run.model_name);
    let _ = writeln!(md, "| weights fingerprint | `{}` |", run.fingerprint);
    let _ = writeln!(
        md,
        "| patch, spacing | {:?} voxels at {} mm |",
        run.patch, run.spacing_mm
    );
    let _ = writeln!(
        md,
        "| memory bank | {} |",
        if run.memory_bank { "yes" } else { "none" }
    );
    let _ = writeln!(md, "| data | `{}` |", o.data.display());
    let _ = writeln!(
        md,
        "| machine | {} logical CPUs, {} |",
        run.cpus, run.cpu_model
    );
    let _ = writeln!(
        md,
        "| engine settings | `Model::encode_task` + `Model::segment` defaults (overlap 0.5, \
         threshold 0.5, largest component) |\n"
    );
    let _ = writeln!(
        md,
        "**Model** = one-shot Iris: the reference image and label map encoded with \
         `Model::encode_task`, the query segmented with `Model::segment`. **Copy** = the \
         position-copy baseline: the reference label map resampled onto the query grid by world \
         position (nearest neighbour), no model at all. **Moved** queries are the real query \
         under a seeded random similarity transform about its centre (rotation up to 20°, \
         shift up to 20 mm, scale 0.9-1.1) with the truth moved alike; the copy baseline does \
         not follow the move. **Ceiling** = the truth resampled to the model's spacing and back \
         (nearest neighbour): what a model perfect at its own resolution would score. Dice per \
         structure; moved columns are the mean over the moves.\n"
    );
    let moves: Vec<&QueryResult> = run
        .tasks
        .first()
        .map(|t| t.moved().collect())
        .unwrap_or_default();
    if !moves.is_empty() {
        let _ = writeln!(md, "Moves (the same seeds for every task):\n");
        for q in moves {
            let _ = writeln!(
                md,
                "- seed {}: {}",
                q.seed.unwrap_or_default(),
                q.motion.describe()
            );
        }
        let _ = writeln!(md);
    }

    let _ = writeln!(md, "## Goals of issue 7\n");
    let _ = writeln!(
        md,
        "| goal | measured (model) | copy baseline | ceiling at {} mm | reached |",
        run.spacing_mm
    );
    let _ = writeln!(md, "|---|---|---|---|---|");
    for line in goals(run) {
        let _ = writeln!(md, "{line}");
    }
    let _ = writeln!(md);
    if let Some(notes) = &o.notes {
        let _ = writeln!(md, "{}\n", notes.trim_end());
    }

    for task in &run.tasks {
        let _ = writeln!(md, "## {}\n", task.title);
        let _ = writeln!(
            md,
            "Reference: {}. Query: {}. Task `{}`.\n",
            task.reference, task.query, task.id
        );
        if let Some(e) = &task.model_error {
            let _ = writeln!(md, "**The model could not encode this task:** {e}\n");
        }
        if let Some(note) = &task.bank_note {
            let _ = writeln!(md, "**Memory bank not scored:** {note}.\n");
        }
        let methods: &[(Method, &str)] = if task.has_bank() {
            &[
                (Method::Bank, "bank"),
                (Method::Model, "model"),
                (Method::Copy, "copy"),
                (Method::Ceiling, "ceiling"),
            ]
        } else {
            &[
                (Method::Model, "model"),
                (Method::Copy, "copy"),
                (Method::Ceiling, "ceiling"),
            ]
        };
        let mut head = String::from("| structure | label |");
        for moved in ["aligned", "moved"] {
            for (_, name) in methods {
                let _ = write!(head, " {name} {moved} |");
            }
        }
        let _ = writeln!(md, "{head}\n|---|---|{}", "---|".repeat(2 * methods.len()));
        for (i, s) in task.structures.iter().enumerate() {
            let mut row = format!("| {} | {} |", s.name, s.label);
            for &(m, _) in methods {
                let _ = write!(row, " {} |", fmt(task.aligned_one(i, m)));
            }
            for &(m, _) in methods {
                let _ = write!(row, " {} |", fmt(task.moved_mean(i, m)));
            }
            let _ = writeln!(md, "{row}");
        }
        let mut row = String::from("| **mean** | |");
        for &(m, _) in methods {
            let _ = write!(row, " **{}** |", fmt(task.aligned_mean(m)));
        }
        for &(m, _) in methods {
            let _ = write!(row, " **{}** |", fmt(task.moved_all(m)));
        }
        let _ = writeln!(md, "{row}\n");
        for note in &task.notes {
            let _ = writeln!(md, "- {note}");
        }
        let _ = writeln!(md);
    }

    ensemble_section(&mut md, run);

    let _ = writeln!(md, "## Timings\n");
    let _ = writeln!(
        md,
        "Release build, {} logical CPUs ({}). Total run {:.1} s (data loading, moves and \
         scoring included).\n",
        run.cpus, run.cpu_model, run.total_s
    );
    let _ = writeln!(
        md,
        "| task | encode s | segment s per query | windows per query | copy s | task total s |"
    );
    let _ = writeln!(md, "|---|---|---|---|---|---|");
    for task in &run.tasks {
        let n = task.queries.len().max(1) as f64;
        let seg = task.queries.iter().map(|q| q.segment_s).sum::<f64>() / n;
        let windows = task.queries.iter().map(|q| q.windows).sum::<usize>() as f64 / n;
        let _ = writeln!(
            md,
            "| `{}` | {:.2} | {seg:.2} | {windows:.1} | {:.2} | {:.1} |",
            task.id, task.encode_s, task.baseline_s, task.total_s
        );
    }
    let _ = writeln!(
        md,
        "\nOne window (encoder + decoder, one class, {:?} voxels): {}.\n",
        run.patch,
        run.window_s.map_or_else(
            || "not measured".into(),
            |s| format!("{s:.3} s (median of 3)")
        )
    );
    let _ = writeln!(md, "## Not measured\n");
    let _ = writeln!(md, "- Colin27 grey/white matter: no truth in `data/`.");
    if !run.tasks.iter().any(TaskResult::has_bank) {
        let _ = writeln!(
            md,
            "- The memory bank on seen classes: this model folder has no memory bank (or it \
             lacks the structures)."
        );
    }
    md
}

/// The context-ensemble table: mean Dice over structures, aligned and
/// moved, with 1 (the one-shot column of the task tables), 3 and all references.
fn ensemble_section(md: &mut String, run: &Run) {
    let sizes: Vec<usize> = run
        .tasks
        .iter()
        .flat_map(|t| t.ensembles.iter().map(|(n, _)| *n))
        .fold(Vec::new(), |mut v, n| {
            if !v.contains(&n) {
                v.push(n);
            }
            v
        });
    let _ = writeln!(md, "## Context ensemble\n");
    if sizes.is_empty() {
        let _ = writeln!(md, "Not run (`--references 1`, or no task encoded).\n");
        return;
    }
    let _ = writeln!(
        md,
        "The reference plus moved copies of it (seeds {}+1, ... of the same random moves) \
         encoded one by one and averaged (`TaskEmbedding::ensemble`); the only real reference \
         per task is in `data/`, so the extra references are the same anatomy in other poses. \
         Model Dice, mean over structures (moved: and over the moved queries).\n",
        ENSEMBLE_SEED
    );
    let mut head = String::from("| task | 1 ref aligned | 1 ref moved |");
    let mut rule = String::from("|---|---|---|");
    for n in &sizes {
        let _ = write!(head, " {n} refs aligned | {n} refs moved |");
        rule.push_str("---|---|");
    }
    let _ = writeln!(md, "{head}\n{rule}");
    for task in &run.tasks {
        let mut row = format!(
            "| `{}` | {} | {} |",
            task.id,
            fmt(task.aligned_mean(Method::Model)),
            fmt(task.moved_all(Method::Model))
        );
        for n in &sizes {
            let found = task.ensembles.iter().find(|(m, _)| m == n);
            let (aligned, moved) = found.map_or((None, None), |(_, per_query)| {
                let mut aligned = None;
                let mut moved = Vec::new();
                for (q, dice) in task.queries.iter().zip(per_query) {
                    let m = mean(dice.iter().copied());
                    if q.seed.is_some() {
                        moved.push(m);
                    } else {
                        aligned = m;
                    }
                }
                (aligned, mean(moved))
            });
            let _ = write!(row, " {} | {} |", fmt(aligned), fmt(moved));
        }
        let _ = writeln!(md, "{row}");
    }
    let _ = writeln!(md);
}

/// The goals table rows.
fn goals(run: &Run) -> Vec<String> {
    let mut rows = Vec::new();
    let of = |kind: Kind| run.tasks.iter().filter(move |t| t.kind == kind);
    let reached = |v: Option<f64>, goal: f64| match v {
        Some(v) if v >= goal => "yes",
        Some(_) => "no",
        None => "not measured",
    };
    for (kind, goal, what) in [
        (Kind::BrainMask, 0.95, "brain mask Dice >= 0.95"),
        (Kind::Tissue, 0.85, "GM / WM Dice >= 0.85"),
    ] {
        for task in of(kind) {
            for (label, mean) in [
                (
                    "aligned",
                    TaskResult::aligned_mean as fn(&TaskResult, Method) -> _,
                ),
                ("moved", TaskResult::moved_all),
            ] {
                let model = mean(task, Method::Model);
                rows.push(format!(
                    "| {what}: `{}` {label} | {} | {} | {} | {} |",
                    task.id,
                    fmt(model),
                    fmt(mean(task, Method::Copy)),
                    fmt(mean(task, Method::Ceiling)),
                    reached(model, goal)
                ));
            }
        }
    }
    for task in of(Kind::HeldOutAal) {
        let (model, copy) = (task.moved_all(Method::Model), task.moved_all(Method::Copy));
        rows.push(format!(
            "| held-out AAL Dice >= 0.75 on moved queries (mean of {} structures) | {} | {} | {} | {} |",
            task.structures.len(),
            fmt(model),
            fmt(copy),
            fmt(task.moved_all(Method::Ceiling)),
            reached(model, 0.75)
        ));
        let (model, copy) = (
            task.aligned_mean(Method::Model),
            task.aligned_mean(Method::Copy),
        );
        let gain = model.zip(copy).map(|(m, c)| m - c);
        rows.push(format!(
            "| held-out AAL, aligned: model >= copy + 0.10 | {} (gain {}) | {} | {} | {} |",
            fmt(model),
            gain.map_or_else(|| "–".into(), |g| format!("{g:+.3}")),
            fmt(copy),
            fmt(task.aligned_mean(Method::Ceiling)),
            reached(gain, 0.10)
        ));
    }
    rows
}

/// The CSV: one row per task, query, structure and method.
pub fn csv(run: &Run) -> String {
    let mut out =
        String::from("task,query,seed,label,structure,method,dice,segment_seconds,windows\n");
    for task in &run.tasks {
        for (qi, q) in task.queries.iter().enumerate() {
            let query = if q.seed.is_some() { "moved" } else { "aligned" };
            let seed = q.seed.map_or_else(String::new, |s| s.to_string());
            for (i, s) in task.structures.iter().enumerate() {
                let bank = q.bank.get(i).map(|&d| ("bank", d, String::new()));
                for (method, dice, secs) in [
                    ("model", q.model[i], format!("{:.3}", q.segment_s)),
                    ("copy", q.baseline[i], format!("{:.3}", task.baseline_s)),
                    ("ceiling", q.ceiling[i], String::new()),
                ]
                .into_iter()
                .chain(bank)
                {
                    let dice = dice.map_or_else(String::new, |d| format!("{d:.4}"));
                    let _ = writeln!(
                        out,
                        "{},{query},{seed},{},{},{method},{dice},{secs},{}",
                        task.id, s.label, s.name, q.windows
                    );
                }
                for (n, per_query) in &task.ensembles {
                    let dice = per_query[qi][i].map_or_else(String::new, |d| format!("{d:.4}"));
                    let _ = writeln!(
                        out,
                        "{},{query},{seed},{},{},ensemble-{n},{dice},,{}",
                        task.id, s.label, s.name, q.windows
                    );
                }
            }
        }
    }
    out
}

/// The CSV path next to a report: `results.md` -> `results.csv`.
pub fn csv_path(report: &Path) -> PathBuf {
    report.with_extension("csv")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn means_skip_absent_values() {
        assert_eq!(mean([Some(0.5), None, Some(1.0)]), Some(0.75));
        assert_eq!(mean([None, None]), None);
        assert_eq!(fmt(None), "–");
        assert_eq!(fmt(Some(0.92744)), "0.927");
    }
}
