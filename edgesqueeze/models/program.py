"""Models without their Python class: TorchScript archives and ``torch.export`` programs made
into ordinary ``nn.Module`` trees that compression can work on, and saved back as the kind of
file they came from.

Compression finds its layers with ``isinstance(m, (nn.Conv2d, nn.Linear))``, hooks them, edits
``m.weight`` in place, folds BatchNorm with ``torch.fx`` and stores state_dicts. A program's
module (``ExportedProgram.module()``) has none of that: its convolutions are ``aten`` calls on
parameters held by bare ``nn.Module`` containers, and it refuses ``.eval()``. The way in:

* :func:`to_exported_program`: an ``nn.Module`` through ``torch.export.export`` (non-strict),
  a TorchScript module through ``torch._export.converter.TS2EPConverter``; a failure is one
  :class:`~edgesqueeze.errors.ModelError` line.
* :func:`runnable`: the program's module, callable with ``.eval()``/``.train()``, computing
  the eval-mode function, with exactly the program's ``state_dict`` keys.
* :func:`lift`: that module (an ``fx.GraphModule``) with every conv2d / linear / eval
  batch_norm call on parameters turned into a call to a real ``nn.Conv2d`` / ``nn.Linear`` /
  ``nn.BatchNorm2d`` (``BatchNorm1d`` for 2-D/3-D inputs) registered where the weights lived,
  holding the same tensors: same ``state_dict`` keys, same outputs, and a model that hooks,
  in-place weight edits, ``fx.symbolic_trace`` (so ``fold_batchnorm``), deepcopy,
  ``torch.export`` and the ONNX exporter all handle.
* :func:`program_skeleton` / :func:`restore`: the archive of the same kind with the weights
  zeroed (a few KB once compressed), and that archive refilled from a state_dict.

Graph forms recognised by :func:`lift` (torch 2.13): ``aten.conv2d.default`` /
``aten.conv2d.padding`` (``torch.export`` and scripted TorchScript), ``aten.convolution.default``
(traced TorchScript through the converter, and decomposed programs) when not transposed;
``aten.linear.default``, and ``aten.addmm(b, x, W.T)`` / ``aten.mm(x, W.T)`` with ``W.T`` an
``aten.t`` / ``aten.permute([1, 0])`` / ``aten.transpose(0, 1)`` of the weight (decomposed
programs); ``aten.batch_norm.default`` with ``training=False`` and
``aten._native_batch_norm_legit_no_training.default`` whose only use is its output ``[0]``.
A call is lifted only when its weights are ``<owner>.weight`` (``.bias``, ``.running_mean``...)
of one bare container module at a non-empty path that holds nothing else, and every call on
that owner agrees on the hyperparameters; anything else stays as it was.
"""

from __future__ import annotations

import contextlib
import copy
import io
import json
import logging
import operator
import warnings
import zipfile
from collections.abc import Iterator
from typing import Any

import torch
from torch import fx, nn

from edgesqueeze._io import native_stderr
from edgesqueeze.errors import ModelError

__all__ = ["KINDS", "lift", "program_input_shape", "program_skeleton", "restore", "runnable",
           "to_exported_program"]

KINDS = ("torchscript", "exported_program")
_ZEROED_FILE = "edgesqueeze_zeroed.json"  # extra file in a skeleton: the names zeroed in it



def program_input_shape(program) -> list[int] | None:
    """A torch.export program's one user input less its batch dimension, where the graph fixes
    every one of those dimensions (None where one is symbolic, the program takes more than one
    input, or ``program`` is not an ``ExportedProgram``)."""
    if not isinstance(program, torch.export.ExportedProgram):
        return None
    user = set(program.graph_signature.user_inputs)
    if len(user) != 1:  # not an image classifier's forward(x): its callers say what to do
        return None
    for node in program.graph.nodes:
        if node.op == "placeholder" and node.name in user:
            dims = list(getattr(node.meta.get("val"), "shape", []))[1:]
            if dims and all(isinstance(d, int) for d in dims):
                return [int(d) for d in dims]
            return None
    return None

_aten = torch.ops.aten


# ---------------------------------------------------------------------------------------
# helpers


def _first_line(exc: BaseException) -> str:
    for line in str(exc).splitlines():
        if line.strip():
            return line.strip()[:200]
    return type(exc).__name__


@contextlib.contextmanager
def _quiet() -> Iterator[None]:
    """The exporter and the converter log errors they recover from ('always_classified is
    unsupported'), warn about every unused buffer and about deprecated pytree classes; keep
    that out of the user's terminal. Exceptions still propagate."""
    names = ["torch"] + [n for n in logging.root.manager.loggerDict if n.startswith("torch")]
    loggers = [logging.getLogger(n) for n in names]
    levels = [lg.level for lg in loggers]
    for lg in loggers:
        lg.setLevel(logging.CRITICAL)
    try:
        # torch.export prints a failed trace's partial graph straight to sys.stderr, and configures
        # its loggers again during a trace (a handler holding the real stderr): file descriptor 2 too
        with warnings.catch_warnings(), contextlib.redirect_stderr(io.StringIO()), \
                contextlib.redirect_stdout(io.StringIO()), native_stderr(keep=lambda line: False):
            warnings.simplefilter("ignore")
            yield
    finally:
        for lg, level in zip(loggers, levels):
            lg.setLevel(level)


def _root_cause(exc: BaseException) -> BaseException:
    """The innermost cause: the export machinery wraps the telling error. Dynamo's own
    wrappers (TorchRuntimeError 'RuntimeError when making fake tensor call') are raised
    ``from None`` in the handler of the real one, so for them the context counts too."""
    seen = {id(exc)}
    while True:
        nxt = exc.__cause__
        if nxt is None and type(exc).__module__.startswith("torch._dynamo"):
            nxt = exc.__context__
        if nxt is None or id(nxt) in seen:
            return exc
        exc = nxt
        seen.add(id(exc))


def _is_script(model: Any) -> bool:
    return isinstance(model, (torch.jit.ScriptModule, torch._C.ScriptModule))


def _describe(model: Any) -> str:
    if _is_script(model):
        name = getattr(model, "original_name", None) or type(model).__name__
        return f"TorchScript module {name}"
    return type(model).__name__


@contextlib.contextmanager
def _eval_mode(model: nn.Module) -> Iterator[None]:
    """``model`` in eval mode for the duration, every module's flag restored afterwards."""
    flags = [(m, m.training) for m in model.modules()]
    model.train(False)
    try:
        yield
    finally:
        for m, flag in flags:
            m.training = flag


def _get_or_make(root: nn.Module, path: str) -> nn.Module | None:
    """The submodule at ``path``, creating empty containers on the way; None if something
    that is not a module is in the way."""
    mod = root
    for part in path.split(".") if path else []:
        child = getattr(mod, part, None)
        if child is None:
            child = nn.Module()
            mod.add_module(part, child)
        if not isinstance(child, nn.Module):
            return None
        mod = child
    return mod


def _set_submodule(root: nn.Module, path: str, module: nn.Module) -> None:
    parent, _, child = path.rpartition(".")
    setattr(root.get_submodule(parent) if parent else root, child, module)


# ---------------------------------------------------------------------------------------
# 1. into a torch.export program


def to_exported_program(model: nn.Module, example_inputs: tuple, *, dynamic_batch: bool = True,
                        what: str | None = None) -> torch.export.ExportedProgram:
    """``model`` (an ``nn.Module`` or a TorchScript ``ScriptModule``) as a
    ``torch.export.ExportedProgram`` of its eval-mode function (training flags are restored).

    An ``nn.Module`` goes through ``torch.export.export(strict=False)``: non-strict tracing
    runs the Python as Python (no Dynamo bytecode analysis), so it is fast and accepts more
    code; it is torch 2.13's default and what edgesqueeze's ONNX exporter uses. With
    ``dynamic_batch`` dimension 0 of every tensor input is ``Dim.AUTO``: the program takes any
    batch size where the model allows it (pass a batch of 2 or more: a batch of 1 is
    specialised, torch's 0/1 rule). A ScriptModule goes through
    ``TS2EPConverter(model, example_inputs).convert()``, which makes every input dimension
    ``Dim.AUTO`` itself, keeps ``model.state_dict()``'s keys (unused entries such as
    ``num_batches_tracked`` are added to the program's state_dict; a TorchScript state_dict
    also holds non-persistent buffers, which become persistent ones) and turns a TorchScript
    ``if`` on a tensor into ``torch.cond`` (which works only when both branches produce
    outputs of the same shape and strides that do not alias their inputs).

    Raises ModelError, one line, when the model cannot be converted (data-dependent control
    flow, unsupported Python or TorchScript constructs).
    """
    if not isinstance(example_inputs, tuple):
        raise ModelError(f"example_inputs must be a tuple of inputs, got {type(example_inputs).__name__}")
    what = what or _describe(model)
    script = _is_script(model)
    if not script and not isinstance(model, nn.Module):
        raise ModelError(f"{what}: not an nn.Module or TorchScript module; cannot be converted to "
                         "a torch.export program")
    try:
        with _quiet(), _eval_mode(model):
            if script:
                from torch._export.converter import TS2EPConverter

                return TS2EPConverter(model, example_inputs).convert()
            dynamic = None
            if dynamic_batch:
                dynamic = tuple({0: torch.export.Dim.AUTO} if isinstance(a, torch.Tensor) and a.dim() else None
                                for a in example_inputs)
            return torch.export.export(model, example_inputs, dynamic_shapes=dynamic, strict=False)
    except Exception as exc:  # noqa: BLE001 - GuardOnDataDependentSymNode, UserError, TorchRuntimeError...
        cause = _root_cause(exc)
        if script:
            todo = ("an 'if' on tensor values becomes torch.cond, whose two branches must return "
                    "new tensors of one shape; export the model from its Python source with "
                    "torch.export instead, or keep using it as TorchScript")
        else:
            todo = ("replace Python control flow on tensor values with torch.where or torch.cond, "
                    "or pass example inputs the model accepts")
        raise ModelError(f"{what}: cannot be converted to a torch.export program "
                         f"({type(cause).__name__}: {_first_line(cause)}); {todo}") from None


# ---------------------------------------------------------------------------------------
# 2. runnable


_DROPOUTS = {_aten.dropout.default, _aten.feature_dropout.default, _aten.alpha_dropout.default,
             _aten.feature_alpha_dropout.default}


def _to_eval_graph(gm: fx.GraphModule) -> None:
    """Rewrite a program exported from a model in train mode into its eval-mode function:
    ``batch_norm(training=True)`` uses the running statistics, dropout passes its input
    through, and ``num_batches_tracked += 1`` goes. (``torch.export`` bakes the mode into the
    graph; nothing else reads ``self.training``.)"""
    changed = False
    for node in list(gm.graph.nodes):
        if node.op != "call_function":
            continue
        if node.target is _aten.batch_norm.default:
            if len(node.args) > 5 and node.args[5] is True:
                node.update_arg(5, False)
                changed = True
            elif node.kwargs.get("training") is True:
                node.update_kwarg("training", False)
                changed = True
        elif node.target in _DROPOUTS:
            train = node.args[2] if len(node.args) > 2 else node.kwargs.get("train")
            if train is True:
                node.replace_all_uses_with(node.args[0])
                gm.graph.erase_node(node)
                changed = True
        elif (node.target is _aten.add_.Tensor and not node.users and node.args
              and isinstance(node.args[0], fx.Node) and node.args[0].op == "get_attr"
              and str(node.args[0].target).endswith("num_batches_tracked")):
            gm.graph.erase_node(node)
            changed = True
    if changed:
        gm.recompile()


def _relocate_constants(gm: fx.GraphModule) -> None:
    """Move the root's tensor constants (plain tensor attributes and non-persistent buffers,
    e.g. the ``lifted_tensor_0`` a program keeps) into a child container as non-persistent
    buffers. ``GraphModule.__deepcopy__`` re-registers a root-level tensor that a get_attr
    reads as a *persistent* buffer, so a deepcopy (``fold_batchnorm`` makes one) would gain a
    state_dict key per constant; a child module is deep-copied as it is."""
    consts = {n: t for n, t in gm._buffers.items() if t is not None and n in gm._non_persistent_buffers_set}
    consts |= {n: v for n, v in vars(gm).items() if isinstance(v, torch.Tensor)}
    if not consts:
        return
    holder_name, k = "_constants", 0
    while hasattr(gm, holder_name):
        k += 1
        holder_name = f"_constants_{k}"
    holder = nn.Module()
    for name, t in consts.items():
        gm._buffers.pop(name, None)
        gm._non_persistent_buffers_set.discard(name)
        gm.__dict__.pop(name, None)
        holder.register_buffer(name, t, persistent=False)
    gm.add_module(holder_name, holder)
    for node in gm.graph.nodes:
        if node.op == "get_attr" and node.target in consts:
            node.target = f"{holder_name}.{node.target}"
    gm.recompile()


def runnable(program: torch.export.ExportedProgram) -> fx.GraphModule:
    """``program.module()`` made an ordinary module: ``.eval()`` / ``.train(mode)`` work (they
    only set the flags: the graph is the eval-mode function, see below), it is in eval mode,
    deepcopy-able and usable under ``torch.no_grad``, and its ``state_dict()`` has exactly the
    keys of ``program.state_dict`` (``module()`` leaves out entries the graph never reads,
    e.g. ``num_batches_tracked``; they are registered back, sharing the program's tensors).

    A program exported from a model in train mode is rewritten to its eval-mode function
    (batch_norm on running statistics, no dropout, no ``num_batches_tracked`` update).
    """
    if not isinstance(program, torch.export.ExportedProgram):
        raise ModelError(f"runnable needs a torch.export.ExportedProgram, got {type(program).__name__}")
    with _quiet():
        gm = program.module()
    # ExportedProgram.module() shadows train/eval with methods that raise NotImplementedError
    for name in ("train", "eval"):
        gm.__dict__.pop(name, None)
    _to_eval_graph(gm)
    _relocate_constants(gm)
    have = set(gm.state_dict())
    params = set(program.graph_signature.parameters)
    for key, tensor in program.state_dict.items():
        if key in have:
            continue
        owner_path, _, name = key.rpartition(".")
        owner = _get_or_make(gm, owner_path)
        if owner is None or hasattr(owner, name):
            continue
        if key in params and isinstance(tensor, nn.Parameter):
            owner.register_parameter(name, tensor)
        else:
            owner.register_buffer(name, tensor)
    got, want = set(gm.state_dict()), set(program.state_dict)
    if got != want:
        differ = sorted(got ^ want)
        raise ModelError(f"program.module() and program.state_dict disagree on {len(differ)} "
                         f"entries (first: {differ[0]}); cannot make the program runnable")
    gm.train(False)
    _free_batch(gm, program)
    return gm


def _free_batch(gm: fx.GraphModule, program: torch.export.ExportedProgram) -> None:
    """Most users export with one example batch (``torch.randn(1, 3, 32, 32)``), which fixes
    the batch size: ``module()`` then guards every call to it, and a reshape written with
    ``x.size()`` (a channel shuffle) bakes the batch into its shape. The guard is dropped, and
    a reshape whose leading dimension is that batch size reads the input's batch instead, when
    (and only when) the result computes, sample by sample, what the guarded module computes on
    random inputs at batches 1, 2 and 3. Otherwise the graph is left as it was and
    ``FIXED_BATCH_ATTR`` records the batch size (:func:`check_batch_free` turns that into a
    ModelError saying what to do)."""
    users = set(program.graph_signature.user_inputs)
    vals = [n.meta.get("val") for n in program.graph.nodes if n.op == "placeholder" and n.name in users]
    if len(vals) != 1 or not isinstance(vals[0], torch.Tensor) or vals[0].dim() < 1:
        return
    batch = vals[0].shape[0]
    if not isinstance(batch, int):  # already dynamic
        return
    guards = [n for n in gm.graph.nodes if n.op == "call_module" and n.target == "_guards_fn"]
    if not guards:
        return
    shape = [int(d) for d in vals[0].shape[1:]]
    x = torch.randn(3, *shape, generator=torch.Generator().manual_seed(0))
    with warnings.catch_warnings():  # torch's own deepcopy of a pytree spec: "LeafSpec is deprecated"
        warnings.simplefilter("ignore", FutureWarning)
        original = copy.deepcopy(gm.graph)
    with torch.no_grad():
        try:
            refs = [gm(torch.cat([x[i:i + 1]] * batch))[:1] for i in range(3)]
        except Exception:  # noqa: BLE001 - not a plain image model: leave it as it is
            return

        def works() -> bool:
            try:
                outs = [gm(x[:n]) for n in (1, 2, 3)]
                return all(torch.allclose(out[i:i + 1], refs[i], atol=1e-5, rtol=1e-4)
                           for out in outs for i in range(len(out)))
            except Exception:  # noqa: BLE001 - a shape error: the batch is baked in somewhere
                return False

        for node in guards:
            gm.graph.erase_node(node)
        gm.recompile()
        if works() or (_read_batch_in_reshapes(gm, batch) and works()):
            return
    gm.graph = original  # as it was: the module keeps its fixed batch
    gm.recompile()
    setattr(gm, FIXED_BATCH_ATTR, int(batch))


_RESHAPES = {_aten.view.default, _aten.reshape.default, _aten._unsafe_view.default, _aten.expand.default}


def _read_batch_in_reshapes(gm: fx.GraphModule, batch: int) -> int:
    """Make every reshape whose target shape starts with the literal ``batch`` take the input's
    batch size (``sym_size(x, 0)``) instead; returns how many were changed. Checked by the
    caller, since a leading dimension equal to the batch size need not be the batch."""
    inputs = [n for n in gm.graph.nodes if n.op == "placeholder"]
    if not inputs:
        return 0
    size = None
    changed = 0
    for node in list(gm.graph.nodes):
        if node.op != "call_function" or node.target not in _RESHAPES or len(node.args) < 2:
            continue
        target = node.args[1]
        if not isinstance(target, (list, tuple)) or not target or target[0] != batch or isinstance(target[0], fx.Node):
            continue
        if size is None:
            with gm.graph.inserting_after(inputs[-1]):
                size = gm.graph.call_function(_aten.sym_size.int, (inputs[0], 0))
        node.args = (node.args[0], [size, *target[1:]], *node.args[2:])
        changed += 1
    if changed:
        gm.recompile()
    return changed


FIXED_BATCH_ATTR = "_edgesqueeze_fixed_batch"


def check_batch_free(model: nn.Module, what: str) -> None:
    """ModelError when ``model`` (a loaded program) only takes its export-time batch size."""
    batch = getattr(model, FIXED_BATCH_ATTR, None)
    if batch is not None:
        raise ModelError(f"{what}: the program was exported with a fixed batch size of {batch} and its graph "
                         "depends on it; export it with a dynamic batch: torch.export.export(model, (x,), "
                         "dynamic_shapes=({0: torch.export.Dim.AUTO},)), or flatten with torch.flatten "
                         f"instead of view({batch}, -1)")


# ---------------------------------------------------------------------------------------
# 3. lift


def _normalized(node: fx.Node) -> dict[str, Any] | None:
    from torch.fx.operator_schemas import normalize_function

    try:
        pair = normalize_function(node.target, node.args, node.kwargs, normalize_to_only_use_kwargs=True)
    except Exception:  # noqa: BLE001 - a call that does not bind its schema is simply not lifted
        return None
    return None if pair is None else dict(pair.kwargs)


def _attr(node: Any) -> tuple[str, str] | None:
    """``(owner_path, attr_name)`` of a get_attr node, else None."""
    if isinstance(node, fx.Node) and node.op == "get_attr" and isinstance(node.target, str):
        owner, _, name = node.target.rpartition(".")
        return owner, name
    return None


def _ints(value: Any, n: int = 2) -> tuple[int, ...] | None:
    if isinstance(value, int) and not isinstance(value, bool):
        return (value,) * n
    if isinstance(value, (list, tuple)) and all(isinstance(v, int) and not isinstance(v, bool) for v in value):
        if len(value) == 1:
            return tuple(value) * n
        if len(value) == n:
            return tuple(value)
    return None


def _rank(node: Any) -> int | None:
    val = node.meta.get("val") if isinstance(node, fx.Node) else None
    return val.dim() if isinstance(val, torch.Tensor) else None


def _weight_of(node: Any) -> fx.Node | None:
    """``W`` if ``node`` is ``W.T`` of a 2-D get_attr weight (``t`` / ``permute`` / ``transpose``)."""
    if not isinstance(node, fx.Node) or node.op != "call_function" or not node.args:
        return None
    w = node.args[0]
    if node.target in (_aten.t.default, _aten.numpy_T.default):
        ok = True
    elif node.target is _aten.permute.default:
        ok = list(node.args[1]) == [1, 0]
    elif node.target is _aten.transpose.int:
        ok = sorted(d % 2 for d in node.args[1:3]) == [0, 1]
    else:
        ok = False
    return w if ok and _attr(w) else None


class _Call:
    """One lift-able call: the module it becomes, the tensors it holds, how to rewire."""

    def __init__(self, node: fx.Node, owner: str, kind: str, config: tuple, tensors: dict[str, str],
                 x: fx.Node, replace: list[fx.Node]) -> None:
        self.node, self.owner, self.kind, self.config = node, owner, kind, config
        self.tensors = tensors  # the owner's tensors the call reads, by attribute name
        self.x = x  # the data input (when matched)
        self.replace = replace  # nodes whose uses become the module call's output


def _weight_and_bias(kw: dict[str, Any]) -> tuple[tuple[str, str] | None, Any]:
    """``((owner, "weight"), bias)`` when a call's weight is an owner's ``weight`` attribute
    and its bias (if any) that same owner's ``bias``; ``(None, None)`` otherwise."""
    w, b = _attr(kw["weight"]), kw["bias"]
    if w is None or w[1] != "weight" or (b is not None and _attr(b) != (w[0], "bias")):
        return None, None
    return w, b


def _match(node: fx.Node) -> _Call | None:
    if node.op != "call_function":
        return None
    t = node.target
    if t in (_aten.conv2d.default, _aten.conv2d.padding, _aten.convolution.default):
        kw = _normalized(node)
        if kw is None or not isinstance(kw["input"], fx.Node):
            return None
        w, b = _weight_and_bias(kw)
        if w is None:
            return None
        if t is _aten.convolution.default and (kw["transposed"] is not False or any(kw["output_padding"])):
            return None
        padding = kw["padding"] if isinstance(kw["padding"], str) else _ints(kw["padding"])
        stride, dilation, groups = _ints(kw["stride"]), _ints(kw["dilation"]), kw["groups"]
        if None in (padding, stride, dilation) or not isinstance(groups, int):
            return None
        tensors = {"weight": "weight"} | ({"bias": "bias"} if b is not None else {})
        return _Call(node, w[0], "conv2d", (stride, padding, dilation, groups), tensors, kw["input"], [node])
    if t is _aten.linear.default:
        kw = _normalized(node)
        if kw is None or not isinstance(kw["input"], fx.Node):
            return None
        w, b = _weight_and_bias(kw)
        if w is None:
            return None
        tensors = {"weight": "weight"} | ({"bias": "bias"} if b is not None else {})
        return _Call(node, w[0], "linear", (), tensors, kw["input"], [node])
    if t in (_aten.addmm.default, _aten.mm.default):
        kw = _normalized(node)
        if kw is None:
            return None
        # normalize_function calls mm's ``self`` ``input``; addmm's ``input`` is the bias
        x, b = (kw["mat1"], kw["input"]) if t is _aten.addmm.default else (kw["input"], None)
        if not isinstance(x, fx.Node):
            return None
        w = _attr(_weight_of(kw["mat2"]))
        if w is None or w[1] != "weight" or (b is not None and _attr(b) != (w[0], "bias")):
            return None
        if t is _aten.addmm.default and (kw["beta"] != 1 or kw["alpha"] != 1):
            return None
        tensors = {"weight": "weight"} | ({"bias": "bias"} if b is not None else {})
        return _Call(node, w[0], "linear", (), tensors, x, [node])
    if t in (_aten.batch_norm.default, _aten._native_batch_norm_legit_no_training.default):
        kw = _normalized(node)
        if kw is None or not isinstance(kw["input"], fx.Node) or kw.get("training", False) is not False:
            return None
        rm, rv = _attr(kw["running_mean"]), _attr(kw["running_var"])
        if rm is None or rm[1] != "running_mean" or rv != (rm[0], "running_var"):
            return None
        owner = rm[0]
        w, b = kw["weight"], kw["bias"]
        if (w is None) != (b is None):
            return None
        if w is not None and (_attr(w) != (owner, "weight") or _attr(b) != (owner, "bias")):
            return None
        rank = _rank(kw["input"])
        if rank == 4:
            kind = "batchnorm2d"
        elif rank in (2, 3):
            kind = "batchnorm1d"
        else:
            return None
        replace = [node]
        if t is _aten._native_batch_norm_legit_no_training.default:
            if not node.users or any(u.op != "call_function" or u.target is not operator.getitem
                                     or u.args[1] != 0 for u in node.users):
                return None
            replace = list(node.users)
        momentum, eps = kw["momentum"], kw["eps"]
        if not isinstance(eps, (int, float)) or not (momentum is None or isinstance(momentum, (int, float))):
            return None
        tensors = {"running_mean": "running_mean", "running_var": "running_var"}
        if w is not None:
            tensors |= {"weight": "weight", "bias": "bias"}
        return _Call(node, owner, kind, (float(eps), momentum, w is not None), tensors, kw["input"], replace)
    return None


def _owner_state(owner: nn.Module) -> dict[str, tuple[str, torch.Tensor | None]]:
    """The tensors an owner container holds directly: name -> (category, tensor)."""
    state: dict[str, tuple[str, Any]] = {}
    for name, p in owner._parameters.items():
        state[name] = ("param", p)
    for name, b in owner._buffers.items():
        state[name] = ("buffer" if name not in owner._non_persistent_buffers_set else "nonpersistent", b)
    for name, v in vars(owner).items():
        if isinstance(v, torch.Tensor):
            state[name] = ("attr", v)
    return state


def _build(call: _Call, state: dict[str, tuple[str, Any]]) -> nn.Module | None:
    weight = state.get("weight", (None, None))[1]
    if call.kind == "conv2d":
        if weight is None or weight.dim() != 4:
            return None
        stride, padding, dilation, groups = call.config
        if groups < 1 or isinstance(padding, str) and padding not in ("same", "valid"):
            return None
        return nn.Conv2d(weight.shape[1] * groups, weight.shape[0], tuple(weight.shape[2:]),
                         stride=stride, padding=padding, dilation=dilation, groups=groups,
                         bias="bias" in call.tensors, device="meta", dtype=weight.dtype)
    if call.kind == "linear":
        if weight is None or weight.dim() != 2:
            return None
        return nn.Linear(weight.shape[1], weight.shape[0], bias="bias" in call.tensors,
                         device="meta", dtype=weight.dtype)
    mean = state["running_mean"][1]
    if mean is None or mean.dim() != 1:
        return None
    eps, momentum, affine = call.config
    cls = nn.BatchNorm2d if call.kind == "batchnorm2d" else nn.BatchNorm1d
    return cls(mean.shape[0], eps=eps, momentum=momentum, affine=affine, track_running_stats=True,
               device="meta", dtype=mean.dtype)


def _fill(module: nn.Module, state: dict[str, tuple[str, Any]]) -> None:
    """Make ``module`` hold the owner's very tensors, each in the same category."""
    for name, (category, tensor) in state.items():
        module._parameters.pop(name, None)
        module._buffers.pop(name, None)
        module._non_persistent_buffers_set.discard(name)
        if (category in ("buffer", "attr") and name in ("weight", "bias") and isinstance(tensor, torch.Tensor)
                and tensor.is_floating_point()):
            # TS2EPConverter registers a TorchScript module's parameters as buffers; a layer's
            # weight and bias are parameters (same storage), as PT2E's conv-BN fusion expects
            tensor, category = nn.Parameter(tensor, requires_grad=True), "param"
        if category == "param":
            module.register_parameter(name, tensor)
        elif category == "attr":
            object.__setattr__(module, name, tensor)
        else:
            module.register_buffer(name, tensor, persistent=category == "buffer")
    if isinstance(module, nn.modules.batchnorm._BatchNorm) and "num_batches_tracked" not in state:
        module.register_buffer("num_batches_tracked", None)  # as before: not in state_dict


def _shared_copy(gm: fx.GraphModule) -> fx.GraphModule:
    """A deep copy of ``gm`` (new graph, new modules) that shares every tensor with it."""
    memo: dict[int, Any] = {}
    for mod in gm.modules():
        for t in list(mod._parameters.values()) + list(mod._buffers.values()):
            if t is not None:
                memo[id(t)] = t
        for v in vars(mod).values():
            if isinstance(v, torch.Tensor):
                memo[id(v)] = v
    with _quiet():
        out = copy.deepcopy(gm, memo)
    # undo what GraphModule.__deepcopy__ did to root-level constants (see _relocate_constants)
    persistent = {n for n in gm._buffers if n not in gm._non_persistent_buffers_set}
    out._non_persistent_buffers_set = {n for n in out._buffers if n not in persistent}
    _relocate_constants(out)
    for name in ("train", "eval"):
        out.__dict__.pop(name, None)
    return out


def _own_module_stack(node: fx.Node, path: str, module: nn.Module) -> None:
    """Make ``node``'s ``nn_module_stack`` end at the module it now calls. ``torch.export``
    keeps a GraphModule's node metadata, and litert-torch names each TFLite tensor after the
    innermost module of that stack (``c3:2``), which is how the packer finds a layer's float
    weights; a TorchScript model converted to a program has only its wrapper on the stack,
    so without this its tensors were ``t27`` and no weight of a packed tflite-int8 file was
    coded from its codebook."""
    stack = dict(node.meta.get("nn_module_stack") or {})
    if stack and list(stack.values())[-1][0] == path:
        return
    cls = type(module)
    key = "L__self__" + path.replace(".", "_")
    while key in stack:
        key += "_"
    stack[key] = (path, f"{cls.__module__}.{cls.__qualname__}")
    node.meta["nn_module_stack"] = stack


def lift(gm: fx.GraphModule | torch.export.ExportedProgram) -> fx.GraphModule:
    """An equivalent ``fx.GraphModule`` in which every recognised conv2d / linear / eval
    batch_norm call (see the module docstring) is a call to a real ``nn.Conv2d`` /
    ``nn.Linear`` / ``nn.BatchNorm2d`` submodule at the path that owned its weights, holding
    the very same Parameter and buffer objects (not copies): ``state_dict()`` keys are those
    of ``gm``, outputs are equal, and forward hooks, in-place weight edits, ``fx.symbolic_trace``
    (so :func:`~edgesqueeze.models.fold.fold_batchnorm`), deepcopy, ``torch.export`` and
    ``torch.onnx.export`` work on it. ``gm`` itself is not changed. An ExportedProgram is
    first made :func:`runnable`. The result is in eval mode (the program's function); put in
    train mode, the lifted BatchNorms use batch statistics, as the source model's did.
    """
    if isinstance(gm, torch.export.ExportedProgram):
        gm = runnable(gm)
    if not isinstance(gm, fx.GraphModule):
        raise ModelError(f"lift needs a torch.fx.GraphModule (runnable(to_exported_program(model, "
                         f"inputs))), got {type(gm).__name__}")
    lifted = _shared_copy(gm)
    graph = lifted.graph
    calls: dict[str, list[_Call]] = {}
    for node in graph.nodes:
        call = _match(node)
        if call is not None and call.owner:
            calls.setdefault(call.owner, []).append(call)

    modules = dict(lifted.named_modules())
    changed = False
    for owner_path, group in calls.items():
        owner = modules.get(owner_path)
        if owner is None or type(owner) is not nn.Module or len(owner._modules):
            continue  # a real module already, or a container with children: leave it
        if len({(c.kind, c.config, tuple(sorted(c.tensors))) for c in group}) != 1:
            continue  # the same weights called two different ways
        state = _owner_state(owner)
        if set(state) - {"num_batches_tracked"} != set(group[0].tensors) or (
                "num_batches_tracked" in state and not group[0].kind.startswith("batchnorm")):
            continue  # the owner holds tensors the call does not use (or lacks some)
        module = _build(group[0], state)
        if module is None:
            continue
        _fill(module, state)
        module.train(lifted.training)
        _set_submodule(lifted, owner_path, module)
        for call in group:
            x = _match(call.node).x  # now: an earlier lift may have replaced the input node
            with graph.inserting_before(call.node):
                new = graph.call_module(owner_path, (x,))
            new.meta = dict(call.node.meta)
            if len(call.replace) == 1 and call.replace[0] is call.node:
                call.node.replace_all_uses_with(new)
            else:  # getitem(native_batch_norm(...), 0)
                new.meta = dict(call.replace[0].meta)
                for g in call.replace:
                    g.replace_all_uses_with(new)
                    graph.erase_node(g)
            _own_module_stack(new, owner_path, module)
            graph.erase_node(call.node)
        changed = True
    if changed:
        # drop what fed only the replaced calls: get_attr of the weights, W.T of linear weights
        for node in reversed(list(graph.nodes)):
            if node.users:
                continue
            if node.op == "get_attr" or (node.op == "call_function" and _weight_of(node) is not None):
                graph.erase_node(node)
        graph.lint()
        lifted.recompile()
    return lifted.train(False)


# ---------------------------------------------------------------------------------------
# 4. skeletons


def _check_kind(kind: str) -> None:
    if kind not in KINDS:
        raise ModelError(f"kind must be one of {', '.join(KINDS)}, got {kind!r}")


def _stored(archive: bytes) -> bytes:
    """The same zip archive with every member stored, not deflated: ``torch.jit.save``
    deflates its code and debug records, which lzma then cannot shrink (a deflated 2 KB of
    code stays 2 KB; stored, the whole skeleton of a small model lzma-compresses about 3x
    smaller). Members keep their order and names; timestamps are fixed."""
    src = zipfile.ZipFile(io.BytesIO(archive))
    if all(info.compress_type == zipfile.ZIP_STORED for info in src.infolist()):
        return archive
    out = io.BytesIO()
    with zipfile.ZipFile(out, "w", compression=zipfile.ZIP_STORED) as dst:
        for info in src.infolist():
            dst.writestr(zipfile.ZipInfo(info.filename, date_time=(1980, 1, 1, 0, 0, 0)),
                         src.read(info.filename))
    return out.getvalue()


def _zero(state: dict[str, torch.Tensor], names: list[str], what: str) -> None:
    unknown = [n for n in names if n not in state]
    if unknown:
        raise ModelError(f"{what}: no state entry {unknown[0]!r} to zero ({len(unknown)} unknown "
                         f"names); the state_dict has {len(state)} entries, e.g. {next(iter(state), '')!r}")
    with torch.no_grad():
        for n in names:
            state[n].zero_()


def program_skeleton(kind: str, original: Any, state_names) -> bytes:
    """The archive of ``original`` (``kind`` "torchscript": a ScriptModule, saved with
    ``torch.jit.save``; "exported_program": an ExportedProgram, saved with
    ``torch.export.save``) with every tensor named in ``state_names`` zeroed (and, for a
    program, its stored example inputs zeroed too), so that it lzma-compresses to little more
    than the code. The names zeroed are recorded in the archive (an extra file) so that
    :func:`restore` refuses a state_dict that lacks one. ``original`` is not modified.

    Same input, same bytes: the archive is written to memory (fixed inner folder name, fixed
    zip timestamps), and for TorchScript the module is saved, reloaded and saved again, since a
    module scripted in this process writes its class constants in a per-process order.
    """
    _check_kind(kind)
    names = sorted(set(state_names))
    extra = {_ZEROED_FILE: json.dumps(names)}
    if kind == "torchscript":
        if not _is_script(original):
            raise ModelError(f"a torchscript skeleton needs a TorchScript module, got {type(original).__name__}")
        buf = io.BytesIO()
        torch.jit.save(original, buf)
        buf.seek(0)
        clone = torch.jit.load(buf, map_location="cpu")
        _zero(clone.state_dict(), names, "TorchScript module")
        out = io.BytesIO()
        torch.jit.save(clone, out, _extra_files=extra)
        return _stored(out.getvalue())
    if not isinstance(original, torch.export.ExportedProgram):
        raise ModelError(f"an exported_program skeleton needs a torch.export.ExportedProgram, got "
                         f"{type(original).__name__}")
    with _quiet():
        buf = io.BytesIO()
        torch.export.save(original, buf)
        buf.seek(0)
        clone = torch.export.load(buf)
        _zero(clone.state_dict, names, "exported program")
        if clone.example_inputs is not None:
            clone.example_inputs = torch.utils._pytree.tree_map(
                lambda v: torch.zeros_like(v) if isinstance(v, torch.Tensor) else v, clone.example_inputs)
        out = io.BytesIO()
        torch.export.save(clone, out, extra_files=extra)
    return out.getvalue()


def _load_into(state: dict[str, torch.Tensor], given: dict[str, torch.Tensor], zeroed: list[str],
               what: str) -> None:
    unexpected = [k for k in given if k not in state]
    if unexpected:
        raise ModelError(f"{what}: the weights have {len(unexpected)} tensors the model does not "
                         f"(first: {unexpected[0]}); were they saved from a model of another "
                         "architecture, or after fold_batchnorm?")
    missing = [k for k in zeroed if k not in given]
    if missing:
        raise ModelError(f"{what}: the weights lack {len(missing)} tensors the skeleton zeroed "
                         f"(first: {missing[0]})")
    for key, value in given.items():
        dest = state[key]
        if not isinstance(value, torch.Tensor):
            raise ModelError(f"{what}: entry {key} is a {type(value).__name__}, not a tensor")
        if tuple(value.shape) != tuple(dest.shape) or value.dtype != dest.dtype:
            raise ModelError(f"{what}: {key} is {value.dtype} {tuple(value.shape)} in the weights but "
                             f"{dest.dtype} {tuple(dest.shape)} in the model")
    with torch.no_grad():
        for key, value in given.items():
            state[key].copy_(value)


class PickleInProgram(ModelError):
    """A ``torch.export`` archive that needs Python unpickling to load (a weight, constant or
    example input saved with pickle): refused unless the user trusts the file."""


@contextlib.contextmanager
def _weights_only_unpickling() -> Iterator[None]:
    """While ``torch.export.load`` runs: every ``torch.load`` it makes is ``weights_only``
    (tensors and plain containers only) and its raw ``pickle.loads`` (custom objects) is
    refused. ``torch.export.load`` unpickles weights marked ``use_pickle``, legacy weight and
    constant files and custom objects with ``weights_only=False``, and falls back to it for the
    example inputs: code a crafted ``.pt2`` would run. Everything a plain program holds
    (tensors) loads unchanged."""
    import pickle

    from torch.export.pt2_archive import _package

    real_load, real_pickle = torch.load, _package.pickle

    def load(f, map_location=None, pickle_module=None, *, weights_only=None, **kwargs):
        kwargs.pop("mmap", None)
        try:
            return real_load(f, map_location=map_location, weights_only=True, **kwargs)
        except pickle.UnpicklingError as exc:
            raise PickleInProgram("a pickled Python object (a weight, constant or example input)") from exc

    class _Refuse:
        @staticmethod
        def loads(*_args, **_kwargs):
            raise PickleInProgram("a pickled custom object")

        def __getattr__(self, name):
            return getattr(real_pickle, name)

    torch.load, _package.pickle = load, _Refuse()
    try:
        yield
    finally:
        torch.load, _package.pickle = real_load, real_pickle


def load_exported(f: Any, *, trust_pickle: bool = False, extra_files: dict[str, Any] | None = None):
    """``torch.export.load(f)``, refusing (:class:`PickleInProgram`) an archive that would
    unpickle Python objects unless ``trust_pickle``."""
    kwargs = {"extra_files": extra_files} if extra_files is not None else {}
    with _quiet():  # "f must be ... a file ending in .pt2": a renamed file loads all the same
        if trust_pickle:
            return torch.export.load(f, **kwargs)
        with _weights_only_unpickling():
            return torch.export.load(f, **kwargs)


def restore(kind: str, skeleton: bytes, state_dict: dict[str, torch.Tensor]) -> nn.Module:
    """The model of a :func:`program_skeleton` with ``state_dict`` copied into it, in eval
    mode: a TorchScript module (kind "torchscript") or the :func:`runnable` module of the
    program (kind "exported_program"). ``state_dict`` must name only the model's entries and
    include every entry the skeleton zeroed; shapes and dtypes must match (ModelError if not).
    """
    _check_kind(kind)
    extra = {_ZEROED_FILE: ""}
    try:
        if kind == "torchscript":
            model = torch.jit.load(io.BytesIO(skeleton), map_location="cpu", _extra_files=extra)
        else:
            program = load_exported(io.BytesIO(skeleton), extra_files=extra)  # quiet itself
    except PickleInProgram as exc:
        raise ModelError(f"the {kind} skeleton holds {exc}; an edgesqueeze archive never needs one, so it "
                         "is refused (unpickling can run arbitrary code)") from None
    except Exception as exc:  # noqa: BLE001 - zip, pickle, JSON and schema errors of a broken archive
        raise ModelError(f"cannot read the {kind} skeleton ({type(exc).__name__}: {_first_line(exc)})") from None
    zeroed = json.loads(extra[_ZEROED_FILE]) if extra[_ZEROED_FILE] else []
    if kind == "torchscript":
        _load_into(model.state_dict(), state_dict, zeroed, "TorchScript skeleton")
        return model.eval()
    _load_into(program.state_dict, state_dict, zeroed, "exported-program skeleton")
    return runnable(program)


# ---------------------------------------------------------------------------------------
# 5. what the rest of edgesqueeze calls

PROGRAM_KINDS = ("torchscript", "exported_program")
KIND_ATTR = "_edgesqueeze_program_kind"  # set on the runnable module of a loaded program


def program_kind(model: Any) -> str | None:
    """``"torchscript"`` for a TorchScript module, ``"exported_program"`` for the runnable
    module of a loaded ``.pt2`` (or of a program-kind ``.esq``), else ``None``."""
    if _is_script(model):
        return "torchscript"
    return getattr(model, KIND_ATTR, None)


def lifted_module(model: nn.Module, input_shape, *, what: str = "the model") -> nn.Module:
    """``model`` as an ordinary module whose convolutions and linear layers are real
    ``nn.Conv2d`` / ``nn.Linear`` modules, for compression and export: a TorchScript module is
    converted to a program (on a batch of two zero images of ``input_shape``) and lifted; a
    program's runnable module is lifted; anything else is returned as it is."""
    kind = program_kind(model)
    if kind is None:
        return model
    if kind == "torchscript":
        if not input_shape:
            raise ModelError(f"{what}: a TorchScript model records no input shape; pass --input-shape C,H,W "
                             "or --data NAME")
        program = to_exported_program(model, (torch.zeros(2, *[int(d) for d in input_shape]),), what=what)
        return _without_guards(lift(program))
    return _without_guards(lift(model))


def _without_guards(gm: fx.GraphModule) -> fx.GraphModule:
    """Drop the input-shape guards ``module()`` calls first: a check on shapes that torch.fx
    cannot trace (``if`` on a size), so BatchNorm folding could not see the graph. The model
    is fed the shapes it was converted with; a wrong one still fails in its first conv."""
    guards = [n for n in gm.graph.nodes if n.op == "call_module" and n.target == "_guards_fn"]
    for node in guards:
        gm.graph.erase_node(node)
    if guards:
        gm.recompile()
    return gm


def skeleton_for(kind: str, stored: nn.Module, original: Any, example: torch.Tensor) -> bytes:
    """The same-kind skeleton of ``stored`` (the model whose state_dict an ``.esq`` keeps).
    When ``stored`` holds exactly the tensors ``original`` (the user's ScriptModule or
    ExportedProgram) holds, the user's own archive is kept; otherwise (BatchNorm folded) the
    stored model is traced (TorchScript) or exported (program) anew, so its keys fit."""
    names = list(stored.state_dict())
    have: set[str] = set()
    if _is_script(original):
        have = set(original.state_dict())
    elif isinstance(original, torch.export.ExportedProgram):
        have = set(original.state_dict)
    # Exactly the same names: a strict subset is a model that changed (BatchNorm folded into a
    # conv that had a bias keeps every conv name), and the user's archive would still apply it.
    if program_kind(original) == kind and have and set(names) == have:
        return program_skeleton(kind, original, names)
    with _quiet(), torch.no_grad(), _eval_mode(stored):
        if kind == "torchscript":
            fresh = torch.jit.trace(stored, (example,), check_trace=False)
        else:
            fresh = to_exported_program(stored, (example,))
    return program_skeleton(kind, fresh, names)
