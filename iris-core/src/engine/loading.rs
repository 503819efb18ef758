//! Where a [`Model`] comes from: a model folder, or the same files as
//! memory buffers (packed or encrypted resources, devices without a file
//! system), and the threads and precision it runs with.

// This crate is `no_std`; the engine is `std` code.
use std::prelude::rust_2024::*;
use std::{format, vec};

use std::path::{Path, PathBuf};

use super::graphs::{self, Dim, Graph, Port, Source};
use super::{LEVELS, MANIFEST_FILE, Manifest, Model, Precision};
use crate::error::{Error, Result};

/// How a [`Model`] runs. The default uses one thread per core, in f32.
///
/// ```no_run
/// use iris_core::engine::{Model, ModelOptions};
///
/// // A viewer that leaves the other cores to its renderer.
/// let options = ModelOptions { threads: 2, ..Default::default() };
/// let model = Model::load_with("models/iris-tiny", &options)?;
/// assert_eq!(model.threads(), 2);
/// # Ok::<(), iris_core::Error>(())
/// ```
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct ModelOptions {
    /// Threads of the model's own pool, on which every graph of this model
    /// runs (the calling thread waits meanwhile); 0: one per core. Models
    /// do not share pools: two models with 2 threads each use 4.
    pub threads: usize,
    /// The arithmetic of the convolutions; f32 by default. A precision
    /// this CPU cannot run falls back to f32 ([`Model::precision`]).
    pub precision: Precision,
}

/// The files of a model folder as bytes: `manifest.json`, the three ONNX
/// graphs, and the memory bank when the manifest names one. The manifest's
/// file names are not opened; they only name the graphs in messages. The
/// bytes are copied: the buffers can be freed once the model is loaded.
///
/// ```no_run
/// use iris_core::engine::{Model, ModelBuffers, ModelOptions};
///
/// let read = |name: &str| std::fs::read(format!("models/iris-tiny/{name}"));
/// let (manifest, encoder) = (read("manifest.json")?, read("encoder.onnx")?);
/// let (task_encoder, decoder) = (read("task_encoder.onnx")?, read("decoder.onnx")?);
/// let bank = read("memory_bank.irisemb")?;
/// let buffers = ModelBuffers {
///     manifest: &manifest,
///     encoder: &encoder,
///     task_encoder: &task_encoder,
///     decoder: &decoder,
///     memory_bank: Some(&bank),
/// };
/// let model = Model::from_buffers(&buffers, &ModelOptions::default())?;
/// # Ok::<(), Box<dyn std::error::Error>>(())
/// ```
#[derive(Clone, Copy, Debug)]
pub struct ModelBuffers<'a> {
    /// `manifest.json`, UTF-8 JSON.
    pub manifest: &'a [u8],
    /// The encoder graph (`encoder.onnx`).
    pub encoder: &'a [u8],
    /// The task-encoder graph (`task_encoder.onnx`).
    pub task_encoder: &'a [u8],
    /// The decoder graph (`decoder.onnx`).
    pub decoder: &'a [u8],
    /// The memory bank (`.irisemb`): required when the manifest names one,
    /// refused when it does not.
    pub memory_bank: Option<&'a [u8]>,
}

/// The folder name that messages give a model loaded from buffers.
const MEMORY: &str = "<memory>";

impl Model {
    /// Loads the model folder `dir` with the default [`ModelOptions`]:
    /// reads and checks `manifest.json`, reads the three graphs and checks
    /// their input and output names and the shapes they declare against the
    /// manifest. Plans are built on first use.
    ///
    /// # Errors
    /// [`Error::Io`] if the manifest cannot be read; [`Error::Model`] naming
    /// the manifest or the graph for anything that breaks the model-folder
    /// contract; [`Error::InvalidArgument`] if no thread pool can be started.
    pub fn load(dir: impl AsRef<Path>) -> Result<Model> {
        Model::load_with(dir, &ModelOptions::default())
    }

    /// [`Model::load`] with `options`.
    ///
    /// # Errors
    /// As [`Model::load`].
    pub fn load_with(dir: impl AsRef<Path>, options: &ModelOptions) -> Result<Model> {
        let manifest = Manifest::read(dir.as_ref())?;
        let sources = [&manifest.encoder, &manifest.task_encoder, &manifest.decoder]
            .map(|path| Source::File(path.clone()));
        Model::assemble(manifest, sources, None, options)
    }

    /// Loads a model from the bytes of its folder's files (see
    /// [`ModelBuffers`]), with the checks of [`Model::load`]; messages name
    /// the files as `<memory>/encoder.onnx` and so on.
    ///
    /// # Errors
    /// As [`Model::load`]; [`Error::Model`] if the manifest is not UTF-8, or
    /// if a memory bank is missing that the manifest names (or given when
    /// it names none).
    pub fn from_buffers(buffers: &ModelBuffers<'_>, options: &ModelOptions) -> Result<Model> {
        let dir = Path::new(MEMORY);
        let path = dir.join(MANIFEST_FILE);
        let fail = |reason: String| Error::Model {
            path: path.clone(),
            reason,
        };
        let text = core::str::from_utf8(buffers.manifest)
            .map_err(|e| fail(format!("the manifest is not UTF-8 text: {e}")))?;
        let manifest = Manifest::parse(text, dir).map_err(fail)?;
        match (&manifest.memory_bank, buffers.memory_bank) {
            (Some(bank), None) => {
                return Err(fail(format!(
                    "the manifest names the memory bank {}, but no memory_bank bytes were given",
                    display_name(bank)
                )));
            }
            (None, Some(_)) => {
                return Err(fail(
                    "memory_bank bytes were given, but the manifest names no memory bank".into(),
                ));
            }
            _ => {}
        }
        let bytes = |path: &PathBuf, bytes| Source::Bytes {
            name: path.clone(),
            bytes,
        };
        let sources = [
            bytes(&manifest.encoder, buffers.encoder),
            bytes(&manifest.task_encoder, buffers.task_encoder),
            bytes(&manifest.decoder, buffers.decoder),
        ];
        let bank = buffers.memory_bank.map(<[u8]>::to_vec);
        Model::assemble(manifest, sources, bank, options)
    }

    /// Reads the three graphs of `manifest` from `sources` (encoder, task
    /// encoder, decoder) and checks them against it.
    fn assemble(
        manifest: Manifest,
        sources: [Source<'_>; 3],
        bank_bytes: Option<Vec<u8>>,
        options: &ModelOptions,
    ) -> Result<Model> {
        let [d, h, w] = manifest.patch_size;
        let spatial = |level: usize| [d, h, w].map(|n| Dim::Fixed(n >> level));
        let level = |i: usize| {
            let [sd, sh, sw] = spatial(i);
            Port::new(
                format!("features_{i}"),
                vec![Dim::Batch, Dim::Fixed(manifest.channels[i]), sd, sh, sw],
            )
        };
        let levels = |from: usize| (from..LEVELS).map(level).collect::<Vec<_>>();
        let tasks: Vec<Port> = manifest
            .stages
            .iter()
            .enumerate()
            .map(|(s, stage)| {
                Port::new(
                    format!("task_{s}"),
                    vec![
                        Dim::Batch,
                        Dim::Classes,
                        Dim::Fixed(stage.tokens as usize),
                        Dim::Fixed(stage.channels as usize),
                    ],
                )
            })
            .collect();
        let [sd, sh, sw] = spatial(0);
        let per_class = |name: &str| Port::new(name, vec![Dim::Batch, Dim::Classes, sd, sh, sw]);
        let image = Port::new("image", vec![Dim::Batch, Dim::Fixed(1), sd, sh, sw]);

        let [encoder, task_encoder, decoder] = sources;
        let precision = options.precision;
        let encoder = Graph::load(encoder, &[image], levels(0), precision)?;
        let mut task_inputs = levels(manifest.first_task_level());
        task_inputs.push(per_class("masks"));
        let task_encoder = Graph::load(task_encoder, &task_inputs, tasks.clone(), precision)?;
        let mut decoder_inputs = levels(0);
        decoder_inputs.extend(tasks);
        let logits = vec![per_class("logits")];
        let decoder = Graph::load(decoder, &decoder_inputs, logits, precision)?;
        Ok(Model {
            manifest,
            encoder,
            task_encoder,
            decoder,
            executor: graphs::executor(options.threads)?,
            bank_bytes,
        })
    }

    /// Threads of the model's pool (see [`ModelOptions::threads`]).
    pub fn threads(&self) -> usize {
        graphs::threads(&self.executor)
    }

    /// The arithmetic the model's convolutions run in: the
    /// [`ModelOptions::precision`] asked for where this CPU runs it, else
    /// [`Precision::Float32`].
    pub fn precision(&self) -> Precision {
        self.encoder.precision()
    }
}

/// The file name of `path`, for a message.
fn display_name(path: &Path) -> String {
    path.file_name().map_or_else(
        || path.display().to_string(),
        |n| n.to_string_lossy().into(),
    )
}
