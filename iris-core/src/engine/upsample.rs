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

use std::prelude::rust_2024::*;
use std::vec;

use tract_onnx::tract_core::internal::*;
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
    }))
}

/// Trilinear resampling of `[N, C, from...]` to `[N, C, to...]` with
/// aligned corners: output `i` of an axis reads the input at
/// `i * (from - 1) / (to - 1)`.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub(crate) struct Upsample3d {
    from: [usize; 3],
    to: [usize; 3],
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
        "IrisUpsample3d".into()
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
        let input = &inputs[0];
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
        let values = input.try_as_plain_ram()?;
        let values = values.as_slice::<f32>()?;
        let axes: [Vec<(usize, f32)>; 3] =
            core::array::from_fn(|i| axis(self.from[2 - i], self.to[2 - i]));
        let axes = [&axes[0][..], &axes[1][..], &axes[2][..]];
        let mut out = vec![0.0f32; values.len() / from.max(1) * to];
        super::parallel::for_each_plane((values, from), (&mut out, to), |_, x, y| {
            self.plane(x, y, axes)
        });
        let [dd, hh, ww] = self.to;
        let out = tract_ndarray::Array::from_shape_vec([shape[0], shape[1], dd, hh, ww], out)?;
        Ok(tvec!(out.into_tvalue()))
    }
}

impl TypedOp for Upsample3d {
    fn output_facts(&self, inputs: &[&TypedFact]) -> TractResult<TVec<TypedFact>> {
        let mut shape = inputs[0].shape.clone();
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
            let op = Upsample3d { from, to };
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
}
