"""tools/suite_timeline.py (`make test-timeline`): a real pytest run of a small test file with
the plugin, in one process and on two pytest-xdist workers, and the table from known rows."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tools"))
from suite_timeline import summarize  # noqa: E402

TESTS = '''
import time

def test_waits():  # no CPU: what a test waiting on a subprocess looks like
    time.sleep(0.3)

def test_computes():  # at least 0.2 s of this process's CPU, however busy the machine
    t = time.process_time()
    while time.process_time() - t < 0.2:
        pass
'''


def _run(tmp_path: Path, *args: str) -> tuple[subprocess.CompletedProcess, list[dict]]:
    (tmp_path / "test_small.py").write_text(TESTS)
    log = tmp_path / "timeline.jsonl"
    log.write_text('{"left": "from an earlier run"}\n')
    env = {**os.environ, "PYTHONPATH": str(ROOT / "tools"), "EDGESQUEEZE_TIMELINE": str(log)}
    env.pop("PYTEST_XDIST_WORKER", None)  # this test may itself run on a worker
    proc = subprocess.run([sys.executable, "-m", "pytest", "-p", "suite_timeline", "-p", "no:cacheprovider",
                           "--rootdir", str(tmp_path), "-q", *args, "test_small.py"],
                          cwd=tmp_path, env=env, capture_output=True, text=True, timeout=120)
    return proc, [json.loads(line) for line in log.read_text().splitlines()]


@pytest.mark.parametrize("xdist", [False, True])
def test_a_run_with_the_plugin_logs_each_test_and_prints_the_table(tmp_path, xdist):
    proc, rows = _run(tmp_path, *(["-n", "2", "--dist", "load"] if xdist else []))
    assert proc.returncode == 0, proc.stdout + proc.stderr
    # the earlier run's line is gone: one row per test of this run
    assert sorted(r["nodeid"] for r in rows) == ["test_small.py::test_computes", "test_small.py::test_waits"]
    row = {r["nodeid"].split("::")[1]: r for r in rows}
    assert row["test_computes"]["cpu"] >= 0.2
    waits = row["test_waits"]
    assert waits["end"] - waits["start"] >= 0.3 > waits["cpu"] + 0.15
    workers = {r["worker"] for r in rows}
    assert (workers <= {"gw0", "gw1"}) if xdist else (workers == {"main"})
    out = proc.stdout
    assert "suite timeline" in out and "waiting on subprocesses" in out, out
    assert "test_small.py" in out.split("the 1 test files with the most wall time (of 1):", 1)[1], out


def test_the_table_splits_wall_time_into_cpu_and_waiting():
    rows = [
        {"worker": "gw0", "nodeid": "tests/test_a.py::t1", "start": 100.0, "end": 104.0, "cpu": 1.0,
         "children_cpu": 2.5},
        {"worker": "gw0", "nodeid": "tests/test_b.py::t1", "start": 104.0, "end": 105.0, "cpu": 1.0},  # an old row
        {"worker": "gw1", "nodeid": "tests/test_a.py::t2", "start": 100.5, "end": 102.5, "cpu": 2.0,
         "children_cpu": 0.0},
    ]
    lines = summarize(rows)
    gw0 = next(line for line in lines if line.startswith("gw0")).split()
    gw1 = next(line for line in lines if line.startswith("gw1")).split()
    # tests, ends at (from the first start), busy, in-process CPU, waiting, the subprocesses' CPU
    assert gw0 == ["gw0", "2", "5.0", "5.0", "2.0", "3.0", "2.5"]
    assert gw1 == ["gw1", "1", "2.5", "2.0", "2.0", "0.0", "0.0"]
    header = "wall (s)   in-process CPU (s)   subprocess CPU (s)   tests   file"
    files = lines[lines.index(header) + 1:lines.index(header) + 3]
    assert [f.split() for f in files] == [["6.0", "3.0", "2.5", "2", "tests/test_a.py"],
                                          ["1.0", "1.0", "0.0", "1", "tests/test_b.py"]]
    # 6.5 CPU-seconds over the 5 s from the first start to the last end
    assert lines[-1].startswith("during the tests: 6.5 CPU-seconds (test processes and their subprocesses) in 5.0 s, "
                                "1.30 of this machine's "), lines[-1]
    assert summarize([]) == ["suite timeline: no test ran"]


def test_a_subprocess_s_cpu_is_counted_with_its_own_children(tmp_path):
    """A test that waits on a process which itself waits on a computing child (as torchrun
    waits on its ranks): the grandchild's CPU is the test's subprocess CPU."""
    (tmp_path / "test_spawns.py").write_text("""
import subprocess, sys
BUSY = "import time\\nt = time.process_time()\\nwhile time.process_time() - t < 0.4: pass"
def test_spawns():
    subprocess.run([sys.executable, "-c", "import subprocess, sys; subprocess.run([sys.executable, '-c', sys.argv[1]])",
                    BUSY], check=True)
""")
    log = tmp_path / "timeline.jsonl"
    env = {**os.environ, "PYTHONPATH": str(ROOT / "tools"), "EDGESQUEEZE_TIMELINE": str(log)}
    env.pop("PYTEST_XDIST_WORKER", None)
    proc = subprocess.run([sys.executable, "-m", "pytest", "-p", "suite_timeline", "-p", "no:cacheprovider",
                           "--rootdir", str(tmp_path), "-q", "test_spawns.py"],
                          cwd=tmp_path, env=env, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    (row,) = [json.loads(line) for line in log.read_text().splitlines()]
    assert row["children_cpu"] >= 0.4 > row["cpu"], row
    assert "subprocess CPU (s)" in proc.stdout and "CPU-seconds (test processes and their subprocesses)" in proc.stdout
