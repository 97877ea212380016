"""``edgesqueeze compress`` on a plain state_dict: lossless re-encoding and post-training (ptq).

The fixture is a miniature of the released ImageNet SqueezeNet: a small SqueezeNet trained
briefly on digits, pruned to 50% and shared through 8-bit codebooks, saved as a plain
``state_dict`` (no metadata), so the CLI needs ``--arch`` and ``--data`` as it does for the
ImageNet file. Unlike SqueezeNet 1.0 it has BatchNorm, which the ptq path folds first.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
import yaml
from click.testing import CliRunner

from edgesqueeze.cli import cli
from edgesqueeze.compress.cluster import cluster_model
from edgesqueeze.checkpoint import esq_loads as loads_model
from edgesqueeze.checkpoint import model_from_esq
from edgesqueeze.config.compress import ClusterConfig, CompressConfig, PruneConfig, PTQConfig
from edgesqueeze.models.layers import prunable_layers
from edgesqueeze.compress.prune import apply as prune
from edgesqueeze.data import load_dataset
from edgesqueeze.errors import RecipeError
from edgesqueeze.models import build_model
from edgesqueeze.recipe import load_recipe, recipe_from_dict
from edgesqueeze.checkpoint import state_digest
from edgesqueeze.evaluation import predict

ROOT = Path(__file__).resolve().parents[1]
ARCH = ["--arch", "squeezenet_mnist", "--num-classes", "10", "--set", "model.kwargs={width_mult: 0.5}"]
KWARGS = {"width_mult": 0.5}


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    """Tiny models gain nothing from threads, and on a busy machine they contend badly."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def run(*args):
    return CliRunner().invoke(cli, [str(a) for a in args], catch_exceptions=False)


@pytest.fixture(scope="module")
def digits():
    return load_dataset("digits")


@pytest.fixture(scope="module")
def plain_state_dict(digits, tmp_path_factory):
    """Trained three epochs (97% on the test split), pruned to 50% with BatchNorm statistics
    re-estimated (80%), shared at 8 bits. Seeded, one thread: the same weights every run."""
    x = (torch.from_numpy(digits.train_x).float() / 255 - digits.mean[0]) / digits.std[0]
    y = torch.from_numpy(digits.train_y)
    torch.manual_seed(0)
    model = build_model("squeezenet_mnist", **KWARGS)
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    gen = torch.Generator().manual_seed(0)
    model.train()
    for _ in range(3):
        for idx in torch.randperm(len(x), generator=gen).split(32):
            loss = F.cross_entropy(model(x[idx]), y[idx])
            opt.zero_grad()
            loss.backward()
            opt.step()
    pruned, _ = prune(model.eval(), PruneConfig(sparsity=0.5))
    for m in pruned.modules():  # cheaper than retraining: BN statistics of the pruned convs
        if isinstance(m, torch.nn.BatchNorm2d):
            m.reset_running_stats()
            m.momentum = None
    pruned.train()
    with torch.no_grad():
        for idx in torch.arange(len(x)).split(256):
            pruned(x[idx])
    shared, _ = cluster_model(pruned.eval(), ClusterConfig(bits=8))
    path = tmp_path_factory.mktemp("model") / "tiny.pt"
    torch.save({k: v.detach().clone() for k, v in shared.state_dict().items()}, path)
    return path


def _arch_recipe(tmp_path: Path, **compress) -> Path:
    """A recipe naming the model and data (so no --arch/--data is needed) and a compress section."""
    path = tmp_path / "recipe.yaml"
    path.write_text(yaml.safe_dump({
        "version": 1, "name": "tiny-ptq", "seed": 0,
        "model": {"arch": "squeezenet_mnist", "kwargs": KWARGS}, "data": {"dataset": "digits"},
        "compress": compress}))
    return path


@pytest.fixture(scope="module")
def lossless(plain_state_dict, tmp_path_factory):
    out = tmp_path_factory.mktemp("lossless")
    res = run("compress", plain_state_dict, *ARCH, "--data", "digits", "--out", out, "--no-progress")
    return res, out


def test_lossless_reencoding_is_bit_identical(plain_state_dict, lossless):
    res, out = lossless
    assert res.exit_code == 0, res.output
    assert "weights bit-identical to the source: yes" in res.output
    source = torch.load(plain_state_dict, map_location="cpu", weights_only=True)
    decoded, meta = loads_model((out / "model.esq").read_bytes())
    assert set(decoded) == set(source)
    for key, tensor in source.items():
        assert torch.equal(decoded[key], tensor), key
    report = json.loads((out / "report.json").read_text())
    assert report["mode"] == "lossless"
    ll = report["lossless"]
    assert ll["weights_identical"] is True
    assert ll["source_weights_sha256"] == ll["decoded_weights_sha256"] == state_digest(source)
    # the existing zeros and codebooks were found and kept
    assert ll["shared_tensors"] == ll["weight_tensors"] == len(prunable_layers(build_model("squeezenet_mnist", **KWARGS)))
    assert 0.45 < ll["density"] < 0.6 and ll["max_distinct_values"] <= 256
    assert report["evaluation"]["all"]["agreement"] == 1.0 and report["evaluation"]["all"]["kl"] == 0.0
    assert report["test"]["before"]["accuracy"] == report["test"]["after"]["accuracy"] > 0.5
    # the archive records what it was measured on, so later commands need no --arch/--data
    assert meta["arch"] == "squeezenet_mnist" and meta["dataset"] == "digits"
    assert meta["compress_mode"] == "lossless"
    for name in ("report.md", "accuracy_vs_size.png", "weights_histogram.png"):
        assert (out / name).is_file(), name
    assert "lossless re-encoding" in (out / "report.md").read_text()


def test_lossless_without_data_evaluates_nothing(plain_state_dict, lossless, tmp_path):
    res = run("compress", plain_state_dict, *ARCH, "--out", tmp_path, "--no-progress")
    assert res.exit_code == 0, res.output
    report = json.loads((tmp_path / "report.json").read_text())
    assert report["test"]["after"] == {"n": 0} and report["test"]["agreement"] is None
    assert report["lossless"]["weights_identical"] is True
    # same weights; only the metadata (no dataset recorded) differs
    with_data = json.loads((lossless[1] / "report.json").read_text())
    assert report["lossless"]["decoded_weights_sha256"] == with_data["lossless"]["decoded_weights_sha256"]


def test_ptq_meets_the_budget_and_reports_agreement(plain_state_dict, lossless, digits, tmp_path):
    lossless_bytes = json.loads((lossless[1] / "report.json").read_text())["totals"]["esq_bytes"]
    target = int(0.4 * lossless_bytes)  # below what k = 64 everywhere takes: the allocator must choose
    recipe = _arch_recipe(tmp_path, calibration={"images": 50, "split": "test"},
                          ptq={"min_bits": 3, "max_bits": 6, "levels_per_octave": 1, "max_iter": 30})
    out = tmp_path / "out"
    # no --arch, no --data: the recipe names both; the budget comes through --set
    res = run("compress", plain_state_dict, "-r", recipe, "--set", f"compress.ptq.target_bytes={target}",
              "--out", out, "--no-progress")
    assert res.exit_code == 0, res.output
    report = json.loads((out / "report.json").read_text())
    esq = (out / "model.esq").read_bytes()
    assert report["mode"] == "ptq" and len(esq) == report["totals"]["esq_bytes"] <= target
    assert report["ptq"]["within_target"] and report["ptq"]["mask_kept"]
    assert report["test"]["agreement"] == report["evaluation"]["held_out"]["agreement"]  # what the gate reads

    # calibration: 50 test images; held-out: the rest; "all": every test image, labelled in-sample
    cal, ev = report["calibration"], report["evaluation"]
    n_test = len(digits.test_y)
    assert cal["split"] == "test" and len(cal["indices"]) == cal["images"] == 50
    assert ev["held_out"]["n"] == n_test - 50 and ev["all"]["n"] == n_test
    assert "in-sample" in ev["all"]["label"] and "not used for calibration" in ev["held_out"]["label"]
    for e in ev.values():
        assert set(e) >= {"top1_original", "top1_compressed", "agreement", "kl"}
        assert 0.5 < e["agreement"] <= 1.0
    assert "held-out" in res.output and "in-sample" in (out / "report.md").read_text()

    # The archive decodes to exactly the weights that were evaluated: re-scoring the decoded
    # model against the original on the held-out images gives the reported agreement.
    decoded, meta = model_from_esq(out / "model.esq")
    original = build_model("squeezenet_mnist", **KWARGS)
    original.load_state_dict(torch.load(plain_state_dict, map_location="cpu", weights_only=True))
    original.eval()
    keep = np.ones(n_test, dtype=bool)
    keep[cal["indices"]] = False
    x = digits.test_x[keep]
    a = predict(original, x, mean=digits.mean, std=digits.std).argmax(1)
    b = predict(decoded, x, mean=digits.mean, std=digits.std).argmax(1)
    assert float((a == b).float().mean()) == pytest.approx(ev["held_out"]["agreement"])
    assert meta["weights_sha256"] == state_digest(decoded.state_dict())
    for name, module in prunable_layers(decoded).items():
        w, w0 = module.weight, original.get_submodule(name).weight
        assert torch.equal(w != 0, w0 != 0), name  # the existing mask is kept
        assert torch.unique(w[w != 0]).numel() <= 2 ** 6, name


def test_a_target_out_of_reach_exits_1_and_keeps_the_archive(plain_state_dict, lossless, tmp_path):
    """A target below what the smallest codebooks take is a size budget the recipe asked for
    and did not get: exit 1 (as a broken budget), not 0 with a warning; the archive and its
    report are still written and say so."""
    lossless_bytes = json.loads((lossless[1] / "report.json").read_text())["totals"]["esq_bytes"]
    target = lossless_bytes // 20  # below k = 2**min_bits everywhere
    recipe = _arch_recipe(tmp_path, calibration={"images": 20, "split": "test"},
                          ptq={"target_bytes": target, "min_bits": 4, "max_bits": 5, "levels_per_octave": 1,
                               "max_iter": 10})
    out = tmp_path / "out"
    res = run("compress", plain_state_dict, "-r", recipe, "--out", out, "--no-progress")
    assert res.exit_code == 1, res.output
    last = res.output.strip().splitlines()[-1]
    assert last.startswith("error:") and f"over compress.ptq.target_bytes ({target:,} B)" in last, res.output
    assert "min_bits" in last
    report = json.loads((out / "report.json").read_text())
    assert report["ptq"]["within_target"] is False
    assert (out / "model.esq").stat().st_size == report["totals"]["esq_bytes"] > target
    assert "NOT met" in (out / "report.md").read_text()


def test_an_interrupt_before_the_report_leaves_no_archive(plain_state_dict, tmp_path, monkeypatch):
    """The .esq was written as soon as it was encoded, and the held-out evaluation and the
    report came after: Ctrl-C there left a model.esq with no report beside it. The archive is
    now written last, after its report."""
    import edgesqueeze.compress.stages as stages

    def interrupted(*_a, **_k):
        raise KeyboardInterrupt

    monkeypatch.setattr(stages, "evaluate_held_out", interrupted)
    recipe = _arch_recipe(tmp_path, calibration={"images": 20, "split": "test"},
                          ptq={"target_bytes": 4000, "min_bits": 4, "max_bits": 5, "levels_per_octave": 1,
                               "max_iter": 10})
    out = tmp_path / "out"
    res = CliRunner().invoke(cli, ["compress", str(plain_state_dict), "-r", str(recipe), "--out", str(out),
                                   "--no-progress"])
    assert res.exit_code != 0 and "interrupt" in res.output.lower(), res.output
    left = sorted(p.name for p in out.iterdir()) if out.exists() else []
    assert "model.esq" not in left and "report.json" not in left, left
    assert not [name for name in left if name.endswith(".tmp")], left


def test_bad_inputs_exit_2_with_one_line(plain_state_dict, tmp_path):
    def one_error_line(res, text):
        assert res.exit_code == 2, res.output
        lines = [ln for ln in res.output.splitlines() if ln.strip()]
        assert len(lines) == 1 and lines[0].startswith("error:") and text in lines[0], res.output
        assert not (tmp_path / "model.esq").exists()

    one_error_line(run("compress", plain_state_dict, "--out", tmp_path), "pass --arch NAME")
    one_error_line(run("compress", plain_state_dict, *ARCH, "--set", "compress.ptq.target_bytes=1000",
                       "--out", tmp_path), "pass --data NAME")
    one_error_line(run("compress", plain_state_dict, *ARCH, "--data", "digits", "--set",
                       "compress.ptq.target_bytes=1000", "--set", "compress.prune.sparsity=0.5", "--out", tmp_path),
                   "compress.ptq: cannot be combined with compress.prune")
    recipe = _arch_recipe(tmp_path, ptq={"target_bytes": 1000}, cluster={"bits": 4})
    one_error_line(run("compress", plain_state_dict, "-r", recipe, "--out", tmp_path),
                   "compress.ptq: cannot be combined with compress.cluster")
    one_error_line(run("compress", plain_state_dict, "-r", recipe, "--set", "compress.cluster=null",
                       "--set", "compress.ptq.bits=9", "--out", tmp_path), "--set compress.ptq.bits=9: must be >= 1 and <= 8, got 9")


def test_config_modes_and_the_imagenet_recipe():
    assert CompressConfig().mode == "lossless"
    assert CompressConfig(ptq=PTQConfig()).mode == "ptq"
    assert CompressConfig(prune=PruneConfig()).mode == "retrain"
    with pytest.raises(RecipeError, match="compress.ptq: cannot be combined with compress.prune"):
        CompressConfig(ptq=PTQConfig(), prune=PruneConfig())
    with pytest.raises(RecipeError, match=r"compress.calibration.split: must be one of 'auto', 'train', 'test'"):
        recipe_from_dict({"version": 1, "compress": {"calibration": {"split": "val"}}})
    recipe = load_recipe(ROOT / "recipes/squeezenet-imagenet.yaml")
    assert recipe.model.arch == "squeezenet1_0" and recipe.data.dataset == "imagenet-sample"
    c = recipe.compress
    assert c.mode == "ptq" and c.ptq.target_bytes == 466_000 and c.calibration.images == 50
    assert (c.ptq.allocation, c.ptq.weighting, c.ptq.gptq, c.ptq.bias_correction, c.ptq.distill_steps,
            c.ptq.codebook_dtype) == ("fisher", "activation", True, True, 0, "float16")
    again = load_recipe(ROOT / "recipes/squeezenet-imagenet.yaml", ["compress.ptq.target_bytes=480000"])
    assert again.compress.ptq.target_bytes == 480_000


def test_help_has_an_imagenet_example():
    res = run("compress", "--help")
    assert res.exit_code == 0
    assert "--arch squeezenet1_0" in res.output and "imagenet-sample" in res.output


def test_export_calibrates_on_the_images_compress_did_and_leaves_its_held_out_unseen():
    """A dataset with only a test split (the ImageNet sample): compress calibrates on some
    test images and scores the rest; an int8 export with the same seed must draw the same
    images, or its activation ranges would come from images the held-out score counts."""
    from types import SimpleNamespace

    from edgesqueeze.compress.stages import calibration_split
    from edgesqueeze.config.compress import CalibrationConfig
    from edgesqueeze.export import calibration_images

    g = np.random.default_rng(0)
    test_x = g.integers(0, 256, (100, 3, 4, 4), dtype=np.uint8)
    test_y = np.arange(100) % 10
    empty = test_x[:0]
    for seed in range(3):
        run = SimpleNamespace(config=SimpleNamespace(calibration=CalibrationConfig(images=50, split="auto")),
                              inp=SimpleNamespace(ds=SimpleNamespace(name="t", test_x=test_x, test_y=test_y),
                                                  train=(empty, test_y[:0])),
                              seed=seed, log=print)
        calib, split, idx, held_x, _ = calibration_split(run)
        assert split == "test" and len(calib) == 50 and len(held_x) == 50
        assert np.array_equal(calibration_images(test_x, 50, seed=seed), calib)
        seen = {x.tobytes() for x in calib}
        assert not any(x.tobytes() in seen for x in held_x)
