"""The Python results equal the Rust API's bit for bit: the `iris` command
(the Rust API) and the Python package run on the same files, and their
outputs are compared exactly (embeddings byte for byte, label maps voxel for
voxel, probabilities and Dice to the last bit)."""

from __future__ import annotations

import json
from pathlib import Path

import nibabel
import numpy as np
import pytest

import iris
from conftest import AAL, CLASSES, COLIN, MNI, NAMES, read_nifti


def test_nifti_reader_agrees_with_nibabel(data):
    # iris's reader, through Python, gives what nibabel gives (float32 of the
    # scaled values, same affine), so nibabel images are valid inputs.
    array, affine = iris.load_image(MNI)
    image = nibabel.load(str(MNI))
    assert array.shape == image.shape
    np.testing.assert_array_equal(array, image.get_fdata(dtype=np.float64).astype(np.float32))
    np.testing.assert_allclose(affine, image.affine, rtol=0, atol=1e-6)
    labels, _ = iris.load_labels(AAL)
    assert labels.dtype == np.uint16
    np.testing.assert_array_equal(labels, np.asanyarray(nibabel.load(str(AAL)).dataobj))


def test_encode_equals_cli_byte_for_byte(model, cli, tmp_path):
    out = tmp_path / "cli.irisemb"
    cli.run("encode", "--image", COLIN, "--label", AAL, "--classes", "77,78",
            "--names", ",".join(NAMES), "--out", out)
    # nibabel images, the most common input.
    task = model.encode(nibabel.load(str(COLIN)), nibabel.load(str(AAL)), CLASSES, NAMES)
    assert task.to_bytes() == out.read_bytes()
    # iris's own reader and explicit affines: the same embedding.
    image, affine = iris.load_image(COLIN)
    labels, labels_affine = iris.load_labels(AAL)
    again = model.encode((image, affine), (labels, labels_affine), CLASSES, NAMES)
    assert again == task
    assert task.classes == [(77, "Thalamus_L"), (78, "Thalamus_R")]
    assert task.model == model.fingerprint


def test_segment_equals_cli_with_probabilities(model, cli, tmp_path):
    task_file = tmp_path / "t.irisemb"
    cli.run("encode", "--image", COLIN, "--label", AAL, "--classes", "77,78", "--out", task_file)
    seg_file, probs = tmp_path / "seg.nii.gz", tmp_path / "p.nii.gz"
    cli.run("segment", "--image", MNI, "--task", task_file, "--out", seg_file,
            "--probabilities", probs)

    task = iris.load_task(task_file)
    seg = model.segment(nibabel.load(str(MNI)), task, probabilities=True)
    cli_labels, cli_affine = read_nifti(seg_file)
    assert seg.labels.shape == cli_labels.shape == nibabel.load(str(MNI)).shape
    np.testing.assert_array_equal(seg.labels, cli_labels)
    assert set(np.unique(seg.labels)) <= {0, 77, 78} and (seg.labels == 77).any()
    np.testing.assert_allclose(seg.affine, cli_affine, rtol=0, atol=1e-6)
    assert seg.classes == [77, 78] and seg.windows > 0
    for label in CLASSES:
        cli_map, _ = read_nifti(tmp_path / f"p-{label}.nii.gz")
        np.testing.assert_array_equal(seg.probabilities[label], cli_map)
    # Writing through Python gives the file the command writes.
    mine = tmp_path / "mine.nii.gz"
    seg.save(mine)
    np.testing.assert_array_equal(read_nifti(mine)[0], cli_labels)


def test_segment_options_equal_cli_flags(model, cli, small, tmp_path):
    task = model.encode(iris.load_image(small["ref"]), iris.load_labels(small["labels"]), [77])
    task.save(tmp_path / "t.irisemb")
    out = tmp_path / "seg.nii.gz"
    cli.run("segment", "--image", small["query"], "--task", tmp_path / "t.irisemb", "--out", out,
            "--threshold", "0.3", "--overlap", "0.25", "--no-largest-component", "--modality", "mr")
    seg = model.segment(iris.load_image(small["query"]), task, threshold=0.3, overlap=0.25,
                        largest_component=False, intensity="mr")
    np.testing.assert_array_equal(seg.labels, read_nifti(out)[0])
    default = model.segment(iris.load_image(small["query"]), task)
    assert not np.array_equal(default.labels, seg.labels)


def test_inspect_ensemble_and_bank_equal_cli(model, cli, small, tmp_path):
    a, b = tmp_path / "a.irisemb", tmp_path / "b.irisemb"
    cli.run("encode", "--image", COLIN, "--label", AAL, "--classes", "77,78", "--out", a)
    cli.run("encode", "--image", small["ref"], "--label", small["labels"], "--classes", "77,78",
            "--out", b)
    merged = tmp_path / "merged.irisemb"
    cli.run("ensemble", "--out", merged, a, b)
    mine = iris.ensemble([iris.load_task(a), iris.load_task(b.read_bytes())])
    assert mine.to_bytes() == merged.read_bytes()
    assert iris.inspect(merged) == cli.json("inspect", merged)
    assert iris.inspect(mine)["classes"][0]["provenance"] == {"kind": "ensemble", "references": 2}
    bank = model.memory_bank()
    bank_file = Path(model.manifest["memory_bank"])
    assert bank == iris.load_task(bank_file)
    assert iris.inspect(bank) == {k: v for k, v in cli.json("inspect", bank_file).items() if k != "file"}


def test_dice_equals_cli_eval(cli, data, tmp_path):
    # The position-copy situation: Colin27's AAL against itself shifted by 3 voxels.
    labels, affine = iris.load_labels(AAL)
    shifted = np.roll(labels, 3, axis=0)
    iris.save_labels(tmp_path / "shifted.nii.gz", shifted, affine)
    rows = cli.json("eval", "--pred", tmp_path / "shifted.nii.gz", "--truth", AAL,
                    "--classes", "37,38,77,78,200")
    scores = iris.dice((shifted, affine), nibabel.load(str(AAL)), [37, 38, 77, 78, 200])
    expected = {row["label"]: row["dice"] for row in rows["classes"]}
    assert scores == expected
    assert scores[200] is None and 0 < scores[77] < 1


def test_retrieve_equals_cli(model, cli, small, tmp_path):
    pool_dir = tmp_path / "pool"
    pool_dir.mkdir()
    ref, labels = iris.load_image(small["ref"]), iris.load_labels(small["labels"])
    # A second reference: the same brain with another contrast (square root).
    other = (np.sqrt(np.maximum(ref[0], 0)), ref[1])
    references = {
        "a-colin-2mm": model.encode(ref, labels, [77, 78]),
        "b-colin-2mm-sqrt": model.encode(other, labels, [77, 78]),
    }
    for name, task in references.items():
        task.save(pool_dir / f"{name}.irisemb")
    out, saved = tmp_path / "seg.nii.gz", tmp_path / "retrieved.irisemb"
    summary = cli.json("retrieve", "--image", small["query"], "--pool", pool_dir, "--top-k", "2",
                       "--out", out, "--save-task", saved)
    pool = [iris.PoolReference(name, task) for name, task in sorted(references.items())]
    result = model.retrieve(iris.load_image(small["query"]), pool, top_k=2)
    np.testing.assert_array_equal(result.segmentation.labels, read_nifti(out)[0])
    assert result.task.to_bytes() == saved.read_bytes()
    assert [c.label for c in result.choices] == [77, 78]
    assert all(len(c.chosen) == 2 for c in result.choices)
    assert json.dumps(summary)  # the command's summary was JSON
