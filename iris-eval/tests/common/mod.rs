//! What the `iris-eval` test binaries share (each uses part of it).
#![allow(dead_code)]

use std::path::PathBuf;

use iris_eval::tasks;

/// The data folder, or `None` (with a message) when a file the tasks read
/// is missing.
pub fn data_dir() -> Option<PathBuf> {
    iris_test_support::data_dir(&tasks::DATA_FILES)
}

/// The CSV's Dice of `task`, `query` (`aligned`/`moved`), `method`.
pub fn csv_dice(csv: &str, task: &str, query: &str, method: &str) -> Vec<f64> {
    csv.lines()
        .skip(1)
        .map(|l| l.split(',').collect::<Vec<_>>())
        .filter(|f| f[0] == task && f[1] == query && f[5] == method)
        .map(|f| f[6].parse::<f64>().expect("dice"))
        .collect()
}
