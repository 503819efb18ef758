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
//!
//! Every norm of the released network is followed by a ReLU; [`fuse_relu`]
//! folds that into the op, and the op normalises its input in place when no
//! other node still reads it, so a norm and its ReLU cost one pass and no
//! new tensor instead of two passes and two tensors.

use std::prelude::rust_2024::*;
use std::vec;

use tract_onnx::model::{Onnx, ParsingContext};
use tract_onnx::pb::NodeProto;
use tract_onnx::tract_core::ops::binary::TypedBinOp;
use tract_onnx::tract_core::ops::math::Max;
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
    let op = InstanceNorm {
        epsilon,
        relu: false,
    };
    Ok((expand(op), vec![]))
}

/// The fused norm and ReLU for `node` where it is an [`InstanceNorm`]
/// whose one successor is a ReLU (`max(y, 0)`), with that ReLU's node; the
/// fused op takes the norm's inputs and stands for the ReLU's output.
pub(crate) fn fuse_relu<'m>(
    model: &'m TypedModel,
    node: &TypedNode,
) -> TractResult<Option<(InstanceNorm, &'m TypedNode)>> {
    let Some(norm) = node.op_as::<InstanceNorm>() else {
        return Ok(None);
    };
    let [next] = node.outputs[0].successors.as_slice() else {
        return Ok(None);
    };
    let next = model.node(next.node);
    let is_max = next
        .op_as::<TypedBinOp>()
        .is_some_and(|op| op.0.is::<Max>());
    if norm.relu || !is_max || next.inputs.len() != 2 || next.inputs[0] != node.id.into() {
        return Ok(None);
    }
    let zero = super::graphs::constant_f32(model, next.inputs[1]) == Some(0.0);
    let same_shape = model.outlet_fact(next.inputs[0])?.shape
        == model.outlet_fact(OutletId::new(next.id, 0))?.shape;
    if !zero || !same_shape {
        return Ok(None);
    }
    let fused = InstanceNorm {
        epsilon: norm.epsilon,
        relu: true,
    };
    Ok(Some((fused, next)))
}

/// `y = (x - mean) / sqrt(var + epsilon) * scale[c] + bias[c]`, with the
/// mean and (biased) variance of each (sample, channel) plane of
/// `x: [N, C, ...]`, then `max(y, 0)` where `relu`. Inputs: `x`,
/// `scale: [C]`, `bias: [C]`.
#[derive(Debug, Clone, PartialEq)]
pub(crate) struct InstanceNorm {
    epsilon: f32,
    relu: bool,
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
        match self.relu {
            false => "IrisInstanceNorm".into(),
            true => "IrisInstanceNorm+Relu".into(),
        }
    }

    fn validation(&self) -> Validation {
        Validation::Rounding
    }

    op_as_typed_op!();
}

impl EvalOp for InstanceNorm {
    op_out_of_plan!();

    fn eval(&self, _ctx: &EvalContext, inputs: TVec<TValue>) -> TractResult<TVec<TValue>> {
        let (x, scale, bias) = args_3!(inputs);
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
        let norm = |i: usize| Plane {
            epsilon: self.epsilon,
            scale: scale[i % channels],
            bias: bias[i % channels],
            relu: self.relu,
        };
        let normalise = |x: Option<&[f32]>, y: &mut [f32]| match x {
            None => {
                super::parallel::for_each_plane_mut((y, plane), |i, y| norm(i).apply_in_place(y))
            }
            Some(x) => super::parallel::for_each_plane((x, plane), (y, plane), |i, x, y| {
                norm(i).apply(x, y)
            }),
        };
        // SAFETY: with an input, every plane of the output is written whole
        // by `apply`.
        let out = unsafe { super::parallel::in_place_or_new(x, normalise)? };
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

impl InstanceNorm {
    /// The norm of a plane of channel `c`'s, with that channel's `scale`
    /// and `bias` (the op's second and third inputs).
    pub(crate) fn plane(&self, scale: f32, bias: f32) -> Plane {
        Plane {
            epsilon: self.epsilon,
            scale,
            bias,
            relu: self.relu,
        }
    }

    /// The norm with `epsilon`, followed by a ReLU.
    #[cfg(test)]
    pub(crate) fn with_relu(epsilon: f32) -> Self {
        InstanceNorm {
            epsilon,
            relu: true,
        }
    }

    /// Whether a ReLU follows the norm in the op ([`fuse_relu`]).
    pub(crate) fn has_relu(&self) -> bool {
        self.relu
    }
}

/// The norm of one plane, with its channel's scale and bias.
pub(crate) struct Plane {
    epsilon: f32,
    scale: f32,
    bias: f32,
    relu: bool,
}

/// The map [`Plane`] applies to each value of its plane, its statistics
/// taken.
#[derive(Clone, Copy, Debug)]
pub(crate) struct Affine {
    mean: f64,
    factor: f64,
    bias: f64,
    relu: bool,
}

impl Affine {
    /// The map in f32 for vector kernels: `((x - hi) - lo) * factor +
    /// bias`, with `hi + lo` the mean (so that `x - hi` keeps the digits
    /// where the mean is large against the spread), then `max(y, 0)` where
    /// the norm has a ReLU (`floor` is `0` then, `-inf` otherwise). Values
    /// `[hi, lo, factor, bias, floor]`; the result differs from
    /// [`Affine::apply`]'s by rounding only.
    pub(crate) fn single(self) -> [f32; 5] {
        let hi = self.mean as f32;
        let lo = (self.mean - f64::from(hi)) as f32;
        let floor = if self.relu { 0.0 } else { f32::NEG_INFINITY };
        [hi, lo, self.factor as f32, self.bias as f32, floor]
    }

    /// The normalised value of `x`.
    #[inline]
    pub(crate) fn apply(self, x: f32) -> f32 {
        let y = ((f64::from(x) - self.mean) * self.factor + self.bias) as f32;
        if self.relu { y.max(0.0) } else { y }
    }
}

impl Plane {
    /// `y = (x - mean(x)) / sqrt(var(x) + epsilon) * scale + bias`, then
    /// `max(y, 0)` where `relu`.
    fn apply(&self, x: &[f32], y: &mut [f32]) {
        let f = self.affine(x);
        for (y, &x) in y.iter_mut().zip(x) {
            *y = f.apply(x);
        }
    }

    /// [`Plane::apply`] with `x` and `y` the same values.
    fn apply_in_place(&self, x: &mut [f32]) {
        let f = self.affine(x);
        for x in x.iter_mut() {
            *x = f.apply(*x);
        }
    }

    /// The map from a value of `x`, the plane's values, to its normalised
    /// value.
    pub(crate) fn affine(&self, x: &[f32]) -> Affine {
        let n = x.len() as f64;
        // Summed around the first value, so that the f32 lanes add small
        // numbers where the mean is large against the spread.
        let pivot = x.first().copied().unwrap_or(0.0);
        let mean = f64::from(pivot) + sum(x, |v| v - pivot) / n;
        let centre = mean as f32;
        let variance = sum(x, |v| (v - centre) * (v - centre)) / n;
        self.with_moments(mean, variance)
    }

    /// The map for a plane of `mean` and (biased) `variance`.
    pub(crate) fn with_moments(&self, mean: f64, variance: f64) -> Affine {
        // In f64, so that the mean keeps its digits where it is large
        // against the spread (the pass is memory-bound either way).
        Affine {
            mean,
            factor: f64::from(self.scale) / (variance + f64::from(self.epsilon)).sqrt(),
            bias: f64::from(self.bias),
            relu: self.relu,
        }
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
            for relu in [false, true] {
                let plane = Plane {
                    epsilon: 1e-5,
                    scale: 2.0,
                    bias: 0.5,
                    relu,
                };
                let mut y = vec![f32::NAN; len];
                plane.apply(&x, &mut y);
                let mut in_place = x.clone();
                plane.apply_in_place(&mut in_place);
                assert_eq!(y, in_place, "length {len}: in place differs");
                for (i, (&got, want)) in y.iter().zip(reference(&x, 1e-5)).enumerate() {
                    let want = want * 2.0 + 0.5;
                    let want = if relu { want.max(0.0) } else { want };
                    assert!(
                        (f64::from(got) - want).abs() <= 1e-5 * (1.0 + want.abs()),
                        "length {len}, relu {relu}, value {i}: {got} vs {want}"
                    );
                }
            }
        }
    }

    #[test]
    fn the_input_is_normalised_in_place_only_where_no_other_node_reads_it() {
        let shape = [1usize, 2, 3, 5];
        let x: Vec<f32> = (0..30).map(|i| (i * 7 % 11) as f32 - 4.0).collect();
        let scale = tensor1(&[1.5f32, -0.5]);
        let bias = tensor1(&[0.25f32, 0.0]);
        let op = InstanceNorm {
            epsilon: 1e-5,
            relu: true,
        };
        let mut want = Vec::new();
        for (plane, (s, b)) in x.chunks(15).zip([(1.5, 0.25), (-0.5, 0.0)]) {
            want.extend(reference(plane, 1e-5).iter().map(|v| (v * s + b).max(0.0)));
        }
        for keep_input in [false, true] {
            let mut model = TypedModel::default();
            let input = model.add_source("x", f32::fact(shape)).expect("source");
            let scale = model.add_const("scale", scale.clone()).expect("scale");
            let bias = model.add_const("bias", bias.clone()).expect("bias");
            let y = model
                .wire_node("norm", op.clone(), &[input, scale, bias])
                .expect("wires")[0];
            let outputs = if keep_input { vec![y, input] } else { vec![y] };
            model.select_output_outlets(&outputs).expect("outputs");
            let plan = model.into_runnable().expect("plans");
            let tensor = Tensor::from_shape(&shape, &x).expect("tensor");
            let given = tensor.as_ptr::<f32>().expect("f32");
            let out = plan.run(tvec!(tensor.into_tvalue())).expect("runs");
            // The result is in the input's own memory exactly where no
            // other node reads the input.
            let result = out[0].as_ptr::<f32>().expect("f32");
            assert_eq!(result == given, !keep_input, "keep input {keep_input}");
            let got = out[0].try_as_plain_ram().expect("plain");
            for (j, (&got, &want)) in got
                .as_slice::<f32>()
                .expect("f32")
                .iter()
                .zip(&want)
                .enumerate()
            {
                assert!(
                    (f64::from(got) - want).abs() <= 1e-5 * (1.0 + want.abs()),
                    "keep input {keep_input}, value {j}: {got} vs {want}"
                );
            }
            if keep_input {
                let kept = out[1].try_as_plain_ram().expect("plain");
                assert_eq!(kept.as_slice::<f32>().expect("f32"), x.as_slice());
            }
        }
    }
}
