//! `iris`: in-context segmentation of 3-D medical images from the command line.
//!
//! ```text
//! iris encode   --image REF --label REF_LABEL [--classes 1,2] [--names a,b] --out task.irisemb
//! iris segment  --image QUERY (--task task.irisemb | --bank | --ref-image REF --ref-label REF_LABEL)
//!               [--classes ..] --out seg.nii.gz [--probabilities probs.nii.gz] [--preview seg.png]
//! iris retrieve --image QUERY --pool DIR --top-k N --out seg.nii.gz [--level object|image]
//!               [--classes ..] [--initial NAME] [--save-task retrieved.irisemb] [segment's outputs]
//! iris ensemble --out merged.irisemb a.irisemb b.irisemb ...
//! iris eval     --pred seg.nii.gz --truth gt.nii.gz [--classes 1,2] [--json]
//! iris inspect  task.irisemb [--json]
//! ```
//!
//! `iris retrieve` takes its references from a pool folder: images and
//! label maps in the nnU-Net layout (`labelsTr/CASE.nii.gz`,
//! `imagesTr/CASE_0000.nii.gz`), encoded on the fly, or `.irisemb` files
//! (object level only); see [`pool`].
//!
//! Outputs never replace inputs: an output that names an input (the model
//! folder's files and the pool's included) or another output, however the
//! path is spelt, is refused before any work (see [`claims`]). A command's
//! outputs are written all or nothing: each to a temporary file, renamed over
//! its target only when every one was written, so a failure leaves every
//! existing file as it was (see [`commit`]).
//!
//! `--model DIR` (encode, segment, retrieve) defaults to `$IRIS_MODEL`,
//! else the workspace's `models/iris-tiny`. Exit codes are in [`failure`]:
//! 0 ok, 1 runtime failure, 2 usage, 3 bad input file, 4 model problem.

mod claims;
mod commit;
mod encode;
mod ensemble;
mod eval;
mod failure;
mod input;
mod inspect;
mod memory;
mod output;
mod pool;
mod preview;
mod printable;
mod reference;
mod retrieve;
mod segment;

use std::process::ExitCode;

use clap::{Parser, Subcommand};

use crate::failure::{EXIT_CODES_HELP, Failure};

#[derive(Parser)]
#[command(
    name = "iris",
    version,
    about = "Segment 3-D medical images from one labelled example (Iris, in-context learning)",
    after_help = EXIT_CODES_HELP
)]
struct Cli {
    /// Print nothing but errors and --json data: no progress bar, no summary.
    #[arg(long, short, global = true)]
    quiet: bool,
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Distil a reference image and its label map into a task embedding
    /// (.irisemb), one class per chosen label.
    #[command(after_help = EXIT_CODES_HELP)]
    Encode(encode::Args),
    /// Segment a query volume with a task embedding, the model's memory
    /// bank, or a reference image and label map.
    #[command(after_help = EXIT_CODES_HELP)]
    Segment(segment::Args),
    /// Segment a query volume with references chosen for it from a pool
    /// (context retrieval): per class by the similarity of the query's first
    /// prediction (object level), or by whole-image similarity (image level).
    #[command(after_help = EXIT_CODES_HELP)]
    Retrieve(retrieve::Args),
    /// Average the task embeddings of several references (context ensemble)
    /// into one .irisemb.
    #[command(after_help = EXIT_CODES_HELP)]
    Ensemble(ensemble::Args),
    /// Dice per class (and volumes in mL) of a label map against the truth.
    #[command(after_help = EXIT_CODES_HELP)]
    Eval(eval::Args),
    /// Describe a .irisemb file: model, preprocessing, stage shapes, classes.
    #[command(after_help = EXIT_CODES_HELP)]
    Inspect(inspect::Args),
}

fn main() -> ExitCode {
    memory::keep_freed_memory();
    let cli = Cli::parse();
    let result = match &cli.command {
        Command::Encode(args) => encode::run(args, cli.quiet),
        Command::Segment(args) => segment::run(args, cli.quiet),
        Command::Retrieve(args) => retrieve::run(args, cli.quiet),
        Command::Ensemble(args) => ensemble::run(args, cli.quiet),
        Command::Eval(args) => eval::run(args, cli.quiet),
        Command::Inspect(args) => inspect::run(args),
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(Failure { code, message }) => {
            eprintln!("iris: {message}");
            ExitCode::from(code)
        }
    }
}
