//! `iris encode`: a reference image and label map to a `.irisemb` file.

use std::path::PathBuf;

use iris_core::irisemb::{self, Payload};

use crate::claims::Claims;
use crate::commit::Staged;
use crate::failure::Failure;
use crate::input::ModelArgs;
use crate::inspect::class_list;
use crate::reference::{Modality, Reference};

/// Arguments of `iris encode`.
#[derive(clap::Args)]
pub struct Args {
    /// The reference image (NIfTI).
    #[arg(long, value_name = "REF.nii.gz")]
    image: PathBuf,
    /// Its label map, on the same grid.
    #[arg(long, value_name = "REF_LABEL.nii.gz")]
    label: PathBuf,
    /// Label values to encode, comma-separated (default: every non-zero
    /// label in the map).
    #[arg(long, value_delimiter = ',', value_name = "L1,L2,..")]
    classes: Vec<u16>,
    /// A name for each class, comma-separated, in the order of --classes.
    #[arg(long, value_delimiter = ',', value_name = "NAME1,NAME2,..")]
    names: Vec<String>,
    /// Where to write the task embedding.
    #[arg(long, value_name = "TASK.irisemb")]
    out: PathBuf,
    /// Intensity policy of the reference.
    #[arg(long, value_enum, default_value_t)]
    modality: Modality,
    #[command(flatten)]
    model: ModelArgs,
}

/// Runs `iris encode`.
pub fn run(args: &Args, quiet: bool) -> Result<(), Failure> {
    let mut claims = Claims::default();
    claims.output("--out", &args.out, &[])?;
    claims.input("--image", &args.image);
    claims.input("--label", &args.label);
    args.model.claim(&mut claims);
    claims.check()?;
    let model = args.model.load()?;
    let reference = Reference {
        image: &args.image,
        labels: &args.label,
        classes: &args.classes,
        names: &args.names,
        modality: args.modality,
        limits: args.model.limits(),
    };
    let task = reference.encode(&model, quiet)?;
    let mut staged = Staged::default();
    staged.write(&args.out, |tmp| {
        irisemb::write_file(tmp, &task, Payload::F32)
    })?;
    staged.commit()?;
    if !quiet {
        let classes = class_list(&task);
        println!(
            "wrote {}: {} class(es) ({classes}) for model {}",
            args.out.display(),
            task.classes().len(),
            task.model()
        );
    }
    Ok(())
}
