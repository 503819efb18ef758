"""The exceptions of iris: one class per kind of ``iris_core::Error``.

Every error the Rust core reports is raised as the class of its kind, with
the core's own message (the text the ``iris`` command prints), and the
variant's data as attributes (``path``, ``expected``, ``found``, ``label``...).
All derive from :class:`IrisError`; those about a bad argument or bad data
also derive from :class:`ValueError`, and :class:`IoError` from
:class:`OSError`, so generic ``except ValueError`` code keeps working.
"""

from __future__ import annotations

from typing import Any

__all__ = [
    "IrisError",
    "FormatError",
    "ModelMismatchError",
    "ShapeMismatchError",
    "InvalidArgumentError",
    "TooLargeError",
    "NonFiniteError",
    "EmptyMaskError",
    "CancelledError",
    "IoError",
    "NiftiError",
    "ModelError",
]


class IrisError(Exception):
    """Base class of every error raised by iris.

    ``str(error)`` is the core's message; ``error.kind`` names the
    ``iris_core::Error`` variant; the variant's fields are attributes.
    """

    kind = "Error"

    def __init__(self, message: str, **details: Any) -> None:
        super().__init__(message)
        self.message = message
        for key, value in details.items():
            setattr(self, key, value)

    def __str__(self) -> str:
        return self.message

    def __reduce__(self) -> Any:
        # Pickles with its attributes (Dask sends exceptions between processes).
        details = {k: v for k, v in self.__dict__.items() if k != "message"}
        return (_rebuild, (type(self), self.message, details))


def _rebuild(cls: type, message: str, details: dict) -> IrisError:
    return cls(message, **details)


class FormatError(IrisError, ValueError):
    """A ``.irisemb`` byte stream is malformed (truncated, corrupt, wrong version)."""

    kind = "Format"


class ModelMismatchError(IrisError, ValueError):
    """A task embedding was made by another model (``expected``, ``found``: fingerprints)."""

    kind = "ModelMismatch"


class ShapeMismatchError(IrisError, ValueError):
    """Two shapes that must agree do not (``what``, ``expected``, ``found``)."""

    kind = "ShapeMismatch"


class InvalidArgumentError(IrisError, ValueError):
    """An argument is outside its valid range (``name``, ``reason``)."""

    kind = "InvalidArgument"


class TooLargeError(IrisError, ValueError):
    """A size exceeds a limit (``what``, ``detail``); raise the limit to allow it."""

    kind = "TooLarge"


class NonFiniteError(IrisError, ValueError):
    """Input contains NaN or infinite values (``what``, ``count``)."""

    kind = "NonFinite"


class EmptyMaskError(IrisError, ValueError):
    """A reference mask has no voxel of ``label`` (0: no foreground at all)."""

    kind = "EmptyMask"


class CancelledError(IrisError):
    """The ``cancel`` callback asked to stop; nothing was returned."""

    kind = "Cancelled"


class IoError(IrisError, OSError):
    """A file could not be read or written (``path``, ``reason``, ``errno`` when known)."""

    kind = "Io"

    def __init__(self, message: str, **details: Any) -> None:
        IrisError.__init__(self, message, **details)
        self.args = (message,)


class NiftiError(IrisError, ValueError):
    """A NIfTI file could not be read or written (``path``, ``reason``)."""

    kind = "Nifti"


class ModelError(IrisError):
    """A model folder cannot be loaded, or a graph failed to run (``path``, ``reason``)."""

    kind = "Model"
