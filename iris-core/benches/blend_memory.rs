//! Peak heap memory and time of the slab [`Blender`] on realistic plans,
//! measured with a counting global allocator, next to what a naive
//! `K x volume` `f32` accumulator would need. Window outputs are synthetic
//! (one soft sphere per class), no network is run.
//!
//! Run with `cargo bench -p iris-core --bench blend_memory` (release build).
//! The numbers are recorded in `docs/memory.md`.

use std::alloc::{GlobalAlloc, Layout, System};
use std::process::ExitCode;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use iris_core::window::{BlendOptions, Blender, Precision, WindowPlan};

/// Wraps the system allocator, tracking the bytes currently allocated and their peak.
struct Counting;

static CURRENT: AtomicUsize = AtomicUsize::new(0);
static PEAK: AtomicUsize = AtomicUsize::new(0);

fn grew(bytes: usize) {
    let now = CURRENT.fetch_add(bytes, Ordering::Relaxed) + bytes;
    PEAK.fetch_max(now, Ordering::Relaxed);
}

// SAFETY: every call is forwarded unchanged to `System`; the counters do not
// affect the memory returned.
unsafe impl GlobalAlloc for Counting {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        // SAFETY: same contract as the caller's.
        let p = unsafe { System.alloc(layout) };
        if !p.is_null() {
            grew(layout.size());
        }
        p
    }

    unsafe fn alloc_zeroed(&self, layout: Layout) -> *mut u8 {
        // SAFETY: same contract as the caller's.
        let p = unsafe { System.alloc_zeroed(layout) };
        if !p.is_null() {
            grew(layout.size());
        }
        p
    }

    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        // SAFETY: same contract as the caller's.
        unsafe { System.dealloc(ptr, layout) };
        CURRENT.fetch_sub(layout.size(), Ordering::Relaxed);
    }

    unsafe fn realloc(&self, ptr: *mut u8, layout: Layout, new_size: usize) -> *mut u8 {
        // SAFETY: same contract as the caller's.
        let p = unsafe { System.realloc(ptr, layout, new_size) };
        if !p.is_null() {
            CURRENT.fetch_sub(layout.size(), Ordering::Relaxed);
            grew(new_size);
        }
        p
    }
}

#[global_allocator]
static ALLOCATOR: Counting = Counting;

/// One benchmark case: `classes` spheres in a `shape` volume, `window` tiles.
struct Case {
    name: &'static str,
    shape: [usize; 3],
    window: [usize; 3],
    /// Sphere centres (`[d, h, w]` voxels) and radius, one per class.
    centres: Vec<[f32; 3]>,
    radius: f32,
}

/// Fills `probs` (`[K, wd, wh, ww]`) with soft spheres seen through the window at `start`.
fn synthesise(case: &Case, plan: &WindowPlan, start: [usize; 3], probs: &mut [f32]) {
    let [wd, wh, ww] = plan.window_shape();
    let origin: [f32; 3] = std::array::from_fn(|a| start[a] as f32 - plan.offset()[a] as f32);
    for (c, centre) in case.centres.iter().enumerate() {
        let dx2: Vec<f32> = (0..ww)
            .map(|t| (origin[2] + t as f32 - centre[2]).powi(2))
            .collect();
        for td in 0..wd {
            let dz2 = (origin[0] + td as f32 - centre[0]).powi(2);
            for th in 0..wh {
                let dzy2 = dz2 + (origin[1] + th as f32 - centre[1]).powi(2);
                let row = &mut probs[((c * wd + td) * wh + th) * ww..][..ww];
                for (p, &d2) in row.iter_mut().zip(&dx2) {
                    // 0.99 inside, 0.01 outside, a linear ramp 4 voxels wide across the surface.
                    *p = (0.5 - ((dzy2 + d2).sqrt() - case.radius) / 4.0).clamp(0.01, 0.99);
                }
            }
        }
    }
}

fn mib(bytes: usize) -> f64 {
    bytes as f64 / (1024.0 * 1024.0)
}

/// Runs one case; returns false if the labels do not match the spheres.
fn run(case: &Case, precision: Precision) -> bool {
    let k = case.centres.len();
    let [d, h, w] = case.shape;
    let plan = WindowPlan::new(case.shape, case.window, 0.5).expect("valid plan");
    let class_labels: Vec<u16> = (1..=k as u16).collect();
    // The caller's window buffer (what a network would return) is not the blender's memory.
    let mut probs = vec![0.0f32; k * case.window.iter().product::<usize>()];

    let baseline = CURRENT.load(Ordering::Relaxed);
    PEAK.store(baseline, Ordering::Relaxed);
    let started = Instant::now();
    let mut synth = Duration::ZERO;
    let options = BlendOptions {
        precision,
        ..BlendOptions::default()
    };
    let mut blender = Blender::new(&plan, &class_labels, options).expect("valid blender");
    for window in plan.windows() {
        let t = Instant::now();
        synthesise(case, &plan, window.start, &mut probs);
        synth += t.elapsed();
        blender.add(window.index, &probs).expect("valid window");
    }
    let labels = blender.finish().expect("all windows added");
    let total = started.elapsed();
    let peak = PEAK.load(Ordering::Relaxed) - baseline;

    let bytes_per = if precision == Precision::F32 { 4 } else { 2 };
    let output = d * h * w * 2;
    let naive = k * d * h * w * 4;
    let naive_with_weights = naive + d * h * w * 4;
    // Live (d, h) rows at the peak, from the formula in the blend module doc.
    let [wd, wh, _] = case.window;
    let starts = plan.starts(0);
    let step = starts.windows(2).map(|s| s[1] - s[0]).min().unwrap_or(d);
    let rows = (wd.min(d) - step.min(wd.min(d))) * h + step.min(wd.min(d)) * wh.min(h);
    let pool = rows * k * w * bytes_per;
    let slab = k * wd.min(d) * h * w * bytes_per;
    println!(
        "{} [{precision:?}]: {k} classes, volume {:?}, window {:?}, overlap 0.5",
        case.name, case.shape, case.window
    );
    println!(
        "  windows {} (grid {:?}), blend time {:.2} s (+ {:.2} s synthesising window outputs)",
        plan.len(),
        plan.grid(),
        (total - synth).as_secs_f64(),
        synth.as_secs_f64()
    );
    println!(
        "  blender peak heap {:.1} MiB ({peak} B) = u16 labels {:.1} MiB + live rows {:.1} MiB \
         (formula: {rows} rows x {k} x {w} = {:.1} MiB; a whole window-depth slab would be {:.1} MiB)",
        mib(peak),
        mib(output),
        mib(peak.saturating_sub(output)),
        mib(pool),
        mib(slab)
    );
    println!(
        "  naive f32 K x volume accumulator {:.1} MiB ({:.1} MiB with its f32 weight sum): {:.1}x the blender's peak",
        mib(naive),
        mib(naive_with_weights),
        naive_with_weights as f64 / peak as f64
    );

    // Check the result: each class's label count is close to its sphere's volume.
    let mut counts = vec![0usize; k + 1];
    for &l in labels.iter() {
        counts[usize::from(l)] += 1;
    }
    let sphere = 4.0 / 3.0 * std::f64::consts::PI * f64::from(case.radius).powi(3);
    let worst = counts[1..]
        .iter()
        .map(|&n| (n as f64 / sphere - 1.0).abs())
        .fold(0.0, f64::max);
    println!(
        "  check: voxels per label within {:.2} % of the sphere volume ({sphere:.0})",
        100.0 * worst
    );
    worst < 0.02
}

fn main() -> ExitCode {
    // Cargo passes `--bench`; nothing to parse.
    let ct = Case {
        name: "CT, 15 classes",
        shape: [300, 512, 512],
        window: [128, 128, 128],
        centres: (0..15)
            .map(|i| {
                [
                    50.0 + 100.0 * (i / 5) as f32,
                    56.0 + 100.0 * (i % 5) as f32,
                    256.0,
                ]
            })
            .collect(),
        radius: 40.0,
    };
    let brain = Case {
        name: "MR brain, 3 classes",
        shape: [181, 217, 181],
        window: [64, 64, 64],
        centres: (0..3)
            .map(|i| [90.0, 50.0 + 55.0 * i as f32, 90.0])
            .collect(),
        radius: 22.0,
    };
    let mut ok = true;
    for precision in [Precision::Fixed16, Precision::F16, Precision::F32] {
        ok &= run(&brain, precision);
    }
    for precision in [Precision::Fixed16, Precision::F16] {
        ok &= run(&ct, precision);
    }
    if ok {
        ExitCode::SUCCESS
    } else {
        eprintln!("label counts do not match the synthetic spheres");
        ExitCode::FAILURE
    }
}
