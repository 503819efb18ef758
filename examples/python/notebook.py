# %% [markdown]
# # iris from Python: one reference, one query, Dice
#
# A notebook as a plain script (cells marked `# %%`; VS Code, Jupytext and
# Spyder run them one by one; `python examples/python/notebook.py` runs all).
# It encodes four deep-brain structures from one reference brain (Colin27
# with the AAL atlas), segments them in another brain (MNI152) the model
# never saw them in, scores the prediction against the approximate truth
# and draws it: `docs/python-notebook.png`.
#
# Needs: the `iris-seg` package (`pip install ./iris-py`), nibabel,
# matplotlib, and `data/` (`scripts/fetch-data.sh`). The truth is the one
# `scripts/run.sh` writes (AAL3 on MNI152 mapped to AAL by name); this
# script makes it with `iris-eval truth` when it is missing.

# %%
import os
import subprocess
from pathlib import Path

import matplotlib

matplotlib.use("Agg")  # write the picture; no window needed
import matplotlib.pyplot as plt
import nibabel as nib
import numpy as np

import iris

ROOT = Path(__file__).resolve().parents[2]
MODEL = ROOT / "models" / "iris-tiny"
REFERENCE = ROOT / "data" / "mricron" / "ch2.nii.gz"         # Colin27 T1
REFERENCE_LABELS = ROOT / "data" / "mricron" / "aal.nii.gz"  # AAL atlas on Colin27
QUERY = ROOT / "data" / "mni152" / "mni_icbm152_t1_tal_nlin_sym_09a_converted.nii.gz"
TRUTH = ROOT / "data" / "out" / "mni152_truth.nii.gz"
PICTURE = ROOT / "docs" / "python-notebook.png"
CLASSES = {71: "Caudate_L", 72: "Caudate_R", 77: "Thalamus_L", 78: "Thalamus_R"}

# %% [markdown]
# ## The reference: an image and its label map
# nibabel images go straight in; their affines come with them.

# %%
model = iris.Model(MODEL)
reference = nib.load(str(REFERENCE))
reference_labels = nib.load(str(REFERENCE_LABELS))
print(model)
print("reference", reference.shape, "voxels of", reference.header.get_zooms(), "mm")

# %% [markdown]
# ## Encode: one task embedding per class (a few kB), reusable as `.irisemb`

# %%
task = model.encode(reference, reference_labels, list(CLASSES), list(CLASSES.values()))
print(task, f"{len(task.to_bytes())} bytes")

# %% [markdown]
# ## Segment the query (the GIL is released while the engine runs)

# %%
query = nib.load(str(QUERY))
seg = model.segment(query, task, probabilities=True)
print("labels", seg.labels.shape, seg.labels.dtype, "in", seg.windows, "windows")

# %% [markdown]
# ## Dice against the approximate truth

# %%
if not TRUTH.exists():
    target = Path(os.environ.get("CARGO_TARGET_DIR", ROOT / "target"))
    for profile in ("release", "debug"):
        tool = target / profile / "iris-eval"
        if tool.exists():
            TRUTH.parent.mkdir(parents=True, exist_ok=True)
            subprocess.run([str(tool), "truth", "--task", "aal-colin27-to-mni152",
                            "--out", str(TRUTH)], check=True, cwd=ROOT)
            break
    else:
        raise SystemExit(f"{TRUTH} is missing: run scripts/run.sh first")
truth = nib.load(str(TRUTH))
scores = iris.dice(seg, truth, classes=list(CLASSES))
for label, score in scores.items():
    print(f"{CLASSES[label]:>11}  Dice {score:.3f}")
mean = float(np.mean([s for s in scores.values() if s is not None]))
print(f"       mean  Dice {mean:.3f}")

# %% [markdown]
# ## The picture: reference and mask, query and prediction, prediction vs truth
# Axial slices through the centre of the structures; superior view, the
# subject's left on the image's right (radiological convention).


# %%
def axial(volume: np.ndarray, k: int) -> np.ndarray:
    # [i, j, k] in RAS: rows = j (anterior up), columns = i (flipped: left on the right).
    return np.flipud(volume[:, :, k].T)[:, ::-1]


def centre_slice(labels: np.ndarray) -> int:
    return int(np.round(np.argwhere(np.isin(labels, list(CLASSES)))[:, 2].mean()))


ref_image, ref_labels = reference.get_fdata(), np.asanyarray(reference_labels.dataobj)
query_image, truth_labels = query.get_fdata(), np.asanyarray(truth.dataobj)
colours = {71: "#1f77b4", 72: "#17becf", 77: "#d62728", 78: "#ff7f0e"}


def overlay(ax, image, labels, k, title, outline=None):
    ax.imshow(axial(image, k), cmap="gray", vmin=np.percentile(image, 1), vmax=np.percentile(image, 99))
    for label, colour in colours.items():
        mask = axial(labels == label, k)
        if mask.any():
            ax.contourf(mask, levels=[0.5, 1], colors=[colour], alpha=0.45)
        if outline is not None and axial(outline == label, k).any():
            ax.contour(axial(outline == label, k), levels=[0.5], colors=["white"], linewidths=0.8)
    ax.set_title(title, fontsize=9)
    ax.axis("off")


k_ref, k_query = centre_slice(ref_labels), centre_slice(truth_labels)
fig, axes = plt.subplots(1, 3, figsize=(9, 3.4), dpi=80)
overlay(axes[0], ref_image, ref_labels, k_ref, "reference: Colin27 + AAL mask")
overlay(axes[1], query_image, seg.labels, k_query, "query: MNI152, iris prediction")
overlay(axes[2], query_image, seg.labels, k_query, "prediction (colour) vs truth (white)",
        outline=truth_labels)
names = ", ".join(f"{CLASSES[l].replace('_', ' ')} {s:.2f}" for l, s in scores.items())
fig.suptitle(f"iris-tiny, one reference, no training on these structures. Dice: {names}",
             fontsize=9)
fig.tight_layout()
fig.savefig(PICTURE)
print("wrote", PICTURE)
