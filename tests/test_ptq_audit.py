"""Post-training compression (compress.ptq) on models and settings a user brings: an audit's
findings (session 39), each reproduced before it was fixed."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from click.testing import CliRunner
from torch import nn

from edgesqueeze.cli import cli
from edgesqueeze.compress.cluster import cluster_layer
from edgesqueeze.compress.ptq_candidates import Candidate, allocate, gptq_assign
from edgesqueeze.config.compress import CompressConfig
from edgesqueeze.errors import RecipeError

NETS = '''
import torch
from torch import nn


class AuxWide(nn.Module):
    """A training-only auxiliary head (as Inception's AuxLogits) and a conv with 256 biases."""

    def __init__(self, num_classes=10):
        super().__init__()
        self.c1 = nn.Conv2d(1, 8, 3, stride=2)
        self.c2 = nn.Conv2d(8, 256, 3, stride=2)
        self.aux = nn.Linear(8 * 13 * 13, num_classes)
        self.fc = nn.Linear(256, num_classes)

    def forward(self, x):
        x = torch.relu(self.c1(x))
        a = self.aux(torch.flatten(x, 1)) if self.training else None
        x = torch.relu(self.c2(x)).mean((2, 3))
        out = self.fc(x)
        return out + 0 * a if a is not None else out
'''

RECIPE = """version: 1
name: audit-ptq
seed: 0
data: {dataset: digits}
compress:
  calibration: {images: 16}
  ptq: {min_bits: 3, max_bits: 5, levels_per_octave: 1, target_bytes: 6000}
"""


def run(*args):
    return CliRunner().invoke(cli, [str(a) for a in args])


@pytest.fixture(scope="module")
def aux_model(tmp_path_factory):
    d = tmp_path_factory.mktemp("ptq-audit")
    (d / "nets.py").write_text(NETS)
    (d / "ptq.yaml").write_text(RECIPE)
    _save_state(d / "nets.py", "AuxWide", d / "aux.pt")
    return d


def _save_state(nets: Path, cls: str, out: Path) -> None:
    """The state_dict of ``cls`` from the file ``nets`` (seed 0), saved to ``out``."""
    import importlib.util

    spec = importlib.util.spec_from_file_location(f"nets_{cls.lower()}", nets)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    torch.manual_seed(0)
    torch.save(getattr(mod, cls)().state_dict(), out)


def test_a_layer_the_eval_forward_never_calls_is_compressed_not_a_traceback(aux_model, tmp_path):
    """An auxiliary head run only in training mode: RuntimeError "The differentiated Tensor ...
    appears to not have been used in the graph" (then "bias correction: a layer did not run in
    its block"), exit 1. Also held here: the archive records the compress recipe's name beside
    its hash and the thread count ptq's statistics ran on; the report's per-layer bytes and k
    are the archive's; a conv's 256 biases are not "other layer types"."""
    from edgesqueeze.format import container

    d = aux_model
    res = run("compress", d / "aux.pt", "--arch", f"{d / 'nets.py'}:AuxWide", "-r", d / "ptq.yaml",
              "--out", tmp_path / "o", "--no-progress")
    assert res.exit_code in (0, 1), res.output  # 1: the target is not reached, said; never a traceback
    assert "Traceback" not in res.output and "did not run" not in res.output, res.output
    assert "other layer types" not in res.output, res.output
    esq = tmp_path / "o" / "model.esq"
    archive = container.loads(esq.read_bytes())
    assert archive.meta["recipe_name"] == "audit-ptq" and archive.meta["compress_threads"] == torch.get_num_threads()
    report = json.loads((tmp_path / "o" / "report.json").read_text())
    for row in report["ptq"]["layers"]:  # as written: the codec may drop Huffman coding or unused centroids
        payload, info = archive.sections[f"{row['layer']}.weight"]
        assert row["bytes"] == len(payload) and row["k"] == info["k"], (row, info)
    assert report["ptq"]["summary"]["bytes"] == esq.stat().st_size


def _cand(nbytes: int, kl: float) -> Candidate:
    return Candidate(layer=None, k=2, bytes=nbytes, distortion=kl, mse=0.0)


def test_a_huge_target_takes_every_layers_largest_candidate_without_a_budget_sized_table():
    """target_bytes 1e10 on a 5 KB model sized the knapsack's table at the target (625 million
    entries per layer): 22 GB and the OOM killer."""
    cands = {"a": [_cand(10, 5.0), _cand(20, 1.0)], "b": [_cand(10, 3.0), _cand(40, 2.0)]}
    assert allocate(cands, 10**15) == {"a": 1, "b": 1}
    assert allocate(cands, 10**15, unit=1) == {"a": 1, "b": 1}
    assert allocate(cands, 30, unit=1) == {"a": 1, "b": 0}  # the docstring's example still holds
    assert allocate(cands, 5, unit=1) == {"a": 0, "b": 0}   # nothing fits: the smallest


def test_too_little_gptq_damping_names_the_field_instead_of_a_linalg_traceback():
    w = torch.randn(4, 3)
    layer = cluster_layer("fc", w, torch.ones_like(w, dtype=torch.bool), 2)
    x = torch.randn(1, 3)  # one image: a rank-1 input Hessian
    with pytest.raises(RecipeError, match=r"compress.ptq.gptq_damp: 1e-300 leaves layer fc's input Hessian singular"):
        gptq_assign(layer, w, x.T @ x, damp=1e-300)
    gptq_assign(layer, w, x.T @ x, damp=0.01)  # the default copes


def test_weights_past_float16_say_so_instead_of_nan():
    """Finite weights up to 3.3e5 became inf float16 centroids, reported as "has NaN or
    infinite weights"."""
    w = torch.linspace(-3e5, 3e5, 64).reshape(8, 8)
    mask = torch.ones_like(w, dtype=torch.bool)
    with pytest.raises(RecipeError, match=r"layer c1: weights up to [\d.]+e\+05 do not fit a float16 codebook.*"
                                          r"codebook_dtype: float32"):
        cluster_layer("c1", w, mask, 3, codebook_dtype="float16")
    assert torch.isfinite(cluster_layer("c1", w, mask, 3, codebook_dtype="float32").codebook).all()


@pytest.mark.parametrize("section", ["prune_finetune", "cluster_finetune"])
def test_a_finetune_section_beside_ptq_is_refused_not_ignored(section):
    from edgesqueeze.config.compress import FinetuneConfig, PTQConfig

    with pytest.raises(RecipeError, match=f"compress.{section}: ptq does not retrain"):
        CompressConfig(ptq=PTQConfig(), **{section: FinetuneConfig(epochs=5)})
    CompressConfig(ptq=PTQConfig())  # the defaults are no setting


def test_keep_layers_naming_every_layer_says_so(aux_model, tmp_path):
    """It said the model "has no Conv2d or Linear layer"; it has four, all kept."""
    d = aux_model
    res = run("compress", d / "aux.pt", "--arch", f"{d / 'nets.py'}:AuxWide", "-r", d / "ptq.yaml",
              "--set", "compress.keep_layers=[c1,c2,aux,fc]", "--out", tmp_path / "o", "--no-progress")
    assert res.exit_code == 2 and "compress.keep_layers: keeps every Conv2d and Linear layer" in res.output, res.output


def test_an_unreachable_target_at_one_bit_does_not_advise_lowering_min_bits(aux_model, tmp_path):
    d = aux_model
    res = run("compress", d / "aux.pt", "--arch", f"{d / 'nets.py'}:AuxWide", "-r", d / "ptq.yaml",
              "--set", "compress.ptq.min_bits=1", "--set", "compress.ptq.max_bits=1",
              "--set", "compress.ptq.target_bytes=500", "--out", tmp_path / "o", "--no-progress")
    assert res.exit_code == 1 and "min_bits is 1 already" in res.output, res.output
    assert "lower compress.ptq.min_bits" not in res.output and "lower min_bits" not in res.output, res.output


_BARE = '''
import torch
from torch import nn


class Bare(nn.Module):
    def __init__(self, num_classes=10, in_channels=1):
        super().__init__()
        self.conv = nn.Conv2d(in_channels, 64, 3)
        self.proj = nn.Parameter(torch.randn(64, num_classes) * 0.1)

    def forward(self, x):
        return torch.relu(self.conv(x)).mean((2, 3)) @ self.proj
'''


def test_a_parameter_of_the_model_itself_left_raw_is_said(tmp_path):
    """`x @ self.proj` on a bare parameter: the archive kept it raw float32 (51% of it in the
    audit) while the log said only how much of the conv and linear weights pruning kept."""
    (tmp_path / "nets.py").write_text(_BARE)
    _save_state(tmp_path / "nets.py", "Bare", tmp_path / "bare.pt")
    res = run("compress", tmp_path / "bare.pt", "--arch", f"{tmp_path / 'nets.py'}:Bare", "--data", "digits",
              "--out", tmp_path / "o", "--no-progress")
    assert res.exit_code == 0, res.output
    assert "1 tensor(s) of other layer types stay raw float32 in the .esq" in res.output, res.output
    assert "proj (a parameter of Bare itself, 640 values)" in res.output
