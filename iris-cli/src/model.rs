//! `--model DIR`, `--modality`, and reading a reference for encoding.

use std::path::{Path, PathBuf};
use std::time::Instant;

use iris_core::Model;
use iris_core::embedding::TaskEmbedding;
use iris_core::engine::{EncodeOptions, TaskClass};
use iris_core::nifti;
use iris_core::preprocess::IntensityPolicy;
use iris_core::volume::{Image, LabelMap};

use crate::failure::{BAD_INPUT, Failure, MODEL, USAGE};

/// The model used when neither `--model` nor `IRIS_MODEL` names one: the
/// workspace's `models/iris-tiny`, fixed when `iris` is built.
pub const DEFAULT_MODEL: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/../models/iris-tiny");

/// `--model DIR`.
#[derive(clap::Args)]
pub struct ModelArgs {
    /// Model folder (manifest.json and the three ONNX graphs); default: the
    /// workspace's models/iris-tiny.
    #[arg(long, env = "IRIS_MODEL", value_name = "DIR")]
    model: Option<PathBuf>,
}

impl ModelArgs {
    /// Loads the model, or fails with [`MODEL`] naming the folder.
    pub fn load(&self) -> Result<Model, Failure> {
        let dir = self
            .model
            .clone()
            .unwrap_or_else(|| PathBuf::from(DEFAULT_MODEL));
        if !dir.join(iris_core::engine::MANIFEST_FILE).is_file() {
            return Err(Failure::new(
                MODEL,
                format!(
                    "no model at {}: pass --model DIR or set IRIS_MODEL",
                    dir.display()
                ),
            ));
        }
        Model::load(&dir).map_err(|e| {
            Failure::new(
                MODEL,
                format!("cannot load the model in {}: {e}", dir.display()),
            )
        })
    }
}

/// `--modality`: which intensity policy normalises the images.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, clap::ValueEnum)]
pub enum Modality {
    /// CT in Hounsfield units: clip to [-991, 500] HU, then z-score.
    Ct,
    /// MR, PET or anything uncalibrated: clip to the 2nd-98th percentiles,
    /// then z-score.
    Mr,
    /// Encoding detects CT (air and bone on a HU scale) or MR; segmenting
    /// uses the policy recorded in the task embedding.
    #[default]
    Auto,
}

impl Modality {
    /// The policy to force, or `None` to let the engine decide.
    pub fn policy(self) -> Option<IntensityPolicy> {
        match self {
            Modality::Ct => Some(IntensityPolicy::CT),
            Modality::Mr => Some(IntensityPolicy::MR),
            Modality::Auto => None,
        }
    }
}

/// Reads a NIfTI image and refuses NaN or infinite voxels, naming the file.
pub fn read_image(path: &Path) -> Result<(Image, nifti::NiftiInfo), Failure> {
    let (image, info) = nifti::read_image(path).map_err(|e| Failure::input(path, e))?;
    image
        .ensure_finite("image")
        .map_err(|e| Failure::input(path, e))?;
    Ok((image, info))
}

/// Reads a reference image and its label map and checks that they share a
/// grid, naming the files.
pub fn read_pair(image: &Path, labels: &Path) -> Result<(Image, LabelMap), Failure> {
    let (pixels, _) = read_image(image)?;
    let map = crate::eval::read_labels(labels)?;
    let what = format!(
        "label map {} vs image {}",
        labels.display(),
        image.display()
    );
    pixels
        .ensure_same_grid(&map, &what)
        .map_err(|e| Failure::input(labels, e))?;
    Ok((pixels, map))
}

/// A reference image and label map to encode.
pub struct Reference<'a> {
    /// The image file.
    pub image: &'a Path,
    /// The label map file, on the image's grid.
    pub labels: &'a Path,
    /// Label values to encode (empty: every label present).
    pub classes: &'a [u16],
    /// One name per class, or none.
    pub names: &'a [String],
    /// Intensity policy override.
    pub modality: Modality,
}

impl Reference<'_> {
    /// Reads, checks and encodes the reference with `model`: one class per
    /// label, in the order asked.
    ///
    /// # Errors
    /// [`USAGE`] for names that do not match the classes; [`BAD_INPUT`] for
    /// unreadable files, grids that differ, NaNs or a label that is absent
    /// (each naming the file); the engine's failure otherwise.
    pub fn encode(&self, model: &Model, quiet: bool) -> Result<TaskEmbedding, Failure> {
        let (image, labels) = read_pair(self.image, self.labels)?;
        let classes = self.classes(&labels)?;
        let start = Instant::now();
        let options = EncodeOptions {
            intensity: self.modality.policy(),
        };
        let task = model
            .encode_task(&image, &labels, &classes, &options)
            .map_err(|e| Failure::input(self.labels, e))?;
        if !quiet {
            eprintln!(
                "encoded {} class(es) from {} in {:.2} s",
                classes.len(),
                self.labels.display(),
                start.elapsed().as_secs_f64()
            );
        }
        Ok(task)
    }

    /// The classes to encode: those asked for (each must be in `labels`), or
    /// every label present; named by `--names` when given.
    fn classes(&self, labels: &LabelMap) -> Result<Vec<TaskClass>, Failure> {
        let present = labels.labels_present();
        let chosen = if self.classes.is_empty() {
            present.clone()
        } else {
            self.classes.to_vec()
        };
        if chosen.is_empty() {
            return Err(Failure::new(
                BAD_INPUT,
                format!(
                    "{}: the label map has no non-zero label",
                    self.labels.display()
                ),
            ));
        }
        if let Some(missing) = chosen.iter().find(|l| !present.contains(l)) {
            let shown: Vec<String> = present.iter().take(40).map(u16::to_string).collect();
            let more = if present.len() > 40 { ", ..." } else { "" };
            return Err(Failure::new(
                BAD_INPUT,
                format!(
                    "{}: label {missing} is not in the label map (present: {}{more})",
                    self.labels.display(),
                    shown.join(", ")
                ),
            ));
        }
        if let Some((i, label)) = chosen
            .iter()
            .enumerate()
            .find(|(i, l)| chosen[..*i].contains(l))
        {
            return Err(Failure::new(
                USAGE,
                format!("--classes lists label {label} twice (entry {i})"),
            ));
        }
        if !self.names.is_empty() && self.names.len() != chosen.len() {
            return Err(Failure::new(
                USAGE,
                format!(
                    "--names gives {} name(s) for {} class(es) ({})",
                    self.names.len(),
                    chosen.len(),
                    chosen
                        .iter()
                        .map(u16::to_string)
                        .collect::<Vec<_>>()
                        .join(", ")
                ),
            ));
        }
        Ok(chosen
            .iter()
            .enumerate()
            .map(|(i, &label)| {
                TaskClass::new(label, self.names.get(i).cloned().unwrap_or_default())
            })
            .collect())
    }
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
