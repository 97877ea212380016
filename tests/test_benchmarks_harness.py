"""benchmarks/run.py, the harness behind `make bench` and docs/BENCHMARKS.md."""

from __future__ import annotations

import importlib.util
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def _run_module():
    spec = importlib.util.spec_from_file_location("bench_run", ROOT / "benchmarks" / "run.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_benchmarks_md_is_what_the_records_and_notes_render():
    """docs/BENCHMARKS.md is generated: an edit to notes.md or a record without
    `benchmarks/run.py --report` leaves it stale."""
    mod = _run_module()
    assert (ROOT / "docs" / "BENCHMARKS.md").read_text() == mod.report() + "\n", \
        "docs/BENCHMARKS.md is stale: run `python benchmarks/run.py --report`"


def test_every_record_is_rendered_or_listed_with_its_machine():
    """Audit: four records (the experiment scripts' logs) were in no section, though the README
    says every command, date and machine is in BENCHMARKS.md."""
    text = (ROOT / "docs" / "BENCHMARKS.md").read_text()
    mod = _run_module()
    mod.report()
    for path in (ROOT / "benchmarks" / "results").glob("*.json"):
        assert path.name in mod._RENDERED or path.name.startswith("device_") or \
            f"`benchmarks/results/{path.name}`" in text, path.name


def test_an_unknown_part_is_refused_before_any_part_runs():
    """Audit: `--only mnist,typo` trained MNIST for hours before saying 'unknown part'."""
    p = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "run.py"), "--only", "mnist,typo"],
                       capture_output=True, text=True, timeout=120)
    assert p.returncode == 1 and "unknown part 'typo'" in p.stderr, (p.returncode, p.stderr[-500:])
    assert "[bench]" not in p.stdout and "mnist" not in p.stdout, p.stdout[-500:]


def test_the_demo_record_keeps_a_row_for_each_other_kind_of_cpu(tmp_path, monkeypatch):
    """A demo run on another CPU kept only the newest machine's numbers; docs/BENCHMARKS.md is to
    keep a row per kind of CPU. The newest record of each other CPU stays, the same CPU's is replaced."""
    import json

    mod = _run_module()
    monkeypatch.setattr(mod, "RESULTS", tmp_path)

    def rec(cpu, kernels, wall):
        return {"machine": {"cpu": cpu, "int8_kernels": kernels, "cores": 2, "torch": "2.13.0", "date": "2026-12-06"},
                "command": "python benchmarks/run.py --only demo", "wall_s": wall,
                "test_line": f"test accuracy at {wall}", "compress_line": None}

    saved = {}
    monkeypatch.setattr(mod, "save", lambda part, payload: saved.update(payload))
    here = {"cpu": "Zen 3", "int8_kernels": "x86 AVX2 (no VNNI): saturates"}
    monkeypatch.setattr(mod, "machine", lambda: {**here, "cores": 2, "torch": "2.13.0", "date": "2026-12-07"})

    class Done:
        returncode, stdout, stderr = 0, "test accuracy 98.89%\nmodel.esq: 17,330 bytes\n", ""

    monkeypatch.setattr(mod.subprocess, "run", lambda *a, **k: Done())
    old = rec("Intel", "x86 AVX-512 VNNI: exact", 124.1)
    old["other_cpus"] = [rec("Zen 3", "x86 AVX2 (no VNNI): saturates", 300.0), rec("Zen 5", "x86 AVX-512 VNNI: exact", 150.0)]
    (tmp_path / "demo.json").write_text(json.dumps(old))
    mod.part_demo(None)
    assert [o["machine"]["cpu"] for o in saved["other_cpus"]] == ["Intel", "Zen 5"]  # this CPU's old row replaced
    (tmp_path / "demo.json").write_text(json.dumps({**rec("Zen 3", here["int8_kernels"], 221.0), **saved}))
    text = mod.report()
    assert "- on Intel (x86 AVX-512 VNNI: exact)" in text and "**124 s**" in text and "**150 s**" in text


def test_an_int8_record_of_another_cpu_gets_its_own_section(tmp_path, monkeypatch):
    """int8 files compute by CPU: an int8_mnist record measured on another CPU is a second
    section titled with that CPU, beside the first record, not in place of it (nor unrendered)."""
    import json

    mod = _run_module()
    monkeypatch.setattr(mod, "RESULTS", tmp_path)

    def rec(cpu, kernels, acc):
        return {"machine": {"cpu": cpu, "int8_kernels": kernels, "cores": 2, "date": "2026-12-07 02:09 UTC"},
                "command": "python benchmarks/run.py --record-verify ...", "verify_command": f"verify on {cpu}",
                "artifacts": [{"path": "m.int8.tflite", "format": "tflite-int8", "runtime": "ai-edge-litert",
                               "bytes": 96144, "gzip_bytes": 75190, "accuracy": acc, "agreement": 0.9998}]}

    (tmp_path / "int8_mnist.json").write_text(json.dumps(rec("Intel", None, 0.9962)))
    (tmp_path / "int8_mnist_zen5_vnni.json").write_text(json.dumps(rec("Zen 5", "x86 AVX-512 VNNI: exact", 0.9964)))
    text = mod.report()
    assert "## INT8 and fp32 files, MNIST (seed-0 model), through their runtimes\n" in text
    assert "## INT8 and fp32 files, MNIST (seed-0 model), through their runtimes: Zen 5, x86 AVX-512 VNNI, 2026-12-07" in text
    assert "verify on Intel" in text and "verify on Zen 5" in text and "| 99.64% |" in text
    assert {"int8_mnist.json", "int8_mnist_zen5_vnni.json"} <= mod._RENDERED


def test_a_compress_record_of_another_cpu_gets_its_own_section(tmp_path, monkeypatch):
    """The .esq's bytes depend on the CPU that trained and retrained it: a compress_mnist record
    from another CPU is its own section, titled with that CPU, beside the first."""
    import json

    mod = _run_module()
    monkeypatch.setattr(mod, "RESULTS", tmp_path)

    def rec(cpu, kernels, esq_bytes):
        return {"machine": {"cpu": cpu, "int8_kernels": kernels, "cores": 2, "date": "2026-12-07 02:11 UTC"},
                "command": "python benchmarks/run.py --record ...", "compress_command": f"compress on {cpu}",
                "esq_bytes": esq_bytes, "ratio": 18.3, "density": 0.174, "test_before": 0.9962, "test_after": 0.995,
                "drop_points": 0.12, "huffman_over_entropy": 1.02, "baselines": {"xz_9e": 18008},
                "stages": [{"stage": "esq", "val_accuracy": 0.9952, "bytes": esq_bytes}], "wall_s": 424.5}

    (tmp_path / "compress_mnist.json").write_text(json.dumps(rec("Intel", None, 15228)))
    (tmp_path / "compress_mnist_zen5_vnni.json").write_text(json.dumps(rec("Zen 5", "x86 AVX-512 VNNI: exact", 15243)))
    text = mod.report()
    assert "## Deep Compression, MNIST (`recipes/squeezenet-mnist.yaml`, seed-0 model)\n" in text
    assert ("## Deep Compression, MNIST (`recipes/squeezenet-mnist.yaml`, seed-0 model): Zen 5, "
            "x86 AVX-512 VNNI, 2026-12-07") in text
    assert "**15,228 B**" in text and "**15,243 B**" in text and "compress on Zen 5" in text


def test_a_training_run_made_by_hand_is_recorded_from_its_own_files(tmp_path, monkeypatch):
    """`--record-train` records a finished `edgesqueeze train` run (the CIFAR-10 90-minute run
    is one) from its summary.json and metrics.json, and refuses a run that stopped early."""
    import json
    import shutil

    from edgesqueeze.recipe import load_recipe
    from edgesqueeze.train import fit

    mod = _run_module()
    monkeypatch.setattr(mod, "RESULTS", tmp_path / "results")
    run = tmp_path / "run"
    res = fit(load_recipe(ROOT / "recipes" / "squeezenet-digits.yaml", ["train.epochs=2"]), out_dir=run,
              progress=False, log=lambda _: None)
    mod.record_train("cifar_90min", run, "edgesqueeze train -r recipes/squeezenet-digits.yaml --set train.epochs=2")
    rec = json.loads((tmp_path / "results" / "cifar_90min.json").read_text())
    row = rec["runs"][0]
    assert row["test_accuracy"] == res.test["accuracy"] and row["epochs"] == 2 and len(row["epoch_s"]) == 2
    assert row["train_wall_s"] == round(sum(h["epoch_s"] for h in res.history), 1)
    assert row["params"] == sum(p.numel() for p in res.model.parameters())
    assert rec["train_command"].endswith("--set train.epochs=2") and rec["machine"]["cpu"]
    assert row["precision"] == "fp32" and "bf16_isa" not in row
    text = mod.report()
    assert "### The 88%-in-90-minutes target" in text and f"**{mod._pct(res.test['accuracy'])}**" in text
    verdict = "met" if row["test_accuracy"] >= 0.88 and row["total_wall_s"] <= 90 * 60 else "not met"
    assert f"| **{verdict}** |" in text

    from edgesqueeze.device import native_bf16

    if native_bf16():  # a bf16 run is recorded with what made bf16 fast, and rendered beside
        bf16 = tmp_path / "bf16"
        fit(load_recipe(ROOT / "recipes" / "squeezenet-digits.yaml", ["train.epochs=1", "train.precision=bf16"]),
            out_dir=bf16, progress=False, log=lambda _: None)
        mod.record_train("cifar_90min_bf16", bf16, "edgesqueeze train ... --set train.precision=bf16")
        row16 = json.loads((tmp_path / "results" / "cifar_90min_bf16.json").read_text())["runs"][0]
        assert row16["precision"] == "bf16" and row16["bf16_isa"] == native_bf16()
        text = mod.report()
        assert f"| bf16 ({native_bf16()}) | 1 |" in text and "| fp32 | 2 |" in text

    stopped = tmp_path / "stopped"
    shutil.copytree(run, stopped)
    (stopped / "metrics.json").write_text(json.dumps(res.history[:1]))
    with pytest.raises(SystemExit, match="stopped after epoch 1 of 2"):
        mod.record_train("cifar_90min", stopped, "x")
