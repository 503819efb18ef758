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

use std::collections::HashMap;
use std::prelude::rust_2024::*;
use std::{format, vec};

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

/// The einsum equations of a folded attention as tract declutters it, for
/// one class (voxels `[1, C, T]`) or for `N` classes at once (`[1, N, C,
/// T]`, the task encoder planned for several classes).
struct Form {
    /// The weighted sum of the voxels by the softmax's weights.
    read: &'static str,
    /// The scores: every head's queries at once, or per head (then a
    /// reshape that stacks the heads' rows); tract names the axes in
    /// several ways.
    scores: &'static [&'static str],
    /// The softmax's axis, the voxels'.
    softmax_axis: usize,
    batched: bool,
}

const FORMS: [Form; 2] = [
    Form {
        read: "qt,nct->qc",
        scores: &["mk,akn->mn", "bmk,akn->bmn"],
        softmax_axis: 1,
        batched: false,
    },
    Form {
        read: "nqt,anct->nqc",
        scores: &["amk,bakn->amn", "amk,cakn->amn", "abmk,cakn->abmn"],
        softmax_axis: 2,
        batched: true,
    },
];

/// [`VoxelAttention`] for `node` where it is the weighted sum of a folded
/// attention as tract declutters it (one of [`FORMS`]): an `EinSum` of a
/// `Softmax` over the voxels of the scores and of the voxels `X` (`[1, C,
/// T]`, or `[1, N, C, T]` for `N` classes), the scores an `EinSum` of the
/// queries and the same `X` (per head, then a reshape). Returns the op and
/// its inputs, the queries and `X`; the op stands for `node`'s output.
pub(crate) fn replacement(
    model: &TypedModel,
    node: &TypedNode,
) -> TractResult<Option<(VoxelAttention, [OutletId; 2])>> {
    if !super::conv3d::available() {
        return Ok(None);
    }
    let Some((form, [weights, voxels])) = FORMS
        .iter()
        .find_map(|form| Some((form, einsum(node, form.read)?)))
    else {
        return Ok(None);
    };
    let found = || -> Option<OutletId> {
        let softmax = producer_for(model, weights, node.id)?;
        let op = softmax.op_as::<Softmax>()?;
        if op.axes.as_slice() != [form.softmax_axis]
            || op.kind != SoftmaxKind::Softmax
            || op.quant_output_dt.is_some()
        {
            return None;
        }
        let mut scores = producer_for(model, softmax.inputs[0], softmax.id)?;
        if let Some(AxisOp::Reshape(..)) = scores.op_as::<AxisOp>() {
            scores = producer_for(model, scores.inputs[0], scores.id)?;
        }
        let [queries, x] = form
            .scores
            .iter()
            .find_map(|equation| einsum(scores, equation))?;
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
    let (Some(q_shape), Some(x_shape), Some(out_shape)) = shapes else {
        return Ok(None);
    };
    // `[1, C, T]` and `[R, C]`, or `[1, N, C, T]` and `[N, R, C]`.
    let (n, c, t, r) = match (form.batched, x_shape, out_shape) {
        (false, &[1, c, t], &[r, c2]) if c2 == c => (1, c, t, r),
        (true, &[1, n, c, t], &[n2, r, c2]) if n2 == n && c2 == c => (n, c, t, r),
        _ => return Ok(None),
    };
    let fits = q.datum_type == f32::datum_type()
        && x.datum_type == f32::datum_type()
        && q_shape.last() == Some(&c)
        && q_shape.iter().product::<usize>() == n * r * c
        && t > 0;
    let op = VoxelAttention {
        batched: form.batched,
    };
    Ok(fits.then_some((op, [queries, voxels])))
}

/// The voxels (`X`) the [`VoxelAttention`]s of `model` read, each once, in
/// the order of the plan: the task encoder's context voxels, each class's
/// own work up to there, the queries' from there (see `split::per_class`).
pub(crate) fn context_voxels(model: &TypedModel) -> Vec<OutletId> {
    let mut voxels = Vec::new();
    for node in model.eval_order().unwrap_or_default() {
        let node = model.node(node);
        if node.op_is::<VoxelAttention>()
            && let Some(&x) = node.inputs.get(1)
            && !voxels.contains(&x)
        {
            voxels.push(x);
        }
    }
    voxels
}

/// `model` with each of its inputs `stacked` (`[1, N, C, T]`, the voxels
/// of `N` classes one after the other) replaced by `N` inputs `[1, C, T]`,
/// one per class, in its place, where batched [`VoxelAttention`]s alone
/// read them, as their voxels: the classes' voxels, computed one class at
/// a time, are then read where they lie, not copied into one tensor (22
/// MB a class at the full size, 2-12 ms to copy). None where another op
/// reads one of them.
///
/// # Errors
/// Where tract cannot wire a node.
pub(crate) fn voxels_apart(
    model: &TypedModel,
    stacked: &[OutletId],
) -> TractResult<Option<TypedModel>> {
    let attention_only = |x: OutletId| {
        let readers = model.outlet_successors(x);
        !readers.is_empty()
            && readers.iter().all(|inlet| {
                let node = model.node(inlet.node);
                inlet.slot == 1
                    && node.inputs.len() == 2
                    && node.op_as::<VoxelAttention>().is_some_and(|op| op.batched)
            })
    };
    if !stacked.iter().all(|&x| attention_only(x)) {
        return Ok(None);
    }
    let mut out = TypedModel::default();
    let mut wired: HashMap<OutletId, TVec<OutletId>> = HashMap::new();
    let inputs = model.input_outlets()?.to_vec();
    for id in model.eval_order()? {
        let node = model.node(id);
        let outlet = OutletId::new(id, 0);
        if inputs.contains(&outlet) {
            let fact = model.outlet_fact(outlet)?;
            let sources = match fact.shape.as_concrete() {
                Some(&[1, n, c, t]) if stacked.contains(&outlet) => (0..n)
                    .map(|k| out.add_source(format!("{}.{k}", node.name), f32::fact([1, c, t])))
                    .collect::<TractResult<TVec<_>>>()?,
                _ if stacked.contains(&outlet) => return Ok(None),
                _ => tvec!(out.add_source(&node.name, fact.clone())?),
            };
            wired.insert(outlet, sources);
            continue;
        }
        let mut wires = TVec::new();
        for i in &node.inputs {
            wires.extend(wired[i].iter().copied());
        }
        let outputs = out.wire_node(&node.name, node.op.clone(), &wires)?;
        for (slot, output) in outputs.into_iter().enumerate() {
            wired.insert(OutletId::new(id, slot), tvec!(output));
        }
    }
    let mut new_inputs = Vec::new();
    for i in &inputs {
        new_inputs.extend(wired[i].iter().copied());
    }
    out.set_input_outlets(&new_inputs)?;
    let outputs: Vec<OutletId> = model
        .output_outlets()?
        .iter()
        .map(|o| wired[o][0])
        .collect();
    out.select_output_outlets(&outputs)?;
    Ok(Some(out))
}

/// `O = softmax(Q X) Xᵀ`, the softmax over the voxels: inputs the queries
/// `Q` (`[..., C]`, `R` rows in all) and the voxels `X` (`[1, C, T]`),
/// output `[R, C]`; batched, each of `N` classes' (`Q` `[N, ..., C]`, `X`
/// `[1, N, C, T]`, or `N` inputs `[1, C, T]` after the queries, one per
/// class, so that classes computed apart need not be copied into one
/// tensor; output `[N, R, C]`).
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub(crate) struct VoxelAttention {
    pub batched: bool,
}

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
        let Some((queries, voxels)) = inputs.split_first() else {
            bail!("voxel attention: no inputs");
        };
        // Each class's voxels `[C, T]`: from one tensor `[1, C, T]` (one
        // class) or `[1, N, C, T]`, or from one tensor `[1, C, T]` per class.
        let views = voxels
            .iter()
            .map(|x| {
                ensure!(
                    x.datum_type() == f32::datum_type(),
                    "voxel attention: voxels of {:?}, expected f32",
                    x.datum_type()
                );
                x.try_as_plain_ram()
            })
            .collect::<TractResult<Vec<_>>>()?;
        let shapes: Vec<&[usize]> = voxels.iter().map(|x| x.shape()).collect();
        let (c, t, classes): (usize, usize, Vec<&[f32]>) = match (self.batched, shapes.as_slice()) {
            (false, [[1, c, t]]) => (*c, *t, vec![views[0].as_slice::<f32>()?]),
            (true, [[1, _, c, t]]) => {
                let x = views[0].as_slice::<f32>()?;
                (*c, *t, x.chunks_exact((c * t).max(1)).collect())
            }
            (true, [[1, c, t], ..]) if shapes.iter().all(|s| s == &[1, *c, *t]) => {
                let classes = views
                    .iter()
                    .map(|v| v.as_slice::<f32>())
                    .collect::<TractResult<_>>()?;
                (*c, *t, classes)
            }
            _ => bail!(
                "voxel attention: voxels {shapes:?}, expected [1, {}C, T]",
                if self.batched { "N, " } else { "" }
            ),
        };
        let n = classes.len();
        let q = queries.try_as_plain_ram()?;
        let q = q.as_slice::<f32>()?;
        ensure!(
            c > 0 && t > 0 && n > 0 && q.len() % (n * c) == 0,
            "voxel attention: {} query values for {n} x {c} channels and {t} voxels",
            q.len()
        );
        let r = q.len() / (n * c);
        let out_shape = if self.batched {
            vec![n, r, c]
        } else {
            vec![r, c]
        };
        let mut out = Tensor::zero::<f32>(&out_shape)?;
        {
            let mut view = out.try_as_plain_ram_mut()?;
            let out = view.as_slice_mut::<f32>()?;
            for ((q, x), out) in q
                .chunks_exact(r * c)
                .zip(classes)
                .zip(out.chunks_exact_mut(r * c))
            {
                attend(ctx, q, x, [r, c, t], out)?;
            }
        }
        Ok(tvec!(out.into_tvalue()))
    }
}

/// One class's `out = softmax(q x) xᵀ` for `q` `[R, C]` and `x` `[C, T]`.
fn attend(
    ctx: &EvalContext,
    q: &[f32],
    x: &[f32],
    [r, c, t]: [usize; 3],
    out: &mut [f32],
) -> TractResult<()> {
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
    weighted_sums(weights.as_slice::<f32>()?, x, [r, c, t], out)
}

impl TypedOp for VoxelAttention {
    fn output_facts(&self, inputs: &[&TypedFact]) -> TractResult<TVec<TypedFact>> {
        let (q, x) = (inputs[0], inputs[1]);
        let c = x.shape[x.rank() - 2].to_usize()?;
        let rows = q.shape.volume().to_usize()? / c;
        Ok(tvec!(match (self.batched, x.rank()) {
            (false, _) => f32::fact([rows, c]),
            (true, 4) => {
                let n = x.shape[1].to_usize()?;
                f32::fact([n, rows / n, c])
            }
            // One input per class.
            (true, _) => {
                let n = inputs.len() - 1;
                f32::fact([n, rows / n, c])
            }
        }))
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
            let op = VoxelAttention { batched: false };
            let got = op.eval(&EvalContext::out_of_plan(), inputs);
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

    #[test]
    fn a_batch_of_classes_is_each_class_on_its_own() {
        if !super::super::conv3d::has_avx512() {
            return;
        }
        let [n, r, c, t] = [3, 11, 9, 1001];
        let draw = |len: usize, seed: usize| -> Vec<f32> {
            (0..len)
                .map(|i| (((i * 7919 + seed) % 1013) as f32 / 1013.0 - 0.5) * 4.0)
                .collect()
        };
        let (q, x) = (draw(n * r * c, 5), draw(n * c * t, 6));
        let run = |batched: bool, q: &[f32], q_shape: &[usize], x: &[f32], x_shape: &[usize]| {
            let inputs = tvec!(
                Tensor::from_shape(q_shape, q)
                    .expect("queries")
                    .into_tvalue(),
                Tensor::from_shape(x_shape, x)
                    .expect("voxels")
                    .into_tvalue()
            );
            let out = VoxelAttention { batched }
                .eval(&EvalContext::out_of_plan(), inputs)
                .expect("evaluates")
                .remove(0);
            let shape = out.shape().to_vec();
            let values = out.try_as_plain_ram().expect("plain");
            (shape, values.as_slice::<f32>().expect("f32").to_vec())
        };
        let (shape, batch) = run(true, &q, &[n, r, c], &x, &[1, n, c, t]);
        assert_eq!(shape, [n, r, c]);
        for k in 0..n {
            let q = &q[k * r * c..][..r * c];
            let x = &x[k * c * t..][..c * t];
            let (_, one) = run(false, q, &[r, c], x, &[1, c, t]);
            assert_eq!(&batch[k * r * c..][..r * c], one.as_slice(), "class {k}");
        }
    }
}
