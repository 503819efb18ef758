//! `--modality`, and a reference image with its label map encoded into a
//! task embedding (`iris encode`, `iris segment --ref-image`).

use std::path::Path;
use std::time::Instant;

use iris_core::Model;
use iris_core::embedding::TaskEmbedding;
use iris_core::engine::{EncodeOptions, Limits, TaskClass};
use iris_core::preprocess::IntensityPolicy;
use iris_core::volume::LabelMap;

use crate::failure::{BAD_INPUT, Failure, USAGE};
use crate::input::read_pair;

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
    /// What reading and encoding may take.
    pub limits: Limits,
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
        let (image, labels) = read_pair(self.image, self.labels, &self.limits)?;
        let classes = self.classes(&labels)?;
        let start = Instant::now();
        let options = EncodeOptions {
            intensity: self.modality.policy(),
            limits: self.limits,
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
