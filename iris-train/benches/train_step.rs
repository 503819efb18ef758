//! Training throughput: episodes per second of one full training step
//! (forward, backward, LAMB update and memory-bank update) for the `tiny`
//! and `small` presets on the CPU (`flex`) backend, one episode per step
//! with `CLASSES` classes at the preset's full window, and the peak
//! resident memory of each (Linux `VmHWM`, reset between presets).
//!
//! Episodes are random images and masks made before timing, so the numbers
//! exclude data generation (see the `episodes` bench for that).
//!
//! Run: `RAYON_NUM_THREADS=2 cargo bench -p iris-train --bench train_step`.

mod common;

use std::time::Instant;

use iris_train::data::{ClassKey, Episode};
use iris_train::model::IrisConfig;
use iris_train::training::{Trainer, TrainingConfig};
use ndarray::{Array3, Array4};

/// Classes per episode.
const CLASSES: usize = 2;

/// A deterministic pseudo-random episode at `patch`.
fn episode(patch: [usize; 3], seed: u64) -> Episode {
    let mut state = seed;
    let mut next = move || {
        state = state
            .wrapping_mul(6_364_136_223_846_793_005)
            .wrapping_add(1_442_695_040_888_963_407);
        (state >> 40) as f32 / (1u64 << 24) as f32
    };
    let [d, h, w] = patch;
    let mut image = || Array3::from_shape_fn((d, h, w), |_| next() * 2.0 - 1.0);
    let (reference_image, query_image) = (image(), image());
    // Class k: a slab of the volume, so masks are large and never empty.
    let masks = Array4::from_shape_fn((CLASSES, d, h, w), |(k, z, _, _)| {
        u8::from(z * CLASSES / d == k)
    });
    Episode {
        reference_image,
        reference_masks: masks.clone(),
        query_image,
        query_masks: masks,
        classes: (0..CLASSES)
            .map(|k| ClassKey::new("bench", k as u16 + 1))
            .collect(),
    }
}

fn bench(name: &str, model: IrisConfig, steps: usize) {
    common::reset_peak_rss();
    let device = iris_train::device::select_device();
    let patch = model.patch_size;
    let config = TrainingConfig::new(model, 1000);
    let mut trainer = Trainer::new(config, &device).expect("valid preset");
    let episodes: Vec<Episode> = (0..=steps as u64).map(|s| episode(patch, s)).collect();
    // Warm-up: the first step also initialises the lazy weights.
    trainer.train_on(&episodes[..1]).expect("step");
    let mut times: Vec<f64> = episodes[1..]
        .iter()
        .map(|e| {
            let start = Instant::now();
            trainer.train_on(std::slice::from_ref(e)).expect("step");
            start.elapsed().as_secs_f64()
        })
        .collect();
    times.sort_by(f64::total_cmp);
    let median = times[times.len() / 2];
    let peak = common::peak_rss_mib().map_or("unknown".to_string(), |m| format!("{m:.0} MiB"));
    println!(
        "{name:>5}: {:.3} s/step (median of {steps}), {:.2} episodes/s, peak RSS {peak}",
        median,
        1.0 / median
    );
}

fn main() {
    println!(
        "training step (forward + backward + LAMB + bank), {CLASSES} classes, {} threads",
        rayon::current_num_threads()
    );
    bench("tiny", IrisConfig::tiny(), 10);
    bench("small", IrisConfig::small(), 5);
}
