//! `iris eval`: Dice per class and volumes of a segmentation against the truth.

use std::path::PathBuf;

use iris_core::engine::Limits;
use iris_core::metrics::{dice_per_class, label_volumes_ml};
use serde_json::json;

use crate::failure::Failure;
use crate::input::read_labels;

/// Arguments of `iris eval`.
#[derive(clap::Args)]
pub struct Args {
    /// The predicted label map (NIfTI).
    #[arg(long, value_name = "SEG.nii.gz")]
    pred: PathBuf,
    /// The reference label map, on the same grid as --pred.
    #[arg(long, value_name = "GT.nii.gz")]
    truth: PathBuf,
    /// Label values to score, comma-separated (default: every non-zero label
    /// in either map).
    #[arg(long, value_delimiter = ',', value_name = "L1,L2,..")]
    classes: Vec<u16>,
    /// Print JSON instead of a table.
    #[arg(long)]
    json: bool,
}

/// Scores of one class.
struct Row {
    label: u16,
    dice: Option<f64>,
    prediction_ml: f64,
    truth_ml: f64,
}

/// Runs `iris eval`.
pub fn run(args: &Args, quiet: bool) -> Result<(), Failure> {
    let limits = Limits::default();
    let pred = read_labels(&args.pred, &limits)?;
    let truth = read_labels(&args.truth, &limits)?;
    let what = format!(
        "prediction {} vs truth {}",
        args.pred.display(),
        args.truth.display()
    );
    truth
        .geometry()
        .ensure_same(pred.geometry(), &what)
        .map_err(|e| Failure::input(&args.pred, e))?;
    let (pred_ml, truth_ml) = (label_volumes_ml(&pred), label_volumes_ml(&truth));
    let classes = if args.classes.is_empty() {
        let mut all: Vec<u16> = pred_ml.iter().chain(&truth_ml).map(|&(l, _)| l).collect();
        all.sort_unstable();
        all.dedup();
        all
    } else {
        args.classes.clone()
    };
    let dice =
        dice_per_class(&pred, &truth, &classes).map_err(|e| Failure::input(&args.pred, e))?;
    let volume = |table: &[(u16, f64)], label| {
        table
            .iter()
            .find(|&&(l, _)| l == label)
            .map_or(0.0, |&(_, ml)| ml)
    };
    let rows: Vec<Row> = classes
        .iter()
        .zip(dice)
        .map(|(&label, dice)| Row {
            label,
            dice,
            prediction_ml: volume(&pred_ml, label),
            truth_ml: volume(&truth_ml, label),
        })
        .collect();
    let scored: Vec<f64> = rows.iter().filter_map(|r| r.dice).collect();
    let mean = (!scored.is_empty()).then(|| scored.iter().sum::<f64>() / scored.len() as f64);

    if args.json {
        let classes: Vec<_> = rows
            .iter()
            .map(|r| {
                json!({
                    "label": r.label,
                    "dice": r.dice,
                    "prediction_ml": r.prediction_ml,
                    "truth_ml": r.truth_ml,
                })
            })
            .collect();
        let report = json!({
            "prediction": args.pred.display().to_string(),
            "truth": args.truth.display().to_string(),
            "classes": classes,
            "mean_dice": mean,
        });
        println!("{report:#}");
    } else if !quiet {
        println!(
            "{:>6} {:>7} {:>12} {:>12}",
            "label", "Dice", "pred mL", "truth mL"
        );
        for r in &rows {
            let dice = r.dice.map_or_else(|| "-".into(), |d| format!("{d:.4}"));
            println!(
                "{:>6} {dice:>7} {:>12.3} {:>12.3}",
                r.label, r.prediction_ml, r.truth_ml
            );
        }
        match mean {
            Some(m) => println!("mean Dice {m:.4} over {} classes", scored.len()),
            None => println!("no class is present in either map"),
        }
    }
    Ok(())
}
