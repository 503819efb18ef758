//! `iris-eval results`: runs every task of issue 7 with a model folder and
//! writes the Markdown report and a CSV next to it (see the crate docs).

use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Parser, Subcommand};
use iris_eval::report::{self, Options};

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
        #[arg(long, default_value = "models/iris-small")]
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
    },
}

fn main() -> ExitCode {
    let Command::Results {
        model,
        out,
        data,
        moves,
        references,
        quick,
    } = Cli::parse().command;
    let command = std::iter::once("iris-eval".to_string())
        .chain(std::env::args().skip(1))
        .collect::<Vec<_>>()
        .join(" ");
    let options = Options {
        model,
        data,
        moves,
        references: usize::from(references),
        quick,
        command,
    };
    let run = match report::run(&options, |line| eprintln!("{line}")) {
        Ok(run) => run,
        Err(e) => {
            eprintln!("error: {e}");
            return ExitCode::FAILURE;
        }
    };
    let csv = report::csv_path(&out);
    for (path, text) in [(&out, report::markdown(&run)), (&csv, report::csv(&run))] {
        if let Err(e) = std::fs::write(path, text) {
            eprintln!("error: cannot write {}: {e}", path.display());
            return ExitCode::FAILURE;
        }
    }
    eprintln!(
        "wrote {} and {} in {:.1} s",
        out.display(),
        csv.display(),
        run.total_s
    );
    ExitCode::SUCCESS
}
