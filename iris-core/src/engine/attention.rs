//! The task encoder's attention over a level's voxels as one tract op.
//!
//! Each query block of the task encoder reads its level's voxels through a
//! folded cross-attention (the exporter's `folded_attention`): with `X`
//! the normalised voxels, channels first (`[C, T]`), and `Q` the heads'
//! queries stacked (`[R, C]`, the key projection and the scale folded in),
//! the block needs `O = softmax(Q X) Xᵀ` (`[R, C]`, softmax over the
//! voxels). tract runs that as a product whose voxel operand it packs, a
//! softmax, then a product over the voxels whose operand it copies and
//! packs again: at the full size's 32^3 level (`X` 128 x 32768, 44 rows)
//! about 20 ms per attention, 42 of the one-class task encoder's 150-180 ms
//! for that level's two (issue 20). [`VoxelAttention`] computes the scores
//! with the engine's products (`products::PackedRows`), normalises them
//! with tract's own softmax, and sums the voxels weighted by them in
//! one pass over `X`, runs of voxels in parallel, each into partial sums of
//! its own that are added at the end. [`replacement`] finds the pattern.

use std::prelude::rust_2024::*;
use std::vec;

use tract_onnx::tract_core::internal::*;
use tract_onnx::tract_core::ops::change_axes::AxisOp;
use tract_onnx::tract_core::ops::einsum::EinSum;
use tract_onnx::tract_core::ops::nn::{Softmax, SoftmaxKind};

use super::graphs::producer_for;
use super::parallel::SharedOut;
use super::products::PackedRows;

/// Voxels per vector of the weighted sum.
const LANES: usize = 16;
/// Work items the weighted sum aims at.
const ITEMS: usize = 16;
/// Fewest voxels per work item of the weighted sum.
const MIN_RUN: usize = 256;

/// The operands of `node` where it is an `EinSum` of `equation` on two
/// inputs.
fn einsum(node: &TypedNode, equation: &str) -> Option<[OutletId; 2]> {
    let op = node.op_as::<EinSum>()?;
    match node.inputs.as_slice() {
        &[a, b] if op.q_params.is_none() && op.axes.to_string() == equation => Some([a, b]),
        _ => None,
    }
}

/// [`VoxelAttention`] for `node` where it is the weighted sum of a folded
/// attention as tract declutters it: `EinSum qt,nct->qc` of a `Softmax`
/// over the last axis of `[R, T]` scores and of the voxels `X` (`[1, C,
/// T]`), the scores an `EinSum` (`mk,akn->mn`, or per head `bmk,akn->bmn`
/// then a reshape) of the queries and the same `X`. Returns the op and its
/// inputs, the queries and `X`; the op stands for `node`'s output.
pub(crate) fn replacement(
    model: &TypedModel,
    node: &TypedNode,
) -> TractResult<Option<(VoxelAttention, [OutletId; 2])>> {
    if !super::conv3d::available() {
        return Ok(None);
    }
    let Some([weights, voxels]) = einsum(node, "qt,nct->qc") else {
        return Ok(None);
    };
    let found = || -> Option<OutletId> {
        let softmax = producer_for(model, weights, node.id)?;
        let op = softmax.op_as::<Softmax>()?;
        if op.axes.as_slice() != [1]
            || op.kind != SoftmaxKind::Softmax
            || op.quant_output_dt.is_some()
        {
            return None;
        }
        let mut scores = producer_for(model, softmax.inputs[0], softmax.id)?;
        if let Some(AxisOp::Reshape(..)) = scores.op_as::<AxisOp>() {
            scores = producer_for(model, scores.inputs[0], scores.id)?;
        }
        let [queries, x] =
            einsum(scores, "mk,akn->mn").or_else(|| einsum(scores, "bmk,akn->bmn"))?;
        (x == voxels).then_some(queries)
    };
    let Some(queries) = found() else {
        return Ok(None);
    };
    let (q, x) = (model.outlet_fact(queries)?, model.outlet_fact(voxels)?);
    let out = model.outlet_fact(OutletId::new(node.id, 0))?;
    let shapes = (
        q.shape.as_concrete(),
        x.shape.as_concrete(),
        out.shape.as_concrete(),
    );
    let (Some(q_shape), Some(&[1, c, t]), Some(&[r, c2])) = shapes else {
        return Ok(None);
    };
    let fits = q.datum_type == f32::datum_type()
        && x.datum_type == f32::datum_type()
        && c2 == c
        && q_shape.last() == Some(&c)
        && q_shape.iter().product::<usize>() == r * c
        && t > 0;
    Ok(fits.then_some((VoxelAttention, [queries, voxels])))
}

/// `O = softmax(Q X) Xᵀ`, the softmax over the voxels: inputs the queries
/// `Q` (`[..., C]`, `R` rows in all) and the voxels `X` (`[1, C, T]`),
/// output `[R, C]`.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub(crate) struct VoxelAttention;

impl Op for VoxelAttention {
    fn name(&self) -> StaticName {
        "IrisVoxelAttention".into()
    }

    fn validation(&self) -> Validation {
        Validation::Rounding
    }

    op_as_typed_op!();
}

impl EvalOp for VoxelAttention {
    op_out_of_plan!();

    fn eval(&self, ctx: &EvalContext, inputs: TVec<TValue>) -> TractResult<TVec<TValue>> {
        let (queries, voxels) = args_2!(inputs);
        let shape = voxels.shape();
        ensure!(
            voxels.datum_type() == f32::datum_type() && shape.len() == 3 && shape[0] == 1,
            "voxel attention: voxels {:?} {shape:?}, expected f32 [1, C, T]",
            voxels.datum_type()
        );
        let (c, t) = (shape[1], shape[2]);
        let q = queries.try_as_plain_ram()?;
        let q = q.as_slice::<f32>()?;
        ensure!(
            c > 0 && t > 0 && q.len() % c == 0,
            "voxel attention: {} query values for {c} channels and {t} voxels",
            q.len()
        );
        let r = q.len() / c;
        let x = voxels.try_as_plain_ram()?;
        let x = x.as_slice::<f32>()?;
        // SAFETY: the products write every score.
        let mut scores = unsafe { super::parallel::unwritten(&[r, t])? };
        {
            let mut view = scores.try_as_plain_ram_mut()?;
            let scores = view.as_slice_mut::<f32>()?;
            PackedRows::new(q, [r, c]).times(x, None, t, SharedOut::new(scores))?;
        }
        // tract's own softmax, in place: its kernels, rows in parallel.
        let softmax = Softmax {
            axes: tvec![1],
            quant_output_dt: None,
            kind: SoftmaxKind::Softmax,
        };
        let weights = softmax.eval(ctx, tvec!(scores.into_tvalue()))?.remove(0);
        let weights = weights.try_as_plain_ram()?;
        let mut out = Tensor::zero::<f32>(&[r, c])?;
        {
            let mut view = out.try_as_plain_ram_mut()?;
            let weights = weights.as_slice::<f32>()?;
            weighted_sums(weights, x, [r, c, t], view.as_slice_mut::<f32>()?)?;
        }
        Ok(tvec!(out.into_tvalue()))
    }
}

impl TypedOp for VoxelAttention {
    fn output_facts(&self, inputs: &[&TypedFact]) -> TractResult<TVec<TypedFact>> {
        let (q, x) = (inputs[0], inputs[1]);
        let c = x.shape[1].to_usize()?;
        Ok(tvec!(f32::fact([q.shape.volume().to_usize()? / c, c])))
    }

    as_op!();
}

/// `out[r, c] = Σ_t weights[r, t] x[c, t]` for `weights` `[R, T]` and `x`
/// `[C, T]`: runs of voxels in parallel, each into its own partial sums.
fn weighted_sums(
    weights: &[f32],
    x: &[f32],
    [r, c, t]: [usize; 3],
    out: &mut [f32],
) -> TractResult<()> {
    ensure!(
        super::conv3d::has_avx512(),
        "the weighted sums need AVX-512F"
    );
    ensure!(weights.len() >= r * t && x.len() >= c * t && out.len() >= r * c);
    let run = t.div_ceil(ITEMS).next_multiple_of(LANES).max(MIN_RUN);
    let runs = t.div_ceil(run);
    let mut partial = vec![0.0f32; runs * r * c];
    super::parallel::for_each_plane_mut((&mut partial, r * c), |i, sums| {
        let voxels = i * run..t.min((i + 1) * run);
        // SAFETY: the CPU has AVX-512F (checked above); the slices hold
        // the shapes given (checked above).
        #[cfg(target_arch = "x86_64")]
        unsafe {
            avx512::weighted_sums(weights, x, [r, c, t], voxels, sums)
        };
    });
    out[..r * c].fill(0.0);
    for sums in partial.chunks_exact(r * c) {
        for (o, &s) in out.iter_mut().zip(sums) {
            *o += s;
        }
    }
    Ok(())
}

#[cfg(target_arch = "x86_64")]
mod avx512 {
    use core::ops::Range;
    use std::arch::x86_64::*;

    use super::LANES;

    /// Rows and channels per register block.
    const SIDE: usize = 4;

    /// `sums[r, c] = Σ_{t in voxels} weights[r, t] x[c, t]` (see
    /// `weighted_sums`), in register blocks of four rows by four channels,
    /// 16 voxels per vector; blocks at the edges repeat their last row or
    /// channel and keep only the ones that exist.
    ///
    /// # Safety
    /// The CPU has AVX-512F.
    #[target_feature(enable = "avx512f")]
    pub(super) unsafe fn weighted_sums(
        weights: &[f32],
        x: &[f32],
        [r, c, t]: [usize; 3],
        voxels: Range<usize>,
        sums: &mut [f32],
    ) {
        let len = voxels.len();
        for c0 in (0..c).step_by(SIDE) {
            let channels: [&[f32]; SIDE] =
                core::array::from_fn(|j| &x[(c0 + j).min(c - 1) * t + voxels.start..][..len]);
            for r0 in (0..r).step_by(SIDE) {
                let rows: [&[f32]; SIDE] = core::array::from_fn(|i| {
                    &weights[(r0 + i).min(r - 1) * t + voxels.start..][..len]
                });
                let mut acc = [[_mm512_setzero_ps(); SIDE]; SIDE];
                let step = |acc: &mut [[__m512; SIDE]; SIDE], v: usize, mask: __mmask16| {
                    let load = |values: &[f32]| {
                        // SAFETY: `v < len`; the mask keeps the load inside
                        // `values` (all 16 lanes where `v + 16 <= len`).
                        unsafe { _mm512_maskz_loadu_ps(mask, values.as_ptr().add(v)) }
                    };
                    let xs = channels.map(load);
                    for (acc, row) in acc.iter_mut().zip(rows) {
                        let w = load(row);
                        for (acc, &x) in acc.iter_mut().zip(&xs) {
                            *acc = _mm512_fmadd_ps(w, x, *acc);
                        }
                    }
                };
                let whole = len / LANES * LANES;
                for v in (0..whole).step_by(LANES) {
                    step(&mut acc, v, 0xffff);
                }
                if whole < len {
                    step(&mut acc, whole, ((1u32 << (len - whole)) - 1) as __mmask16);
                }
                for (i, acc) in acc.iter().enumerate().take(r - r0) {
                    for (j, &acc) in acc.iter().enumerate().take(c - c0) {
                        sums[(r0 + i) * c + c0 + j] = _mm512_reduce_add_ps(acc);
                    }
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_attention_equals_its_definition() {
        if !super::super::conv3d::has_avx512() {
            return;
        }
        // Rows and channels under, at and past a register block; voxels
        // under a vector, a remainder, several runs; scores large enough
        // that the softmax's maximum matters.
        for [r, c, t] in [[3, 5, 7], [4, 4, 64], [11, 9, 1001], [44, 16, 4096]] {
            let draw = |n: usize, seed: usize, scale: f32| -> Vec<f32> {
                (0..n)
                    .map(|i| (((i * 7919 + seed) % 1013) as f32 / 1013.0 - 0.5) * scale)
                    .collect()
            };
            let (q, x) = (draw(r * c, 1, 4.0), draw(c * t, 2, 3.0));
            let queries = Tensor::from_shape(&[r, c], &q).expect("queries");
            let voxels = Tensor::from_shape(&[1, c, t], &x).expect("voxels");
            let inputs = tvec!(queries.into_tvalue(), voxels.into_tvalue());
            let got = VoxelAttention.eval(&EvalContext::out_of_plan(), inputs);
            let got = got.expect("evaluates").remove(0);
            assert_eq!(got.shape(), [r, c]);
            let got = got.try_as_plain_ram().expect("plain");
            let got = got.as_slice::<f32>().expect("f32");
            for row in 0..r {
                let scores: Vec<f64> = (0..t)
                    .map(|v| {
                        (0..c)
                            .map(|k| f64::from(q[row * c + k]) * f64::from(x[k * t + v]))
                            .sum()
                    })
                    .collect();
                let max = scores.iter().copied().fold(f64::NEG_INFINITY, f64::max);
                let weights: Vec<f64> = scores.iter().map(|s| (s - max).exp()).collect();
                let total: f64 = weights.iter().sum();
                for k in 0..c {
                    let want = (0..t)
                        .map(|v| weights[v] * f64::from(x[k * t + v]))
                        .sum::<f64>()
                        / total;
                    let value = f64::from(got[row * c + k]);
                    // Scores reach ±20 here, so their f32 rounding moves
                    // the softmax's weights by some 1e-5 of themselves.
                    assert!(
                        (value - want).abs() <= 1e-4 * (1.0 + want.abs()),
                        "[{r}, {c}, {t}], row {row}, channel {k}: {value} vs {want}"
                    );
                }
            }
        }
    }
}
