"""report.json, report.md and plots for a compress run.

Sizes are bytes; the markdown shows kB (1 kB = 1,000 bytes, SI). Baselines compress the
*same* weights (the compressed model's fp32 state_dict, tensors back to back) with zlib,
xz and zstd, so the table answers "what would a general-purpose compressor have done".
"""

from __future__ import annotations

import json
import lzma
import zlib
from pathlib import Path
from typing import Any

import numpy as np
import torch

from edgesqueeze._io import atomic_path, write_text_atomic


def _baselines(state: dict[str, torch.Tensor]) -> dict[str, int]:
    raw = b"".join(t.detach().cpu().contiguous().numpy().tobytes() for t in state.values())
    out = {"raw_fp32": len(raw), "zlib_9": len(zlib.compress(raw, 9)), "xz_9e": len(lzma.compress(raw, preset=9 | lzma.PRESET_EXTREME))}
    try:
        import zstandard

        out["zstd_19"] = len(zstandard.ZstdCompressor(level=19).compress(raw))
    except ImportError:  # zstandard is a dependency; tolerate its absence on odd installs
        pass
    return out


def build(*, layers, stages, dense_bytes, esq_bytes, state, test_before, test_after, layer_rows, bits, wall_s,
          checkpoint, esq, config) -> dict[str, Any]:
    density = {r["layer"] + ".weight": r["density"] for r in layer_rows}
    rows = []
    for s in layers:
        rows.append({
            "tensor": s.name, "encoding": s.kind, "params": s.numel, "nonzero": s.nonzero,
            "density": density.get(s.name, s.nonzero / s.numel if s.numel else 1.0),
            "bits": bits.get(s.name.removesuffix(".weight")), "codebook_entries": s.k, "gap_width": s.gap_width,
            "bytes": s.bytes, "codebook_bytes": s.codebook_bytes, "index_bytes": s.idx_bytes, "gap_bytes": s.gap_bytes,
            "index_entropy_bytes": round(s.idx_entropy_bits / 8, 1), "gap_entropy_bytes": round(s.gap_entropy_bits / 8, 1),
        })
    shared = [r for r in rows if r["encoding"] == "shared"]
    coded = sum(r["index_bytes"] + r["gap_bytes"] for r in shared)
    entropy = sum(r["index_entropy_bytes"] + r["gap_entropy_bytes"] for r in shared)
    params = sum(r["params"] for r in rows)
    nonzero = sum(r["nonzero"] for r in rows)
    return {
        "checkpoint": checkpoint, "esq": esq, "config": config, "wall_s": round(wall_s, 1),
        "totals": {
            "dense_fp32_bytes": dense_bytes, "esq_bytes": esq_bytes, "ratio": round(dense_bytes / esq_bytes, 2),
            "params": params, "nonzero": nonzero, "density": round(nonzero / params, 4) if params else 1.0,
            "huffman_coded_bytes": coded, "entropy_bytes": round(entropy, 1),
            "huffman_over_entropy": round(coded / entropy, 4) if entropy else None,
            "codebook_bytes": sum(r["codebook_bytes"] for r in rows),
            "raw_bytes": sum(r["bytes"] for r in rows if r["encoding"] == "raw"),
        },
        "baselines": _baselines(state),
        "stages": stages,
        "test": {"before": test_before, "after": test_after,
                 "drop_points": round(100 * (test_before["accuracy"] - test_after["accuracy"]), 3)},
        "layers": rows,
    }


def markdown(report: dict[str, Any]) -> str:
    t, tb = report["totals"], report["test"]
    kb = lambda b: f"{b / 1000:,.1f} kB"  # noqa: E731
    lines = [
        f"# Compression report: `{report['esq']}`", "",
        f"- **{kb(t['esq_bytes'])}** ({t['esq_bytes']:,} B), {t['ratio']}x smaller than the dense fp32 model "
        f"({kb(t['dense_fp32_bytes'])})",
        f"- test accuracy {100 * tb['before']['accuracy']:.2f}% -> **{100 * tb['after']['accuracy']:.2f}%** "
        f"({-tb['drop_points']:+.2f} points) on {tb['after']['n']:,} images",
        f"- {100 * t['density']:.1f}% of weights kept; Huffman streams {t['huffman_coded_bytes']:,} B against "
        f"{t['entropy_bytes']:,.0f} B zeroth-order entropy ({t['huffman_over_entropy']}x)",
        "", "## Stages (validation accuracy)", "", "| stage | val acc | size | note |", "| --- | --- | --- | --- |"]
    for s in report["stages"]:
        acc = "-" if s["val_accuracy"] is None else f"{100 * s['val_accuracy']:.2f}%"
        lines.append(f"| {s['stage']} | {acc} | {kb(s['bytes']) if s['bytes'] else '-'} | {s['note']} |")
    lines += ["", "## Baselines on the same weights", "", "| coder | bytes |", "| --- | --- |",
              f"| edgesqueeze .esq | {report['totals']['esq_bytes']:,} |"]
    lines += [f"| {k} | {v:,} |" for k, v in report["baselines"].items()]
    lines += ["", "## Layers", "",
              "| tensor | enc | params | density | bits | k | gap w | codebook B | index B (entropy) | gaps B (entropy) | total B |",
              "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |"]
    for r in report["layers"]:
        lines.append(f"| {r['tensor']} | {r['encoding']} | {r['params']:,} | {r['density']:.3f} | {r['bits'] or '-'} | "
                     f"{r['codebook_entries'] or '-'} | {r['gap_width'] if r['encoding'] == 'shared' else '-'} | "
                     f"{r['codebook_bytes']} | {r['index_bytes']} ({r['index_entropy_bytes']:.0f}) | "
                     f"{r['gap_bytes']} ({r['gap_entropy_bytes']:.0f}) | {r['bytes']:,} |")
    if auto := report.get("auto_sparsity"):
        lines += ["", f"## sparsity: auto (largest scanned sparsity within {auto['max_drop_points']} points "
                  f"of {100 * auto['baseline']:.2f}% validation accuracy, one layer at a time)", "",
                  "| layer | chosen | " + " | ".join(f"{s:.0%}" for s in
                                                     sorted({r['sparsity'] for r in auto["rows"]})) + " |"]
        sps = sorted({r["sparsity"] for r in auto["rows"]})
        lines.append("| --- | --- |" + " --- |" * len(sps))
        acc = {(r["layer"], r["sparsity"]): r["accuracy"] for r in auto["rows"]}
        for name, chosen in auto["chosen"].items():
            cells = " | ".join(f"{100 * acc[(name, s)]:.2f}" if (name, s) in acc else "-" for s in sps)
            lines.append(f"| {name} | {chosen:.0%} | {cells} |")
    lines += ["", "Plots: `accuracy_vs_size.png`, `weights_histogram.png`.", ""]
    return "\n".join(lines)


def size_table(report: dict[str, Any]) -> str:
    """A short terminal table: sizes and accuracies through the stages, then the baselines."""
    t, tb = report["totals"], report["test"]
    lines = [f"{'':<30}{'bytes':>12}{'val acc':>10}"]
    for s in report["stages"]:
        acc = "" if s["val_accuracy"] is None else f"{100 * s['val_accuracy']:.2f}%"
        lines.append(f"{s['stage']:<30}{(format(s['bytes'], ',') if s['bytes'] else ''):>12}{acc:>10}")
    for k, v in report["baselines"].items():
        lines.append(f"{'same weights, ' + k:<30}{v:>12,}")
    lines.append(f"test accuracy {100 * tb['before']['accuracy']:.2f}% -> {100 * tb['after']['accuracy']:.2f}%; "
                 f".esq {t['esq_bytes']:,} B = {t['ratio']}x smaller than dense fp32")
    return "\n".join(lines)


def _plots(out: Path, report: dict[str, Any], before: torch.nn.Module, after: torch.nn.Module) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    pts = [(s["bytes"], s["val_accuracy"], s["stage"]) for s in report["stages"]
           if s["bytes"] and s["val_accuracy"] is not None]
    fig, ax = plt.subplots(figsize=(6, 4))
    if pts:
        ax.plot([p[0] / 1000 for p in pts], [100 * p[1] for p in pts], "o-")
        for b, a, name in pts:
            ax.annotate(name, (b / 1000, 100 * a), textcoords="offset points", xytext=(4, 4), fontsize=8)
    ax.set_xscale("log"), ax.set_xlabel("size (kB, log scale)"), ax.set_ylabel("validation accuracy (%)")
    ax.set_title("accuracy against size through the stages")
    fig.tight_layout()
    with atomic_path(out / "accuracy_vs_size.png") as tmp:
        fig.savefig(tmp, format="png", dpi=100)
    plt.close(fig)

    def weights(m):
        return np.concatenate([p.detach().reshape(-1).numpy() for n, p in m.named_parameters()
                               if p.dim() > 1] or [np.zeros(1)])

    w0, w1 = weights(before), weights(after)
    fig, (a0, a1) = plt.subplots(1, 2, figsize=(10, 3.5), sharex=True)
    lim = float(np.percentile(np.abs(w0), 99.5)) or 1.0
    a0.hist(w0[w0 != 0], bins=200, range=(-lim, lim)), a0.set_title("before (non-zero weights)")
    a1.hist(w1[w1 != 0], bins=200, range=(-lim, lim)), a1.set_title("after pruning + weight sharing")
    for a in (a0, a1):
        a.set_xlabel("weight"), a.set_yscale("log")
    fig.tight_layout()
    with atomic_path(out / "weights_histogram.png") as tmp:
        fig.savefig(tmp, format="png", dpi=100)
    plt.close(fig)


def write(out: Path, report: dict[str, Any], *, before, after) -> None:
    out.mkdir(parents=True, exist_ok=True)
    write_text_atomic(out / "report.json", json.dumps(report, indent=2) + "\n")
    write_text_atomic(out / "report.md", markdown(report))
    _plots(out, report, before, after)
