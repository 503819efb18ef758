//! A model folder of known maths, to test programs that embed the engine
//! without a trained model (feature `testing`): [`SyntheticModel`] writes a
//! manifest and three small ONNX graphs that obey the graph contract (names,
//! symbolic `batch` and `classes`, fixed spatial sizes) and compute simple
//! functions, so that every output can be worked out by hand.
//!
//! With `x` the normalised window, `P_n` average pooling by `n`, `c_i` the
//! per-level channel scales, `W_s` the per-stage token matrices:
//! - encoder: `features_i = P_{2^i}(x) * c_i` (channel `j` scaled by `c_i[j]`);
//! - task encoder: `m_k = mean(mask_k)`, `f = mean(features_2^2)` over all
//!   channels and voxels, `task_s[k] = (m_k + f) * W_s`;
//! - decoder: `g = mean_j(features_0)`, `t_k = mean(task_0[k])`,
//!   `logits_k = 1 - 4 (g - t_k)^2`, so class `k` wins where
//!   `|g - t_k| <= 0.5` (a band of intensities per class).
//!
//! ```
//! use iris_core::engine::Model;
//! use iris_core::engine::testing::SyntheticModel;
//!
//! let dir = std::env::temp_dir().join(format!("iris-synthetic-doc-{}", std::process::id()));
//! let synthetic = SyntheticModel::new(6.0, 0x5a);
//! synthetic.write(&dir)?;
//! let model = Model::load(&dir)?;
//! assert_eq!(model.fingerprint().to_string(), synthetic.fingerprint);
//! # std::fs::remove_dir_all(&dir).ok();
//! # Ok::<(), iris_core::Error>(())
//! ```

// This crate is `no_std`; the engine is `std` code.
use std::prelude::rust_2024::*;
use std::{format, vec};

use std::path::Path;

use prost::Message;
use tract_onnx::pb::{
    AttributeProto, GraphProto, ModelProto, NodeProto, OperatorSetIdProto, TensorProto,
    TensorShapeProto, TypeProto, ValueInfoProto, attribute_proto::AttributeType,
    tensor_proto::DataType, tensor_shape_proto::Dimension, tensor_shape_proto::dimension,
    type_proto,
};

use super::{FORMAT, FORMAT_VERSION, GraphFiles, LEVELS, MANIFEST_FILE, ManifestFile, StageEntry};
use crate::error::{Error, Result};

/// A graph dimension: symbolic (`"batch"`, `"classes"`) or fixed.
#[derive(Clone, Copy)]
pub(crate) enum D {
    Sym(&'static str),
    N(usize),
}

/// Builds one ONNX graph node by node.
#[derive(Default)]
pub(crate) struct OnnxGraph {
    graph: GraphProto,
    next: usize,
}

fn value_info(name: &str, dims: &[D]) -> ValueInfoProto {
    let dim = dims
        .iter()
        .map(|d| Dimension {
            denotation: String::new(),
            value: Some(match *d {
                D::Sym(s) => dimension::Value::DimParam(s.into()),
                D::N(n) => dimension::Value::DimValue(n as i64),
            }),
        })
        .collect();
    ValueInfoProto {
        name: name.into(),
        r#type: Some(TypeProto {
            denotation: String::new(),
            value: Some(type_proto::Value::TensorType(type_proto::Tensor {
                elem_type: DataType::Float as i32,
                shape: Some(TensorShapeProto { dim }),
            })),
        }),
        doc_string: String::new(),
    }
}

/// An integer-list attribute.
pub(crate) fn ints(name: &str, values: &[i64]) -> AttributeProto {
    AttributeProto {
        name: name.into(),
        r#type: AttributeType::Ints as i32,
        ints: values.to_vec(),
        ..AttributeProto::default()
    }
}

/// An integer attribute.
pub(crate) fn int(name: &str, value: i64) -> AttributeProto {
    AttributeProto {
        name: name.into(),
        r#type: AttributeType::Int as i32,
        i: value,
        ..AttributeProto::default()
    }
}

impl OnnxGraph {
    /// A graph input called `name`.
    pub(crate) fn input(&mut self, name: &str, dims: &[D]) -> String {
        self.graph.input.push(value_info(name, dims));
        name.into()
    }

    /// Exposes `from` as the graph output `name`.
    pub(crate) fn output(&mut self, from: &str, name: &str, dims: &[D]) {
        self.op_to("Identity", &[from], vec![], name);
        self.graph.output.push(value_info(name, dims));
    }

    /// An f32 initializer of shape `dims`.
    pub(crate) fn constant(&mut self, values: &[f32], dims: &[usize]) -> String {
        let name = self.fresh("const");
        self.graph.initializer.push(TensorProto {
            dims: dims.iter().map(|&d| d as i64).collect(),
            data_type: DataType::Float as i32,
            float_data: values.to_vec(),
            name: name.clone(),
            ..TensorProto::default()
        });
        name
    }

    /// An int64 initializer (1-D).
    pub(crate) fn int64s(&mut self, values: &[i64]) -> String {
        let name = self.fresh("ints");
        self.graph.initializer.push(TensorProto {
            dims: vec![values.len() as i64],
            data_type: DataType::Int64 as i32,
            int64_data: values.to_vec(),
            name: name.clone(),
            ..TensorProto::default()
        });
        name
    }

    /// Node `op` on `inputs`; returns its output's name.
    pub(crate) fn op(&mut self, op: &str, inputs: &[&str], attrs: Vec<AttributeProto>) -> String {
        let out = self.fresh(op);
        self.op_to(op, inputs, attrs, &out);
        out
    }

    fn op_to(&mut self, op: &str, inputs: &[&str], attrs: Vec<AttributeProto>, out: &str) {
        let name = self.fresh("node");
        self.graph.node.push(NodeProto {
            input: inputs.iter().map(|s| s.to_string()).collect(),
            output: vec![out.into()],
            name,
            op_type: op.into(),
            attribute: attrs,
            ..NodeProto::default()
        });
    }

    fn fresh(&mut self, prefix: &str) -> String {
        self.next += 1;
        format!("{prefix}_{}", self.next)
    }

    /// Writes the graph as an ONNX model (opset 17) to `path`.
    fn save(self, path: &Path) -> Result<()> {
        write(path, &self.into_bytes())
    }

    /// The graph as the bytes of an ONNX model (opset 17).
    pub(crate) fn into_bytes(mut self) -> Vec<u8> {
        self.graph.name = "synthetic".into();
        let model = ModelProto {
            ir_version: 8,
            opset_import: vec![OperatorSetIdProto {
                domain: String::new(),
                version: 17,
            }],
            producer_name: "iris-core tests".into(),
            graph: Some(self.graph),
            ..ModelProto::default()
        };
        model.encode_to_vec()
    }
}

/// `path` <- `bytes`, an error naming the file if that fails.
fn write(path: &Path, bytes: &[u8]) -> Result<()> {
    std::fs::write(path, bytes).map_err(|source| Error::Io {
        path: path.to_path_buf(),
        source,
    })
}

/// The synthetic model's parameters (see the [module docs](self)).
#[derive(Clone, Debug)]
pub struct SyntheticModel {
    /// The manifest's `name`.
    pub name: String,
    /// The window, `[D, H, W]` voxels.
    pub patch: [usize; 3],
    /// The model's isotropic spacing.
    pub spacing_mm: f64,
    /// Channels of the five feature levels.
    pub channels: [usize; LEVELS],
    /// Tokens per class and stage.
    pub tokens: usize,
    /// Task stages (the deepest levels).
    pub stages: usize,
    /// `c_i`, `channels[i]` values per level.
    pub scales: Vec<Vec<f32>>,
    /// `W_s`, `tokens * channels[LEVELS - 1 - s]` values per stage.
    pub tokens_init: Vec<Vec<f32>>,
    /// 64 hex digits.
    pub fingerprint: String,
}

impl SyntheticModel {
    /// A tiny model: patch 16^3 at `spacing_mm`, 3 stages of 3 tokens, its
    /// fingerprint 32 bytes of `fingerprint_byte`.
    pub fn new(spacing_mm: f64, fingerprint_byte: u8) -> SyntheticModel {
        let channels = [2, 3, 4, 3, 2];
        let tokens = 3;
        let stages = 3;
        let scales = channels
            .iter()
            .enumerate()
            .map(|(i, &c)| (0..c).map(|j| 0.5 + 0.25 * (i + j) as f32).collect())
            .collect();
        let tokens_init = (0..stages)
            .map(|s| {
                let c = channels[LEVELS - 1 - s];
                (0..tokens * c)
                    .map(|i| 1.0 + 0.1 * ((i * 7 + s) % 5) as f32)
                    .collect()
            })
            .collect();
        SyntheticModel {
            name: "synthetic".into(),
            patch: [16, 16, 16],
            spacing_mm,
            channels,
            tokens,
            stages,
            scales,
            tokens_init,
            fingerprint: format!("{fingerprint_byte:02x}").repeat(32),
        }
    }

    fn level_dims(&self, i: usize, batch_second: D) -> Vec<D> {
        let [d, h, w] = self.patch.map(|p| p >> i);
        vec![D::Sym("batch"), batch_second, D::N(d), D::N(h), D::N(w)]
    }

    fn task_dims(&self, s: usize) -> Vec<D> {
        vec![
            D::Sym("batch"),
            D::Sym("classes"),
            D::N(self.tokens),
            D::N(self.channels[LEVELS - 1 - s]),
        ]
    }

    /// Writes `manifest.json` and the three graphs into `dir` (created if
    /// needed).
    ///
    /// # Errors
    /// [`Error::Io`] naming the folder or file that cannot be written.
    pub fn write(&self, dir: &Path) -> Result<()> {
        std::fs::create_dir_all(dir).map_err(|source| Error::Io {
            path: dir.to_path_buf(),
            source,
        })?;
        let manifest = ManifestFile {
            format: FORMAT.into(),
            format_version: FORMAT_VERSION,
            name: self.name.clone(),
            patch_size: self.patch,
            spacing_mm: self.spacing_mm,
            channels: self.channels,
            stages: (0..self.stages)
                .map(|s| StageEntry {
                    tokens: self.tokens as u32,
                    channels: self.channels[LEVELS - 1 - s] as u32,
                })
                .collect(),
            fingerprint: self.fingerprint.clone(),
            graphs: GraphFiles {
                encoder: "encoder.onnx".into(),
                task_encoder: "task_encoder.onnx".into(),
                decoder: "decoder.onnx".into(),
            },
            memory_bank: None,
            classes_per_forward: None,
            source: None,
            config: serde_json::Value::Null,
            opset: Some(17),
        };
        write(&dir.join(MANIFEST_FILE), manifest.to_json().as_bytes())?;
        self.encoder().save(&dir.join("encoder.onnx"))?;
        self.task_encoder().save(&dir.join("task_encoder.onnx"))?;
        self.decoder().save(&dir.join("decoder.onnx"))
    }

    fn encoder(&self) -> OnnxGraph {
        let mut g = OnnxGraph::default();
        let image = g.input("image", &self.level_dims(0, D::N(1)));
        for i in 0..LEVELS {
            let pooled = if i == 0 {
                image.clone()
            } else {
                let k = 1i64 << i;
                g.op(
                    "AveragePool",
                    &[&image],
                    vec![ints("kernel_shape", &[k; 3]), ints("strides", &[k; 3])],
                )
            };
            let scale = g.constant(&self.scales[i], &[1, self.channels[i], 1, 1, 1]);
            let out = g.op("Mul", &[&pooled, &scale], vec![]);
            let dims = self.level_dims(i, D::N(self.channels[i]));
            g.output(&out, &format!("features_{i}"), &dims);
        }
        g
    }

    fn task_encoder(&self) -> OnnxGraph {
        let mut g = OnnxGraph::default();
        let first = LEVELS - self.stages;
        let levels: Vec<String> = (first..LEVELS)
            .map(|i| {
                let dims = self.level_dims(i, D::N(self.channels[i]));
                g.input(&format!("features_{i}"), &dims)
            })
            .collect();
        let masks = g.input("masks", &self.level_dims(0, D::Sym("classes")));
        let axis4 = g.int64s(&[4]);
        let m = g.op(
            "ReduceMean",
            &[&masks],
            vec![ints("axes", &[2, 3, 4]), int("keepdims", 1)],
        );
        let m = g.op("Squeeze", &[&m, &axis4], vec![]);
        let f2 = &levels[2 - first];
        let sq = g.op("Mul", &[f2, f2], vec![]);
        let f = g.op(
            "ReduceMean",
            &[&sq],
            vec![ints("axes", &[1, 2, 3, 4]), int("keepdims", 1)],
        );
        let f = g.op("Squeeze", &[&f, &axis4], vec![]);
        let mf = g.op("Add", &[&m, &f], vec![]);
        for s in 0..self.stages {
            let c = self.channels[LEVELS - 1 - s];
            let w = g.constant(&self.tokens_init[s], &[1, 1, self.tokens, c]);
            let out = g.op("Mul", &[&mf, &w], vec![]);
            g.output(&out, &format!("task_{s}"), &self.task_dims(s));
        }
        g
    }

    fn decoder(&self) -> OnnxGraph {
        let mut g = OnnxGraph::default();
        let levels: Vec<String> = (0..LEVELS)
            .map(|i| {
                let dims = self.level_dims(i, D::N(self.channels[i]));
                g.input(&format!("features_{i}"), &dims)
            })
            .collect();
        let tasks: Vec<String> = (0..self.stages)
            .map(|s| g.input(&format!("task_{s}"), &self.task_dims(s)))
            .collect();
        let gmean = g.op(
            "ReduceMean",
            &[&levels[0]],
            vec![ints("axes", &[1]), int("keepdims", 1)],
        );
        let t = g.op(
            "ReduceMean",
            &[&tasks[0]],
            vec![ints("axes", &[2, 3]), int("keepdims", 1)],
        );
        let axis4 = g.int64s(&[4]);
        let t = g.op("Unsqueeze", &[&t, &axis4], vec![]);
        let diff = g.op("Sub", &[&gmean, &t], vec![]);
        let sq = g.op("Mul", &[&diff, &diff], vec![]);
        let four = g.constant(&[4.0], &[1]);
        let one = g.constant(&[1.0], &[1]);
        let scaled = g.op("Mul", &[&sq, &four], vec![]);
        let logits = g.op("Sub", &[&one, &scaled], vec![]);
        g.output(&logits, "logits", &self.level_dims(0, D::Sym("classes")));
        g
    }

    /// `mean(c_0)`: the decoder's `g` is this times the window.
    pub fn mean_scale0(&self) -> f32 {
        self.scales[0].iter().sum::<f32>() / self.scales[0].len() as f32
    }

    /// The decoder's logits for one window and the per-class `t_k`, as the
    /// graph computes them (`[K, D, H, W]`, C order).
    pub fn logits(&self, window: &[f32], t: &[f32]) -> Vec<f32> {
        let a = self.mean_scale0();
        t.iter()
            .flat_map(|&tk| {
                window.iter().map(move |&x| {
                    let d = a * x - tk;
                    1.0 - 4.0 * d * d
                })
            })
            .collect()
    }
}
