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
    import os

    if os.environ.get("WORLD_SIZE", "1").strip() in ("", "0", "1"):
        cli(prog_name="edgesqueeze")
        return
    # Launched by torchrun: end the process without the interpreter's finalization. Gloo's C++
    # worker threads could still be torn down there after the process group was destroyed, and
    # a rank aborted ("terminate called without an active exception", SIGABRT) once every
    # output was written, failing the run (seen once in a CI; pytorch/pytorch#179291 describes
    # the same finalization crash).
    import sys

    try:
        cli(prog_name="edgesqueeze")
        code = 0
    except SystemExit as exc:
        code = exc.code if isinstance(exc.code, int) else (0 if exc.code is None else 1)
        if isinstance(exc.code, str):
            print(exc.code, file=sys.stderr)
    for stream in (sys.stdout, sys.stderr):
        try:
            stream.flush()
        except (OSError, ValueError):
            pass
    os._exit(code)
