//! The run behind `docs/results.md`: every task on its aligned and moved
//! queries, Dice per structure of the model, of the position-copy
//! baseline and of the truth at the model's spacing (the resolution
//! ceiling), timings, and the report (Markdown and CSV).
//!
//! Running and rendering are apart: `run` runs the tasks and collects the
//! numbers ([`run()`] gives a [`Run`]), `render` turns a [`Run`] into text
//! ([`markdown`], [`csv`]).

mod render;
mod run;

pub use render::{csv, csv_path, markdown};
pub(crate) use run::utc_now;
pub use run::{
    ENSEMBLE_SEED, Options, QUICK_REFERENCES, QUICK_STRUCTURES, QueryResult, Run, TaskResult,
    ensemble_sizes, run, spacing_ceiling,
};
