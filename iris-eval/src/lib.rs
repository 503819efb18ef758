//! `iris-eval`: regenerates `docs/results.md`, the quality report of
//! issue 7 — one-shot Dice of an iris model on held-out real anatomy,
//! beside the position-copy baseline, on aligned and randomly moved
//! queries, and the memory bank on structures seen in training — and
//! `docs/strategies.md`, the inference strategies of issue 6 (the
//! paper's figure 4; `scripts/strategies.sh` adds tuning and the plot).
//!
//! ```sh
//! cargo run --release -p iris-eval -- results --model models/iris-tiny \
//!     --out docs/results.md [--moves 3] [--quick]
//! ```
//!
//! - [`moves`]: seeded random similarity transforms that move a volume's
//!   content on its own grid (queries off the atlas pose).
//! - [`tasks`]: the tasks and their truths, built from `data/`.
//! - [`report`]: the run, the Markdown report and the CSV.
//! - [`strategies`]: one-shot, ensembles, retrieval and tuned embeddings.

pub mod moves;
pub mod report;
pub mod strategies;
pub mod tasks;
