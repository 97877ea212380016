"""Limits every command checks its options against, importable without numpy or a runtime
(``--help`` and ``--version`` import the CLI's option definitions, and nothing more)."""

from __future__ import annotations

import os


def max_threads() -> int:
    """The most runtime threads accepted: 8 per core, at least 64. Far more than that is a
    typo, and onnxruntime makes every thread asked for (100,000 took 16 GB and never finished)."""
    return max(64, 8 * (os.cpu_count() or 1))
