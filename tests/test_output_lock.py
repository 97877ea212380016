"""Two runs into one output folder: the second is refused while the first runs, and touches
nothing of it. Before the lock each run removed the other's temporary files as stale (the
first then failed on its rename, or the folder held a mix of both runs' files). Real
processes holding the lock, the real CLI, real files."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
from click.testing import CliRunner

from edgesqueeze._io import lock_output_folder, output_locks
from edgesqueeze.cli import cli
from edgesqueeze.errors import OutputError
from edgesqueeze.recipe import recipe_from_dict
from edgesqueeze.train import fit

ROOT = Path(__file__).resolve().parents[1]
LOCK = ".edgesqueeze.lock"
# another run's half-written file, named as atomic_path names them (what remove_stale_temps removes)
OTHERS_TEMP = ".model.onnx.ab12cd34.tmp"

_HOLDER = """
import sys
from edgesqueeze._io import lock_output_folder
lock_output_folder(sys.argv[1], "edgesqueeze export (the test's other run)", report=(sys.argv[2:] or [None])[0])
print("held", flush=True)
sys.stdin.read()  # until the test closes it, or kills this process
"""


@pytest.fixture(scope="module")
def model(tmp_path_factory):
    out = tmp_path_factory.mktemp("model")
    recipe = recipe_from_dict({
        "version": 1, "seed": 0, "output_dir": str(out),
        "model": {"arch": "squeezenet_mnist", "kwargs": {"width_mult": 0.5}},
        "data": {"dataset": "digits", "limit": 300, "val_fraction": 0.2},
        "train": {"epochs": 1, "batch_size": 32, "lr": 0.05, "threads": 1},
    })
    fit(recipe, progress=False, log=lambda _: None)
    return out / "model.pt"


def _hold(folder: Path, report: str | None = None) -> subprocess.Popen:
    """Another process that takes ``folder`` (or only its ``report``) as a run does, and keeps it."""
    proc = subprocess.Popen([sys.executable, "-c", _HOLDER, str(folder), *([report] if report else [])],
                            stdin=subprocess.PIPE,
                            stdout=subprocess.PIPE, text=True, cwd=ROOT)
    assert proc.stdout.readline().strip() == "held"
    return proc


def _commands(model: Path, out: Path) -> dict[str, list[str]]:
    return {
        "export": ["export", str(model), "-f", "onnx", "--out", str(out)],
        "compress": ["compress", str(model), "--out", str(out)],  # lossless: no recipe
        "train": ["train", "-r", str(ROOT / "recipes/squeezenet-digits.yaml"), "--out", str(out), "--overwrite",
                  "--set", "train.epochs=1", "--set", "data.limit=200"],
        "verify": ["verify", str(model), "--out", str(out / "verify.json")],
        "sensitivity": ["sensitivity", str(model), "--sparsities", "0.5", "--out", str(out)],
    }


@pytest.mark.parametrize("command", ["export", "compress", "train", "verify", "sensitivity"])
def test_a_folder_another_run_writes_into_is_refused_and_left_alone(model, tmp_path, command):
    out = tmp_path / "out"
    out.mkdir()
    (out / OTHERS_TEMP).write_bytes(b"half of the other run's file")
    earlier = {name: f"the other run's {name}".encode() for name in
               ("model.onnx", "model.esq", "model.pt", "last.pt", "verify.json", "sensitivity.json")}
    for name, data in earlier.items():
        (out / name).write_bytes(data)
    holder = _hold(out, "verify.json" if command == "verify" else None)
    try:
        res = CliRunner().invoke(cli, _commands(model, out)[command])
        assert res.exit_code == 2, res.output
        assert "another edgesqueeze run is writing" in res.output
        assert f"pid {holder.pid}" in res.output and "the test's other run" in res.output
        assert (out / OTHERS_TEMP).read_bytes() == b"half of the other run's file"
        for name, data in earlier.items():
            assert (out / name).read_bytes() == data, name
        assert len(list(out.glob(f"*{LOCK}"))) == 1  # the holder's, as it was
    finally:
        holder.stdin.close()
        holder.wait(timeout=30)
    assert not list(out.glob(f"*{LOCK}"))  # the holder removes it as it lets go


def test_verify_locks_its_report_not_the_folder(model, tmp_path):
    """verify writes beside whatever it is given (/tmp/a.json): another report of another name
    in that folder, and its half-written file, are not in its way."""
    others = tmp_path / ".b.json.ab12cd34.tmp"
    others.write_bytes(b"the other verify's report, half-written")
    holder = _hold(tmp_path, "b.json")
    try:
        res = CliRunner().invoke(cli, ["verify", str(model), "--out", str(tmp_path / "a.json")])
        assert res.exit_code == 0, res.output
        assert (tmp_path / "a.json").is_file()
        assert others.read_bytes() == b"the other verify's report, half-written"
    finally:
        holder.stdin.close()
        holder.wait(timeout=30)


def test_a_killed_runs_lock_does_not_block_the_next_run(model, tmp_path):
    out = tmp_path / "out"
    holder = _hold(out)
    holder.send_signal(signal.SIGKILL)  # no cleanup: the lock file stays, its lock goes with the process
    holder.wait(timeout=30)
    assert (out / LOCK).exists()
    (out / OTHERS_TEMP).write_bytes(b"left by the killed run")
    res = CliRunner().invoke(cli, ["export", str(model), "-f", "onnx", "--out", str(out)])
    assert res.exit_code == 0, res.output
    assert (out / "model.onnx").stat().st_size > 1000
    assert not (out / OTHERS_TEMP).exists()  # stale now, so removed
    assert not (out / LOCK).exists()


def test_one_process_takes_its_own_folder_again_and_lets_go_at_the_end_of_its_scope(tmp_path):
    out = tmp_path / "a" / "b"
    with output_locks():
        lock_output_folder(out)
        with output_locks():
            lock_output_folder(out)  # held already: a no-op, and the inner scope does not let it go
        assert (out / LOCK).exists()
        proc = subprocess.run([sys.executable, "-c", _HOLDER, str(out)], capture_output=True, text=True, cwd=ROOT,
                              input="")
        assert proc.returncode != 0 and "another edgesqueeze run is writing into it" in proc.stderr
        assert f"pid {os.getpid()}" in proc.stderr
    assert not (out / LOCK).exists()
    assert not (tmp_path / "a").exists()  # made for the lock, left empty: removed


def test_a_folder_that_cannot_be_made_is_one_output_error(tmp_path):
    (tmp_path / "file").write_text("x")
    with output_locks(), pytest.raises(OutputError, match="is a file, not a folder"):
        lock_output_folder(tmp_path / "file" / "out")
