"""Model size and cost: parameters and multiply-accumulates (MACs).

MACs count one multiply plus one add as 1 (FLOPs ~= 2 x MACs), for Conv2d (grouped too) and
Linear only: BN, ReLU, pooling and adds are cheap next to them and usually left out, which is
how published SqueezeNet numbers (0.35 G for 1.1, 0.82 G for 1.0 at 224x224) are counted.
Biases are not counted.

Example::

    >>> count_macs(nn.Conv2d(3, 8, 3, padding=1), (3, 4, 4))   # 16 pixels x 8 out x 3*3*3
    3456
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn

from ..errors import ModelError

__all__ = ["count_params", "count_macs"]


def count_params(model: nn.Module) -> int:
    """All parameters (trainable or not); buffers such as BN running stats are not counted."""
    return sum(p.numel() for p in model.parameters())


def count_macs(model: nn.Module, input_shape: Sequence[int]) -> int:
    """MACs of one forward pass on a single (C, H, W) input, measured with forward hooks.

    Runs a zero input of batch 1 in eval mode under ``torch.no_grad`` and restores the
    model's training flag afterwards.
    """
    shape = tuple(input_shape)
    if not shape or not all(isinstance(d, int) and not isinstance(d, bool) and d > 0
                            for d in shape):
        raise ModelError("count_macs: input_shape must be positive ints like (C, H, W), "
                         f"got {input_shape!r}")
    total = 0

    def conv_hook(m: nn.Conv2d, _inp, out: torch.Tensor) -> None:
        nonlocal total
        kh, kw = m.kernel_size
        total += out.numel() * (m.in_channels // m.groups) * kh * kw

    def linear_hook(m: nn.Linear, _inp, out: torch.Tensor) -> None:
        nonlocal total
        total += out.numel() * m.in_features

    handles = []
    for m in model.modules():
        if isinstance(m, nn.Conv2d):
            handles.append(m.register_forward_hook(conv_hook))
        elif isinstance(m, nn.Linear):
            handles.append(m.register_forward_hook(linear_hook))
    was_training = model.training
    p = next(model.parameters(), None)
    x = torch.zeros((1, *shape), device=p.device if p is not None else "cpu",
                    dtype=p.dtype if p is not None else torch.float32)
    try:
        model.eval()
        with torch.no_grad():
            model(x)
    finally:
        for h in handles:
            h.remove()
        model.train(was_training)
    return total
