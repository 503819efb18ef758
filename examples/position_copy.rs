//! Copies a reference label map onto a query volume's grid by world position.
//!
//! This is the baseline every in-context segmentation must beat: with no
//! model at all, each query voxel takes the label found at the same world
//! (scanner) position in the reference. It works only as far as the two
//! volumes are already aligned (e.g. two brains in MNI space), which is
//! exactly why iris reports it next to the model's scores.
//!
//! ```sh
//! cargo run --release -p iris-core --example position_copy -- \
//!     REF_LABELS.nii.gz QUERY_IMAGE.nii.gz OUT_LABELS.nii.gz [TRUTH_LABELS.nii.gz]
//! ```
//!
//! It reads both files with `iris_core::nifti`, resamples the labels
//! (nearest neighbour, in world coordinates, any orientation) with
//! `iris_core::preprocess::resample_labels`, writes the result with the
//! query's header, and prints the volume of each label; given a truth label
//! map on the query grid it also prints Dice per label.

use std::process::ExitCode;
use std::time::Instant;

use iris_core::metrics::{dice_per_class, label_volumes_ml};
use iris_core::nifti;
use iris_core::preprocess::resample_labels;

fn main() -> ExitCode {
    let args: Vec<String> = std::env::args().skip(1).collect();
    if !(3..=4).contains(&args.len()) {
        eprintln!("usage: position_copy REF_LABELS QUERY_IMAGE OUT_LABELS [TRUTH_LABELS]");
        return ExitCode::from(2);
    }
    match run(&args[0], &args[1], &args[2], args.get(3)) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {e}");
            ExitCode::FAILURE
        }
    }
}

fn run(
    ref_labels: &str,
    query_image: &str,
    out: &str,
    truth: Option<&String>,
) -> iris_core::Result<()> {
    let start = Instant::now();
    let (reference, _) = nifti::read_labels(ref_labels)?;
    let (query, query_info) = nifti::read_image(query_image)?;
    let copied = resample_labels(&reference, query.geometry())?;
    nifti::write_labels(out, &copied, Some(&query_info))?;
    println!(
        "{ref_labels} {:?} -> {query_image} {:?}: wrote {out} in {:.2} s",
        reference.shape(),
        query.shape(),
        start.elapsed().as_secs_f64()
    );

    let truth = truth.map(nifti::read_labels).transpose()?;
    let volumes = label_volumes_ml(&copied);
    let labels: Vec<u16> = volumes.iter().map(|&(l, _)| l).collect();
    let dice = match &truth {
        Some((t, _)) => dice_per_class(&copied, t, &labels)?,
        None => vec![None; labels.len()],
    };
    println!("{:>6} {:>10} {:>6}", "label", "volume mL", "Dice");
    for ((label, ml), d) in volumes.iter().zip(&dice) {
        let d = d.map_or_else(|| "-".to_string(), |d| format!("{d:.3}"));
        println!("{label:>6} {ml:>10.2} {d:>6}");
    }
    Ok(())
}
