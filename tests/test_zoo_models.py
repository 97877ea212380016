"""examples/zoo.py: every model runs eagerly, traces and scripts with TorchScript, exports with
torch.export and traces with torch.fx at 8x8 (digits-like, 1 channel) and 32x32 (CIFAR-like,
3 channels), with the same outputs as eager; the deliberately bad DataDependentNet does not
export. The zoo is loaded by file path, as ``--arch examples/zoo.py:Name`` loads it.
"""

from __future__ import annotations

import importlib.util
import inspect
import json
import re
import warnings
from pathlib import Path

import pytest
import torch
from torch import nn

from edgesqueeze.models import count_macs, count_params

ZOO_PATH = Path(__file__).resolve().parents[1] / "examples" / "zoo.py"


def _load_zoo():
    spec = importlib.util.spec_from_file_location("edgesqueeze_example_zoo", ZOO_PATH)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


zoo = _load_zoo()

CLASSES = ["SqueezeNetBypass", "MobileNetV2", "ShuffleNetV2", "ResNet10", "SEHardSwishNet",
           "DepthwiseSeparableNet", "ConvLinearHead"]
GOOD = CLASSES + ["NoWeightsNet"]  # and mobilenet_v2: MobileNetV2 (test_builder_function_...)
# (in_channels, H = W, num_classes): sklearn digits and CIFAR-10 shapes
SHAPES = [pytest.param((1, 8, 10), id="1x8x8"), pytest.param((3, 32, 7), id="3x32x32")]
WIDTH = 0.25  # small models: the tests are about graph structure, not capacity
ATOL = 1e-5
pytestmark = pytest.mark.filterwarnings(  # torch 2.13 deprecates TorchScript; it still works
    "ignore:`torch.jit.*` is deprecated:DeprecationWarning")


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    # batch-2 toy inputs: more threads only add synchronisation (and fight other test workers)
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def build(name: str, in_channels: int, num_classes: int = 10, seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return getattr(zoo, name)(num_classes=num_classes, in_channels=in_channels,
                              width=WIDTH).eval()


def example(in_channels: int, hw: int, seed: int = 1) -> torch.Tensor:
    return torch.randn(2, in_channels, hw, hw, generator=torch.Generator().manual_seed(seed))


def eager(model: nn.Module, x: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return model(x)


@pytest.mark.parametrize("name", GOOD + ["mobilenet_v2", "DataDependentNet"])
def test_constructor_takes_only_json_keyword_args(name):
    params = inspect.signature(getattr(zoo, name)).parameters
    assert {k: p.default for k, p in params.items()} == {
        "num_classes": 10, "in_channels": 3, "width": 1.0}
    json.dumps({k: p.default for k, p in params.items()})


def test_builder_function_returns_the_class():
    torch.manual_seed(0)
    a = zoo.mobilenet_v2(num_classes=5, in_channels=1, width=0.5)
    torch.manual_seed(0)
    b = zoo.MobileNetV2(num_classes=5, in_channels=1, width=0.5)
    assert type(a) is zoo.MobileNetV2
    assert all(torch.equal(a.state_dict()[k], v) for k, v in b.state_dict().items())


@pytest.mark.parametrize("name", CLASSES)
def test_bad_args_are_refused(name):
    with pytest.raises(ValueError, match="num_classes"):
        getattr(zoo, name)(num_classes=0)
    with pytest.raises(ValueError, match="width"):
        getattr(zoo, name)(width=0)


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("name", GOOD + ["mobilenet_v2"])
def test_forward_shape_fx_and_state_dict_round_trip(name, shape):
    c, hw, k = shape
    m = build(name, c, k)
    x = example(c, hw)
    y = eager(m, x)
    assert y.shape == (2, k) and y.dtype == torch.float32 and torch.isfinite(y).all()
    # deterministic init, and a state_dict round trip into a differently seeded model
    same = build(name, c, k)
    assert all(torch.equal(v, same.state_dict()[n]) for n, v in m.state_dict().items())
    other = build(name, c, k, seed=123)
    other.load_state_dict(m.state_dict())
    assert torch.equal(eager(other, x), y)
    # torch.fx
    gm = torch.fx.symbolic_trace(m)
    torch.testing.assert_close(eager(gm, x), y, atol=ATOL, rtol=0)


def torchscript_run(f, x: torch.Tensor) -> torch.Tensor:
    # the profiling executor's first runs re-optimise the graph: slow, and not what is tested
    with torch.jit.optimized_execution(False):
        return eager(f, x)


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("name", GOOD)
def test_torchscript_trace(name, shape):
    c, hw, k = shape
    m = build(name, c, k)
    x = example(c, hw)
    with warnings.catch_warnings():
        warnings.simplefilter("error", torch.jit.TracerWarning)  # a clean trace, no frozen branch
        traced = torch.jit.trace(m, (x,), check_trace=False)
    x2 = example(c, hw, seed=2)  # not the tracing input
    torch.testing.assert_close(torchscript_run(traced, x), eager(m, x), atol=ATOL, rtol=0)
    torch.testing.assert_close(torchscript_run(traced, x2), eager(m, x2), atol=ATOL, rtol=0)


@pytest.mark.parametrize("name", GOOD)
def test_torchscript_script(name):
    # a scripted graph is shape-generic: one script, both input sizes
    m = build(name, 3)
    scripted = torch.jit.script(m)
    for hw in (8, 32):
        x = example(3, hw)
        torch.testing.assert_close(torchscript_run(scripted, x), eager(m, x), atol=ATOL, rtol=0)


@pytest.mark.parametrize("shape", SHAPES[1:])  # 3x32x32; the any-model tests export at 1x28x28
@pytest.mark.parametrize("name", GOOD)
def test_torch_export(name, shape):
    c, hw, k = shape
    m = build(name, c, k)
    x = example(c, hw)
    ep = torch.export.export(m, (example(c, hw, seed=3),))
    torch.testing.assert_close(eager(ep.module(), x), eager(m, x), atol=ATOL, rtol=0)


def test_data_dependent_net_fails_export_and_fx_and_freezes_a_branch_when_traced():
    m = build("DataDependentNet", 1)
    x = example(1, 8)
    with pytest.raises(Exception, match="data-dependent") as exc:
        torch.export.export(m, (x,))
    assert "x.mean() > 0" in str(exc.value)  # the message points at the offending line
    with pytest.raises(torch.fx.proxy.TraceError, match="control flow"):
        torch.fx.symbolic_trace(m)
    # tracing warns and records only the branch its input took; scripting keeps both
    pos = torch.ones(2, 1, 8, 8) * 10
    with torch.no_grad():
        m.conv.weight.abs_()
        m.conv.bias.zero_()
    with pytest.warns(torch.jit.TracerWarning):
        traced = torch.jit.trace(m, (pos,))
    scripted = torch.jit.script(m)
    torch.testing.assert_close(torchscript_run(traced, pos), eager(m, pos))
    assert not torch.allclose(torchscript_run(traced, -pos), eager(m, -pos))
    torch.testing.assert_close(torchscript_run(scripted, -pos), eager(m, -pos))


def test_no_weights_net_has_nothing_to_compress():
    m = build("NoWeightsNet", 3)
    assert count_params(m) == 0 and len(m.state_dict()) == 0
    assert not any(isinstance(mod, (nn.Conv2d, nn.Linear)) for mod in m.modules())
    x = torch.arange(2 * 3 * 8 * 8, dtype=torch.float32).reshape(2, 3, 8, 8)
    assert eager(m, x).shape == (2, 10)


def _doc_table() -> dict[str, tuple[int, float]]:
    rows = re.findall(r"^    (\w+)\s+([\d,]+)\s+([\d.]+) M\s", zoo.__doc__, re.MULTILINE)
    return {name: (int(p.replace(",", "")), float(macs)) for name, p, macs in rows}


def test_docstring_table_states_params_and_macs_at_32x32():
    table = _doc_table()
    assert set(CLASSES) <= set(table)
    for name in CLASSES:
        torch.manual_seed(0)
        m = getattr(zoo, name)()
        params, macs = table[name]
        assert count_params(m) == params, name
        assert round(count_macs(m, (3, 32, 32)) / 1e6, 1) == macs, name
