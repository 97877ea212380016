"""Data-parallel training for real: ``torchrun`` starts two processes that train over
``gloo`` on the CPU (digits). They learn what one process learns on the same global batch,
rank 0 alone writes, a resume with another process count is refused in one line, and a run
whose rank is killed exits non-zero and finishes with ``--resume``."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from edgesqueeze.checkpoint import load_model
from edgesqueeze.distributed import DistributedError
from edgesqueeze.recipe import load_recipe
from edgesqueeze.train import fit

ROOT = Path(__file__).resolve().parents[1]
RECIPE = """version: 1
name: ddp
seed: 0
model: {{import: tests/ddp_net.py:PlainNet}}
data: {{dataset: digits, limit: 800, val_fraction: 0.1, augment: false}}
train: {{epochs: {epochs}, batch_size: 64, lr: 0.1, schedule: onecycle, warmup_fraction: 0.1, threads: 1}}
"""

pytestmark = pytest.mark.slow


def _recipe(tmp_path: Path, epochs: int) -> Path:
    path = tmp_path / f"ddp-{epochs}.yaml"
    path.write_text(RECIPE.format(epochs=epochs))
    return path


def _launch(*args, n: int = 2) -> subprocess.Popen:
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={n}",
           "-m", "edgesqueeze", *map(str, args), "--no-progress"]
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    return subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            start_new_session=True)


def _run(*args, n: int = 2, timeout: float = 300) -> tuple[int, str]:
    proc = _launch(*args, n=n)
    out, _ = proc.communicate(timeout=timeout)
    return proc.returncode, out


def _in_repo(call):
    """``call()`` from the repository root (the recipe's model.import is relative to it)."""
    cwd = os.getcwd()
    os.chdir(ROOT)
    try:
        return call()
    finally:
        os.chdir(cwd)


def _kill_one_rank_after_an_epoch(proc: subprocess.Popen, out_dir: Path) -> str:
    state = out_dir / "last.pt"
    deadline = time.monotonic() + 240
    while not state.exists() and proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.1)
    assert state.exists(), "no epoch finished"
    workers = [int(p) for p in subprocess.run(["pgrep", "-P", str(proc.pid)], capture_output=True,
                                              text=True).stdout.split()]  # torchrun's children: the ranks
    assert len(workers) == 2, workers
    os.kill(max(workers), signal.SIGKILL)  # one rank dies mid-run
    out, _ = proc.communicate(timeout=120)
    assert proc.returncode != 0, out
    return out


def test_two_processes_survive_a_kill_and_learn_what_one_learns(tmp_path):
    """One run through everything: a rank killed mid-run stops it with one line from the rank
    left standing; resuming with another process count is refused; resuming with two finishes
    it (rank 0 alone writes, one checkpoint); and the result is what one process learns on the
    same global batch, within a point (the net has no BatchNorm, so only the order of float sums
differs, and that grows over a hundred steps into weights that differ by ~0.2 at most)."""
    epochs = 8
    recipe = _recipe(tmp_path, epochs=epochs)
    out_dir = tmp_path / "two"
    out = _kill_one_rank_after_an_epoch(_launch("train", "-r", recipe, "--out", out_dir), out_dir)
    said = [ln for ln in out.splitlines() if ln.startswith("error: rank 0")]  # the rank left standing
    assert len(said) == 1 and "--resume" in said[0], out
    assert len(json.loads((out_dir / "metrics.json").read_text())) < epochs

    with pytest.raises(DistributedError, match=r"started with 2 process\(es\).*--nproc_per_node 2"):
        _in_repo(lambda: fit(load_recipe(recipe), out_dir=out_dir, resume=True, progress=False, log=lambda _m: None))

    rc, out = _run("train", "-r", recipe, "--out", out_dir, "--resume")
    assert rc == 0, out
    assert f"resuming {out_dir} after epoch" in out and out.count("outputs:") == 1, out
    assert [h["epoch"] for h in json.loads((out_dir / "metrics.json").read_text())] == list(range(1, epochs + 1))
    assert sorted(p.name for p in out_dir.iterdir()) == [
        "curves.png", "last.pt", "metrics.csv", "metrics.json", "model.pt", "recipe.json", "summary.json"]
    assert torch.load(out_dir / "last.pt", weights_only=True)["world_size"] == 2
    two = _in_repo(lambda: load_model(out_dir / "model.pt", arch="tests/ddp_net.py:PlainNet"))
    assert two.meta["train_processes"] == 2

    one = _in_repo(lambda: fit(load_recipe(recipe), out_dir=tmp_path / "one", progress=False, log=lambda _m: None))
    acc_one, acc_two = one.test["accuracy"], two.meta["metrics"]["test"]["accuracy"]
    assert acc_one > 0.8, acc_one  # it learned (10 classes)
    assert abs(acc_one - acc_two) <= 0.01, (acc_one, acc_two)

