"""Budgets and the gate's verdicts (pure logic; the gate on real artifacts is in test_verify)."""

from __future__ import annotations

import dataclasses
import doctest
import json
import xml.etree.ElementTree as ET

import pytest

from edgesqueeze import budget as budget_mod
from edgesqueeze.budget import (check, exit_code, unmatched_formats, verdicts_json, verdicts_junit, verdicts_markdown,
                                verdicts_table)
from edgesqueeze.config import budget as spec_mod
from edgesqueeze.config.budget import Budget, BudgetSpecError, format_size, parse_size
from edgesqueeze.errors import RecipeError


def test_docstring_examples():
    assert doctest.testmod(budget_mod).failed == 0
    assert doctest.testmod(spec_mod).failed == 0


@pytest.mark.parametrize("text, expected", [
    ("500KB", 500_000), ("500 kB", 500_000), ("0.5MB", 500_000), ("1.5 mb", 1_500_000),
    ("64KiB", 65_536), ("2MiB", 2 * 1024 ** 2), ("1GB", 10 ** 9), ("123", 123), ("123B", 123),
    (".5KB", 500), (98496, 98496), (" 7 KiB ", 7168),
    # a fraction of a byte is cut, never rounded up: 17448.6B passed a 17,449 B file
    ("17448.6B", 17448), ("17.4486KB", 17448), ("17.04KiB", 17448), ("17448.5B", 17448), ("17450.5B", 17450),
    ("17.449KB", 17449), ("2.675GB", 2_675_000_000), ("0.1MB", 100_000),
])
def test_parse_size(text, expected):
    assert parse_size(text) == expected


@pytest.mark.parametrize("text, match", [
    ("0.5 parsecs", r"unknown unit 'parsecs' in '0.5 parsecs'; use B, KB, MB, GB"),
    ("KB", "cannot read 'KB' as a size"),
    ("-5KB", "cannot read '-5KB'"),
    ("5 5KB", "cannot read"),
    ("", "cannot read"),
    (-1, "must be a whole number >= 1"),
    (True, "expected a size"),
    (float("nan"), "must be a whole number >= 1"),
    (0, "must be a whole number >= 1"),
    (0.5, r"a number alone is bytes.*give a unit for other sizes"),  # was 0 B: meant 0.5 MB?
    (1.9, "must be a whole number >= 1, got 1.9"),  # was 1 B
    ("0.0001KB", "less than one byte"),
])
def test_parse_size_refuses_nonsense_with_the_value_named(text, match):
    with pytest.raises(BudgetSpecError, match=match):
        parse_size(text, what="--max-size")
    assert BudgetSpecError("x").exit_code == 2


def test_format_size():
    assert format_size(15_804) == "15,804 B (15.8 kB)"
    assert format_size(999) == "999 B"
    assert format_size(2_500_000) == "2,500,000 B (2.5 MB)"
    assert format_size(999_950) == "999,950 B (1.0 MB)"  # not "1000.0 kB"
    assert format_size(999_949) == "999,949 B (999.9 kB)"
    assert format_size(None) == "-"


def test_budget_from_dict():
    b = Budget.from_dict({"max_size": "500KB", "max_size_per_format": {"tflite-int8": "100KB"},
                          "min_accuracy": "99%", "max_drop": 0.5, "min_agreement": 0.98})
    assert b.size_limit("onnx") == 500_000 and b.size_limit("tflite-int8") == 100_000
    assert b.min_accuracy == pytest.approx(0.99) and b.max_drop == 0.5 and b.min_agreement == 0.98
    assert Budget.from_dict(None).is_empty()


@pytest.mark.parametrize("raw, match", [
    ({"max_sise": "1KB"}, r"budget\.max_sise: unknown key; did you mean 'max_size'\?"),
    ({"max_size": "1 parsec"}, r"budget\.max_size: unknown unit 'parsec'"),
    ({"max_size_per_format": {"tflite8": "1KB"}}, r"budget\.max_size_per_format\.tflite8: unknown format"),
    ({"min_accuracy": 99}, r"budget\.min_accuracy: expected a fraction in \[0, 1\]"),
    ({"max_drop": -1}, r"budget\.max_drop: expected accuracy points in \[0, 100\]"),
    ({"max_drop": float("nan")}, r"budget\.max_drop: expected accuracy points in \[0, 100\]"),  # YAML .nan
    ({"max_drop": float("inf")}, r"budget\.max_drop: expected accuracy points in \[0, 100\]"),
    ({"max_drop": 500}, r"budget\.max_drop: expected accuracy points in \[0, 100\]"),
    ("big", r"budget: expected a mapping"),
    # each was taken as "no per-format limits", and check passed with no size checked
    *(({"max_size_per_format": bad}, r"budget\.max_size_per_format: expected a mapping of format to size")
      for bad in (0, False, [], "")),
])
def test_budget_errors_name_the_field(raw, match):
    with pytest.raises(RecipeError, match=match):
        Budget.from_dict(raw)


def row(**kw):
    base = {"path": "m.tflite", "format": "tflite-int8", "bytes": 90_000, "accuracy": 0.991,
            "agreement": 0.995, "reference_accuracy": 0.994, "decode_check": None, "error": None}
    return {**base, **kw}


BUDGET = Budget(max_size=100_000, min_accuracy=0.99, max_drop=0.5, min_agreement=0.99)


def test_all_budgets_hold():
    verdicts = check([row()], BUDGET)
    assert [v.check for v in verdicts] == ["size", "accuracy", "drop", "agreement"]
    assert all(v.passed for v in verdicts) and exit_code(verdicts) == 0


@pytest.mark.parametrize("change, broken", [
    ({"bytes": 100_001}, "size"), ({"accuracy": 0.9899}, "accuracy"),
    ({"reference_accuracy": 0.9975}, "drop"), ({"agreement": 0.98}, "agreement"),
])
def test_each_broken_budget_fails_alone(change, broken):
    verdicts = check([row(**change)], BUDGET)
    assert [v.check for v in verdicts if not v.passed] == [broken]
    assert exit_code(verdicts) == 1


def test_a_broken_drop_says_how_many_test_images_it_is():
    """On 100 test images a point is one image: the FAIL line says so, from the row's n."""
    broken = row(accuracy=0.57, reference_accuracy=0.59, n=100)
    (v,) = check([broken], Budget(max_drop=1.0))
    assert v.status == "FAIL" and v.message == "float model 59.00%; 2 of 100 test images"
    (v,) = check([row(accuracy=0.57, reference_accuracy=0.59)], Budget(max_drop=1.0))  # n unknown
    assert v.message == "float model 59.00%"
    (v,) = check([row(accuracy=0.9, reference_accuracy=0.9025, n=400)], Budget(max_drop=0.1))
    assert v.message.endswith("; 1 of 400 test images")
    (v,) = check([row(agreement=0.94, n=100)], Budget(min_agreement=0.95))
    assert v.status == "FAIL" and v.message == "1 test image short; 6 of 100 test images disagree"
    # the shortfall, not the disagreements alone (an audit: "37 of 359 disagree" where 2 were missing)
    (v,) = check([row(agreement=322 / 359, n=359)], Budget(min_agreement=0.90))
    assert v.message == "2 test images short; 37 of 359 test images disagree"


def test_a_verdict_inside_its_sampling_noise_says_so():
    """Session 47: the ImageNet fast recipe's gate read 94% agreement on one CPU and 97-98% on
    others (100 images): a verdict whose limit lies inside its measurement's 95% interval gets
    a note, PASS or FAIL, so a gate that one image decides reads as such."""
    budget = Budget(min_agreement=0.95, max_drop=1.0, min_accuracy=0.4)
    fail = row(path="f.tflite.esq", agreement=0.94, accuracy=0.58, reference_accuracy=0.59, n=100)
    (note,) = budget_mod.noise_notes([fail], budget)
    assert note.startswith("note: f.tflite.esq: within the sampling noise of its 100 test images")
    lo, hi = budget_mod._wilson(0.94, 100)
    assert lo < 0.95 < hi and "agreement 94.00%" in note and f"{100 * lo:.1f}-{100 * hi:.1f}%" in note
    assert "drop 1.00 points" in note  # 6 images differ, any of which can move the drop
    assert "accuracy" not in note  # 58% on 100 images: 48.2-67.2%, clear of 40%
    (acc_note,) = budget_mod.noise_notes([fail], Budget(min_accuracy=0.5))  # but not of 50%
    assert "accuracy 58.00% (95% interval 48.2-67.2%, limit 50.00%)" in acc_note
    # on 10,000 images 94% (93.5-94.5%) and a 2-point drop (1.5-2.5) are clear of their limits
    assert budget_mod.noise_notes([{**fail, "n": 10_000, "accuracy": 0.57}], budget) == []
    # a value exactly at its limit is inside any interval: one image either way decides it
    assert "drop 1.00 points" in budget_mod.noise_notes([{**fail, "n": 10_000}], budget)[0]
    # only images whose top-1 changed can move the drop: at 100% agreement it is exact
    assert budget_mod.noise_notes([{**fail, "agreement": 1.0, "accuracy": 0.59}], Budget(max_drop=0.0)) == []
    # no n (a report of another tool), an error row, or no agreement for the drop: nothing claimed
    assert budget_mod.noise_notes([{**fail, "n": None}, {**fail, "error": "x"}], budget) == []
    assert budget_mod.noise_notes([{**fail, "agreement": None}], Budget(max_drop=1.0)) == []
    # the float reference: its agreement and drop against itself sample nothing, but its accuracy
    # is a sample of the test images like any file's (its row got no note, the others' did)
    ref = row(path="m.pt", format="pt", agreement=1.0, accuracy=0.9889, reference_accuracy=0.9889, n=359)
    (ref_note,) = budget_mod.noise_notes([ref], Budget(min_accuracy=0.99, min_agreement=0.99, max_drop=0.0))
    assert ref_note.startswith("note: m.pt: within the sampling noise") and "accuracy 98.89%" in ref_note
    assert "agreement" not in ref_note and "drop" not in ref_note


def test_wilson_interval_against_the_binomial_by_simulation():
    """The interval covers the true proportion about 95% of the time (a wrong formula, e.g. the
    half-width without its square root, is far off)."""
    import random

    rng = random.Random(7)
    for p, n in ((0.94, 100), (0.99, 359), (0.6, 50)):
        hits = 0
        for _ in range(2000):
            k = sum(rng.random() < p for _ in range(n))
            lo, hi = budget_mod._wilson(k / n, n)
            hits += lo <= p <= hi
        assert 0.92 <= hits / 2000 <= 0.985, (p, n, hits)


@pytest.mark.parametrize("n", [359, 1000, 10_000, 50_000])
def test_an_accuracy_or_agreement_exactly_at_a_percent_limit_holds_it(n):
    """Audit: "99.4%" was read as 99.4 / 100 = 0.9940000000000001, so 9,940 of 10,000 images
    (0.994) FAILED "accuracy >= 99.40%" with "0.00 points short"."""
    from edgesqueeze.config.budget import parse_fraction

    for k in range(int(0.9 * n), n + 1):
        pct = 100 * k / n
        text = f"{pct:.6f}".rstrip("0").rstrip(".")
        if float(text) != round(pct, 6) or len(text.split(".")[-1]) > 3:
            continue  # limits people write: at most 3 decimals that are exactly k / n
        limit = parse_fraction(text + "%", "min_accuracy")
        at, below = row(accuracy=k / n, agreement=k / n, n=n), row(accuracy=(k - 1) / n, agreement=(k - 1) / n, n=n)
        budget = Budget(min_accuracy=limit, min_agreement=limit)
        assert all(v.passed for v in check([at], budget)), (text, k, n)
        assert not any(v.passed for v in check([below], budget)), (text, k, n)


def test_a_failing_value_never_reads_as_its_limit():
    """Audit: at two decimals a FAIL read "accuracy >= 98.33%  98.33%" and "0.00 points short"."""
    (acc, drop, agr) = check([row(accuracy=0.98329, reference_accuracy=0.988295, agreement=0.99724)],
                             Budget(min_accuracy=0.9833, max_drop=0.5, min_agreement=0.99725))
    assert [v.status for v in (acc, drop, agr)] == ["FAIL"] * 3
    for v in (acc, drop, agr):
        assert v.value != v.limit.split(" ", 1)[1], v
    assert acc.value == "98.329%" and acc.limit == ">= 98.330%" and acc.message == "0.001 points short"
    assert drop.value == "0.501 points" and agr.value == "99.724%"
    (ok,) = check([row(accuracy=0.9833)], Budget(min_accuracy=0.9833))
    assert ok.passed and ok.value == "98.33%" and ok.limit == ">= 98.33%"


def test_the_size_limit_is_inclusive_and_per_format_wins():
    assert check([row(bytes=100_000)], Budget(max_size=100_000))[0].passed
    per = Budget(max_size=10, max_size_per_format={"tflite-int8": 100_000})
    assert check([row()], per)[0].passed
    assert not check([row(format="onnx")], per)[0].passed


def test_max_size_judges_the_files_that_ship_not_the_float_reference():
    """A gate on deployable files must not fail because the float .pt (the reference) is
    larger; the .pt is judged only when its own format is named."""
    big_pt = row(format="pt", bytes=5_000_000)
    shipped = check([big_pt, row(bytes=90_000)], Budget(max_size=100_000))
    assert [(v.artifact, v.status) for v in shipped] == [("m.tflite", "PASS")]
    # a report holding only the reference: the size budget judged nothing, which is no pass
    (v,) = check([big_pt], Budget(max_size=100_000))
    assert (v.check, v.status) == ("size", "ERROR") and "float reference .pt" in v.message
    verdicts = check([big_pt], Budget(max_size=100_000, max_size_per_format={"pt": 1_000_000}))
    # the .pt fails its own limit, and max_size, which judges the files that ship, judged none
    assert [(v.check, v.status) for v in verdicts] == [("size", "FAIL"), ("size", "ERROR")]
    # a recipe budgeting exported formats, and a report of the reference alone (verify lost
    # every export): passed with a note, exit 0
    verdicts = check([row(format="pt", bytes=300_000)], Budget(max_size_per_format={"pt": 400_000, "onnx": 300_000,
                                                                                       "tflite-int8.esq": 25_000}))
    assert [(v.format, v.check, v.status) for v in verdicts] == [
        ("pt", "size", "PASS"), ("onnx, tflite-int8.esq", "size", "ERROR")]
    assert "pt <=" not in verdicts[1].limit
    assert not check([row(format="esq", bytes=200_000)], Budget(max_size=100_000))[0].passed


def test_what_was_not_measured_never_passes():
    verdicts = check([row(error="m.tflite: truncated file"), row(accuracy=None, agreement=None)], BUDGET)
    assert [(v.check, v.status) for v in verdicts] == [
        ("evaluate", "ERROR"), ("size", "PASS"), ("accuracy", "ERROR"), ("drop", "ERROR"),
        ("agreement", "ERROR")]
    assert exit_code(verdicts) == 2
    assert check([row(decode_check=False)], Budget())[0].status == "FAIL"


def test_a_size_budget_that_matched_no_artifact_checks_nothing_and_is_no_pass():
    """A recipe's only size budget names the packed file, and the report has none (export
    without pack): the gate passed on accuracy alone, exit 0. Now an ERROR naming the format.
    A budget listing several formats, some of them present, judges those (the others are a
    note of the CLI's, not an error): checking part of a recipe's files stays possible."""
    per = Budget(max_size_per_format={"onnx-int8.esq": 500_000}, min_agreement=0.95)
    verdicts = check([row(format="onnx-int8")], per)
    assert [(v.check, v.status) for v in verdicts] == [("agreement", "PASS"), ("size", "ERROR")]
    assert "no artifact of format onnx-int8.esq" in verdicts[-1].message and exit_code(verdicts) == 2
    both = Budget(max_size_per_format={"onnx-int8.esq": 500_000, "tflite-int8": 100_000})
    assert [(v.check, v.status) for v in check([row()], both)] == [("size", "PASS")]
    assert unmatched_formats([row()], both) == ["onnx-int8.esq"]
    assert exit_code([]) == 2  # no verdict at all is not a pass either


def test_outputs(tmp_path):
    rows = [row(), row(path="big.onnx", format="onnx", bytes=2_000_000)]
    verdicts = check(rows, BUDGET)
    table = verdicts_table(verdicts)
    assert "big.onnx" in table and "FAIL (1,900,000 B over the budget)" in table
    assert table.splitlines()[-1] == "7 passed, 1 failed, 0 could not be measured"
    data = json.loads(verdicts_json(verdicts, rows, BUDGET))
    assert data["exit_code"] == 1 and len(data["verdicts"]) == 8 and data["artifacts"] == rows
    suite = ET.fromstring(verdicts_junit(verdicts)).find("testsuite")
    assert suite.get("tests") == "8" and suite.get("failures") == "1" and suite.get("errors") == "0"
    cases = suite.findall("testcase")
    assert len(cases) == 8 and sum(c.find("failure") is not None for c in cases) == 1
    # named by the check, so a changed limit keeps each test's history; unique per file
    names = [(c.get("classname"), c.get("name")) for c in cases]
    assert len(set(names)) == 8 and {n for _, n in names} == {v.check for v in verdicts}, names
    other = check(rows, dataclasses.replace(BUDGET, max_size=BUDGET.max_size * 2))
    assert [(c.get("classname"), c.get("name")) for c in
            ET.fromstring(verdicts_junit(other)).find("testsuite").findall("testcase")] == names
    # the same file judged twice (in two reports): numbered, not two tests of one name
    twice = [(c.get("classname"), c.get("name")) for c in
             ET.fromstring(verdicts_junit(verdicts + verdicts[:1])).find("testsuite").findall("testcase")]
    assert len(set(twice)) == 9 and twice[-1] == (names[0][0], f"{names[0][1]} (2)")
    # a path holding a character XML cannot carry (ESC) still gives a well-formed file
    esc = check([row(path="bad\x1bname.onnx", format="onnx")], BUDGET)
    case = ET.fromstring(verdicts_junit(esc)).find("testsuite").find("testcase")
    assert case.get("classname") == "bad\\x1bname.onnx"
    md = verdicts_markdown(verdicts, rows)
    assert md.startswith("## edgesqueeze check: Budget broken")
    assert "| `big.onnx` | onnx | - | 2,000,000 |" in md


def test_a_drop_of_zero_has_no_minus_sign():
    """The float model's accuracy recorded as a float32 against the file's float64 of the same
    images: the demo's .esq read "drop -0.00 points"."""
    import numpy as np

    acc = 0.9888579387186629
    (v,) = check([row(accuracy=acc, reference_accuracy=float(np.float32(acc)), n=359)], Budget(max_drop=1.0))
    assert v.value == "0.00 points" and v.status == "PASS", v
