#!/usr/bin/env python3
"""The whole reference pipeline (MASS `inference.py`) against iris's, on real volumes.

`iris-train import` turns a MASS checkpoint into an iris model folder, and the importer's
tests prove that the imported network computes what the reference network computes, one
window at a time. This script checks everything around the network: it segments one
query from one reference with the authors' `inference.py` (run unmodified, as a
subprocess, on the CPU in fp32) and with `iris segment` on the imported model, and
compares the two outputs on the query's own grid:

- the label maps: the fraction of voxels with the same label (over the whole grid and
  over the voxels that either side labels), and the Dice between the two predictions per
  class;
- the probability maps: the largest and the mean absolute difference per class.

The two pipelines differ in a few steps (docs/reference-pipeline.md explains each), so
the script runs both in variants that remove one difference at a time:

  M    `inference.py` as released;
  Mw   `inference.py` with its window starts replaced by iris's (`get_sliding_window_coords`
       swapped at import time by this script, the checkout untouched);
  Mwn  as Mw, with `--body-method none` (no body crop of the query);
  A    `iris segment --ref-image`, as a user runs it;
  B    as A, but each class encoded from its own reference crop (`iris encode` per class,
       the files concatenated): MASS crops the reference around each label, iris around
       the bounding box of all the classes together;
  C    as B, but the query is MASS's own preprocessed query (RAS, 1.5 mm, body crop, not
       normalised; iris's reorientation and resampling are then the identity) and the
       label map is post-processed as MASS does it (largest 6-connected component per
       label with scipy, resampled back with MASS's own function); C26 is C with iris's
       26-connected components;
  D    as C, with the reference also resampled by SimpleITK (MASS's 1.5 mm reference
       written to NIfTI), which removes the last preprocessing difference.

and compares A to D with M, A and B with Mwn, and C, C26, D and Mwn with Mw. It also prints
the intermediate measurements behind each difference: the query's normalisation
statistics with and without the body crop, every class's reference crop (own centre
against the union centre), the reference label voxels where SimpleITK's nearest
neighbour breaks a tie differently, the window starts of both plans, the Gaussian weights
of both, the voxels where MASS divides by its weight floor, and the voxels that the
connectivity of the largest-component step changes. The `in` columns leave out the
voxels where MASS's output is not its blended probability (beyond its grid, and the
weight-floor corners; see `excluded_region`).

The checkpoint must be a MASS training checkpoint (`{model, ema_model, config, ...}`)
and the iris model folder must be imported from the same file. A checkpoint whose
positional embeddings are stored smaller than the 128^3 that MASS's `Iris` builds
(the importer's test fixture stores them at [48, 64, 48]) is padded with zeros into
`OUT/checkpoint-mass.pth` first: the reference slices them from the origin to the
window, so the padding is never read, and `inference.py` loads the file unmodified.

Run from the repository root (35 minutes on a 2-core CPU with the test fixture and the 12
default classes, a cargo build running beside it; 26 of them in the three `inference.py`
runs):

    python3 -m venv /work/venv-mass
    /work/venv-mass/bin/pip install torch==2.15.0 numpy==2.4.6 einops==0.8.2 \\
        pyyaml==6.0.4 SimpleITK==2.5.7 scipy==1.17.1 tqdm==4.70.1 nibabel==5.4.2
    git clone https://github.com/Stanford-AIMI/MASS /work/mass && git -C /work/mass checkout 156e866
    scripts/fetch-data.sh
    mkdir -p /tmp/mass-fixture
    gunzip -c iris-train/tests/fixtures/mass/checkpoint.pth.gz > /tmp/mass-fixture/checkpoint.pth
    cargo build -p iris-cli -p iris-train
    target/debug/iris-train import --checkpoint /tmp/mass-fixture/checkpoint.pth \\
        --out /tmp/mass-fixture/model
    /work/venv-mass/bin/python scripts/mass_pipeline.py --mass /work/mass \\
        --checkpoint /tmp/mass-fixture/checkpoint.pth --iris-model /tmp/mass-fixture/model

Everything goes to `--out` (default data/out/mass-pipeline): `mass-M/`, `mass-Mw/`,
`mass-Mwn/` (the reference's outputs and logs), `iris-A/` to `iris-D/`, and `summary.json`
with every number printed. `--reuse` keeps outputs already there instead of recomputing
them (the MASS runs are the slow part). Nothing here is needed by CI (which has no torch).
"""

import argparse
import json
import os
import platform
import struct
import subprocess
import sys
import time
import zlib
from importlib import metadata
from pathlib import Path

import nibabel as nib
import numpy as np
import SimpleITK as sitk
import torch
from scipy import ndimage

PINNED = {
    "torch": "2.15.0",
    "numpy": "2.4.6",
    "einops": "0.8.2",
    "PyYAML": "6.0.4",
    "SimpleITK": "2.5.7",
    "scipy": "1.17.1",
    "tqdm": "4.70.1",
    "nibabel": "5.4.2",
}
MASS_COMMIT = "156e866"
MASS_POSITION_SIZE = 128  # LearnablePositionalEncoding3D(..., 128, 128, 128) in MASS
DEFAULT_CLASSES = "37,38,41,42,71,72,73,74,75,76,77,78"  # as scripts/run.sh
DEFAULT_REF_IMAGE = "data/mricron/ch2.nii.gz"
DEFAULT_REF_LABELS = "data/mricron/aal.nii.gz"
DEFAULT_QUERY = "data/mni152/mni_icbm152_t1_tal_nlin_sym_09a_converted.nii.gz"


def parse_args():
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--mass", required=True, type=Path, help="MASS checkout (commit 156e866)")
    p.add_argument("--checkpoint", required=True, type=Path, help="MASS training checkpoint .pth")
    p.add_argument("--iris-model", required=True, type=Path,
                   help="iris model folder imported from the same checkpoint")
    p.add_argument("--iris", type=Path, default=Path("target/debug/iris"), help="iris binary")
    p.add_argument("--out", type=Path, default=Path("data/out/mass-pipeline"))
    p.add_argument("--ref-image", type=Path, default=Path(DEFAULT_REF_IMAGE))
    p.add_argument("--ref-labels", type=Path, default=Path(DEFAULT_REF_LABELS))
    p.add_argument("--query", type=Path, default=Path(DEFAULT_QUERY))
    p.add_argument("--classes", default=DEFAULT_CLASSES, help="label values, comma-separated")
    p.add_argument("--windows", type=int, default=16,
                   help="windows for the network-only check, spread over the plan")
    p.add_argument("--reuse", action="store_true",
                   help="keep outputs already in --out instead of recomputing them")
    return p.parse_args()


# --- environment ------------------------------------------------------------------------


def check_versions():
    """The installed versions of the pinned packages; warns about any that differ."""
    found = {}
    for name, want in PINNED.items():
        try:
            found[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            found[name] = None
        if found[name] != want:
            print(f"warning: {name} {found[name]} installed, {want} pinned", file=sys.stderr)
    return found


def import_mass_inference(mass):
    """MASS's `inference.py` as a module, for its preprocessing functions (the run itself
    is a subprocess)."""
    sys.path.insert(0, str(mass.resolve()))
    import inference  # noqa: E402  (the MASS checkout's module)

    return inference


def run(cmd, log=None, env=None, cwd=None):
    """Runs `cmd`, its output to `log` (or inherited); returns the wall time in seconds."""
    print("$", " ".join(str(c) for c in cmd), flush=True)
    start = time.monotonic()
    if log is None:
        subprocess.run([str(c) for c in cmd], check=True, env=env, cwd=cwd)
    else:
        with open(log, "w") as f:
            subprocess.run([str(c) for c in cmd], check=True, env=env, cwd=cwd,
                           stdout=f, stderr=subprocess.STDOUT)
    return time.monotonic() - start


# --- the reference pipeline -------------------------------------------------------------


def checkpoint_for_mass(checkpoint, out):
    """A copy of `checkpoint` that MASS's `Iris` can load: positional embeddings stored
    smaller than 128^3 zero-padded to it (never read: the reference slices them from the
    origin to the window). Returns (path, config)."""
    ckpt = torch.load(checkpoint, map_location="cpu", weights_only=False)
    padded = False
    for key in ("model", "ema_model"):
        for name, value in ckpt.get(key, {}).items():
            if name.endswith("pos_embed.embedding") and tuple(value.shape[2:]) != (MASS_POSITION_SIZE,) * 3:
                full = torch.zeros(value.shape[:2] + (MASS_POSITION_SIZE,) * 3, dtype=value.dtype)
                d, h, w = value.shape[2:]
                full[:, :, :d, :h, :w] = value
                ckpt[key][name] = full
                padded = True
    if not padded:
        return checkpoint, ckpt["config"]
    path = out / "checkpoint-mass.pth"
    torch.save(ckpt, path)
    return path, ckpt["config"]


IRIS_WINDOWS_FLAG = "--mass-inference-with-iris-windows"


def run_mass_inference(args, checkpoint, window, overlap, classes, out, iris_windows=False,
                       body_crop=True):
    """`inference.py` of the MASS checkout on the CPU in fp32 with the EMA weights (with
    `iris_windows`, through `inference_with_iris_windows`; without `body_crop`, with
    `--body-method none`); returns (label map path, {label: probability path}, seconds)."""
    out.mkdir(parents=True, exist_ok=True)
    seg = out / "seg.nii.gz"
    probs = {c: out / f"seg_label{c}_prob.nii.gz" for c in classes}
    if args.reuse and seg.exists() and all(p.exists() for p in probs.values()):
        return seg, probs, None
    entry = [Path(__file__).resolve(), IRIS_WINDOWS_FLAG] if iris_windows else ["inference.py"]
    cmd = [
        sys.executable, *entry,
        "--checkpoint", checkpoint.resolve(),
        "--test-image", args.query.resolve(),
        "--reference-image", args.ref_image.resolve(),
        "--reference-mask", args.ref_labels.resolve(),
        "--reference-label", *classes,
        "--output", seg.resolve(),
        "--gpu", "",  # inference.py sets CUDA_VISIBLE_DEVICES to this: no GPU
        "--use-ema", "--disable-amp", "--save-probability",
        "--orientation", "RAS", "--target-spacing", "1.5", "1.5", "1.5",
        "--image-interp", "linear", "--modality", "auto",
        "--body-method", "threshold" if body_crop else "none",
        "--window-size", *window, "--overlap", overlap,
        "--threshold", "0.5",
    ]
    env = dict(os.environ, CUDA_VISIBLE_DEVICES="")
    seconds = run(cmd, log=out / "inference.log", env=env, cwd=args.mass)
    return seg, probs, seconds


def inference_with_iris_windows(argv):
    """`inference.py`'s `main()` (run in the MASS checkout) with its window plan replaced
    by iris's starts (`iris_window_starts`); the rest of the reference is untouched. Only
    for volumes at least one window large (MASS pads smaller ones at the end, iris centred)."""
    sys.path.insert(0, os.getcwd())
    import inference  # noqa: E402  (the MASS checkout's module)

    inference.get_sliding_window_coords = iris_window_boxes
    sys.argv = ["inference.py", *argv]
    inference.main()


# --- iris -------------------------------------------------------------------------------


def iris_probability_paths(prefix, classes):
    """Where `iris segment --probabilities PREFIX.nii.gz` writes each class's map."""
    stem = str(prefix)[: -len(".nii.gz")]
    if len(classes) == 1:
        return {classes[0]: Path(prefix)}
    return {c: Path(f"{stem}-{c}.nii.gz") for c in classes}


def run_iris_segment(args, query, classes, out, source, extra=()):
    """`iris segment` with `source` (the reference pair or a task file); returns (label
    map path, {label: probability path}, seconds)."""
    out.mkdir(parents=True, exist_ok=True)
    seg, prefix = out / "seg.nii.gz", out / "p.nii.gz"
    probs = iris_probability_paths(prefix, classes)
    if args.reuse and seg.exists() and all(p.exists() for p in probs.values()):
        return seg, probs, None
    cmd = [args.iris, "segment", "--model", args.iris_model, "--image", query, *source,
           "--out", seg, "--probabilities", prefix, *extra]
    seconds = run(cmd, log=out / "segment.log")
    return seg, probs, seconds


def iris_task_per_class(args, classes, out, ref_image=None, ref_labels=None):
    """Each class encoded from its own reference crop (`iris encode --classes C`), the
    files concatenated into one task; returns its path. The reference is `--ref-image`
    and `--ref-labels` unless given."""
    ref_image, ref_labels = ref_image or args.ref_image, ref_labels or args.ref_labels
    out.mkdir(parents=True, exist_ok=True)
    merged = out / "task-per-class.irisemb"
    if args.reuse and merged.exists():
        return merged
    parts = []
    for c in classes:
        part = out / f"task-{c}.irisemb"
        if not (args.reuse and part.exists()):
            run([args.iris, "--quiet", "encode", "--model", args.iris_model,
                 "--image", ref_image, "--label", ref_labels,
                 "--classes", c, "--out", part])
        parts.append(part)
    merge_irisemb(parts, merged)
    return merged


def merge_irisemb(parts, out):
    """Concatenates the classes of `.irisemb` files of one model (docs/irisemb.md, version
    1), as `TaskEmbedding::merge` does; the CLI has no command for it."""
    common = None
    entries, payloads, payload_type = [], [], None
    for path in parts:
        b = Path(path).read_bytes()
        if b[:8] != b"IRISEMB\0" or struct.unpack_from("<H", b, 8)[0] != 1:
            raise ValueError(f"{path}: not an .irisemb version 1 file")
        if zlib.crc32(b[:-4]) != struct.unpack_from("<I", b, len(b) - 4)[0]:
            raise ValueError(f"{path}: file CRC mismatch")
        payload_type = b[10]
        stages, classes = struct.unpack_from("<II", b, 100)
        shapes_end = 108 + 8 * stages
        # fingerprint, spacing, patch, intensity and stage count, then the stage shapes
        head = b[32:104] + b[108:shapes_end]
        if common is None:
            common = head
        elif head != common:
            raise ValueError(f"{path}: another model, preprocessing or stage layout")
        off = shapes_end
        for _ in range(classes):
            n = struct.unpack_from("<I", b, off + 20)[0]
            entries.append(b[off: off + 24 + n])
            off += 24 + n
        off = (off + 3) // 4 * 4
        payloads.append(b[off: len(b) - 4])
    labels = [struct.unpack_from("<I", e, 0)[0] for e in entries]
    if len(set(labels)) != len(labels):
        raise ValueError(f"repeated labels {labels}")
    body = common[:72] + struct.pack("<I", len(entries)) + common[72:] + b"".join(entries)
    body += b"\0" * ((-(32 + len(body))) % 4) + b"".join(payloads)
    length = 32 + len(body) + 4
    header = b"IRISEMB\0" + struct.pack("<HB", 1, payload_type) + b"\0" * 5
    header += struct.pack("<Q", length) + b"\0" * 4
    header += struct.pack("<I", zlib.crc32(header))
    data = header + body
    Path(out).write_bytes(data + struct.pack("<I", zlib.crc32(data)))


# --- intermediate volumes (MASS's own functions) -----------------------------------------


def mass_preprocessed_query(inference, query):
    """The query as MASS prepares it before normalisation: (original, full 1.5 mm grid,
    body-cropped grid, body bbox zyx), all SimpleITK images."""
    original = inference.read_nifti(query)
    oriented = inference.reorient_image(original, "RAS")
    resampled = inference.resample_to_spacing(oriented, [1.5] * 3, sitk.sitkLinear,
                                              default_value=0.0, pixel_id=sitk.sitkFloat32)
    cropped, bbox = inference.maybe_crop_body(resampled, modality="auto", method="threshold",
                                              margin_zyx=[16, 32, 32], ct_body_threshold=-500.0)
    return original, resampled, cropped, bbox


def normalisation_effect(inference, resampled, cropped, bbox):
    """How the body crop changes the query's normalisation: the statistics MASS uses (over
    the crop) against those iris uses (the whole resampled volume), and the largest
    difference of the normalised intensities on the crop."""
    full = inference.image_to_array(resampled)
    crop = inference.image_to_array(cropped)

    def stats(a):
        p2, p98 = np.percentile(a, [2, 98])
        c = np.clip(a, p2, p98)
        return {"voxels": int(a.size), "p2": float(p2), "p98": float(p98),
                "mean": float(c.mean()), "std": float(c.std())}

    norm_full = inference.normalize_image(full, "auto", (-991.0, 500.0))
    norm_crop = inference.normalize_image(crop, "auto", (-991.0, 500.0))
    if bbox is not None:
        z0, z1, y0, y1, x0, x1 = bbox
        norm_full = norm_full[z0:z1, y0:y1, x0:x1]
    return {
        "full_shape_zyx": list(full.shape), "crop_shape_zyx": list(crop.shape),
        "body_bbox_zyx": list(bbox) if bbox is not None else None,
        "mass_crop": stats(crop), "iris_full": stats(full),
        "normalised_max_abs_diff": float(np.abs(norm_full - norm_crop).max()),
        "normalised_mean_abs_diff": float(np.abs(norm_full - norm_crop).mean()),
    }


def python_round(x):
    return int(round(x))  # half to even, as both pipelines


def mass_resampled_reference(inference, ref_image, ref_labels):
    """The reference as MASS resamples it: RAS, 1.5 mm, linear image and nearest labels
    (SimpleITK), before the crop. Returns (image, labels) SimpleITK images."""
    image = inference.resample_to_spacing(inference.reorient_image(inference.read_nifti(ref_image), "RAS"),
                                          [1.5] * 3, sitk.sitkLinear, 0.0, sitk.sitkFloat32)
    labels = inference.resample_to_reference(inference.reorient_image(inference.read_nifti(ref_labels), "RAS"),
                                             image, sitk.sitkNearestNeighbor, 0.0, sitk.sitkUInt16)
    return image, labels


def reference_crops(inference, labels, classes, window):
    """Per class: MASS's crop centre (its own bounding box) against iris's (the bounding
    box of all classes), in 1.5 mm voxels zyx, and the share of the label inside each;
    `labels` is MASS's resampled reference label map."""
    lab = inference.image_to_array(labels, dtype=np.int32)

    def centre(mask):
        idx = np.where(mask)
        return [python_round((int(a.min()) + int(a.max())) / 2.0) for a in idx]

    def inside(mask, c):
        lo = [c[a] - window[a] // 2 for a in range(3)]
        idx = np.where(mask)
        ok = np.ones(idx[0].shape, bool)
        for a in range(3):
            ok &= (idx[a] >= lo[a]) & (idx[a] < lo[a] + window[a])
        return float(ok.mean())

    union = centre(np.isin(lab, classes))
    rows = {}
    for c in classes:
        m = lab == c
        own = centre(m)
        rows[c] = {"mass_centre": own, "iris_centre": union,
                   "offset_mm": [1.5 * (u - o) for u, o in zip(union, own)],
                   "inside_mass_crop": inside(m, own), "inside_iris_crop": inside(m, union)}
    return rows


def label_resampling_ties(inference, ref_labels, labels, classes):
    """Reference label voxels where SimpleITK's nearest neighbour differs from exact
    round-half-up (iris's `resample_labels`, iris-core/src/preprocess/resample.rs). From
    1 mm to 1.5 mm every other target voxel lies exactly halfway between two source voxels;
    SimpleITK's resampler steps along each row by adding an increment, so a few of those
    ties land a rounding error below one half. Only for grids that keep their axes and
    origin (true after RAS orientation and `resample_to_spacing`)."""
    source = inference.reorient_image(inference.read_nifti(ref_labels), "RAS")
    if not (np.allclose(source.GetDirection(), labels.GetDirection())
            and np.allclose(source.GetOrigin(), labels.GetOrigin())):
        return None
    src = inference.image_to_array(source, dtype=np.int32)
    got = inference.image_to_array(labels, dtype=np.int32)
    ratio = [labels.GetSpacing()[2 - a] / source.GetSpacing()[2 - a] for a in range(3)]  # zyx
    index = [np.floor(np.arange(got.shape[a]) * ratio[a] + 0.5).astype(int) for a in range(3)]
    inside = [i < src.shape[a] for a, i in enumerate(index)]
    exact = np.zeros_like(got)
    exact[np.ix_(*inside)] = src[np.ix_(*[i[k] for i, k in zip(index, inside)])]
    differ = exact != got
    columns = sorted({int(v) for v in np.argwhere(differ)[:, 2]})
    return {"voxels_differing": int(differ.sum()), "x_columns": columns,
            "per_class": {c: int(((exact == c) != (got == c)).sum()) for c in classes}}


def iris_window_starts(size, window, overlap):
    """iris's window starts along one axis (iris-core/src/window/plan.rs: nnU-Net's even
    spreading, starts rounded half to even; a volume smaller than the window is padded)."""
    if size <= window:
        return [0]
    max_start = size - window
    steps = max(1, int(np.ceil(max_start / (window * (1 - overlap)) - 1e-6)))
    count = min(steps, max_start) + 1
    actual = max_start / (count - 1)
    return [int(np.rint(actual * i)) for i in range(count)]


def iris_window_boxes(shape, window, overlap):
    """iris's windows as MASS's boxes `(z0, z1, y0, y1, x0, x1)`, z-major."""
    starts = [iris_window_starts(shape[a], window[a], overlap) for a in range(3)]
    return [(z, z + window[0], y, y + window[1], x, x + window[2])
            for z in starts[0] for y in starts[1] for x in starts[2]]


def excluded_region(inference, grid, original, boxes, window, path):
    """Where MASS's output is not its blended probability, written to `path` (1 = left out
    of the `..._inside` columns) on the query's grid: (1) the weight floor: MASS divides
    the summed probabilities by `torch.clamp(weight, min=1e-8)`, so where the summed
    Gaussian weight is below 1e-8 (the volume's corners, reached only by the tails of the
    Gaussians) its probability is the window's times weight / 1e-8, i.e. nearly 0, while
    iris divides by the true sum; grown by one voxel, as linear resampling reaches one
    voxel further; (2) query voxels beyond MASS's grid (more than half a voxel past its
    last voxel, or outside the body crop), which SimpleITK sets to 0 where iris takes the
    nearest edge value. Returns the voxels of (1) on MASS's grid."""
    shape = inference.image_to_array(grid).shape
    gaussian = inference.create_gaussian_window(window).numpy()[0, 0]
    weight = np.zeros(shape, np.float32)
    for z0, z1, y0, y1, x0, x1 in boxes:
        weight[z0:z1, y0:y1, x0:x1] += gaussian
    low = weight < 1e-8
    grown = ndimage.binary_dilation(low, structure=np.ones((3, 3, 3), bool))
    floor = inference.array_to_image(grown.astype(np.float32), grid, pixel_id=sitk.sitkFloat32)
    floor = inference.resample_to_reference(floor, original, sitk.sitkNearestNeighbor, 0.0, sitk.sitkFloat32)
    ones = inference.array_to_image(np.ones(shape, np.float32), grid, pixel_id=sitk.sitkFloat32)
    inside = inference.resample_to_reference(ones, original, sitk.sitkLinear, 0.0, sitk.sitkFloat32)
    excluded = sitk.Cast((floor > 0) | (inside <= 0), sitk.sitkUInt8)
    sitk.WriteImage(excluded, str(path))
    return int(low.sum())


def window_plans(inference, shape, window, overlap):
    """Window starts per axis (zyx) of both pipelines on a grid of `shape`."""
    boxes = inference.get_sliding_window_coords(shape, window, overlap)
    mass = [sorted({b[2 * a] for b in boxes}) for a in range(3)]
    iris = [iris_window_starts(shape[a], window[a], overlap) for a in range(3)]
    return {"shape_zyx": list(shape), "mass": mass, "iris": iris,
            "mass_windows": len(boxes), "iris_windows": int(np.prod([len(s) for s in iris]))}


def gaussian_difference(inference, window):
    """Largest difference between MASS's Gaussian weights and iris's rule
    (iris-core/src/window/weights.rs: sigma 0.125 n, centre (n-1)/2, peak 1)."""
    mass = inference.create_gaussian_window(window).numpy()[0, 0]
    profiles = []
    for n in window:
        x = (np.arange(n) - (n - 1) / 2) / (0.125 * n)
        raw = np.exp(-0.5 * x * x)
        profiles.append((raw / raw[n // 2]).astype(np.float32))
    iris = profiles[0][:, None, None] * profiles[1][None, :, None] * profiles[2][None, None, :]
    return float(np.abs(mass - iris).max())


# --- variant C: iris on MASS's query grid, MASS's post-processing ------------------------


def largest_components(label_map, connectivity):
    """The largest `connectivity`-connected (6 or 26) component of every label."""
    structure = ndimage.generate_binary_structure(3, 1 if connectivity == 6 else 3)
    out = np.zeros_like(label_map)
    for label in np.unique(label_map):
        if label == 0:
            continue
        lab, n = ndimage.label(label_map == label, structure=structure)
        if n == 0:
            continue
        sizes = np.bincount(lab.ravel())
        sizes[0] = 0
        out[lab == int(np.argmax(sizes))] = label
    return out


def postprocess_like_mass(inference, raw_seg, raw_probs, cropped, original, classes, out, connectivity):
    """iris's un-post-processed output on MASS's grid, taken through MASS's post-processing:
    largest component per label, nearest-neighbour (labels) and linear (probabilities)
    resampling to the query's grid with MASS's own function."""
    labels = sitk.GetArrayFromImage(sitk.ReadImage(str(raw_seg))).astype(np.uint16)
    if labels.shape != inference.image_to_array(cropped).shape:
        raise ValueError(f"iris wrote {labels.shape}, MASS's grid is {cropped.GetSize()[::-1]}")
    labels = largest_components(labels, connectivity)
    probs = {c: sitk.GetArrayFromImage(sitk.ReadImage(str(raw_probs[c]))).astype(np.float32)
             for c in classes}
    seg = out / f"seg-lcc{connectivity}.nii.gz"
    inference.save_label_map_in_original_space(labels, cropped, original, seg, probs)
    stem = f"seg-lcc{connectivity}"
    return seg, {c: out / f"{stem}_label{c}_prob.nii.gz" for c in classes}


def connectivity_effect(raw_seg):
    """Voxels whose label depends on the connectivity of the largest-component step."""
    labels = sitk.GetArrayFromImage(sitk.ReadImage(str(raw_seg))).astype(np.uint16)
    six, all26 = largest_components(labels, 6), largest_components(labels, 26)
    return {"foreground_voxels": int((labels > 0).sum()),
            "kept_6": int((six > 0).sum()), "kept_26": int((all26 > 0).sum()),
            "voxels_differing": int((six != all26).sum())}


def window_arithmetic(args, inference, checkpoint, grid_query, task, classes, window, overlap, out, count):
    """The network alone, window by window: `count` windows of iris's plan on MASS's query
    grid (evenly spread over the plan), each written as a volume of one window and
    segmented by iris (`--modality ct`, whose HU clip is a no-op on these intensities, so
    the window is only z-scored), against MASS's `Iris` on the same window z-scored the
    same way, with the same reference (tokens from `task`'s reference, resampled by
    SimpleITK). Returns per window its start and the largest |dp| over the classes."""
    image = sitk.ReadImage(str(grid_query))
    array = inference.image_to_array(image)
    if array.min() < -991.0 or array.max() > 500.0:
        return None  # the CT clip would not be a no-op
    model, _ = inference.load_model(checkpoint, torch.device("cpu"), use_ema=True)
    ref_dir = out.parent / "iris-D"
    priors = inference.encode_reference_embeddings_by_label(
        model, [ref_dir / "ref-image-mass-grid.nii.gz"], [ref_dir / "ref-labels-mass-grid.nii.gz"],
        torch.device("cpu"), "RAS", [1.5] * 3, sitk.sitkLinear, "auto", classes, window,
        (-991.0, 500.0), False, torch.float16)
    prior = inference.concat_encoded_priors(priors, classes)
    boxes = iris_window_boxes(array.shape, window, overlap)
    # A constant window (all air) z-scores to all zeros; there the first instance norm sees
    # zero variance and the reference itself is ill-conditioned (noise of 1e-9 on its input
    # moves its probabilities by up to 0.99), so such windows are left out. In the pipeline
    # they do not occur: a constant window of a normalised volume is not 0, and the convs'
    # zero padding gives its border a variance.
    varied = [i for i, (z0, z1, y0, y1, x0, x1) in enumerate(boxes)
              if array[z0:z1, y0:y1, x0:x1].std() > 1e-6]
    picks = sorted({varied[int(round(i))] for i in np.linspace(0, len(varied) - 1, count)})
    out.mkdir(parents=True, exist_ok=True)
    rows = []
    for i in picks:
        z0, z1, y0, y1, x0, x1 = boxes[i]
        raw = array[z0:z1, y0:y1, x0:x1].astype(np.float64)
        x = ((raw - raw.mean()) / raw.std()).astype(np.float32)
        with torch.no_grad():
            p = torch.sigmoid(model.forward_with_encoded_prior(torch.from_numpy(x)[None, None], prior))[0].numpy()
        sitk.WriteImage(image[x0:x1, y0:y1, z0:z1], str(out / "window.nii.gz"))
        run([args.iris, "--quiet", "segment", "--model", args.iris_model, "--image", out / "window.nii.gz",
             "--task", task, "--modality", "ct", "--no-largest-component",
             "--out", out / "seg.nii.gz", "--probabilities", out / "p.nii.gz"])
        paths = iris_probability_paths(out / "p.nii.gz", classes)
        worst = max(float(np.abs(sitk.GetArrayFromImage(sitk.ReadImage(str(paths[c]))) - p[k]).max())
                    for k, c in enumerate(classes))
        rows.append({"index": i, "start_zyx": [z0, y0, x0], "window_std": float(raw.std()),
                     "prob_max_abs": worst, "constant_windows_left_out": len(boxes) - len(varied)})
    return rows


# --- comparison -------------------------------------------------------------------------


def load_on_grid(path, like=None):
    """Voxels of a NIfTI file (nibabel, the query's grid); checks the grid against `like`."""
    img = nib.load(str(path))
    if like is not None and (img.shape != like.shape or not np.allclose(img.affine, like.affine, atol=1e-4)):
        raise ValueError(f"{path} is not on the query's grid")
    return img


def compare(mass_seg, mass_probs, seg, probs, classes, query_img, excluded):
    """Agreement of two label maps and differences of their probability maps, per class;
    `..._inside` leaves out the voxels of the mask file `excluded` (`excluded_region`)."""
    a = np.asarray(load_on_grid(mass_seg, query_img).dataobj).astype(np.int32)
    b = np.asarray(load_on_grid(seg, query_img).dataobj).astype(np.int32)
    inside = np.asarray(load_on_grid(excluded, query_img).dataobj) == 0
    either = (a > 0) | (b > 0)
    row = {"agreement": float((a == b).mean()),
           "agreement_foreground": float((a == b)[either].mean()) if either.any() else 1.0,
           "agreement_inside": float((a == b)[inside].mean()),
           "classes": {}}
    for c in classes:
        ma, mb = a == c, b == c
        denom = int(ma.sum() + mb.sum())
        pa = np.asarray(load_on_grid(mass_probs[c], query_img).dataobj, dtype=np.float32)
        pb = np.asarray(load_on_grid(probs[c], query_img).dataobj, dtype=np.float32)
        diff = np.abs(pa - pb)
        row["classes"][c] = {
            "dice": 2.0 * float((ma & mb).sum()) / denom if denom else 1.0,
            "voxels_mass": int(ma.sum()), "voxels_iris": int(mb.sum()),
            "prob_max_abs": float(diff.max()), "prob_mean_abs": float(diff.mean()),
            "prob_max_abs_inside": float(diff[inside].max()),
            "prob_mean_abs_inside": float(diff[inside].mean()),
        }
    return row


def print_tables(results, classes, against):
    names = list(results)
    print(f"\n== Label maps and probabilities against {against} (query grid)")
    print("('in': inside MASS's grid, without the corners where it divides by its weight floor)")
    print(f"{'variant':<8} {'agree':>9} {'agree in':>9} {'agree fg':>9} {'Dice mean':>9} {'Dice min':>9} "
          f"{'|dp| max':>9} {'|dp|max in':>10} {'|dp|mean in':>11}")
    for n in names:
        r = results[n]
        dice = [r["classes"][c]["dice"] for c in classes]
        pmax = max(r["classes"][c]["prob_max_abs"] for c in classes)
        pmax_in = max(r["classes"][c]["prob_max_abs_inside"] for c in classes)
        pmean_in = np.mean([r["classes"][c]["prob_mean_abs_inside"] for c in classes])
        print(f"{n:<8} {r['agreement']:>9.5f} {r['agreement_inside']:>9.5f} {r['agreement_foreground']:>9.4f} "
              f"{np.mean(dice):>9.4f} {min(dice):>9.4f} {pmax:>9.4f} {pmax_in:>10.2e} {pmean_in:>11.2e}")
    print(f"\n== Per class: Dice against {against} (and |dp| max in)")
    print(f"{'class':>6} {'MASS vox':>9} " + " ".join(f"{n:>16}" for n in names))
    for c in classes:
        cells = [f"{results[n]['classes'][c]['dice']:.4f} ({results[n]['classes'][c]['prob_max_abs_inside']:.1e})"
                 for n in names]
        print(f"{c:>6} {results[names[0]]['classes'][c]['voxels_mass']:>9} " + " ".join(f"{x:>16}" for x in cells))


def print_intermediates(inter):
    n = inter["normalisation"]
    print("\n== Query normalisation: MASS over the body crop, iris over the whole volume")
    print(f"grid {n['full_shape_zyx']} zyx, body crop {n['body_bbox_zyx']} -> {n['crop_shape_zyx']}")
    for k in ("mass_crop", "iris_full"):
        s = n[k]
        print(f"  {k:<10} voxels {s['voxels']:>8}  p2 {s['p2']:8.3f}  p98 {s['p98']:8.3f}  "
              f"mean {s['mean']:8.3f}  std {s['std']:8.3f}")
    print(f"  normalised intensities on the crop: max |diff| {n['normalised_max_abs_diff']:.4f}, "
          f"mean {n['normalised_mean_abs_diff']:.4f}")
    print("\n== Reference crops (1.5 mm voxels zyx): MASS per class, iris one crop for all classes")
    for c, r in inter["reference_crops"].items():
        print(f"  {c:>4}: MASS centre {r['mass_centre']}, iris {r['iris_centre']}, offset "
              f"{[round(v, 1) for v in r['offset_mm']]} mm; label inside crop: MASS "
              f"{r['inside_mass_crop']:.2f}, iris {r['inside_iris_crop']:.2f}")
    t = inter["label_ties"]
    if t is not None:
        print(f"\n== Reference labels at 1.5 mm, SimpleITK nearest vs exact round-half-up (iris): "
              f"{t['voxels_differing']} voxels differ (x columns {t['x_columns']}); per class "
              f"{ {c: v for c, v in t['per_class'].items() if v} }")
    for key, title in (("windows_mass_grid", "MASS's body-cropped grid (variant C)"),
                       ("windows_iris_grid", "iris's grid (variants A, B)")):
        w = inter[key]
        print(f"\n== Window starts on {title}, {w['shape_zyx']} zyx")
        print(f"  MASS ({w['mass_windows']} windows): {w['mass']}")
        print(f"  iris ({w['iris_windows']} windows): {w['iris']}")
    print(f"\n== Gaussian weights: max |MASS - iris| = {inter['gaussian_max_abs_diff']:.2e}")
    w = inter["window_arithmetic"]
    if w:
        print("\n== The network alone: one window, the same input on both sides (largest |dp| over classes; "
              f"{w[0]['constant_windows_left_out']} constant windows left out)")
        for r in w:
            print(f"  window {r['index']:>3} at {r['start_zyx']} zyx, raw std {r['window_std']:6.1f}: "
                  f"{r['prob_max_abs']:.1e}")
    f = inter["weight_floor_voxels"]
    print("\n== MASS's weight floor (summed Gaussian weight < 1e-8, probabilities scaled down): "
          + ", ".join(f"{k} {v['voxels']} of {v['grid_voxels']} voxels" for k, v in f.items()))
    k = inter["connectivity"]
    print(f"\n== Largest component, 6- (MASS) vs 26-connected (iris), on iris's raw map of variant C: "
          f"{k['voxels_differing']} of {k['foreground_voxels']} foreground voxels differ")


def print_differences(inter, results):
    """One line per step that differs, with its measured effect."""
    def summary(ref, name):
        r = results[ref][name]
        cls = r["classes"].values()
        return (f"agreement {r['agreement']:.5f} (in {r['agreement_inside']:.5f}), |dp| max "
                f"{max(c['prob_max_abs'] for c in cls):.2e} (in "
                f"{max(c['prob_max_abs_inside'] for c in cls):.2e}), |dp| mean in "
                f"{np.mean([c['prob_mean_abs_inside'] for c in cls]):.2e}")

    n, t, k = inter["normalisation"], inter["label_ties"], inter["connectivity"]
    print("\n== What differs, and what it does here")
    print(f"window starts (MASS step from 0, iris nnU-Net spread): M vs Mw: {summary('M', 'Mw')}")
    print(f"body crop of the query (MASS only; z-score stats and grid change): Mw vs Mwn: "
          f"{summary('Mw', 'Mwn')}; normalised intensities differ by up to "
          f"{n['normalised_max_abs_diff']:.3f}")
    print(f"reference crop (MASS per class, iris the union): Mwn vs A: {summary('Mwn', 'A')}; "
          f"vs B: {summary('Mwn', 'B')}")
    if t is not None:
        print(f"reference label ties at 1.5 mm ({t['voxels_differing']} voxels): Mw vs C: "
              f"{summary('Mw', 'C')}; vs D: {summary('Mw', 'D')}")
    print(f"largest component 6- vs 26-connected ({k['voxels_differing']} voxels): Mw vs C26: "
          f"{summary('Mw', 'C26')}")
    print("weight floor and grid edges (MASS 0, iris the blended / edge value): the 'in' columns")
    w = inter["window_arithmetic"]
    if w:
        worst = max(w, key=lambda r: r["prob_max_abs"])
        print(f"the network alone, {len(w)} windows of the plan, same input on both sides: |dp| max "
              f"median {np.median([r['prob_max_abs'] for r in w]):.1e}, largest {worst['prob_max_abs']:.1e} "
              f"(window at {worst['start_zyx']} zyx, raw intensity std {worst['window_std']:.1f})")
    print(f"what is left (the network's arithmetic, tract vs torch, f32): Mw vs D, inside: "
          f"{summary('Mw', 'D')}")


def main():
    if len(sys.argv) > 1 and sys.argv[1] == IRIS_WINDOWS_FLAG:
        inference_with_iris_windows(sys.argv[2:])
        return
    args = parse_args()
    classes = [int(c) for c in args.classes.split(",")]
    args.out.mkdir(parents=True, exist_ok=True)
    versions = check_versions()
    inference = import_mass_inference(args.mass)

    checkpoint, config = checkpoint_for_mass(args.checkpoint, args.out)
    window = [int(v) for v in config.get("evaluation", {}).get("window_size", [128, 128, 128])]
    overlap = float(config.get("evaluation", {}).get("overlap", 0.5))
    manifest = json.loads((args.iris_model / "manifest.json").read_text())
    print(f"checkpoint window {window} zyx, overlap {overlap}; iris manifest patch "
          f"{manifest.get('patch_size')} at {manifest.get('spacing_mm')} mm")

    timings, outputs = {}, {}
    refs = {
        "M": ("MASS inference.py as released", {}),
        "Mw": ("MASS with iris's window starts", {"iris_windows": True}),
        "Mwn": ("MASS with iris's window starts, no body crop",
                {"iris_windows": True, "body_crop": False}),
    }
    for name, (_, options) in refs.items():
        seg, probs, timings[name] = run_mass_inference(
            args, checkpoint, window, overlap, classes, args.out / f"mass-{name}", **options)
        outputs[name] = (seg, probs)

    class_arg = ",".join(map(str, classes))
    seg, probs, timings["A"] = run_iris_segment(
        args, args.query, classes, args.out / "iris-A",
        ["--ref-image", args.ref_image, "--ref-label", args.ref_labels, "--classes", class_arg])
    outputs["A"] = (seg, probs)

    task = iris_task_per_class(args, classes, args.out / "iris-B")
    seg, probs, timings["B"] = run_iris_segment(
        args, args.query, classes, args.out / "iris-B", ["--task", task])
    outputs["B"] = (seg, probs)

    original, resampled, cropped, bbox = mass_preprocessed_query(inference, args.query)
    c_dir = args.out / "iris-C"
    c_dir.mkdir(parents=True, exist_ok=True)
    mass_grid_query = c_dir / "query-mass-grid.nii.gz"
    sitk.WriteImage(cropped, str(mass_grid_query))
    raw_seg, raw_probs, timings["C"] = run_iris_segment(
        args, mass_grid_query, classes, c_dir, ["--task", task], extra=["--no-largest-component"])
    outputs["C"] = postprocess_like_mass(inference, raw_seg, raw_probs, cropped, original, classes, c_dir, 6)
    outputs["C26"] = postprocess_like_mass(inference, raw_seg, raw_probs, cropped, original, classes, c_dir, 26)

    ref_image15, ref_labels15 = mass_resampled_reference(inference, args.ref_image, args.ref_labels)
    d_dir = args.out / "iris-D"
    d_dir.mkdir(parents=True, exist_ok=True)
    sitk.WriteImage(ref_image15, str(d_dir / "ref-image-mass-grid.nii.gz"))
    sitk.WriteImage(ref_labels15, str(d_dir / "ref-labels-mass-grid.nii.gz"))
    task_d = iris_task_per_class(args, classes, d_dir, d_dir / "ref-image-mass-grid.nii.gz",
                                 d_dir / "ref-labels-mass-grid.nii.gz")
    raw_seg_d, raw_probs_d, timings["D"] = run_iris_segment(
        args, mass_grid_query, classes, d_dir, ["--task", task_d], extra=["--no-largest-component"])
    outputs["D"] = postprocess_like_mass(inference, raw_seg_d, raw_probs_d, cropped, original, classes, d_dir, 6)

    # Where each MASS run divides by its weight floor, on the grid it ran on.
    grids = {"M": (cropped, inference.get_sliding_window_coords),
             "Mw": (cropped, iris_window_boxes), "Mwn": (resampled, iris_window_boxes)}
    floors, floor_voxels = {}, {}
    for name, (grid, plan) in grids.items():
        floors[name] = args.out / f"mass-{name}" / "excluded.nii.gz"
        shape = inference.image_to_array(grid).shape
        floor_voxels[name] = {"voxels": excluded_region(inference, grid, original,
                                                            plan(shape, window, overlap), window,
                                                            floors[name]),
                              "grid_voxels": int(np.prod(shape))}

    query_img = nib.load(str(args.query))
    against = {"M": ["A", "B", "C", "C26", "D", "Mw", "Mwn"], "Mwn": ["A", "B"],
               "Mw": ["C", "C26", "D", "Mwn"]}
    results = {}
    for ref, names in against.items():
        mass_seg, mass_probs = outputs[ref]
        results[ref] = {n: compare(mass_seg, mass_probs, *outputs[n], classes, query_img, floors[ref])
                        for n in names}

    inter = {
        "normalisation": normalisation_effect(inference, resampled, cropped, bbox),
        "reference_crops": reference_crops(inference, ref_labels15, classes, window),
        "label_ties": label_resampling_ties(inference, args.ref_labels, ref_labels15, classes),
        "windows_mass_grid": window_plans(inference, inference.image_to_array(cropped).shape, window, overlap),
        "windows_iris_grid": window_plans(inference, inference.image_to_array(resampled).shape, window, overlap),
        "gaussian_max_abs_diff": gaussian_difference(inference, window),
        "connectivity": connectivity_effect(raw_seg),
        "weight_floor_voxels": floor_voxels,
        "window_arithmetic": window_arithmetic(args, inference, checkpoint, mass_grid_query, task_d, classes,
                                               window, overlap, args.out / "windows", args.windows),
    }
    print_intermediates(inter)
    for ref, rows in results.items():
        print_tables(rows, classes, f"{ref}, {refs[ref][0]}")
    print_differences(inter, results)
    print("\nseconds: " + ", ".join(f"{k} {v:.0f}" if v is not None else f"{k} (reused)"
                                    for k, v in timings.items()))

    summary = {
        "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
        "machine": f"{platform.machine()}, {os.cpu_count()} CPUs, {platform.platform()}",
        "python": platform.python_version(), "versions": versions, "mass_commit": MASS_COMMIT,
        "torch_threads": torch.get_num_threads(),
        "checkpoint": str(args.checkpoint), "iris_model": str(args.iris_model),
        "query": str(args.query), "reference": [str(args.ref_image), str(args.ref_labels)],
        "classes": classes, "window_zyx": window, "overlap": overlap,
        "seconds": timings, "intermediates": inter,
        "results": {f"against {ref}: {refs[ref][0]}": rows for ref, rows in results.items()},
    }
    (args.out / "summary.json").write_text(json.dumps(summary, indent=1, default=str))
    print(f"wrote {args.out / 'summary.json'}")


if __name__ == "__main__":
    main()
