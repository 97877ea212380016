"""A user's model saved the ways real training scripts save it (audit, session 37): numpy
scalars and argparse.Namespace beside the weights, a whole module inside a dict,
torch.compile and Lightning name prefixes, EMA entries, a state_dict without
num_batches_tracked or with an 'epoch' among its tensors, NaN weights, half-precision
programs, and weight_norm / spectral_norm layers. Real files through load_model and the CLI;
each result compared with what plain torch computes."""

from __future__ import annotations

import argparse
import copy
import json
import warnings

import numpy as np
import pytest
import torch
from click.testing import CliRunner
from torch import nn
from torch.nn.utils import parametrizations

from edgesqueeze.checkpoint import load_model
from edgesqueeze.cli import cli
from edgesqueeze.errors import CheckpointError, Note


class Net(nn.Module):
    def __init__(self, num_classes: int = 10):
        super().__init__()
        self.conv1 = nn.Conv2d(1, 8, 3, padding=1)
        self.bn1 = nn.BatchNorm2d(8)
        self.conv2 = nn.Conv2d(8, 8, 3, padding=1)
        self.fc = nn.Linear(8, num_classes)

    def forward(self, x):
        x = torch.relu(self.bn1(self.conv1(x)))
        x = torch.relu(self.conv2(x))
        return self.fc(x.mean((2, 3)))


class NetWN(Net):  # torch.nn.utils.parametrizations (a parametrized weight)
    def __init__(self, num_classes: int = 10):
        super().__init__(num_classes)
        self.conv2 = parametrizations.weight_norm(self.conv2)
        self.fc = parametrizations.spectral_norm(self.fc)


class NetOld(Net):  # the older hook-based torch.nn.utils.weight_norm / spectral_norm
    def __init__(self, num_classes: int = 10):
        super().__init__(num_classes)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", FutureWarning)  # "deprecated in favor of parametrizations"
            self.conv2 = torch.nn.utils.weight_norm(self.conv2)
            self.fc = torch.nn.utils.spectral_norm(self.fc)


X = torch.randn(4, 1, 12, 12, generator=torch.Generator().manual_seed(0))


def trained(cls=Net) -> nn.Module:
    torch.manual_seed(0)
    model = cls()
    with torch.no_grad():  # BatchNorm statistics and spectral norm's estimate away from their start
        model.train()
        for _ in range(3):
            model(X)
    return model.eval()


def logits(model: nn.Module) -> torch.Tensor:
    with torch.no_grad():
        return model.eval()(X)


def arch(cls) -> str:
    return f"{__name__}:{cls.__name__}"


def test_numpy_scalars_and_a_namespace_beside_the_weights_load_without_unpickling_code(tmp_path):
    model = trained()
    torch.save({"state_dict": model.state_dict(), "best_acc": np.float64(0.94), "epoch": np.int64(3),
                "history": np.arange(3.0), "args": argparse.Namespace(lr=0.1, arch="net")}, tmp_path / "m.pt")
    loaded = load_model(tmp_path / "m.pt", arch=arch(Net))  # trust_pickle=False: the safe unpickler
    assert torch.equal(logits(loaded.model), logits(model))


def test_a_whole_module_inside_a_dict_names_its_class_and_loads_when_trusted(tmp_path):
    model = trained()
    torch.save({"model": model, "epoch": 3}, tmp_path / "m.pt")
    with pytest.raises(CheckpointError, match=rf"holds a pickled Python object \({__name__}\.Net\); "):
        load_model(tmp_path / "m.pt")
    loaded = load_model(tmp_path / "m.pt", trust_pickle=True)  # "unpickled a dict, not an nn.Module" before
    assert torch.equal(logits(loaded.model), logits(model))
    torch.save(copy.deepcopy(model).half(), tmp_path / "half.pt")  # as YOLO saves its modules
    with pytest.warns(Note, match="weights are float16: converted to float32"):
        half = load_model(tmp_path / "half.pt", trust_pickle=True)
    assert next(half.model.parameters()).dtype == torch.float32
    assert torch.allclose(logits(half.model), logits(model), atol=0.05)


@pytest.mark.parametrize("prefix", ["_orig_mod.", "model.", "module._orig_mod.", "_orig_mod.module."])
def test_a_prefix_on_every_name_is_read_without_it(tmp_path, prefix):
    model = trained()
    sd = {prefix + k: v for k, v in model.state_dict().items()}
    torch.save({"state_dict": sd, "hyper_parameters": {"lr": 0.1}}, tmp_path / "m.pt")  # Lightning's layout
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        loaded = load_model(tmp_path / "m.pt", arch=arch(Net))
    assert torch.equal(logits(loaded.model), logits(model))
    if prefix != "module.":
        assert any("every weight's name starts with" in str(w.message) for w in caught)


def test_a_prefix_on_some_names_only_is_still_an_error(tmp_path):
    sd = trained().state_dict()
    torch.save({("x." + k if k.startswith("conv") else k): v for k, v in sd.items()}, tmp_path / "m.pt")
    with pytest.raises(Exception, match=r"missing 4 tensors \(first: conv1.weight\)"):
        load_model(tmp_path / "m.pt", arch=arch(Net))


def test_bookkeeping_among_the_tensors_a_missing_batch_count_and_ema_entries(tmp_path):
    model = trained()
    sd = model.state_dict()
    torch.save({**sd, "epoch": 3}, tmp_path / "flat.pt")
    with pytest.warns(Note, match="entries 'epoch' are not tensors"):
        assert torch.equal(logits(load_model(tmp_path / "flat.pt", arch=arch(Net)).model), logits(model))
    torch.save({k: v for k, v in sd.items() if not k.endswith("num_batches_tracked")}, tmp_path / "old.pt")
    assert torch.equal(logits(load_model(tmp_path / "old.pt", arch=arch(Net)).model), logits(model))
    torch.save({"ema": sd}, tmp_path / "ema.pt")
    assert torch.equal(logits(load_model(tmp_path / "ema.pt", arch=arch(Net)).model), logits(model))
    other = trained(Net).state_dict()
    other["fc.bias"] = other["fc.bias"] + 1
    torch.save({"state_dict": sd, "state_dict_ema": other}, tmp_path / "timm.pt")
    with pytest.warns(Note, match="averaged \\(EMA\\) weights under 'state_dict_ema'; read are those under "
                                  "'state_dict'"):
        assert torch.equal(logits(load_model(tmp_path / "timm.pt", arch=arch(Net)).model), logits(model))


@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
def test_weights_holding_nan_or_infinity_are_refused_naming_the_tensor(tmp_path, bad):
    sd = trained().state_dict()
    sd["conv2.weight"][0, 0, 0, 0] = bad
    torch.save(sd, tmp_path / "m.pt")
    res = CliRunner().invoke(cli, ["eval", str(tmp_path / "m.pt"), "--arch", arch(Net), "--data", "digits"])
    assert res.exit_code == 2, res.output  # eval scored 10% with loss nan, exit 0
    assert "conv2.weight holds 1 NaN or infinite value of 576" in res.output


@pytest.mark.parametrize("kind", ["torchscript", "torch.export"])
def test_a_half_precision_program_says_so(tmp_path, kind):
    model = trained().half()
    if kind == "torchscript":
        torch.jit.save(torch.jit.trace(model, X[:1].half()), str(tmp_path / "m.pt"))
        path = tmp_path / "m.pt"
    else:
        path = tmp_path / "m.pt2"
        torch.export.save(torch.export.export(model, (X[:1].half(),)), str(path))
    # blamed the data before: "does not run on 'digits' images ...; pass the dataset it was trained on"
    with pytest.raises(CheckpointError, match="with float16 weights; edgesqueeze feeds, compresses and exports "
                                              "float32 models"):
        load_model(path)


@pytest.mark.parametrize("cls", [NetWN, NetOld])
def test_weight_norm_and_spectral_norm_layers_become_plain_weights_that_compute_the_same(tmp_path, cls):
    """Pruning skipped them and folding wrote into the computed weight (a 10% model, exit 0);
    clustering, PTQ and PT2E failed with tracebacks."""
    model = trained(cls)
    torch.save(model.state_dict(), tmp_path / "m.pt")
    with pytest.warns(Note, match=r"conv2 \(WeightNorm\), fc \(SpectralNorm\): each weight made the plain tensor"):
        loaded = load_model(tmp_path / "m.pt", arch=arch(cls))
    assert sorted(n for n, _ in loaded.model.named_parameters() if "conv2" in n or "fc" in n) == [
        "conv2.bias", "conv2.weight", "fc.bias", "fc.weight"]
    assert all(p.requires_grad for p in loaded.model.parameters())
    torch.testing.assert_close(logits(loaded.model), logits(model), rtol=1e-5, atol=1e-5)
    # a lossless .esq of it (plain names) reads back into the class, which builds them parametrized
    res = CliRunner().invoke(cli, ["compress", str(tmp_path / "m.pt"), "--arch", arch(cls), "--data", "digits",
                                   "--out", str(tmp_path / "c")])
    assert res.exit_code == 0, res.output
    again = load_model(tmp_path / "c" / "model.esq", arch=arch(cls))
    torch.testing.assert_close(logits(again.model), logits(model), rtol=1e-5, atol=1e-5)


class TwoInputs(Net):
    def forward(self, x, scale):  # a second input the images do not give (TorchScript: no super())
        x = torch.relu(self.bn1(self.conv1(x)))
        return self.fc(torch.relu(self.conv2(x)).mean((2, 3))) * scale


class ScaleDefault(Net):
    def forward(self, x, scale: float = 1.0):
        return super().forward(x) * scale


@pytest.mark.parametrize("form", ["state_dict", "torchscript", "torch.export"])
def test_a_model_with_two_inputs_is_told_so_not_sent_to_another_dataset(tmp_path, form):
    """A forward(x, scale) was "does not run on 'digits' images of shape [1, 28, 28] (missing
    1 required positional argument...); pass the dataset it was trained on", and for a .pt2
    the reason was torch's half sentence about input tree specs. The data was never the
    problem: now the line says the forward takes two inputs and what to do. A second input
    with a default is one image input, and runs."""
    model = TwoInputs()
    model.load_state_dict(trained().state_dict())
    model.eval()
    path = tmp_path / ("m.pt2" if form == "torch.export" else "m.pt")
    extra: list[str] = []
    if form == "state_dict":
        torch.save(model.state_dict(), path)
        extra = ["--arch", arch(TwoInputs)]
    elif form == "torchscript":
        torch.jit.save(torch.jit.script(model), str(path))
    else:
        torch.export.save(torch.export.export(model, (X[:1], torch.tensor(2.0))), str(path))
    for command in (["eval", str(path), *extra, "--data", "digits", "--limit", "20"],
                    ["export", str(path), *extra, "--data", "digits", "-f", "onnx", "--out", str(tmp_path / "e")]):
        res = CliRunner().invoke(cli, command)
        said = [ln for ln in res.output.splitlines() if ln.startswith("error:")]
        assert res.exit_code == 2 and len(said) == 1, res.output
        assert said[0].endswith(f"{path}: its forward takes 2 inputs (x, scale); edgesqueeze runs models on one "
                                "image tensor: wrap it in a module whose forward(x) takes the images alone and "
                                "supplies the rest, and save that wrapper"), res.output
    assert not (tmp_path / "e").exists()
    torch.save(trained().state_dict(), tmp_path / "d.pt")
    res = CliRunner().invoke(cli, ["eval", str(tmp_path / "d.pt"), "--arch", arch(ScaleDefault), "--data", "digits",
                                   "--limit", "20"])
    assert res.exit_code == 0, res.output


@pytest.mark.parametrize("kind", ["torchscript", "torch.export"])
def test_lossless_compress_of_a_program_takes_its_input_shape_or_asks_for_one(tmp_path, kind):
    """`compress ts.pt` with no --data said "has no Conv2d or Linear layer, so there is nothing
    to prune": a program's layers are found by running it, which needs a shape. --input-shape
    gives one (it was ignored); without one, the line says to pass it or --data."""
    model = trained().eval()
    path = tmp_path / ("m.pt" if kind == "torchscript" else "m.pt2")
    if kind == "torchscript":
        torch.jit.save(torch.jit.script(model), str(path))
    else:
        torch.export.save(torch.export.export(model, (X[:1],)), str(path))
    res = CliRunner().invoke(cli, ["compress", str(path), "--out", str(tmp_path / "a")])
    if kind == "torchscript":
        assert res.exit_code == 2 and "shows its layers only when run: pass --data NAME or --input-shape C,H,W" \
            in res.output, res.output
    else:  # a torch.export program whose graph fixes its input shape: that shape
        assert res.exit_code == 0 and "weights bit-identical to the source: yes" in res.output, res.output
    res = CliRunner().invoke(cli, ["compress", str(path), "--input-shape", "1,12,12", "--out", str(tmp_path / "b")])
    assert res.exit_code == 0 and "weights bit-identical to the source: yes" in res.output, res.output


class _DictNet(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(1, 4, 3)
        self.fc = nn.Linear(4, 10)

    def forward(self, batch: dict[str, torch.Tensor]):
        return self.fc(torch.relu(self.conv(batch["image"])).mean((2, 3)))


@pytest.mark.parametrize("kind", ["torchscript", "torch.export"])
def test_a_model_taking_a_dict_gets_the_wrapper_advice_not_pass_data(tmp_path, kind):
    """A forward({"image": x}): "does not run on 'digits' images ... (Trying to flatten user
    inputs with exported input tree spec:); pass the dataset it was trained on (--data)", with
    --data given and the reason cut at its colon."""
    net = _DictNet().eval()
    path = tmp_path / ("m.pt" if kind == "torchscript" else "m.pt2")
    if kind == "torchscript":
        torch.jit.save(torch.jit.script(net), str(path))
    else:
        torch.export.save(torch.export.export(net, ({"image": torch.zeros(2, 1, 28, 28)},)), str(path))
    res = CliRunner().invoke(cli, ["eval", str(path), "--data", "digits", "--mean", "0.3", "--std", "0.3"])
    assert res.exit_code == 2 and "its forward takes a structure (a dict, list or tuple), not one image tensor" \
        in res.output and "pass the dataset" not in res.output, res.output


def test_lossless_compress_of_a_model_pruned_by_torch_prune_keeps_its_values(tmp_path):
    """torch.nn.utils.prune multiplies by a mask, leaving -0.0 where it pruned a negative weight;
    the archive stores a zero by its position, so it decodes +0.0: a lossless compress refused
    it ("changed a weight (a bug)") after a line saying the weights were bit-identical."""
    from torch.nn.utils import prune

    model = trained().eval()
    for m in model.modules():
        if isinstance(m, (nn.Conv2d, nn.Linear)):
            prune.l1_unstructured(m, "weight", amount=0.5)
            prune.remove(m, "weight")
    negative = sum(int(((p == 0) & torch.signbit(p)).sum()) for p in model.state_dict().values())
    assert negative > 0
    path = tmp_path / "pruned.pt"
    torch.jit.save(torch.jit.script(model), str(path))
    res = CliRunner().invoke(cli, ["compress", str(path), "--input-shape", "1,12,12", "--out", str(tmp_path / "c")])
    assert res.exit_code == 0, res.output
    assert f"weights bit-identical: yes but for the sign of {negative:,} zeros (-0.0 stored as 0.0, the same value)" \
        in res.output, res.output
    report = json.loads((tmp_path / "c" / "report.json").read_text())
    assert report["lossless"]["negative_zeros_stored_as_zeros"] == negative
