"""Float-model transforms before INT8 quantization (edgesqueeze.export.prepare): activation
equalization and GPTQ's ``skip``, on real torch modules (no runtime needed)."""

from __future__ import annotations

import pytest
import torch
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
