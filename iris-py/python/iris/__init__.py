"""iris: in-context 3-D medical image segmentation (the Iris method) from Python.

The Rust SDK iris, on numpy arrays and nibabel images. Show the model one
reference image with a label map; it distils each class into a task embedding
(:class:`Task`, saved as ``.irisemb``) that segments the same structure in any
number of new volumes::

    import iris, nibabel as nib

    model = iris.Model("models/iris-tiny")
    task = model.encode(nib.load("ref.nii.gz"), nib.load("ref_labels.nii.gz"),
                        classes=[37, 38], names=["hippocampus_l", "hippocampus_r"])
    task.save("hippocampus.irisemb")
    seg = model.segment(nib.load("query.nii.gz"), task)
    seg.to_nifti().to_filename("seg.nii.gz")           # or seg.save("seg.nii.gz")
    print(iris.dice(seg, nib.load("truth.nii.gz")))    # {37: Dice, 38: Dice}

**Volumes.** Wherever a volume is expected, pass a nibabel image (its
affine comes with it), a ``(array, affine)`` pair, or a 3-D array and an
``affine=`` keyword (identity, 1 mm voxels, when omitted). Arrays are in
nibabel's axis order ``array[i, j, k]`` and the 4x4 affine maps ``(i, j, k)``
to RAS+ millimetres, as in a NIfTI file; images may have any numeric dtype
(converted to ``float32``), label maps any integer dtype, or integral floats,
from 0 to 65535. Results come back in the same order, on the query's grid.

**Threads.** Every call into the engine releases the GIL: one :class:`Model`
may be used from several Python threads at once. Ctrl-C interrupts a running
segmentation.

**Errors.** Every failure raises a subclass of :class:`IrisError` named after
the kind of ``iris_core::Error`` (see :mod:`iris._errors`), with the message
the ``iris`` command prints.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from typing import Any, Callable, Dict, Iterable, List, Optional, Sequence, Tuple, Union

import numpy as np

from . import _errors
from ._errors import (
    CancelledError,
    EmptyMaskError,
    FormatError,
    InvalidArgumentError,
    IoError,
    IrisError,
    ModelError,
    ModelMismatchError,
    NiftiError,
    NonFiniteError,
    ShapeMismatchError,
    TooLargeError,
)
from . import _native
from ._native import PoolReference, Task

__version__: str = _native.__version__

__all__ = [
    "Model",
    "Task",
    "PoolReference",
    "Segmentation",
    "Retrieval",
    "ClassChoice",
    "load_task",
    "inspect",
    "ensemble",
    "dice",
    "load_image",
    "load_labels",
    "save_image",
    "save_labels",
]
# The exception classes, as `_errors` lists them.
__all__ += _errors.__all__

PathLike = Union[str, "os.PathLike[str]"]
#: A volume: a nibabel image, an ``(array, affine)`` pair, or an array
#: (with ``affine=`` given separately, identity when omitted).
VolumeLike = Any
#: ``None``/"auto" (detect CT or MR), "ct", "mr", or a dict as
#: :func:`inspect` shows it: ``{"policy": "ct", "min_hu": .., "max_hu": ..}``
#: or ``{"policy": "percentile", "low": .., "high": ..}``.
Intensity = Union[None, str, Dict[str, Any]]

_IDENTITY = np.eye(4)


# ------------------------------------------------------------------ volumes


def _invalid(name: str, reason: str) -> InvalidArgumentError:
    # Same text as iris_core::Error::InvalidArgument.
    return InvalidArgumentError(f"invalid {name}: {reason}", name=name, reason=reason)


def _split(volume: VolumeLike, affine: Any, what: str) -> Tuple[np.ndarray, np.ndarray]:
    """``(array, affine)`` of a nibabel image, a pair or an array, nibabel order."""
    if hasattr(volume, "dataobj") and hasattr(volume, "affine"):
        if affine is not None:
            raise _invalid("affine", f"{what} is a nibabel image: it carries its own affine")
        data = np.asanyarray(volume.dataobj)
        affine = volume.affine
    elif isinstance(volume, tuple) and len(volume) == 2:
        if affine is not None:
            raise _invalid("affine", f"{what} is an (array, affine) pair: give the affine once")
        data, affine = volume
    elif isinstance(volume, Segmentation):
        data, affine = volume.labels, volume.affine
    else:
        data = volume
    try:
        data = np.asanyarray(data)
    except Exception as e:  # an object numpy cannot read
        raise _invalid(what, f"not an array ({e})") from None
    if data.ndim > 3 and all(n == 1 for n in data.shape[3:]):
        data = data.reshape(data.shape[:3])
    if data.ndim != 3:
        raise _invalid(what, f"expected a 3-D volume, found shape {tuple(data.shape)}")
    if affine is None:
        affine = _IDENTITY
    try:
        affine = np.asarray(affine, dtype=np.float64)
    except (TypeError, ValueError) as e:
        raise _invalid("affine", f"not a numeric 4x4 matrix ({e})") from None
    if affine.shape != (4, 4):
        raise _invalid("affine", f"expected a 4x4 matrix, found shape {tuple(affine.shape)}")
    return data, affine


def _to_iris_affine(affine: np.ndarray) -> np.ndarray:
    # nibabel's affine acts on (i, j, k); iris's on [d, h, w] = (k, j, i).
    return np.ascontiguousarray(affine[:, [2, 1, 0, 3]])


def _image(volume: VolumeLike, affine: Any = None, what: str = "image") -> Tuple[np.ndarray, np.ndarray]:
    data, affine = _split(volume, affine, what)
    if not (np.issubdtype(data.dtype, np.number) or data.dtype == np.bool_):
        raise _invalid(what, f"expected numbers, found dtype {data.dtype}")
    if np.iscomplexobj(data):
        raise _invalid(what, "complex voxels are not supported")
    # A transposed view: the core copies it once, in its own order. Arrays
    # whose memory is not aligned (numpy makes them when unpickling) are
    # copied first.
    data = np.require(data, dtype=np.float32, requirements=["A"])
    return data.transpose(2, 1, 0), _to_iris_affine(affine)


def _labels(volume: VolumeLike, affine: Any = None, what: str = "labels") -> Tuple[np.ndarray, np.ndarray]:
    data, affine = _split(volume, affine, what)
    if data.dtype == np.bool_:
        data = data.astype(np.uint16)
    elif np.issubdtype(data.dtype, np.floating):
        bad = ~np.isfinite(data) | (data != np.round(data)) | (data < 0) | (data > 65535)
        if bad.any():
            index = tuple(int(i) for i in np.argwhere(bad)[0])
            raise _invalid(
                what,
                f"voxel {index} is {data[index]!r}, not an integer label in 0..=65535",
            )
    elif np.issubdtype(data.dtype, np.integer):
        if data.size and (data.min() < 0 or data.max() > 65535):
            raise _invalid(
                what,
                f"labels must be in 0..=65535, found {data.min()} to {data.max()}",
            )
    else:
        raise _invalid(what, f"expected integer labels, found dtype {data.dtype}")
    data = np.require(data, dtype=np.uint16, requirements=["A"])
    return data.transpose(2, 1, 0), _to_iris_affine(affine)


def _from_iris(data: np.ndarray) -> np.ndarray:
    return data.transpose(2, 1, 0)


def _intensity(intensity: Intensity) -> Optional[Tuple[str, float, float]]:
    if intensity is None or intensity == "auto":
        return None
    if intensity == "ct":
        return ("ct", -991.0, 500.0)
    if intensity == "mr":
        return ("percentile", 2.0, 98.0)
    if isinstance(intensity, dict):
        policy = intensity.get("policy")
        try:
            if policy == "ct":
                return ("ct", float(intensity["min_hu"]), float(intensity["max_hu"]))
            if policy == "percentile":
                return ("percentile", float(intensity["low"]), float(intensity["high"]))
        except (KeyError, TypeError, ValueError) as e:
            raise _invalid("intensity", f"{intensity!r}: missing or bad field ({e})") from None
    raise _invalid(
        "intensity",
        f'{intensity!r}: expected "auto", "ct", "mr" or a dict with "policy" "ct" or "percentile"',
    )


def _policy_dict(spec: Tuple[str, float, float]) -> Dict[str, Any]:
    kind, a, b = spec
    if kind == "ct":
        return {"policy": "ct", "min_hu": a, "max_hu": b}
    return {"policy": "percentile", "low": a, "high": b}


def load_image(source: Union[PathLike, bytes]) -> Tuple[np.ndarray, np.ndarray]:
    """Reads a NIfTI image (``.nii``, ``.nii.gz``; a path, or a whole file's bytes)
    with iris's own reader, as the ``iris`` command does.

    Returns ``(array, affine)``: ``float32`` voxels in nibabel's ``[i, j, k]``
    order (scaled by ``scl_slope``/``scl_inter``) and the 4x4 affine.
    Raises :class:`IoError` or :class:`NiftiError`.
    """
    if isinstance(source, (bytes, bytearray, memoryview)):
        data, affine = _native.decode_image(bytes(source))
    else:
        data, affine = _native.read_image(os.fspath(source))
    return _from_iris(data), _to_iris_affine(affine)


def load_labels(source: Union[PathLike, bytes]) -> Tuple[np.ndarray, np.ndarray]:
    """Reads a NIfTI label map like :func:`load_image`, as ``uint16`` labels."""
    if isinstance(source, (bytes, bytearray, memoryview)):
        data, affine = _native.decode_labels(bytes(source))
    else:
        data, affine = _native.read_labels(os.fspath(source))
    return _from_iris(data), _to_iris_affine(affine)


def save_image(path: PathLike, image: VolumeLike, affine: Any = None) -> None:
    """Writes an image as ``float32`` NIfTI (``.nii`` or ``.nii.gz``), atomically."""
    data, aff = _image(image, affine)
    _native.write_image(os.fspath(path), data, aff)


def save_labels(path: PathLike, labels: VolumeLike, affine: Any = None) -> None:
    """Writes a label map as NIfTI (``uint8`` when every label fits, else
    ``uint16``; intent "label"), atomically, as ``iris segment --out`` does."""
    data, aff = _labels(labels, affine)
    _native.write_labels(os.fspath(path), data, aff)


# -------------------------------------------------------------------- tasks


def load_task(source: Union[PathLike, bytes]) -> Task:
    """Reads a ``.irisemb`` task embedding (a path, or the file's bytes).

    Raises :class:`IoError` or :class:`FormatError`.
    """
    if isinstance(source, (bytes, bytearray, memoryview)):
        return Task.from_bytes(bytes(source))
    return Task.load(os.fspath(source))


def inspect(task: Union[Task, PathLike]) -> Dict[str, Any]:
    """What a task embedding holds, as ``iris inspect --json`` prints it:
    ``model``, ``preprocessing`` (``spacing_mm``, ``patch``, ``intensity``),
    ``stages`` and ``classes`` (``label``, ``name``, ``provenance``); with a
    path, also ``file``."""
    if isinstance(task, Task):
        return json.loads(task.describe_json())
    description = {"file": os.fspath(task)}
    description.update(json.loads(load_task(task).describe_json()))
    return description


def ensemble(tasks: Iterable[Task]) -> Task:
    """The context ensemble: per class, the mean of the embeddings of two or
    more tasks of the same classes made by one model (``iris ensemble``)."""
    tasks = list(tasks)
    if tasks and not all(isinstance(t, Task) for t in tasks):
        raise _invalid("tasks", "expected iris.Task objects")
    return _native.ensemble(tasks)


# -------------------------------------------------------------------- results


@dataclass
class Segmentation:
    """A segmentation on the query's own grid.

    ``labels``: ``uint16`` ``[i, j, k]`` (each voxel its class's label, 0
    background); ``affine``: the query's; ``classes``: label values in the
    task's order; ``probabilities``: per label, the ``float32`` probability
    map in ``[0, 1]`` (when asked for), else ``None``; ``windows``: sliding
    windows decoded.
    """

    labels: np.ndarray
    affine: np.ndarray
    classes: List[int]
    probabilities: Optional[Dict[int, np.ndarray]] = None
    windows: int = 0

    def save(self, path: PathLike) -> None:
        """Writes the labels as ``iris segment --out`` does."""
        save_labels(path, self.labels, self.affine)

    def to_nifti(self) -> Any:
        """The labels as a ``nibabel.Nifti1Image`` (needs nibabel)."""
        import nibabel

        image = nibabel.Nifti1Image(self.labels, self.affine)
        image.header.set_intent("label")
        return image


@dataclass
class ClassChoice:
    """The pool references retrieval chose for one class: ``(pool index,
    cosine similarity)``, most similar first (similarity NaN: the first pass
    found nothing of the class and every reference with it was averaged)."""

    label: int
    chosen: List[Tuple[int, float]] = field(default_factory=list)


@dataclass
class Retrieval:
    """The result of :meth:`Model.retrieve`: the segmentation, the task it
    used (per class, the mean of the chosen references) and the choices."""

    segmentation: Segmentation
    task: Task
    choices: List[ClassChoice]


def _segmentation(out: Tuple[Any, ...]) -> Segmentation:
    labels, affine, classes, probabilities, windows = out
    maps = None
    if probabilities is not None:
        maps = {int(c): _from_iris(p) for c, p in zip(classes, probabilities)}
    return Segmentation(
        labels=_from_iris(labels),
        affine=_to_iris_affine(affine),
        classes=[int(c) for c in classes],
        probabilities=maps,
        windows=int(windows),
    )


def dice(
    prediction: VolumeLike,
    truth: VolumeLike,
    classes: Optional[Sequence[int]] = None,
    affine: Any = None,
) -> Dict[int, Optional[float]]:
    """Dice per class between two label maps on the same grid (as ``iris eval``).

    ``prediction`` and ``truth``: label maps (a :class:`Segmentation`, a
    nibabel image, a pair or arrays; ``affine`` applies to arrays given
    alone). ``classes``: label values to score, default every non-zero label
    in either map. Returns ``{label: dice}``, ``None`` for a class in neither
    map. Raises :class:`ShapeMismatchError` or :class:`InvalidArgumentError`
    when the grids differ.
    """
    pred, pred_affine = _labels(prediction, affine if _is_bare(prediction) else None, "prediction")
    ref, ref_affine = _labels(truth, affine if _is_bare(truth) else None, "truth")
    if classes is None:
        present = np.union1d(np.unique(pred), np.unique(ref))
        classes = [int(c) for c in present if c != 0]
    classes = [_label(c, "classes") for c in classes]
    scores = _native.dice(pred, pred_affine, ref, ref_affine, classes)
    return dict(zip(classes, scores))


def _is_bare(volume: VolumeLike) -> bool:
    return not (
        (hasattr(volume, "dataobj") and hasattr(volume, "affine"))
        or isinstance(volume, (tuple, Segmentation))
    )


def _label(value: Any, name: str) -> int:
    try:
        label = int(value)
    except (TypeError, ValueError):
        raise _invalid(name, f"{value!r} is not a label value") from None
    if label != value or not 0 <= label <= 65535:
        raise _invalid(name, f"{value!r} is not a label value in 0..=65535")
    return label


# -------------------------------------------------------------------- model


def _options(
    intensity: Intensity,
    overlap: float,
    threshold: float,
    largest_component: bool,
    probabilities: bool,
    classes_per_forward: Optional[int],
    memory_budget: Optional[int],
    max_windows: Optional[int],
    progress: Optional[Callable[[int, int], Any]],
    cancel: Optional[Callable[[], bool]],
) -> "_native.SegmentOptions":
    if not 0.0 <= overlap < 1.0:
        raise _invalid("overlap", f"{overlap} is outside [0, 1)")
    if not 0.0 < threshold <= 1.0:
        raise _invalid("threshold", f"{threshold} is outside (0, 1]")
    if classes_per_forward is not None and classes_per_forward < 1:
        raise _invalid("classes_per_forward", "must be at least 1 class per decoder run")
    for name, value in (("memory_budget", memory_budget), ("max_windows", max_windows)):
        if value is not None and value < 0:
            raise _invalid(name, f"{value} is negative")
    for name, fn in (("progress", progress), ("cancel", cancel)):
        if fn is not None and not callable(fn):
            raise _invalid(name, f"{fn!r} is not callable")
    return _native.SegmentOptions(
        intensity=_intensity(intensity),
        overlap=float(overlap),
        threshold=float(threshold),
        largest_component=bool(largest_component),
        probabilities=bool(probabilities),
        classes_per_forward=classes_per_forward,
        memory_budget=memory_budget,
        max_windows=max_windows,
        progress=progress,
        cancel=cancel,
    )


class Model:
    """An Iris model loaded from a model folder (``manifest.json`` and three
    ONNX graphs, e.g. ``models/iris-tiny``), run by iris's tract engine.

    ``threads`` is the size of the model's own thread pool (0, the default:
    one thread per core). Two models do not share threads, so a process
    that runs several (e.g. one per Dask worker on one machine) should give
    each its share of the cores.

    ``precision`` is the arithmetic of the convolutions: ``"f32"`` (the
    default), or ``"bf16"``, their products in bfloat16 where the CPU has
    AVX-512 BF16 (about 1.3x faster per full-size window, probabilities
    within about 0.04 of f32's); other CPUs run f32, which
    :attr:`precision` then reports.

    Raises :class:`IoError` (no manifest), :class:`ModelError` (a folder
    that breaks the model contract) or :class:`InvalidArgumentError` (an
    unknown precision). Thread-safe; see the module docs.
    """

    def __init__(self, path: PathLike, *, threads: int = 0, precision: str = "f32") -> None:
        self._native = _native.Model(
            os.fspath(path), threads=int(threads), precision=str(precision)
        )

    def __repr__(self) -> str:
        return repr(self._native)

    @property
    def path(self) -> str:
        """The model folder."""
        return os.fspath(self._native.path)

    @property
    def threads(self) -> int:
        """Threads of the model's pool."""
        return self._native.threads

    @property
    def precision(self) -> str:
        """The precision the model runs in: ``"f32"`` or ``"bf16"``."""
        return self._native.precision

    @property
    def fingerprint(self) -> str:
        """The fingerprint of the model's weights (64 hex digits)."""
        return self._native.fingerprint

    @property
    def manifest(self) -> Dict[str, Any]:
        """The manifest: ``name``, ``patch_size``, ``spacing_mm``, ``channels``,
        ``stages`` (``(tokens, channels)``), ``fingerprint``,
        ``classes_per_forward``, ``memory_bank``."""
        return self._native.manifest()

    def memory_bank(self) -> Optional[Task]:
        """The model's memory bank (a task of every class seen in training),
        or ``None`` when it has none."""
        return self._native.memory_bank()

    def encode(
        self,
        image: VolumeLike,
        labels: VolumeLike,
        classes: Optional[Sequence[int]] = None,
        names: Optional[Sequence[str]] = None,
        *,
        affine: Any = None,
        intensity: Intensity = None,
        memory_budget: Optional[int] = None,
    ) -> Task:
        """Encodes a reference image and its label map (same grid) into a task
        embedding, as ``iris encode`` does.

        ``classes``: label values to encode, in order (default: every
        non-zero label of the map); ``names``: one name per class (stored in
        the ``.irisemb``); ``affine``: for arrays given alone (both volumes);
        ``intensity``: "auto" (detect CT or MR; the default), "ct", "mr" or
        a policy dict; ``memory_budget``: bytes the reference may ask for
        (default 4 GiB).

        Raises :class:`EmptyMaskError` for a class absent from the map,
        :class:`InvalidArgumentError` for a bad class list,
        :class:`NonFiniteError` for NaNs, :class:`ShapeMismatchError` or
        :class:`InvalidArgumentError` for grids that differ.
        """
        img, img_affine = _image(image, affine, "image")
        lab, lab_affine = _labels(labels, affine, "labels")
        classes, names = self._classes(lab, classes, names)
        return self._native.encode(
            img, img_affine, lab, lab_affine, classes, names,
            intensity=_intensity(intensity), memory_budget=memory_budget,
        )

    @staticmethod
    def _classes(
        labels: np.ndarray, classes: Optional[Sequence[int]], names: Optional[Sequence[str]]
    ) -> Tuple[List[int], List[str]]:
        if classes is None:
            classes = [int(c) for c in np.unique(labels) if c != 0]
        elif isinstance(classes, (int, np.integer)):
            classes = [classes]
        classes = [_label(c, "classes") for c in classes]
        if names is None:
            names = []
        elif isinstance(names, str):
            names = [names]
        names = [str(n) for n in names]
        return classes, names

    def segment(
        self,
        image: VolumeLike,
        task: Task,
        *,
        affine: Any = None,
        probabilities: bool = False,
        overlap: float = 0.5,
        threshold: float = 0.5,
        largest_component: bool = True,
        classes_per_forward: Optional[int] = None,
        intensity: Intensity = None,
        memory_budget: Optional[int] = None,
        max_windows: Optional[int] = None,
        progress: Optional[Callable[[int, int], Any]] = None,
        cancel: Optional[Callable[[], bool]] = None,
    ) -> Segmentation:
        """Segments ``image`` with every class of ``task``, as ``iris segment`` does.

        Keyword arguments (defaults those of the ``iris`` command):
        ``probabilities`` also returns each class's probability map;
        ``overlap`` of neighbouring windows in ``[0, 1)``; ``threshold`` a
        class needs, in ``(0, 1]``; ``largest_component`` keeps the largest
        26-connected component of each label; ``classes_per_forward``
        decodes a large task in groups (default: the manifest's);
        ``intensity`` overrides the task's policy; ``memory_budget`` (bytes,
        default 4 GiB) and ``max_windows`` (default 10 000) bound what the
        query may ask for (:class:`TooLargeError` past them);
        ``progress(done, total)`` is called after every window;
        ``cancel()`` is asked before every window, ``True`` stops the run
        with :class:`CancelledError`. An exception raised by either callback
        stops the run and is raised here.

        Raises :class:`ModelMismatchError` for a task of another model,
        :class:`NonFiniteError` for NaN voxels, :class:`InvalidArgumentError`
        for bad options.
        """
        if not isinstance(task, Task):
            raise _invalid("task", f"expected an iris.Task, found {type(task).__name__}")
        img, img_affine = _image(image, affine, "image")
        options = _options(
            intensity, overlap, threshold, largest_component, probabilities,
            classes_per_forward, memory_budget, max_windows, progress, cancel,
        )
        return _segmentation(self._native.segment(img, img_affine, task, options))

    def pool_reference(
        self,
        name: str,
        image: VolumeLike,
        labels: VolumeLike,
        classes: Optional[Sequence[int]] = None,
        names: Optional[Sequence[str]] = None,
        *,
        affine: Any = None,
        intensity: Intensity = None,
        memory_budget: Optional[int] = None,
    ) -> PoolReference:
        """Encodes a reference for a retrieval pool: its classes (together when
        they fit one crop, else each on its own) and its image descriptor, so
        it serves object- and image-level retrieval. Arguments as
        :meth:`encode`; ``name`` is how reports call it."""
        img, img_affine = _image(image, affine, "image")
        lab, lab_affine = _labels(labels, affine, "labels")
        classes, names = self._classes(lab, classes, names)
        return self._native.encode_pool_reference(
            str(name), img, img_affine, lab, lab_affine, classes, names,
            intensity=_intensity(intensity), memory_budget=memory_budget,
        )

    def retrieve(
        self,
        image: VolumeLike,
        pool: Sequence[PoolReference],
        classes: Optional[Sequence[int]] = None,
        *,
        top_k: int = 1,
        level: str = "object",
        initial: int = 0,
        affine: Any = None,
        **segment_options: Any,
    ) -> Retrieval:
        """Segments ``image`` with references retrieved from ``pool``, as
        ``iris retrieve`` does.

        ``level="object"`` (the paper's method) segments once with the pool's
        ``initial`` reference, encodes the query's own prediction and
        averages, per class, the ``top_k`` most similar references;
        ``level="image"`` takes the ``top_k`` references whose whole images
        are most alike (needs references made by :meth:`pool_reference`).
        ``classes``: label values (default: the initial reference's).
        Other keyword arguments as :meth:`segment`.
        """
        img, img_affine = _image(image, affine, "image")
        pool = list(pool)
        if not all(isinstance(r, PoolReference) for r in pool):
            raise _invalid("pool", "expected iris.PoolReference objects")
        if isinstance(top_k, bool) or not isinstance(top_k, (int, np.integer)) or top_k < 0:
            raise _invalid("top_k", f"{top_k!r} is not a count of references")
        if isinstance(initial, bool) or not isinstance(initial, (int, np.integer)) or initial < 0:
            raise _invalid("initial", f"{initial!r} is not a pool index")
        wanted = [] if classes is None else [_label(c, "classes") for c in classes]
        options = _options(**_segment_defaults(segment_options))
        out, task, choices = self._native.retrieve(
            img, img_affine, pool, wanted, int(top_k), str(level), int(initial), options
        )
        return Retrieval(
            segmentation=_segmentation(out),
            task=task,
            choices=[ClassChoice(int(l), [(int(i), float(s)) for i, s in c]) for l, c in choices],
        )


_SEGMENT_DEFAULTS: Dict[str, Any] = {
    "intensity": None,
    "overlap": 0.5,
    "threshold": 0.5,
    "largest_component": True,
    "probabilities": False,
    "classes_per_forward": None,
    "memory_budget": None,
    "max_windows": None,
    "progress": None,
    "cancel": None,
}


def _segment_defaults(given: Dict[str, Any]) -> Dict[str, Any]:
    unknown = sorted(set(given) - set(_SEGMENT_DEFAULTS))
    if unknown:
        raise TypeError(f"unexpected keyword argument(s): {', '.join(unknown)}")
    merged = dict(_SEGMENT_DEFAULTS)
    merged.update(given)
    return merged
