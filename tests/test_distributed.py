"""Data-parallel training for real: ``torchrun`` starts two processes that train over
``gloo`` on the CPU (digits). They learn what one process learns on the same global batch,
rank 0 alone writes, a resume with another process count is refused in one line, and a run
whose rank is killed exits non-zero and finishes with ``--resume``."""

from __future__ import annotations

import json
import os
import re
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


def _launch(*args, n: int = 2, env: dict[str, str] | None = None) -> subprocess.Popen:
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={n}",
           "-m", "edgesqueeze", *map(str, args), "--no-progress"]
    env = {**(os.environ if env is None else env), "PYTHONPATH": str(ROOT)}
    return subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            start_new_session=True)


def _run(*args, n: int = 2, timeout: float = 300, env: dict[str, str] | None = None) -> tuple[int, str]:
    proc = _launch(*args, n=n, env=env)
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



def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _two_machines(dirs: list[Path], *args, timeout: float = 240) -> list[tuple[int, str]]:
    """Two torchrun launchers, one process each, joined by c10d rendezvous as on two machines,
    each in its own folder (``--out`` relative: each "machine" has its own disk)."""
    port = _free_port()
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nnodes=2", "--nproc_per_node=1",
           "--rdzv_backend=c10d", f"--rdzv_endpoint=127.0.0.1:{port}", f"--rdzv_id=t{port}",
           "-m", "edgesqueeze", *map(str, args), "--no-progress"]
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    procs = [subprocess.Popen(cmd, cwd=d, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                              start_new_session=True) for d in dirs]
    try:
        return [(p.returncode, p.communicate(timeout=timeout)[0]) for p in procs]
    finally:
        for p in procs:
            if p.poll() is None:
                os.killpg(p.pid, signal.SIGKILL)
                p.wait()


def _machines(tmp_path: Path) -> tuple[Path, Path, Path]:
    """A 2-epoch recipe and two "machines": folders each with its own empty ``out/``."""
    recipe = tmp_path / "ddp.yaml"
    recipe.write_text(RECIPE.format(epochs=2).replace("tests/ddp_net.py", str(ROOT / "tests" / "ddp_net.py")))
    a, b = tmp_path / "machine-a", tmp_path / "machine-b"
    for d in (a, b):
        (d / "out").mkdir(parents=True)
    return recipe, a, b


def test_resume_is_refused_when_the_machines_see_different_state_files(tmp_path):
    """A two-machine run whose output folder is not shared: one machine holds last.pt, the
    other does not (or holds other bytes). Each rank looked on its own disk: one resumed, the
    other started from scratch, they trained different weights and then hung. Now every rank
    says in one line which ranks see the file and that the folder must be shared, and nothing
    is trained."""
    recipe, a, b = _machines(tmp_path)
    (a / "out" / "last.pt").write_bytes(b"the state an earlier launch wrote on this machine")

    results = _two_machines([a, b], "train", "-r", recipe, "--out", "out", "--resume")
    for rc, out in results:
        assert rc != 0, out
        said = [ln for ln in out.splitlines() if ln.startswith("error:")]
        assert len(said) == 1, out
        assert re.search(r"out/last\.pt: --resume needs every process to read the same state file, but rank [01] "
                         r"sees it and rank [01] does not .*storage every machine sees.*nothing was trained",
                         said[0]), out
        # torchrun's own traceback (ChildFailedError) follows; none from edgesqueeze
        assert not re.search(r'File ".*/edgesqueeze/', out) and "epoch 1/" not in out, out
    assert not (b / "out" / "last.pt").exists() and not (b / "out" / "recipe.json").exists()

    (b / "out" / "last.pt").write_bytes(b"another state, written on the other machine")
    for rc, out in _two_machines([a, b], "train", "-r", recipe, "--out", "out", "--resume"):
        assert rc != 0 and "the ranks see different files: rank 0 sha256" in out, out
        assert not re.search(r'File ".*/edgesqueeze/', out) and "epoch 1/" not in out, out


def test_a_previous_run_on_one_machine_stops_every_rank(tmp_path):
    """Without --resume or --overwrite, a folder holding last.pt is refused. Each rank looked
    before the process group started: the one that saw it stopped alone, and the other
    waited for it at the rendezvous. Now every rank gives the same one line."""
    recipe, a, b = _machines(tmp_path)
    (a / "out" / "last.pt").write_bytes(b"an earlier run's state")
    for rc, out in _two_machines([a, b], "train", "-r", recipe, "--out", "out", timeout=180):
        said = [ln for ln in out.splitlines() if ln.startswith("error:")]
        assert rc != 0 and len(said) == 1, out
        assert re.search(r"out: holds a previous run \(last\.pt\) \(as rank [01] of 2 sees it\); pass --resume",
                         said[0]), out
        assert "epoch 1/" not in out and not re.search(r'File ".*/edgesqueeze/', out), out
    assert (a / "out" / "last.pt").read_bytes() == b"an earlier run's state"


def test_a_stray_world_size_is_one_line(tmp_path):
    """``WORLD_SIZE=2`` left in the environment, without the rest of what torchrun sets:
    ``train`` and ``compress`` said it in a 47-line traceback from init_process_group (exit 1);
    now in one ``error:`` line (exit 2) saying what is missing and to use torchrun or unset it.
    A rendezvous that torch itself refuses (a port that is not a number) is one line too."""
    recipe = _recipe(tmp_path, epochs=1)
    model = _in_repo(lambda: fit(load_recipe(recipe), out_dir=tmp_path / "float", progress=False,
                                 log=lambda _m: None)).checkpoint
    (tmp_path / "c.yaml").write_text(recipe.read_text() + "compress: {prune: {sparsity: 0.5}}\n")
    bare = {k: v for k, v in os.environ.items() if k not in ("RANK", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT")}

    def edgesqueeze(*args, **env):
        done = subprocess.run([sys.executable, "-m", "edgesqueeze", *map(str, args), "--no-progress"], cwd=ROOT,
                              env={**bare, "PYTHONPATH": str(ROOT), "WORLD_SIZE": "2", **env},
                              capture_output=True, text=True, timeout=120)
        return done.returncode, done.stdout + done.stderr

    for args in (("train", "-r", recipe, "--out", tmp_path / "t"),
                 ("compress", model, "-r", tmp_path / "c.yaml", "--out", tmp_path / "c")):
        rc, out = edgesqueeze(*args)
        said = [ln for ln in out.splitlines() if ln.strip()]
        assert rc == 2 and len(said) == 1, out
        assert said[0] == ("error: $WORLD_SIZE=2 asks for a 2-process run, but $RANK, $MASTER_ADDR, $MASTER_PORT are "
                           "not set: launch with torchrun (which sets them), or unset WORLD_SIZE to run one process"), out
    rc, out = edgesqueeze("train", "-r", recipe, "--out", tmp_path / "t", RANK="0", MASTER_ADDR="127.0.0.1",
                          MASTER_PORT="abc")
    assert rc == 2 and out.startswith("error: rank 0 of 2: cannot join the process group (") and \
        "launch with torchrun, or unset WORLD_SIZE" in out and "Traceback" not in out, out
    assert not (tmp_path / "t" / "last.pt").exists() and not (tmp_path / "c" / "model.esq").exists()


def test_a_rank_that_fails_before_any_epoch_does_not_advise_resume(tmp_path):
    """Rank 0 fails before the first epoch (here: a folder where it writes recipe.json): the
    rank left standing said to go on with --resume from OUT/last.pt, which did not exist; now
    it says to fix the cause and launch again. With a state file there, --resume is advised."""
    out_dir = tmp_path / "blocked"
    (out_dir / "recipe.json").mkdir(parents=True)  # only rank 0 writes it
    rc, out = _run("train", "-r", _recipe(tmp_path, epochs=2), "--out", out_dir, timeout=180)
    assert rc != 0, out
    assert "error: " + f"{out_dir}/recipe.json: cannot write" in out, out
    said = [ln for ln in out.splitlines() if ln.startswith("error: rank 1")]
    assert len(said) == 1, out
    assert said[0].endswith(f"fix the cause and launch it again (nothing to --resume from yet: no {out_dir}/last.pt)")
    assert "--resume (state:" not in out and not (out_dir / "last.pt").exists(), out

    from edgesqueeze.compress.stages import CLUSTER_STATE, PRUNE_STATE, PRUNED_NAME
    from edgesqueeze.distributed import Group, lost_contact

    lost = RuntimeError("[../gloo/transport/tcp/pair.cc:534] Connection closed by peer [127.0.0.1]:1")
    said = str(lost_contact(Group(1, 2), lost, out_dir))
    assert "launch it again" in said and "--resume (state" not in said, said
    (out_dir / "last.pt").write_bytes(b"state")
    assert str(lost_contact(Group(1, 2), lost, out_dir)).endswith(
        f"the same launch plus --resume (state: {out_dir}/last.pt)")
    states = (PRUNED_NAME, PRUNE_STATE, CLUSTER_STATE)  # what compress passes
    said = str(lost_contact(Group(1, 2), lost, out_dir, "run it again plus --resume", states))
    assert said.endswith(f"launch it again (nothing to --resume from yet: no {out_dir}/pruned.pt or "
                         f"{out_dir}/prune-retrain.state.pt or {out_dir}/centroid-retrain.state.pt)"), said
    (out_dir / PRUNE_STATE).write_bytes(b"state")
    assert str(lost_contact(Group(1, 2), lost, out_dir, "run it again plus --resume", states)).endswith(
        "fix the cause and run it again plus --resume")


def test_threads_default_follows_omp_num_threads_under_torchrun(tmp_path):
    """train.threads: 0 takes $OMP_NUM_THREADS when set, under torchrun too: it took each
    process's share of the CPUs there (CPUs / processes on the machine) whatever the variable
    said. Without it, torchrun itself sets OMP_NUM_THREADS=1 for each of several processes."""
    recipe = _recipe(tmp_path, epochs=1)
    small = ("--set", "train.threads=0", "--set", "data.limit=256")
    bare = {k: v for k, v in os.environ.items() if k != "OMP_NUM_THREADS"}
    for omp, want in (("2", "2 threads"), (None, "1 thread")):
        env = bare if omp is None else {**bare, "OMP_NUM_THREADS": omp}
        rc, out = _run("train", "-r", recipe, "--out", tmp_path / f"omp-{omp}", *small, env=env)
        assert rc == 0, out
        said = [ln for ln in out.splitlines() if ln.startswith("training ")]
        assert len(said) == 1 and f", {want}, 2 processes (torch.distributed)" in said[0], out

    from edgesqueeze.train import available_cpus, set_threads  # launched otherwise (no OMP_NUM_THREADS): a share

    before = torch.get_num_threads()
    omp = os.environ.pop("OMP_NUM_THREADS", None)
    try:
        assert set_threads(0, processes=2) == max(1, available_cpus() // 2) == torch.get_num_threads()
        os.environ["OMP_NUM_THREADS"] = "3"
        assert set_threads(0, processes=2) == 3 and set_threads(1, processes=2) == 1
    finally:
        os.environ.pop("OMP_NUM_THREADS", None)
        if omp is not None:
            os.environ["OMP_NUM_THREADS"] = omp
        torch.set_num_threads(before)
