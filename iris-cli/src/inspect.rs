//! `iris inspect`: what a `.irisemb` file holds.

use std::path::{Path, PathBuf};

use iris_core::embedding::TaskEmbedding;
use iris_core::preprocess::IntensityPolicy;
use serde_json::Value;

use crate::failure::Failure;
use crate::input::read_task;
use crate::printable::printable;

/// Arguments of `iris inspect`.
#[derive(clap::Args)]
pub struct Args {
    /// The task embedding (or memory bank) to describe.
    #[arg(value_name = "TASK.irisemb")]
    task: PathBuf,
    /// Print JSON instead of text.
    #[arg(long)]
    json: bool,
}

/// Runs `iris inspect`.
pub fn run(args: &Args) -> Result<(), Failure> {
    let task = read_task(&args.task)?;
    if args.json {
        println!("{:#}", describe_json(&args.task, &task));
    } else {
        print!("{}", describe_text(&args.task, &task));
    }
    Ok(())
}

/// The classes of `task` as `label "name"` pairs, comma separated, for the
/// one-line summaries of the commands that write an `.irisemb`.
pub fn class_list(task: &TaskEmbedding) -> String {
    task.classes()
        .iter()
        .map(|c| format!("{} {:?}", c.label(), c.name()))
        .collect::<Vec<_>>()
        .join(", ")
}

/// The intensity policy in words.
pub fn intensity_text(policy: &IntensityPolicy) -> String {
    match *policy {
        IntensityPolicy::Ct { min_hu, max_hu } => {
            format!("CT: clip to [{min_hu}, {max_hu}] HU, then z-score")
        }
        IntensityPolicy::Percentile { low, high } => {
            format!("clip to percentiles {low} to {high}, then z-score")
        }
    }
}

fn describe_text(path: &Path, task: &TaskEmbedding) -> String {
    let pre = task.preprocessing();
    let [sd, sh, sw] = pre.spacing_mm;
    let [pd, ph, pw] = pre.patch;
    let stages = task
        .stage_shapes()
        .iter()
        .map(|s| format!("[{}, {}]", s.tokens, s.channels))
        .collect::<Vec<_>>()
        .join(", ");
    let mut out = format!(
        "{}\n  model      {}\n  spacing    {sd} x {sh} x {sw} mm ([D, H, W])\n  \
         patch      {pd} x {ph} x {pw} voxels ([D, H, W])\n  intensity  {}\n  \
         stages     {}: {stages} ([tokens, channels])\n  classes    {}\n",
        path.display(),
        task.model(),
        intensity_text(&pre.intensity),
        task.stage_shapes().len(),
        task.classes().len(),
    );
    let width = task
        .classes()
        .iter()
        .map(|c| printable(c.name()).chars().count())
        .chain([4])
        .max()
        .unwrap_or(4);
    out += &format!("  {:>6}  {:width$}  provenance\n", "label", "name");
    for class in task.classes() {
        out += &format!(
            "  {:>6}  {:width$}  {}\n",
            class.label(),
            printable(class.name()),
            class.provenance()
        );
    }
    out
}

fn describe_json(path: &Path, task: &TaskEmbedding) -> Value {
    let mut json = task.describe_json();
    json["file"] = Value::String(path.display().to_string());
    json
}
