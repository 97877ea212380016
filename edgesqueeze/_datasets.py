"""Dataset names, checked without reading data or importing torch: a recipe's
``data.dataset`` and a command's ``--data`` are refused on sight (the recipe loader and the
CLI run on a device install, which has neither torch nor the data)."""

from __future__ import annotations

import difflib
from pathlib import Path

from edgesqueeze.errors import DataError

KNOWN_DATASETS = ("digits", "mnist", "cifar10", "imagenet-sample", "imagefolder:PATH", "imagenet:PATH")


def unknown_dataset_error(name: str) -> DataError:
    plain = [k for k in KNOWN_DATASETS if ":" not in k] + ["imagefolder"]
    guess = difflib.get_close_matches(name.lower().split(":", 1)[0], plain, n=1, cutoff=0.5)
    hint = ""
    if guess:
        hint = f" (did you mean '{'imagefolder:PATH' if guess[0] == 'imagefolder' else guess[0]}'?)"
    return DataError(f"unknown dataset '{name}'{hint}; known datasets: {', '.join(KNOWN_DATASETS)}")


_NEEDS_PATH = {"imagefolder:": "imagefolder:PATH (a folder or .zip)",
               "imagenet:": "imagenet:PATH (with train/<wnid>/ and val/<wnid>/)"}


def dataset_file(name: str | None) -> Path | None:
    """The file a dataset name reads whole (``imagefolder:data.zip``), or None (a known
    dataset, a folder): what a command's outputs must not replace."""
    low = (name or "").strip().lower()
    if not any(low.startswith(prefix) for prefix in _NEEDS_PATH):
        return None
    path = Path(name.strip().split(":", 1)[1]).expanduser()
    return path if path.is_file() else None


def check_dataset_name(name) -> None:
    """Refuse a dataset name :func:`load_dataset` cannot read, without reading anything: what
    a command checks before its work (``verify --data nosuch`` reported each file as not
    evaluated, and wrote its report)."""
    if not isinstance(name, str) or not name.strip():
        raise unknown_dataset_error(str(name))
    low = name.strip().lower()
    for prefix, form in _NEEDS_PATH.items():
        if low.startswith(prefix):
            if not name.strip()[len(prefix):]:
                raise DataError(f"dataset '{prefix}' needs a path: {form}")
            return
    if low not in ("digits", "mnist", "cifar10", "imagenet-sample"):
        raise unknown_dataset_error(name)
