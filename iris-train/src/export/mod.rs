//! ONNX export: the model as three graphs plus a manifest, the folder the
//! `iris-core` engine loads.
//!
//! burn's own ONNX export cannot express this model (3-D convolutions,
//! instance norm, attention...), so the graphs are built here from the
//! model's structure and weights with standard ONNX operators (opset 17),
//! one function per block type (`layers`), and serialised as protobuf.
//!
//! A model folder holds:
//!
//! | file | content |
//! |---|---|
//! | `manifest.json` | format, name, the [`IrisConfig`] JSON, patch size, spacing, channels, task stage shapes, weights fingerprint, opset, graph files, bank file, `classes_per_forward` (the engine decodes larger tasks in groups of that many, all in one run when absent; see [`DEFAULT_CLASSES_PER_FORWARD`]), and for imported weights their `source` (file, SHA-256, which copy) |
//! | `encoder.onnx` | `image` `[batch, 1, D, H, W]` to `features_0` .. `features_4`, level `l` being `[batch, C_l, D / 2^l, H / 2^l, W / 2^l]` |
//! | `task_encoder.onnx` | `features_{5-S}` .. `features_4` and `masks` `[batch, classes, D, H, W]` (binary) to `task_0` .. `task_{S-1}` `[batch, classes, T + 1, C_{4-s}]` (deepest first) |
//! | `decoder.onnx` | `features_0` .. `features_4` and `task_0` .. `task_{S-1}` to `logits` `[batch, classes, D, H, W]` |
//! | `memory_bank.irisemb` | the EMA memory bank, when there is one |
//!
//! All tensors are `f32`, axes `[D, H, W]` with W fastest; `batch` and
//! `classes` are symbolic dimensions, the spatial sizes are the patch size.
//! The weights are embedded in the graphs (no external data files).
//!
//! ```
//! use iris_train::model::IrisConfig;
//!
//! let config = IrisConfig::tiny();
//! let model = config.init(&iris_train::device::select_device())?;
//! let out = std::env::temp_dir().join(format!("iris-export-doc-{}", std::process::id()));
//! let fingerprint = iris_train::export::export(&model, &config, "iris-tiny", &out, None, 1)?;
//! assert_eq!(fingerprint, iris_train::training::model_fingerprint(&model, &config));
//! assert!(out.join("decoder.onnx").is_file());
//! # std::fs::remove_dir_all(&out).ok();
//! # Ok::<(), iris_train::Error>(())
//! ```

mod graph;
mod layers;
mod parts;

use std::fs;
use std::path::{Path, PathBuf};

use iris_core::embedding::ModelFingerprint;
use iris_core::engine::{
    FORMAT, FORMAT_VERSION, GraphFiles, ManifestFile, StageEntry, WeightsSource,
};
use prost::Message;
use tract_onnx::pb::ModelProto;

pub use graph::OPSET;

use crate::Error;
use crate::bank::MemoryBank;
use crate::import::Imported;
use crate::model::{Iris, IrisConfig};
use crate::training::model_fingerprint;

/// The `classes_per_forward` that `iris-train export` writes unless told
/// otherwise: each class decoded in a decoder run of its own.
///
/// The paper decodes all classes of a task in one pass, and a model that
/// keeps classes apart should be exported with a larger value (up to the
/// most classes of its training episodes) for that speed. The `tiny` model
/// shipped in `models/` does not: in one run of several classes, every class
/// gets the same map (on the 12 held-out AAL structures, mean Dice 0.089 in
/// groups of 3 against 0.262 one at a time; `docs/results-notes.md`).
pub const DEFAULT_CLASSES_PER_FORWARD: usize = 1;

pub use iris_core::engine::MANIFEST_FILE;
/// The encoder graph's file name.
pub const ENCODER_FILE: &str = "encoder.onnx";
/// The task encoder graph's file name.
pub const TASK_ENCODER_FILE: &str = "task_encoder.onnx";
/// The decoder graph's file name.
pub const DECODER_FILE: &str = "decoder.onnx";
/// The memory bank's file name (present only when exported with a bank).
pub const BANK_FILE: &str = crate::checkpoint::BANK_FILE;

/// The three ONNX graphs of a model (see the [module docs](self)).
#[derive(Clone, Debug)]
pub struct OnnxGraphs {
    /// `encoder.onnx`.
    pub encoder: ModelProto,
    /// `task_encoder.onnx`.
    pub task_encoder: ModelProto,
    /// `decoder.onnx`.
    pub decoder: ModelProto,
}

impl OnnxGraphs {
    /// Builds the graphs of `model`, whose sizes are `config`.
    ///
    /// # Errors
    /// [`Error::Config`] for an invalid configuration, [`Error::Export`]
    /// when the model's weights do not have the shapes `config` gives or a
    /// part has no ONNX equivalent.
    pub fn new(model: &Iris, config: &IrisConfig) -> Result<Self, Error> {
        check_model(model, config)?;
        Ok(OnnxGraphs {
            encoder: parts::encoder(model, config)?,
            task_encoder: parts::task_encoder(model, config)?,
            decoder: parts::decoder(model, config)?,
        })
    }

    /// Each graph's file name and protobuf bytes: encoder, task encoder,
    /// decoder.
    pub fn to_files(&self) -> [(&'static str, Vec<u8>); 3] {
        [
            (ENCODER_FILE, self.encoder.encode_to_vec()),
            (TASK_ENCODER_FILE, self.task_encoder.encode_to_vec()),
            (DECODER_FILE, self.decoder.encode_to_vec()),
        ]
    }
}

/// Checks that the weights of `model` have the shapes `config` gives, so
/// the graphs (whose shapes come from `config`) fit them.
fn check_model(model: &Iris, config: &IrisConfig) -> Result<(), Error> {
    config.validate()?;
    let c = config.channels;
    let mut checks: Vec<(String, Vec<usize>, Vec<usize>)> = vec![(
        "encoder.stem.weight".into(),
        model.encoder.stem.weight.dims()[..2].to_vec(),
        vec![c[0], 1],
    )];
    for (i, stage) in model.encoder.stages.iter().enumerate() {
        if let Some(block) = stage.blocks.last() {
            checks.push((
                format!("encoder.stages.{i} output channels"),
                vec![block.conv2.conv.weight.dims()[0]],
                vec![c[i + 1]],
            ));
        }
    }
    let stages = &model.task_encoder.stages;
    checks.push((
        "task encoder stages".into(),
        vec![stages.len(), model.decoder.fusions.len()],
        vec![config.task_stages, config.task_stages],
    ));
    for (s, stage) in stages.iter().enumerate() {
        let [pd, ph, pw] = config.patch_size;
        checks.push((
            format!("task_encoder.stages.{s}.queries"),
            stage.queries.dims().to_vec(),
            vec![config.query_tokens, c[4 - s]],
        ));
        checks.push((
            format!("task_encoder.stages.{s}.position"),
            stage.position.dims().to_vec(),
            vec![1, 1, pd, ph, pw],
        ));
    }
    checks.push((
        "head.mlp_2 output channels".into(),
        vec![model.head.mlp_2.fc2.weight.dims()[1]],
        vec![c[0]],
    ));
    match checks
        .into_iter()
        .find(|(_, found, expected)| found != expected)
    {
        Some((what, found, expected)) => Err(Error::Export {
            what,
            reason: format!(
                "the weights have shape {found:?} but the configuration gives {expected:?} (export the model with the configuration it was built with)"
            ),
        }),
        None => Ok(()),
    }
}

/// The manifest of a model folder (see the [module docs](self)).
fn manifest(
    config: &IrisConfig,
    fingerprint: ModelFingerprint,
    with_bank: bool,
    folder: &Folder,
) -> ManifestFile {
    ManifestFile {
        format: FORMAT.into(),
        format_version: FORMAT_VERSION,
        name: folder.name.into(),
        patch_size: config.patch_size,
        spacing_mm: config.spacing_mm,
        channels: config.channels,
        stages: config
            .stage_shapes()
            .into_iter()
            .map(StageEntry::from)
            .collect(),
        fingerprint: fingerprint.to_string(),
        graphs: GraphFiles {
            encoder: ENCODER_FILE.into(),
            task_encoder: TASK_ENCODER_FILE.into(),
            decoder: DECODER_FILE.into(),
        },
        memory_bank: with_bank.then(|| BANK_FILE.into()),
        classes_per_forward: folder.classes_per_forward,
        source: folder.source.cloned(),
        config: serde_json::to_value(config).unwrap_or_default(),
        opset: Some(OPSET),
    }
}

/// What a model folder says besides the model: see [`export`] and
/// [`export_imported`].
struct Folder<'a> {
    name: &'a str,
    bank: Option<&'a MemoryBank>,
    /// `None`: every class of a task in one decoder run.
    classes_per_forward: Option<usize>,
    source: Option<&'a WeightsSource>,
}

/// Exports `model` (sizes `config`) as the model folder `out_dir` named
/// `name`: the three graphs, `manifest.json` and, when `bank` has entries,
/// `memory_bank.irisemb`. The manifest tells the engine to decode at most
/// `classes_per_forward` classes per decoder run (see
/// [`DEFAULT_CLASSES_PER_FORWARD`]). Returns the weights' fingerprint (the one in the
/// manifest and the bank).
///
/// Every file is first written under a temporary name in `out_dir`, then
/// all are renamed into place, the manifest last; a bank file left by an
/// earlier export is removed when this one has none. Other files in
/// `out_dir` are left alone.
///
/// # Errors
/// As [`OnnxGraphs::new`]; [`Error::Export`] naming the file that could
/// not be written (nothing is then renamed into place), an empty `name` or
/// a `classes_per_forward` of 0.
pub fn export(
    model: &Iris,
    config: &IrisConfig,
    name: &str,
    out_dir: &Path,
    bank: Option<&MemoryBank>,
    classes_per_forward: usize,
) -> Result<ModelFingerprint, Error> {
    if classes_per_forward == 0 {
        return Err(Error::Export {
            what: "classes_per_forward".into(),
            reason: "must be at least 1".into(),
        });
    }
    let folder = Folder {
        name,
        bank,
        classes_per_forward: Some(classes_per_forward),
        source: None,
    };
    write_folder(model, config, out_dir, &folder)
}

/// Exports a model imported from a reference checkpoint as the model folder
/// `out_dir` named `name`, as [`export`] does, with two differences: the
/// manifest records where the weights came from (`source`: the file's name,
/// its SHA-256 and the copy of the weights) and has no `classes_per_forward`,
/// so that the engine decodes every class of a task in one decoder run, as
/// the reference code does. There is no memory bank.
///
/// # Errors
/// As [`export`].
pub fn export_imported(
    imported: &Imported,
    name: &str,
    out_dir: &Path,
) -> Result<ModelFingerprint, Error> {
    let folder = Folder {
        name,
        bank: None,
        classes_per_forward: None,
        source: Some(&imported.source),
    };
    write_folder(&imported.model, &imported.config, out_dir, &folder)
}

fn write_folder(
    model: &Iris,
    config: &IrisConfig,
    out_dir: &Path,
    folder: &Folder,
) -> Result<ModelFingerprint, Error> {
    let name = folder.name;
    if name.trim().is_empty() {
        return Err(Error::Export {
            what: "model name".into(),
            reason: "must not be empty".into(),
        });
    }
    // The fingerprint first: it reads every parameter in the module's order,
    // so the weights burn draws lazily (a fresh model's) are drawn in that
    // order whatever the graphs read first.
    let fingerprint = model_fingerprint(model, config);
    let graphs = OnnxGraphs::new(model, config)?;
    let failed = |path: &Path, e: &dyn std::fmt::Display| Error::Export {
        what: path.display().to_string(),
        reason: e.to_string(),
    };
    fs::create_dir_all(out_dir).map_err(|e| failed(out_dir, &e))?;

    let mut staged = Staged::new(out_dir);
    let mut with_bank = false;
    if let Some(bank) = folder.bank.filter(|bank| !bank.is_empty()) {
        let tmp = staged.add(BANK_FILE);
        with_bank = bank.write(&tmp, fingerprint).map_err(|e| {
            staged.discard();
            failed(&out_dir.join(BANK_FILE), &e)
        })?;
    }
    if !with_bank {
        staged.remove_if_present(BANK_FILE);
    }
    let manifest = manifest(config, fingerprint, with_bank, folder).to_json();
    let files = graphs
        .to_files()
        .into_iter()
        .chain([(MANIFEST_FILE, manifest.into_bytes())]);
    for (file, bytes) in files {
        let tmp = staged.add(file);
        fs::write(&tmp, bytes).map_err(|e| {
            staged.discard();
            failed(&out_dir.join(file), &e)
        })?;
    }
    staged.commit().map_err(|(path, e)| failed(&path, &e))?;
    Ok(fingerprint)
}

/// Files written under temporary names, renamed into place together.
struct Staged {
    dir: PathBuf,
    /// `(temporary, final)` paths, in commit order.
    files: Vec<(PathBuf, PathBuf)>,
    /// Files to delete on commit.
    stale: Vec<PathBuf>,
}

impl Staged {
    fn new(dir: &Path) -> Self {
        Staged {
            dir: dir.to_path_buf(),
            files: Vec::new(),
            stale: Vec::new(),
        }
    }

    /// The temporary path to write `file` to.
    fn add(&mut self, file: &str) -> PathBuf {
        let tmp = self.dir.join(format!(".{file}.tmp-{}", std::process::id()));
        self.files.push((tmp.clone(), self.dir.join(file)));
        tmp
    }

    fn remove_if_present(&mut self, file: &str) {
        let path = self.dir.join(file);
        if path.exists() {
            self.stale.push(path);
        }
    }

    /// Removes the temporary files (after a failure; best effort).
    fn discard(&self) {
        for (tmp, _) in &self.files {
            let _ = fs::remove_file(tmp);
        }
    }

    /// Renames every file into place (in the order added) and deletes the
    /// stale ones.
    fn commit(self) -> Result<(), (PathBuf, std::io::Error)> {
        for (tmp, path) in &self.files {
            if let Err(e) = fs::rename(tmp, path) {
                self.discard();
                return Err((path.clone(), e));
            }
        }
        for path in &self.stale {
            fs::remove_file(path).map_err(|e| (path.clone(), e))?;
        }
        Ok(())
    }
}
