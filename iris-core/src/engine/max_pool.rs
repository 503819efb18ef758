//! Max pooling over 2x2x2 blocks as one tract op.
//!
//! The image encoder halves its features' size four times with ONNX
//! `MaxPool` (kernel 2, stride 2). tract's pooling took 0.15 s at the full
//! size's 128^3 level (32 channels, 268 MB in, 34 MB out), 0.18 s of the
//! encoder's 2.2 s (issue 20). [`MaxPool2x`] reads each pair of input
//! planes once, row pair by row pair: the maximum of four rows, then of
//! each pair of neighbouring values; the (sample, channel, output depth)
//! planes in parallel on the model's thread pool. [`replacement`] gives it
//! for every pooling it serves, put in place before tract optimises the
//! graph.

use std::prelude::rust_2024::*;
use std::vec;

use tract_onnx::tract_core::internal::*;
use tract_onnx::tract_core::ops::cnn::{MaxPool, PaddingSpec};
use tract_onnx::tract_core::ops::nn::DataFormat;

use super::parallel::SharedOut;

/// [`MaxPool2x`] for `node` where it is a max pooling of an f32 `[N, C, D,
/// H, W]` tensor with known shapes over 2x2x2 blocks, stride 2, no padding
/// or dilation, without index outputs; its one input is the node's.
pub(crate) fn replacement(model: &TypedModel, node: &TypedNode) -> TractResult<Option<MaxPool2x>> {
    let Some(pool) = node.op_as::<MaxPool>() else {
        return Ok(None);
    };
    let spec = &pool.pool_spec;
    let unpadded = match &spec.padding {
        PaddingSpec::Valid => true,
        PaddingSpec::Explicit(before, after)
        | PaddingSpec::ExplicitOnnxPool(before, after, false) => {
            before.iter().chain(after).all(|&p| p == 0)
        }
        _ => false,
    };
    let plain = pool.with_index_outputs.is_none()
        && spec.data_format == DataFormat::NCHW
        && spec.kernel_shape.as_slice() == [2; 3]
        && spec.strides.as_deref() == Some(&[2; 3][..])
        && spec
            .dilations
            .as_ref()
            .is_none_or(|d| d.iter().all(|&s| s == 1))
        && unpadded;
    let input = model.outlet_fact(node.inputs[0])?;
    let serves = plain
        && input.datum_type == f32::datum_type()
        && matches!(input.shape.as_concrete(), Some(shape) if shape.len() == 5);
    Ok(serves.then_some(MaxPool2x))
}

/// `y[n, c, z, y, x]` is the largest of `x[n, c, 2z..2z + 2, 2y..2y + 2,
/// 2x..2x + 2]`, for `[N, C, D, H, W]` in and `[N, C, D / 2, H / 2, W / 2]`
/// out (rounded down: an odd side's last input is not read).
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub(crate) struct MaxPool2x;

impl Op for MaxPool2x {
    fn name(&self) -> StaticName {
        "IrisMaxPool2x".into()
    }

    op_as_typed_op!();
}

impl EvalOp for MaxPool2x {
    op_out_of_plan!();

    fn eval(&self, _ctx: &EvalContext, inputs: TVec<TValue>) -> TractResult<TVec<TValue>> {
        let input = args_1!(inputs);
        let shape = input.shape();
        let &[n, c, d, h, w] = shape else {
            bail!("max pooling: input {shape:?}, expected [N, C, D, H, W]");
        };
        let [dd, hh, ww] = [d / 2, h / 2, w / 2];
        let values = input.try_as_plain_ram()?;
        let values = values.as_slice::<f32>()?;
        // SAFETY: every output plane is written below.
        let mut out = unsafe { super::parallel::unwritten(&[n, c, dd, hh, ww])? };
        {
            let mut view = out.try_as_plain_ram_mut()?;
            let out = view.as_slice_mut::<f32>()?;
            let shared = SharedOut::new(out);
            let planes = n * c * dd;
            if planes * hh * ww > 0 {
                super::parallel::for_each_with(planes, Vec::new, |rows: &mut Vec<f32>, i| {
                    let (channel, z) = (i / dd, i % dd);
                    let input = &values[(channel * d + 2 * z) * h * w..][..2 * h * w];
                    // SAFETY: plane `i` is this item's alone.
                    let plane = unsafe { shared.slice(i * hh * ww, hh * ww) };
                    pool_planes(input, [h, w], rows, plane);
                });
            }
        }
        Ok(tvec!(out.into_tvalue()))
    }
}

/// One output plane (`[H / 2, W / 2]`) from two input planes (`[2, H, W]`),
/// with `rows` as scratch.
fn pool_planes(input: &[f32], [h, w]: [usize; 2], rows: &mut Vec<f32>, out: &mut [f32]) {
    let (front, back) = input.split_at(h * w);
    let ww = w / 2;
    rows.resize(2 * ww, 0.0);
    for (y, out) in out.chunks_exact_mut(ww).enumerate() {
        let sources = [(front, 0), (front, 1), (back, 0), (back, 1)]
            .map(|(plane, k)| &plane[(2 * y + k) * w..][..2 * ww]);
        for (i, m) in rows.iter_mut().enumerate() {
            *m = sources[0][i]
                .max(sources[1][i])
                .max(sources[2][i])
                .max(sources[3][i]);
        }
        for (o, pair) in out.iter_mut().zip(rows.chunks_exact(2)) {
            *o = pair[0].max(pair[1]);
        }
    }
}

impl TypedOp for MaxPool2x {
    fn output_facts(&self, inputs: &[&TypedFact]) -> TractResult<TVec<TypedFact>> {
        let shape = inputs[0].shape.as_concrete().unwrap_or_default();
        let &[n, c, d, h, w] = shape else {
            bail!("max pooling: input {shape:?}, expected [N, C, D, H, W]");
        };
        Ok(tvec!(f32::fact([n, c, d / 2, h / 2, w / 2])))
    }

    as_op!();
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_pooling_takes_each_blocks_largest_value() {
        // Even and odd sides (an odd side's last input is not read), two
        // samples of three channels, negative values.
        for [d, h, w] in [[4, 4, 4], [5, 3, 7], [2, 6, 34]] {
            let len = 2 * 3 * d * h * w;
            let x: Vec<f32> = (0..len)
                .map(|i| ((i * 7919) % 1013) as f32 - 506.0)
                .collect();
            let input = Tensor::from_shape(&[2, 3, d, h, w], &x).expect("input");
            let got = MaxPool2x.eval(&EvalContext::out_of_plan(), tvec!(input.into_tvalue()));
            let got = got.expect("evaluates").remove(0);
            let [dd, hh, ww] = [d / 2, h / 2, w / 2];
            assert_eq!(got.shape(), [2, 3, dd, hh, ww]);
            let got = got.try_as_plain_ram().expect("plain");
            let got = got.as_slice::<f32>().expect("f32");
            for plane in 0..6 {
                for (z, y, xx) in (0..dd)
                    .flat_map(|z| (0..hh).map(move |y| (z, y)))
                    .flat_map(|(z, y)| (0..ww).map(move |xx| (z, y, xx)))
                {
                    let want = (0..8)
                        .map(|k| {
                            let (a, b, e) = (2 * z + k / 4, 2 * y + k / 2 % 2, 2 * xx + k % 2);
                            x[((plane * d + a) * h + b) * w + e]
                        })
                        .fold(f32::NEG_INFINITY, f32::max);
                    assert_eq!(got[((plane * dd + z) * hh + y) * ww + xx], want);
                }
            }
        }
    }
}
