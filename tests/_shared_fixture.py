"""Expensive fixtures built once per test session and shared by the test files that use them.

A module-scoped fixture is built again in every file that imports it, and again on each
pytest-xdist worker: the half-width digits SqueezeNet of test_export_tflite was trained four
times per `make test` and its four-format export done twice (about 45 s of CPU on 2 cores).
:func:`built_once` builds into a folder of this session's temporary root under a file lock,
so the first file to need it builds it and the others wait for it or find it done; each
caller gets its own copy of the files, so nothing one test file does to them reaches another.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path
from typing import Any, Callable

from filelock import FileLock


def _session_root(tmp_path_factory) -> Path:
    base = tmp_path_factory.getbasetemp()
    # under xdist each worker's base is pytest-N/popen-gwK: their parent is this session's;
    # without xdist the parent holds earlier sessions' folders, so the base itself is used
    return base.parent if os.environ.get("PYTEST_XDIST_WORKER") else base


def built_once(tmp_path_factory, name: str, build: Callable[[Path], Any]) -> tuple[Path, Any]:
    """A copy (in a new temporary folder of this worker) of the folder ``build`` filled, and
    what ``build`` returned (JSON). ``build(folder)`` runs once per session for ``name``."""
    root = _session_root(tmp_path_factory)
    folder, done = root / f"shared-{name}", root / f"shared-{name}.json"
    with FileLock(str(root / f"shared-{name}.lock")):
        if not done.exists():
            shutil.rmtree(folder, ignore_errors=True)
            folder.mkdir()
            result = build(folder)
            done.write_text(json.dumps({"result": result}))
    copy = tmp_path_factory.mktemp(name)
    shutil.copytree(folder, copy, dirs_exist_ok=True)
    return copy, json.loads(done.read_text())["result"]


def half_width_digits(tmp_path_factory) -> Path:
    """``model.pt`` (in a folder of this worker's own) of a half-width digits SqueezeNet
    trained 6 epochs (~6 s, about 95% test accuracy), trained once per session: the model
    of test_export_tflite, test_packed_export, test_micro, test_seal and test_gate."""

    def train(out: Path) -> None:
        from edgesqueeze.recipe import recipe_from_dict
        from edgesqueeze.train import fit

        recipe = recipe_from_dict({
            "version": 1, "seed": 1, "output_dir": str(out),
            "model": {"arch": "squeezenet_mnist", "kwargs": {"width_mult": 0.5}},
            "data": {"dataset": "digits", "val_fraction": 0.2},
            "train": {"epochs": 6, "batch_size": 32, "lr": 0.1, "threads": 1},
        })
        fit(recipe, progress=False, log=lambda _: None)

    out, _ = built_once(tmp_path_factory, "trained-half-width-digits", train)
    return out / "model.pt"
