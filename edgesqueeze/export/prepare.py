"""Float-model transforms before INT8 quantization, shared by ``onnx-int8`` and ``tflite-int8``.

Each takes a float model and calibration inputs (normalized, as the model is fed) and returns
a *copy* that computes the same function (or, for GPTQ, one whose weights already sit on the
int8 grid), so that the runtime's own quantizer (onnxruntime's ``quantize_static``,
litert-torch's PT2E) then loses less:

- :func:`equalize_activations` evens out the per-channel ranges of the activations that get
  quantized per tensor, moving the imbalance into the next conv's weights (quantized per
  output channel, and rounded by GPTQ). Measured on ImageNet SqueezeNet 1.0: the largest
  single gain for both formats (``benchmarks/results/onnx_int8.json``, ``tflite_int8.json``).
- :func:`equalize_cross_layer` (Nagel et al. 2019) evens out *weight* ranges instead: the
  opposite direction, which did not help SqueezeNet with per-channel weights.
- :func:`gptq_round` rounds the weights onto the per-channel symmetric int8 grid with GPTQ.
- :func:`augment_calibration` adds flipped / cropped copies of calibration images.
- :func:`space_to_depth_stem` rewrites a stride-2 first conv over few channels as a 2x2
  space-to-depth and a stride-1 conv over four times the channels (the same function), for
  int8 kernels that take input channels in blocks of 8 (tflite-int8's XNNPACK).

Written here rather than taken from a library: onnxruntime and litert-torch offer neither
activation equalization nor GPTQ for convolutions (AIMET has CLE but is a CUDA-first
framework we do not depend on).
"""

from __future__ import annotations

import copy
import warnings
from collections.abc import Sequence
from typing import Any

import numpy as np
import torch
from torch import nn

from edgesqueeze.errors import ExportError, Note
from edgesqueeze.export._common import first_line as _first_line
from edgesqueeze.export._common import under
from edgesqueeze.models.layers import conv_input_padded

__all__ = ["SpaceToDepthConv", "augment_calibration", "equalize_activations", "equalize_cross_layer", "find_stem",
           "gptq_round", "space_to_depth_stem"]


def _run_with_input_hooks(model: nn.Module, calib: torch.Tensor, batch_size: int, hooks: dict,
                          device: torch.device | None = None) -> None:
    """Run ``calib`` through ``model`` in batches with forward pre-hooks (module -> hook) on,
    on ``device`` (:func:`edgesqueeze.device.placed`: the model goes there and back to the
    CPU; each batch moves there; the hooks' sums stay on it until the caller takes them)."""
    from edgesqueeze.device import placed

    handles = [m.register_forward_pre_hook(h) for m, h in hooks.items()]
    try:
        with placed(model, device) as dev, torch.no_grad():
            for i in range(0, len(calib), batch_size):
                model(calib[i:i + batch_size].to(dev))
    finally:
        for h in handles:
            h.remove()


def gptq_round(model: nn.Module, calib: torch.Tensor, *, damp: float = 0.01,
               batch_size: int = 32, skip: Sequence[str] = (), qmax: int = 127,
               only: Sequence[str] = (), shared: bool = False,
               device: torch.device | None = None) -> nn.Module:
    """A copy of ``model`` whose conv / linear weights sit on the per-channel symmetric int8
    grid the quantizer will use, rounded by GPTQ (Frantar et al. 2022) instead of to nearest.

    Per layer, with ``X`` the layer's float input on ``calib`` (unfolded for a conv) and
    ``H = X X^T``: quantize one input column at a time and spread its rounding error over the
    columns not yet quantized, weighted by ``H^-1``, so that ``W_q X`` stays close to ``W X``
    on the data rather than ``W_q`` close to ``W`` entry by entry. The grid is the one
    ``PerChannelMinMaxObserver`` picks (scale ``max|w_row| / 127``): each row's largest entry
    is kept, so the observer finds the same scale and re-quantizing is exact (BatchNorm
    folding scales a row, which keeps it on a grid). Grouped convs are left as they are.

    Example: weights [0.30, 0.26] (scale 0.3/127) on inputs that always move together
    (``x1 = x2``): nearest rounding errs on both; GPTQ pushes the second entry's rounding to
    cancel the first's, so the *sum* (what the data sees) is kept.

    ``skip``: module names (a name covers its children) left as they are: layers that stay
    float in the file, whose weights need no grid. ``qmax``: the grid's largest level, 127
    for full-range int8, 64 for onnxruntime's ``reduce_range`` (7-bit, scale ``max|w_row| / 64``).
    ``only``: if given, the module names (a name covers its children) rounded by GPTQ; the
    others stay as they are (the quantizer rounds them to nearest).
    ``shared``: the model is weight-shared (pruning plus k-means: each layer holds a few
    distinct values); then each layer keeps them. A weight is rounded onto the int8 images of
    the layer's own values on its row's grid, and takes the value whose image GPTQ chose, so
    the layer still holds only its codebook (a packed file codes it as compactly) and the
    int8 file holds the integers GPTQ chose. Zeros (pruned weights) stay zero. On the
    ImageNet SqueezeNet's stem this kept the file's size and took its int8 error's held-out
    KL from 0.046 to 0.029 (benchmarks/notes.md, session 23).
    ``device``: where the Hessians are accumulated (the model's forward passes); the column
    loop runs on the CPU.
    """
    if isinstance(qmax, bool) or not isinstance(qmax, int) or not 1 <= qmax <= 127:
        raise ExportError(f"gptq: qmax must be an integer in 1..127, got {qmax!r}")
    model = copy.deepcopy(model).eval()
    layers = {n: m for n, m in model.named_modules()
              if ((isinstance(m, nn.Conv2d) and m.groups == 1) or isinstance(m, nn.Linear))
              and not under(n, skip) and (not only or under(n, only))}
    hess: dict[str, torch.Tensor] = {}

    def collect(name: str, mod: nn.Module):
        def hook(_, args):
            x = args[0].detach().float()  # float32 products, float64 running sum
            if isinstance(mod, nn.Conv2d):
                x = conv_input_padded(mod, x)
                x = torch.nn.functional.unfold(x, mod.kernel_size, mod.dilation, 0, mod.stride)
                x = x.transpose(0, 1).reshape(x.shape[1], -1)
            else:
                x = x.reshape(-1, x.shape[-1]).t()
            hess[name] = hess.get(name, 0) + (x @ x.t()).double()
        return hook

    _run_with_input_hooks(model, calib, batch_size, {m: collect(n, m) for n, m in layers.items()}, device)
    hess = {n: h.cpu() for n, h in hess.items()}
    with torch.no_grad():
        for name, mod in layers.items():
            if name in hess:
                w = mod.weight
                rounder = _gptq_layer_shared if shared else _gptq_layer
                w.copy_(rounder(w.detach().flatten(1).double(), hess[name], damp, qmax).view_as(w).to(w.dtype))
    return model


def _inverse_factor(h: torch.Tensor, damp: float) -> torch.Tensor:
    """The upper Cholesky factor of ``(h + damp * mean(diag h) I)^-1`` that GPTQ's column loop
    walks; inputs that are always zero get a unit diagonal (their weights do not matter)."""
    k = h.shape[0]
    h = h.clone()
    dead = torch.diag(h) == 0
    h[dead, dead] = 1.0
    h += damp * torch.diag(h).mean() * torch.eye(k, dtype=h.dtype)
    return torch.linalg.cholesky(torch.cholesky_inverse(torch.linalg.cholesky(h)), upper=True)


def _gptq_layer_shared(w: torch.Tensor, h: torch.Tensor, damp: float, qmax: int = 127) -> torch.Tensor:
    """GPTQ on one (rows, K) weight matrix of a weight-shared layer: each weight rounded to
    the nearest of the layer's own values as its row's symmetric int8 grid (``max|row| /
    qmax``) holds them, the rounding error spread as in :func:`_gptq_layer`. Returns float
    weights that are all layer values: ``round(w / scale)`` of each is the integer GPTQ chose.
    Only values within the row's range are candidates (a larger one would change its scale),
    and none whose ratio to the scale is a rounding tie (runtimes round those differently);
    each row's largest entry stays put (it fixes the scale) and zeros stay zero."""
    rows, k = w.shape
    w = w.clone()
    r = torch.arange(rows)
    values = torch.unique(w)
    anchor_col = w.abs().argmax(1)
    anchor_val = w[r, anchor_col].clone()
    rowmax = anchor_val.abs()
    scale = torch.where(rowmax > 0, rowmax / qmax, torch.ones_like(rowmax))
    ratio = values[None, :] / scale[:, None]
    grid = torch.clamp(torch.round(ratio), -qmax, qmax) * scale[:, None]
    # candidates: values within the row's range (a larger one would move its scale), and not
    # within 1e-3 of a rounding tie (x.5 steps: onnxruntime divides, torch multiplies by the
    # inverse scale, and the two round such a value to different integers; float16 codebooks
    # and power-of-two-ish scales make exact ties common)
    tie = ((ratio - torch.floor(ratio)) - 0.5).abs() < 1e-3
    ok = (values[None, :].abs() <= rowmax[:, None]) & ~tie
    ok[r, torch.searchsorted(values, anchor_val)] = True  # the anchor's own value, tie or not
    grid = torch.where(ok, grid, torch.full_like(grid, float("inf")))
    zero = w == 0
    hinv = _inverse_factor(h, damp)
    out = torch.zeros_like(w)
    for i in range(k):
        col = w[:, i]
        j = torch.argmin((grid - col[:, None]).abs(), dim=1)
        q = torch.where(zero[:, i], 0.0, grid[r, j])
        out[:, i] = torch.where(zero[:, i], 0.0, values[j])
        err = (col - q) / hinv[i, i]
        w[:, i:] -= err[:, None] * hinv[i, i:][None, :]
        w[:, i] = q
        later = anchor_col > i
        w[r[later], anchor_col[later]] = anchor_val[later]
    out[r, anchor_col] = anchor_val  # itself, not another value with the same integer: the scale holds
    return out


def _gptq_layer(w: torch.Tensor, h: torch.Tensor, damp: float, qmax: int = 127) -> torch.Tensor:
    """GPTQ on one (rows, K) weight matrix with input second moments ``h`` (K, K), onto the
    symmetric grid ``-qmax..qmax`` of each row. Zeros (pruned weights) stay zero, their share
    of the error spread over the columns after them, as SparseGPT keeps a mask: the error
    compensation wrote into pruned positions (a pruned, not weight-shared digits model's
    tflite-int8 file had 2,650 of its 52,574 pruned weights non-zero, and packed larger)."""
    rows, k = w.shape
    zero = w == 0
    w = w.clone()
    scale = w.abs().amax(1) / qmax
    scale[scale == 0] = 1.0
    # each row's largest entry stays put: it fixes the scale the observer will find
    anchor_col = w.abs().argmax(1)
    anchor_val = w[torch.arange(rows), anchor_col].clone()
    hinv = _inverse_factor(h, damp)
    r = torch.arange(rows)
    for i in range(k):
        col = w[:, i]
        q = torch.where(zero[:, i], 0.0, torch.clamp(torch.round(col / scale), -qmax, qmax) * scale)
        err = (col - q) / hinv[i, i]
        w[:, i:] -= err[:, None] * hinv[i, i:][None, :]
        w[:, i] = q
        later = anchor_col > i
        w[r[later], anchor_col[later]] = anchor_val[later]
    return w


def augment_calibration(images: np.ndarray, copies: int, *, seed: int = 0,
                        min_scale: float = 0.6) -> np.ndarray:
    """``images`` (uint8 NCHW) followed by ``copies`` augmented versions of each: a random
    horizontal flip and a random crop of ``min_scale``..1 of the side, resized back
    (bilinear). More *kinds* of input for activation ranges, from the same images."""
    if copies < 0:
        raise ExportError(f"augment: copies must be >= 0, got {copies}")
    if copies == 0 or len(images) == 0:
        return images
    rng = np.random.default_rng(seed)
    n, _, h, w = images.shape
    x = torch.from_numpy(np.ascontiguousarray(images)).float()
    out = [images]
    for _ in range(copies):
        batch = []
        for i in range(n):
            s = rng.uniform(min_scale, 1.0)
            ch, cw = max(1, round(h * s)), max(1, round(w * s))
            top, left = rng.integers(0, h - ch + 1), rng.integers(0, w - cw + 1)
            crop = x[i:i + 1, :, top:top + ch, left:left + cw]
            crop = torch.nn.functional.interpolate(crop, size=(h, w), mode="bilinear", align_corners=False)
            if rng.random() < 0.5:
                crop = crop.flip(3)
            batch.append(crop)
        out.append(torch.cat(batch).round().clamp(0, 255).to(torch.uint8).numpy())
    return np.concatenate(out)


_PASS_MODULES = (nn.ReLU, nn.MaxPool2d, nn.Dropout, nn.Identity, nn.AvgPool2d, nn.AdaptiveAvgPool2d)
_PASS_FUNCTIONS = {torch.relu, torch.nn.functional.relu, torch.nn.functional.max_pool2d,
                   torch.nn.functional.dropout, torch.nn.functional.avg_pool2d,
                   torch.nn.functional.adaptive_avg_pool2d}


def equalize_cross_layer(model: nn.Module, *, iterations: int = 4) -> nn.Module:
    """Cross-layer equalization (Nagel et al. 2019) on a copy of ``model``.

    For a conv P whose every output channel k reaches only other convs (through ReLU, max /
    average pooling, dropout and channel concatenation, which all commute with a positive
    per-channel scale), divide P's row k (and bias) by ``s_k`` and multiply the consumers'
    input column k by ``s_k``, with ``s_k = sqrt(r1_k / r2_k)`` (r1: max |P row k|, r2: max |
    consumer columns k|): both then span ``sqrt(r1 r2)``. The function is unchanged (up to
    float rounding); weight and activation ranges per channel become more even. SqueezeNet
    has no BatchNorm; a model with BatchNorm should have it folded first (it is opaque here).

    Example: P row ranges [4, 1], consumer column ranges [1, 4] give s = [2, 0.5]: after
    scaling both layers have range 2 in both channels.
    """
    if iterations < 1:
        raise ExportError(f"equalize: iterations must be >= 1, got {iterations}")
    model = copy.deepcopy(model).eval()
    pairs = _equalization_groups(model, "cross-layer equalization")
    modules = dict(model.named_modules())
    with torch.no_grad():
        for _ in range(iterations):
            for producer, consumers in pairs.items():
                conv = modules[producer]
                w = conv.weight
                r1 = w.abs().flatten(1).amax(1).double()
                r2 = torch.zeros_like(r1)
                for name, k0, j0, n in consumers:
                    cw = modules[name].weight
                    r2[k0:k0 + n] = torch.maximum(r2[k0:k0 + n], cw[:, j0:j0 + n].abs().transpose(0, 1).flatten(1).amax(1).double())
                s = torch.where((r1 > 0) & (r2 > 0), torch.sqrt(r1 / r2.clamp_min(1e-30)), torch.ones_like(r1))
                _rescale(conv, consumers, modules, s)
    return model


def _equalization_groups(model: nn.Module, what: str) -> dict[str, list[tuple[str, int, int, int]]]:
    """producer conv -> [(consumer conv, producer channel start, consumer channel start, n)]
    for producers whose every output channel ends in plain convs (see equalize_cross_layer);
    ``what`` names the caller in the error raised when torch.fx cannot trace ``model``."""
    try:
        graph = torch.fx.symbolic_trace(model).graph
    except Exception as exc:  # noqa: BLE001 - fx raises many types for untraceable Python
        raise ExportError(f"{what} cannot trace {type(model).__name__} with "
                          f"torch.fx ({_first_line(exc)})") from None
    modules = dict(model.named_modules())

    def plain_conv(m) -> bool:
        return isinstance(m, nn.Conv2d) and m.groups == 1

    segs: dict[Any, list[tuple[str, int, int]]] = {}  # node -> [(producer, start, n)] in channel order
    escaped: set[str] = set()
    consumers: dict[str, list[tuple[str, int, int, int]]] = {}
    for node in graph.nodes:
        mod = modules.get(node.target) if node.op == "call_module" else None
        inputs = [a for a in node.all_input_nodes if a in segs]
        if plain_conv(mod):
            src = node.args[0]
            if src in segs:
                j = 0
                for producer, start, n in segs[src]:
                    consumers.setdefault(producer, []).append((node.target, start, j, n))
                    j += n
            segs[node] = [(node.target, 0, mod.out_channels)]
            continue
        passes = (isinstance(mod, _PASS_MODULES) or (node.op == "call_function" and node.target in _PASS_FUNCTIONS))
        if passes and node.args and node.args[0] in segs and len(inputs) == 1:
            segs[node] = segs[node.args[0]]
            continue
        if (node.op == "call_function" and node.target is torch.cat and node.args
                and isinstance(node.args[0], (list, tuple))
                and (node.args[1] if len(node.args) > 1 else node.kwargs.get("dim", 0)) in (1, -3)
                and all(a in segs for a in node.args[0])):
            segs[node] = [s for a in node.args[0] for s in segs[a]]
            continue
        for a in inputs:  # anything else reads these channels: their producers cannot rescale
            escaped.update(p for p, _, _ in segs[a])
    return {p: c for p, c in consumers.items() if p not in escaped}


def equalize_activations(model: nn.Module, calib: torch.Tensor, *, alpha: float = 0.7,
                         batch_size: int = 32, floor: float = 1e-3,
                         device: torch.device | None = None, found: dict | None = None) -> nn.Module:
    """Activation equalization on a copy of ``model``: per-channel activation ranges of each
    quantized tensor made more even, the imbalance moved into the consuming conv's weights.

    An INT8 file quantizes each activation tensor with *one* scale, set by its largest
    channel; a channel that never exceeds a tenth of that gets a tenth of the levels. For
    a conv P whose every output channel k reaches only other convs C (through ReLU, pooling
    and channel concatenation, which commute with a positive per-channel scale; the same
    pairs as :func:`equalize_cross_layer`), with ``a_k`` the largest ``|x_k|`` C sees on
    ``calib`` and ``R`` the largest over all of C's input channels:
    ``s_k = max(a_k / R, floor) ** alpha``; P's row k and bias are divided by ``s_k`` and C's
    input column k multiplied by it. The function is unchanged (up to float rounding). With
    ``alpha = 1`` every channel spans ``R``; the consumer's weights for small channels shrink
    by as much, and the per-output-channel weight grid then holds them more coarsely (GPTQ
    absorbs some of that), so ``alpha`` trades activation error against weight error.
    Cross-layer equalization is the opposite move (weight ranges even, activations not).

    Example: C's input channels peak at [8, 1]: with ``alpha = 1``, s = [1, 0.125]; P's
    second row is multiplied by 8, so both channels peak at 8 and use the full int8 range,
    and C's second input column is divided by 8.

    ImageNet SqueezeNet 1.0, onnxruntime QDQ with GPTQ weights, 2-fold over the 100 shared
    images (2 splits): KL to fp32 0.0246 without, 0.0152 at alpha 0.5, 0.0135 at 0.7, 0.0183
    at 1.0 (``benchmarks/results/onnx_int8.json``). ``device``: where the ranges are measured
    (the model's forward passes); the rescaling is done on the CPU. ``found``: a dict that
    gets ``"pairs"``, the number of convs rescaled (0: the model has no such pair, and is
    returned BatchNorm-folded but otherwise unchanged, with a :class:`~edgesqueeze.errors.Note`).
    """
    if not 0 < alpha <= 1:
        raise ExportError(f"equalize_activations: alpha must be in (0, 1], got {alpha}")
    from edgesqueeze.models.fold import fold_batchnorm

    # BatchNorm between P and C is opaque to the pairing: every model `train` writes had no pair,
    # and was returned unchanged while its files recorded the alpha (the export folds it anyway)
    model = fold_batchnorm(copy.deepcopy(model).eval()).eval()
    pairs = _equalization_groups(model, "activation equalization")
    if found is not None:
        found["pairs"] = len(pairs)
    if not pairs:
        warnings.warn(f"activation equalization: {type(model).__name__} has no conv whose outputs reach only "
                      "other convs (through ReLU, pooling or concatenation), so there is nothing to rescale; "
                      "the file is written without it (equalize_activations: 0 in its metadata)", Note,
                      stacklevel=2)
        return model
    modules = dict(model.named_modules())
    amax: dict[str, torch.Tensor] = {}

    def record(name: str):
        def hook(_, args):
            m = args[0].detach().abs().transpose(0, 1).flatten(1).amax(1).double()
            amax[name] = torch.maximum(amax[name], m) if name in amax else m
        return hook

    consumers = sorted({c for cs in pairs.values() for c, *_ in cs})
    _run_with_input_hooks(model, calib, batch_size, {modules[c]: record(c) for c in consumers}, device)
    amax = {n: a.cpu() for n, a in amax.items()}
    with torch.no_grad():
        for producer, cons in pairs.items():
            conv = modules[producer]
            s = torch.ones(conv.out_channels, dtype=torch.float64)
            for name, k0, j0, n in cons:
                a = amax[name]
                top = a.max()
                if top > 0:  # consumers reading P's channels through different pools: the last decides
                    s[k0:k0 + n] = (a[j0:j0 + n] / top).clamp_min(floor) ** alpha
            _rescale(conv, cons, modules, s)
    return model


def _rescale(conv: nn.Module, consumers, modules: dict[str, nn.Module], s: torch.Tensor) -> None:
    """Divide ``conv``'s output channel k (row and bias) by ``s_k``, multiply the consumers'
    matching input columns by it: the composition computes the same (in place, no grad)."""
    w = conv.weight
    w.div_(s.view(-1, *[1] * (w.dim() - 1)).to(w.dtype))
    if conv.bias is not None:
        conv.bias.div_(s.to(conv.bias.dtype))
    for name, k0, j0, n in consumers:
        cw = modules[name].weight
        cw[:, j0:j0 + n].mul_(s[k0:k0 + n].view(1, -1, *[1] * (cw.dim() - 2)).to(cw.dtype))


# ---------------------------------------------------------------------------------------
# Space-to-depth stem


def explicit_padding(model: nn.Module) -> nn.Module:
    """``model``, or a copy of it in which each ``nn.Conv2d`` with ``padding="same"`` or
    ``"valid"`` pads by numbers instead (the same function): such a conv is an
    ``aten.conv2d.padding`` call, which litert-torch's PT2E quantizer does not annotate, so a
    tflite-int8 file kept it float32 between DEQUANTIZE and QUANTIZE without a word. "same"
    with an odd total padding (an even kernel) pads unevenly, which no number says: left as it
    is (the export's float-op note names it)."""
    def numeric(m: nn.Module):
        if not isinstance(m, nn.Conv2d) or not isinstance(m.padding, str) or m.padding_mode != "zeros":
            return None
        if m.padding == "valid":
            return (0, 0)
        total = [d * (k - 1) for d, k in zip(m.dilation, m.kernel_size)]
        return tuple(t // 2 for t in total) if all(t % 2 == 0 for t in total) else None

    if not any(numeric(m) is not None for m in model.modules()):
        return model
    model = copy.deepcopy(model)
    for m in model.modules():
        pad = numeric(m)
        if pad is not None:
            m.padding = pad
            m._reversed_padding_repeated_twice = [p for p in reversed(pad) for _ in range(2)]
    return model


def find_stem(model: nn.Module, input_channels: int) -> str | None:
    """The name of ``model``'s first plain conv over the input: the first ``Conv2d`` (in
    module order) taking ``input_channels`` channels, without groups; None if there is none."""
    return next((n for n, m in model.named_modules()
                 if isinstance(m, nn.Conv2d) and m.in_channels == input_channels and m.groups == 1), None)


class SpaceToDepthConv(nn.Module):
    """A stride-2 ``Conv2d`` computed as a 2x2 space-to-depth and a stride-1 conv.

    ``conv`` (stride 2, zero padding ``p``, kernel ``kh x kw``, ``C`` input channels) equals
    zero-padding by ``p``, a 2x2 space-to-depth in ``nn.PixelUnshuffle(2)``'s order (``H x W
    x C`` -> ``H/2 x W/2 x 4C``, channel ``4c + 2dy + dx`` holding pixel ``(2i + dy, 2j + dx)``
    of channel ``c``) and a
    stride-1 conv with kernel ``ceil(kh / 2) x ceil(kw / 2)`` whose weights are rearranged:
    ``W'[o, 4c + 2dy + dx, a, b] = W[o, c, 2a + dy, 2b + dx]``, zero where ``2a + dy`` or
    ``2b + dx`` passes the kernel. The same products are summed (plus zeros), so an int8
    file computes the same integers; only float sums change order.

    Why: XNNPACK's int8 conv kernels without VNNI (AVX2-only x86) or the ARM dot product
    (Raspberry Pi 4) take input channels in blocks of 8, so a 3-channel stem does 8 channels'
    work; 12 channels pad to 16. ImageNet SqueezeNet 1.0's tflite-int8 file went from 1.32x
    to 1.01x its fp32 file's instructions on the AVX2 path, 1.09x to 0.82x on a Pi 4's, and
    from 2.06x to 2.65x fp32's speed on an AVX-512 VNNI x86 (benchmarks/notes.md, sessions
    25 and 26). Children ``pad`` (only with padding) and ``conv``: the rearranged weight is
    ``<name>.conv.weight``. The space-to-depth is written as two reshape / permute steps of
    at most 5 dimensions with the batch left free (-1): litert-torch turns them into int8
    TRANSPOSEs that XNNPACK runs, in a file that still resizes to any batch, and that TFLite
    Micro (whose TRANSPOSE takes at most 5 dimensions) runs too. (``nn.PixelUnshuffle``, the
    same arithmetic, converted with the batch of 1 folded into its reshapes: a batch-1 file;
    one 6-d permute was as fast but TFLite Micro refuses it; four strided slices and a
    concatenation ran 2.6x slower, outside XNNPACK: benchmarks/notes.md, session 26.)
    """

    def __init__(self, conv: nn.Conv2d) -> None:
        super().__init__()
        why = space_to_depth_refusal(conv)
        if why:
            raise ExportError(f"space-to-depth stem: {why}")
        from edgesqueeze.format.packed import space_to_depth  # the rearrangement the packed format decodes

        w = conv.weight.detach()
        o, c = w.shape[:2]
        ohwi = space_to_depth(w.permute(0, 2, 3, 1).cpu().numpy(), 2)  # OIHW -> OHWI, rearranged
        w2 = torch.from_numpy(ohwi).permute(0, 3, 1, 2).to(w)  # back to OIHW
        ah, aw = w2.shape[2:]
        ph, pw = conv.padding
        if ph or pw:
            self.pad = nn.ZeroPad2d((pw, pw, ph, ph))
        self.conv = nn.Conv2d(4 * c, o, (ah, aw), 1, bias=conv.bias is not None, device=w.device, dtype=w.dtype)
        with torch.no_grad():
            self.conv.weight.copy_(w2)
            if conv.bias is not None:
                self.conv.bias.copy_(conv.bias.detach())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if hasattr(self, "pad"):
            x = self.pad(x)
        c, h, w = x.shape[1:]
        x = x.reshape(-1, c, h // 2, 2, w).permute(0, 1, 3, 2, 4)  # [n, c, dy, h/2, w]
        x = x.reshape(-1, 2 * c, h // 2, w // 2, 2).permute(0, 1, 4, 2, 3)  # [n, 2c + dy, dx, h/2, w/2]
        return self.conv(x.reshape(-1, 4 * c, h // 2, w // 2))


def space_to_depth_refusal(conv: nn.Module, input_hw: Sequence[int] | None = None) -> str | None:
    """Why ``conv`` (on inputs of height and width ``input_hw``) cannot be rewritten as a
    :class:`SpaceToDepthConv`, or None."""
    if not isinstance(conv, nn.Conv2d):
        return f"it is a {type(conv).__name__}, not a Conv2d"
    if tuple(conv.stride) != (2, 2):
        return f"its stride is {tuple(conv.stride)}; the rewrite is for a stride-2 conv"
    if conv.groups != 1 or tuple(conv.dilation) != (1, 1):
        return "it has groups or dilation; the rewrite is for a plain conv"
    if isinstance(conv.padding, str) or conv.padding_mode != "zeros":
        return f"its padding is {conv.padding!r} ({conv.padding_mode}); the rewrite takes numeric zero padding"
    if input_hw is not None:
        h, w = (int(s) + 2 * p for s, p in zip(input_hw, conv.padding))
        if h % 2 or w % 2:
            return f"its padded input is {h}x{w}; the rewrite needs an even height and width"
    return None


def space_to_depth_stem(model: nn.Module, name: str) -> nn.Module:
    """A copy of ``model`` with its conv ``name`` replaced by a :class:`SpaceToDepthConv`
    (the same function; ExportError if the conv cannot be rewritten)."""
    model = copy.deepcopy(model)
    parent_name, _, leaf = name.rpartition(".")
    parent = model.get_submodule(parent_name) if parent_name else model
    conv = model.get_submodule(name)
    try:
        new = SpaceToDepthConv(conv)
    except ExportError as exc:
        raise ExportError(f"{name}: {exc}") from None
    setattr(parent, leaf, new.train(conv.training))
    return model
