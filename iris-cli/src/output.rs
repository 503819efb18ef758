//! What `iris segment` and `iris retrieve` share: the output and
//! segmentation options, the progress bars, writing the label map,
//! probability maps and preview, and the summary.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};

use indicatif::{ProgressBar, ProgressFinish, ProgressStyle};
use iris_core::embedding::TaskEmbedding;
use iris_core::engine::{Limits, Precision, Progress, SegmentOptions, Segmentation};
use iris_core::labels::{DEFAULT_THRESHOLD, label_value};
use iris_core::metrics::label_volumes_ml;
use iris_core::nifti;
use iris_core::volume::Image;
use serde_json::{Map, Value, json};

use crate::claims::Claims;
use crate::commit::Staged;
use crate::failure::{Failure, RUNTIME, USAGE};
use crate::preview::{self, Preview};
use crate::printable::printable;
use crate::reference::Modality;

const NIFTI: &[&str] = &[".nii", ".nii.gz"];

/// The progress bar template over segmentation windows.
pub const WINDOWS: &str = "segmenting {bar:30} {pos}/{len} windows [{elapsed_precise} < {eta}]";

/// Where the results of a segmentation go, and how its summary is printed.
#[derive(clap::Args)]
#[command(next_help_heading = "Outputs")]
pub struct OutputArgs {
    /// Where to write the label map (on the query's grid, with its header).
    #[arg(long, value_name = "SEG.nii.gz")]
    pub out: PathBuf,
    /// Also write the probability map of each class (float32, 0-1). With one
    /// class it goes to this path; with several, to NAME-LABEL.nii.gz per class.
    #[arg(long, value_name = "PROBS.nii.gz")]
    pub probabilities: Option<PathBuf>,
    /// Also write a PNG of axial, coronal and sagittal slices with the labels
    /// in colour (radiological convention: the patient's left on the right).
    #[arg(long, value_name = "SEG.png")]
    pub preview: Option<PathBuf>,
    /// Print the summary as JSON.
    #[arg(long)]
    pub json: bool,
}

/// How the query is segmented.
#[derive(clap::Args)]
#[command(next_help_heading = "Segmentation")]
pub struct SettingsArgs {
    /// Intensity policy of the query and of any reference encoded on the
    /// fly.
    #[arg(long, value_enum, default_value_t)]
    pub modality: Modality,
    /// Keep every connected component, not only the largest of each class.
    #[arg(long)]
    pub no_largest_component: bool,
    /// Probability a class needs to label a voxel, in (0, 1].
    #[arg(long, default_value_t = DEFAULT_THRESHOLD)]
    pub threshold: f32,
    /// Fraction by which neighbouring windows overlap, in [0, 1) (default:
    /// the engine's).
    #[arg(long)]
    pub overlap: Option<f64>,
    /// Most classes per decoder run; more are decoded in groups (default:
    /// the model's manifest, as many as a training episode held).
    #[arg(long, value_parser = clap::value_parser!(u32).range(1..))]
    pub classes_per_forward: Option<u32>,
}

impl SettingsArgs {
    /// Checks the numbers before any work.
    ///
    /// # Errors
    /// A [`USAGE`] failure naming the option.
    pub fn check(&self) -> Result<(), Failure> {
        if !(self.threshold > 0.0 && self.threshold <= 1.0) {
            return Err(Failure::new(
                USAGE,
                format!("--threshold {} is outside (0, 1]", self.threshold),
            ));
        }
        if let Some(o) = self.overlap.filter(|o| !(0.0..1.0).contains(o)) {
            return Err(Failure::new(
                USAGE,
                format!("--overlap {o} is outside [0, 1)"),
            ));
        }
        Ok(())
    }

    /// The engine's options: these settings, the probability maps when
    /// `outputs` asks for them, and `progress` after every window.
    pub fn options(
        &self,
        outputs: &OutputArgs,
        limits: Limits,
        progress: Arc<dyn Fn(Progress) + Send + Sync>,
    ) -> SegmentOptions {
        SegmentOptions {
            intensity: self.modality.policy(),
            overlap: self.overlap.unwrap_or(SegmentOptions::default().overlap),
            threshold: self.threshold,
            largest_component: !self.no_largest_component,
            probabilities: outputs.probabilities.is_some(),
            classes_per_forward: self.classes_per_forward.map(|n| n as usize),
            progress: Some(progress),
            limits,
            ..SegmentOptions::default()
        }
    }
}

/// A progress bar on stderr drawn with `template`, cleared when finished or
/// dropped (also when the command fails half way); hidden when `quiet`.
pub fn progress_bar(quiet: bool, template: &str) -> ProgressBar {
    let bar = if quiet {
        ProgressBar::hidden()
    } else {
        ProgressBar::new(0)
    };
    bar.set_style(
        ProgressStyle::with_template(template).unwrap_or_else(|_| ProgressStyle::default_bar()),
    );
    bar.with_finish(ProgressFinish::AndClear)
}

/// Shows on `bar` the windows of `passes` segmentation passes over one
/// query, one pass after the other: the engine numbers each pass's windows
/// from 1 again.
pub fn window_progress(bar: &ProgressBar, passes: usize) -> Arc<dyn Fn(Progress) + Send + Sync> {
    let bar = bar.clone();
    let (pass, last) = (AtomicUsize::new(0), AtomicUsize::new(0));
    Arc::new(move |p: Progress| {
        let pass = if p.done <= last.swap(p.done, Ordering::Relaxed) {
            pass.fetch_add(1, Ordering::Relaxed) + 1
        } else {
            pass.load(Ordering::Relaxed)
        };
        bar.set_length((passes.max(pass + 1) * p.total) as u64);
        bar.set_position((pass * p.total + p.done) as u64);
    })
}

/// The optional outputs a run wrote.
pub struct Written {
    probabilities: Vec<PathBuf>,
    preview: Option<Preview>,
}

/// What a command adds to the summary of [`OutputArgs::report`].
#[derive(Default)]
pub struct Extra {
    /// Fields added to the JSON summary.
    pub fields: Map<String, Value>,
    /// Lines printed before the table of classes.
    pub lines: Vec<String>,
    /// A last column of the table, also a field of each class in JSON.
    pub column: Option<Column>,
}

/// One more value per class in the summary.
pub struct Column {
    /// Its heading in the table.
    pub heading: &'static str,
    /// Its key in each class's JSON object.
    pub key: &'static str,
    /// Per class, in the segmentation's order: the text and the JSON value.
    pub cells: Vec<(String, Value)>,
}

/// Everything the summary of one segmentation reports.
pub struct Summary<'a> {
    /// The query file.
    pub image: &'a Path,
    /// The task embedding that segmented it (for the class names).
    pub task: &'a TaskEmbedding,
    /// The result.
    pub segmentation: &'a Segmentation,
    /// The optional files written.
    pub written: &'a Written,
    /// Seconds the segmentation took.
    pub seconds: f64,
    /// The arithmetic the model ran in.
    pub precision: Precision,
    /// What the command adds.
    pub extra: Extra,
}

impl OutputArgs {
    /// Checks before any work that every output can be written, and claims
    /// them (the probability maps under every name they may take).
    ///
    /// # Errors
    /// As [`Claims::output`].
    pub fn claim(&self, claims: &mut Claims) -> Result<(), Failure> {
        claims.output("--out", &self.out, NIFTI)?;
        if let Some(p) = &self.probabilities {
            let name = p.file_name().unwrap_or_default().to_string_lossy();
            claims.per_class_output("--probabilities", p, NIFTI, split_extension(&name))?;
        }
        if let Some(p) = &self.preview {
            claims.output("--preview", p, &[".png"])?;
        }
        Ok(())
    }

    /// Writes the label map of `segmentation` (with the header of `like`,
    /// the query's), and the probability maps and preview asked for, into
    /// `staged`.
    ///
    /// # Errors
    /// A [`RUNTIME`] failure naming the file that could not be written.
    pub fn write(
        &self,
        query: &Image,
        like: &nifti::NiftiInfo,
        segmentation: &Segmentation,
        staged: &mut Staged,
    ) -> Result<Written, Failure> {
        staged.write(&self.out, |tmp| {
            nifti::write_labels(tmp, &segmentation.labels, Some(like))
        })?;
        let probabilities = self.write_probabilities(segmentation, like, staged)?;
        // Label maps hold u16 values, so the engine only returns classes that fit.
        let class_labels: Vec<u16> = segmentation
            .classes
            .iter()
            .filter_map(|&l| label_value(l).ok())
            .collect();
        let preview = match &self.preview {
            Some(path) => {
                let fail = |e: String| Failure::new(RUNTIME, format!("{}: {e}", path.display()));
                let picture = preview::render(query, &segmentation.labels, &class_labels)
                    .map_err(|e| fail(e.to_string()))?;
                staged.write_bytes(path, &preview::encode_png(&picture.rgb).map_err(fail)?)?;
                Some(picture)
            }
            None => None,
        };
        Ok(Written {
            probabilities,
            preview,
        })
    }

    /// Writes the probability maps if asked into `staged`; returns their
    /// paths.
    fn write_probabilities(
        &self,
        segmentation: &Segmentation,
        like: &nifti::NiftiInfo,
        staged: &mut Staged,
    ) -> Result<Vec<PathBuf>, Failure> {
        let (Some(path), Some(maps)) = (&self.probabilities, &segmentation.probabilities) else {
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
            staged.write(path, |tmp| nifti::write_image(tmp, map, Some(like)))?;
        }
        Ok(paths)
    }

    /// Prints the summary: per class, its voxels and volume (and preview
    /// colour, and the command's column); as JSON with `--json`, nothing
    /// when `quiet`.
    pub fn report(&self, summary: &Summary<'_>, quiet: bool) {
        let Summary {
            segmentation,
            written,
            seconds,
            extra,
            ..
        } = summary;
        let volumes = label_volumes_ml(&segmentation.labels);
        let rows: Vec<_> = segmentation
            .classes
            .iter()
            .enumerate()
            .map(|(i, &label)| {
                let name = summary.task.class(label).map_or("", |c| c.name());
                let value = label_value(label).ok();
                let voxels = value.map_or(0, |v| segmentation.labels.count(v));
                let ml = volumes
                    .iter()
                    .find(|&&(l, _)| Some(l) == value)
                    .map_or(0.0, |&(_, ml)| ml);
                let [r, g, b] = preview::colour(i);
                (label, name, voxels, ml, format!("#{r:02x}{g:02x}{b:02x}"))
            })
            .collect();
        let cell = |i: usize| extra.column.as_ref().and_then(|c| c.cells.get(i));
        if self.json {
            let classes: Vec<_> = rows
                .iter()
                .enumerate()
                .map(|(i, (label, name, voxels, ml, colour))| {
                    let mut class = json!({
                        "label": label,
                        "name": name,
                        "voxels": voxels,
                        "volume_ml": ml,
                        "preview_colour": colour,
                    });
                    if let (Some(column), Some((_, value))) = (&extra.column, cell(i)) {
                        class[column.key] = value.clone();
                    }
                    class
                })
                .collect();
            let preview = self.preview.as_ref().zip(written.preview.as_ref());
            let preview = preview.map(|(path, p)| {
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
            let mut report = json!({
                "image": summary.image.display().to_string(),
                "output": self.out.display().to_string(),
                "probabilities": written.probabilities.iter().map(|p| p.display().to_string()).collect::<Vec<_>>(),
                "preview": preview,
                "shape": segmentation.labels.shape(),
                "windows": segmentation.windows,
                "seconds": seconds,
                "precision": summary.precision.name(),
                "classes": classes,
            });
            if let Value::Object(fields) = &mut report {
                fields.extend(extra.fields.clone());
            }
            println!("{report:#}");
            return;
        }
        if quiet {
            return;
        }
        let [d, h, w] = segmentation.labels.shape();
        println!(
            "wrote {} ({d} x {h} x {w}) in {seconds:.2} s, {} windows",
            self.out.display(),
            segmentation.windows
        );
        for path in &written.probabilities {
            println!("wrote {}", path.display());
        }
        if let (Some(path), Some(p)) = (&self.preview, &written.preview) {
            let [x, y, z] = p.point_mm;
            println!(
                "wrote {} (slices through x {x:.1}, y {y:.1}, z {z:.1} mm; grey levels {} to {})",
                path.display(),
                p.window.0,
                p.window.1
            );
        }
        for line in &extra.lines {
            println!("{line}");
        }
        let width = rows
            .iter()
            .map(|r| printable(r.1).chars().count())
            .chain([4])
            .max()
            .unwrap_or(4);
        let colour = if self.preview.is_some() {
            "  colour"
        } else {
            ""
        };
        let heading = extra
            .column
            .as_ref()
            .map_or(String::new(), |c| format!("  {}", c.heading));
        println!(
            "{:>6}  {:width$}  {:>10}  {:>10}{colour}{heading}",
            "label", "name", "voxels", "mL"
        );
        for (i, (label, name, voxels, ml, hex)) in rows.iter().enumerate() {
            let hex = if self.preview.is_some() {
                format!("  {hex}")
            } else {
                String::new()
            };
            let more = cell(i).map_or(String::new(), |(text, _)| format!("  {text}"));
            let name = printable(name);
            println!("{label:>6}  {name:width$}  {voxels:>10}  {ml:>10.2}{hex}{more}");
        }
    }
}

/// `path` itself for one class; `STEM-LABEL.EXT` for each of several.
fn probability_paths(path: &Path, classes: &[u32]) -> Vec<PathBuf> {
    if classes.len() == 1 {
        return vec![path.to_path_buf()];
    }
    let name = path.file_name().unwrap_or_default().to_string_lossy();
    let (stem, ext) = split_extension(&name);
    classes
        .iter()
        .map(|label| path.with_file_name(format!("{stem}-{label}{ext}")))
        .collect()
}

/// `name` split before its NIfTI extension (any case; empty if none).
fn split_extension(name: &str) -> (&str, &str) {
    let lower = name.to_lowercase();
    let extension = NIFTI
        .iter()
        .filter(|e| lower.ends_with(*e))
        .max_by_key(|e| e.len())
        .map_or(0, |e| e.len());
    name.split_at(name.len() - extension)
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

    #[test]
    fn passes_follow_one_another_on_the_bar() {
        let bar = ProgressBar::hidden();
        let progress = window_progress(&bar, 2);
        let mut seen = Vec::new();
        for _ in 0..2 {
            for done in 1..=3 {
                progress(Progress { done, total: 3 });
                seen.push((bar.position(), bar.length()));
            }
        }
        let lengths: Vec<_> = seen.iter().map(|&(_, l)| l).collect();
        assert_eq!(lengths, [Some(6); 6]);
        let positions: Vec<_> = seen.iter().map(|&(p, _)| p).collect();
        assert_eq!(positions, [1, 2, 3, 4, 5, 6]);
        // One window per pass, and a third pass nobody announced.
        let bar = ProgressBar::hidden();
        let progress = window_progress(&bar, 2);
        for _ in 0..3 {
            progress(Progress { done: 1, total: 1 });
        }
        assert_eq!((bar.position(), bar.length()), (3, Some(3)));
    }
}
