//! The task encoder's squeeze read through the pixel unshuffle, as one op.
//!
//! Each level of the task encoder's context path merges a class's mask
//! into a one-channel volume at the patch's resolution (`[N, 1, S, S, S]`),
//! unshuffles it to `s³` channels of `n³` voxels (`S = n s`; a reshape to
//! `[N, 1, n, s, n, s, n, s]` and a transposition to `[N, 1, s, s, s, n, n,
//! n]`), and squeezes those back to the level's width: instance norm, ReLU,
//! 1x1x1 convolution. As the engine's separate ops (`permute::Permute`,
//! `instance_norm::InstanceNorm`, `pointwise::PointwiseConv`) that is a
//! copy of the volume into the unshuffled order, three passes that
//! normalise it in place, and the products' pass that copies it again,
//! tile by tile: 10-13 ms of each class's 90-125 ms at the full size
//! besides the products' 21-24 (issue 20). [`UnshuffleSqueeze`] takes each
//! channel's statistics from the merged volume as it lies (two passes
//! along its rows), then runs the products on tiles it gathers, normalises
//! and rectifies from the merged volume as it packs them
//! ([`PackedRows::times_with`]). [`replacement`] finds the four ops.

use std::prelude::rust_2024::*;
use std::sync::Arc;
use std::{format, vec};

use tract_onnx::tract_core::internal::*;
use tract_onnx::tract_core::ops::change_axes::AxisOp;

use super::graphs::{constant_f32s, producer_for};
use super::instance_norm::InstanceNorm;
use super::parallel::SharedOut;
use super::permute::Permute;
use super::pointwise::PointwiseConv;
use super::products::{PackedRows, TILE};

/// Lanes of the statistics' sums (one AVX-512 vector of f32).
const LANES: usize = 16;

/// [`UnshuffleSqueeze`] for `node` where it is a [`PointwiseConv`] of an
/// instance norm with its ReLU (constant scales and biases) of the pixel
/// unshuffle of `[N, 1, n s, n s, n s]` by `s` (a `Permute` of `[N, 1, n,
/// s, n, s, n, s]` to `[N, 1, s, s, s, n, n, n]`, reshaped to `[N, s³, n,
/// n, n]`), each op the one reader of the one before. Returns the op and
/// its inputs: the volume (or the permutation's input, where the split of
/// its axes is not a reshape of the volume) and the convolution's bias.
pub(crate) fn replacement(
    model: &TypedModel,
    node: &TypedNode,
) -> TractResult<Option<(UnshuffleSqueeze, [OutletId; 2])>> {
    let Some(conv) = node.op_as::<PointwiseConv>() else {
        return Ok(None);
    };
    let found = || -> Option<(UnshuffleSqueeze, [OutletId; 2])> {
        let norm_node = producer_for(model, node.inputs[0], node.id)?;
        let norm = norm_node.op_as::<InstanceNorm>()?;
        let (scale, bias) = (
            constant_f32s(model, norm_node.inputs[1])?,
            constant_f32s(model, norm_node.inputs[2])?,
        );
        // Reshapes between the transposition and the norm.
        let mut before = producer_for(model, norm_node.inputs[0], norm_node.id)?;
        while before
            .op_as::<AxisOp>()
            .is_some_and(|op| !matches!(op, AxisOp::Move(..)))
        {
            before = producer_for(model, before.inputs[0], before.id)?;
        }
        let permute = before.op_as::<Permute>()?;
        let source = model.outlet_fact(before.inputs[0]).ok()?;
        let normed = model.outlet_fact(norm_node.inputs[0]).ok()?;
        let (Some(source), Some(normed)) = (source.shape.as_concrete(), normed.shape.as_concrete())
        else {
            return None;
        };
        let &[samples, 1, n, s, n1, s1, n2, s2] = source else {
            return None;
        };
        let unshuffled = [n, s] == [n1, s1]
            && [n, s] == [n2, s2]
            && permute.axes() == [0, 1, 3, 5, 7, 2, 4, 6]
            && normed == [samples, s * s * s, n, n, n]
            && source_is_f32(model, before.inputs[0])
            && norm.has_relu()
            && scale.len() == s * s * s
            && bias.len() == s * s * s
            && conv.weights().columns == s * s * s;
        let op = UnshuffleSqueeze {
            side: s,
            norms: Arc::new(scale.iter().zip(&bias).map(|(&g, &b)| (g, b)).collect()),
            norm: norm.clone(),
            weights: conv.weights().clone(),
        };
        // The volume itself where the split of its axes is a reshape that
        // only the transposition reads: the op reads the volume as it lies,
        // and tract's reshape copied it (1.2-1.4 ms a level at the full
        // size).
        let volume = [samples, 1, n * s, n * s, n * s];
        let (mut input, mut reader) = (before.inputs[0], before.id);
        let mut split = input;
        while let Some(reshape) = producer_for(model, split, reader)
            .filter(|r| matches!(r.op_as::<AxisOp>(), Some(AxisOp::Reshape(..))))
        {
            (split, reader) = (reshape.inputs[0], reshape.id);
            if model.outlet_fact(split).ok()?.shape.as_concrete() == Some(&volume) {
                input = split;
                break;
            }
        }
        unshuffled.then_some((op, [input, node.inputs[1]]))
    };
    Ok(found())
}

/// Whether the value at `outlet` is f32.
fn source_is_f32(model: &TypedModel, outlet: OutletId) -> bool {
    model
        .outlet_fact(outlet)
        .is_ok_and(|f| f.datum_type == f32::datum_type())
}

/// `y[N, o, v] = bias[o] + Σ_c w[o, c] relu(norm_c(u[N, c, v]))` with `u`
/// the pixel unshuffle by `s` of the input (`[N, 1, n, s, n, s, n, s]`,
/// the volume `[N, 1, n s, n s, n s]` as it reads): `u[N, (a, b, e), (i,
/// j, k)] = x[N, 0, i, a, j, b, k, e]`, and `norm_c` channel `c`'s instance
/// norm over its `n³` voxels. Inputs: `x` and `bias` (`[Cout]`, or one
/// value for all); output `[N, Cout, n, n, n]`.
#[derive(Debug, Clone)]
pub(crate) struct UnshuffleSqueeze {
    /// The unshuffle's factor `s`.
    side: usize,
    /// The norm (epsilon, ReLU).
    norm: InstanceNorm,
    /// Each channel's scale and bias of the norm.
    norms: Arc<Vec<(f32, f32)>>,
    /// The convolution's weights, `[Cout, s³]` packed.
    weights: Arc<PackedRows>,
}

/// Two ops are the same when they share their packed weights.
impl PartialEq for UnshuffleSqueeze {
    fn eq(&self, other: &Self) -> bool {
        Arc::ptr_eq(&self.weights, &other.weights) && Arc::ptr_eq(&self.norms, &other.norms)
    }
}

impl Eq for UnshuffleSqueeze {}

impl UnshuffleSqueeze {
    /// One sample: `x`, the volume (`(n s)³` values), into `out` (`[Cout,
    /// n³]`).
    fn run(&self, x: &[f32], n: usize, bias: &[f32], out: SharedOut<'_>) -> TractResult<()> {
        let s = self.side;
        let side = n * s;
        // The input index of unshuffled channel (a, b, e) at voxel (i, j,
        // k): ((i s + a) side + j s + b) side + k s + e.
        let channel_start = |c: usize| {
            let (a, b, e) = (c / (s * s), c / s % s, c % s);
            (a * side + b) * side + e
        };
        let voxel_start = |v: usize| {
            let (i, j, k) = (v / (n * n), v / n % n, v % n);
            ((i * side + j) * side + k) * s
        };
        let voxels = n * n * n;
        // Where each voxel's values start, in the voxels' order (the
        // volume has fewer than 2^31 values, checked by `eval`).
        let offsets: Vec<i32> = (0..voxels).map(|v| voxel_start(v) as i32).collect();
        let affines = self.affines(x, n);
        let fill = |v0: usize, count: usize, tile: &mut [f32]| {
            let offsets = &offsets[v0..][..count];
            for (c, (row, affine)) in tile.chunks_exact_mut(TILE).zip(&affines).enumerate() {
                let x = &x[channel_start(c)..];
                // SAFETY: `times_with` runs only where the CPU has
                // AVX-512F; every offset is inside `x`'s channel (the
                // unshuffle maps each voxel to a value of the volume).
                #[cfg(target_arch = "x86_64")]
                unsafe {
                    avx512::fill_row(x, offsets, *affine, row)
                };
            }
        };
        self.weights.times_with(fill, Some(bias), voxels, out)
    }
}

impl UnshuffleSqueeze {
    /// Each unshuffled channel's norm (`instance_norm::Affine::single`)
    /// for one sample, `x` (`(n s)³` values), in the channels' order.
    ///
    /// The `s` channels (a, b, 0..s) of a voxel are `s` neighbours in `x`
    /// and every row of `x` holds `n` such runs, so the sums run along the
    /// rows, a channel's values in f32 over a row, then in f64: in one pass,
    /// the values' and their squares' around a pivot, the variance their
    /// difference. The pivot is the mean of the channel's values in one
    /// row, near the channel's own, so that the difference keeps its digits
    /// (a variance loses about `(mean - pivot)² / variance` of f32's
    /// precision). The channels of one `a` (the rows with `z % s = a`) are
    /// one work item.
    fn affines(&self, x: &[f32], n: usize) -> Vec<[f32; 5]> {
        let s = self.side;
        let side = n * s;
        let voxels = (n * n * n) as f64;
        let per_a = super::parallel::map_with(
            s,
            || (),
            |_, a| {
                // The mean of each channel's values in the first row that
                // holds them: an outlier there moves it by a `1/n` share.
                let pivots: Vec<f32> = (0..s * s)
                    .map(|c| {
                        let row = &x[(a * side + c / s) * side..][..side];
                        let total: f64 =
                            row[c % s..].iter().step_by(s).map(|&v| f64::from(v)).sum();
                        (total / n as f64) as f32
                    })
                    .collect();
                let (sums, squares) = channel_sums(x, [a, n, s], &pivots);
                (0..s * s)
                    .map(|c| {
                        let shift = sums[c] / voxels;
                        let mean = f64::from(pivots[c]) + shift;
                        let variance = (squares[c] / voxels - shift * shift).max(0.0);
                        let (scale, bias) = self.norms[a * s * s + c];
                        let plane = self.norm.plane(scale, bias);
                        plane.with_moments(mean, variance).single()
                    })
                    .collect::<Vec<_>>()
            },
        );
        per_a.concat()
    }
}

/// `Σ (v - p)` and `Σ (v - p)²` over the values `v` of each unshuffled
/// channel (a, b, e) of one `a`, in the order (b, e), `p` the channel's
/// pivot, for one sample `x` (`(n s)³` values) and `pivots` (`[s, s]`, by
/// (b, e)): along the rows with `z % s = a`, where the channels (a, b,
/// 0..s) of each voxel are `s` neighbours, a row's values in f32 lanes,
/// then in f64. The lanes are [`LANES`] wide where `s` divides that
/// (channel `e` in lanes `e`, `e + s`, ..), so that the compiler runs them
/// as one vector.
fn channel_sums(x: &[f32], [a, n, s]: [usize; 3], pivots: &[f32]) -> (Vec<f64>, Vec<f64>) {
    let side = n * s;
    let width = if LANES.is_multiple_of(s) { LANES } else { s };
    let mut totals = vec![0.0f64; s * s];
    let mut square_totals = vec![0.0f64; s * s];
    let mut lanes = vec![0.0f32; width];
    let mut square_lanes = vec![0.0f32; width];
    let mut repeated = vec![0.0f32; width];
    for (i, y) in (0..n).flat_map(|i| (0..side).map(move |y| (i, y))) {
        let b = y % s;
        let row = &x[((i * s + a) * side + y) * side..][..side];
        let pivots = &pivots[b * s..][..s];
        for (r, &p) in repeated.iter_mut().zip(pivots.iter().cycle()) {
            *r = p;
        }
        lanes.fill(0.0);
        square_lanes.fill(0.0);
        let mut add = |run: &[f32]| {
            for (((lane, square), &v), &p) in lanes
                .iter_mut()
                .zip(square_lanes.iter_mut())
                .zip(run)
                .zip(&repeated)
            {
                let d = v - p;
                *lane += d;
                *square += d * d;
            }
        };
        let mut runs = row.chunks_exact(width);
        for run in &mut runs {
            add(run);
        }
        // A row's length is a multiple of `s`, so the rest starts at
        // channel 0 too.
        add(runs.remainder());
        for (j, (&lane, &square)) in lanes.iter().zip(&square_lanes).enumerate() {
            totals[b * s + j % s] += f64::from(lane);
            square_totals[b * s + j % s] += f64::from(square);
        }
    }
    (totals, square_totals)
}

impl Op for UnshuffleSqueeze {
    fn name(&self) -> StaticName {
        "IrisUnshuffleSqueeze".into()
    }

    fn info(&self) -> TractResult<Vec<String>> {
        Ok(vec![format!(
            "unshuffle by {}, norm, ReLU, {} -> {} channels",
            self.side, self.weights.columns, self.weights.rows
        )])
    }

    fn validation(&self) -> Validation {
        Validation::Rounding
    }

    op_as_typed_op!();
}

impl EvalOp for UnshuffleSqueeze {
    op_out_of_plan!();

    fn eval(&self, _ctx: &EvalContext, inputs: TVec<TValue>) -> TractResult<TVec<TValue>> {
        let (x, bias) = args_2!(inputs);
        let s = self.side;
        let shape = x.shape();
        let n = match *shape {
            [_, 1, n, s1, n1, s2, n2, s3] if [s1, s2, s3] == [s; 3] && [n1, n2] == [n; 2] => n,
            [_, 1, d, h, w] if d == h && d == w && d % s == 0 => d / s,
            _ => bail!(
                "unshuffled squeeze: input {shape:?}, expected [N, 1, n, {s}, n, {s}, n, {s}] \
                 or [N, 1, n {s}, n {s}, n {s}]"
            ),
        };
        ensure!(
            x.datum_type() == f32::datum_type() && (n * s).pow(3) <= i32::MAX as usize,
            "unshuffled squeeze: input {:?} {shape:?}, expected f32 and under 2^31 values a sample",
            x.datum_type()
        );
        let cout = self.weights.rows;
        let bias = super::pointwise::biases(&bias, cout)?;
        let (samples, voxels) = (shape[0], n * n * n);
        // SAFETY: `times_with` writes every value of every sample.
        let mut out = unsafe { super::parallel::unwritten(&[samples, cout, n, n, n])? };
        {
            let mut view = out.try_as_plain_ram_mut()?;
            let y = view.as_slice_mut::<f32>()?;
            let x = x.try_as_plain_ram()?;
            let x = x.as_slice::<f32>()?;
            if voxels * cout > 0 {
                for (x, y) in x
                    .chunks_exact(voxels * s * s * s)
                    .zip(y.chunks_exact_mut(cout * voxels))
                {
                    self.run(x, n, &bias, SharedOut::new(y))?;
                }
            }
        }
        Ok(tvec!(out.into_tvalue()))
    }
}

impl TypedOp for UnshuffleSqueeze {
    fn output_facts(&self, inputs: &[&TypedFact]) -> TractResult<TVec<TypedFact>> {
        let shape = &inputs[0].shape;
        let n = match shape.len() {
            8 => shape[2].clone(),
            5 => shape[2].clone() / self.side,
            rank => bail!("unshuffled squeeze: input rank {rank}"),
        };
        Ok(tvec!(f32::fact([
            shape[0].clone(),
            self.weights.rows.into(),
            n.clone(),
            n.clone(),
            n
        ])))
    }

    as_op!();
}

#[cfg(target_arch = "x86_64")]
mod avx512 {
    use std::arch::x86_64::*;

    use super::TILE;

    /// `row[t] = max(((x[offsets[t]] - hi) - lo) * factor + bias, floor)`
    /// for `t < offsets.len()` (at most [`TILE`]), zero past them, with
    /// `affine` `[hi, lo, factor, bias, floor]` (`instance_norm::Affine::single`).
    ///
    /// # Safety
    /// The CPU has AVX-512F; every offset indexes `x`.
    #[target_feature(enable = "avx512f")]
    pub(super) unsafe fn fill_row(x: &[f32], offsets: &[i32], affine: [f32; 5], row: &mut [f32]) {
        let [hi, lo, factor, bias, floor] = affine.map(|v| _mm512_set1_ps(v));
        let row = &mut row[..TILE];
        for (half, out) in row.chunks_exact_mut(16).enumerate() {
            let offsets = offsets.get(16 * half..).unwrap_or(&[]);
            let count = offsets.len().min(16);
            let mask = ((1u32 << count) - 1) as __mmask16;
            let mut index = [0i32; 16];
            index[..count].copy_from_slice(&offsets[..count]);
            // SAFETY: the unmasked lanes read `x` at the given offsets,
            // inside it (the caller's promise); the masked ones read
            // nothing and stay zero.
            let value = unsafe {
                let index = _mm512_loadu_si512(index.as_ptr().cast());
                _mm512_mask_i32gather_ps::<4>(_mm512_setzero_ps(), mask, index, x.as_ptr())
            };
            let centred = _mm512_sub_ps(_mm512_sub_ps(value, hi), lo);
            let y = _mm512_max_ps(_mm512_fmadd_ps(centred, factor, bias), floor);
            let y = _mm512_maskz_mov_ps(mask, y);
            // SAFETY: `out` holds 16 values.
            unsafe { _mm512_storeu_ps(out.as_mut_ptr(), y) };
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// `[N, 1, n, s, n, s, n, s]` unshuffled, normalised per channel (with
    /// ReLU) and multiplied by `kernel` (`[Cout, s³]`), in f64.
    fn reference(
        x: &[f32],
        [n, s]: [usize; 2],
        norms: &[(f32, f32)],
        kernel: &[f32],
        bias: &[f32],
    ) -> Vec<f64> {
        let (channels, voxels, side) = (s * s * s, n * n * n, n * s);
        let mut out = Vec::new();
        for sample in x.chunks_exact(channels * voxels) {
            let mut u = vec![vec![0.0f64; voxels]; channels];
            for (z, y, w) in (0..side)
                .flat_map(|z| (0..side).flat_map(move |y| (0..side).map(move |w| (z, y, w))))
            {
                let c = ((z % s) * s + y % s) * s + w % s;
                let v = ((z / s) * n + y / s) * n + w / s;
                u[c][v] = f64::from(sample[(z * side + y) * side + w]);
            }
            for (plane, &(scale, shift)) in u.iter_mut().zip(norms) {
                let mean = plane.iter().sum::<f64>() / voxels as f64;
                let var =
                    plane.iter().map(|v| (v - mean) * (v - mean)).sum::<f64>() / voxels as f64;
                for v in plane.iter_mut() {
                    let y = (*v - mean) / (var + 1e-5).sqrt() * f64::from(scale) + f64::from(shift);
                    *v = y.max(0.0);
                }
            }
            for (weights, &b) in kernel.chunks_exact(channels).zip(bias) {
                for v in 0..voxels {
                    let sum: f64 = weights
                        .iter()
                        .zip(&u)
                        .map(|(&w, plane)| f64::from(w) * plane[v])
                        .sum();
                    out.push(f64::from(b) + sum);
                }
            }
        }
        out
    }

    #[test]
    fn the_fused_squeeze_equals_its_definition() {
        if !super::super::conv3d::has_avx512() {
            std::println!("skipped: this CPU has no AVX-512F, the op is not used");
            return;
        }
        let draw = |len: usize, seed: usize| -> Vec<f32> {
            (0..len)
                .map(|i| ((i * 7919 + seed * 104_729) % 1013) as f32 / 1013.0 - 0.3)
                .collect()
        };
        // Two samples; factors 2, 3, 4 and 8, volumes whose voxels fill one
        // tile, part of one, and more than one; rows shorter and longer
        // than the sums' lanes (with a rest); output channels past a block;
        // values far from zero with an outlier.
        for (samples, n, s, cout) in [
            (2usize, 2usize, 2usize, 3usize),
            (1, 3, 4, 9),
            (1, 4, 2, 17),
            (1, 5, 4, 3),
            (1, 3, 8, 5),
            (1, 2, 3, 4),
        ] {
            let channels = s * s * s;
            let mut x = draw(samples * (n * s).pow(3), n + s);
            if n == 5 {
                // Values far from zero against their spread, the first an
                // outlier: the statistics keep their digits.
                for v in &mut x {
                    *v = 1000.0 + *v / 64.0;
                }
                x[0] = 1002.0;
            }
            let (kernel, bias) = (draw(cout * channels, 1), draw(cout, 2));
            let norms: Vec<(f32, f32)> = draw(channels, 3)
                .iter()
                .zip(draw(channels, 4))
                .map(|(&g, b)| (g + 1.0, b))
                .collect();
            let norm = InstanceNorm::with_relu(1e-5);
            let op = UnshuffleSqueeze {
                side: s,
                norm,
                norms: Arc::new(norms.clone()),
                weights: Arc::new(PackedRows::new(&kernel, [cout, channels])),
            };
            let shape = [samples, 1, n, s, n, s, n, s];
            let inputs = tvec!(
                Tensor::from_shape(&shape, &x).expect("x").into_tvalue(),
                Tensor::from_shape(&[cout], &bias)
                    .expect("bias")
                    .into_tvalue()
            );
            let got = op.eval(&EvalContext::out_of_plan(), inputs).expect("runs");
            assert_eq!(got[0].shape(), [samples, cout, n, n, n]);
            // The volume before the split of its axes reads the same.
            let side = n * s;
            let volume = tvec!(
                Tensor::from_shape(&[samples, 1, side, side, side], &x)
                    .expect("x")
                    .into_tvalue(),
                Tensor::from_shape(&[cout], &bias)
                    .expect("bias")
                    .into_tvalue()
            );
            let same = op.eval(&EvalContext::out_of_plan(), volume).expect("runs");
            assert_eq!(same[0], got[0]);
            let got = got[0].try_as_plain_ram().expect("plain");
            let want = reference(&x, [n, s], &norms, &kernel, &bias);
            for (j, (&got, want)) in got
                .as_slice::<f32>()
                .expect("f32")
                .iter()
                .zip(want)
                .enumerate()
            {
                assert!(
                    (f64::from(got) - want).abs() <= 1e-5 * (1.0 + want.abs()),
                    "{samples} x {n}^3 by {s}, {cout} out: value {j}: {got} vs {want}"
                );
            }
        }
    }
}
