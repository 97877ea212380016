"""Any user model, every form, every command (2 of 3): ShuffleNetV2 (channel split, concat,
channel shuffle by view/transpose/view on ``x.size()``) in the two forms without a Python
class, a scripted TorchScript module and a torch.export program saved with batch 1 (the
shuffle's reshape bakes that batch in; edgesqueeze frees it and checks it), whose graphs are
lifted into real modules (programs go through export in test_any_model_a.py). A *traced* TorchScript module of it cannot become a program (the
trace records sizes as data): refused with one line. The class forms of ShuffleNetV2 go
through retraining Deep Compression in test_any_model_c.py."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parent))
from zoo_forms import run, save_forms, through_every_command  # noqa: E402


def test_a_batch_one_program_through_every_command(tmp_path):
    through_every_command("ShuffleNetV2", "program", None, tmp_path)


def test_a_trace_that_recorded_sizes_is_refused_in_one_line(tmp_path):
    path, _ = save_forms("ShuffleNetV2", tmp_path, ("torchscript",))["torchscript"]
    assert run("eval", path, "--data", "digits", "--limit", "20").exit_code == 0  # it runs as TorchScript
    res = run("export", path, "--data", "digits", "-f", "onnx", "--out", tmp_path / "e")
    assert res.exit_code == 2 and "Traceback" not in res.output
    assert "cannot be converted to a torch.export program" in res.output
    assert not (tmp_path / "e").exists() or not any((tmp_path / "e").iterdir())
