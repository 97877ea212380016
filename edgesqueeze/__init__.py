"""edgesqueeze: make trained PyTorch CNNs small enough for the edge, and prove it.

The public API is imported lazily: ``import edgesqueeze`` costs nothing, so that the
torch-free ``edgesqueeze.runtime`` (for devices) never pulls in torch through this file.
"""

from __future__ import annotations

import importlib

__version__ = "0.1.0"

_API = {
    # name: module that defines it
    "EdgesqueezeError": "edgesqueeze.errors",
    "RecipeError": "edgesqueeze.errors",
    "DataError": "edgesqueeze.errors",
    "ModelError": "edgesqueeze.errors",
    "CheckpointError": "edgesqueeze.errors",
    "FormatError": "edgesqueeze.errors",
    "BudgetError": "edgesqueeze.errors",
    "ExportError": "edgesqueeze.errors",
    "OutputError": "edgesqueeze.errors",
    "RuntimeBackendError": "edgesqueeze.errors",
    "Note": "edgesqueeze.errors",
    "Recipe": "edgesqueeze.recipe",
    "load_recipe": "edgesqueeze.recipe",
    "recipe_from_dict": "edgesqueeze.recipe",
    "build_model": "edgesqueeze.models",
    "list_specs": "edgesqueeze.models",
    "load_dataset": "edgesqueeze.data",
    "load_model": "edgesqueeze.checkpoint",
    "save_checkpoint": "edgesqueeze.checkpoint",
    "fit": "edgesqueeze.train",
    "evaluate": "edgesqueeze.evaluation",  # the module is named otherwise: importing a submodule
    # named evaluate used to replace this function with it on the package
}

__all__ = ["__version__", *_API]


def __dir__() -> list[str]:
    return sorted({*globals(), *_API})


def __getattr__(name: str):
    if name in _API:
        return getattr(importlib.import_module(_API[name]), name)
    raise AttributeError(f"module 'edgesqueeze' has no attribute {name!r}")
