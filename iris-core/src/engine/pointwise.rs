//! The 1x1x1 convolution as one tract op, where the CPU has AVX-512.
//!
//! The task encoder's context path widens each encoder level's features to
//! `s³` channels and narrows them back (`expand` and `squeeze`: 7.4 GFLOP
//! per class at the full size). tract runs them as matrix products that
//! packed their input first and reached about 130 GFLOP/s on this 2-core
//! VM, a little over half its multiply-add peak: 56 ms of the one-class
//! task encoder's 175-200 ms (issue 20). [`PointwiseConv`] runs them with
//! the Winograd products' register block (eight output channels by two
//! vectors of 16 voxels, the weight broadcast): each run of 32 voxels'
//! input channels is copied side by side once, then every block of output
//! channels reads it from the core's cache. Runs of voxels (and, where
//! they are few, blocks of output channels) go in parallel on the model's
//! thread pool.
//!
//! [`replacement`] takes each 1x1x1 convolution it serves before tract
//! declutters the graph (which would turn it into a product and a sum).

use std::prelude::rust_2024::*;
use std::sync::Arc;
use std::vec;

use tract_onnx::tract_core::internal::*;
use tract_onnx::tract_core::ops::cnn::conv::Conv;

use super::parallel::SharedOut;

/// Output channels per register block.
const BLOCK: usize = 8;
/// Voxels per register block: two vectors of 16.
const TILE: usize = 32;
/// Bytes of copied input one work item keeps for its runs of voxels: its
/// runs stay in the core's second-level cache while every block of output
/// channels reads them.
const PANEL_BYTES: usize = 256 * 1024;
/// Work items the op aims at, so that two or more threads share even a
/// small convolution.
const ITEMS: usize = 8;

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

/// A matrix `[rows, columns]` packed for [`PackedRows::times`]: `[rows /
/// BLOCK (rounded up)][columns][BLOCK]`, zero past the last row.
#[derive(Debug)]
pub(crate) struct PackedRows {
    rows: usize,
    columns: usize,
    values: Vec<f32>,
}

impl PackedRows {
    /// Packs `matrix` (`[rows, columns]`, C order).
    pub(crate) fn new(matrix: &[f32], [rows, columns]: [usize; 2]) -> Self {
        let mut values = vec![0.0; rows.div_ceil(BLOCK) * columns * BLOCK];
        for (r, row) in matrix.chunks_exact(columns).take(rows).enumerate() {
            let (block, lane) = (r / BLOCK, r % BLOCK);
            for (c, &value) in row.iter().enumerate() {
                values[(block * columns + c) * BLOCK + lane] = value;
            }
        }
        PackedRows {
            rows,
            columns,
            values,
        }
    }

    /// `out[r, v] = bias[r] + Σ_c self[r, c] input[c, v]` (no bias where
    /// `None`) for `input` `[columns, voxels]` and `out` `[rows, voxels]`,
    /// C order.
    ///
    /// # Errors
    /// Where the CPU lacks AVX-512F (the engine's ops that call this are
    /// made only where it has it) or a slice is shorter than its shape.
    pub(crate) fn times(
        &self,
        input: &[f32],
        bias: Option<&[f32]>,
        voxels: usize,
        out: SharedOut<'_>,
    ) -> TractResult<()> {
        let (cin, cout) = (self.columns, self.rows);
        ensure!(super::conv3d::has_avx512(), "the products need AVX-512F");
        ensure!(
            input.len() >= cin * voxels
                && out.len() >= cout * voxels
                && bias.is_none_or(|b| b.len() >= cout),
            "products: [{cout}, {cin}] by [{cin}, {voxels}] with {} inputs, {} outputs",
            input.len(),
            out.len()
        );
        let tiles = voxels.div_ceil(TILE);
        let blocks = cout.div_ceil(BLOCK);
        if tiles == 0 || blocks == 0 {
            return Ok(());
        }
        // Runs of tiles per item, as many as the panel holds; then the
        // blocks of output channels split where the runs are too few.
        let per_item = (PANEL_BYTES / (cin.max(1) * TILE * 4)).clamp(1, tiles);
        let runs = tiles.div_ceil(per_item);
        let parts = ITEMS.div_ceil(runs).min(blocks);
        let blocks_per_part = blocks.div_ceil(parts);
        super::parallel::for_each_with(runs * parts, Vec::new, |panel: &mut Vec<f32>, item| {
            let (run, part) = (item / parts, item % parts);
            let first = run * per_item;
            let last = tiles.min(first + per_item);
            // The run's input, tile by tile: `[tile][Cin][TILE]`, zero
            // past the last voxel.
            panel.clear();
            panel.resize((last - first) * cin * TILE, 0.0);
            for (t, tile) in panel.chunks_exact_mut(cin * TILE).enumerate() {
                let v0 = (first + t) * TILE;
                let count = TILE.min(voxels - v0);
                for (i, row) in tile.chunks_exact_mut(TILE).enumerate() {
                    row[..count].copy_from_slice(&input[i * voxels + v0..][..count]);
                }
            }
            let block_range = part * blocks_per_part..blocks.min((part + 1) * blocks_per_part);
            for block in block_range {
                let weights = &self.values[block * cin * BLOCK..][..cin * BLOCK];
                let rows = BLOCK.min(cout - block * BLOCK);
                let bias = bias.map(|b| &b[block * BLOCK..][..rows]);
                for (t, tile) in panel.chunks_exact(cin * TILE).enumerate() {
                    let v0 = (first + t) * TILE;
                    let target = Target {
                        out,
                        start: block * BLOCK * voxels + v0,
                        rows,
                        stride: voxels,
                        count: TILE.min(voxels - v0),
                    };
                    // SAFETY: the CPU has AVX-512F (checked above); the
                    // items write disjoint (row, voxel) ranges, inside
                    // `out` (checked above).
                    #[cfg(target_arch = "x86_64")]
                    unsafe {
                        avx512::block(weights, bias.unwrap_or(&[]), tile, target)
                    };
                }
            }
        });
        Ok(())
    }
}

/// Where one register block's results go: `rows` output channels of
/// `count` voxels from `start`, rows `stride` apart.
#[derive(Clone, Copy)]
struct Target<'a> {
    out: SharedOut<'a>,
    start: usize,
    rows: usize,
    stride: usize,
    count: usize,
}

#[cfg(target_arch = "x86_64")]
mod avx512 {
    use std::arch::x86_64::*;

    use super::{BLOCK, TILE, Target};

    /// A mask of lanes `0..n` (at most 16).
    fn lanes(n: usize) -> __mmask16 {
        ((1u32 << n.min(16)) - 1) as __mmask16
    }

    /// `BLOCK` output channels of one tile: `bias + weights · tile`, with
    /// `weights` `[Cin][BLOCK]`, `tile` `[Cin][TILE]` and `bias` the
    /// block's rows' (zero past its end).
    ///
    /// # Safety
    /// The CPU has AVX-512F; no other thread touches the target's values.
    #[target_feature(enable = "avx512f")]
    pub(super) unsafe fn block(weights: &[f32], bias: &[f32], tile: &[f32], target: Target<'_>) {
        let mut acc = [[_mm512_setzero_ps(); 2]; BLOCK];
        for (acc, &b) in acc.iter_mut().zip(bias) {
            *acc = [_mm512_set1_ps(b); 2];
        }
        for (weights, x) in weights.chunks_exact(BLOCK).zip(tile.chunks_exact(TILE)) {
            // SAFETY: `x` holds 32 values.
            let x = unsafe {
                [
                    _mm512_loadu_ps(x.as_ptr()),
                    _mm512_loadu_ps(x[16..].as_ptr()),
                ]
            };
            for (acc, &weight) in acc.iter_mut().zip(weights) {
                let weight = _mm512_set1_ps(weight);
                acc[0] = _mm512_fmadd_ps(weight, x[0], acc[0]);
                acc[1] = _mm512_fmadd_ps(weight, x[1], acc[1]);
            }
        }
        let masks = [lanes(target.count), lanes(target.count.saturating_sub(16))];
        for (o, acc) in acc.iter().enumerate().take(target.rows) {
            // SAFETY: the row's `count` values lie in the output, and only
            // this call writes them (the caller's promise).
            let row = unsafe {
                target
                    .out
                    .slice(target.start + o * target.stride, target.count)
            };
            for (v, (&acc, &mask)) in acc.iter().zip(&masks).enumerate() {
                if 16 * v < row.len() {
                    // SAFETY: the mask keeps the store inside `row`.
                    unsafe { _mm512_mask_storeu_ps(row[16 * v..].as_mut_ptr(), mask, acc) };
                }
            }
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_block_and_tail_equals_the_definition() {
        if !super::super::conv3d::has_avx512() {
            return;
        }
        // Output channels under, at and past a block; voxels under a
        // tile, a tile and a remainder, several panels; few and many input
        // channels (one run of tiles per panel at 2100).
        for (cin, cout, voxels) in [(3, 5, 7), (16, 8, 32), (9, 17, 101), (2100, 12, 70)] {
            let draw = |n: usize, seed: usize| -> Vec<f32> {
                (0..n)
                    .map(|i| ((i * 7919 + seed) % 1013) as f32 / 1013.0 - 0.5)
                    .collect()
            };
            let (kernel, bias, x) = (draw(cout * cin, 1), draw(cout, 2), draw(cin * voxels, 3));
            let weights = PackedRows::new(&kernel, [cout, cin]);
            let mut out = vec![f32::NAN; cout * voxels];
            let out_buffer = SharedOut::new(&mut out);
            weights
                .times(&x, Some(&bias), voxels, out_buffer)
                .expect("multiplies");
            for o in 0..cout {
                for v in 0..voxels {
                    let want = f64::from(bias[o])
                        + (0..cin)
                            .map(|i| f64::from(kernel[o * cin + i]) * f64::from(x[i * voxels + v]))
                            .sum::<f64>();
                    let got = f64::from(out[o * voxels + v]);
                    assert!(
                        (got - want).abs() <= 1e-5 * (1.0 + want.abs()) * (cin as f64).sqrt(),
                        "{cin} -> {cout} channels, {voxels} voxels: [{o}, {v}] {got} vs {want}"
                    );
                }
            }
        }
    }
}
