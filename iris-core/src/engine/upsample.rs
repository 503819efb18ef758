//! Trilinear upsampling with aligned corners as one tract op.
//!
//! The decoder doubles its features' size three times with ONNX `Resize`
//! (linear, `align_corners`). tract resamples one axis after another over
//! the whole tensor on one thread: 17 % of the small decoder's time
//! (issue 20). [`Upsample3d`] does the same three passes plane by plane,
//! the (sample, channel) planes in parallel on the model's thread pool,
//! each pass a weighted sum of two neighbouring rows, planes or values.
//! [`replacement`] gives it for every `Resize` node it serves, put in place
//! before tract optimises the graph.
//!
//! The decoder then joins the upsampled features after the level's skip
//! features (`Concat` on channels): a copy of both into a third tensor,
//! 0.4 s of the full-size decoder's 7.5 s at 128^3. Where the upsampling's
//! one reader is such a concatenation ([`joining_concat`]), the op takes
//! the skip features as a first input and writes both into the joined
//! tensor itself ([`Upsample3d::after_skip`]): the upsampled tensor (537 MB
//! at the full size's top level) is neither made nor copied.

use std::prelude::rust_2024::*;
use std::vec;

use tract_onnx::tract_core::internal::*;
use tract_onnx::tract_core::ops::array::TypedConcat;
use tract_onnx::tract_core::ops::nn::resize::{CoordTransformer, Interpolator, Resize};

/// [`Upsample3d`] for `node` where it is a trilinear `align_corners`
/// `Resize` of an f32 `[N, C, D, H, W]` tensor whose shapes are known; its
/// one input is the node's first.
pub(crate) fn replacement(model: &TypedModel, node: &TypedNode) -> TractResult<Option<Upsample3d>> {
    let Some(resize) = node.op_as::<Resize>() else {
        return Ok(None);
    };
    if resize.coord_transformer != CoordTransformer::AlignCorners
        || resize.interpolator != Interpolator::Linear
    {
        return Ok(None);
    }
    let input = model.outlet_fact(node.inputs[0])?;
    let output = model.outlet_fact(OutletId::new(node.id, 0))?;
    let (Some(from), Some(to)) = (input.shape.as_concrete(), output.shape.as_concrete()) else {
        return Ok(None);
    };
    let (&[n, c, d, h, w], &[n2, c2, dd, hh, ww]) = (from, to) else {
        return Ok(None);
    };
    if input.datum_type != f32::datum_type() || [n, c] != [n2, c2] {
        return Ok(None);
    }
    Ok(Some(Upsample3d {
        from: [d, h, w],
        to: [dd, hh, ww],
        after_skip: false,
    }))
}

/// The `Concat` on channels that is the one reader of upsampling `node`
/// and puts its output after one other f32 tensor of the same samples and
/// size (the decoder's skip features), with that tensor: an
/// [`Upsample3d::after_skip`] can take the concatenation's place (inputs:
/// that tensor, then the upsampling's input).
pub(crate) fn joining_concat<'m>(
    model: &'m TypedModel,
    node: &TypedNode,
) -> TractResult<Option<(&'m TypedNode, OutletId)>> {
    let [next] = node.outputs[0].successors.as_slice() else {
        return Ok(None);
    };
    let concat = model.node(next.node);
    let on_channels = concat.op_as::<TypedConcat>().is_some_and(|op| op.axis == 1);
    if !on_channels || concat.inputs.len() != 2 || next.slot != 1 {
        return Ok(None);
    }
    let skip = concat.inputs[0];
    let up = model.outlet_fact(OutletId::new(node.id, 0))?;
    let fact = model.outlet_fact(skip)?;
    let (Some(up), Some(shape)) = (up.shape.as_concrete(), fact.shape.as_concrete()) else {
        return Ok(None);
    };
    let joins = skip.node != node.id
        && fact.datum_type == f32::datum_type()
        && shape.len() == 5
        && shape[0] == up[0]
        && shape[2..] == up[2..];
    Ok(joins.then_some((concat, skip)))
}

/// Trilinear resampling of `[N, C, from...]` to `[N, C, to...]` with
/// aligned corners: output `i` of an axis reads the input at
/// `i * (from - 1) / (to - 1)`.
///
/// With `after_skip`, the op has two inputs, `[N, Cs, to...]` and the
/// tensor to resample, and its output `[N, Cs + C, to...]` holds the first
/// then the resampled channels (see [`joining_concat`]).
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub(crate) struct Upsample3d {
    from: [usize; 3],
    to: [usize; 3],
    after_skip: bool,
}

/// For each output position of one axis: the first input it reads and the
/// weight of the next one.
fn axis(from: usize, to: usize) -> Vec<(usize, f32)> {
    (0..to)
        .map(|i| {
            let x = if to > 1 {
                (i * (from - 1)) as f64 / (to - 1) as f64
            } else {
                0.0
            };
            let first = (x.floor() as usize).min(from.saturating_sub(2));
            (first, (x - first as f64) as f32)
        })
        .collect()
}

impl Upsample3d {
    /// The same upsampling writing its output after the channels of a
    /// first input (see [`joining_concat`]).
    pub(crate) fn after_skip(self) -> Self {
        Upsample3d {
            after_skip: true,
            ..self
        }
    }

    /// Resamples one `from` plane into one `to` plane: along W, then H,
    /// then D.
    fn plane(&self, input: &[f32], out: &mut [f32], [xs, ys, zs]: [&[(usize, f32)]; 3]) {
        let ([d, h, w], [_, hh, ww]) = (self.from, self.to);
        let mut rows = vec![0.0f32; d * h * ww];
        for (row, x) in rows.chunks_exact_mut(ww).zip(input.chunks_exact(w)) {
            for (value, &(i, t)) in row.iter_mut().zip(xs) {
                let next = x.get(i + 1).copied().unwrap_or(0.0);
                *value = x[i] + t * (next - x[i]);
            }
        }
        let mut planes = vec![0.0f32; d * hh * ww];
        for (plane, rows) in planes
            .chunks_exact_mut(hh * ww)
            .zip(rows.chunks_exact(h * ww))
        {
            for (row, &(j, t)) in plane.chunks_exact_mut(ww).zip(ys) {
                lerp(
                    row,
                    &rows[j * ww..][..ww],
                    rows.get((j + 1) * ww..(j + 2) * ww),
                    t,
                );
            }
        }
        for (slab, &(k, t)) in out.chunks_exact_mut(hh * ww).zip(zs) {
            let next = planes.get((k + 1) * hh * ww..(k + 2) * hh * ww);
            lerp(slab, &planes[k * hh * ww..][..hh * ww], next, t);
        }
    }
}

/// `out = a + t * (b - a)`, with `b` zero where the axis has one value.
fn lerp(out: &mut [f32], a: &[f32], b: Option<&[f32]>, t: f32) {
    match b {
        Some(b) => {
            for ((o, &a), &b) in out.iter_mut().zip(a).zip(b) {
                *o = a + t * (b - a);
            }
        }
        None => out.copy_from_slice(a),
    }
}

impl Op for Upsample3d {
    fn name(&self) -> StaticName {
        match self.after_skip {
            false => "IrisUpsample3d".into(),
            true => "IrisUpsample3d+Concat".into(),
        }
    }

    fn info(&self) -> TractResult<Vec<String>> {
        Ok(vec![std::format!("{:?} -> {:?}", self.from, self.to)])
    }

    fn validation(&self) -> Validation {
        Validation::Rounding
    }

    op_as_typed_op!();
}

impl EvalOp for Upsample3d {
    op_out_of_plan!();

    fn eval(&self, _ctx: &EvalContext, inputs: TVec<TValue>) -> TractResult<TVec<TValue>> {
        let (skip, input) = match (self.after_skip, &inputs[..]) {
            (false, [input]) => (None, input),
            (true, [skip, input]) => (Some(skip), input),
            _ => bail!("upsampling: {} inputs", inputs.len()),
        };
        let shape = input.shape();
        ensure!(
            shape.len() == 5 && shape[2..] == self.from,
            "upsampling: input shape {shape:?}, expected [N, C, {:?}]",
            self.from
        );
        let (from, to) = (
            self.from.iter().product::<usize>(),
            self.to.iter().product::<usize>(),
        );
        let (samples, channels) = (shape[0], shape[1]);
        let values = input.try_as_plain_ram()?;
        let values = values.as_slice::<f32>()?;
        let skip_channels = match skip {
            Some(skip) => {
                let skip = skip.shape();
                ensure!(
                    skip.len() == 5 && skip[0] == samples && skip[2..] == self.to,
                    "upsampling: skip shape {skip:?}, expected [{samples}, C, {:?}]",
                    self.to
                );
                skip[1]
            }
            None => 0,
        };
        let skip = skip.map(|skip| skip.try_as_plain_ram()).transpose()?;
        let skip = skip
            .as_ref()
            .map(|skip| skip.as_slice::<f32>())
            .transpose()?;
        let axes: [Vec<(usize, f32)>; 3] =
            core::array::from_fn(|i| axis(self.from[2 - i], self.to[2 - i]));
        let axes = [&axes[0][..], &axes[1][..], &axes[2][..]];
        let joined = skip_channels + channels;
        let [dd, hh, ww] = self.to;
        // SAFETY: the planes below are every plane of the output, each
        // written whole (copied, or by `plane`'s last pass).
        let mut tensor = unsafe { super::parallel::unwritten(&[samples, joined, dd, hh, ww])? };
        {
            let mut view = tensor.try_as_plain_ram_mut()?;
            let out = view.as_slice_mut::<f32>()?;
            for (sample, out) in out.chunks_exact_mut(joined * to).enumerate() {
                let (head, tail) = out.split_at_mut(skip_channels * to);
                if let Some(skip) = skip {
                    let planes = (
                        &skip[sample * skip_channels * to..][..skip_channels * to],
                        to,
                    );
                    super::parallel::for_each_plane(planes, (head, to), |_, x, y| {
                        y.copy_from_slice(x)
                    });
                }
                let planes = (&values[sample * channels * from..][..channels * from], from);
                super::parallel::for_each_plane(planes, (tail, to), |_, x, y| {
                    self.plane(x, y, axes)
                });
            }
        }
        Ok(tvec!(tensor.into_tvalue()))
    }
}

impl TypedOp for Upsample3d {
    fn output_facts(&self, inputs: &[&TypedFact]) -> TractResult<TVec<TypedFact>> {
        let input = inputs.last().context("upsampling without an input")?;
        let mut shape = input.shape.clone();
        if self.after_skip {
            shape.set(1, inputs[0].shape[1].clone() + &input.shape[1]);
        }
        for (axis, &n) in self.to.iter().enumerate() {
            shape.set(2 + axis, n.to_dim());
        }
        Ok(tvec!(f32::fact(shape)))
    }

    as_op!();
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Trilinear interpolation by its definition, in f64.
    fn reference(input: &[f32], [d, h, w]: [usize; 3], [dd, hh, ww]: [usize; 3]) -> Vec<f64> {
        let at = |n: usize, m: usize, i: usize| {
            let x = if m > 1 {
                i as f64 * (n - 1) as f64 / (m - 1) as f64
            } else {
                0.0
            };
            let lo = (x.floor() as usize).min(n - 1);
            let hi = (lo + 1).min(n - 1);
            [(lo, 1.0 - (x - lo as f64)), (hi, x - lo as f64)]
        };
        let mut out = Vec::new();
        for z in 0..dd {
            for y in 0..hh {
                for x in 0..ww {
                    let mut sum = 0.0;
                    for (zi, zw) in at(d, dd, z) {
                        for (yi, yw) in at(h, hh, y) {
                            for (xi, xw) in at(w, ww, x) {
                                sum += zw * yw * xw * f64::from(input[(zi * h + yi) * w + xi]);
                            }
                        }
                    }
                    out.push(sum);
                }
            }
        }
        out
    }

    #[test]
    fn upsampling_equals_the_definition() {
        // Doubling (as the decoder does), uneven factors, and an axis of
        // one value.
        for (from, to) in [
            ([2, 3, 4], [4, 6, 8]),
            ([3, 5, 2], [7, 9, 5]),
            ([1, 4, 3], [2, 8, 6]),
        ] {
            let op = Upsample3d {
                from,
                to,
                after_skip: false,
            };
            let n: usize = from.iter().product();
            let input: Vec<f32> = (0..n).map(|i| ((i * 29 % 17) as f32) / 8.0 - 1.0).collect();
            let axes: [Vec<(usize, f32)>; 3] =
                core::array::from_fn(|i| axis(from[2 - i], to[2 - i]));
            let mut out = vec![f32::NAN; to.iter().product()];
            op.plane(&input, &mut out, [&axes[0], &axes[1], &axes[2]]);
            for (i, (&got, want)) in out.iter().zip(reference(&input, from, to)).enumerate() {
                assert!(
                    (f64::from(got) - want).abs() < 1e-5,
                    "{from:?} -> {to:?}, value {i}: {got} vs {want}"
                );
            }
        }
    }

    #[test]
    fn after_skip_the_output_is_the_skip_then_the_upsampling() {
        // Two samples, so that each sample's channels are checked in place.
        let (from, to) = ([2, 3, 2], [4, 6, 4]);
        let ([n, cs, c], [f, t]) = ([2usize, 3, 2], [12usize, 96]);
        let op = Upsample3d {
            from,
            to,
            after_skip: true,
        };
        let skip: Vec<f32> = (0..n * cs * t).map(|i| i as f32).collect();
        let x: Vec<f32> = (0..n * c * f)
            .map(|i| ((i * 13 % 7) as f32) - 3.0)
            .collect();
        let mut model = TypedModel::default();
        let skip_in = model
            .add_source("skip", f32::fact([n, cs, 4, 6, 4]))
            .expect("source");
        let x_in = model
            .add_source("x", f32::fact([n, c, 2, 3, 2]))
            .expect("source");
        let out = model.wire_node("up", op, &[skip_in, x_in]).expect("wires")[0];
        assert_eq!(
            model.outlet_fact(out).expect("fact").shape.as_concrete(),
            Some(&[n, cs + c, 4, 6, 4][..])
        );
        model.select_output_outlets(&[out]).expect("outputs");
        let plan = model.into_runnable().expect("plans");
        let inputs = tvec!(
            Tensor::from_shape(&[n, cs, 4, 6, 4], &skip)
                .expect("tensor")
                .into_tvalue(),
            Tensor::from_shape(&[n, c, 2, 3, 2], &x)
                .expect("tensor")
                .into_tvalue(),
        );
        let got = plan.run(inputs).expect("runs");
        let got = got[0].try_as_plain_ram().expect("plain");
        let got = got.as_slice::<f32>().expect("f32");
        assert_eq!(got.len(), n * (cs + c) * t);
        for (sample, got) in got.chunks_exact((cs + c) * t).enumerate() {
            let (head, tail) = got.split_at(cs * t);
            assert_eq!(head, &skip[sample * cs * t..][..cs * t], "sample {sample}");
            for (channel, got) in tail.chunks_exact(t).enumerate() {
                let plane = &x[(sample * c + channel) * f..][..f];
                for (i, (&got, want)) in got.iter().zip(reference(plane, from, to)).enumerate() {
                    assert!(
                        (f64::from(got) - want).abs() < 1e-5,
                        "sample {sample}, channel {channel}, value {i}: {got} vs {want}"
                    );
                }
            }
        }
    }
}
