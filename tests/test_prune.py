"""Tests for edgesqueeze.compress.prune: masks, schedule, config, fine-tuning with masks."""

from __future__ import annotations

import itertools
import json
import math
from pathlib import Path

import pytest
import torch
from torch import nn

from edgesqueeze.compress.prune import (Pruner, apply, choose_sparsities, existing_masks, layer_stats,
                                        magnitude_mask, resolve_auto, sensitivity_scan)
from edgesqueeze.config.compress import PruneConfig, polynomial_sparsity
from edgesqueeze.models.layers import prunable_layers
from edgesqueeze.errors import RecipeError
from edgesqueeze.models import build_model

SHARED = Path(__file__).resolve().parents[1].parent / "shared"



@pytest.fixture(autouse=True, scope="module")
def one_thread():
    """Tiny models gain nothing from threads, and on a busy machine they contend badly."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)

def tiny_net() -> nn.Module:
    """Awkward channel counts (17, 127) and both layer types, cheap to train."""
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(3, 17, 3, padding=1), nn.ReLU(), nn.Conv2d(17, 127, 1),
                         nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(127, 10))


# ---------------------------------------------------------------------------------------
# magnitude_mask


def test_worked_example_from_the_docstring():
    w = torch.tensor([0.3, -0.2, -0.01, 0.05])
    assert magnitude_mask(w, 0.75).tolist() == [True, False, False, False]
    assert magnitude_mask(w, 0.5).tolist() == [True, True, False, False]
    assert magnitude_mask(w, 0.0).all()


def test_ties_keep_the_earlier_index_deterministically():
    assert magnitude_mask(torch.ones(4), 0.5).tolist() == [True, True, False, False]
    w = torch.tensor([0.1, -0.5, 0.5, 0.1, -0.1])
    assert magnitude_mask(w, 0.4).tolist() == [True, True, True, False, False]


@pytest.mark.parametrize("shape", [(17,), (17, 127), (127, 17, 3, 3), (1, 1, 1, 1)])
@pytest.mark.parametrize("sparsity", [0.0, 0.1, 0.33, 0.5, 0.9, 0.999])
def test_exact_count_and_largest_magnitudes_kept(shape, sparsity):
    torch.manual_seed(1)
    w = torch.randn(shape)
    m = magnitude_mask(w, sparsity)
    assert m.shape == w.shape and m.dtype == torch.bool
    assert int(m.sum()) == max(1, math.floor((1 - sparsity) * w.numel() + 0.5))
    if 0 < int(m.sum()) < w.numel():
        assert w[m].abs().min() >= w[~m].abs().max()


@pytest.mark.parametrize("n, sparsity", [(1, 0.6), (1, 0.999), (3, 0.9), (17, 0.99)])
def test_a_layer_keeps_at_least_its_largest_weight(n, sparsity):
    """A 1-weight Linear at sparsity 0.6 rounded to none kept: the layer was cut out of the
    network, and nothing said so (audit)."""
    w = torch.linspace(-1, 0.5, n)
    m = magnitude_mask(w, sparsity)
    assert int(m.sum()) == 1 and bool(m[0]), m


def test_existing_zeros_are_pruned_first():
    w = torch.tensor([0.0, 0.0, 0.2, -0.4, 0.1])
    assert magnitude_mask(w, 0.4).tolist() == [False, False, True, True, True]


@pytest.mark.parametrize("bad", [1.0, -0.1, 1.5, True, "0.5"])
def test_sparsity_out_of_range_is_refused(bad):
    with pytest.raises(RecipeError, match="sparsity"):
        magnitude_mask(torch.ones(3), bad)


# ---------------------------------------------------------------------------------------
# schedule


def test_polynomial_schedule_values():
    s = [polynomial_sparsity(t, final=0.8, begin=10, end=20) for t in (0, 9, 10, 15, 20, 99)]
    assert s[:3] == [0.0, 0.0, 0.0]
    assert s[3] == pytest.approx(0.8 - 0.8 * 0.5 ** 3)
    assert s[4:] == [0.8, 0.8]
    # with an initial sparsity, and masks updated only every 4 steps
    assert polynomial_sparsity(10, final=0.9, initial=0.5, begin=10, end=20) == 0.5
    assert polynomial_sparsity(13, final=0.9, initial=0.5, begin=10, end=20, frequency=4) == 0.5
    assert polynomial_sparsity(14, final=0.9, initial=0.5, begin=10, end=20, frequency=4) \
        == pytest.approx(0.9 - 0.4 * 0.6 ** 3)
    seq = [polynomial_sparsity(t, final=0.7, end=50) for t in range(60)]
    assert seq == sorted(seq)


# ---------------------------------------------------------------------------------------
# config


class _HeadFirst(nn.Module):
    """The classifier conv registered before the stem."""

    def __init__(self):
        super().__init__()
        self.classifier = nn.Conv2d(8, 10, 1)
        self.stem = nn.Conv2d(1, 8, 3)

    def forward(self, x):
        return self.classifier(torch.relu(self.stem(x))).mean((2, 3))


class _Shortcut(nn.Module):
    """A residual block whose downsampling shortcut is registered (and called) after the
    block's last conv, as torchvision's ResNet does."""

    def __init__(self):
        super().__init__()
        self.stem = nn.Conv2d(1, 8, 3)
        self.c1 = nn.Conv2d(8, 16, 3, stride=2, padding=1)
        self.c2 = nn.Conv2d(16, 16, 3, padding=1)
        self.short = nn.Conv2d(8, 16, 1, stride=2)
        self.fc = nn.Linear(16, 10)

    def forward(self, x):
        x = torch.relu(self.stem(x))
        out = self.c2(torch.relu(self.c1(x))) + self.short(x)
        return self.fc(out.mean((2, 3)))


@pytest.mark.parametrize("model, first, last", [
    (_HeadFirst(), "stem", "classifier"),   # registration order swapped the two
    (_Shortcut(), "stem", "c2"),            # registration order made the shortcut the last conv
    (build_model("squeezenet_mnist"), "features.0", "classifier.1"),
])
def test_first_and_last_conv_follow_the_data_not_the_registration_order(model, first, last):
    cfg = PruneConfig(sparsity=0.8, first_conv=0.1, last_conv=0.2)
    explicit = cfg.explicit(model)
    assert explicit[first] == 0.1 and explicit[last] == 0.2, explicit
    assert sorted(v for v in explicit.values() if v != 0.8) == [0.1, 0.2]


def test_a_kept_first_or_last_conv_takes_its_setting_with_it():
    """With the stem in keep_layers, first_conv moved to the next conv by data flow
    (features.4.squeeze pruned to 0.5 instead of 0.8), without a word."""
    from edgesqueeze.models.layers import keep_layers

    model = build_model("squeezenet_mnist")
    keep_layers(model, ["features.0", "classifier.1"])
    explicit = PruneConfig(sparsity=0.8, first_conv=0.5, last_conv=0.3).explicit(model)
    assert explicit == {}, explicit  # every other conv takes the model-wide 0.8


@pytest.mark.parametrize("layers, says", [
    ({"features.0": 0.3}, "compress.prune.layers.features.0: the layer is in compress.keep_layers"),
    ({"features.4": 0.5}, "compress.prune.layers.features.4: a module, not a layer; name its Conv2d/Linear "
                          "layers: features.4.squeeze"),
])
def test_layer_names_a_stage_cannot_take_say_why(layers, says):
    """A kept layer was called "no Conv2d or Linear layer of that name; did you mean
    'features.9.squeeze'?", and a module got a suggestion of another layer."""
    from edgesqueeze.models.layers import keep_layers

    model = build_model("squeezenet_mnist")
    keep_layers(model, ["features.0"])
    with pytest.raises(RecipeError, match=says):
        PruneConfig(sparsity=0.5, layers=layers).explicit(model, path="compress.prune")


def test_config_round_trips_and_carries_a_version():
    cfg = PruneConfig(sparsity=0.6, first_conv=0.2, layers={"classifier.1": 0.5},
                      schedule="gradual", begin=2, end=10, frequency=2)
    d = cfg.to_dict()
    assert d["version"] == PruneConfig.VERSION
    json.dumps(d)
    assert PruneConfig.from_dict(d) == cfg
    assert PruneConfig.from_dict({"sparsity": 0}).sparsity == 0.0  # ints become floats


@pytest.mark.parametrize("raw, message", [
    ({"sparsty": 0.5}, r"prune\.sparsty: unknown key; did you mean 'sparsity'\?"),
    ({"sparsity": 1.0}, r"prune\.sparsity: must be >= 0 and < 1, got 1\.0"),
    ({"first_conv": -0.5}, r"prune\.first_conv: must be >= 0"),
    ({"sparsity": "half"}, r"prune\.sparsity: expected float or one of 'auto', got 'half'"),
    ({"sparsity": "auto", "scan": []}, r"prune\.scan: sparsity 'auto' needs at least one"),
    ({"sparsity": "auto", "max_drop": 0}, r"prune\.max_drop: must be > 0"),
    ({"scan": [0.5, 1.2]}, r"prune\.scan\[1\]: must be >= 0 and < 1, got 1\.2"),
    ({"layers": {"features.0": 1.2}}, r"prune\.layers\.features\.0: must be >= 0 and < 1"),
    ({"schedule": "gradul"}, r"prune\.schedule: .*did you mean 'gradual'\?"),
    ({"schedule": "gradual", "begin": 5, "end": 5}, r"prune\.end: must be > begin \(5\)"),
    ({"frequency": 0}, r"prune\.frequency: must be >= 1"),
    ({"version": 2}, r"prune\.version: .*version 1, got 2"),
])
def test_config_errors_name_the_field(raw, message):
    with pytest.raises(RecipeError, match=message):
        PruneConfig.from_dict(raw)


def test_direct_construction_is_validated_too():
    with pytest.raises(RecipeError, match=r"^sparsity: must be >= 0 and < 1, got 1\.0"):
        PruneConfig(sparsity=1.0)
    with pytest.raises(RecipeError, match=r"layers\.classifier\.1"):
        PruneConfig(layers={"classifier.1": -1})


def test_targets_follow_the_precedence_rules():
    model = build_model("squeezenet_mnist")
    cfg = PruneConfig(sparsity=0.5, conv=0.6, first_conv=0.1, last_conv=0.3,
                      layers={"features.4.expand3x3": 0.9})
    t = cfg.targets(model)
    assert list(t) == list(prunable_layers(model))
    assert t["features.0"] == 0.1 and t["classifier.1"] == 0.3
    assert t["features.4.expand3x3"] == 0.9 and t["features.4.squeeze"] == 0.6
    lin = PruneConfig(sparsity=0.5, linear=0.8).targets(tiny_net())
    assert lin == {"0": 0.5, "2": 0.5, "6": 0.8}


def test_unknown_layer_names_suggest_the_closest():
    model = build_model("squeezenet_mnist")
    with pytest.raises(RecipeError, match=r"prune\.layers\.features\.4\.squeez: no Conv2d or "
                                          r"Linear layer.*did you mean 'features\.4\.squeeze'"):
        PruneConfig(layers={"features.4.squeez": 0.5}).targets(model)
    with pytest.raises(RecipeError, match=r"compress\.prune\.layers\.zzz: .*layers are: "
                                          r"features\.0, "):
        PruneConfig(layers={"zzz": 0.5}).targets(model, path="compress.prune")


# ---------------------------------------------------------------------------------------
# fine-tuning keeps zeros


def _train(model, pruner, optimizer, steps, *, update=False):
    torch.manual_seed(0)
    pruner.attach(optimizer)
    for step in range(steps):
        if update:
            pruner.update(step)
        x, y = torch.randn(4, 3, 6, 6), torch.randint(0, 10, (4,))
        nn.functional.cross_entropy(model(x), y).backward()
        optimizer.step()
        optimizer.zero_grad()
    pruner.detach()


@pytest.mark.parametrize("make_opt", [
    lambda p: torch.optim.SGD(p, lr=0.1, momentum=0.9, weight_decay=5e-4, nesterov=True),
    lambda p: torch.optim.AdamW(p, lr=1e-2, weight_decay=5e-4),
], ids=["sgd-momentum-wd", "adamw"])
def test_pruned_weights_stay_exactly_zero_during_fine_tuning(make_opt):
    model = tiny_net()
    optimizer = make_opt(model.parameters())
    # Build optimizer state on the dense model first: stale momentum must not revive zeros.
    nn.functional.cross_entropy(model(torch.randn(4, 3, 6, 6)), torch.tensor([0, 1, 2, 3])) \
        .backward()
    optimizer.step()
    optimizer.zero_grad()
    pruner = Pruner(model, PruneConfig(sparsity=0.7))
    pruner.update()
    before = {n: m.weight.detach().clone() for n, m in prunable_layers(model).items()}
    _train(model, pruner, optimizer, 50)
    for name, mask in pruner.masks.items():
        w = model.get_submodule(name).weight.detach()
        assert torch.equal(w[~mask], torch.zeros(int((~mask).sum())))  # +0.0, exactly
        assert not torch.signbit(w[~mask]).any()
        assert not torch.equal(w[mask], before[name][mask])  # the rest did train
        for value in optimizer.state[model.get_submodule(name).weight].values():
            if torch.is_tensor(value) and value.shape == mask.shape:
                assert (value[~mask] == 0).all()
    assert [round(r["density"], 2) for r in layer_stats(model)] == [0.3, 0.3, 0.3]


def test_gradual_pruning_reaches_its_targets_with_monotone_masks():
    model = tiny_net()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9, weight_decay=5e-4)
    cfg = PruneConfig(sparsity=0.8, first_conv=0.5, schedule="gradual", begin=2, end=12,
                      frequency=3)
    pruner = Pruner(model, cfg)
    seen = []
    pruner.attach(optimizer)
    for step in range(16):
        pruner.update(step)
        seen.append({n: m.clone() for n, m in pruner.masks.items()})
        x = torch.randn(4, 3, 6, 6)
        model(x).square().mean().backward()
        optimizer.step()
        optimizer.zero_grad()
    pruner.detach()
    for a, b in itertools.pairwise(seen):
        for n in a:
            assert not (b[n] & ~a[n]).any()  # nothing revived
    stats = {r["layer"]: r for r in layer_stats(model)}
    assert stats["0"]["density"] == pytest.approx(0.5, abs=0.01)
    assert stats["2"]["density"] == pytest.approx(0.2, abs=0.01)
    # s_i = 0 at begin=2; the mask moves only at steps begin + k * frequency, then at end
    changed = [t for t in range(1, 16) if not torch.equal(seen[t]["2"], seen[t - 1]["2"])]
    assert changed == [5, 8, 11, 12]


def test_apply_copies_keeps_existing_zeros_and_reports_json():
    model = tiny_net()
    with torch.no_grad():
        model[2].weight[:, :10] = 0  # 10/17 of the layer already pruned
    pruned, report = apply(model, PruneConfig(sparsity=0.5))
    assert torch.count_nonzero(model[0].weight) == model[0].weight.numel()  # untouched
    stats = {r["layer"]: r for r in layer_stats(pruned)}
    assert stats["0"]["density"] == pytest.approx(0.5, abs=0.01)
    assert stats["2"]["nonzero"] == 127 * 7  # never densified below its existing sparsity
    assert (pruned[2].weight[:, :10] == 0).all()
    d = json.loads(report.to_json())
    assert d["stage"] == "prune" and d["config"]["sparsity"] == 0.5
    assert [r["layer"] for r in d["layers"]] == ["0", "2", "6"]
    assert d["summary"]["nonzero"] == sum(r["nonzero"] for r in d["layers"])
    dense, _ = apply(model, PruneConfig(sparsity=0.5), keep_existing=False)
    assert int(torch.count_nonzero(dense[2].weight)) == 127 * 7  # zeros rank lowest anyway


def test_keep_masks_are_never_revived_by_fine_tuning():
    model = tiny_net()
    keep = existing_masks(model)
    keep["2"] = torch.rand_like(model[2].weight) > 0.5
    pruner = Pruner(model, PruneConfig(sparsity=0.1), keep=keep)
    pruner.update()
    _train(model, pruner, torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9), 10)
    assert (model[2].weight[~keep["2"]] == 0).all()
    with pytest.raises(RecipeError, match=r"keep\.nope"):
        Pruner(model, PruneConfig(), keep={"nope": keep["2"]})


@pytest.mark.shared
def test_existing_masks_of_the_released_deep_compression_squeezenet():
    path = SHARED / "models" / "squeezenet1_0-imagenet.pt"
    if not path.exists():
        pytest.skip(f"{path} not available")
    model = build_model("squeezenet1_0")
    model.load_state_dict(torch.load(path, weights_only=True))
    rows = layer_stats(model)
    assert len(rows) == 26
    density = sum(r["nonzero"] for r in rows) / sum(r["numel"] for r in rows)
    assert density == pytest.approx(0.334, abs=0.005)
    masks = existing_masks(model)
    assert float(masks["features.3.expand3x3"].float().mean()) == pytest.approx(0.33, abs=0.01)
    pruned, _ = apply(model, PruneConfig(sparsity=0.1))  # target below existing: kept
    assert torch.equal(existing_masks(pruned)["classifier.1"], masks["classifier.1"])


# ---------------------------------------------------------------------------------------
# sensitivity


def test_sensitivity_scan_prunes_one_layer_at_a_time_and_restores():
    model = tiny_net()
    original = {k: v.clone() for k, v in model.state_dict().items()}
    seen = []

    def eval_fn(m):
        dens = [float((m.get_submodule(n).weight != 0).float().mean()) for n in ("0", "2", "6")]
        seen.append(dens)
        return 1.0 - 0.5 * max(1 - d for d in dens) ** 2  # worse as any layer gets sparser

    table = sensitivity_scan(model, ["2", "6"], [0.9, 0.5], eval_fn)
    assert [(r["layer"], r["sparsity"]) for r in table] == [("2", 0.5), ("2", 0.9),
                                                            ("6", 0.5), ("6", 0.9)]
    assert seen[0] == pytest.approx([1.0, 0.5, 1.0], abs=0.01)
    assert seen[3] == pytest.approx([1.0, 1.0, 0.1], abs=0.01)
    assert all(torch.equal(v, original[k]) for k, v in model.state_dict().items())
    json.dumps(table)
    assert choose_sparsities(table, max_drop=0.2, baseline=1.0) == {"2": 0.5, "6": 0.5}
    assert choose_sparsities(table, max_drop=0.5, baseline=1.0) == {"2": 0.9, "6": 0.9}
    assert choose_sparsities(table, max_drop=0.1, baseline=1.0) == {"2": 0.0, "6": 0.0}
    with pytest.raises(RecipeError, match=r"layers\.8"):
        sensitivity_scan(model, ["8"], [0.5], eval_fn)


def test_sparsity_auto_resolves_from_a_scan_and_keeps_explicit_settings():
    model = tiny_net()
    x = torch.randn(16, 3, 8, 8, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        reference = model(x)

    def fidelity(m):  # a real measurement: how close the outputs stay to the unpruned model's
        with torch.no_grad():
            err = (m(x) - reference).norm() / reference.norm()
        return 1.0 - float(err)

    cfg = PruneConfig.from_dict({"sparsity": "auto", "max_drop": 5, "scan": [0.9, 0.3, 0.6],
                                 "first_conv": 0.25})
    with pytest.raises(RecipeError, match="'auto' must be resolved"):
        cfg.targets(model)
    resolved, scan = resolve_auto(cfg, model, fidelity)
    assert cfg.scan == (0.3, 0.6, 0.9)
    assert {r["layer"] for r in scan["rows"]} == {"2", "6"}  # the stem is set explicitly
    targets = resolved.targets(model)
    assert targets["0"] == 0.25
    for name in ("2", "6"):
        rows = sorted((r["sparsity"], r["accuracy"]) for r in scan["rows"] if r["layer"] == name)
        ok = [sp for sp, acc in rows if scan["baseline"] - acc <= 0.05]
        assert targets[name] in {0.0, *ok}
        assert targets[name] == choose_sparsities(scan["rows"], 0.05, scan["baseline"])[name]
    with torch.no_grad():
        assert torch.equal(model(x), reference)  # the scan leaves the model as it was
    same, nothing = resolve_auto(PruneConfig(sparsity=0.5), model, fidelity)
    assert same == PruneConfig(sparsity=0.5) and nothing == {}


def test_choose_sparsities_stops_at_the_first_failure():
    t = [{"layer": "a", "sparsity": s, "accuracy": acc}
         for s, acc in [(0.8, 0.985), (0.5, 0.99), (0.7, 0.97), (0.9, 0.5)]]
    assert choose_sparsities(t, max_drop=0.01, baseline=0.99) == {"a": 0.5}


def test_depthwise_convs_take_their_own_sparsity_and_bits():
    """``depthwise`` applies to convs with one filter per input channel, not to grouped
    convs with several channels per group, nor to the 1x1 pointwise convs around them; a
    layer named in ``layers`` still wins, and so does ``first_conv``."""
    from edgesqueeze.config.compress import ClusterConfig

    model = nn.Sequential(nn.Conv2d(3, 8, 3), nn.Conv2d(8, 8, 3, groups=8), nn.Conv2d(8, 16, 1),
                          nn.Conv2d(16, 16, 3, groups=4), nn.Conv2d(16, 16, 3, groups=16), nn.Flatten(),
                          nn.Linear(16, 4))
    t = PruneConfig(sparsity=0.7, first_conv=0.3, depthwise=0.1, layers={"4": 0.5}).targets(model)
    assert t == {"0": 0.3, "1": 0.1, "2": 0.7, "3": 0.7, "4": 0.5, "6": 0.7}
    assert PruneConfig(sparsity=0.7, conv=0.6).targets(model)["1"] == 0.6  # unset: a conv like the others
    bits = ClusterConfig(bits=4, conv=5, depthwise=6, layers={"4": 8}).bits_for(model)
    assert bits == {"0": 5, "1": 6, "2": 5, "3": 5, "4": 8, "6": 4}


def test_an_unset_depthwise_leaves_recipe_hashes_as_they_were():
    from edgesqueeze.recipe import recipe_from_dict

    raw = {"version": 1, "name": "x", "model": {"arch": "squeezenet_digits"}, "data": {"dataset": "digits"},
           "compress": {"prune": {"sparsity": 0.5}, "cluster": {"bits": 4}}}
    plain = recipe_from_dict(raw)
    assert "depthwise" not in json.dumps(plain._hashed())
    raw["compress"]["cluster"]["depthwise"] = 6
    assert recipe_from_dict(raw).hash() != plain.hash()
