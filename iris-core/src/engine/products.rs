//! Matrix products by one register block: eight rows of a packed matrix
//! by 32 columns of another (two vectors of 16), over their shared axis,
//! each row's value broadcast against the columns' vectors (16 fused
//! multiply-adds per step, on AVX-512). Winograd's convolution runs its
//! products per tile position with it (`winograd.rs`); [`PackedRows`]
//! runs whole products with it for the 1x1x1 convolution (`pointwise.rs`)
//! and the voxel attention's scores (`attention.rs`). One thread of it ran
//! 109-115 GFLOP/s on this project's 2-core VM, about a core's measured
//! multiply-add peak (session 19).

use std::prelude::rust_2024::*;
use std::vec;

use tract_onnx::prelude::TractResult;
use tract_onnx::tract_core::internal::ensure;

use super::parallel::SharedOut;

/// Rows per register block.
pub(crate) const BLOCK: usize = 8;
/// Columns per register block: two vectors of 16.
pub(crate) const TILE: usize = 32;
/// Bytes of copied columns one work item of [`PackedRows::times`] keeps:
/// they stay in the core's second-level cache while every block of rows
/// reads them.
const PANEL_BYTES: usize = 256 * 1024;
/// Work items [`PackedRows::times`] aims at, so that two or more threads
/// share even a small product.
const ITEMS: usize = 8;

/// A matrix `[rows, columns]` packed for [`PackedRows::times`]: `[rows /
/// BLOCK (rounded up)][columns][BLOCK]`, zero past the last row.
#[derive(Debug)]
pub(crate) struct PackedRows {
    /// Rows of the matrix.
    pub rows: usize,
    /// Columns of the matrix (the products' shared axis).
    pub columns: usize,
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
        let cin = self.columns;
        ensure!(
            input.len() >= cin * voxels,
            "products: [{}, {cin}] by [{cin}, {voxels}] with {} inputs",
            self.rows,
            input.len()
        );
        let copy = |v0: usize, count: usize, tile: &mut [f32]| {
            for (i, row) in tile.chunks_exact_mut(TILE).enumerate() {
                row[..count].copy_from_slice(&input[i * voxels + v0..][..count]);
            }
        };
        self.times_with(copy, bias, voxels, out)
    }

    /// [`PackedRows::times`] on an input that `fill` makes tile by tile:
    /// `fill(v0, count, tile)` writes `input[c, v0 + t]` into `tile[c *
    /// TILE + t]` for every column `c` and `t < count` (`count` at most
    /// [`TILE`]; the rest of the tile is zero and stays so). An op whose
    /// input is a transform of a tensor (a transposition, a norm) runs
    /// the transform here, on tiles in the core's cache, rather than over
    /// the whole tensor first.
    ///
    /// # Errors
    /// As [`PackedRows::times`].
    pub(crate) fn times_with(
        &self,
        fill: impl Fn(usize, usize, &mut [f32]) + Sync,
        bias: Option<&[f32]>,
        voxels: usize,
        out: SharedOut<'_>,
    ) -> TractResult<()> {
        let (cin, cout) = (self.columns, self.rows);
        ensure!(super::conv3d::has_avx512(), "the products need AVX-512F");
        ensure!(
            out.len() >= cout * voxels && bias.is_none_or(|b| b.len() >= cout),
            "products: [{cout}, {cin}] by [{cin}, {voxels}] with {} outputs",
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
                fill(v0, TILE.min(voxels - v0), tile);
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
pub(crate) mod avx512 {
    use std::arch::x86_64::*;

    use super::{BLOCK, TILE, Target};

    /// One register block's sums: `BLOCK` rows of two vectors of 16.
    pub(crate) type Sums = [[__m512; 2]; BLOCK];

    /// `sums + weights · columns` for `weights` `[K][BLOCK]` and `columns`
    /// `[K][TILE]` (both C order, `K` steps of the shared axis).
    #[inline]
    #[target_feature(enable = "avx512f")]
    pub(crate) fn accumulate(mut sums: Sums, weights: &[f32], columns: &[f32]) -> Sums {
        for (weights, x) in weights.chunks_exact(BLOCK).zip(columns.chunks_exact(TILE)) {
            // SAFETY: `x` holds 32 values.
            let x = unsafe {
                [
                    _mm512_loadu_ps(x.as_ptr()),
                    _mm512_loadu_ps(x[16..].as_ptr()),
                ]
            };
            for (sums, &weight) in sums.iter_mut().zip(weights) {
                let weight = _mm512_set1_ps(weight);
                sums[0] = _mm512_fmadd_ps(weight, x[0], sums[0]);
                sums[1] = _mm512_fmadd_ps(weight, x[1], sums[1]);
            }
        }
        sums
    }

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
        let acc = accumulate(acc, weights, tile);
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
