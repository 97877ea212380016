"""verify.md and its plots from synthetic rows (pure rendering; the real run is in test_gate)."""

from __future__ import annotations

import doctest
import sys

import pytest
from click.testing import CliRunner

from edgesqueeze import verify_report as vr
from edgesqueeze.budget import check
from edgesqueeze.config.budget import Budget
from edgesqueeze.cli import cli

PNG = b"\x89PNG\r\n\x1a\n"


def _row(path, fmt, size, gz, acc, agr, *, latency=None, error=None, runtime="onnxruntime"):
    return {"path": str(path), "format": fmt, "runtime": runtime, "bytes": size, "gzip_bytes": gz, "n": 360,
            "accuracy": acc, "agreement": agr, "reference_accuracy": 0.975, "decode_check": None,
            "latency_ms": latency, "error": error}


@pytest.fixture
def report(tmp_path):
    export = tmp_path / "export"
    rows = [
        _row(tmp_path / "model.pt", "pt", 3_012_345, 2_790_001, 0.975, 1.0, latency=1.5, runtime="pytorch"),
        _row(tmp_path / "compressed" / "model.esq", "esq", 20_480, 20_301, 0.9694, 0.9917, latency=1.6,
             runtime="edgesqueeze .esq decoder + pytorch"),
        _row(export / "model.int8.onnx", "onnx-int8", 121_000, 98_000, 0.9667, 0.9861, latency=0.41),
        _row(export / "model.int8.tflite", "tflite-int8", 500, None, None, None,
             error=f"{export / 'model.int8.tflite'}: RuntimeError: truncated | bad flatbuffer",
             runtime=None),
    ]
    rows[3]["n"] = 0
    return {"dataset": None, "datasets": ["digits"], "reference": str(tmp_path / "model.pt"),
            "reference_accuracy": 0.975, "artifacts": rows}


def _table_rows(md: str) -> list[str]:
    section = md.split("## Artifacts", 1)[1].split("\n## ", 1)[0]
    return [line for line in section.splitlines()
            if line.startswith("| ") and not line.startswith(("| format", "| ---"))]


def test_docstring_examples():
    assert doctest.testmod(vr).failed == 0


def test_write_report_table_plots_and_machine(report, tmp_path):
    machine = {"cpu": "Test CPU @ 2GHz", "cores": 2, "threads": None, "date": "2026-11-23 18:00 UTC"}
    out = vr.write_report(tmp_path / "verify.json", report, machine=machine)
    assert out["markdown"] == tmp_path / "verify.md" and out["note"] is None
    assert [p.name for p in out["plots"]] == ["size_by_format.png", "accuracy_vs_size.png"]
    for p in out["plots"]:
        assert p.read_bytes()[:8] == PNG and p.stat().st_size > 5000
    assert not list(tmp_path.glob(".*.tmp"))  # atomic writes leave no temporaries
    md = out["markdown"].read_text()
    rows = _table_rows(md)
    assert len(rows) == 4
    assert rows[0].startswith("| pt | `model.pt` | 3,012,345 B (3.0 MB) | 2,790,001 B (2.8 MB) | 97.50% | 100.00% |")
    assert "| 1.50 | pytorch |" in rows[0]
    assert rows[1].startswith("| esq | `compressed/model.esq` | 20,480 B (20.5 kB) |")  # relative to the report
    assert "| onnx-int8 | `export/model.int8.onnx` |" in rows[2] and "| 0.41 | onnxruntime |" in rows[2]
    # the failed artifact: an error in its row and its message below, pipes escaped
    assert "**error**" in rows[3] and "97" not in rows[3]
    assert "Not evaluated (1; never a pass)" in md and "truncated \\| bad flatbuffer" in md
    assert "latency p50 (ms)" in md and "digits; 360 test images" in md
    assert "float reference: `model.pt`, test accuracy 97.50%" in md
    assert "machine: Test CPU @ 2GHz, 2 cores, threads each runtime's default (onnxruntime one per physical core, LiteRT 1), 2026-11-23 18:00 UTC" in md
    assert "![size by format](size_by_format.png)" in md
    assert "![accuracy against size](accuracy_vs_size.png)" in md
    assert "## Budget" not in md  # no budget given


def test_error_rows_are_not_plotted_and_the_reference_is_marked(report):
    assert [s[0] for s in vr.size_series(report["artifacts"])] == ["pt", "esq", "onnx-int8"]
    points = vr.accuracy_points(report)
    assert [(p[0], p[3]) for p in points] == [("pt", True), ("esq", False), ("onnx-int8", False)]
    # two files of one format are told apart by name
    twin = dict(report["artifacts"][2], path="other/model.int8.onnx")
    labels = [s[0] for s in vr.size_series(report["artifacts"] + [twin])]
    assert labels[2:] == ["onnx-int8\nexport/model.int8.onnx", "onnx-int8\nother/model.int8.onnx"]
    renamed = dict(twin, path="other/model2.int8.onnx")
    assert [s[0] for s in vr.size_series([report["artifacts"][2], renamed])] == [
        "onnx-int8\nmodel.int8.onnx", "onnx-int8\nmodel2.int8.onnx"]


def test_budget_verdicts_and_no_latency(report, tmp_path):
    for r in report["artifacts"]:
        r["latency_ms"] = None
    verdicts = check(report["artifacts"], Budget(max_size=100_000, min_accuracy=0.9))
    md = vr.markdown(report, verdicts=verdicts, folder=tmp_path)
    assert "## Budget: could not measure everything" in md
    assert "❌ FAIL" in md and "⚠️ not measured" in md and "✅ pass" in md
    assert "latency p50" not in md and "latency: not measured (`edgesqueeze verify --latency`)" in md
    assert len(_table_rows(md)) == 4
    # a verdict inside its sampling noise: the note follows the verdicts (verify passes budget.noise_notes')
    note = "note: export/model.int8.onnx: within the sampling noise of its 100 test images: ..."
    md = vr.markdown(report, verdicts=verdicts, folder=tmp_path, notes=[note])
    assert md.index("## Budget") < md.index(f"- {note}") < md.index("## Plots")
    assert f"- {note}" not in vr.markdown(report, verdicts=verdicts, folder=tmp_path)


def test_no_plots_without_matplotlib(report, tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "matplotlib", None)  # import matplotlib raises ImportError
    out = vr.write_report(tmp_path / "verify.json", report)
    assert out["plots"] == [] and "matplotlib is not installed" in out["note"]
    assert not list(tmp_path.glob("*.png"))
    md = out["markdown"].read_text()
    assert "_No plots: matplotlib is not installed" in md and "![" not in md


def test_no_plots_when_nothing_was_measured(report, tmp_path):
    report["artifacts"] = [report["artifacts"][3]]
    out = vr.write_report(tmp_path / "gate.json", report)
    assert out["markdown"] == tmp_path / "gate.md" and out["plots"] == []
    assert out["note"] == "No plots: no artifact was measured."
    assert not list(tmp_path.glob("*.png"))
    assert len(_table_rows(out["markdown"].read_text())) == 1


def test_an_earlier_runs_plots_do_not_stay_beside_a_report_that_has_none(report, tmp_path):
    """A rerun into the same folder that measured nothing left the earlier run's plots beside
    the new verify.md, showing other files' numbers."""
    first = vr.write_report(tmp_path / "verify.json", report)
    assert len(first["plots"]) == 2 and all(p.is_file() for p in first["plots"])
    report["artifacts"] = [report["artifacts"][3]]
    again = vr.write_report(tmp_path / "verify.json", report)
    assert again["plots"] == [] and not list(tmp_path.glob("*.png"))


def test_verify_of_a_folder_says_it_is_one(tmp_path):
    (tmp_path / "export").mkdir()
    res = CliRunner().invoke(cli, ["verify", str(tmp_path / "export"), "--out", str(tmp_path / "v.json")])
    assert res.exit_code == 2 and "is a folder, not a model file; pass the files in it" in res.output, res.output


def test_plot_names_never_overwrite_a_compress_report_plot(tmp_path):
    assert vr.plot_paths(tmp_path / "verify.json")["accuracy_vs_size"] == tmp_path / "accuracy_vs_size.png"
    assert vr.plot_paths(tmp_path / "gate.json")["size_by_format"] == tmp_path / "gate_size_by_format.png"
    (tmp_path / "report.md").write_text("# Compression report\n")
    assert vr.plot_paths(tmp_path / "verify.json")["accuracy_vs_size"] == tmp_path / "verify_accuracy_vs_size.png"


def test_machine_info_is_complete():
    m = vr.machine_info(2)
    assert m["cpu"] and m["cores"] >= 1 and m["threads"] == 2 and m["date"].endswith("UTC")


def test_verify_times_a_pytorch_row_on_the_threads_given_and_gives_them_back():
    """Audit: `verify --threads 1 --latency` timed the runtimes on 1 thread and the .pt rows
    on PyTorch's 2."""
    import torch

    from edgesqueeze.verify import _torch_latency

    seen = []

    class Probe(torch.nn.Module):
        def forward(self, x):
            seen.append(torch.get_num_threads())
            return x.mean((2, 3))

    before = torch.get_num_threads()
    assert _torch_latency(Probe(), [1, 4, 4], runs=3, threads=1) >= 0
    assert set(seen) == {1} and torch.get_num_threads() == before
    seen.clear()
    _torch_latency(Probe(), [1, 4, 4], runs=3)
    assert set(seen) == {before}
    torch.set_num_threads(before)
    assert vr.machine_info(1)["torch_threads"] == 1 and vr.machine_info(None)["torch_threads"] == before


def test_verify_refuses_a_markdown_out_path(tmp_path):
    res = CliRunner().invoke(cli, ["verify", str(tmp_path / "model.onnx"), "--out", str(tmp_path / "verify.md")])
    assert res.exit_code == 2 and "names the JSON report" in res.output


def test_int8_speed_notes_name_an_int8_file_slower_than_its_models_fastest_fp32_file(tmp_path):
    """int8 speed is the CPU's: an int8 file at least 1.05x the time of the fastest fp32
    runtime file of the same model gets a line naming both and the CPU's int8 kernels; faster
    or as fast, another model's files, torch rows and rows in error do not count."""
    from edgesqueeze.verify import int8_speed_notes

    rows = [_row("a/model.pt", "pt", 1, 1, 0.9, 1.0, latency=0.05, runtime="pytorch"),
            _row("a/model.onnx", "onnx", 1, 1, 0.9, 1.0, latency=0.13),
            _row("a/model.tflite", "tflite", 1, 1, 0.9, 1.0, latency=0.12, runtime="ai-edge-litert"),
            _row("a/model.int8.onnx", "onnx-int8", 1, 1, 0.9, 1.0, latency=0.16),
            _row("a/model.int8.tflite.esq", "tflite-int8.esq", 1, 1, 0.9, 1.0, latency=0.124),
            _row("a/model.int8.tflite", "tflite-int8", 1, 1, 0.9, 1.0, latency=0.06),
            _row("b/model.int8.onnx", "onnx-int8", 1, 1, 0.9, 1.0, latency=0.5),  # model b: no fp32 file
            _row("b/bad.int8.onnx", "onnx-int8", 1, 1, 0.9, 1.0, latency=9.0, error="broken")]
    sources = [None, "A", "A", "A", "A", "A", "B", "A"]
    notes = int8_speed_notes(rows, sources, "x86 AVX2 (no VNNI): saturating")
    assert len(notes) == 1, notes
    assert notes[0].startswith("a/model.int8.onnx: 1.33x the batch-1 time of a/model.tflite "
                               "(fp32, 0.12 ms) on this CPU (x86 AVX2 (no VNNI)): int8 made it smaller, not faster")
    assert int8_speed_notes(rows, [None] * len(rows), "k") == []  # files that name no source: no pairing
    report = {"dataset": None, "datasets": ["digits"], "reference": None, "reference_accuracy": None,
              "artifacts": rows[:4], "speed_notes": notes}
    md = vr.markdown(report)
    assert "Speed (this CPU only):" in md and "- a/model.int8.onnx: 1.33x" in md
    assert "Speed (this CPU only)" not in vr.markdown({**report, "speed_notes": []})


def test_a_file_name_with_a_backtick_or_pipe_stays_one_code_span(report, tmp_path):
    from edgesqueeze.budget import artifacts_markdown, md_code

    assert md_code("a|b`c.tflite") == "``a\\|b`c.tflite``" and md_code("model.onnx") == "`model.onnx`"
    report["artifacts"][2]["path"] = str(tmp_path / "export" / "odd`name|x.int8.onnx")
    md = vr.write_report(tmp_path / "verify.json", report)["markdown"].read_text()
    assert "``export/odd`name\\|x.int8.onnx``" in md, md
    assert "``" in artifacts_markdown(report["artifacts"])


def test_files_exported_from_different_models_are_said(report, tmp_path):
    """verify judged a folder's files of two models together (an earlier export of another
    model beside this one), though each records the SHA-256 of the file it came from."""
    from edgesqueeze.verify import mixed_sources_note

    rows = [dict(r) for r in report["artifacts"]]
    assert mixed_sources_note(rows) is None  # no sources recorded (the .pt, the .esq)
    for r, sha in zip(rows[1:], ["a" * 64, "a" * 64, "b" * 64]):
        r["source_sha256"] = sha
    note = mixed_sources_note(rows)
    assert note.startswith("the exported files come from 2 different model files") and "bbbbbbbbbbbb: " in note, note
    md = vr.markdown({**report, "artifacts": rows, "notes": [note]})
    assert "- note: the exported files come from 2 different model files" in md
    for r in rows:
        r["source_sha256"] = "a" * 64
    assert mixed_sources_note(rows) is None
