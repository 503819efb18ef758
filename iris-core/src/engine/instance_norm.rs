//! ONNX `InstanceNormalization` as one tract op.
//!
//! tract expands an instance norm into a mean over the spatial axes, a
//! subtraction, a square, a second mean, a reciprocal square root and a
//! multiply-add: six passes over the tensor, the reductions single-threaded
//! and the centred values written out in full (issue 20). [`InstanceNorm`]
//! reads each (sample, channel) plane three times (sum, sum of squared
//! deviations, normalise) and writes it once, the planes in parallel on
//! the model's thread pool. Its sums run in f64 over f32 partial sums of
//! short runs, so its statistics are nearer the exact ones than tract's
//! f32 reductions.

use std::prelude::rust_2024::*;
use std::vec;

use tract_onnx::model::{Onnx, ParsingContext};
use tract_onnx::pb::NodeProto;
use tract_onnx::tract_hir::internal::*;

/// Has `onnx` read `InstanceNormalization` nodes as [`InstanceNorm`].
pub(crate) fn register(onnx: &mut Onnx) {
    onnx.op_register.insert("InstanceNormalization", parse);
}

fn parse(
    _ctx: &ParsingContext,
    node: &NodeProto,
) -> TractResult<(Box<dyn InferenceOp>, Vec<String>)> {
    let epsilon = node.get_attr_opt("epsilon")?.unwrap_or(1e-5);
    Ok((expand(InstanceNorm { epsilon }), vec![]))
}

/// `y = (x - mean) / sqrt(var + epsilon) * scale[c] + bias[c]`, with the
/// mean and (biased) variance of each (sample, channel) plane of
/// `x: [N, C, ...]`. Inputs: `x`, `scale: [C]`, `bias: [C]`.
#[derive(Debug, Clone, PartialEq)]
pub(crate) struct InstanceNorm {
    epsilon: f32,
}

impl Eq for InstanceNorm {}

impl Expansion for InstanceNorm {
    fn name(&self) -> StaticName {
        "IrisInstanceNorm".into()
    }

    fn rules<'r, 'p: 'r, 's: 'r>(
        &'s self,
        s: &mut Solver<'r>,
        inputs: &'p [TensorProxy],
        outputs: &'p [TensorProxy],
    ) -> InferenceResult {
        check_input_arity(inputs, 3)?;
        check_output_arity(outputs, 1)?;
        s.equals(&inputs[0].datum_type, &outputs[0].datum_type)?;
        s.equals(&inputs[0].datum_type, &inputs[1].datum_type)?;
        s.equals(&inputs[0].datum_type, &inputs[2].datum_type)?;
        s.equals(&inputs[1].shape, &inputs[2].shape)?;
        s.equals(&inputs[0].shape, &outputs[0].shape)?;
        s.equals(&inputs[1].shape[0], &inputs[0].shape[1])?;
        Ok(())
    }

    fn wire(
        &self,
        prefix: &str,
        model: &mut TypedModel,
        inputs: &[OutletId],
    ) -> TractResult<TVec<OutletId>> {
        model.wire_node(prefix, self.clone(), inputs)
    }
}

impl Op for InstanceNorm {
    fn name(&self) -> StaticName {
        "IrisInstanceNorm".into()
    }

    fn validation(&self) -> Validation {
        Validation::Rounding
    }

    op_as_typed_op!();
}

impl EvalOp for InstanceNorm {
    op_out_of_plan!();

    fn eval(&self, _ctx: &EvalContext, inputs: TVec<TValue>) -> TractResult<TVec<TValue>> {
        let (x, scale, bias) = (&inputs[0], &inputs[1], &inputs[2]);
        ensure!(
            x.datum_type() == f32::datum_type() && x.rank() >= 3,
            "instance norm: input {:?} {:?}, expected f32 [N, C, ...]",
            x.datum_type(),
            x.shape()
        );
        let channels = x.shape()[1];
        let scale = scale.try_as_plain_ram()?;
        let bias = bias.try_as_plain_ram()?;
        let (scale, bias) = (scale.as_slice::<f32>()?, bias.as_slice::<f32>()?);
        ensure!(
            scale.len() == channels && bias.len() == channels,
            "instance norm: {} scales and {} biases for {channels} channels",
            scale.len(),
            bias.len()
        );
        let plane: usize = x.shape()[2..].iter().product();
        let values = x.try_as_plain_ram()?;
        let values = values.as_slice::<f32>()?;
        let mut out = vec![0.0f32; values.len()];
        super::parallel::for_each_plane((values, plane), (&mut out, plane), |i, x, y| {
            let c = i % channels;
            normalise(x, y, self.epsilon, scale[c], bias[c]);
        });
        let out = tract_ndarray::Array::from_shape_vec(x.shape(), out)?;
        Ok(tvec!(out.into_tvalue()))
    }
}

impl TypedOp for InstanceNorm {
    fn output_facts(&self, inputs: &[&TypedFact]) -> TractResult<TVec<TypedFact>> {
        Ok(tvec!(inputs[0].without_value()))
    }

    as_op!();
}

/// Floats summed in f32 lanes before the lanes go into the f64 total.
const RUN: usize = 1024;

/// `y = (x - mean(x)) / sqrt(var(x) + epsilon) * scale + bias` for one
/// plane.
fn normalise(x: &[f32], y: &mut [f32], epsilon: f32, scale: f32, bias: f32) {
    let n = x.len() as f64;
    // Summed around the first value, so that the f32 lanes add small
    // numbers where the mean is large against the spread.
    let pivot = x.first().copied().unwrap_or(0.0);
    let mean = f64::from(pivot) + sum(x, |v| v - pivot) / n;
    let centre = mean as f32;
    let variance = sum(x, |v| (v - centre) * (v - centre)) / n;
    // In f64, so that the mean keeps its digits where it is large against
    // the spread (the pass is memory-bound either way).
    let factor = f64::from(scale) / (variance + f64::from(epsilon)).sqrt();
    let bias = f64::from(bias);
    for (y, &x) in y.iter_mut().zip(x) {
        *y = ((f64::from(x) - mean) * factor + bias) as f32;
    }
}

/// The sum of `f(v)` over `values`: 16 f32 lanes over runs of [`RUN`]
/// values (which the compiler vectorises), each run's lanes added in f64.
fn sum(values: &[f32], f: impl Fn(f32) -> f32) -> f64 {
    let mut total = 0.0f64;
    for run in values.chunks(RUN) {
        let mut lanes = [0.0f32; 16];
        let mut chunks = run.chunks_exact(16);
        for chunk in &mut chunks {
            for (lane, &v) in lanes.iter_mut().zip(chunk) {
                *lane += f(v);
            }
        }
        total += lanes.iter().map(|&l| f64::from(l)).sum::<f64>();
        total += chunks
            .remainder()
            .iter()
            .map(|&v| f64::from(f(v)))
            .sum::<f64>();
    }
    total
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The definition, in f64.
    fn reference(x: &[f32], epsilon: f64) -> Vec<f64> {
        let n = x.len() as f64;
        let mean = x.iter().map(|&v| f64::from(v)).sum::<f64>() / n;
        let var = x
            .iter()
            .map(|&v| (f64::from(v) - mean).powi(2))
            .sum::<f64>()
            / n;
        x.iter()
            .map(|&v| (f64::from(v) - mean) / (var + epsilon).sqrt())
            .collect()
    }

    #[test]
    fn a_plane_is_normalised_as_defined() {
        // Lengths below one lane group, with a remainder, and over
        // several runs; values with a large mean, where a one-pass
        // variance would lose digits.
        for (len, offset) in [(7usize, 0.0f32), (100, 3.0), (4099, 1000.0)] {
            let x: Vec<f32> = (0..len)
                .map(|i| offset + ((i * 37 % 101) as f32 / 50.0 - 1.0))
                .collect();
            let mut y = vec![f32::NAN; len];
            normalise(&x, &mut y, 1e-5, 2.0, 0.5);
            for (i, (&got, want)) in y.iter().zip(reference(&x, 1e-5)).enumerate() {
                let want = want * 2.0 + 0.5;
                assert!(
                    (f64::from(got) - want).abs() <= 1e-5 * (1.0 + want.abs()),
                    "length {len}, value {i}: {got} vs {want}"
                );
            }
        }
    }
}
