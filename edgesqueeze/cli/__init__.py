"""The ``edgesqueeze`` command. It parses, calls the library and prints; no logic lives here.

One module per command group, each registering its commands on the group in :mod:`._group`:
:mod:`.model` (train, eval, models, info), :mod:`.compress` (compress, unpack, sensitivity),
:mod:`.export` (export), :mod:`.gate` (verify, check), :mod:`.runtime` (inspect, run, bench).
Every :class:`~edgesqueeze.errors.EdgesqueezeError` becomes one ``error: ...`` line on
stderr and its exit code (1 for a broken budget, 2 for bad usage or input).
"""

from __future__ import annotations

from edgesqueeze.cli import compress, export, gate, model, runtime  # noqa: F401 - each registers its commands
from edgesqueeze.cli._group import cli

__all__ = ["cli", "main"]


def main() -> None:
    cli(prog_name="edgesqueeze")
