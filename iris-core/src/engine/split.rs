//! An optimised graph cut in two around one of its inputs.
//!
//! The task encoder runs once per class of a reference, and each run
//! recomputed what does not depend on the class's mask: every level's
//! widening of the reference features to `s³` channels, its pixel shuffle
//! and the features' part of the merge unit (the context path's first
//! half), the packing of the features for the foreground mean, and the
//! learned queries' norms. At the full size that part takes about 50 ms,
//! the rest 94-99 ms per class (`profile_graph --per-class`).
//! [`split`] cuts a planned graph into the part that does not read one
//! input, run once, and the part that does, run per value of that input
//! on the first part's outputs (issue 20). The engine cuts the task encoder
//! around its masks for references of several classes.

use std::collections::HashMap;
use std::prelude::rust_2024::*;
use std::{format, vec};

use tract_onnx::tract_core::internal::*;

/// `model` (every shape known) cut around its input `input`: the first part
/// computes, from the other inputs (in their order), the values the rest
/// reads that do not depend on `input`; the second reads those values,
/// then `input`, and computes the model's outputs (in their order).
/// Constants the second part reads are its own.
///
/// ```
/// use iris_core::engine::split;
/// use tract_onnx::prelude::*;
/// use tract_onnx::tract_core::ops::math;
///
/// // (a + 1) * b cut around b: the first part computes a + 1 once, the
/// // second reads it, then b.
/// let mut whole = TypedModel::default();
/// let a = whole.add_source("a", f32::fact([2]))?;
/// let b = whole.add_source("b", f32::fact([2]))?;
/// let one = whole.add_const("one", tensor1(&[1f32; 2]))?;
/// let c = whole.wire_node("c", math::add(), &[a, one])?[0];
/// let d = whole.wire_node("d", math::mul(), &[c, b])?[0];
/// whole.select_output_outlets(&[d])?;
/// let (first, second) = split(&whole, 1)?;
/// let mut shared = first.into_runnable()?.run(tvec!(tensor1(&[1f32, 2.0]).into()))?;
/// shared.push(tensor1(&[3f32, 4.0]).into());
/// let out = second.into_runnable()?.run(shared)?;
/// assert_eq!(out[0].try_as_plain_ram()?.as_slice::<f32>()?, [6.0, 12.0]);
/// # Ok::<(), TractError>(())
/// ```
///
/// # Errors
/// Where `input` is not an input of `model`, or tract cannot wire a node.
pub fn split(model: &TypedModel, input: usize) -> TractResult<(TypedModel, TypedModel)> {
    let inputs = model.input_outlets()?.to_vec();
    let Some(&varying) = inputs.get(input) else {
        bail!("the model has {} inputs, no input {input}", inputs.len());
    };
    let order = model.eval_order()?;
    // Whether each node depends on the varying input.
    let mut depends = vec![false; model.nodes().len()];
    for &id in &order {
        depends[id] = id == varying.node || model.node(id).inputs.iter().any(|i| depends[i.node]);
    }
    let mut second = Second {
        model: TypedModel::default(),
        wired: HashMap::new(),
        shared: Vec::new(),
    };
    let varying_source = second.model.add_source(
        model.node(varying.node).name.clone(),
        model.outlet_fact(varying)?.clone(),
    )?;
    second.wired.insert(varying, varying_source);
    for &id in order
        .iter()
        .filter(|&&id| depends[id] && id != varying.node)
    {
        let node = model.node(id);
        let wires = node
            .inputs
            .iter()
            .map(|&i| second.take(model, i))
            .collect::<TractResult<TVec<_>>>()?;
        let outputs = second
            .model
            .wire_node(&node.name, node.op.clone(), &wires)?;
        for (slot, output) in outputs.into_iter().enumerate() {
            second.wired.insert(OutletId::new(id, slot), output);
        }
    }
    let outputs = model
        .output_outlets()?
        .iter()
        .map(|&o| second.take(model, o))
        .collect::<TractResult<Vec<_>>>()?;
    let Second {
        model: mut second,
        shared,
        ..
    } = second;
    second.select_output_outlets(&outputs)?;
    let mut second_inputs: Vec<OutletId> = shared.iter().map(|&(_, source)| source).collect();
    second_inputs.push(varying_source);
    second.set_input_outlets(&second_inputs)?;

    let mut first = model.clone();
    let first_inputs: Vec<OutletId> = inputs.iter().copied().filter(|&i| i != varying).collect();
    first.set_input_outlets(&first_inputs)?;
    let first_outputs: Vec<OutletId> = shared.iter().map(|&(outlet, _)| outlet).collect();
    first.select_output_outlets(&first_outputs)?;
    Ok((first.into_compact()?, second))
}

/// The second part of a [`split`] as it is wired.
struct Second {
    model: TypedModel,
    /// Each outlet of the whole model to its wire in the second part.
    wired: HashMap<OutletId, OutletId>,
    /// Values of the first part the second reads, and their sources here.
    shared: Vec<(OutletId, OutletId)>,
}

impl Second {
    /// The wire standing for `outlet` of `whole`: one already wired, or for
    /// a value of the first part a constant where it is one, else a new
    /// source.
    fn take(&mut self, whole: &TypedModel, outlet: OutletId) -> TractResult<OutletId> {
        if let Some(&wire) = self.wired.get(&outlet) {
            return Ok(wire);
        }
        let fact = whole.outlet_fact(outlet)?;
        let name = format!("{}.{}", whole.node(outlet.node).name, outlet.slot);
        let wire = match &fact.konst {
            Some(value) => self.model.add_const(name, value.clone())?,
            None => {
                let source = self.model.add_source(name, fact.clone())?;
                self.shared.push((outlet, source));
                source
            }
        };
        self.wired.insert(outlet, wire);
        Ok(wire)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tract_onnx::tract_core::ops::math;

    #[test]
    fn the_parts_compute_what_the_whole_computes() {
        // d = (a + 1) * b, outputs [d, a + 1], cut around b: the first part
        // computes a + 1, the second reads it and b; the constant 1 stays
        // with the first part, the constant 2 of e = d * 2 is the second's.
        let mut whole = TypedModel::default();
        let a = whole.add_source("a", f32::fact([3])).expect("a");
        let b = whole.add_source("b", f32::fact([3])).expect("b");
        let one = whole.add_const("one", tensor1(&[1.0f32; 3])).expect("one");
        let two = whole.add_const("two", tensor1(&[2.0f32; 3])).expect("two");
        let c = whole.wire_node("c", math::add(), &[a, one]).expect("c")[0];
        let d = whole.wire_node("d", math::mul(), &[c, b]).expect("d")[0];
        let e = whole.wire_node("e", math::mul(), &[d, two]).expect("e")[0];
        whole.select_output_outlets(&[e, c]).expect("outputs");
        let (first, second) = split(&whole, 1).expect("splits");
        assert_eq!(first.nodes().len(), 3, "a, one and c");
        assert_eq!(first.input_outlets().expect("inputs").len(), 1);
        assert_eq!(second.input_outlets().expect("inputs").len(), 2);
        let values = |v: &[f32]| tensor1(v).into_tvalue();
        let want = whole
            .into_runnable()
            .and_then(|p| p.run(tvec!(values(&[1.0, 2.0, 3.0]), values(&[4.0, 5.0, 6.0]))))
            .expect("the whole runs");
        let mut shared = first
            .into_runnable()
            .and_then(|p| p.run(tvec!(values(&[1.0, 2.0, 3.0]))))
            .expect("the first part runs");
        shared.push(values(&[4.0, 5.0, 6.0]));
        let got = second
            .into_runnable()
            .and_then(|p| p.run(shared))
            .expect("the second part runs");
        assert_eq!(got.len(), 2);
        let floats = |v: &TValue| {
            let view = v.try_as_plain_ram().expect("plain");
            view.as_slice::<f32>().expect("f32").to_vec()
        };
        for (got, want) in got.iter().zip(&want) {
            assert_eq!(floats(got), floats(want));
        }
        assert_eq!(floats(&got[0]), [16.0, 30.0, 48.0]);
    }
}
