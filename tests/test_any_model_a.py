"""Any user model, every form, every command (1 of 3): MobileNetV2 (depthwise convs, inverted
residuals, ReLU6) as a state_dict with its class, TorchScript, a torch.export program saved
with batch 1 and a whole pickle, through info, inspect, eval, compress, export, verify and
check. See tests/zoo_forms.py."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parent))
from zoo_forms import FORMS, through_every_command  # noqa: E402


@pytest.mark.parametrize("form", FORMS)
def test_every_form_through_every_command(form, tmp_path):
    through_every_command("MobileNetV2", form, FORMS.index(form), tmp_path)
