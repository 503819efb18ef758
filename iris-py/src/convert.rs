//! Volumes between numpy and iris, NIfTI files, and Dice.
//!
//! Arrays here are in iris's order (`[D, H, W]`, affine on `[d, h, w]`);
//! any strides are accepted (a transposed view of a nibabel array is read
//! in place, then copied once).

use std::path::PathBuf;

use iris_core::metrics::dice_per_class;
use iris_core::nifti;
use iris_core::preprocess::IntensityPolicy;
use iris_core::volume::{Affine, Image, LabelMap, Volume};
use ndarray::{Array2, Array3, ArrayView2, ArrayView3};
use numpy::{IntoPyArray, PyArray2, PyArray3, PyReadonlyArray2, PyReadonlyArray3};
use pyo3::prelude::*;

use crate::errors::{IntoPy, invalid};

/// A 4x4 affine from numpy.
pub fn affine(matrix: &PyReadonlyArray2<'_, f64>) -> PyResult<Affine> {
    ensure_aligned(matrix.as_any(), "affine")?;
    affine_of(matrix.as_array())
}

/// Refuses an array whose memory is not aligned for its dtype (numpy makes
/// them, e.g. with `frombuffer` at an odd offset or when unpickling), which
/// rust-numpy cannot view; the Python package passes aligned copies.
fn ensure_aligned(array: &Bound<'_, PyAny>, what: &'static str) -> PyResult<()> {
    if array.getattr("flags")?.getattr("aligned")?.is_truthy()? {
        Ok(())
    } else {
        Err(invalid(
            what,
            "the array's memory is not aligned for its dtype (pass a copy)",
        ))
    }
}

fn affine_of(matrix: ArrayView2<'_, f64>) -> PyResult<Affine> {
    if matrix.dim() != (4, 4) {
        return Err(invalid(
            "affine",
            format!("expected a 4x4 matrix, found shape {:?}", matrix.shape()),
        ));
    }
    let mut m = [[0.0; 4]; 4];
    for ((r, c), v) in matrix.indexed_iter() {
        m[r][c] = *v;
    }
    Ok(Affine(m))
}

/// The affine as a numpy 4x4 array.
pub fn affine_to_py<'py>(py: Python<'py>, affine: &Affine) -> Bound<'py, PyArray2<f64>> {
    let rows: Vec<f64> = affine.0.iter().flatten().copied().collect();
    Array2::from_shape_vec((4, 4), rows)
        .unwrap_or_else(|_| Array2::zeros((4, 4)))
        .into_pyarray(py)
}

/// A Rust-owned volume with `data`'s voxels (copied in logical order, so
/// any strides work) placed by `affine`.
pub fn volume<T: Copy + numpy::Element>(
    data: ArrayView3<'_, T>,
    affine: Affine,
) -> PyResult<Volume<T>> {
    let (d, h, w) = data.dim();
    Volume::from_vec([d, h, w], affine, data.iter().copied().collect()).py_err()
}

/// An image from numpy (`float32`, `[D, H, W]`) and its affine.
pub fn image(
    data: &PyReadonlyArray3<'_, f32>,
    matrix: &PyReadonlyArray2<'_, f64>,
) -> PyResult<Image> {
    ensure_aligned(data.as_any(), "image")?;
    volume(data.as_array(), affine(matrix)?)
}

/// A label map from numpy (`uint16`, `[D, H, W]`) and its affine.
pub fn labels(
    data: &PyReadonlyArray3<'_, u16>,
    matrix: &PyReadonlyArray2<'_, f64>,
) -> PyResult<LabelMap> {
    ensure_aligned(data.as_any(), "labels")?;
    volume(data.as_array(), affine(matrix)?)
}

/// A volume's voxels (moved, not copied) and affine as numpy arrays.
pub fn volume_to_py<'py, T: numpy::Element>(
    py: Python<'py>,
    volume: Volume<T>,
) -> (Bound<'py, PyArray3<T>>, Bound<'py, PyArray2<f64>>) {
    let (data, geometry): (Array3<T>, _) = volume.into_parts();
    (data.into_pyarray(py), affine_to_py(py, &geometry.affine()))
}

/// An intensity policy from the Python layer's `(kind, a, b)`: `("ct",
/// min_hu, max_hu)` or `("percentile", low, high)`; `None` for automatic.
pub fn intensity(spec: Option<(String, f32, f32)>) -> PyResult<Option<IntensityPolicy>> {
    let Some((kind, a, b)) = spec else {
        return Ok(None);
    };
    let policy = match kind.as_str() {
        "ct" => IntensityPolicy::Ct {
            min_hu: a,
            max_hu: b,
        },
        "percentile" => IntensityPolicy::Percentile { low: a, high: b },
        other => {
            return Err(invalid(
                "intensity",
                format!("unknown policy {other:?}: expected \"ct\" or \"percentile\""),
            ));
        }
    };
    policy.validate().py_err()?;
    Ok(Some(policy))
}

/// An intensity policy as the Python layer's `(kind, a, b)`.
pub fn intensity_to_py(policy: &IntensityPolicy) -> (&'static str, f32, f32) {
    match *policy {
        IntensityPolicy::Ct { min_hu, max_hu } => ("ct", min_hu, max_hu),
        IntensityPolicy::Percentile { low, high } => ("percentile", low, high),
    }
}

type VolumeOut<'py, T> = (Bound<'py, PyArray3<T>>, Bound<'py, PyArray2<f64>>);

/// Reads a NIfTI image with iris's reader: `(voxels [D, H, W] float32, affine)`.
#[pyfunction]
pub fn read_image(py: Python<'_>, path: PathBuf) -> PyResult<VolumeOut<'_, f32>> {
    let (image, _) = py.detach(|| nifti::read_image(&path)).py_err()?;
    Ok(volume_to_py(py, image))
}

/// Reads a NIfTI label map with iris's reader: `(labels [D, H, W] uint16, affine)`.
#[pyfunction]
pub fn read_labels(py: Python<'_>, path: PathBuf) -> PyResult<VolumeOut<'_, u16>> {
    let (labels, _) = py.detach(|| nifti::read_labels(&path)).py_err()?;
    Ok(volume_to_py(py, labels))
}

/// Parses a whole `.nii` / `.nii.gz` held in memory as an image.
#[pyfunction]
pub fn decode_image<'py>(py: Python<'py>, data: &[u8]) -> PyResult<VolumeOut<'py, f32>> {
    let bytes = data.to_vec();
    let (image, _) = py.detach(|| nifti::decode_bytes(&bytes)).py_err()?;
    Ok(volume_to_py(py, image))
}

/// Parses a whole `.nii` / `.nii.gz` held in memory as a label map.
#[pyfunction]
pub fn decode_labels<'py>(py: Python<'py>, data: &[u8]) -> PyResult<VolumeOut<'py, u16>> {
    let bytes = data.to_vec();
    let (labels, _) = py.detach(|| nifti::decode_label_bytes(&bytes)).py_err()?;
    Ok(volume_to_py(py, labels))
}

/// Writes an image (`float32`) atomically with iris's writer.
#[pyfunction]
pub fn write_image(
    py: Python<'_>,
    path: PathBuf,
    data: PyReadonlyArray3<'_, f32>,
    affine: PyReadonlyArray2<'_, f64>,
) -> PyResult<()> {
    let image = image(&data, &affine)?;
    py.detach(|| nifti::write_image(&path, &image, None))
        .py_err()
}

/// Writes a label map (`uint8` or `uint16` on disk) atomically with iris's writer.
#[pyfunction]
pub fn write_labels(
    py: Python<'_>,
    path: PathBuf,
    data: PyReadonlyArray3<'_, u16>,
    affine: PyReadonlyArray2<'_, f64>,
) -> PyResult<()> {
    let labels = labels(&data, &affine)?;
    py.detach(|| nifti::write_labels(&path, &labels, None))
        .py_err()
}

/// Dice of each of `classes` between two label maps on the same grid
/// (`None`: the class is in neither).
#[pyfunction]
pub fn dice(
    py: Python<'_>,
    prediction: PyReadonlyArray3<'_, u16>,
    prediction_affine: PyReadonlyArray2<'_, f64>,
    truth: PyReadonlyArray3<'_, u16>,
    truth_affine: PyReadonlyArray2<'_, f64>,
    classes: Vec<u16>,
) -> PyResult<Vec<Option<f64>>> {
    let prediction = labels(&prediction, &prediction_affine)?;
    let truth = labels(&truth, &truth_affine)?;
    py.detach(|| dice_per_class(&prediction, &truth, &classes))
        .py_err()
}
