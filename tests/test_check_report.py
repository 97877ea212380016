"""`edgesqueeze check REPORT.json` on reports that are empty, hold impossible values or are
malformed: bad input (exit 2, one line naming the file, the row and the field), never a pass
and never a traceback. Real report files on disk, the real CLI (click's runner, and one
subprocess for what a CI job sees)."""

from __future__ import annotations

import copy
import json
import subprocess
import sys
from pathlib import Path

import pytest
from click.testing import CliRunner

from edgesqueeze.cli import cli
from edgesqueeze.config.budget import ARTIFACT_FORMATS

ROOT = Path(__file__).resolve().parents[1]

# a report as `edgesqueeze verify` writes it (the keys and values of the demo's
# artifacts/squeezenet-digits/verify.json, three of its rows)
_ROW = {"runtime": "onnxruntime", "gzip_bytes": 24745, "n": 359, "accuracy": 0.9860724233983287,
        "agreement": 0.9972144846796658, "reference_accuracy": 0.9888579387186629, "decode_check": None,
        "latency_ms": 0.0845909999043215, "warning": None, "error": None}
REPORT = {
    "dataset": None, "datasets": ["digits"], "reference": "model.pt", "reference_accuracy": 0.9888579387186629,
    "artifacts": [
        {**_ROW, "path": "model.pt", "format": "pt", "runtime": "pytorch", "bytes": 309245, "gzip_bytes": 266514,
         "accuracy": 0.9888579387186629, "agreement": 1.0},
        {**_ROW, "path": "compressed/model.esq", "format": "esq", "runtime": "edgesqueeze .esq decoder + pytorch",
         "bytes": 17260, "gzip_bytes": 17286, "decode_check": True},
        {**_ROW, "path": "export/model.int8.onnx", "format": "onnx-int8", "bytes": 87872, "ort_portable": True},
    ],
    "machine": {"cpu": "AMD EPYC", "arch": "x86_64", "cores": 2},
}
BUDGET = ["--max-size", "400KB", "--min-accuracy", "0.5", "--max-drop", "1", "--min-agreement", "0.9"]


def write_report(tmp_path: Path, edit=None, name: str = "verify.json") -> Path:
    report = copy.deepcopy(REPORT)
    if edit is not None:
        edit(report)
    path = tmp_path / name
    path.write_text(json.dumps(report, indent=2))  # NaN written as NaN, as Python's json reads it
    return path


def check(*args):
    return CliRunner().invoke(cli, ["check", *map(str, args)])


def set_field(field, value):
    def edit(report):
        report["artifacts"][2][field] = value
    return edit


def drop_field(field):
    def edit(report):
        del report["artifacts"][2][field]
    return edit


def test_a_valid_report_passes_and_a_broken_budget_fails(tmp_path):
    """The baseline the refusals below are measured against: the same report, untouched."""
    report = write_report(tmp_path)
    res = check(report, *BUDGET)
    assert res.exit_code == 0, res.output
    assert "11 passed, 0 failed" in res.output
    res = check(report, "--max-size", "80KB")
    assert res.exit_code == 1, res.output  # the .onnx-int8 file is over (the float .pt is not judged by it)


def test_a_report_given_twice_is_checked_once(tmp_path):
    """``check r.json r.json`` (a glob and a name) listed every row and verdict twice."""
    report = write_report(tmp_path)
    once = check(report, *BUDGET)
    twice = check(report, f"{tmp_path}/./verify.json", *BUDGET)
    assert twice.exit_code == 0 and "11 passed, 0 failed" in twice.output, twice.output
    assert f"note: given more than once, checked once: {report}\n" in twice.output, twice.output
    assert once.output in twice.output


def test_a_verdict_one_image_could_turn_gets_a_note_in_every_output(tmp_path, monkeypatch):
    """The demo's report (359 images, 99.72% agreement) against 90%: no note. The same
    report as if measured on 100 images, against a 99% agreement: the table, the JSON and the
    markdown each say the verdict is inside its sampling noise; the exit code is the verdict's."""
    monkeypatch.chdir(tmp_path)
    report = write_report(tmp_path)
    res = check(report, *BUDGET, "--json", "v.json")
    assert res.exit_code == 0 and "sampling noise" not in res.output, res.output
    assert not any("sampling noise" in n for n in json.loads(Path("v.json").read_text())["notes"])

    def small(r):
        for a in r["artifacts"]:
            a["n"] = 100
    report = write_report(tmp_path, small, name="small.json")
    res = check(report, "--min-agreement", "0.99", "--json", "v.json", "--markdown", "v.md")
    assert res.exit_code == 0, res.output  # 99.72% >= 99%: a PASS, but not a safe one
    said = [line for line in res.output.splitlines() if line.startswith("note: ")]
    notes = [n for n in said if "sampling noise" in n]
    assert [n.split(":")[1].strip() for n in notes] == ["compressed/model.esq", "export/model.int8.onnx"]
    assert all("within the sampling noise of its 100 test images: agreement 99.72%" in n for n in notes)
    # every note, the report's files not here too, is in the JSON and the markdown, not stderr alone
    assert any("measured are not here" in n for n in said) and len(said) == 3, said
    assert json.loads(Path("v.json").read_text())["notes"] == said
    assert all(n in Path("v.md").read_text() for n in said)


def test_a_report_with_no_artifacts_is_bad_input(tmp_path):
    report = write_report(tmp_path, lambda r: r.update(artifacts=[]))
    res = check(report, *BUDGET)
    assert res.exit_code == 2, res.output
    assert f"error: {report}: no artifacts to check" in res.output
    assert "passed" not in res.output


@pytest.mark.parametrize("edit, message", [
    pytest.param(set_field("accuracy", 1.7), "artifacts[2].accuracy: expected a number in [0, 1], got 1.7",
                 id="accuracy-above-1"),
    pytest.param(set_field("accuracy", -0.1), "artifacts[2].accuracy: expected a number in [0, 1], got -0.1",
                 id="accuracy-below-0"),
    pytest.param(set_field("agreement", 2), "artifacts[2].agreement: expected a number in [0, 1], got 2",
                 id="agreement-above-1"),
    pytest.param(set_field("bytes", -5),
                 "artifacts[2].bytes: expected a positive whole number of bytes (the file's size), got -5",
                 id="bytes-negative"),
    pytest.param(set_field("bytes", 0), "artifacts[2].bytes: expected a positive whole number of bytes", id="bytes-0"),
    pytest.param(set_field("bytes", 87872.5), "artifacts[2].bytes: expected a positive whole number of bytes",
                 id="bytes-fraction"),
    pytest.param(set_field("n", 0), "artifacts[2].n: expected a whole number >= 1 (the test images evaluated), got 0",
                 id="n-0"),
    pytest.param(set_field("format", "banana"),
                 f"artifacts[2].format: expected one of {', '.join(ARTIFACT_FORMATS)}, got 'banana'",
                 id="format-unknown"),
])
def test_impossible_values_are_bad_input(tmp_path, edit, message):
    report = write_report(tmp_path, edit)
    res = check(report, *BUDGET)
    assert res.exit_code == 2, res.output
    assert f"error: {report}: {message}" in res.output
    assert "fix it, or write the report again with `edgesqueeze verify`" in res.output
    assert "passed" not in res.output


@pytest.mark.parametrize("edit, budget, message", [
    pytest.param(set_field("accuracy", "high"), BUDGET,
                 "artifacts[2].accuracy: expected a number in [0, 1], got 'high'", id="accuracy-string"),
    pytest.param(set_field("accuracy", True), BUDGET,
                 "artifacts[2].accuracy: expected a number in [0, 1], got True", id="accuracy-bool"),
    pytest.param(drop_field("bytes"), ["--max-size", "400KB"],
                 "artifacts[2].bytes: missing, expected a positive whole number of bytes", id="bytes-missing"),
    pytest.param(set_field("bytes", None), ["--max-size", "400KB"],
                 "artifacts[2].bytes: expected a positive whole number of bytes (the file's size), got None",
                 id="bytes-null"),
    pytest.param(set_field("accuracy", float("nan")), ["--max-drop", "1"],
                 "artifacts[2].accuracy: expected a number in [0, 1], got nan", id="accuracy-nan-max-drop"),
    pytest.param(set_field("reference_accuracy", float("inf")), ["--max-drop", "1"],
                 "artifacts[2].reference_accuracy: expected a number in [0, 1], got inf", id="reference-inf"),
    pytest.param(set_field("n", "359"), ["--max-drop", "1"],
                 "artifacts[2].n: expected a whole number >= 1 (the test images evaluated), got '359'", id="n-string"),
    pytest.param(set_field("latency_ms", "fast"), ["--max-size", "400KB"],
                 "artifacts[2].latency_ms: expected a number >= 0 (milliseconds), got 'fast'", id="latency-string"),
    pytest.param(set_field("decode_check", "yes"), ["--max-size", "400KB"],
                 "artifacts[2].decode_check: expected true, false or null, got 'yes'", id="decode-check-string"),
    pytest.param(set_field("error", 3), ["--max-size", "400KB"],
                 "artifacts[2].error: expected null or a string", id="error-not-a-string"),
    pytest.param(set_field("path", 7), ["--max-size", "400KB"],
                 "artifacts[2].path: expected a file path (a string), got 7", id="path-not-a-string"),
])
def test_malformed_fields_are_one_error_line_not_a_traceback(tmp_path, edit, budget, message):
    report = write_report(tmp_path, edit)
    res = check(report, *budget, "--markdown", tmp_path / "gate.md")
    assert res.exit_code == 2, res.output
    assert res.exception is None or isinstance(res.exception, SystemExit), repr(res.exception)
    assert f"error: {report}: {message}" in res.output
    assert "Traceback" not in res.output
    assert not (tmp_path / "gate.md").exists()  # refused before anything is judged or written


def test_a_ci_job_sees_one_error_line_and_exit_2(tmp_path):
    """The same refusal through a real process, as a CI step runs it."""
    report = write_report(tmp_path, set_field("accuracy", "high"))
    proc = subprocess.run([sys.executable, "-m", "edgesqueeze", "check", str(report), "--min-accuracy", "0.9"],
                          cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2, proc.stdout + proc.stderr
    assert proc.stderr.strip() == (f"error: {report}: artifacts[2].accuracy: expected a number in [0, 1], got "
                                   "'high'; fix it, or write the report again with `edgesqueeze verify`")
    assert "Traceback" not in proc.stderr


def test_a_row_verify_could_not_evaluate_still_reads_as_not_measured(tmp_path):
    """What verify writes for a file it could not evaluate (format from the suffix, n 0, no
    numbers) is a valid report: the gate says ERROR for it (exit 2), not a field error."""
    def edit(report):
        report["artifacts"][2].update(format="bin", bytes=None, gzip_bytes=None, n=0, accuracy=None,
                                      agreement=None, latency_ms=None, error="model.bin: not a model file")
    res = check(write_report(tmp_path, edit), *BUDGET)
    assert res.exit_code == 2, res.output
    assert "ERROR (model.bin: not a model file)" in res.output and "could not be measured" in res.output
    assert "error: " not in res.output


def test_a_compress_report_names_its_own_fields(tmp_path):
    compress = {"esq": "model.esq", "totals": {"esq_bytes": 17260},
                "test": {"before": {"n": 359, "accuracy": 0.9889}, "after": {"n": 359, "accuracy": 0.9861},
                         "agreement": 0.9972}}
    path = tmp_path / "report.json"
    path.write_text(json.dumps(compress))
    res = check(path, "--max-size", "20KB", "--max-drop", "1")
    assert res.exit_code == 0, res.output
    compress["test"]["after"]["accuracy"] = 1.5
    path.write_text(json.dumps(compress))
    res = check(path, "--max-drop", "1")
    assert res.exit_code == 2, res.output
    assert (f"error: {path}: test.after.accuracy: expected a number in [0, 1], got 1.5; fix it, or write the "
            "report again with `edgesqueeze compress`") in res.output
    compress["test"]["after"] = "x"
    path.write_text(json.dumps(compress))
    res = check(path, "--max-drop", "1")
    assert res.exit_code == 2 and f"error: {path}: test.after: expected an object, got 'x'" in res.output, res.output


@pytest.mark.parametrize("report_name", ["verify.json", "report.json", None])
def test_a_directory_is_named_as_one_with_the_report_in_it(tmp_path, report_name):
    folder = tmp_path / "squeezenet-digits"
    folder.mkdir()
    if report_name:
        write_report(folder, name=report_name)
    res = check(folder, *BUDGET)
    assert res.exit_code == 2, res.output
    assert f"error: {folder}: is a directory, not a report or an artifact file; " in res.output
    assert "no such file" not in res.output
    if report_name:
        assert f"give {folder / report_name}" in res.output
    else:
        assert f"the artifact files in it ({folder / '*'})" in res.output


def test_help_example_is_the_path_the_demo_writes():
    res = CliRunner().invoke(cli, ["check", "--help"])
    assert res.exit_code == 0
    assert "edgesqueeze check artifacts/squeezenet-digits/verify.json --max-size" in res.output
    assert "export/verify.json" not in res.output
    # the demo (make demo -> examples/ci/gate.sh with OUT=artifacts/squeezenet-digits) writes $OUT/verify.json
    assert "OUT=artifacts/squeezenet-digits" in (ROOT / "Makefile").read_text()
    assert '--out "$OUT/verify.json"' in (ROOT / "examples" / "ci" / "gate.sh").read_text()


def test_a_deeply_nested_report_is_bad_input_not_a_traceback(tmp_path):
    """2,000 nested lists: json raised RecursionError, a traceback and exit 1 (a "broken budget")."""
    deep = tmp_path / "deep.json"
    deep.write_text('{"artifacts":' + "[" * 2000 + "]" * 2000 + "}")
    res = check(deep, "--max-size", "1KB")
    assert res.exit_code == 2 and isinstance(res.exception, (SystemExit, type(None))), (res.output, res.exception)
    assert f"error: {deep}: not an edgesqueeze report (JSON nested too deeply" in res.output


@pytest.mark.parametrize("value", ["nan", "inf"])
def test_a_drop_limit_that_is_not_a_number_is_a_usage_error(tmp_path, value):
    """--max-drop nan failed every artifact (exit 1, "limit <= nan points")."""
    res = check(write_report(tmp_path), "--max-drop", value)
    assert res.exit_code == 2 and "--max-drop" in res.output and "passed" not in res.output, res.output


def test_an_earlier_runs_verdict_files_do_not_outlive_bad_input(tmp_path):
    """A rerun into the same folder that stops on bad input left the earlier gate.json (its
    PASS) in place for CI to upload; the outputs are this run's or none."""
    good = write_report(tmp_path)
    outs = [tmp_path / "gate.json", tmp_path / "gate.xml", tmp_path / "gate.md"]
    args = ["--json", outs[0], "--junit", outs[1], "--markdown", outs[2]]
    assert check(good, *BUDGET, *args).exit_code == 0 and all(p.is_file() for p in outs)
    bad = write_report(tmp_path, set_field("accuracy", "high"), name="bad.json")
    res = check(bad, *BUDGET, *args)
    assert res.exit_code == 2 and not any(p.exists() for p in outs), res.output
    # a budget option that is bad input, or none at all, too (the budget was read first)
    bad_recipe = tmp_path / "bad.yaml"
    bad_recipe.write_text("version: 1\ntrain: {epochs: 0}\n")
    # a bad recipe or --set too: it was read before the earlier verdicts were removed
    for budget in (["--max-size", "4zz"], ["--max-size-for", "bogus=1KB"], [], ["-r", bad_recipe, *BUDGET],
                   ["-r", tmp_path / "missing.yaml", *BUDGET], ["--set", "budget.max_size=5XB"]):
        assert check(good, *BUDGET, *args).exit_code == 0 and all(p.is_file() for p in outs)
        res = check(good, *budget, *args)
        assert res.exit_code == 2 and not any(p.exists() for p in outs), (budget, res.output)
    # an output named like the input report is refused: it was read, then replaced by the
    # verdicts, and the report was lost
    same = write_report(tmp_path, name="same.json")
    before = same.read_text()
    res = check(same, *BUDGET, "--json", same)
    assert res.exit_code == 2 and "is also an input" in res.output and same.read_text() == before, res.output


def test_the_job_summary_is_appended_to_whatever_github_names_it(tmp_path, monkeypatch):
    """GitHub Actions names the summary file step_summary_<id>: --markdown "$GITHUB_STEP_SUMMARY"
    replaced what the step had written before; it appends now (and so does a second check)."""
    summary = tmp_path / "_runner_file_commands" / "step_summary_3f2a9c"
    summary.parent.mkdir()
    summary.write_text("# Nightly model report\n")
    monkeypatch.setenv("GITHUB_STEP_SUMMARY", str(summary))
    report = write_report(tmp_path)
    for _ in range(2):
        assert check(report, *BUDGET, "--markdown", summary).exit_code == 0
    text = summary.read_text()
    assert text.startswith("# Nightly model report\n") and text.count("edgesqueeze check") == 2, text
    other = tmp_path / "gate.md"  # any other file is replaced, as before
    other.write_text("an earlier summary\n")
    assert check(report, *BUDGET, "--markdown", other).exit_code == 0
    assert "an earlier summary" not in other.read_text()


def test_dash_writes_the_verdicts_to_standard_output_and_the_table_to_standard_error(tmp_path, monkeypatch):
    """`--json -` wrote a file named '-' in the working folder; it is standard output now, as
    for most tools, so `edgesqueeze check ... --json - | jq` reads the verdicts alone."""
    monkeypatch.chdir(tmp_path)
    report = write_report(tmp_path)
    res = check(report, *BUDGET, "--json", "-")
    assert res.exit_code == 0, res.output
    assert json.loads(res.stdout)["exit_code"] == 0
    assert "11 passed, 0 failed" in res.stderr
    assert not (tmp_path / "-").exists()
    res = check(report, *BUDGET, "--junit", "-")
    assert res.stdout.startswith("<?xml") and "<testsuite" in res.stdout, res.stdout
    res = check(report, *BUDGET, "--json", "-", "--markdown", "-")
    assert res.exit_code == 2 and "--json and --markdown both name standard output" in res.output


def test_a_report_of_another_dataset_does_not_pass_a_recipes_gate(tmp_path):
    """A digits report passed the ImageNet deploy recipe's gate (21 checks, exit 0): the
    budget judged other files than the recipe's."""
    def digits(report):
        report["datasets"] = ["digits"]

    path = write_report(tmp_path, digits)
    res = check(path, "-r", ROOT / "recipes/squeezenet-imagenet-deploy.yaml")
    assert res.exit_code == 2, res.output
    assert "was measured on digits, but the recipe" in res.output and "describes imagenet-sample" in res.output
    assert check(path, "--max-size", "10MB").exit_code in (0, 1)  # options alone: no dataset to compare


def _measured(tmp_path: Path, data: bytes = b"\x18\x00\x00\x00TFL3" + bytes(range(256)) * 40):
    """A report row for a real file on disk with its real size and SHA-256, as verify records them."""
    import hashlib

    model = tmp_path / "export" / "model.int8.tflite"
    model.parent.mkdir(exist_ok=True)
    model.write_bytes(data)
    row = {**_ROW, "path": "export/model.int8.tflite", "format": "tflite-int8", "runtime": "ai-edge-litert",
           "bytes": len(data), "sha256": hashlib.sha256(data).hexdigest()}
    return model, row


def test_a_row_without_a_sha256_is_checked_by_its_size_and_says_so(tmp_path, monkeypatch):
    """A report of an older verify (or edited by hand) records no SHA-256: the file here was
    judged by the report's numbers without a word, even when it had grown. Now its size is
    compared (another size is ERROR), and a note says the bytes were not checked."""
    model, row = _measured(tmp_path)
    del row["sha256"]
    report = write_report(tmp_path, lambda r: r.update(artifacts=[row], written_from=str(tmp_path)))
    monkeypatch.chdir(tmp_path)
    res = check(report, *BUDGET)
    assert res.exit_code == 0, res.output
    assert (f"note: {report} records no SHA-256 for 1 file(s) here (export/model.int8.tflite; an older verify "
            "wrote it, or it was edited): they are checked by their size only") in res.output, res.output
    model.write_bytes(model.read_bytes() + b"x")
    res = check(report, *BUDGET)
    assert res.exit_code == 2 and "ERROR (changed since" in res.output, res.output
    assert f"{row['bytes'] + 1:,} B now, {row['bytes']:,} B then" in res.output, res.output


def test_a_file_changed_since_the_report_is_not_judged_by_its_old_numbers(tmp_path, monkeypatch):
    """A re-export without a new verify passed the gate on the old file's numbers; a file that
    is here with other bytes than the report measured is now ERROR (exit 2), naming it, and
    the report's relative paths start where it was written from, whatever the current folder."""
    model, row = _measured(tmp_path)
    report = write_report(tmp_path, lambda r: r.update(artifacts=[row], written_from=str(tmp_path)))
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    monkeypatch.chdir(elsewhere)
    res = check(report, *BUDGET)
    assert res.exit_code == 0, res.output
    assert "not here" not in res.output

    model.write_bytes(model.read_bytes()[:-1] + b"\x01")  # same size, other bytes
    res = check(report, *BUDGET)
    assert res.exit_code == 2, res.output
    assert "ERROR (changed since" in res.output and "same size, other bytes" in res.output
    assert "run `edgesqueeze verify` on it again" in res.output
    model.write_bytes(b"\x18\x00\x00\x00TFL3" * 10)
    res = check(report, *BUDGET)
    assert res.exit_code == 2 and f"80 B now, {row['bytes']:,} B then" in res.output, res.output


def test_a_report_whose_files_are_elsewhere_is_judged_by_its_numbers_and_says_so(tmp_path, monkeypatch):
    """A CI job that downloads only the report: nothing to compare, the report's numbers
    stand, and a note says the files were not found."""
    _, row = _measured(tmp_path)
    (tmp_path / "only").mkdir()  # the report alone, not beside export/
    report = write_report(tmp_path, lambda r: r.update(artifacts=[row], written_from="/nonexistent/ci/job"),
                          name="only/verify.json")
    monkeypatch.chdir(tmp_path.parent)  # not where export/ is
    res = check(report, *BUDGET)
    assert res.exit_code == 0, res.output
    assert "note: 1 file(s)" in res.output and "judged by the report's numbers alone" in res.output


def test_a_report_copied_with_its_files_checks_the_files_beside_it(tmp_path, monkeypatch):
    """A report copied with its files (a CI artifact on a device, or another folder of the same
    machine): check hashed the files where verify ran, while the folder still existed, and
    passed a copy there that had been replaced by a 3x larger file; from another folder, it
    judged the copy by the report's numbers. The files beside the report are the ones checked."""
    import shutil

    (tmp_path / "ci").mkdir()
    _, row = _measured(tmp_path / "ci")
    write_report(tmp_path / "ci", lambda r: r.update(artifacts=[row], written_from=str(tmp_path / "ci")))
    shutil.copytree(tmp_path / "ci", tmp_path / "device")
    copy = tmp_path / "device" / "export" / "model.int8.tflite"
    copy.write_bytes(copy.read_bytes() * 3)  # replaced after the report: another file
    for cwd in (tmp_path / "device", tmp_path):  # from where the copy is, and from elsewhere
        monkeypatch.chdir(cwd)
        res = check(tmp_path / "device" / "verify.json", *BUDGET)
        assert res.exit_code == 2 and "ERROR (changed since" in res.output, (cwd, res.output)
    assert check(tmp_path / "ci" / "verify.json", *BUDGET).exit_code == 0  # the original is as measured


def test_a_report_written_from_above_its_folder_checks_the_copy_beside_it(tmp_path, monkeypatch):
    """The CI example runs `verify ... --out artifacts/ci/verify.json` from the checkout, so the
    report names `artifacts/ci/export/...`: a copy of artifacts/ci/ (a CI artifact) had no such
    path beside it, and check hashed the originals where verify ran (a damaged copy passed,
    30 of 30) or, on another machine, judged the copy by the report's numbers. verify records
    the report's own folder (written_to), and the file is looked for where it lay beside it."""
    import shutil

    ci = tmp_path / "repo" / "artifacts" / "ci"
    ci.mkdir(parents=True)
    _, row = _measured(ci)
    row["path"] = "artifacts/ci/export/model.int8.tflite"  # relative to the checkout, where verify ran
    where = {"written_from": str(tmp_path / "repo"), "written_to": str(ci)}
    write_report(ci, lambda r: r.update(artifacts=[row], **where))
    shutil.copytree(ci, tmp_path / "copy")
    copy = tmp_path / "copy" / "export" / "model.int8.tflite"
    copy.write_bytes(copy.read_bytes()[:-1] + b"\x01")  # damaged in transit: same size, other bytes
    for cwd in (tmp_path / "copy", tmp_path):
        monkeypatch.chdir(cwd)
        res = check(tmp_path / "copy" / "verify.json", *BUDGET)
        assert res.exit_code == 2 and "ERROR (changed since" in res.output, (cwd, res.output)
    assert check(ci / "verify.json", *BUDGET).exit_code == 0  # the original is as measured
    shutil.rmtree(tmp_path / "repo")  # another machine: only the copy
    assert check(tmp_path / "copy" / "verify.json", *BUDGET).exit_code == 2


@pytest.mark.parametrize("sha", ["abc", 7, "G" * 64])
def test_a_malformed_sha256_is_bad_input(tmp_path, sha):
    report = write_report(tmp_path, set_field("sha256", sha))
    res = check(report, *BUDGET)
    assert res.exit_code == 2, res.output
    assert f"error: {report}: artifacts[2].sha256: expected null or the file's SHA-256" in res.output


def test_a_compress_reports_archive_replaced_since_is_not_judged(tmp_path, monkeypatch):
    import hashlib

    esq = tmp_path / "model.esq"
    esq.write_bytes(b"ESQ" * 1000)
    compress = {"esq": "model.esq", "written_from": str(tmp_path),
                "totals": {"esq_bytes": 3000, "esq_sha256": hashlib.sha256(esq.read_bytes()).hexdigest()},
                "test": {"before": {"n": 359, "accuracy": 0.9889}, "after": {"n": 359, "accuracy": 0.9861},
                         "agreement": 0.9972}}
    path = tmp_path / "report.json"
    path.write_text(json.dumps(compress))
    monkeypatch.chdir(tmp_path.parent)
    assert check(path, "--max-size", "20KB").exit_code == 0
    esq.write_bytes(b"ESQ" * 9000)  # a bigger archive, compressed again with another recipe
    res = check(path, "--max-size", "20KB")
    assert res.exit_code == 2 and "27,000 B now, 3,000 B then" in res.output, res.output
    compress["totals"]["esq_sha256"] = "x"
    path.write_text(json.dumps(compress))
    res = check(path, "--max-size", "20KB")
    assert res.exit_code == 2 and "totals.esq_sha256: expected null or the file's SHA-256" in res.output, res.output


def test_max_size_on_the_command_line_replaces_the_recipes_limits_per_format(tmp_path):
    """With a recipe that limits each format (the digits recipe limits all ten), --max-size
    judged nothing: the per-format entries won, and `check -r recipe --max-size 30KB` passed
    an 88 KB file. Now the option replaces them, says so, and --max-size-for still sets one."""
    report = write_report(tmp_path)
    recipe = tmp_path / "r.yaml"
    recipe.write_text("version: 1\nbudget: {max_size_per_format: {esq: 400KB, onnx-int8: 400KB}}\n")
    assert check(report, "-r", recipe).exit_code == 0
    res = check(report, "-r", recipe, "--max-size", "80KB")
    assert res.exit_code == 1, res.output
    assert "note: --max-size 80KB replaces the recipe's size limits per format (esq, onnx-int8)" in res.output
    assert "export/model.int8.onnx" in next(ln for ln in res.output.splitlines() if "FAIL" in ln)
    res = check(report, "-r", recipe, "--max-size", "80KB", "--max-size-for", "onnx-int8=100KB")
    assert res.exit_code == 0, res.output


def test_a_report_string_that_is_not_text_is_bad_input_not_a_traceback(tmp_path):
    """A lone surrogate ("\\ud800", which JSON reads) in a report crashed check with a
    UnicodeEncodeError traceback and exit 1, the code of a broken budget."""
    report = tmp_path / "r.json"
    report.write_text(json.dumps(REPORT).replace('"error": null', '"error": "\\ud800"', 1))
    res = check(report, *BUDGET)
    assert res.exit_code == 2 and "Traceback" not in res.output, res.output
    assert f"error: {report}: artifacts[0].error: a lone surrogate (\\ud800) is not text" in res.output, res.output


def test_measuring_options_given_with_a_report_alone_are_said_to_do_nothing(tmp_path):
    """check r.json --reference other.pt --data mnist --limit 10 used the report's numbers and
    said nothing of the three options."""
    res = check(write_report(tmp_path), *BUDGET, "--data", "mnist", "--limit", "10")
    assert res.exit_code == 0, res.output
    assert "note: --data, --limit apply to artifact files measured now; a report is judged by the numbers it holds" \
        in res.output, res.output
    assert "apply to artifact files" not in check(write_report(tmp_path), *BUDGET).output


def test_json_to_dev_stdout_is_json_alone(tmp_path):
    """--json /dev/stdout wrote the verdicts table into the same stream as the JSON (unparsable
    on a pipe); it is standard output, as --json - is, so the table goes to standard error."""
    import subprocess
    import sys

    report = write_report(tmp_path)
    p = subprocess.run([sys.executable, "-m", "edgesqueeze", "check", str(report), *BUDGET, "--json", "/dev/stdout"],
                       capture_output=True, text=True, timeout=120, cwd=ROOT)
    assert p.returncode == 0, p.stderr
    assert json.loads(p.stdout)["exit_code"] == 0 and "11 passed" in p.stderr


def test_check_never_writes_over_a_file_its_report_names(tmp_path, monkeypatch):
    """`check r.json --junit model.int8.onnx` wrote the JUnit XML into the model the report
    measured (and --markdown appended to it), exit 0; only files named on the command line
    were protected. Now it is refused, as an output over an input is."""
    model, row = _measured(tmp_path)
    report = write_report(tmp_path, lambda r: r.update(artifacts=[row], written_from=str(tmp_path)))
    before = model.read_bytes()
    monkeypatch.chdir(tmp_path)
    for opt in ("--junit", "--markdown", "--json"):
        res = check(report, *BUDGET, opt, "export/model.int8.tflite")
        assert res.exit_code == 2 and f"is also an input (a file {report} measured" in res.output, (opt, res.output)
    assert model.read_bytes() == before


def test_a_classes_file_is_an_input_no_output_writes_over(tmp_path):
    """--classes @FILE was read but not counted as an input: `check m.pt --classes @c.txt
    --junit c.txt` replaced the class list (export, verify and compress their outputs too)."""
    report = write_report(tmp_path)
    names = tmp_path / "classes.txt"
    names.write_text("\n".join(str(i) for i in range(10)) + "\n")
    res = check(report, *BUDGET, "--classes", f"@{names}", "--junit", names)
    assert res.exit_code == 2 and "is also an input (--classes" in res.output, res.output
    assert names.read_text().startswith("0\n1\n")
