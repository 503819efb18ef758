//! `iris ensemble`: the context ensemble of several task embeddings, one file.

use std::path::PathBuf;

use iris_core::embedding::TaskEmbedding;
use iris_core::irisemb::{self, Payload};

use crate::claims::Claims;
use crate::commit::Staged;
use crate::failure::{self, Failure, MODEL};
use crate::input::read_task;
use crate::inspect::class_list;

/// Arguments of `iris ensemble`.
#[derive(clap::Args)]
pub struct Args {
    /// Where to write the averaged embedding.
    #[arg(long, value_name = "MERGED.irisemb")]
    out: PathBuf,
    /// Two or more embeddings of the same classes, made by the same model.
    #[arg(value_name = "TASK.irisemb", num_args = 2.., required = true)]
    parts: Vec<PathBuf>,
}

/// Runs `iris ensemble`.
pub fn run(args: &Args, quiet: bool) -> Result<(), Failure> {
    let mut claims = Claims::default();
    claims.output("--out", &args.out, &[])?;
    for part in &args.parts {
        claims.input("the input", part);
    }
    claims.check()?;
    let parts = args
        .parts
        .iter()
        .map(|p| read_task(p))
        .collect::<Result<Vec<_>, _>>()?;
    let first = &parts[0];
    for (part, path) in parts.iter().zip(&args.parts).skip(1) {
        if part.model() != first.model() {
            return Err(Failure::new(
                MODEL,
                format!(
                    "{} was made by model {} but {} by model {}: only embeddings of one \
                     model can be averaged (re-encode the references with one model)",
                    path.display(),
                    part.model(),
                    args.parts[0].display(),
                    first.model()
                ),
            ));
        }
    }
    let merged = TaskEmbedding::ensemble(&parts).map_err(|e| {
        let files = args
            .parts
            .iter()
            .map(|p| p.display().to_string())
            .collect::<Vec<_>>()
            .join(", ");
        Failure::new(
            failure::code_of(&e),
            format!("cannot average {files} (parts 0, 1, ... in that order): {e}"),
        )
    })?;
    let mut staged = Staged::default();
    staged.write(&args.out, |tmp| {
        irisemb::write_file(tmp, &merged, Payload::F32)
    })?;
    staged.commit()?;
    if !quiet {
        let classes = class_list(&merged);
        println!(
            "wrote {}: {} classes ({classes}), the mean of {} files",
            args.out.display(),
            merged.classes().len(),
            parts.len()
        );
    }
    Ok(())
}
