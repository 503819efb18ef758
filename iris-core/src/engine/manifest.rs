//! `manifest.json`: what a model folder holds, written and read.
//!
//! The format is the contract between the exporter (`iris-train export`,
//! `iris-train import`) and this engine, and [`ManifestFile`] is its one
//! definition: the exporter fills one in and writes it with
//! [`ManifestFile::to_json`], the engine parses it and checks it into a
//! [`Manifest`]. It is a UTF-8 JSON object with `format` `"iris-model"`,
//! `format_version` 1, the model's `name`, `patch_size` `[D, H, W]`
//! (voxels), `spacing_mm`, the encoder `channels` per level (full resolution
//! first), the task-embedding `stages` (deepest first), the weights
//! `fingerprint` (64 hex digits), the three graph file names, and
//! optionally a `memory_bank` file, `classes_per_forward`, the `source` of
//! imported weights, the exporter's model `config` and the ONNX `opset`.
//! Unknown keys are ignored.

// This crate is `no_std`; the engine is `std` code.
use std::format;
use std::prelude::rust_2024::*;

use std::path::{Component, Path, PathBuf};

use serde::{Deserialize, Serialize};

use crate::embedding::{MAX_STAGES, ModelFingerprint, StageShape};
use crate::error::{Error, Result};
use crate::volume::checked_voxel_count;

/// The `format` value of every manifest.
pub const FORMAT: &str = "iris-model";

/// The newest `format_version` this engine reads.
pub const FORMAT_VERSION: u32 = 1;

/// The manifest's file name in a model folder.
pub const MANIFEST_FILE: &str = "manifest.json";

/// Largest manifest read, in bytes (a real one is about 1 KB): a larger
/// file, or an endless one such as `/dev/zero`, is refused unread.
pub const MAX_MANIFEST_BYTES: usize = 1 << 20;

/// Encoder feature levels: level `i` has `channels[i]` channels and the
/// patch size divided by `2^i` along every axis.
pub const LEVELS: usize = 5;

/// Largest patch edge accepted, in voxels (the released model uses 128).
pub const MAX_PATCH: usize = 512;

/// A model folder's `manifest.json`, checked, with file names resolved
/// against the folder.
#[derive(Clone, Debug, PartialEq)]
pub struct Manifest {
    /// Model name, e.g. `"iris-small"`.
    pub name: String,
    /// Network input window in voxels, `[D, H, W]`; every edge a multiple of
    /// `2^(LEVELS - 1)` = 16.
    pub patch_size: [usize; 3],
    /// Isotropic voxel spacing the model works at, mm.
    pub spacing_mm: f64,
    /// Encoder channels per level, full resolution first.
    pub channels: [usize; LEVELS],
    /// Task-embedding stages, deepest first: stage `s` is
    /// `[tokens, channels[LEVELS - 1 - s]]`, the foreground token last.
    pub stages: Vec<StageShape>,
    /// SHA-256 of the weights, written into every `.irisemb` the model makes.
    pub fingerprint: ModelFingerprint,
    /// The encoder graph (image window to features).
    pub encoder: PathBuf,
    /// The task-encoder graph (features and masks to task embeddings).
    pub task_encoder: PathBuf,
    /// The decoder graph (features and task embeddings to logits).
    pub decoder: PathBuf,
    /// The memory bank (`.irisemb`) shipped with the model, if any.
    pub memory_bank: Option<PathBuf>,
    /// Most classes the decoder should see in one run, chosen when the
    /// model is exported (at most the classes of a training episode; 1 when
    /// the model does not keep the classes of one run apart). The engine
    /// decodes a larger task in groups of this many (as the released code's
    /// `--max-classes-per-forward`); `None`: all classes in one run.
    pub classes_per_forward: Option<usize>,
    /// Where imported weights came from (`iris-train import`); `None` for a
    /// model exported from its own training.
    pub source: Option<WeightsSource>,
}

/// `manifest.json` as stored: what the exporter writes and the engine
/// parses before checking it into a [`Manifest`].
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct ManifestFile {
    /// Always [`FORMAT`].
    pub format: String,
    /// [`FORMAT_VERSION`] when written.
    pub format_version: u32,
    /// Model name.
    pub name: String,
    /// Window `[D, H, W]` in voxels.
    pub patch_size: [usize; 3],
    /// Isotropic spacing, mm.
    pub spacing_mm: f64,
    /// Encoder channels per level, full resolution first.
    pub channels: [usize; LEVELS],
    /// Task-embedding stages, deepest first.
    pub stages: Vec<StageEntry>,
    /// Weights fingerprint, 64 hex digits.
    pub fingerprint: String,
    /// The graph files, relative to the folder.
    pub graphs: GraphFiles,
    /// The memory bank file, relative to the folder.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub memory_bank: Option<String>,
    /// See [`Manifest::classes_per_forward`]; absent: all in one run.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub classes_per_forward: Option<usize>,
    /// See [`Manifest::source`].
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub source: Option<WeightsSource>,
    /// The exporter's model configuration (iris-train's `IrisConfig`), kept
    /// as written so that a model folder says how it was built; the engine
    /// does not read it.
    #[serde(default, skip_serializing_if = "serde_json::Value::is_null")]
    pub config: serde_json::Value,
    /// The ONNX opset of the graphs.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub opset: Option<i64>,
}

/// One task-embedding stage of a [`ManifestFile`]: `[tokens, channels]`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct StageEntry {
    /// Tokens per class (query tokens, then the foreground token).
    pub tokens: u32,
    /// Channels per token.
    pub channels: u32,
}

/// The graph files of a [`ManifestFile`].
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct GraphFiles {
    /// Image window to features.
    pub encoder: String,
    /// Features and masks to task embeddings.
    pub task_encoder: String,
    /// Features and task embeddings to logits.
    pub decoder: String,
}

/// Where a model's imported weights came from.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct WeightsSource {
    /// The checkpoint's file name, e.g. `mass_base.pth`.
    pub file: String,
    /// SHA-256 of the checkpoint file, 64 lowercase hex digits.
    pub sha256: String,
    /// The checkpoint entry the weights were read from (`ema_model`,
    /// `model`...), or `state_dict` for a bare state_dict.
    pub weights: String,
}

impl From<StageShape> for StageEntry {
    fn from(shape: StageShape) -> Self {
        StageEntry {
            tokens: shape.tokens,
            channels: shape.channels,
        }
    }
}

impl ManifestFile {
    /// Parses manifest JSON (no checks beyond the JSON's shape).
    ///
    /// # Errors
    /// A sentence naming what does not parse.
    pub fn parse(text: &str) -> core::result::Result<ManifestFile, String> {
        serde_json::from_str(text).map_err(|e| format!("invalid manifest: {e}"))
    }

    /// The JSON written to `manifest.json`: keys sorted, two-space
    /// indentation, a final newline.
    pub fn to_json(&self) -> String {
        // Through `Value`, whose map sorts its keys.
        let value = serde_json::to_value(self).unwrap_or_default();
        serde_json::to_string_pretty(&value).unwrap_or_default() + "\n"
    }
}

impl Manifest {
    /// Reads and checks `dir/manifest.json`; file names are resolved
    /// against `dir`.
    ///
    /// Checked: the format and version; a patch of 16 to [`MAX_PATCH`]
    /// voxels per axis, each a multiple of 16; a finite positive spacing;
    /// non-zero channels; 1 to [`LEVELS`] stages, all with the same token
    /// count (at least 2) and stage `s` with `channels[LEVELS - 1 - s]`
    /// channels; a 64-digit hex fingerprint; graph and bank names that are
    /// relative paths inside the folder. The files themselves are not opened.
    ///
    /// # Errors
    /// [`Error::Io`] if it cannot be read; [`Error::Model`] naming the file
    /// for JSON that does not parse or a field that breaks the contract,
    /// with the field, what was expected and what was found.
    pub fn read(dir: &Path) -> Result<Manifest> {
        use std::io::Read;
        let path = dir.join(MANIFEST_FILE);
        let io = |source| Error::Io {
            path: path.clone(),
            source,
        };
        // One byte more than allowed, so that `parse` sees a file too large.
        let mut text = String::new();
        std::fs::File::open(&path)
            .map_err(io)?
            .take(MAX_MANIFEST_BYTES as u64 + 1)
            .read_to_string(&mut text)
            .map_err(io)?;
        Manifest::parse(&text, dir).map_err(|reason| Error::Model { path, reason })
    }

    /// Parses manifest JSON as [`Manifest::read`] describes; the error is
    /// a sentence naming the field.
    pub(crate) fn parse(text: &str, dir: &Path) -> core::result::Result<Manifest, String> {
        if text.len() > MAX_MANIFEST_BYTES {
            return Err(format!(
                "more than {MAX_MANIFEST_BYTES} bytes: not a manifest (a real one is about 1 KB)"
            ));
        }
        let raw = ManifestFile::parse(text)?;
        if raw.format != FORMAT {
            return Err(format!(
                "`format` is {:?}, expected {FORMAT:?}: not an iris model manifest",
                raw.format
            ));
        }
        if raw.format_version == 0 || raw.format_version > FORMAT_VERSION {
            return Err(format!(
                "`format_version` {} is not supported (this engine reads version {FORMAT_VERSION})",
                raw.format_version
            ));
        }
        let unit = 1 << (LEVELS - 1);
        if raw
            .patch_size
            .iter()
            .any(|&p| p < unit || p > MAX_PATCH || p % unit != 0)
        {
            return Err(format!(
                "`patch_size` {:?}: every edge must be a multiple of {unit} between {unit} and \
                 {MAX_PATCH} voxels",
                raw.patch_size
            ));
        }
        checked_voxel_count(raw.patch_size).map_err(|e| format!("`patch_size`: {e}"))?;
        if !(raw.spacing_mm.is_finite() && raw.spacing_mm > 0.0) {
            return Err(format!(
                "`spacing_mm` {} must be a positive number of millimetres",
                raw.spacing_mm
            ));
        }
        if raw.channels.contains(&0) {
            return Err(format!("`channels` {:?} has a zero entry", raw.channels));
        }
        let stages = check_stages(&raw.stages, &raw.channels)?;
        if raw.classes_per_forward == Some(0) {
            return Err("`classes_per_forward` must be at least 1".into());
        }
        let fingerprint = ModelFingerprint::from_hex(&raw.fingerprint)
            .map_err(|e| format!("`fingerprint`: {e}"))?;
        let file = |field: &str, name: &str| -> core::result::Result<PathBuf, String> {
            let relative = Path::new(name);
            let inside = !name.is_empty()
                && relative
                    .components()
                    .all(|c| matches!(c, Component::Normal(_)));
            if inside {
                Ok(dir.join(relative))
            } else {
                Err(format!(
                    "`{field}` {name:?} must be a file name inside the model folder"
                ))
            }
        };
        Ok(Manifest {
            name: raw.name,
            patch_size: raw.patch_size,
            spacing_mm: raw.spacing_mm,
            channels: raw.channels,
            stages,
            fingerprint,
            encoder: file("graphs.encoder", &raw.graphs.encoder)?,
            task_encoder: file("graphs.task_encoder", &raw.graphs.task_encoder)?,
            decoder: file("graphs.decoder", &raw.graphs.decoder)?,
            memory_bank: raw
                .memory_bank
                .as_deref()
                .map(|name| file("memory_bank", name))
                .transpose()?,
            classes_per_forward: raw.classes_per_forward,
            source: raw.source,
        })
    }

    /// Spatial size of feature level `level`, `[D, H, W] / 2^level`.
    pub fn level_shape(&self, level: usize) -> [usize; 3] {
        self.patch_size.map(|p| p >> level)
    }

    /// The first encoder level the task encoder reads: `LEVELS - stages`.
    pub fn first_task_level(&self) -> usize {
        LEVELS - self.stages.len()
    }
}

fn check_stages(
    raw: &[StageEntry],
    channels: &[usize; LEVELS],
) -> core::result::Result<Vec<StageShape>, String> {
    if raw.is_empty() || raw.len() > LEVELS.min(MAX_STAGES) {
        return Err(format!(
            "`stages` has {} entries, expected 1 to {LEVELS}",
            raw.len()
        ));
    }
    let tokens = raw[0].tokens;
    let mut stages = Vec::with_capacity(raw.len());
    for (s, stage) in raw.iter().enumerate() {
        let level = LEVELS - 1 - s;
        if stage.tokens != tokens || tokens < 2 {
            return Err(format!(
                "`stages[{s}].tokens` is {}: every stage needs the same number of tokens, \
                 at least 2 (query tokens then the foreground token), found {tokens} in stage 0",
                stage.tokens
            ));
        }
        if stage.channels as usize != channels[level] {
            return Err(format!(
                "`stages[{s}].channels` is {}, expected {} (`channels[{level}]`: stages run \
                 from the deepest level up)",
                stage.channels, channels[level]
            ));
        }
        let shape = StageShape {
            tokens: stage.tokens,
            channels: stage.channels,
        };
        shape
            .value_count()
            .map_err(|e| format!("`stages[{s}]`: {e}"))?;
        stages.push(shape);
    }
    Ok(stages)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn json(edit: impl FnOnce(&mut serde_json::Value)) -> String {
        let mut v = serde_json::json!({
            "format": "iris-model",
            "format_version": 1,
            "name": "iris-tiny",
            "config": {"channels": [4, 8, 8, 16, 16]},
            "patch_size": [32, 32, 48],
            "spacing_mm": 3.0,
            "channels": [4, 8, 8, 16, 16],
            "stages": [
                {"tokens": 3, "channels": 16},
                {"tokens": 3, "channels": 16},
                {"tokens": 3, "channels": 8}
            ],
            "fingerprint": "ab".repeat(32),
            "opset": 17,
            "graphs": {"encoder": "encoder.onnx", "task_encoder": "task_encoder.onnx", "decoder": "decoder.onnx"},
            "memory_bank": "memory_bank.irisemb"
        });
        edit(&mut v);
        v.to_string()
    }

    fn parse(edit: impl FnOnce(&mut serde_json::Value)) -> core::result::Result<Manifest, String> {
        Manifest::parse(&json(edit), Path::new("/models/tiny"))
    }

    #[test]
    fn reads_the_contract_example() {
        let m = parse(|_| {}).expect("valid");
        assert_eq!(m.name, "iris-tiny");
        assert_eq!(m.patch_size, [32, 32, 48]);
        assert_eq!(m.level_shape(4), [2, 2, 3]);
        assert_eq!(m.first_task_level(), 2);
        assert_eq!(
            m.stages[2],
            StageShape {
                tokens: 3,
                channels: 8
            }
        );
        assert_eq!(m.fingerprint.as_bytes(), &[0xab; 32]);
        assert_eq!(m.decoder, Path::new("/models/tiny/decoder.onnx"));
        assert_eq!(
            m.memory_bank.as_deref(),
            Some(Path::new("/models/tiny/memory_bank.irisemb"))
        );
        let no_bank = parse(|v| {
            v.as_object_mut().map(|o| o.remove("memory_bank"));
        })
        .expect("valid");
        assert_eq!(no_bank.memory_bank, None);
    }

    #[test]
    fn names_the_broken_field() {
        type Edit = Box<dyn FnOnce(&mut serde_json::Value)>;
        let cases: [(&str, Edit); 11] = [
            ("`format`", Box::new(|v| v["format"] = "onnx".into())),
            (
                "`format_version` 2",
                Box::new(|v| v["format_version"] = 2.into()),
            ),
            (
                "`patch_size` [32, 32, 40]",
                Box::new(|v| v["patch_size"] = serde_json::json!([32, 32, 40])),
            ),
            (
                "`patch_size` [1024",
                Box::new(|v| v["patch_size"] = serde_json::json!([1024, 32, 32])),
            ),
            (
                "`spacing_mm`",
                Box::new(|v| v["spacing_mm"] = (-1.0).into()),
            ),
            (
                "`channels`",
                Box::new(|v| v["channels"] = serde_json::json!([4, 0, 8, 16, 16])),
            ),
            (
                "`stages[2].channels` is 8, expected 16",
                Box::new(|v| v["channels"] = serde_json::json!([4, 8, 16, 16, 16])),
            ),
            (
                "`stages[1].tokens`",
                Box::new(|v| v["stages"][1]["tokens"] = 4.into()),
            ),
            (
                "`fingerprint`",
                Box::new(|v| v["fingerprint"] = "abc".into()),
            ),
            (
                "`graphs.decoder` \"../decoder.onnx\"",
                Box::new(|v| v["graphs"]["decoder"] = "../decoder.onnx".into()),
            ),
            (
                "missing field `graphs`",
                Box::new(|v| {
                    v.as_object_mut().map(|o| o.remove("graphs"));
                }),
            ),
        ];
        for (needle, edit) in cases {
            let err = parse(edit).expect_err(needle);
            assert!(err.contains(needle), "{needle:?} not in {err:?}");
        }
        let err = Manifest::parse("{not json", Path::new(".")).expect_err("not JSON");
        assert!(err.starts_with("invalid manifest"), "{err}");
    }

    #[test]
    fn a_written_manifest_reads_back_with_its_source() {
        let mut file = ManifestFile::parse(&json(|_| {})).expect("parses");
        file.classes_per_forward = None;
        file.source = Some(WeightsSource {
            file: "mass_base.pth".into(),
            sha256: "0f".repeat(32),
            weights: "ema_model".into(),
        });
        let text = file.to_json();
        assert!(text.ends_with("}\n"));
        let keys: Vec<&str> = text
            .lines()
            .filter(|line| line.starts_with("  \""))
            .filter_map(|line| line.trim().split('"').nth(1))
            .collect();
        let mut sorted = keys.clone();
        sorted.sort_unstable();
        assert_eq!(keys, sorted, "top-level keys are written sorted");
        assert!(
            !keys.contains(&"classes_per_forward"),
            "absent: all in one run"
        );
        assert_eq!(ManifestFile::parse(&text).expect("reparses"), file);
        let checked = Manifest::parse(&text, Path::new("/m")).expect("valid");
        assert_eq!(checked.source, file.source);
        assert_eq!(checked.classes_per_forward, None);
    }

    #[test]
    fn read_names_the_file() {
        let dir = std::env::temp_dir().join(format!("iris-manifest-{}", std::process::id()));
        std::fs::create_dir_all(&dir).expect("temp dir");
        let missing = Manifest::read(&dir).expect_err("no manifest");
        assert!(matches!(missing, Error::Io { .. }), "{missing}");
        std::fs::write(
            dir.join("manifest.json"),
            json(|v| v["format"] = "x".into()),
        )
        .expect("write");
        let bad = Manifest::read(&dir).expect_err("bad format");
        let text = bad.to_string();
        std::fs::remove_dir_all(&dir).ok();
        assert!(matches!(bad, Error::Model { .. }));
        assert!(text.contains("manifest.json: `format`"), "{text}");
    }

    #[test]
    fn a_huge_or_endless_manifest_is_refused_unread() {
        // A valid manifest padded with JSON whitespace: parses at the limit,
        // refused one byte over it.
        let valid = json(|_| {});
        let at_limit = format!("{valid}{}", " ".repeat(MAX_MANIFEST_BYTES - valid.len()));
        assert!(Manifest::parse(&at_limit, Path::new("/m")).is_ok());
        let over = format!("{at_limit} ");
        let err = Manifest::parse(&over, Path::new("/m")).expect_err("too large");
        assert!(err.contains("more than 1048576 bytes"), "{err}");

        let dir = std::env::temp_dir().join(format!("iris-manifest-big-{}", std::process::id()));
        std::fs::create_dir_all(&dir).expect("temp dir");
        std::fs::write(dir.join("manifest.json"), &over).expect("write");
        let big = Manifest::read(&dir).expect_err("too large").to_string();
        #[cfg(unix)]
        let endless = {
            std::fs::remove_file(dir.join("manifest.json")).expect("remove");
            std::os::unix::fs::symlink("/dev/zero", dir.join("manifest.json")).expect("link");
            Manifest::read(&dir).expect_err("endless").to_string()
        };
        std::fs::remove_dir_all(&dir).ok();
        assert!(big.contains("manifest.json: more than"), "{big}");
        #[cfg(unix)]
        assert!(endless.contains("manifest.json: more than"), "{endless}");
    }
}
