//! Products of one axis of a tensor by a small constant matrix, as one
//! tract op.
//!
//! The task encoder's foreground mean pools each class's mask onto every
//! level's grid with the adjoint of the trilinear upsampling, one axis at
//! a time (the exporter's `adjoint_*` matrices): the first product takes
//! the mask's 128^2 rows of 128 values to 8, 16 or 32 columns. tract runs
//! it as a matrix product that packs the whole mask first: at the full
//! size 8-11 ms of each class's 90-125 ms for the three levels (issue 20).
//! [`RowProduct`]'s row kernel reads each row once, in place, and skips its
//! runs of 16 zeros (most of a mask), accumulating the matrix's rows in
//! registers for the rest.
//!
//! The second and third products sum over a middle axis: tract moves that
//! axis last (a copy of the tensor), packs it and multiplies, 45 of the
//! 110 ms the pooling takes for 15 classes at the full size. The op's
//! plane kernel sums, for each output plane, the input planes (the values
//! past the summed axis) the matrix weighs, skipping its zeros (an
//! adjoint weighs a few of 128), and writes the columns in the summed
//! axis's place or last, as the product has them.
//!
//! [`replacement`] takes such `EinSum` nodes: an f32 tensor's axis by a
//! constant `[K, N]`, the other axes kept in order; the last axis by at
//! most [`MAX_COLUMNS`] columns for at least [`MIN_ROWS`] rows, or an axis
//! followed by planes of at least [`MIN_PLANE`] values.

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
/// Most columns the row kernel computes (two vectors of 16 per row).
const MAX_COLUMNS: usize = 32;
/// Fewest values past the summed axis for the plane kernel: half a vector
/// (the 8^3 level's second product has planes of 8).
const MIN_PLANE: usize = 8;
/// Values per vector.
const LANES: usize = 16;
/// Rows one work item computes.
const ROWS: usize = 256;

/// [`RowProduct`] for `node` where it is an `EinSum` of an f32 tensor `x`
/// and a constant f32 matrix `a` (`[K, N]`) that sums over one axis of `x`
/// and `a`'s first, keeps `x`'s other axes in their order (dropping or
/// adding axes of size one) and puts `a`'s columns in the summed axis's
/// place or last, where the CPU has AVX-512 and a kernel serves the shape
/// (see the module's doc). Its input is `x`.
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
    let (Some(shape), Some(out_shape), Some(matrix)) = (
        x_fact.shape.as_concrete(),
        out_fact.shape.as_concrete(),
        a_fact.konst.clone(),
    ) else {
        return Ok(None);
    };
    let f32s = x_fact.datum_type == f32::datum_type() && matrix.datum_type() == f32::datum_type();
    let &[k, n] = matrix.shape() else {
        return Ok(None);
    };
    // The summed axis of x, and where a's columns go in the output.
    let (mut summed, mut columns_at) = (None, None);
    // x's kept axes, each where the output has it.
    let mut kept = Vec::new();
    let serves = op.axes.iter_all_axes().all(|axis| {
        let (in_x, in_a, out) = (&*axis.inputs[0], &*axis.inputs[1], &*axis.outputs[0]);
        match (in_x, in_a, out) {
            (&[i], &[0], &[]) => summed.replace(i).is_none(),
            (&[], &[1], &[o]) => columns_at.replace(o).is_none(),
            (&[i], &[], &[o]) => {
                kept.push((i, o));
                true
            }
            (&[i], &[], &[]) => shape[i] == 1,
            (&[], &[], &[o]) => out_shape[o] == 1,
            _ => false,
        }
    });
    let (Some(summed), Some(columns_at)) = (summed, columns_at) else {
        return Ok(None);
    };
    kept.sort_unstable();
    let in_order = kept.windows(2).all(|w| w[0].1 < w[1].1);
    if !f32s || !serves || !in_order || shape[summed] != k {
        return Ok(None);
    }
    // The columns' place among the kept axes of more than one value: after
    // those before the summed axis (in its place) or after all (last).
    let wide: Vec<(usize, usize)> = kept.into_iter().filter(|&(i, _)| shape[i] > 1).collect();
    let before_columns = wide.iter().filter(|&&(_, o)| o < columns_at).count();
    let before_summed = wide.iter().filter(|&&(i, _)| i < summed).count();
    let last = before_columns == wide.len();
    let in_place = before_columns == before_summed;
    let rows: usize = shape[..summed].iter().product();
    let plane: usize = shape[summed + 1..].iter().product();
    let matrix = matrix.try_as_plain_ram()?;
    let matrix = matrix.as_slice::<f32>()?;
    let kernel = if plane == 1 && last && n <= MAX_COLUMNS && rows >= MIN_ROWS {
        Kernel::Rows(Arc::new(padded(matrix, [k, n])))
    } else if plane >= MIN_PLANE && (in_place || last) {
        Kernel::Planes {
            weights: Arc::new(nonzero_weights(matrix, [k, n])),
            last: last && !in_place,
        }
    } else {
        return Ok(None);
    };
    let op = RowProduct {
        shape: out_shape.to_vec(),
        depth: k,
        columns: n,
        plane,
        kernel,
    };
    Ok(Some((op, x)))
}

/// `a` (`[K, N]`), each row padded to [`MAX_COLUMNS`] with zeros.
fn padded(a: &[f32], [k, n]: [usize; 2]) -> Vec<f32> {
    let mut matrix = vec![0.0; k * MAX_COLUMNS];
    for (padded, row) in matrix.chunks_exact_mut(MAX_COLUMNS).zip(a.chunks_exact(n)) {
        padded[..n].copy_from_slice(row);
    }
    matrix
}

/// For each column of `a` (`[K, N]`), its nonzero values and their rows.
fn nonzero_weights(a: &[f32], [k, n]: [usize; 2]) -> Vec<Vec<(usize, f32)>> {
    (0..n)
        .map(|j| {
            (0..k)
                .map(|i| (i, a[i * n + j]))
                .filter(|&(_, w)| w != 0.0)
                .collect()
        })
        .collect()
}

/// `y[.., j, ..] = Σ_k x[.., k, ..] a[k, j]` over one axis `k` of `x`, `a` a
/// constant `[K, N]`; the output's shape is fixed when the graph is planned
/// (`x`'s other axes in order, with axes of size one dropped or added, the
/// columns `j` in `k`'s place or last).
#[derive(Debug, Clone)]
pub(crate) struct RowProduct {
    /// The output's shape.
    shape: Vec<usize>,
    /// `K`.
    depth: usize,
    /// `N`.
    columns: usize,
    /// Values of `x` past the summed axis, one plane (1: the last axis).
    plane: usize,
    kernel: Kernel,
}

/// How [`RowProduct`] holds `a`, for the kernel that suits its shape.
#[derive(Debug, Clone)]
enum Kernel {
    /// The last axis, few columns, many rows: `a`'s rows padded to
    /// [`MAX_COLUMNS`].
    Rows(Arc<Vec<f32>>),
    /// Planes: each column's nonzero weights; the columns last (each
    /// plane's values then `N` apart) or in the summed axis's place.
    Planes {
        weights: Arc<Vec<Vec<(usize, f32)>>>,
        last: bool,
    },
}

/// Two ops are the same when they share their matrix.
impl PartialEq for RowProduct {
    fn eq(&self, other: &Self) -> bool {
        match (&self.kernel, &other.kernel) {
            (Kernel::Rows(a), Kernel::Rows(b)) => Arc::ptr_eq(a, b),
            (
                Kernel::Planes { weights: a, last },
                Kernel::Planes {
                    weights: b,
                    last: c,
                },
            ) => Arc::ptr_eq(a, b) && last == c,
            _ => false,
        }
    }
}

impl Eq for RowProduct {}

impl Op for RowProduct {
    fn name(&self) -> StaticName {
        "IrisRowProduct".into()
    }

    fn info(&self) -> TractResult<Vec<String>> {
        let kernel = match self.kernel {
            Kernel::Rows(_) => "rows",
            Kernel::Planes { last: false, .. } => "planes, columns in place",
            Kernel::Planes { last: true, .. } => "planes, columns last",
        };
        Ok(vec![format!(
            "axis of {} by [{}, {}], {kernel}",
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
        let (k, n, plane) = (self.depth, self.columns, self.plane);
        let slab = k * plane;
        ensure!(
            x.datum_type() == f32::datum_type() && slab > 0 && x.len() % slab == 0,
            "row product: input {:?} {:?}, expected f32 with an axis of {k} before {plane} values",
            x.datum_type(),
            x.shape()
        );
        ensure!(
            super::conv3d::has_avx512(),
            "the row product needs AVX-512F"
        );
        let rows = x.len() / slab;
        let shape = &self.shape;
        ensure!(
            rows * n * plane == shape.iter().product::<usize>(),
            "row product: output {shape:?} for {rows} x {plane} values"
        );
        // SAFETY: every value of the output is written below.
        let mut out = unsafe { super::parallel::unwritten(shape)? };
        {
            let mut view = out.try_as_plain_ram_mut()?;
            let y = SharedOut::new(view.as_slice_mut::<f32>()?);
            let x = x.try_as_plain_ram()?;
            let x = x.as_slice::<f32>()?;
            match &self.kernel {
                Kernel::Rows(matrix) => by_rows(x, matrix, [rows, k, n], y),
                Kernel::Planes { weights, last } => {
                    by_planes(x, weights, [rows, k, n, plane], *last, y);
                }
            }
        }
        Ok(tvec!(out.into_tvalue()))
    }
}

/// The row kernel: `y = x a` for `x` `[rows, K]`, `matrix` `a` padded
/// ([`padded`]), runs of rows in parallel.
fn by_rows(x: &[f32], matrix: &[f32], [rows, k, n]: [usize; 3], y: SharedOut<'_>) {
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
                // SAFETY: the CPU has AVX-512F (checked by `eval`).
                #[cfg(target_arch = "x86_64")]
                unsafe {
                    row(x, matrix, y)
                };
            }
        },
    );
}

/// The plane kernel: for `x` `[rows, K, plane]`, each output plane `(r,
/// j)` the sum of `x`'s planes `(r, k)` by `weights[j]`, written at `[r,
/// j, ..]` or, where `last`, at `[r, .., j]`; the planes in parallel.
fn by_planes(
    x: &[f32],
    weights: &[Vec<(usize, f32)>],
    [rows, k, n, plane]: [usize; 4],
    last: bool,
    y: SharedOut<'_>,
) {
    super::parallel::for_each_with(
        rows * n,
        || vec![0.0f32; plane],
        |sums: &mut Vec<f32>, item| {
            let (r, j) = (item / n, item % n);
            let x = &x[r * k * plane..][..k * plane];
            sums.fill(0.0);
            for &(i, w) in &weights[j] {
                // SAFETY: the CPU has AVX-512F (checked by `eval`).
                #[cfg(target_arch = "x86_64")]
                unsafe {
                    avx512::add_scaled(sums, w, &x[i * plane..][..plane])
                };
            }
            if last {
                // SAFETY: the items write disjoint values: (r, .., j).
                let y = unsafe { y.slice(r * plane * n, plane * n) };
                for (y, &sum) in y.iter_mut().skip(j).step_by(n).zip(sums.iter()) {
                    *y = sum;
                }
            } else {
                // SAFETY: the items write disjoint planes (r, j).
                let y = unsafe { y.slice((r * n + j) * plane, plane) };
                y.copy_from_slice(sums);
            }
        },
    );
}

impl TypedOp for RowProduct {
    fn output_facts(&self, inputs: &[&TypedFact]) -> TractResult<TVec<TypedFact>> {
        let values = inputs[0].shape.volume().to_usize()?;
        ensure!(
            values * self.columns == self.shape.iter().product::<usize>() * self.depth,
            "row product: input {:?} for output {:?}",
            inputs[0].shape,
            self.shape
        );
        Ok(tvec!(f32::fact(&self.shape)))
    }

    as_op!();
}

#[cfg(target_arch = "x86_64")]
mod avx512 {
    use std::arch::x86_64::*;

    /// `sums += w x`, lanewise (the compiler runs it in AVX-512 vectors).
    #[target_feature(enable = "avx512f")]
    pub(super) fn add_scaled(sums: &mut [f32], w: f32, x: &[f32]) {
        for (s, &x) in sums.iter_mut().zip(x) {
            *s += w * x;
        }
    }

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

    /// The op [`replacement`] makes of an `EinSum` `equation` of `x` (of
    /// `shape`) and the constant `a` (`[K, N]`), if any.
    fn planned(
        equation: &str,
        shape: &[usize],
        a: &[f32],
        [k, n]: [usize; 2],
    ) -> Option<RowProduct> {
        let mut model = TypedModel::default();
        let x = model.add_source("x", f32::fact(shape)).expect("x");
        let a = model
            .add_const("a", Tensor::from_shape(&[k, n], a).expect("a"))
            .expect("a");
        let axes = equation.parse().expect("an equation");
        let op = EinSum::new(axes, f32::datum_type());
        let y = model.wire_node("y", op, &[x, a]).expect("wires")[0];
        let (op, input) = replacement(&model, model.node(y.node)).expect("looks")?;
        assert_eq!(input, x);
        Some(op)
    }

    #[test]
    fn the_product_equals_its_definition() {
        if !super::super::conv3d::available() {
            std::println!("skipped: this CPU has no AVX-512F, the op is not used");
            return;
        }
        // Rows: depths under, at and past a run of 16 with a rest; columns
        // in one vector and in two; rows past a work item with a rest; rows
        // dense, empty, and with runs of zeros (as a mask's). Planes: the
        // columns last or in place, planes of one vector and of several
        // with a rest, axes of size one dropped and added; the matrix's
        // zeros (every third value) skipped.
        let cases: [(&str, &[usize], usize, &[usize]); 8] = [
            ("ark,kn->arn", &[1, 1024, 7], 1, &[1, 1024, 1]),
            ("ark,kn->arn", &[1, 1300, 16], 16, &[1, 1300, 16]),
            ("ark,kn->rn", &[1, 1517, 40], 17, &[1517, 17]),
            ("ark,kn->arn", &[1, 1260, 128], 32, &[1, 1260, 32]),
            ("bckm,kn->bcmn", &[2, 3, 40, 16], 9, &[2, 3, 16, 9]),
            ("bkcm,kn->bncm", &[3, 40, 5, 7], 33, &[3, 33, 5, 7]),
            ("abkm,kn->bnm", &[1, 2, 24, 100], 5, &[2, 5, 100]),
            ("bkm,kn->abnm", &[4, 64, 17], 8, &[1, 4, 8, 17]),
        ];
        for (equation, shape, n, out_shape) in cases {
            let k = shape[equation.find('k').expect("k")];
            let a: Vec<f32> = (0..k * n)
                .map(|i| match i % 3 {
                    0 => 0.0,
                    _ => ((i * 37) % 101) as f32 / 50.0 - 1.0,
                })
                .collect();
            let len: usize = shape.iter().product();
            let x: Vec<f32> = (0..len)
                .map(|i| match (i / k) % 3 {
                    0 => ((i * 53) % 97) as f32 / 48.0 - 1.0,
                    1 => 0.0,
                    _ => f32::from(u8::from((i % k) / 5 % 4 == 1)),
                })
                .collect();
            let op = planned(equation, shape, &a, [k, n]).expect("the op serves");
            let input = Tensor::from_shape(shape, &x).expect("x").into_tvalue();
            let got = op
                .eval(&EvalContext::out_of_plan(), tvec!(input))
                .expect("runs");
            assert_eq!(got[0].shape(), out_shape);
            // The definition: x's axes as [rows, K, plane], the output's as
            // [rows, N, plane] or [rows, plane, N].
            let summed = equation.find('k').expect("k");
            let rows: usize = shape[..summed].iter().product();
            let plane: usize = shape[summed + 1..].iter().product();
            let last = equation.ends_with('n');
            let got = got[0].try_as_plain_ram().expect("plain");
            let got = got.as_slice::<f32>().expect("f32");
            for (r, j, p) in
                (0..rows).flat_map(|r| (0..n).flat_map(move |j| (0..plane).map(move |p| (r, j, p))))
            {
                let want: f64 = (0..k)
                    .map(|i| f64::from(x[(r * k + i) * plane + p]) * f64::from(a[i * n + j]))
                    .sum();
                let at = if last {
                    (r * plane + p) * n + j
                } else {
                    (r * n + j) * plane + p
                };
                let value = f64::from(got[at]);
                assert!(
                    (value - want).abs() <= 1e-5 * (1.0 + want.abs()),
                    "{equation} {shape:?} by {n}: [{r}, {j}, {p}] {value} vs {want}"
                );
            }
        }
    }

    #[test]
    fn shapes_no_kernel_serves_stay_tract_s() {
        if !super::super::conv3d::available() {
            return;
        }
        let a = vec![0.5f32; 16 * 40];
        // The last axis: few rows; more columns than a row holds.
        assert!(planned("ark,kn->arn", &[1, 100, 16], &a[..16 * 8], [16, 8]).is_none());
        assert!(planned("ark,kn->arn", &[1, 5000, 16], &a, [16, 40]).is_none());
        // Planes shorter than half a vector; the columns neither in the summed
        // axis's place nor last.
        assert!(planned("bkm,kn->bmn", &[4, 16, 4], &a[..16 * 8], [16, 8]).is_none());
        assert!(planned("bkcm,kn->bcnm", &[2, 16, 3, 32], &a[..16 * 8], [16, 8]).is_none());
    }
}
