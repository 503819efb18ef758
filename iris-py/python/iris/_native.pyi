"""Type stub of ``iris._native``, the compiled extension (Rust, PyO3).

Use the ``iris`` package instead: it accepts nibabel images and arrays in
nibabel's ``[i, j, k]`` order. Here volumes are iris's own: ``[D, H, W]``
(= ``[k, j, i]``) arrays with a 4x4 affine acting on ``[d, h, w]``.
"""

from os import PathLike
from typing import Any, Callable, List, Optional, Sequence, Tuple, Union

import numpy as np
import numpy.typing as npt

__version__: str

_Path = Union[str, PathLike[str]]
_F32 = npt.NDArray[np.float32]
_U16 = npt.NDArray[np.uint16]
_F64 = npt.NDArray[np.float64]
_Policy = Tuple[str, float, float]
_SegmentationOut = Tuple[_U16, _F64, List[int], Optional[List[_F32]], int]

class SegmentOptions:
    def __init__(
        self,
        *,
        intensity: Optional[_Policy] = None,
        overlap: float = 0.5,
        threshold: float = 0.5,
        largest_component: bool = True,
        probabilities: bool = False,
        classes_per_forward: Optional[int] = None,
        memory_budget: Optional[int] = None,
        max_windows: Optional[int] = None,
        progress: Optional[Callable[[int, int], Any]] = None,
        cancel: Optional[Callable[[], bool]] = None,
    ) -> None: ...

class Task:
    """A task embedding (``.irisemb``): one embedding per class, with its model
    and preprocessing. Immutable, comparable, picklable (as its bytes)."""

    @classmethod
    def load(cls, path: _Path) -> Task:
        """Reads a ``.irisemb`` file (IoError, FormatError)."""
    @classmethod
    def from_bytes(cls, data: bytes) -> Task:
        """Parses ``.irisemb`` bytes (FormatError)."""
    def to_bytes(self, payload: str = "f32") -> bytes:
        """The ``.irisemb`` bytes; payload "f32" (exact) or "f16" (half the size)."""
    def save(self, path: _Path, payload: str = "f32") -> None:
        """Writes a ``.irisemb`` file atomically, as ``iris encode --out`` does."""
    @property
    def model(self) -> str:
        """Fingerprint (64 hex digits) of the model that made it."""
    @property
    def classes(self) -> List[Tuple[int, str]]:
        """``(label, name)`` of each class, in order."""
    @property
    def intensity(self) -> _Policy:
        """The reference's intensity policy: ``("ct", min_hu, max_hu)`` or
        ``("percentile", low, high)``."""
    def describe_json(self) -> str:
        """``iris inspect --json``'s description (without "file"), as JSON text."""
    def select_labels(self, labels: Sequence[int]) -> Task:
        """The classes with these label values, in this order."""
    def select_names(self, names: Sequence[str]) -> Task:
        """The classes with these names (exact), in this order."""
    def stage(self, label: int, stage: int) -> List[float]:
        """One stage of one class's embedding, ``tokens * channels`` values."""
    def __len__(self) -> int: ...
    def __eq__(self, other: object) -> bool: ...

class PoolReference:
    """One reference of a retrieval pool: its task and, for image-level
    retrieval, its image descriptor. Picklable."""

    def __init__(self, name: str, task: Task, descriptor: Optional[Sequence[float]] = None) -> None: ...
    @property
    def name(self) -> str: ...
    @property
    def task(self) -> Task: ...
    @property
    def descriptor(self) -> Optional[List[float]]: ...

class Model:
    def __init__(self, path: _Path, *, threads: int = 0, precision: str = "f32") -> None: ...
    @property
    def path(self) -> str: ...
    @property
    def threads(self) -> int: ...
    @property
    def precision(self) -> str: ...
    @property
    def fingerprint(self) -> str: ...
    def manifest(self) -> dict: ...
    def memory_bank(self) -> Optional[Task]: ...
    def encode(
        self,
        image: _F32,
        image_affine: _F64,
        labels: _U16,
        labels_affine: _F64,
        classes: Sequence[int],
        names: Sequence[str],
        *,
        intensity: Optional[_Policy] = None,
        memory_budget: Optional[int] = None,
    ) -> Task: ...
    def segment(self, image: _F32, affine: _F64, task: Task, options: SegmentOptions) -> _SegmentationOut: ...
    def encode_pool_reference(
        self,
        name: str,
        image: _F32,
        image_affine: _F64,
        labels: _U16,
        labels_affine: _F64,
        classes: Sequence[int],
        names: Sequence[str],
        *,
        intensity: Optional[_Policy] = None,
        memory_budget: Optional[int] = None,
    ) -> PoolReference: ...
    def retrieve(
        self,
        image: _F32,
        affine: _F64,
        pool: Sequence[PoolReference],
        classes: Sequence[int],
        top_k: int,
        level: str,
        initial: int,
        options: SegmentOptions,
    ) -> Tuple[_SegmentationOut, Task, List[Tuple[int, List[Tuple[int, float]]]]]: ...

def ensemble(tasks: Sequence[Task]) -> Task: ...
def read_image(path: _Path) -> Tuple[_F32, _F64]: ...
def read_labels(path: _Path) -> Tuple[_U16, _F64]: ...
def decode_image(data: bytes) -> Tuple[_F32, _F64]: ...
def decode_labels(data: bytes) -> Tuple[_U16, _F64]: ...
def write_image(path: _Path, data: _F32, affine: _F64) -> None: ...
def write_labels(path: _Path, data: _U16, affine: _F64) -> None: ...
def dice(
    prediction: _U16, prediction_affine: _F64, truth: _U16, truth_affine: _F64, classes: Sequence[int]
) -> List[Optional[float]]: ...
