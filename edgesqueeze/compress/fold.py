"""Folding BatchNorm into the conv before it, as a compression stage.

The surgery itself is :mod:`edgesqueeze.models.fold` (loading a folded checkpoint needs it
too); this is its stage form, with a report like the other stages'.
"""

from __future__ import annotations

from torch import nn

from edgesqueeze.compress.prune import StageReport
from edgesqueeze.models.fold import conv_bn_pairs, fold_batchnorm

__all__ = ["apply"]


def apply(model: nn.Module, config: object = None) -> tuple[nn.Module, StageReport]:
    """Stage form of :func:`~edgesqueeze.models.fold.fold_batchnorm`; ``config`` is unused
    (folding has no options)."""
    pairs = conv_bn_pairs(model)
    rows = [{"conv": c, "bn": b} for c, b in pairs]
    return fold_batchnorm(model), StageReport("fold", {}, rows, {"folded": len(rows)})
