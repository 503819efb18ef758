//! Speed and peak memory of the ONNX engine on a model folder, in two parts.
//!
//! 1. **Per window**: seconds per window of each graph (the encoder, the task
//!    encoder, the decoder) for a few class counts `K`, through the engine's
//!    pinned, cached tract plans, on a synthetic window. Criterion times
//!    them (10 samples of one run each), so a run is compared with the last
//!    one, or with a baseline saved by `-- --save-baseline NAME` when run
//!    with `-- --baseline NAME`; its reports go to `target/criterion/`.
//! 2. **Scenario** (the paper's Table 3): one reference (Colin27 with its AAL
//!    labels, the 15 largest) encoded once into a 15-class task embedding,
//!    then 10 real query volumes segmented with it (all 15 classes decoded
//!    in one pass per window), against 1 query x 1 class, and against the
//!    naive way (encode the reference and segment the query again for every
//!    class of every query), measured on a subset of the classes and
//!    extrapolated.
//!
//! ```text
//! IRIS_MODEL=models/iris-small cargo bench -p iris-core --bench engine
//! IRIS_MODEL=models/iris-small IRIS_BENCH_PARTS=window \
//!     cargo bench -p iris-core --bench engine -- --baseline before decoder
//! ```
//! Optional: `IRIS_BENCH_CLASSES=1,15` (class counts of part 1),
//! criterion's own options after `--` (`--sample-size`, a name filter),
//! `IRIS_BENCH_SCENARIO_RUNS=3` (runs of the 1x1 and 10x15
//! scenarios; the median is printed), `IRIS_BENCH_NAIVE_CLASSES=2` (classes
//! per query of the naive loop, 1 to 15), `IRIS_BENCH_PARTS=window,scenario`,
//! `IRIS_BENCH_PRECISION=bf16` (the model's `Precision`, f32 by default).
//! The first call for each plan builds and optimises it; its time is printed
//! separately ("plan + first run") and never enters a median.
//!
//! Peak memory is the process's peak resident set (`VmHWM` in
//! `/proc/self/status`, Linux), reset before each part with
//! `/proc/self/clear_refs` so that each part reports its own peak. It counts
//! everything resident: the model and its plans, the volumes the bench keeps
//! loaded (printed as the baseline) and the part's working memory.
//!
//! Without `IRIS_MODEL` the bench prints how to run it and exits
//! successfully; without `data/` (see `scripts/fetch-data.sh`) it skips the
//! scenario the same way.

use std::error::Error;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use criterion::{BenchmarkId, Criterion, SamplingMode};
use iris_core::embedding::{ClassEmbedding, Preprocessing, Provenance, TaskEmbedding};
use iris_core::engine::{EncodeOptions, Model, ModelOptions, SegmentOptions, TaskClass};
use iris_core::nifti;
use iris_core::preprocess::{IntensityPolicy, crop_or_pad};
use iris_core::volume::{Image, LabelMap};
use ndarray::{Array3, Array4, Axis};

type BenchResult<T> = Result<T, Box<dyn Error>>;

/// Runs `f` `runs` times; returns the median time and the last result.
fn median<T>(
    mut f: impl FnMut() -> Result<T, iris_core::Error>,
    runs: usize,
) -> Result<(Duration, T), iris_core::Error> {
    let mut times = Vec::with_capacity(runs);
    let mut last = None;
    for _ in 0..runs.max(1) {
        let t = Instant::now();
        last = Some(f()?);
        times.push(t.elapsed());
    }
    times.sort();
    let out = last.ok_or_else(|| iris_core::Error::invalid("runs", "no run"))?;
    Ok((times[times.len() / 2], out))
}

fn timed<T>(
    f: impl FnOnce() -> Result<T, iris_core::Error>,
) -> Result<(T, Duration), iris_core::Error> {
    let t = Instant::now();
    let out = f()?;
    Ok((out, t.elapsed()))
}

fn env_list(name: &str, default: &str) -> BenchResult<Vec<usize>> {
    let text = std::env::var(name).unwrap_or_else(|_| default.into());
    text.split(',')
        .map(|s| {
            s.trim()
                .parse::<usize>()
                .map_err(|e| format!("{name}={text:?}: {e}").into())
        })
        .collect()
}

fn env_count(name: &str, default: usize) -> BenchResult<usize> {
    Ok(env_list(name, &default.to_string())?
        .first()
        .copied()
        .unwrap_or(default)
        .max(1))
}

/// Peak resident memory of this process.
struct PeakMemory {
    /// Whether `/proc/self/clear_refs` accepted the reset.
    resettable: bool,
}

impl PeakMemory {
    /// One line of `/proc/self/status` in MiB (`VmHWM`, `VmRSS`), if readable.
    fn status_mib(key: &str) -> Option<f64> {
        let status = std::fs::read_to_string("/proc/self/status").ok()?;
        let line = status.lines().find(|l| l.starts_with(key))?;
        let kib: f64 = line.split_whitespace().nth(1)?.parse().ok()?;
        Some(kib / 1024.0)
    }

    /// Resets the peak to the current resident set; returns that baseline.
    fn reset(&mut self) -> Option<f64> {
        self.resettable = std::fs::write("/proc/self/clear_refs", "5").is_ok();
        Self::status_mib("VmRSS:")
    }

    /// The peak since the last reset (or since the start when it failed), as text.
    fn report(&self, baseline: Option<f64>) -> String {
        match (Self::status_mib("VmHWM:"), baseline) {
            (Some(peak), Some(base)) if self.resettable => {
                format!("peak RSS {peak:.0} MiB (baseline {base:.0} MiB when the part started)")
            }
            (Some(peak), _) => format!("peak RSS {peak:.0} MiB since the process started"),
            _ => "peak RSS not available (no /proc/self/status)".into(),
        }
    }
}

fn main() -> BenchResult<()> {
    let Some(dir) = std::env::var_os("IRIS_MODEL") else {
        println!(
            "engine bench skipped: set IRIS_MODEL to a model folder \
             (e.g. IRIS_MODEL=models/iris-small cargo bench -p iris-core --bench engine)"
        );
        return Ok(());
    };
    let parts = std::env::var("IRIS_BENCH_PARTS").unwrap_or_else(|_| "window,scenario".into());
    let precision = std::env::var("IRIS_BENCH_PRECISION").unwrap_or_else(|_| "f32".into());
    let options = ModelOptions {
        precision: precision.parse()?,
        ..ModelOptions::default()
    };
    let (model, load) = timed(|| Model::load_with(&dir, &options))?;
    let manifest = model.manifest();
    let threads = std::thread::available_parallelism().map_or(1, usize::from);
    println!(
        "model {:?} ({}): patch {:?}, {} mm, channels {:?}; {threads} thread(s), {}; \
         loaded in {:.2} s",
        manifest.name,
        dir.to_string_lossy(),
        manifest.patch_size,
        manifest.spacing_mm,
        manifest.channels,
        model.precision(),
        load.as_secs_f64()
    );
    let mut memory = PeakMemory { resettable: false };
    for part in parts.split(',').map(str::trim) {
        match part {
            "window" => per_window(&model, &mut memory)?,
            "scenario" => scenario(&model, &mut memory)?,
            other => {
                return Err(format!(
                    "IRIS_BENCH_PARTS: unknown part {other:?} (expected window, scenario)"
                )
                .into());
            }
        }
    }
    Ok(())
}

/// Criterion's settings for iterations of seconds: 10 samples of one
/// iteration each (flat sampling), after a warm-up of at least one run;
/// the command line (`--sample-size`, `--measurement-time`,
/// `--save-baseline`, `--baseline`, a name filter) overrides them.
fn criterion() -> Criterion {
    Criterion::default()
        .sample_size(10)
        .warm_up_time(Duration::from_secs(1))
        .measurement_time(Duration::from_secs(10))
        .configure_from_args()
}

/// Part 1: each graph on one synthetic window, timed by criterion (group
/// `window <model name>`: `encoder`, `task encoder/K=k`, `decoder/K=k`).
fn per_window(model: &Model, memory: &mut PeakMemory) -> BenchResult<()> {
    let classes = env_list("IRIS_BENCH_CLASSES", "1,15")?;
    let manifest = model.manifest();
    let [d, h, w] = manifest.patch_size;
    println!("\n== per window ==");
    let baseline = memory.reset();

    // A deterministic window of roughly unit-variance values.
    let mut state = 0x2545_f491_4f6c_dd1d_u64;
    let window = Array3::from_shape_fn((d, h, w), |_| {
        state = state
            .wrapping_mul(6_364_136_223_846_793_005)
            .wrapping_add(1);
        ((state >> 40) as f32 / (1u64 << 24) as f32 - 0.5) * 3.4
    });
    let mut criterion = criterion();
    let mut group = criterion.benchmark_group(format!("window {}", manifest.name));
    group.sampling_mode(SamplingMode::Flat);
    // Each graph runs once outside criterion first: that call builds and
    // optimises its plan (printed, never sampled) and surfaces any error;
    // the sampled runs repeat the same call.
    let (features, first) = timed(|| model.encode_window(window.view()))?;
    println!("encoder: plan + first run {:.2} s", first.as_secs_f64());
    group.bench_function("encoder", |b| {
        b.iter(|| model.encode_window(window.view()).expect("ran once above"))
    });

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
        println!(
            "task encoder K = {k}: plan + first run {:.2} s",
            first.as_secs_f64()
        );
        group.bench_function(BenchmarkId::new("task encoder", format!("K={k}")), |b| {
            b.iter(|| {
                model
                    .encode_masks(&features, masks.view())
                    .expect("ran once above")
            })
        });
        let embeddings = (0..k)
            .map(|c| {
                let per_stage = stages
                    .iter()
                    .map(|s| s.index_axis(Axis(0), c).iter().copied().collect())
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
        let (_, first) = timed(|| model.decode_window(&features, &task))?;
        println!(
            "decoder K = {k}: plan + first run {:.2} s",
            first.as_secs_f64()
        );
        group.bench_function(BenchmarkId::new("decoder", format!("K={k}")), |b| {
            b.iter(|| {
                model
                    .decode_window(&features, &task)
                    .expect("ran once above")
            })
        });
    }
    group.finish();
    criterion.final_summary();
    println!("{}", memory.report(baseline));
    Ok(())
}

/// Classes of the scenario's task: the 15 largest AAL labels.
const SCENARIO_CLASSES: usize = 15;

/// One query of the scenario: a crop (or padded copy) of a loaded volume.
struct Query {
    name: String,
    source: usize,
    /// First voxel of the crop in the source (negative: padding), `[d, h, w]`.
    start: [isize; 3],
    /// Size of the crop in voxels, `[d, h, w]`.
    size: [usize; 3],
}

impl Query {
    fn full(name: &str, source: usize, sources: &[Image]) -> Query {
        Query {
            name: name.into(),
            source,
            start: [0; 3],
            size: sources[source].shape(),
        }
    }

    /// The content moved by `by` voxels inside the same field of view.
    fn shifted(name: &str, source: usize, sources: &[Image], by: [isize; 3]) -> Query {
        Query {
            start: by.map(|v| -v),
            ..Query::full(name, source, sources)
        }
    }

    /// The box from `from` to `to`, fractions of the source's shape per axis
    /// (outside `[0, 1]`: padding with 0).
    fn crop(name: &str, source: usize, sources: &[Image], from: [f64; 3], to: [f64; 3]) -> Query {
        let shape = sources[source].shape();
        let at = |f: f64, n: usize| (f * n as f64).round() as isize;
        let start: [isize; 3] = std::array::from_fn(|a| at(from[a], shape[a]));
        let size = std::array::from_fn(|a| (at(to[a], shape[a]) - start[a]).max(1) as usize);
        Query {
            name: name.into(),
            source,
            start,
            size,
        }
    }

    fn build(&self, sources: &[Image]) -> Result<Image, iris_core::Error> {
        crop_or_pad(&sources[self.source], self.start, self.size, 0.0)
    }
}

fn data_file(rel: &str) -> Option<PathBuf> {
    let path = Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../data")
        .join(rel);
    path.is_file().then_some(path)
}

/// The `count` most frequent non-zero labels, largest first (ties: lower label).
fn largest_labels(labels: &LabelMap, count: usize) -> Vec<u16> {
    let mut histogram = vec![0usize; usize::from(u16::MAX) + 1];
    for &v in labels.data() {
        histogram[usize::from(v)] += 1;
    }
    let mut present: Vec<u16> = (1..=u16::MAX)
        .filter(|&l| histogram[usize::from(l)] > 0)
        .collect();
    present.sort_by_key(|&l| std::cmp::Reverse(histogram[usize::from(l)]));
    present.truncate(count);
    present
}

/// AAL region names by label value from `aal.nii.txt` (`value name code` lines).
fn aal_names(path: Option<PathBuf>) -> Vec<(u16, String)> {
    let text = path
        .and_then(|p| std::fs::read_to_string(p).ok())
        .unwrap_or_default();
    text.lines()
        .filter_map(|line| {
            let mut fields = line.split_whitespace();
            let value = fields.next()?.parse().ok()?;
            Some((value, fields.next()?.to_string()))
        })
        .collect()
}

/// Part 2: the paper's Table 3 scenario on real volumes.
fn scenario(model: &Model, memory: &mut PeakMemory) -> BenchResult<()> {
    let files = [
        "mricron/ch2.nii.gz",
        "mricron/aal.nii.gz",
        "mricron/ch2bet.nii.gz",
        "mni152/mni_icbm152_t1_tal_nlin_sym_09a_converted.nii.gz",
    ];
    let Some(paths) = files
        .iter()
        .map(|f| data_file(f))
        .collect::<Option<Vec<_>>>()
    else {
        println!(
            "\nscenario skipped: data/ lacks {files:?}; run scripts/fetch-data.sh, then \
             IRIS_MODEL=... cargo bench -p iris-core --bench engine"
        );
        return Ok(());
    };
    let runs = env_count("IRIS_BENCH_SCENARIO_RUNS", 3)?;
    let naive_classes = env_count("IRIS_BENCH_NAIVE_CLASSES", 2)?.min(SCENARIO_CLASSES);

    let (reference, _) = nifti::read_image(&paths[0])?;
    let (labels, _) = nifti::read_labels(&paths[1])?;
    let (ch2bet, _) = nifti::read_image(&paths[2])?;
    let (mni, _) = nifti::read_image(&paths[3])?;
    let names = aal_names(data_file("mricron/aal.nii.txt"));
    let classes: Vec<TaskClass> = largest_labels(&labels, SCENARIO_CLASSES)
        .into_iter()
        .map(|label| {
            let name = names.iter().find(|(v, _)| *v == label);
            TaskClass::new(label, name.map_or("", |(_, n)| n.as_str()))
        })
        .collect();
    let sources = [reference, ch2bet, mni];
    let (ch2, bet, mni) = (0, 1, 2);
    let s = &sources;
    let queries = [
        Query::full("Colin27 (ch2, the reference image)", ch2, s),
        Query::full("Colin27 brain only (ch2bet)", bet, s),
        Query::full("MNI152 2009a T1", mni, s),
        Query::shifted("ch2 shifted by (16, -12, 8) voxels", ch2, s, [16, -12, 8]),
        Query::shifted(
            "MNI152 shifted by (-10, 14, -6) voxels",
            mni,
            s,
            [-10, 14, -6],
        ),
        Query::crop(
            "ch2 crop, first 3/4 along axis 0",
            ch2,
            s,
            [0.0; 3],
            [0.75, 1.0, 1.0],
        ),
        Query::crop("ch2 crop, central 60 %", ch2, s, [0.2; 3], [0.8; 3]),
        Query::crop(
            "MNI152 crop, last 2/3 along axis 1",
            mni,
            s,
            [0.0, 1.0 / 3.0, 0.0],
            [1.0; 3],
        ),
        Query::crop(
            "MNI152 padded by 15 % per side",
            mni,
            s,
            [-0.15; 3],
            [1.15; 3],
        ),
        Query::crop(
            "ch2bet crop, first half along axis 2",
            bet,
            s,
            [0.0; 3],
            [1.0, 1.0, 0.5],
        ),
    ];
    let reference = &sources[ch2];
    let encode = EncodeOptions {
        intensity: Some(IntensityPolicy::MR),
        ..EncodeOptions::default()
    };
    // All classes in one decoder run, as the paper's Table 3 measures (a
    // model's manifest may ask for groups: `classes_per_forward`).
    let options = SegmentOptions {
        classes_per_forward: Some(classes.len()),
        ..SegmentOptions::default()
    };
    let one_class = &classes[..1];

    println!(
        "\n== scenario: reference {} + {}, {} classes (the largest AAL labels: {}) ==",
        files[0],
        files[1],
        classes.len(),
        classes
            .iter()
            .map(|c| format!("{} {}", c.label, c.name))
            .collect::<Vec<_>>()
            .join(", ")
    );
    println!(
        "queries built in memory from {}, {} and {} (crops keep the source's affine);",
        files[0], files[2], files[3]
    );
    println!(
        "reading the files and building the queries is not timed; default SegmentOptions \
         (overlap {}, largest component {}) but all classes in one decoder run",
        options.overlap, options.largest_component
    );

    // Plans for K = 1 and K = 15 are built here, outside every timing.
    let warm = Instant::now();
    let task_one = model.encode_task(reference, &labels, one_class, &encode)?;
    let task_all = model.encode_task(reference, &labels, &classes, &encode)?;
    let small = queries[6].build(&sources)?;
    model.segment(&small, &task_one, &options)?;
    model.segment(&small, &task_all, &options)?;
    drop(small);
    println!(
        "warm-up (plans for K = 1 and K = {}): {:.2} s",
        classes.len(),
        warm.elapsed().as_secs_f64()
    );

    // 1 query x 1 class: encode the reference for one class, segment one query.
    let baseline = memory.reset();
    let query = queries[0].build(&sources)?;
    let (one_by_one, windows_one) = median(
        || {
            let task = model.encode_task(reference, &labels, one_class, &encode)?;
            Ok(model.segment(&query, &task, &options)?.windows)
        },
        runs,
    )?;
    drop(query);
    println!(
        "\n1 query x 1 class ({}, class {} {}): {:.2} s, {windows_one} windows \
         (median of {runs}); {}",
        queries[0].name,
        one_class[0].label,
        one_class[0].name,
        one_by_one.as_secs_f64(),
        memory.report(baseline)
    );

    // 10 queries x 15 classes: one task embedding reused for every query.
    let baseline = memory.reset();
    let mut totals = Vec::with_capacity(runs);
    let mut per_query = vec![Vec::with_capacity(runs); queries.len()];
    let mut encodes = Vec::with_capacity(runs);
    let mut windows = vec![0; queries.len()];
    for _ in 0..runs {
        let mut total = Duration::ZERO;
        let (task, encode_time) =
            timed(|| model.encode_task(reference, &labels, &classes, &encode))?;
        total += encode_time;
        encodes.push(encode_time);
        for (i, q) in queries.iter().enumerate() {
            let image = q.build(&sources)?;
            let (result, time) = timed(|| model.segment(&image, &task, &options))?;
            total += time;
            per_query[i].push(time);
            windows[i] = result.windows;
        }
        totals.push(total);
    }
    let mid = |times: &mut Vec<Duration>| {
        times.sort();
        times[times.len() / 2]
    };
    let total = mid(&mut totals);
    let encode_all = mid(&mut encodes);
    println!(
        "\n{} queries x {} classes (one task embedding for all; median of {runs}): \
         {:.2} s in all, {:.2} s per query; encoding the reference {:.2} s; {}",
        queries.len(),
        classes.len(),
        total.as_secs_f64(),
        (total - encode_all).as_secs_f64() / queries.len() as f64,
        encode_all.as_secs_f64(),
        memory.report(baseline)
    );
    for ((q, times), n) in queries.iter().zip(&mut per_query).zip(&windows) {
        let shape = q.size;
        println!(
            "  {:<42} {:>3}x{:>3}x{:>3} voxels {n:>3} window(s) {:>7.2} s",
            q.name,
            shape[0],
            shape[1],
            shape[2],
            mid(times).as_secs_f64()
        );
    }
    let all_windows: usize = windows.iter().sum();
    println!(
        "ratio (10x15) / (1x1) = {:.1} (windows {all_windows} / {windows_one} = {:.1}); \
         seconds per window: 1x1 {:.3}, 10x15 {:.3} (reference encoding included)",
        total.as_secs_f64() / one_by_one.as_secs_f64(),
        all_windows as f64 / windows_one as f64,
        one_by_one.as_secs_f64() / windows_one as f64,
        total.as_secs_f64() / all_windows as f64
    );

    // The naive way: every (query, class) pair on its own, reference encoded
    // again each time; run for `naive_classes` classes and extrapolated.
    let baseline = memory.reset();
    let mut naive = Duration::ZERO;
    for q in &queries {
        let image = q.build(&sources)?;
        for class in &classes[..naive_classes] {
            let (_, time) = timed(|| {
                let task =
                    model.encode_task(reference, &labels, std::slice::from_ref(class), &encode)?;
                model.segment(&image, &task, &options)
            })?;
            naive += time;
        }
    }
    let pairs = queries.len() * naive_classes;
    let naive_all = naive.as_secs_f64() * classes.len() as f64 / naive_classes as f64;
    println!(
        "\nnaive, one class and one query at a time (reference re-encoded per pair): \
         {pairs} pairs ({} queries x {naive_classes} classes, one run) took {:.2} s; x {}/{naive_classes} -> {:.1} s for 10x15 = {:.1}x the \
         shared-embedding run; 1x1 x {} = {:.1} s; {}",
        queries.len(),
        naive.as_secs_f64(),
        classes.len(),
        naive_all,
        naive_all / total.as_secs_f64(),
        queries.len() * classes.len(),
        one_by_one.as_secs_f64() * (queries.len() * classes.len()) as f64,
        memory.report(baseline)
    );
    Ok(())
}
