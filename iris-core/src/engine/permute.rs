//! A chain of axis moves as one copy.
//!
//! tract runs an ONNX `Transpose` as one `MoveAxis` op per axis it moves,
//! each a copy of the whole tensor. The task encoder's pixel shuffles and
//! unshuffles are 8-D transpositions of three moves each: at the full size
//! 18 copies of 8 MB per class, 18-19 ms of its 200 ms (issue 20).
//! [`chain`] finds such a run of moves and [`Permute`] makes its output in
//! one pass, rows of the output in parallel on the model's thread pool.

use std::prelude::rust_2024::*;
use std::vec;

use tract_onnx::tract_core::internal::*;
use tract_onnx::tract_core::ops::change_axes::AxisOp;

use super::parallel::SharedOut;

/// Output rows one work item copies.
const ROWS: usize = 64;

/// The `MoveAxis` of `node`, where it is one.
fn moves(node: &TypedNode) -> Option<(usize, usize)> {
    match node.op_as::<AxisOp>()? {
        &AxisOp::Move(from, to) => Some((from, to)),
        _ => None,
    }
}

/// The node of `outlet`'s one reader, where it has one and reads it first.
fn only_reader(model: &TypedModel, outlet: OutletId) -> Option<&TypedNode> {
    super::graphs::only_reader(model, outlet)
        .filter(|next| next.slot == 0)
        .map(|next| model.node(next.node))
}

/// [`Permute`] for the run of two or more `MoveAxis` nodes of an f32
/// tensor that starts at `node` (each the one reader of the one before),
/// with the run's last node, whose output the op stands for; its input is
/// `node`'s.
pub(crate) fn chain<'m>(
    model: &'m TypedModel,
    node: &TypedNode,
) -> TractResult<Option<(Permute, &'m TypedNode)>> {
    if moves(node).is_none() {
        return Ok(None);
    }
    let before = model.node(node.inputs[0].node);
    let continues = moves(before).is_some()
        && only_reader(model, node.inputs[0]).is_some_and(|n| n.id == node.id);
    if continues || model.outlet_fact(node.inputs[0])?.datum_type != f32::datum_type() {
        return Ok(None);
    }
    let rank = model.outlet_fact(node.inputs[0])?.rank();
    let mut axes: Vec<usize> = (0..rank).collect();
    let mut last = model.node(node.id);
    let mut count = 0;
    while let Some((from, to)) = moves(last) {
        let axis = axes.remove(from);
        axes.insert(to, axis);
        count += 1;
        match only_reader(model, OutletId::new(last.id, 0)) {
            Some(next) if moves(next).is_some() => last = next,
            _ => break,
        }
    }
    Ok((count >= 2).then_some((Permute { axes }, last)))
}

/// The transposition of an f32 tensor whose output axis `i` is input axis
/// `axes[i]` (ONNX `Transpose`'s `perm`).
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub(crate) struct Permute {
    axes: Vec<usize>,
}

impl Permute {
    /// The input axis of each output axis.
    pub(crate) fn axes(&self) -> &[usize] {
        &self.axes
    }

    /// The output's axes as `(size, stride in the input)`, outermost
    /// first, without axes of size one and with neighbours that are
    /// neighbours in the input too merged into one.
    fn walk(&self, shape: &[usize]) -> Vec<(usize, usize)> {
        let mut strides = vec![1usize; shape.len()];
        for a in (0..shape.len().saturating_sub(1)).rev() {
            strides[a] = strides[a + 1] * shape[a + 1];
        }
        let mut walk: Vec<(usize, usize)> = Vec::new();
        let mut previous = None;
        for &a in &self.axes {
            if shape[a] == 1 {
                continue;
            }
            match walk.last_mut() {
                Some((size, stride)) if previous == Some(a.wrapping_sub(1)) => {
                    *size *= shape[a];
                    *stride = strides[a];
                }
                _ => walk.push((shape[a], strides[a])),
            }
            previous = Some(a);
        }
        walk
    }

    /// Copies `input` (of `shape`) into `out` transposed.
    fn copy(&self, input: &[f32], shape: &[usize], out: SharedOut<'_>) {
        // tract folds empty tensors into constants; an empty input would
        // have rows of no values, which the division below cannot take.
        if input.is_empty() {
            return;
        }
        let walk = self.walk(shape);
        let Some(&(row, step)) = walk.last() else {
            // One value, or none.
            if let (Some(&x), true) = (input.first(), out.len() > 0) {
                // SAFETY: the only writer of the output.
                unsafe { out.slice(0, 1)[0] = x };
            }
            return;
        };
        let outer = &walk[..walk.len() - 1];
        let rows = input.len() / row;
        super::parallel::for_each_with(
            rows.div_ceil(ROWS),
            || vec![0usize; outer.len()],
            |index, item| {
                let first = item * ROWS;
                // The input position of output row `first`, then the rows
                // after it counted like an odometer.
                let mut rest = first;
                for (i, &(size, _)) in outer.iter().enumerate().rev() {
                    index[i] = rest % size;
                    rest /= size;
                }
                for r in first..rows.min(first + ROWS) {
                    let start: usize = index.iter().zip(outer).map(|(i, (_, s))| i * s).sum();
                    // SAFETY: the items write disjoint rows.
                    let y = unsafe { out.slice(r * row, row) };
                    if step == 1 {
                        y.copy_from_slice(&input[start..][..row]);
                    } else {
                        for (k, y) in y.iter_mut().enumerate() {
                            *y = input[start + k * step];
                        }
                    }
                    for (i, &(size, _)) in outer.iter().enumerate().rev() {
                        index[i] += 1;
                        if index[i] < size {
                            break;
                        }
                        index[i] = 0;
                    }
                }
            },
        );
    }
}

impl Op for Permute {
    fn name(&self) -> StaticName {
        "IrisPermute".into()
    }

    fn info(&self) -> TractResult<Vec<String>> {
        Ok(vec![std::format!("axes {:?}", self.axes)])
    }

    op_as_typed_op!();
}

impl EvalOp for Permute {
    op_out_of_plan!();

    fn eval(&self, _ctx: &EvalContext, inputs: TVec<TValue>) -> TractResult<TVec<TValue>> {
        let x = args_1!(inputs);
        let shape = x.shape();
        ensure!(
            x.datum_type() == f32::datum_type() && shape.len() == self.axes.len(),
            "permute: input {:?} {shape:?}, expected f32 of rank {}",
            x.datum_type(),
            self.axes.len()
        );
        let out_shape: Vec<usize> = self.axes.iter().map(|&a| shape[a]).collect();
        let values = x.try_as_plain_ram()?;
        let values = values.as_slice::<f32>()?;
        // SAFETY: `copy` writes every value of the output.
        let mut out = unsafe { super::parallel::unwritten(&out_shape)? };
        {
            let mut view = out.try_as_plain_ram_mut()?;
            let y = view.as_slice_mut::<f32>()?;
            self.copy(values, shape, SharedOut::new(y));
        }
        Ok(tvec!(out.into_tvalue()))
    }
}

impl TypedOp for Permute {
    fn output_facts(&self, inputs: &[&TypedFact]) -> TractResult<TVec<TypedFact>> {
        let fact = inputs[0];
        let shape: TVec<TDim> = self.axes.iter().map(|&a| fact.shape[a].clone()).collect();
        Ok(tvec!(fact.datum_type.fact(shape)))
    }

    as_op!();
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_chain_of_moves_is_one_transposition_with_tracts_values() {
        // The task encoder's pixel shuffle and unshuffle (8-D), a move that
        // keeps the last axis, axes of size one, more rows than an item.
        // (input shape, moves (from, to))
        type Case<'a> = (&'a [usize], &'a [(usize, usize)]);
        let cases: [Case; 4] = [
            (&[1, 1, 2, 3, 2, 4, 3, 5], &[(5, 2), (6, 4), (6, 7)]),
            (&[1, 1, 4, 2, 3, 2, 5, 3], &[(3, 2), (5, 3), (7, 4)]),
            (&[3, 1, 70, 2, 1], &[(0, 3), (2, 0)]),
            (&[5, 6, 7], &[(2, 0), (1, 2)]),
        ];
        for (shape, moves) in cases {
            let mut model = TypedModel::default();
            let mut wire = model.add_source("x", f32::fact(shape)).expect("source");
            for (i, &(from, to)) in moves.iter().enumerate() {
                let op = AxisOp::Move(from, to);
                wire = model
                    .wire_node(std::format!("move{i}"), op, &[wire])
                    .expect("wires")[0];
            }
            model.select_output_outlets(&[wire]).expect("outputs");
            let first = model.node_by_name("move0").expect("first move");
            let (op, last) = chain(&model, first).expect("matches").expect("a chain");
            assert_eq!(last.name, std::format!("move{}", moves.len() - 1));
            let len: usize = shape.iter().product();
            let x: Vec<f32> = (0..len).map(|i| i as f32).collect();
            let input = Tensor::from_shape(shape, &x).expect("tensor");
            let want = model
                .clone()
                .into_runnable()
                .expect("plans")
                .run(tvec!(input.clone().into_tvalue()))
                .expect("runs")
                .remove(0);
            let got = op.eval(&EvalContext::out_of_plan(), tvec!(input.into_tvalue()));
            let got = got.expect("evaluates").remove(0);
            assert_eq!(got.shape(), want.shape(), "{shape:?} {moves:?}");
            let (got, want) = (got.try_as_plain_ram(), want.try_as_plain_ram());
            let (got, want) = (got.expect("plain"), want.expect("plain"));
            assert_eq!(
                got.as_slice::<f32>().expect("f32"),
                want.as_slice::<f32>().expect("f32"),
                "{shape:?} {moves:?}"
            );
        }
    }
}
