"""Float-model transforms before INT8 quantization (edgesqueeze.export.prepare): activation
equalization and GPTQ's ``skip``, on real torch modules (no runtime needed)."""

from __future__ import annotations

import pytest
import torch
from hypothesis import assume, given, settings
from hypothesis import strategies as st
from torch import nn

from edgesqueeze.errors import ExportError
from edgesqueeze.export.prepare import equalize_activations, gptq_round
from edgesqueeze.models import build_model


def _uneven_squeezenet(seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    model = build_model("squeezenet1_0", num_classes=17).eval()
    with torch.no_grad():  # uneven channel scales, as trained nets have
        for m in model.modules():
            if isinstance(m, nn.Conv2d):
                m.weight.mul_(torch.rand(m.out_channels, 1, 1, 1) * 10 + 0.05)
                m.bias.mul_(0.1)
    return model


def _input_ranges(model: nn.Module, x: torch.Tensor, names) -> dict[str, torch.Tensor]:
    mods = dict(model.named_modules())
    out = {}
    hooks = [mods[n].register_forward_pre_hook(
        lambda _, a, n=n: out.__setitem__(n, a[0].abs().transpose(0, 1).flatten(1).amax(1))) for n in names]
    with torch.no_grad():
        model(x)
    for h in hooks:
        h.remove()
    return out


def test_worked_example():
    """The consumer's inputs peak at [8, 1]: alpha 1 gives s = [1, 1/8]."""
    p = nn.Conv2d(1, 2, 1)
    c = nn.Conv2d(2, 1, 1, bias=False)
    with torch.no_grad():
        p.weight.copy_(torch.tensor([8.0, 1.0]).view(2, 1, 1, 1))
        p.bias.zero_()
        c.weight.copy_(torch.tensor([1.0, 1.0]).view(1, 2, 1, 1))
    model = nn.Sequential(p, nn.ReLU(), c)
    x = torch.linspace(0, 1, 11).view(11, 1, 1, 1)
    eq = equalize_activations(model, x, alpha=1.0)
    assert eq[0].weight.flatten().tolist() == pytest.approx([8.0, 8.0])
    assert eq[2].weight.flatten().tolist() == pytest.approx([1.0, 0.125])
    half = equalize_activations(model, x, alpha=0.5)  # halfway, on a log scale
    assert half[2].weight.flatten().tolist() == pytest.approx([1.0, 8 ** -0.5])
    assert p.weight.flatten().tolist() == [8.0, 1.0]  # the input model is untouched


def test_keeps_the_function_and_evens_out_the_quantized_tensors():
    model = _uneven_squeezenet()
    calib, test = torch.randn(4, 3, 67, 67), torch.randn(2, 3, 67, 67)
    eq = equalize_activations(model, calib, alpha=1.0, batch_size=2)
    with torch.no_grad():
        a, b = model(test), eq(test)
    assert (a - b).abs().max() <= 1e-4 * a.abs().max()
    # every Fire's squeeze reads the previous concatenation; expand1x1 reads the squeeze
    names = [f"features.{i}.{part}" for i in (3, 4, 5, 7, 8, 9, 10, 12) for part in ("squeeze", "expand1x1")]
    before, after = _input_ranges(model, calib, names), _input_ranges(eq, calib, names)
    for n in names:
        spread = lambda r: float(r.max() / r.clamp_min(1e-12).median())  # noqa: E731
        assert spread(after[n]) < spread(before[n]), n
        # alpha 1: each channel spans the tensor's largest (floor 1e-3 aside), on calib
        live = before[n] > 1e-3 * before[n].max()
        assert torch.allclose(after[n][live], after[n].max().expand(int(live.sum())), rtol=1e-3), n


def test_skips_channels_that_escape_to_anything_but_convs():
    # conv a's channels reach a Linear through flatten, conv b's reach the output: neither is
    # a conv -> conv pair, so nothing may be rescaled
    model = nn.Sequential(nn.Conv2d(3, 4, 1), nn.ReLU(), nn.Flatten(), nn.Linear(4 * 5 * 5, 2))
    eq = equalize_activations(model, torch.randn(8, 3, 5, 5))
    assert all(torch.equal(a, b) for a, b in zip(model.state_dict().values(), eq.state_dict().values()))


def test_bad_alpha_and_untraceable_models_are_refused():
    model = nn.Sequential(nn.Conv2d(1, 2, 1), nn.ReLU(), nn.Conv2d(2, 1, 1))
    for alpha in (0.0, -0.5, 1.5):
        with pytest.raises(ExportError, match="alpha must be in"):
            equalize_activations(model, torch.randn(2, 1, 3, 3), alpha=alpha)

    class Branchy(nn.Module):
        def forward(self, x):
            return x if float(x.sum()) > 0 else -x  # data-dependent control flow: fx cannot trace

    with pytest.raises(ExportError, match="cannot trace Branchy"):
        equalize_activations(Branchy(), torch.randn(2, 1, 3, 3))


def test_gptq_skip_leaves_named_layers_as_they_are():
    model = _uneven_squeezenet(1)
    x = torch.randn(4, 3, 67, 67)
    rounded = gptq_round(model, x, skip=["features.0", "features.3"])
    mods, orig = dict(rounded.named_modules()), dict(model.named_modules())
    for name in ("features.0", "features.3.squeeze", "features.3.expand3x3"):
        assert torch.equal(mods[name].weight, orig[name].weight), name
    w = mods["features.4.squeeze"].weight
    steps = w / (w.abs().flatten(1).amax(1).view(-1, 1, 1, 1) / 127)
    assert not torch.equal(w, orig["features.4.squeeze"].weight)
    assert torch.allclose(steps, steps.round(), atol=1e-3)  # on the int8 grid


def _shared(model: nn.Module, levels: int = 24, prune: float = 0.3, seed: int = 0) -> nn.Module:
    """``model`` with each conv pruned by magnitude and its other weights snapped to ``levels``
    values drawn from them: what pruning plus weight sharing leave (an .esq's layers)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, nn.Conv2d):
                w = m.weight
                w[w.abs() <= w.abs().flatten().kthvalue(int(prune * w.numel())).values] = 0
                nz = w[w != 0]
                book = nz[torch.randperm(nz.numel(), generator=g)[:levels]]
                idx = (w.reshape(-1, 1) - book.reshape(1, -1)).abs().argmin(1)
                w.copy_(torch.where(w == 0, w, book[idx].reshape(w.shape)))
    return model


def _int8(w: torch.Tensor) -> torch.Tensor:
    """The integers onnxruntime's symmetric per-channel int8 gives ``w``."""
    scale = w.abs().flatten(1).amax(1).clamp_min(1e-30).view(-1, *[1] * (w.dim() - 1)) / 127
    return torch.round(w / scale), scale


def _output_error(conv: nn.Conv2d, w: torch.Tensor, x: torch.Tensor) -> float:
    with torch.no_grad():
        return float((nn.functional.conv2d(x, w, None, conv.stride, conv.padding)
                      - nn.functional.conv2d(x, conv.weight, None, conv.stride, conv.padding)).square().mean())


def test_gptq_on_a_shared_model_keeps_each_layers_values_and_beats_nearest():
    """shared=True: every weight stays one of its layer's values (zeros stay zero, each row's
    largest entry and so its int8 scale stay put), and the int8 weights GPTQ chose reproduce
    the layer's output on the calibration images better than nearest rounding does."""
    model = _shared(_uneven_squeezenet(2))
    x = torch.randn(6, 3, 67, 67, generator=torch.Generator().manual_seed(3))
    rounded = gptq_round(model, x, shared=True, only=["features.0"])
    conv, new = dict(model.named_modules())["features.0"], dict(rounded.named_modules())["features.0"].weight
    old = conv.weight
    assert set(torch.unique(new).tolist()) <= set(torch.unique(old).tolist())
    assert torch.equal(new == 0, old == 0)
    assert torch.equal(new.abs().flatten(1).amax(1), old.abs().flatten(1).amax(1))
    assert not torch.equal(new, old)
    q_new, s = _int8(new)
    q_old, _ = _int8(old)
    assert _output_error(conv, q_new * s, x) < _output_error(conv, q_old * s, x)
    # only= left every other layer alone
    others = [n for n, m in model.named_modules() if isinstance(m, nn.Conv2d) and n != "features.0"]
    assert all(torch.equal(dict(rounded.named_modules())[n].weight, dict(model.named_modules())[n].weight)
               for n in others)


def test_gptq_without_shared_moves_weights_off_the_codebook():
    """The plain rounding (a model that is not weight-shared) is free to use every int8 level:
    on a shared layer it leaves the layer's values, which is what shared=True prevents."""
    model = _shared(_uneven_squeezenet(2))
    x = torch.randn(6, 3, 67, 67, generator=torch.Generator().manual_seed(3))
    new = dict(gptq_round(model, x, only=["features.0"]).named_modules())["features.0"].weight
    old = dict(model.named_modules())["features.0"].weight
    assert torch.unique(new).numel() > 2 * torch.unique(old).numel()


def test_gptq_keeps_a_pruned_models_zeros_and_still_beats_nearest():
    """A pruned model that is not weight-shared (compress with prune only, or a pruned.pt):
    GPTQ's error compensation wrote into the pruned positions (2,650 of 52,574 zeros made
    non-zero in a digits tflite-int8 file, which then packed larger). Zeros stay zero now, and
    the rounding still reproduces the layer's output better than nearest rounding does."""
    model = _uneven_squeezenet(2)
    layer = "features.5.expand3x3"  # 128 x 288 inputs: enough columns for the compensation to add up
    conv = dict(model.named_modules())[layer]
    with torch.no_grad():  # 60% of the weights pruned, by magnitude
        w = conv.weight
        w[w.abs() < w.abs().flatten().kthvalue(int(0.6 * w.numel())).values] = 0
    x = torch.randn(6, 3, 67, 67, generator=torch.Generator().manual_seed(3))
    new = dict(gptq_round(model, x, only=[layer]).named_modules())[layer].weight
    old = conv.weight
    assert (old == 0).float().mean() > 0.55 and torch.equal(new == 0, old == 0)
    assert not torch.equal(new, old)
    q_new, s = _int8(new)
    q_old, _ = _int8(old)
    assert torch.equal(q_new * s, new) or torch.allclose(q_new * s, new)  # on the grid
    with torch.no_grad():  # the layer's own input on the images
        inputs = {}
        hook = conv.register_forward_pre_hook(lambda _, a: inputs.setdefault("x", a[0]))
        model(x)
        hook.remove()
    assert _output_error(conv, q_new * s, inputs["x"]) < _output_error(conv, q_old * s, inputs["x"])


# --- space-to-depth stem --------------------------------------------------------------------

@settings(max_examples=40, deadline=None)
@given(k=st.integers(1, 8), k2=st.integers(1, 8), pad=st.integers(0, 3), cin=st.integers(1, 4),
       half=st.integers(2, 9), bias=st.booleans(), seed=st.integers(0, 1000))
def test_space_to_depth_conv_computes_the_conv(k, k2, pad, cin, half, bias, seed):
    """Any stride-2 conv (kernel, zero padding, channels; an even padded input) and its
    space-to-depth rewrite give the same outputs, up to float summation order."""
    from edgesqueeze.export.prepare import SpaceToDepthConv

    torch.manual_seed(seed)
    size = 2 * half - 2 * pad  # the padded input is 2 * half wide: even
    assume(size >= 1 and size + 2 * pad >= max(k, k2))
    conv = nn.Conv2d(cin, 5, (k, k2), 2, pad, bias=bias)
    x = torch.randn(2, cin, size, size + 2)
    with torch.no_grad():
        want, got = conv(x), SpaceToDepthConv(conv)(x)
    assert got.shape == want.shape
    assert torch.allclose(got, want, atol=1e-5, rtol=1e-5)


def test_space_to_depth_weights_are_the_packed_formats_rearrangement():
    """The rewritten conv's weight (OIHW, made OHWI) is ``format.packed.space_to_depth`` of the
    original's: the packer codes the original and the decoder rearranges it the same way."""
    import numpy as np

    from edgesqueeze.export.prepare import SpaceToDepthConv
    from edgesqueeze.format.packed import space_to_depth

    torch.manual_seed(0)
    conv = nn.Conv2d(3, 96, 7, 2)
    new = SpaceToDepthConv(conv)
    ohwi = conv.weight.detach().numpy().transpose(0, 2, 3, 1)
    assert np.array_equal(space_to_depth(ohwi, 2), new.conv.weight.detach().numpy().transpose(0, 2, 3, 1))
    assert tuple(new.conv.weight.shape) == (96, 12, 4, 4) and torch.equal(new.conv.bias, conv.bias)


@pytest.mark.parametrize("conv, hw, match", [
    (nn.Conv2d(3, 8, 3, 1), None, r"stride is \(1, 1\)"),
    (nn.Conv2d(3, 9, 3, 2, groups=3), None, "groups or dilation"),
    (nn.Conv2d(3, 8, 3, 2, dilation=2), None, "groups or dilation"),
    (nn.Conv2d(3, 8, 3, 2, padding=1, padding_mode="reflect"), None, "reflect"),
    (nn.Conv2d(3, 8, 7, 2), (225, 224), "225x224"),
    (nn.Conv2d(3, 8, 7, 2, padding=3), (224, 224), None),
    (nn.Linear(3, 8), None, "not a Conv2d"),
])
def test_space_to_depth_refusals_say_why(conv, hw, match):
    from edgesqueeze.export.prepare import space_to_depth_refusal

    why = space_to_depth_refusal(conv, hw)
    assert (why is None) if match is None else (why is not None and __import__("re").search(match, why)), why


def test_space_to_depth_stem_replaces_a_copy():
    from edgesqueeze.export.prepare import SpaceToDepthConv, find_stem, space_to_depth_stem

    model = build_model("squeezenet1_0", num_classes=10).eval()
    assert find_stem(model, 3) == "features.0"
    new = space_to_depth_stem(model, "features.0")
    assert isinstance(new.features[0], SpaceToDepthConv) and isinstance(model.features[0], nn.Conv2d)
    x = torch.randn(1, 3, 224, 224)
    with torch.no_grad():
        assert torch.allclose(new(x), model(x), atol=1e-4)
    with pytest.raises(ExportError, match=r"features.3.squeeze: .*stride is \(1, 1\)"):
        space_to_depth_stem(model, "features.3.squeeze")


_PADDED = [dict(padding=1, padding_mode="reflect"), dict(padding=(0, 1), padding_mode="replicate"),
           dict(padding=2, padding_mode="circular", dilation=2), dict(padding="same"),
           dict(padding="same", padding_mode="reflect"), dict(padding="valid", stride=2)]


@pytest.mark.parametrize("kw", _PADDED, ids=lambda kw: "-".join(map(str, kw.values())))
def test_gptq_and_ptq_statistics_take_any_conv_padding(kw):
    """A user's conv with ``padding_mode='reflect'`` (or ``'same'`` padding) made every
    tflite-int8 export (GPTQ, the default) fail with "gptq: convs with non-zero padding modes
    are not supported" (no layer named; the same model as a .pt2, whose reflect pad is a
    separate op, exported), and compress.ptq silently weighted such a layer without its input
    Hessian. The patches unfold sees are now the conv's own."""
    from edgesqueeze.compress.ptq_stats import calibration_stats

    torch.manual_seed(0)
    kernel = (1, 3) if kw.get("padding") == (0, 1) else 3
    conv = nn.Conv2d(4, 6, kernel, **kw).eval()
    x = torch.randn(3, 4, 9, 9)
    model = nn.Sequential(conv, nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(6, 3)).eval()
    rounded = gptq_round(model, x)
    step = conv.weight.abs().amax((1, 2, 3), keepdim=True) / 127
    w = rounded[0].weight
    torch.testing.assert_close(torch.round(w / step) * step, w)  # on the int8 grid
    assert not torch.equal(w, conv.weight)
    stats = calibration_stats(model, x, fisher_samples=1)
    assert set(stats["hessian"]) == {"0", "4"}, sorted(stats["hessian"])
    from edgesqueeze.models.layers import conv_input_padded

    with torch.no_grad():
        u = nn.functional.unfold(conv_input_padded(conv, x), conv.kernel_size, conv.dilation, 0, conv.stride)
        y = (conv.weight.flatten(1) @ u).view_as(conv(x))
        torch.testing.assert_close(y + conv.bias.view(1, -1, 1, 1), conv(x), atol=1e-5, rtol=0)


@pytest.mark.parametrize("dataset, says", [("digits", "measured: digits training images"),
                                           ("imagenet-sample", "standard: ImageNet's usual mean and std")])
def test_export_records_where_the_normalization_of_a_plain_model_came_from(dataset, says):
    """export recorded "measured: imagenet-sample training images" for ImageNet's standard
    values, which it had just printed it used (that dataset has no training images)."""
    from pathlib import Path

    from edgesqueeze.data import load_dataset
    from edgesqueeze.errors import DataError
    from edgesqueeze.export import _describe_with

    try:
        ds = load_dataset(dataset)
    except DataError as exc:  # the ImageNet sample lives in ../shared, beside the repository
        pytest.skip(f"needs {dataset}: {exc}")
    c = ds.input_shape[0]
    model = nn.Sequential(nn.Conv2d(c, 4, 3, stride=4), nn.AdaptiveAvgPool2d(1), nn.Flatten(),
                          nn.Linear(4, ds.num_classes)).eval()
    meta: dict = {}
    _describe_with(meta, model, Path("plain.pt"), dataset, None, log=lambda _m: None)
    assert meta["normalization_source"].startswith(says) and meta["mean"] == list(ds.mean)
