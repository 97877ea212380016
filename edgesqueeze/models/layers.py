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


_NORMS = {"WeightNorm", "SpectralNorm"}  # torch.nn.utils.parametrizations' _WeightNorm, _SpectralNorm


def _norms_of(mod: nn.Module) -> tuple[dict[str, set[str]], list]:
    """``mod``'s own weight_norm / spectral_norm: ``({tensor name: kinds}`` of its
    parametrizations (only these two: weight sharing parametrizes weights too), its
    hook-based ``WeightNorm`` / ``SpectralNorm`` forward pre-hooks)."""
    from torch.nn.utils import parametrize
    from torch.nn.utils.spectral_norm import SpectralNorm
    from torch.nn.utils.weight_norm import WeightNorm

    params = {}
    if parametrize.is_parametrized(mod):
        for tensor_name, plist in mod.parametrizations.items():
            kinds = {type(p).__name__.lstrip("_") for p in plist} & _NORMS
            if kinds:
                params[tensor_name] = kinds
    hooks = [h for h in mod._forward_pre_hooks.values() if isinstance(h, (WeightNorm, SpectralNorm))]
    return params, hooks


def weight_transforms(model: nn.Module) -> list[str]:
    """The layers whose weight is computed by weight_norm or spectral_norm (the
    ``torch.nn.utils.parametrizations`` ones, or the older hook-based ``torch.nn.utils``
    ones), as ``name (kind)``: pruning, weight sharing, BatchNorm folding and export all
    work on a plain ``weight`` tensor."""
    found = []
    for name, mod in model.named_modules():
        params, hooks = _norms_of(mod)
        kinds = sorted(set().union(*params.values())) + [type(h).__name__ for h in hooks]
        if kinds:
            found.append(f"{name or type(mod).__name__} ({', '.join(kinds)})")
    return found


def plain_weights(model: nn.Module) -> list[str]:
    """Replace every weight_norm / spectral_norm of ``model`` (:func:`weight_transforms`) by
    the plain tensor it computes now, in eval mode (spectral norm's power iteration is not
    run again: the stored estimate is what inference used); returns the layers changed. The
    model then computes what it computed, through ordinary ``weight`` parameters."""
    from torch.nn.utils import parametrize, remove_spectral_norm, remove_weight_norm
    from torch.nn.utils.weight_norm import WeightNorm

    changed = weight_transforms(model)
    if not changed:
        return changed
    training = model.training
    model.eval()
    for mod in model.modules():
        params, hooks = _norms_of(mod)
        for tensor_name in params:
            parametrize.remove_parametrizations(mod, tensor_name, leave_parametrized=True)
        for hook in hooks:
            (remove_weight_norm if isinstance(hook, WeightNorm) else remove_spectral_norm)(mod, hook.name)
        names = [*params, *(h.name for h in hooks)]
        if names:  # spectral_norm's state_dict hooks, which remove_spectral_norm misses once torch wraps them:
            # the load hook left behind turned a plain weight into a missing weight_orig
            for table in (mod._load_state_dict_pre_hooks, mod._state_dict_hooks):
                for key in [k for k, h in table.items() if "SpectralNorm" in type(getattr(h, "hook", h)).__name__]:
                    del table[key]
        for tensor_name in names:  # a trainable parameter, whatever the removal left (a tensor for weight_norm's
            value = getattr(mod, tensor_name)  # two originals when computed without gradients)
            if not isinstance(value, nn.Parameter):
                delattr(mod, tensor_name)
                mod.register_parameter(tensor_name, nn.Parameter(value.detach().clone()))
    model.train(training)
    return changed


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


def check_layer_names(wanted: Iterable[str], known: Sequence[str], path: str,
                      kept: Sequence[str] = ()) -> None:
    """Refuse names that are not prunable layers of the model, suggesting the closest one.
    ``path``: the recipe field (``compress.prune.layers``) or the option (``--layers``).
    ``kept``: layers ``compress.keep_layers`` holds, named as such (they were called "no
    Conv2d or Linear layer" with a suggestion of another)."""
    for name in wanted:
        if name in known:
            continue
        where = f"{path} {name}" if path.startswith("--") else f"{path}.{name}"
        if name in kept:
            raise RecipeError(f"{where}: the layer is in compress.keep_layers, which no stage touches; "
                              "take it out of one of the two")
        inside = [k for k in known if k.startswith(name + ".")]
        if inside:  # a module: keep_layers takes one, a stage's layers name each layer
            raise RecipeError(f"{where}: a module, not a layer; name its Conv2d/Linear layers: "
                              + ", ".join(inside[:6]) + (", ..." if len(inside) > 6 else ""))
        hint = difflib.get_close_matches(name, list(known), n=1, cutoff=0.6)
        if hint:
            tip = f"; did you mean '{hint[0]}'?"
        else:
            shown = ", ".join(list(known)[:8]) + (", ..." if len(known) > 8 else "")
            tip = f"; the model's Conv2d/Linear layers are: {shown} ({len(known)} in all)"
        where = f"{path} {name}" if path.startswith("--") else f"{path}.{name}"  # an option, or a recipe field
        raise RecipeError(f"{where}: no Conv2d or Linear layer of that name{tip}")
