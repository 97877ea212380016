"""``verify.md`` and its two plots: every artifact's size, accuracy, agreement and latency.

Torch-free, like :mod:`edgesqueeze.budget`: everything here is a pure function of the
report :func:`edgesqueeze.verify.evaluate_artifacts` returns (``dataset``, ``datasets``,
``reference``, ``reference_accuracy``, ``artifacts``: one row per file), so a report can be
re-rendered from a ``verify.json`` alone.

Written next to the JSON report, the stem taken from it (``--out gate/verify.json`` gives
``gate/verify.md``)::

    verify.md            the artifact table, the budget verdicts, dataset, machine, plots
    size_by_format.png   bytes and gzip bytes per artifact (bars)
    accuracy_vs_size.png accuracy against bytes, one labelled point per artifact

A row with an ``error`` (the artifact could not be loaded or evaluated) is shown as an
error in the table and left out of both plots. Plots are skipped, with a note in the
markdown, when matplotlib is missing or no artifact was measured.
"""

from __future__ import annotations

import datetime as dt
import os
import sys
from pathlib import Path
from typing import Any

from edgesqueeze._io import atomic_path, write_text_atomic
from edgesqueeze.budget import Verdict, md_cell, md_code, verdicts_markdown_table
from edgesqueeze.config.budget import format_size

__all__ = ["machine_info", "plot_paths", "markdown", "size_series", "accuracy_points", "label_groups",
           "plot_size_by_format", "plot_accuracy_vs_size", "write_report"]

PLOTS = ("size_by_format", "accuracy_vs_size")
_TITLES = {"size_by_format": "size by format", "accuracy_vs_size": "accuracy against size"}


def machine_info(threads: int | None = None) -> dict[str, Any]:
    """Where the numbers were measured: CPU model, architecture, the ISA features that select
    int8 kernels (``features``, ``int8_kernels``: see :mod:`edgesqueeze.runtime.cpu`),
    logical cores, runtime threads, UTC date.

    ``threads`` is what the runtimes were given (``None``: each runtime's default). When
    PyTorch is already loaded its intra-op thread count is added (``torch_threads``);
    this module never imports torch itself.
    """
    from edgesqueeze.runtime.cpu import cpu_info

    cpu = cpu_info()
    info: dict[str, Any] = {"cpu": cpu["cpu"] or "unknown", "arch": cpu["arch"], "features": cpu["features"],
                            "int8_kernels": cpu["int8_kernels"], "cores": os.cpu_count(), "threads": threads,
                            "date": dt.datetime.now(dt.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")}
    if cpu.get("note"):  # /proc/cpuinfo names another CPU than the one the runtimes ran on
        info["cpu_note"] = cpu["note"]
    torch = sys.modules.get("torch")
    if torch is not None and hasattr(torch, "get_num_threads"):  # verify times PyTorch rows on `threads` too
        info["torch_threads"] = threads or torch.get_num_threads()
    return info


def plot_paths(json_path: str | os.PathLike) -> dict[str, Path]:
    """Where the plots of the report ``json_path`` go: beside it.

    ``verify.json`` gives ``size_by_format.png`` and ``accuracy_vs_size.png``. Any other
    stem prefixes them (``gate.json``: ``gate_size_by_format.png``), and so does a folder
    holding a compress ``report.md``, whose own ``accuracy_vs_size.png`` must not be
    overwritten (``verify_accuracy_vs_size.png``)::

        >>> plot_paths("out/verify.json")["size_by_format"].as_posix()
        'out/size_by_format.png'
    """
    path = Path(json_path)
    folder, stem = path.parent, path.stem
    prefix = "" if stem == "verify" and not (folder / "report.md").exists() else f"{stem}_"
    return {name: folder / f"{prefix}{name}.png" for name in PLOTS}


def _measured(row: dict[str, Any]) -> bool:
    return not row.get("error") and row.get("bytes") is not None


def _labels(rows: list[dict[str, Any]]) -> list[str]:
    """The format names each row; where two rows share a format, the file name is added
    (with its folder when the names are the same too)."""
    formats = [str(r.get("format") or "?") for r in rows]
    paths = [Path(str(r.get("path"))) for r in rows]
    names = [p.name for p in paths]
    out = []
    for f, p, name in zip(formats, paths, names):
        if formats.count(f) > 1:
            f += "\n" + (name if names.count(name) == 1 else "/".join(p.parts[-2:]))
        out.append(f)
    return out


def _pyplot():
    """matplotlib.pyplot on the Agg backend, or None when matplotlib is not installed."""
    try:
        import matplotlib
    except ImportError:
        return None
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _save(fig, plt, path: Path) -> None:
    """Write ``fig`` as PNG to a temporary file beside ``path``, then rename it over ``path``."""
    try:
        fig.tight_layout()
        with atomic_path(path) as tmp:
            fig.savefig(tmp, format="png", dpi=100)
    finally:
        plt.close(fig)


def size_series(rows: list[dict[str, Any]]) -> list[tuple[str, int, int | None]]:
    """What :func:`plot_size_by_format` draws: ``(label, bytes, gzip_bytes)`` per measured row.

    Rows with an error, or without a size, are left out::

        >>> size_series([{"format": "esq", "bytes": 20000, "gzip_bytes": 19500},
        ...              {"format": "tflite", "bytes": 10, "error": "truncated"}])
        [('esq', 20000, 19500)]
    """
    rows = [r for r in rows if _measured(r)]
    return [(label, r["bytes"], r.get("gzip_bytes")) for r, label in zip(rows, _labels(rows))]


def accuracy_points(report: dict[str, Any]) -> list[tuple[str, int, float, bool]]:
    """What :func:`plot_accuracy_vs_size` draws: ``(label, bytes, accuracy, is_reference)``
    per row with a size and an accuracy and no error; ``is_reference`` marks the float model."""
    rows = [r for r in report.get("artifacts", []) if _measured(r) and r.get("accuracy") is not None]
    reference = report.get("reference")
    return [(label.replace("\n", " "), r["bytes"], r["accuracy"],
             reference is not None and str(r.get("path")) == str(reference))
            for r, label in zip(rows, _labels(rows))]


def plot_size_by_format(rows: list[dict[str, Any]], path: str | os.PathLike) -> bool:
    """Bars of bytes and gzip bytes per measured artifact, written atomically to ``path``.

    The scale is logarithmic when the largest file is over 20x the smallest (a float
    checkpoint beside a 4-bit archive), linear otherwise. Returns False, writing nothing,
    when no row was measured; raises ImportError when matplotlib is missing.
    """
    series = size_series(rows)
    if not series:
        return False
    plt = _pyplot()
    if plt is None:
        raise ImportError("matplotlib is not installed")
    labels = [s[0] for s in series]
    size = [s[1] / 1000 for s in series]
    gz = [(s[2] or 0) / 1000 for s in series]
    xs = range(len(series))
    fig, ax = plt.subplots(figsize=(max(6.0, 1.1 * len(rows) + 2), 4))
    width = 0.4
    bars = ax.bar([x - width / 2 for x in xs], size, width, label="file")
    gz_bars = ax.bar([x + width / 2 for x in xs], gz, width, label="gzip -9")
    for group in (bars, gz_bars):
        for b in group:
            if b.get_height() > 0:
                ax.annotate(f"{b.get_height():,.1f}", (b.get_x() + b.get_width() / 2, b.get_height()),
                            textcoords="offset points", xytext=(0, 2), ha="center", fontsize=7)
    positive = [v for v in size + gz if v > 0]
    log = len(positive) > 1 and max(positive) / min(positive) > 20
    if log:
        ax.set_yscale("log")
    ax.set_xticks(list(xs))
    ax.set_xticklabels(labels, fontsize=8)
    ax.set_ylabel("size (kB = 1,000 B" + (", log scale)" if log else ")"))
    ax.set_title("size by format")
    ax.legend()
    _save(fig, plt, Path(path))
    return True


def _reference_accuracy(report: dict[str, Any]) -> float | None:
    if report.get("reference_accuracy") is not None:
        return report["reference_accuracy"]
    refs = {r.get("reference_accuracy") for r in report.get("artifacts", []) if _measured(r)}
    return refs.pop() if len(refs) == 1 else None  # several float models: no single line to draw


def label_groups(points: list[tuple[str, int, float, bool]], *, log_x: bool = False,
                 near: float = 0.06) -> list[tuple[int, float, str]]:
    """One ``(bytes, accuracy, text)`` label per cluster of points that would overprint.

    Points closer than ``near`` of the axis span on both axes (the size axis in log space
    when ``log_x``) share one label, their names stacked, at the first point. Exports of one
    model often have the same accuracy and near sizes::

        >>> label_groups([("onnx-int8", 118_271, 0.975, False), ("tflite-int8", 114_448, 0.975, False),
        ...               ("esq", 17_404, 0.975, False), ("pt", 309_245, 0.989, True)])
        [(118271, 0.975, 'onnx-int8\\ntflite-int8'), (17404, 0.975, 'esq'), (309245, 0.989, 'pt (float reference)')]
    """
    import math

    def xv(b: int) -> float:
        return math.log10(max(b, 1)) if log_x else float(b)

    xs, ys = [xv(p[1]) for p in points], [p[2] for p in points]
    x_span = (max(xs) - min(xs)) or 1.0
    y_span = (max(ys) - min(ys)) or 1.0
    groups: list[list[int]] = []
    for i in range(len(points)):
        for g in groups:
            j = g[0]
            if abs(xs[i] - xs[j]) <= near * x_span and abs(ys[i] - ys[j]) <= near * y_span:
                g.append(i)
                break
        else:
            groups.append([i])
    return [(points[g[0]][1], points[g[0]][2],
             "\n".join(points[i][0] + (" (float reference)" if points[i][3] else "") for i in g)) for g in groups]


def plot_accuracy_vs_size(report: dict[str, Any], path: str | os.PathLike) -> bool:
    """Test accuracy against bytes, one labelled point per measured artifact, to ``path``.

    The float reference is marked: its own row with a star, and its accuracy as a dashed
    line (also when it came from ``--reference`` or from the artifacts' metadata rather than
    from a row). Returns False, writing nothing, when no row has both a size and an
    accuracy; raises ImportError when matplotlib is missing.
    """
    points = accuracy_points(report)
    if not points:
        return False
    plt = _pyplot()
    if plt is None:
        raise ImportError("matplotlib is not installed")
    sizes = [p[1] for p in points]
    log_x = len(sizes) > 1 and max(sizes) / max(min(sizes), 1) > 20
    fig, ax = plt.subplots(figsize=(6, 4))
    for label, size, acc, is_ref in points:
        ax.plot([size / 1000], [100 * acc], "*" if is_ref else "o", color="C3" if is_ref else "C0",
                markersize=12 if is_ref else 7)
    for x, y, text in label_groups(points, log_x=log_x):
        ax.annotate(text, (x / 1000, 100 * y), textcoords="offset points", xytext=(5, 4), fontsize=8)
    ref_acc = _reference_accuracy(report)
    if ref_acc is not None:
        ax.axhline(100 * ref_acc, color="C3", linestyle="--", linewidth=1,
                   label=f"float reference {100 * ref_acc:.2f}%")
        ax.legend(loc="best", fontsize=8)
    if log_x:
        ax.set_xscale("log")
        ax.set_xlabel("size (kB = 1,000 B, log scale)")
    else:
        ax.set_xlabel("size (kB = 1,000 B)")
    ax.set_ylabel("test accuracy (%)")
    ax.set_title("accuracy against size")
    ax.margins(x=0.15, y=0.15)
    _save(fig, plt, Path(path))
    return True


def _rel(path: str, folder: Path | None) -> str:
    """A file's path as the report's reader finds it: relative to the report when below it."""
    if folder is None:
        return path
    try:
        rel = os.path.relpath(Path(path).resolve(), folder.resolve())
    except ValueError:  # another drive (Windows)
        return path
    return path if rel.startswith("..") else Path(rel).as_posix()


def _pct(x: float | None) -> str:
    return "-" if x is None else f"{100 * x:.2f}%"


def markdown(report: dict[str, Any], *, verdicts: list[Verdict] | None = None,
             machine: dict[str, Any] | None = None, plots: dict[str, str | None] | None = None,
             folder: str | os.PathLike | None = None, notes: list[str] | None = None) -> str:
    """The markdown of ``verify.md``.

    ``verdicts``: the budget's, when one was given; ``notes``: what
    :func:`edgesqueeze.budget.noise_notes` says of them. ``plots``: plot name (see ``PLOTS``) to
    the file name to link, relative to the report (a missing name is not linked), and
    ``"_note"`` to a sentence saying why plots were skipped, as :func:`write_report` passes
    them. ``folder``: where the report lives, to show artifact paths relative to it.
    """
    rows = report.get("artifacts", [])
    base = Path(folder) if folder is not None else None
    lines = ["# edgesqueeze verify: artifacts", ""]
    names = report.get("datasets") or ([report["dataset"]] if report.get("dataset") else [])
    ns = sorted({r.get("n") for r in rows if _measured(r) and r.get("n")})
    n_text = (f"{ns[0]:,} test images" if len(ns) == 1 else
              "test images: see the n column" if ns else "no test images evaluated")
    lines.append(f"- dataset: {', '.join(names) or 'as recorded in each file'}; {n_text}")
    if report.get("reference"):
        lines.append(f"- float reference: {md_code(_rel(report['reference'], base))}, test accuracy "
                     f"{_pct(report.get('reference_accuracy'))} (agreement = top-1 agreement with it)")
    elif report.get("reference_accuracy") is not None:
        lines.append(f"- float reference accuracy: {_pct(report['reference_accuracy'])}")
    if machine:
        threads = machine.get("threads") or "each runtime's default (onnxruntime one per physical core, LiteRT 1)"
        torch_threads = f" (PyTorch {machine['torch_threads']})" if machine.get("torch_threads") else ""
        lines.append(f"- machine: {machine.get('cpu')}, {machine.get('cores')} cores, threads {threads}"
                     f"{torch_threads}, {machine.get('date')}")
        if machine.get("int8_kernels"):
            feats = ", ".join(machine.get("features") or []) or "none listed"
            lines.append(f"- int8 kernels: {machine['int8_kernels']} ({machine.get('arch')}; {feats})")
        if machine.get("cpu_note"):
            lines.append(f"- CPU: {machine['cpu_note']}")
    with_latency = any(r.get("latency_ms") is not None for r in rows)
    lines.append("- latency: batch 1, p50 over repeated calls on one input" if with_latency
                 else "- latency: not measured (`edgesqueeze verify --latency`)")
    lines.append("- sizes in bytes; kB = 1,000 B; gzip bytes: the file after gzip level 9 (Python's gzip, mtime 0)")

    head = ["format", "file", "bytes", "gzip bytes", "accuracy", "agreement"]
    with_arena = any(r.get("arena_bytes") for r in rows)  # TensorFlow Lite Micro files: RAM beside flash
    if with_arena:
        head.append("arena bytes")
    if len(ns) > 1:
        head.append("n")
    if with_latency:
        head.append("latency p50 (ms)")
    head.append("runtime")
    lines += ["", "## Artifacts", "", "| " + " | ".join(head) + " |", "|" + " --- |" * len(head)]
    errors = []
    for r in rows:
        file = md_code(_rel(str(r.get("path")), base))
        if r.get("error"):
            cells = [md_cell(r.get("format") or "?"), file, format_size(r.get("bytes")), "-", "**error**", "-"]
            errors.append(f"- {file}: {md_cell(r['error'])}")
        else:
            cells = [md_cell(r.get("format")), file, format_size(r.get("bytes")),
                     format_size(r.get("gzip_bytes")), _pct(r.get("accuracy")), _pct(r.get("agreement"))]
        if with_arena:
            cells.append(format_size(r.get("arena_bytes")) if r.get("arena_bytes") else "-")
        if len(ns) > 1:
            cells.append(f"{r['n']:,}" if r.get("n") else "-")
        if with_latency:
            cells.append("-" if r.get("latency_ms") is None else f"{r['latency_ms']:.2f}")
        cells.append(md_cell(r.get("runtime") or "-"))
        lines.append("| " + " | ".join(cells) + " |")
    if errors:
        lines += ["", f"Not evaluated ({len(errors)}; never a pass):", "", *errors]
    warned = [f"- {md_code(_rel(str(r.get('path')), base))}: {md_cell(r['warning'])}" for r in rows if r.get("warning")]
    if warned:
        lines += ["", "Warnings (numbers that hold on this CPU only):", "", *warned]
    if report.get("notes"):  # files of several models measured together
        lines += ["", *[f"- note: {md_cell(n)}" for n in report["notes"]]]
    if report.get("speed_notes"):
        lines += ["", "Speed (this CPU only):", "", *[f"- {md_cell(n)}" for n in report["speed_notes"]]]

    if verdicts is not None:
        n_fail = sum(v.status == "FAIL" for v in verdicts)
        n_err = sum(v.status == "ERROR" for v in verdicts)
        verdict = "could not measure everything" if n_err else "broken" if n_fail else "every budget holds"
        lines += ["", f"## Budget: {verdict}", "",
                  f"{len(verdicts) - n_fail - n_err} passed, {n_fail} failed, {n_err} could not be measured.", "",
                  verdicts_markdown_table(verdicts)]
        if notes:
            lines += ["", *[f"- {md_cell(n)}" for n in notes]]

    lines += ["", "## Plots", ""]
    plots = plots or {}
    for name in PLOTS:
        target = plots.get(name)
        if target:
            lines += [f"![{_TITLES[name]}]({target})", ""]
    if plots.get("_note"):
        lines += [f"_{plots['_note']}_", ""]
    return "\n".join(lines).rstrip("\n") + "\n"


def write_report(json_path: str | os.PathLike, report: dict[str, Any], *,
                 verdicts: list[Verdict] | None = None, machine: dict[str, Any] | None = None,
                 notes: list[str] | None = None) -> dict[str, Any]:
    """Write the markdown report and its plots beside the JSON report ``json_path``.

    The markdown is ``json_path`` with the suffix ``.md``; the plots are at
    :func:`plot_paths`. Every file is written atomically. Returns ``{"markdown": Path,
    "plots": [Path, ...] written, "note": str | None}`` (why plots were skipped).
    """
    json_path = Path(json_path)
    md_path = json_path.with_suffix(".md")
    if md_path == json_path:
        raise ValueError(f"{json_path}: the JSON report needs its own name; the markdown goes to {md_path}")
    rows = report.get("artifacts", [])
    written: dict[str, str | None] = {}
    out_plots: list[Path] = []
    note = None
    if not any(_measured(r) for r in rows):
        note = "No plots: no artifact was measured."
    elif _pyplot() is None:
        note = "No plots: matplotlib is not installed (`pip install matplotlib`)."
    else:
        paths = plot_paths(json_path)
        drawn = {"size_by_format": plot_size_by_format(rows, paths["size_by_format"]),
                 "accuracy_vs_size": plot_accuracy_vs_size(report, paths["accuracy_vs_size"])}
        for name, ok in drawn.items():
            if ok:
                written[name] = paths[name].name
                out_plots.append(paths[name])
        if not drawn["accuracy_vs_size"]:
            note = "No accuracy plot: no artifact has a measured accuracy."
    for stale in set(plot_paths(json_path).values()) - set(out_plots):
        # an earlier run's plot beside this report would show other files' numbers
        if stale.is_file() and not stale.is_symlink():
            stale.unlink()
    if note:
        written["_note"] = note
    write_text_atomic(md_path, markdown(report, verdicts=verdicts, machine=machine, plots=written,
                                        folder=md_path.parent, notes=notes))
    return {"markdown": md_path, "plots": out_plots, "note": note}
