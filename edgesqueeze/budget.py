"""Budgets and the CI gate's verdicts: sizes, accuracy floors, drops, agreement.

Torch-free on purpose: ``edgesqueeze check report.json`` must run on a CI runner that only
has the report, and the device runtime may gate its own measurements.

Sizes are bytes in code. Humans write them with SI or binary units, both understood::

    >>> parse_size("500KB"), parse_size("0.5 MB"), parse_size("64KiB"), parse_size(1234)
    (500000, 500000, 65536, 1234)
"""

from __future__ import annotations

import json
import math
import re
from dataclasses import asdict, dataclass, field
from typing import Any
from xml.sax.saxutils import escape, quoteattr

from edgesqueeze.errors import EdgesqueezeError, RecipeError

__all__ = ["Budget", "Verdict", "parse_size", "format_size", "check", "verdicts_table",
           "verdicts_json", "verdicts_junit", "verdicts_markdown", "verdicts_markdown_table", "exit_code",
           "parse_fraction", "artifacts_markdown"]

_UNITS = {"": 1, "b": 1, "kb": 1000, "mb": 1000 ** 2, "gb": 1000 ** 3,
          "kib": 1024, "mib": 1024 ** 2, "gib": 1024 ** 3}
_SIZE = re.compile(r"^\s*([0-9]+(?:\.[0-9]*)?|\.[0-9]+)\s*([A-Za-z]*)\s*$")
ARTIFACT_FORMATS = ("pt", "esq", "onnx", "onnx-int8", "tflite", "tflite-int8",
                    "onnx.esq", "onnx-int8.esq", "tflite.esq", "tflite-int8.esq")  # .esq: packed files


class BudgetSpecError(EdgesqueezeError):
    """A budget that cannot be read (``0.5 parsecs``): a usage error, exit code 2."""


def parse_size(value: str | int | float, *, what: str = "size") -> int:
    """Bytes from ``1234``, ``"500KB"``, ``"0.5 MB"``, ``"64KiB"`` (KB = 1000 B, KiB = 1024 B)."""
    if isinstance(value, bool):
        raise BudgetSpecError(f"{what}: expected a size like 500KB, got {value!r}")
    if isinstance(value, (int, float)):
        if not math.isfinite(value) or value < 0:
            raise BudgetSpecError(f"{what}: must be a non-negative number of bytes, got {value!r}")
        return int(value)
    m = _SIZE.match(str(value))
    if not m:
        raise BudgetSpecError(f"{what}: cannot read {value!r} as a size; write e.g. 500KB, 0.5MB, "
                              "64KiB or 123456 (bytes)")
    unit = m.group(2).lower()
    if unit not in _UNITS:
        raise BudgetSpecError(f"{what}: unknown unit {m.group(2)!r} in {value!r}; use B, KB, MB, GB "
                              "(powers of 1000) or KiB, MiB, GiB (powers of 1024)")
    return int(round(float(m.group(1)) * _UNITS[unit]))


def format_size(n: int | None) -> str:
    """``15,804 B (15.8 kB)``: exact bytes first, an SI reading after."""
    if n is None:
        return "-"
    if n < 1000:
        return f"{n:,} B"
    for unit, scale in (("GB", 1e9), ("MB", 1e6), ("kB", 1e3)):
        if n >= scale:
            return f"{n:,} B ({n / scale:.1f} {unit})"
    return f"{n:,} B"


def parse_fraction(value: Any, what: str) -> float | None:
    """Accuracy floors as fractions (0.99) or percentages ("99%")."""
    if value is None:
        return None
    if isinstance(value, str) and value.strip().endswith("%"):
        try:
            value = float(value.strip()[:-1]) / 100
        except ValueError:
            raise BudgetSpecError(f"{what}: cannot read {value!r}; write 0.99 or 99%") from None
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0 <= value <= 1:
        raise BudgetSpecError(f"{what}: expected a fraction in [0, 1] (0.99) or a percentage "
                              f"('99%'), got {value!r}")
    return float(value)


@dataclass(frozen=True)
class Budget:
    """What every artifact must hold. ``None`` means "not checked".

    ``max_size`` applies to every artifact, ``max_size_per_format`` (keys: pt, esq, onnx,
    onnx-int8, tflite, tflite-int8, and the packed forms onnx.esq ... tflite-int8.esq)
    overrides it per format. ``min_accuracy`` and
    ``min_agreement`` are fractions; ``max_drop`` is in accuracy *points* against the float
    model the artifact came from.
    """

    max_size: int | None = None
    max_size_per_format: dict[str, int] = field(default_factory=dict)
    min_accuracy: float | None = None
    max_drop: float | None = None
    min_agreement: float | None = None

    @classmethod
    def from_dict(cls, raw: Any, *, path: str = "budget") -> Budget:
        if raw is None:
            return cls()
        if not isinstance(raw, dict):
            raise RecipeError(f"{path}: expected a mapping, got {type(raw).__name__}")
        known = {"max_size", "max_size_per_format", "min_accuracy", "max_drop", "min_agreement"}
        for key in raw:
            if key not in known:
                import difflib

                hint = difflib.get_close_matches(str(key), sorted(known), n=1)
                extra = f"; did you mean {hint[0]!r}?" if hint else f"; allowed keys: {', '.join(sorted(known))}"
                raise RecipeError(f"{path}.{key}: unknown key{extra}")
        per = raw.get("max_size_per_format") or {}
        if not isinstance(per, dict):
            raise RecipeError(f"{path}.max_size_per_format: expected a mapping of format to size")
        for fmt in per:
            if fmt not in ARTIFACT_FORMATS:
                raise RecipeError(f"{path}.max_size_per_format.{fmt}: unknown format; use "
                                  f"{', '.join(ARTIFACT_FORMATS)}")
        drop = raw.get("max_drop")
        if drop is not None and (isinstance(drop, bool) or not isinstance(drop, (int, float)) or drop < 0):
            raise RecipeError(f"{path}.max_drop: expected accuracy points >= 0 (0.5), got {drop!r}")
        try:
            return cls(
                max_size=None if raw.get("max_size") is None else parse_size(raw["max_size"], what=f"{path}.max_size"),
                max_size_per_format={f: parse_size(v, what=f"{path}.max_size_per_format.{f}") for f, v in per.items()},
                min_accuracy=parse_fraction(raw.get("min_accuracy"), f"{path}.min_accuracy"),
                max_drop=None if drop is None else float(drop),
                min_agreement=parse_fraction(raw.get("min_agreement"), f"{path}.min_agreement"),
            )
        except BudgetSpecError as exc:
            raise RecipeError(str(exc)) from None

    def is_empty(self) -> bool:
        return (self.max_size is None and not self.max_size_per_format and self.min_accuracy is None
                and self.max_drop is None and self.min_agreement is None)

    def size_limit(self, fmt: str) -> int | None:
        return self.max_size_per_format.get(fmt, self.max_size)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


@dataclass(frozen=True)
class Verdict:
    """One budget on one artifact: PASS, FAIL, or ERROR (could not be measured: never a pass)."""

    artifact: str
    format: str
    check: str
    limit: str
    value: str
    status: str  # PASS | FAIL | ERROR
    message: str = ""

    @property
    def passed(self) -> bool:
        return self.status == "PASS"


def _pct(x: float | None) -> str:
    return "-" if x is None else f"{100 * x:.2f}%"


def check(rows: list[dict[str, Any]], budget: Budget) -> list[Verdict]:
    """Hold every artifact row (see :mod:`edgesqueeze.verify`) against ``budget``.

    A row with an ``error`` (the artifact could not be loaded or evaluated) gives ERROR for
    every budget, and a budget that needs a number the row lacks (accuracy without data,
    agreement without a reference, drop without the float accuracy) gives ERROR too: the
    gate never passes what it did not measure.
    """
    out: list[Verdict] = []
    for row in rows:
        name, fmt = row.get("path", "?"), row.get("format", "?")
        if row.get("error"):
            out.append(Verdict(name, fmt, "evaluate", "runs", "-", "ERROR", row["error"]))
            continue
        size_limit = budget.size_limit(fmt)
        if size_limit is not None:
            size = row.get("bytes")
            ok = size is not None and size <= size_limit
            out.append(Verdict(name, fmt, "size", f"<= {format_size(size_limit)}", format_size(size),
                               "PASS" if ok else "FAIL",
                               "" if ok else f"{size - size_limit:,} B over the budget"))
        if row.get("decode_check") is False:
            out.append(Verdict(name, fmt, "decode", "bit-exact", "differs", "FAIL",
                               "the archive does not decode to the weights it was measured with"))
        acc = row.get("accuracy")
        if budget.min_accuracy is not None:
            if acc is None:
                out.append(Verdict(name, fmt, "accuracy", f">= {_pct(budget.min_accuracy)}", "-", "ERROR",
                                   "no accuracy measured (give --data, or a report with test accuracy)"))
            else:
                ok = acc >= budget.min_accuracy
                out.append(Verdict(name, fmt, "accuracy", f">= {_pct(budget.min_accuracy)}", _pct(acc),
                                   "PASS" if ok else "FAIL",
                                   "" if ok else f"{100 * (budget.min_accuracy - acc):.2f} points short"))
        if budget.max_drop is not None:
            ref = row.get("reference_accuracy")
            if acc is None or ref is None:
                out.append(Verdict(name, fmt, "drop", f"<= {budget.max_drop:g} points", "-", "ERROR",
                                   "needs the artifact's accuracy and the float model's (--reference)"))
            else:
                drop = 100 * (ref - acc)
                ok = drop <= budget.max_drop + 1e-9
                out.append(Verdict(name, fmt, "drop", f"<= {budget.max_drop:g} points", f"{drop:.2f} points",
                                   "PASS" if ok else "FAIL", "" if ok else f"float model {_pct(ref)}"))
        if budget.min_agreement is not None:
            agr = row.get("agreement")
            if agr is None:
                out.append(Verdict(name, fmt, "agreement", f">= {_pct(budget.min_agreement)}", "-", "ERROR",
                                   "no top-1 agreement measured (give --reference MODEL)"))
            else:
                ok = agr >= budget.min_agreement
                out.append(Verdict(name, fmt, "agreement", f">= {_pct(budget.min_agreement)}", _pct(agr),
                                   "PASS" if ok else "FAIL"))
    return out


def exit_code(verdicts: list[Verdict]) -> int:
    """0 when every budget holds, 1 when one is broken, 2 when something could not be measured."""
    if any(v.status == "ERROR" for v in verdicts):
        return 2
    return 0 if all(v.passed for v in verdicts) else 1


def verdicts_table(verdicts: list[Verdict]) -> str:
    head = ("artifact", "format", "check", "limit", "value", "result")
    cells = [head] + [(v.artifact, v.format, v.check, v.limit, v.value,
                       v.status + (f" ({v.message})" if v.message else "")) for v in verdicts]
    widths = [max(len(str(r[i])) for r in cells) for i in range(len(head) - 1)]
    lines = []
    for r in cells:
        lines.append("  ".join(str(c).ljust(w) for c, w in zip(r, widths)) + "  " + r[-1])
    n_fail = sum(v.status == "FAIL" for v in verdicts)
    n_err = sum(v.status == "ERROR" for v in verdicts)
    lines.append(f"{len(verdicts) - n_fail - n_err} passed, {n_fail} failed, {n_err} could not be measured")
    return "\n".join(lines)


def verdicts_json(verdicts: list[Verdict], rows: list[dict[str, Any]], budget: Budget) -> str:
    return json.dumps({"exit_code": exit_code(verdicts), "budget": budget.to_dict(),
                       "artifacts": rows, "verdicts": [asdict(v) for v in verdicts]}, indent=2) + "\n"


def verdicts_junit(verdicts: list[Verdict], *, suite: str = "edgesqueeze check") -> str:
    """JUnit XML: one test case per artifact and budget (what CI systems render)."""
    fails = sum(v.status == "FAIL" for v in verdicts)
    errors = sum(v.status == "ERROR" for v in verdicts)
    lines = ['<?xml version="1.0" encoding="UTF-8"?>',
             f"<testsuites><testsuite name={quoteattr(suite)} tests=\"{len(verdicts)}\" "
             f"failures=\"{fails}\" errors=\"{errors}\">"]
    for v in verdicts:
        name = quoteattr(f"{v.check} {v.limit}")
        lines.append(f"  <testcase classname={quoteattr(v.artifact)} name={name}>")
        text = escape(f"{v.check}: {v.value}, limit {v.limit}" + (f"; {v.message}" if v.message else ""))
        if v.status == "FAIL":
            lines.append(f"    <failure message={quoteattr(v.message or 'budget broken')}>{text}</failure>")
        elif v.status == "ERROR":
            lines.append(f"    <error message={quoteattr(v.message or 'not measured')}>{text}</error>")
        else:
            lines.append(f"    <system-out>{text}</system-out>")
        lines.append("  </testcase>")
    lines.append("</testsuite></testsuites>")
    return "\n".join(lines) + "\n"


def verdicts_markdown(verdicts: list[Verdict], rows: list[dict[str, Any]]) -> str:
    """For a CI job summary: the verdicts, then every artifact's measurements."""
    code = exit_code(verdicts)
    head = {0: "All budgets hold", 1: "Budget broken", 2: "Could not measure everything"}[code]
    return "\n".join([f"## edgesqueeze check: {head}", "", verdicts_markdown_table(verdicts), "",
                      artifacts_markdown(rows)])


def verdicts_markdown_table(verdicts: list[Verdict]) -> str:
    """One markdown table row per verdict (artifact, check, limit, value, result)."""
    icon = {"PASS": "✅ pass", "FAIL": "❌ FAIL", "ERROR": "⚠️ not measured"}
    lines = ["| artifact | check | limit | value | result |", "| --- | --- | --- | --- | --- |"]
    for v in verdicts:
        msg = f" ({v.message})" if v.message else ""
        lines.append(f"| `{v.artifact}` | {v.check} | {v.limit} | {v.value} | {icon[v.status]}{msg} |")
    return "\n".join(lines)


def artifacts_markdown(rows: list[dict[str, Any]]) -> str:
    """Every artifact: format, bytes, gzip bytes, accuracy, agreement, latency."""
    lines = ["| artifact | format | runtime | bytes | gzip bytes | accuracy | agreement | latency b=1 |",
             "| --- | --- | --- | --- | --- | --- | --- | --- |"]
    for r in rows:
        lat = "-" if r.get("latency_ms") is None else f"{r['latency_ms']:.2f} ms"
        size = "-" if r.get("bytes") is None else f"{r['bytes']:,}"
        gz = "-" if r.get("gzip_bytes") is None else f"{r['gzip_bytes']:,}"
        lines.append(f"| `{r.get('path')}` | {r.get('format')} | {r.get('runtime') or '-'} | {size} | {gz} | "
                     f"{_pct(r.get('accuracy'))} | {_pct(r.get('agreement'))} | {lat} |")
    return "\n".join(lines) + "\n"
