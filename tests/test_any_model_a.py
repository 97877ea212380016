"""Any user model, every form, every command (1 of 3). ConvLinearHead (conv-BN-pool, then a
Linear head) as a state_dict with its class, TorchScript, a torch.export program saved with
batch 1 and a whole pickle, through info, inspect, eval, compress, export (each form another
of the four formats), verify and check. MobileNetV2 (depthwise convs, inverted residuals,
ReLU6) from its class through every command, exported to INT8 ONNX (as programs, depthwise
nets are ShuffleNetV2 and SEHardSwishNet in the other two files). Exports cost the most time (torch.onnx, litert-torch), so the small model
carries them. See tests/zoo_forms.py."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parent))
from zoo_forms import FORMS, through_every_command  # noqa: E402


@pytest.mark.parametrize("form", FORMS)
def test_every_form_through_every_command(form, tmp_path):
    through_every_command("ConvLinearHead", form, FORMS.index(form), tmp_path)


def test_mobilenet_v2_from_its_class(tmp_path):
    through_every_command("MobileNetV2", "state_dict", 1, tmp_path)  # 1: onnx-int8
