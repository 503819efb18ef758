//! Evaluation on classes held out of training: fixed episodes
//! ([`held_out_episodes`]) and the model's mean Dice on them ([`evaluate`]).

use burn::prelude::*;
use rand::SeedableRng;
use rand::rngs::ChaCha8Rng;

use super::step::{image_tensor, masks_tensor, thresholded_dice};
use crate::data::{Episode, EpisodeSampler, Task};
use crate::error::Error;
use crate::model::Iris;

/// Mean thresholded Dice ([`thresholded_dice`]) of `model` over
/// `episodes`, each segmented from its own reference (one-shot), without
/// gradients; `None` for no episodes.
///
/// # Errors
/// [`Error::Shape`] for episodes of the wrong shape.
pub fn evaluate(model: &Iris, episodes: &[Episode]) -> Result<Option<f32>, Error> {
    let model = model.valid();
    let Some(device) = model.devices().first().cloned() else {
        return Ok(None);
    };
    let mut total = 0.0;
    for episode in episodes {
        let logits = model.forward(
            image_tensor(&episode.query_image, &device),
            image_tensor(&episode.reference_image, &device),
            masks_tensor(&episode.reference_masks, &device),
        )?;
        total += thresholded_dice(logits, masks_tensor(&episode.query_masks, &device));
    }
    Ok((!episodes.is_empty()).then(|| total / episodes.len() as f32))
}

/// Fixed evaluation episodes on classes held out of training: for up to
/// `count` held-out classes (in source order) with at least `min_voxels`
/// voxels in a subject, one single-class episode drawn from seed
/// `seed + i` (reference and query: two draws of that subject). The same
/// arguments give the same episodes, so evaluations along a run compare.
///
/// # Errors
/// [`Error::Dataset`] or [`Error::Core`] if an episode cannot be generated.
pub fn held_out_episodes(
    sampler: &EpisodeSampler,
    count: usize,
    min_voxels: usize,
    seed: u64,
) -> Result<Vec<Episode>, Error> {
    let mut tasks = Vec::new();
    for (s, source) in sampler.sources().iter().enumerate() {
        for class in source.classes().iter().filter(|c| c.held_out) {
            let subject = source.subjects().iter().position(|subject| {
                subject
                    .stats(class.label)
                    .is_some_and(|st| st.voxels >= min_voxels)
            });
            if let Some(subject) = subject {
                tasks.push(Task {
                    source: s,
                    reference_subject: subject,
                    query_subject: subject,
                    labels: vec![class.label],
                    classes: vec![class.key.clone()],
                });
            }
        }
    }
    tasks
        .iter()
        .take(count)
        .enumerate()
        .map(|(i, task)| {
            let mut rng = ChaCha8Rng::seed_from_u64(seed.wrapping_add(i as u64));
            sampler.generate(task, &mut rng)
        })
        .collect()
}
