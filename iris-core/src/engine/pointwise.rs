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

use std::prelude::rust_2024::*;
use std::sync::Arc;
use std::vec;

use tract_onnx::tract_core::internal::*;
use tract_onnx::tract_core::ops::cnn::conv::Conv;

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
        let bias = bias.try_as_plain_ram()?;
        let bias = match bias.as_slice::<f32>()? {
            &[b] => vec![b; cout],
            b if b.len() == cout => b.to_vec(),
            b => bail!(
                "pointwise convolution: {} biases for {cout} channels",
                b.len()
            ),
        };
        let voxels: usize = shape[2..].iter().product();
        let values = x.try_as_plain_ram()?;
        let values = values.as_slice::<f32>()?;
        let out_shape = [shape[0], cout, shape[2], shape[3], shape[4]];
        // SAFETY: `times` writes every value of every sample.
        let mut out = unsafe { super::parallel::unwritten(&out_shape)? };
        {
            let mut view = out.try_as_plain_ram_mut()?;
            let y = view.as_slice_mut::<f32>()?;
            if cin * voxels > 0 {
                for (x, y) in values
                    .chunks_exact(cin * voxels)
                    .zip(y.chunks_exact_mut(cout * voxels))
                {
                    self.weights
                        .times(x, Some(&bias), voxels, SharedOut::new(y))?;
                }
            }
        }
        Ok(tvec!(out.into_tvalue()))
    }
}

impl TypedOp for PointwiseConv {
    fn output_facts(&self, inputs: &[&TypedFact]) -> TractResult<TVec<TypedFact>> {
        let mut shape = inputs[0].shape.clone();
        shape.set(1, self.weights.rows.into());
        Ok(tvec!(f32::fact(shape)))
    }

    as_op!();
}
