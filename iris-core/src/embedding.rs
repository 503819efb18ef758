//! Task embeddings in memory, and the maths the inference strategies use.
//!
//! A *task embedding* is what the Iris task encoder distils from a reference
//! image and its mask: for each class, for each task-encoding stage, a
//! `[tokens, channels]` matrix (row-major, token-major). The released Iris
//! model has 3 stages of shape `[11, 512]`, `[11, 256]` and `[11, 128]`
//! ([`StageShape::IRIS`]): 10 query tokens followed by the foreground token,
//! which is the **last** one (index 10).
//!
//! A [`TaskEmbedding`] bundles classes ([`ClassEmbedding`]) with everything
//! needed to use them safely: the [`ModelFingerprint`] of the weights that made
//! them (an embedding from another model is refused by
//! [`TaskEmbedding::ensure_model`]), the [`Preprocessing`] the query must get,
//! and the stage shapes. A memory bank of every class seen in training is just
//! a `TaskEmbedding` with many classes; [`TaskEmbedding::select_labels`] and
//! [`TaskEmbedding::select_names`] pick the classes a study needs.
//!
//! The maths of the paper's inference strategies:
//! - context ensemble: [`TaskEmbedding::ensemble`] (per class, mean weighted
//!   by the number of references behind each part, so merging ensembles is
//!   exact);
//! - memory bank: [`TaskEmbedding::ema_update`], `T <- a*T + (1-a)*T_new`;
//! - object-level retrieval: [`ClassEmbedding::similarity`] (cosine over all
//!   stages) and [`top_k`].
//!
//! Every value is finite and every shape is checked on construction, so a
//! `TaskEmbedding` that exists can always be written with [`crate::irisemb`].
//!
//! ```
//! use iris_core::embedding::*;
//! use iris_core::preprocess::IntensityPolicy;
//!
//! let preprocessing = Preprocessing {
//!     spacing_mm: [1.5, 1.5, 1.5],
//!     patch: [128, 128, 128],
//!     intensity: IntensityPolicy::Ct { min_hu: -991.0, max_hu: 500.0 },
//! };
//! let shapes = vec![StageShape { tokens: 2, channels: 2 }];
//! let class = |x: f32| {
//!     ClassEmbedding::new(1, "liver", Provenance::OneShot, vec![vec![x, 0.0, 0.0, x]])
//! };
//! let model = ModelFingerprint::new([7; 32]);
//! let a = TaskEmbedding::new(model, preprocessing, shapes.clone(), vec![class(1.0)?])?;
//! let b = TaskEmbedding::new(model, preprocessing, shapes, vec![class(3.0)?])?;
//!
//! let mean = TaskEmbedding::ensemble(&[a, b])?;
//! assert_eq!(mean.classes()[0].stages()[0], [2.0, 0.0, 0.0, 2.0]);
//! assert_eq!(mean.classes()[0].provenance(), Provenance::Ensemble { references: 2 });
//! # Ok::<(), iris_core::Error>(())
//! ```

use alloc::format;
use alloc::string::{String, ToString};
use alloc::vec::Vec;
use core::fmt;

use crate::error::{Error, Result};
use crate::preprocess::IntensityPolicy;

#[cfg(feature = "json")]
mod json;

/// Most task-encoding stages an embedding may have (the released model has 3).
pub const MAX_STAGES: usize = 16;
/// Most values (`tokens * channels`) one stage of one class may have: 2^24.
pub const MAX_STAGE_VALUES: usize = 1 << 24;
/// Most classes one embedding (or memory bank) may hold: 2^16.
pub const MAX_CLASSES: usize = 1 << 16;
/// Longest class name, in UTF-8 bytes.
pub const MAX_NAME_BYTES: usize = 1024;

/// SHA-256 of the exact model weights an embedding was made with.
///
/// Shown (and parsed) as 64 lowercase hex digits.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct ModelFingerprint([u8; 32]);

impl ModelFingerprint {
    /// Wraps the 32 bytes of a SHA-256 digest.
    pub const fn new(bytes: [u8; 32]) -> Self {
        ModelFingerprint(bytes)
    }

    /// The 32 digest bytes.
    pub const fn as_bytes(&self) -> &[u8; 32] {
        &self.0
    }

    /// Parses 64 hex digits (either case).
    ///
    /// # Errors
    /// [`Error::InvalidArgument`] if `hex` is not exactly 64 hex digits.
    pub fn from_hex(hex: &str) -> Result<Self> {
        let digits = hex.as_bytes();
        if digits.len() != 64 {
            return Err(Error::invalid(
                "model fingerprint",
                format!("expected 64 hex digits, found {} characters", hex.len()),
            ));
        }
        let mut bytes = [0u8; 32];
        for (byte, pair) in bytes.iter_mut().zip(digits.chunks_exact(2)) {
            let nibble = |c: u8| {
                (c as char).to_digit(16).ok_or_else(|| {
                    Error::invalid(
                        "model fingerprint",
                        format!("{:?} is not a hex digit", c as char),
                    )
                })
            };
            *byte = (nibble(pair[0])? * 16 + nibble(pair[1])?) as u8;
        }
        Ok(ModelFingerprint(bytes))
    }
}

impl fmt::Display for ModelFingerprint {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        self.0.iter().try_for_each(|b| write!(f, "{b:02x}"))
    }
}

/// Shape of one task-encoding stage: `[tokens, channels]`, row-major.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct StageShape {
    /// Number of tokens (`m + 1`: query tokens, then the foreground token last).
    pub tokens: u32,
    /// Channels per token.
    pub channels: u32,
}

impl StageShape {
    /// The stages of the released Iris model: `[11, 512]`, `[11, 256]`, `[11, 128]`.
    pub const IRIS: [StageShape; 3] = [
        StageShape {
            tokens: 11,
            channels: 512,
        },
        StageShape {
            tokens: 11,
            channels: 256,
        },
        StageShape {
            tokens: 11,
            channels: 128,
        },
    ];

    /// Number of values, `tokens * channels`, if both are non-zero and the
    /// product is at most [`MAX_STAGE_VALUES`].
    ///
    /// # Errors
    /// [`Error::InvalidArgument`] (`stage shape`) otherwise.
    pub fn value_count(&self) -> Result<usize> {
        let n = (self.tokens as usize).checked_mul(self.channels as usize);
        match n {
            Some(n) if n > 0 && n <= MAX_STAGE_VALUES => Ok(n),
            _ => Err(Error::invalid(
                "stage shape",
                format!(
                    "[{}, {}] must have between 1 and {MAX_STAGE_VALUES} values",
                    self.tokens, self.channels
                ),
            )),
        }
    }
}

/// How a class embedding was made.
#[derive(Clone, Copy, Debug, PartialEq)]
pub enum Provenance {
    /// Encoded from a single reference image and mask.
    OneShot,
    /// Mean of the embeddings of `references` (>= 1) reference pairs.
    Ensemble {
        /// Number of reference pairs averaged.
        references: u32,
    },
    /// A memory-bank entry kept by exponential moving average.
    MemoryBank {
        /// EMA updates applied since the entry was first stored.
        updates: u64,
        /// Momentum `a` of the latest update, in `[0, 1]`.
        momentum: f32,
    },
    /// Optimised by gradient descent (in-context tuning).
    Tuned {
        /// Optimisation steps taken.
        steps: u32,
        /// Reference pairs behind the starting embedding (1 for one-shot, >= 1).
        references: u32,
    },
}

impl Provenance {
    /// Checks the invariants stated on each variant.
    pub(crate) fn validate(&self) -> Result<()> {
        match *self {
            Provenance::Ensemble { references: 0 } | Provenance::Tuned { references: 0, .. } => {
                Err(Error::invalid(
                    "provenance",
                    "the number of references must be at least 1",
                ))
            }
            Provenance::MemoryBank { momentum, .. } => check_momentum(momentum),
            _ => Ok(()),
        }
    }
}

/// The provenance in words, as `iris inspect` shows it: `one-shot`,
/// `ensemble of 3 references`, `memory bank (2 updates, momentum 0.9)`,
/// `tuned (100 steps from 1 reference)`.
///
/// ```
/// use iris_core::embedding::Provenance;
///
/// let tuned = Provenance::Tuned { steps: 100, references: 1 };
/// assert_eq!(tuned.to_string(), "tuned (100 steps from 1 reference)");
/// assert_eq!(Provenance::Ensemble { references: 3 }.to_string(), "ensemble of 3 references");
/// ```
impl fmt::Display for Provenance {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match *self {
            Provenance::OneShot => f.write_str("one-shot"),
            Provenance::Ensemble { references } => {
                write!(f, "ensemble of {}", Count(references.into(), "reference"))
            }
            Provenance::MemoryBank { updates, momentum } => {
                write!(
                    f,
                    "memory bank ({}, momentum {momentum})",
                    Count(updates, "update")
                )
            }
            Provenance::Tuned { steps, references } => write!(
                f,
                "tuned ({} from {})",
                Count(steps.into(), "step"),
                Count(references.into(), "reference")
            ),
        }
    }
}

/// A number and a noun, shown as `1 step` or `2 steps`.
struct Count(u64, &'static str);

impl fmt::Display for Count {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let Count(n, noun) = *self;
        write!(f, "{n} {noun}{}", if n == 1 { "" } else { "s" })
    }
}

fn check_momentum(momentum: f32) -> Result<()> {
    if (0.0..=1.0).contains(&momentum) {
        Ok(())
    } else {
        Err(Error::invalid(
            "momentum",
            format!("{momentum} is not in [0, 1]"),
        ))
    }
}

/// The preprocessing an embedding assumes; queries must be prepared the same way.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct Preprocessing {
    /// Target voxel spacing in mm, `[D, H, W]` axis order.
    pub spacing_mm: [f32; 3],
    /// Network input patch in voxels, `[D, H, W]`.
    pub patch: [u32; 3],
    /// Intensity clipping and normalisation.
    pub intensity: IntensityPolicy,
}

impl Preprocessing {
    /// The preprocessing of a model that works at an isotropic `spacing_mm`
    /// with windows of `patch` voxels, normalising intensities by
    /// `intensity`.
    ///
    /// ```
    /// use iris_core::embedding::Preprocessing;
    /// use iris_core::preprocess::IntensityPolicy;
    ///
    /// let pre = Preprocessing::isotropic(1.5, [128; 3], IntensityPolicy::CT);
    /// assert_eq!(pre.spacing_mm, [1.5; 3]);
    /// assert!(pre.check_geometry(1.5, [128; 3]).is_ok());
    /// assert!(pre.check_geometry(3.0, [128; 3]).is_err());
    /// ```
    pub fn isotropic(spacing_mm: f64, patch: [usize; 3], intensity: IntensityPolicy) -> Self {
        Preprocessing {
            spacing_mm: [spacing_mm as f32; 3],
            patch: patch.map(|p| p as u32),
            intensity,
        }
    }

    /// Checks that an embedding made with this preprocessing fits a model
    /// that works at an isotropic `spacing_mm` with windows of `patch`
    /// voxels: the same patch, and every spacing within 1e-4 (relative) of
    /// the model's, the precision of its `f32`.
    ///
    /// # Errors
    /// [`Error::InvalidArgument`] naming both geometries.
    pub fn check_geometry(&self, spacing_mm: f64, patch: [usize; 3]) -> Result<()> {
        let spacing = spacing_mm as f32;
        let same_spacing = self
            .spacing_mm
            .iter()
            .all(|s| (s - spacing).abs() <= 1e-4 * spacing);
        if same_spacing && self.patch == patch.map(|p| p as u32) {
            return Ok(());
        }
        Err(Error::invalid(
            "task embedding",
            format!(
                "made for spacing {:?} mm and patch {:?}, but the model uses {spacing_mm} mm and \
                 {patch:?}",
                self.spacing_mm, self.patch
            ),
        ))
    }

    /// Checks spacing (finite, > 0), patch (>= 1) and the intensity bounds.
    pub(crate) fn validate(&self) -> Result<()> {
        if !self.spacing_mm.iter().all(|s| s.is_finite() && *s > 0.0) {
            return Err(Error::invalid(
                "spacing_mm",
                format!("{:?} must be finite and positive", self.spacing_mm),
            ));
        }
        if self.patch.contains(&0) {
            return Err(Error::invalid(
                "patch",
                format!("{:?} must be at least 1 voxel per axis", self.patch),
            ));
        }
        let (low, high, range) = match self.intensity {
            IntensityPolicy::Ct { min_hu, max_hu } => (min_hu, max_hu, f32::MIN..=f32::MAX),
            IntensityPolicy::Percentile { low, high } => (low, high, 0.0..=100.0),
        };
        if !(range.contains(&low) && range.contains(&high) && low < high) {
            return Err(Error::invalid(
                "intensity",
                format!(
                    "{:?}: bounds must be finite, in range and ordered",
                    self.intensity
                ),
            ));
        }
        Ok(())
    }
}

/// The task embedding of one class: one `[tokens * channels]` row-major
/// vector per stage.
#[derive(Clone, Debug, PartialEq)]
pub struct ClassEmbedding {
    label: u32,
    name: String,
    provenance: Provenance,
    stages: Vec<Vec<f32>>,
}

impl ClassEmbedding {
    /// Builds a class embedding.
    ///
    /// `label` is the value of the class in the reference label map; `name`
    /// is UTF-8, at most [`MAX_NAME_BYTES`] bytes; `stages[s]` holds stage
    /// `s` as `tokens * channels` values, token-major. Stage lengths are
    /// checked against the stage shapes by [`TaskEmbedding::new`].
    ///
    /// # Errors
    /// [`Error::InvalidArgument`] for an invalid provenance, a name too long or
    /// no stage; [`Error::NonFinite`] if any value is NaN or infinite.
    pub fn new(
        label: u32,
        name: impl Into<String>,
        provenance: Provenance,
        stages: Vec<Vec<f32>>,
    ) -> Result<Self> {
        let name = name.into();
        if name.len() > MAX_NAME_BYTES {
            return Err(Error::invalid(
                "class name",
                format!("{} bytes, at most {MAX_NAME_BYTES} allowed", name.len()),
            ));
        }
        provenance.validate()?;
        if stages.is_empty() {
            return Err(Error::invalid("stages", "a class needs at least one stage"));
        }
        let bad = stages.iter().flatten().filter(|v| !v.is_finite()).count();
        if bad > 0 {
            return Err(Error::NonFinite {
                what: "class embedding",
                count: bad,
            });
        }
        Ok(ClassEmbedding {
            label,
            name,
            provenance,
            stages,
        })
    }

    /// The label value in the reference label map.
    pub fn label(&self) -> u32 {
        self.label
    }

    /// The class name (may be empty).
    pub fn name(&self) -> &str {
        &self.name
    }

    /// How the embedding was made.
    pub fn provenance(&self) -> Provenance {
        self.provenance
    }

    /// One `tokens * channels` row-major vector per stage.
    pub fn stages(&self) -> &[Vec<f32>] {
        &self.stages
    }

    /// `label (name)` for error messages.
    fn describe(&self) -> String {
        format!("{} ({:?})", self.label, self.name)
    }

    fn check_same_shape(&self, other: &ClassEmbedding) -> Result<()> {
        let lens = |c: &ClassEmbedding| c.stages.iter().map(Vec::len).collect::<Vec<_>>();
        if lens(self) != lens(other) {
            return Err(Error::ShapeMismatch {
                what: format!(
                    "stage lengths of class {} vs class {}",
                    self.describe(),
                    other.describe()
                ),
                expected: lens(self),
                found: lens(other),
            });
        }
        Ok(())
    }

    /// Cosine similarity with `other` over all stages taken together as one
    /// vector, in `[-1, 1]`; 0 if either embedding is all zeros.
    ///
    /// This is the object-level comparison of the paper's context retrieval:
    /// one class against one class.
    ///
    /// # Errors
    /// [`Error::ShapeMismatch`] if the stage lengths differ.
    pub fn similarity(&self, other: &ClassEmbedding) -> Result<f32> {
        self.check_same_shape(other)?;
        Ok(cosine(
            self.stages
                .iter()
                .flatten()
                .zip(other.stages.iter().flatten()),
        ))
    }

    /// Averages class embeddings of the same shape, each weighted by the
    /// number of references behind it (1 for one-shot, `n` for an ensemble
    /// of `n`), so averaging an ensemble of 3 with a one-shot equals the
    /// mean of all 4 references. Label and name are taken from the first
    /// part (parts retrieved from different label maps may differ).
    ///
    /// # Errors
    /// [`Error::InvalidArgument`] if `parts` is empty, a part is a memory-bank
    /// or tuned embedding, or the references add up past `u32::MAX`;
    /// [`Error::ShapeMismatch`] if stage lengths differ.
    pub fn ensemble(parts: &[&ClassEmbedding]) -> Result<ClassEmbedding> {
        let Some(first) = parts.first() else {
            return Err(Error::invalid("ensemble", "no embedding to average"));
        };
        let mut total: u32 = 0;
        let mut weights = Vec::with_capacity(parts.len());
        for part in parts {
            first.check_same_shape(part)?;
            let weight = match part.provenance {
                Provenance::OneShot => 1,
                Provenance::Ensemble { references } => references,
                other => {
                    return Err(Error::invalid(
                        "ensemble part",
                        format!(
                            "class {} is {other:?}; only one-shot and ensemble embeddings are averaged",
                            part.describe()
                        ),
                    ));
                }
            };
            total = total.checked_add(weight).ok_or_else(|| {
                Error::invalid("ensemble", "more than u32::MAX references in total")
            })?;
            weights.push(f64::from(weight));
        }
        let stages = first
            .stages
            .iter()
            .enumerate()
            .map(|(s, stage)| {
                let mut sum = alloc::vec![0f64; stage.len()];
                for (part, w) in parts.iter().zip(&weights) {
                    for (acc, v) in sum.iter_mut().zip(&part.stages[s]) {
                        *acc += w * f64::from(*v);
                    }
                }
                sum.iter().map(|v| (v / f64::from(total)) as f32).collect()
            })
            .collect();
        let provenance = match total {
            1 => Provenance::OneShot,
            references => Provenance::Ensemble { references },
        };
        Ok(ClassEmbedding {
            label: first.label,
            name: first.name.clone(),
            provenance,
            stages,
        })
    }
}

/// Cosine similarity of two vectors of the same length, in `[-1, 1]`,
/// computed in `f64`; 0 if either vector is all zeros.
///
/// # Errors
/// [`Error::ShapeMismatch`] if the lengths differ.
pub fn cosine_similarity(a: &[f32], b: &[f32]) -> Result<f32> {
    if a.len() != b.len() {
        return Err(Error::ShapeMismatch {
            what: "cosine similarity operands".to_string(),
            expected: alloc::vec![a.len()],
            found: alloc::vec![b.len()],
        });
    }
    Ok(cosine(a.iter().zip(b)))
}

fn cosine<'a>(pairs: impl Iterator<Item = (&'a f32, &'a f32)>) -> f32 {
    let (mut dot, mut aa, mut bb) = (0f64, 0f64, 0f64);
    for (&x, &y) in pairs {
        let (x, y) = (f64::from(x), f64::from(y));
        dot += x * y;
        aa += x * x;
        bb += y * y;
    }
    let norms = libm::sqrt(aa) * libm::sqrt(bb);
    if norms == 0.0 || !norms.is_finite() {
        return 0.0;
    }
    (dot / norms).clamp(-1.0, 1.0) as f32
}

/// One result of [`top_k`].
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct Retrieved {
    /// Position of the class in the pool, in iteration order.
    pub index: usize,
    /// Cosine similarity to the query, in `[-1, 1]`.
    pub similarity: f32,
}

/// The `k` classes of `pool` most similar to `query` ([`ClassEmbedding::similarity`]),
/// most similar first; equal similarities keep their pool order. Returns the
/// whole pool, sorted, when `k` exceeds its size.
///
/// # Errors
/// [`Error::ShapeMismatch`] if a pool entry's stages differ from the query's.
pub fn top_k<'a>(
    query: &ClassEmbedding,
    pool: impl IntoIterator<Item = &'a ClassEmbedding>,
    k: usize,
) -> Result<Vec<Retrieved>> {
    let mut scored = pool
        .into_iter()
        .enumerate()
        .map(|(index, class)| {
            Ok(Retrieved {
                index,
                similarity: query.similarity(class)?,
            })
        })
        .collect::<Result<Vec<_>>>()?;
    // Stable sort: ties keep pool order.
    scored.sort_by(|a, b| b.similarity.total_cmp(&a.similarity));
    scored.truncate(k);
    Ok(scored)
}

/// Task embeddings of one or more classes, with the model and preprocessing
/// they belong to. See the [module docs](self).
#[derive(Clone, Debug, PartialEq)]
pub struct TaskEmbedding {
    model: ModelFingerprint,
    preprocessing: Preprocessing,
    stage_shapes: Vec<StageShape>,
    classes: Vec<ClassEmbedding>,
}

impl TaskEmbedding {
    /// Builds a task embedding and checks it.
    ///
    /// # Errors
    /// [`Error::InvalidArgument`] if there are no (or more than
    /// [`MAX_STAGES`]) stages, no (or more than [`MAX_CLASSES`]) classes, a
    /// stage shape is empty or too large, two classes share a label, or the
    /// preprocessing is invalid; [`Error::ShapeMismatch`] if a class's stage
    /// lengths do not match `stage_shapes`.
    pub fn new(
        model: ModelFingerprint,
        preprocessing: Preprocessing,
        stage_shapes: Vec<StageShape>,
        classes: Vec<ClassEmbedding>,
    ) -> Result<Self> {
        preprocessing.validate()?;
        if stage_shapes.is_empty() || stage_shapes.len() > MAX_STAGES {
            return Err(Error::invalid(
                "stage count",
                format!("{} stages, expected 1 to {MAX_STAGES}", stage_shapes.len()),
            ));
        }
        if classes.is_empty() || classes.len() > MAX_CLASSES {
            return Err(Error::invalid(
                "class count",
                format!("{} classes, expected 1 to {MAX_CLASSES}", classes.len()),
            ));
        }
        let lens = stage_shapes
            .iter()
            .map(StageShape::value_count)
            .collect::<Result<Vec<_>>>()?;
        for class in &classes {
            let found: Vec<usize> = class.stages.iter().map(Vec::len).collect();
            if found != lens {
                return Err(Error::ShapeMismatch {
                    what: format!("stage lengths of class {}", class.describe()),
                    expected: lens,
                    found,
                });
            }
        }
        // Sorted, so that a bank of many classes is checked in O(K log K).
        let mut by_label: Vec<&ClassEmbedding> = classes.iter().collect();
        by_label.sort_by_key(|c| c.label);
        if let Some(pair) = by_label.windows(2).find(|p| p[0].label == p[1].label) {
            return Err(Error::invalid(
                "class label",
                format!(
                    "label {} is used twice ({:?} and {:?})",
                    pair[0].label, pair[0].name, pair[1].name
                ),
            ));
        }
        Ok(TaskEmbedding {
            model,
            preprocessing,
            stage_shapes,
            classes,
        })
    }

    /// Fingerprint of the model that made this embedding.
    pub fn model(&self) -> &ModelFingerprint {
        &self.model
    }

    /// Preprocessing that queries must get.
    pub fn preprocessing(&self) -> &Preprocessing {
        &self.preprocessing
    }

    /// Shape of each stage.
    pub fn stage_shapes(&self) -> &[StageShape] {
        &self.stage_shapes
    }

    /// The classes, in order.
    pub fn classes(&self) -> &[ClassEmbedding] {
        &self.classes
    }

    /// The class with label value `label`, if present.
    pub fn class(&self, label: u32) -> Option<&ClassEmbedding> {
        self.classes.iter().find(|c| c.label == label)
    }

    /// Checks that this embedding was made by the model with fingerprint `model`.
    ///
    /// # Errors
    /// [`Error::ModelMismatch`] with both fingerprints in hex.
    pub fn ensure_model(&self, model: &ModelFingerprint) -> Result<()> {
        if self.model == *model {
            Ok(())
        } else {
            Err(Error::ModelMismatch {
                expected: model.to_string(),
                found: self.model.to_string(),
            })
        }
    }

    /// The classes with the given label values, in the order asked.
    ///
    /// # Errors
    /// [`Error::InvalidArgument`] naming the first label that is absent and
    /// listing the classes present (also for an empty or repeated request).
    pub fn select_labels(&self, labels: &[u32]) -> Result<TaskEmbedding> {
        self.select(labels, |c, l| c.label == *l, |l| format!("label {l}"))
    }

    /// The classes with the given names (exact match), in the order asked.
    ///
    /// # Errors
    /// As [`select_labels`](Self::select_labels).
    pub fn select_names(&self, names: &[&str]) -> Result<TaskEmbedding> {
        self.select(names, |c, n| c.name == *n, |n| format!("name {n:?}"))
    }

    fn select<K>(
        &self,
        keys: &[K],
        matches: impl Fn(&ClassEmbedding, &K) -> bool,
        show: impl Fn(&K) -> String,
    ) -> Result<TaskEmbedding> {
        let classes = keys
            .iter()
            .map(|key| {
                self.classes
                    .iter()
                    .find(|c| matches(c, key))
                    .cloned()
                    .ok_or_else(|| {
                        Error::invalid(
                            "class",
                            format!("no class with {}; present: {}", show(key), self.listing()),
                        )
                    })
            })
            .collect::<Result<Vec<_>>>()?;
        self.with_classes(classes)
    }

    /// `1 "liver", 2 "spleen", ...` (at most 32 entries).
    fn listing(&self) -> String {
        const SHOWN: usize = 32;
        let mut out = self
            .classes
            .iter()
            .take(SHOWN)
            .map(ClassEmbedding::describe)
            .collect::<Vec<_>>()
            .join(", ");
        if self.classes.len() > SHOWN {
            out += &format!(" and {} more", self.classes.len() - SHOWN);
        }
        out
    }

    fn with_classes(&self, classes: Vec<ClassEmbedding>) -> Result<TaskEmbedding> {
        TaskEmbedding::new(
            self.model,
            self.preprocessing,
            self.stage_shapes.clone(),
            classes,
        )
    }

    /// Checks that `other` has the same model, preprocessing and stage shapes.
    fn check_compatible(&self, other: &TaskEmbedding) -> Result<()> {
        other.ensure_model(&self.model)?;
        if other.preprocessing != self.preprocessing {
            return Err(Error::invalid(
                "preprocessing",
                format!(
                    "{:?} differs from {:?}",
                    other.preprocessing, self.preprocessing
                ),
            ));
        }
        if other.stage_shapes != self.stage_shapes {
            let flat = |t: &TaskEmbedding| {
                t.stage_shapes
                    .iter()
                    .flat_map(|s| [s.tokens as usize, s.channels as usize])
                    .collect()
            };
            return Err(Error::ShapeMismatch {
                what: "stage shapes ([tokens, channels] per stage)".to_string(),
                expected: flat(self),
                found: flat(other),
            });
        }
        Ok(())
    }

    /// Concatenates the classes of `other` after those of `self` (e.g. two
    /// files into one memory bank).
    ///
    /// # Errors
    /// [`Error::ModelMismatch`], [`Error::ShapeMismatch`] or
    /// [`Error::InvalidArgument`] if model, stage shapes or preprocessing
    /// differ, or a label is in both.
    pub fn merge(mut self, other: TaskEmbedding) -> Result<TaskEmbedding> {
        self.check_compatible(&other)?;
        self.classes.extend(other.classes);
        TaskEmbedding::new(
            self.model,
            self.preprocessing,
            self.stage_shapes,
            self.classes,
        )
    }

    /// Context ensemble: per class label, the mean of the parts weighted by
    /// the references behind each ([`ClassEmbedding::ensemble`]). Classes
    /// keep the order of the first part.
    ///
    /// # Errors
    /// [`Error::InvalidArgument`] if `parts` is empty, their label sets or
    /// names differ, or a class is not one-shot or ensemble;
    /// [`Error::ModelMismatch`] / [`Error::ShapeMismatch`] as in
    /// [`merge`](Self::merge).
    pub fn ensemble(parts: &[TaskEmbedding]) -> Result<TaskEmbedding> {
        let Some(first) = parts.first() else {
            return Err(Error::invalid("ensemble", "no embedding to average"));
        };
        for (i, part) in parts.iter().enumerate() {
            first.check_compatible(part)?;
            if part.classes.len() != first.classes.len() {
                return Err(Error::invalid(
                    "ensemble",
                    format!(
                        "part {i} has classes {} but part 0 has {}",
                        part.listing(),
                        first.listing()
                    ),
                ));
            }
        }
        let classes = first
            .classes
            .iter()
            .map(|class| {
                let same = parts
                    .iter()
                    .enumerate()
                    .map(|(i, part)| part.matching_class(class, i))
                    .collect::<Result<Vec<_>>>()?;
                ClassEmbedding::ensemble(&same)
            })
            .collect::<Result<Vec<_>>>()?;
        first.with_classes(classes)
    }

    /// The class of `self` with the label of `class`, which must have the same name.
    fn matching_class(&self, class: &ClassEmbedding, part: usize) -> Result<&ClassEmbedding> {
        let found = self.class(class.label).ok_or_else(|| {
            Error::invalid(
                "ensemble",
                format!(
                    "part {part} has no class {}; it has {}",
                    class.describe(),
                    self.listing()
                ),
            )
        })?;
        if found.name != class.name {
            return Err(Error::invalid(
                "class name",
                format!(
                    "label {} is {:?} in part {part} but {:?} elsewhere",
                    class.label, found.name, class.name
                ),
            ));
        }
        Ok(found)
    }

    /// Memory-bank update with momentum `a`: for each class of `observed`,
    /// the class with the same label becomes `a * T + (1 - a) * T_new`
    /// (computed in `f64`) and its provenance
    /// [`Provenance::MemoryBank`] with `updates` incremented (an entry that
    /// was not yet a bank entry counts its first update as 1). A class not in
    /// the bank is appended as it is, with `updates: 0`. On error, `self` is
    /// unchanged.
    ///
    /// # Errors
    /// [`Error::InvalidArgument`] if `a` is not in `[0, 1]`, a label has a
    /// different name, or the bank would exceed [`MAX_CLASSES`];
    /// [`Error::ModelMismatch`] / [`Error::ShapeMismatch`] as in
    /// [`merge`](Self::merge).
    pub fn ema_update(&mut self, observed: &TaskEmbedding, momentum: f32) -> Result<()> {
        check_momentum(momentum)?;
        self.check_compatible(observed)?;
        let a = f64::from(momentum);
        let mut updated = self.classes.clone();
        for new in &observed.classes {
            match updated.iter_mut().find(|c| c.label == new.label) {
                Some(old) => {
                    if old.name != new.name {
                        return Err(Error::invalid(
                            "class name",
                            format!(
                                "label {} is {:?} in the bank but {:?} in the update",
                                new.label, old.name, new.name
                            ),
                        ));
                    }
                    for (t, t_new) in old
                        .stages
                        .iter_mut()
                        .flatten()
                        .zip(new.stages.iter().flatten())
                    {
                        *t = (a * f64::from(*t) + (1.0 - a) * f64::from(*t_new)) as f32;
                    }
                    let updates = match old.provenance {
                        Provenance::MemoryBank { updates, .. } => updates.saturating_add(1),
                        _ => 1,
                    };
                    old.provenance = Provenance::MemoryBank { updates, momentum };
                }
                None => updated.push(ClassEmbedding {
                    provenance: Provenance::MemoryBank {
                        updates: 0,
                        momentum,
                    },
                    ..new.clone()
                }),
            }
        }
        *self = self.with_classes(updated)?;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use alloc::vec;

    fn prep() -> Preprocessing {
        Preprocessing {
            spacing_mm: [1.5, 1.5, 1.5],
            patch: [128, 128, 128],
            intensity: IntensityPolicy::Percentile {
                low: 2.0,
                high: 98.0,
            },
        }
    }

    fn shapes() -> Vec<StageShape> {
        vec![
            StageShape {
                tokens: 2,
                channels: 3,
            },
            StageShape {
                tokens: 2,
                channels: 1,
            },
        ]
    }

    fn class(label: u32, name: &str, p: Provenance, x: f32) -> ClassEmbedding {
        ClassEmbedding::new(label, name, p, vec![vec![x; 6], vec![-x; 2]]).unwrap()
    }

    fn task(classes: Vec<ClassEmbedding>) -> Result<TaskEmbedding> {
        TaskEmbedding::new(ModelFingerprint::new([1; 32]), prep(), shapes(), classes)
    }

    #[test]
    fn provenance_in_words() {
        let words = |p: Provenance| p.to_string();
        assert_eq!(words(Provenance::OneShot), "one-shot");
        assert_eq!(
            words(Provenance::Ensemble { references: 1 }),
            "ensemble of 1 reference"
        );
        assert_eq!(
            words(Provenance::Ensemble { references: 4 }),
            "ensemble of 4 references"
        );
        assert_eq!(
            words(Provenance::MemoryBank {
                updates: 0,
                momentum: 0.9
            }),
            "memory bank (0 updates, momentum 0.9)"
        );
        assert_eq!(
            words(Provenance::MemoryBank {
                updates: 1,
                momentum: 1.0
            }),
            "memory bank (1 update, momentum 1)"
        );
        assert_eq!(
            words(Provenance::Tuned {
                steps: 1,
                references: 3
            }),
            "tuned (1 step from 3 references)"
        );
        assert_eq!(
            words(Provenance::Tuned {
                steps: 250,
                references: 1
            }),
            "tuned (250 steps from 1 reference)"
        );
    }

    #[test]
    fn fingerprint_hex_round_trip_and_errors() {
        let mut bytes = [0u8; 32];
        bytes[0] = 0xab;
        bytes[31] = 0x0f;
        let fp = ModelFingerprint::new(bytes);
        let hex = fp.to_string();
        assert_eq!(hex.len(), 64);
        assert!(hex.starts_with("ab00") && hex.ends_with("000f"));
        assert_eq!(ModelFingerprint::from_hex(&hex.to_uppercase()).unwrap(), fp);
        assert!(ModelFingerprint::from_hex(&hex[1..]).is_err());
        let bad = format!("g{}", &hex[1..]);
        let err = ModelFingerprint::from_hex(&bad).unwrap_err().to_string();
        assert!(err.contains("'g'"), "{err}");
    }

    #[test]
    fn construction_is_validated() {
        assert!(ClassEmbedding::new(1, "a", Provenance::OneShot, vec![vec![f32::NAN]]).is_err());
        assert!(
            ClassEmbedding::new(
                1,
                "a",
                Provenance::Ensemble { references: 0 },
                vec![vec![0.0]]
            )
            .is_err()
        );
        let bank = Provenance::MemoryBank {
            updates: 1,
            momentum: 1.5,
        };
        assert!(ClassEmbedding::new(1, "a", bank, vec![vec![0.0]]).is_err());
        assert!(ClassEmbedding::new(1, "a", Provenance::OneShot, vec![]).is_err());
        let long = "x".repeat(MAX_NAME_BYTES + 1);
        assert!(ClassEmbedding::new(1, long, Provenance::OneShot, vec![vec![0.0]]).is_err());

        let short = ClassEmbedding::new(1, "a", Provenance::OneShot, vec![vec![0.0; 6]]).unwrap();
        assert!(matches!(
            task(vec![short]),
            Err(Error::ShapeMismatch { .. })
        ));
        let dup = task(vec![
            class(3, "a", Provenance::OneShot, 1.0),
            class(3, "b", Provenance::OneShot, 1.0),
        ])
        .unwrap_err();
        assert!(dup.to_string().contains("label 3 is used twice"), "{dup}");
        assert!(task(vec![]).is_err());
        let mut p = prep();
        p.spacing_mm[1] = 0.0;
        let c = vec![class(1, "a", Provenance::OneShot, 1.0)];
        assert!(
            TaskEmbedding::new(ModelFingerprint::new([1; 32]), p, shapes(), c.clone()).is_err()
        );
        let too_big = vec![StageShape {
            tokens: 1 << 16,
            channels: 1 << 16,
        }];
        assert!(TaskEmbedding::new(ModelFingerprint::new([1; 32]), prep(), too_big, c).is_err());
    }

    #[test]
    fn ensure_model_reports_both_fingerprints() {
        let t = task(vec![class(1, "a", Provenance::OneShot, 1.0)]).unwrap();
        assert!(t.ensure_model(&ModelFingerprint::new([1; 32])).is_ok());
        match t.ensure_model(&ModelFingerprint::new([2; 32])) {
            Err(Error::ModelMismatch { expected, found }) => {
                assert_eq!(expected, "02".repeat(32));
                assert_eq!(found, "01".repeat(32));
            }
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn selection_by_label_and_name() {
        let t = task(vec![
            class(1, "liver", Provenance::OneShot, 1.0),
            class(5, "spleen", Provenance::OneShot, 2.0),
        ])
        .unwrap();
        let s = t.select_labels(&[5]).unwrap();
        assert_eq!(s.classes()[0].name(), "spleen");
        let s = t.select_names(&["spleen", "liver"]).unwrap();
        assert_eq!(
            s.classes().iter().map(|c| c.label()).collect::<Vec<_>>(),
            [5, 1]
        );
        let err = t.select_labels(&[7]).unwrap_err().to_string();
        assert!(
            err.contains("label 7") && err.contains("\"liver\"") && err.contains("5 (\"spleen\")"),
            "{err}"
        );
        let err = t.select_names(&["kidney"]).unwrap_err().to_string();
        assert!(err.contains("\"kidney\""), "{err}");
    }

    #[test]
    fn merge_concatenates_and_refuses_duplicates() {
        let a = task(vec![class(1, "liver", Provenance::OneShot, 1.0)]).unwrap();
        let b = task(vec![class(2, "spleen", Provenance::OneShot, 2.0)]).unwrap();
        let m = a.clone().merge(b).unwrap();
        assert_eq!(m.classes().len(), 2);
        assert_eq!(m.class(2).unwrap().stages()[0][0], 2.0);
        assert!(a.clone().merge(a.clone()).is_err());
        let other = TaskEmbedding::new(
            ModelFingerprint::new([9; 32]),
            prep(),
            shapes(),
            a.classes().to_vec(),
        )
        .unwrap();
        assert!(matches!(a.merge(other), Err(Error::ModelMismatch { .. })));
    }

    #[test]
    fn ensemble_is_weighted_by_references() {
        let ens3 = class(1, "liver", Provenance::Ensemble { references: 3 }, 2.0);
        let one = class(1, "liver", Provenance::OneShot, 6.0);
        let m = ClassEmbedding::ensemble(&[&ens3, &one]).unwrap();
        // (3 * 2 + 1 * 6) / 4 = 3
        assert_eq!(m.stages()[0], [3.0; 6]);
        assert_eq!(m.stages()[1], [-3.0; 2]);
        assert_eq!(m.provenance(), Provenance::Ensemble { references: 4 });
        let tuned = class(
            1,
            "liver",
            Provenance::Tuned {
                steps: 5,
                references: 1,
            },
            1.0,
        );
        assert!(ClassEmbedding::ensemble(&[&one, &tuned]).is_err());
        assert!(ClassEmbedding::ensemble(&[]).is_err());
        assert_eq!(
            ClassEmbedding::ensemble(&[&one]).unwrap().provenance(),
            Provenance::OneShot
        );
    }

    #[test]
    fn ensemble_of_tasks_refuses_mismatched_classes() {
        let a = task(vec![class(1, "liver", Provenance::OneShot, 1.0)]).unwrap();
        let b = task(vec![class(2, "spleen", Provenance::OneShot, 1.0)]).unwrap();
        let err = TaskEmbedding::ensemble(&[a.clone(), b])
            .unwrap_err()
            .to_string();
        assert!(err.contains("no class 1"), "{err}");
        let renamed = task(vec![class(1, "hepar", Provenance::OneShot, 1.0)]).unwrap();
        assert!(TaskEmbedding::ensemble(&[a.clone(), renamed]).is_err());
        let two = task(vec![
            class(1, "liver", Provenance::OneShot, 1.0),
            class(2, "spleen", Provenance::OneShot, 1.0),
        ])
        .unwrap();
        assert!(TaskEmbedding::ensemble(&[a, two]).is_err());
        assert!(TaskEmbedding::ensemble(&[]).is_err());
    }

    #[test]
    fn ema_update_blends_counts_and_appends() {
        let mut bank = task(vec![class(1, "liver", Provenance::OneShot, 1.0)]).unwrap();
        let obs = task(vec![
            class(1, "liver", Provenance::OneShot, 3.0),
            class(2, "spleen", Provenance::OneShot, 5.0),
        ])
        .unwrap();
        bank.ema_update(&obs, 0.75).unwrap();
        let liver = bank.class(1).unwrap();
        // 0.75 * 1 + 0.25 * 3 = 1.5
        assert_eq!(liver.stages()[0], [1.5; 6]);
        assert_eq!(
            liver.provenance(),
            Provenance::MemoryBank {
                updates: 1,
                momentum: 0.75
            }
        );
        assert_eq!(
            bank.class(2).unwrap().provenance(),
            Provenance::MemoryBank {
                updates: 0,
                momentum: 0.75
            }
        );
        bank.ema_update(&obs, 0.5).unwrap();
        assert_eq!(bank.class(1).unwrap().stages()[0], [2.25; 6]);
        assert_eq!(
            bank.class(2).unwrap().provenance(),
            Provenance::MemoryBank {
                updates: 1,
                momentum: 0.5
            }
        );
        let before = bank.clone();
        assert!(bank.ema_update(&obs, 1.5).is_err());
        let renamed = task(vec![class(1, "hepar", Provenance::OneShot, 0.0)]).unwrap();
        assert!(bank.ema_update(&renamed, 0.5).is_err());
        assert_eq!(bank, before, "a failed update leaves the bank unchanged");
    }

    #[test]
    fn cosine_handles_zero_and_mismatch() {
        assert_eq!(cosine_similarity(&[0.0, 0.0], &[1.0, 2.0]).unwrap(), 0.0);
        assert!(
            (cosine_similarity(&[1.0, 0.0], &[1.0, 1.0]).unwrap()
                - core::f32::consts::FRAC_1_SQRT_2)
                .abs()
                < 1e-7
        );
        assert_eq!(cosine_similarity(&[2.0, 4.0], &[-1.0, -2.0]).unwrap(), -1.0);
        assert!(matches!(
            cosine_similarity(&[1.0], &[1.0, 2.0]),
            Err(Error::ShapeMismatch { .. })
        ));
        let big = f32::MAX;
        assert_eq!(cosine_similarity(&[big, big], &[big, big]).unwrap(), 1.0);
    }
}
