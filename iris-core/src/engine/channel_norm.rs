//! The normalisation of each voxel's channels as one tract op.
//!
//! The task encoder and the decoder layer-norm their voxels' tokens in
//! place, channels first (`[N, C, T]`, over axis 1; the exporter's
//! `channel_norm` and the decoder's token norms), so that no voxel is
//! transposed. tract reads that as a sum over the channels, a scaling, a
//! subtraction broadcast over the channels and an `RmsNorm`, whose fast
//! kernel serves the last axis only: at the full size's 32^3 level
//! (`[1, 128, 32768]`) the subtraction alone took 9-18 ms, the whole about
//! 15-20 ms, several times a memory pass. [`ChannelNorm`] reads each run of
//! voxels' channels three times while they sit in the core's cache (sum,
//! sum of squared deviations, normalise) and writes them once, in place
//! where no other node reads its input, the runs in parallel on the
//! model's thread pool. [`replacement`] finds the pattern.

use std::prelude::rust_2024::*;
use std::vec;

use tract_onnx::tract_core::internal::*;
use tract_onnx::tract_core::ops::binary::{BinMiniOp, TypedBinOp};
use tract_onnx::tract_core::ops::math::{Mul, Sub};
use tract_onnx::tract_core::ops::nn::{Reduce, Reducer, RmsNorm};

use super::parallel::SharedOut;

/// Voxels one work item normalises together: their channels' runs stay in
/// the core's second-level cache between the three passes.
const RUN: usize = 256;

/// [`ChannelNorm`] for `node` where it is the `RmsNorm` of an f32 tensor's
/// deviations from its mean over an axis that is not the last, as tract
/// declutters `(x - mean(x)) / sqrt(mean((x - mean(x))²) + ε)`: the norm
/// reads `Sub(x, Mul(Reduce<Sum>(x), 1 / n))`. Returns the op and `x`; the
/// op stands for the norm's output.
pub(crate) fn replacement(
    model: &TypedModel,
    node: &TypedNode,
) -> TractResult<Option<(ChannelNorm, OutletId)>> {
    let Some(norm) = node.op_as::<RmsNorm>() else {
        return Ok(None);
    };
    let fact = model.outlet_fact(node.inputs[0])?;
    let Some(shape) = fact.shape.as_concrete() else {
        return Ok(None);
    };
    if fact.datum_type != f32::datum_type() || norm.axis + 1 >= shape.len() {
        return Ok(None);
    }
    let sub = model.node(node.inputs[0].node);
    let Some(x) = binary::<Sub>(sub).and_then(|[x, mean]| {
        let mean = model.node(mean.node);
        let [a, b] = binary::<Mul>(mean)?;
        // The sum, scaled by `1 / n` on either side of the product.
        let inverse = Some(1.0 / shape[norm.axis] as f32);
        let constant = |outlet| super::graphs::constant_f32(model, outlet);
        let sum = match (constant(a), constant(b)) {
            (_, scale) if scale == inverse => a,
            (scale, _) if scale == inverse => b,
            _ => return None,
        };
        let sum = model.node(sum.node);
        let sums_x = sum
            .op_as::<Reduce>()
            .is_some_and(|r| r.reducer == Reducer::Sum && r.axes.as_slice() == [norm.axis])
            && sum.inputs.as_slice() == [x];
        sums_x.then_some(x)
    }) else {
        return Ok(None);
    };
    let epsilon = norm.eps.cast_to_scalar::<f32>()?;
    let op = ChannelNorm {
        axis: norm.axis,
        epsilon,
    };
    Ok(Some((op, x)))
}

/// The two inputs of `node` where it is the binary op `Op` on two tensors.
fn binary<Op: BinMiniOp>(node: &TypedNode) -> Option<[OutletId; 2]> {
    let op = node.op_as::<TypedBinOp>()?;
    match node.inputs.as_slice() {
        &[a, b] if op.0.is::<Op>() => Some([a, b]),
        _ => None,
    }
}

/// `y = (x - mean(x)) / sqrt(var(x) + epsilon)` over `axis` (not the last)
/// of an f32 tensor, the mean and (biased) variance taken for each
/// position of the other axes: a layer norm without scale or shift.
#[derive(Debug, Clone, PartialEq)]
pub(crate) struct ChannelNorm {
    axis: usize,
    epsilon: f32,
}

impl Eq for ChannelNorm {}

impl Op for ChannelNorm {
    fn name(&self) -> StaticName {
        "IrisChannelNorm".into()
    }

    fn info(&self) -> TractResult<Vec<String>> {
        Ok(vec![std::format!(
            "axis {}, epsilon {}",
            self.axis,
            self.epsilon
        )])
    }

    fn validation(&self) -> Validation {
        Validation::Rounding
    }

    op_as_typed_op!();
}

impl EvalOp for ChannelNorm {
    op_out_of_plan!();

    fn eval(&self, _ctx: &EvalContext, inputs: TVec<TValue>) -> TractResult<TVec<TValue>> {
        let x = args_1!(inputs);
        let shape = x.shape();
        ensure!(
            x.datum_type() == f32::datum_type() && self.axis + 1 < shape.len(),
            "channel norm: input {:?} {shape:?}, expected f32 with an axis after {}",
            x.datum_type(),
            self.axis
        );
        let layout = Layout {
            channels: shape[self.axis],
            voxels: shape[self.axis + 1..].iter().product(),
        };
        let normalise =
            |x: Option<&[f32]>, y: &mut [f32]| self.normalise(x, SharedOut::new(y), layout);
        // SAFETY: with an input, `normalise` writes every value of the
        // output.
        let out = unsafe { super::parallel::in_place_or_new(x, normalise)? };
        Ok(tvec!(out.into_tvalue()))
    }
}

impl TypedOp for ChannelNorm {
    fn output_facts(&self, inputs: &[&TypedFact]) -> TractResult<TVec<TypedFact>> {
        Ok(tvec!(inputs[0].without_value()))
    }

    as_op!();
}

/// The tensor as `[samples, channels, voxels]`, C order.
#[derive(Clone, Copy)]
struct Layout {
    channels: usize,
    voxels: usize,
}

impl ChannelNorm {
    /// Normalises every sample's channels at every voxel, from `input` into
    /// `out`, or within `out` where `input` is `None`; runs of [`RUN`]
    /// voxels in parallel.
    fn normalise(&self, input: Option<&[f32]>, out: SharedOut<'_>, layout: Layout) {
        let Layout { channels, voxels } = layout;
        let sample = channels * voxels;
        if sample == 0 {
            return;
        }
        let runs = voxels.div_ceil(RUN);
        let items = out.len() / sample * runs;
        super::parallel::for_each_with(
            items,
            || vec![0.0f32; 2 * RUN],
            |scratch, item| {
                let first = item / runs * sample + item % runs * RUN;
                let len = RUN.min(voxels - item % runs * RUN);
                let (mean, factor) = scratch.split_at_mut(RUN);
                let rows = (0..channels).map(|c| first + c * voxels);
                // SAFETY: the items' runs of voxels are disjoint, so no
                // other thread touches these values; each row's slice is
                // dropped before the next is made.
                let row = |start: usize| -> &[f32] {
                    match input {
                        Some(x) => &x[start..][..len],
                        None => unsafe { out.slice(start, len) },
                    }
                };
                let (mean, factor) = (&mut mean[..len], &mut factor[..len]);
                mean.fill(0.0);
                for start in rows.clone() {
                    for (m, &x) in mean.iter_mut().zip(row(start)) {
                        *m += x;
                    }
                }
                let n = channels as f32;
                mean.iter_mut().for_each(|m| *m /= n);
                factor.fill(0.0);
                for start in rows.clone() {
                    for ((f, &m), &x) in factor.iter_mut().zip(&*mean).zip(row(start)) {
                        *f += (x - m) * (x - m);
                    }
                }
                factor
                    .iter_mut()
                    .for_each(|f| *f = 1.0 / (*f / n + self.epsilon).sqrt());
                for start in rows {
                    // SAFETY: as above.
                    let y = unsafe { out.slice(start, len) };
                    let x = input.map(|x| &x[start..][..len]);
                    for (j, y) in y.iter_mut().enumerate() {
                        let x = x.map_or(*y, |x| x[j]);
                        *y = (x - mean[j]) * factor[j];
                    }
                }
            },
        );
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The definition, in f64, over the middle axis of `[samples,
    /// channels, voxels]`.
    fn reference(x: &[f32], [channels, voxels]: [usize; 2], epsilon: f64) -> Vec<f64> {
        let mut y = vec![0.0; x.len()];
        for (s, sample) in x.chunks(channels * voxels).enumerate() {
            for v in 0..voxels {
                let at = |c: usize| f64::from(sample[c * voxels + v]);
                let n = channels as f64;
                let mean = (0..channels).map(at).sum::<f64>() / n;
                let var = (0..channels).map(|c| (at(c) - mean).powi(2)).sum::<f64>() / n;
                for c in 0..channels {
                    y[s * channels * voxels + c * voxels + v] =
                        (at(c) - mean) / (var + epsilon).sqrt();
                }
            }
        }
        y
    }

    #[test]
    fn each_voxels_channels_are_normalised_as_defined_in_place_or_not() {
        // Voxels fewer than a run, a run and a remainder, several runs;
        // two samples; a large mean against the spread.
        for (shape, offset) in [
            ([1usize, 3, 5], 0.0f32),
            ([2, 7, RUN + 9], 3.0),
            ([1, 16, 3 * RUN], 100.0),
        ] {
            let [_, channels, voxels] = shape;
            let len = shape.iter().product();
            let x: Vec<f32> = (0..len)
                .map(|i| offset + ((i * 37 % 101) as f32 / 50.0 - 1.0))
                .collect();
            let want = reference(&x, [channels, voxels], 1e-5);
            let op = ChannelNorm {
                axis: 1,
                epsilon: 1e-5,
            };
            let layout = Layout { channels, voxels };
            let mut out = vec![f32::NAN; len];
            op.normalise(Some(&x), SharedOut::new(&mut out), layout);
            let mut in_place = x.clone();
            op.normalise(None, SharedOut::new(&mut in_place), layout);
            assert_eq!(out, in_place, "{shape:?}: in place differs");
            for (i, (&got, want)) in out.iter().zip(want).enumerate() {
                assert!(
                    (f64::from(got) - want).abs() <= 1e-4 * (1.0 + want.abs()),
                    "{shape:?}, value {i}: {got} vs {want}"
                );
            }
        }
    }
}
