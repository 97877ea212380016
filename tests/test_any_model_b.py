"""Any user model, every form, every command (2 of 3): ShuffleNetV2 (channel split, concat,
channel shuffle by view/transpose/view) in the two forms without a Python class, TorchScript
and a torch.export program, whose graphs edgesqueeze lifts into real modules. The class forms
of ShuffleNetV2 go through retraining Deep Compression in test_any_model_c.py."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parent))
from zoo_forms import through_every_command  # noqa: E402


@pytest.mark.parametrize("form,fmt_index", [("torchscript", 3), ("program", 2)])
def test_program_forms_through_every_command(form, fmt_index, tmp_path):
    through_every_command("ShuffleNetV2", form, fmt_index, tmp_path)
