"""Progress of long work, handed down from the command line: ``progress(label, total)``
is a context manager that yields ``update(n)``, called after each ``n`` items are done
(the CLI's factory draws a bar on standard error; the library draws nothing itself).

    >>> with bar(None, "model.onnx", 100) as update:
    ...     update is None
    True
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable
from contextlib import AbstractContextManager

__all__ = ["Progress", "bar"]

Progress = Callable[[str, int], AbstractContextManager[Callable[[int], None]]]


def bar(progress: Progress | None, label: str, total: int) -> AbstractContextManager[Callable[[int], None] | None]:
    """``progress(label, total)``, or a context that yields ``None`` (no updates) without one."""
    return progress(label, total) if progress is not None else contextlib.nullcontext(None)
