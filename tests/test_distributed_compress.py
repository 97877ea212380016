"""Retraining inside ``compress`` for real on two ``gloo`` processes launched by ``torchrun``
(digits): the masks and codebooks come out bit-identical on both ranks, rank 0 alone writes,
and the result is what one process gets. A file of its own, so that pytest-xdist can run it
beside the training tests of test_distributed.py."""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from edgesqueeze.distributed import DistributedError
from edgesqueeze.recipe import load_recipe
from edgesqueeze.train import fit

sys.path.insert(0, str(Path(__file__).parent))
from test_distributed import RECIPE, ROOT, _in_repo, _launch, _run  # noqa: E402

pytestmark = pytest.mark.slow

COMPRESS = """
compress:
  prune: {sparsity: 0.6, schedule: gradual}
  prune_finetune: {epochs: 4, batch_size: 64, lr: 0.02}
  cluster: {bits: 4}
  cluster_finetune: {epochs: 1, batch_size: 64, lr: 0.001}
"""


def test_compress_retrains_on_two_processes_with_the_same_masks_and_codebooks(tmp_path, monkeypatch):
    """``torchrun ... compress``: both ranks retrain (pruning, then the centroids), k-means
    runs on rank 0 and is broadcast, the masks and codebooks are bit-identical on both ranks
    (each rank's digest is in the report), rank 0 alone writes, and the result is what one
    process gets, within a point. A launch whose rank is killed inside the pruning
    retraining exits non-zero, and the same launch plus ``--resume`` goes on after the last
    finished epoch and writes the uninterrupted launch's bytes. Post-training compression
    under torchrun is refused."""
    recipe = tmp_path / "ddp-compress.yaml"
    recipe.write_text(RECIPE.format(epochs=4) + COMPRESS)
    trained = _in_repo(lambda: fit(load_recipe(recipe), out_dir=tmp_path / "float", progress=False,
                                   log=lambda _m: None))
    model = trained.out_dir / "model.pt"

    rc, out = _run("compress", model, "-r", recipe, "--out", tmp_path / "two")
    assert rc == 0, out
    assert out.count("outputs:") == 1 and "compress: 2 processes" in out, out
    report = json.loads((tmp_path / "two" / "report.json").read_text())
    dist = report["distributed"]
    assert dist["processes"] == 2
    for what in ("masks", "codebooks"):
        by_rank = dist[what]["sha256_by_rank"]
        assert len(by_rank) == 2 and by_rank[0] == by_rank[1], dist
    assert sorted(p.name for p in (tmp_path / "two").iterdir() if not p.name.startswith(".")) == [
        "accuracy_vs_size.png", "model.esq", "pruned.pt", "report.json", "report.md", "weights_histogram.png"]

    # killed after the first of four pruning epochs, then resumed with as many processes
    killed = tmp_path / "killed"
    proc = _launch("compress", model, "-r", recipe, "--out", killed)
    state, deadline = killed / "prune-retrain.state.pt", time.monotonic() + 240
    while not state.exists() and proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.02)
    assert state.exists(), "no pruning epoch finished"
    ranks = [int(p) for p in subprocess.run(["pgrep", "-P", str(proc.pid)], capture_output=True,
                                            text=True).stdout.split()]
    assert len(ranks) == 2, ranks
    os.kill(max(ranks), signal.SIGKILL)
    out, _ = proc.communicate(timeout=120)
    assert proc.returncode != 0 and not (killed / "model.esq").exists(), out
    rc, out = _run("compress", model, "-r", recipe, "--out", killed, "--resume")
    assert rc == 0, out
    assert re.search(r"goes on after epoch [123]/4", out), out
    assert (killed / "model.esq").read_bytes() == (tmp_path / "two" / "model.esq").read_bytes()
    assert not state.exists()

    from edgesqueeze.compress.pipeline import compress

    cfg = load_recipe(recipe).compress
    one = _in_repo(lambda: compress(model, cfg, out_dir=tmp_path / "one", progress=False, log=lambda _m: None,
                                    arch="tests/ddp_net.py:PlainNet"))
    assert "distributed" not in one.report
    acc_one, acc_two = one.report["test"]["after"]["accuracy"], report["test"]["after"]["accuracy"]
    assert acc_one > 0.8, acc_one
    assert abs(acc_one - acc_two) <= 0.01, (acc_one, acc_two)

    from edgesqueeze.config.compress import CompressConfig

    monkeypatch.setenv("WORLD_SIZE", "2")  # as torchrun sets it: refused before anything is read or joined
    with pytest.raises(DistributedError, match=r"lossless re-encoding .* run 'edgesqueeze compress' without torchrun"):
        compress(model, CompressConfig(), out_dir=tmp_path / "lossless", progress=False, log=lambda _m: None)
    assert not (tmp_path / "lossless").exists()


def test_compress_resume_is_refused_when_the_machines_see_different_state_files(tmp_path):
    """``compress --resume`` on two machines whose output folders are not shared: pruned.pt
    (or a retraining's state) on one machine only was resumed from by one rank while the other
    pruned from the start. Now every rank refuses in one line before anything is retrained."""
    from test_distributed import _two_machines

    recipe = tmp_path / "ddp-compress.yaml"
    recipe.write_text((RECIPE.format(epochs=1) + COMPRESS).replace("tests/ddp_net.py",
                                                                   str(ROOT / "tests" / "ddp_net.py")))
    model = fit(load_recipe(recipe), out_dir=tmp_path / "float", progress=False, log=lambda _m: None).checkpoint
    a, b = tmp_path / "machine-a", tmp_path / "machine-b"
    for name in ("pruned.pt", "prune-retrain.state.pt"):
        for d in (a, b):
            shutil.rmtree(d, ignore_errors=True)
            (d / "out").mkdir(parents=True)
        (b / "out" / name).write_bytes(b"what an earlier launch wrote on this machine")
        for rc, out in _two_machines([a, b], "compress", model, "-r", recipe, "--out", "out", "--resume"):
            said = [ln for ln in out.splitlines() if ln.startswith("error:")]
            assert rc != 0 and len(said) == 1, out
            assert re.search(rf"out/{re.escape(name)}: --resume needs every process to read the same state file, "
                             r"but rank [01] sees it and rank [01] does not .*storage every machine sees", said[0]), out
            assert not re.search(r'File ".*/edgesqueeze/', out) and "epoch 1/" not in out, out
        assert sorted(p.name for p in (a / "out").iterdir()) == []
