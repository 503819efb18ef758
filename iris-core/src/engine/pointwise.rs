//! The 1x1x1 convolution as one tract op, where the CPU has AVX-512.
//!
//! The task encoder's context path widens each encoder level's features to
//! `s³` channels and narrows them back (`expand` and `squeeze`: 7.4 GFLOP
//! per class at the full size). tract runs them as matrix products that
//! packed their input first and reached about 130 GFLOP/s on this 2-core
//! VM, a little over half its multiply-add peak: 56 ms of the one-class
//! task encoder's 175-200 ms (issue 20). [`PointwiseConv`] runs them as
//! the engine's products (`products.rs`: eight output channels by two
//! vectors of 16 voxels per register block, the weight broadcast): each
//! run of 32 voxels' input channels is copied side by side once, then
//! every block of output channels reads it from the core's cache. Runs of
//! voxels (and, where they are few, blocks of output channels) go in
//! parallel on the model's thread pool.
//!
//! [`replacement`] takes each 1x1x1 convolution it serves before tract
//! declutters the graph (which would turn it into a product and a sum).
//!
//! The decoder's classifier head is a 1x1x1 convolution too, with weights
//! the graph computes (one row per class, from the task tokens): tract
//! packed its 32 x 128^3 features for a product with one row, 0.14 s of a
//! full-size window's 0.19 s for it. [`ComputedPointwise`] packs the rows
//! instead, each run, and runs the same products; [`computed_replacement`]
//! finds it in the decluttered graph.

use std::prelude::rust_2024::*;
use std::sync::Arc;
use std::vec;

use tract_onnx::tract_core::internal::*;
use tract_onnx::tract_core::ops::cnn::conv::Conv;
use tract_onnx::tract_core::ops::einsum::EinSum;

use super::parallel::SharedOut;
use super::products::PackedRows;

/// [`PointwiseConv`] for `node` where it is a convolution the op serves and
/// the CPU has AVX-512: 1x1x1, stride 1, no padding, one group, f32 with
/// constant weights, every shape known. Its inputs are the node's first
/// and third (the data and the bias).
pub(crate) fn replacement(
    model: &TypedModel,
    node: &TypedNode,
) -> TractResult<Option<PointwiseConv>> {
    let Some(conv) = node.op_as::<Conv>() else {
        return Ok(None);
    };
    if !super::conv3d::available() || !super::conv3d::is_plain(conv, node, 1) {
        return Ok(None);
    }
    let spec = &conv.pool_spec;
    let (cin, cout) = (spec.input_channels, spec.output_channels);
    let input = model.outlet_fact(node.inputs[0])?;
    let concrete = input.shape.as_concrete();
    if input.datum_type != f32::datum_type()
        || !matches!(concrete, Some(&[_, c, _, _, _]) if c == cin)
    {
        return Ok(None);
    }
    let bias = model.outlet_fact(node.inputs[2])?;
    let bias_fits = bias.datum_type == f32::datum_type()
        && matches!(bias.shape.as_concrete(), Some(&[n]) if n == 1 || n == cout);
    let kernel = model
        .outlet_fact(node.inputs[1])?
        .konst
        .clone()
        .filter(|k| k.datum_type() == f32::datum_type() && k.shape() == [cout, cin, 1, 1, 1]);
    let Some(kernel) = kernel.filter(|_| bias_fits) else {
        return Ok(None);
    };
    let kernel = kernel.try_as_plain_ram()?;
    Ok(Some(PointwiseConv::new(
        kernel.as_slice::<f32>()?,
        [cin, cout],
    )))
}

/// A 1x1x1 convolution: `y[n, o, v] = bias[o] + Σ_i w[o, i] x[n, i, v]`
/// over the voxels `v` of `[N, Cin, D, H, W]`, output `[N, Cout, D, H, W]`.
/// Inputs: `x` and `bias` (`[Cout]`, or one value for all; the graph
/// computes it, so it is not a constant before tract declutters).
#[derive(Debug, Clone)]
pub(crate) struct PointwiseConv {
    weights: Arc<PackedRows>,
}

/// Two ops are the same when they share their packed weights (tract
/// compares ops to merge equal nodes).
impl PartialEq for PointwiseConv {
    fn eq(&self, other: &Self) -> bool {
        Arc::ptr_eq(&self.weights, &other.weights)
    }
}

impl Eq for PointwiseConv {}

impl PointwiseConv {
    /// The op for `kernel` (`[Cout, Cin]`, C order).
    fn new(kernel: &[f32], [cin, cout]: [usize; 2]) -> Self {
        PointwiseConv {
            weights: Arc::new(PackedRows::new(kernel, [cout, cin])),
        }
    }
}

impl Op for PointwiseConv {
    fn name(&self) -> StaticName {
        "IrisPointwiseConv".into()
    }

    fn info(&self) -> TractResult<Vec<String>> {
        Ok(vec![std::format!(
            "{} -> {} channels",
            self.weights.columns,
            self.weights.rows
        )])
    }

    fn validation(&self) -> Validation {
        Validation::Rounding
    }

    op_as_typed_op!();
}

impl EvalOp for PointwiseConv {
    op_out_of_plan!();

    fn eval(&self, _ctx: &EvalContext, inputs: TVec<TValue>) -> TractResult<TVec<TValue>> {
        let (x, bias) = args_2!(inputs);
        let shape = x.shape();
        let (cin, cout) = (self.weights.columns, self.weights.rows);
        ensure!(
            x.datum_type() == f32::datum_type() && shape.len() == 5 && shape[1] == cin,
            "pointwise convolution: input {:?} {shape:?}, expected f32 [N, {cin}, D, H, W]",
            x.datum_type()
        );
        let bias = biases(&bias, cout)?;
        Ok(tvec!(
            per_sample(&self.weights, &x, Some(&bias))?.into_tvalue()
        ))
    }
}

/// The `cout` biases of a 1x1x1 convolution from its bias input: `[Cout]`,
/// or one value for all.
pub(crate) fn biases(bias: &TValue, cout: usize) -> TractResult<Vec<f32>> {
    let bias = bias.try_as_plain_ram()?;
    Ok(match bias.as_slice::<f32>()? {
        &[b] => vec![b; cout],
        b if b.len() == cout => b.to_vec(),
        b => bail!(
            "pointwise convolution: {} biases for {cout} channels",
            b.len()
        ),
    })
}

impl PointwiseConv {
    /// The op's weights, `[Cout, Cin]` packed.
    pub(crate) fn weights(&self) -> &Arc<PackedRows> {
        &self.weights
    }
}

/// `weights · x + bias` for each sample of `x` (f32 `[N, Cin, ...]`, `Cin`
/// the weights' columns), over its voxels: `[N, rows, ...]`.
fn per_sample(weights: &PackedRows, x: &TValue, bias: Option<&[f32]>) -> TractResult<Tensor> {
    let shape = x.shape();
    let (cin, cout) = (weights.columns, weights.rows);
    ensure!(shape.len() >= 2 && shape[1] == cin);
    let voxels: usize = shape[2..].iter().product();
    let values = x.try_as_plain_ram()?;
    let values = values.as_slice::<f32>()?;
    let mut out_shape = shape.to_vec();
    out_shape[1] = cout;
    // SAFETY: `times` writes every value of every sample.
    let mut out = unsafe { super::parallel::unwritten(&out_shape)? };
    {
        let mut view = out.try_as_plain_ram_mut()?;
        let y = view.as_slice_mut::<f32>()?;
        if cin * cout * voxels > 0 {
            for (x, y) in values
                .chunks_exact(cin * voxels)
                .zip(y.chunks_exact_mut(cout * voxels))
            {
                weights.times(x, bias, voxels, SharedOut::new(y))?;
            }
        }
    }
    Ok(out)
}

impl TypedOp for PointwiseConv {
    fn output_facts(&self, inputs: &[&TypedFact]) -> TractResult<TVec<TypedFact>> {
        let mut shape = inputs[0].shape.clone();
        shape.set(1, self.weights.rows.into());
        Ok(tvec!(f32::fact(shape)))
    }

    as_op!();
}

/// [`ComputedPointwise`] for `node` where it is the classifier head's
/// product as tract declutters it, and the CPU has AVX-512: an `EinSum` of
/// rows `w` (`[M, C]`, or `[C]` for one row) and voxels `x` (`[N, C, ...]`,
/// f32, every shape known) summing over `C`, output `[N, M, ...]` (the
/// other axes of `x` where they are). Its inputs are the node's.
pub(crate) fn computed_replacement(
    model: &TypedModel,
    node: &TypedNode,
) -> TractResult<Option<ComputedPointwise>> {
    let Some(op) = node.op_as::<EinSum>() else {
        return Ok(None);
    };
    let &[w, x] = node.inputs.as_slice() else {
        return Ok(None);
    };
    if !super::conv3d::available() || op.q_params.is_some() {
        return Ok(None);
    }
    let (w, x) = (model.outlet_fact(w)?, model.outlet_fact(x)?);
    let fits = |fact: &TypedFact| {
        fact.datum_type == f32::datum_type() && fact.shape.as_concrete().is_some()
    };
    let (rank_w, rank_x) = (w.rank(), x.rank());
    if !fits(w) || !fits(x) || !(1..=2).contains(&rank_w) || rank_x < 3 {
        return Ok(None);
    }
    // The sum over `x`'s axis 1 and `w`'s last; the rows' axis where the
    // output has it (axis 1, only there, or also `w`'s first); each other
    // axis of `x` where the output has it.
    let serves = op.axes.iter_all_axes().all(|axis| {
        let (in_w, in_x, out) = (&*axis.inputs[0], &*axis.inputs[1], &*axis.outputs[0]);
        match (in_w, in_x, out) {
            (&[k], &[1], &[]) => k == rank_w - 1,
            (&[0], &[], &[1]) => rank_w == 2,
            (&[], &[], &[1]) => rank_w == 1,
            (&[], &[i], &[o]) => i == o && i != 1,
            _ => false,
        }
    });
    Ok(serves.then_some(ComputedPointwise))
}

/// A 1x1x1 convolution whose weights the graph computes:
/// `y[n, m, v] = Σ_c w[m, c] x[n, c, v]` over the voxels `v` of `x`
/// (`[N, C, ...]`), `w` `[M, C]` (or `[C]`, one row), output `[N, M, ...]`.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub(crate) struct ComputedPointwise;

impl Op for ComputedPointwise {
    fn name(&self) -> StaticName {
        "IrisComputedPointwise".into()
    }

    fn validation(&self) -> Validation {
        Validation::Rounding
    }

    op_as_typed_op!();
}

impl EvalOp for ComputedPointwise {
    op_out_of_plan!();

    fn eval(&self, _ctx: &EvalContext, inputs: TVec<TValue>) -> TractResult<TVec<TValue>> {
        let (w, x) = args_2!(inputs);
        let shape = x.shape();
        ensure!(
            x.datum_type() == f32::datum_type()
                && w.datum_type() == f32::datum_type()
                && shape.len() >= 3
                && shape[1] > 0
                && w.len() % shape[1] == 0,
            "computed pointwise product: rows {:?} {:?} by voxels {:?} {shape:?}",
            w.datum_type(),
            w.shape(),
            x.datum_type()
        );
        let c = shape[1];
        let rows = w.try_as_plain_ram()?;
        let rows = PackedRows::new(rows.as_slice::<f32>()?, [w.len() / c, c]);
        Ok(tvec!(per_sample(&rows, &x, None)?.into_tvalue()))
    }
}

impl TypedOp for ComputedPointwise {
    fn output_facts(&self, inputs: &[&TypedFact]) -> TractResult<TVec<TypedFact>> {
        let (w, x) = (inputs[0], inputs[1]);
        let rows = if w.rank() == 2 {
            w.shape[0].clone()
        } else {
            1.into()
        };
        let mut shape = x.shape.clone();
        shape.set(1, rows);
        Ok(tvec!(f32::fact(shape)))
    }

    as_op!();
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_computed_product_equals_its_definition() {
        if !super::super::conv3d::has_avx512() {
            return;
        }
        // One row given as a vector, rows under and past a register block;
        // two samples; voxels under a tile and with a remainder.
        for (rows, channels, voxels) in [(0, 5, 7), (3, 4, 20), (9, 6, 45)] {
            let draw = |n: usize, seed: usize| -> Vec<f32> {
                (0..n)
                    .map(|i| ((i * 7919 + seed) % 1013) as f32 / 1013.0 - 0.5)
                    .collect()
            };
            let m = rows.max(1);
            let (w, x) = (draw(m * channels, 1), draw(2 * channels * voxels, 2));
            let w_shape: Vec<usize> = if rows == 0 {
                vec![channels]
            } else {
                vec![rows, channels]
            };
            let w_tensor = Tensor::from_shape(&w_shape, &w).expect("rows");
            let x_tensor = Tensor::from_shape(&[2, channels, 1, 1, voxels], &x).expect("voxels");
            let inputs = tvec!(w_tensor.into_tvalue(), x_tensor.into_tvalue());
            let got = ComputedPointwise.eval(&EvalContext::out_of_plan(), inputs);
            let got = got.expect("evaluates").remove(0);
            assert_eq!(got.shape(), [2, m, 1, 1, voxels]);
            let got = got.try_as_plain_ram().expect("plain");
            let got = got.as_slice::<f32>().expect("f32");
            for n in 0..2 {
                for r in 0..m {
                    for v in 0..voxels {
                        let want: f64 = (0..channels)
                            .map(|c| {
                                f64::from(w[r * channels + c])
                                    * f64::from(x[(n * channels + c) * voxels + v])
                            })
                            .sum();
                        let value = f64::from(got[(n * m + r) * voxels + v]);
                        assert!(
                            (value - want).abs() <= 1e-5,
                            "{rows} rows: [{n}, {r}, {v}] {value} vs {want}"
                        );
                    }
                }
            }
        }
    }
}
