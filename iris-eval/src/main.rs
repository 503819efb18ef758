//! `iris-eval results`: runs every task of issue 7 with a model folder and
//! writes the Markdown report and a CSV next to it; `iris-eval strategies`:
//! the inference strategies of the paper's figure 4 (see the crate docs).

use std::path::{Path, PathBuf};
use std::process::ExitCode;

use clap::{Parser, Subcommand};
use iris_eval::report::{self, Options};
use iris_eval::strategies;

/// Quality report of an iris model on held-out real anatomy (issue 7).
#[derive(Parser)]
#[command(name = "iris-eval", version)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Runs every task and writes the report (Markdown) and a CSV beside it.
    Results {
        /// The model folder (manifest.json and the ONNX graphs).
        #[arg(long, default_value = "models/iris-tiny")]
        model: PathBuf,
        /// The report to write; the CSV goes next to it (`.csv`).
        #[arg(long, default_value = "docs/results.md")]
        out: PathBuf,
        /// The data folder written by scripts/fetch-data.sh.
        #[arg(long, default_value = "data")]
        data: PathBuf,
        /// Moved queries per task (seeds 1 to N).
        #[arg(long, default_value_t = 3)]
        moves: usize,
        /// References of the largest context ensemble (the reference and
        /// moved copies of it); ensembles of 3 and of all are scored. 1: none.
        #[arg(long, default_value_t = 5, value_parser = clap::value_parser!(u16).range(1..=64))]
        references: u16,
        /// At most 2 structures per task, one move and ensembles of at most
        /// 3 references (a smoke run).
        #[arg(long)]
        quick: bool,
        /// Markdown about the model (training, shortfalls) to include after
        /// the goals table.
        #[arg(long)]
        notes: Option<PathBuf>,
    },
    /// One-shot, context ensembles, object- and image-level retrieval and
    /// tuned embeddings on one task (default: the held-out AAL
    /// structures); writes the Markdown table and a CSV beside it.
    Strategies {
        /// The task's id (an unknown id lists them).
        #[arg(long, default_value = strategies::DEFAULT_TASK)]
        task: String,
        /// The model folder (manifest.json and the ONNX graphs).
        #[arg(long, default_value = "models/iris-tiny")]
        model: PathBuf,
        /// The table to write; the CSV goes next to it (`.csv`).
        #[arg(long, default_value = "docs/strategies.md")]
        out: PathBuf,
        /// The data folder written by scripts/fetch-data.sh.
        #[arg(long, default_value = "data")]
        data: PathBuf,
        /// References in the pool: the reference and moved copies of it.
        #[arg(long, default_value_t = 5, value_parser = clap::value_parser!(u16).range(1..=64))]
        pool: u16,
        /// Moved queries besides the aligned one (seeds 1 to N).
        #[arg(long, default_value_t = 2)]
        moves: usize,
        /// Top-k values of the retrieval rows.
        #[arg(long, value_delimiter = ',', default_values_t = [1, 2, 3, 5])]
        top_k: Vec<usize>,
        /// A tuned embedding to score, as CASES=FILE (the number of pool
        /// cases `iris-train tune` used); repeatable.
        #[arg(long, value_parser = parse_tuned)]
        tuned: Vec<(usize, PathBuf)>,
        /// At most this many structures (a smoke run).
        #[arg(long)]
        structures: Option<usize>,
        /// Also write the pool (nnU-Net layout) and the one-shot embedding
        /// (`reference.irisemb`) here, for `iris-train tune`.
        #[arg(long)]
        write_pool: Option<PathBuf>,
    },
    /// Writes the truth of one task's aligned query as a label NIfTI (on
    /// the query's grid), for `iris eval --truth`; lists the task ids
    /// when the id is unknown.
    Truth {
        /// The task id, e.g. aal-colin27-to-mni152.
        #[arg(long)]
        task: String,
        /// The label NIfTI to write.
        #[arg(long)]
        out: PathBuf,
        /// The data folder written by scripts/fetch-data.sh.
        #[arg(long, default_value = "data")]
        data: PathBuf,
    },
}

/// `CASES=FILE` of `--tuned`.
fn parse_tuned(text: &str) -> Result<(usize, PathBuf), String> {
    let (cases, file) = text
        .split_once('=')
        .ok_or_else(|| format!("{text:?} is not CASES=FILE"))?;
    let cases = cases
        .parse()
        .map_err(|_| format!("{cases:?} in {text:?} is not a number of cases"))?;
    Ok((cases, PathBuf::from(file)))
}

/// The text of `--notes`.
fn read_notes(path: &Path) -> Result<String, String> {
    std::fs::read_to_string(path).map_err(|e| format!("--notes {}: {e}", path.display()))
}

/// Writes `text` to `path`, naming the path on failure.
fn write(path: &Path, text: &str) -> Result<(), String> {
    std::fs::write(path, text).map_err(|e| format!("cannot write {}: {e}", path.display()))
}

fn main() -> ExitCode {
    let command = std::iter::once("iris-eval".to_string())
        .chain(std::env::args().skip(1))
        .collect::<Vec<_>>()
        .join(" ");
    let outcome = match Cli::parse().command {
        Command::Results {
            model,
            out,
            data,
            moves,
            references,
            quick,
            notes,
        } => {
            let notes = match notes.as_deref().map(read_notes).transpose() {
                Ok(notes) => notes,
                Err(e) => {
                    eprintln!("error: {e}");
                    return ExitCode::FAILURE;
                }
            };
            results(
                &Options {
                    model,
                    data,
                    moves,
                    references: usize::from(references),
                    quick,
                    command,
                    notes,
                },
                &out,
            )
        }
        Command::Strategies {
            task,
            model,
            out,
            data,
            pool,
            moves,
            top_k,
            tuned,
            structures,
            write_pool,
        } => figure(
            &strategies::Options {
                task,
                model,
                data,
                pool: usize::from(pool),
                moves,
                top_ks: top_k,
                tuned,
                structures,
                write_pool,
                command,
            },
            &out,
        ),
        Command::Truth { task, out, data } => truth(&task, &out, &data),
    };
    match outcome {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {e}");
            ExitCode::FAILURE
        }
    }
}

fn results(options: &Options, out: &Path) -> Result<(), String> {
    let run = report::run(options, |line| eprintln!("{line}")).map_err(|e| e.to_string())?;
    write_report(
        out,
        &report::markdown(&run),
        &report::csv(&run),
        run.total_s,
    )
}

fn figure(options: &strategies::Options, out: &Path) -> Result<(), String> {
    let figure = strategies::run(options, |line| eprintln!("{line}")).map_err(|e| e.to_string())?;
    write_report(
        out,
        &strategies::markdown(&figure),
        &strategies::csv(&figure),
        figure.total_s,
    )
}

/// Writes the Markdown to `out` and the CSV next to it, and says so with
/// the run's `seconds`.
fn write_report(out: &Path, markdown: &str, csv: &str, seconds: f64) -> Result<(), String> {
    let csv_path = report::csv_path(out);
    write(out, markdown)?;
    write(&csv_path, csv)?;
    eprintln!(
        "wrote {} and {} in {seconds:.1} s",
        out.display(),
        csv_path.display()
    );
    Ok(())
}

fn truth(id: &str, out: &Path, data: &Path) -> Result<(), String> {
    let tasks = iris_eval::tasks::build(data, iris_eval::tasks::Limits::default())
        .map_err(|e| e.to_string())?;
    let task = iris_eval::tasks::find(tasks, id).map_err(|e| e.to_string())?;
    iris_core::nifti::write_labels(out, &task.query.truth, None).map_err(|e| e.to_string())?;
    let labels: Vec<String> = task
        .structures
        .iter()
        .map(|s| s.label.to_string())
        .collect();
    eprintln!(
        "wrote the truth of {id} ({}; labels {}) to {}",
        task.query.name,
        labels.join(","),
        out.display()
    );
    for note in &task.notes {
        eprintln!("note: {note}");
    }
    Ok(())
}
