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

A folded model has no BatchNorm for ``build_model`` to rebuild from ``arch_kwargs``; to load
its state_dict, build the architecture, fold it, then ``load_state_dict``: folding a fresh
model yields the same keys.
"""

from __future__ import annotations

import copy
from collections import Counter

import torch
from torch import fx, nn

from ..errors import ModelError

__all__ = ["conv_bn_pairs", "fold_batchnorm", "fold_conv_bn"]


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


def conv_bn_pairs(model: nn.Module) -> list[tuple[str, str]]:
    """``(conv_name, bn_name)`` for every BatchNorm2d that can fold into the Conv2d feeding it.

    Skips a BN without running statistics (``track_running_stats=False`` uses batch
    statistics even in eval mode, so there is nothing fixed to fold).
    """
    modules = dict(model.named_modules())
    if not any(isinstance(m, nn.BatchNorm2d) for m in modules.values()):
        return []
    try:
        graph = fx.symbolic_trace(model).graph
    except Exception as exc:  # fx raises many types for untraceable Python
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise ModelError(f"fold_batchnorm: cannot trace {type(model).__name__} with torch.fx "
                         f"to find conv -> BatchNorm pairs ({first}); fold it by hand with "
                         "fold_conv_bn") from None
    calls = Counter(n.target for n in graph.nodes if n.op == "call_module")
    pairs = []
    for node in graph.nodes:
        bn = modules.get(node.target) if node.op == "call_module" else None
        if not isinstance(bn, nn.BatchNorm2d) or bn.running_mean is None or not node.args:
            continue
        src = node.args[0]
        if (isinstance(src, fx.Node) and src.op == "call_module"
                and isinstance(modules.get(src.target), nn.Conv2d)
                and len(src.users) == 1 and calls[src.target] == 1 and calls[node.target] == 1):
            pairs.append((src.target, node.target))
    return pairs


def _set_submodule(model: nn.Module, name: str, module: nn.Module) -> None:
    parent, _, child = name.rpartition(".")
    setattr(model.get_submodule(parent) if parent else model, child, module)


def fold_batchnorm(model: nn.Module) -> nn.Module:
    """A copy of ``model`` with every foldable BatchNorm2d folded into its conv (see module
    docstring). A model without BatchNorm comes back as an unchanged copy."""
    folded = copy.deepcopy(model)
    for conv_name, bn_name in conv_bn_pairs(folded):
        conv = folded.get_submodule(conv_name)
        bn = folded.get_submodule(bn_name)
        w, b = fold_conv_bn(conv.weight, conv.bias, bn.running_mean, bn.running_var, bn.eps,
                            bn.weight, bn.bias)
        with torch.no_grad():
            conv.weight.copy_(w)
        conv.bias = nn.Parameter(b)
        _set_submodule(folded, bn_name, nn.Identity())
    return folded

