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
//!
//! With `--per-class`, the plan is cut around its last input
//! (`iris_core::engine::split`, the task encoder's masks) and only the
//! part that reads it is timed, on the other part's outputs: what each
//! further class of a reference costs.

use std::collections::HashMap;
use std::error::Error;
use std::time::Instant;

use tract_linalg::multithread::{Executor, multithread_tract_scope};
use tract_onnx::prelude::*;
use tract_onnx::tract_core::plan::{SimplePlan, SimpleState, eval};

struct Args {
    graph: String,
    shapes: Vec<Vec<usize>>,
    threads: usize,
    runs: usize,
    /// Nodes listed one by one after the per-operator totals.
    slowest: usize,
    /// Time only the part of the plan that reads the last input.
    per_class: bool,
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
    let mut per_class = false;
    while let Some(arg) = args.next() {
        match arg.as_str() {
            "--per-class" => per_class = true,
            "--classes" => classes = number(&arg, args.next())?,
            "--threads" => threads = number(&arg, args.next())?.max(1),
            "--runs" => runs = number(&arg, args.next())?.max(1),
            "--slowest" => slowest = number(&arg, args.next())?,
            _ => positional.push(arg),
        }
    }
    let Some((graph, shapes)) = positional.split_first() else {
        return Err("usage: profile_graph GRAPH.onnx SHAPE... [--classes K] \
                    [--threads N] [--runs N] [--slowest N] [--per-class] (a shape: 1x16x8x8x8, \
                    K = --classes)"
            .into());
    };
    let shapes = shapes
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
                .collect::<Result<Vec<usize>, String>>()
        })
        .collect::<Result<_, _>>()?;
    Ok(Args {
        graph: graph.clone(),
        shapes,
        threads,
        runs,
        slowest,
        per_class,
    })
}

fn main() -> Result<(), Box<dyn Error>> {
    let args = parse_args()?;
    let mut model = iris_core::engine::reader().model_for_path(&args.graph)?;
    for (ix, shape) in args.shapes.iter().enumerate() {
        model.set_input_fact(ix, f32::fact(shape).into())?;
    }
    let model = iris_core::engine::optimise(model.into_typed()?)?;
    let mut inputs = args
        .shapes
        .iter()
        .map(|shape| {
            let len = shape.iter().product();
            let values = (0..len).map(|i| ((i * 7919) % 1000) as f32 / 1000.0);
            Ok(
                tract_ndarray::ArrayD::from_shape_vec(shape.as_slice(), values.collect())?
                    .into_tvalue(),
            )
        })
        .collect::<Result<TVec<TValue>, Box<dyn Error>>>()?;
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
