"""Fold BatchNorm into the convolution before it, so that what is pruned and clustered is what
runs.

In eval mode ``BN(conv(x)) = conv'(x)`` with, per output channel ``c``::

    scale[c] = gamma[c] / sqrt(running_var[c] + eps)
    w'[c]    = w[c] * scale[c]
    b'[c]    = (b[c] - running_mean[c]) * scale[c] + beta[c]      (b = 0 if the conv has none)

Clustering the unfolded weights and folding afterwards would multiply every centroid by a
per-channel scale, so a 4-bit layer would no longer hold 16 distinct values; folding first
avoids that. After folding, each BN becomes ``nn.Identity`` (the module tree and the conv
names stay as they were), so its ``*.running_mean`` etc. keys leave the state_dict and each
conv gains a ``.bias`` key if it had none.

Pairs are found by tracing with ``torch.fx``, not by module order: a BN folds into a conv only
if the BN's input *is* the conv's output and nothing else reads that output (a residual that
taps the conv before its BN would otherwise change meaning), and each module is called exactly
once. Module registration order says nothing about data flow, so it is not trusted.

This is model surgery, not a compression stage, so it lives with the models: loading a folded
checkpoint needs it (:func:`edgesqueeze.checkpoint.rebuild`), and so do compression and export
(:mod:`edgesqueeze.compress.fold` is the stage form).

Which pairs fold:

- ``Conv1d -> BatchNorm1d``, ``Conv2d -> BatchNorm2d``, ``Conv3d -> BatchNorm3d`` (a conv's
  output channels are dimension 1, the dimension BatchNorm normalizes);
- ``Linear -> BatchNorm1d`` (a classifier head) only when an ``example`` input is given and
  the BatchNorm's input there is 2-D ``[N, features]``: a Linear puts its features *last*, so
  on a 3-D input BatchNorm1d would normalize another dimension, and folding would be wrong.

A folded model has no BatchNorm for ``build_model`` to rebuild from ``arch_kwargs``; to load
its state_dict, build the architecture, fold the same pairs (an archive records them:
``folded_layers``), then ``load_state_dict``. Archives written before pairs were recorded
folded exactly the Conv2d -> BatchNorm2d pairs (:func:`legacy_pairs`).
"""

from __future__ import annotations

import copy
from collections import Counter

import torch
from torch import fx, nn

from ..errors import ModelError

__all__ = ["check_pairs", "conv_bn_pairs", "fold_batchnorm", "fold_conv_bn", "legacy_pairs"]


def fold_conv_bn(weight: torch.Tensor, bias: torch.Tensor | None, running_mean: torch.Tensor,
                 running_var: torch.Tensor, eps: float, gamma: torch.Tensor | None = None,
                 beta: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Folded ``(weight, bias)`` of a conv followed by an eval-mode BN (maths in float64).

    Example: one 1x1 conv weight 2.0, no bias; BN mean 1, var 3, eps 1, gamma 1, beta 0.5
    gives scale 1/sqrt(4) = 0.5, so ``w' = 1.0`` and ``b' = (0 - 1) * 0.5 + 0.5 = 0.0``.
    """
    out_ch = weight.shape[0]
    f64 = {"dtype": torch.float64, "device": weight.device}
    gamma = torch.ones(out_ch, **f64) if gamma is None else gamma.detach().to(**f64)
    beta = torch.zeros(out_ch, **f64) if beta is None else beta.detach().to(**f64)
    b = torch.zeros(out_ch, **f64) if bias is None else bias.detach().to(**f64)
    scale = gamma / torch.sqrt(running_var.detach().to(**f64) + eps)
    w = weight.detach().to(**f64) * scale.view(-1, *([1] * (weight.dim() - 1)))
    b = (b - running_mean.detach().to(**f64)) * scale + beta
    return w.to(weight.dtype), b.to(weight.dtype)


_CONV_BN = ((nn.Conv1d, nn.BatchNorm1d), (nn.Conv2d, nn.BatchNorm2d), (nn.Conv3d, nn.BatchNorm3d))


def _foldable(layer: nn.Module | None, bn: nn.Module | None) -> bool:
    """``layer -> bn`` is a pair of kinds that fold, with matching channel counts."""
    if not isinstance(bn, nn.modules.batchnorm._BatchNorm) or bn.running_mean is None:
        return False  # track_running_stats=False: batch statistics even in eval, nothing fixed
    if isinstance(layer, nn.Linear):
        return isinstance(bn, nn.BatchNorm1d) and bn.num_features == layer.out_features
    return (any(isinstance(layer, c) and isinstance(bn, b) for c, b in _CONV_BN)
            and bn.num_features == layer.out_channels)


def _two_d_inputs(gm: fx.GraphModule, example: torch.Tensor, names: set[str]) -> set[str]:
    """Of the modules ``names``, those whose input is 2-D when ``gm`` runs ``example``."""
    seen: set[str] = set()
    hooks = [gm.get_submodule(n).register_forward_pre_hook(
        lambda m, args, n=n: seen.add(n) if args and getattr(args[0], "dim", lambda: 0)() == 2 else None)
        for n in names]
    try:
        with torch.no_grad():
            was = gm.training
            gm.eval()
            try:
                gm(example)
            finally:
                gm.train(was)
    except Exception:  # noqa: BLE001 - the example does not run: no Linear pair is proven safe
        return set()
    finally:
        for h in hooks:
            h.remove()
    return seen


def conv_bn_pairs(model: nn.Module, example: torch.Tensor | None = None, *,
                  tied: dict[str, list[str]] | None = None) -> list[tuple[str, str]]:
    """``(layer_name, bn_name)`` for every BatchNorm that can fold into the layer feeding it
    (see the module docstring for the kinds; Linear pairs only with ``example``, an input
    batch, on which the BatchNorm's input is checked to be 2-D). ``tied``, if given, is
    filled with the layers left unfolded because the layer or its BatchNorm is called more
    than once (``layer -> [bn_name, ...]``).

    Skips a BN without running statistics (``track_running_stats=False`` uses batch
    statistics even in eval mode, so there is nothing fixed to fold).
    """
    modules = dict(model.named_modules())
    if not any(isinstance(m, nn.modules.batchnorm._BatchNorm) for m in modules.values()):
        return []
    try:
        graph = fx.symbolic_trace(model).graph
    except Exception as exc:  # fx raises many types for untraceable Python
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise ModelError(f"fold_batchnorm: cannot trace {type(model).__name__} with torch.fx "
                         f"to find conv -> BatchNorm pairs ({first}); set compress.fold_batchnorm: false "
                         "to keep its BatchNorms as they are, or fold them by hand with "
                         "edgesqueeze.models.fold.fold_conv_bn") from None
    calls = Counter(n.target for n in graph.nodes if n.op == "call_module")
    pairs = []
    for node in graph.nodes:
        bn = modules.get(node.target) if node.op == "call_module" else None
        if not isinstance(bn, nn.modules.batchnorm._BatchNorm) or not node.args:
            continue
        src = node.args[0]
        if (isinstance(src, fx.Node) and src.op == "call_module" and _foldable(modules.get(src.target), bn)
                and len(src.users) == 1 and calls[src.target] == 1 and calls[node.target] == 1):
            pairs.append((src.target, node.target))
        elif (tied is not None and isinstance(src, fx.Node) and src.op == "call_module"
                and _foldable(modules.get(src.target), bn) and (calls[src.target] > 1 or calls[node.target] > 1)):
            names = tied.setdefault(src.target, [])
            if node.target not in names:
                names.append(node.target)
    linear_bns = {b for c, b in pairs if isinstance(modules[c], nn.Linear)}
    if linear_bns:
        safe = _two_d_inputs(model, example, linear_bns) if example is not None else set()
        pairs = [(c, b) for c, b in pairs if b not in linear_bns or b in safe]
    return pairs


def legacy_pairs(model: nn.Module) -> list[tuple[str, str]]:
    """The pairs an archive folded before it recorded them (``folded_batchnorm: true`` and no
    ``folded_layers``): Conv2d -> BatchNorm2d only."""
    return [(c, b) for c, b in conv_bn_pairs(model) if isinstance(model.get_submodule(c), nn.Conv2d)]


def check_pairs(model: nn.Module, pairs: object, *, source: str) -> list[tuple[str, str]]:
    """``pairs`` as read from a file (``folded_layers``), checked against ``model``: each a
    ``[layer, batchnorm]`` of two module names of kinds that fold. A ModelError names the
    file and the first pair that is not."""
    if not isinstance(pairs, list):
        raise ModelError(f"{source}: meta: folded_layers must be a list of [layer, batchnorm] names, "
                         f"got {type(pairs).__name__}")
    out = []
    for pair in pairs:
        ok = (isinstance(pair, (list, tuple)) and len(pair) == 2 and all(isinstance(n, str) for n in pair))
        layer = bn = None
        if ok:
            try:
                layer, bn = model.get_submodule(pair[0]), model.get_submodule(pair[1])
            except AttributeError:
                ok = False
        if not ok or not _foldable(layer, bn):
            raise ModelError(f"{source}: meta: folded_layers: {pair!r} is not a layer and the BatchNorm after "
                             f"it in {type(model).__name__}; was the archive made from another model?")
        out.append((pair[0], pair[1]))
    return out


def _set_submodule(model: nn.Module, name: str, module: nn.Module) -> None:
    parent, _, child = name.rpartition(".")
    setattr(model.get_submodule(parent) if parent else model, child, module)


def fold_batchnorm(model: nn.Module, pairs: list[tuple[str, str]] | None = None, *,
                   example: torch.Tensor | None = None) -> nn.Module:
    """A copy of ``model`` with BatchNorm folded into the layer before it (see module
    docstring): the given ``pairs``, or every foldable pair (:func:`conv_bn_pairs`, with
    ``example`` for Linear heads). A model without BatchNorm comes back as an unchanged copy."""
    folded = copy.deepcopy(model)
    for conv_name, bn_name in (conv_bn_pairs(folded, example) if pairs is None else pairs):
        conv = folded.get_submodule(conv_name)
        bn = folded.get_submodule(bn_name)
        w, b = fold_conv_bn(conv.weight, conv.bias, bn.running_mean, bn.running_var, bn.eps,
                            bn.weight, bn.bias)
        with torch.no_grad():
            conv.weight.copy_(w)
        conv.bias = nn.Parameter(b)
        _set_submodule(folded, bn_name, nn.Identity())
    return folded
