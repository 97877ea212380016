"""A small conv net without BatchNorm or dropout, for the data-parallel tests: with nothing
computed per batch but the loss, a 2-process run on the same global batch computes the
gradients of a 1-process run (up to the order of float sums)."""

from torch import nn


class PlainNet(nn.Module):
    def __init__(self, num_classes: int = 10, in_channels: int = 1) -> None:
        super().__init__()
        self.features = nn.Sequential(
            nn.Conv2d(in_channels, 16, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
            nn.Conv2d(16, 32, 3, padding=1), nn.ReLU(), nn.AdaptiveAvgPool2d(4), nn.Flatten())
        self.fc = nn.Linear(32 * 16, num_classes)

    def forward(self, x):
        return self.fc(self.features(x))
