//! `Task` (a task embedding, `.irisemb`), `PoolReference` and `ensemble`.

use std::path::PathBuf;

use iris_core::embedding::TaskEmbedding;
use iris_core::engine;
use iris_core::irisemb::{self, Payload};
use pyo3::prelude::*;
use pyo3::types::{PyBytes, PyType};

use crate::convert::intensity_to_py;
use crate::errors::{IntoPy, invalid};

/// A task embedding: one embedding per class, with the model and the
/// preprocessing it belongs to (`iris_core::embedding::TaskEmbedding`).
/// Immutable; pickles as its `.irisemb` bytes (float32, exact).
#[pyclass(frozen, eq, module = "iris._native")]
#[derive(PartialEq)]
pub struct Task {
    inner: TaskEmbedding,
}

impl From<TaskEmbedding> for Task {
    fn from(inner: TaskEmbedding) -> Task {
        Task { inner }
    }
}

impl Task {
    /// The embedding.
    pub fn inner(&self) -> &TaskEmbedding {
        &self.inner
    }
}

fn payload(name: &str) -> PyResult<Payload> {
    match name {
        "f32" | "float32" => Ok(Payload::F32),
        "f16" | "float16" => Ok(Payload::F16),
        other => Err(invalid(
            "payload",
            format!("{other:?}: expected \"f32\" or \"f16\""),
        )),
    }
}

#[pymethods]
impl Task {
    /// Reads a `.irisemb` file.
    #[classmethod]
    fn load(_cls: &Bound<'_, PyType>, py: Python<'_>, path: PathBuf) -> PyResult<Task> {
        let task = py.detach(|| irisemb::read_file(&path)).py_err()?;
        Ok(Task::from(task))
    }

    /// Parses `.irisemb` bytes.
    #[classmethod]
    fn from_bytes(_cls: &Bound<'_, PyType>, data: &[u8]) -> PyResult<Task> {
        irisemb::read(data).map(Task::from).py_err()
    }

    /// The `.irisemb` bytes (payload "f32", exact, or "f16", half the size).
    #[pyo3(signature = (payload="f32"))]
    fn to_bytes<'py>(&self, py: Python<'py>, payload: &str) -> PyResult<Bound<'py, PyBytes>> {
        let bytes = irisemb::write(&self.inner, self::payload(payload)?).py_err()?;
        Ok(PyBytes::new(py, &bytes))
    }

    /// Writes a `.irisemb` file atomically.
    #[pyo3(signature = (path, payload="f32"))]
    fn save(&self, py: Python<'_>, path: PathBuf, payload: &str) -> PyResult<()> {
        let payload = self::payload(payload)?;
        py.detach(|| irisemb::write_file(&path, &self.inner, payload))
            .py_err()
    }

    /// The fingerprint of the model that made the embedding.
    #[getter]
    fn model(&self) -> String {
        self.inner.model().to_string()
    }

    /// The classes as `(label, name)` pairs, in order.
    #[getter]
    fn classes(&self) -> Vec<(u32, String)> {
        self.inner
            .classes()
            .iter()
            .map(|c| (c.label(), c.name().to_string()))
            .collect()
    }

    /// The intensity policy of the reference, `(kind, a, b)`.
    #[getter]
    fn intensity(&self) -> (&'static str, f32, f32) {
        intensity_to_py(&self.inner.preprocessing().intensity)
    }

    /// `iris inspect --json`'s description, as a JSON string.
    fn describe_json(&self) -> String {
        self.inner.describe_json().to_string()
    }

    /// The classes with these label values, in this order.
    fn select_labels(&self, labels: Vec<u32>) -> PyResult<Task> {
        self.inner.select_labels(&labels).map(Task::from).py_err()
    }

    /// The classes with these names (exact), in this order.
    fn select_names(&self, names: Vec<String>) -> PyResult<Task> {
        let names: Vec<&str> = names.iter().map(String::as_str).collect();
        self.inner.select_names(&names).map(Task::from).py_err()
    }

    /// One stage of one class's embedding, `[tokens * channels]` values.
    fn stage(&self, label: u32, stage: usize) -> PyResult<Vec<f32>> {
        let class = self
            .inner
            .class(label)
            .ok_or_else(|| invalid("label", format!("{label} is not a class of the task")))?;
        class.stages().get(stage).cloned().ok_or_else(|| {
            invalid(
                "stage",
                format!("{stage}: the task has {} stages", class.stages().len()),
            )
        })
    }

    fn __len__(&self) -> usize {
        self.inner.classes().len()
    }

    fn __reduce__<'py>(
        slf: &Bound<'py, Self>,
        py: Python<'py>,
    ) -> PyResult<(Bound<'py, PyAny>, (Bound<'py, PyBytes>,))> {
        let bytes = slf.get().to_bytes(py, "f32")?;
        Ok((slf.get_type().getattr("from_bytes")?, (bytes,)))
    }

    fn __repr__(&self) -> String {
        let classes: Vec<String> = self
            .inner
            .classes()
            .iter()
            .map(|c| format!("{} {:?}", c.label(), c.name()))
            .collect();
        format!(
            "Task(model={}, classes=[{}])",
            &self.inner.model().to_string()[..12],
            classes.join(", ")
        )
    }
}

/// The context ensemble: per class, the mean of the embeddings of `tasks`
/// (same classes, same model).
#[pyfunction]
pub fn ensemble(tasks: Vec<Py<Task>>) -> PyResult<Task> {
    let parts: Vec<TaskEmbedding> = tasks.iter().map(|t| t.get().inner.clone()).collect();
    TaskEmbedding::ensemble(&parts).map(Task::from).py_err()
}

/// One reference of a retrieval pool, encoded (`iris_core::engine::PoolReference`).
#[pyclass(frozen, module = "iris._native")]
pub struct PoolReference {
    inner: engine::PoolReference,
}

impl From<engine::PoolReference> for PoolReference {
    fn from(inner: engine::PoolReference) -> PoolReference {
        PoolReference { inner }
    }
}

impl PoolReference {
    /// The reference.
    pub fn inner(&self) -> &engine::PoolReference {
        &self.inner
    }
}

/// The arguments of `PoolReference(name, task, descriptor)`, for pickling.
type PoolArgs = (String, Task, Option<Vec<f32>>);

#[pymethods]
impl PoolReference {
    /// A reference from a task embedding alone (object-level retrieval
    /// only), or with its image descriptor.
    #[new]
    #[pyo3(signature = (name, task, descriptor=None))]
    fn new(name: String, task: PyRef<'_, Task>, descriptor: Option<Vec<f32>>) -> PoolReference {
        PoolReference::from(engine::PoolReference {
            name,
            task: task.inner.clone(),
            descriptor,
        })
    }

    /// How the reference is called in reports.
    #[getter]
    fn name(&self) -> String {
        self.inner.name.clone()
    }

    /// Its classes, encoded.
    #[getter]
    fn task(&self) -> Task {
        Task::from(self.inner.task.clone())
    }

    /// Its global image descriptor, or `None` (object level only).
    #[getter]
    fn descriptor(&self) -> Option<Vec<f32>> {
        self.inner.descriptor.clone()
    }

    fn __reduce__<'py>(
        slf: &Bound<'py, Self>,
        py: Python<'py>,
    ) -> PyResult<(Bound<'py, PyAny>, PoolArgs)> {
        let _ = py;
        let r = &slf.get().inner;
        Ok((
            slf.get_type().into_any(),
            (
                r.name.clone(),
                Task::from(r.task.clone()),
                r.descriptor.clone(),
            ),
        ))
    }

    fn __repr__(&self) -> String {
        format!(
            "PoolReference({:?}, classes={:?}, descriptor={})",
            self.inner.name,
            self.inner
                .task
                .classes()
                .iter()
                .map(|c| c.label())
                .collect::<Vec<_>>(),
            self.inner.descriptor.is_some()
        )
    }
}
