"""Safe model I/O.

An edgesqueeze checkpoint is a ``torch.save`` of plain data only::

    {"format": "edgesqueeze.checkpoint", "format_version": 1,
     "state_dict": {name: tensor}, "meta_json": "<JSON string>"}

so it loads with ``torch.load(..., weights_only=True)``: nothing in it can run code. The JSON
metadata carries what is needed to rebuild and feed the model (architecture name and kwargs,
class names, input shape, normalization) and its provenance (metrics, recipe hash).

:func:`load_model` also accepts what users bring: a plain ``state_dict`` (with ``arch``),
TorchScript archives, ``torch.export`` programs (``.pt2``) and ``.esq`` archives. A fully
pickled ``nn.Module`` can run arbitrary code when unpickled, so it is refused unless
``trust_pickle=True``.

The ``.esq`` format layer (:mod:`edgesqueeze.format`) speaks numpy; :func:`esq_dumps`,
:func:`esq_loads` and :func:`model_from_esq` are its torch side: tensors to arrays and back,
bit for bit, and the model an archive holds.
"""

from __future__ import annotations

import contextlib
import hashlib
import io
import json
import os
import pickle
import re
import struct
import sys
import warnings
import zipfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from edgesqueeze._io import write_bytes_atomic
from edgesqueeze.errors import CheckpointError, FormatError, ModelError, Note
from edgesqueeze.format import codec, container
from edgesqueeze.runtime._base import not_torch_file  # noqa: F401 - torch-free, for the CLI's early check

FORMAT = "edgesqueeze.checkpoint"
TRAIN_STATE_FORMAT = "edgesqueeze.train_state"
FORMAT_VERSION = 1
ESQ_META_FORMAT = "edgesqueeze.esq-model"


@dataclass
class LoadedModel:
    """A model ready to run, what kind of file it came from, and its metadata."""

    model: nn.Module
    meta: dict[str, Any] = field(default_factory=dict)
    kind: str = "checkpoint"  # checkpoint | esq | state_dict | torchscript | exported_program | pickle
    path: Path | None = None
    source_program: Any = None  # the ScriptModule or ExportedProgram a program-kind file holds


def model_meta(model: nn.Module, **extra: Any) -> dict[str, Any]:
    """Metadata that rebuilds ``model``: its registry name and builder kwargs, plus ``extra``."""
    arch = getattr(model, "arch_name", None)
    if arch is None:
        raise ModelError(f"{type(model).__name__} was not built by edgesqueeze.models.build_model; "
                         "cannot record its architecture")
    return {"arch": arch, "arch_kwargs": dict(getattr(model, "arch_kwargs", {})), **extra}


def state_digest(state: dict) -> str:
    """SHA-256 over a state_dict's names, dtypes, shapes and bytes, in sorted name order."""
    h = hashlib.sha256()
    for name in sorted(state):
        t = state[name].detach().contiguous().cpu()
        h.update(f"{name}|{t.dtype}|{list(t.shape)}|".encode())
        h.update(t.numpy().tobytes())
    return h.hexdigest()


def save_checkpoint(path: str | Path, model: nn.Module, meta: dict[str, Any]) -> Path:
    """Write ``model``'s weights and ``meta`` atomically; returns the path."""
    if not isinstance(model, nn.Module):
        raise CheckpointError(f"{path}: save_checkpoint takes an nn.Module, got {type(model).__name__}")
    if not isinstance(meta, dict):  # load_model reads it as a mapping
        raise CheckpointError(f"{path}: save_checkpoint's meta must be a dict (e.g. {{}}), got {type(meta).__name__}")
    return save_state(path, model.state_dict(), meta)


def save_state(path: str | Path, state_dict: dict[str, torch.Tensor], meta: dict[str, Any]) -> Path:
    """:func:`save_checkpoint` of a state_dict as it is (``unpack``: no model is built)."""
    try:
        meta_json = json.dumps(meta, sort_keys=True)
    except TypeError as exc:
        raise CheckpointError(f"{path}: metadata is not JSON-serialisable ({exc})") from None
    payload = {
        "format": FORMAT,
        "format_version": FORMAT_VERSION,
        "state_dict": {k: v.detach().cpu().contiguous() for k, v in state_dict.items()},
        "meta_json": meta_json,
    }
    path = Path(path)
    write_bytes_atomic(path, _torch_bytes(payload))
    return path


def _torch_bytes(obj: Any) -> bytes:
    """``torch.save`` into memory: the archive's inner folder is then always ``archive``,
    not the (random) temporary file name, so equal inputs give byte-identical files."""
    buf = io.BytesIO()
    torch.save(obj, buf)
    return buf.getvalue()


def save_train_state(path: str | Path, state: dict[str, Any]) -> None:
    """Write a resumable training state (weights, optimizer, RNG, history) atomically."""
    write_bytes_atomic(path, _torch_bytes({"format": TRAIN_STATE_FORMAT, "format_version": FORMAT_VERSION, **state}))


def load_resume_file(path: str | Path, what: str, resumed: str, advice: str) -> Any:
    """What ``--resume`` reads from ``path`` (a training state, a ``pruned.pt``), safely; a
    damaged or foreign file is one CheckpointError naming it, ``what`` it should have been,
    ``resumed`` (what a run would resume) and ``advice`` (it was a traceback through the
    private _PickleRefused)."""
    try:
        return _safe_torch_load(Path(path))
    except _PickleRefused:  # a damaged file, or a pickle of something else
        raise CheckpointError(f"{path}: not {what} (it does not read as one: damaged, or another kind of file); "
                              f"{advice}") from None
    except CheckpointError as exc:  # truncated, or not a PyTorch file at all
        said = str(exc).removesuffix("; is it truncated or of another format?")
        raise CheckpointError(f"{said}; it is not {resumed}: {advice}") from None


def load_train_state(path: str | Path) -> dict[str, Any]:
    """A state :func:`save_train_state` wrote (what ``--resume`` reads); anything else is one
    CheckpointError naming the file."""
    advice = "delete it, or leave out --resume, to start over"
    obj = load_resume_file(path, "an edgesqueeze training state", "a training state to resume", advice)
    if not isinstance(obj, dict) or obj.get("format") != TRAIN_STATE_FORMAT:
        raise CheckpointError(f"{path}: not an edgesqueeze training state; {advice}")
    return obj


# ---------------------------------------------------------------------------------------
# Loading


def _zip_kind(path: Path) -> str | None:
    """Tell torch.save / TorchScript / torch.export archives apart by their member names."""
    try:
        with zipfile.ZipFile(path) as zf:
            names = zf.namelist()
    except (zipfile.BadZipFile, OSError):
        return None
    if any(n.endswith("/archive_format") or n.endswith("models/model.json") for n in names):
        return "exported_program"
    if any("/code/__torch__" in n for n in names) or any(n.endswith("/constants.pkl") for n in names):
        return "torchscript"
    if any(n.endswith("data.pkl") for n in names):
        return "torch_save"
    return "zip"


def _check_crcs(path: Path) -> None:
    """Refuse a zip-format PyTorch file (torch.save, TorchScript, .pt2) whose members fail
    their CRC-32: torch.load does not check them, so a flipped byte in a weight loaded and ran
    (1-2 ms per 5 MB; a legacy non-zip file has no checksum to check)."""
    try:
        with zipfile.ZipFile(path) as zf:
            damaged = zf.testzip()
    except (zipfile.BadZipFile, OSError, EOFError, NotImplementedError):
        return  # not a zip, or one torch reads and we cannot: torch.load says what is wrong
    if damaged is not None:
        raise CheckpointError(f"{path}: damaged: its member {damaged} fails its CRC-32 check (a changed byte); "
                              "copy it again from where it came, or save the model again")


def _data_globals() -> list:
    """What training scripts save beside their weights that is data, not code, for torch's
    weights-only unpickler: numpy scalars and arrays (``best_acc = np.float64(...)``) and
    ``argparse.Namespace`` (their arguments): constructed from values, never calling anything
    the file names. Under numpy 2 a numpy 1 file's names (``numpy.core...``) too."""
    import argparse

    core = getattr(np, "_core", None) or np.core
    found: list = [np.dtype, np.ndarray, argparse.Namespace, core.multiarray.scalar, core.multiarray._reconstruct,
                   (core.multiarray.scalar, "numpy.core.multiarray.scalar"),
                   (core.multiarray._reconstruct, "numpy.core.multiarray._reconstruct")]
    dtypes = getattr(np, "dtypes", None)
    if dtypes is not None:
        found += [getattr(dtypes, n) for n in dir(dtypes) if n.endswith("DType")]
    return found


def _safe_torch_load(path: Path) -> Any:
    _check_crcs(path)
    allow = getattr(torch.serialization, "safe_globals", None)
    try:
        with warnings.catch_warnings(), (allow(_data_globals()) if allow else contextlib.nullcontext()):
            warnings.filterwarnings("ignore", message="Detected pickle protocol")  # before our own refusal
            return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as exc:
        raise _PickleRefused(str(exc)) from None
    except (RuntimeError, EOFError, OSError, ValueError) as exc:
        if _cut_zip(path):  # torch said only "[Errno 22] Invalid argument"
            raise CheckpointError(f"{path}: truncated: a PyTorch zip archive without its end (its central "
                                  "directory); copy it again or save it again") from None
        raise CheckpointError(f"{path}: cannot read as a PyTorch file ({_first_line(exc)}); "
                              "is it truncated or of another format?") from None
    except (KeyError, IndexError, TypeError, AttributeError, struct.error) as exc:
        # torch's weights-only unpickler on bytes that are no pickle at all (a text file: KeyError 101)
        raise CheckpointError(f"{path}: cannot read as a PyTorch file ({type(exc).__name__} {exc}); "
                              "is it truncated or of another format?") from None


def _cut_zip(path: Path) -> bool:
    """A file that starts as a zip archive (torch.save's format) but has no end record."""
    import zipfile

    try:
        with open(path, "rb") as fh:
            head = fh.read(4)
        return head == b"PK\x03\x04" and not zipfile.is_zipfile(path)
    except OSError:
        return False


class _PickleRefused(Exception):
    pass


def _parses_as_pickle(path: Path) -> bool:
    """Whether ``path`` starts with one complete, well-formed pickle: its opcodes read with
    :mod:`pickletools` (which executes nothing). torch's safe unpickler refuses a damaged file
    and a whole-model pickle alike; only the second is worth the --trust-pickle advice."""
    import pickletools

    try:
        with open(path, "rb") as fh:
            for _ in pickletools.genops(fh):
                pass
        return True
    except Exception:  # noqa: BLE001 - ValueError for bad opcodes or a truncated stream, and others
        return False


def _not_model_meta(meta: dict[str, Any]) -> str:
    """What an archive's meta lacks to be a model's (it said "no 'arch'" of one whose meta
    has an arch but no format)."""
    if meta.get("format") != ESQ_META_FORMAT:
        return f"its meta has format {meta.get('format')!r}, not {ESQ_META_FORMAT!r}"
    return "its meta has no 'arch'"


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    if not text:
        return type(exc).__name__
    return text[0] if len(text[0]) <= 300 else text[0][:300].rsplit(" ", 1)[0] + " ..."


def rebuild(arch: str, arch_kwargs: dict[str, Any], *, folded_batchnorm: bool = False,
            folded_layers: Any = None, from_file: str | None = None, trusted: bool = False,
            source: str | None = None) -> nn.Module:
    """The architecture a checkpoint names; BatchNorm folded into the layers before it if it
    was: the ``folded_layers`` pairs the archive records, or (an archive from before they were
    recorded) every Conv2d -> BatchNorm2d pair.

    ``from_file``: the file that named ``arch``; the user's own code it names is imported only
    when ``trusted`` and built only if it is an ``nn.Module`` class
    (:mod:`edgesqueeze.models.imports`). ``source``: the file, for errors in its pairs."""
    from edgesqueeze.models import build_model
    from edgesqueeze.models.imports import build_import, is_import_spec

    if is_import_spec(arch):
        model = build_import(arch, arch_kwargs, from_file=from_file, trusted=trusted)
    else:
        model = build_model(arch, **arch_kwargs)
    if folded_batchnorm:
        from edgesqueeze.models.fold import check_pairs, fold_batchnorm, legacy_pairs  # torch.fx: only when needed
        from edgesqueeze.models.layers import plain_weights

        plain_weights(model)  # folded after they were made plain (load_state_dict_checked): as it was then

        pairs = (legacy_pairs(model) if folded_layers is None
                 else check_pairs(model, folded_layers, source=source or from_file or arch))
        model = fold_batchnorm(model, pairs)
    return model


def load_state_dict_checked(model: nn.Module, state_dict: dict[str, torch.Tensor], *, source: str,
                            plain: bool = True) -> None:
    """``load_state_dict(strict=True)`` with an error that names the first offending layer.
    Two differences that are not errors are bridged: a prefix on every name that the model's
    own names lack (torch.compile's ``_orig_mod.``, a Lightning module's ``model.``, with a
    note), and a BatchNorm's ``num_batches_tracked`` the file lacks (the model's own count, 0,
    kept, as ``load_state_dict`` does for a file from before that buffer existed).
    ``plain``: a model with weight_norm / spectral_norm layers ends with plain weights
    (:func:`~edgesqueeze.models.layers.plain_weights`, noted), whichever form the file holds;
    training's own resume keeps them (``plain=False``)."""
    from edgesqueeze.models.layers import plain_weights, weight_transforms

    transformed = plain and bool(weight_transforms(model))
    if transformed and set(state_dict) != set(model.state_dict()):
        plain_weights(model)  # a file written after they were made plain (an .esq, pruned.pt): its names
    expected = model.state_dict()
    state_dict = _without_prefix(state_dict, expected, source)
    missing = [k for k in expected if k not in state_dict]
    if missing and all(k.endswith(".num_batches_tracked") for k in missing):
        state_dict = {**state_dict, **{k: expected[k] for k in missing}}
        missing = []
    unexpected = [k for k in state_dict if k not in expected]
    arch = getattr(model, "arch_name", type(model).__name__)
    if missing or unexpected:
        parts = []
        if missing:
            parts.append(f"missing {len(missing)} tensors (first: {missing[0]})")
        if unexpected:
            parts.append(f"has {len(unexpected)} unexpected tensors (first: {unexpected[0]})")
        raise ModelError(f"{source}: weights do not fit architecture '{arch}': " + "; ".join(parts)
                         + ". Is --arch (or the recipe's model.arch) right?")
    for key, tensor in expected.items():
        got = state_dict[key]
        if not isinstance(got, torch.Tensor):
            raise ModelError(f"{source}: entry {key} is a {type(got).__name__}, not a tensor")
        if tuple(got.shape) != tuple(tensor.shape):
            hint = ""
            last = [k for k, t in expected.items() if t.is_floating_point()][-2:]  # the classifier's
            if key in last and tensor.dim() >= 1 and got.dim() == tensor.dim() and got.shape[1:] == tensor.shape[1:]:
                hint = f" (different class count? pass --num-classes {got.shape[0]})"
            else:
                hint = " (built with other kwargs? pass the ones it was trained with: --arch-kwargs '{...}')"
            raise ModelError(f"{source}: layer {key} has shape {tuple(got.shape)} in the file but "
                             f"{tuple(tensor.shape)} in '{arch}'{hint}")
    model.load_state_dict(state_dict, strict=True)
    if transformed:
        changed = plain_weights(model)
        if changed:
            warnings.warn(f"{source}: {', '.join(changed[:3])}{' ...' if len(changed) > 3 else ''}: each weight made "
                          "the plain tensor it computes now (pruning, weight sharing and export work on plain "
                          "weights; the model computes the same)", Note, stacklevel=3)


def _without_prefix(state_dict: dict, expected: dict, source: str) -> dict:
    """``state_dict`` with the leading name parts every key shares and the model's keys lack
    (``_orig_mod.``, ``model.``, nested as ``module._orig_mod.``) removed, where that makes the
    names the model's own (missing ``num_batches_tracked`` aside); else as it was."""
    if set(state_dict) == set(expected):
        return state_dict
    want = {k for k in expected if not k.endswith(".num_batches_tracked")}
    out, dropped = state_dict, []
    for _ in range(3):
        first = {k.split(".", 1)[0] for k in out}
        if len(first) != 1 or not all("." in k for k in out):
            break
        prefix = f"{first.pop()}."
        out = {k[len(prefix):]: v for k, v in out.items()}
        dropped.append(prefix)
        if want <= set(out) <= set(expected):
            warnings.warn(f"{source}: every weight's name starts with {''.join(dropped)!r} (torch.compile, Lightning "
                          "or a wrapper module), which the model's names do not: read without it", Note, stacklevel=4)
            return out
    return state_dict


INPUT_META_KEYS = ("mean", "std", "input_shape", "classes")


def apply_input_meta(meta: dict[str, Any], given: dict[str, Any] | None, *, source: str) -> dict[str, Any]:
    """``meta`` with the input description the user gave (``--mean``, ``--std``,
    ``--input-shape``, ``--classes``) for a model file that does not carry it. A file that
    records a different value is not silently overridden: that is an error naming both."""
    out = dict(meta)
    given = {k: v for k, v in (given or {}).items() if v is not None}
    for key, value in given.items():
        if key not in INPUT_META_KEYS:
            raise ModelError(f"unknown input description {key!r}; known: {', '.join(INPUT_META_KEYS)}")
        if not isinstance(value, (list, tuple, np.ndarray)):  # a string was split into its characters
            raise ModelError(f"{source}: input_meta[{key!r}] takes a list (one value per "
                             f"{'channel' if key in ('mean', 'std') else 'dimension' if key == 'input_shape' else 'class'}"
                             f"), got {type(value).__name__} {value!r:.40}")
        value = list(value)
        if key in out and out[key] is not None:
            same = (np.allclose(np.asarray(out[key], float), np.asarray(value, float))
                    if key in ("mean", "std") and len(out[key]) == len(value) else list(out[key]) == value)
            if not same:
                raise ModelError(f"{source}: records {key} {list(out[key])}, but --{key.replace('_', '-')} gives "
                                 f"{value}; leave the option out for a file that describes its inputs")
        out[key] = value
    _check_channels(out, given, source, out.get("input_shape"))
    lone = [k for k in ("mean", "std") if k in given and out.get("std" if k == "mean" else "mean") is None]
    if lone:  # it was dropped: the dataset's pair was used, and the note asked for the very option given
        other = "std" if lone[0] == "mean" else "mean"
        raise ModelError(f"{source}: --{lone[0]} is given but no {other} (the file records none): give --mean and "
                         "--std together, one value per input channel each")
    if given:
        out["input_meta_given"] = sorted(set(out.get("input_meta_given", [])) | set(given))
    return out


def _check_channels(meta: dict[str, Any], given: dict[str, Any], source: str, shape) -> None:
    """A given ``--mean``/``--std`` has one value per input channel: the other's count, and
    the channel count of ``shape`` (the input's C, H, W) where it is known (was accepted by
    ``info`` and only failed later, or never, for a command that does not normalise)."""
    want = int(shape[0]) if shape else None
    counts = {k: len(meta[k]) for k in ("mean", "std") if meta.get(k) is not None}
    for key in (k for k in counts if k in given):
        if want is not None and counts[key] != want:
            raise ModelError(f"{source}: --{key} gives {_values(counts[key])} for an input of {want} channel"
                             f"{'s' if want != 1 else ''} (shape {list(shape)}); give one value per channel")
    if len(set(counts.values())) > 1:
        key = next(k for k in counts if k in given)
        other = "std" if key == "mean" else "mean"
        raise ModelError(f"{source}: --{key} gives {_values(counts[key])} but the {other} has {counts[other]}; "
                         "give one value per input channel to both")


def _values(n: int) -> str:
    return f"{n} value{'s' if n != 1 else ''}"


def stored_weights(path: str | Path) -> tuple[dict[str, torch.Tensor], dict[str, Any], str]:
    """``(state_dict, meta, kind)`` of an edgesqueeze checkpoint or model ``.esq`` as stored,
    without building the architecture (so without importing the user's code it names): what
    ``info`` shows and ``unpack`` writes for a file whose code is not trusted."""
    from edgesqueeze._io import not_a_file

    path = Path(path)
    why = not_a_file(path)
    if why:
        raise CheckpointError(f"{path}: {why}")
    with open(path, "rb") as fh:
        head = fh.read(8)
    if head == container.MAGIC:
        state, meta = esq_loads(path.read_bytes(), source=str(path))
        if isinstance(meta.get("program"), dict):
            raise FormatError(f"{path}: holds a {meta['program'].get('kind')} model, which has no checkpoint "
                              "form; eval, export and verify read the .esq as it is")
        if meta.get("format") != ESQ_META_FORMAT or "arch" not in meta:
            raise FormatError(f"{path}: not an edgesqueeze model archive ({_not_model_meta(meta)})")
        return state, meta, "esq"
    try:
        obj = _safe_torch_load(path)
    except _PickleRefused:
        raise CheckpointError(f"{path}: not an edgesqueeze checkpoint (it holds a pickled object)") from None
    if not (isinstance(obj, dict) and obj.get("format") in (FORMAT, TRAIN_STATE_FORMAT)):
        raise CheckpointError(f"{path}: not an edgesqueeze checkpoint")
    return dict(obj["state_dict"]), _checkpoint_meta(path, obj), "checkpoint"


def _checkpoint_meta(path: Path, obj: dict) -> dict[str, Any]:
    """The metadata of an edgesqueeze checkpoint dict, its format version checked."""
    if obj.get("format_version") != FORMAT_VERSION:
        raise CheckpointError(f"{path}: checkpoint format version {obj.get('format_version')!r} is not "
                              f"supported (this edgesqueeze reads {FORMAT_VERSION})")
    try:
        return json.loads(obj["meta_json"])
    except (KeyError, TypeError, json.JSONDecodeError) as exc:
        raise CheckpointError(f"{path}: metadata is unreadable ({exc})") from None


def load_model(
    path: str | Path,
    *,
    arch: str | None = None,
    arch_kwargs: dict[str, Any] | None = None,
    trust_pickle: bool = False,
    input_meta: dict[str, Any] | None = None,
    default_dataset: str | None = None,
) -> LoadedModel:
    """Load any supported model file, safely. The returned model is in eval mode.

    ``arch`` (and ``arch_kwargs``, e.g. ``{"num_classes": 10}``) is required for a plain
    ``state_dict``: a registered name or the user's own ``package.module:Class``. An
    edgesqueeze checkpoint knows its own architecture; ``arch`` overrides it only where the
    file names the user's code (to say where that code is now). ``input_meta`` (``mean``,
    ``std``, ``input_shape``, ``classes``) describes the inputs of a file that does not
    (TorchScript, ``.pt2``, a pickle, a state_dict): see :func:`apply_input_meta`.
    ``default_dataset`` (a recipe's ``data.dataset``) stands in for the dataset of a file
    that records none; a file's own dataset is kept.
    """
    if not isinstance(path, (str, os.PathLike)) or isinstance(path, bytes):
        raise CheckpointError(f"load_model takes the path of a model file, got {type(path).__name__} {path!r:.60}")
    loaded = _load_model(Path(path), arch, arch_kwargs, trust_pickle, input_meta)
    _check_finite(loaded.model, str(path))
    if input_meta and any(input_meta.get(k) is not None for k in ("classes", "input_shape")):
        _check_given_inputs(loaded, str(path))
    if input_meta and not loaded.meta.get("input_shape"):
        from edgesqueeze.models.registry import registered_input_shape

        _check_channels(loaded.meta, input_meta, str(path),
                        registered_input_shape(loaded.meta.get("arch"), loaded.meta.get("arch_kwargs")))
    if default_dataset and not loaded.meta.get("dataset"):
        loaded.meta["dataset"] = default_dataset
    return loaded


def _check_finite(model: nn.Module, source: str) -> None:
    """Refuse (CheckpointError) weights holding NaN or infinity, naming the tensor: each command
    failed its own way on one (eval scored 10% with a nan loss and exit 0, compress called its
    own round trip a bug or told to lower the lr, export wrote a model at chance with exit 0).
    Parameters and BatchNorm statistics only: a buffer may hold -inf on purpose (a mask)."""
    tensors = list(model.named_parameters())
    tensors += [(n, t) for n, t in model.named_buffers() if n.rsplit(".", 1)[-1] in ("running_mean", "running_var")]
    for name, t in tensors:
        if t.is_floating_point():
            bad = int((~torch.isfinite(t.detach())).sum())
            if bad:
                raise CheckpointError(f"{source}: {name} holds {bad} NaN or infinite value{'s' if bad > 1 else ''} "
                                      f"of {t.numel():,}; a model with them computes nothing meaningful (a training "
                                      "run that diverged?): use a checkpoint from before")


def _check_given_inputs(loaded: LoadedModel, source: str) -> None:
    """``--classes`` / ``--input-shape`` given for a file that does not record them must fit
    the model: one class name per output, an input it runs on. Was accepted as given, so
    ``info`` showed 3 classes and ``inspect`` a [None, 3] output for a 10-logit model."""
    meta = loaded.meta
    classes, shape = meta.get("classes"), meta.get("input_shape")
    if shape:  # one image only: a trace with a fixed batch of 1 is still described (compress says more)
        from edgesqueeze.errors import DataError
        from edgesqueeze.models.probe import reason

        loaded.model.eval()
        try:
            with torch.no_grad():
                out = loaded.model(torch.zeros(1, *[int(d) for d in shape]))
        except Exception as exc:  # noqa: BLE001 - the user's forward can raise anything
            raise DataError(f"{source} does not run on inputs of shape {list(shape)} ({reason(exc)}); "
                            "pass the --input-shape C,H,W it takes") from None
        if classes and isinstance(out, torch.Tensor) and out.dim() == 2 and out.shape[-1] != len(classes):
            raise ModelError(f"{source} outputs {out.shape[-1]} logits but {len(classes)} class names are given "
                             "(--classes); give one name per logit")
        return
    declared = (meta.get("arch_kwargs") or {}).get("num_classes")
    if classes and isinstance(declared, int) and declared != len(classes):
        raise ModelError(f"{source} outputs {declared} logits (its num_classes) but {len(classes)} class names are "
                         "given (--classes); give one name per logit")


def _load_model(path: Path, arch: str | None, arch_kwargs: dict[str, Any] | None, trust_pickle: bool,
                input_meta: dict[str, Any] | None) -> LoadedModel:
    from edgesqueeze.models.imports import is_import_spec

    from edgesqueeze._io import not_a_file

    why = not_a_file(path)
    if why:
        raise CheckpointError(f"{path}: {why}")
    with open(path, "rb") as fh:
        head = fh.read(64)
    not_torch_file(path, head)
    from edgesqueeze.runtime._base import sniff

    if sniff(head) == "esq":  # a Deep Compression archive: decode it on the fly (a damaged header
        # too: the archive reader says what is wrong, not torch.load)
        model, meta = model_from_esq(path, arch=arch, trust_code=trust_pickle)
        return LoadedModel(model, apply_input_meta(meta, input_meta, source=str(path)), "esq", path)
    kind = _zip_kind(path)
    if kind in ("torchscript", "exported_program"):
        if arch is not None:
            what = "a TorchScript archive" if kind == "torchscript" else "a torch.export program"
            warnings.warn(f"{path} is {what}, which carries its own code and weights: the architecture {arch!r} "
                          "(--arch, or the recipe's model.arch) is not used to build it", Note, stacklevel=3)
        _check_crcs(path)  # torch.save files are checked by _safe_torch_load
        model, program = _load_program(path, kind, trust_pickle=trust_pickle)
        low = _not_float32(model)
        if low:  # its graph was traced or scripted in that precision: feeding it float32 failed, blaming the data
            what = "TorchScript archive" if kind == "torchscript" else "torch.export program"
            raise CheckpointError(f"{path}: a {what} with {low} weights; edgesqueeze feeds, compresses and exports "
                                  "float32 models: save it from the float32 model (model.float() before "
                                  f"{'torch.jit.script/trace' if kind == 'torchscript' else 'torch.export'})")
        meta = apply_input_meta({}, input_meta, source=str(path))
        if kind == "exported_program" and "input_shape" not in meta:
            # a program whose graph fixes C,H,W says so (export, bench and eval asked for --input-shape,
            # then refused another one by the program's own guard)
            from edgesqueeze.models.program import program_input_shape

            shape = program_input_shape(program)
            if shape is not None:
                meta["input_shape"] = shape
        return LoadedModel(model, meta, kind, path, program)

    try:
        obj = _safe_torch_load(path)
    except _PickleRefused as refused:
        if kind is None and not _parses_as_pickle(path):  # not a refused pickle: a damaged file
            raise CheckpointError(f"{path}: starts like a legacy torch.save file but does not parse as one "
                                  "(truncated or damaged?); copy or save it again") from None
        if not trust_pickle:
            names = sorted(set(re.findall(r"GLOBAL ([\w.]+)", str(refused))))
            what = f" ({', '.join(names[:3])})" if names else " (e.g. a whole nn.Module)"
            raise CheckpointError(
                f"{path}: holds a pickled Python object{what}; unpickling it can run arbitrary code. Save "
                "model.state_dict() instead and pass --arch, or pass --trust-pickle if you trust where this "
                "file came from."
            ) from None
        obj = _unpickle(path, arch)
        module = obj if isinstance(obj, nn.Module) else _module_in(obj)
        if module is not None:
            return _pickled_module(path, module, arch, arch_kwargs, input_meta)
        # else a dict whose state_dict sits beside other pickled objects (hyperparameters): below

    if isinstance(obj, dict) and obj.get("format") in (FORMAT, TRAIN_STATE_FORMAT):
        meta = _checkpoint_meta(path, obj)
        if "arch" not in meta:  # save_checkpoint(path, model, {}): a KeyError in every command
            if arch is None:
                raise CheckpointError(f"{path}: an edgesqueeze checkpoint whose metadata names no architecture "
                                      "(saved without 'arch'); pass --arch NAME or --arch package.module:Class")
            meta = {**meta, "arch": arch, "arch_kwargs": dict(arch_kwargs or meta.get("arch_kwargs") or {})}
        if arch is not None and is_import_spec(meta.get("arch")) and arch != meta["arch"]:
            meta["arch"] = arch  # the user's code, named where it is now
        elif arch is not None and arch != meta.get("arch"):
            warnings.warn(f"{path} records its architecture {meta.get('arch')!r}, which is used: {arch!r} (--arch, "
                          "or the recipe's model.arch) is not", Note, stacklevel=3)
        model = rebuild(meta["arch"], meta.get("arch_kwargs", {}), folded_batchnorm=meta.get("folded_batchnorm", False),
                        folded_layers=meta.get("folded_layers"), source=str(path),
                        from_file=None if arch == meta["arch"] else str(path), trusted=trust_pickle)
        load_state_dict_checked(model, obj["state_dict"], source=str(path))
        return LoadedModel(model.eval(), apply_input_meta(meta, input_meta, source=str(path)), "checkpoint", path)

    obj = _unwrap_state_dict(obj)
    if isinstance(obj, dict) and (obj or arch) and all(isinstance(v, torch.Tensor) for v in obj.values()):
        if arch is None:
            raise CheckpointError(
                f"{path}: holds a plain state_dict without architecture; pass --arch NAME "
                "(see 'edgesqueeze models') or your class as --arch package.module:Class, with "
                "--arch-kwargs or --num-classes if its defaults do not fit"
            )
        kwargs = dict(arch_kwargs or {})
        model = rebuild(arch, kwargs)
        load_state_dict_checked(model, obj, source=str(path))
        meta = {"arch": arch, "arch_kwargs": dict(model.arch_kwargs)}
        return LoadedModel(model.eval(), apply_input_meta(meta, input_meta, source=str(path)), "state_dict", path)

    keys = (f" with keys {', '.join(map(repr, list(obj)[:6]))}{', ...' if len(obj) > 6 else ''}"
            if isinstance(obj, dict) and obj else "")
    raise CheckpointError(f"{path}: holds a {type(obj).__name__}{keys}, not a model checkpoint or state_dict "
                          f"(a state_dict is read as it is or under one of the keys {', '.join(_STATE_DICT_KEYS)})")


_STATE_DICT_KEYS = ("state_dict", "model_state_dict", "model", "net", "weights")
_EMA_KEYS = ("state_dict_ema", "model_ema", "ema")  # read when no plain one is there (noted when both are)


def _module_in(obj: Any) -> nn.Module | None:
    """The nn.Module a trusted pickle holds under one of the keys training scripts use
    (``{"model": module, "epoch": ...}``, YOLO's ``{"model": ..., "ema": ...}``), or None."""
    if isinstance(obj, dict):
        return next((obj[k] for k in (*_STATE_DICT_KEYS, *_EMA_KEYS) if isinstance(obj.get(k), nn.Module)), None)
    return None


def _not_float32(model: nn.Module) -> str:
    """The floating dtypes other than float32 among ``model``'s weights, as words ('' if none)."""
    return ", ".join(sorted({str(p.dtype).removeprefix("torch.") for p in model.parameters()
                             if p.is_floating_point() and p.dtype != torch.float32}))


def _pickled_module(path: Path, module: nn.Module, arch: str | None, arch_kwargs: dict[str, Any] | None,
                    input_meta: dict[str, Any] | None) -> LoadedModel:
    """A whole nn.Module from a trusted pickle, in float32 (a half-precision one, as YOLO saves
    them, computes what a float32 copy does up to rounding; every runtime here is fed float32)."""
    low = _not_float32(module)
    if low:
        module = module.float()
        warnings.warn(f"{path}: the pickled model's weights are {low}: converted to float32", Note, stacklevel=4)
    meta: dict[str, Any] = {}
    if arch is not None:  # how to rebuild it (an .esq of it needs this): checked against the pickle
        rebuilt = rebuild(arch, dict(arch_kwargs or {}))
        try:
            load_state_dict_checked(rebuilt, module.state_dict(), source=str(path))
        except ModelError as exc:  # a recipe's model.arch, made for state_dicts: the pickle has its own class
            warnings.warn(f"{path} is a pickled {type(module).__name__}, which carries its own class: the "
                          f"architecture {arch!r} (--arch, or the recipe's model.arch) does not fit its weights "
                          f"and is not used ({str(exc).split(': ', 2)[-1].split('. Is --arch')[0]})", Note,
                          stacklevel=4)
        else:
            meta = {"arch": arch, "arch_kwargs": dict(rebuilt.arch_kwargs)}
    return LoadedModel(module.eval(), apply_input_meta(meta, input_meta, source=str(path)), "pickle", path)


def _is_state_dict(obj: Any) -> bool:
    return isinstance(obj, dict) and bool(obj) and all(isinstance(v, torch.Tensor) for v in obj.values())


_SCALARS = (int, float, str, bool, type(None), np.generic)


def _tensors_and_scalars(obj: Any) -> bool:
    """A state_dict with a few plain values among its tensors (``sd["epoch"] = 3``)."""
    return (isinstance(obj, dict) and any(isinstance(v, torch.Tensor) for v in obj.values())
            and all(isinstance(v, (torch.Tensor, *_SCALARS)) for v in obj.values()))


def _unwrap_state_dict(obj: Any) -> Any:
    """The state_dict inside the layouts training scripts commonly save, as timm's and
    Lightning's loaders read them: ``{"state_dict": sd, "epoch": ...}``, ``{"model": sd}``,
    ``{"model_state_dict": sd, "optimizer_state_dict": ...}``; and the ``module.`` prefix
    ``nn.DataParallel`` / DDP put on every key. Anything else comes back as it was."""
    if isinstance(obj, dict) and not _is_state_dict(obj) and not _tensors_and_scalars(obj):
        key = next((k for k in (*_STATE_DICT_KEYS, *_EMA_KEYS) if _is_state_dict(obj.get(k))
                    or _tensors_and_scalars(obj.get(k))), None)
        if key is not None:
            ema = [k for k in _EMA_KEYS if k != key and _is_state_dict(obj.get(k))]
            if key not in _EMA_KEYS and ema:
                warnings.warn(f"the file also holds averaged (EMA) weights under {ema[0]!r}; read are those "
                              f"under {key!r}. For the EMA ones, save that entry alone: "
                              f"torch.save(ckpt[{ema[0]!r}], 'ema.pt')", Note, stacklevel=4)
            obj = obj[key]
    if _tensors_and_scalars(obj) and not _is_state_dict(obj):
        extra = [k for k, v in obj.items() if not isinstance(v, torch.Tensor)]
        warnings.warn(f"the state_dict's entries {', '.join(map(repr, extra[:4]))} are not tensors (training "
                      "bookkeeping?): left out", Note, stacklevel=4)
        obj = {k: v for k, v in obj.items() if isinstance(v, torch.Tensor)}
    if _is_state_dict(obj) and all(k.startswith("module.") for k in obj):
        obj = {k.removeprefix("module."): v for k, v in obj.items()}
    return obj


def _load_program(path: Path, kind: str, *, trust_pickle: bool = False) -> tuple[nn.Module, Any]:
    """A TorchScript archive or a ``torch.export`` program: ``(module ready to run in eval
    mode, the ScriptModule or ExportedProgram itself)``. A program that would unpickle Python
    objects (weights saved with pickle, custom objects) is refused unless ``trust_pickle``."""
    import warnings

    from edgesqueeze.models.program import PickleInProgram, load_exported

    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", DeprecationWarning)  # torch.jit.load: "switch to torch.export"
            if kind == "torchscript":
                ts = torch.jit.load(str(path), map_location="cpu").eval()
                return ts, ts
            program = load_exported(str(path), trust_pickle=trust_pickle)
    except PickleInProgram as exc:
        raise CheckpointError(f"{path}: this torch.export archive holds {exc}; unpickling it can run arbitrary "
                              "code. Pass --trust-pickle if you trust where this file came from.") from None
    except Exception as exc:  # torch raises many types for a broken archive
        what = "TorchScript archive" if kind == "torchscript" else "torch.export archive"
        raise CheckpointError(f"{path}: broken {what} ({_first_line(exc)})") from None
    from edgesqueeze.models.program import KIND_ATTR, check_batch_free, runnable

    try:
        model = runnable(program)
    except ModelError as exc:
        raise CheckpointError(f"{path}: {exc}") from None
    check_batch_free(model, str(path))
    setattr(model, KIND_ATTR, kind)
    return model, program


def _unpickle(path: Path, arch: str | None = None) -> Any:
    """``torch.load`` with ``weights_only=False`` (the user said they trust the file); a class
    that cannot be found is one line naming it, not a traceback. A model pickled from a script
    names its class ``__main__.Net``, which no other program has: ``arch``
    (``--arch mypkg.nets:Net``) says where that class is now; so it does for a class whose
    module (``nets.Net``, pickled beside ``nets.py``) cannot be imported here."""
    import types

    from edgesqueeze.models.imports import cwd_importable, is_import_spec, resolve

    kwargs: dict[str, Any] = {}
    if is_import_spec(arch):
        cls = resolve(arch)
        # the module --arch names: a class the pickle takes from a module not importable here
        # (nets.Net and its nets.Block, pickled elsewhere, or from a script's __main__) is
        # looked up there by name, not only the one class --arch names
        home = sys.modules.get(getattr(cls, "__module__", ""))

        def _in_home(name):
            if name == getattr(cls, "__name__", None):
                return cls
            found = getattr(home, name, None)
            return found if isinstance(found, type) or callable(found) else None

        class _Relocating(pickle.Unpickler):
            def find_class(self, module, name):
                if module == "__main__" and _in_home(name) is not None:
                    return _in_home(name)
                try:
                    return super().find_class(module, name)
                except (ModuleNotFoundError, AttributeError):
                    if _in_home(name) is not None:
                        return _in_home(name)
                    raise

        kwargs["pickle_module"] = types.SimpleNamespace(**{**vars(pickle), "Unpickler": _Relocating})
    try:
        with cwd_importable():  # as for --arch package.module:Class
            return torch.load(path, map_location="cpu", weights_only=False, **kwargs)
    except (AttributeError, ModuleNotFoundError, ImportError) as exc:
        main = "__main__" in str(exc)
        raise CheckpointError(f"{path}: the pickled model's class cannot be found ({_first_line(exc)}); "
                              "unpickling needs the code that defined it importable here"
                              + ("; it was pickled from a script (__main__): pass --arch path/to/script.py:Class"
                                 if main else "; pass --arch path/to/file.py:Class to say where that class is")
                              + ". Better: save model.state_dict() and pass --arch package.module:Class") from None
    except Exception as exc:  # noqa: BLE001 - unpickling can raise anything
        raise CheckpointError(f"{path}: cannot unpickle ({_first_line(exc)})") from None


# ---------------------------------------------------------------------------------------
# .esq archives: the torch side of edgesqueeze.format


PROGRAM_TENSOR = "__program__"  # uint8: the LZMA-compressed same-kind skeleton of a program archive


def program_tensor(skeleton: bytes) -> torch.Tensor:
    """The skeleton of a TorchScript / ``torch.export`` model as the raw uint8 tensor a
    program-kind ``.esq`` stores beside the weights (LZMA, fixed settings: same bytes in,
    same bytes out)."""
    import lzma

    packed = lzma.compress(skeleton, format=lzma.FORMAT_XZ, check=lzma.CHECK_CRC64, preset=9 | lzma.PRESET_EXTREME)
    return torch.frombuffer(bytearray(packed), dtype=torch.uint8)


def _program_from_esq(state: dict[str, torch.Tensor], meta: dict) -> nn.Module:
    """The model of a program-kind archive: its skeleton with the decoded weights copied in,
    a TorchScript module or a program's runnable module, as the source was."""
    import lzma

    from edgesqueeze.models.program import KIND_ATTR, restore

    kind = meta["program"].get("kind")
    blob = state.pop(PROGRAM_TENSOR, None)
    if kind not in ("torchscript", "exported_program") or blob is None:
        raise FormatError(f"meta.program: a program archive needs kind torchscript or exported_program and "
                          f"the tensor {PROGRAM_TENSOR}")
    try:
        skeleton = lzma.decompress(blob.numpy().tobytes())
    except lzma.LZMAError as exc:
        raise FormatError(f"{PROGRAM_TENSOR}: not an LZMA stream ({exc})") from None
    model = restore(kind, skeleton, state)
    if kind == "exported_program":
        setattr(model, KIND_ATTR, kind)
    return model.eval()


def state_dict_to_arrays(state_dict: dict[str, torch.Tensor]) -> dict[str, np.ndarray]:
    """The numpy arrays the codec encodes: the same bits, detached, on the CPU. A dtype numpy
    has no equivalent for (bfloat16, complex) is refused here, as the codec refuses one it
    does not store."""
    out = {}
    for name, t in state_dict.items():
        dtype = str(t.dtype).removeprefix("torch.")
        if dtype not in codec.STORABLE_DTYPES:
            raise FormatError(f"tensor {name}: dtype {dtype} cannot be stored")
        out[name] = t.detach().cpu().numpy()
    return out


def state_dict_from_arrays(arrays: dict[str, np.ndarray]) -> dict[str, torch.Tensor]:
    """Tensors sharing the decoded arrays' memory (the codec returns fresh, writable arrays)."""
    return {name: torch.from_numpy(a) for name, a in arrays.items()}


def esq_dumps(state_dict: dict[str, torch.Tensor], meta: dict, **kwargs: Any) -> tuple[bytes, list]:
    """``.esq`` bytes of a torch state_dict and the codec's per-tensor stats; ``kwargs`` go
    to :func:`edgesqueeze.format.codec.encode_state_dict` (``shared``, ``codebook_dtype``,
    ``chunk``)."""
    return codec.dumps_model(state_dict_to_arrays(state_dict), meta, **kwargs)


def esq_loads(data: bytes, *, source: str | None = None) -> tuple[dict[str, torch.Tensor], dict]:
    """The tensors (bit-exact) and metadata of ``.esq`` bytes; ``source`` (the file) starts
    every error. A packed ``.onnx.esq`` / ``.tflite.esq`` is refused with what reads it."""
    from edgesqueeze.format.packed import PACKED_KEY, is_packed, not_a_model_archive

    try:
        try:
            archive = container.loads(data)
        except FormatError as exc:  # what to do, as unpack, inspect, bench and run say
            raise FormatError(container.with_advice(exc)) from None
        if is_packed(archive):
            raise FormatError(not_a_model_archive(archive.meta[PACKED_KEY]))
        arrays = codec.decode_sections(archive)
    except FormatError as exc:
        raise FormatError(f"{source}: {exc}" if source else str(exc)) from None
    return state_dict_from_arrays(arrays), archive.meta


def model_from_esq(data: bytes | str | Path, *, arch: str | None = None,
                   trust_code: bool = False) -> tuple[nn.Module, dict]:
    """Rebuild the model an ``.esq`` archive holds (decoding every weight bit-exactly).

    ``arch`` relocates the user's own code the archive names (see :func:`load_model`); without
    it, that code is imported only with ``trust_code``."""
    from edgesqueeze.models.imports import is_import_spec

    raw = Path(data).read_bytes() if isinstance(data, (str, Path)) else data
    where = str(data) if isinstance(data, (str, Path)) else None
    state, meta = esq_loads(raw, source=where)
    if meta.get("format") == ESQ_META_FORMAT and isinstance(meta.get("program"), dict):
        return _program_from_esq(state, meta), meta
    if meta.get("format") != ESQ_META_FORMAT or "arch" not in meta:
        raise FormatError(f"{where or 'archive'}: meta: not an edgesqueeze model archive ({_not_model_meta(meta)})")
    if arch is not None and is_import_spec(meta["arch"]) and arch != meta["arch"]:
        meta["arch"] = arch
    elif arch is not None and arch != meta["arch"]:  # as for a checkpoint: said, not silently dropped
        warnings.warn(f"{where or 'the archive'} records its architecture {meta['arch']!r}, which is used: {arch!r} "
                      "(--arch, or the recipe's model.arch) is not", Note, stacklevel=3)
    source = str(data) if not isinstance(data, bytes) else "archive"
    model = rebuild(meta["arch"], meta.get("arch_kwargs", {}), folded_batchnorm=bool(meta.get("folded_batchnorm")),
                    folded_layers=meta.get("folded_layers"), source=source,
                    from_file=None if arch == meta["arch"] else source, trusted=trust_code)
    load_state_dict_checked(model, state, source=source)
    return model.eval(), meta
