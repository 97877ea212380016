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


def times(dense_bytes: int, esq_bytes: int, digits: int = 2) -> str:
    """'4.2x smaller than' or, for an archive larger than dense fp32 (tiny models, where the
    header and code weigh more than the weights saved), '1.08x larger than'; the same size
    within the rounding is 'about the size of' (a lossless re-encoding 0.4% larger read
    '1.0x smaller than')."""
    ratio = dense_bytes / esq_bytes
    if round(ratio, digits) == 1 or round(1 / ratio, digits) == 1:
        return "about the size of"
    return f"{round(ratio, digits)}x smaller than" if ratio > 1 else f"{round(1 / ratio, digits)}x larger than"


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
          checkpoint, esq, config, agreement: float | None = None,
          extra: dict[str, Any] | None = None) -> dict[str, Any]:
    """The report.json content. ``test_before``/``test_after`` may be ``None`` (a lossless
    run without a dataset: ``test`` then holds ``n: 0`` and no accuracy, which a gate reads
    as "not measured", never as a pass); ``agreement`` is the top-1 agreement on the same
    images; ``extra`` adds mode-specific sections (``mode``, ``lossless``, ``calibration``,
    ``evaluation``, ``ptq``, ``auto_sparsity``)."""
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
    # the rest of the shared sections but their codebooks: Huffman code lengths, per-slice sizes
    tables = sum(r["bytes"] - r["codebook_bytes"] - r["index_bytes"] - r["gap_bytes"] for r in shared)
    params = sum(r["params"] for r in rows)
    nonzero = sum(r["nonzero"] for r in rows)
    return {
        "checkpoint": checkpoint, "esq": esq, "config": config, "wall_s": round(wall_s, 1),
        "totals": {
            "dense_fp32_bytes": dense_bytes, "esq_bytes": esq_bytes, "ratio": round(dense_bytes / esq_bytes, 2),
            "params": params, "nonzero": nonzero, "density": round(nonzero / params, 4) if params else 1.0,
            "huffman_coded_bytes": coded, "entropy_bytes": round(entropy, 1),
            "huffman_over_entropy": round(coded / entropy, 4) if entropy else None,
            "code_table_bytes": tables,
            "with_tables_over_entropy": round((coded + tables) / entropy, 4) if entropy else None,
            "codebook_bytes": sum(r["codebook_bytes"] for r in rows),
            "raw_bytes": sum(r["bytes"] for r in rows if r["encoding"] == "raw"),
        },
        "baselines": _baselines(state),
        "stages": stages,
        "test": _test_section(test_before, test_after, agreement),
        "layers": rows,
        **(extra or {}),
    }


def _negative_zeros(lossless: dict[str, Any]) -> str:
    n = int(lossless.get("negative_zeros_stored_as_zeros") or 0)
    return f" but for the sign of {n:,} zeros (-0.0 stored as 0.0, the same value)" if n else ""


def _test_section(before, after, agreement) -> dict[str, Any]:
    before, after = before or {"n": 0}, after or {"n": 0}
    drop = (round(100 * (before["accuracy"] - after["accuracy"]), 3)
            if "accuracy" in before and "accuracy" in after else None)
    return {"before": before, "after": after, "drop_points": drop, "agreement": agreement}


def _pct(x: float | None) -> str:
    return "-" if x is None else f"{100 * x:.2f}%"


def _mode_lines(report: dict[str, Any]) -> list[str]:
    """Bullet lines saying what kind of run this was (lossless / post-training)."""
    lines = []
    if ll := report.get("lossless"):
        lines.append(f"- **lossless re-encoding**: weights bit-identical to the source: "
                     f"**{'yes' if ll['weights_identical'] else 'NO'}**{_negative_zeros(ll)} (SHA-256 of the weights "
                     f"`{ll['source_weights_sha256'][:16]}...`); existing zeros ({100 * ll['density']:.1f}% non-zero) "
                     f"and codebooks ({ll['shared_tensors']} of {ll['weight_tensors']} weight tensors already shared, "
                     "codebooks of at most 256 values, per tensor or per slice) kept")
    if cal := report.get("calibration"):
        ptq = report.get("ptq", {})
        target = ptq.get("target_bytes")
        lines.append(f"- **post-training** (no fine-tuning data): {cal['images']} calibration images from the "
                     f"{cal['split']} split of {cal['dataset']} (seed {cal['seed']}), labels unused; "
                     + (f"target {target:,} B ({'met' if ptq.get('within_target') else 'NOT met'}); "
                        if target else "")
                     + f"pruning mask kept: {'yes' if ptq.get('mask_kept') else 'no'}")
    return lines


def _evaluation_lines(report: dict[str, Any]) -> list[str]:
    ev = {k: v for k, v in (report.get("evaluation") or {}).items() if v.get("n")}
    if not ev:
        return []
    lines = ["", "## Original against compressed", "",
             "| images | n | top-1 original | top-1 compressed | top-1 agreement | KL(original ‖ compressed), nats |",
             "| --- | --- | --- | --- | --- | --- |"]
    for e in ev.values():
        lines.append(f"| {e['label']} | {e['n']} | {_pct(e['top1_original'])} | {_pct(e['top1_compressed'])} | "
                     f"{_pct(e['agreement'])} | {e['kl']:.4f} |")
    return lines


def _ptq_lines(report: dict[str, Any]) -> list[str]:
    ptq = report.get("ptq")
    if not ptq:
        return []
    s = ptq["summary"]
    lines = ["", f"## Post-training allocation ({s['bytes']:,} B for a {s['budget']:,} B budget)", "",
             ("Calibration-set numbers after each step are in-sample: they guided the choices, they do "
              "not validate them."), "", "| step | calibration KL | calibration agreement |", "| --- | --- | --- |"]
    for step, v in s["calibration"].items():
        lines.append(f"| {step} | {v['kl']:.4f} | {_pct(v['agreement'])} |")
    lines += ["", "| layer | non-zero | k | bits | section B | predicted KL | bias shift |",
              "| --- | --- | --- | --- | --- | --- | --- |"]
    for r in ptq["layers"]:
        shift = "-" if r["bias_shift"] is None else f"{r['bias_shift']:.2e}"
        lines.append(f"| {r['layer']} | {r['nonzero']:,} | {r['k']} | {r['bits']} | {r['bytes']:,} | "
                     f"{r['predicted_kl']:.2e} | {shift} |")
    return lines


def markdown(report: dict[str, Any]) -> str:
    t, tb = report["totals"], report["test"]
    kb = lambda b: f"{b / 1000:,.1f} kB"  # noqa: E731
    lines = [
        f"# Compression report: `{report['esq']}`", "",
        f"- **{kb(t['esq_bytes'])}** ({t['esq_bytes']:,} B), {times(t['dense_fp32_bytes'], t['esq_bytes'])} the dense fp32 model "
        f"({kb(t['dense_fp32_bytes'])}: every float tensor of its state_dict, BatchNorm statistics included)",
        *_mode_lines(report)]
    if tb.get("drop_points") is not None:
        where = "held-out test" if report.get("calibration") else "test"
        agree = f", top-1 agreement {_pct(tb['agreement'])}" if tb.get("agreement") is not None else ""
        lines.append(f"- {where} accuracy {100 * tb['before']['accuracy']:.2f}% -> "
                     f"**{100 * tb['after']['accuracy']:.2f}%** ({-tb['drop_points']:+.2f} points{agree}) on "
                     f"{tb['after']['n']:,} images")
    elif not tb["after"].get("n"):
        lines.append("- no dataset given: nothing evaluated (pass --data NAME to measure accuracy)")
    lines += [
        f"- {100 * t['density']:.1f}% of stored parameters non-zero (weights and biases; the prune stage counts "
        f"weights alone); coded index and gap streams (Huffman, or DEFLATE where that is smaller) "
        f"{t['huffman_coded_bytes']:,} B against {t['entropy_bytes']:,.0f} B zeroth-order entropy "
        f"({t['huffman_over_entropy']}x" + (f"; {t['with_tables_over_entropy']}x with their code lengths and sizes, "
                                             f"{t['code_table_bytes']:,} B)" if "code_table_bytes" in t else ")"),
        *_evaluation_lines(report), *_ptq_lines(report),
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
    for e in (report.get("evaluation") or {}).values():
        if e.get("n"):
            lines.append(f"{e['label']}: top-1 {_pct(e['top1_original'])} -> {_pct(e['top1_compressed'])}, "
                         f"agreement {_pct(e['agreement'])}, KL {e['kl']:.4f}")
    if ll := report.get("lossless"):
        lines.append(f"lossless re-encoding: weights bit-identical to the source: "
                     f"{'yes' if ll['weights_identical'] else 'NO'}{_negative_zeros(ll)}")
    acc = ""
    if tb.get("drop_points") is not None:
        where = "held-out test" if report.get("calibration") else "test"
        acc = f"{where} accuracy {100 * tb['before']['accuracy']:.2f}% -> {100 * tb['after']['accuracy']:.2f}%; "
    lines.append(f"{acc}.esq {t['esq_bytes']:,} B = {times(t['dense_fp32_bytes'], t['esq_bytes'])} dense fp32")
    return "\n".join(lines)


def _plots(out: Path, report: dict[str, Any], before: torch.nn.Module, after: torch.nn.Module) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    pts = [(s["bytes"], s["val_accuracy"], s["stage"]) for s in report["stages"]
           if s["bytes"] and s["val_accuracy"] is not None]
    ylabel = "validation accuracy (%)"
    held = (report.get("evaluation") or {}).get("held_out") or (report.get("evaluation") or {}).get("all")
    if len(pts) < 2 and held and held.get("n"):  # no validation split (ImageNet sample): held-out top-1
        t = report["totals"]
        pts = [(t["dense_fp32_bytes"], held["top1_original"], "original"),
               (t["esq_bytes"], held["top1_compressed"], "compressed")]
        ylabel = f"top-1 on {held['n']} held-out images (%)" if "held_out" in report["evaluation"] \
            else f"top-1 on {held['n']} test images (%)"
    fig, ax = plt.subplots(figsize=(6, 4))
    if pts:
        ax.plot([p[0] / 1000 for p in pts], [100 * p[1] for p in pts], "o-")
        for b, a, name in pts:
            ax.annotate(name, (b / 1000, 100 * a), textcoords="offset points", xytext=(4, 4), fontsize=8)
    ax.set_xscale("log"), ax.set_xlabel("size (kB, log scale)"), ax.set_ylabel(ylabel)
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
    for a, w, title in ((a0, w0, "before (non-zero weights)"), (a1, w1, "after pruning + weight sharing")):
        # one filled outline, not 200 bar patches: the same picture in half the time (0.45 s
        # against 0.85 s a report, which every compress writes)
        counts, edges = np.histogram(w[w != 0], bins=200, range=(-lim, lim))
        a.stairs(counts, edges, fill=True), a.set_title(title)
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
