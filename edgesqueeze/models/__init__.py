"""Model architectures, the name registry, and size/cost counters.

    >>> from edgesqueeze.models import build_model, count_params
    >>> count_params(build_model("squeezenet1_1"))
    1235496
"""

from ._stats import count_macs, count_params
from .registry import ModelSpec, build_model, get_spec, list_specs, register
from .resnet import ResNet8, resnet8
from .squeezenet import (Fire, SqueezeNet, SqueezeNetConfig, squeezenet, squeezenet1_0,
                         squeezenet1_1, squeezenet_cifar, squeezenet_mnist, tutorial_squeezenet)

__all__ = [
    "ModelSpec", "register", "get_spec", "list_specs", "build_model",
    "count_params", "count_macs",
    "Fire", "SqueezeNetConfig", "SqueezeNet", "squeezenet", "squeezenet1_0", "squeezenet1_1",
    "squeezenet_mnist", "squeezenet_cifar", "tutorial_squeezenet",
    "ResNet8", "resnet8",
]
