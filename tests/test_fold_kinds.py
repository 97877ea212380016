"""BatchNorm folding beyond Conv2d: Conv1d / Conv3d into their BatchNorms, and a Linear head
into the BatchNorm1d after it when its output is [N, features]; the pairs an archive folded
are recorded (meta.folded_layers) and folded again on loading, and archives from before they
were recorded still load (Conv2d pairs only)."""

from __future__ import annotations

import json
import textwrap

import pytest
import torch
from click.testing import CliRunner
from torch import nn

from edgesqueeze.errors import EdgesqueezeError
from edgesqueeze.models.fold import check_pairs, conv_bn_pairs, fold_batchnorm, legacy_pairs


def _settle(model: nn.Module, *inputs: torch.Tensor) -> nn.Module:
    """Non-trivial running statistics and affine parameters, then eval mode."""
    torch.manual_seed(0)
    for m in model.modules():
        if isinstance(m, nn.modules.batchnorm._BatchNorm):
            with torch.no_grad():
                m.weight.uniform_(0.5, 1.5)
                m.bias.uniform_(-0.2, 0.2)
            m.momentum = None
    model.train()
    with torch.no_grad():
        for x in inputs:
            model(x)
    return model.eval()


class Mixed(nn.Module):
    """Conv1d-BN1d, Conv2d-BN2d, a Linear-BN1d head on [N, F], and a Linear-BN1d on [N, L, F]
    with L == F: BatchNorm1d normalizes L there, not the Linear's features: must not fold."""

    def __init__(self):
        super().__init__()
        self.c1, self.b1 = nn.Conv1d(2, 4, 3, padding=1), nn.BatchNorm1d(4)
        self.c2, self.b2 = nn.Conv2d(1, 4, 3, padding=1), nn.BatchNorm2d(4)
        self.seq, self.seq_bn = nn.Linear(4, 4), nn.BatchNorm1d(4)  # on [N, 4 (L), 4 (F)]
        self.fc, self.fc_bn = nn.Linear(8, 6), nn.BatchNorm1d(6)
        self.out = nn.Linear(6, 3)

    def forward(self, x):  # x: [N, 1, 4, 4]
        a = self.b2(self.c2(x)).relu()                       # [N, 4, 4, 4]
        s = self.seq_bn(self.seq(a.mean(1)))                # [N, 4, 4]: rows of 4 features
        t = self.b1(self.c1(s[:, :2]))                      # [N, 4, 4]
        h = torch.cat([a.mean((2, 3)), t.mean(2)], 1)       # [N, 8]
        return self.out(self.fc_bn(self.fc(h)).relu())


def test_which_pairs_fold_and_folding_keeps_outputs():
    model = _settle(Mixed(), *[torch.randn(16, 1, 4, 4) for _ in range(3)])
    without = conv_bn_pairs(model)
    assert sorted(without) == [("c1", "b1"), ("c2", "b2")]  # no example: no Linear pair is proven safe
    example = torch.zeros(2, 1, 4, 4)
    pairs = conv_bn_pairs(model, example)
    assert sorted(pairs) == [("c1", "b1"), ("c2", "b2"), ("fc", "fc_bn")]  # not ("seq", "seq_bn")
    folded = fold_batchnorm(model, example=example)
    assert isinstance(folded.fc_bn, nn.Identity) and isinstance(folded.seq_bn, nn.BatchNorm1d)
    x = torch.randn(5, 1, 4, 4)
    with torch.no_grad():
        torch.testing.assert_close(folded(x), model(x), atol=1e-5, rtol=0)
    # folding the wrongly shaped pair would change the outputs: what the shape check prevents
    wrong = fold_batchnorm(model, [("seq", "seq_bn")])
    with torch.no_grad():
        assert not torch.allclose(wrong(x), model(x), atol=1e-3)
    assert legacy_pairs(model) == [("c2", "b2")]


def test_recorded_pairs_are_checked_against_the_model():
    model = Mixed()
    assert check_pairs(model, [["fc", "fc_bn"]], source="m.esq") == [("fc", "fc_bn")]
    for bad in ([["fc", "b2"]], [["out", "fc_bn"]], [["nope", "fc_bn"]], [["fc"]], "fc", [[1, 2]]):
        with pytest.raises(EdgesqueezeError, match="m.esq: meta: folded_layers"):
            check_pairs(model, bad, source="m.esq")


HEAD = textwrap.dedent('''
    import torch
    from torch import nn


    class HeadBN(nn.Module):
        """Conv-BN features, then Linear -> BatchNorm1d -> ReLU -> Linear: a common head."""

        def __init__(self, num_classes=10, in_channels=1):
            super().__init__()
            self.features = nn.Sequential(nn.Conv2d(in_channels, 16, 3, padding=1), nn.BatchNorm2d(16), nn.ReLU(),
                                          nn.MaxPool2d(2), nn.Conv2d(16, 32, 3, padding=1), nn.BatchNorm2d(32),
                                          nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten())
            self.fc = nn.Linear(32, 64)
            self.bn = nn.BatchNorm1d(64)
            self.out = nn.Linear(64, num_classes)

        def forward(self, x):
            return self.out(torch.relu(self.bn(self.fc(self.features(x)))))
''')


def test_a_linear_batchnorm_head_is_folded_before_clustering_and_loads_again(tmp_path, monkeypatch):
    """Clustering after folding: the archive's Linear holds its 2**bits shared values, and so
    does every export (before, the BatchNorm was folded at export and rescaled each row)."""
    from edgesqueeze.checkpoint import load_model, model_from_esq
    from edgesqueeze.cli import cli
    from edgesqueeze.export import is_weight_shared
    from edgesqueeze.format import container

    (tmp_path / "headnet.py").write_text(HEAD)
    monkeypatch.chdir(tmp_path)
    arch = "headnet.py:HeadBN"
    from edgesqueeze.models import build_model

    torch.manual_seed(0)
    model = _settle(build_model(arch, num_classes=10), *[torch.randn(32, 1, 8, 8) for _ in range(3)])
    torch.save(model.state_dict(), tmp_path / "head.pt")
    recipe = tmp_path / "r.yaml"
    recipe.write_text("version: 1\nname: head\ndata: {dataset: digits}\n"
                      "compress: {cluster: {bits: 4}, cluster_finetune: {epochs: 0}}\n")

    def compress(out, *opts):
        res = CliRunner().invoke(cli, ["compress", "head.pt", "--arch", arch, "-r", str(recipe), "--out", out,
                                       "--no-progress", *opts], catch_exceptions=False)
        assert res.exit_code == 0, res.output
        return tmp_path / out / "model.esq"

    # the default (fold_batchnorm: true): the convs' BatchNorms only, which an archive without
    # folded_layers means (so it is left out); export says what the head costs
    kept = compress("kept")
    kept_meta = container.loads(kept.read_bytes()).meta
    assert kept_meta["folded_batchnorm"] is True and "folded_layers" not in kept_meta
    assert isinstance(load_model(kept, arch=arch).model.bn, nn.BatchNorm1d)
    res = CliRunner().invoke(cli, ["export", str(kept), "--arch", arch, "-f", "onnx-int8", "--out", "kept-export"],
                             catch_exceptions=False)
    assert res.exit_code == 0 and "note: fc's BatchNorm1d (bn) is folded into it now" in res.output, res.output

    esq = compress("c", "--set", "compress.fold_batchnorm=all")
    meta = container.loads(esq.read_bytes()).meta
    assert meta["folded_batchnorm"] is True
    assert sorted(map(tuple, meta["folded_layers"])) == sorted([("features.0", "features.1"),
                                                                ("features.4", "features.5"), ("fc", "bn")])
    loaded = load_model(esq, arch=arch).model
    assert not any(isinstance(m, nn.modules.batchnorm._BatchNorm) for m in loaded.modules())
    from edgesqueeze.evaluation import describe_file

    info = describe_file(esq, arch=arch)  # info's count is below 'models': says why
    bn = sum(p.numel() for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)
             for p in m.parameters())
    assert info["parameters"] == sum(p.numel() for p in model.parameters()) - bn
    assert "3 BatchNorm layers folded into the layers before them" in info["note"]
    assert "note" not in describe_file(tmp_path / "head.pt", arch=arch)
    assert len(torch.unique(loaded.fc.weight.detach()[loaded.fc.weight != 0])) <= 16 and is_weight_shared(loaded)
    x = torch.randn(4, 1, 8, 8)
    decoded, _ = model_from_esq(esq, arch=arch)
    with torch.no_grad():
        torch.testing.assert_close(decoded(x), loaded(x), atol=0, rtol=0)

    # an archive that names a pair its model does not have is one error naming the file
    bad_meta = {**meta, "folded_layers": [["fc", "features.1"]]}
    archive = container.loads(esq.read_bytes())
    bad = tmp_path / "bad.esq"
    bad.write_bytes(container.dumps(bad_meta, [(k, d, i) for k, (d, i) in archive.sections.items()]))
    with pytest.raises(EdgesqueezeError, match=r"bad.esq: meta: folded_layers: \['fc', 'features.1'\]"):
        model_from_esq(bad, arch=arch)
    assert json.dumps(meta["folded_layers"])  # plain JSON in the archive


def test_the_retraining_warning_names_a_folded_head_with_a_large_scale():
    from types import SimpleNamespace

    from edgesqueeze.compress.stages import _head_hint

    assert _head_hint(SimpleNamespace(folded_head_scales={})) == ""
    assert _head_hint(SimpleNamespace(folded_head_scales={"fc": 1.5})) == ""  # a mild scale: nothing to blame
    hint = _head_hint(SimpleNamespace(folded_head_scales={"fc": 68.2, "fc2": 9.0}))
    assert hint.startswith("the BatchNorm1d folded into fc scales its outputs up to 68x")
    assert "compress.fold_batchnorm: true" in hint


class TiedConvBN(nn.Module):
    """One conv applied twice, each call with its own BatchNorm, beside a plain conv+BN pair."""

    def __init__(self):
        super().__init__()
        self.stem, self.stem_bn = nn.Conv2d(1, 4, 3, padding=1), nn.BatchNorm2d(4)
        self.block, self.bna, self.bnb = nn.Conv2d(4, 4, 3, padding=1), nn.BatchNorm2d(4), nn.BatchNorm2d(4)

    def forward(self, x):
        x = torch.relu(self.stem_bn(self.stem(x)))
        return self.bnb(self.block(torch.relu(self.bna(self.block(x)))))


def test_a_conv_applied_twice_keeps_its_batchnorms_and_compress_says_so():
    """One fold into the conv's one weight would change both calls: the pair is skipped, and
    the fold stage says which conv and BatchNorms it left (it said nothing)."""
    import warnings
    from types import SimpleNamespace

    from edgesqueeze.compress.stages import fold
    from edgesqueeze.errors import Note

    model = _settle(TiedConvBN(), torch.randn(8, 1, 6, 6))
    tied: dict = {}
    assert conv_bn_pairs(model, tied=tied) == [("stem", "stem_bn")]
    assert tied == {"block": ["bna", "bnb"]}
    run = SimpleNamespace(inp=SimpleNamespace(meta={}, ds=None), config=SimpleNamespace(fold_batchnorm=True),
                          folded_head_scales={}, folded_layers=None, record=lambda *a, **k: None)
    with warnings.catch_warnings(record=True) as seen:
        warnings.simplefilter("always")
        folded, _ = fold(run, model)
    notes = [str(w.message) for w in seen if issubclass(w.category, Note)]
    assert notes == ["fold_batchnorm: block -> bna, bnb not folded: block or its BatchNorm is applied more "
                     "than once, and a fold into one weight would change every call"], notes
    assert isinstance(folded.stem_bn, nn.Identity) and isinstance(folded.bna, nn.BatchNorm2d)
