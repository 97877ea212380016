"""The layers compression works on: every Conv2d and Linear of a model, by module name.

Pruning, weight sharing and their recipe sections (``compress.prune.layers``,
``compress.cluster.layers``) all name layers this way, so the lookup and the check of
user-given names live here, below both.
"""

from __future__ import annotations

import difflib
from collections.abc import Iterable, Sequence

import torch
from torch import nn

from ..errors import RecipeError

__all__ = ["KEEP_ATTR", "check_layer_names", "conv_input_padded", "is_depthwise", "keep_layers", "prunable_layers"]

KEEP_ATTR = "_edgesqueeze_keep"  # set on a layer compression must leave alone (compress.keep_layers)


def prunable_layers(model: nn.Module) -> dict[str, nn.Module]:
    """Every Conv2d and Linear by module name, in module order, except the layers marked to
    be kept as they are (:func:`keep_layers`)."""
    return {name: m for name, m in model.named_modules()
            if isinstance(m, (nn.Conv2d, nn.Linear)) and not getattr(m, KEEP_ATTR, False)}


def conv_input_padded(conv: nn.Conv2d, x: torch.Tensor) -> torch.Tensor:
    """``x`` padded as ``conv`` pads it before its kernel, for ``F.unfold(..., padding=0)`` to
    give the patches the conv sees: any padding mode (``zeros``, ``reflect``, ``replicate``,
    ``circular``) and numeric, ``'same'`` or ``'valid'`` padding."""
    pad = conv._reversed_padding_repeated_twice
    if not any(pad):
        return x
    mode = "constant" if conv.padding_mode == "zeros" else conv.padding_mode
    return nn.functional.pad(x, pad, mode=mode)


def is_depthwise(layer: nn.Module) -> bool:
    """A depthwise conv: one filter per input channel (``groups == in_channels > 1``), as in
    MobileNet and ShuffleNet. A 3x3 depthwise filter has only 9 weights, so pruning and
    coarse weight sharing hurt it most, while all of them together are a few percent of a
    network's weights. Grouped convs with several channels per group are not depthwise."""
    return isinstance(layer, nn.Conv2d) and layer.groups > 1 and layer.groups == layer.in_channels


def keep_layers(model: nn.Module, names: Iterable[str], path: str = "compress.keep_layers") -> list[str]:
    """Mark the Conv2d/Linear layers ``names`` (or every such layer inside a named module, e.g.
    a whole block) to be left alone: not pruned, not shared, not retrained (their parameters
    stop taking gradients). They stay in the model and the archive, stored as they are.
    Returns the layers marked."""
    names = list(names)
    if not names:
        return []
    everything = {n: m for n, m in model.named_modules() if isinstance(m, (nn.Conv2d, nn.Linear))}
    modules = dict(model.named_modules())
    marked: list[str] = []
    for name in names:
        inside = [n for n in everything if n == name or n.startswith(name + ".")]
        if name not in modules or not inside:
            check_layer_names([name], list(everything), path)  # suggests the closest name
            raise RecipeError(f"{path}.{name}: holds no Conv2d or Linear layer")
        for n in inside:
            layer = everything[n]
            setattr(layer, KEEP_ATTR, True)
            for p in layer.parameters(recurse=False):
                p.requires_grad_(False)
            if n not in marked:
                marked.append(n)
    return marked


def check_layer_names(wanted: Iterable[str], known: Sequence[str], path: str) -> None:
    """Refuse names that are not prunable layers of the model, suggesting the closest one.
    ``path``: the recipe field (``compress.prune.layers``) or the option (``--layers``)."""
    for name in wanted:
        if name in known:
            continue
        hint = difflib.get_close_matches(name, list(known), n=1, cutoff=0.6)
        if hint:
            tip = f"; did you mean '{hint[0]}'?"
        else:
            shown = ", ".join(list(known)[:8]) + (", ..." if len(known) > 8 else "")
            tip = f"; the model's Conv2d/Linear layers are: {shown} ({len(known)} in all)"
        where = f"{path} {name}" if path.startswith("--") else f"{path}.{name}"  # an option, or a recipe field
        raise RecipeError(f"{where}: no Conv2d or Linear layer of that name{tip}")
