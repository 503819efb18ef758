//! The run's `metrics.csv` ([`METRICS_FILE`]): one row per step, written by
//! [`run()`](super::run()).

use std::fs;
use std::io::Write;
use std::path::{Path, PathBuf};

use super::StepStats;
use crate::error::Error;

/// Name of the metrics file inside the output folder.
pub const METRICS_FILE: &str = "metrics.csv";

/// `metrics.csv`, open for appending: per step, its loss, train Dice,
/// learning rate, episodes per second, seconds since the run (re)started
/// and, when it was evaluated, its held-out Dice.
pub(crate) struct Metrics {
    file: fs::File,
    path: PathBuf,
}

impl Metrics {
    const HEADER: &str = "step,loss,dice,lr,episodes_per_s,seconds,eval_dice";

    /// Opens `path` for appending, keeping only rows up to `step` (rows a
    /// crashed run wrote after its last checkpoint are dropped, as the
    /// resumed run writes them again).
    ///
    /// # Errors
    /// [`iris_core::Error::Io`] naming `path`.
    pub(crate) fn open(path: &Path, step: usize) -> Result<Self, Error> {
        let old = fs::read_to_string(path).unwrap_or_default();
        let mut kept = String::from(Self::HEADER);
        kept.push('\n');
        for line in old.lines().skip(1) {
            let row_step = line.split(',').next().and_then(|s| s.parse::<usize>().ok());
            if row_step.is_some_and(|s| s <= step) {
                kept.push_str(line);
                kept.push('\n');
            }
        }
        let failed = |source| io_error(path, source);
        fs::write(path, kept).map_err(failed)?;
        let file = fs::OpenOptions::new()
            .append(true)
            .open(path)
            .map_err(failed)?;
        Ok(Metrics {
            file,
            path: path.to_path_buf(),
        })
    }

    /// Appends the row of `step`.
    ///
    /// # Errors
    /// [`iris_core::Error::Io`] naming the file.
    pub(crate) fn row(
        &mut self,
        step: usize,
        stats: &StepStats,
        episodes_per_s: f64,
        seconds: f64,
        eval: Option<f32>,
    ) -> Result<(), Error> {
        let eval = eval.map(|d| format!("{d:.5}")).unwrap_or_default();
        writeln!(
            self.file,
            "{step},{:.6},{:.5},{:.3e},{episodes_per_s:.4},{seconds:.2},{eval}",
            stats.loss, stats.dice, stats.learning_rate
        )
        .map_err(|source| io_error(&self.path, source))
    }
}

fn io_error(path: &Path, source: std::io::Error) -> Error {
    Error::Core(iris_core::Error::Io {
        path: path.to_path_buf(),
        source,
    })
}
