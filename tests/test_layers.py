"""The import contracts in pyproject.toml ([tool.importlinter]) hold: layers one way, no cycles,
runtime and format free of torch. Read statically, every import counts, inside functions too.

On failure the assertion shows import-linter's report, which names each broken chain, e.g.::

    edgesqueeze.checkpoint is not allowed to import edgesqueeze.compress:
    - edgesqueeze.checkpoint -> edgesqueeze.compress.pipeline (l.313)
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
# `lint-imports` is a console script; running its entry point with this interpreter (and this
# checkout first on sys.path: the cwd) checks this tree, whatever is installed.
LINT = "import sys; from importlinter.cli import lint_imports_command; sys.exit(lint_imports_command())"


def _lint(root: Path) -> subprocess.CompletedProcess:
    try:
        import importlinter  # noqa: F401
    except ImportError:
        pytest.fail("import-linter is not installed: pip install -e '.[dev]' (it checks the layers)")
    return subprocess.run([sys.executable, "-c", LINT, "--no-cache", "--config", str(root / "pyproject.toml")],
                          cwd=root, capture_output=True, text=True, timeout=600,
                          env={**os.environ, "PYTHONPATH": str(root), "NO_COLOR": "1"})


def test_import_contracts_hold():
    r = _lint(ROOT)
    report = r.stdout[r.stdout.find("Contracts"):] + r.stderr
    assert r.returncode == 0, "import-linter: broken contracts\n" + report
    assert "0 broken" in r.stdout and "layers" in r.stdout, report


def test_a_function_level_import_breaks_a_contract(tmp_path):
    """The check has teeth: one import inside a function, of torch in the format layer and of
    the pipeline in checkpoint, is reported with the chain that breaks each contract."""
    shutil.copytree(ROOT / "edgesqueeze", tmp_path / "edgesqueeze",
                    ignore=shutil.ignore_patterns("__pycache__"))
    shutil.copy(ROOT / "pyproject.toml", tmp_path / "pyproject.toml")
    with open(tmp_path / "edgesqueeze" / "format" / "codec.py", "a") as f:
        f.write("\n\ndef _uses_torch():\n    import torch  # noqa: F401\n")
    with open(tmp_path / "edgesqueeze" / "checkpoint.py", "a") as f:
        f.write("\n\ndef _uses_pipeline():\n    from edgesqueeze.compress.pipeline import compress  # noqa: F401\n")
    r = _lint(tmp_path)
    assert r.returncode != 0, r.stdout
    assert "edgesqueeze.format is not allowed to import torch" in r.stdout, r.stdout
    assert "edgesqueeze.format.codec -> torch" in r.stdout, r.stdout
    assert "edgesqueeze.checkpoint -> edgesqueeze.compress.pipeline" in r.stdout, r.stdout
