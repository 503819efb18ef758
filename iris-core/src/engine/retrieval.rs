//! Context retrieval (the paper's section 3.3): from a pool of encoded
//! references, choose for the query the ones most like it and segment with
//! their average.
//!
//! - **Object level** (the paper's method): segment the query once with one
//!   reference, encode the query's own predicted masks into one task
//!   embedding per class, and for each class independently pick the `k`
//!   pool references whose embedding of that class is most similar (cosine
//!   similarity, [`ClassEmbedding::similarity`]); average those and segment
//!   again.
//! - **Image level** (the baseline the paper compares against): pick the `k`
//!   references whose global image descriptor ([`Model::image_descriptor`])
//!   is most similar to the query's, and average every class embedding of
//!   those references.
//!
//! The pool holds each reference once, encoded: its [`TaskEmbedding`] (as
//! `iris encode` writes it) and, for image-level retrieval, its descriptor
//! ([`Model::encode_pool_reference`] makes both).

// This crate is `no_std`; the engine is `std` code.
use std::prelude::rust_2024::*;
use std::{format, vec};

use super::{EncodeOptions, Model, SegmentOptions, Segmentation, TaskClass};
use crate::embedding::{ClassEmbedding, Retrieved, TaskEmbedding, cosine_similarity, top_k};
use crate::error::{Error, Result};
use crate::labels::label_value;
use crate::pipeline::{self, QueryOutputs};
use crate::preprocess::IntensityPolicy;
use crate::volume::{Image, LabelMap};

/// One reference of a retrieval pool, encoded.
#[derive(Clone, Debug, PartialEq)]
pub struct PoolReference {
    /// How the reference is called in reports (e.g. its file name).
    pub name: String,
    /// Its classes, encoded by the model that retrieves.
    pub task: TaskEmbedding,
    /// Its global image descriptor ([`Model::image_descriptor`]); needed
    /// for image-level retrieval only.
    pub descriptor: Option<Vec<f32>>,
}

/// How references are chosen: by each class's task embedding (object
/// level) or by a descriptor of the whole image (image level).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum RetrievalLevel {
    /// Per class, by the similarity of the class embeddings.
    #[default]
    Object,
    /// Per query, by the similarity of global image descriptors.
    Image,
}

/// Settings of [`Model::retrieve`].
#[derive(Clone, Debug)]
pub struct RetrieveOptions {
    /// Object or image level. Default object.
    pub level: RetrievalLevel,
    /// References averaged per class (object level) or images chosen
    /// (image level), at least 1; a `k` above the pool takes all of it.
    /// Default 1.
    pub top_k: usize,
    /// Object level: the pool index of the reference that segments the
    /// query first (a class it lacks comes from the first reference that
    /// has it). Default 0.
    pub initial: usize,
    /// Settings of every segmentation pass (object level runs two, and
    /// reports progress for each).
    pub segment: SegmentOptions,
}

impl Default for RetrieveOptions {
    fn default() -> Self {
        RetrieveOptions {
            level: RetrievalLevel::Object,
            top_k: 1,
            initial: 0,
            segment: SegmentOptions::default(),
        }
    }
}

/// The references chosen for one class.
#[derive(Clone, Debug, PartialEq)]
pub struct ClassChoice {
    /// The class's label value.
    pub label: u32,
    /// Pool indices with their similarity to the query, most similar first;
    /// the class embedding used is their average. Empty similarities
    /// (`similarity` NaN) mean the query gave nothing to compare with (the
    /// first pass found no voxel of the class, or too few to encode), and
    /// the average is over every reference that has the class.
    pub chosen: Vec<Retrieved>,
}

/// The result of [`Model::retrieve`].
#[derive(Clone, Debug, PartialEq)]
pub struct Retrieval {
    /// The final segmentation, with the retrieved embeddings.
    pub segmentation: Segmentation,
    /// The task embedding it used: per class, the average of the chosen
    /// references.
    pub task: TaskEmbedding,
    /// Per class, in the order of `task`, the references chosen.
    pub choices: Vec<ClassChoice>,
}

/// Windows of the image descriptor do not overlap: each voxel counts once.
const DESCRIPTOR_OVERLAP: f64 = 0.0;

impl Model {
    /// A global descriptor of a whole image, for image-level retrieval: the
    /// mean of the encoder's deepest features (`C_4` channels) over every
    /// window of the volume, prepared as a query is (canonical orientation,
    /// the model's spacing, `options.intensity`, detected when `None`),
    /// windows not overlapping. Of `options`, the intensity, the limits and
    /// `cancel` (asked before every window) apply.
    ///
    /// # Errors
    /// [`Error::NonFinite`] for NaN or infinite voxels; [`Error::TooLarge`]
    /// past `options.limits`; [`Error::Cancelled`]; [`Error::Model`] if the
    /// encoder fails.
    pub fn image_descriptor(&self, image: &Image, options: &SegmentOptions) -> Result<Vec<f32>> {
        let intensity = match options.intensity {
            Some(policy) => {
                policy.validate()?;
                policy
            }
            None => IntensityPolicy::detect(image)?,
        };
        let query = pipeline::prepare_query(
            image,
            self.manifest.spacing_mm,
            self.manifest.patch_size,
            intensity,
            DESCRIPTOR_OVERLAP,
            QueryOutputs {
                classes: 0,
                probabilities: false,
            },
            &options.limits,
        )?;
        let plan = self.encoder.plan(1, &self.executor)?;
        let mut sum: Vec<f64> = Vec::new();
        let mut windows = 0usize;
        for window in query.plan.windows() {
            options.check_cancel()?;
            let input = query
                .plan
                .extract(query.image.data().view(), window.index, 0.0)?;
            let features = self.run_encoder(&plan, input.view())?;
            let deepest = features.levels.last().ok_or_else(|| Error::Model {
                path: self.encoder.path().to_path_buf(),
                reason: "the encoder returned no features".into(),
            })?;
            let shape = deepest.shape();
            let channels = shape.get(1).copied().unwrap_or(0);
            let values = super::graphs::values(&self.encoder, deepest)?;
            let per_channel = values.len() / channels.max(1);
            sum.resize(channels, 0.0);
            for (c, chunk) in values.chunks_exact(per_channel.max(1)).enumerate() {
                sum[c] += chunk.iter().map(|&v| f64::from(v)).sum::<f64>() / per_channel as f64;
            }
            windows += 1;
        }
        Ok(sum.iter().map(|s| (s / windows as f64) as f32).collect())
    }

    /// Encodes a reference for a retrieval pool: its classes as
    /// [`Model::encode_task`] does (all in one crop when they fit one, else
    /// each class in its own), and its image descriptor with the same
    /// intensity policy.
    ///
    /// # Errors
    /// As [`Model::encode_task`] for a class that cannot be encoded even on
    /// its own, and as [`Model::image_descriptor`].
    pub fn encode_pool_reference(
        &self,
        name: impl Into<String>,
        image: &Image,
        labels: &LabelMap,
        classes: &[TaskClass],
        options: &EncodeOptions,
    ) -> Result<PoolReference> {
        let task = self
            .encode_in_crops(image, labels, classes, options, false)?
            .ok_or_else(|| Error::invalid("classes", "no class to encode"))?;
        let descriptor = self.image_descriptor(
            image,
            &SegmentOptions {
                intensity: Some(task.preprocessing().intensity),
                limits: options.limits,
                ..SegmentOptions::default()
            },
        )?;
        Ok(PoolReference {
            name: name.into(),
            task,
            descriptor: Some(descriptor),
        })
    }

    /// Segments `query` with references retrieved from `pool` (see
    /// [`RetrievalLevel`]): for each of `classes` (label values; empty:
    /// every class of the initial reference), the average of the `top_k`
    /// most similar references that have it.
    ///
    /// # Errors
    /// [`Error::InvalidArgument`] for an empty pool, `top_k` 0, an
    /// `initial` past the pool, a class no reference has, a repeated class,
    /// image level with a reference that has no descriptor, or pool classes
    /// that cannot be averaged (memory-bank or tuned embeddings);
    /// [`Error::ModelMismatch`] / [`Error::ShapeMismatch`] for a reference
    /// made by another model; otherwise as [`Model::segment`].
    pub fn retrieve(
        &self,
        query: &Image,
        pool: &[PoolReference],
        classes: &[u32],
        options: &RetrieveOptions,
    ) -> Result<Retrieval> {
        let initial = pool.get(options.initial).ok_or_else(|| {
            Error::invalid(
                "initial",
                format!(
                    "reference {} asked for, but the pool holds {}",
                    options.initial,
                    pool.len()
                ),
            )
        })?;
        if options.top_k == 0 {
            return Err(Error::invalid("top_k", "0 references: use at least 1"));
        }
        for reference in pool {
            self.check_task(&reference.task)
                .map_err(|e| in_reference(&reference.name, e))?;
        }
        let labels = match classes {
            [] => initial.task.classes().iter().map(|c| c.label()).collect(),
            given => given.to_vec(),
        };
        let candidates = labels
            .iter()
            .enumerate()
            .map(|(i, &label)| {
                if labels[..i].contains(&label) {
                    return Err(Error::invalid(
                        "classes",
                        format!("label {label} is asked for twice"),
                    ));
                }
                let having: Vec<usize> = (0..pool.len())
                    .filter(|&j| pool[j].task.class(label).is_some())
                    .collect();
                if having.is_empty() {
                    return Err(Error::invalid(
                        "classes",
                        format!("no reference of the pool has label {label}"),
                    ));
                }
                Ok(having)
            })
            .collect::<Result<Vec<_>>>()?;
        let choices = match options.level {
            RetrievalLevel::Object => {
                self.choose_by_object(query, pool, &labels, &candidates, options)?
            }
            RetrievalLevel::Image => {
                self.choose_by_image(query, pool, &labels, &candidates, options)?
            }
        };
        let task = assemble(pool, initial, &choices)?;
        let segmentation = self.segment(query, &task, &options.segment)?;
        Ok(Retrieval {
            segmentation,
            task,
            choices,
        })
    }

    /// Object level: a first pass with the initial reference, the query's
    /// predictions encoded, then per class the `top_k` most similar
    /// references.
    fn choose_by_object(
        &self,
        query: &Image,
        pool: &[PoolReference],
        labels: &[u32],
        candidates: &[Vec<usize>],
        options: &RetrieveOptions,
    ) -> Result<Vec<ClassChoice>> {
        // The first pass: each class from the initial reference, or from
        // the first reference that has it.
        let first: Vec<ClassChoice> = labels
            .iter()
            .zip(candidates)
            .map(|(&label, having)| {
                let index = if having.contains(&options.initial) {
                    options.initial
                } else {
                    having[0]
                };
                ClassChoice {
                    label,
                    chosen: vec![Retrieved {
                        index,
                        similarity: f32::NAN,
                    }],
                }
            })
            .collect();
        let first_task = assemble(pool, &pool[options.initial], &first)?;
        let first_pass = SegmentOptions {
            probabilities: false,
            ..options.segment.clone()
        };
        let predicted = self.segment(query, &first_task, &first_pass)?.labels;
        let intensity = options
            .segment
            .intensity
            .unwrap_or(first_task.preprocessing().intensity);
        let own =
            self.encode_predictions(query, &predicted, labels, intensity, &options.segment)?;
        labels
            .iter()
            .zip(candidates)
            .map(|(&label, having)| {
                let Some(mine) = own.iter().find(|c| c.label() == label) else {
                    return Ok(everything(label, having));
                };
                let classes = having.iter().map(|&j| class_of(&pool[j], label));
                let mut chosen = top_k(mine, classes, options.top_k)?;
                for r in &mut chosen {
                    r.index = having[r.index];
                }
                Ok(ClassChoice { label, chosen })
            })
            .collect()
    }

    /// The query's own predicted masks encoded as a reference, one class
    /// embedding per label found. All together in one crop when they fit
    /// one, else each on its own; a label with no voxel, or too few to
    /// survive resampling, is left out.
    fn encode_predictions(
        &self,
        query: &Image,
        predicted: &LabelMap,
        labels: &[u32],
        intensity: IntensityPolicy,
        segment: &SegmentOptions,
    ) -> Result<Vec<ClassEmbedding>> {
        let present = predicted.labels_present();
        let found: Vec<TaskClass> = labels
            .iter()
            .filter_map(|&l| label_value(l).ok())
            .filter(|l| present.binary_search(l).is_ok())
            .map(|l| TaskClass::new(l, ""))
            .collect();
        if found.is_empty() {
            return Ok(Vec::new());
        }
        let options = EncodeOptions {
            intensity: Some(intensity),
            limits: segment.limits,
        };
        let own = self.encode_in_crops(query, predicted, &found, &options, true)?;
        Ok(own.map(|task| task.classes().to_vec()).unwrap_or_default())
    }

    /// `classes` of an image and its label map encoded together when they
    /// fit one reference crop, else each in its own crop. A class that
    /// cannot be encoded even alone (too small at the model's spacing) is
    /// left out when `skip` is set (`None` when none is left), and is an
    /// error otherwise.
    fn encode_in_crops(
        &self,
        image: &Image,
        labels: &LabelMap,
        classes: &[TaskClass],
        options: &EncodeOptions,
        skip: bool,
    ) -> Result<Option<TaskEmbedding>> {
        match self.encode_task(image, labels, classes, options) {
            Ok(task) => return Ok(Some(task)),
            Err(Error::InvalidArgument { .. }) if classes.len() > 1 => {}
            Err(Error::InvalidArgument { .. }) if skip => return Ok(None),
            Err(e) => return Err(e),
        }
        let mut encoded: Option<TaskEmbedding> = None;
        for class in classes {
            let one = match self.encode_task(image, labels, core::slice::from_ref(class), options) {
                Ok(one) => one,
                Err(Error::InvalidArgument { .. }) if skip => continue,
                Err(e) => return Err(e),
            };
            encoded = Some(match encoded {
                Some(task) => task.merge(one)?,
                None => one,
            });
        }
        Ok(encoded)
    }

    /// Image level: the `top_k` references with the most similar
    /// descriptors; per class, those of them that have it (or, when none
    /// does, the most similar reference that has it).
    fn choose_by_image(
        &self,
        query: &Image,
        pool: &[PoolReference],
        labels: &[u32],
        candidates: &[Vec<usize>],
        options: &RetrieveOptions,
    ) -> Result<Vec<ClassChoice>> {
        let intensity = options
            .segment
            .intensity
            .unwrap_or(pool[options.initial].task.preprocessing().intensity);
        let mine = self.image_descriptor(
            query,
            &SegmentOptions {
                intensity: Some(intensity),
                ..options.segment.clone()
            },
        )?;
        let mut ranked = pool
            .iter()
            .enumerate()
            .map(|(index, reference)| {
                let descriptor = reference.descriptor.as_deref().ok_or_else(|| {
                    Error::invalid(
                        "pool",
                        format!(
                            "reference {:?} has no image descriptor: image-level retrieval \
                             needs a pool encoded from images (Model::encode_pool_reference)",
                            reference.name
                        ),
                    )
                })?;
                Ok(Retrieved {
                    index,
                    similarity: cosine_similarity(&mine, descriptor)
                        .map_err(|e| in_reference(&reference.name, e))?,
                })
            })
            .collect::<Result<Vec<_>>>()?;
        // Stable: equal similarities keep pool order.
        ranked.sort_by(|a, b| b.similarity.total_cmp(&a.similarity));
        let top = &ranked[..options.top_k.min(ranked.len())];
        Ok(labels
            .iter()
            .zip(candidates)
            .map(|(&label, having)| {
                let mut chosen: Vec<Retrieved> = top
                    .iter()
                    .filter(|r| having.contains(&r.index))
                    .copied()
                    .collect();
                if chosen.is_empty() {
                    chosen.extend(ranked.iter().find(|r| having.contains(&r.index)));
                }
                ClassChoice { label, chosen }
            })
            .collect())
    }
}

/// Every reference that has `label`, with no similarity.
fn everything(label: u32, having: &[usize]) -> ClassChoice {
    ClassChoice {
        label,
        chosen: having
            .iter()
            .map(|&index| Retrieved {
                index,
                similarity: f32::NAN,
            })
            .collect(),
    }
}

/// `label`'s embedding in `reference`, which has it (checked by the caller).
fn class_of(reference: &PoolReference, label: u32) -> &ClassEmbedding {
    reference
        .task
        .class(label)
        .unwrap_or(&reference.task.classes()[0])
}

/// The task embedding of `choices`: per class, the average of its chosen
/// references, named as in `initial` where it has the class.
fn assemble(
    pool: &[PoolReference],
    initial: &PoolReference,
    choices: &[ClassChoice],
) -> Result<TaskEmbedding> {
    let classes = choices
        .iter()
        .map(|choice| {
            let parts: Vec<&ClassEmbedding> = choice
                .chosen
                .iter()
                .map(|r| class_of(&pool[r.index], choice.label))
                .collect();
            let mean = if let [one] = parts.as_slice() {
                (*one).clone()
            } else {
                ClassEmbedding::ensemble(&parts)?
            };
            let name = initial
                .task
                .class(choice.label)
                .map_or(mean.name(), |c| c.name());
            ClassEmbedding::new(
                choice.label,
                name,
                mean.provenance(),
                mean.stages().to_vec(),
            )
        })
        .collect::<Result<Vec<_>>>()?;
    TaskEmbedding::new(
        *initial.task.model(),
        *initial.task.preprocessing(),
        initial.task.stage_shapes().to_vec(),
        classes,
    )
}

/// `error` about the pool reference `name`, saying which.
fn in_reference(name: &str, error: Error) -> Error {
    match error {
        Error::InvalidArgument { name: what, reason } => Error::InvalidArgument {
            name: what,
            reason: format!("pool reference {name:?}: {reason}"),
        },
        other => other,
    }
}
