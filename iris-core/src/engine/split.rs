//! An optimised graph cut around one of its inputs.
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
//! on the first part's outputs (issue 20).
//!
//! Past each class's context voxels, the queries' blocks read their
//! weights again for every class in that second part: 141 products of 11
//! rows, 15-17 ms a class at the full size. [`per_class`] and [`batched`]
//! cut the graph in three instead: the part that does not read the masks;
//! each class's voxel part, up to its context voxels, planned for one
//! class (the engine's ops at their fastest); and the rest, planned for
//! all the classes of a run, whose products then take the classes' rows
//! at once. The engine cuts the task encoder so for references of several
//! classes, and in two where its attention is not in the plan.

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
    let depends = reading(model, &[varying])?;
    let outputs = model.output_outlets()?.to_vec();
    let (second, shared) = part(model, &depends, &[varying], &outputs)?;
    Ok((upstream(model, input, &shared)?, second))
}

/// A graph for one class cut around its classes' input into a part that
/// does not read that input and one that computes, from the first's
/// values and one class's value of the input, that class's values the
/// rest of the graph reads (see [`per_class`]).
pub struct PerClass {
    /// From the other inputs (in their order), the values `each` reads.
    pub shared: TypedModel,
    /// From `shared`'s values, then one class's value of the input, the
    /// values of [`PerClass::boundary`] that come from it.
    pub each: TypedModel,
    /// The values the rest of the graph reads of each class's voxel part,
    /// in the order the batched part ([`batched`]) takes them.
    pub boundary: Vec<Boundary>,
}

/// One value of a class's voxel part that the rest of the graph reads.
pub struct Boundary {
    /// The node that computes it (the same in every class count's plan).
    name: String,
    slot: usize,
    /// Its shape for one class.
    shape: Vec<usize>,
    /// Where it comes from.
    pub from: Stacked,
}

/// Where a value of the [`Boundary`] comes from, and how the part past it
/// ([`batched`]) reads it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Stacked {
    /// The classes' input itself, the classes' values stacked in one input.
    Input,
    /// Output `j` of [`PerClass::each`], one input per class.
    Each(usize),
}

/// `one` (planned for one class) cut around its input `input`, one value
/// per class, at the context voxels that the engine's attention reads:
/// each class's voxel part is everything that reads the input and that
/// those voxels are computed from (each class's own work, 7.5 GFLOP at the
/// full size), the rest (the queries' blocks, their attention over those
/// voxels) is what the plan for several classes runs for all at once
/// ([`batched`]). None where the plan holds no such attention (tract's
/// ops stand for it) or a graph output comes from the voxel part.
///
/// # Errors
/// Where `input` is not an input of `one`, or tract cannot wire a node.
pub fn per_class(one: &TypedModel, input: usize) -> TractResult<Option<PerClass>> {
    let varying = nth_input(one, input)?;
    let ends = super::attention::context_voxels(one);
    if ends.is_empty() {
        return Ok(None);
    }
    let depends = reading(one, &[varying])?;
    let voxel = voxel_part(one, varying, &depends, &ends)?;
    let mut boundary: Vec<OutletId> = Vec::new();
    for id in one.eval_order()? {
        if depends[id] && !voxel[id] {
            for &i in &one.node(id).inputs {
                if voxel[i.node] && !boundary.contains(&i) {
                    boundary.push(i);
                }
            }
        }
    }
    if one
        .output_outlets()?
        .iter()
        .any(|o| voxel[o.node] || !depends[o.node])
    {
        return Ok(None);
    }
    let outputs: Vec<OutletId> = boundary.iter().copied().filter(|&o| o != varying).collect();
    let mut nodes = voxel;
    nodes[varying.node] = false;
    let (each, reads) = part(one, &nodes, &[varying], &outputs)?;
    let boundary = boundary
        .iter()
        .map(|&o| {
            let shape = one
                .outlet_fact(o)?
                .shape
                .as_concrete()
                .map(<[usize]>::to_vec);
            Ok(Boundary {
                name: one.node(o.node).name.clone(),
                slot: o.slot,
                shape: shape.context("a boundary value's shape is not known")?,
                from: match outputs.iter().position(|&p| p == o) {
                    Some(j) => Stacked::Each(j),
                    None => Stacked::Input,
                },
            })
        })
        .collect::<TractResult<Vec<_>>>()?;
    Ok(Some(PerClass {
        shared: upstream(one, input, &reads)?,
        each,
        boundary,
    }))
}

/// `many` (the graph of [`per_class`]'s `one` planned for `classes`
/// classes) cut at `boundary`: the part that does not read the input (from
/// the other inputs, in their order, the values the second reads), and the
/// rest past the voxel part (from those values, then, for each value of
/// `boundary`, the classes' input stacked ([`Stacked::Input`]) or each
/// class's value, one input per class, the graph's outputs). None where
/// `many` does not hold the boundary's values, stacked class by class,
/// reads more of the voxel part, or reads the context voxels but with the
/// engine's attention.
///
/// # Errors
/// Where `input` is not an input of `many`, or tract cannot wire a node.
pub fn batched(
    many: &TypedModel,
    input: usize,
    boundary: &[Boundary],
    classes: usize,
) -> TractResult<Option<(TypedModel, TypedModel)>> {
    let varying = nth_input(many, input)?;
    let mut outlets = Vec::with_capacity(boundary.len());
    for value in boundary {
        let Ok(node) = many.node_by_name(&value.name) else {
            return Ok(None);
        };
        let outlet = OutletId::new(node.id, value.slot);
        // The class axis first, past unit axes: the classes' values one
        // after the other.
        let mut stacked = vec![classes];
        stacked.extend(value.shape.iter().copied().filter(|&d| d != 1));
        let found = many
            .outlet_fact(outlet)?
            .shape
            .as_concrete()
            .map(|s| s.iter().copied().filter(|&d| d != 1).collect::<Vec<_>>());
        if found.is_none_or(|found| found != stacked)
            || (value.from == Stacked::Input) != (outlet == varying)
        {
            return Ok(None);
        }
        outlets.push(outlet);
    }
    let depends = reading(many, &[varying])?;
    let voxel = voxel_part(many, varying, &depends, &outlets)?;
    let mut rest = depends;
    for (id, rest) in rest.iter_mut().enumerate() {
        *rest &= !voxel[id];
    }
    let reads_more = many
        .eval_order()?
        .into_iter()
        .filter(|&id| rest[id])
        .any(|id| {
            many.node(id)
                .inputs
                .iter()
                .any(|i| voxel[i.node] && !outlets.contains(i))
        });
    let outputs = many.output_outlets()?.to_vec();
    if reads_more || outputs.iter().any(|o| !rest[o.node]) {
        return Ok(None);
    }
    let (second, reads) = part(many, &rest, &outlets, &outputs)?;
    let sources = second.input_outlets()?[reads.len()..].to_vec();
    let each: Vec<OutletId> = boundary
        .iter()
        .zip(sources)
        .filter(|(value, _)| value.from != Stacked::Input)
        .map(|(_, source)| source)
        .collect();
    let Some(rest) = super::attention::voxels_apart(&second, &each)? else {
        return Ok(None);
    };
    Ok(Some((upstream(many, input, &reads)?, rest)))
}

/// The outlet of `model`'s input `input`.
fn nth_input(model: &TypedModel, input: usize) -> TractResult<OutletId> {
    let inputs = model.input_outlets()?;
    match inputs.get(input) {
        Some(&outlet) => Ok(outlet),
        None => bail!("the model has {} inputs, no input {input}", inputs.len()),
    }
}

/// For each node of `model`, whether it reads one of `outlets`, directly
/// or through other nodes.
fn reading(model: &TypedModel, outlets: &[OutletId]) -> TractResult<Vec<bool>> {
    let mut reads = vec![false; model.nodes().len()];
    for id in model.eval_order()? {
        reads[id] = model
            .node(id)
            .inputs
            .iter()
            .any(|i| outlets.contains(i) || reads[i.node]);
    }
    Ok(reads)
}

/// The nodes that compute `ends` from the input `varying` (it included):
/// those of `depends` (what reads it) that `ends` are computed from.
fn voxel_part(
    model: &TypedModel,
    varying: OutletId,
    depends: &[bool],
    ends: &[OutletId],
) -> TractResult<Vec<bool>> {
    let mut upstream = vec![false; model.nodes().len()];
    for end in ends {
        upstream[end.node] = true;
    }
    for id in model.eval_order()?.into_iter().rev() {
        if upstream[id] {
            for i in &model.node(id).inputs {
                upstream[i.node] = true;
            }
        }
    }
    Ok((0..upstream.len())
        .map(|id| upstream[id] && (depends[id] || id == varying.node))
        .collect())
}

/// The nodes of `model` marked in `nodes`, as a model of their own that
/// reads `sources` and computes `outputs` (outlets of `model`). Every other
/// value the nodes read is a constant of the part where it is one in
/// `model`, else an input of the part; those inputs come first, then
/// `sources`. Returns the part and the outlets of `model` its first inputs
/// stand for.
fn part(
    model: &TypedModel,
    nodes: &[bool],
    sources: &[OutletId],
    outputs: &[OutletId],
) -> TractResult<(TypedModel, Vec<OutletId>)> {
    let mut part = Part {
        model: TypedModel::default(),
        wired: HashMap::new(),
        shared: Vec::new(),
    };
    let mut source_wires = Vec::with_capacity(sources.len());
    for &outlet in sources {
        let node = model.node(outlet.node);
        let name = match node.outputs.len() {
            1 => node.name.clone(),
            _ => format!("{}.{}", node.name, outlet.slot),
        };
        let wire = part
            .model
            .add_source(name, model.outlet_fact(outlet)?.clone())?;
        part.wired.insert(outlet, wire);
        source_wires.push(wire);
    }
    for id in model.eval_order()?.into_iter().filter(|&id| nodes[id]) {
        let node = model.node(id);
        let wires = node
            .inputs
            .iter()
            .map(|&i| part.take(model, i))
            .collect::<TractResult<TVec<_>>>()?;
        let outputs = part.model.wire_node(&node.name, node.op.clone(), &wires)?;
        for (slot, output) in outputs.into_iter().enumerate() {
            part.wired.insert(OutletId::new(id, slot), output);
        }
    }
    let outputs = outputs
        .iter()
        .map(|&o| part.take(model, o))
        .collect::<TractResult<Vec<_>>>()?;
    let Part {
        model: mut second,
        shared,
        ..
    } = part;
    second.select_output_outlets(&outputs)?;
    let mut inputs: Vec<OutletId> = shared.iter().map(|&(_, source)| source).collect();
    inputs.extend(source_wires);
    second.set_input_outlets(&inputs)?;
    Ok((second, shared.iter().map(|&(outlet, _)| outlet).collect()))
}

/// `model` computing `outputs` from its inputs but `input`.
fn upstream(model: &TypedModel, input: usize, outputs: &[OutletId]) -> TractResult<TypedModel> {
    let mut first = model.clone();
    let inputs: Vec<OutletId> = model
        .input_outlets()?
        .iter()
        .enumerate()
        .filter(|&(ix, _)| ix != input)
        .map(|(_, &o)| o)
        .collect();
    first.set_input_outlets(&inputs)?;
    first.select_output_outlets(outputs)?;
    first.into_compact()
}

/// A part of a model (see [`part`]) as it is wired.
struct Part {
    model: TypedModel,
    /// Each outlet of the whole model to its wire in the part.
    wired: HashMap<OutletId, OutletId>,
    /// Values the part reads that it does not compute, and their sources.
    shared: Vec<(OutletId, OutletId)>,
}

impl Part {
    /// The wire standing for `outlet` of `whole`: one already wired, or for
    /// a value computed elsewhere a constant where it is one, else a new
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
        // No attention over context voxels to cut at: no cut by class.
        assert!(per_class(&whole, 1).expect("looks").is_none());
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
