"""One exception hierarchy for everything edgesqueeze refuses.

The CLI maps every :class:`EdgesqueezeError` to one readable line and an exit code:
``BudgetError`` (a budget or verification failed) exits 1, everything else (bad usage or
bad input) exits 2. Messages name the file, field or layer and say what to do.
"""

from __future__ import annotations


class EdgesqueezeError(Exception):
    """Base class. ``exit_code`` is what the CLI exits with."""

    exit_code = 2


class RecipeError(EdgesqueezeError):
    """A recipe (YAML) is malformed: unknown key, wrong type, value out of range."""


class DataError(EdgesqueezeError):
    """A dataset is missing, corrupt, or does not match the model."""


class ModelError(EdgesqueezeError):
    """Unknown architecture, or weights that do not fit the architecture."""


class CheckpointError(EdgesqueezeError):
    """A checkpoint file cannot be read safely or does not hold what was expected."""


class FormatError(EdgesqueezeError):
    """A binary artifact (.esq, .onnx, .tflite) is malformed."""


class ExportError(EdgesqueezeError):
    """A model cannot be converted: an op or module the converter does not handle."""


class RuntimeBackendError(EdgesqueezeError):
    """An artifact cannot be run: its runtime is not installed, or the file is not runnable."""


class OutputError(EdgesqueezeError):
    """A file or folder cannot be written: no permission, a file where a folder should be, a
    folder where the file should be, a full disk."""


class BudgetError(EdgesqueezeError):
    """An artifact broke its size or accuracy budget."""

    exit_code = 1


class Note(UserWarning):
    """Not an error: something the user asked for that edgesqueeze does not use, or a choice
    it made for them. Library code warns with it (``warnings.warn(msg, Note)``); the CLI
    prints each as one ``note: ...`` line on stderr."""
