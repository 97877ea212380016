"""Name -> builder registry: how checkpoints and recipes turn a string into a model.

Every built model carries ``arch_name`` and ``arch_kwargs`` (JSON), and
``build_model(m.arch_name, **m.arch_kwargs)`` rebuilds the same architecture; a checkpoint
stores those two and the state_dict, nothing pickled.

Example::

    >>> m = build_model("squeezenet_mnist", width_mult=0.5)
    >>> build_model(m.arch_name, **m.arch_kwargs).state_dict().keys() == m.state_dict().keys()
    True
"""

from __future__ import annotations

import difflib
import inspect
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from torch import nn

from ..errors import ModelError
from .resnet import resnet8
from .squeezenet import (squeezenet1_0, squeezenet1_1, squeezenet_cifar, squeezenet_mnist,
                         tutorial_squeezenet)

__all__ = ["ModelSpec", "register", "get_spec", "list_specs", "build_model", "registered_input_shape"]


@dataclass(frozen=True)
class ModelSpec:
    """A registered architecture and the input it expects by default."""

    name: str
    builder: Callable[..., nn.Module]
    input_shape: tuple[int, int, int]  # (C, H, W)
    num_classes: int
    description: str


_REGISTRY: dict[str, ModelSpec] = {}


def _closest(word: str, options: list[str]) -> str | None:
    """Most similar option (difflib ratio >= 0.6); ties go to the earlier-registered name, so
    'squeezenet2' suggests 'squeezenet1_0' (difflib.get_close_matches would pick 1_1)."""
    scored = [(difflib.SequenceMatcher(None, word, o).ratio(), o) for o in options]
    best = max(scored, key=lambda t: t[0], default=(0.0, None))
    return best[1] if best[0] >= 0.6 else None


def register(spec: ModelSpec) -> ModelSpec:
    """Add ``spec``; a name can be registered once (silently replacing would hide bugs)."""
    if not isinstance(spec, ModelSpec):
        raise ModelError(f"register expects a ModelSpec, got {type(spec).__name__}")
    shape = spec.input_shape
    if not (isinstance(spec.name, str) and spec.name and callable(spec.builder)
            and isinstance(shape, tuple) and len(shape) == 3
            and all(isinstance(d, int) and d > 0 for d in shape)):
        raise ModelError(f"register: bad ModelSpec {spec!r}: needs a name, a callable "
                         "builder and input_shape (C, H, W) of positive ints")
    if spec.name in _REGISTRY:
        raise ModelError(f"model '{spec.name}' is already registered")
    _REGISTRY[spec.name] = spec
    return spec


def get_spec(name: str) -> ModelSpec:
    if name not in _REGISTRY:
        if ":" not in str(name) and "." in str(name):
            raise ModelError(f"unknown model '{name}'; for your own class write package.module:Class "
                             "(or path/to/file.py:Class)")
        hint = _closest(str(name), list(_REGISTRY))
        tip = f"; did you mean '{hint}'?" if hint else ""
        raise ModelError(f"unknown model '{name}'; known: {', '.join(_REGISTRY)}{tip}; or your own "
                         "class as package.module:Class or path/to/file.py:Class")
    return _REGISTRY[name]


def registered_input_shape(arch: Any, arch_kwargs: dict[str, Any] | None = None) -> list[int] | None:
    """The input shape (C, H, W) of a registered architecture as built with ``arch_kwargs``
    (its ``in_channels`` applied); None for the user's own class or an unknown name."""
    if not isinstance(arch, str) or arch not in _REGISTRY:
        return None
    shape = list(_REGISTRY[arch].input_shape)
    channels = (arch_kwargs or {}).get("in_channels")
    return [int(channels), *shape[1:]] if isinstance(channels, int) and not isinstance(channels, bool) else shape


def list_specs() -> list[ModelSpec]:
    """Registered specs, in registration order."""
    return list(_REGISTRY.values())


def build_model(name: str, **kwargs: Any) -> nn.Module:
    """Build ``name`` with builder kwargs; the model gets ``arch_name`` and ``arch_kwargs``.

    ``name`` is a registered name or the user's own ``package.module:Class`` /
    ``path/file.py:builder`` (:mod:`.imports`)."""
    from .imports import build_import, is_import_spec

    if is_import_spec(name):
        return build_import(name, kwargs)
    spec = get_spec(name)
    try:
        inspect.signature(spec.builder).bind(**kwargs)
    except TypeError as e:
        raise ModelError(f"model '{name}': {e}") from None
    model = spec.builder(**kwargs)
    if not hasattr(model, "arch_kwargs"):  # third-party builders: record what rebuilds it
        model.arch_kwargs = dict(kwargs)
    model.arch_name = name
    return model


for _spec in (
    ModelSpec("squeezenet1_0", squeezenet1_0, (3, 224, 224), 1000,
              "torchvision SqueezeNet 1.0 (ImageNet, 1.25 M params)"),
    ModelSpec("squeezenet1_1", squeezenet1_1, (3, 224, 224), 1000,
              "torchvision SqueezeNet 1.1 (ImageNet, 2.4x fewer MACs than 1.0)"),
    ModelSpec("squeezenet_mnist", squeezenet_mnist, (1, 28, 28), 10,
              "small SqueezeNet for 28x28 grey digits, BatchNorm, no final ReLU"),
    ModelSpec("squeezenet_cifar", squeezenet_cifar, (3, 32, 32), 10,
              "SqueezeNet for 32x32 RGB with BatchNorm and simple bypass"),
    ModelSpec("resnet8", resnet8, (3, 32, 32), 10,
              "MLPerf Tiny ResNet-8 reference baseline"),
    ModelSpec("tutorial_squeezenet", tutorial_squeezenet, (1, 28, 28), 10,
              "weak baseline mimicking tutorial SqueezeNet code (no BN, final ReLU)"),
):
    register(_spec)
