"""benchmarks/run.py, the harness behind `make bench` and docs/BENCHMARKS.md."""

from __future__ import annotations

import importlib.util
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def _run_module():
    spec = importlib.util.spec_from_file_location("bench_run", ROOT / "benchmarks" / "run.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_benchmarks_md_is_what_the_records_and_notes_render():
    """docs/BENCHMARKS.md is generated: an edit to notes.md or a record without
    `benchmarks/run.py --report` leaves it stale."""
    mod = _run_module()
    assert (ROOT / "docs" / "BENCHMARKS.md").read_text() == mod.report() + "\n", \
        "docs/BENCHMARKS.md is stale: run `python benchmarks/run.py --report`"


def test_every_record_is_rendered_or_listed_with_its_machine():
    """Audit: four records (the experiment scripts' logs) were in no section, though the README
    says every command, date and machine is in BENCHMARKS.md."""
    text = (ROOT / "docs" / "BENCHMARKS.md").read_text()
    mod = _run_module()
    mod.report()
    for path in (ROOT / "benchmarks" / "results").glob("*.json"):
        assert path.name in mod._RENDERED or path.name.startswith("device_") or \
            f"`benchmarks/results/{path.name}`" in text, path.name


def test_an_unknown_part_is_refused_before_any_part_runs():
    """Audit: `--only mnist,typo` trained MNIST for hours before saying 'unknown part'."""
    p = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "run.py"), "--only", "mnist,typo"],
                       capture_output=True, text=True, timeout=120)
    assert p.returncode == 1 and "unknown part 'typo'" in p.stderr, (p.returncode, p.stderr[-500:])
    assert "[bench]" not in p.stdout and "mnist" not in p.stdout, p.stdout[-500:]
