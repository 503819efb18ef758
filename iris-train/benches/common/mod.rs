//! Measuring helpers shared by the iris-train bench binaries.

/// Peak resident set size of this process in MiB (Linux `VmHWM`), if known.
#[allow(dead_code)] // not every bench reports memory
pub fn peak_rss_mib() -> Option<f64> {
    let status = std::fs::read_to_string("/proc/self/status").ok()?;
    let line = status.lines().find(|l| l.starts_with("VmHWM:"))?;
    let kib: f64 = line.split_whitespace().nth(1)?.parse().ok()?;
    Some(kib / 1024.0)
}

/// Resets the peak RSS to the current RSS (Linux `clear_refs` 5), so the
/// next [`peak_rss_mib`] measures one case, not the whole run.
#[allow(dead_code)] // not every bench measures cases separately
pub fn reset_peak_rss() {
    let _ = std::fs::write("/proc/self/clear_refs", "5");
}

use std::cell::RefCell;
use std::collections::BTreeMap;
use std::time::{Duration, Instant};

use burn::prelude::Device;
use criterion::measurement::WallTime;
use criterion::{BenchmarkGroup, Criterion, SamplingMode};

/// Criterion's settings for these benches, whose iterations take from
/// milliseconds to seconds: 10 flat samples in about `seconds` after a
/// one-second warm-up. The command line (`--sample-size`,
/// `--measurement-time`, `--save-baseline NAME`, `--baseline NAME`, a name
/// filter) overrides them; reports go to `target/criterion/`.
#[allow(dead_code)] // not every bench uses criterion
pub fn criterion(seconds: u64) -> Criterion {
    Criterion::default()
        .sample_size(10)
        .warm_up_time(Duration::from_secs(1))
        .measurement_time(Duration::from_secs(seconds))
        .configure_from_args()
}

/// Criterion's timings, also kept here (the fastest iteration of each
/// benchmark, in seconds) for the sums a bench prints after its rows.
#[allow(dead_code)] // not every bench uses criterion
#[derive(Default)]
pub struct Best(RefCell<BTreeMap<String, f64>>);

#[allow(dead_code)] // not every bench uses criterion
impl Best {
    /// Benchmarks `run` as `id` in `group`, each timed iteration ending
    /// with a device sync so that queued GPU work is counted.
    pub fn bench(
        &self,
        group: &mut BenchmarkGroup<'_, WallTime>,
        id: &str,
        device: &Device,
        mut run: impl FnMut(),
    ) {
        group.sampling_mode(SamplingMode::Flat);
        group.bench_function(id, |b| {
            b.iter_custom(|iters| {
                let start = Instant::now();
                for _ in 0..iters {
                    run();
                }
                device.sync().expect("device sync");
                let elapsed = start.elapsed();
                let per_iter = elapsed.as_secs_f64() / iters.max(1) as f64;
                let mut best = self.0.borrow_mut();
                let entry = best.entry(id.to_string()).or_insert(f64::INFINITY);
                *entry = entry.min(per_iter);
                elapsed
            })
        });
    }

    /// The fastest iteration of benchmark `id`, if it ran (a name filter
    /// may have skipped it).
    pub fn get(&self, id: &str) -> Option<f64> {
        self.0.borrow().get(id).copied()
    }
}
