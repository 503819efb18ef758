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
//! followed by planes of at least [`MIN_PLANE`] values. [`siblings`] runs
//! the first products of the three levels, which read the same mask, as
//! one: the mask read once instead of three times (15 classes, full size:
//! 50 -> 35 ms).

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
/// Most columns the row kernel computes for one product (two vectors of 16
/// per row).
const MAX_COLUMNS: usize = 32;
/// Most columns it computes for products of one input run as one
/// ([`siblings`]): four vectors, each product's columns in whole vectors.
const MAX_WIDTH: usize = 64;
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
        let width = n.next_multiple_of(LANES);
        Kernel::Rows {
            matrix: Arc::new(padded(matrix, [k, n], width)),
            columns: vec![n],
            width,
        }
    } else if plane >= MIN_PLANE && (in_place || last) {
        Kernel::Planes {
            weights: Arc::new(nonzero_weights(matrix, [k, n])),
            last: last && !in_place,
        }
    } else {
        return Ok(None);
    };
    let op = RowProduct {
        shapes: vec![out_shape.to_vec()],
        depth: k,
        plane,
        kernel,
    };
    Ok(Some((op, x)))
}

/// `a` (`[K, N]`), each row padded to `width` values with zeros.
fn padded(a: &[f32], [k, n]: [usize; 2], width: usize) -> Vec<f32> {
    let mut matrix = vec![0.0; k * width];
    for (padded, row) in matrix.chunks_exact_mut(width).zip(a.chunks_exact(n)) {
        padded[..n].copy_from_slice(row);
    }
    matrix
}

/// One [`RowProduct`] for the row-kernel products of `node`'s input that
/// fit [`MAX_WIDTH`] columns side by side, `node`'s first, where there
/// are two or more: the input is read once for all (the masks' pooling
/// onto the three levels' grids, 8 + 16 + 32 columns of one mask). Returns
/// the op, with one output per product, and the products' nodes, whose
/// outputs its outputs stand for, in order.
pub(crate) fn siblings(model: &TypedModel, node: &TypedNode) -> Option<(RowProduct, Vec<usize>)> {
    fn rows(node: &TypedNode) -> Option<&RowProduct> {
        node.op_as::<RowProduct>()
            .filter(|op| matches!(op.kernel, Kernel::Rows { .. }))
    }
    let first = rows(node)?;
    let &[input] = node.inputs.as_slice() else {
        return None;
    };
    let mut group = vec![(node.id, first)];
    let mut width = first.width();
    for reader in model.outlet_successors(input) {
        let other = model.node(reader.node);
        if other.id == node.id {
            continue;
        }
        // Not a product already fused, left without readers.
        let out = OutletId::new(other.id, 0);
        let read = !model.outlet_successors(out).is_empty()
            || model.output_outlets().is_ok_and(|o| o.contains(&out));
        if let Some(op) = rows(other).filter(|op| op.depth == first.depth)
            && read
            && width + op.width() <= MAX_WIDTH
        {
            width += op.width();
            group.push((other.id, op));
        }
    }
    if group.len() < 2 {
        return None;
    }
    let k = first.depth;
    let mut matrix = vec![0.0f32; k * width];
    let (mut columns, mut shapes, mut offset) = (Vec::new(), Vec::new(), 0);
    for (_, op) in &group {
        let Kernel::Rows {
            matrix: own,
            columns: own_columns,
            width: own_width,
        } = &op.kernel
        else {
            return None;
        };
        for (row, own) in matrix
            .chunks_exact_mut(width)
            .zip(own.chunks_exact(*own_width))
        {
            row[offset..][..*own_width].copy_from_slice(own);
        }
        offset += own_width;
        columns.extend_from_slice(own_columns);
        shapes.extend(op.shapes.iter().cloned());
    }
    let op = RowProduct {
        shapes,
        depth: k,
        plane: 1,
        kernel: Kernel::Rows {
            matrix: Arc::new(matrix),
            columns,
            width,
        },
    };
    Some((op, group.iter().map(|&(id, _)| id).collect()))
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
/// columns `j` in `k`'s place or last). Products of one input by several
/// matrices over its last axis run as one op with one output each
/// ([`siblings`]).
#[derive(Debug, Clone)]
pub(crate) struct RowProduct {
    /// Each output's shape.
    shapes: Vec<Vec<usize>>,
    /// `K`.
    depth: usize,
    /// Values of `x` past the summed axis, one plane (1: the last axis).
    plane: usize,
    kernel: Kernel,
}

/// How [`RowProduct`] holds `a`, for the kernel that suits its shape.
#[derive(Debug, Clone)]
enum Kernel {
    /// The last axis, few columns, many rows: each output's matrix, its
    /// rows padded to whole vectors, side by side in rows of `width`; each
    /// output's columns.
    Rows {
        matrix: Arc<Vec<f32>>,
        columns: Vec<usize>,
        width: usize,
    },
    /// Planes: each column's nonzero weights; the columns last (each
    /// plane's values then `N` apart) or in the summed axis's place.
    Planes {
        weights: Arc<Vec<Vec<(usize, f32)>>>,
        last: bool,
    },
}

impl RowProduct {
    /// Columns of the rows a row kernel computes (0 for planes).
    fn width(&self) -> usize {
        match self.kernel {
            Kernel::Rows { width, .. } => width,
            Kernel::Planes { .. } => 0,
        }
    }
}

/// Two ops are the same when they share their matrix.
impl PartialEq for RowProduct {
    fn eq(&self, other: &Self) -> bool {
        match (&self.kernel, &other.kernel) {
            (Kernel::Rows { matrix: a, .. }, Kernel::Rows { matrix: b, .. }) => Arc::ptr_eq(a, b),
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
        let kernel = match &self.kernel {
            Kernel::Rows { columns, .. } => format!("rows by {columns:?} columns"),
            Kernel::Planes { weights, last } => format!(
                "planes by {} columns, {}",
                weights.len(),
                if *last { "last" } else { "in place" }
            ),
        };
        Ok(vec![format!("axis of {}, {kernel}", self.depth)])
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
        let (k, plane) = (self.depth, self.plane);
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
        let columns = match &self.kernel {
            Kernel::Rows { columns, .. } => columns.clone(),
            Kernel::Planes { weights, .. } => vec![weights.len()],
        };
        for (shape, n) in self.shapes.iter().zip(&columns) {
            ensure!(
                rows * n * plane == shape.iter().product::<usize>(),
                "row product: output {shape:?} for {rows} x {plane} values"
            );
        }
        let x = x.try_as_plain_ram()?;
        let x = x.as_slice::<f32>()?;
        let write = |outs: &mut [&mut [f32]]| {
            let ys: Vec<SharedOut> = outs.iter_mut().map(|o| SharedOut::new(o)).collect();
            match &self.kernel {
                Kernel::Rows { matrix, width, .. } => {
                    by_rows(x, (matrix, *width), [rows, k], (&columns, &ys));
                }
                Kernel::Planes { weights, last } => {
                    by_planes(x, weights, [rows, k, columns[0], plane], *last, ys[0]);
                }
            }
            Ok(())
        };
        // SAFETY: the kernels write every value of every output.
        unsafe { super::parallel::written(self.shapes.iter().map(Vec::as_slice), write) }
    }
}

/// The row kernel: `y_o = x a_o` for `x` `[rows, K]` and each output `o`
/// (`columns[o]` columns), the matrices side by side in rows of `width`,
/// runs of rows in parallel.
fn by_rows(
    x: &[f32],
    (matrix, width): (&[f32], usize),
    [rows, k]: [usize; 2],
    (columns, ys): (&[usize], &[SharedOut<'_>]),
) {
    super::parallel::for_each_with(
        rows.div_ceil(ROWS),
        || (),
        |_, item| {
            let first = item * ROWS;
            let count = ROWS.min(rows - first);
            let x = &x[first * k..][..count * k];
            #[cfg(target_arch = "x86_64")]
            let row = match width / LANES {
                0 | 1 => avx512::row::<1>,
                2 => avx512::row::<2>,
                3 => avx512::row::<3>,
                _ => avx512::row::<4>,
            };
            let mut sums = [0.0f32; MAX_WIDTH];
            for (r, x) in x.chunks_exact(k).enumerate() {
                // SAFETY: the CPU has AVX-512F (checked by `eval`).
                #[cfg(target_arch = "x86_64")]
                unsafe {
                    row(x, matrix, width, &mut sums)
                };
                let mut offset = 0;
                for (&n, y) in columns.iter().zip(ys) {
                    // SAFETY: the items write disjoint runs of rows.
                    let y = unsafe { y.slice((first + r) * n, n) };
                    y.copy_from_slice(&sums[offset..][..n]);
                    offset += n.next_multiple_of(LANES);
                }
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
        ensure!(
            inputs[0].shape.volume().to_usize()? % (self.depth * self.plane) == 0,
            "row product: input {:?}, expected an axis of {} before {} values",
            inputs[0].shape,
            self.depth,
            self.plane
        );
        Ok(self.shapes.iter().map(f32::fact).collect())
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

    use super::{LANES, MAX_WIDTH};

    /// `y[j] = Σ_k x[k] matrix[k, j]` for one row `x`, `matrix` `[K,
    /// width]`, `y` its first `16 * HALVES` columns (`width` at most that);
    /// runs of 16 zeros in `x` are skipped. The nonzero values go by pairs
    /// into two sets of sums, so that consecutive multiply-adds do not wait
    /// on each other.
    ///
    /// # Safety
    /// The CPU has AVX-512F.
    #[target_feature(enable = "avx512f")]
    pub(super) unsafe fn row<const HALVES: usize>(
        x: &[f32],
        matrix: &[f32],
        width: usize,
        y: &mut [f32; MAX_WIDTH],
    ) {
        let mut sums = [[_mm512_setzero_ps(); HALVES]; 2];
        let add = |sums: &mut [__m512; HALVES], value: f32, row: &[f32]| {
            let value = _mm512_set1_ps(value);
            for (half, sum) in sums.iter_mut().enumerate() {
                // SAFETY: `row` holds `width` values, `16 * HALVES`.
                let a = unsafe { _mm512_loadu_ps(row[half * LANES..][..LANES].as_ptr()) };
                *sum = _mm512_fmadd_ps(value, a, *sum);
            }
        };
        for (values, rows) in x.chunks(LANES).zip(matrix.chunks(LANES * width)) {
            let mask = ((1u32 << values.len()) - 1) as __mmask16;
            // SAFETY: the mask keeps the load inside `values`.
            let v = unsafe { _mm512_maskz_loadu_ps(mask, values.as_ptr()) };
            let mut nonzero = _mm512_cmpneq_ps_mask(v, _mm512_setzero_ps()) as u32;
            let [first, second] = &mut sums;
            if nonzero == 0xffff {
                for (pair, rows) in values.chunks_exact(2).zip(rows.chunks_exact(2 * width)) {
                    add(first, pair[0], rows);
                    add(second, pair[1], &rows[width..]);
                }
                continue;
            }
            while nonzero != 0 {
                let i = nonzero.trailing_zeros() as usize;
                nonzero &= nonzero - 1;
                add(first, values[i], &rows[i * width..]);
                if nonzero == 0 {
                    break;
                }
                let i = nonzero.trailing_zeros() as usize;
                nonzero &= nonzero - 1;
                add(second, values[i], &rows[i * width..]);
            }
        }
        for half in 0..HALVES {
            let sum = _mm512_add_ps(sums[0][half], sums[1][half]);
            // SAFETY: `y` holds MAX_WIDTH values, at least `16 * HALVES`.
            unsafe { _mm512_storeu_ps(y[half * LANES..].as_mut_ptr(), sum) };
        }
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
    fn products_of_one_input_run_as_one() {
        if !super::super::conv3d::available() {
            return;
        }
        // Three products of one input's rows (5, 16 and 30 columns: 64
        // side by side in whole vectors), a fourth that no longer fits.
        let (rows, k) = (1100, 24);
        let mut model = TypedModel::default();
        let x = model.add_source("x", f32::fact([1, rows, k])).expect("x");
        let mut outputs = Vec::new();
        for (i, n) in [5usize, 16, 30, 9].into_iter().enumerate() {
            let a: Vec<f32> = (0..k * n)
                .map(|j| ((j * 31 + i) % 23) as f32 / 11.0 - 1.0)
                .collect();
            let a = Tensor::from_shape(&[k, n], &a).expect("a");
            let a = model.add_const(format!("a{i}"), a).expect("a");
            let op = EinSum::new("ark,kn->arn".parse().expect("axes"), f32::datum_type());
            outputs.push(
                model
                    .wire_node(format!("y{i}"), op, &[x, a])
                    .expect("wires")[0],
            );
        }
        model.select_output_outlets(&outputs).expect("outputs");
        let mut singles = Vec::new();
        for i in 0..outputs.len() {
            let y = model.output_outlets().expect("outputs")[i];
            let node = model.node(y.node);
            let (op, _) = replacement(&model, node).expect("looks").expect("serves");
            let patch = TypedModelPatch::replace_single_op(&model, node, &[x], op.clone());
            patch.expect("patches").apply(&mut model).expect("applies");
            singles.push(op);
        }
        let model = model.into_compact().expect("compacts");
        let outputs = model.output_outlets().expect("outputs");
        let ids: Vec<usize> = outputs.iter().map(|o| o.node).collect();
        let (fused, nodes) = siblings(&model, model.node(ids[0])).expect("fuses");
        assert_eq!(nodes, ids[..3]);
        let values: Vec<f32> = (0..rows * k)
            .map(|i| {
                if i % 7 < 3 {
                    0.0
                } else {
                    ((i * 13) % 29) as f32 / 14.0 - 1.0
                }
            })
            .collect();
        let input = || {
            tvec!(
                Tensor::from_shape(&[1, rows, k], &values)
                    .expect("x")
                    .into_tvalue()
            )
        };
        let got = fused
            .eval(&EvalContext::out_of_plan(), input())
            .expect("runs");
        assert_eq!(got.len(), 3);
        for (got, single) in got.iter().zip(&singles) {
            let want = single
                .eval(&EvalContext::out_of_plan(), input())
                .expect("runs");
            assert_eq!(got.shape(), want[0].shape());
            let (got, want) = (
                got.try_as_plain_ram().expect("plain"),
                want[0].try_as_plain_ram().expect("plain"),
            );
            assert_eq!(
                got.as_slice::<f32>().expect("f32"),
                want.as_slice::<f32>().expect("f32")
            );
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
