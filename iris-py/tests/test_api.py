"""The Python API itself: inputs in every accepted form give the same
result, embeddings round-trip, threads share one model safely and run in
parallel with other Python code."""

from __future__ import annotations

import copy
import pickle
import threading
import time

import nibabel
import numpy as np
import pytest

import iris
from conftest import COLIN


@pytest.fixture(scope="module")
def task(model, small):
    return model.encode(nibabel.load(str(small["ref"])), nibabel.load(str(small["labels"])),
                        [77, 78], ["Thalamus_L", "Thalamus_R"])


@pytest.fixture(scope="module")
def query(small):
    return iris.load_image(small["query"])


@pytest.fixture(scope="module")
def expected(model, task, query):
    return model.segment(query, task)


def test_every_input_form_gives_the_same_segmentation(model, task, query, expected, small):
    image, affine = query
    forms = [
        nibabel.load(str(small["query"])),
        (np.ascontiguousarray(image, dtype=np.float64), affine),  # C order, float64
    ]
    for form in forms:
        np.testing.assert_array_equal(model.segment(form, task).labels, expected.labels)
    # Memory not aligned for the dtype (as numpy makes when unpickling).
    raw = np.empty(image.nbytes + 1, np.uint8)
    unaligned = np.frombuffer(raw[1:].data, np.float32).reshape(image.shape)
    unaligned[...] = image
    assert not unaligned.flags.aligned
    np.testing.assert_array_equal(model.segment((unaligned, affine), task).labels, expected.labels)
    with pytest.raises(iris.InvalidArgumentError):  # the raw module refuses it, no panic
        iris._native.Model(model.path).segment(
            unaligned.transpose(2, 1, 0), np.ascontiguousarray(affine[:, [2, 1, 0, 3]]), task,
            iris._native.SegmentOptions())
    # A 4-D volume with one time point, affine as a keyword: the same.
    np.testing.assert_array_equal(model.segment(image[..., None], task, affine=affine).labels,
                                  expected.labels)


def test_segmentation_result(expected, query):
    assert expected.labels.dtype == np.uint16 and expected.labels.shape == query[0].shape
    np.testing.assert_array_equal(expected.affine, query[1])
    assert expected.classes == [77, 78] and expected.probabilities is None
    assert set(np.unique(expected.labels)) == {0, 77, 78}
    image = expected.to_nifti()
    assert isinstance(image, nibabel.Nifti1Image) and image.header.get_intent()[0] == "label"


def test_task_round_trips(task, tmp_path):
    path = tmp_path / "t.irisemb"
    task.save(path)
    assert iris.load_task(path) == task
    assert iris.load_task(path.read_bytes()) == task
    assert pickle.loads(pickle.dumps(task)) == task and copy.deepcopy(task) == task
    half = iris.load_task(task.to_bytes("f16"))
    assert half != task and half.classes == task.classes
    assert len(task) == 2 and task.select_names(["Thalamus_R"]).classes == [(78, "Thalamus_R")]
    assert task.select_labels([78, 77]).classes == [(78, "Thalamus_R"), (77, "Thalamus_L")]
    assert len(task.stage(77, 0)) > 0
    info = iris.inspect(task)
    assert info["model"] == task.model and [c["label"] for c in info["classes"]] == [77, 78]
    assert "Thalamus_L" in repr(task)


def test_pool_reference_pickles(model, small):
    ref = model.pool_reference("colin-2mm", iris.load_image(small["ref"]),
                               iris.load_labels(small["labels"]), [77, 78])
    back = pickle.loads(pickle.dumps(ref))
    assert back.name == "colin-2mm" and back.task == ref.task
    assert back.descriptor == ref.descriptor and len(ref.descriptor) > 0


def test_image_level_retrieval(model, small, query):
    pool = [model.pool_reference(f"ref{i}", iris.load_image(small["ref"]),
                                 iris.load_labels(small["labels"]), [77, 78]) for i in range(2)]
    result = model.retrieve(query, pool, level="image", top_k=1)
    assert result.segmentation.classes == [77, 78]
    assert all(len(c.chosen) == 1 for c in result.choices)
    with pytest.raises(iris.InvalidArgumentError):
        model.retrieve(query, [iris.PoolReference("bare", pool[0].task)], level="image")


def test_dice(expected):
    scores = iris.dice(expected, expected)
    assert scores == {77: 1.0, 78: 1.0}
    assert iris.dice(expected, expected, classes=[5]) == {5: None}
    with pytest.raises(iris.IrisError):
        iris.dice(expected.labels, expected.labels[1:])


def test_threads_share_one_model(model, task, query, expected):
    results, errors = {}, []

    def work(i):
        try:
            results[i] = model.segment(query, task).labels
        except Exception as e:  # reported below
            errors.append(e)

    threads = [threading.Thread(target=work, args=(i,)) for i in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors
    for labels in results.values():
        np.testing.assert_array_equal(labels, expected.labels)


def test_a_model_runs_on_the_threads_it_is_given(model, task, query, expected):
    one = iris.Model(model.path, threads=1)
    assert one.threads == 1
    assert model.threads >= 1  # 0 asks for one per core
    np.testing.assert_array_equal(one.segment(query, task).labels, expected.labels)
    with pytest.raises(OverflowError):
        iris.Model(model.path, threads=-1)


def test_a_model_runs_in_the_precision_it_can(model):
    assert model.precision == "f32"
    # bf16 where the CPU has AVX-512 BF16, f32 elsewhere: either way one of
    # the two, and the same as the core library's answer for this CPU.
    assert iris.Model(model.path, precision="bf16").precision in ("f32", "bf16")
    with pytest.raises(iris.InvalidArgumentError, match="fp16"):
        iris.Model(model.path, precision="fp16")


def test_the_gil_is_released_while_the_engine_runs(model, task, query):
    # While one thread segments, the main thread keeps running Python code:
    # it counts; with the GIL held for the whole call it could not.
    ticks = 0
    worker = threading.Thread(target=model.segment, args=(query, task))
    start = time.perf_counter()
    worker.start()
    while worker.is_alive():
        ticks += 1
        time.sleep(0.001)
    worker.join()
    elapsed = time.perf_counter() - start
    assert elapsed > 0.05
    assert ticks > 10, f"main thread ran {ticks} times in {elapsed:.2f} s"


def test_bank(model):
    bank = model.memory_bank()
    assert bank is not None and len(bank) > 0 and bank.model == model.fingerprint
    assert model.manifest["fingerprint"] == model.fingerprint
    assert "iris-tiny" in repr(model)
