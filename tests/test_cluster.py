"""Tests for edgesqueeze.compress.cluster (weight sharing, trained quantization) and
edgesqueeze.compress.fold (BatchNorm folding, the step before clustering)."""

from __future__ import annotations

import copy
import json

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

from edgesqueeze.config.compress import ClusterConfig, PruneConfig
from edgesqueeze.compress.cluster import (ClusteredLayer, SharedWeights, apply,
                                          cluster_layer, cluster_model, codebook_parameters,
                                          kmeans_1d, materialize, share_weights)
from edgesqueeze.models.fold import conv_bn_pairs, fold_batchnorm, fold_conv_bn
from edgesqueeze.compress.prune import existing_masks
from edgesqueeze.compress.prune import apply as prune
from edgesqueeze.errors import ModelError, RecipeError
from edgesqueeze.models import build_model



@pytest.fixture(autouse=True, scope="module")
def one_thread():
    """Tiny models gain nothing from threads, and on a busy machine they contend badly."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)

def tiny_net() -> nn.Module:
    """Awkward channel counts (17, 127) and both layer types."""
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(3, 17, 3, padding=1), nn.ReLU(), nn.Conv2d(17, 127, 1),
                         nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(127, 10))


def distinct_nonzero(t: torch.Tensor) -> int:
    return int(torch.unique(t[t != 0]).numel())


# ---------------------------------------------------------------------------------------
# kmeans_1d


def test_kmeans_worked_example():
    c, lab = kmeans_1d(np.array([0.0, 1.0, 4.0, 5.0, 10.0]), 3)
    assert c.tolist() == [0.5, 4.5, 10.0] and lab.tolist() == [0, 0, 1, 1, 2]


def test_fewer_distinct_values_than_k_is_exact():
    v = np.array([0.5, -1.0, 0.5, 2.0, -1.0])
    c, lab = kmeans_1d(v, 8)
    assert c.tolist() == [-1.0, 0.5, 2.0]
    assert np.array_equal(c[lab], v)
    c, lab = kmeans_1d(np.full(17, 3.0), 4)
    assert c.tolist() == [3.0] and lab.tolist() == [0] * 17
    c, lab = kmeans_1d(np.empty(0), 4)
    assert c.size == 0 and lab.size == 0


def test_sample_weight_pulls_the_centroid():
    c, lab = kmeans_1d(np.array([0.0, 1.0]), 1, sample_weight=np.array([3.0, 1.0]))
    assert c.tolist() == [0.25] and lab.tolist() == [0, 0]
    with pytest.raises(RecipeError, match="sample_weight"):
        kmeans_1d(np.array([0.0, 1.0]), 1, sample_weight=np.array([-1.0, 1.0]))


@pytest.mark.parametrize("init", ["linear", "density", "kmeans++"])
def test_inits_are_sorted_deterministic_and_at_most_k(init):
    rng = np.random.default_rng(0)
    v = rng.laplace(0, 0.05, 5000)
    c, lab = kmeans_1d(v, 16, init=init, seed=3)
    c2, lab2 = kmeans_1d(v, 16, init=init, seed=3)
    assert np.array_equal(c, c2) and np.array_equal(lab, lab2)
    assert 1 <= c.size <= 16 and np.all(np.diff(c) > 0)
    assert lab.min() == 0 and lab.max() == c.size - 1
    # every value sits with its nearest centroid
    assert np.allclose(np.abs(v - c[lab]), np.abs(v[:, None] - c[None]).min(1))


def test_numpy_lloyd_matches_sklearn_lloyd():
    rng = np.random.default_rng(1)
    v = rng.laplace(0, 0.05, 3000)  # linear init leaves empty clusters in the tails
    for init in ("linear", "density"):
        c1, l1 = kmeans_1d(v, 32, init=init)
        c2, l2 = kmeans_1d(v, 32, init=init, backend="sklearn")
        assert np.allclose(c1, c2, atol=1e-9) and np.array_equal(l1, l2)


def test_linear_init_spends_the_codebook_on_the_tails():
    v = np.concatenate([np.linspace(-0.01, 0.01, 1000), [-1.0, 1.0]])
    c, _ = kmeans_1d(v, 4)
    assert c[0] == -1.0 and c[-1] == 1.0  # the paper's reason to prefer linear init


@settings(max_examples=60, deadline=None)
@given(st.lists(st.floats(-4, 4, width=32), min_size=1, max_size=12, unique=True),
       st.integers(0, 200), st.integers(0, 4), st.sampled_from(["linear", "density",
                                                                "kmeans++"]))
def test_clustering_with_enough_clusters_is_lossless(pool, n, extra, init):
    rng = np.random.default_rng(n)
    v = np.asarray(pool, dtype=np.float64)[rng.integers(0, len(pool), n + 1)]
    k = np.unique(v).size + extra
    c, lab = kmeans_1d(v, k, init=init)
    assert np.array_equal(c[lab], v)


# ---------------------------------------------------------------------------------------
# config


def test_cluster_config_round_trips_and_refuses_bad_bits():
    cfg = ClusterConfig(bits=6, linear=5, layers={"0": 4}, init="density",
                        codebook_dtype="float16")
    assert ClusterConfig.from_dict(json.loads(json.dumps(cfg.to_dict()))) == cfg
    with pytest.raises(RecipeError, match=r"^cluster\.bits: must be >= 1 and <= 8, got 0$"):
        ClusterConfig.from_dict({"bits": 0})
    with pytest.raises(RecipeError, match=r"^bits: must be >= 1"):
        ClusterConfig(bits=0)
    with pytest.raises(RecipeError, match=r"cluster\.layers\.0: must be >= 1 and <= 8, got 9"):
        ClusterConfig.from_dict({"layers": {"0": 9}})
    with pytest.raises(RecipeError, match=r"cluster\.int: .*did you mean 'init'"):
        ClusterConfig.from_dict({"int": "linear"})
    with pytest.raises(RecipeError, match=r"cluster\.codebook_dtype: must be one of"):
        ClusterConfig.from_dict({"codebook_dtype": "bfloat16"})


def test_bits_per_type_and_layer_with_did_you_mean():
    assert ClusterConfig(bits=6, linear=5, layers={"2": 3}).bits_for(tiny_net()) == \
        {"0": 6, "2": 3, "6": 5}
    model = build_model("squeezenet_mnist")
    with pytest.raises(RecipeError, match=r"cluster\.layers\.classifer\.1: .*did you mean "
                                          r"'classifier\.1'"):
        ClusterConfig(layers={"classifer.1": 4}).bits_for(model)


# ---------------------------------------------------------------------------------------
# cluster_model


def pruned_tiny(sparsity: float = 0.6) -> nn.Module:
    model, _ = prune(tiny_net(), PruneConfig(sparsity=sparsity))
    return model


@pytest.mark.parametrize("bits, dtype", [(1, "float32"), (3, "float32"), (4, "float16"),
                                         (8, "float32")])
def test_cluster_model_shares_weights_and_keeps_zeros(bits, dtype):
    model = pruned_tiny()
    masks = existing_masks(model)
    out, assignments = cluster_model(model, ClusterConfig(bits=bits, codebook_dtype=dtype))
    assert torch.count_nonzero(model[2].weight) == int(masks["2"].sum())  # input untouched
    for name, layer in assignments.items():
        w = out.get_submodule(name).weight.detach()
        assert torch.equal(w != 0, masks[name])  # zeros stayed zeros, survivors survived
        assert distinct_nonzero(w) <= 2 ** bits
        assert layer.codebook.numel() <= 2 ** bits and layer.labels.dtype == torch.uint8
        assert torch.equal(layer.weight(), w)
        if dtype == "float16":
            assert torch.equal(layer.codebook.half().float(), layer.codebook)


def test_include_zero_reserves_code_zero():
    model = pruned_tiny()
    masks = existing_masks(model)
    out, assignments = cluster_model(model, ClusterConfig(bits=2, include_zero=True))
    layer = assignments["2"]
    assert layer.zero_code and layer.codebook[0] == 0 and layer.codebook.numel() <= 4
    assert (layer.labels[~masks["2"]] == 0).all() and (layer.labels[masks["2"]] > 0).all()
    assert distinct_nonzero(out[2].weight.detach()) <= 3
    assert torch.equal(out[2].weight != 0, masks["2"])


def test_reclustering_a_clustered_model_is_lossless():
    model = pruned_tiny()
    once, a1 = cluster_model(model, ClusterConfig(bits=4))
    twice, a2 = cluster_model(once, ClusterConfig(bits=4, init="kmeans++"))
    for name in a1:
        assert torch.equal(once.get_submodule(name).weight, twice.get_submodule(name).weight)
        assert torch.equal(a1[name].codebook, a2[name].codebook)
        assert torch.equal(a1[name].labels, a2[name].labels)


def test_explicit_masks_and_awkward_layer():
    torch.manual_seed(0)
    w = torch.randn(127, 17, 3, 3)
    mask = torch.rand_like(w) > 0.7
    layer = cluster_layer("x", w, mask, 5, init="linear")
    out = layer.weight()
    assert torch.equal(out != 0, mask) and distinct_nonzero(out) <= 32
    assert (out[mask] - w[mask]).abs().max() < (w[mask].max() - w[mask].min()) / 31
    sample_weight = torch.zeros_like(w)  # weightless survivors: plain k-means
    assert torch.equal(cluster_layer("x", w, mask, 5, sample_weight=sample_weight).weight(), out)


def test_fully_pruned_layer_and_bad_k():
    layer = cluster_layer("x", torch.randn(17, 3), torch.zeros(17, 3, dtype=torch.bool), 4)
    assert torch.equal(layer.weight(), torch.zeros(17, 3))
    assert SharedWeights(layer)(torch.empty(17, 3)).abs().sum() == 0
    with pytest.raises(RecipeError, match="k: must be an integer >= 1"):
        kmeans_1d(np.ones(3), 0)


def test_apply_reports_json():
    model = pruned_tiny()
    _, report = apply(model, ClusterConfig(bits=4, linear=3))
    d = json.loads(report.to_json())
    assert d["stage"] == "cluster" and d["config"]["linear"] == 3
    rows = {r["layer"]: r for r in d["layers"]}
    assert rows["6"]["bits"] == 3 and rows["0"]["centroids"] <= 16
    assert 0 < rows["2"]["mse"] and rows["2"]["max_abs_err"] < 0.1
    with pytest.raises(RecipeError, match=r"masks\.nope"):
        cluster_model(model, ClusterConfig(), {"nope": torch.ones(1, dtype=torch.bool)})


# ---------------------------------------------------------------------------------------
# trained quantization


def test_centroid_gradient_is_the_sum_of_its_members_gradients():
    layer = ClusteredLayer(
        "lin", codebook=torch.tensor([-0.5, 0.25, 1.0]),
        labels=torch.tensor([[0, 1, 2], [1, 1, 0]], dtype=torch.uint8),
        mask=torch.tensor([[True, True, False], [True, True, True]]), bits=2)
    model = nn.Sequential(nn.Linear(3, 2, bias=False))
    share_weights(model, {"0": layer})
    assert torch.equal(model[0].weight, torch.tensor([[-0.5, 0.25, 0.0], [0.25, 0.25, -0.5]]))
    g = torch.tensor([[1.0, 2.0, 3.0], [4.0, 5.0, 6.0]])
    (model[0].weight * g).sum().backward()
    # code 0: (0,0) and (1,2) -> 1 + 6; code 1: (0,1), (1,0), (1,1) -> 2 + 4 + 5;
    # code 2: only (0,2), which is pruned -> 0
    assert codebook_parameters(model)["0"].grad.tolist() == [7.0, 11.0, 0.0]


def test_centroid_gradient_matches_a_real_forward_pass():
    clustered, assignments = cluster_model(pruned_tiny(), ClusterConfig(bits=3))
    x, y = torch.randn(5, 3, 6, 6), torch.arange(5)
    ref = copy.deepcopy(clustered)  # plain weights holding the same clustered values
    nn.functional.cross_entropy(ref(x), y).backward()
    share_weights(clustered, assignments)
    nn.functional.cross_entropy(clustered(x), y).backward()
    for name, layer in assignments.items():
        m, wg = layer.mask, ref.get_submodule(name).weight.grad
        expected = torch.zeros(layer.codebook.numel()).index_add_(0, layer.labels[m].long(),
                                                                  wg[m])
        assert torch.allclose(codebook_parameters(clustered)[name].grad, expected, atol=1e-6)


def test_fine_tuned_centroids_materialize_to_shared_plain_weights():
    model = pruned_tiny()
    keys = list(model.state_dict())
    masks = existing_masks(model)
    clustered, assignments = cluster_model(model, ClusterConfig(bits=3, linear=2))
    share_weights(clustered, assignments, codebook_dtype="float16")
    before = {n: p.detach().clone() for n, p in codebook_parameters(clustered).items()}
    opt = torch.optim.SGD(clustered.parameters(), lr=0.1, momentum=0.9, weight_decay=5e-4)
    torch.manual_seed(0)
    for _ in range(5):
        x, y = torch.randn(8, 3, 6, 6), torch.randint(0, 10, (8,))
        nn.functional.cross_entropy(clustered(x), y).backward()
        opt.step()
        opt.zero_grad()
    trained = materialize(clustered)
    assert list(clustered.state_dict()) == keys  # plain parameters again
    assert codebook_parameters(clustered) == {}
    for name, layer in trained.items():
        w = clustered.get_submodule(name).weight
        assert isinstance(w, nn.Parameter) and w.requires_grad
        assert torch.equal(w != 0, masks[name])  # zeros stayed zeros
        assert distinct_nonzero(w.detach()) <= 2 ** layer.bits
        assert torch.equal(layer.labels, assignments[name].labels)  # assignments fixed
        assert not torch.equal(layer.codebook, before[name])  # centroids did train
        assert torch.equal(layer.codebook.half().float(), layer.codebook)
    with pytest.raises(RecipeError, match="already parametrized"):
        share_weights(share_weights(clustered, trained), trained)


def test_shared_weights_module_writes_positive_zeros():
    layer = cluster_layer("x", torch.tensor([[-0.3, 1.0, -1.0, 0.5]]),
                          torch.tensor([[False, True, True, True]]), 2, include_zero=True)
    out = SharedWeights(layer)(torch.empty(1, 4))
    assert out.tolist() == [[0.0, 1.0, -1.0, 0.5]] and not torch.signbit(out[0, 0])


# ---------------------------------------------------------------------------------------
# BatchNorm folding


def _randomize_bn(model: nn.Module) -> None:
    """Non-trivial BN: random affine parameters and running stats learned from data."""
    torch.manual_seed(0)
    for m in model.modules():
        if isinstance(m, nn.BatchNorm2d):
            with torch.no_grad():
                m.weight.uniform_(0.5, 1.5)
                m.bias.uniform_(-0.2, 0.2)
            m.momentum = None  # cumulative average over the passes below


@pytest.mark.parametrize("arch, shape", [("squeezenet_mnist", (1, 28, 28)),
                                         ("squeezenet_cifar", (3, 32, 32))])
def test_fold_matches_eval_outputs_and_renames_keys_predictably(arch, shape):
    torch.manual_seed(0)
    model = build_model(arch, width_mult=0.25)
    _randomize_bn(model)
    model.train()
    with torch.no_grad():
        for _ in range(3):
            model(torch.randn(8, *shape))
    model.eval()
    folded = fold_batchnorm(model).eval()
    x = torch.randn(4, *shape)
    with torch.no_grad():
        assert torch.allclose(folded(x), model(x), atol=1e-5)
    pairs = conv_bn_pairs(model)
    n_bn = sum(isinstance(m, nn.BatchNorm2d) for m in model.modules())
    assert len(pairs) == n_bn and ("features.0", "features.1") in pairs
    assert ("features.4.expand3x3", "features.4.expand3x3_bn") in pairs
    assert not any(isinstance(m, nn.BatchNorm2d) for m in folded.modules())
    old, new = set(model.state_dict()), set(folded.state_dict())
    bn_keys = {f"{b}.{s}" for _, b in pairs
               for s in ("weight", "bias", "running_mean", "running_var", "num_batches_tracked")}
    assert old - new == bn_keys
    assert new - old == {f"{c}.bias" for c, _ in pairs}
    # rebuilding a folded checkpoint: build, fold, load
    fresh = fold_batchnorm(build_model(arch, width_mult=0.25))
    fresh.load_state_dict(folded.state_dict())
    assert any(isinstance(m, nn.BatchNorm2d) for m in model.modules())  # input untouched


def test_fold_without_batchnorm_changes_nothing():
    model = build_model("squeezenet_mnist", batch_norm=False, width_mult=0.25)
    folded = fold_batchnorm(model)
    assert folded is not model and conv_bn_pairs(model) == []
    a, b = model.state_dict(), folded.state_dict()
    assert list(a) == list(b) and all(torch.equal(a[k], b[k]) for k in a)


def test_fold_skips_a_conv_whose_output_is_read_elsewhere():
    class Tap(nn.Module):
        def __init__(self):
            super().__init__()
            self.conv = nn.Conv2d(2, 3, 1)
            self.bn = nn.BatchNorm2d(3)
            self.conv2 = nn.Conv2d(3, 3, 1, bias=False)
            self.bn2 = nn.BatchNorm2d(3)

        def forward(self, x):
            y = self.conv(x)
            return self.bn(y) + y + self.bn2(self.conv2(y))

    model = Tap().eval()
    assert conv_bn_pairs(model) == [("conv2", "bn2")]
    folded = fold_batchnorm(model)
    assert isinstance(folded.bn, nn.BatchNorm2d) and isinstance(folded.bn2, nn.Identity)
    x = torch.randn(2, 2, 3, 3)
    with torch.no_grad():
        assert torch.allclose(folded(x), model(x), atol=1e-6)


def test_fold_worked_example_and_untraceable_models():
    w, b = fold_conv_bn(torch.full((1, 1, 1, 1), 2.0), None, torch.tensor([1.0]),
                        torch.tensor([3.0]), 1.0, torch.tensor([1.0]), torch.tensor([0.5]))
    assert w.item() == 1.0 and b.item() == 0.0

    class Branchy(nn.Module):
        def __init__(self):
            super().__init__()
            self.conv, self.bn = nn.Conv2d(1, 1, 1), nn.BatchNorm2d(1)

        def forward(self, x):
            return self.bn(self.conv(x)) if x.sum() > 0 else x

    with pytest.raises(ModelError, match="cannot trace Branchy"):
        fold_batchnorm(Branchy())


def test_folded_then_clustered_model_runs_what_is_stored():
    model = build_model("squeezenet_mnist", width_mult=0.25).eval()
    folded = fold_batchnorm(model)
    out, assignments = cluster_model(folded, ClusterConfig(bits=4))
    for name in assignments:
        assert distinct_nonzero(out.get_submodule(name).weight.detach()) <= 16


def test_round_biases_to_float16():
    from edgesqueeze.compress.cluster import round_biases

    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 8, 3), nn.ReLU(), nn.Conv2d(8, 4, 1, bias=False), nn.Flatten(), nn.Linear(4, 2))
    before = {k: v.clone() for k, v in model.state_dict().items()}
    assert round_biases(model, "float32") == 0 and all(torch.equal(v, model.state_dict()[k]) for k, v in before.items())
    assert round_biases(model, "float16", ["0"]) == 1  # only the layer named
    assert torch.equal(model[0].bias, before["0.bias"].half().float())
    assert torch.equal(model[4].bias, before["4.bias"])
    assert round_biases(model, "float16") == 1  # the linear's; the conv's is already a float16 value
    for k, v in model.state_dict().items():
        assert torch.equal(v, before[k]) if k.endswith("weight") else torch.equal(v, v.half().float()), k
    with torch.no_grad():
        model[4].bias[0] = 1e6
    with pytest.raises(RecipeError, match="layer 4 has a bias beyond float16's range"):
        round_biases(model, "float16")
