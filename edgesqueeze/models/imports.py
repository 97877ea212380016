"""The user's own architectures: ``package.module:Class``, ``package.module:builder`` or
``path/to/file.py:Class`` wherever a registry name is accepted (``--arch``, recipe
``model: {import: ..., kwargs: ...}``).

The spec and the builder kwargs are recorded in checkpoints and ``.esq`` archives like a
registry name, so a compressed model is rebuilt from the same code. What a *file* names is
code to run, so it is honoured with care:

* nothing a file names is imported unless the user asks: ``--arch`` with the spec (or where
  the code is now) or ``--trust-pickle`` (importing a module runs its top-level code; a
  downloaded ``model.pt`` must not make edgesqueeze run the ``.py`` beside it). Recipes that
  name the class (``model.import``) and ``--arch`` count as asking;
* then a class that subclasses ``nn.Module`` is built (its module is imported first: the
  user's own installed or local code, found the way ``python -m`` would find it, with the
  current directory on the path, as uvicorn and gunicorn do);
* a builder *function* named by a file is called only when the user names the same spec
  (``--arch``): a file must not make edgesqueeze call an arbitrary function.

Example::

    >>> m = build_import("torch.nn:Linear", {"in_features": 4, "out_features": 2})
    >>> type(m).__name__
    'Linear'
"""

from __future__ import annotations

import contextlib
import hashlib
import importlib
import importlib.util
import inspect
import json
import os
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from torch import nn

from ..errors import ModelError

__all__ = ["UntrustedCode", "is_import_spec", "resolve", "build_import", "accepted_kwargs", "cwd_importable"]


class UntrustedCode(ModelError):
    """A model file names code to import (``module:Class``, ``file.py:Class``) and the user
    did not ask for it (``--arch``, ``--trust-pickle``): importing runs the module's top-level
    code, so a file alone never makes edgesqueeze import anything."""


def is_import_spec(arch: str | None) -> bool:
    """``True`` for ``module:attr`` / ``file.py:attr`` specs, ``False`` for registry names."""
    return isinstance(arch, str) and ":" in arch


def _split(spec: str) -> tuple[str, str]:
    where, _, attr = spec.rpartition(":")
    if not where or not attr or not all(part.isidentifier() for part in attr.split(".")):
        raise ModelError(f"--arch {spec!r}: expected package.module:Class, package.module:builder or "
                         "path/to/file.py:Class")
    return where, attr


def _first_line(exc: BaseException) -> str:
    lines = str(exc).strip().splitlines()
    return (f"{type(exc).__name__}: {lines[0][:200]}" if lines else type(exc).__name__)


def _import_file(path_text: str, spec: str):
    path = Path(path_text).expanduser()
    if not path.is_file():
        raise ModelError(f"architecture {spec} (from --arch, a recipe's model section or the model file): no such "
                         f"file {path} (relative paths start at the current directory, {Path.cwd()}, not at the "
                         "recipe's); run from the directory the spec was written in, or give --arch with the "
                         "file's path from here")
    resolved = path.resolve()
    # One module object per file: a second spec naming the same file gets the same classes.
    # not dotted: pickle imports a class's module by name, and there is no parent package
    name = f"edgesqueeze_user_{resolved.stem}_{hashlib.sha256(str(resolved).encode()).hexdigest()[:10]}"
    if name in sys.modules:
        return sys.modules[name]
    loader_spec = importlib.util.spec_from_file_location(name, resolved)
    if loader_spec is None or loader_spec.loader is None:
        raise ModelError(f"--arch {spec}: {path} is not a Python file")
    module = importlib.util.module_from_spec(loader_spec)
    sys.modules[name] = module  # dataclasses and pickling look their module up here
    try:
        loader_spec.loader.exec_module(module)
    except Exception as exc:  # noqa: BLE001 - the user's code can raise anything
        del sys.modules[name]
        raise ModelError(f"--arch {spec}: importing {path} failed ({_first_line(exc)})") from None
    return module


@contextlib.contextmanager
def cwd_importable() -> Iterator[None]:
    """The current directory on ``sys.path`` while the block runs, as ``python -m`` has it:
    the project the user runs from is importable (its classes, and the ones a pickle names)."""
    cwd = os.getcwd()
    added = cwd not in sys.path
    if added:
        sys.path.insert(0, cwd)
    try:
        yield
    finally:
        if added and sys.path and sys.path[0] == cwd:
            sys.path.pop(0)


def _import_module(module_name: str, spec: str):
    try:
        with cwd_importable():
            return importlib.import_module(module_name)
    except ModuleNotFoundError as exc:
        missing = exc.name or module_name
        raise ModelError(f"--arch {spec}: cannot import module '{module_name}' (no module named '{missing}'); "
                         "install it, add its folder to PYTHONPATH, run from the folder that holds it, "
                         "or give a file: --arch path/to/file.py:Class") from None
    except Exception as exc:  # noqa: BLE001
        raise ModelError(f"--arch {spec}: importing '{module_name}' failed ({_first_line(exc)})") from None


def resolve(spec: str) -> Any:
    """The class or function ``spec`` names (importing its module or file)."""
    where, attr = _split(spec)
    is_file = where.endswith(".py") or "/" in where or os.sep in where
    module = _import_file(where, spec) if is_file else _import_module(where, spec)
    obj: Any = module
    for part in attr.split("."):
        if not hasattr(obj, part):
            found = sorted(n for n, v in vars(module).items()
                           if not n.startswith("_") and (inspect.isclass(v) and issubclass(v, nn.Module)
                                                         or inspect.isfunction(v)))
            shown = ", ".join(found[:12]) + (", ..." if len(found) > 12 else "")
            raise ModelError(f"--arch {spec}: '{where}' has no '{attr}'"
                             + (f"; it defines: {shown}" if shown else ""))
        obj = getattr(obj, part)
    if not callable(obj):
        raise ModelError(f"--arch {spec}: '{attr}' is a {type(obj).__name__}, not a class or builder function")
    return obj


def accepted_kwargs(spec: str, candidates: dict[str, Any]) -> dict[str, Any]:
    """The entries of ``candidates`` (e.g. ``num_classes``, ``in_channels`` from the dataset)
    that the builder's signature accepts, so a class without ``in_channels`` still builds."""
    try:
        params = inspect.signature(resolve(spec)).parameters
    except (TypeError, ValueError):
        return {}
    if any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params.values()):
        return dict(candidates)
    return {k: v for k, v in candidates.items() if k in params}


def build_import(spec: str, kwargs: dict[str, Any] | None = None, *, from_file: str | None = None,
                 trusted: bool = False) -> nn.Module:
    """Build the model ``spec`` names with ``kwargs``; it gets ``arch_name`` and ``arch_kwargs``.

    ``from_file`` names the checkpoint or archive the spec was read from: then nothing is
    imported unless ``trusted`` (the user passed ``--trust-pickle``; :class:`UntrustedCode`
    otherwise), and only an ``nn.Module`` subclass is built (see the module docstring)."""
    if from_file and not trusted:
        raise UntrustedCode(f"{from_file}: names your code {spec} as its architecture; edgesqueeze imports code "
                            f"a file names only when you ask. Pass --arch {spec} (or where that code is now), "
                            "or --trust-pickle, if you trust this file")
    kwargs = dict(kwargs or {})
    try:
        json.dumps(kwargs, allow_nan=False)
    except (TypeError, ValueError) as exc:
        raise ModelError(f"--arch {spec}: builder kwargs must be plain JSON values ({exc})") from None
    try:
        obj = resolve(spec)
    except ModelError as exc:  # the spec came from the file, not from an --arch the user typed
        if not from_file:
            raise
        raise ModelError(f"{from_file}: names " + str(exc).removeprefix("--arch ")) from None
    is_module_class = inspect.isclass(obj) and issubclass(obj, nn.Module)
    if from_file and not is_module_class:
        raise ModelError(f"{from_file}: names the builder function {spec}; a file may only name an nn.Module "
                         f"class to build. If you trust it, pass --arch {spec}")
    try:
        inspect.signature(obj).bind(**kwargs)
    except TypeError as exc:
        raise ModelError(f"--arch {spec}: does not take kwargs {kwargs} ({exc}); set them with --arch-kwargs "
                         "or the recipe's model.kwargs") from None
    except ValueError:  # no signature to check (a C builder): calling it will tell
        pass
    try:
        model = obj(**kwargs)
    except Exception as exc:  # noqa: BLE001 - the user's constructor can raise anything
        raise ModelError(f"--arch {spec}: building it with kwargs {kwargs} failed ({_first_line(exc)})") from None
    if not isinstance(model, nn.Module):
        raise ModelError(f"--arch {spec}: returned a {type(model).__name__}, not an nn.Module")
    model.arch_name = spec
    model.arch_kwargs = kwargs
    return model
