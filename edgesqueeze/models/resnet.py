"""ResNet-8, the MLPerf Tiny image-classification reference model, as a baseline.

Mirrors the Keras original (``eembc/energyrunner`` / ``mlcommons/tiny``,
``training/image_classification/keras_model.py``): convs keep their biases, the stride-2
stacks use a 1x1 projection shortcut without BN. Keras reports 78,666 parameters, which
includes the 480 BN moving mean/variance values; PyTorch counts those as buffers, so
``count_params(resnet8())`` is 78,186. Keras pads stride-2 'same' convs asymmetrically
(bottom/right); padding=1 here gives the same shapes and, after training, the same accuracy.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from ..errors import ModelError

__all__ = ["ResNet8", "resnet8"]


class _Block(nn.Module):
    """conv-BN-ReLU-conv-BN, plus the shortcut (identity, or 1x1 projection when strided)."""

    def __init__(self, in_ch: int, out_ch: int, stride: int) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(in_ch, out_ch, 3, stride, padding=1)
        self.bn1 = nn.BatchNorm2d(out_ch)
        self.conv2 = nn.Conv2d(out_ch, out_ch, 3, 1, padding=1)
        self.bn2 = nn.BatchNorm2d(out_ch)
        projection = stride != 1 or in_ch != out_ch
        self.shortcut = nn.Conv2d(in_ch, out_ch, 1, stride) if projection else nn.Identity()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = F.relu(self.bn1(self.conv1(x)))
        y = self.bn2(self.conv2(y))
        return F.relu(self.shortcut(x) + y)


class ResNet8(nn.Module):
    def __init__(self, num_classes: int = 10, in_channels: int = 3) -> None:
        super().__init__()
        for name, v in (("num_classes", num_classes), ("in_channels", in_channels)):
            if not isinstance(v, int) or isinstance(v, bool) or v < 1:
                raise ModelError(f"resnet8: {name} must be a positive int, got {v!r}")
        self.conv = nn.Conv2d(in_channels, 16, 3, padding=1)
        self.bn = nn.BatchNorm2d(16)
        self.stack1 = _Block(16, 16, 1)
        self.stack2 = _Block(16, 32, 2)
        self.stack3 = _Block(32, 64, 2)
        self.fc = nn.Linear(64, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.relu(self.bn(self.conv(x)))
        x = self.stack3(self.stack2(self.stack1(x)))
        # Keras uses AveragePooling2D over the whole (8x8) map: a global average.
        return self.fc(torch.flatten(F.adaptive_avg_pool2d(x, 1), 1))


def resnet8(*, num_classes: int = 10, in_channels: int = 3) -> ResNet8:
    """MLPerf Tiny ResNet-8 (78,186 PyTorch parameters, ~12.5 M MACs at 32x32x3)."""
    m = ResNet8(num_classes=num_classes, in_channels=in_channels)
    m.arch_name = "resnet8"
    m.arch_kwargs = {"num_classes": num_classes, "in_channels": in_channels}
    return m
