"""Data-parallel training and retraining on ``torch.distributed``, launched by ``torchrun``.

``torchrun --nproc_per_node N -m edgesqueeze train -r recipe.yaml`` starts N processes with
``RANK``, ``WORLD_SIZE``, ``LOCAL_RANK`` and a rendezvous in their environment; each one
builds the same model from the same seed, draws the same shuffled order and augmentation
from the same generator, and trains on its own slice of every global batch (``train.batch_size``
is the global batch: each rank takes every N-th sample of it). DistributedDataParallel
averages the gradients, so the weights stay identical on every rank. Rank 0 alone writes
files and logs. Backend: ``nccl`` on CUDA, ``gloo`` on the CPU.

``compress`` retrains the same way (``prune_finetune``, ``cluster_finetune``): every rank
computes the pruning masks from its identical weights, k-means runs on rank 0 alone and its
codebooks and assignments are broadcast, and both are checked to be bit-identical on every
rank (:func:`same_on_every_rank`) before rank 0 writes the archive.

Without ``WORLD_SIZE`` (or with 1), everything here is a no-op: one process, as before.
"""

from __future__ import annotations

import datetime
import hashlib
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator

import torch
import torch.distributed as dist

from edgesqueeze.errors import EdgesqueezeError


class DistributedError(EdgesqueezeError):
    """A launch that cannot work: a global batch that does not split, a resume with another
    number of processes."""


@dataclass(frozen=True)
class Group:
    """This process's place in the run: rank, number of processes, rank on this machine."""

    rank: int = 0
    world: int = 1
    local_rank: int = 0
    local_world: int = 1
    started_here: bool = False  # this module initialised the process group (and ends it)

    @property
    def active(self) -> bool:
        return self.world > 1

    @property
    def main(self) -> bool:
        """Rank 0: the one process that writes files and logs."""
        return self.rank == 0


def _env_int(name: str, default: int) -> int:
    value = os.environ.get(name)
    try:
        return int(value) if value not in (None, "") else default
    except ValueError:
        raise DistributedError(f"${name}={value!r} is not a number; launch with torchrun") from None


def launched() -> bool:
    """Started by torchrun with more than one process (``WORLD_SIZE`` > 1)."""
    return _env_int("WORLD_SIZE", 1) > 1


def setup(device: torch.device) -> Group:
    """Join the process group torchrun describes (``gloo`` on the CPU, ``nccl`` on CUDA);
    a one-process :class:`Group` when not launched by torchrun."""
    world = _env_int("WORLD_SIZE", 1)
    if world <= 1:
        return Group()
    rank, local = _env_int("RANK", 0), _env_int("LOCAL_RANK", 0)
    local_world = _env_int("LOCAL_WORLD_SIZE", world)
    started = False
    if not dist.is_initialized():
        # torchrun sets them all; a stray WORLD_SIZE alone failed in init_process_group (a traceback)
        missing = [name for name in ("RANK", "MASTER_ADDR", "MASTER_PORT") if not os.environ.get(name)]
        if missing:
            raise DistributedError(
                f"$WORLD_SIZE={world} asks for a {world}-process run, but ${', $'.join(missing)} "
                f"{'is' if len(missing) == 1 else 'are'} not set: launch with torchrun (which sets them), "
                "or unset WORLD_SIZE to run one process")
        try:
            # a long timeout: the other ranks wait while rank 0 alone evaluates and writes (a dead
            # peer is noticed at once anyway, by its closed connection)
            dist.init_process_group(backend="nccl" if device.type == "cuda" else "gloo",
                                    timeout=datetime.timedelta(hours=2))
        except (ValueError, RuntimeError) as exc:  # DistNetworkError / DistStoreError are RuntimeErrors
            first = next((ln.strip() for ln in str(exc).splitlines() if ln.strip()), type(exc).__name__)
            raise DistributedError(
                f"rank {rank} of {world}: cannot join the process group ({first[:200]}); launch with torchrun, "
                "or unset WORLD_SIZE to run one process") from None
        started = True
    return Group(rank, world, local, local_world, started)


def rank_device(device: torch.device, group: Group) -> torch.device:
    """One GPU per process on a machine (``cuda:LOCAL_RANK``); the CPU is shared."""
    if group.active and device.type == "cuda":
        torch.cuda.set_device(group.local_rank)
        return torch.device("cuda", group.local_rank)
    return device


def shard(it: Iterator[tuple[torch.Tensor, torch.Tensor]], group: Group):
    """This rank's slice (every ``world``-th sample, from ``rank``) of each global batch."""
    if not group.active:
        yield from it
        return
    for xb, yb in it:
        yield xb[group.rank::group.world], yb[group.rank::group.world]


def sum_all(group: Group, values: list[float]) -> list[float]:
    """``values`` summed over every rank (the same list on each)."""
    if not group.active:
        return list(values)
    t = torch.tensor(values, dtype=torch.float64)
    dist.all_reduce(t)
    return t.tolist()


def check_batch(group: Group, batch_size: int, what: str) -> None:
    """A global batch that every rank gets an equal slice of."""
    if group.active and batch_size % group.world:
        raise DistributedError(
            f"{what} {batch_size} is the global batch and must split evenly over {group.world} "
            f"processes; use a multiple of {group.world}")


def broadcast_object(group: Group, obj: Any = None) -> Any:
    """Rank 0's ``obj`` on every rank (``obj`` is ignored elsewhere)."""
    if not group.active:
        return obj
    box = [obj if group.main else None]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def digest(tensors: dict[str, torch.Tensor]) -> str:
    """SHA-256 over names, dtypes, shapes and bytes, in key order."""
    h = hashlib.sha256()
    for name in sorted(tensors):
        t = tensors[name].detach().cpu().contiguous()
        h.update(f"{name}:{t.dtype}:{tuple(t.shape)};".encode())
        h.update(t.view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    return h.hexdigest()


def same_on_every_rank(group: Group, tensors: dict[str, torch.Tensor], what: str) -> list[str]:
    """Every rank's :func:`digest` of ``tensors``; raises when any differs from rank 0's.
    One process: a list of its one digest."""
    mine = digest(tensors)
    if not group.active:
        return [mine]
    every: list[Any] = [None] * group.world
    dist.all_gather_object(every, mine)
    differ = [r for r, d in enumerate(every) if d != every[0]]
    if differ:
        raise DistributedError(f"{what} differ between rank 0 and rank(s) {', '.join(map(str, differ))}: "
                               "the processes did not compute the same model (a bug; please report it)")
    return every


def _file_digest(path: Path) -> str | None:
    """SHA-256 of the file at ``path``; None when there is none."""
    from edgesqueeze._io import sha256_file

    try:
        return sha256_file(path)
    except (FileNotFoundError, IsADirectoryError, NotADirectoryError):
        return None


def _ranks(ranks: list[int]) -> str:
    return f"rank{'s' if len(ranks) > 1 else ''} {', '.join(map(str, ranks))}"


def same_file_on_every_rank(group: Group | None, path: Path) -> bool:
    """Whether the state file ``path`` is there to resume from, as every rank sees it: each
    rank looks on its own disk, and on a run over several machines whose output folder is not
    shared they can disagree (one rank resuming, another starting over: different weights, then
    a hang). Raises a DistributedError on every rank unless all see the file with the same bytes
    (SHA-256), or none sees it; nothing has been trained then. One process: whether it is there."""
    if group is None or not group.active:
        return Path(path).is_file()
    mine = _file_digest(Path(path))
    every: list[Any] = [None] * group.world
    dist.all_gather_object(every, mine)
    if len(set(every)) > 1:
        have = [r for r, d in enumerate(every) if d is not None]
        lack = [r for r, d in enumerate(every) if d is None]
        if lack:
            seen = (f"{_ranks(have)} see{'s' if len(have) == 1 else ''} it and "
                    f"{_ranks(lack)} do{'es' if len(lack) == 1 else ''} not")
        else:
            versions: dict[str, list[int]] = {}
            for r, d in enumerate(every):
                versions.setdefault(d, []).append(r)
            seen = "the ranks see different files: " + "; ".join(
                f"{_ranks(rs)} sha256 {d[:12]}..." for d, rs in versions.items())
        raise DistributedError(
            f"{path}: --resume needs every process to read the same state file, but {seen} (each machine looks on "
            "its own disk); put the output folder on storage every machine sees (a shared file system), or copy "
            "the same files to each machine (with c10d rendezvous the machine that gets rank 0, and writes them, "
            "can change between launches); nothing was trained")
    return mine is not None


def ranks_where(group: Group, flag: bool) -> list[int]:
    """The ranks whose ``flag`` is true, the same list on every rank (one process: ``[0]`` or
    ``[]``): for a decision every rank must take alike from what each sees on its own disk."""
    if not group.active:
        return [0] if flag else []
    every: list[Any] = [None] * group.world
    dist.all_gather_object(every, bool(flag))
    return [r for r, f in enumerate(every) if f]


def barrier(group: Group) -> None:
    if group.active:
        dist.barrier()


# the error that says why this process stops (lost contact), from when it is made until the CLI
# has printed it: torchrun's SIGTERM can arrive in between (the process group's teardown, the
# exception's way up), and the handler then prints it, once, instead of exiting without a word
_EXPLAINED: Exception | None = None


def _go_on(out, then: str | None, states: tuple[str, ...] = ("last.pt",)) -> str:
    """How to go on: ``then`` (default: training's ``--resume``) when one of the state files
    ``states`` is in ``out``, else launching again (nothing to resume was written yet)."""
    if not any((Path(out) / name).is_file() for name in states):
        return "launch it again (nothing to --resume from yet: no " + " or ".join(
            f"{out}/{name}" for name in states) + ")"
    return then or (f"continue from the last finished epoch with the same launch plus --resume "
                    f"(state: {out}/last.pt)")


def lost_contact(group: Group, exc: RuntimeError, out, then: str | None = None,
                 states: tuple[str, ...] = ("last.pt",)) -> Exception:
    """What to raise for ``exc``: a one-line DistributedError when it is the process group
    failing (another rank died: gloo's "Connection reset by peer", NCCL errors), else
    ``exc`` itself. ``then`` says how to go on [default: training's ``--resume``], advised
    only when one of the state files ``states`` is in ``out``."""
    text = str(exc)
    comm = isinstance(exc, getattr(dist, "DistError", ())) or any(
        s in text for s in ("gloo/transport", "Connection reset by peer", "NCCL", "Connection closed by peer"))
    if not group.active or not comm:
        return exc
    import re

    global _EXPLAINED
    first = next((ln.strip() for ln in text.splitlines() if ln.strip()), type(exc).__name__)
    first = re.sub(r"^\[[^\]]*\]\s*", "", first).split(". ")[0]  # gloo: "[.../pair.cc:537] Read error ...: ..."
    _EXPLAINED = DistributedError(
        f"rank {group.rank}: lost contact with the other processes of this {group.world}-process run ({first[:160]}); "
        f"one of them failed: fix the cause and {_go_on(out, then, states)}")
    return _EXPLAINED  # torchrun's SIGTERM that follows needs no second line, but this one (stop, below)


def explain_termination(group: Group, out, then: str | None = None, states: tuple[str, ...] = ("last.pt",)) -> None:
    """When one process of the run dies, torchrun stops the others with SIGTERM: each says so
    in one line, and how to go on, before it exits (status 143, as a SIGTERM'd process)."""
    if not group.active:
        return
    import signal
    import sys

    def stop(signum, frame):  # noqa: ARG001 - the signal handler's signature
        from edgesqueeze._io import abandon

        abandon()  # os._exit below runs no cleanup: no half-written file, no lock left behind
        if _EXPLAINED is not None:
            if not getattr(_EXPLAINED, "said", False):  # made, not printed yet: the CLI will not get to it
                print(f"error: {_EXPLAINED}", file=sys.stderr, flush=True)
            os._exit(128 + signum)
        print(f"error: rank {group.rank}: stopped by torchrun (another process of this {group.world}-process run "
              "failed, or the launch was interrupted); "
              f"fix the cause and {_go_on(out, then, states)}", file=sys.stderr, flush=True)
        os._exit(128 + signum)

    signal.signal(signal.SIGTERM, stop)


def teardown(group: Group) -> None:
    if group.started_here and dist.is_initialized():
        dist.destroy_process_group()
