//! Episodes of the paper's Algorithm 1: a reference and a query of the same
//! task (one or several classes of one source), drawn independently.
//!
//! Sampling is split in two so that it can be tested and tuned cheaply:
//! [`EpisodeSampler::sample_task`] picks the source, subjects and classes
//! (microseconds), [`EpisodeSampler::generate`] makes the two images and
//! their masks. [`EpisodeSampler::episode`] does both from a seed.
//!
//! Classes are drawn uniformly among the eligible ones (class-balanced: a
//! small structure is as likely as a large one). A class is eligible when it
//! is not held out, has at least `min_voxels` voxels and covers at least
//! `min_foreground_fraction` of the patch; raising that fraction early in
//! training gives "large targets first" (plain BCE collapsed to empty masks
//! on small targets). Random class dropping: up to `max_classes` classes
//! are drawn, then each is dropped with `class_drop_probability` (at least
//! one stays).

use ndarray::{Array3, Array4, ArrayViewMut3, Axis, Zip};
use rand::rngs::ChaCha8Rng;
use rand::seq::SliceRandom;
use rand::{Rng, RngExt, SeedableRng};

use super::atlas::{ClassInfo, ClassKey, Source, Subject, neighbours6};
use super::augment::{IntensityConfig, SpatialConfig, Warp, augment_intensity, uniform};
use super::synth::{Contrast, SynthConfig, synthesize};
use super::{Error, Result};

/// Most classes per task unless configured: [`EpisodeConfig::max_classes`].
pub const DEFAULT_MAX_CLASSES: usize = 3;

/// Everything that shapes an episode. [`EpisodeConfig::new`] gives the
/// defaults documented on each field.
#[derive(Clone, Debug, PartialEq)]
pub struct EpisodeConfig {
    /// Output patch, voxels `[D, H, W]` of the training grid (the model's
    /// `patch_size`; the sources must already be at its spacing).
    pub patch: [usize; 3],
    /// Most classes per task (>= 1). Default [`DEFAULT_MAX_CLASSES`].
    pub max_classes: usize,
    /// Probability of dropping each drawn class (one always stays). Default 0.3.
    pub class_drop_probability: f64,
    /// Smallest class size, voxels of the training grid. Default 8.
    pub min_voxels: usize,
    /// Smallest class size as a fraction of the patch's voxels (the
    /// curriculum knob: e.g. 0.01 early, 0 later). Default 0.
    pub min_foreground_fraction: f64,
    /// Probability that the reference and query share one synthetic
    /// contrast (each label looks the same in both), as a reference and a
    /// query of one modality do at inference; otherwise each draws its own.
    /// Default 0.9.
    pub shared_contrast_probability: f64,
    /// Probability of using a subject's real image (when it has one)
    /// instead of a synthetic one. Default 0: the real images of `data/`
    /// are the evaluation volumes of issue 7.
    pub real_image_probability: f64,
    /// Random shift of the reference crop, as a fraction of the room that
    /// keeps the task's classes inside it: 0 is a centred crop, 1 a random
    /// one. Default 1.
    pub reference_shift: f64,
    /// Largest random shift of the query crop, as a fraction of the patch,
    /// from a random point between the task's centre and the centre of the
    /// subject's foreground. Default 0.25.
    pub query_shift: f64,
    /// Probability that the reference masks are perturbed (each class
    /// dilated or eroded by one voxel), as imperfect user annotations are.
    /// Default 0.2.
    pub perturb_probability: f64,
    /// Spatial augmentation.
    pub spatial: SpatialConfig,
    /// Synthetic contrast.
    pub synth: SynthConfig,
    /// Intensity augmentation.
    pub intensity: IntensityConfig,
}

impl EpisodeConfig {
    /// The defaults for a `patch` (voxels `[D, H, W]`).
    pub fn new(patch: [usize; 3]) -> Self {
        EpisodeConfig {
            patch,
            max_classes: DEFAULT_MAX_CLASSES,
            class_drop_probability: 0.3,
            min_voxels: 8,
            min_foreground_fraction: 0.0,
            shared_contrast_probability: 0.9,
            real_image_probability: 0.0,
            reference_shift: 1.0,
            query_shift: 0.25,
            perturb_probability: 0.2,
            spatial: SpatialConfig::default(),
            synth: SynthConfig::default(),
            intensity: IntensityConfig::default(),
        }
    }

    /// Checks every field.
    ///
    /// # Errors
    /// [`Error::Core`] naming the first invalid field.
    pub fn validate(&self) -> Result<()> {
        if self.patch.iter().any(|&p| p < 2) {
            return Err(Error::invalid(
                "patch",
                format!("{:?} must be at least 2 voxels per axis", self.patch),
            ));
        }
        iris_core::volume::checked_voxel_count(self.patch)?;
        if self.max_classes == 0 {
            return Err(Error::invalid("max_classes", "must be at least 1"));
        }
        for (name, p) in [
            ("class_drop_probability", self.class_drop_probability),
            ("min_foreground_fraction", self.min_foreground_fraction),
            (
                "shared_contrast_probability",
                self.shared_contrast_probability,
            ),
            ("real_image_probability", self.real_image_probability),
            ("reference_shift", self.reference_shift),
            ("query_shift", self.query_shift),
            ("perturb_probability", self.perturb_probability),
        ] {
            if !(0.0..=1.0).contains(&p) {
                return Err(Error::invalid(name, format!("{p} is not within 0-1")));
            }
        }
        self.spatial.validate()?;
        self.synth.validate()?;
        self.intensity.validate()
    }
}

/// What an episode is about, chosen before any image is made.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Task {
    /// Index of the source in the sampler.
    pub source: usize,
    /// Subject index of the reference in that source.
    pub reference_subject: usize,
    /// Subject index of the query (the same as the reference for a
    /// single-subject atlas: two independent draws of it).
    pub query_subject: usize,
    /// The classes' label values, one target each.
    pub labels: Vec<u16>,
    /// The classes' global keys, in the same order.
    pub classes: Vec<ClassKey>,
}

/// One training episode at patch size. Images are normalised (z-scored as
/// at inference, then augmented); masks are 0/1.
#[derive(Clone, Debug, PartialEq)]
pub struct Episode {
    /// Reference image `[D, H, W]`.
    pub reference_image: Array3<f32>,
    /// Reference masks `[K, D, H, W]`, one per class; none is empty.
    pub reference_masks: Array4<u8>,
    /// Query image `[D, H, W]`.
    pub query_image: Array3<f32>,
    /// Query masks `[K, D, H, W]` (the targets; may be empty where the
    /// random crop leaves a class out).
    pub query_masks: Array4<u8>,
    /// The `K` classes.
    pub classes: Vec<ClassKey>,
}

/// Draws tasks and episodes from a set of [`Source`]s.
#[derive(Debug)]
pub struct EpisodeSampler {
    sources: Vec<Source>,
    config: EpisodeConfig,
    /// Per source, per subject: the eligible label values.
    eligible: Vec<Vec<Vec<u16>>>,
}

/// Tasks tried by [`EpisodeSampler::episode`] before it gives up.
const TASK_ATTEMPTS: usize = 16;
/// Reference draws tried per task before the task is given up.
const DRAW_ATTEMPTS: usize = 4;

impl EpisodeSampler {
    /// A sampler over `sources` (already at the training spacing).
    ///
    /// # Errors
    /// [`Error::Core`] for an invalid `config`, or when no source has an
    /// eligible class.
    pub fn new(sources: Vec<Source>, config: EpisodeConfig) -> Result<EpisodeSampler> {
        config.validate()?;
        let mut sampler = EpisodeSampler {
            sources,
            config,
            eligible: Vec::new(),
        };
        sampler.update_eligible()?;
        Ok(sampler)
    }

    /// Changes the curriculum knob (see [`EpisodeConfig::min_foreground_fraction`]).
    ///
    /// # Errors
    /// As [`EpisodeSampler::new`]; the sampler is unchanged on error.
    pub fn set_min_foreground_fraction(&mut self, fraction: f64) -> Result<()> {
        let old = self.config.min_foreground_fraction;
        self.config.min_foreground_fraction = fraction;
        let result = self.config.validate().and_then(|()| self.update_eligible());
        if result.is_err() {
            self.config.min_foreground_fraction = old;
            self.update_eligible()?;
        }
        result
    }

    fn update_eligible(&mut self) -> Result<()> {
        let patch_voxels = self.config.patch.iter().product::<usize>() as f64;
        let min =
            (self.config.min_voxels as f64).max(self.config.min_foreground_fraction * patch_voxels);
        self.eligible = self
            .sources
            .iter()
            .map(|source| {
                source
                    .subjects()
                    .iter()
                    .map(|subject| {
                        source
                            .classes()
                            .iter()
                            .filter(|c| !c.held_out)
                            .filter(|c| {
                                subject
                                    .stats(c.label)
                                    .is_some_and(|s| s.voxels as f64 >= min)
                            })
                            .map(|c| c.label)
                            .collect()
                    })
                    .collect()
            })
            .collect();
        if self.eligible.iter().flatten().all(Vec::is_empty) {
            return Err(Error::invalid(
                "sources",
                format!(
                    "no class is eligible (not held out, at least {min} voxels) in {} source(s)",
                    self.sources.len()
                ),
            ));
        }
        Ok(())
    }

    /// The configuration.
    pub fn config(&self) -> &EpisodeConfig {
        &self.config
    }

    /// The sources.
    pub fn sources(&self) -> &[Source] {
        &self.sources
    }

    /// Every class that can be a training target with the current settings.
    pub fn trainable_classes(&self) -> impl Iterator<Item = &ClassInfo> {
        self.sources
            .iter()
            .zip(&self.eligible)
            .flat_map(|(source, subjects)| {
                source
                    .classes()
                    .iter()
                    .filter(|c| subjects.iter().any(|labels| labels.contains(&c.label)))
            })
    }

    /// Picks a task: a source uniformly among those with eligible classes,
    /// a reference subject with eligible classes, a query subject (another
    /// one when the source has several), and 1 to `max_classes` distinct
    /// eligible classes present in both, after random class dropping.
    /// Never returns a held-out class.
    pub fn sample_task(&self, rng: &mut impl Rng) -> Task {
        let usable: Vec<usize> = (0..self.sources.len())
            .filter(|&s| self.eligible[s].iter().any(|l| !l.is_empty()))
            .collect();
        // `new` guarantees at least one usable source.
        let source = usable[rng.random_range(0..usable.len())];
        let subjects: Vec<usize> = (0..self.eligible[source].len())
            .filter(|&i| !self.eligible[source][i].is_empty())
            .collect();
        let reference_subject = subjects[rng.random_range(0..subjects.len())];
        let all = self.sources[source].subjects();
        let mut query_subject = reference_subject;
        if all.len() > 1 {
            let other = rng.random_range(0..all.len() - 1);
            query_subject = if other >= reference_subject {
                other + 1
            } else {
                other
            };
        }
        let mut candidates: Vec<u16> = self.eligible[source][reference_subject]
            .iter()
            .copied()
            .filter(|&l| all[query_subject].stats(l).is_some())
            .collect();
        if candidates.is_empty() {
            query_subject = reference_subject;
            candidates.clone_from(&self.eligible[source][reference_subject]);
        }
        let k = rng
            .random_range(1..=self.config.max_classes)
            .min(candidates.len());
        let (picked, _) = candidates.partial_shuffle(rng, k);
        let mut labels: Vec<u16> = picked
            .iter()
            .copied()
            .filter(|_| !rng.random_bool(self.config.class_drop_probability))
            .collect();
        if labels.is_empty() {
            labels.push(picked[rng.random_range(0..picked.len())]);
        }
        let classes = labels
            .iter()
            .map(|&l| ClassKey::new(self.sources[source].name(), l))
            .collect();
        Task {
            source,
            reference_subject,
            query_subject,
            labels,
            classes,
        }
    }

    /// Makes the episode of `task`: two independent draws (warp, bias,
    /// noise, intensity augmentation; the synthetic contrast shared with
    /// probability `shared_contrast_probability`), the reference centred on the task's classes
    /// so that they stay inside the crop, the query centred between the
    /// classes and the subject's foreground and shifted at random by up to
    /// `query_shift` of the patch. The two draws run in parallel (rayon)
    /// from seeds taken from `rng`, so the result depends on `rng` only.
    ///
    /// # Errors
    /// [`Error::Core`] with [`iris_core::Error::EmptyMask`] when a class
    /// of the task vanishes from every reference draw (too small or cut
    /// off), or for an invalid task (labels not in the source).
    pub fn generate(&self, task: &Task, rng: &mut impl Rng) -> Result<Episode> {
        let source = self
            .sources
            .get(task.source)
            .ok_or_else(|| Error::invalid("task.source", format!("no source {}", task.source)))?;
        let subject = |i: usize| {
            source.subjects().get(i).ok_or_else(|| {
                Error::invalid(
                    "task subject",
                    format!("{} has no subject {i}", source.name()),
                )
            })
        };
        let (reference, query) = (
            subject(task.reference_subject)?,
            subject(task.query_subject)?,
        );
        let seeds: [u64; 3] = std::array::from_fn(|_| rng.random());
        let shared = rng
            .random_bool(self.config.shared_contrast_probability)
            .then(|| Contrast::random(rng, &self.config.synth));
        let (reference, query) = rayon::join(
            || self.reference_draw(reference, &task.labels, shared.as_ref(), seeds[0]),
            || {
                self.draw(
                    query,
                    &task.labels,
                    Role::Query,
                    shared.as_ref(),
                    &mut ChaCha8Rng::seed_from_u64(seeds[1]),
                )
            },
        );
        let (reference_image, mut reference_masks) = reference?;
        let (query_image, query_masks) = query?;
        let mut rng = ChaCha8Rng::seed_from_u64(seeds[2]);
        if rng.random_bool(self.config.perturb_probability) {
            for mask in reference_masks.outer_iter_mut() {
                perturb_mask(mask, rng.random_bool(0.5));
            }
        }
        Ok(Episode {
            reference_image,
            reference_masks,
            query_image,
            query_masks,
            classes: task.classes.clone(),
        })
    }

    /// A whole episode from `seed`: deterministic, whatever the number of
    /// threads. Tries up to 16 tasks when classes vanish from the reference.
    ///
    /// # Errors
    /// As [`EpisodeSampler::generate`] when every attempt failed.
    pub fn episode(&self, seed: u64) -> Result<Episode> {
        let mut rng = ChaCha8Rng::seed_from_u64(seed);
        let mut last = None;
        for _ in 0..TASK_ATTEMPTS {
            let task = self.sample_task(&mut rng);
            match self.generate(&task, &mut rng) {
                Ok(episode) => return Ok(episode),
                Err(e @ Error::Core(iris_core::Error::EmptyMask { .. })) => last = Some(e),
                Err(e) => return Err(e),
            }
        }
        Err(last.unwrap_or_else(|| Error::invalid("episode", "no attempt made")))
    }

    /// Reference draws until every class is present.
    fn reference_draw(
        &self,
        subject: &Subject,
        labels: &[u16],
        contrast: Option<&Contrast>,
        seed: u64,
    ) -> Result<(Array3<f32>, Array4<u8>)> {
        let mut rng = ChaCha8Rng::seed_from_u64(seed);
        let mut missing = 0;
        for _ in 0..DRAW_ATTEMPTS {
            let (image, masks) = self.draw(subject, labels, Role::Reference, contrast, &mut rng)?;
            match masks.outer_iter().position(|m| !m.iter().any(|&v| v != 0)) {
                None => return Ok((image, masks)),
                Some(k) => missing = labels[k],
            }
        }
        Err(iris_core::Error::EmptyMask {
            label: u32::from(missing),
        }
        .into())
    }

    /// One draw: warp, image (synthetic, in `contrast` or a contrast of
    /// its own, or real), intensity augmentation, masks.
    fn draw(
        &self,
        subject: &Subject,
        labels: &[u16],
        role: Role,
        contrast: Option<&Contrast>,
        rng: &mut ChaCha8Rng,
    ) -> Result<(Array3<f32>, Array4<u8>)> {
        let patch = self.config.patch;
        let mut lo = [usize::MAX; 3];
        let mut hi = [0usize; 3];
        for &l in labels {
            let stats = subject.stats(l).ok_or_else(|| {
                Error::invalid(
                    "task labels",
                    format!("label {l} is absent from the subject"),
                )
            })?;
            for a in 0..3 {
                lo[a] = lo[a].min(stats.bbox.min[a]);
                hi[a] = hi[a].max(stats.bbox.max[a]);
            }
        }
        // The query looks at a random point between the task's centre and
        // the centre of the subject's foreground (as a whole-brain window at
        // inference does), the reference at the task's centre.
        let toward_subject = match role {
            Role::Reference => 0.0,
            Role::Query => uniform(rng, 0.0, 1.0),
        };
        let whole = subject.foreground_bbox();
        let center: [f64; 3] = std::array::from_fn(|a| {
            let task_mid = (lo[a] + hi[a]) as f64 / 2.0;
            let subject_mid = (whole.min[a] + whole.max[a]) as f64 / 2.0;
            let mid = task_mid + toward_subject * (subject_mid - task_mid);
            let room = match role {
                // Keep the classes' box inside the crop, allowing for a
                // 10 % zoom and a 10 degree rotation.
                Role::Reference => {
                    let room = (0.8 * patch[a] as f64 - (hi[a] - lo[a] + 1) as f64) / 2.0;
                    self.config.reference_shift * room.max(0.0)
                }
                Role::Query => self.config.query_shift * patch[a] as f64,
            };
            mid + uniform(rng, -room, room)
        });
        let warp = Warp::random(rng, &self.config.spatial, patch, center)?;
        let warped = warp.labels(subject.labels());
        let real = subject
            .image()
            .filter(|_| rng.random_bool(self.config.real_image_probability));
        let mut image = match real {
            Some(real) => warp.image(real),
            None => {
                let own;
                let contrast = match contrast {
                    Some(c) => c,
                    None => {
                        own = Contrast::random(rng, &self.config.synth);
                        &own
                    }
                };
                let appearance = subject.appearance().map(|a| warp.labels(a));
                synthesize(
                    appearance.as_ref().unwrap_or(&warped),
                    contrast,
                    rng,
                    &self.config.synth,
                )?
            }
        };
        augment_intensity(&mut image, rng, &self.config.intensity)?;
        let mut masks = Array4::zeros((labels.len(), patch[0], patch[1], patch[2]));
        for (mut mask, &l) in masks.outer_iter_mut().zip(labels) {
            Zip::from(&mut mask)
                .and(&warped)
                .for_each(|m, &v| *m = u8::from(v == l));
        }
        Ok((image, masks))
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Role {
    Reference,
    Query,
}

/// Dilates (or erodes) a 0/1 mask by one voxel with the 6-neighbourhood.
/// An erosion that would empty the mask leaves it unchanged.
pub fn perturb_mask(mut mask: ArrayViewMut3<u8>, dilate: bool) {
    let original = mask.to_owned();
    let shape = original.dim();
    let target = u8::from(!dilate);
    // A voxel flips when it holds `target` and a 6-neighbour holds the other value.
    let flips: Vec<[usize; 3]> = original
        .indexed_iter()
        .filter(|&((z, y, x), &v)| {
            v == target && neighbours6([z, y, x], shape).any(|n| original[n] != target)
        })
        .map(|((z, y, x), _)| [z, y, x])
        .collect();
    if !dilate && flips.len() == original.iter().filter(|&&v| v != 0).count() {
        return;
    }
    for p in flips {
        mask[p] = 1 - target;
    }
}

/// Number of foreground voxels per mask of a `[K, D, H, W]` stack.
pub fn mask_voxels(masks: &Array4<u8>) -> Vec<usize> {
    masks
        .axis_iter(Axis(0))
        .map(|m| m.iter().filter(|&&v| v != 0).count())
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use ndarray::s;

    #[test]
    fn perturbation_grows_or_shrinks_by_one_voxel() {
        let mut mask = Array3::<u8>::zeros((7, 7, 7));
        mask.slice_mut(s![2..5, 2..5, 2..5]).fill(1);
        let mut grown = mask.clone();
        perturb_mask(grown.view_mut(), true);
        // 27 + 6 faces of 9.
        assert_eq!(grown.iter().filter(|&&v| v == 1).count(), 27 + 54);
        let mut shrunk = mask.clone();
        perturb_mask(shrunk.view_mut(), false);
        assert_eq!(shrunk.iter().filter(|&&v| v == 1).count(), 1);
        assert_eq!(shrunk[[3, 3, 3]], 1);
        let mut single = Array3::<u8>::zeros((3, 3, 3));
        single[[1, 1, 1]] = 1;
        perturb_mask(single.view_mut(), false);
        assert_eq!(single[[1, 1, 1]], 1, "erosion never empties a mask");
    }
}
