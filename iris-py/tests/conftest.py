"""Fixtures of the Python tests: the shipped model, real volumes from data/,
and the `iris` command (the Rust API) to compare with.

Like the Rust tests, tests that need data/ or the `iris` binary skip with a
message on a developer's machine and fail under IRIS_REQUIRE_DATA=1, which
scripts/test.sh sets.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
from pathlib import Path
from typing import List

import numpy as np
import pytest

import iris

ROOT = Path(__file__).resolve().parents[2]
MODEL = ROOT / "models" / "iris-tiny"
DATA = ROOT / "data"
COLIN = DATA / "mricron" / "ch2.nii.gz"
AAL = DATA / "mricron" / "aal.nii.gz"
MNI = DATA / "mni152" / "mni_icbm152_t1_tal_nlin_sym_09a_converted.nii.gz"
# Two held-out AAL structures (thalamus left and right) and the hippocampi.
CLASSES = [77, 78]
NAMES = ["Thalamus_L", "Thalamus_R"]


def _missing(what: str) -> None:
    message = f"{what} is missing"
    if os.environ.get("IRIS_REQUIRE_DATA") == "1":
        pytest.fail(message + " (IRIS_REQUIRE_DATA=1)")
    pytest.skip(message)


@pytest.fixture(scope="session")
def data() -> Path:
    for path in (COLIN, AAL, MNI):
        if not path.exists():
            _missing(f"{path} (run scripts/fetch-data.sh)")
    return DATA


@pytest.fixture(scope="session")
def model() -> iris.Model:
    return iris.Model(MODEL)


def _cli_path() -> Path:
    if "IRIS_CLI" in os.environ:
        return Path(os.environ["IRIS_CLI"])
    target = Path(os.environ.get("CARGO_TARGET_DIR", ROOT / "target"))
    for profile in ("debug", "release"):
        candidate = target / profile / "iris"
        if candidate.exists():
            return candidate
    return target / "debug" / "iris"


@pytest.fixture(scope="session")
def cli() -> "Cli":
    path = _cli_path()
    if not path.exists():
        _missing(f"the iris command ({path}; cargo build -p iris-cli, or set IRIS_CLI)")
    return Cli(path)


class Cli:
    """Runs the `iris` command with the shipped model."""

    def __init__(self, path: Path) -> None:
        self.path = path

    def run(self, *args: str, check: bool = True) -> subprocess.CompletedProcess:
        env = dict(os.environ, IRIS_MODEL=str(MODEL))
        done = subprocess.run(
            [str(self.path), "--quiet", *map(str, args)],
            capture_output=True, text=True, env=env, check=False,
        )
        if check and done.returncode != 0:
            raise AssertionError(f"iris {' '.join(map(str, args))} failed: {done.stderr}")
        return done

    def json(self, *args: str) -> dict:
        return json.loads(self.run(*args, "--json").stdout)


@pytest.fixture(scope="session")
def small(tmp_path_factory: pytest.TempPathFactory, data: Path) -> dict:
    """The real volumes at half resolution (every second voxel, 2 mm), written
    as NIfTI files, so that most tests run in a fraction of the time: Colin27
    and its AAL labels (reference), MNI152 (query) and a second reference
    (MNI152 with Colin27's labels would be wrong, so: Colin27 shifted)."""
    folder = tmp_path_factory.mktemp("small")
    out = {}
    for name, path, load in (("ref", COLIN, iris.load_image), ("labels", AAL, iris.load_labels),
                             ("query", MNI, iris.load_image)):
        array, affine = load(path)
        half = np.ascontiguousarray(array[::2, ::2, ::2])
        aff = affine.copy()
        aff[:3, :3] *= 2
        file = folder / f"{name}.nii.gz"
        (iris.save_labels if name == "labels" else iris.save_image)(file, half, aff)
        out[name] = file
    return out


def read_nifti(path: Path) -> "tuple[np.ndarray, np.ndarray]":
    import nibabel

    image = nibabel.load(str(path))
    return np.asanyarray(image.dataobj), image.affine


def copy_model(tmp: Path, fingerprint: str = None, break_decoder: bool = False) -> Path:
    """A copy of the shipped model folder, optionally claiming another
    fingerprint (so that it counts as another model) or with a broken decoder."""
    dest = tmp / "model-copy"
    shutil.copytree(MODEL, dest, ignore=shutil.ignore_patterns("checkpoint", "training.csv"))
    if fingerprint is not None:
        manifest = json.loads((dest / "manifest.json").read_text())
        manifest["fingerprint"] = fingerprint
        manifest.pop("memory_bank", None)
        (dest / "manifest.json").write_text(json.dumps(manifest))
    if break_decoder:
        decoder = dest / "decoder.onnx"
        decoder.write_bytes(decoder.read_bytes()[:1000])
    return dest


def labels_of(path: Path) -> List[int]:
    array, _ = iris.load_labels(path)
    return [int(v) for v in np.unique(array) if v]
