"""Every iris error arrives as the exception class of its kind, with the
message the `iris` command prints; bad Python input raises, never crashes."""

from __future__ import annotations

import pickle

import nibabel
import numpy as np
import pytest

import iris
from conftest import AAL, COLIN, copy_model


@pytest.fixture(scope="module")
def task(model, small):
    return model.encode(iris.load_image(small["ref"]), iris.load_labels(small["labels"]), [77])


@pytest.fixture(scope="module")
def query(small):
    return iris.load_image(small["query"])


def test_hierarchy():
    for cls in (iris.FormatError, iris.ModelMismatchError, iris.ShapeMismatchError,
                iris.InvalidArgumentError, iris.TooLargeError, iris.NonFiniteError,
                iris.EmptyMaskError, iris.CancelledError, iris.IoError, iris.NiftiError,
                iris.ModelError):
        assert issubclass(cls, iris.IrisError)
    assert issubclass(iris.InvalidArgumentError, ValueError)
    assert issubclass(iris.IoError, OSError)


def test_missing_model_is_io_error(tmp_path):
    with pytest.raises(iris.IoError) as caught:
        iris.Model(tmp_path / "nowhere")
    assert "nowhere" in str(caught.value) and caught.value.path.endswith("manifest.json")
    assert caught.value.errno == 2 and isinstance(caught.value, FileNotFoundError) is False


def test_broken_graph_is_model_error_with_the_cli_message(cli, tmp_path, small):
    broken = copy_model(tmp_path, break_decoder=True)
    with pytest.raises(iris.ModelError) as caught:
        iris.Model(broken)
    assert caught.value.path.endswith("decoder.onnx")
    done = cli.run("segment", "--model", broken, "--image", small["query"], "--bank",
                   "--out", tmp_path / "x.nii.gz", check=False)
    assert done.returncode == 4 and str(caught.value) in done.stderr


def test_task_of_another_model_is_model_mismatch(model, task, query, tmp_path):
    other = iris.Model(copy_model(tmp_path, fingerprint="ab" * 32))
    with pytest.raises(iris.ModelMismatchError) as caught:
        other.segment(query, task)
    assert caught.value.found == task.model and caught.value.expected == "ab" * 32
    with pytest.raises(iris.ModelMismatchError):
        iris.ensemble([task, other.encode(*_tiny_reference())])


def _tiny_reference():
    image = np.zeros((40, 40, 40), np.float32)
    image[10:30, 10:30, 10:30] = 100
    image += np.linspace(0, 1, 40, dtype=np.float32)
    labels = (image > 50).astype(np.uint8)
    return image, labels


def test_damaged_irisemb_is_format_error(task, cli, tmp_path):
    data = task.to_bytes()
    for bad in (data[:10], data[:-1], b"NOTIRIS" + data[7:], data[:40] + bytes([data[40] ^ 1]) + data[41:]):
        with pytest.raises(iris.FormatError):
            iris.load_task(bad)
    path = tmp_path / "cut.irisemb"
    path.write_bytes(data[:-1])
    with pytest.raises(iris.FormatError) as caught:
        iris.load_task(path)
    done = cli.run("inspect", path, check=False)
    assert done.returncode == 3 and str(caught.value) in done.stderr
    with pytest.raises(iris.IoError):
        iris.load_task(tmp_path / "absent.irisemb")


def test_nifti_errors(tmp_path):
    bad = tmp_path / "bad.nii.gz"
    bad.write_bytes(b"not a nifti file at all" * 20)
    with pytest.raises(iris.NiftiError) as caught:
        iris.load_image(bad)
    assert "bad.nii.gz" in str(caught.value)
    with pytest.raises(iris.NiftiError):
        iris.load_image(b"\x00" * 400)
    with pytest.raises(iris.IoError):
        iris.load_labels(tmp_path / "absent.nii.gz")
    fractions = tmp_path / "fractions.nii.gz"
    iris.save_image(fractions, np.full((4, 4, 4), 0.5, np.float32))
    with pytest.raises(iris.NiftiError) as caught:  # labels that are not integers
        iris.load_labels(fractions)
    assert "fractions.nii.gz" in caught.value.path


def test_engine_errors(model, task, query, small):
    image, affine = query
    with pytest.raises(iris.NonFiniteError) as caught:
        nan = image.copy()
        nan[5, 5, 5] = np.nan
        model.segment(nan, task, affine=affine)
    assert caught.value.count == 1
    with pytest.raises(iris.TooLargeError):
        model.segment(query, task, max_windows=1)
    with pytest.raises(iris.TooLargeError):
        model.segment(query, task, memory_budget=1000)
    ref, labels = iris.load_image(small["ref"]), iris.load_labels(small["labels"])
    with pytest.raises(iris.EmptyMaskError) as caught:
        model.encode(ref, labels, [999])
    assert caught.value.label == 999
    with pytest.raises(iris.ShapeMismatchError):
        model.encode(ref, (labels[0][:-1], labels[1]), [77])
    with pytest.raises(iris.InvalidArgumentError):
        model.encode(ref, labels, [77, 77])
    with pytest.raises(iris.InvalidArgumentError):
        model.encode(ref, labels, [77], names=["a", "b"])
    with pytest.raises(iris.InvalidArgumentError):
        task.select_labels([5])


def test_cancel_and_callback_errors(model, task, query):
    calls = []
    with pytest.raises(iris.CancelledError):
        model.segment(query, task, cancel=lambda: True)
    seg = model.segment(query, task, progress=lambda done, total: calls.append((done, total)))
    assert calls and calls[-1] == (seg.windows, seg.windows)
    assert [d for d, _ in calls] == list(range(1, seg.windows + 1))

    def boom(done, total):
        raise KeyError("from the callback")

    with pytest.raises(KeyError, match="from the callback"):
        model.segment(query, task, progress=boom)
    with pytest.raises(ZeroDivisionError):
        model.segment(query, task, cancel=lambda: 1 / 0)


@pytest.mark.parametrize("options, name", [
    ({"overlap": 1.0}, "overlap"),
    ({"overlap": -0.1}, "overlap"),
    ({"threshold": 0.0}, "threshold"),
    ({"threshold": float("nan")}, "threshold"),
    ({"classes_per_forward": 0}, "classes_per_forward"),
    ({"intensity": "xray"}, "intensity"),
    ({"intensity": {"policy": "ct", "min_hu": 5, "max_hu": -5}}, "intensity policy"),
    ({"progress": 3}, "progress"),
])
def test_bad_options_are_invalid_argument(model, task, query, options, name):
    with pytest.raises(iris.InvalidArgumentError) as caught:
        model.segment(query, task, **options)
    assert caught.value.name == name


def test_bad_python_input_raises_never_crashes(model, task, query):
    image, affine = query
    bad_inputs = [
        (np.zeros((4, 4)), iris.InvalidArgumentError),                 # 2-D
        (np.zeros((2, 3, 4, 5)), iris.InvalidArgumentError),           # 4-D, 5 volumes
        (np.zeros((0, 4, 4), np.float32), iris.IrisError),             # empty
        (np.array([["a"]]), iris.InvalidArgumentError),                # strings
        (np.zeros((4, 4, 4), np.complex64), iris.InvalidArgumentError),
        ("a string", iris.InvalidArgumentError),
        (None, iris.InvalidArgumentError),
        ((image, np.eye(3)), iris.InvalidArgumentError),               # 3x3 affine
        ((image, np.full((4, 4), np.nan)), iris.IrisError),            # NaN affine
        ((image, np.zeros((4, 4))), iris.IrisError),                   # singular affine
    ]
    for value, error in bad_inputs:
        with pytest.raises(error):
            model.segment(value, task)
    with pytest.raises(iris.InvalidArgumentError):
        model.segment(query, "not a task")
    with pytest.raises(iris.InvalidArgumentError):
        model.segment(nibabel.load(str(COLIN)), task, affine=np.eye(4))
    ref = iris.load_image(COLIN)
    for labels in (np.full(ref[0].shape, -1, np.int16), np.full(ref[0].shape, 0.5),
                   np.full(ref[0].shape, 70000, np.int32)):
        with pytest.raises(iris.InvalidArgumentError):
            model.encode(ref, (labels, ref[1]), [1])
    with pytest.raises(iris.InvalidArgumentError):
        model.encode(ref, iris.load_labels(AAL), ["thalamus"])
    with pytest.raises(iris.InvalidArgumentError):
        task.to_bytes("f8")
    with pytest.raises(TypeError):
        iris.load_task(12345)
    with pytest.raises(iris.InvalidArgumentError):
        model.retrieve(query, [task])


def test_exceptions_pickle_with_their_data(tmp_path):
    with pytest.raises(iris.FormatError) as caught:
        iris.load_task(b"short")
    back = pickle.loads(pickle.dumps(caught.value))
    assert type(back) is iris.FormatError and str(back) == str(caught.value)
    assert back.reason == caught.value.reason
    with pytest.raises(iris.IoError) as caught:
        iris.load_task(tmp_path / "absent.irisemb")
    back = pickle.loads(pickle.dumps(caught.value))
    assert type(back) is iris.IoError and back.path == caught.value.path and str(back) == str(caught.value)
