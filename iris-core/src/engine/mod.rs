//! The ONNX inference engine: a model folder in, task embeddings and
//! segmentations out (`std` only).
//!
//! A model folder (written by `iris-train export`) holds `manifest.json`
//! ([`Manifest`]) and three ONNX graphs, run with tract:
//!
//! | graph | inputs | outputs |
//! |---|---|---|
//! | `encoder.onnx` | `image` `[1, 1, D, H, W]` | `features_0..4`, `[1, C_i, D/2^i, H/2^i, W/2^i]` |
//! | `task_encoder.onnx` | the deepest `S` feature levels, `masks` `[1, K, D, H, W]` | `task_0..S-1`, `[1, K, tokens, C]` |
//! | `decoder.onnx` | `features_0..4`, `task_0..S-1` | `logits` `[1, K, D, H, W]` |
//!
//! `[D, H, W]` is the model's patch; `K` the number of classes.
//! [`Model::encode_task`] turns a reference image and label map into a
//! [`TaskEmbedding`] (one encoder run, then one task-encoder run per
//! class); [`Model::segment`] applies it to a query volume in sliding
//! windows (per window one encoder and one decoder run for all `K`
//! classes). The steps around the graphs are `iris-core`'s own, in the
//! order of `docs/pipeline.md`: canonical orientation, resampling to the
//! model's spacing, intensity normalisation, the reference crop, Gaussian
//! blending, threshold + argmax, largest component, and the way back to the
//! query's own grid and affine.
//!
//! # Speed
//! Every graph is planned for batch 1, the patch and a given `K` (a plan
//! with symbolic shapes runs about 5x slower), once: decoder plans are
//! cached per `K` (the encoder's and the task encoder's need one class at
//! most), so the first call with a new class count pays for tract's
//! optimisation and later ones do not. Matrix products run on the model's
//! own pool, one thread per core unless [`ModelOptions`] says how many;
//! [`Model::from_buffers`] loads a model without a folder. A [`Model`] is `Send + Sync`: share it by reference
//! or in an `Arc` and segment from several threads at once.

// This crate is `no_std`; the engine is `std` code.
use std::prelude::rust_2024::*;
use std::{format, vec};

mod attention;
mod channel_norm;
mod conv3d;
mod graphs;
mod instance_norm;
mod loading;
mod manifest;
mod max_pool;
mod merge;
mod parallel;
mod permute;
mod pointwise;
mod precision;
mod products;
mod retrieval;
mod row_product;
mod split;
mod unshuffle;
mod upsample;
mod winograd;

use std::ops::Range;
use std::sync::Arc;

use ndarray::{Array3, Array4, ArrayView3, ArrayView4, Axis, s};
use tract_linalg::multithread::Executor;
use tract_onnx::prelude::{TValue, TVec};

pub use graphs::{MAX_PLANS, optimise, reader};
pub use loading::{ModelBuffers, ModelOptions};
pub use manifest::{
    FORMAT, FORMAT_VERSION, GraphFiles, LEVELS, MANIFEST_FILE, MAX_PATCH, Manifest, ManifestFile,
    StageEntry, WeightsSource,
};
pub use precision::Precision;
// The pipeline's types, where the engine's callers look for them.
pub use crate::pipeline::{
    Limits, Progress, ReferenceInput, SegmentOptions, Segmentation, prepare_reference,
};
pub use retrieval::{ClassChoice, PoolReference, Retrieval, RetrievalLevel, RetrieveOptions};
pub use split::{Boundary, PerClass, Stacked, batched, per_class, split};

use crate::embedding::{
    ClassEmbedding, MAX_CLASSES, ModelFingerprint, Preprocessing, Provenance, TaskEmbedding,
};
use crate::error::{Error, Result};
use crate::irisemb;
use crate::labels::label_value;
use crate::preprocess::IntensityPolicy;
use crate::volume::{Image, LabelMap};
use graphs::Graph;

/// A class to encode: its value in the reference label map and the name
/// stored with its embedding (may be empty).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct TaskClass {
    /// Label value in the reference label map (non-zero).
    pub label: u16,
    /// Class name, stored in the `.irisemb`.
    pub name: String,
}

impl TaskClass {
    /// A class with label value `label` and name `name`.
    pub fn new(label: u16, name: impl Into<String>) -> TaskClass {
        TaskClass {
            label,
            name: name.into(),
        }
    }
}

/// Settings of [`Model::encode_task`].
#[derive(Clone, Debug, Default)]
pub struct EncodeOptions {
    /// How to normalise the reference's intensities; `None` detects CT or
    /// MR with [`IntensityPolicy::detect`]. The policy used is recorded in
    /// the embedding, and queries get the same one by default.
    pub intensity: Option<IntensityPolicy>,
    /// Memory the reference may ask for (see [`Limits`]).
    pub limits: Limits,
}

/// The encoder's features of one window: five levels, full resolution
/// first (see the [module docs](self)). Made by [`Model::encode_window`].
#[derive(Clone)]
pub struct Features {
    levels: Vec<TValue>,
}

impl Features {
    /// Shape of every level, `[1, C_i, D/2^i, H/2^i, W/2^i]`.
    pub fn shapes(&self) -> Vec<Vec<usize>> {
        self.levels.iter().map(|t| t.shape().to_vec()).collect()
    }
}

impl core::fmt::Debug for Features {
    fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        f.debug_struct("Features")
            .field("shapes", &self.shapes())
            .finish()
    }
}

/// An Iris model loaded from a model folder, ready to encode references and
/// segment queries (see the [module docs](self)).
///
/// ```no_run
/// use iris_core::engine::{EncodeOptions, Model, SegmentOptions, TaskClass};
/// use iris_core::nifti;
///
/// let model = Model::load("models/iris-tiny")?;
/// let (reference, _) = nifti::read_image("ref.nii.gz")?;
/// let (labels, _) = nifti::read_labels("ref_labels.nii.gz")?;
/// let classes = [TaskClass::new(1, "liver"), TaskClass::new(2, "spleen")];
/// let task = model.encode_task(&reference, &labels, &classes, &EncodeOptions::default())?;
///
/// let (query, info) = nifti::read_image("query.nii.gz")?;
/// let result = model.segment(&query, &task, &SegmentOptions::default())?;
/// nifti::write_labels("query_seg.nii.gz", &result.labels, Some(&info))?;
/// # Ok::<(), iris_core::Error>(())
/// ```
pub struct Model {
    manifest: Manifest,
    encoder: Graph,
    task_encoder: Graph,
    decoder: Graph,
    executor: Executor,
    /// The memory bank's bytes when the model came from memory buffers
    /// (a folder's bank is read from its file when asked for).
    bank_bytes: Option<Vec<u8>>,
}

impl core::fmt::Debug for Model {
    fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        f.debug_struct("Model")
            .field("manifest", &self.manifest)
            .field("decoder_plans", &self.decoder.planned())
            .finish_non_exhaustive()
    }
}

impl Model {
    /// The model's manifest.
    pub fn manifest(&self) -> &Manifest {
        &self.manifest
    }

    /// The fingerprint of the model's weights, as recorded in its embeddings.
    pub fn fingerprint(&self) -> &ModelFingerprint {
        &self.manifest.fingerprint
    }

    /// The memory bank named by the manifest, read and checked against this
    /// model, or `None` when the model has none.
    ///
    /// # Errors
    /// [`Error::Io`] if the file cannot be read; [`Error::Model`] naming it
    /// if it is not a valid `.irisemb`; [`Error::ModelMismatch`] or
    /// [`Error::ShapeMismatch`] if it belongs to another model.
    pub fn memory_bank(&self) -> Result<Option<TaskEmbedding>> {
        let Some(path) = &self.manifest.memory_bank else {
            return Ok(None);
        };
        let bank = match &self.bank_bytes {
            Some(bytes) => irisemb::read(bytes),
            None => irisemb::read_file(path),
        };
        let bank = bank.map_err(|e| match e {
            Error::Format(format) => Error::Model {
                path: path.clone(),
                reason: format!("invalid memory bank: {format}"),
            },
            other => other,
        })?;
        self.check_task(&bank)?;
        Ok(Some(bank))
    }

    /// Encodes the classes `classes` of a reference image and its label map
    /// (same grid, any orientation and spacing) into a one-shot task
    /// embedding: one encoder run, then the task encoder for each class
    /// (see [`Model::encode_masks`]).
    ///
    /// The reference is reoriented to RAS, resampled to the model's spacing
    /// (trilinear image, nearest labels) and cropped to the patch around the
    /// bounding box of all the classes together; the crop is normalised with
    /// `options.intensity` (detected when `None`), and each class becomes
    /// one binary mask.
    ///
    /// # Errors
    /// [`Error::InvalidArgument`] for no class, more than [`MAX_CLASSES`],
    /// label 0 or a repeated label, a class too small to survive
    /// resampling, or classes too far apart to share one crop;
    /// [`Error::EmptyMask`] for a label absent from the label map;
    /// [`Error::NonFinite`] for NaN or infinite voxels; grid mismatches
    /// between `reference` and `labels`; [`Error::Model`] if a graph fails.
    pub fn encode_task(
        &self,
        reference: &Image,
        labels: &LabelMap,
        classes: &[TaskClass],
        options: &EncodeOptions,
    ) -> Result<TaskEmbedding> {
        check_class_count(classes.len())?;
        let class_labels: Vec<u16> = classes.iter().map(|c| c.label).collect();
        let patch = self.manifest.patch_size;
        let input = crate::pipeline::prepare_reference(
            reference,
            labels,
            &class_labels,
            self.manifest.spacing_mm,
            patch,
            options.intensity,
            &options.limits,
        )?;
        let features = self.encode_window(input.image.data().view())?;
        let [d, h, w] = patch;
        let masks = ArrayView4::from_shape((classes.len(), d, h, w), &input.masks)
            .map_err(|e| Error::invalid("masks", e.to_string()))?;
        let stages = self.encode_masks(&features, masks)?;
        let embeddings = classes
            .iter()
            .enumerate()
            .map(|(k, class)| {
                let per_stage = stages
                    .iter()
                    .map(|stage| stage.index_axis(Axis(0), k).iter().copied().collect())
                    .collect();
                ClassEmbedding::new(
                    class.label.into(),
                    class.name.clone(),
                    Provenance::OneShot,
                    per_stage,
                )
            })
            .collect::<Result<Vec<_>>>()?;
        let preprocessing =
            Preprocessing::isotropic(self.manifest.spacing_mm, patch, input.intensity);
        TaskEmbedding::new(
            self.manifest.fingerprint,
            preprocessing,
            self.manifest.stages.clone(),
            embeddings,
        )
    }

    /// Segments `query` (any orientation and spacing) with every class of
    /// `task`: one encoder run per window, and one decoder run for all
    /// classes (or one per group of
    /// [`classes_per_forward`](SegmentOptions::classes_per_forward)).
    ///
    /// The labels come back on the query's own grid and affine, each voxel
    /// holding its class's label value (see [`Segmentation`]).
    ///
    /// # Errors
    /// [`Error::ModelMismatch`] if `task` was made by another model;
    /// [`Error::ShapeMismatch`] or [`Error::InvalidArgument`] if its stage
    /// shapes or preprocessing disagree with the manifest, or a class label
    /// does not fit 16 bits; [`Error::NonFinite`] for NaN or infinite query
    /// voxels; invalid options (overlap outside `[0, 1)`, threshold outside
    /// `(0, 1]`); [`Error::TooLarge`] for absurd sizes; [`Error::Model`] if
    /// a graph fails.
    pub fn segment(
        &self,
        query: &Image,
        task: &TaskEmbedding,
        options: &SegmentOptions,
    ) -> Result<Segmentation> {
        self.check_task(task)?;
        let class_labels = task
            .classes()
            .iter()
            .map(|c| label_value(c.label()))
            .collect::<Result<Vec<_>>>()?;
        let intensity = options.intensity.unwrap_or(task.preprocessing().intensity);
        let per_run = match options
            .classes_per_forward
            .or(self.manifest.classes_per_forward)
        {
            Some(0) => {
                return Err(Error::invalid(
                    "classes_per_forward",
                    "must be at least 1 class per decoder run",
                ));
            }
            Some(n) => n.min(class_labels.len()),
            None => class_labels.len(),
        };
        // One decoder plan and task tensors per group of classes, in order:
        // the groups' logits concatenate to the task's `[K, D, H, W]`.
        let groups = task
            .classes()
            .chunks(per_run.max(1))
            .map(|group| {
                let labels: Vec<u32> = group.iter().map(|c| c.label()).collect();
                let values = self.task_tensors(&task.select_labels(&labels)?)?;
                Ok((self.decoder.plan(group.len(), &self.executor)?, values))
            })
            .collect::<Result<Vec<_>>>()?;
        let encoder = self.encoder.plan(1, &self.executor)?;
        crate::pipeline::segment_with(
            query,
            self.manifest.spacing_mm,
            self.manifest.patch_size,
            &class_labels,
            intensity,
            options,
            |window| {
                let features = self.run_encoder(&encoder, window.view())?;
                let mut logits = Vec::new();
                for (plan, values) in &groups {
                    let out = self.run_decoder(plan, &features, values)?;
                    logits.extend_from_slice(graphs::values(&self.decoder, &out)?);
                }
                Ok(logits)
            },
        )
    }

    /// Runs the encoder on one normalised window (`[D, H, W]` = the patch).
    ///
    /// # Errors
    /// [`Error::ShapeMismatch`] for another shape; [`Error::NonFinite`] for
    /// NaN or infinite values; [`Error::Model`] if the graph fails.
    pub fn encode_window(&self, window: ArrayView3<'_, f32>) -> Result<Features> {
        let plan = self.encoder.plan(1, &self.executor)?;
        self.run_encoder(&plan, window)
    }

    /// Runs the task encoder on a reference window's features and one
    /// binary mask per class (`[K, D, H, W]`, values 0 or 1, on the window's
    /// grid). Returns one `[K, tokens, channels]` array per stage, deepest
    /// first: class `k`'s task embedding.
    ///
    /// The graph encodes every class on its own (classes are folded into
    /// the batch). What does not read the masks (each level's widened and
    /// shuffled features and their part of the merge unit, the queries'
    /// norms) runs once for all the classes; each class's context path up
    /// to its context voxels runs on its own, through the plan for one
    /// class (a plan for `K` classes ran it 1.7 times longer at 128^3, as
    /// its tensors outgrow the caches); the rest (the queries' blocks)
    /// runs for up to 16 classes at once, where the engine's attention is
    /// in the plan, else class by class (see `docs/pipeline.md`).
    ///
    /// # Errors
    /// [`Error::ShapeMismatch`] for masks not of the patch shape;
    /// [`Error::InvalidArgument`] for no class or more than [`MAX_CLASSES`];
    /// [`Error::Model`] if the graph fails.
    pub fn encode_masks(
        &self,
        features: &Features,
        masks: ArrayView4<'_, f32>,
    ) -> Result<Vec<Array3<f32>>> {
        let (k, d, h, w) = masks.dim();
        check_class_count(k)?;
        let [pd, ph, pw] = self.manifest.patch_size;
        if [d, h, w] != [pd, ph, pw] {
            return Err(Error::ShapeMismatch {
                what: "reference masks [K, D, H, W] vs the model's patch".into(),
                expected: vec![k, pd, ph, pw],
                found: vec![k, d, h, w],
            });
        }
        // `[1, n, D, H, W]`: the masks of the classes `range`.
        let tensor = |range: Range<usize>| {
            let masks = masks.slice(s![range.clone(), .., .., ..]);
            let masks = masks.as_standard_layout();
            graphs::tensor(
                &[1, range.len(), d, h, w],
                masks.as_slice().unwrap_or_default(),
            )
        };
        let first = tensor(0..1)?;
        let inputs = self.feed(&self.task_encoder, &features.levels, &[], Some(first))?;
        // One class: the whole plan, which keeps fewer tensors alive and
        // ran 140 against 168 ms at the full size. Several: what does not
        // read the masks runs once, each class's context path on its own,
        // the queries' blocks for the classes together.
        let runs = if k == 1 {
            let whole = self.task_encoder.plan(1, &self.executor)?;
            vec![self.task_encoder.run(&whole, inputs)?]
        } else {
            self.task_encoder
                .run_by_class("masks", inputs, k, tensor, &self.executor)?
        };
        let mut stages: Vec<Vec<f32>> = self
            .manifest
            .stages
            .iter()
            .map(|s| Vec::with_capacity(k * s.tokens as usize * s.channels as usize))
            .collect();
        for outputs in &runs {
            for (stage, value) in stages.iter_mut().zip(outputs) {
                stage.extend_from_slice(graphs::values(&self.task_encoder, value)?);
            }
        }
        stages
            .into_iter()
            .zip(&self.manifest.stages)
            .map(|(data, stage)| {
                let shape = (k, stage.tokens as usize, stage.channels as usize);
                Array3::from_shape_vec(shape, data)
                    .map_err(|e| Error::invalid("task encoder output", e.to_string()))
            })
            .collect()
    }

    /// Runs the decoder on a window's features with every class of `task`.
    /// Returns the logits `[K, D, H, W]` (apply the sigmoid for probabilities).
    ///
    /// # Errors
    /// As [`Model::segment`] for the task; [`Error::Model`] if the graph fails.
    pub fn decode_window(&self, features: &Features, task: &TaskEmbedding) -> Result<Array4<f32>> {
        self.check_task(task)?;
        let k = task.classes().len();
        let plan = self.decoder.plan(k, &self.executor)?;
        let logits = self.run_decoder(&plan, features, &self.task_tensors(task)?)?;
        let [d, h, w] = self.manifest.patch_size;
        Array4::from_shape_vec(
            (k, d, h, w),
            graphs::values(&self.decoder, &logits)?.to_vec(),
        )
        .map_err(|e| Error::invalid("decoder output", e.to_string()))
    }

    /// Class counts with a ready (optimised) decoder plan, ascending.
    pub fn planned_class_counts(&self) -> Vec<usize> {
        self.decoder.planned()
    }

    fn run_encoder(
        &self,
        plan: &Arc<tract_onnx::prelude::TypedRunnableModel>,
        window: ArrayView3<'_, f32>,
    ) -> Result<Features> {
        let (d, h, w) = window.dim();
        let patch = self.manifest.patch_size;
        if [d, h, w] != patch {
            return Err(Error::ShapeMismatch {
                what: "encoder window vs the model's patch".into(),
                expected: patch.to_vec(),
                found: vec![d, h, w],
            });
        }
        let bad = window.iter().filter(|v| !v.is_finite()).count();
        if bad > 0 {
            return Err(Error::NonFinite {
                what: "encoder window",
                count: bad,
            });
        }
        let window = window.as_standard_layout();
        let image = graphs::tensor(&[1, 1, d, h, w], window.as_slice().unwrap_or_default())?;
        let inputs: TVec<TValue> = [image].into_iter().collect();
        Ok(Features {
            levels: self.encoder.run(plan, inputs)?,
        })
    }

    fn run_decoder(
        &self,
        plan: &Arc<tract_onnx::prelude::TypedRunnableModel>,
        features: &Features,
        task: &[TValue],
    ) -> Result<TValue> {
        let inputs = self.feed(&self.decoder, &features.levels, task, None)?;
        let mut outputs = self.decoder.run(plan, inputs)?;
        outputs.pop().ok_or_else(|| Error::Model {
            path: self.decoder.path().to_path_buf(),
            reason: "the graph returned no logits".into(),
        })
    }

    /// The inputs of `graph` in its order, by name: `features_i` from
    /// `levels`, `task_s` from `task`, `masks` from `masks`.
    fn feed(
        &self,
        graph: &Graph,
        levels: &[TValue],
        task: &[TValue],
        masks: Option<TValue>,
    ) -> Result<TVec<TValue>> {
        graph
            .inputs()
            .iter()
            .map(|port| {
                let indexed = |prefix: &str, values: &[TValue]| {
                    port.name
                        .strip_prefix(prefix)
                        .and_then(|i| i.parse::<usize>().ok())
                        .and_then(|i| values.get(i).cloned())
                };
                let value = match port.name.as_str() {
                    "masks" => masks.clone(),
                    _ => indexed("features_", levels).or_else(|| indexed("task_", task)),
                };
                value.ok_or_else(|| Error::Model {
                    path: graph.path().to_path_buf(),
                    reason: format!("no value for input `{}`", port.name),
                })
            })
            .collect()
    }

    /// Checks that `task` was made by this model and has its stage shapes
    /// and preprocessing geometry.
    fn check_task(&self, task: &TaskEmbedding) -> Result<()> {
        task.ensure_model(&self.manifest.fingerprint)?;
        let flat = |shapes: &[crate::embedding::StageShape]| {
            shapes
                .iter()
                .flat_map(|s| [s.tokens as usize, s.channels as usize])
                .collect::<Vec<_>>()
        };
        if task.stage_shapes() != self.manifest.stages.as_slice() {
            return Err(Error::ShapeMismatch {
                what: "task embedding stages ([tokens, channels] per stage) vs the model".into(),
                expected: flat(&self.manifest.stages),
                found: flat(task.stage_shapes()),
            });
        }
        task.preprocessing()
            .check_geometry(self.manifest.spacing_mm, self.manifest.patch_size)?;
        check_class_count(task.classes().len())
    }

    /// One `[1, K, tokens, channels]` tensor per stage from `task`'s classes.
    fn task_tensors(&self, task: &TaskEmbedding) -> Result<Vec<TValue>> {
        let k = task.classes().len();
        task.stage_shapes()
            .iter()
            .enumerate()
            .map(|(s, stage)| {
                let values: Vec<f32> = task
                    .classes()
                    .iter()
                    .flat_map(|c| c.stages()[s].iter().copied())
                    .collect();
                graphs::tensor(
                    &[1, k, stage.tokens as usize, stage.channels as usize],
                    &values,
                )
            })
            .collect()
    }
}

fn check_class_count(k: usize) -> Result<()> {
    if k == 0 || k > MAX_CLASSES {
        return Err(Error::invalid(
            "classes",
            format!("{k} classes given, expected 1 to {MAX_CLASSES}"),
        ));
    }
    Ok(())
}

#[cfg(any(test, feature = "testing"))]
pub mod testing;
#[cfg(test)]
mod tests;
