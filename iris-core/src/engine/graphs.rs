//! The three ONNX graphs in tract: read once, planned per pinned shape.
//!
//! The graphs declare the batch and the class dimensions symbolic (`batch`,
//! `classes`). tract runs a plan with symbolic dimensions about 5x slower
//! than one whose every shape is known, so each graph is planned for batch
//! 1, the model's patch and one class count `K` at a time. Optimised plans
//! are kept per `K` ([`MAX_PLANS`] per graph, least recently used dropped
//! first), so repeated calls with the same `K` never optimise again.
//!
//! Every plan runs its matrix products on the model's [`Executor`], a rayon
//! pool of the model's own (one thread per core unless the caller sets
//! another count; tract's `multithread-mm`).

// This crate is `no_std`; the engine is `std` code.
use std::prelude::rust_2024::*;
use std::{format, vec};

use std::collections::{HashMap, HashSet};
use std::fmt::Display;
use std::ops::Range;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, PoisonError};

use tract_linalg::multithread::Executor;
use tract_onnx::Onnx;
use tract_onnx::prelude::{
    Datum, Framework, InferenceFact, InferenceModel, InferenceModelExt, RunOptions, TValue, TVec,
    Tensor, TypedModel, TypedRunnableModel,
};
use tract_onnx::tract_core::internal::{
    InletId, OutletId, TractResult, TypedModelPatch, TypedNode, TypedOp,
};
use tract_onnx::tract_hir::infer::Factoid;

use super::Precision;
use super::split::{Boundary, Stacked};
use crate::error::{Error, Result};

/// Most optimised plans kept per graph (one per class count).
pub const MAX_PLANS: usize = 8;

/// Most classes [`Graph::run_by_class`] runs at once past their voxel
/// parts: each class's context voxels, 22 MB at the full size, stay alive
/// until the run's queries have read them.
pub const CLASSES_PER_RUN: usize = 16;

/// Most plans for several classes at once kept per graph: each holds its
/// own copy of the queries' blocks' packed weights (a run of classes needs
/// two class counts at most).
const MAX_CLASSES_PLANS: usize = 2;

/// One dimension of a graph input or output.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Dim {
    /// The symbolic batch dimension, always run as 1.
    Batch,
    /// The symbolic class dimension `K`.
    Classes,
    /// A dimension fixed by the manifest.
    Fixed(usize),
}

/// A named graph input or output and its shape.
#[derive(Clone, Debug, PartialEq, Eq)]
pub(crate) struct Port {
    pub name: String,
    pub dims: Vec<Dim>,
}

impl Port {
    pub fn new(name: impl Into<String>, dims: Vec<Dim>) -> Port {
        Port {
            name: name.into(),
            dims,
        }
    }

    /// The concrete shape for `classes` classes and batch 1.
    pub fn shape(&self, classes: usize) -> Vec<usize> {
        self.dims
            .iter()
            .map(|d| match *d {
                Dim::Batch => 1,
                Dim::Classes => classes,
                Dim::Fixed(n) => n,
            })
            .collect()
    }

    /// `name [batch, classes, 64, ...]`.
    fn describe(&self) -> String {
        let dims: Vec<String> = self
            .dims
            .iter()
            .map(|d| match d {
                Dim::Batch => "batch".into(),
                Dim::Classes => "classes".into(),
                Dim::Fixed(n) => n.to_string(),
            })
            .collect();
        format!("`{}` [{}]", self.name, dims.join(", "))
    }
}

/// One ONNX graph, as read, with its optimised plans.
pub(crate) struct Graph {
    path: PathBuf,
    /// The graph as parsed, shapes still symbolic; cloned for every new plan.
    model: InferenceModel,
    /// The expected inputs, in the graph's input order.
    inputs: Vec<Port>,
    /// The expected outputs, in the order [`Graph::run`] returns them.
    outputs: Vec<Port>,
    /// For each expected output, its position among the graph's outputs.
    output_slots: Vec<usize>,
    /// The arithmetic of its plans' convolutions (one this CPU runs).
    precision: Precision,
    plans: Mutex<Plans<Arc<TypedRunnableModel>>>,
    /// The one-class plan cut around one input, once asked for.
    split: Mutex<Option<Arc<SplitPlan>>>,
    /// The one-class parts of the plans for several classes, once asked
    /// for (None inside where the graph cannot be cut so).
    per_class: Mutex<Option<Option<Arc<PerClassPlan>>>>,
    /// Plans for several classes at once, by class count.
    batched: Mutex<Plans<Option<Arc<ClassesPlan>>>>,
}

/// A one-class plan cut around one input that varies between runs sharing
/// the others (see `split`).
pub(crate) struct SplitPlan {
    /// From the other inputs, the values every run needs.
    pub shared: Arc<TypedRunnableModel>,
    /// From those values and the input, the graph's outputs.
    pub varying: Arc<TypedRunnableModel>,
    /// The input's position among the graph's inputs.
    input: usize,
}

/// A graph planned for one class cut around the input that holds one value
/// per class, at its classes' context voxels (see `split::per_class`).
pub(crate) struct PerClassPlan {
    /// The input's position among the graph's inputs.
    input: usize,
    /// From the other inputs, what `each` reads.
    pub shared: Arc<TypedRunnableModel>,
    /// One class's voxel part: from `shared`'s values and the class's value
    /// of the input, what the rest reads of it.
    pub each: Arc<TypedRunnableModel>,
    pub boundary: Vec<Boundary>,
}

/// A plan for several classes at once: each class through the one-class
/// voxel part, then the rest for all the classes together (see
/// `split::batched`).
pub(crate) struct ClassesPlan {
    pub per_class: Arc<PerClassPlan>,
    /// From the inputs but the classes', what `rest` reads.
    pub shared: Arc<TypedRunnableModel>,
    /// From `shared`'s values and the boundary's values of the classes,
    /// the graph's outputs.
    pub rest: Arc<TypedRunnableModel>,
}

/// Plans by class count, at most `limit`, the least recently used dropped
/// first.
struct Plans<T> {
    limit: usize,
    clock: u64,
    /// Class count to (last use, plan).
    by_classes: HashMap<usize, (u64, T)>,
}

impl<T: Clone> Plans<T> {
    fn new(limit: usize) -> Self {
        Plans {
            limit,
            clock: 0,
            by_classes: HashMap::new(),
        }
    }

    /// The plan for `classes`, built (and kept) on first use.
    fn get_or_build(&mut self, classes: usize, build: impl FnOnce() -> Result<T>) -> Result<T> {
        self.clock += 1;
        let now = self.clock;
        if let Some((used, plan)) = self.by_classes.get_mut(&classes) {
            *used = now;
            return Ok(plan.clone());
        }
        let plan = build()?;
        if self.by_classes.len() >= self.limit
            && let Some(oldest) = self
                .by_classes
                .iter()
                .min_by_key(|(_, (used, _))| *used)
                .map(|(k, _)| *k)
        {
            self.by_classes.remove(&oldest);
        }
        self.by_classes.insert(classes, (now, plan.clone()));
        Ok(plan)
    }
}

/// Where a graph's ONNX bytes are.
pub(crate) enum Source<'a> {
    /// A file.
    File(PathBuf),
    /// Bytes in memory; `name` stands for the file in messages.
    Bytes { name: PathBuf, bytes: &'a [u8] },
}

impl Graph {
    /// Reads the ONNX graph from `source` and checks that its inputs and
    /// outputs are exactly `inputs` and `outputs` (names; element type f32;
    /// every fixed dimension that the file declares concretely). Its plans
    /// will run in `precision` where this CPU runs it, else in f32
    /// ([`Precision::on_this_cpu`]).
    pub fn load(
        source: Source<'_>,
        inputs: &[Port],
        outputs: Vec<Port>,
        precision: Precision,
    ) -> Result<Graph> {
        let path = match &source {
            Source::File(path) | Source::Bytes { name: path, .. } => path.clone(),
        };
        let fail = |reason: String| Error::Model {
            path: path.clone(),
            reason,
        };
        let tract = |what: &str, e: &dyn Display| fail(format!("{what}: {e:#}"));
        let onnx = reader();
        let model = match source {
            Source::File(path) if !path.is_file() => {
                return Err(fail("the graph file is missing".into()));
            }
            Source::File(path) => onnx.model_for_path(path),
            Source::Bytes { mut bytes, .. } => onnx.model_for_read(&mut bytes),
        }
        .map_err(|e| tract("cannot read the ONNX graph", &e))?;
        let input_outlets = model
            .input_outlets()
            .map_err(|e| tract("cannot list the inputs", &e))?;
        let names: Vec<&str> = input_outlets
            .iter()
            .map(|o| model.node(o.node).name.as_str())
            .collect();
        let expected = |ports: &[Port]| ports.iter().map(Port::describe).collect::<Vec<_>>();
        let mut ordered = Vec::with_capacity(inputs.len());
        for name in &names {
            match inputs.iter().find(|p| p.name == *name) {
                Some(port) if names.len() == inputs.len() => ordered.push(port.clone()),
                _ => {
                    return Err(fail(format!(
                        "the graph's inputs are {names:?}, expected {}",
                        expected(inputs).join(", ")
                    )));
                }
            }
        }
        for (ix, port) in ordered.iter().enumerate() {
            let fact = model
                .input_fact(ix)
                .map_err(|e| tract("cannot read an input", &e))?;
            check_declared(fact, port).map_err(fail)?;
        }
        let output_names: Vec<String> = model
            .output_outlets()
            .map_err(|e| tract("cannot list the outputs", &e))?
            .iter()
            .map(|&o| {
                model
                    .outlet_label(o)
                    .unwrap_or(&model.node(o.node).name)
                    .to_string()
            })
            .collect();
        let output_slots = outputs
            .iter()
            .map(|port| {
                output_names
                    .iter()
                    .position(|n| *n == port.name)
                    .ok_or_else(|| {
                        fail(format!(
                            "the graph has no output `{}` (its outputs are {output_names:?}, \
                             expected {})",
                            port.name,
                            expected(&outputs).join(", ")
                        ))
                    })
            })
            .collect::<Result<Vec<_>>>()?;
        Ok(Graph {
            path,
            model,
            inputs: ordered,
            outputs,
            output_slots,
            precision: precision.on_this_cpu(),
            plans: Mutex::new(Plans::new(MAX_PLANS)),
            split: Mutex::new(None),
            per_class: Mutex::new(None),
            batched: Mutex::new(Plans::new(MAX_CLASSES_PLANS)),
        })
    }

    /// The graph's inputs, in the order [`Graph::run`] takes them.
    pub fn inputs(&self) -> &[Port] {
        &self.inputs
    }

    /// The arithmetic of its plans' convolutions.
    pub fn precision(&self) -> Precision {
        self.precision
    }

    /// The optimised plan for `classes` classes, built on first use.
    pub fn plan(&self, classes: usize, executor: &Executor) -> Result<Arc<TypedRunnableModel>> {
        // A panic while building a plan cannot leave the map half-written.
        let mut plans = self.plans.lock().unwrap_or_else(PoisonError::into_inner);
        plans.get_or_build(classes, || self.build(classes, executor))
    }

    /// Class counts with a plan ready, ascending.
    pub fn planned(&self) -> Vec<usize> {
        let plans = self.plans.lock().unwrap_or_else(PoisonError::into_inner);
        let mut ks: Vec<usize> = plans.by_classes.keys().copied().collect();
        ks.sort_unstable();
        ks
    }

    /// The plan for one class cut around input `name` (see `split`): the
    /// part that does not read it runs once for any number of its values.
    /// Built on first use.
    ///
    /// # Errors
    /// [`Error::Model`] if the graph has no input `name` or cannot be
    /// planned.
    pub fn split_plan(&self, name: &str, executor: &Executor) -> Result<Arc<SplitPlan>> {
        let mut split = self.split.lock().unwrap_or_else(PoisonError::into_inner);
        if let Some(plan) = split.as_ref().filter(|p| self.inputs[p.input].name == name) {
            return Ok(Arc::clone(plan));
        }
        let fail = |e: &dyn Display| Error::Model {
            path: self.path.clone(),
            reason: format!("cannot plan the graph cut around input `{name}`: {e:#}"),
        };
        let input = self
            .inputs
            .iter()
            .position(|p| p.name == name)
            .ok_or_else(|| fail(&"no such input"))?;
        let (shared, varying) =
            super::split::split(&self.typed(1)?, input).map_err(|e| fail(&e))?;
        let plan = Arc::new(SplitPlan {
            shared: runnable(shared, executor).map_err(|e| fail(&e))?,
            varying: runnable(varying, executor).map_err(|e| fail(&e))?,
            input,
        });
        *split = Some(Arc::clone(&plan));
        Ok(plan)
    }

    /// Runs the graph for `classes` classes whose values of the input
    /// `name` `class_values(range)` gives, stacked on a class axis (`[1, n, ...]`
    /// for the `n` classes of `range`), beside the other inputs, `inputs`
    /// in the order of [`Graph::inputs`] (the named one is not read).
    /// Returns the outputs of runs of classes, in class order: each run's
    /// in the order given to [`Graph::load`], `[n, ...]` for its `n`.
    ///
    /// What does not read the input runs once; each class's voxel part
    /// (`split::per_class`) runs on its own and the rest for up to
    /// [`CLASSES_PER_RUN`] classes at once, or, where the graph cannot be
    /// cut so (no context voxels: the engine's attention is not in the
    /// plan), the whole part that reads the input runs class by class.
    ///
    /// # Errors
    /// [`Error::Model`] if the graph has no input `name`, cannot be planned
    /// or fails; what `class_values` returns.
    pub fn run_by_class(
        &self,
        name: &str,
        mut inputs: TVec<TValue>,
        classes: usize,
        class_values: impl Fn(Range<usize>) -> Result<TValue>,
        executor: &Executor,
    ) -> Result<Vec<Vec<TValue>>> {
        let input = self.input_named(name)?;
        if input < inputs.len() {
            inputs.remove(input);
        }
        // Runs of at most CLASSES_PER_RUN classes, of two sizes at most.
        let runs = classes.div_ceil(CLASSES_PER_RUN);
        let (size, longer) = (classes / runs.max(1), classes % runs.max(1));
        let mut outputs = Vec::with_capacity(runs);
        let mut first = 0;
        let mut each_shared = None;
        let mut split_shared = None;
        for run in 0..runs {
            let n = size + usize::from(run < longer);
            let range = first..first + n;
            first += n;
            let plan = match n {
                1 => None,
                _ => self.classes_plan(input, n, executor)?,
            };
            let Some(plan) = plan else {
                let split = self.split_plan(name, executor)?;
                let shared = match split_shared.take() {
                    Some(shared) => shared,
                    None => self.run_part(&split.shared, inputs.clone())?,
                };
                outputs.extend(self.run_one_by_one(&split, &shared, range, &class_values)?);
                split_shared = Some(shared);
                continue;
            };
            let shared = match each_shared.take() {
                Some(shared) => shared,
                None => self.run_part(&plan.per_class.shared, inputs.clone())?,
            };
            outputs.push(self.run_classes(&plan, &shared, &inputs, range, &class_values)?);
            each_shared = Some(shared);
        }
        Ok(outputs)
    }

    /// [`Graph::run_by_class`] for the classes `range` class by class
    /// through `split`, the one-class plan cut around the classes' input,
    /// its shared values `shared` computed.
    pub fn run_one_by_one(
        &self,
        split: &SplitPlan,
        shared: &TVec<TValue>,
        range: Range<usize>,
        class_values: &impl Fn(Range<usize>) -> Result<TValue>,
    ) -> Result<Vec<Vec<TValue>>> {
        range
            .map(|class| {
                let mut inputs = shared.clone();
                inputs.push(class_values(class..class + 1)?);
                Ok(self.expected(&self.run_part(&split.varying, inputs)?))
            })
            .collect()
    }

    /// [`Graph::run_by_class`] for the classes `range` through `plan`, its
    /// one-class shared values `each_shared` computed from `inputs` (all
    /// but the classes').
    fn run_classes(
        &self,
        plan: &ClassesPlan,
        each_shared: &TVec<TValue>,
        inputs: &TVec<TValue>,
        range: Range<usize>,
        class_values: &impl Fn(Range<usize>) -> Result<TValue>,
    ) -> Result<Vec<TValue>> {
        let per_class = &plan.per_class;
        // Each class's values of the boundary, class by class.
        let mut each = Vec::with_capacity(range.len());
        for class in range.clone() {
            let mut each_inputs = each_shared.clone();
            each_inputs.push(class_values(class..class + 1)?);
            each.push(self.run_part(&per_class.each, each_inputs)?);
        }
        let mut rest_inputs = self.run_part(&plan.shared, inputs.clone())?;
        for value in &per_class.boundary {
            match value.from {
                Stacked::Input => rest_inputs.push(class_values(range.clone())?),
                Stacked::Each(j) => rest_inputs.extend(each.iter().map(|o| o[j].clone())),
            }
        }
        // The rest's inputs now hold the only references to the classes'
        // values, so that each is freed once read.
        drop(each);
        Ok(self.expected(&self.run_part(&plan.rest, rest_inputs)?))
    }

    /// The plan for `classes` classes cut around input `input` (see
    /// [`ClassesPlan`]), built on first use; None where the graph cannot be
    /// cut so.
    pub fn classes_plan(
        &self,
        input: usize,
        classes: usize,
        executor: &Executor,
    ) -> Result<Option<Arc<ClassesPlan>>> {
        let fail = |e: &dyn Display| Error::Model {
            path: self.path.clone(),
            reason: format!(
                "cannot plan the graph for {classes} classes by class around input `{}`: {e:#}",
                self.inputs[input].name
            ),
        };
        let per_class = {
            let mut slot = self
                .per_class
                .lock()
                .unwrap_or_else(PoisonError::into_inner);
            match slot.as_ref() {
                Some(plan) if plan.as_ref().is_none_or(|p| p.input == input) => plan.clone(),
                _ => {
                    let one = self.typed(1)?;
                    let parts = super::split::per_class(&one, input).map_err(|e| fail(&e))?;
                    let plan = match parts {
                        Some(parts) => Some(Arc::new(PerClassPlan {
                            input,
                            shared: runnable(parts.shared, executor).map_err(|e| fail(&e))?,
                            each: runnable(parts.each, executor).map_err(|e| fail(&e))?,
                            boundary: parts.boundary,
                        })),
                        None => None,
                    };
                    *slot = Some(plan.clone());
                    plan
                }
            }
        };
        let Some(per_class) = per_class else {
            return Ok(None);
        };
        let mut batched = self.batched.lock().unwrap_or_else(PoisonError::into_inner);
        batched.get_or_build(classes, || {
            let many = self.typed(classes)?;
            let parts = super::split::batched(&many, input, &per_class.boundary, classes)
                .map_err(|e| fail(&e))?;
            let Some((shared, rest)) = parts else {
                return Ok(None);
            };
            Ok(Some(Arc::new(ClassesPlan {
                per_class: Arc::clone(&per_class),
                shared: runnable(shared, executor).map_err(|e| fail(&e))?,
                rest: runnable(rest, executor).map_err(|e| fail(&e))?,
            })))
        })
    }

    /// The position of the input `name` among the graph's inputs.
    fn input_named(&self, name: &str) -> Result<usize> {
        self.inputs
            .iter()
            .position(|p| p.name == name)
            .ok_or_else(|| Error::Model {
                path: self.path.clone(),
                reason: format!("the graph has no input `{name}`"),
            })
    }

    /// Runs one part of a cut plan.
    pub fn run_part(
        &self,
        plan: &Arc<TypedRunnableModel>,
        inputs: TVec<TValue>,
    ) -> Result<TVec<TValue>> {
        plan.run(inputs).map_err(|e| self.failed(&e))
    }

    fn build(&self, classes: usize, executor: &Executor) -> Result<Arc<TypedRunnableModel>> {
        runnable(self.typed(classes)?, executor).map_err(|e| Error::Model {
            path: self.path.clone(),
            reason: format!("cannot plan the graph for {classes} class(es): {e:#}"),
        })
    }

    /// The graph optimised for `classes` classes, its outputs checked.
    fn typed(&self, classes: usize) -> Result<TypedModel> {
        let fail = |e: &dyn Display| Error::Model {
            path: self.path.clone(),
            reason: format!("cannot plan the graph for {classes} class(es): {e:#}"),
        };
        let mut model = self.model.clone();
        for (ix, port) in self.inputs.iter().enumerate() {
            model
                .set_input_fact(
                    ix,
                    InferenceFact::dt_shape(f32::datum_type(), port.shape(classes)),
                )
                .map_err(|e| fail(&e))?;
        }
        let typed = model
            .into_typed()
            .and_then(|typed| optimise(typed, self.precision))
            .map_err(|e| fail(&e))?;
        for (port, &slot) in self.outputs.iter().zip(&self.output_slots) {
            let fact = typed.output_fact(slot).map_err(|e| fail(&e))?;
            let want = port.shape(classes);
            if fact.datum_type != f32::datum_type()
                || fact.shape.as_concrete() != Some(want.as_slice())
            {
                return Err(Error::Model {
                    path: self.path.clone(),
                    reason: format!(
                        "output `{}` is {:?} {:?} for {classes} class(es), expected f32 {want:?}",
                        port.name, fact.datum_type, fact.shape
                    ),
                });
            }
        }
        Ok(typed)
    }

    /// Runs `plan` (from [`Graph::plan`]) on `inputs`, given in the order of
    /// [`Graph::inputs`]; returns the outputs in the order given to
    /// [`Graph::load`].
    pub fn run(&self, plan: &Arc<TypedRunnableModel>, inputs: TVec<TValue>) -> Result<Vec<TValue>> {
        let outputs = plan.run(inputs).map_err(|e| self.failed(&e))?;
        Ok(self.expected(&outputs))
    }

    /// The expected outputs among a plan's `outputs`, in the order given to
    /// [`Graph::load`].
    fn expected(&self, outputs: &[TValue]) -> Vec<TValue> {
        self.output_slots
            .iter()
            .map(|&slot| outputs[slot].clone())
            .collect()
    }

    fn failed(&self, e: &dyn Display) -> Error {
        Error::Model {
            path: self.path.clone(),
            reason: format!("running the graph failed: {e:#}"),
        }
    }

    /// The file the graph was read from.
    pub fn path(&self) -> &Path {
        &self.path
    }
}

/// `model` planned to run its matrix products on `executor`'s pool.
fn runnable(model: TypedModel, executor: &Executor) -> TractResult<Arc<TypedRunnableModel>> {
    let options = RunOptions {
        executor: Some(executor.clone()),
        ..RunOptions::default()
    };
    model.into_runnable_with_options(&options)
}

/// Checks what the file declares for an input against `port`: element type
/// f32 and, where the file gives a number, the fixed dimensions.
fn check_declared(fact: &InferenceFact, port: &Port) -> core::result::Result<(), String> {
    let mismatch = |found: String| {
        format!(
            "input `{}` is declared {found}, expected f32 {}",
            port.name,
            port.describe()
        )
    };
    if let Some(dt) = fact.datum_type.concretize()
        && dt != f32::datum_type()
    {
        return Err(mismatch(format!("{dt:?}")));
    }
    let dims: Vec<_> = fact.shape.dims().collect();
    let rank_ok = if fact.shape.is_open() {
        dims.len() <= port.dims.len()
    } else {
        dims.len() == port.dims.len()
    };
    let fixed_ok = dims.iter().zip(&port.dims).all(|(found, want)| {
        match (found.concretize().and_then(|d| d.as_i64()), want) {
            (Some(n), Dim::Fixed(w)) => usize::try_from(n).is_ok_and(|n| n == *w),
            _ => true,
        }
    });
    if rank_ok && fixed_ok {
        Ok(())
    } else {
        Err(mismatch(format!("{:?}", fact.shape)))
    }
}

/// The pool a model's graphs run on: `threads` threads, 0 for one per core.
///
/// # Errors
/// [`Error::InvalidArgument`] if the operating system refuses the threads.
pub(crate) fn executor(threads: usize) -> Result<Executor> {
    let threads = match threads {
        0 => std::thread::available_parallelism().map_or(1, usize::from),
        n => n,
    };
    rayon::ThreadPoolBuilder::new()
        .num_threads(threads)
        .thread_name(|i| format!("iris-tract-{i}"))
        .build()
        .map(|pool| Executor::MultiThread(Arc::new(pool)))
        .map_err(|e| {
            Error::invalid(
                "thread pool",
                format!("cannot start {threads} threads: {e}"),
            )
        })
}

/// Threads of `executor`'s pool.
pub(crate) fn threads(executor: &Executor) -> usize {
    match executor {
        Executor::MultiThread(pool) => pool.current_num_threads(),
        Executor::SingleThread => 1,
        Executor::RayonGlobal => rayon::current_num_threads(),
    }
}

/// A tract tensor of `shape` holding `values` (C order).
pub(crate) fn tensor(shape: &[usize], values: &[f32]) -> Result<TValue> {
    Tensor::from_shape(shape, values)
        .map(TValue::from)
        .map_err(|e| Error::ShapeMismatch {
            what: format!("graph input of shape {shape:?}: {e}"),
            expected: shape.to_vec(),
            found: vec![values.len()],
        })
}

/// The f32 values of a graph output, C order.
pub(crate) fn values<'a>(graph: &Graph, value: &'a TValue) -> Result<&'a [f32]> {
    value
        .try_as_plain_ram()
        .and_then(|view| view.as_slice::<f32>())
        .map_err(|e| Error::Model {
            path: graph.path.clone(),
            reason: format!("an output is not an f32 tensor: {e:#}"),
        })
}

/// tract's ONNX reader with the engine's own ops registered: what
/// `Graph::load` reads graphs with (tools that profile the engine's plans
/// read with it too).
pub fn reader() -> Onnx {
    let mut onnx = tract_onnx::onnx();
    super::instance_norm::register(&mut onnx);
    onnx
}

/// Optimises `model` (typed, every shape known) as the engine plans it:
/// decluttered, the engine's own ops substituted (their convolutions in
/// `precision` where this CPU runs it, else in f32), then tract's
/// optimisations.
///
/// # Errors
/// Where tract cannot declutter or optimise the graph.
pub fn optimise(mut model: TypedModel, precision: Precision) -> TractResult<TypedModel> {
    substitute_pointwise(&mut model)?;
    let mut typed = model.into_decluttered()?;
    substitute_own_ops(&mut typed, precision)?;
    fuse_normed_merges(&mut typed)?;
    fuse_row_products(&mut typed)?;
    typed.into_optimized()
}

/// Puts one op in place of the row products of one input that fit it side
/// by side (`row_product::siblings`).
fn fuse_row_products(model: &mut TypedModel) -> TractResult<()> {
    // Products already in a fused op, left without readers.
    let mut fused = HashSet::new();
    for id in model.eval_order()? {
        let node = model.node(id);
        if fused.contains(&id) {
            continue;
        }
        let Some((op, products)) = super::row_product::siblings(model, node) else {
            continue;
        };
        fused.extend(products.iter().copied());
        let (name, input) = (node.name.clone(), node.inputs[0]);
        fuse_outputs(model, name, &[input], op, &products)?;
    }
    Ok(())
}

/// Puts one op (`merge`) in place of a norm with its ReLU and the direct
/// one-channel convolutions that read it, once the convolutions are the
/// engine's.
fn fuse_normed_merges(model: &mut TypedModel) -> TractResult<()> {
    for id in model.eval_order()? {
        let Some(super::merge::Found { op, inputs, convs }) =
            super::merge::replacement(model, model.node(id))?
        else {
            continue;
        };
        let name = model.node(id).name.clone();
        fuse_outputs(model, name, &inputs, op, &convs)?;
    }
    Ok(())
}

/// Has `op`, on `inputs`, stand for the outputs of the nodes `replaced`
/// (one output each, in order), named `name`.
fn fuse_outputs(
    model: &mut TypedModel,
    name: String,
    inputs: &[OutletId],
    op: impl TypedOp,
    replaced: &[usize],
) -> TractResult<()> {
    let mut patch = TypedModelPatch::default();
    let taps = patch.taps(model, inputs)?;
    let outputs = patch.wire_node(name, op, &taps)?;
    for (&node, output) in replaced.iter().zip(outputs) {
        patch.shunt_outside(model, OutletId::new(node, 0), output)?;
    }
    patch.apply(model)
}

/// Puts the engine's 1x1x1 convolution in place of those it serves, before
/// tract declutters them into matrix products (see `pointwise`).
fn substitute_pointwise(model: &mut TypedModel) -> TractResult<()> {
    for id in model.eval_order()? {
        let node = model.node(id);
        if let Some(op) = super::pointwise::replacement(model, node)? {
            let inputs = [node.inputs[0], node.inputs[2]];
            let patch = TypedModelPatch::replace_single_op(model, node, &inputs, op)?;
            patch.apply(model)?;
        }
    }
    Ok(())
}

/// Puts the engine's own ops in place of the tract ops they serve, before
/// tract optimises the graph: the direct 3x3x3 convolution (where the CPU
/// runs it), fused with the residual sum that follows it; the instance
/// norm fused with the ReLU that follows it (the norm is read as the
/// engine's own op already, see `instance_norm::register`); and the
/// trilinear upsampling, fused with the concatenation that joins it to the
/// skip features. Two convolutions of one input run as one op where
/// Winograd's form serves both (`conv3d::sibling`). The convolution and the
/// upsampling take the node's first input only (and the fused sum's or
/// concatenation's other input); the others are constants folded into
/// them. A norm over the channels of channels-first voxels (tract's sum,
/// scaling, subtraction and `RmsNorm`) becomes one op (`channel_norm`),
/// and a run of axis moves one copy (`permute`); the classifier head's
/// product of computed rows and the voxels, the engine's products
/// (`pointwise`); the task encoder's unshuffle, norm and 1x1x1 convolution,
/// one op that reads the merged volume (`unshuffle`); products of one
/// axis by a small constant matrix (`row_product`: the masks' pooling for
/// the foreground mean); and the encoder's 2x2x2 max pooling
/// (`max_pool`).
fn substitute_own_ops(model: &mut TypedModel, precision: Precision) -> TractResult<()> {
    // Convolutions already run as the second of a pair.
    let mut paired = HashSet::new();
    for id in model.eval_order()? {
        if paired.contains(&id) {
            continue;
        }
        let node = model.node(id);
        if let Some((op, relu)) = super::instance_norm::fuse_relu(model, node)? {
            let (inputs, last) = (node.inputs.clone(), (relu.id, relu.name.clone()));
            fuse(model, last, &inputs, op)?;
            continue;
        }
        if let Some((op, inputs)) = super::attention::replacement(model, node)? {
            fuse(model, (node.id, node.name.clone()), &inputs, op)?;
            continue;
        }
        if let Some((op, inputs)) = super::unshuffle::replacement(model, node)? {
            fuse(model, (node.id, node.name.clone()), &inputs, op)?;
            continue;
        }
        if let Some((op, x)) = super::row_product::replacement(model, node)? {
            fuse(model, (node.id, node.name.clone()), &[x], op)?;
            continue;
        }
        if let Some(op) = super::pointwise::computed_replacement(model, node)? {
            let inputs = node.inputs.clone();
            fuse(model, (node.id, node.name.clone()), &inputs, op)?;
            continue;
        }
        if let Some((op, x)) = super::channel_norm::replacement(model, node)? {
            fuse(model, (node.id, node.name.clone()), &[x], op)?;
            continue;
        }
        if let Some((op, last)) = super::permute::chain(model, node)? {
            let (inputs, last) = (node.inputs.clone(), (last.id, last.name.clone()));
            fuse(model, last, &inputs, op)?;
            continue;
        }
        if let Some((other, op)) = super::conv3d::sibling(model, node, precision)? {
            paired.insert(other.id);
            let mut patch = TypedModelPatch::default();
            let input = patch.tap_model(model, node.inputs[0])?;
            let outputs = patch.wire_node(&node.name, op, &[input])?;
            patch.shunt_outside(model, OutletId::new(node.id, 0), outputs[0])?;
            patch.shunt_outside(model, OutletId::new(other.id, 0), outputs[1])?;
            patch.apply(model)?;
            continue;
        }
        let op: Box<dyn TypedOp> =
            if let Some(op) = super::conv3d::replacement(model, node, precision)? {
                if let Some((sum, residual)) = super::conv3d::residual_sum(model, node)? {
                    let (inputs, last) = ([node.inputs[0], residual], (sum.id, sum.name.clone()));
                    fuse(model, last, &inputs, op.adding_residual())?;
                    continue;
                }
                Box::new(op)
            } else if let Some(op) = super::max_pool::replacement(model, node)? {
                Box::new(op)
            } else if let Some(op) = super::upsample::replacement(model, node)? {
                if let Some((concat, skip)) = super::upsample::joining_concat(model, node)? {
                    let (inputs, last) = ([skip, node.inputs[0]], (concat.id, concat.name.clone()));
                    fuse(model, last, &inputs, op.after_skip())?;
                    continue;
                }
                Box::new(op)
            } else {
                continue;
            };
        let patch = TypedModelPatch::replace_single_op(model, node, &node.inputs[..1], op)?;
        patch.apply(model)?;
    }
    Ok(())
}

/// The one node input that reads `outlet`, where it has exactly one reader.
pub(crate) fn only_reader(model: &TypedModel, outlet: OutletId) -> Option<InletId> {
    match model.outlet_successors(outlet) {
        [next] => Some(*next),
        _ => None,
    }
}

/// The values of `outlet` where it is an f32 constant.
pub(crate) fn constant_f32s(model: &TypedModel, outlet: OutletId) -> Option<Vec<f32>> {
    let konst = model.outlet_fact(outlet).ok()?.konst.as_ref()?;
    let view = konst.try_as_plain_ram().ok()?;
    Some(view.as_slice::<f32>().ok()?.to_vec())
}

/// The value of `outlet` where it is an f32 constant holding one value.
pub(crate) fn constant_f32(model: &TypedModel, outlet: OutletId) -> Option<f32> {
    match constant_f32s(model, outlet)?.as_slice() {
        &[value] => Some(value),
        _ => None,
    }
}

/// The node that computes `outlet`, where node `reader` is the outlet's
/// one reader (the ops the engine fuses read each other's outputs alone).
pub(crate) fn producer_for(
    model: &TypedModel,
    outlet: OutletId,
    reader: usize,
) -> Option<&TypedNode> {
    only_reader(model, outlet)
        .filter(|next| next.node == reader)
        .map(|_| model.node(outlet.node))
}

/// Has `op`, on `inputs`, stand for the output of node `last` (its id and
/// name): the nodes from the inputs to `last` are left without readers.
fn fuse(
    model: &mut TypedModel,
    (last, name): (usize, String),
    inputs: &[OutletId],
    op: impl TypedOp,
) -> TractResult<()> {
    let mut patch = TypedModelPatch::default();
    let taps = patch.taps(model, inputs)?;
    let out = patch.wire_node(name, op, &taps)?[0];
    patch.shunt_outside(model, OutletId::new(last, 0), out)?;
    patch.apply(model)
}
