//! Reading the input files: the model folder (`--model DIR`), NIfTI images
//! and label maps, and `.irisemb` files. Every reader fails with one line
//! naming the file and the exit code of [`crate::failure`]: [`MODEL`] for
//! the model folder or an embedding of another model,
//! [`BAD_INPUT`](crate::failure::BAD_INPUT) for a file that cannot be read
//! or used (see [`Failure::input`]).

use std::path::{Path, PathBuf};

use iris_core::Model;
use iris_core::embedding::TaskEmbedding;
use iris_core::engine::{Limits, ModelOptions, Precision};
use iris_core::irisemb;
use iris_core::nifti;
use iris_core::volume::{Image, LabelMap};

use crate::claims::Claims;
use crate::failure::{Failure, MODEL};

/// The model used when neither `--model` nor `IRIS_MODEL` names one: the
/// workspace's `models/iris-tiny`, fixed when `iris` is built.
pub const DEFAULT_MODEL: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/../models/iris-tiny");

/// `--model DIR`.
#[derive(clap::Args)]
pub struct ModelArgs {
    /// Model folder (manifest.json and the three ONNX graphs); default: the
    /// workspace's models/iris-tiny.
    #[arg(long, env = "IRIS_MODEL", value_name = "DIR")]
    model: Option<PathBuf>,
    /// Threads the model runs on (default: one per core).
    #[arg(long, value_name = "N", value_parser = clap::value_parser!(u32).range(1..))]
    threads: Option<u32>,
    /// Arithmetic of the convolutions: f32 (default), or bf16, their
    /// products in bfloat16 where the CPU has AVX-512 BF16 (about 1.3x
    /// faster per full-size window, probabilities within about 0.04 of
    /// f32's; other CPUs run f32 and say so).
    #[arg(long, value_name = "f32|bf16", default_value = "f32", value_parser = parse_precision)]
    precision: Precision,
    /// Most memory one volume may take, reading it and through the pipeline
    /// (its copies, blending, labels and probability maps; not the network's
    /// own working memory): bytes, or with a binary suffix K, M, G or T
    /// (default 4G; a whole-body CT of 2000 slices needs more).
    #[arg(long, value_name = "SIZE", value_parser = parse_size)]
    memory_budget: Option<u64>,
    /// Most sliding windows one volume may need (default 10000).
    #[arg(long, value_name = "N", value_parser = clap::value_parser!(u64).range(1..))]
    max_windows: Option<u64>,
}

/// `f32` or `bf16`.
fn parse_precision(text: &str) -> Result<Precision, String> {
    text.parse().map_err(|e: iris_core::Error| e.to_string())
}

/// `8G`, `512M`, `64K`, `1T` (powers of 1024) or a number of bytes.
fn parse_size(text: &str) -> Result<u64, String> {
    let (digits, shift) = match text.trim().char_indices().last() {
        Some((i, 'K' | 'k')) => (&text.trim()[..i], 10),
        Some((i, 'M' | 'm')) => (&text.trim()[..i], 20),
        Some((i, 'G' | 'g')) => (&text.trim()[..i], 30),
        Some((i, 'T' | 't')) => (&text.trim()[..i], 40),
        _ => (text.trim(), 0),
    };
    let value: u64 = digits
        .parse()
        .map_err(|_| format!("{text:?} is not a size (e.g. 8G, 512M or a number of bytes)"))?;
    value
        .checked_mul(1 << shift)
        .filter(|&bytes| bytes > 0)
        .ok_or_else(|| format!("{text:?} is not a size between 1 byte and 16 EiB"))
}

impl ModelArgs {
    /// The model folder: `--model`, else `$IRIS_MODEL`, else [`DEFAULT_MODEL`].
    fn dir(&self) -> PathBuf {
        self.model
            .clone()
            .unwrap_or_else(|| PathBuf::from(DEFAULT_MODEL))
    }

    /// Claims the files of the model folder (not its subfolders) as inputs,
    /// so that no output replaces one; a folder that cannot be listed has
    /// none (loading it fails later, with [`MODEL`]).
    pub fn claim(&self, claims: &mut Claims) {
        let Ok(entries) = std::fs::read_dir(self.dir()) else {
            return;
        };
        for entry in entries.flatten() {
            if entry.file_type().is_ok_and(|t| !t.is_dir()) {
                claims.input("a --model file", &entry.path());
            }
        }
    }

    /// The limits `--memory-budget` and `--max-windows` set, the engine's
    /// defaults otherwise.
    pub fn limits(&self) -> Limits {
        let default = Limits::default();
        Limits {
            memory_bytes: self.memory_budget.unwrap_or(default.memory_bytes),
            windows: self.max_windows.map_or(default.windows, |n| {
                usize::try_from(n).unwrap_or(usize::MAX)
            }),
        }
    }

    /// Loads the model, or fails with [`MODEL`] naming the folder.
    pub fn load(&self) -> Result<Model, Failure> {
        let dir = self.dir();
        if !dir.join(iris_core::engine::MANIFEST_FILE).is_file() {
            return Err(Failure::new(
                MODEL,
                format!(
                    "no model at {}: pass --model DIR or set IRIS_MODEL",
                    dir.display()
                ),
            ));
        }
        let options = ModelOptions {
            threads: self.threads.map_or(0, |n| n as usize),
            precision: self.precision,
        };
        let model = Model::load_with(&dir, &options).map_err(|e| {
            Failure::new(
                MODEL,
                format!("cannot load the model in {}: {e}", dir.display()),
            )
        })?;
        if model.precision() != self.precision {
            eprintln!(
                "iris: --precision {}: this CPU lacks AVX-512 BF16, running in {}",
                self.precision,
                model.precision()
            );
        }
        Ok(model)
    }
}

/// Reads a NIfTI image within `limits` and refuses NaN or infinite voxels,
/// naming the file.
pub fn read_image(path: &Path, limits: &Limits) -> Result<(Image, nifti::NiftiInfo), Failure> {
    let (image, info) =
        nifti::read_image_with(path, limits).map_err(|e| Failure::input(path, e))?;
    image
        .ensure_finite("image")
        .map_err(|e| Failure::input(path, e))?;
    Ok((image, info))
}

/// Reads a NIfTI label map within `limits`; any problem is a failure
/// naming the file.
pub fn read_labels(path: &Path, limits: &Limits) -> Result<LabelMap, Failure> {
    nifti::read_labels_with(path, limits)
        .map(|(labels, _)| labels)
        .map_err(|e| Failure::input(path, e))
}

/// Reads a reference image and its label map within `limits` and checks
/// that they share a grid, naming the files.
pub fn read_pair(
    image: &Path,
    labels: &Path,
    limits: &Limits,
) -> Result<(Image, LabelMap), Failure> {
    let (pixels, _) = read_image(image, limits)?;
    let map = read_labels(labels, limits)?;
    let what = format!(
        "label map {} vs image {}",
        labels.display(),
        image.display()
    );
    pixels
        .ensure_same_grid(&map, &what)
        .map_err(|e| Failure::input(labels, e))?;
    Ok((pixels, map))
}

/// Reads a `.irisemb` file; any problem is a failure naming the file.
pub fn read_task(path: &Path) -> Result<TaskEmbedding, Failure> {
    irisemb::read_file(path).map_err(|e| Failure::input(path, e))
}

/// Reads a `.irisemb` file and checks that `model` made it; an embedding of
/// another model is a [`MODEL`] failure (see [`Failure::input`]), naming the
/// file like any other problem.
pub fn read_task_for_model(path: &Path, model: &Model) -> Result<TaskEmbedding, Failure> {
    let task = read_task(path)?;
    task.ensure_model(model.fingerprint())
        .map_err(|e| Failure::input(path, e))?;
    Ok(task)
}
