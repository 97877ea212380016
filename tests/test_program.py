"""TorchScript archives and torch.export programs lifted into real Conv2d / Linear /
BatchNorm2d modules (edgesqueeze.models.program), and saved back as skeletons of their kind.

Forms: eager nn.Module, torch.jit.trace, torch.jit.script, a torch.export program saved and
reloaded; a decomposed program; a program exported in train mode. About 25 s on 2 cores,
most of it torch.export's and the ONNX exporter's first calls.
"""

from __future__ import annotations

import copy
import io
import lzma

import pytest
import torch
import torch.nn.functional as F
from torch import fx, nn

from edgesqueeze.errors import ModelError
from edgesqueeze.models.fold import conv_bn_pairs, fold_batchnorm
from edgesqueeze.models.layers import prunable_layers
from edgesqueeze.models.program import (
    lift,
    program_skeleton,
    restore,
    runnable,
    to_exported_program,
)

torch.set_num_threads(1)

# torch.jit.trace/script are deprecated in torch 2.13; deepcopy of a program's module warns
# about pytree's LeafSpec
pytestmark = pytest.mark.filterwarnings("ignore::DeprecationWarning", "ignore::FutureWarning")


class Net(nn.Module):
    """conv-BN-ReLU stem, a residual add around a dilated depthwise conv + BN, a channel
    shuffle (view/transpose), a grouped 1x1 conv and a stem conv without bias, a strided conv,
    a Linear head and a Linear without bias."""

    def __init__(self, cin: int = 3, classes: int = 10) -> None:
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(cin, 8, 3, padding=1, bias=False), nn.BatchNorm2d(8), nn.ReLU())
        self.dw = nn.Conv2d(8, 8, 3, padding=2, dilation=2, groups=8)
        self.bn = nn.BatchNorm2d(8, eps=1e-3, momentum=0.05)
        self.pw = nn.Conv2d(8, 8, 1, groups=2, bias=False)
        self.down = nn.Conv2d(8, 16, 3, stride=2, padding=1)
        self.head = nn.Linear(16, classes)
        self.head2 = nn.Linear(classes, classes, bias=False)

    def forward(self, x):
        x = self.stem(x)
        y = F.relu(self.bn(self.dw(x)))
        n, c, h, w = y.shape
        y = y.view(n, 2, c // 2, h, w).transpose(1, 2).reshape(n, c, h, w)
        x = x + self.pw(y)
        x = self.down(x).mean((2, 3))
        return self.head2(self.head(x))


CONVS = {"stem.0", "dw", "pw", "down"}
LINEARS = {"head", "head2"}
BNS = {"stem.1", "bn"}


class DataDependent(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.c = nn.Conv2d(1, 4, 3)

    def forward(self, x):
        if x.sum() > 0:
            return self.c(x)
        return -self.c(x)


def _net(cin: int, seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    net = Net(cin).eval()
    with torch.no_grad():
        for m in net.modules():
            if isinstance(m, nn.BatchNorm2d):
                m.running_mean.uniform_(-1, 1)
                m.running_var.uniform_(0.5, 2)
                m.weight.uniform_(0.5, 2)
                m.bias.uniform_(-1, 1)
    return net


def _reload(program):
    buf = io.BytesIO()
    torch.export.save(program, buf)
    buf.seek(0)
    return torch.export.load(buf)


@pytest.fixture(scope="module")
def net():
    return _net(3)


@pytest.fixture(scope="module")
def x():
    torch.manual_seed(1)
    return torch.randn(2, 3, 32, 32)


@pytest.fixture(scope="module")
def scripts(net, x):
    return {"trace": torch.jit.trace(net, (x,)), "script": torch.jit.script(net)}


@pytest.fixture(scope="module")
def programs(net, x, scripts):
    """One program per form of the 3x32x32 net."""
    eager = to_exported_program(net, (x,))
    return {"eager": eager, "trace": to_exported_program(scripts["trace"], (x,)),
            "script": to_exported_program(scripts["script"], (x,)), "pt2": _reload(eager)}


FORMS = ["eager", "trace", "script", "pt2"]


@pytest.mark.parametrize("form", FORMS)
def test_runnable_evals_and_keeps_the_program_keys(programs, net, x, form):
    program = programs[form]
    with pytest.raises(NotImplementedError):
        program.module().eval()  # what load_model gets today
    model = runnable(program)
    assert model.eval() is model and model.train(False) is model and not model.training
    assert set(model.state_dict()) == set(program.state_dict)  # incl. num_batches_tracked
    assert set(model.state_dict()) == set(net.state_dict())
    with torch.no_grad():
        torch.testing.assert_close(model(x), net(x), atol=1e-6, rtol=0)
        torch.testing.assert_close(copy.deepcopy(model)(x), net(x), atol=1e-6, rtol=0)


@pytest.mark.parametrize("form", FORMS)
def test_lift_makes_real_layers_with_the_same_tensors(programs, net, x, form):
    model = runnable(programs[form])
    lifted = lift(model)
    assert isinstance(lifted, fx.GraphModule)
    layers = prunable_layers(lifted)
    assert {n for n, m in layers.items() if isinstance(m, nn.Conv2d)} == CONVS
    assert {n for n, m in layers.items() if isinstance(m, nn.Linear)} == LINEARS
    assert {n for n, m in lifted.named_modules() if isinstance(m, nn.BatchNorm2d)} == BNS
    assert list(lifted.state_dict()) and set(lifted.state_dict()) == set(model.state_dict())
    for key, tensor in model.state_dict().items():  # the very tensors, not copies
        assert lifted.state_dict()[key].data_ptr() == tensor.data_ptr(), key
    dw, pw, stem = lifted.dw, lifted.pw, lifted.get_submodule("stem.0")
    assert (dw.groups, dw.dilation, dw.padding, dw.stride) == (8, (2, 2), (2, 2), (1, 1))
    assert (pw.groups, pw.bias, stem.bias, lifted.head2.bias) == (2, None, None, None)
    assert lifted.down.stride == (2, 2) and lifted.bn.eps == pytest.approx(1e-3)
    assert lifted.bn.momentum == pytest.approx(0.05)
    with torch.no_grad():
        torch.testing.assert_close(lifted(x), net(x), atol=1e-6, rtol=0)
        x3 = torch.randn(3, 3, 32, 32)  # the batch stays dynamic
        torch.testing.assert_close(lifted(x3), net(x3), atol=1e-6, rtol=0)


@pytest.mark.parametrize("form", FORMS)
def test_lifted_hooks_edits_fx_fold_deepcopy(programs, net, x, form):
    # program, runnable and lifted model share the source model's tensors (torch.export and
    # TS2EPConverter do not copy them): edit a deep copy
    lifted = copy.deepcopy(lift(runnable(programs[form])))
    seen = []
    handles = [m.register_forward_hook(lambda mod, i, o, name=name: seen.append(name))
               for name, m in prunable_layers(lifted).items()]
    with torch.no_grad():
        before = lifted(x)
    assert sorted(seen) == sorted(CONVS | LINEARS)
    for h in handles:
        h.remove()

    traced = fx.symbolic_trace(lifted)
    assert {n.target for n in traced.graph.nodes if n.op == "call_module"} >= CONVS | LINEARS | BNS
    assert sorted(conv_bn_pairs(lifted)) == [("dw", "bn"), ("stem.0", "stem.1")]
    folded = fold_batchnorm(lifted)
    assert not any(isinstance(m, nn.BatchNorm2d) for m in folded.modules())
    assert "stem.0.bias" in folded.state_dict() and "bn.running_mean" not in folded.state_dict()
    with torch.no_grad():
        torch.testing.assert_close(folded(x), before, atol=1e-5, rtol=0)

    clone = copy.deepcopy(lifted)
    assert set(clone.state_dict()) == set(lifted.state_dict())
    lifted.down.weight.data[0] = 0  # in place, as pruning does
    with torch.no_grad():
        after = lifted(x)
        assert (after - before).abs().max() > 1e-3
        torch.testing.assert_close(clone(x), before, atol=0, rtol=0)  # the copy is independent


def test_lift_decomposed_program(programs, net, x):
    """Core-ATen programs: convolution, _native_batch_norm_legit_no_training + getitem,
    addmm / mm with a permuted weight."""
    decomposed = programs["eager"].run_decompositions()
    targets = {str(n.target) for n in decomposed.graph.nodes}
    assert {"aten.convolution.default", "aten.addmm.default", "aten.mm.default"} <= targets
    lifted = lift(decomposed)
    assert set(prunable_layers(lifted)) == CONVS | LINEARS
    assert {n for n, m in lifted.named_modules() if isinstance(m, nn.BatchNorm2d)} == BNS
    assert not any("addmm" in str(n.target) or "convolution" in str(n.target) for n in lifted.graph.nodes)
    with torch.no_grad():
        torch.testing.assert_close(lifted(x), net(x), atol=1e-6, rtol=0)


def test_small_input_and_untouched_ops():
    """1x8x8 inputs; a layer called twice becomes one module called twice; weights that are
    not an owner's ``weight``/``bias`` stay functional calls."""

    class Odd(nn.Module):
        def __init__(self):
            super().__init__()
            self.net = _net(1, seed=3)
            self.twice = nn.Conv2d(1, 1, 3, padding="same", bias=False)
            self.kernel = nn.Parameter(torch.randn(1, 1, 3, 3))

        def forward(self, x):
            x = self.twice(self.twice(x)) + F.conv2d(x, self.kernel, padding=1)
            return self.net(x)

    model = Odd().eval()
    x = torch.randn(2, 1, 8, 8)
    for src in (model, torch.jit.script(model)):
        lifted = lift(runnable(to_exported_program(src, (x,))))
        layers = prunable_layers(lifted)
        assert set(layers) == {"twice"} | {f"net.{n}" for n in CONVS | LINEARS}
        assert layers["twice"].padding == "same" or layers["twice"].padding == (1, 1)
        calls = [n.target for n in lifted.graph.nodes if n.op == "call_module"]
        assert calls.count("twice") == 2
        assert set(lifted.state_dict()) == set(model.state_dict()) and "kernel" in lifted.state_dict()
        with torch.no_grad():
            torch.testing.assert_close(lifted(x), model(x), atol=1e-6, rtol=0)
            assert len(conv_bn_pairs(lifted)) == 2
            torch.testing.assert_close(fold_batchnorm(lifted)(x), model(x), atol=1e-5, rtol=0)


def test_train_mode_program_becomes_its_eval_function():
    model = _net(1, seed=4).train()
    x = torch.randn(4, 1, 8, 8)
    program = torch.export.export(model, (x,), strict=False)
    run = runnable(program)
    with torch.no_grad():
        out = run(x)
        run(x)
    model.eval()
    with torch.no_grad():
        torch.testing.assert_close(out, model(x), atol=1e-6, rtol=0)
    assert int(run.get_submodule("stem.1").num_batches_tracked) == 0  # not counted in eval
    lifted = lift(run)
    with torch.no_grad():
        torch.testing.assert_close(lifted(x), model(x), atol=1e-6, rtol=0)


def test_torchscript_keys_equal_the_converted_program_keys(scripts, programs):
    for form in ("trace", "script"):
        assert set(scripts[form].state_dict()) == set(programs[form].state_dict)


def test_data_dependent_control_flow_is_one_line():
    x = torch.randn(2, 1, 8, 8)
    with pytest.raises(ModelError) as err:
        to_exported_program(torch.jit.script(DataDependent()), (x,))
    msg = str(err.value)
    assert "\n" not in msg and msg.startswith("TorchScript module DataDependent: cannot be converted")
    assert "torch.cond" in msg and err.value.__cause__ is None and err.value.__suppress_context__
    with pytest.raises(ModelError, match=r"^DataDependent: cannot be converted .*data-dependent") as err:
        to_exported_program(DataDependent(), (x,))
    assert "\n" not in str(err.value)


def test_lifted_exports_again_to_torch_export_and_onnx(programs, net):
    ort = pytest.importorskip("onnxruntime")
    from edgesqueeze.export.onnx import onnx_graph

    lifted = lift(runnable(programs["trace"]))
    x5 = torch.randn(5, 3, 32, 32)
    batch = torch.export.Dim("batch", min=1, max=1 << 16)
    again = torch.export.export(lifted, (x5,), dynamic_shapes=({0: batch},), strict=False)
    assert set(again.state_dict) == set(net.state_dict())
    with torch.no_grad():
        torch.testing.assert_close(again.module()(x5), net(x5), atol=1e-6, rtol=0)
    proto = onnx_graph(lifted, {"input_shape": [3, 32, 32]})  # edgesqueeze's own path
    assert {n.name for n in proto.graph.node if n.op_type in ("Conv", "Gemm", "MatMul")} <= CONVS | LINEARS
    sess = ort.InferenceSession(proto.SerializeToString(), providers=["CPUExecutionProvider"])
    out = sess.run(None, {"input": x5.numpy()})[0]
    with torch.no_grad():
        torch.testing.assert_close(torch.from_numpy(out), net(x5), atol=1e-5, rtol=0)


@pytest.mark.parametrize("form", FORMS)
def test_lifted_layers_name_their_modules_when_exported_again(programs, form):
    """litert-torch names each TFLite tensor after the innermost module of the node's
    ``nn_module_stack`` (``down:2``), and the packer finds a layer's float weights (its
    codebook) by that name. A TorchScript model's program has only a wrapper on that stack:
    its tflite-int8 tensors were ``t27``, and its packed file coded no weight from a
    codebook (a 5-layer digits net: 15,057 B against the .pt2's 12,083 B)."""
    lifted = lift(runnable(programs[form]))
    again = torch.export.export(lifted, (torch.randn(1, 3, 32, 32),), strict=False)
    innermost = {}
    for node in again.graph.nodes:
        if node.op == "call_function" and node.target in (torch.ops.aten.conv2d.default, torch.ops.aten.linear.default):
            innermost[str(node.target)] = innermost.get(str(node.target), set()) | {
                list(node.meta["nn_module_stack"].values())[-1][0]}
    assert innermost[str(torch.ops.aten.conv2d.default)] == CONVS, innermost
    assert innermost[str(torch.ops.aten.linear.default)] == LINEARS, innermost


@pytest.mark.parametrize("kind", ["torchscript", "exported_program"])
def test_skeleton_restore_round_trip(kind, scripts, programs, net, x):
    original = scripts["trace"] if kind == "torchscript" else programs["eager"]
    names = list(original.state_dict() if kind == "torchscript" else original.state_dict)
    skeleton = program_skeleton(kind, original, names)
    assert skeleton == program_skeleton(kind, original, names)  # deterministic
    assert len(lzma.compress(skeleton)) < 8000
    # the skeleton is an archive of its kind, weights zero; restore refuses to leave them so
    raw = (torch.jit.load(io.BytesIO(skeleton)).state_dict() if kind == "torchscript"
           else torch.export.load(io.BytesIO(skeleton)).state_dict)
    assert set(raw) == set(names) and not any(t.any() for t in raw.values())
    with pytest.raises(ModelError, match=f"lack {len(names)} tensors the skeleton zeroed"):
        restore(kind, skeleton, {})

    # compress through the lifted model, save the weights, restore the same kind
    lifted = copy.deepcopy(lift(runnable(programs["trace" if kind == "torchscript" else "eager"])))
    with torch.no_grad():
        lifted.down.weight[:, :4] = 0
    model = restore(kind, skeleton, lifted.state_dict())
    assert isinstance(model, torch.jit.ScriptModule if kind == "torchscript" else fx.GraphModule)
    with torch.no_grad():
        torch.testing.assert_close(model(x), lifted(x), atol=1e-6, rtol=0)
        assert (model(x) - net(x)).abs().max() > 1e-4
    # the original was not touched
    with torch.no_grad():
        ref = original(x) if kind == "torchscript" else original.module()(x)
        torch.testing.assert_close(ref, net(x), atol=1e-6, rtol=0)

    partial = {k: v for k, v in lifted.state_dict().items() if k != "down.weight"}
    with pytest.raises(ModelError, match="lack 1 tensors .*down.weight"):
        restore(kind, skeleton, partial)
    with pytest.raises(ModelError, match="unexpected|does not"):
        restore(kind, skeleton, {**lifted.state_dict(), "extra.weight": torch.zeros(1)})
    with pytest.raises(ModelError, match="down.weight is"):
        restore(kind, skeleton, {**lifted.state_dict(), "down.weight": torch.zeros(1)})
    with pytest.raises(ModelError, match="no state entry 'nope'"):
        program_skeleton(kind, original, ["nope"])


def test_a_program_that_fixes_its_input_shape_is_read_with_it(programs, tmp_path):
    """A .pt2 whose graph fixes C,H,W "did not record its input shape": export asked for
    --input-shape and bench refused it, though `inspect` showed the shape and another
    --input-shape failed the program's own guard."""
    from click.testing import CliRunner

    from edgesqueeze.checkpoint import load_model
    from edgesqueeze.cli import cli
    from edgesqueeze.models.program import program_input_shape

    path = tmp_path / "net.pt2"
    torch.export.save(programs["eager"], str(path))
    assert program_input_shape(programs["eager"]) == [3, 32, 32]
    assert load_model(path).meta["input_shape"] == [3, 32, 32]
    res = CliRunner().invoke(cli, ["export", str(path), "-f", "onnx", "--mean", "0.5", "--std", "0.25",
                                   "--out", str(tmp_path / "e")])
    assert res.exit_code == 0 and (tmp_path / "e" / "net.onnx").is_file(), res.output
    res = CliRunner().invoke(cli, ["bench", str(path), "-b", "1", "--runs", "2", "--warmup", "0"])
    assert res.exit_code == 0, res.output
    dynamic = torch.export.export(Net(3).eval(), (torch.randn(2, 3, 32, 32),),
                                  dynamic_shapes=({2: torch.export.Dim("h", min=8), 3: torch.export.Dim("w", min=8)},))
    assert program_input_shape(dynamic) is None  # a free size is not guessed
