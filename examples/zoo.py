"""A zoo of small, common conv nets, written the way a user writes them: plain ``nn.Module``
classes that import nothing from edgesqueeze.

Point edgesqueeze at one with ``--arch examples/zoo.py:MobileNetV2`` (a class) or
``--arch examples/zoo.py:mobilenet_v2`` (a builder function). Every class takes the same
JSON-serialisable keyword arguments, ``num_classes=10, in_channels=3, width=1.0`` (``width``
scales every channel count), and maps a float ``(N, C, H, W)`` batch to ``(N, num_classes)``
logits. All of them end in adaptive average pooling and downsample at most 3 times (stride-2
convs or 2x2 max-pools), so 32x32 (CIFAR-10) and 8x8 (sklearn digits) inputs both work.
Each one traces and scripts with TorchScript, exports with ``torch.export`` and traces with
``torch.fx`` (tests/test_zoo_models.py checks all four against eager).

Parameters and MACs at 3x32x32, 10 classes, width 1.0 (MACs: Conv2d and Linear
multiply-accumulates, biases, BN, activations and adds not counted; the same counting as
``edgesqueeze models``)::

    class                   params     MACs   what
    SqueezeNetBypass       172,618    10.3 M  SqueezeNet fire modules with BN, residual bypass
                                              around every second fire, 1x1-conv classifier
    MobileNetV2            241,554     8.7 M  inverted residuals: 1x1 expand, depthwise 3x3,
                                              linear 1x1 bottleneck, ReLU6, add when shapes match
    ShuffleNetV2           268,570     9.3 M  ShuffleNet V2 units: channel split, depthwise 3x3,
                                              concat, channel shuffle (view/transpose/view)
    ResNet10               308,826    16.2 M  basic-block ResNet, 4 stages x 1 block, 16-128 ch,
                                              1x1 projection shortcuts with BN
    SEHardSwishNet         262,594     8.1 M  MobileNetV3-Small-like: depthwise blocks with
                                              squeeze-and-excitation (hardsigmoid), Hardswish
    DepthwiseSeparableNet  141,994     6.2 M  MobileNet V1: depthwise 3x3 + pointwise 1x1 blocks
    ConvLinearHead          53,770     5.6 M  conv-BN-ReLU-maxpool x2, flatten, Linear-ReLU-
                                              Dropout-Linear
    NoWeightsNet                 0     0      pooling and flatten only (no conv, no Linear)
    DataDependentNet           618    ~0.4 M  deliberately bad: ``if x.mean() > 0`` in forward

Training cost on a 2-core CPU (torch 2.13), relative to the MLPerf Tiny ResNet-8 (78 K
params, 12.5 M MACs, ~33 s per 45,000-image CIFAR-10 epoch at 2 threads): one SGD step at
batch 128, 3x32x32, measured interleaved with ResNet-8 steps (the machine was shared, so
+-20%): ResNet10 ~1.2-1.4x, ShuffleNetV2 ~1.5-1.8x, MobileNetV2 ~1.6-2.0x,
SqueezeNetBypass ~1.7x, SEHardSwishNet ~1.8x, DepthwiseSeparableNet ~1.0x, ConvLinearHead
~0.5x, i.e. roughly 20-60 s per epoch. MobileNetV2, ShuffleNetV2 and ResNet10 are sized to
plausibly reach >= 80% CIFAR-10 test accuracy in ~20 epochs with random-crop + flip
augmentation (not measured here; ResNet-8 reaches 82% in 24). MACs undercount the depthwise
nets: on a CPU their depthwise convs, BatchNorms and activations are memory-bound, which is
why their default widths stay under 10 M MACs (a 24 M-MAC MobileNetV2 took ~7x ResNet-8).

``DataDependentNet`` branches in Python on a tensor's value, so ``torch.export`` and
``torch.fx`` refuse it and ``torch.jit.trace`` freezes whichever branch the example input
took (with a TracerWarning); ``torch.jit.script`` compiles the branch into the graph.
``NoWeightsNet`` has nothing to compress.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

__all__ = [
    "ConvLinearHead",
    "DataDependentNet",
    "DepthwiseSeparableNet",
    "MobileNetV2",
    "NoWeightsNet",
    "ResNet10",
    "SEHardSwishNet",
    "ShuffleNetV2",
    "SqueezeNetBypass",
    "mobilenet_v2",
]


def _ch(channels: int, width: float, divisor: int = 4) -> int:
    """``channels * width`` rounded to a multiple of ``divisor`` (at least ``divisor``)."""
    return max(divisor, int(channels * width + divisor / 2) // divisor * divisor)


def _check_args(num_classes: int, in_channels: int, width: float) -> None:
    for name, v in (("num_classes", num_classes), ("in_channels", in_channels)):
        if not isinstance(v, int) or isinstance(v, bool) or v < 1:
            raise ValueError(f"{name} must be a positive int, got {v!r}")
    if isinstance(width, bool) or not isinstance(width, (int, float)) or not width > 0:
        raise ValueError(f"width must be a positive number, got {width!r}")


def _init_weights(model: nn.Module) -> None:
    """He init for convs, unit BN, small-normal Linear: deterministic under torch.manual_seed."""
    for m in model.modules():
        if isinstance(m, nn.Conv2d):
            nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
            if m.bias is not None:
                nn.init.zeros_(m.bias)
        elif isinstance(m, nn.BatchNorm2d):
            nn.init.ones_(m.weight)
            nn.init.zeros_(m.bias)
        elif isinstance(m, nn.Linear):
            nn.init.normal_(m.weight, 0.0, 0.01)
            nn.init.zeros_(m.bias)


def _conv_bn(in_ch: int, out_ch: int, kernel: int = 3, stride: int = 1, groups: int = 1,
             act: type[nn.Module] | None = nn.ReLU) -> nn.Sequential:
    layers: list[nn.Module] = [
        nn.Conv2d(in_ch, out_ch, kernel, stride, padding=kernel // 2, groups=groups, bias=False),
        nn.BatchNorm2d(out_ch)]
    if act is not None:
        layers.append(act(inplace=True))
    return nn.Sequential(*layers)


# --------------------------------------------------------------------------- SqueezeNet


class Fire(nn.Module):
    """Squeeze 1x1 -> (expand 1x1 | expand 3x3) concatenated, optionally plus the input."""

    def __init__(self, in_ch: int, squeeze: int, expand: int, bypass: bool = False) -> None:
        super().__init__()
        if bypass and in_ch != 2 * expand:
            raise ValueError(f"a bypass needs in_ch == 2 * expand, got {in_ch} and {expand}")
        self.bypass = bypass
        self.squeeze = _conv_bn(in_ch, squeeze, 1)
        self.expand1x1 = _conv_bn(squeeze, expand, 1, act=None)
        self.expand3x3 = _conv_bn(squeeze, expand, 3, act=None)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        s = self.squeeze(x)
        y = torch.cat([self.expand1x1(s), self.expand3x3(s)], 1)
        if self.bypass:
            y = y + x
        return F.relu(y)


class SqueezeNetBypass(nn.Module):
    """SqueezeNet with BN and simple bypass: stem, 3 x (maxpool, fire, fire + bypass), 1x1-conv
    classifier and global average pooling (no Linear layer)."""

    def __init__(self, num_classes: int = 10, in_channels: int = 3, width: float = 1.0) -> None:
        super().__init__()
        _check_args(num_classes, in_channels, width)
        stem, s1, s2, s3, e1, e2, e3 = (_ch(c, width) for c in (32, 16, 24, 32, 48, 96, 128))
        self.stem = _conv_bn(in_channels, stem, 3)
        self.features = nn.Sequential(              # Fire(in, squeeze, expand): 2 * expand out
            nn.MaxPool2d(2),                         # 32 -> 16
            Fire(stem, s1, e1),
            Fire(2 * e1, s1, e1, bypass=True),
            nn.MaxPool2d(2),                         # 16 -> 8
            Fire(2 * e1, s2, e2),
            Fire(2 * e2, s2, e2, bypass=True),
            nn.MaxPool2d(2),                         # 8 -> 4
            Fire(2 * e2, s3, e3),
            Fire(2 * e3, s3, e3, bypass=True),
        )
        self.classifier = nn.Sequential(
            nn.Dropout(0.2),
            nn.Conv2d(2 * e3, num_classes, 1),
            nn.AdaptiveAvgPool2d(1),
        )
        _init_weights(self)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.features(self.stem(x))
        return torch.flatten(self.classifier(x), 1)


# --------------------------------------------------------------------------- MobileNetV2


class InvertedResidual(nn.Module):
    """1x1 expand (ReLU6) -> depthwise 3x3 (ReLU6) -> 1x1 linear bottleneck, + x when it fits."""

    def __init__(self, in_ch: int, out_ch: int, stride: int, expand_ratio: int) -> None:
        super().__init__()
        hidden = in_ch * expand_ratio
        self.use_residual = stride == 1 and in_ch == out_ch
        layers: list[nn.Module] = []
        if expand_ratio != 1:
            layers.append(_conv_bn(in_ch, hidden, 1, act=nn.ReLU6))
        layers += [
            _conv_bn(hidden, hidden, 3, stride, groups=hidden, act=nn.ReLU6),
            nn.Conv2d(hidden, out_ch, 1, bias=False),
            nn.BatchNorm2d(out_ch),
        ]
        self.conv = nn.Sequential(*layers)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.use_residual:
            return x + self.conv(x)
        return self.conv(x)


class MobileNetV2(nn.Module):
    """CIFAR-style MobileNetV2 (stride-1 stem, 3 stride-2 stages), Linear head."""

    # (expand ratio t, output channels c, repeats n, first stride s), as in the paper's table 2
    cfg = ((1, 16, 1, 1),    # 32x32
           (2, 24, 1, 2),    # 16x16
           (3, 24, 1, 1),
           (4, 48, 2, 2),    # 8x8
           (6, 96, 2, 2),    # 4x4
           )
    last_channels = 384

    def __init__(self, num_classes: int = 10, in_channels: int = 3, width: float = 1.0) -> None:
        super().__init__()
        _check_args(num_classes, in_channels, width)
        ch = _ch(16, width)
        self.stem = _conv_bn(in_channels, ch, 3, act=nn.ReLU6)
        blocks: list[nn.Module] = []
        for t, c, n, s in self.cfg:
            out = _ch(c, width)
            for i in range(n):
                blocks.append(InvertedResidual(ch, out, s if i == 0 else 1, t))
                ch = out
        self.features = nn.Sequential(*blocks)
        last = _ch(self.last_channels, width)
        self.last_conv = _conv_bn(ch, last, 1, act=nn.ReLU6)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.dropout = nn.Dropout(0.2)
        self.fc = nn.Linear(last, num_classes)
        _init_weights(self)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.last_conv(self.features(self.stem(x)))
        x = torch.flatten(self.pool(x), 1)
        return self.fc(self.dropout(x))


def mobilenet_v2(num_classes: int = 10, in_channels: int = 3, width: float = 1.0) -> MobileNetV2:
    """Builder function form (``--arch examples/zoo.py:mobilenet_v2``)."""
    return MobileNetV2(num_classes=num_classes, in_channels=in_channels, width=width)


# --------------------------------------------------------------------------- ShuffleNetV2


def channel_shuffle(x: torch.Tensor, groups: int) -> torch.Tensor:
    batch, channels, height, width = x.size()
    x = x.view(batch, groups, channels // groups, height, width)
    x = torch.transpose(x, 1, 2).contiguous()
    return x.view(batch, -1, height, width)


class ShuffleUnit(nn.Module):
    """ShuffleNet V2 unit. Stride 1: split the channels in half, transform one half (1x1,
    depthwise 3x3, 1x1), concat, shuffle. Stride 2: both branches see all of x, no split."""

    def __init__(self, in_ch: int, out_ch: int, stride: int) -> None:
        super().__init__()
        if out_ch % 2 or (stride == 1 and in_ch != out_ch):
            raise ValueError(f"bad ShuffleUnit: in {in_ch}, out {out_ch}, stride {stride}")
        self.stride = stride
        branch = out_ch // 2
        if stride > 1:
            self.branch1 = nn.Sequential(
                _conv_bn(in_ch, in_ch, 3, stride, groups=in_ch, act=None),
                _conv_bn(in_ch, branch, 1))
        else:
            self.branch1 = nn.Sequential()
        b2_in = in_ch if stride > 1 else branch
        self.branch2 = nn.Sequential(
            _conv_bn(b2_in, branch, 1),
            _conv_bn(branch, branch, 3, stride, groups=branch, act=None),
            _conv_bn(branch, branch, 1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.stride == 1:
            x1, x2 = x.chunk(2, dim=1)
            out = torch.cat((x1, self.branch2(x2)), dim=1)
        else:
            out = torch.cat((self.branch1(x), self.branch2(x)), dim=1)
        return channel_shuffle(out, 2)


class ShuffleNetV2(nn.Module):
    """CIFAR-style ShuffleNet V2: stride-1 stem (no maxpool), 3 stages, 1x1 conv, Linear."""

    stage_channels = (48, 128, 256)
    stage_repeats = (2, 4, 2)

    def __init__(self, num_classes: int = 10, in_channels: int = 3, width: float = 1.0) -> None:
        super().__init__()
        _check_args(num_classes, in_channels, width)
        ch = _ch(24, width)
        self.stem = _conv_bn(in_channels, ch, 3)
        stages: list[nn.Module] = []
        for c, n in zip(self.stage_channels, self.stage_repeats, strict=True):
            out = _ch(c, width)
            units: list[nn.Module] = [ShuffleUnit(ch, out, 2)]
            units += [ShuffleUnit(out, out, 1) for _ in range(n - 1)]
            stages.append(nn.Sequential(*units))
            ch = out
        self.stages = nn.Sequential(*stages)        # 32 -> 16 -> 8 -> 4
        last = _ch(512, width)
        self.conv5 = _conv_bn(ch, last, 1)
        self.fc = nn.Linear(last, num_classes)
        _init_weights(self)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.conv5(self.stages(self.stem(x)))
        x = x.mean([2, 3])                           # global average pool
        return self.fc(x)


# --------------------------------------------------------------------------- ResNet10


class BasicBlock(nn.Module):
    def __init__(self, in_ch: int, out_ch: int, stride: int) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(in_ch, out_ch, 3, stride, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(out_ch)
        self.conv2 = nn.Conv2d(out_ch, out_ch, 3, 1, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(out_ch)
        if stride != 1 or in_ch != out_ch:
            self.shortcut = nn.Sequential(nn.Conv2d(in_ch, out_ch, 1, stride, bias=False),
                                          nn.BatchNorm2d(out_ch))
        else:
            self.shortcut = nn.Sequential()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = F.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return F.relu(out + self.shortcut(x))


class ResNet10(nn.Module):
    """Basic-block ResNet: stem, 4 stages of 1 block (16, 32, 64, 128 channels at width 1.0;
    stride 1, 2, 2, 2), global average pool, Linear."""

    def __init__(self, num_classes: int = 10, in_channels: int = 3, width: float = 1.0) -> None:
        super().__init__()
        _check_args(num_classes, in_channels, width)
        widths = [_ch(c, width) for c in (16, 32, 64, 128)]
        self.conv1 = nn.Conv2d(in_channels, widths[0], 3, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(widths[0])
        self.layer1 = BasicBlock(widths[0], widths[0], 1)
        self.layer2 = BasicBlock(widths[0], widths[1], 2)
        self.layer3 = BasicBlock(widths[1], widths[2], 2)
        self.layer4 = BasicBlock(widths[2], widths[3], 2)
        self.avgpool = nn.AdaptiveAvgPool2d((1, 1))
        self.fc = nn.Linear(widths[3], num_classes)
        _init_weights(self)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.relu(self.bn1(self.conv1(x)))
        x = self.layer4(self.layer3(self.layer2(self.layer1(x))))
        x = torch.flatten(self.avgpool(x), 1)
        return self.fc(x)


# --------------------------------------------------------------------------- SE + Hardswish


class SqueezeExcite(nn.Module):
    """Global average pool -> 1x1 conv -> ReLU -> 1x1 conv -> hardsigmoid, times x."""

    def __init__(self, channels: int, squeeze: int) -> None:
        super().__init__()
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc1 = nn.Conv2d(channels, squeeze, 1)
        self.relu = nn.ReLU(inplace=True)
        self.fc2 = nn.Conv2d(squeeze, channels, 1)
        self.gate = nn.Hardsigmoid()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        s = self.gate(self.fc2(self.relu(self.fc1(self.pool(x)))))
        return x * s


class SEBlock(nn.Module):
    """MobileNetV3 bneck: [1x1 expand] -> depthwise kxk -> [SE] -> 1x1 project, + x if it fits."""

    def __init__(self, in_ch: int, hidden: int, out_ch: int, kernel: int, use_se: bool,
                 hardswish: bool, stride: int) -> None:
        super().__init__()
        act = nn.Hardswish if hardswish else nn.ReLU
        self.use_residual = stride == 1 and in_ch == out_ch
        layers: list[nn.Module] = []
        if hidden != in_ch:
            layers.append(_conv_bn(in_ch, hidden, 1, act=act))
        layers.append(_conv_bn(hidden, hidden, kernel, stride, groups=hidden, act=act))
        if use_se:
            layers.append(SqueezeExcite(hidden, _ch(hidden // 4, 1.0, 8)))
        layers.append(_conv_bn(hidden, out_ch, 1, act=None))
        self.block = nn.Sequential(*layers)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.block(x)
        if self.use_residual:
            y = y + x
        return y


class SEHardSwishNet(nn.Module):
    """MobileNetV3-Small-like net for 32x32: Hardswish stem (stride 1), SE blocks, Linear."""

    # kernel, expanded channels, output channels, SE, hardswish, stride
    cfg = ((3, 16, 16, False, False, 1),    # 32x32
           (3, 48, 24, False, False, 2),    # 16x16
           (3, 72, 24, True, False, 1),
           (3, 96, 40, True, True, 2),      # 8x8
           (3, 120, 40, True, True, 1),
           (3, 144, 48, True, True, 1),
           (5, 192, 96, True, True, 2),     # 4x4
           (3, 288, 96, True, True, 1),
           )

    def __init__(self, num_classes: int = 10, in_channels: int = 3, width: float = 1.0) -> None:
        super().__init__()
        _check_args(num_classes, in_channels, width)
        ch = _ch(16, width)
        self.stem = _conv_bn(in_channels, ch, 3, act=nn.Hardswish)
        blocks: list[nn.Module] = []
        for k, exp, out, se, hs, s in self.cfg:
            out = _ch(out, width)
            blocks.append(SEBlock(ch, _ch(exp, width), out, k, se, hs, s))
            ch = out
        self.blocks = nn.Sequential(*blocks)
        last = _ch(384, width)
        self.last_conv = _conv_bn(ch, last, 1, act=nn.Hardswish)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(last, num_classes)
        _init_weights(self)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.last_conv(self.blocks(self.stem(x)))
        return self.fc(torch.flatten(self.pool(x), 1))


# --------------------------------------------------------------------------- MobileNet V1


class DepthwiseSeparable(nn.Module):
    def __init__(self, in_ch: int, out_ch: int, stride: int) -> None:
        super().__init__()
        self.depthwise = _conv_bn(in_ch, in_ch, 3, stride, groups=in_ch)
        self.pointwise = _conv_bn(in_ch, out_ch, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.pointwise(self.depthwise(x))


class DepthwiseSeparableNet(nn.Module):
    """MobileNet V1 for 32x32: stem, depthwise 3x3 + pointwise 1x1 blocks, Linear."""

    cfg = ((32, 1), (64, 2), (64, 1), (128, 2), (128, 1), (256, 2), (256, 1))

    def __init__(self, num_classes: int = 10, in_channels: int = 3, width: float = 1.0) -> None:
        super().__init__()
        _check_args(num_classes, in_channels, width)
        ch = _ch(16, width)
        self.stem = _conv_bn(in_channels, ch, 3)
        layers: list[nn.Module] = []
        for c, s in self.cfg:
            layers.append(DepthwiseSeparable(ch, _ch(c, width), s))
            ch = _ch(c, width)
        self.layers = nn.Sequential(*layers)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(ch, num_classes)
        _init_weights(self)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.layers(self.stem(x))
        return self.fc(torch.flatten(self.pool(x), 1))


# --------------------------------------------------------------------------- plain CNN


class ConvLinearHead(nn.Module):
    """(conv-BN-ReLU-maxpool) x 2, adaptive pool to 2x2, flatten, Linear-ReLU-Dropout-Linear."""

    def __init__(self, num_classes: int = 10, in_channels: int = 3, width: float = 1.0) -> None:
        super().__init__()
        _check_args(num_classes, in_channels, width)
        c1, c2, hidden = _ch(32, width), _ch(64, width), _ch(128, width)
        self.features = nn.Sequential(
            nn.Conv2d(in_channels, c1, 3, padding=1), nn.BatchNorm2d(c1), nn.ReLU(inplace=True),
            nn.MaxPool2d(2),
            nn.Conv2d(c1, c2, 3, padding=1), nn.BatchNorm2d(c2), nn.ReLU(inplace=True),
            nn.MaxPool2d(2),
            # 2x2 divides the 8x8 map of a 32x32 input and is the 2x2 map of an 8x8 one
            nn.AdaptiveAvgPool2d((2, 2)),
        )
        self.fc1 = nn.Linear(c2 * 4, hidden)
        self.dropout = nn.Dropout(0.5)
        self.fc2 = nn.Linear(hidden, num_classes)
        _init_weights(self)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = torch.flatten(self.features(x), 1)
        x = self.dropout(F.relu(self.fc1(x)))
        return self.fc2(x)


# --------------------------------------------------------------------------- deliberately bad


class DataDependentNet(nn.Module):
    """BAD on purpose: the forward pass branches in Python on a tensor's *value*.

    ``torch.export`` and ``torch.fx.symbolic_trace`` fail on the ``if``; ``torch.jit.trace``
    records only the branch the example input took (TracerWarning).
    """

    def __init__(self, num_classes: int = 10, in_channels: int = 3, width: float = 1.0) -> None:
        super().__init__()
        _check_args(num_classes, in_channels, width)
        c = _ch(16, width)
        self.conv = nn.Conv2d(in_channels, c, 3, padding=1)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(c, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.conv(x)
        if x.mean() > 0:
            x = F.relu(x)
        else:
            x = -x
        return self.fc(torch.flatten(self.pool(x), 1))


class NoWeightsNet(nn.Module):
    """No conv, no Linear, no parameters: flatten, then average-pool the flat vector down to
    ``num_classes`` values. Nothing to compress."""

    def __init__(self, num_classes: int = 10, in_channels: int = 3, width: float = 1.0) -> None:
        super().__init__()
        _check_args(num_classes, in_channels, width)
        self.num_classes = num_classes
        self.pool = nn.AdaptiveAvgPool1d(num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = torch.flatten(x, 1).unsqueeze(1)         # (N, 1, C*H*W)
        return torch.flatten(self.pool(x), 1)        # (N, num_classes)
