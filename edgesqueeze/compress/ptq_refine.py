"""Post-training compression, steps 4 and 5: bias correction (each layer's mean output per
channel matched to the original's, in network order) and the optional distillation of the
centroids on calibration images. The method: :mod:`edgesqueeze.compress.ptq`."""

from __future__ import annotations


import math
import time
from collections.abc import Callable, Mapping, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from .cluster import ClusteredLayer, codebook_parameters, materialize, share_weights
from ..models.layers import prunable_layers
from .ptq_stats import batch_slices


# ---------------------------------------------------------------------------------------
# 4. Bias correction


def _chain(model: nn.Module, probe: torch.Tensor) -> list[nn.Module]:
    """The model as a list of modules applied in turn (nested ``Sequential``s unrolled),
    checked on ``probe``: ``flatten(chain(probe), 1) == model(probe)`` bit for bit.

    Lets bias correction cache each module's inputs instead of re-running the network from
    the image for every layer. A model that is not such a chain is one element: correct,
    just slower (one pass of the whole network per layer).
    """
    def unroll(m: nn.Module) -> list[nn.Module]:
        if isinstance(m, nn.Sequential):
            return [e for c in m for e in unroll(c)]
        return [m]

    chain = [e for c in model.children() for e in unroll(c)]
    if chain:
        with torch.no_grad():
            h = probe
            try:
                for m in chain:
                    h = m(h)
                if torch.equal(torch.flatten(h, 1), model(probe)):
                    return chain
            except Exception:  # noqa: BLE001 - any failure means "not a plain chain"
                pass
    return [model]


@torch.no_grad()
def correct_biases(model: nn.Module, reference: nn.Module, x: torch.Tensor, *,
                   layers: Sequence[str] | None = None, batch_size: int = 10) -> dict[str, float]:
    """Shift each layer's bias (in place) so its mean output per channel on ``x`` equals
    ``reference``'s; returns the mean absolute shift per layer.

    Layers are corrected in network order, each measured with every upstream layer already
    quantized and corrected, so an early layer's error is not corrected twice downstream.
    Layers without a bias are skipped, and so are layers the forward calls more than once
    (one bias serves every call, and the measurements below stop at a layer's first call).
    ``model`` and ``reference`` must share architecture.
    """
    model.eval()
    reference.eval()
    calls = _call_counts(model, x[:1])  # once: a layer never called (an auxiliary head) has no mean to match
    want = {n for n in (prunable_layers(model) if layers is None else layers) if calls.get(n) == 1}
    chain_q = _chain(model, x[:1])
    chain_r = _chain(reference, x[:1])
    if len(chain_q) != len(chain_r):
        chain_q, chain_r = [model], [reference]
    shifts: dict[str, float] = {}
    hq, hr = x, x
    name_of = {id(m): n for n, m in model.named_modules()}
    # The reference's twin of each layer, by module name (the same architecture; registration
    # order is not trusted: a GraphModule's deepcopy may register its submodules in another order).
    ref_by_name = dict(reference.named_modules())
    ref_of = {id(m): ref_by_name[n] for n, m in model.named_modules() if n in ref_by_name}
    for eq, er in zip(chain_q, chain_r):
        inner = [m for m in eq.modules() if id(m) in name_of and name_of[id(m)] in want and id(m) in ref_of
                 and isinstance(m, (nn.Conv2d, nn.Linear)) and m.bias is not None]
        if inner:
            ref_means = _mean_outputs(er, hr, [ref_of[id(m)] for m in inner], batch_size)
            for j, m in enumerate(inner):
                q_mean = _mean_outputs(eq, hq, [m], batch_size)[0]
                delta = ref_means[j] - q_mean
                m.bias += delta.to(m.bias.dtype)
                shifts[name_of[id(m)]] = float(delta.abs().mean())
        if eq is not model:
            hq = torch.cat([eq(hq[s]) for s in batch_slices(len(hq), batch_size)])
            hr = torch.cat([er(hr[s]) for s in batch_slices(len(hr), batch_size)])
    return shifts


def _call_counts(model: nn.Module, probe: torch.Tensor) -> dict[str, int]:
    """How many times one forward pass of ``model`` on ``probe`` calls each conv / linear
    layer (absent: never, as a training-only auxiliary head; more than once: a block applied
    twice with the same weights)."""
    calls: dict[str, int] = {}
    handles = [m.register_forward_hook(lambda *_, n=n: calls.__setitem__(n, calls.get(n, 0) + 1))
               for n, m in model.named_modules() if isinstance(m, (nn.Conv2d, nn.Linear))]
    try:
        model(probe)
    finally:
        for hd in handles:
            hd.remove()
    return calls


def _mean_outputs(block: nn.Module, h: torch.Tensor, modules: Sequence[nn.Module],
                  batch_size: int) -> list[torch.Tensor]:
    """Per-output-channel mean of each of ``modules``' outputs while ``block`` runs on ``h``.

    The block runs only until every one of ``modules`` has run (a hook stops it there):
    registration order need not be execution order (a lifted graph registers its head first)."""
    sums = [None] * len(modules)
    count = [0] * len(modules)
    seen: set[int] = set()

    class _Stop(Exception):
        pass

    def hook(j):
        def fn(module, inputs, output):
            o = output.detach().double()
            dims = [d for d in range(o.dim()) if d != 1] if o.dim() > 2 else [0]
            s = o.sum(dims)
            sums[j] = s if sums[j] is None else sums[j] + s
            count[j] += o.numel() // o.shape[1]
            seen.add(j)
            if len(seen) == len(modules):
                raise _Stop
        return fn

    handles = [m.register_forward_hook(hook(j)) for j, m in enumerate(modules)]
    try:
        for s in batch_slices(len(h), batch_size):
            seen.clear()
            try:
                block(h[s])
            except _Stop:
                pass
    finally:
        for hd in handles:
            hd.remove()
    if any(sm is None for sm in sums):  # a layer the block never ran: a bug in the caller
        raise RuntimeError("bias correction: a layer did not run in its block")
    return [(sm / c).float() for sm, c in zip(sums, count)]


# ---------------------------------------------------------------------------------------
# 5. Distillation


def _augment(x: torch.Tensor, mode: str, gen: torch.Generator) -> torch.Tensor:
    from ..data.transforms import random_crop, random_hflip

    if mode in ("flip", "flip_crop"):
        x = random_hflip(x, gen)
    if mode == "flip_crop":
        x = random_crop(x, max(1, x.shape[-1] // 14), gen)  # 16 px at 224: a small shift
    return x


def distill(model: nn.Module, reference: nn.Module, assignments: Mapping[str, ClusteredLayer],
            x: torch.Tensor, *, steps: int, lr: float = 1e-4, batch: int = 10,
            train_bias: bool = True, augment: str = "flip_crop", codebook_dtype: str = "float16",
            seed: int = 0, log: Callable[[str], None] | None = None,
            progress: bool = False) -> tuple[dict[str, ClusteredLayer], list[float]]:
    """Fine-tune centroids (and biases) of ``model`` (in place) to match ``reference``'s
    softmax on augmented calibration images; returns the new assignments and the loss curve.

    Labels (which centroid each weight uses) and zeros stay fixed; only codebook values
    move, so the archive's size is unchanged. The model runs in eval mode (no dropout: the
    teacher's exact outputs are the target). A centroid that would round to exactly 0.0
    keeps its old value, so no surviving weight silently becomes pruned.
    """
    model.eval()
    reference.eval()
    share_weights(model, assignments, codebook_dtype=codebook_dtype)
    params = list(codebook_parameters(model).values())
    if train_bias:
        params += [model.get_submodule(n).bias for n in assignments
                   if model.get_submodule(n).bias is not None]
    frozen = [p for p in model.parameters() if p.requires_grad and
              all(p is not q for q in params)]
    for p in frozen:
        p.requires_grad_(False)
    opt = torch.optim.Adam(params, lr=lr)
    gen = torch.Generator().manual_seed(seed)
    losses = []
    t0 = time.perf_counter()
    try:
        for step in range(steps):
            for g in opt.param_groups:
                g["lr"] = lr * 0.5 * (1 + math.cos(math.pi * step / steps))
            idx = torch.randint(0, len(x), (batch,), generator=gen)
            xb = _augment(x[idx], augment, gen)
            with torch.no_grad():
                target = F.log_softmax(reference(xb).float(), 1)
            out = F.log_softmax(model(xb).float(), 1)
            loss = (target.exp() * (target - out)).sum(1).mean()
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            losses.append(float(loss.detach()))
            if log and progress and (step + 1) % max(1, steps // 10) == 0:
                recent = float(np.mean(losses[-max(1, steps // 10):]))
                log(f"ptq: distill step {step + 1}/{steps} KL {recent:.4f} "
                    f"({time.perf_counter() - t0:.0f} s)")
    finally:
        for p in frozen:
            p.requires_grad_(True)
    before = {n: a.codebook for n, a in assignments.items()}
    with torch.no_grad():
        for name, cb in codebook_parameters(model).items():
            rounded = cb.to(torch.float16 if codebook_dtype == "float16" else torch.float32)
            zero = rounded == 0
            if zero.any():
                cb[zero] = before[name].to(cb.device)[zero]
    return materialize(model), losses
