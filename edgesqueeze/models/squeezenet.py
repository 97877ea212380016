"""SqueezeNet (Iandola et al. 2016) from one config: torchvision 1.0 / 1.1 and small-input variants.

Why one config instead of four classes: compression stages, checkpoints and exporters only
ever see ``SqueezeNet(config)``; a variant is a handful of numbers, stored in the checkpoint
as ``asdict(config)`` and rebuilt with ``SqueezeNetConfig.from_dict``.

The no-BatchNorm configs reproduce torchvision's ``features.N`` / ``classifier.1`` key layout
exactly, so torchvision-format state_dicts (e.g. ``../shared/models/squeezenet1_0-imagenet.pt``)
load with ``strict=True``.

Example::

    >>> m = squeezenet_mnist()
    >>> m(torch.zeros(2, 1, 28, 28)).shape
    torch.Size([2, 10])
    >>> SqueezeNetConfig.from_dict(m.arch_kwargs) == m.config
    True
"""

from __future__ import annotations

import difflib
import math
from dataclasses import asdict, dataclass, fields
from typing import Any

import torch
from torch import nn

from ..errors import ModelError

__all__ = [
    "Fire",
    "SqueezeNetConfig",
    "SqueezeNet",
    "squeezenet",
    "squeezenet1_0",
    "squeezenet1_1",
    "squeezenet_mnist",
    "squeezenet_cifar",
    "tutorial_squeezenet",
]


class Fire(nn.Module):
    """squeeze 1x1 -> (expand 1x1 || expand 3x3), concatenated on channels.

    Attribute names are torchvision's so state_dict keys match. ``batch_norm=True`` drops the
    conv biases (BN has its own shift) and adds ``squeeze_bn``/``expand1x1_bn``/``expand3x3_bn``.
    ``bypass=True`` adds the input to the output (paper section 6, "simple bypass"); it has no
    parameters, so keys are unchanged, and it needs ``in_ch == e1x1 + e3x3``.
    """

    def __init__(self, in_ch: int, squeeze: int, e1x1: int, e3x3: int, *,
                 batch_norm: bool = False, bypass: bool = False) -> None:
        super().__init__()
        if bypass and in_ch != e1x1 + e3x3:
            raise ModelError(f"Fire bypass needs in_ch == e1x1 + e3x3, "
                             f"got {in_ch} != {e1x1 + e3x3}")
        self.inplanes = in_ch
        self.bypass = bypass
        bias = not batch_norm
        self.squeeze = nn.Conv2d(in_ch, squeeze, kernel_size=1, bias=bias)
        if batch_norm:
            self.squeeze_bn = nn.BatchNorm2d(squeeze)
        self.squeeze_activation = nn.ReLU(inplace=True)
        self.expand1x1 = nn.Conv2d(squeeze, e1x1, kernel_size=1, bias=bias)
        if batch_norm:
            self.expand1x1_bn = nn.BatchNorm2d(e1x1)
        self.expand1x1_activation = nn.ReLU(inplace=True)
        self.expand3x3 = nn.Conv2d(squeeze, e3x3, kernel_size=3, padding=1, bias=bias)
        if batch_norm:
            self.expand3x3_bn = nn.BatchNorm2d(e3x3)
        self.expand3x3_activation = nn.ReLU(inplace=True)
        self.batch_norm = batch_norm

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # hasattr, not a flag: TorchScript resolves it when compiling, so the no-BN module
        # (which lacks the *_bn attributes) still scripts.
        s = self.squeeze(x)
        if hasattr(self, "squeeze_bn"):
            s = self.squeeze_bn(s)
        s = self.squeeze_activation(s)
        a, b = self.expand1x1(s), self.expand3x3(s)
        if hasattr(self, "expand1x1_bn"):
            a, b = self.expand1x1_bn(a), self.expand3x3_bn(b)
        out = torch.cat([self.expand1x1_activation(a), self.expand3x3_activation(b)], 1)
        # Simple bypass: the add follows the expand ReLUs, as in the paper's figure 2.
        return out + x if self.bypass else out

    def extra_repr(self) -> str:
        return f"bypass={self.bypass}" if self.bypass else ""


_Triple = tuple[int, int, int]

# torchvision's fire layouts; 1.1 reuses 1.0's modules with earlier pools and a smaller stem.
_FIRES_V1 = ((16, 64, 64), (16, 64, 64), (32, 128, 128), (32, 128, 128),
             (48, 192, 192), (48, 192, 192), (64, 256, 256), (64, 256, 256))


def _is_int(v: Any) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


@dataclass(frozen=True)
class SqueezeNetConfig:
    """Everything that defines a SqueezeNet; ``asdict`` of it is JSON and rebuilds the model.

    Channel counts in ``fires`` are (squeeze, expand1x1, expand3x3) at ``width_mult=1.0``;
    ``width_mult`` scales the stem and every squeeze/expand count (``max(1, round(c * w))``).
    ``pool_after`` holds 0-based fire indices followed by a max pool; ``stem_pool`` puts one
    right after the stem. ``bypass`` adds a residual around every fire whose input and output
    channel counts match (fires 3, 5, 7, 9 in the paper's numbering for 1.0).
    ``final_relu`` is torchvision's ReLU before the average pool: it makes logits
    non-negative, which trains poorly on small problems, so the small variants turn it off.
    """

    in_channels: int = 3
    num_classes: int = 1000
    stem_channels: int = 96
    stem_kernel: int = 7
    stem_stride: int = 2
    stem_padding: int = 0
    stem_pool: bool = True
    fires: tuple[_Triple, ...] = _FIRES_V1
    pool_after: tuple[int, ...] = (2, 6)
    pool_kernel: int = 3
    pool_stride: int = 2
    ceil_mode: bool = True
    width_mult: float = 1.0
    batch_norm: bool = False
    bypass: bool = False
    dropout: float = 0.5
    final_relu: bool = True

    def __post_init__(self) -> None:
        # Lists (from JSON/YAML) become tuples so the config stays hashable and == works.
        try:
            fires = tuple(tuple(f) for f in self.fires)
            pool_after = tuple(self.pool_after)
        except TypeError:
            raise ModelError("SqueezeNetConfig.fires / pool_after must be sequences") from None
        object.__setattr__(self, "fires", fires)
        object.__setattr__(self, "pool_after", pool_after)
        self._validate()

    def _validate(self) -> None:
        def bad(name: str, want: str) -> ModelError:
            got = getattr(self, name)
            return ModelError(f"SqueezeNetConfig.{name}: expected {want}, got {got!r}")

        for name in ("in_channels", "num_classes", "stem_channels", "stem_kernel",
                     "stem_stride", "pool_kernel", "pool_stride"):
            v = getattr(self, name)
            if not _is_int(v) or v < 1:
                raise bad(name, "a positive int")
        if not _is_int(self.stem_padding) or self.stem_padding < 0:
            raise bad("stem_padding", "an int >= 0")
        for name in ("stem_pool", "ceil_mode", "batch_norm", "bypass", "final_relu"):
            if not isinstance(getattr(self, name), bool):
                raise bad(name, "a bool")
        if not self.fires or not all(len(f) == 3 and all(_is_int(c) and c >= 1 for c in f)
                                     for f in self.fires):
            raise bad("fires", "a non-empty list of (squeeze, e1x1, e3x3) positive ints")
        n = len(self.fires)
        if not all(_is_int(i) and 0 <= i < n for i in self.pool_after):
            raise bad("pool_after", f"fire indices in [0, {n - 1}]")
        if list(self.pool_after) != sorted(set(self.pool_after)):
            raise bad("pool_after", "strictly increasing indices")
        w = self.width_mult
        if (not isinstance(w, (int, float)) or isinstance(w, bool)
                or not math.isfinite(w) or w <= 0):
            raise bad("width_mult", "a finite number > 0")
        d = self.dropout
        if not isinstance(d, (int, float)) or isinstance(d, bool) or not 0 <= d < 1:
            raise bad("dropout", "a number in [0, 1)")

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "SqueezeNetConfig":
        """Inverse of ``dataclasses.asdict``; unknown keys are refused, missing ones default."""
        if not isinstance(d, dict):
            raise ModelError(f"SqueezeNetConfig.from_dict expects a dict, got {type(d).__name__}")
        known = [f.name for f in fields(cls)]
        for k in d:
            if k not in known:
                hint = difflib.get_close_matches(str(k), known, n=1)
                tip = f"; did you mean '{hint[0]}'?" if hint else f"; known: {', '.join(known)}"
                raise ModelError(f"SqueezeNetConfig: unknown key '{k}'{tip}")
        return cls(**d)

    def scaled(self, c: int) -> int:
        return max(1, round(c * self.width_mult))

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready dict (tuples as lists): what checkpoints store."""
        d = asdict(self)
        d["fires"] = [list(f) for f in self.fires]
        d["pool_after"] = list(self.pool_after)
        return d


class SqueezeNet(nn.Module):
    """``features`` (stem, fires, pools) -> ``classifier`` (dropout, 1x1 conv, [ReLU], avg pool).

    With ``batch_norm=False`` the index layout is torchvision's: stem conv at ``features.0``,
    ReLU, optional stem pool, then fires with pools where ``pool_after`` says; the final conv
    is ``classifier.1``. With ``batch_norm=True`` the stem is conv, BN, ReLU (indices shift).
    """

    def __init__(self, config: SqueezeNetConfig) -> None:
        super().__init__()
        if not isinstance(config, SqueezeNetConfig):
            raise ModelError(f"SqueezeNet expects a SqueezeNetConfig, got {type(config).__name__}")
        c = config
        self.config = c
        stem = c.scaled(c.stem_channels)
        layers: list[nn.Module] = [nn.Conv2d(c.in_channels, stem, c.stem_kernel, c.stem_stride,
                                             c.stem_padding, bias=not c.batch_norm)]
        if c.batch_norm:
            layers.append(nn.BatchNorm2d(stem))
        layers.append(nn.ReLU(inplace=True))

        def pool() -> nn.Module:
            return nn.MaxPool2d(c.pool_kernel, c.pool_stride, ceil_mode=c.ceil_mode)

        if c.stem_pool:
            layers.append(pool())
        ch = stem
        for i, (s, e1, e3) in enumerate(c.fires):
            s, e1, e3 = c.scaled(s), c.scaled(e1), c.scaled(e3)
            layers.append(Fire(ch, s, e1, e3, batch_norm=c.batch_norm,
                               bypass=c.bypass and ch == e1 + e3))
            ch = e1 + e3
            if i in c.pool_after:
                layers.append(pool())
        self.features = nn.Sequential(*layers)

        # A local, not an attribute: as an attribute it would add duplicate state_dict keys.
        final_conv = nn.Conv2d(ch, c.num_classes, kernel_size=1)
        head: list[nn.Module] = [nn.Dropout(p=c.dropout), final_conv]
        if c.final_relu:
            head.append(nn.ReLU(inplace=True))
        head.append(nn.AdaptiveAvgPool2d((1, 1)))
        self.classifier = nn.Sequential(*head)

        # torchvision's init: kaiming_uniform everywhere, a small normal for the final conv so
        # initial logits are near zero. BN keeps PyTorch's (1, 0) default.
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                if m is final_conv:
                    nn.init.normal_(m.weight, mean=0.0, std=0.01)
                else:
                    nn.init.kaiming_uniform_(m.weight)
                if m.bias is not None:
                    nn.init.constant_(m.bias, 0)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.flatten(self.classifier(self.features(x)), 1)


# Named starting points; builders apply keyword overrides on top.
_CONFIGS: dict[str, SqueezeNetConfig] = {
    "1_0": SqueezeNetConfig(),
    "1_1": SqueezeNetConfig(stem_channels=64, stem_kernel=3, pool_after=(1, 3)),
    # 28x28x1: stem at 28, pool -> 14, two light fires, pool -> 7, three heavier fires.
    # 68k params, 5.2 M MACs: ~50 s/epoch on 2 CPU cores, and int8 weights (68 KB) leave
    # room under 100 KB for per-channel scales, biases and the file's graph.
    "mnist": SqueezeNetConfig(
        in_channels=1, num_classes=10, stem_channels=32, stem_kernel=3, stem_stride=1,
        stem_padding=1, fires=((16, 32, 32), (16, 32, 32), (24, 64, 64), (24, 64, 64),
                               (24, 64, 64)),
        pool_after=(1,), batch_norm=True, dropout=0.2, final_relu=False),
    # 32x32x3: only the stem runs at 32x32; three fires at 16x16, four at 8x8 (1.0's first
    # seven). 0.53 M params, 49 M MACs, ~190 s/epoch on 2 CPU cores; pool_after=(1,) moves
    # the third fire to 8x8 for 40 M MACs and ~15% faster epochs.
    "cifar": SqueezeNetConfig(
        in_channels=3, num_classes=10, stem_channels=64, stem_kernel=3, stem_stride=1,
        stem_padding=1, fires=_FIRES_V1[:7], pool_after=(2,),
        batch_norm=True, bypass=True, dropout=0.2, final_relu=False),
    # A "typical tutorial" net: no BN, ReLU before the average pool; see tutorial_squeezenet.
    "tutorial": SqueezeNetConfig(
        in_channels=1, num_classes=10, stem_channels=64, stem_kernel=3, stem_stride=1,
        fires=((8, 32, 32), (8, 32, 32), (16, 64, 64), (16, 64, 64)), pool_after=(1,),
        dropout=0.5, final_relu=True),
}


def squeezenet(version: str, **overrides: Any) -> SqueezeNet:
    """Build a SqueezeNet from a named config (``1_0``, ``1_1``, ``mnist``, ``cifar``,
    ``tutorial``) with any ``SqueezeNetConfig`` field overridden."""
    if version not in _CONFIGS:
        hint = difflib.get_close_matches(str(version), list(_CONFIGS), n=1)
        tip = f"; did you mean '{hint[0]}'?" if hint else ""
        raise ModelError(f"unknown SqueezeNet version '{version}'; known: "
                         f"{', '.join(_CONFIGS)}{tip}")
    return SqueezeNet(SqueezeNetConfig.from_dict({**asdict(_CONFIGS[version]), **overrides}))


def _tagged(model: SqueezeNet, name: str) -> SqueezeNet:
    # The full config, not just the overrides: a checkpoint then rebuilds the same net even
    # if a builder's defaults change later.
    model.arch_name = name
    model.arch_kwargs = model.config.to_dict()
    return model


def squeezenet1_0(*, num_classes: int = 1000, **overrides: Any) -> SqueezeNet:
    """torchvision's SqueezeNet 1.0 (1,248,424 params at 1000 classes, ~0.82 G MACs at 224)."""
    return _tagged(squeezenet("1_0", num_classes=num_classes, **overrides), "squeezenet1_0")


def squeezenet1_1(*, num_classes: int = 1000, **overrides: Any) -> SqueezeNet:
    """torchvision's SqueezeNet 1.1 (1,235,496 params, ~0.35 G MACs at 224): 2.4x cheaper."""
    return _tagged(squeezenet("1_1", num_classes=num_classes, **overrides), "squeezenet1_1")


def squeezenet_mnist(*, num_classes: int = 10, **overrides: Any) -> SqueezeNet:
    """SqueezeNet for 28x28x1 (MNIST): BN, no final ReLU, feature maps 28 -> 14 -> 7."""
    return _tagged(squeezenet("mnist", num_classes=num_classes, **overrides), "squeezenet_mnist")


def squeezenet_cifar(*, num_classes: int = 10, **overrides: Any) -> SqueezeNet:
    """SqueezeNet for 32x32x3 (CIFAR-10): BN, simple bypass, no final ReLU, 32 -> 16 -> 8."""
    return _tagged(squeezenet("cifar", num_classes=num_classes, **overrides), "squeezenet_cifar")


def tutorial_squeezenet(*, num_classes: int = 10, in_channels: int = 1,
                        **overrides: Any) -> SqueezeNet:
    """A deliberately weak baseline that mimics common tutorial code for SqueezeNet on MNIST.

    What tutorials typically do: copy torchvision's head (ReLU before the average pool, so
    logits are >= 0), no BatchNorm, a 64-channel 3x3 stem with a max pool, then SqueezeNet
    1.1's first four fire modules at half width. It exists so benchmarks can show what our
    ``squeezenet_mnist`` design choices buy; do not use it for anything else.
    """
    m = squeezenet("tutorial", num_classes=num_classes, in_channels=in_channels, **overrides)
    return _tagged(m, "tutorial_squeezenet")
