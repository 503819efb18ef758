//! Products of many rows by a small constant matrix, as one tract op.
//!
//! The task encoder's foreground mean pools each class's mask onto every
//! level's grid with the adjoint of the trilinear upsampling, one axis at
//! a time (the exporter's `adjoint_*` matrices): the first product takes
//! the mask's 128^2 rows of 128 values to 8, 16 or 32 columns. tract runs
//! it as a matrix product that packs the whole mask first: at the full
//! size 8-11 ms of each class's 90-125 ms for the three levels (issue 20).
//! [`RowProduct`] reads each row once, in place, and skips its runs of 16
//! zeros (most of a mask), accumulating the matrix's rows in registers
//! for the rest. [`replacement`] takes such `EinSum` nodes: the last axis
//! of a tensor of at least [`MIN_ROWS`] rows by a constant of at most
//! [`MAX_COLUMNS`] columns.

use std::prelude::rust_2024::*;
use std::sync::Arc;
use std::{format, vec};

use tract_onnx::tract_core::internal::*;
use tract_onnx::tract_core::ops::einsum::EinSum;

use super::parallel::SharedOut;

/// Fewest rows for which the op stands in for tract's product: below
/// that, tract's packing costs little (the rows of tokens by weights, for
/// one; the small model's masks have 1024 rows).
const MIN_ROWS: usize = 1024;
/// Most columns the op computes (two vectors of 16 per row).
const MAX_COLUMNS: usize = 32;
/// Values per vector.
const LANES: usize = 16;
/// Rows one work item computes.
const ROWS: usize = 256;

/// [`RowProduct`] for `node` where it is an `EinSum` of an f32 tensor `x`
/// and a constant f32 matrix `a` (`[K, N]`, `N` at most [`MAX_COLUMNS`])
/// that sums over `x`'s last axis and `a`'s first, keeps `x`'s other axes
/// in their order (or drops those of size one) and puts `a`'s columns
/// last, where `x` has at least [`MIN_ROWS`] rows and the CPU has
/// AVX-512. Its input is `x`.
pub(crate) fn replacement(
    model: &TypedModel,
    node: &TypedNode,
) -> TractResult<Option<(RowProduct, OutletId)>> {
    let Some(op) = node.op_as::<EinSum>() else {
        return Ok(None);
    };
    let &[x, a] = node.inputs.as_slice() else {
        return Ok(None);
    };
    if !super::conv3d::available() || op.q_params.is_some() {
        return Ok(None);
    }
    let (x_fact, a_fact) = (model.outlet_fact(x)?, model.outlet_fact(a)?);
    let out_fact = model.outlet_fact(OutletId::new(node.id, 0))?;
    let (Some(shape), Some(matrix)) = (x_fact.shape.as_concrete(), a_fact.konst.clone()) else {
        return Ok(None);
    };
    let f32s = x_fact.datum_type == f32::datum_type() && matrix.datum_type() == f32::datum_type();
    let &[k, n] = matrix.shape() else {
        return Ok(None);
    };
    let rank = shape.len();
    if !f32s || rank == 0 || shape[rank - 1] != k || n > MAX_COLUMNS {
        return Ok(None);
    }
    let rows: usize = shape[..rank - 1].iter().product();
    let out_rank = out_fact.rank();
    // x's kept axes in order, each where the output has it.
    let mut kept = Vec::new();
    let serves = op.axes.iter_all_axes().all(|axis| {
        let (in_x, in_a, out) = (&*axis.inputs[0], &*axis.inputs[1], &*axis.outputs[0]);
        match (in_x, in_a, out) {
            (&[i], &[0], &[]) => i == rank - 1,
            (&[], &[1], &[o]) => o + 1 == out_rank,
            (&[i], &[], &[o]) => {
                kept.push((i, o));
                true
            }
            (&[i], &[], &[]) => shape[i] == 1,
            _ => false,
        }
    });
    kept.sort_unstable();
    let in_order = kept.iter().enumerate().all(|(j, &(_, o))| o == j) && kept.len() + 1 == out_rank;
    if !serves || !in_order || rows < MIN_ROWS {
        return Ok(None);
    }
    let matrix = matrix.try_as_plain_ram()?;
    let kept = kept.iter().map(|&(i, _)| i).collect();
    let op = RowProduct {
        kept,
        ..RowProduct::new(matrix.as_slice::<f32>()?, [k, n])
    };
    Ok(Some((op, x)))
}

/// `y[r, j] = Σ_k x[r, k] a[k, j]` over the rows `r` of `x` (its last axis
/// `k`), `a` a constant `[K, N]`; the output has `x`'s axes `kept` (all
/// but the last, less some of size one), then `N`.
#[derive(Debug, Clone)]
pub(crate) struct RowProduct {
    /// The input axes the output keeps, in order.
    kept: Vec<usize>,
    /// `K`.
    depth: usize,
    /// `N`.
    columns: usize,
    /// `a`, each row padded to [`MAX_COLUMNS`] with zeros.
    matrix: Arc<Vec<f32>>,
}

/// Two ops are the same when they share their matrix.
impl PartialEq for RowProduct {
    fn eq(&self, other: &Self) -> bool {
        Arc::ptr_eq(&self.matrix, &other.matrix)
    }
}

impl Eq for RowProduct {}

impl RowProduct {
    fn new(a: &[f32], [k, n]: [usize; 2]) -> Self {
        let mut matrix = vec![0.0; k * MAX_COLUMNS];
        for (padded, row) in matrix.chunks_exact_mut(MAX_COLUMNS).zip(a.chunks_exact(n)) {
            padded[..n].copy_from_slice(row);
        }
        RowProduct {
            kept: Vec::new(),
            depth: k,
            columns: n,
            matrix: Arc::new(matrix),
        }
    }
}

impl Op for RowProduct {
    fn name(&self) -> StaticName {
        "IrisRowProduct".into()
    }

    fn info(&self) -> TractResult<Vec<String>> {
        Ok(vec![format!(
            "rows of {} by [{}, {}]",
            self.depth, self.depth, self.columns
        )])
    }

    fn validation(&self) -> Validation {
        Validation::Rounding
    }

    op_as_typed_op!();
}

impl EvalOp for RowProduct {
    op_out_of_plan!();

    fn eval(&self, _ctx: &EvalContext, inputs: TVec<TValue>) -> TractResult<TVec<TValue>> {
        let x = args_1!(inputs);
        let (k, n) = (self.depth, self.columns);
        ensure!(
            x.datum_type() == f32::datum_type() && x.shape().last() == Some(&k),
            "row product: input {:?} {:?}, expected f32 [.., {k}]",
            x.datum_type(),
            x.shape()
        );
        ensure!(
            super::conv3d::has_avx512(),
            "the row product needs AVX-512F"
        );
        let rows = x.len() / k.max(1);
        let shape = self.output_shape(x.shape());
        // SAFETY: every row of the output is written below.
        let mut out = unsafe { super::parallel::unwritten(&shape)? };
        {
            let mut view = out.try_as_plain_ram_mut()?;
            let y = view.as_slice_mut::<f32>()?;
            ensure!(
                rows * n == y.len(),
                "row product: output {shape:?} for {rows} rows"
            );
            let x = x.try_as_plain_ram()?;
            let x = x.as_slice::<f32>()?;
            let y = SharedOut::new(y);
            super::parallel::for_each_with(
                rows.div_ceil(ROWS),
                || (),
                |_, item| {
                    let first = item * ROWS;
                    let count = ROWS.min(rows - first);
                    // SAFETY: the items write disjoint runs of rows.
                    let y = unsafe { y.slice(first * n, count * n) };
                    let x = &x[first * k..][..count * k];
                    #[cfg(target_arch = "x86_64")]
                    let row = match n {
                        0..=LANES => avx512::row::<1>,
                        _ => avx512::row::<2>,
                    };
                    for (x, y) in x.chunks_exact(k).zip(y.chunks_exact_mut(n)) {
                        // SAFETY: the CPU has AVX-512F (checked above).
                        #[cfg(target_arch = "x86_64")]
                        unsafe {
                            row(x, &self.matrix, y)
                        };
                    }
                },
            );
        }
        Ok(tvec!(out.into_tvalue()))
    }
}

impl RowProduct {
    /// The output's shape for an input of `shape`.
    fn output_shape(&self, shape: &[usize]) -> Vec<usize> {
        let mut out: Vec<usize> = self.kept.iter().map(|&i| shape[i]).collect();
        out.push(self.columns);
        out
    }
}

impl TypedOp for RowProduct {
    fn output_facts(&self, inputs: &[&TypedFact]) -> TractResult<TVec<TypedFact>> {
        let shape = inputs[0]
            .shape
            .as_concrete()
            .context("row product: shape unknown")?;
        Ok(tvec!(f32::fact(self.output_shape(shape))))
    }

    as_op!();
}

#[cfg(target_arch = "x86_64")]
mod avx512 {
    use std::arch::x86_64::*;

    use super::{LANES, MAX_COLUMNS};

    /// `y[j] = Σ_k x[k] matrix[k, j]` for one row `x`, `matrix` `[K,
    /// MAX_COLUMNS]`, `y` its first columns (at most `16 * HALVES`); runs
    /// of 16 zeros in `x` are skipped. The nonzero values go by pairs into
    /// two sets of sums, so that consecutive multiply-adds do not wait on
    /// each other.
    ///
    /// # Safety
    /// The CPU has AVX-512F.
    #[target_feature(enable = "avx512f")]
    pub(super) unsafe fn row<const HALVES: usize>(x: &[f32], matrix: &[f32], y: &mut [f32]) {
        let mut sums = [[_mm512_setzero_ps(); HALVES]; 2];
        let add = |sums: &mut [__m512; HALVES], value: f32, row: &[f32]| {
            let value = _mm512_set1_ps(value);
            for (half, sum) in sums.iter_mut().enumerate() {
                // SAFETY: `row` holds `MAX_COLUMNS` values.
                let a = unsafe { _mm512_loadu_ps(row[half * LANES..][..LANES].as_ptr()) };
                *sum = _mm512_fmadd_ps(value, a, *sum);
            }
        };
        for (values, rows) in x.chunks(LANES).zip(matrix.chunks(LANES * MAX_COLUMNS)) {
            let mask = ((1u32 << values.len()) - 1) as __mmask16;
            // SAFETY: the mask keeps the load inside `values`.
            let v = unsafe { _mm512_maskz_loadu_ps(mask, values.as_ptr()) };
            let mut nonzero = _mm512_cmpneq_ps_mask(v, _mm512_setzero_ps()) as u32;
            let [first, second] = &mut sums;
            if nonzero == 0xffff {
                for (pair, rows) in values
                    .chunks_exact(2)
                    .zip(rows.chunks_exact(2 * MAX_COLUMNS))
                {
                    add(first, pair[0], rows);
                    add(second, pair[1], &rows[MAX_COLUMNS..]);
                }
                continue;
            }
            while nonzero != 0 {
                let i = nonzero.trailing_zeros() as usize;
                nonzero &= nonzero - 1;
                add(first, values[i], &rows[i * MAX_COLUMNS..]);
                if nonzero == 0 {
                    break;
                }
                let i = nonzero.trailing_zeros() as usize;
                nonzero &= nonzero - 1;
                add(second, values[i], &rows[i * MAX_COLUMNS..]);
            }
        }
        let mut out = [0.0f32; MAX_COLUMNS];
        for half in 0..HALVES {
            let sum = _mm512_add_ps(sums[0][half], sums[1][half]);
            // SAFETY: `out` holds 32 values.
            unsafe { _mm512_storeu_ps(out[half * LANES..].as_mut_ptr(), sum) };
        }
        y.copy_from_slice(&out[..y.len()]);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_product_equals_its_definition() {
        if !super::super::conv3d::has_avx512() {
            std::println!("skipped: this CPU has no AVX-512F, the op is not used");
            return;
        }
        // Depths under, at and past a run of 16 with a rest; columns in one
        // vector and in two; rows past a work item with a rest; rows
        // dense, empty, and with runs of zeros (as a mask's).
        for (rows, k, n) in [
            (3usize, 7usize, 1usize),
            (300, 16, 16),
            (517, 40, 17),
            (260, 128, 32),
        ] {
            let a: Vec<f32> = (0..k * n)
                .map(|i| ((i * 37) % 101) as f32 / 50.0 - 1.0)
                .collect();
            let x: Vec<f32> = (0..rows * k)
                .map(|i| match (i / k) % 3 {
                    0 => ((i * 53) % 97) as f32 / 48.0 - 1.0,
                    1 => 0.0,
                    _ => f32::from(u8::from((i % k) / 5 % 4 == 1)),
                })
                .collect();
            let op = RowProduct {
                kept: vec![0, 1],
                ..RowProduct::new(&a, [k, n])
            };
            let shape = [1, rows, k];
            let input = Tensor::from_shape(&shape, &x).expect("x").into_tvalue();
            let got = op
                .eval(&EvalContext::out_of_plan(), tvec!(input))
                .expect("runs");
            assert_eq!(got[0].shape(), [1, rows, n]);
            let got = got[0].try_as_plain_ram().expect("plain");
            let got = got.as_slice::<f32>().expect("f32");
            for (r, j) in (0..rows).flat_map(|r| (0..n).map(move |j| (r, j))) {
                let want: f64 = (0..k)
                    .map(|i| f64::from(x[r * k + i]) * f64::from(a[i * n + j]))
                    .sum();
                let value = f64::from(got[r * n + j]);
                assert!(
                    (value - want).abs() <= 1e-5 * (1.0 + want.abs()),
                    "{rows} x {k} by {n}: [{r}, {j}] {value} vs {want}"
                );
            }
        }
    }
}
