"""A small conv net without BatchNorm or dropout, for the data-parallel tests: with nothing
computed per batch but the loss, a 2-process run on the same global batch computes the
gradients of a 1-process run (up to the order of float sums). DropoutNet adds dropout, for
tests of what draws from torch's random generator."""

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


class DropoutNet(PlainNet):
    """PlainNet with dropout before its classifier (as every shipped SqueezeNet has): a test
    whose weights must not depend on who else draws from torch's global generator."""

    def __init__(self, num_classes: int = 10, in_channels: int = 1) -> None:
        super().__init__(num_classes, in_channels)
        self.drop = nn.Dropout(0.2)

    def forward(self, x):
        return self.fc(self.drop(self.features(x)))
