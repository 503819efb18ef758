//! Where one ONNX graph spends its time in tract, node by node: the tool
//! behind the per-op profiles of `docs/benchmarks.md` (issue 20).
//!
//! ```text
//! cargo run --release -p iris-core --example profile_graph -- \
//!     models/iris-tiny/task_encoder.onnx 1x16x8x8x8 1x32x4x4x4 1x32x2x2x2 1xKx32x32x32 \
//!     --classes 15 --threads 2 --runs 5
//! ```
//!
//! The graph's inputs are given in order as shapes (`1x16x8x8x8`; `K`
//! stands for `--classes`, default 1) and filled with a fixed pattern in
//! `[0, 1)`; the plan is optimised as the engine plans it, its own ops
//! included (`iris_core::engine::optimise`; with `IRIS_DIRECT_CONV=0`,
//! tract's ops stand where the engine's AVX-512 kernels would: its
//! convolutions and the task encoder's attention). After one warm-up
//! run, `--runs` runs (default 5) are timed node by node on a pool of
//! `--threads` threads (default 1, as many as tract's matrix products may
//! use). It prints the mean seconds per run of each operator type and of the
//! `--slowest` nodes (default 12), with their output shapes.
//! `--precision bf16` plans the convolutions' products in bfloat16
//! (`iris_core::engine::Precision`; f32 by default).
//!
//! With `--per-class`, the plan is cut around its last input
//! (`iris_core::engine::split`, the task encoder's masks) and only the
//! part that reads it is timed, on the other part's outputs: what each
//! further class of a reference costs. With `--batched`, the plan is cut
//! as the engine runs the task encoder for `--classes` classes
//! (`iris_core::engine::per_class` and `batched`) and only the part run
//! for all the classes at once is timed, on each class's voxel part's
//! values (one class's, repeated).

use std::collections::HashMap;
use std::error::Error;
use std::time::Instant;

use tract_linalg::multithread::{Executor, multithread_tract_scope};
use tract_onnx::prelude::*;
use tract_onnx::tract_core::plan::{SimplePlan, SimpleState, eval};

use iris_core::engine::Precision;

struct Args {
    graph: String,
    /// The inputs' shapes, `K` standing for the class count.
    shapes: Vec<String>,
    classes: usize,
    threads: usize,
    runs: usize,
    /// Nodes listed one by one after the per-operator totals.
    slowest: usize,
    /// Time only the part of the plan that reads the last input.
    per_class: bool,
    /// Time only the part of the plan run for all the classes at once.
    batched: bool,
    precision: Precision,
}

impl Args {
    /// The inputs' shapes for `classes` classes.
    fn shapes(&self, classes: usize) -> Result<Vec<Vec<usize>>, String> {
        self.shapes
            .iter()
            .map(|shape| {
                shape
                    .split('x')
                    .map(|d| match d {
                        "K" => Ok(classes),
                        _ => d
                            .parse()
                            .map_err(|e| format!("shape {shape:?}: {d:?}: {e}")),
                    })
                    .collect()
            })
            .collect()
    }
}

fn number(flag: &str, value: Option<String>) -> Result<usize, Box<dyn Error>> {
    let value = value.ok_or_else(|| format!("{flag} needs a number"))?;
    Ok(value
        .parse()
        .map_err(|e| format!("{flag} {value:?}: {e}"))?)
}

fn parse_args() -> Result<Args, Box<dyn Error>> {
    let mut args = std::env::args().skip(1);
    let (mut positional, mut classes, mut threads, mut runs, mut slowest) =
        (Vec::new(), 1, 1, 5, 12);
    let (mut per_class, mut batched, mut precision) = (false, false, Precision::Float32);
    while let Some(arg) = args.next() {
        match arg.as_str() {
            "--per-class" => per_class = true,
            "--batched" => batched = true,
            "--classes" => classes = number(&arg, args.next())?,
            "--threads" => threads = number(&arg, args.next())?.max(1),
            "--runs" => runs = number(&arg, args.next())?.max(1),
            "--slowest" => slowest = number(&arg, args.next())?,
            "--precision" => precision = args.next().unwrap_or_default().parse()?,
            _ => positional.push(arg),
        }
    }
    let Some((graph, shapes)) = positional.split_first() else {
        return Err("usage: profile_graph GRAPH.onnx SHAPE... [--classes K] \
                    [--threads N] [--runs N] [--slowest N] [--per-class | --batched] \
                    [--precision f32|bf16] (a shape: 1x16x8x8x8, K = --classes)"
            .into());
    };
    Ok(Args {
        graph: graph.clone(),
        shapes: shapes.to_vec(),
        classes,
        threads,
        runs,
        slowest,
        per_class,
        batched,
        precision,
    })
}

/// The graph planned as the engine plans it, for these input shapes.
fn planned(
    graph: &str,
    shapes: &[Vec<usize>],
    precision: Precision,
) -> Result<TypedModel, Box<dyn Error>> {
    let mut model = iris_core::engine::reader().model_for_path(graph)?;
    for (ix, shape) in shapes.iter().enumerate() {
        model.set_input_fact(ix, f32::fact(shape).into())?;
    }
    Ok(iris_core::engine::optimise(model.into_typed()?, precision)?)
}

/// A tensor of `shape` filled with a fixed pattern in `[0, 1)`.
fn pattern(shape: &[usize]) -> Result<TValue, Box<dyn Error>> {
    let len = shape.iter().product();
    let values = (0..len).map(|i| ((i * 7919) % 1000) as f32 / 1000.0);
    Ok(tract_ndarray::ArrayD::from_shape_vec(shape, values.collect())?.into_tvalue())
}

/// The part of the plan for `args.classes` classes run for all of them at
/// once, and its inputs: the other part's values and each class's voxel
/// part's, stacked (one class's, repeated).
fn batched_part(
    args: &Args,
    model: &TypedModel,
    mut inputs: TVec<TValue>,
) -> Result<(TypedModel, TVec<TValue>), Box<dyn Error>> {
    use iris_core::engine::Stacked;
    let last = inputs
        .len()
        .checked_sub(1)
        .ok_or("the graph has no input")?;
    let one_shapes = args.shapes(1)?;
    let one = planned(&args.graph, &one_shapes, args.precision)?;
    let cut = iris_core::engine::per_class(&one, last)?
        .ok_or("the one-class plan holds no attention over context voxels to cut at")?;
    let (shared, rest) = iris_core::engine::batched(model, last, &cut.boundary, args.classes)?
        .ok_or("the plan for several classes does not hold the same context voxels")?;
    let stacked = inputs.pop().ok_or("the graph has no input")?;
    let mut each_inputs = SimplePlan::new(cut.shared)?.run(inputs.clone())?;
    each_inputs.push(pattern(&one_shapes[last])?);
    let each = SimplePlan::new(cut.each)?.run(each_inputs)?;
    let mut rest_inputs = SimplePlan::new(shared)?.run(inputs)?;
    for value in &cut.boundary {
        match value.from {
            Stacked::Input => rest_inputs.push(stacked.clone()),
            Stacked::Each(j) => rest_inputs.extend((0..args.classes).map(|_| each[j].clone())),
        }
    }
    Ok((rest, rest_inputs))
}

fn main() -> Result<(), Box<dyn Error>> {
    let args = parse_args()?;
    let shapes = args.shapes(args.classes)?;
    let model = planned(&args.graph, &shapes, args.precision)?;
    let mut inputs = shapes
        .iter()
        .map(|shape| pattern(shape))
        .collect::<Result<TVec<TValue>, _>>()?;
    let executor = Executor::multithread(args.threads);
    let plan = if args.per_class {
        let last = inputs
            .len()
            .checked_sub(1)
            .ok_or("the graph has no input")?;
        let (first, second) = iris_core::engine::split(&model, last)?;
        let varying = inputs.pop().ok_or("the graph has no input")?;
        let first = SimplePlan::new(first)?;
        inputs = multithread_tract_scope(executor.clone(), || first.run(inputs))?;
        inputs.push(varying);
        SimplePlan::new(second)?
    } else if args.batched {
        let (rest, rest_inputs) = multithread_tract_scope(executor.clone(), || {
            batched_part(&args, &model, inputs.clone())
        })?;
        inputs = rest_inputs;
        SimplePlan::new(rest)?
    } else {
        SimplePlan::new(model)?
    };

    let mut by_op: HashMap<String, (f64, usize)> = HashMap::new();
    let mut by_node: HashMap<usize, (f64, String)> = HashMap::new();
    let mut total = 0.0;
    multithread_tract_scope(executor, || {
        let mut state = SimpleState::new(&plan)?;
        state.run(inputs.clone())?;
        for _ in 0..args.runs {
            let start = Instant::now();
            state.run_plan_with_eval(inputs.clone(), |session, op_state, node, input| {
                let node_start = Instant::now();
                let output = eval(session, op_state, node, input);
                let seconds = node_start.elapsed().as_secs_f64();
                let op = by_op.entry(node.op().name().to_string()).or_default();
                op.0 += seconds;
                op.1 += 1;
                let entry = by_node.entry(node.id).or_insert_with(|| {
                    let shape = node.outputs.first().map(|o| format!("{:?}", o.fact.shape));
                    let label = format!("{} ({})", node.name, node.op().name());
                    (0.0, format!("{label} -> {}", shape.unwrap_or_default()))
                });
                entry.0 += seconds;
                output
            })?;
            total += start.elapsed().as_secs_f64();
        }
        TractResult::Ok(())
    })?;

    let runs = args.runs as f64;
    println!(
        "{}: {:.4} s per run (mean of {}), {} thread(s)",
        args.graph,
        total / runs,
        args.runs,
        args.threads
    );
    let mut ops: Vec<_> = by_op.into_iter().collect();
    ops.sort_by(|a, b| b.1.0.total_cmp(&a.1.0));
    for (op, (seconds, count)) in &ops {
        println!(
            "{:>9.4} s {:>5.1} %  {op} (x{})",
            seconds / runs,
            100.0 * seconds / total,
            count / args.runs
        );
    }
    let mut nodes: Vec<_> = by_node.into_values().collect();
    nodes.sort_by(|a, b| b.0.total_cmp(&a.0));
    println!("slowest nodes:");
    for (seconds, label) in nodes.iter().take(args.slowest) {
        println!("{:>9.4} s  {label}", seconds / runs);
    }
    Ok(())
}
