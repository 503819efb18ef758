#!/usr/bin/env python3
"""Segment every NIfTI volume of a folder on a Dask cluster with one task embedding.

    # on this machine: a local cluster of 2 worker processes (loopback only)
    python examples/python/dask_segment.py --local 2 \\
        --model models/iris-tiny --task brain.irisemb QUERIES/

    # on a real cluster: start `dask scheduler` on one node and
    # `dask worker tcp://SCHEDULER:8786 --nworkers 1 --nthreads 1` on each
    # node (iris-seg installed there, the model folder at the same path),
    # then from any machine that sees the scheduler:
    python examples/python/dask_segment.py --scheduler tcp://SCHEDULER:8786 \\
        --model /shared/models/iris-tiny --task brain.irisemb QUERIES/

How the work is spread (docs/python.md has the measured throughput):

- **One model per worker.** A worker plugin loads the model folder once when
  the worker starts (`LoadModel.setup`); every volume that worker segments
  reuses it. The task embedding travels to each worker once, as its
  `.irisemb` bytes (`client.scatter(..., broadcast=True)`).
- **Volumes are streamed.** The client reads each input file and sends its
  bytes with the task that segments it, keeping at most ``--in-flight``
  volumes (default: 2 per worker) in the cluster at once, so a folder of any
  size never sits in memory and workers need no shared filesystem.
- **Results next to the inputs.** Each worker returns the label map; the
  client writes ``NAME_seg.nii.gz`` beside ``NAME.nii.gz`` (iris's own NIfTI
  writer, atomic) as results arrive.
- **A failed volume does not stop the run.** Its error (class and message)
  is reported, the other volumes finish, and the exit status is 1 when any
  volume failed.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Dict, Iterator, List, Optional, Tuple

import numpy as np
from distributed import Client, LocalCluster, WorkerPlugin, as_completed, get_worker

import iris

SUFFIX = "_seg"


class LoadModel(WorkerPlugin):
    """Loads the model folder once per worker process, when the worker starts."""

    name = "iris-model"

    def __init__(self, model_dir: str, threads: int = 0) -> None:
        self.model_dir = model_dir
        self.threads = threads
        self.model: Optional[iris.Model] = None

    def setup(self, worker) -> None:  # noqa: ANN001 (distributed's Worker)
        self.model = iris.Model(self.model_dir, threads=self.threads)


def segment_bytes(name: str, nifti: bytes, task: iris.Task, options: Dict) -> Tuple[np.ndarray, np.ndarray, int]:
    """Runs on a worker: decodes one volume, segments it with the worker's model.

    Returns the labels (uint16, nibabel order), their affine and the windows run.
    """
    plugin = get_worker().plugins[LoadModel.name]
    image, affine = iris.load_image(nifti)
    result = plugin.model.segment(image, task, affine=affine, **options)
    return result.labels, result.affine, result.windows


def output_path(path: Path) -> Path:
    """``NAME.nii.gz`` -> ``NAME_seg.nii.gz``, ``NAME.nii`` -> ``NAME_seg.nii``."""
    for ext in (".nii.gz", ".nii"):
        if path.name.endswith(ext):
            return path.with_name(path.name[: -len(ext)] + SUFFIX + ext)
    return path.with_name(path.name + SUFFIX + ".nii.gz")


def inputs(folder: Path) -> List[Path]:
    """The NIfTI files of ``folder``, by name, without earlier outputs."""
    found = [p for p in sorted(folder.iterdir()) if p.is_file() and p.name.endswith((".nii", ".nii.gz"))]
    return [p for p in found if not output_path_is(p)]


def output_path_is(path: Path) -> bool:
    return any(path.name.endswith(SUFFIX + ext) for ext in (".nii.gz", ".nii"))


@dataclass
class Report:
    """What happened to every volume, and how long the whole run took."""

    written: Dict[str, str] = field(default_factory=dict)
    failed: Dict[str, str] = field(default_factory=dict)
    seconds: float = 0.0
    workers: int = 0

    @property
    def volumes_per_second(self) -> float:
        done = len(self.written)
        return done / self.seconds if self.seconds > 0 else 0.0


def run(client: Client, model_dir: str, task: iris.Task, folder: Path,
        in_flight: Optional[int] = None, options: Optional[Dict] = None,
        model_threads: int = 0) -> Report:
    """Segments every volume of ``folder`` on ``client``'s cluster; see the module docs.

    ``model_threads`` is each worker's engine thread pool (0: one per core of
    its machine).
    """
    options = dict(options or {})
    client.register_plugin(LoadModel(model_dir, model_threads))
    workers = len(client.nthreads())
    limit = in_flight or 2 * max(workers, 1)
    task_future = client.scatter(task, broadcast=True)
    report = Report(workers=workers)
    start = time.perf_counter()

    paths = iter(inputs(folder))
    futures = as_completed()
    by_key: Dict[str, Path] = {}

    def submit_next() -> bool:
        for path in paths:
            try:
                data = path.read_bytes()
            except OSError as e:
                report.failed[str(path)] = f"OSError: {e}"
                continue
            future = client.submit(segment_bytes, path.name, data, task_future, options,
                                   key=f"iris-segment-{path.name}-{time.monotonic_ns()}", pure=False)
            by_key[future.key] = path
            futures.add(future)
            return True
        return False

    for _ in range(limit):
        if not submit_next():
            break
    for future in futures:
        path = by_key.pop(future.key)
        try:
            labels, affine, _windows = future.result()
            out = output_path(path)
            iris.save_labels(out, labels, affine)
            report.written[str(path)] = str(out)
        except Exception as e:  # report it, finish the others
            report.failed[str(path)] = f"{type(e).__name__}: {e}"
            print(f"failed: {path}: {type(e).__name__}: {e}", file=sys.stderr)
        future.release()
        submit_next()
    report.seconds = time.perf_counter() - start
    return report


def local_cluster(workers: int) -> LocalCluster:
    """``workers`` single-threaded worker processes on the loopback interface."""
    return LocalCluster(
        n_workers=workers,
        threads_per_worker=1,
        processes=True,
        host="127.0.0.1",
        dashboard_address=None,
        worker_dashboard_address=None,
    )


def model_threads(args: argparse.Namespace) -> int:
    """Engine threads per worker: as asked, else local workers share this machine's cores."""
    if args.model_threads is not None:
        return args.model_threads
    if args.local:
        return max(1, (os.cpu_count() or 1) // args.local)
    return 0


def main(argv: Optional[List[str]] = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("folder", type=Path, help="folder of .nii / .nii.gz volumes")
    parser.add_argument("--model", required=True, help="model folder (on every worker)")
    parser.add_argument("--task", required=True, type=Path, help="task embedding (.irisemb)")
    where = parser.add_mutually_exclusive_group(required=True)
    where.add_argument("--scheduler", help="address of a running Dask scheduler")
    where.add_argument("--local", type=int, metavar="N", help="start N local worker processes")
    parser.add_argument("--in-flight", type=int, help="volumes in the cluster at once (default 2 per worker)")
    parser.add_argument("--model-threads", type=int,
                        help="engine threads per worker (default: with --local N, this machine's "
                             "cores / N; with --scheduler, every core of the worker's node)")
    parser.add_argument("--json", action="store_true", help="print the report as JSON")
    args = parser.parse_args(argv)

    task = iris.load_task(args.task)
    cluster = local_cluster(args.local) if args.local else None
    try:
        with Client(cluster if cluster else args.scheduler) as client:
            if args.local:
                client.wait_for_workers(args.local)
            report = run(client, args.model, task, args.folder, args.in_flight,
                         model_threads=model_threads(args))
    finally:
        if cluster is not None:
            cluster.close()
    if args.json:
        print(json.dumps({**asdict(report), "volumes_per_second": report.volumes_per_second}, indent=2))
    else:
        print(f"{len(report.written)} written, {len(report.failed)} failed, "
              f"{report.seconds:.1f} s on {report.workers} worker(s) "
              f"({report.volumes_per_second:.2f} volumes/s)")
    return 1 if report.failed else 0


if __name__ == "__main__":
    sys.exit(main())
