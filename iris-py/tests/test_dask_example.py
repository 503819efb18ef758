"""examples/python/dask_segment.py on a LocalCluster of 2 worker processes on
loopback: one model per worker, volumes streamed, results next to the inputs
equal to a local segmentation, a broken volume reported and the rest finished."""

from __future__ import annotations

import shutil
import sys

import numpy as np
import pytest

import iris
from conftest import ROOT

distributed = pytest.importorskip("distributed")

sys.path.insert(0, str(ROOT / "examples" / "python"))
import dask_segment  # noqa: E402  (the example under test)


def test_folder_on_two_worker_processes(model, small, tmp_path):
    folder = tmp_path / "queries"
    folder.mkdir()
    shutil.copy(small["query"], folder / "mni152.nii.gz")
    shutil.copy(small["ref"], folder / "colin27.nii.gz")
    (folder / "broken.nii.gz").write_bytes(b"this is not a NIfTI file")
    (folder / "notes.txt").write_text("not a volume: ignored")
    task = model.encode(iris.load_image(small["ref"]), iris.load_labels(small["labels"]), [77, 78])

    with dask_segment.local_cluster(2) as cluster, distributed.Client(cluster) as client:
        client.wait_for_workers(2)
        assert len(client.nthreads()) == 2
        report = dask_segment.run(client, str(model.path), task, folder, model_threads=1)
        # Each worker process loaded the model once, through the plugin, on
        # the one engine thread it was given.
        threads = client.run(lambda dask_worker: dask_worker.plugins["iris-model"].model.threads)
        pids = client.run(lambda: __import__("os").getpid())
    assert list(threads.values()) == [1, 1] and len(set(pids.values())) == 2

    assert report.workers == 2
    assert sorted(report.written) == [str(folder / "colin27.nii.gz"), str(folder / "mni152.nii.gz")]
    assert list(report.failed) == [str(folder / "broken.nii.gz")]
    assert report.failed[str(folder / "broken.nii.gz")].startswith("NiftiError: ")
    for name in ("mni152", "colin27"):
        written = folder / f"{name}_seg.nii.gz"
        local = model.segment(iris.load_image(folder / f"{name}.nii.gz"), task)
        labels, affine = iris.load_labels(written)
        np.testing.assert_array_equal(labels, local.labels)
        np.testing.assert_allclose(affine, local.affine, atol=1e-5)
    # Outputs of an earlier run are not inputs of the next.
    assert [p.name for p in dask_segment.inputs(folder)] == [
        "broken.nii.gz", "colin27.nii.gz", "mni152.nii.gz"]


def test_command_line_exit_status(model, small, tmp_path, capsys):
    folder = tmp_path / "one"
    folder.mkdir()
    shutil.copy(small["query"], folder / "q.nii")
    task = tmp_path / "t.irisemb"
    model.encode(iris.load_image(small["ref"]), iris.load_labels(small["labels"]), [77]).save(task)
    status = dask_segment.main([str(folder), "--model", str(model.path), "--task", str(task),
                                "--local", "1", "--json"])
    assert status == 0
    assert (folder / "q_seg.nii").exists()
    assert '"volumes_per_second"' in capsys.readouterr().out
