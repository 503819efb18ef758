//! A small builder of ONNX graphs: named inputs and outputs, `f32` and
//! `i64` initializers, and nodes whose single output gets a unique name.
//!
//! Values are referred to by name (`String`), as in ONNX itself.

use std::collections::{HashMap, HashSet};

use burn::prelude::*;
use tract_onnx::pb::attribute_proto::AttributeType;
use tract_onnx::pb::tensor_proto::DataType;
use tract_onnx::pb::tensor_shape_proto::{Dimension, dimension};
use tract_onnx::pb::type_proto;
use tract_onnx::pb::{
    AttributeProto, GraphProto, ModelProto, NodeProto, OperatorSetIdProto, TensorProto,
    TensorShapeProto, TypeProto, ValueInfoProto,
};

use crate::Error;

/// The ONNX operator set the graphs use.
pub const OPSET: i64 = 17;
/// ONNX IR version 8 is the one of opsets 15 to 18.
const IR_VERSION: i64 = 8;

/// One dimension of a graph input or output.
#[derive(Clone, Copy, Debug)]
pub(crate) enum Dim {
    /// A size fixed in the graph.
    Fixed(usize),
    /// A symbolic size (`"batch"`, `"classes"`), set when the graph runs.
    Named(&'static str),
}

/// An ONNX graph under construction.
pub(crate) struct Graph {
    name: String,
    nodes: Vec<NodeProto>,
    initializers: Vec<TensorProto>,
    inputs: Vec<ValueInfoProto>,
    outputs: Vec<ValueInfoProto>,
    /// Every value name used so far.
    taken: HashSet<String>,
    /// Scalar `f32` initializers made so far, by bit pattern.
    scalars: HashMap<u32, String>,
}

/// An `i64`, as ONNX stores sizes and axes.
pub(crate) fn int(value: usize) -> i64 {
    value as i64
}

impl Graph {
    pub fn new(name: &str) -> Self {
        Graph {
            name: name.to_string(),
            nodes: Vec::new(),
            initializers: Vec::new(),
            inputs: Vec::new(),
            outputs: Vec::new(),
            taken: HashSet::new(),
            scalars: HashMap::new(),
        }
    }

    /// `hint`, or `hint_2`, `hint_3`... if it is taken; marks it taken.
    fn unique(&mut self, hint: &str) -> String {
        let mut name = hint.to_string();
        let mut n = 1;
        while self.taken.contains(&name) {
            n += 1;
            name = format!("{hint}_{n}");
        }
        self.taken.insert(name.clone());
        name
    }

    /// Declares an `f32` graph input of shape `dims`.
    pub fn input(&mut self, name: &str, dims: &[Dim]) -> String {
        let name = self.unique(name);
        self.inputs.push(value_info(&name, dims));
        name
    }

    /// Publishes `value` as the `f32` graph output `name` of shape `dims`.
    pub fn output(&mut self, value: &str, name: &str, dims: &[Dim]) {
        let name = self.unique(name);
        self.nodes.push(NodeProto {
            input: vec![value.to_string()],
            output: vec![name.clone()],
            name: format!("{name}_identity"),
            op_type: "Identity".into(),
            ..NodeProto::default()
        });
        self.outputs.push(value_info(&name, dims));
    }

    /// An `f32` initializer holding `values` (row-major) of shape `dims`.
    pub fn constant(&mut self, name: &str, dims: &[usize], values: &[f32]) -> String {
        let name = self.unique(name);
        self.initializers.push(TensorProto {
            dims: dims.iter().map(|&d| int(d)).collect(),
            data_type: DataType::Float as i32,
            raw_data: values.iter().flat_map(|v| v.to_le_bytes()).collect(),
            name: name.clone(),
            ..TensorProto::default()
        });
        name
    }

    /// A scalar `f32` initializer (made once per value).
    pub fn scalar(&mut self, value: f32) -> String {
        if let Some(name) = self.scalars.get(&value.to_bits()) {
            return name.clone();
        }
        let name = self.constant("scalar", &[], &[value]);
        self.scalars.insert(value.to_bits(), name.clone());
        name
    }

    /// An `f32` initializer holding a model parameter (any float dtype is
    /// converted to `f32`).
    pub fn weight<const D: usize>(
        &mut self,
        name: &str,
        tensor: Tensor<D>,
    ) -> Result<String, Error> {
        let dims = tensor.dims();
        let values = tensor
            .into_data()
            .try_into_vec_as::<f32>()
            .map_err(|e| Error::Export {
                what: format!("parameter {name}"),
                reason: format!("cannot be read as f32: {e:?}"),
            })?;
        Ok(self.constant(name, &dims, &values))
    }

    /// A 1-D `i64` initializer (shapes, axes), or a scalar when `scalar`.
    fn int_constant(&mut self, name: &str, values: &[i64], scalar: bool) -> String {
        let name = self.unique(name);
        self.initializers.push(TensorProto {
            dims: if scalar {
                Vec::new()
            } else {
                vec![int(values.len())]
            },
            data_type: DataType::Int64 as i32,
            raw_data: values.iter().flat_map(|v| v.to_le_bytes()).collect(),
            name: name.clone(),
            ..TensorProto::default()
        });
        name
    }

    /// A 1-D `i64` initializer: a shape or a list of axes.
    pub fn ints(&mut self, name: &str, values: &[i64]) -> String {
        self.int_constant(name, values, false)
    }

    /// A scalar `i64` initializer (an index).
    pub fn scalar_int(&mut self, name: &str, value: i64) -> String {
        self.int_constant(name, &[value], true)
    }

    /// Appends a node `op_type(inputs)` with `attributes` and returns the
    /// name of its (single) output.
    pub fn op(
        &mut self,
        op_type: &str,
        inputs: &[&str],
        attributes: Vec<AttributeProto>,
    ) -> String {
        let output = self.unique(&op_type.to_lowercase());
        self.nodes.push(NodeProto {
            input: inputs.iter().map(|s| s.to_string()).collect(),
            output: vec![output.clone()],
            name: output.clone(),
            op_type: op_type.to_string(),
            attribute: attributes,
            ..NodeProto::default()
        });
        output
    }

    /// The finished model: this graph, opset 17.
    pub fn into_model(self) -> ModelProto {
        ModelProto {
            ir_version: IR_VERSION,
            opset_import: vec![OperatorSetIdProto {
                domain: String::new(),
                version: OPSET,
            }],
            producer_name: "iris-train".into(),
            producer_version: env!("CARGO_PKG_VERSION").into(),
            graph: Some(GraphProto {
                node: self.nodes,
                name: self.name,
                initializer: self.initializers,
                input: self.inputs,
                output: self.outputs,
                ..GraphProto::default()
            }),
            ..ModelProto::default()
        }
    }
}

/// An `f32` tensor value of shape `dims`.
fn value_info(name: &str, dims: &[Dim]) -> ValueInfoProto {
    let dim = dims
        .iter()
        .map(|d| Dimension {
            value: Some(match *d {
                Dim::Fixed(n) => dimension::Value::DimValue(int(n)),
                Dim::Named(s) => dimension::Value::DimParam(s.to_string()),
            }),
            ..Dimension::default()
        })
        .collect();
    ValueInfoProto {
        name: name.to_string(),
        r#type: Some(TypeProto {
            value: Some(type_proto::Value::TensorType(type_proto::Tensor {
                elem_type: DataType::Float as i32,
                shape: Some(TensorShapeProto { dim }),
            })),
            ..TypeProto::default()
        }),
        ..ValueInfoProto::default()
    }
}

/// Integer attribute `name = value`.
pub(crate) fn attr_int(name: &str, value: i64) -> AttributeProto {
    AttributeProto {
        name: name.into(),
        r#type: AttributeType::Int as i32,
        i: value,
        ..AttributeProto::default()
    }
}

/// Integer list attribute `name = values`.
pub(crate) fn attr_ints(name: &str, values: &[i64]) -> AttributeProto {
    AttributeProto {
        name: name.into(),
        r#type: AttributeType::Ints as i32,
        ints: values.to_vec(),
        ..AttributeProto::default()
    }
}

/// Float attribute `name = value`.
pub(crate) fn attr_float(name: &str, value: f32) -> AttributeProto {
    AttributeProto {
        name: name.into(),
        r#type: AttributeType::Float as i32,
        f: value,
        ..AttributeProto::default()
    }
}

/// String attribute `name = value`.
pub(crate) fn attr_string(name: &str, value: &str) -> AttributeProto {
    AttributeProto {
        name: name.into(),
        r#type: AttributeType::String as i32,
        s: value.as_bytes().to_vec(),
        ..AttributeProto::default()
    }
}
