"""ONNX export, fp32, with the artifact metadata embedded.

fp32: ``torch.export`` then ``torch.onnx.export(dynamo=True)`` (the current exporter; the
TorchScript one is deprecated and slated for removal). It handles every edgesqueeze model
cleanly, folds eval-mode BatchNorm into the convs, and keeps the batch dimension symbolic.
Only a ``torch.jit.ScriptModule`` (which ``torch.export`` cannot trace) goes through the
TorchScript exporter. The file is one self-contained ``.onnx`` (weights embedded), input
``"input"`` (N, C, H, W) float32, output ``"logits"`` (N, classes), checked with the ONNX
checker and strict shape inference, the artifact metadata in ``metadata_props`` under
:data:`~edgesqueeze.export._common.META_KEY`. Nodes are renamed after the torch modules
they come from (``features.3.squeeze``), so layer names mean the same in torch, in the
ONNX graph and in ``float_layers``.

INT8 export (QDQ, calibration, bias correction, the weights' storage per target CPU) is
:mod:`edgesqueeze.export.onnx_int8`.
"""

from __future__ import annotations

import ast
import contextlib
import copy
import io
import logging
import os
import re
import threading
import warnings
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import torch
from torch import nn

from edgesqueeze._io import native_stderr, write_bytes_atomic
from edgesqueeze.format.seal import seal
from edgesqueeze.errors import ExportError, FormatError
from edgesqueeze.export._common import META_KEY, artifact_meta, meta_json
from edgesqueeze.export._common import first_line as _first_line

__all__ = ["export_onnx", "onnx_graph", "read_onnx_meta", "INPUT_NAME", "OUTPUT_NAME"]

INPUT_NAME = "input"
OUTPUT_NAME = "logits"
_MAX_PROTO = 2 ** 31 - 1  # protobuf's limit: beyond it ONNX needs external data, which we refuse



# ---------------------------------------------------------------------------------------
# torch -> ONNX graph


class _Normalized(nn.Module):
    """``model((x - mean) / std)``: the graph takes pixels / 255 (``fold_normalization``)."""

    def __init__(self, model: nn.Module, mean: Sequence[float], std: Sequence[float]) -> None:
        super().__init__()
        self.model = model
        self.register_buffer("mean", torch.tensor(mean, dtype=torch.float32).view(1, -1, 1, 1))
        self.register_buffer("inv_std", 1.0 / torch.tensor(std, dtype=torch.float32).view(1, -1, 1, 1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.model((x - self.mean) * self.inv_std)


@contextlib.contextmanager
def _quiet() -> Iterator[None]:
    """The exporter and the quantizer talk a lot (deprecation warnings, 'torchvision is not
    installed' per op, progress prints, ORT's 'consider pre-processing'); keep it out of the
    user's terminal. Errors still propagate."""
    root = logging.getLogger()
    loggers = [root, logging.getLogger("torch.onnx"), logging.getLogger("torch.export")]
    levels = [lg.level for lg in loggers]
    for lg in loggers:
        lg.setLevel(logging.ERROR)
    try:  # torch.export configures its loggers again during a trace, with handlers holding the real
        # stderr ("W... symbolic_shapes.py] Unable to find user code" and the whole graph): fd 2 too
        with warnings.catch_warnings(), contextlib.redirect_stdout(io.StringIO()), \
                native_stderr(keep=lambda line: False):
            warnings.simplefilter("ignore")
            yield
    finally:
        for lg, level in zip(loggers, levels):
            lg.setLevel(level)


_REGISTRY = threading.local()  # .on: this thread is inside _registry_built_once
_REGISTRIES: dict[Any, Any] = {}
_REGISTRY_LOCK = threading.Lock()


def _install_registry_cache() -> bool:
    """Wrap torch's ``ONNXRegistry.from_torchlib`` (once per process) so that, inside
    :func:`_registry_built_once`, a table built earlier for the same opset is handed out again.
    False where this torch has no such method (the exporter then builds its own, as before)."""
    try:
        from torch.onnx._internal.exporter import _registration
        registry_cls = _registration.ONNXRegistry
        build = registry_cls.__dict__["from_torchlib"].__func__  # the classmethod's function
    except (ImportError, AttributeError, KeyError):
        return False
    if getattr(build, "_edgesqueeze_cached", False):
        return True

    def from_torchlib(cls, *args, **kwargs):
        if cls is not registry_cls or not getattr(_REGISTRY, "on", False):
            return build(cls, *args, **kwargs)
        key = (args, tuple(sorted(kwargs.items())))
        with _REGISTRY_LOCK:
            if key not in _REGISTRIES:
                _REGISTRIES[key] = build(cls, *args, **kwargs)
            return _REGISTRIES[key]

    from_torchlib._edgesqueeze_cached = True  # type: ignore[attr-defined]
    from_torchlib.__doc__, from_torchlib.__wrapped__ = build.__doc__, build  # type: ignore[attr-defined]
    registry_cls.from_torchlib = classmethod(from_torchlib)
    return True


@contextlib.contextmanager
def _registry_built_once() -> Iterator[None]:
    """``torch.onnx.export`` builds its table of ATen-to-ONNX functions anew on every call
    (``ONNXRegistry.from_torchlib``: 0.4 s warm, up to 1 s cold; converting a small model
    takes 1.5-3 s). The table only changes with the opset and a ``custom_translation_table``,
    which edgesqueeze never passes, and the exporter only reads it; so inside this context
    (this thread only) the first one built for an opset is used again. Other callers of the
    exporter, and other threads, get torch's own behaviour."""
    if not _install_registry_cache():
        yield
        return
    before = getattr(_REGISTRY, "on", False)
    _REGISTRY.on = True
    try:
        yield
    finally:
        _REGISTRY.on = before


def _chain_text(exc: BaseException) -> str:
    """The messages of ``exc`` and its causes: the exporter wraps the useful one."""
    seen, parts = set(), []
    while exc is not None and id(exc) not in seen:
        seen.add(id(exc))
        parts.append(str(exc))
        exc = exc.__cause__ or exc.__context__
    return "\n".join(parts)


_OP_PATTERNS = (r"No ONNX function found for <OpOverload\(op='([\w.]+)', overload='(\w+)'\)>",
                r"target=torch\.ops\.([\w.]+)\]")


def _module_of(program, node_name: str | None, op: str | None) -> str | None:
    """``'name' (Type)`` of the innermost module that emitted the FX node ``node_name`` (or
    the first node calling ``op``), looked up in the exported program and, failing that, in
    its core-ATen decomposition (the exporter translates decomposed nodes)."""
    graphs = [lambda: program.graph, lambda: program.run_decompositions().graph]
    for get in graphs:
        try:
            nodes = [n for n in get().nodes if n.op == "call_function"]
        except Exception:
            continue
        hit = next((n for n in nodes if op and str(n.target) == op), None)
        if hit is None and node_name:
            hit = next((n for n in nodes if n.name == node_name), None)
        stack = hit.meta.get("nn_module_stack") if hit is not None else None
        if stack:
            path, kind = list(stack.values())[-1]
            kind = getattr(kind, "__name__", str(kind)).rsplit(".", 1)[-1]
            return f"'{path}' ({kind})" if path else f"<root> ({kind})"
    return None


def _conversion_error(program, exc: BaseException, what: str, opset: int, prefix: str) -> ExportError:
    text = _chain_text(exc)
    op = None
    if m := re.search(_OP_PATTERNS[0], text):
        op = f"{m.group(1)}.{m.group(2)}"
    elif m := re.search(_OP_PATTERNS[1], text):
        op = m.group(1)
    node = m.group(1) if (m := re.search(r"Error when translating node %(\w+)", text)) else None
    where = _module_of(program, node, op) if (op or node) else None
    if where and prefix and where.startswith(f"'{prefix}"):
        where = "'" + where[len(prefix) + 1:]
    reason = _first_line(exc.__cause__ or exc) if op else _first_line(exc)
    if op and where:
        return ExportError(f"cannot export {what} to ONNX (opset {opset}): op {op} in module {where} "
                           f"has no ONNX translation; replace that module with supported ops")
    if op:
        return ExportError(f"cannot export {what} to ONNX (opset {opset}): op {op} has no ONNX "
                           f"translation ({reason})")
    return ExportError(f"cannot export {what} to ONNX (opset {opset}): {type(exc).__name__}: {reason}")


def _export_dynamo(module: nn.Module, sample: torch.Tensor, what: str, opset: int, prefix: str):
    batch = torch.export.Dim("batch", min=1, max=1 << 16)
    with _quiet():
        try:
            program = torch.export.export(module, (sample,), dynamic_shapes=({0: batch},), strict=False)
        except Exception as exc:  # data-dependent control flow, unsupported Python...
            todo = ("; replace Python control flow on tensor values (an 'if' on x.sum()) with torch.where or "
                    "torch.cond" if "data-dependent" in str(exc) else "")
            raise ExportError(f"torch.export cannot trace {what}: {_first_line(exc)}{todo}") from exc
        try:
            with _registry_built_once():
                onnx_program = torch.onnx.export(program, dynamo=True, opset_version=opset,
                                                 input_names=[INPUT_NAME], output_names=[OUTPUT_NAME],
                                                 optimize=True, verbose=False, external_data=False)
        except Exception as exc:  # ConversionError, DispatchError, ...
            raise _conversion_error(program, exc, what, opset, prefix) from exc
        return onnx_program.model_proto


def _export_torchscript(module: nn.Module, sample: torch.Tensor, what: str, opset: int):
    """For ``torch.jit.ScriptModule`` only: ``torch.export`` cannot trace compiled TorchScript,
    so the (deprecated) TorchScript exporter is the one that can read it."""
    import onnx

    buf = io.BytesIO()
    with _quiet():
        try:
            torch.onnx.export(module, (sample,), buf, dynamo=False, opset_version=opset,
                              input_names=[INPUT_NAME], output_names=[OUTPUT_NAME],
                              dynamic_axes={INPUT_NAME: {0: "batch"}, OUTPUT_NAME: {0: "batch"}})
        except Exception as exc:
            text = _chain_text(exc)
            m = re.search(r"operator '?([\w:.]+)'? to ONNX", text)
            op = f" op {m.group(1)}" if m else ""
            raise ExportError(f"cannot export TorchScript {what} to ONNX (opset {opset}):{op} "
                              f"{_first_line(exc)}") from exc
    return onnx.load_from_string(buf.getvalue())


_WEIGHTED = ("Conv", "ConvTranspose", "Gemm", "MatMul")


def _rename_nodes(proto, prefix: str) -> None:
    """Name each node after the torch module that emitted it (``features.3.squeeze`` for a
    conv, ``features.3/cat`` for the Fire's concat) and drop the exporter's per-node
    metadata (stack traces with absolute paths: bulky, and not reproducible across machines)."""
    inits = {i.name for i in proto.graph.initializer}
    used: set[str] = set()
    for node in proto.graph.node:
        # A conv is named by its weight (after BatchNorm folding the fused node carries the
        # BN's scope, but the weight keeps the conv's name); anything else by its scope.
        weight = node.input[1] if len(node.input) > 1 and node.input[1] in inits else ""
        scopes = None
        for prop in node.metadata_props:
            if prop.key == "pkg.torch.onnx.name_scopes":
                with contextlib.suppress(ValueError, SyntaxError):
                    scopes = ast.literal_eval(prop.value)
        del node.metadata_props[:]
        if not scopes or len(scopes) < 2:
            used.add(node.name)
            continue
        path, op = str(scopes[-2]), str(scopes[-1])
        if node.op_type in _WEIGHTED and weight.endswith(".weight"):
            path = weight[:-len(".weight")]
        if prefix and path.startswith(prefix):
            path = path[len(prefix):]
        elif prefix and path == prefix.rstrip("."):
            path = ""
        base = path if node.op_type in _WEIGHTED and path else (
            f"{path}/{op}" if path else op)
        name, k = base, 1
        while name in used:
            k += 1
            name = f"{base}_{k}"
        used.add(name)
        node.name = name


def _check(proto) -> None:
    """The ONNX checker, then strict shape inference with type checks; ExportError if not."""
    import onnx

    try:
        onnx.checker.check_model(proto)
        onnx.shape_inference.infer_shapes(proto, check_type=True, strict_mode=True)
    except (onnx.checker.ValidationError, onnx.shape_inference.InferenceError) as exc:
        raise ExportError(f"the exported ONNX graph is invalid: {_first_line(exc)}") from exc


def _artifact(model: nn.Module, meta: dict[str, Any], fmt: str, fold_normalization: bool,
              **kw: Any) -> dict[str, Any]:
    if not isinstance(model, nn.Module):
        raise ExportError(f"export needs a torch nn.Module, got {type(model).__name__}")
    return artifact_meta(meta, fmt, normalization="in-graph" if fold_normalization else "caller", **kw)


def _check_opset(opset: int) -> None:
    if isinstance(opset, bool) or not isinstance(opset, int) or not 18 <= opset <= 23:
        # torch.onnx's exporter writes opset 18 at least: asked for 17, it wrote 18 without a word
        raise ExportError(f"opset must be an integer in 18..23, got {opset!r}")


def onnx_graph(model: nn.Module, meta: dict[str, Any], *, opset: int = 18,
               fold_normalization: bool = False):
    """``model`` as a checked fp32 ``onnx.ModelProto`` without artifact metadata (the common
    first step of both exports). ``model`` is not modified (an eval-mode copy is exported)."""
    _check_opset(opset)
    art = _artifact(model, meta, "onnx", fold_normalization)
    module = copy.deepcopy(model).cpu().eval()
    what = type(model).__name__
    if fold_normalization:
        module = _Normalized(module, art["mean"], art["std"]).eval()
    sample = torch.rand(2, *art["input_shape"])  # batch 2: a batch of 1 could be specialised
    if isinstance(model, torch.jit.ScriptModule):
        if fold_normalization:
            raise ExportError("fold_normalization is not supported for TorchScript models; "
                              "export the checkpoint it came from")
        proto = _export_torchscript(module, sample, what, opset)
    else:
        prefix = "model." if fold_normalization else ""
        proto = _export_dynamo(module, sample, what, opset, prefix)
        _rename_nodes(proto, prefix)
    _check_no_external(proto)
    _check(proto)
    return proto


def own_onnx_graph(model: nn.Module, meta: dict[str, Any], *, opset: int, fold_normalization: bool,
                   graph: Any = None):
    """A graph the caller may modify: a copy of ``graph`` (the caller's :func:`onnx_graph` of
    the same ``model``, ``opset`` and ``fold_normalization``, left as it is) if given, else
    :func:`onnx_graph` converted now."""
    if graph is None:
        return onnx_graph(model, meta, opset=opset, fold_normalization=fold_normalization)
    import onnx

    proto = onnx.ModelProto()
    proto.CopyFrom(graph)
    return proto


def _check_no_external(proto) -> None:
    import onnx

    for init in proto.graph.initializer:
        if init.data_location == onnx.TensorProto.EXTERNAL:
            raise ExportError(f"initializer {init.name} refers to external data; the exporter "
                              "was expected to embed every weight")


def _write(proto, metadata: dict[str, str], out: str | os.PathLike) -> Path:
    """Set ``metadata_props``, check, serialise, write atomically."""
    import onnx

    del proto.metadata_props[:]
    onnx.helper.set_model_props(proto, metadata)
    _check(proto)
    if proto.ByteSize() > _MAX_PROTO:
        raise ExportError(f"the model is {proto.ByteSize():,} bytes, over ONNX's 2 GB single-file "
                          "limit; edgesqueeze writes weights embedded only")
    out = Path(out)
    write_bytes_atomic(out, seal(proto.SerializeToString()))  # its own CRC-32 in its metadata
    return out


def read_onnx_meta(path_or_proto) -> dict[str, Any]:
    """The artifact metadata of an ``.onnx`` file (or ModelProto) written by edgesqueeze."""
    import json

    import onnx

    proto = path_or_proto
    if not isinstance(proto, onnx.ModelProto):
        proto = onnx.load(str(path_or_proto), load_external_data=False)
    where = "model" if isinstance(path_or_proto, onnx.ModelProto) else str(path_or_proto)
    props = {p.key: p.value for p in proto.metadata_props}
    if META_KEY not in props:
        raise FormatError(f"{where}: no '{META_KEY}' metadata; not written by edgesqueeze")
    try:
        return json.loads(props[META_KEY])
    except json.JSONDecodeError as exc:
        raise FormatError(f"{where}: '{META_KEY}' metadata is not JSON ({exc})") from None


# ---------------------------------------------------------------------------------------
# fp32


def export_onnx(model: nn.Module, meta: dict[str, Any], out: str | os.PathLike, *, opset: int = 18,
                fold_normalization: bool = False, source_sha256: str | None = None,
                graph: Any = None) -> Path:
    """Write ``model`` as a float32 ``.onnx`` with the artifact metadata embedded.

    Input ``"input"``: float32 (batch, C, H, W), batch dynamic; output ``"logits"``. Feed
    ``(pixels/255 - mean) / std`` (``_common.to_input``), or with ``fold_normalization``
    ``pixels/255``: the graph normalizes. ``opset`` 18..23. Raises ExportError naming the
    module and op the exporter cannot handle; ``out`` is written atomically. ``graph``:
    :func:`onnx_graph` of the same ``model``, ``opset`` and ``fold_normalization`` if the
    caller has it (an export of onnx and onnx-int8 converts once); not modified.
    """
    art = _artifact(model, meta, "onnx", fold_normalization, source_sha256=source_sha256)
    proto = own_onnx_graph(model, meta, opset=opset, fold_normalization=fold_normalization, graph=graph)
    return _write(proto, {META_KEY: meta_json(art)}, out)


# ---------------------------------------------------------------------------------------
# INT8
