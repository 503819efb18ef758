//! `Model` and `SegmentOptions`: encoding, segmentation and retrieval.

use std::path::PathBuf;
use std::sync::{Arc, Mutex};

use iris_core::Error;
use iris_core::engine::{
    self, EncodeOptions, Limits, ModelOptions, Precision, RetrievalLevel, RetrieveOptions,
    Segmentation, TaskClass,
};
use numpy::{PyArray2, PyArray3, PyReadonlyArray2, PyReadonlyArray3};
use pyo3::prelude::*;
use pyo3::types::PyDict;

use crate::convert::{self, volume_to_py};
use crate::errors::{IntoPy, invalid, to_py};
use crate::task::{PoolReference, Task};

/// An Iris model loaded from a model folder (`iris_core::engine::Model`).
/// Safe to share between threads: every call releases the GIL.
#[pyclass(frozen, module = "iris._native")]
pub struct Model {
    inner: engine::Model,
    dir: PathBuf,
}

/// Settings of a segmentation (`iris_core::SegmentOptions`), made from the
/// keyword arguments of `Model.segment` by the Python package.
#[pyclass(frozen, module = "iris._native")]
pub struct SegmentOptions {
    intensity: Option<(String, f32, f32)>,
    overlap: f64,
    threshold: f32,
    largest_component: bool,
    probabilities: bool,
    classes_per_forward: Option<usize>,
    memory_budget: Option<u64>,
    max_windows: Option<usize>,
    progress: Option<Py<PyAny>>,
    cancel: Option<Py<PyAny>>,
}

#[pymethods]
impl SegmentOptions {
    #[new]
    #[pyo3(signature = (*, intensity=None, overlap=0.5, threshold=0.5, largest_component=true,
        probabilities=false, classes_per_forward=None, memory_budget=None, max_windows=None,
        progress=None, cancel=None))]
    #[expect(
        clippy::too_many_arguments,
        reason = "Python keyword arguments, one per engine setting"
    )]
    fn new(
        intensity: Option<(String, f32, f32)>,
        overlap: f64,
        threshold: f32,
        largest_component: bool,
        probabilities: bool,
        classes_per_forward: Option<usize>,
        memory_budget: Option<u64>,
        max_windows: Option<usize>,
        progress: Option<Py<PyAny>>,
        cancel: Option<Py<PyAny>>,
    ) -> SegmentOptions {
        SegmentOptions {
            intensity,
            overlap,
            threshold,
            largest_component,
            probabilities,
            classes_per_forward,
            memory_budget,
            max_windows,
            progress,
            cancel,
        }
    }
}

/// The first error a Python callback raised during a run; the run is then
/// cancelled and this error raised in place of `Cancelled`.
type CallbackError = Arc<Mutex<Option<PyErr>>>;

fn keep_first(slot: &CallbackError, err: PyErr) {
    if let Ok(mut slot) = slot.lock() {
        slot.get_or_insert(err);
    }
}

fn take(slot: &CallbackError) -> Option<PyErr> {
    slot.lock().ok().and_then(|mut slot| slot.take())
}

impl SegmentOptions {
    /// The engine's options. Progress and cancellation go through Python
    /// callables (re-taking the GIL for each window); the cancellation check
    /// also delivers Ctrl-C (`check_signals`), so a long run can be
    /// interrupted from the console.
    fn engine(&self, py: Python<'_>, errors: &CallbackError) -> PyResult<engine::SegmentOptions> {
        let defaults = Limits::default();
        let progress = self.progress.as_ref().map(|f| {
            let (f, errors) = (f.clone_ref(py), errors.clone());
            Arc::new(move |p: engine::Progress| {
                Python::attach(|py| {
                    if let Err(e) = f.call1(py, (p.done, p.total)) {
                        keep_first(&errors, e);
                    }
                });
            }) as Arc<dyn Fn(engine::Progress) + Send + Sync>
        });
        let user_cancel = self.cancel.as_ref().map(|f| f.clone_ref(py));
        let cancel_errors = errors.clone();
        let cancel = Arc::new(move || {
            Python::attach(|py| {
                if let Err(e) = py.check_signals() {
                    keep_first(&cancel_errors, e);
                }
                if let Some(f) = &user_cancel {
                    match f.call0(py).and_then(|v| v.bind(py).is_truthy()) {
                        Ok(true) => return true,
                        Ok(false) => {}
                        Err(e) => keep_first(&cancel_errors, e),
                    }
                }
                cancel_errors.lock().map(|e| e.is_some()).unwrap_or(true)
            })
        }) as Arc<dyn Fn() -> bool + Send + Sync>;
        Ok(engine::SegmentOptions {
            intensity: convert::intensity(self.intensity.clone())?,
            overlap: self.overlap,
            threshold: self.threshold,
            largest_component: self.largest_component,
            probabilities: self.probabilities,
            classes_per_forward: self.classes_per_forward,
            progress,
            cancel: Some(cancel),
            limits: Limits {
                memory_bytes: self.memory_budget.unwrap_or(defaults.memory_bytes),
                windows: self.max_windows.unwrap_or(defaults.windows),
            },
        })
    }
}

/// Runs `f` with the GIL released, then turns its error into Python's: the
/// error a callback raised when there is one, else the iris error.
fn run<T: Send>(
    py: Python<'_>,
    errors: &CallbackError,
    f: impl FnOnce() -> Result<T, Error> + Send,
) -> PyResult<T> {
    let result = py.detach(f);
    match (result, take(errors)) {
        (Ok(value), None) => Ok(value),
        (Ok(_), Some(err)) | (Err(_), Some(err)) => Err(err),
        (Err(e), None) => Err(to_py(e)),
    }
}

/// `(labels, affine, classes, probabilities or None, windows)`, arrays in
/// iris order.
type SegmentationOut<'py> = (
    Bound<'py, PyArray3<u16>>,
    Bound<'py, PyArray2<f64>>,
    Vec<u32>,
    Option<Vec<Bound<'py, PyArray3<f32>>>>,
    usize,
);

/// Per class, the references retrieval chose: `(label, [(pool index,
/// similarity), ...])`.
type Choices = Vec<(u32, Vec<(usize, f32)>)>;

/// `(segmentation, task used, choices)`.
type RetrievalOut<'py> = (SegmentationOut<'py>, Task, Choices);

fn segmentation_to_py(py: Python<'_>, s: Segmentation) -> SegmentationOut<'_> {
    let (labels, affine) = volume_to_py(py, s.labels);
    let probabilities = s
        .probabilities
        .map(|maps| maps.into_iter().map(|m| volume_to_py(py, m).0).collect());
    (labels, affine, s.classes, probabilities, s.windows)
}

fn task_classes(classes: &[u16], names: &[String]) -> PyResult<Vec<TaskClass>> {
    if !names.is_empty() && names.len() != classes.len() {
        return Err(invalid(
            "names",
            format!(
                "{} name(s) given for {} class(es)",
                names.len(),
                classes.len()
            ),
        ));
    }
    Ok(classes
        .iter()
        .enumerate()
        .map(|(i, &label)| TaskClass::new(label, names.get(i).cloned().unwrap_or_default()))
        .collect())
}

fn encode_options(
    intensity: Option<(String, f32, f32)>,
    memory_budget: Option<u64>,
) -> PyResult<EncodeOptions> {
    let mut options = EncodeOptions {
        intensity: convert::intensity(intensity)?,
        ..EncodeOptions::default()
    };
    if let Some(bytes) = memory_budget {
        options.limits.memory_bytes = bytes;
    }
    Ok(options)
}

#[pymethods]
impl Model {
    /// Loads the model folder `path` (manifest and three ONNX graphs); the
    /// model runs on a pool of `threads` threads of its own (0: one per core),
    /// its convolutions in `precision` ("f32" or "bf16", see
    /// `engine::Precision`).
    #[new]
    #[pyo3(signature = (path, *, threads=0, precision="f32"))]
    fn load(py: Python<'_>, path: PathBuf, threads: usize, precision: &str) -> PyResult<Model> {
        let precision: Precision = precision.parse().py_err()?;
        let options = ModelOptions { threads, precision };
        let inner = py
            .detach(|| engine::Model::load_with(&path, &options))
            .py_err()?;
        Ok(Model { inner, dir: path })
    }

    /// Threads of the model's pool.
    #[getter]
    fn threads(&self) -> usize {
        self.inner.threads()
    }

    /// The precision the model runs in: "bf16" where asked for and this CPU
    /// has AVX-512 BF16, else "f32".
    #[getter]
    fn precision(&self) -> &'static str {
        self.inner.precision().name()
    }

    /// The folder the model was loaded from.
    #[getter]
    fn path(&self) -> String {
        self.dir.display().to_string()
    }

    /// The model's fingerprint (64 hex digits), as recorded in its embeddings.
    #[getter]
    fn fingerprint(&self) -> String {
        self.inner.fingerprint().to_string()
    }

    /// What the manifest says: name, patch, spacing, channels, stages,
    /// classes per decoder run, memory bank.
    fn manifest<'py>(&self, py: Python<'py>) -> PyResult<Bound<'py, PyDict>> {
        let m = self.inner.manifest();
        let d = PyDict::new(py);
        d.set_item("name", &m.name)?;
        d.set_item("patch_size", m.patch_size.to_vec())?;
        d.set_item("spacing_mm", m.spacing_mm)?;
        d.set_item("channels", m.channels.to_vec())?;
        let stages: Vec<(u32, u32)> = m.stages.iter().map(|s| (s.tokens, s.channels)).collect();
        d.set_item("stages", stages)?;
        d.set_item("fingerprint", m.fingerprint.to_string())?;
        d.set_item("classes_per_forward", m.classes_per_forward)?;
        d.set_item(
            "memory_bank",
            m.memory_bank.as_ref().map(|p| p.display().to_string()),
        )?;
        Ok(d)
    }

    /// The model's memory bank, or `None` when its manifest names none.
    fn memory_bank(&self, py: Python<'_>) -> PyResult<Option<Task>> {
        let bank = py.detach(|| self.inner.memory_bank()).py_err()?;
        Ok(bank.map(Task::from))
    }

    /// Encodes `classes` of a reference (`[D, H, W]` image and label map on
    /// one grid) into a task embedding.
    #[pyo3(signature = (image, image_affine, labels, labels_affine, classes, names, *,
        intensity=None, memory_budget=None))]
    #[expect(
        clippy::too_many_arguments,
        reason = "arrays and affines of two volumes, and Python keyword arguments"
    )]
    fn encode(
        &self,
        py: Python<'_>,
        image: PyReadonlyArray3<'_, f32>,
        image_affine: PyReadonlyArray2<'_, f64>,
        labels: PyReadonlyArray3<'_, u16>,
        labels_affine: PyReadonlyArray2<'_, f64>,
        classes: Vec<u16>,
        names: Vec<String>,
        intensity: Option<(String, f32, f32)>,
        memory_budget: Option<u64>,
    ) -> PyResult<Task> {
        let image = convert::image(&image, &image_affine)?;
        let labels = convert::labels(&labels, &labels_affine)?;
        let classes = task_classes(&classes, &names)?;
        let options = encode_options(intensity, memory_budget)?;
        let task = py
            .detach(|| self.inner.encode_task(&image, &labels, &classes, &options))
            .py_err()?;
        Ok(Task::from(task))
    }

    /// Segments a `[D, H, W]` image with every class of `task`.
    fn segment<'py>(
        &self,
        py: Python<'py>,
        image: PyReadonlyArray3<'_, f32>,
        affine: PyReadonlyArray2<'_, f64>,
        task: PyRef<'_, Task>,
        options: PyRef<'_, SegmentOptions>,
    ) -> PyResult<SegmentationOut<'py>> {
        let image = convert::image(&image, &affine)?;
        let errors = CallbackError::default();
        let options = options.engine(py, &errors)?;
        let task = task.inner();
        let result = run(py, &errors, || self.inner.segment(&image, task, &options))?;
        Ok(segmentation_to_py(py, result))
    }

    /// Encodes a reference for a retrieval pool: its classes and its image
    /// descriptor (for image-level retrieval).
    #[pyo3(signature = (name, image, image_affine, labels, labels_affine, classes, names, *,
        intensity=None, memory_budget=None))]
    #[expect(
        clippy::too_many_arguments,
        reason = "arrays and affines of two volumes, and Python keyword arguments"
    )]
    fn encode_pool_reference(
        &self,
        py: Python<'_>,
        name: String,
        image: PyReadonlyArray3<'_, f32>,
        image_affine: PyReadonlyArray2<'_, f64>,
        labels: PyReadonlyArray3<'_, u16>,
        labels_affine: PyReadonlyArray2<'_, f64>,
        classes: Vec<u16>,
        names: Vec<String>,
        intensity: Option<(String, f32, f32)>,
        memory_budget: Option<u64>,
    ) -> PyResult<PoolReference> {
        let image = convert::image(&image, &image_affine)?;
        let labels = convert::labels(&labels, &labels_affine)?;
        let classes = task_classes(&classes, &names)?;
        let options = encode_options(intensity, memory_budget)?;
        let reference = py
            .detach(|| {
                self.inner
                    .encode_pool_reference(name, &image, &labels, &classes, &options)
            })
            .py_err()?;
        Ok(PoolReference::from(reference))
    }

    /// Segments a `[D, H, W]` image with references retrieved from `pool`.
    /// Returns the segmentation, the task used and, per class, the chosen
    /// references as `(label, [(pool index, similarity), ...])`.
    #[pyo3(signature = (image, affine, pool, classes, top_k, level, initial, options))]
    #[expect(
        clippy::too_many_arguments,
        reason = "the query, the pool and retrieval's own settings"
    )]
    fn retrieve<'py>(
        &self,
        py: Python<'py>,
        image: PyReadonlyArray3<'_, f32>,
        affine: PyReadonlyArray2<'_, f64>,
        pool: Vec<Py<PoolReference>>,
        classes: Vec<u32>,
        top_k: usize,
        level: &str,
        initial: usize,
        options: PyRef<'_, SegmentOptions>,
    ) -> PyResult<RetrievalOut<'py>> {
        let image = convert::image(&image, &affine)?;
        let level = match level {
            "object" => RetrievalLevel::Object,
            "image" => RetrievalLevel::Image,
            other => {
                return Err(invalid(
                    "level",
                    format!("{other:?}: expected \"object\" or \"image\""),
                ));
            }
        };
        let pool: Vec<engine::PoolReference> =
            pool.iter().map(|r| r.get().inner().clone()).collect();
        let errors = CallbackError::default();
        let options = RetrieveOptions {
            level,
            top_k,
            initial,
            segment: options.engine(py, &errors)?,
        };
        let retrieval = run(py, &errors, || {
            self.inner.retrieve(&image, &pool, &classes, &options)
        })?;
        let choices = retrieval
            .choices
            .iter()
            .map(|c| {
                let chosen = c.chosen.iter().map(|r| (r.index, r.similarity)).collect();
                (c.label, chosen)
            })
            .collect();
        Ok((
            segmentation_to_py(py, retrieval.segmentation),
            Task::from(retrieval.task),
            choices,
        ))
    }

    fn __repr__(&self) -> String {
        let m = self.inner.manifest();
        format!(
            "Model({:?}, patch={:?}, spacing_mm={}, fingerprint={})",
            self.dir.display().to_string(),
            m.patch_size,
            m.spacing_mm,
            m.fingerprint
        )
    }
}
