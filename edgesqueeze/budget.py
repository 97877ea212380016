"""The CI gate: every artifact's measurements (rows of :mod:`edgesqueeze.verify`) held against a
:class:`~edgesqueeze.config.budget.Budget`, as verdicts, tables, JSON, JUnit and Markdown.

Torch-free on purpose: ``edgesqueeze check report.json`` must run on a CI runner that only
has the report, and the device runtime may gate its own measurements.
"""

from __future__ import annotations

import json
import math
import os
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Mapping

from edgesqueeze._io import sha256_file
from edgesqueeze.config.budget import ARTIFACT_FORMATS, Budget, format_size
from edgesqueeze.errors import FormatError

__all__ = ["Verdict", "check", "changed_files", "unmatched_formats", "validate_rows", "verdicts_table", "verdicts_json", "verdicts_junit", "verdicts_markdown",
           "verdicts_markdown_table", "exit_code", "artifacts_markdown", "noise_notes"]


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


# fractions of images computed two ways (9,940 / 10,000 and a parsed "99.4%") can differ in the
# last bit: a value at its limit holds it
_EPS = 1e-9


def _digits(enough) -> int:
    """The fewest decimals, 2 to 6, at which ``enough(digits)`` holds (6 if none does): a
    failing number is shown finely enough not to read as its limit or as zero."""
    return next((d for d in range(2, 7) if enough(d)), 6)


def _points(fraction: float) -> str:
    """A shortfall in points, never "0.00" for one that fails."""
    return f"{100 * fraction:.{_digits(lambda d: float(f'{100 * fraction:.{d}f}') > 0)}f}"


def _pcts(value: float, limit: float) -> tuple[str, str]:
    """``value`` and ``limit`` as percentages with enough decimals to tell them apart (a FAIL
    read "98.33% >= 98.33%" at two)."""
    d = _digits(lambda d: f"{100 * value:.{d}f}" != f"{100 * limit:.{d}f}" or abs(value - limit) <= _EPS)
    return f"{100 * value:.{d}f}%", f"{100 * limit:.{d}f}%"


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
                ok = acc >= budget.min_accuracy - _EPS
                shown, limit = _pcts(acc, budget.min_accuracy)
                out.append(Verdict(name, fmt, "accuracy", f">= {limit}", shown, "PASS" if ok else "FAIL",
                                   "" if ok else f"{_points(budget.min_accuracy - acc)} points short"))
        if budget.max_drop is not None:
            ref = row.get("reference_accuracy")
            if acc is None or ref is None:
                out.append(Verdict(name, fmt, "drop", f"<= {budget.max_drop:g} points", "-", "ERROR",
                                   "needs the artifact's accuracy and the float model's (--reference)"))
            else:
                drop = 100 * (ref - acc)
                ok = drop <= budget.max_drop + 100 * _EPS
                lost = _images(ref - acc, row.get("n"))
                shown = f"{drop:.{_digits(lambda d: ok or float(f'{drop:.{d}f}') > budget.max_drop)}f}"
                if float(shown) == 0:  # a float32 and a float64 of one accuracy: "-0.00 points"
                    shown = shown.lstrip("-")
                out.append(Verdict(name, fmt, "drop", f"<= {budget.max_drop:g} points", f"{shown} points",
                                   "PASS" if ok else "FAIL",
                                   "" if ok else f"float model {_pct(ref)}" + (f"; {lost}" if lost else "")))
        if budget.min_agreement is not None:
            agr = row.get("agreement")
            if agr is None:
                out.append(Verdict(name, fmt, "agreement", f">= {_pct(budget.min_agreement)}", "-", "ERROR",
                                   "no top-1 agreement measured (give --reference MODEL)"))
            else:
                ok = agr >= budget.min_agreement - _EPS
                shown, limit = _pcts(agr, budget.min_agreement)
                out.append(Verdict(name, fmt, "agreement", f">= {limit}", shown, "PASS" if ok else "FAIL",
                                   "" if ok else _short(agr, budget.min_agreement, row.get("n"))))
    shipped = [f for f in budget.max_size_per_format if f != "pt"]
    if (budget.max_size is not None or shipped) and not any(v.check == "size" and v.format != "pt" for v in out) \
            and not any(r.get("error") for r in rows):
        # a size budget that matched no artifact that ships checked nothing: never a silent pass
        # (a report of the reference .pt alone passed a recipe that budgets ten exported formats)
        named = ", ".join(sorted(shipped))
        what = (f"no artifact of format {named}" if named and budget.max_size is None else
                "no artifact but the float reference .pt, which --max-size does not judge")
        limit = " or ".join(f"{f} <= {format_size(v)}" for f, v in sorted(budget.max_size_per_format.items())
                            if f != "pt") \
            or f"<= {format_size(budget.max_size)}"
        out.append(Verdict("-", named or "any", "size", limit, "-", "ERROR",
                           f"{what} in the report: no size was checked; verify the file that ships "
                           "(a packed .esq needs export's pack), or drop that size budget"))
    return out


def unmatched_formats(rows: list[dict[str, Any]], budget: Budget) -> list[str]:
    """The formats ``budget.max_size_per_format`` names that no row has (not checked)."""
    present = {r.get("format") for r in rows}
    return sorted(f for f in budget.max_size_per_format if f not in present)


def _is_number(x: Any) -> bool:
    return isinstance(x, (int, float)) and not isinstance(x, bool) and math.isfinite(x)


def _is_count(x: Any, least: int) -> bool:
    return isinstance(x, int) and not isinstance(x, bool) and x >= least


def validate_rows(rows: Any, source: Any, *, names: Mapping[str, str] | None = None,
                  writer: str = "verify") -> None:
    """Refuse, before any budget is held against them, report rows (read from ``source``) that
    :func:`check` would misjudge or crash on: no rows at all (a gate that checks nothing must
    not pass), a field of the wrong type, or a value no measurement gives. Raises
    :class:`~edgesqueeze.errors.FormatError` (exit code 2) naming the file, the row and the
    field: ``verify.json: artifacts[2].accuracy: expected a number in [0, 1], got 'high'``, and
    what to do (fix the file, or write it again with ``edgesqueeze WRITER``).

    A measured row (no ``error``) needs ``path``, a known ``format`` and ``bytes``; ``n``,
    ``accuracy``, ``agreement``, ``reference_accuracy``, ``gzip_bytes``, ``arena_bytes``,
    ``latency_ms`` and ``decode_check`` may be missing or null (a budget that needs one
    gives ERROR, never PASS), but when present must be what a measurement gives. A row
    with an ``error`` (verify could not evaluate the file) needs only ``path`` and
    ``format``. ``names``: where a field came from, for rows not read from an
    ``artifacts`` list (a compress report's ``totals.esq_bytes``).

        >>> validate_rows([{"path": "m.onnx", "format": "onnx", "bytes": 10, "accuracy": 0.9}], "v.json")
        >>> try:
        ...     validate_rows([{"path": "m.onnx", "format": "onnx", "bytes": 10, "accuracy": 1.7}], "v.json")
        ... except FormatError as exc:
        ...     print(str(exc).split(";")[0])
        v.json: artifacts[0].accuracy: expected a number in [0, 1], got 1.7
    """
    if not rows:
        raise FormatError(f"{source}: no artifacts to check (its 'artifacts' list is empty), and a gate that "
                          "checks nothing must not pass; give the report `edgesqueeze verify` wrote for the "
                          "files to gate, or the files themselves")
    remedy = f"fix it, or write the report again with `edgesqueeze {writer}`"
    for i, row in enumerate(rows):
        def bad(field: str, expected: str, got: Any = None, missing: bool = False, i: int = i) -> FormatError:
            where = (names or {}).get(field, f"artifacts[{i}].{field}")
            said = f"missing, expected {expected}" if missing else f"expected {expected}, got {got!r}"
            return FormatError(f"{source}: {where}: {said}; {remedy}")

        if not isinstance(row, dict):
            raise FormatError(f"{source}: artifacts[{i}]: expected an object (one artifact's row), got "
                              f"{type(row).__name__}; {remedy}")
        error = row.get("error")
        if error is not None and not isinstance(error, str):
            raise bad("error", "null or a string (why the file could not be evaluated)", error)
        if not isinstance(row.get("path"), str) or not row.get("path"):
            raise bad("path", "a file path (a string)", row.get("path"), missing="path" not in row)
        fmt = row.get("format")
        if error:  # not measured: the gate reports ERROR whatever else the row says
            if not isinstance(fmt, str):
                raise bad("format", "a string naming the file's format", fmt, missing="format" not in row)
        elif fmt not in ARTIFACT_FORMATS:
            raise bad("format", f"one of {', '.join(ARTIFACT_FORMATS)}", fmt, missing="format" not in row)
        size = row.get("bytes")
        if size is None and not error:
            raise bad("bytes", "a positive whole number of bytes (the file's size)", size, missing="bytes" not in row)
        for field, what in (("bytes", "the file's size"), ("gzip_bytes", "the file's gzip size"),
                            ("arena_bytes", "the arena the file needs")):
            if row.get(field) is not None and not _is_count(row[field], 1):
                raise bad(field, f"a positive whole number of bytes ({what})", row[field])
        n, least = row.get("n"), 0 if error else 1  # verify writes n 0 for a file it could not evaluate
        if n is not None and not _is_count(n, least):
            raise bad("n", f"a whole number >= {least} (the test images evaluated)", n)
        for field in ("accuracy", "agreement", "reference_accuracy"):
            x = row.get(field)
            if x is not None and not (_is_number(x) and 0 <= x <= 1):
                raise bad(field, "a number in [0, 1]", x)
        if row.get("latency_ms") is not None and not (_is_number(row["latency_ms"]) and row["latency_ms"] >= 0):
            raise bad("latency_ms", "a number >= 0 (milliseconds)", row["latency_ms"])
        if row.get("decode_check") is not None and not isinstance(row["decode_check"], bool):
            raise bad("decode_check", "true, false or null", row["decode_check"])
        sha = row.get("sha256")
        if sha is not None and not (isinstance(sha, str) and len(sha) == 64
                                    and all(c in "0123456789abcdef" for c in sha)):
            raise bad("sha256", "null or the file's SHA-256 (64 lowercase hex digits)", sha)


def report_file(name: str, source: Any, written_from: Any = None, written_to: Any = None) -> Path:
    """Where the file a report names is here: a relative ``name`` beside the report
    ``source`` first, then under ``written_from`` (the folder verify ran in, where it exists
    here), then from the current folder (the last when none of them holds it).

    "Beside the report" is where the file lay relative to the report when verify wrote it
    (``written_to``, the report's folder then, which verify records): ``verify --out
    artifacts/ci/verify.json`` of ``artifacts/ci/export/m.onnx`` names ``export/m.onnx`` beside
    the report wherever the folder is copied. Without it (an older report), ``name`` itself."""
    if Path(name).is_absolute():
        return Path(name)
    base = Path(written_from) if isinstance(written_from, (str, os.PathLike)) and str(written_from) else None
    beside = Path(source).parent if isinstance(source, (str, os.PathLike)) else None
    tries = []
    if beside is not None and base is not None and isinstance(written_to, str) and Path(written_to).is_absolute():
        rel = os.path.relpath(os.path.join(base, name), written_to)
        if rel != os.pardir and not rel.startswith(os.pardir + os.sep):  # the file lay in the report's folder
            tries.append(beside / rel)
    if base is not None and not (base.is_absolute() and base.is_dir()):
        base = None
    tries += [d / name for d in (beside, base) if d is not None] + [Path(name)]
    return next((t for t in tries if t.is_file()), tries[-1])


def changed_files(rows: list[dict[str, Any]], source: Any, written_from: Any = None,
                  unhashed: list[str] | None = None, written_to: Any = None) -> tuple[list[dict[str, Any]], list[str]]:
    """Rows of the report ``source`` with each file the report measured checked against its
    recorded ``sha256``: a file that is here with other bytes gets an ``error`` (the gate
    reports ERROR: the report's numbers are another file's, and a re-export without a new
    ``verify`` must not pass on them). Returns the rows and the paths not found here (their
    numbers are the report's, as on a machine that has only the report). A relative path is
    looked for beside the report first (a report copied with its files, as a CI artifact
    arrives on a device: the files there are the ones to check, not the ones where verify
    ran, which a report copied on the same machine was checked against), then from
    ``written_from`` (the folder the report was written from, which it records) where that
    folder exists here, then from the current one (the report came from another machine,
    into the same layout). A row without ``sha256`` (a report of an older verify, or
    edited) is checked by its recorded size only: a file of another size gets the ``error``,
    one of the same size is named in ``unhashed`` (the caller says it was not checked)."""
    base = written_from if isinstance(written_from, str) else None
    out, absent = [], []
    for row in rows:
        sha, name = row.get("sha256"), row.get("path")
        if row.get("error") or not isinstance(name, str):
            out.append(row)
            continue
        path = report_file(name, source, base, written_to)
        try:
            if not path.is_file():
                absent.append(name)
                out.append(row)
                continue
            size = path.stat().st_size
            if not sha:  # no digest recorded: its size is all there is to compare
                then = row.get("bytes")
                if isinstance(then, int) and not isinstance(then, bool) and then != size:
                    out.append({**row, "error": f"changed since {source} measured it ({size:,} B now, {then:,} B "
                                                "then); its numbers are another file's: run `edgesqueeze verify` "
                                                "on it again"})
                else:
                    if unhashed is not None:
                        unhashed.append(name)
                    out.append(row)
                continue
            digest = sha256_file(path)
        except OSError as exc:
            out.append({**row, "error": f"{name}: cannot read it to check it is the file {source} measured "
                                        f"({exc.strerror or exc})"})
            continue
        if digest != sha:
            then = row.get("bytes")
            sizes = (f"{size:,} B now, {then:,} B then" if isinstance(then, int) and then != size
                     else "same size, other bytes")
            out.append({**row, "error": f"changed since {source} measured it ({sizes}: SHA-256 differs); its "
                                        "numbers are another file's: run `edgesqueeze verify` on it again"})
        else:
            out.append(row)
    return out, absent


_Z95 = 1.959964  # the normal quantile of a two-sided 95% interval


def _wilson(p: float, n: int, z: float = _Z95) -> tuple[float, float]:
    """Wilson's 95% score interval of a proportion ``p`` measured on ``n`` images."""
    d = 1 + z * z / n
    centre = (p + z * z / (2 * n)) / d
    half = z * math.sqrt(max(p * (1 - p), 0.0) / n + z * z / (4 * n * n)) / d
    return max(0.0, centre - half), min(1.0, centre + half)


def noise_notes(rows: list[dict[str, Any]], budget: Budget) -> list[str]:
    """One line for each accuracy, agreement or drop whose limit lies inside the 95% interval
    of its measurement on the row's ``n`` test images: another ``n`` images of the same kind
    could turn that PASS or FAIL around, so only more test images decide it.

    Accuracy and agreement: Wilson's interval. Drop (the float model's accuracy minus the
    artifact's, on the same images): only images whose top-1 differs between the two can
    change it, so its per-image variance is at most the disagreement ``1 - agreement``; the
    interval is the drop +- 1.96 sqrt(disagreement / n) (no note without an agreement).
    On the 100 ImageNet sample images a FAIL at 94% agreement against 95% is such a case
    (87.5-97.2%); the digits demo's 98.61% on 359 images against 95% is not (96.8-99.4%).
    """
    notes = []
    for row in rows:
        n = row.get("n")
        if row.get("error") or not _is_count(n, 1):
            continue
        name, acc, agr, ref = row.get("path", "?"), row.get("accuracy"), row.get("agreement"), row.get("reference_accuracy")
        if row.get("format") == "pt" and agr == 1.0:  # the float reference against itself: its agreement and
            agr = ref = None  # drop sample nothing; its accuracy is a sample of the test images like any other
        near = []
        for check_name, value, limit in (("accuracy", acc, budget.min_accuracy),
                                         ("agreement", agr, budget.min_agreement)):
            if _is_number(value) and _is_number(limit):
                lo, hi = _wilson(float(value), n)
                if lo < limit < hi:
                    near.append(f"{check_name} {100 * value:.2f}% (95% interval {100 * lo:.1f}-{100 * hi:.1f}%, "
                                f"limit {100 * limit:.2f}%)")
        if budget.max_drop is not None and _is_number(acc) and _is_number(ref) and _is_number(agr):
            drop, half = 100 * (ref - acc), 100 * _Z95 * math.sqrt(max(0.0, 1 - agr) / n)
            if drop - half < budget.max_drop < drop + half:
                near.append(f"drop {drop:.2f} points (95% interval {drop - half:.1f} to {drop + half:.1f} points, "
                            f"limit {budget.max_drop:g})")
        if near:
            notes.append(f"note: {name}: within the sampling noise of its {n} test images: {'; '.join(near)}; "
                         "more test images decide it")
    return notes


def _short(agreement: float, least: float, n) -> str:
    """What a failed agreement lacks: ``"2 test images short; 37 of 359 disagree"`` (the
    bracket gave the disagreements alone, which a README calls the shortfall)."""
    if not isinstance(n, int) or isinstance(n, bool) or n <= 0:
        return ""
    agree, need = round(agreement * n), math.ceil(least * n - 1e-9)
    return f"{need - agree} test image{'' if need - agree == 1 else 's'} short; {_images(1 - agreement, n, 'disagree')}"


def _images(frac: float, n, verb: str = "") -> str:
    """``"k of n test images[ verb]"`` for a fraction ``frac`` of ``n`` test images (how much
    a small test set's point is worth), or "" when ``n`` is unknown."""
    if not isinstance(n, int) or isinstance(n, bool) or n <= 0:
        return ""
    k = round(frac * n)
    return f"{k} of {n} test images" + (f" {verb}" if verb else "")


def exit_code(verdicts: list[Verdict]) -> int:
    """0 when every budget holds, 1 when one is broken, 2 when something could not be measured."""
    if not verdicts or any(v.status == "ERROR" for v in verdicts):  # nothing checked is not a pass
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


def verdicts_json(verdicts: list[Verdict], rows: list[dict[str, Any]], budget: Budget,
                  notes: list[str] | None = None) -> str:
    """The verdicts as JSON; ``notes``: :func:`noise_notes` of ``rows``, when the caller has them."""
    return json.dumps({"exit_code": exit_code(verdicts), "budget": budget.to_dict(),
                       "artifacts": rows, "verdicts": [asdict(v) for v in verdicts],
                       "notes": noise_notes(rows, budget) if notes is None else notes}, indent=2) + "\n"


def verdicts_junit(verdicts: list[Verdict], *, suite: str = "edgesqueeze check") -> str:
    """JUnit XML: one test case per artifact and budget (what CI systems render)."""
    from xml.sax.saxutils import escape, quoteattr  # here: 12 ms of imports (urllib, http) a check without --junit skips
    fails = sum(v.status == "FAIL" for v in verdicts)
    errors = sum(v.status == "ERROR" for v in verdicts)

    def xml(text: str) -> str:  # characters XML 1.0 cannot hold (a path with ESC in it) written as \x1b,
        # a file name's bytes that are not UTF-8 (U+DC80..U+DCFF in Python) as \xff, as in the markdown
        return "".join(c if c in "\t\n\r" or "\x20" <= c <= "\ud7ff" or "\ue000" <= c <= "\ufffd"
                       or c >= "\U00010000" else f"\\x{ord(c):02x}" if ord(c) < 256
                       else f"\\x{ord(c) - 0xDC00:02x}" if "\udc80" <= c <= "\udcff" else f"\\u{ord(c):04x}"
                       for c in str(text))

    lines = ['<?xml version="1.0" encoding="UTF-8"?>',
             f"<testsuites><testsuite name={quoteattr(suite)} tests=\"{len(verdicts)}\" "
             f"failures=\"{fails}\" errors=\"{errors}\">"]
    seen: dict[tuple[str, str], int] = {}
    for v in verdicts:
        # named by the check alone, so a changed limit keeps a test's history; a check that repeats
        # for one file (the same file in two reports) gets a number, so names stay unique
        key = (v.artifact, v.check)
        seen[key] = seen.get(key, 0) + 1
        name = v.check if seen[key] == 1 else f"{v.check} ({seen[key]})"
        lines.append(f"  <testcase classname={quoteattr(xml(v.artifact))} name={quoteattr(xml(name))}>")
        text = escape(xml(f"{v.check}: {v.value}, limit {v.limit}" + (f"; {v.message}" if v.message else "")))
        if v.status == "FAIL":
            lines.append(f"    <failure message={quoteattr(xml(v.message or 'budget broken'))}>{text}</failure>")
        elif v.status == "ERROR":
            lines.append(f"    <error message={quoteattr(xml(v.message or 'not measured'))}>{text}</error>")
        else:
            lines.append(f"    <system-out>{text}</system-out>")
        lines.append("  </testcase>")
    lines.append("</testsuite></testsuites>")
    return "\n".join(lines) + "\n"


def verdicts_markdown(verdicts: list[Verdict], rows: list[dict[str, Any]], notes: list[str] = ()) -> str:
    """For a CI job summary: the verdicts, any notes (:func:`noise_notes`), then every
    artifact's measurements."""
    code = exit_code(verdicts)
    head = {0: "All budgets hold", 1: "Budget broken", 2: "Could not measure everything"}[code]
    extra = [f"- {md_cell(n)}" for n in notes]
    return "\n".join([f"## edgesqueeze check: {head}", "", verdicts_markdown_table(verdicts), "",
                      *(extra + [""] if extra else []), artifacts_markdown(rows)])


def md_cell(text: Any) -> str:
    """Table-safe markdown: one line, pipes escaped."""
    return " ".join(str(text).split()).replace("|", "\\|")


def md_code(text: Any) -> str:
    """A table-safe code span of ``text`` (a file name): fenced with one backtick more than
    the longest run of backticks in it, so a name holding one does not end the span early."""
    text = md_cell(text)
    longest, run = 0, 0
    for ch in text:
        run = run + 1 if ch == "`" else 0
        longest = max(longest, run)
    fence = "`" * (longest + 1)
    pad = " " if text.startswith("`") or text.endswith("`") else ""
    return f"{fence}{pad}{text}{pad}{fence}"


def verdicts_markdown_table(verdicts: list[Verdict]) -> str:
    """One markdown table row per verdict (artifact, check, limit, value, result)."""
    icon = {"PASS": "✅ pass", "FAIL": "❌ FAIL", "ERROR": "⚠️ not measured"}
    lines = ["| artifact | check | limit | value | result |", "| --- | --- | --- | --- | --- |"]
    for v in verdicts:
        msg = f" ({md_cell(v.message)})" if v.message else ""  # md_cell strips the space before it
        lines.append(f"| {md_code(v.artifact)} | {v.check} | {v.limit} | {v.value} | {icon[v.status]}{msg} |")
    return "\n".join(lines)


def artifacts_markdown(rows: list[dict[str, Any]]) -> str:
    """Every artifact: format, bytes, gzip bytes, accuracy, agreement, latency (and the
    arena bytes of TensorFlow Lite Micro files, when there are any)."""
    arena = any(r.get("arena_bytes") for r in rows)
    lines = ["| artifact | format | runtime | bytes | gzip bytes | accuracy | agreement | latency b=1 |"
             + (" arena bytes |" if arena else ""), "| --- " * (9 if arena else 8) + "|"]
    for r in rows:
        lat = "-" if r.get("latency_ms") is None else f"{r['latency_ms']:.2f} ms"
        size = "-" if r.get("bytes") is None else f"{r['bytes']:,}"
        gz = "-" if r.get("gzip_bytes") is None else f"{r['gzip_bytes']:,}"
        lines.append(f"| {md_code(r.get('path'))} | {r.get('format')} | {r.get('runtime') or '-'} | {size} | {gz} | "
                     f"{_pct(r.get('accuracy'))} | {_pct(r.get('agreement'))} | {lat} |"
                     + (f" {r['arena_bytes']:,} |" if r.get("arena_bytes") else " - |" if arena else ""))
    return "\n".join(lines) + "\n"


def _not_text(value: Any, where: str = "") -> tuple[str, str] | None:
    """``(where, char)``: the path (``artifacts[2].error``) of the first string in ``value``
    holding a lone UTF-16 surrogate that no file name gives, and that character; None when
    there is none. A name's bytes that are not UTF-8 are U+DC80..U+DCFF (Python's
    ``surrogateescape``), which ``verify`` writes as JSON escapes: those are names, not damage."""
    if isinstance(value, str):
        bad = next((c for c in value if "\ud800" <= c <= "\udfff" and not "\udc80" <= c <= "\udcff"), None)
        return None if bad is None else (where or "the report", bad)
    items = value.items() if isinstance(value, dict) else enumerate(value) if isinstance(value, list) else ()
    for k, v in items:
        key = f"{where}[{k}]" if isinstance(k, int) else f"{where}.{k}" if where else str(k)
        found = (_not_text(k, key) if isinstance(k, str) else None) or _not_text(v, key)
        if found is not None:
            return found
    return None


def rows_from_report(path: str | Path) -> list[dict[str, Any]]:
    """Artifact rows from a report.json: a ``verify`` report, or a ``compress`` report."""
    path = Path(path)
    try:
        report = json.loads(path.read_text())
    except OSError as exc:
        raise FormatError(f"{path}: cannot read ({exc.strerror or exc})") from None
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise FormatError(f"{path}: not a JSON report ({exc})") from None
    except RecursionError:
        raise FormatError(f"{path}: not an edgesqueeze report (JSON nested too deeply to read)") from None
    if not isinstance(report, dict):
        raise FormatError(f"{path}: not an edgesqueeze report (expected a JSON object)")
    bad = _not_text(report)
    if bad is not None:  # "\ud800": JSON takes it, no output can be written with it (a traceback, exit 1)
        raise FormatError(f"{path}: {bad[0]}: a lone surrogate (\\u{ord(bad[1]):04x}) is not text; a damaged or "
                          "hand-edited report: run `edgesqueeze verify` again")
    if isinstance(report.get("artifacts"), list):
        rows = report["artifacts"]
        for i, row in enumerate(rows):
            if not isinstance(row, dict) or "path" not in row or "format" not in row:
                raise FormatError(f"{path}: artifacts[{i}] is not an artifact row (needs path and format)")
        return rows
    if "totals" in report and "test" in report:  # a compress report: one .esq row
        t, test = report["totals"], report["test"]
        esq = Path(report.get("esq", "model.esq"))
        return [{"path": str(esq), "format": "esq", "runtime": "edgesqueeze .esq decoder + pytorch",
                 "bytes": t.get("esq_bytes"), "gzip_bytes": None, "n": test["after"].get("n"),
                 "accuracy": test["after"].get("accuracy"), "agreement": test.get("agreement"),
                 "reference_accuracy": test["before"].get("accuracy"), "decode_check": True,
                 "latency_ms": None, "error": None, "sha256": t.get("esq_sha256")}]
    raise FormatError(f"{path}: not an edgesqueeze report (no 'artifacts' list, no compress totals)")
