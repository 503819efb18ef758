//! Seconds per window of each graph of a model folder: the encoder, the task
//! encoder and the decoder, for a few class counts `K`, through the engine's
//! pinned, cached tract plans.
//!
//! ```text
//! IRIS_MODEL=models/iris-small cargo bench -p iris-core --bench engine
//! ```
//! Optional: `IRIS_BENCH_CLASSES=1,3,15` (class counts, default `1,3`) and
//! `IRIS_BENCH_RUNS=5` (timed runs per measurement; the median is printed).
//! The first call for each `K` builds and optimises that plan; its time is
//! printed separately as "plan + first run". Without `IRIS_MODEL` the bench
//! prints how to run it and exits successfully.

use std::error::Error;
use std::time::{Duration, Instant};

use iris_core::embedding::{ClassEmbedding, Preprocessing, Provenance, TaskEmbedding};
use iris_core::engine::Model;
use iris_core::preprocess::IntensityPolicy;
use ndarray::{Array3, Array4};

fn median(
    mut f: impl FnMut() -> Result<(), iris_core::Error>,
    runs: usize,
) -> Result<Duration, iris_core::Error> {
    let mut times = Vec::with_capacity(runs);
    for _ in 0..runs {
        let t = Instant::now();
        f()?;
        times.push(t.elapsed());
    }
    times.sort();
    Ok(times[times.len() / 2])
}

fn timed<T>(
    f: impl FnOnce() -> Result<T, iris_core::Error>,
) -> Result<(T, Duration), iris_core::Error> {
    let t = Instant::now();
    let out = f()?;
    Ok((out, t.elapsed()))
}

fn env_list(name: &str, default: &str) -> Result<Vec<usize>, Box<dyn Error>> {
    let text = std::env::var(name).unwrap_or_else(|_| default.into());
    text.split(',')
        .map(|s| {
            s.trim()
                .parse::<usize>()
                .map_err(|e| format!("{name}={text:?}: {e}").into())
        })
        .collect()
}

fn main() -> Result<(), Box<dyn Error>> {
    let Some(dir) = std::env::var_os("IRIS_MODEL") else {
        println!(
            "engine bench skipped: set IRIS_MODEL to a model folder \
             (e.g. IRIS_MODEL=models/iris-small cargo bench -p iris-core --bench engine)"
        );
        return Ok(());
    };
    let classes = env_list("IRIS_BENCH_CLASSES", "1,3")?;
    let runs = env_list("IRIS_BENCH_RUNS", "5")?
        .first()
        .copied()
        .unwrap_or(5)
        .max(1);
    let (model, load) = timed(|| Model::load(&dir))?;
    let manifest = model.manifest();
    let [d, h, w] = manifest.patch_size;
    let threads = std::thread::available_parallelism().map_or(1, usize::from);
    println!(
        "model {:?} ({}): patch {:?}, {} mm, channels {:?}; {threads} thread(s); \
         loaded in {:.2} s; median of {runs} run(s)",
        manifest.name,
        dir.to_string_lossy(),
        manifest.patch_size,
        manifest.spacing_mm,
        manifest.channels,
        load.as_secs_f64()
    );

    // A deterministic window of roughly unit-variance values.
    let mut state = 0x2545_f491_4f6c_dd1d_u64;
    let window = Array3::from_shape_fn((d, h, w), |_| {
        state = state
            .wrapping_mul(6_364_136_223_846_793_005)
            .wrapping_add(1);
        ((state >> 40) as f32 / (1u64 << 24) as f32 - 0.5) * 3.4
    });
    let (features, first) = timed(|| model.encode_window(window.view()))?;
    let encoder = median(|| model.encode_window(window.view()).map(drop), runs)?;
    println!(
        "encoder       {:>9.4} s/window   (plan + first run {:.2} s)",
        encoder.as_secs_f64(),
        first.as_secs_f64()
    );

    for &k in &classes {
        // Class k: a ball of radius patch/4 around a centre moved per class.
        let masks = Array4::from_shape_fn((k, d, h, w), |(c, z, y, x)| {
            let centre = [d / 2 + c % 3, h / 2, w / 2];
            let r2 = [z, y, x]
                .iter()
                .zip(centre)
                .map(|(&p, c)| (p as f64 - c as f64).powi(2))
                .sum::<f64>();
            f32::from(r2 <= (d.min(h).min(w) as f64 / 4.0).powi(2))
        });
        let (stages, first) = timed(|| model.encode_masks(&features, masks.view()))?;
        let task_encoder = median(
            || model.encode_masks(&features, masks.view()).map(drop),
            runs,
        )?;
        let embeddings = (0..k)
            .map(|c| {
                let per_stage = stages
                    .iter()
                    .map(|s| s.index_axis(ndarray::Axis(0), c).iter().copied().collect())
                    .collect();
                ClassEmbedding::new(c as u32 + 1, "", Provenance::OneShot, per_stage)
            })
            .collect::<Result<Vec<_>, _>>()?;
        let task = TaskEmbedding::new(
            *model.fingerprint(),
            Preprocessing {
                spacing_mm: [manifest.spacing_mm as f32; 3],
                patch: manifest.patch_size.map(|p| p as u32),
                intensity: IntensityPolicy::MR,
            },
            manifest.stages.clone(),
            embeddings,
        )?;
        let (_, first_decode) = timed(|| model.decode_window(&features, &task))?;
        let decoder = median(|| model.decode_window(&features, &task).map(drop), runs)?;
        println!(
            "task encoder  {:>9.4} s/reference  K = {k:<3} (plan + first run {:.2} s)",
            task_encoder.as_secs_f64(),
            first.as_secs_f64()
        );
        println!(
            "decoder       {:>9.4} s/window     K = {k:<3} (plan + first run {:.2} s); \
             encoder + decoder {:.4} s/window",
            decoder.as_secs_f64(),
            first_decode.as_secs_f64(),
            (encoder + decoder).as_secs_f64()
        );
    }
    Ok(())
}
