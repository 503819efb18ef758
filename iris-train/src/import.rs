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

use std::collections::{BTreeMap, HashMap};
use std::fs::File;
use std::io::Read;
use std::path::Path;

use burn::module::{Param, ParamId};
use burn::nn::attention::MultiHeadAttention;
use burn::nn::conv::Conv3d;
use burn::nn::{LayerNorm, Linear};
use burn::prelude::*;
use pytorch_reader::{DType, PickleValue, PytorchReader};
use sha2::{Digest, Sha256};

pub use iris_core::engine::WeightsSource;

use crate::error::Error;
use crate::model::attention::{CrossAttention, FeedForward, Mlp, SelfAttention};
use crate::model::blocks::{BasicBlock, BlockStack, PreActConv};
use crate::model::conv::Conv3x3;
use crate::model::decoder::FusionBlock;
use crate::model::task_encoder::{TaskEncoderStage, TaskQueryBlock};
use crate::model::{Iris, IrisConfig};

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

/// The architecture constants of the reference `Iris` class that have no
/// field in its `config` (`TaskEncodingLayer_SubPixel`, `MultiPriorFusionLayer`).
const REFERENCE_QUERY_TOKENS: usize = 10;
const REFERENCE_HEAD_DIM: usize = 32;
const REFERENCE_MLP_RATIO: usize = 4;
const REFERENCE_ATTENTION_BLOCKS: usize = 2;
/// The released spacing and window, for a bare state_dict.
const RELEASED_SPACING_MM: f64 = 1.5;
const RELEASED_WINDOW: usize = 128;

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

// ---------------------------------------------------------------------------
// Configuration
// ---------------------------------------------------------------------------

/// The model's sizes from the checkpoint's `config` entry (the training
/// YAML as a dictionary).
fn config_from_entry(
    config: &HashMap<String, PickleValue>,
    options: &ImportOptions,
) -> Result<IrisConfig, String> {
    let Some(PickleValue::Dict(model)) = config.get("model") else {
        return Err("`config.model`: expected a dictionary of model settings, found none".into());
    };
    let field = |name: &str| model.get(name);
    if let Some(kind) = field("type") {
        expect_string(kind, "config.model.type", "iris")?;
    }
    if let Some(in_ch) = field("in_ch") {
        expect_ints(in_ch, "config.model.in_ch", 1, 1)?;
    }
    let channels = match (field("channels"), field("base_ch")) {
        (Some(value), _) if !matches!(value, PickleValue::None) => {
            let values = ints(value, "config.model.channels")?;
            <[usize; 5]>::try_from(values.clone()).map_err(|_| {
                format!("`config.model.channels`: expected 5 widths, found {values:?}")
            })?
        }
        (_, Some(base)) => {
            let base = ints(base, "config.model.base_ch")?;
            match base.as_slice() {
                [b] => [*b, 2 * b, 4 * b, 8 * b, 16 * b],
                _ => {
                    return Err(format!(
                        "`config.model.base_ch`: expected one width, found {base:?}"
                    ));
                }
            }
        }
        _ => return Err("`config.model.channels`: expected 5 widths, found none".into()),
    };
    if let Some(scale) = field("scale") {
        expect_ints(scale, "config.model.scale", 2, 4)?;
    }
    if let Some(kernel) = field("kernel_size") {
        expect_ints(kernel, "config.model.kernel_size", 3, 5)?;
    }
    if let Some(block) = field("block") {
        expect_string(block, "config.model.block", "BasicBlock")?;
    }
    if let Some(norm) = field("norm") {
        expect_string(norm, "config.model.norm", "in")?;
    }
    if let Some(pool) = field("pool")
        && pool != &PickleValue::Bool(true)
    {
        return Err(format!(
            "`config.model.pool`: expected true (max-pool downsampling), found {}",
            describe(pool)
        ));
    }
    let blocks = match field("num_block") {
        Some(value) => {
            let counts = ints(value, "config.model.num_block")?;
            match counts.as_slice() {
                [n, rest @ ..] if rest.iter().all(|m| m == n) && counts.len() == 4 && *n > 0 => *n,
                _ => {
                    return Err(format!(
                        "`config.model.num_block`: expected 4 equal positive counts, found {counts:?}"
                    ));
                }
            }
        }
        None => 2,
    };
    let task_stages = match field("num_prior_stage") {
        Some(value) => single_int(value, "config.model.num_prior_stage")?,
        None => 3,
    };
    let spacing_mm = match (options.spacing_mm, config.get("target_spacing")) {
        (Some(spacing), _) => spacing,
        (None, Some(value)) => {
            let spacing = floats(value, "config.target_spacing")?;
            match spacing.as_slice() {
                [s, rest @ ..] if rest.iter().all(|t| t == s) && spacing.len() == 3 => *s,
                _ => {
                    return Err(format!(
                        "`config.target_spacing`: expected an isotropic [z, y, x] spacing, found \
                         {spacing:?} (pass a spacing to resample to)"
                    ));
                }
            }
        }
        (None, None) => RELEASED_SPACING_MM,
    };
    let window = match options.window {
        Some(window) => window,
        None => {
            let evaluation = match config.get("evaluation") {
                Some(PickleValue::Dict(evaluation)) => evaluation.get("window_size"),
                _ => None,
            };
            match evaluation.or_else(|| config.get("training_size")) {
                Some(value) => {
                    let sizes = ints(value, "config.evaluation.window_size")?;
                    <[usize; 3]>::try_from(sizes.clone()).map_err(|_| {
                        format!(
                            "`config.evaluation.window_size`: expected [D, H, W], found {sizes:?}"
                        )
                    })?
                }
                None => [RELEASED_WINDOW; 3],
            }
        }
    };
    Ok(reference_config(
        channels,
        window,
        spacing_mm,
        blocks,
        task_stages,
    ))
}

/// The model's sizes read off a bare state_dict's tensors.
fn config_from_tensors(
    tensors: &HashMap<String, pytorch_reader::Tensor>,
    options: &ImportOptions,
) -> Result<IrisConfig, String> {
    let width = |key: &str| {
        tensors
            .get(key)
            .and_then(|tensor| tensor.shape().first().copied())
            .ok_or_else(|| format!("`{key}`: missing (needed to size a bare state_dict)"))
    };
    let channels = [
        width("encoder.inc.conv1.weight")?,
        width("encoder.down1.conv.1.conv1.conv.weight")?,
        width("encoder.down2.conv.1.conv1.conv.weight")?,
        width("encoder.down3.conv.1.conv1.conv.weight")?,
        width("encoder.down4.conv.1.conv1.conv.weight")?,
    ];
    let blocks = (1..)
        .take_while(|j| tensors.contains_key(&format!("encoder.down1.conv.{j}.conv1.conv.weight")))
        .count();
    let task_stages = (0..)
        .take_while(|i| tensors.contains_key(&format!("task_embedding.{i}.task_query")))
        .count();
    if task_stages == 0 {
        return Err(
            "`task_embedding.0.task_query`: missing (needed to size a bare state_dict)".into(),
        );
    }
    let window = options.window.unwrap_or([RELEASED_WINDOW; 3]);
    let spacing_mm = options.spacing_mm.unwrap_or(RELEASED_SPACING_MM);
    Ok(reference_config(
        channels,
        window,
        spacing_mm,
        blocks,
        task_stages,
    ))
}

fn reference_config(
    channels: [usize; 5],
    window: [usize; 3],
    spacing_mm: f64,
    blocks: usize,
    task_stages: usize,
) -> IrisConfig {
    IrisConfig::new(channels, window, spacing_mm)
        .with_blocks(blocks)
        .with_task_stages(task_stages)
        .with_query_tokens(REFERENCE_QUERY_TOKENS)
        .with_attention_blocks(REFERENCE_ATTENTION_BLOCKS)
        .with_head_dim(REFERENCE_HEAD_DIM)
        .with_mlp_ratio(REFERENCE_MLP_RATIO)
}

fn describe(value: &PickleValue) -> String {
    match value {
        PickleValue::None => "None".into(),
        PickleValue::Bool(b) => b.to_string(),
        PickleValue::Int(i) => i.to_string(),
        PickleValue::Float(f) => f.to_string(),
        PickleValue::String(s) => format!("{s:?}"),
        PickleValue::List(items) => format!(
            "[{}]",
            items.iter().map(describe).collect::<Vec<_>>().join(", ")
        ),
        PickleValue::Dict(_) => "a dictionary".into(),
        PickleValue::Bytes(_) => "bytes".into(),
        PickleValue::Unsupported(kind) => format!("a {kind}"),
    }
}

/// An integer or a list of integers, as a list.
fn ints(value: &PickleValue, key: &str) -> Result<Vec<usize>, String> {
    let items = match value {
        PickleValue::List(items) => items.as_slice(),
        single => std::slice::from_ref(single),
    };
    items
        .iter()
        .map(|item| match item {
            PickleValue::Int(i) if *i >= 0 => Ok(*i as usize),
            _ => Err(format!(
                "`{key}`: expected non-negative integers, found {}",
                describe(value)
            )),
        })
        .collect()
}

fn single_int(value: &PickleValue, key: &str) -> Result<usize, String> {
    match ints(value, key)?.as_slice() {
        [n] => Ok(*n),
        _ => Err(format!(
            "`{key}`: expected one integer, found {}",
            describe(value)
        )),
    }
}

fn floats(value: &PickleValue, key: &str) -> Result<Vec<f64>, String> {
    let items = match value {
        PickleValue::List(items) => items.as_slice(),
        single => std::slice::from_ref(single),
    };
    items
        .iter()
        .map(|item| match item {
            PickleValue::Float(f) if f.is_finite() && *f > 0.0 => Ok(*f),
            PickleValue::Int(i) if *i > 0 => Ok(*i as f64),
            _ => Err(format!(
                "`{key}`: expected positive numbers, found {}",
                describe(value)
            )),
        })
        .collect()
}

/// An integer, or a list of integers, that must all be `expected`
/// (`count` of them when a list).
fn expect_ints(
    value: &PickleValue,
    key: &str,
    expected: usize,
    count: usize,
) -> Result<(), String> {
    let values = ints(value, key)?;
    let fits =
        values.iter().all(|&v| v == expected) && (values.len() == 1 || values.len() == count);
    if fits {
        Ok(())
    } else {
        Err(format!(
            "`{key}`: this model supports {expected} only, found {}",
            describe(value)
        ))
    }
}

fn expect_string(value: &PickleValue, key: &str, expected: &str) -> Result<(), String> {
    match value {
        PickleValue::String(s) if s == expected => Ok(()),
        _ => Err(format!(
            "`{key}`: this model supports {expected:?} only, found {}",
            describe(value)
        )),
    }
}

// ---------------------------------------------------------------------------
// Tensors
// ---------------------------------------------------------------------------

/// The checkpoint's tensors, taken one by one.
struct TensorSource<'a> {
    tensors: HashMap<String, pytorch_reader::Tensor>,
    /// Keys taken so far, with the parameters they went to.
    params: BTreeMap<String, Vec<ParamId>>,
    /// Elements taken so far.
    parameters: usize,
    device: &'a Device,
}

impl TensorSource<'_> {
    /// The values of `key` as `f32` (row-major), checked against `shape`.
    fn values(&mut self, key: &str, shape: &[usize]) -> Result<Vec<f32>, String> {
        let tensor = self
            .tensors
            .remove(key)
            .ok_or_else(|| format!("`{key}`: missing (expected shape {shape:?})"))?;
        if tensor.shape() != shape {
            return Err(format!(
                "`{key}`: expected shape {shape:?}, found {:?}",
                tensor.shape()
            ));
        }
        let bytes = tensor.read().map_err(|e| format!("`{key}`: {e}"))?;
        let values = to_f32(&bytes, tensor.dtype()).ok_or_else(|| {
            format!(
                "`{key}`: expected floating-point values, found {:?}",
                tensor.dtype()
            )
        })?;
        if let Some(bad) = values.iter().position(|v| !v.is_finite()) {
            return Err(format!("`{key}`: element {bad} is {}", values[bad]));
        }
        self.parameters += values.len();
        Ok(values)
    }

    fn tensor<const D: usize>(
        &mut self,
        key: &str,
        shape: [usize; D],
    ) -> Result<Tensor<D>, String> {
        let values = self.values(key, &shape)?;
        Ok(Tensor::from_data(
            TensorData::new(values, shape),
            self.device,
        ))
    }

    /// Sets `param` to `value`, loaded from the tensor `key` (trainable, so
    /// that a model imported onto an autodiff device can be tuned).
    fn set<const D: usize>(&mut self, param: &mut Param<Tensor<D>>, key: &str, value: Tensor<D>) {
        *param = Param::from_tensor(value);
        self.params
            .entry(key.to_string())
            .or_default()
            .push(param.id);
    }

    /// Replaces `param` by the tensor `key`, of the same shape.
    fn param<const D: usize>(
        &mut self,
        param: &mut Param<Tensor<D>>,
        key: &str,
    ) -> Result<(), String> {
        let shape: [usize; D] = param.lazy_shape().dims();
        let tensor = self.tensor(key, shape)?;
        self.set(param, key, tensor);
        Ok(())
    }

    /// Replaces `param` by the transpose of the 2-D tensor `key`.
    fn transposed(&mut self, param: &mut Param<Tensor<2>>, key: &str) -> Result<(), String> {
        let [rows, cols] = param.lazy_shape().dims();
        let tensor = self.tensor(key, [cols, rows])?.transpose();
        self.set(param, key, tensor);
        Ok(())
    }
}

fn to_f32(bytes: &[u8], dtype: DType) -> Option<Vec<f32>> {
    let values = match dtype {
        DType::F32 => bytes
            .chunks_exact(4)
            .map(|b| f32::from_ne_bytes([b[0], b[1], b[2], b[3]]))
            .collect(),
        DType::F64 => bytes
            .chunks_exact(8)
            .map(|b| f64::from_ne_bytes([b[0], b[1], b[2], b[3], b[4], b[5], b[6], b[7]]) as f32)
            .collect(),
        DType::F16 => bytes
            .chunks_exact(2)
            .map(|b| half::f16::from_ne_bytes([b[0], b[1]]).to_f32())
            .collect(),
        DType::BF16 => bytes
            .chunks_exact(2)
            .map(|b| half::bf16::from_ne_bytes([b[0], b[1]]).to_f32())
            .collect(),
        _ => return None,
    };
    Some(values)
}

// ---------------------------------------------------------------------------
// The mapping, one function per block (names as in the reference code)
// ---------------------------------------------------------------------------

fn load_model(model: &mut Iris, src: &mut TensorSource) -> Result<(), String> {
    let encoder = &mut model.encoder;
    src.param(&mut encoder.stem.weight, "encoder.inc.conv1.weight")?;
    load_basic_block(src, &mut encoder.stem_block, "encoder.inc.conv2")?;
    for (i, stage) in encoder.stages.iter_mut().enumerate() {
        // `conv.0` is the max pool.
        load_block_stack(src, stage, &format!("encoder.down{}.conv", i + 1), 1)?;
    }
    for (i, stage) in model.task_encoder.stages.iter_mut().enumerate() {
        load_task_stage(src, stage, &format!("task_embedding.{i}"))?;
    }
    let decoder = &mut model.decoder;
    for (i, up) in decoder.ups.iter_mut().enumerate() {
        load_block_stack(src, &mut up.blocks, &format!("decoder.up{}.conv", i + 1), 0)?;
    }
    for (i, fusion) in decoder.fusions.iter_mut().enumerate() {
        for (j, block) in fusion.blocks.iter_mut().enumerate() {
            load_fusion_block(
                src,
                block,
                &format!("decoder.prior_fuse.{i}.attn_layers.{j}"),
            )?;
        }
    }
    let head = &mut model.head;
    load_layer_norm(src, &mut head.norm, "out.norm")?;
    load_mlp(src, &mut head.mlp_1, "out.classifier_pred.0")?;
    load_mlp(src, &mut head.mlp_2, "out.classifier_pred.1")
}

/// `nn.Sequential` of BasicBlocks whose first block is `prefix.{first}`.
fn load_block_stack(
    src: &mut TensorSource,
    stack: &mut BlockStack,
    prefix: &str,
    first: usize,
) -> Result<(), String> {
    for (j, block) in stack.blocks.iter_mut().enumerate() {
        load_basic_block(src, block, &format!("{prefix}.{}", first + j))?;
    }
    Ok(())
}

/// `BasicBlock`: two pre-activation convolutions and, when the width
/// changes, a pre-activation shortcut (instance norms without weights).
fn load_basic_block(
    src: &mut TensorSource,
    block: &mut BasicBlock,
    prefix: &str,
) -> Result<(), String> {
    load_preact(src, &mut block.conv1, &format!("{prefix}.conv1"))?;
    load_preact(src, &mut block.conv2, &format!("{prefix}.conv2"))?;
    if let Some(shortcut) = &mut block.shortcut {
        load_preact(src, shortcut, &format!("{prefix}.shortcut"))?;
    }
    Ok(())
}

fn load_preact(src: &mut TensorSource, unit: &mut PreActConv, prefix: &str) -> Result<(), String> {
    load_conv3x3(src, &mut unit.conv, &format!("{prefix}.conv"))
}

fn load_conv3x3(src: &mut TensorSource, conv: &mut Conv3x3, prefix: &str) -> Result<(), String> {
    src.param(&mut conv.weight, &format!("{prefix}.weight"))
}

fn load_conv3d(src: &mut TensorSource, conv: &mut Conv3d, prefix: &str) -> Result<(), String> {
    src.param(&mut conv.weight, &format!("{prefix}.weight"))?;
    match &mut conv.bias {
        Some(bias) => src.param(bias, &format!("{prefix}.bias")),
        None => Ok(()),
    }
}

/// `TaskEncodingLayer_SubPixel`.
fn load_task_stage(
    src: &mut TensorSource,
    stage: &mut TaskEncoderStage,
    prefix: &str,
) -> Result<(), String> {
    src.param(&mut stage.queries, &format!("{prefix}.task_query"))?;
    for (j, block) in stage.blocks.iter_mut().enumerate() {
        load_task_query_block(src, block, &format!("{prefix}.attn_layers.{j}"))?;
    }
    load_layer_norm(
        src,
        &mut stage.norm_foreground,
        &format!("{prefix}.norm_foreground"),
    )?;
    load_layer_norm(src, &mut stage.norm_query, &format!("{prefix}.norm_query"))?;
    load_layer_norm(
        src,
        &mut stage.norm_combined,
        &format!("{prefix}.norm_combined"),
    )?;
    load_layer_norm(src, &mut stage.norm_post, &format!("{prefix}.norm_post"))?;
    // `expand`, `merge`, `squeeze` are (InstanceNorm3d, ReLU, Conv3d).
    load_conv3d(src, &mut stage.expand, &format!("{prefix}.expand.2"))?;
    load_conv3d(src, &mut stage.merge, &format!("{prefix}.merge.2"))?;
    load_conv3d(src, &mut stage.squeeze, &format!("{prefix}.squeeze.2"))?;
    load_position(
        src,
        &mut stage.position,
        &format!("{prefix}.pos_embed.embedding"),
    )
}

/// The learnable positional embedding, stored at its full size (128³ in the
/// release) and sliced to the window from the origin, as the reference
/// `LearnablePositionalEncoding3D` slices it for a smaller input.
fn load_position(
    src: &mut TensorSource,
    position: &mut Param<Tensor<5>>,
    key: &str,
) -> Result<(), String> {
    let window: [usize; 5] = position.lazy_shape().dims();
    let stored = src
        .tensors
        .get(key)
        .map(|tensor| tensor.shape().to_vec())
        .ok_or_else(|| {
            format!(
                "`{key}`: missing (expected shape [1, 1, D, H, W] covering {:?})",
                &window[2..]
            )
        })?;
    let fits = stored.len() == 5
        && stored[..2] == window[..2]
        && stored[2..].iter().zip(&window[2..]).all(|(s, w)| s >= w);
    if !fits {
        return Err(format!(
            "`{key}`: expected shape [1, 1, D, H, W] at least as large as the window {:?}, found \
             {stored:?} (choose a smaller window)",
            &window[2..]
        ));
    }
    let stored: [usize; 5] = [stored[0], stored[1], stored[2], stored[3], stored[4]];
    let full = src.tensor(key, stored)?;
    let sliced = full.slice([0..1, 0..1, 0..window[2], 0..window[3], 0..window[4]]);
    src.set(position, key, sliced);
    Ok(())
}

/// `TaskQueryAttentionBlock`.
fn load_task_query_block(
    src: &mut TensorSource,
    block: &mut TaskQueryBlock,
    prefix: &str,
) -> Result<(), String> {
    load_self_attention(
        src,
        &mut block.self_attention_1,
        &format!("{prefix}.query_attn_block_1"),
    )?;
    load_feed_forward(
        src,
        &mut block.feed_forward_1,
        &format!("{prefix}.query_ffn_1"),
    )?;
    load_cross_attention(
        src,
        &mut block.cross_attention,
        &format!("{prefix}.query_aggregate_block"),
    )?;
    load_feed_forward(
        src,
        &mut block.feed_forward_cross,
        &format!("{prefix}.query_aggregate_ffn"),
    )?;
    load_self_attention(
        src,
        &mut block.self_attention_2,
        &format!("{prefix}.query_attn_block_2"),
    )?;
    load_feed_forward(
        src,
        &mut block.feed_forward_2,
        &format!("{prefix}.query_ffn_2"),
    )
}

/// `MultiPriorAttentionBlock`.
fn load_fusion_block(
    src: &mut TensorSource,
    block: &mut FusionBlock,
    prefix: &str,
) -> Result<(), String> {
    load_cross_attention(
        src,
        &mut block.tokens_read_image,
        &format!("{prefix}.prior_aggregate_block"),
    )?;
    load_feed_forward(
        src,
        &mut block.tokens_feed_forward,
        &format!("{prefix}.prior_ffn"),
    )?;
    load_cross_attention(
        src,
        &mut block.image_read_tokens,
        &format!("{prefix}.feat_aggregate_block"),
    )?;
    load_feed_forward(
        src,
        &mut block.image_feed_forward,
        &format!("{prefix}.feat_ffn"),
    )?;
    load_self_attention(
        src,
        &mut block.tokens_self_attention,
        &format!("{prefix}.prior_attn_block"),
    )?;
    load_feed_forward(
        src,
        &mut block.tokens_feed_forward_2,
        &format!("{prefix}.prior_ffn_2"),
    )
}

/// `PreNorm(LayerNorm, Attention)`.
fn load_self_attention(
    src: &mut TensorSource,
    unit: &mut SelfAttention,
    prefix: &str,
) -> Result<(), String> {
    load_layer_norm(src, &mut unit.norm, &format!("{prefix}.norm"))?;
    load_attention(src, &mut unit.attention, &format!("{prefix}.fn.mha"))
}

/// `DualPreNorm(LayerNorm, LayerNorm, CrossAttention)`: `norm1` normalises
/// the queries, `norm2` the context.
fn load_cross_attention(
    src: &mut TensorSource,
    unit: &mut CrossAttention,
    prefix: &str,
) -> Result<(), String> {
    load_layer_norm(src, &mut unit.norm_query, &format!("{prefix}.norm1"))?;
    load_layer_norm(src, &mut unit.norm_context, &format!("{prefix}.norm2"))?;
    load_attention(src, &mut unit.attention, &format!("{prefix}.fn.mha"))
}

/// `PreNorm(LayerNorm, Mlp)`.
fn load_feed_forward(
    src: &mut TensorSource,
    unit: &mut FeedForward,
    prefix: &str,
) -> Result<(), String> {
    load_layer_norm(src, &mut unit.norm, &format!("{prefix}.norm"))?;
    load_mlp(src, &mut unit.mlp, &format!("{prefix}.fn"))
}

fn load_mlp(src: &mut TensorSource, mlp: &mut Mlp, prefix: &str) -> Result<(), String> {
    load_linear(src, &mut mlp.fc1, &format!("{prefix}.fc1"))?;
    load_linear(src, &mut mlp.fc2, &format!("{prefix}.fc2"))
}

fn load_linear(src: &mut TensorSource, linear: &mut Linear, prefix: &str) -> Result<(), String> {
    src.transposed(&mut linear.weight, &format!("{prefix}.weight"))?;
    match &mut linear.bias {
        Some(bias) => src.param(bias, &format!("{prefix}.bias")),
        None => Ok(()),
    }
}

fn load_layer_norm(
    src: &mut TensorSource,
    norm: &mut LayerNorm,
    prefix: &str,
) -> Result<(), String> {
    src.param(&mut norm.gamma, &format!("{prefix}.weight"))?;
    match &mut norm.beta {
        Some(beta) => src.param(beta, &format!("{prefix}.bias")),
        None => Ok(()),
    }
}

/// `nn.MultiheadAttention`: the packed `in_proj` `[3C, C]` holds the query,
/// key and value projections in that order.
fn load_attention(
    src: &mut TensorSource,
    attention: &mut MultiHeadAttention,
    prefix: &str,
) -> Result<(), String> {
    let dim = attention.d_model;
    let weight_key = format!("{prefix}.in_proj_weight");
    let bias_key = format!("{prefix}.in_proj_bias");
    let weight = src.tensor(&weight_key, [3 * dim, dim])?;
    let bias = src.tensor(&bias_key, [3 * dim])?;
    for (i, linear) in [
        &mut attention.query,
        &mut attention.key,
        &mut attention.value,
    ]
    .into_iter()
    .enumerate()
    {
        let rows = i * dim..(i + 1) * dim;
        let part = weight.clone().slice([rows.clone(), 0..dim]).transpose();
        src.set(&mut linear.weight, &weight_key, part);
        match &mut linear.bias {
            Some(b) => src.set(b, &bias_key, bias.clone().slice([rows])),
            None => return Err(format!("`{bias_key}`: the model's projection has no bias")),
        }
    }
    load_linear(src, &mut attention.output, &format!("{prefix}.out_proj"))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn dict(entries: &[(&str, PickleValue)]) -> HashMap<String, PickleValue> {
        entries
            .iter()
            .map(|(key, value)| (key.to_string(), value.clone()))
            .collect()
    }

    fn list(values: &[i64]) -> PickleValue {
        PickleValue::List(values.iter().map(|v| PickleValue::Int(*v)).collect())
    }

    /// The released configuration's `model` section, with `edit` applied.
    fn config(edit: &[(&str, PickleValue)]) -> HashMap<String, PickleValue> {
        let mut model = dict(&[
            ("type", PickleValue::String("iris".into())),
            ("in_ch", PickleValue::Int(1)),
            ("channels", list(&[32, 64, 128, 256, 512])),
            ("scale", list(&[2, 2, 2, 2])),
            ("kernel_size", list(&[3, 3, 3, 3, 3])),
            ("block", PickleValue::String("BasicBlock".into())),
            ("num_block", list(&[2, 2, 2, 2])),
            ("pool", PickleValue::Bool(true)),
            ("norm", PickleValue::String("in".into())),
            ("tn", PickleValue::Int(73)),
            ("num_prior_stage", PickleValue::Int(3)),
        ]);
        model.extend(dict(edit));
        let spacing = PickleValue::List(vec![PickleValue::Float(1.5); 3]);
        let evaluation = dict(&[("window_size", list(&[128, 128, 128]))]);
        dict(&[
            ("model", PickleValue::Dict(model)),
            ("target_spacing", spacing),
            ("evaluation", PickleValue::Dict(evaluation)),
        ])
    }

    #[test]
    fn the_released_configuration_is_the_paper_preset() {
        let parsed = config_from_entry(&config(&[]), &ImportOptions::default()).expect("parses");
        let paper = IrisConfig::paper();
        assert_eq!(parsed.channels, paper.channels);
        assert_eq!(parsed.patch_size, paper.patch_size);
        assert_eq!(parsed.spacing_mm, paper.spacing_mm);
        assert_eq!(
            (
                parsed.blocks,
                parsed.task_stages,
                parsed.query_tokens,
                parsed.head_dim
            ),
            (
                paper.blocks,
                paper.task_stages,
                paper.query_tokens,
                paper.head_dim
            )
        );
        let base = config(&[
            ("channels", PickleValue::None),
            ("base_ch", PickleValue::Int(16)),
        ]);
        let parsed = config_from_entry(&base, &ImportOptions::default()).expect("parses");
        assert_eq!(parsed.channels, [16, 32, 64, 128, 256]);
        let options = ImportOptions {
            window: Some([96, 96, 64]),
            spacing_mm: Some(2.0),
            ..ImportOptions::default()
        };
        let parsed = config_from_entry(&config(&[]), &options).expect("parses");
        assert_eq!((parsed.patch_size, parsed.spacing_mm), ([96, 96, 64], 2.0));
    }

    #[test]
    fn a_configuration_the_model_cannot_represent_is_refused_by_name() {
        let cases = [
            (
                "block",
                PickleValue::String("Bottleneck".into()),
                "`config.model.block`",
            ),
            (
                "norm",
                PickleValue::String("bn".into()),
                "`config.model.norm`",
            ),
            (
                "kernel_size",
                list(&[3, 3, 5, 3, 3]),
                "`config.model.kernel_size`",
            ),
            ("scale", list(&[2, 2, 2, 4]), "`config.model.scale`"),
            ("pool", PickleValue::Bool(false), "`config.model.pool`"),
            ("num_block", list(&[2, 2, 3, 2]), "`config.model.num_block`"),
            ("in_ch", PickleValue::Int(2), "`config.model.in_ch`"),
            (
                "channels",
                list(&[32, 64, 128, 256]),
                "`config.model.channels`",
            ),
            (
                "type",
                PickleValue::String("unet".into()),
                "`config.model.type`",
            ),
        ];
        for (key, value, needle) in cases {
            let message = config_from_entry(&config(&[(key, value)]), &ImportOptions::default())
                .expect_err(key);
            assert!(message.contains(needle), "{message}");
            assert!(message.contains("found"), "{message}");
        }
        let mut anisotropic = config(&[]);
        anisotropic.insert(
            "target_spacing".into(),
            PickleValue::List(vec![
                PickleValue::Float(3.0),
                PickleValue::Float(1.5),
                PickleValue::Float(1.5),
            ]),
        );
        let message = config_from_entry(&anisotropic, &ImportOptions::default()).expect_err("3 mm");
        assert!(message.contains("`config.target_spacing`"), "{message}");
    }

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
