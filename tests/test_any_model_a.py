"""Any user model, every form, every command (1 of 3). ConvLinearHead (conv-BN-pool, then a
Linear head) as a state_dict with its class, TorchScript, a torch.export program saved with
batch 1 and a whole pickle, through info, inspect, eval, compress, export (each form another
of the four formats), verify and check. MobileNetV2 (depthwise convs, inverted residuals,
ReLU6) in the same four forms through everything but export, and its state_dict through the
INT8 ONNX export. Exports cost the most time (torch.onnx, litert-torch), so the small model
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


@pytest.mark.parametrize("form", FORMS)
def test_mobilenet_v2_in_every_form(form, tmp_path):
    through_every_command("MobileNetV2", form, 1 if form == "state_dict" else None, tmp_path)
