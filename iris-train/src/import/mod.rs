//! Import of the released Iris weights: a PyTorch checkpoint of the authors'
//! code (MASS, `Stanford-AIMI/MASS`, e.g. `mass_base.pth`) as an [`Iris`]
//! model, read in Rust with burn's PyTorch reader (no Python).
//!
//! A checkpoint is either a training checkpoint, a dictionary holding
//! `model`, `ema_model`, `config`, `optimizer`, `scheduler`... as MASS's
//! trainer saves it, or a bare `state_dict`. The copy of the weights is
//! chosen as the reference `inference.py` chooses it: with [`Weights::Ema`]
//! the first of `ema_model`, `ema_state_dict`, `model`, `model_state_dict`;
//! with [`Weights::Model`] the first of `model`, `model_state_dict`. A
//! `module.` or `_orig_mod.` prefix (DDP, `torch.compile`) is dropped.
//!
//! The model's sizes come from the checkpoint's `config` entry (its `model`
//! section, `target_spacing` and the window, `evaluation.window_size` or
//! `training_size`); a bare state_dict is sized from its tensors, with the
//! released spacing and window unless [`ImportOptions`] sets them. Every
//! tensor is then mapped onto the burn model, each with the transform it
//! needs:
//!
//! | reference | burn | transform |
//! |---|---|---|
//! | `nn.MultiheadAttention.in_proj_weight` `[3C, C]`, `in_proj_bias` | `query`, `key`, `value` | split in three, weights transposed |
//! | `nn.Linear.weight` `[out, in]` | `Linear.weight` `[in, out]` | transposed |
//! | `nn.LayerNorm.weight`, `.bias` | `gamma`, `beta` | none |
//! | `nn.Conv3d.weight` `[out, in, k, k, k]`, `.bias` | the same | none |
//! | `pos_embed.embedding` `[1, 1, 128, 128, 128]` | `position` `[1, 1, D, H, W]` | sliced to the window, as the reference slices it |
//!
//! Nothing is guessed: a missing tensor, a tensor of the wrong shape or a
//! configuration this model cannot represent (another block type, kernel,
//! normalisation, scale) is an [`Error::Import`] naming the key, what was
//! expected and what was found. A tensor of the checkpoint that the model
//! has no place for is an error too, except the `task_prior_{i}` buffers
//! (a label-indexed prior bank that the released code never updates), which
//! are listed in [`Imported::ignored`] with the reason.
//!
//! ```no_run
//! use std::path::Path;
//! use iris_train::import::{import_checkpoint, ImportOptions};
//!
//! let device = iris_train::device::select_device();
//! let imported = import_checkpoint(Path::new("mass_base.pth"), &ImportOptions::default(), &device)?;
//! println!("{} parameters from {}", imported.parameters, imported.source.weights);
//! for (key, why) in &imported.ignored {
//!     println!("ignored {key}: {why}");
//! }
//! # Ok::<(), iris_train::Error>(())
//! ```

mod config;
mod mapping;

use std::collections::{BTreeMap, HashMap};
use std::fs::File;
use std::io::Read;
use std::path::Path;

use burn::module::ParamId;
use burn::prelude::*;
use pytorch_reader::{PickleValue, PytorchReader};
use sha2::{Digest, Sha256};

pub use iris_core::engine::WeightsSource;

use crate::error::Error;
use crate::model::{Iris, IrisConfig};
use config::{config_from_entry, config_from_tensors};
use mapping::{TensorSource, load_model};

/// Which copy of the weights to import from a training checkpoint.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum Weights {
    /// The exponential moving average of the weights (`ema_model`), as the
    /// reference inference does; the raw weights when there is none.
    #[default]
    Ema,
    /// The raw weights (`model`).
    Model,
}

impl Weights {
    /// The top-level keys looked for, in order (`inference.py`'s order).
    fn keys(self) -> &'static [&'static str] {
        match self {
            Weights::Ema => &["ema_model", "ema_state_dict", "model", "model_state_dict"],
            Weights::Model => &["model", "model_state_dict"],
        }
    }
}

/// What the checkpoint does not say, or what to change when importing.
#[derive(Clone, Debug, Default)]
pub struct ImportOptions {
    /// Which copy of the weights to import.
    pub weights: Weights,
    /// The sliding window `[D, H, W]` in voxels, at most the positional
    /// embedding's size (default: the checkpoint's `evaluation.window_size`,
    /// else its `training_size`, else 128³ as released).
    pub window: Option<[usize; 3]>,
    /// Isotropic spacing in mm (default: the checkpoint's `target_spacing`,
    /// else 1.5 mm as released).
    pub spacing_mm: Option<f64>,
}

/// A model imported from a reference checkpoint.
#[derive(Debug)]
pub struct Imported {
    /// The model, on the device it was imported to.
    pub model: Iris,
    /// Its sizes.
    pub config: IrisConfig,
    /// The file and the copy of the weights.
    pub source: WeightsSource,
    /// Tensors (or top-level entries) of the checkpoint that were not
    /// imported, each with the reason.
    pub ignored: Vec<(String, String)>,
    /// Parameters imported: the elements of every tensor read (the whole
    /// stored positional embeddings included).
    pub parameters: usize,
    /// The burn parameters each checkpoint tensor was loaded into, by
    /// checkpoint key: one, or three for a packed attention projection
    /// (query, key, value).
    pub params: BTreeMap<String, Vec<ParamId>>,
}

/// Reads the checkpoint at `path` and builds the model on `device`
/// (see the [module docs](self)).
///
/// # Errors
/// [`Error::Import`] for a file that is not a readable PyTorch checkpoint,
/// one without the requested weights, a configuration the model cannot
/// represent, or a tensor that is missing, of the wrong shape or type, or
/// has no place in the model.
pub fn import_checkpoint(
    path: &Path,
    options: &ImportOptions,
    device: &Device,
) -> Result<Imported, Error> {
    let fail = |reason: String| Error::Import {
        path: path.to_path_buf(),
        reason,
    };
    let root = PytorchReader::read_pickle_data(path, None)
        .map_err(|e| fail(format!("not a readable PyTorch checkpoint: {e}")))?;
    let PickleValue::Dict(entries) = &root else {
        return Err(fail(
            "the checkpoint is not a dictionary (a training checkpoint or a state_dict)".into(),
        ));
    };
    let Selected {
        key: weights_key,
        reader,
        mut ignored,
    } = select_weights(path, entries, options.weights).map_err(fail)?;
    let tensors: HashMap<String, pytorch_reader::Tensor> = reader
        .into_tensors()
        .into_iter()
        .map(|(key, tensor)| (strip_prefixes(key.as_str()).to_string(), tensor))
        .collect();
    let config = match entries.get("config") {
        Some(PickleValue::Dict(config)) => config_from_entry(config, options),
        _ => config_from_tensors(&tensors, options),
    }
    .map_err(fail)?;
    config.validate().map_err(|e| fail(e.to_string()))?;

    let mut src = TensorSource {
        tensors,
        params: BTreeMap::new(),
        parameters: 0,
        device,
    };
    let mut model = config.init(device)?;
    load_model(&mut model, &mut src).map_err(fail)?;
    let mut leftover: Vec<String> = src.tensors.into_keys().collect();
    leftover.sort();
    for key in leftover {
        if !key.starts_with("task_prior_") {
            return Err(fail(format!(
                "`{key}` has no place in the model (another architecture or version?)"
            )));
        }
        ignored.push((
            key,
            "label-indexed prior buffer: the released code never updates it, so it is no \
             memory bank"
                .into(),
        ));
    }
    ignored.sort();
    let source = WeightsSource {
        file: path
            .file_name()
            .map_or_else(String::new, |name| name.to_string_lossy().into_owned()),
        sha256: sha256_file(path).map_err(|e| fail(e.to_string()))?,
        weights: weights_key,
    };
    Ok(Imported {
        model,
        config,
        source,
        ignored,
        parameters: src.parameters,
        params: src.params,
    })
}

/// The copy of the weights chosen in a checkpoint.
struct Selected {
    /// The entry's name (`state_dict` for a bare state_dict).
    key: String,
    /// Its tensors.
    reader: PytorchReader,
    /// The other top-level entries, with why they are not imported
    /// (`config` is read, so not listed).
    ignored: Vec<(String, String)>,
}

/// The weights `weights` asks for in the checkpoint whose top-level
/// dictionary is `entries`.
fn select_weights(
    path: &Path,
    entries: &HashMap<String, PickleValue>,
    weights: Weights,
) -> Result<Selected, String> {
    let found = weights
        .keys()
        .iter()
        .find(|key| matches!(entries.get(**key), Some(PickleValue::Dict(_))));
    if let Some(key) = found {
        let reader =
            PytorchReader::with_top_level_key(path, key).map_err(|e| format!("`{key}`: {e}"))?;
        let ignored = entries
            .keys()
            .filter(|other| *other != key && *other != "config")
            .map(|other| (other.clone(), top_level_reason(other).to_string()))
            .collect();
        return Ok(Selected {
            key: (*key).to_string(),
            reader,
            ignored,
        });
    }
    if !is_state_dict(entries) {
        let mut keys: Vec<&String> = entries.keys().collect();
        keys.sort();
        return Err(format!(
            "no weights: expected one of the entries {:?} or a bare state_dict, found entries \
             {keys:?}",
            weights.keys()
        ));
    }
    if weights == Weights::Model {
        return Err(
            "a bare state_dict holds one copy of the weights: `--weights model` asks \
                    for the `model` entry of a training checkpoint"
                .into(),
        );
    }
    let reader = PytorchReader::new(path).map_err(|e| e.to_string())?;
    Ok(Selected {
        key: "state_dict".to_string(),
        reader,
        ignored: Vec::new(),
    })
}

/// Why a top-level entry of a training checkpoint is not imported.
fn top_level_reason(key: &str) -> &'static str {
    match key {
        "ema_model" | "ema_state_dict" | "model" | "model_state_dict" => {
            "the other copy of the weights"
        }
        "optimizer" | "scheduler" | "scaler" => "training state",
        "epoch" | "iteration" | "best_metric" => "training progress",
        _ => "not part of the model",
    }
}

/// Whether a top-level dictionary is itself a state_dict: every entry a
/// tensor (which the pickle reader does not interpret).
fn is_state_dict(entries: &HashMap<String, PickleValue>) -> bool {
    !entries.is_empty()
        && entries
            .values()
            .all(|value| matches!(value, PickleValue::Unsupported(_)))
}

fn strip_prefixes(mut key: &str) -> &str {
    while let Some(rest) = key
        .strip_prefix("module.")
        .or_else(|| key.strip_prefix("_orig_mod."))
    {
        key = rest;
    }
    key
}

fn sha256_file(path: &Path) -> std::io::Result<String> {
    let mut file = File::open(path)?;
    let mut hasher = Sha256::new();
    let mut buffer = vec![0u8; 1 << 20];
    loop {
        let n = file.read(&mut buffer)?;
        if n == 0 {
            break;
        }
        hasher.update(&buffer[..n]);
    }
    Ok(hasher
        .finalize()
        .iter()
        .map(|byte| format!("{byte:02x}"))
        .collect())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn prefixes_of_wrapped_models_are_dropped() {
        assert_eq!(
            strip_prefixes("module.encoder.inc.conv1.weight"),
            "encoder.inc.conv1.weight"
        );
        assert_eq!(
            strip_prefixes("_orig_mod.module.out.norm.bias"),
            "out.norm.bias"
        );
        assert_eq!(strip_prefixes("out.norm.bias"), "out.norm.bias");
    }
}
