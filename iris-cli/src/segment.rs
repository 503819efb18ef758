//! `iris segment`: a query volume to a label map, with optional probability
//! maps and a PNG preview.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Instant;

use clap::ArgGroup;
use indicatif::{ProgressBar, ProgressStyle};
use iris_core::Model;
use iris_core::embedding::TaskEmbedding;
use iris_core::engine::{Progress, SegmentOptions, Segmentation};
use iris_core::labels::DEFAULT_THRESHOLD;
use iris_core::metrics::label_volumes_ml;
use iris_core::nifti;
use serde_json::json;

use crate::failure::{Failure, MODEL, Outputs, RUNTIME, USAGE, check_output};
use crate::inspect::read_task;
use crate::model::{Modality, ModelArgs, Reference, read_image};
use crate::preview::{self, Preview};

const NIFTI: &[&str] = &[".nii", ".nii.gz"];

/// Arguments of `iris segment`.
#[derive(clap::Args)]
#[command(group(
    ArgGroup::new("source").required(true).args(["task", "bank", "ref_image"])
))]
pub struct Args {
    /// The volume to segment (NIfTI).
    #[arg(long, value_name = "QUERY.nii.gz")]
    image: PathBuf,
    /// A task embedding (from `iris encode` or `iris ensemble`, or a memory
    /// bank file).
    #[arg(long, value_name = "TASK.irisemb")]
    task: Option<PathBuf>,
    /// Use the memory bank shipped with the model (pick classes with --classes).
    #[arg(long)]
    bank: bool,
    /// A reference image to encode on the fly (with --ref-label).
    #[arg(long, value_name = "REF.nii.gz", requires = "ref_label")]
    ref_image: Option<PathBuf>,
    /// The reference's label map, on its grid.
    #[arg(long, value_name = "REF_LABEL.nii.gz", requires = "ref_image")]
    ref_label: Option<PathBuf>,
    /// Classes, comma-separated. With --ref-label: label values to encode
    /// (default: every label). With --task or --bank: label values or class
    /// names to use (default: every class).
    #[arg(
        long,
        alias = "bank-classes",
        value_delimiter = ',',
        value_name = "IDS_OR_NAMES"
    )]
    classes: Vec<String>,
    /// With --ref-label: a name for each encoded class, in order.
    #[arg(
        long,
        value_delimiter = ',',
        value_name = "NAME1,NAME2,..",
        requires = "ref_label"
    )]
    names: Vec<String>,
    /// Where to write the label map (on the query's grid, with its header).
    #[arg(long, value_name = "SEG.nii.gz")]
    out: PathBuf,
    /// Also write the probability map of each class (float32, 0-1). With one
    /// class it goes to this path; with several, to NAME-LABEL.nii.gz per class.
    #[arg(long, value_name = "PROBS.nii.gz")]
    probabilities: Option<PathBuf>,
    /// Also write a PNG of axial, coronal and sagittal slices with the labels
    /// in colour (radiological convention: the patient's left on the right).
    #[arg(long, value_name = "SEG.png")]
    preview: Option<PathBuf>,
    /// Intensity policy of the query (and of the reference with --ref-label).
    #[arg(long, value_enum, default_value_t)]
    modality: Modality,
    /// Keep every connected component, not only the largest of each class.
    #[arg(long)]
    no_largest_component: bool,
    /// Probability a class needs to label a voxel, in (0, 1].
    #[arg(long, default_value_t = DEFAULT_THRESHOLD)]
    threshold: f32,
    /// Fraction by which neighbouring windows overlap, in [0, 1) (default:
    /// the engine's).
    #[arg(long)]
    overlap: Option<f64>,
    /// Print the summary as JSON.
    #[arg(long)]
    json: bool,
    #[command(flatten)]
    model: ModelArgs,
}

/// Runs `iris segment`.
pub fn run(args: &Args, quiet: bool) -> Result<(), Failure> {
    check_output("--out", &args.out, NIFTI)?;
    if let Some(p) = &args.probabilities {
        check_output("--probabilities", p, NIFTI)?;
    }
    if let Some(p) = &args.preview {
        check_output("--preview", p, &[".png"])?;
    }
    if !(args.threshold > 0.0 && args.threshold <= 1.0) {
        return Err(Failure::new(
            USAGE,
            format!("--threshold {} is outside (0, 1]", args.threshold),
        ));
    }
    if let Some(o) = args.overlap.filter(|o| !(0.0..1.0).contains(o)) {
        return Err(Failure::new(
            USAGE,
            format!("--overlap {o} is outside [0, 1)"),
        ));
    }
    let model = args.model.load()?;
    let (query, query_info) = read_image(&args.image)?;
    let task = task(args, &model, quiet)?;

    let start = Instant::now();
    let bar = if quiet {
        ProgressBar::hidden()
    } else {
        ProgressBar::new(0)
    };
    bar.set_style(
        ProgressStyle::with_template(
            "segmenting {bar:30} {pos}/{len} windows [{elapsed_precise} < {eta}]",
        )
        .unwrap_or_else(|_| ProgressStyle::default_bar()),
    );
    let progress_bar = bar.clone();
    let options = SegmentOptions {
        intensity: args.modality.policy(),
        overlap: args.overlap.unwrap_or(SegmentOptions::default().overlap),
        threshold: args.threshold,
        largest_component: !args.no_largest_component,
        probabilities: args.probabilities.is_some(),
        progress: Some(Arc::new(move |p: Progress| {
            progress_bar.set_length(p.total as u64);
            progress_bar.set_position(p.done as u64);
        })),
    };
    let result = model.segment(&query, &task, &options);
    bar.finish_and_clear();
    let segmentation = result.map_err(|e| Failure::input(&args.image, e))?;
    let seconds = start.elapsed().as_secs_f64();

    let mut outputs = Outputs::default();
    nifti::write_labels(&args.out, &segmentation.labels, Some(&query_info))
        .map_err(|e| Failure::output(&args.out, e))?;
    outputs.add(&args.out);
    let probability_files = write_probabilities(args, &segmentation, &query_info, &mut outputs)?;
    // Label maps hold u16 values, so the engine only returns classes that fit.
    let class_labels: Vec<u16> = segmentation
        .classes
        .iter()
        .filter_map(|&l| u16::try_from(l).ok())
        .collect();
    let picture = match &args.preview {
        Some(path) => {
            let fail = |e: String| Failure::new(RUNTIME, format!("{}: {e}", path.display()));
            let picture = preview::render(&query, &segmentation.labels, &class_labels)
                .map_err(|e| fail(e.to_string()))?;
            outputs.write_bytes(path, &preview::encode_png(&picture.rgb).map_err(fail)?)?;
            Some((path, picture))
        }
        None => None,
    };
    outputs.keep();

    let written = Written {
        probabilities: &probability_files,
        preview: picture.as_ref().map(|(p, picture)| (p.as_path(), picture)),
    };
    report(args, &task, &segmentation, &written, seconds, quiet);
    Ok(())
}

/// The task embedding asked for: a file, the model's bank, or the
/// reference encoded now; with --classes, only those classes.
fn task(args: &Args, model: &Model, quiet: bool) -> Result<TaskEmbedding, Failure> {
    if let (Some(image), Some(labels)) = (&args.ref_image, &args.ref_label) {
        let classes = args
            .classes
            .iter()
            .map(|c| {
                c.parse::<u16>().map_err(|_| {
                    Failure::new(
                        USAGE,
                        format!(
                            "--classes {c:?}: with --ref-label, classes are label values \
                             (name them with --names)"
                        ),
                    )
                })
            })
            .collect::<Result<Vec<_>, _>>()?;
        let reference = Reference {
            image,
            labels,
            classes: &classes,
            names: &args.names,
            modality: args.modality,
        };
        return reference.encode(model, quiet);
    }
    let (task, source) = match &args.task {
        Some(path) => {
            let task = read_task(path)?;
            task.ensure_model(model.fingerprint())
                .map_err(|e| Failure::input(path, e))?;
            (task, path.clone())
        }
        None => {
            let bank = model
                .memory_bank()
                .map_err(|e| Failure::new(MODEL, format!("the model's memory bank: {e}")))?;
            let bank = bank.ok_or_else(|| {
                Failure::new(
                    MODEL,
                    "the model has no memory bank (its manifest names none): use --task or --ref-image",
                )
            })?;
            (bank, PathBuf::from("the model's memory bank"))
        }
    };
    select(task, &args.classes, &source)
}

/// The classes of `task` named by `keys` (label values or names), in that
/// order; all of them when `keys` is empty.
fn select(task: TaskEmbedding, keys: &[String], source: &Path) -> Result<TaskEmbedding, Failure> {
    if keys.is_empty() {
        return Ok(task);
    }
    let bad = |e| Failure::input(source, e);
    let labels = keys
        .iter()
        .map(|key| match key.parse::<u32>() {
            Ok(label) => Ok(label),
            Err(_) => task
                .select_names(&[key.as_str()])
                .map(|one| one.classes()[0].label())
                .map_err(bad),
        })
        .collect::<Result<Vec<_>, _>>()?;
    task.select_labels(&labels).map_err(bad)
}

/// Writes the probability maps if asked; returns the files written.
fn write_probabilities(
    args: &Args,
    segmentation: &Segmentation,
    like: &nifti::NiftiInfo,
    outputs: &mut Outputs,
) -> Result<Vec<PathBuf>, Failure> {
    let (Some(path), Some(maps)) = (&args.probabilities, &segmentation.probabilities) else {
        return Ok(Vec::new());
    };
    let paths = probability_paths(path, &segmentation.classes);
    if paths.len() != maps.len() {
        return Err(Failure::new(
            RUNTIME,
            format!(
                "the engine returned {} probability maps for {} classes",
                maps.len(),
                paths.len()
            ),
        ));
    }
    for (path, map) in paths.iter().zip(maps) {
        nifti::write_image(path, map, Some(like)).map_err(|e| Failure::output(path, e))?;
        outputs.add(path);
    }
    Ok(paths)
}

/// `path` itself for one class; `STEM-LABEL.EXT` for each of several.
fn probability_paths(path: &Path, classes: &[u32]) -> Vec<PathBuf> {
    if classes.len() == 1 {
        return vec![path.to_path_buf()];
    }
    let name = path.file_name().unwrap_or_default().to_string_lossy();
    let lower = name.to_lowercase();
    let extension = NIFTI
        .iter()
        .filter(|e| lower.ends_with(*e))
        .max_by_key(|e| e.len())
        .map_or(0, |e| e.len());
    let (stem, ext) = name.split_at(name.len() - extension);
    classes
        .iter()
        .map(|label| path.with_file_name(format!("{stem}-{label}{ext}")))
        .collect()
}

/// The optional outputs a run wrote.
struct Written<'a> {
    probabilities: &'a [PathBuf],
    preview: Option<(&'a Path, &'a Preview)>,
}

/// The summary: per class, its voxels and volume (and preview colour).
fn report(
    args: &Args,
    task: &TaskEmbedding,
    segmentation: &Segmentation,
    written: &Written<'_>,
    seconds: f64,
    quiet: bool,
) {
    let volumes = label_volumes_ml(&segmentation.labels);
    let rows: Vec<_> = segmentation
        .classes
        .iter()
        .enumerate()
        .map(|(i, &label)| {
            let name = task.class(label).map_or("", |c| c.name());
            let value = u16::try_from(label).ok();
            let voxels = value.map_or(0, |v| segmentation.labels.count(v));
            let ml = volumes
                .iter()
                .find(|&&(l, _)| Some(l) == value)
                .map_or(0.0, |&(_, ml)| ml);
            let [r, g, b] = preview::colour(i);
            (label, name, voxels, ml, format!("#{r:02x}{g:02x}{b:02x}"))
        })
        .collect();
    if args.json {
        let classes: Vec<_> = rows
            .iter()
            .map(|(label, name, voxels, ml, colour)| {
                json!({
                    "label": label,
                    "name": name,
                    "voxels": voxels,
                    "volume_ml": ml,
                    "preview_colour": colour,
                })
            })
            .collect();
        let preview = written.preview.map(|(path, p)| {
            let panel = |q: &preview::Panel| {
                json!({ "left": q.left, "top": q.top, "width": q.width, "height": q.height })
            };
            json!({
                "file": path.display().to_string(),
                "width": p.rgb.width,
                "height": p.rgb.height,
                "axial": panel(&p.panels[0]),
                "coronal": panel(&p.panels[1]),
                "sagittal": panel(&p.panels[2]),
                "point_mm": p.point_mm,
                "point_voxel_ras": p.point,
                "window": [p.window.0, p.window.1],
            })
        });
        let summary = json!({
            "image": args.image.display().to_string(),
            "output": args.out.display().to_string(),
            "probabilities": written.probabilities.iter().map(|p| p.display().to_string()).collect::<Vec<_>>(),
            "preview": preview,
            "shape": segmentation.labels.shape(),
            "windows": segmentation.windows,
            "seconds": seconds,
            "classes": classes,
        });
        println!("{summary:#}");
        return;
    }
    if quiet {
        return;
    }
    let [d, h, w] = segmentation.labels.shape();
    println!(
        "wrote {} ({d} x {h} x {w}) in {seconds:.2} s, {} windows",
        args.out.display(),
        segmentation.windows
    );
    for path in written.probabilities {
        println!("wrote {}", path.display());
    }
    if let Some((path, p)) = written.preview {
        let [x, y, z] = p.point_mm;
        println!(
            "wrote {} (slices through x {x:.1}, y {y:.1}, z {z:.1} mm; grey levels {} to {})",
            path.display(),
            p.window.0,
            p.window.1
        );
    }
    let width = rows
        .iter()
        .map(|r| r.1.chars().count())
        .chain([4])
        .max()
        .unwrap_or(4);
    let colour = if args.preview.is_some() {
        "  colour"
    } else {
        ""
    };
    println!(
        "{:>6}  {:width$}  {:>10}  {:>10}{colour}",
        "label", "name", "voxels", "mL"
    );
    for (label, name, voxels, ml, hex) in &rows {
        let hex = if args.preview.is_some() {
            format!("  {hex}")
        } else {
            String::new()
        };
        println!("{label:>6}  {name:width$}  {voxels:>10}  {ml:>10.2}{hex}");
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn probability_files_are_named_per_class() {
        let one = probability_paths(Path::new("out/p.nii.gz"), &[7]);
        assert_eq!(one, [PathBuf::from("out/p.nii.gz")]);
        let two = probability_paths(Path::new("out/P.NII.GZ"), &[1, 12]);
        assert_eq!(
            two,
            [
                PathBuf::from("out/P-1.NII.GZ"),
                PathBuf::from("out/P-12.NII.GZ")
            ]
        );
        let plain = probability_paths(Path::new("p.nii"), &[3, 4]);
        assert_eq!(plain, [PathBuf::from("p-3.nii"), PathBuf::from("p-4.nii")]);
    }
}
