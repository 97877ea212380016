"""Training on a few hundred real digits: it learns, it is reproducible, it resumes exactly."""

from __future__ import annotations

import dataclasses
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from edgesqueeze.checkpoint import load_model
from edgesqueeze.errors import DataError, EdgesqueezeError
from edgesqueeze.recipe import TrainConfig, recipe_from_dict
from edgesqueeze.train import fit, lr_at


def _recipe(tmp_path, epochs=2, **train):
    return recipe_from_dict({
        "version": 1, "name": "t", "seed": 3, "output_dir": str(tmp_path),
        "model": {"arch": "squeezenet_mnist", "kwargs": {"width_mult": 0.5}},
        "data": {"dataset": "digits", "limit": 600, "val_fraction": 0.2},
        "train": {"epochs": epochs, "batch_size": 32, "lr": 0.1, "threads": 1, **train},
    })


def _quiet(_msg):
    pass


def test_schedules():
    cfg = TrainConfig(lr=0.2, schedule="onecycle", warmup_fraction=0.1)
    lrs = [lr_at(s, 100, cfg) for s in range(100)]
    assert max(lrs) == pytest.approx(0.2)
    assert lrs[0] < 0.02 and lrs[-1] < 1e-3
    assert lrs.index(max(lrs)) == 10
    assert lrs[0] == pytest.approx(0.2 / 25)
    assert lr_at(5, 100, TrainConfig(lr=0.3, schedule="constant")) == 0.3


def test_fit_learns_and_writes_outputs(tmp_path):
    out = tmp_path / "run"
    out.mkdir()
    # a killed write's temporary file goes; another tool's (mkstemp names them so) stays: any
    # `.NAME.XXXXXXXX.tmp` in the folder was removed
    ours, others = out / ".metrics.csv.x1y2z3_4.tmp", out / ".photo.jpg.ab12cd34.tmp"
    ours.write_text("half a line")
    others.write_text("another tool's write under way")
    res = fit(_recipe(tmp_path / "run", epochs=6), progress=False, log=_quiet)
    assert not ours.exists() and others.read_text() == "another tool's write under way"
    for name in ("model.pt", "last.pt", "metrics.csv", "metrics.json", "curves.png", "recipe.json"):
        assert (out / name).is_file(), name
    hist = json.loads((out / "metrics.json").read_text())
    assert [h["epoch"] for h in hist] == [1, 2, 3, 4, 5, 6]
    assert hist[-1]["train_loss"] < hist[0]["train_loss"]
    assert res.test["accuracy"] > 0.5  # 10 classes: chance is 0.1
    loaded = load_model(out / "model.pt")
    assert loaded.meta["dataset"] == "digits"
    assert loaded.meta["metrics"]["test"]["accuracy"] == res.test["accuracy"]
    assert (out / "curves.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def _weights(path):
    return load_model(path).model.state_dict()


def test_same_seed_same_result_and_resume_is_exact(tmp_path):
    fit(_recipe(tmp_path / "a"), progress=False, log=_quiet)
    fit(_recipe(tmp_path / "b"), progress=False, log=_quiet)
    wa, wb = _weights(tmp_path / "a" / "model.pt"), _weights(tmp_path / "b" / "model.pt")
    assert all(torch.equal(wa[k], wb[k]) for k in wa)
    # the same recipe (its output_dir included, which its hash covers) gives the same bytes,
    # metadata and all (no wall times: they go to summary.json), so the .esq compressed from
    # it, which records its SHA-256, is the same file too
    first = (tmp_path / "a" / "model.pt").read_bytes()
    (tmp_path / "a").rename(tmp_path / "a0")
    fit(_recipe(tmp_path / "a"), progress=False, log=_quiet)
    assert (tmp_path / "a" / "model.pt").read_bytes() == first
    assert json.loads((tmp_path / "a" / "summary.json").read_text())["train_wall_s"] > 0

    # an "interrupted" run: one epoch of the same two-epoch recipe, then resume
    c = tmp_path / "c"
    fit(_recipe(c, epochs=1), progress=False, log=_quiet)
    state = torch.load(c / "last.pt", weights_only=True)
    assert state["epoch"] == 1
    # resuming refuses a different recipe, naming what differs ...
    with pytest.raises(EdgesqueezeError, match=r"different recipe \(train.epochs differ;"):
        fit(_recipe(c, epochs=2), resume=True, progress=False, log=_quiet)
    with pytest.raises(EdgesqueezeError, match=r"different recipe \(train.lr, train.momentum differ;"):
        fit(_recipe(c, epochs=1, lr=0.05, momentum=0.5), resume=True, progress=False, log=_quiet)
    fit(_recipe(c, epochs=1, eval_batch_size=64), resume=True, progress=False, log=_quiet)  # scoring, not training
    # ... and a state from before training hashes existed, with a clear way out
    del state["train_hash"]
    torch.save(state, c / "last.pt")
    with pytest.raises(EdgesqueezeError, match="older edgesqueeze.*--overwrite"):
        fit(_recipe(c, epochs=1), resume=True, progress=False, log=_quiet)


def test_resume_after_kill_matches_uninterrupted(tmp_path):
    """Simulate kill -9 after epoch 1 of 3 by keeping only the epoch-1 state, then resume."""
    full = tmp_path / "full"
    fit(_recipe(full, epochs=3), progress=False, log=_quiet)

    part = tmp_path / "part"
    recipe = _recipe(part, epochs=3)
    import edgesqueeze.train as train_mod

    real_save = train_mod.save_train_state
    calls = {"n": 0}

    class Killed(Exception):
        pass

    def save_then_die(path, state):
        real_save(path, state)
        calls["n"] += 1
        if calls["n"] == 1:
            raise Killed  # the process dies right after the epoch-1 checkpoint

    train_mod.save_train_state = save_then_die
    try:
        with pytest.raises(Killed):
            fit(recipe, progress=False, log=_quiet)
    finally:
        train_mod.save_train_state = real_save
    assert not (part / "model.pt").exists()
    logs = []
    # resumed asking for 2 threads: it computes with the 1 the run started with, and records
    # that recipe (recipe.json and the hash said 2 threads though 1 computed)
    fit(_recipe(part, epochs=3, threads=2), resume=True, progress=False, log=logs.append)
    assert any("resuming" in line and "after epoch 1/3" in line for line in logs)
    wa, wb = _weights(full / "model.pt"), _weights(part / "model.pt")
    assert all(torch.equal(wa[k], wb[k]) for k in wa)
    assert json.loads((part / "recipe.json").read_text())["train"]["threads"] == 1
    assert load_model(part / "model.pt").meta["recipe_hash"] == recipe.hash()
    assert json.loads((part / "metrics.json").read_text()) != []


def test_refuses_to_clobber_a_previous_run(tmp_path):
    fit(_recipe(tmp_path, epochs=1), progress=False, log=_quiet)
    with pytest.raises(EdgesqueezeError, match="--resume .* or --overwrite"):
        fit(_recipe(tmp_path, epochs=1), progress=False, log=_quiet)
    fit(_recipe(tmp_path, epochs=1), overwrite=True, progress=False, log=_quiet)


def test_real_kill_9_mid_epoch_then_resume(tmp_path):
    """A real SIGKILL while epoch 2+ is in flight; --resume ends bitwise where a clean run ends."""
    import os
    import signal
    import subprocess
    import sys
    import time
    from pathlib import Path

    root = Path(__file__).resolve().parents[1]
    args = ["--set", "data.limit=600", "--set", "train.epochs=4", "--set", "train.threads=1",
            "--set", "model.kwargs={width_mult: 0.5}", "--set", "seed=5", "--no-progress"]
    cmd = [sys.executable, "-m", "edgesqueeze", "train", "--recipe", str(root / "recipes/squeezenet-digits.yaml")]
    env = {**os.environ, "PYTHONPATH": str(root)}

    clean = tmp_path / "clean"
    subprocess.run([*cmd, "--out", str(clean), *args], check=True, env=env, capture_output=True, timeout=300)

    killed = tmp_path / "killed"
    proc = subprocess.Popen([*cmd, "--out", str(killed), *args], env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 240
    while not (killed / "last.pt").exists() and time.time() < deadline and proc.poll() is None:
        time.sleep(0.02)
    time.sleep(0.3)  # well inside the next epoch
    proc.send_signal(signal.SIGKILL)
    proc.wait(timeout=30)
    assert proc.returncode == -signal.SIGKILL, "the run finished before it could be killed"
    state = torch.load(killed / "last.pt", weights_only=True)
    assert 1 <= state["epoch"] < 4
    assert not (killed / "model.pt").exists()
    # SIGKILL inside an atomic write may leave its hidden temp file (never a final name);
    # the resumed run removes it.
    subprocess.run([*cmd, "--out", str(killed), *args, "--resume"], check=True, env=env, capture_output=True,
                   timeout=300)
    assert not [p for p in killed.iterdir() if p.name.endswith(".tmp")]
    wa, wb = _weights(clean / "model.pt"), _weights(killed / "model.pt")
    assert all(torch.equal(wa[k], wb[k]) for k in wa)


def test_stale_temp_files_of_a_killed_write_are_removed(tmp_path):
    from edgesqueeze._io import remove_stale_temps

    (tmp_path / ".metrics.csv.x1y2z3_4.tmp").write_text("half a line")
    (tmp_path / ".editor-swap.tmp").write_text("another tool's: no random part of mkstemp's")
    (tmp_path / "metrics.csv").write_text("epoch\n1\n")
    (tmp_path / "notes.tmp").write_text("not ours: no leading dot")
    removed = remove_stale_temps(tmp_path)
    assert [p.name for p in removed] == [".metrics.csv.x1y2z3_4.tmp"]
    assert sorted(p.name for p in tmp_path.iterdir()) == [".editor-swap.tmp", "metrics.csv", "notes.tmp"]
    assert remove_stale_temps(tmp_path / "missing") == []



@pytest.mark.skipif(not hasattr(os, "sched_setaffinity") or len(os.sched_getaffinity(0)) < 2,
                    reason="needs two CPUs and Linux's affinity calls")
def test_auto_threads_follow_affinity_and_omp_num_threads():
    """train.threads: 0 took os.cpu_count(): under `taskset -c 0` or with OMP_NUM_THREADS=1
    (beside another job) it still ran one thread per core of the machine, and OpenMP's
    threads waiting for each other made a digits epoch 50x slower (0.8 s -> 40 s here)."""
    probe = ("import os, sys; {pre}; from edgesqueeze.train import set_threads; import torch; "
             "print(set_threads(0), torch.get_num_threads())")
    root = str(Path(__file__).resolve().parents[1])
    env = {k: v for k, v in os.environ.items() if k != "OMP_NUM_THREADS"}
    env["PYTHONPATH"] = root + os.pathsep + env.get("PYTHONPATH", "")
    cpu = min(os.sched_getaffinity(0))
    pinned = subprocess.run([sys.executable, "-c", probe.format(pre=f"os.sched_setaffinity(0, {{{cpu}}})")],
                            env=env, capture_output=True, text=True, check=True)
    assert pinned.stdout.split() == ["1", "1"]
    omp = subprocess.run([sys.executable, "-c", probe.format(pre="pass")], env={**env, "OMP_NUM_THREADS": "1"},
                         capture_output=True, text=True, check=True)
    assert omp.stdout.split() == ["1", "1"]
    free = subprocess.run([sys.executable, "-c", probe.format(pre="pass")], env=env, capture_output=True,
                          text=True, check=True)
    assert free.stdout.split() == [str(len(os.sched_getaffinity(0)))] * 2


def test_resume_computes_with_the_interrupted_runs_thread_count(tmp_path):
    """Float sums depend on the CPU thread count, so a run started on 2 threads and resumed
    where 1 is the default (another OMP_NUM_THREADS, another machine) goes on with 2: its
    weights are those of the uninterrupted run."""
    before = torch.get_num_threads()
    import edgesqueeze.train as train_mod

    try:
        full = {n: tmp_path / f"full{n}" for n in (1, 2)}
        for n, out in full.items():
            fit(_recipe(out, epochs=3, threads=n), progress=False, log=_quiet)
        w1, w2 = _weights(full[1] / "model.pt"), _weights(full[2] / "model.pt")
        assert not all(torch.equal(w1[k], w2[k]) for k in w1), "1 and 2 threads gave the same weights here"

        part = tmp_path / "part"
        real_save = train_mod.save_train_state

        class Killed(Exception):
            pass

        def save_then_die(path, state):
            real_save(path, state)
            raise Killed

        train_mod.save_train_state = save_then_die
        try:
            with pytest.raises(Killed):
                fit(_recipe(part, epochs=3, threads=2), progress=False, log=_quiet)
        finally:
            train_mod.save_train_state = real_save
        logs = []
        fit(_recipe(part, epochs=3, threads=1), resume=True, progress=False, log=logs.append)
        assert any("2 CPU threads as the interrupted run" in line for line in logs), logs
        wp = _weights(part / "model.pt")
        assert all(torch.equal(w2[k], wp[k]) for k in w2)
    finally:
        torch.set_num_threads(before)


def test_a_model_returning_a_tuple_is_one_line_before_training(tmp_path):
    """A model whose forward returns (logits, features) crashed train with a traceback
    ("AttributeError: 'tuple' object has no attribute 'dim'") from the pre-flight check."""
    src = tmp_path / "nets.py"
    src.write_text(
        "import torch\nfrom torch import nn\n\n"
        "class TupleOut(nn.Module):\n"
        "    def __init__(self, num_classes=10, in_channels=1):\n"
        "        super().__init__()\n"
        "        self.c = nn.Conv2d(in_channels, 4, 3, stride=2)\n"
        "        self.fc = nn.Linear(4, num_classes)\n\n"
        "    def forward(self, x):\n"
        "        f = self.c(x).mean((2, 3))\n"
        "        return self.fc(f), f\n")
    recipe = recipe_from_dict({
        "version": 1, "name": "t", "seed": 0, "output_dir": str(tmp_path / "out"),
        "model": {"import": f"{src}:TupleOut"},
        "data": {"dataset": "digits", "limit": 100},
        "train": {"epochs": 1, "batch_size": 32, "threads": 1},
    })
    with pytest.raises(EdgesqueezeError, match="returns a tuple, not one tensor of logits") as err:
        fit(recipe, log=_quiet, progress=False)
    assert err.value.exit_code == 2 and "\n" not in str(err.value)


def test_a_new_run_removes_an_earlier_runs_results_and_resume_with_overwrite_is_refused(tmp_path):
    """Audit: train --overwrite interrupted after its first epoch left the old model.pt,
    summary.json and curves.png beside its own last.pt; --resume --overwrite resumed."""
    from click.testing import CliRunner

    from edgesqueeze.cli import cli

    fit(_recipe(tmp_path, epochs=1), progress=False, log=_quiet)
    assert (tmp_path / "model.pt").is_file() and (tmp_path / "summary.json").is_file()
    lines: list[str] = []

    def stop(msg):
        lines.append(msg)
        if msg.startswith("epoch") and "1/" in msg:
            raise KeyboardInterrupt

    (tmp_path / "export").mkdir()  # the earlier model's exports, as gate.sh lays them out
    with pytest.raises(KeyboardInterrupt):
        fit(_recipe(tmp_path, epochs=2), overwrite=True, progress=False, log=stop)
    assert not (tmp_path / "model.pt").exists() and not (tmp_path / "summary.json").exists(), lines
    assert any("held an earlier run's model.pt" in m for m in lines), lines
    assert any("last.pt" in m for m in lines if "held an earlier run's" in m), lines
    # stopped before its first epoch, an --overwrite run left the earlier run's last.pt, and
    # --resume (which the interrupt advised in place of --overwrite) went on with the earlier run
    (tmp_path / "last.pt").write_bytes(b"an earlier run's state")

    def stop_at_start(msg):
        if msg.startswith("training"):
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        fit(_recipe(tmp_path, epochs=2), overwrite=True, progress=False, log=stop_at_start)
    assert not (tmp_path / "last.pt").exists()
    assert f"note: {tmp_path}/ also holds export/ of the earlier model, left as they are" in "\n".join(lines), lines
    res = CliRunner().invoke(cli, ["train", "-r", "recipes/squeezenet-digits.yaml", "--out", str(tmp_path),
                                   "--resume", "--overwrite"])
    assert res.exit_code == 2 and "give one of them" in res.output, res.output


def test_a_folder_with_a_runs_file_names_but_no_last_pt_is_refused_without_overwrite(tmp_path):
    """`train --out X` where X held a model.pt of the user's own (no last.pt) removed it, with
    "held an earlier run's model.pt: removed" (summary.json, curves.png, metrics too). Only a
    folder with last.pt was refused. Now those names without last.pt are refused as well, and
    nothing there is touched; --overwrite replaces them."""
    (tmp_path / "model.pt").write_bytes(b"my own model")
    (tmp_path / "summary.json").write_text("{}")
    with pytest.raises(EdgesqueezeError, match=r"holds model\.pt, summary\.json, the names a run writes, but no "
                                               r"last\.pt \(no run to resume\); pass --overwrite") as err:
        fit(_recipe(tmp_path, epochs=0.05), progress=False, log=_quiet)
    assert err.value.exit_code == 2
    assert (tmp_path / "model.pt").read_bytes() == b"my own model" and not (tmp_path / "last.pt").exists()
    fit(_recipe(tmp_path, epochs=0.05), overwrite=True, progress=False, log=_quiet)
    assert (tmp_path / "model.pt").read_bytes() != b"my own model" and (tmp_path / "last.pt").is_file()


def test_a_folder_too_small_for_a_test_split_is_refused_before_training(tmp_path):
    """Two images (one a class): the carved test split rounded to none, and training ran, then
    crashed on its final line (KeyError: 'accuracy', exit 1) leaving a model.pt that eval refused."""
    from PIL import Image

    for cls, shade in (("a", 30), ("b", 220)):
        (tmp_path / "imgs" / cls).mkdir(parents=True)
        Image.new("L", (16, 16), shade).save(tmp_path / "imgs" / cls / "0.png")
    recipe = recipe_from_dict({"version": 1, "seed": 0, "output_dir": str(tmp_path / "out"),
                               "model": {"arch": "squeezenet_mnist", "kwargs": {"width_mult": 0.5}},
                               "data": {"dataset": f"imagefolder:{tmp_path / 'imgs'}", "val_fraction": 0},
                               "train": {"epochs": 1, "batch_size": 2, "threads": 1}})
    with pytest.raises(DataError, match=r"has no test images \(of 2 images, the test split carved from them rounds "
                                        r"to none\): add images, or a test/ folder") as err:
        fit(recipe, progress=False, log=_quiet)
    assert err.value.exit_code == 2 and not (tmp_path / "out").exists()


def test_ctrl_c_says_how_to_go_on(tmp_path):
    import signal
    import subprocess
    import sys

    def as_from_a_terminal():  # Ctrl-C reaches it: SIGINT neither blocked nor ignored, whatever
        # this test process inherited (a CI run: the child finished all 50 epochs, exit 0, once;
        # timed out under load once: SIGINT never arrived)
        signal.pthread_sigmask(signal.SIG_UNBLOCK, {signal.SIGINT})
        signal.signal(signal.SIGINT, signal.SIG_DFL)

    status = {k: v for k, v in (line.split(":", 1) for line in open("/proc/self/status") if ":" in line)
              if k in ("SigBlk", "SigIgn")} if os.path.exists("/proc/self/status") else {}
    p = subprocess.Popen([sys.executable, "-m", "edgesqueeze", "train", "-r", "recipes/squeezenet-digits.yaml",
                          "--set", "train.epochs=50", "--out", str(tmp_path), "--no-progress"],
                         stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, preexec_fn=as_from_a_terminal)
    assert p.stdout.readline().startswith("training")  # started
    p.send_signal(signal.SIGINT)
    _, err = p.communicate(timeout=120)
    # --resume where an epoch finished (its last.pt), else nothing to resume from
    said = ("interrupted (the same command with --resume goes on" if (tmp_path / "last.pt").exists()
            else "interrupted before its first epoch finished (nothing to resume: the same command starts it again)")
    assert p.returncode == 130 and said in err, (err, status)


def test_fit_gives_the_callers_thread_count_back_and_evaluate_is_the_function(tmp_path):
    """API audit: fit left torch's thread count at the recipe's; and `from edgesqueeze import
    evaluate` gave the submodule edgesqueeze.evaluate (not callable) once train was imported."""
    import edgesqueeze
    from edgesqueeze import evaluate

    before = torch.get_num_threads()
    want = 1 if before != 1 else 2
    torch.set_num_threads(want)
    try:
        fit(_recipe(tmp_path, epochs=1, threads=3 - want), progress=False, log=_quiet)
        assert torch.get_num_threads() == want
    finally:
        torch.set_num_threads(before)
    assert callable(evaluate) and callable(edgesqueeze.evaluate) and "evaluate" in dir(edgesqueeze)


def test_a_damaged_state_file_is_one_line_naming_it(tmp_path):
    """`echo garbage > OUT/last.pt` (or pruned.pt, prune-retrain.state.pt) then --resume
    ended in a traceback through the private checkpoint._PickleRefused (exit 1); now one
    ``error:`` line naming the file and what to do (exit 2), and an empty (truncated) file too."""
    root = Path(__file__).resolve().parents[1]
    recipe = root / "recipes" / "squeezenet-digits.yaml"
    small = {"train": ["--set", "data.limit=200", "--set", "train.epochs=1", "--no-progress"],
             "compress": ["--set", "compress.prune_finetune.epochs=1", "--set", "compress.cluster_finetune.epochs=1",
                          "--no-progress"]}  # each command's own keys: the others are noted as not read

    def edgesqueeze(*args):  # in process (a subprocess per case took 20 s): the CLI's own error handling
        from click.testing import CliRunner

        from edgesqueeze.cli import cli

        try:
            runner = CliRunner(mix_stderr=False)
        except TypeError:  # click >= 8.2 keeps stderr apart always
            runner = CliRunner()
        res = runner.invoke(cli, [*map(str, args), *small[str(args[0])]])
        assert res.exception is None or isinstance(res.exception, SystemExit), res.exception
        return res.exit_code, res.stdout, res.stderr

    model = fit(_recipe(tmp_path / "float", epochs=1), progress=False, log=_quiet).checkpoint
    for command, name in ((("train", "-r", recipe), "last.pt"),
                          (("compress", model, "-r", recipe), "pruned.pt"),
                          (("compress", model, "-r", recipe), "prune-retrain.state.pt")):
        for content, why in ((b"garbage\n", "not an edgesqueeze"), (b"", "cannot read as a PyTorch file")):
            out = tmp_path / f"{command[0]}-{name}-{len(content)}"
            out.mkdir()
            (out / name).write_bytes(content)
            rc, stdout, stderr = edgesqueeze(*command, "--out", out, "--resume")
            assert rc == 2 and "Traceback" not in stderr, stderr
            said = stderr.strip().splitlines()
            assert len(said) == 1 and said[0].startswith(f"error: {out / name}: {why}"), stderr
            assert "delete it, or leave out --resume" in said[0], stderr
            assert not (out / "model.pt").exists() and not (out / "model.esq").exists()


def test_fit_gives_the_model_in_eval_mode_and_the_callers_random_state_back(tmp_path):
    """fit's model was left in training mode (dropout on, BatchNorm statistics moving with each
    call, unlike load_model's), and fit re-seeded torch's global generator for the caller."""
    torch.manual_seed(5)
    expected = torch.rand(3)
    torch.manual_seed(5)
    res = fit(_recipe(tmp_path / "m", epochs=0.2), progress=False, log=_quiet)
    assert torch.equal(torch.rand(3), expected)
    assert not res.model.training
    x = torch.randn(4, 1, 28, 28)
    with torch.no_grad():
        first = res.model(x)
        assert torch.equal(res.model(x), first)
    saved = load_model(tmp_path / "m" / "model.pt").model
    assert all(torch.equal(a, b) for a, b in zip(res.model.state_dict().values(), saved.state_dict().values()))
    assert load_model(tmp_path / "m" / "model.pt").meta["train_threads"] == 1


def test_fit_refuses_what_it_cannot_do_before_writing(tmp_path):
    """A validation split that holds out every training image crashed in the schedule
    (ZeroDivisionError) after recipe.json was written; fit(resume=True, overwrite=True) and
    out_dir="" (which wrote to artifacts/<name>) were taken."""
    from edgesqueeze.errors import DataError

    recipe = recipe_from_dict({"version": 1, "name": "t", "model": {"arch": "squeezenet_mnist"},
                               "data": {"dataset": "digits", "limit": 10, "val_fraction": 0.99},
                               "train": {"epochs": 1, "threads": 1}})
    with pytest.raises(DataError, match=r"data.val_fraction 0.99 holds out all .* training images.*raise data.limit"):
        fit(recipe, out_dir=tmp_path / "v", progress=False, log=_quiet)
    assert not (tmp_path / "v" / "recipe.json").exists()
    with pytest.raises(EdgesqueezeError, match="give one of them"):
        fit(recipe, out_dir=tmp_path / "w", resume=True, overwrite=True)
    with pytest.raises(EdgesqueezeError, match="out_dir: expected a folder path"):
        fit(recipe, out_dir="")


def test_a_resume_state_that_is_a_text_file_is_one_error(tmp_path):
    from edgesqueeze.errors import CheckpointError

    c = tmp_path / "c"
    fit(_recipe(c, epochs=0.2), progress=False, log=_quiet)
    (c / "last.pt").write_text("hello\n")
    with pytest.raises(CheckpointError, match=r"last.pt: cannot read as a PyTorch file .*it is not a training state"):
        fit(_recipe(c, epochs=0.2), resume=True, progress=False, log=_quiet)


def test_label_smoothing_and_optimizer_settings_are_said(tmp_path):
    """A label-smoothed training loss was printed and plotted as the plain cross-entropy of
    the validation curve (1.85 beside 0.86); adam took momentum without a word."""
    logs = []
    fit(_recipe(tmp_path / "s", epochs=0.3, label_smoothing=0.5, optimizer="adam", momentum=0.5, lr=0.001),
        progress=False, log=logs.append)
    assert any("train loss (smoothed)" in line for line in logs), logs
    assert any("train.momentum and train.nesterov apply to sgd only; adam ignores them" in line for line in logs)
    logs.clear()
    fit(_recipe(tmp_path / "p", epochs=0.3), progress=False, log=logs.append)
    assert not any("smoothed" in line or "apply to sgd only" in line for line in logs), logs


def test_a_model_keyword_error_names_the_recipes_model_section(tmp_path):
    from edgesqueeze.errors import ModelError

    recipe = recipe_from_dict({"version": 1, "name": "t", "model": {"arch": "squeezenet_mnist",
                                                                   "kwargs": {"width_mult": 0}},
                               "data": {"dataset": "digits", "limit": 100}, "train": {"epochs": 0.1, "threads": 1}})
    with pytest.raises(ModelError, match=r"^model \(squeezenet_mnist, kwargs \{'width_mult': 0\}\): .*width_mult"):
        fit(recipe, out_dir=tmp_path / "m", progress=False, log=_quiet)


def test_classes_without_training_images_and_an_empty_validation_split_are_said(tmp_path):
    """data.limit 10 left the only 7 in the validation split: trained without it, scored on
    it, not a word; a val_fraction rounding to no image was silent too."""
    logs = []
    recipe = recipe_from_dict({"version": 1, "name": "t", "model": {"arch": "squeezenet_mnist",
                                                                   "kwargs": {"width_mult": 0.25}},
                               "data": {"dataset": "digits", "limit": 10, "val_fraction": 0.1},
                               "train": {"epochs": 0.5, "threads": 1}})
    fit(recipe, out_dir=tmp_path / "a", progress=False, log=logs.append)
    assert any("1 of 10 classes have no training images after the validation split" in m for m in logs), logs
    logs.clear()
    fit(dataclasses.replace(recipe, data=dataclasses.replace(recipe.data, val_fraction=0.01)),
        out_dir=tmp_path / "b", progress=False, log=logs.append)
    assert any("data.val_fraction 0.01 of 10 training images rounds to none" in m for m in logs), logs
    assert not any("no training images" in m for m in logs), logs


def test_an_interrupt_before_the_first_epoch_does_not_advise_resume(tmp_path, monkeypatch):
    """Ctrl-C before any epoch finished said "the same command with --resume goes on from the
    last finished epoch", with no epoch, no last.pt, no folder. The interrupt itself is the
    CLI's (fit stands in for a run stopped at its start); with a last.pt it advises --resume."""
    from click.testing import CliRunner

    import edgesqueeze.train
    from edgesqueeze.cli import cli

    def stopped(recipe, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(edgesqueeze.train, "fit", stopped)
    args = ["train", "-r", "recipes/squeezenet-digits.yaml", "--out", str(tmp_path / "run"), "--no-progress"]
    res = CliRunner().invoke(cli, args)
    assert res.exit_code == 130, res.output
    assert "interrupted before its first epoch finished (nothing to resume: the same command starts it again)" \
        in res.output and "--resume" not in res.output, res.output
    (tmp_path / "run").mkdir()
    (tmp_path / "run" / "last.pt").write_bytes(b"state")
    res = CliRunner().invoke(cli, [*args, "--resume"])
    assert res.exit_code == 130 and "with --resume goes on from the last finished epoch" in res.output, res.output
    # stopped before training began (torchrun's SIGTERM to the ranks after another's usage error)
    import edgesqueeze._io

    def stopped_early(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(edgesqueeze._io, "outputs_clear_of_inputs", stopped_early)
    res = CliRunner().invoke(cli, ["train", "-r", "recipes/squeezenet-digits.yaml", "--out", str(tmp_path / "new")])
    assert res.exit_code == 130 and "nothing to resume" in res.output and "--resume" not in res.output, res.output


def test_data_stream_on_a_dataset_held_in_memory_is_said(tmp_path):
    """`--set data.stream=true` on digits changed nothing, without a word (README: image folders only)."""
    raw = _recipe(tmp_path / "s", epochs=1)
    said: list[str] = []
    fit(dataclasses.replace(raw, data=dataclasses.replace(raw.data, stream=True)), progress=False, log=said.append)
    assert "note: data.stream applies to image folders (imagefolder:, imagenet:); 'digits' is held in memory" in said
