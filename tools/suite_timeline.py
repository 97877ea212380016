"""A pytest plugin that says where a test run's time went: per worker and per test file, the
wall time and the CPU time spent in the test process itself (the rest is time waiting on
subprocesses: CLI runs, torchrun, emulated CPUs). For a machine where `make test` is slow:

    make test-timeline                      # the whole suite, the table at the end
    PYTHONPATH=tools .venv/bin/python -m pytest -p suite_timeline tests/test_cli.py

Each test process (the pytest-xdist workers, or the one process without xdist) appends one
JSON line per test to ``.pytest_timeline.jsonl`` in the rootdir (``EDGESQUEEZE_TIMELINE``
names another file): ``{"worker", "nodeid", "start", "end", "cpu", "children_cpu"}``, times in
seconds (``start``/``end`` since the epoch, ``cpu`` the process's user + system time during the
test, setup and teardown included; ``children_cpu`` the user + system time of the subprocesses
that ended and were waited for during it, their own subprocesses included, as
``getrusage(RUSAGE_CHILDREN)`` counts them: a torchrun launch's ranks too). Waiting time not
covered by that CPU is time in which nothing the test started computed: a sleep, a timeout, or
a machine busy with the other worker. The controlling process empties the file when the run starts
and prints the table after the run. Standard library only; it changes no test's outcome.
"""

from __future__ import annotations

import json
import os
import resource
import time
from collections import defaultdict
from pathlib import Path

import pytest

TOP_FILES = 15


def _path(config) -> Path:
    return Path(os.environ.get("EDGESQUEEZE_TIMELINE") or Path(str(config.rootpath)) / ".pytest_timeline.jsonl")


def _is_controller(config) -> bool:
    return not hasattr(config, "workerinput")  # pytest-xdist gives its workers a workerinput


def pytest_configure(config) -> None:
    if _is_controller(config):
        _path(config).write_text("")  # this run's lines only


def _children_cpu() -> float:
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    return usage.ru_utime + usage.ru_stime


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_protocol(item, nextitem):
    start, cpu, children = time.time(), time.process_time(), _children_cpu()
    yield
    row = {"worker": os.environ.get("PYTEST_XDIST_WORKER", "main"), "nodeid": item.nodeid,
           "start": start, "end": time.time(), "cpu": time.process_time() - cpu,
           "children_cpu": _children_cpu() - children}
    with open(_path(item.config), "a", encoding="utf-8") as f:  # one short line, appended whole
        f.write(json.dumps(row) + "\n")


def summarize(rows: list[dict]) -> list[str]:
    """The table's lines: per worker (tests, first start to last end, in-process CPU, the
    subprocesses' CPU), then the test files with the most wall time, and the whole run's CPU."""
    if not rows:
        return ["suite timeline: no test ran"]
    t0 = min(r["start"] for r in rows)
    lines = ["worker   tests   ends at (s)   busy (s)   in-process CPU (s)   waiting on subprocesses (s)   "
             "their CPU (s)"]
    by_worker: dict[str, list[dict]] = defaultdict(list)
    for r in rows:
        by_worker[r["worker"]].append(r)
    for w in sorted(by_worker):
        rs = by_worker[w]
        busy, cpu = sum(r["end"] - r["start"] for r in rs), sum(r["cpu"] for r in rs)
        children = sum(r.get("children_cpu", 0.0) for r in rs)
        lines.append(f"{w:<8} {len(rs):>5}   {max(r['end'] for r in rs) - t0:>11.1f}   {busy:>8.1f}   "
                     f"{cpu:>18.1f}   {max(0.0, busy - cpu):>27.1f}   {children:>13.1f}")
    files: dict[str, list[float]] = defaultdict(lambda: [0.0, 0.0, 0.0, 0])
    for r in rows:
        f = files[r["nodeid"].split("::", 1)[0]]
        f[0] += r["end"] - r["start"]
        f[1] += r["cpu"]
        f[2] += r.get("children_cpu", 0.0)
        f[3] += 1
    lines.append("")
    lines.append(f"the {min(TOP_FILES, len(files))} test files with the most wall time (of {len(files)}):")
    lines.append("wall (s)   in-process CPU (s)   subprocess CPU (s)   tests   file")
    for name, (wall, cpu, children, n) in sorted(files.items(), key=lambda kv: -kv[1][0])[:TOP_FILES]:
        lines.append(f"{wall:>8.1f}   {cpu:>18.1f}   {children:>18.1f}   {n:>5}   {name}")
    wall = max(r["end"] for r in rows) - t0
    used = sum(r["cpu"] + r.get("children_cpu", 0.0) for r in rows)
    lines.append("")
    lines.append(f"during the tests: {used:.1f} CPU-seconds (test processes and their subprocesses) in {wall:.1f} s, "
                 f"{used / wall if wall > 0 else 0.0:.2f} of this machine's {os.cpu_count()} CPUs busy on average")
    return lines


def pytest_terminal_summary(terminalreporter, exitstatus, config) -> None:
    if not _is_controller(config):
        return
    path = _path(config)
    rows = []
    for line in path.read_text(encoding="utf-8").splitlines() if path.exists() else []:
        try:
            rows.append(json.loads(line))
        except ValueError:  # a line cut by a worker killed mid-write: leave it out
            continue
    terminalreporter.section("suite timeline")
    for line in summarize(rows):
        terminalreporter.write_line(line)
    terminalreporter.write_line(f"(one line per test in {path})")
