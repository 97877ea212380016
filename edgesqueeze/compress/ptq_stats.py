"""Post-training compression, step 1: sensitivity statistics from calibration images (the
diagonal Fisher of the model's own predictive distribution and each layer's input Hessian)
and the predicted output divergence they give any weight perturbation. The method:
:mod:`edgesqueeze.compress.ptq`."""

from __future__ import annotations


import time
from collections.abc import Callable, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from ..models.layers import conv_input_padded, prunable_layers


# ---------------------------------------------------------------------------------------
# Running a model over calibration images


def batch_slices(n: int, size: int) -> list[slice]:
    return [slice(i, min(i + size, n)) for i in range(0, n, size)]


@torch.no_grad()
def logits_of(model: nn.Module, x: torch.Tensor, batch_size: int) -> torch.Tensor:
    model.eval()
    if len(x) == 0:
        return torch.empty(0)
    return torch.cat([model(x[s]).float() for s in batch_slices(len(x), batch_size)])


def _kl(ref_logits: torch.Tensor, logits: torch.Tensor) -> torch.Tensor:
    """Per-sample ``KL(softmax(ref) || softmax(logits))`` in nats."""
    ref_logp = F.log_softmax(ref_logits.float(), 1)
    return (ref_logp.exp() * (ref_logp - F.log_softmax(logits.float(), 1))).sum(1)


def output_divergence(model: nn.Module, reference: nn.Module | torch.Tensor, x: torch.Tensor, *,
                      batch_size: int = 10) -> dict[str, float]:
    """Mean ``KL(reference || model)`` (nats) and top-1 agreement on images ``x``.

    ``reference`` is the original model or its logits on ``x`` (compute those once when
    scoring many candidates). Agreement is the fraction of images on which both models'
    top-1 class is the same: what a user of the compressed model sees change.
    """
    ref = reference if isinstance(reference, torch.Tensor) else logits_of(reference, x, batch_size)
    out = logits_of(model, x, batch_size)
    return {"kl": float(_kl(ref, out).mean()),
            "agreement": float((ref.argmax(1) == out.argmax(1)).float().mean()), "n": len(x)}


# ---------------------------------------------------------------------------------------
# 1. Sensitivity statistics


def _hessian_ok(m: nn.Module) -> bool:
    """Layers whose input Hessian we collect: Linear, and Conv2d without groups (any padding:
    :func:`conv_input_padded` pads the input as the conv does, then ``unfold``)."""
    if isinstance(m, nn.Linear):
        return True
    return isinstance(m, nn.Conv2d) and m.groups == 1


def _layer_inputs(m: nn.Module, a: torch.Tensor) -> torch.Tensor:
    """The layer's input as rows of its weight's fan-in (``unfold`` for a conv): (rows, D)."""
    if isinstance(m, nn.Conv2d):
        u = F.unfold(conv_input_padded(m, a), m.kernel_size, dilation=m.dilation, padding=0, stride=m.stride)
        return u.transpose(1, 2).reshape(-1, u.shape[1])
    return a.reshape(-1, a.shape[-1])


def calibration_stats(model: nn.Module, x: torch.Tensor, *, fisher_samples: int = 2,
                      seed: int = 0, batch_size: int = 10,
                      log: Callable[[str], None] | None = None,
                      device: torch.device | None = None) -> dict[str, dict[str, torch.Tensor]]:
    """Per-layer statistics of ``model`` on calibration images ``x``; no labels needed.

    ``fisher[name]`` (weight-shaped): the diagonal Fisher of the model's predictive
    distribution, from one forward pass per image, ``fisher_samples`` labels drawn from its
    own softmax (seeded) and one backward pass per label of ``log p(y|x)``, squared gradients
    averaged. Squares must be taken per image (the square of a batch's summed gradient is not
    the sum of squares), hence batch size 1.

    ``hessian[name]`` (D x D, float64, D = fan-in): ``E[u u^T]`` over every position the
    layer's weight is applied at (``u`` = the unfolded input patch), the Hessian of the
    layer's output squared error. Its diagonal is each input's activation energy; it drives
    the error-compensating assignment (:func:`gptq_assign`) and, with the Fisher, the
    predicted KL (:func:`predicted_kl`). Grouped convolutions get none.

    ``device`` (``compress.calibration.device``): where the passes run (the model is moved
    there and back, :func:`edgesqueeze.device.placed`); labels are drawn on the CPU from the
    same seeded generator, and the statistics come back as CPU tensors.
    """
    from edgesqueeze.device import placed

    with placed(model, device) as dev:
        stats = _stats(model, x.to(dev), fisher_samples, seed, batch_size, log)
    return {kind: {n: t.cpu() for n, t in part.items()} for kind, part in stats.items()}


def _stats(model: nn.Module, x: torch.Tensor, fisher_samples: int, seed: int, batch_size: int,
           log: Callable[[str], None] | None) -> dict[str, dict[str, torch.Tensor]]:
    model.eval()
    all_layers = prunable_layers(model)
    names = list(all_layers)
    weights = [all_layers[n].weight for n in names]
    fisher = {n: torch.zeros_like(w, dtype=torch.float64) for n, w in zip(names, weights)}
    gen = torch.Generator().manual_seed(seed)
    was = [w.requires_grad for w in weights]
    for w in weights:
        w.requires_grad_(True)
    t0 = time.perf_counter()
    try:
        for i in range(len(x)):
            logp = F.log_softmax(model(x[i:i + 1]).float(), 1)[0]
            ys = torch.multinomial(logp.detach().exp().cpu(), fisher_samples, replacement=True,
                                   generator=gen)
            for s, y in enumerate(ys.tolist()):
                # allow_unused: a layer the eval forward never calls (a training-only auxiliary
                # head) has no gradient; its Fisher stays 0 (no effect on the output, so the
                # fewest bits), where this was a RuntimeError
                grads = torch.autograd.grad(logp[y], weights, retain_graph=s < fisher_samples - 1,
                                            allow_unused=True)
                for n, g in zip(names, grads):
                    if g is not None:
                        fisher[n] += g.double() ** 2
            if log and (i + 1) % max(1, len(x) // 4) == 0:
                log(f"ptq: fisher {i + 1}/{len(x)} images, {time.perf_counter() - t0:.0f} s")
    finally:
        for w, r in zip(weights, was):
            w.requires_grad_(r)
    denom = max(1, len(x) * fisher_samples)
    hess = _input_hessians(model, x, [n for n in names if _hessian_ok(all_layers[n])],
                           batch_size)
    return {"fisher": {n: (f / denom).float() for n, f in fisher.items()}, "hessian": hess}


@torch.no_grad()
def _input_hessians(model: nn.Module, x: torch.Tensor, names: Sequence[str],
                    batch_size: int) -> dict[str, torch.Tensor]:
    sums: dict[str, torch.Tensor] = {}
    counts: dict[str, int] = {}

    def hook(name):
        def fn(module, inputs):
            u = _layer_inputs(module, inputs[0].detach()).double()
            sums[name] = sums.get(name, 0) + u.T @ u
            counts[name] = counts.get(name, 0) + u.shape[0]
        return fn

    hooks = [model.get_submodule(n).register_forward_pre_hook(hook(n)) for n in names]
    try:
        logits_of(model, x, batch_size)
    finally:
        for h in hooks:
            h.remove()
    return {n: sums[n] / max(1, counts[n]) for n in names if n in sums}  # a layer never called has none


def activation_weights(w: torch.Tensor, hessian: torch.Tensor | None) -> torch.Tensor:
    """Each weight's input energy ``E[u_d^2]`` (the Hessian's diagonal), weight-shaped."""
    if hessian is None:
        return torch.ones_like(w)
    return torch.diagonal(hessian).float().view(1, *w.shape[1:]).expand_as(w).contiguous()


def rank1(f: torch.Tensor) -> torch.Tensor:
    """Rank-1 smoothing of a weight-shaped Fisher: output channel sums times input
    (channel x kernel position) sums over the total, i.e. independent row and column
    effects. One weight's squared gradient over 50 images is noisy; sums over a row or a
    column average thousands of them."""
    m = f.reshape(f.shape[0], -1).double()
    total = m.sum()
    if total <= 0:
        return torch.ones_like(f)
    return (m.sum(1, keepdim=True) * m.sum(0, keepdim=True) / total).float().view_as(f)


def predicted_kl(dw: torch.Tensor, fisher: torch.Tensor,
                 hessian: torch.Tensor | None = None) -> float:
    """Predicted ``KL(p_orig || p_quant)`` (nats) of perturbing one layer's weight by ``dw``.

    Second order around the original weights: ``1/2 dw^T F dw`` with ``F`` the Fisher. With
    the layer's input Hessian ``H`` the Fisher is taken Kronecker-factored (K-FAC):
    ``F ~ G (x) H`` with one output-sensitivity ``G_o = sum_d F_od / sum_d H_dd`` per output
    channel (so ``G_o H_dd`` reproduces the diagonal Fisher on average), giving
    ``1/2 sum_o G_o dw_o^T H dw_o``. Unlike the diagonal form, this sees that errors which
    cancel in the layer's output do no harm, which is what error-compensating assignment
    exploits. Without ``H``: the diagonal ``1/2 sum F dw^2``.
    """
    d = dw.detach().double().reshape(dw.shape[0], -1)
    f = fisher.detach().double().reshape(dw.shape[0], -1)
    if hessian is None:
        return float(0.5 * (f * d ** 2).sum())
    h = hessian.double()
    trace = float(torch.diagonal(h).sum())
    if trace <= 0:
        return 0.0
    g = f.sum(1) / trace
    return float(0.5 * (((d @ h) * d).sum(1) * g).sum())
