//! Episodes per second of the training-data generator, for the `tiny`
//! (32³ at 6 mm) and `small` (64³ at 3 mm) presets, on 1 and 2 threads.
//!
//! Uses the real atlases of `data/` (run `scripts/fetch-data.sh`).
//! Run with `cargo bench -p iris-train --bench episodes`. With
//! `IRIS_DUMP_EPISODES=DIR` it also writes episode 0 of each preset there as
//! NIfTI (`<preset>-{reference,query}.nii.gz` and their label maps) to look at.

use std::path::Path;
use std::time::Instant;

use iris_core::nifti::{write_image, write_labels};
use iris_core::volume::{Affine, Image, LabelMap};
use iris_train::data::atlas::load_atlases;
use iris_train::data::episode::mask_voxels;
use iris_train::data::{AtlasSource, Episode, EpisodeConfig, EpisodeSampler};
use ndarray::{Array3, Array4, Axis};

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let data = Path::new(env!("CARGO_MANIFEST_DIR")).join("../data");
    if !data.join("mricron/aal.nii.gz").is_file() {
        eprintln!(
            "episodes bench: {} has no atlases; run scripts/fetch-data.sh",
            data.display()
        );
        return Ok(());
    }
    for (preset, patch, spacing, episodes) in [("tiny", 32, 6.0, 200), ("small", 64, 3.0, 60)] {
        let start = Instant::now();
        let sources = load_atlases(&data, &AtlasSource::TRAINING, spacing)?;
        let load = start.elapsed().as_secs_f64();
        let sampler = EpisodeSampler::new(sources, EpisodeConfig::new([patch; 3]))?;
        let classes = sampler.trainable_classes().count();
        if let Some(dir) = std::env::var_os("IRIS_DUMP_EPISODES") {
            dump(Path::new(&dir), preset, &sampler.episode(0)?)?;
        }
        for threads in [1, 2] {
            let pool = rayon::ThreadPoolBuilder::new()
                .num_threads(threads)
                .build()?;
            let start = Instant::now();
            let (voxels, masks, empty) = pool.install(|| -> Result<_, iris_train::Error> {
                let (mut fg, mut masks, mut empty) = (0, 0, 0);
                for seed in 0..episodes {
                    let e = sampler.episode(seed)?;
                    for n in mask_voxels(&e.query_masks) {
                        fg += n;
                        masks += 1;
                        empty += usize::from(n == 0);
                    }
                }
                Ok((fg, masks, empty))
            })?;
            let secs = start.elapsed().as_secs_f64();
            println!(
                "{preset:5} {patch}^3 at {spacing} mm, {threads} thread(s): {:7.1} episodes/s \
                 ({:.1} ms/episode; atlases loaded in {load:.2} s, {classes} trainable classes, \
                 {:.2} classes/episode, mean query mask {:.0} voxels, {empty} of {masks} empty)",
                episodes as f64 / secs,
                1e3 * secs / episodes as f64,
                masks as f64 / episodes as f64,
                voxels as f64 / masks as f64,
            );
        }
    }
    Ok(())
}

/// Writes an episode's images and its masks (class `k` as label `k + 1`).
fn dump(dir: &Path, preset: &str, e: &Episode) -> Result<(), Box<dyn std::error::Error>> {
    std::fs::create_dir_all(dir)?;
    let labels = |masks: &Array4<u8>| {
        let mut out = Array3::<u16>::zeros(masks.index_axis(Axis(0), 0).raw_dim());
        for (k, mask) in masks.outer_iter().enumerate() {
            out.zip_mut_with(&mask, |o, &m| {
                if m != 0 {
                    *o = k as u16 + 1;
                }
            });
        }
        out
    };
    for (role, image, masks) in [
        ("reference", &e.reference_image, &e.reference_masks),
        ("query", &e.query_image, &e.query_masks),
    ] {
        let name = |kind: &str| dir.join(format!("{preset}-{role}{kind}.nii.gz"));
        write_image(
            name(""),
            &Image::new(image.clone(), Affine::IDENTITY)?,
            None,
        )?;
        write_labels(
            name("-labels"),
            &LabelMap::new(labels(masks), Affine::IDENTITY)?,
            None,
        )?;
    }
    println!(
        "{preset}: episode 0 ({:?}) written to {}",
        e.classes,
        dir.display()
    );
    Ok(())
}
