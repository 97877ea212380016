"""Per-layer pruning sensitivity: prune each layer alone at each sparsity and tabulate and plot
validation accuracy (``edgesqueeze sensitivity``)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Callable

from torch import nn

from edgesqueeze._io import output_locks, write_text_atomic
from edgesqueeze._progress import Progress, bar
from edgesqueeze.compress.inputs import load_inputs
from edgesqueeze.errors import EdgesqueezeError

Log = Callable[[str], None]


def _load_with_data(checkpoint, dataset, data_dir, model_args=None, log: Log = print):
    """The checkpoint, its dataset and split (see :func:`training_data`), its normalization."""
    inp = load_inputs(checkpoint, dataset=dataset, data_dir=data_dir, log=log, **(model_args or {}))
    return inp.loaded, inp.meta, inp.ds, inp.train, inp.val, inp.mean, inp.std


@output_locks()  # the output folder is this run's until it returns
def sensitivity(
    checkpoint: str | Path,
    *,
    sparsities: list[float],
    out_dir: str | Path,
    layers: list[str] | None = None,
    max_drop: float | None = None,
    data_dir: str | Path | None = None,
    dataset: str | None = None,
    batch_size: int = 512,
    model_args: dict[str, Any] | None = None,
    device: str | None = None,
    inputs=(),
    log: Log = print,
    progress: Progress | None = None,
) -> dict[str, Any]:
    """Prune each layer alone at each sparsity; validation accuracy table, plot, and (with
    ``max_drop``, in accuracy points) the per-layer sparsities that stay within it. The
    measurements run on ``device`` (``edgesqueeze.device``; default auto). An output that is
    an input (the model, the dataset's file, ``inputs``: more ``(what, path)`` pairs such as
    the recipe), or a link to one, is refused (OutputError). ``progress``: a bar over the
    measurements (see :mod:`edgesqueeze._progress`)."""
    from edgesqueeze.device import resolve_device

    dev = resolve_device(device)
    from edgesqueeze.compress.prune import choose_sparsities, sensitivity_scan
    from edgesqueeze.evaluation import evaluate

    out = Path(out_dir)
    loaded, meta, ds, _, (x_val, y_val), mean, std = _load_with_data(checkpoint, dataset, data_dir, model_args, log)
    loaded.model.to(dev)
    if not len(x_val):
        n_train = len(ds.train_x)
        why = (f"'{ds.name}' has no training images to hold them out of, only its test split" if not n_train else
               f"none of the {n_train:,} training images of '{ds.name}' were held out (the model records "
               f"data.val_fraction {meta.get('val_fraction', 0)})")
        raise EdgesqueezeError(f"{checkpoint}: no validation images to measure on: {why}; sensitivity measures "
                               "on validation images so that the test split stays unseen: pass --data a dataset "
                               "with a training split, or scan a model trained with a validation fraction")

    from edgesqueeze._io import check_writable, outputs_clear_of_inputs
    from edgesqueeze.compress.prune import prunable_layers
    from edgesqueeze.data import dataset_file
    from edgesqueeze.models.layers import check_layer_names

    if layers is not None:  # before the baseline: a wrong name was reported after a full evaluation
        check_layer_names(layers, list(prunable_layers(loaded.model)), "--layers")
    outputs_clear_of_inputs([("the output", out / name) for name in _OUTPUTS],
                            [("the model", checkpoint), *inputs,
                             ("--data", dataset_file(dataset or meta.get("dataset")))])
    for name in _OUTPUTS:  # and the outputs, before the minutes of measuring
        check_writable(out / name)
    from edgesqueeze._io import lock_output_folder, remove_earlier_outputs, remove_stale_temps

    lock_output_folder(out, "edgesqueeze sensitivity")  # another run's files are not this one's to remove
    remove_earlier_outputs(out, _OUTPUTS)  # an interrupted run must not leave the earlier run's table beside its own
    remove_stale_temps(out, log, names=_OUTPUTS)  # nor a killed one (SIGKILL) its half-written files

    def acc(m: nn.Module) -> float:
        return evaluate(m, x_val, y_val, mean=mean, std=std, batch_size=batch_size)["accuracy"]

    baseline = acc(loaded.model)
    log(f"baseline validation accuracy {100 * baseline:.2f}% on {len(y_val)} images")
    n_layers = len(layers) if layers is not None else len(list(prunable_layers(loaded.model)))
    with bar(progress, "pruning one layer at a time", n_layers * len(sparsities)) as update:
        rows = sensitivity_scan(loaded.model, layers, sparsities, acc, done=update)
    result: dict[str, Any] = {"checkpoint": str(checkpoint), "dataset": ds.name, "baseline": baseline, "rows": rows}
    if max_drop is not None:
        result["max_drop_points"] = max_drop
        result["chosen"] = choose_sparsities(rows, max_drop / 100, baseline)
    _write_sensitivity(out, result)
    return result


_OUTPUTS = ("sensitivity.json", "sensitivity.md", "sensitivity.png")


def _write_sensitivity(out: Path, result: dict[str, Any]) -> None:
    """Render the three files first, then write them: a plot that fails to render leaves
    none of them (it left sensitivity.json alone, beside an earlier run's table)."""
    import io

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from edgesqueeze._io import write_bytes_atomic

    layers = list(dict.fromkeys(r["layer"] for r in result["rows"]))
    sps = sorted({r["sparsity"] for r in result["rows"]})
    acc = {(r["layer"], r["sparsity"]): r["accuracy"] for r in result["rows"]}
    lines = [f"# Sensitivity of `{result['checkpoint']}`", "",
             f"Validation accuracy with one layer pruned at a time (baseline {100 * result['baseline']:.2f}%).", "",
             "| layer | " + " | ".join(f"{s:.0%}" for s in sps) + (" | chosen |" if "chosen" in result else " |"),
             "| --- |" + " --- |" * (len(sps) + ("chosen" in result))]
    for name in layers:
        cells = " | ".join(f"{100 * acc[(name, s)]:.2f}" for s in sps)
        chosen = f" | {result['chosen'][name]:.0%}" if "chosen" in result else ""
        lines.append(f"| {name} | {cells}{chosen} |")
    fig, ax = plt.subplots(figsize=(8, 5))
    for name in layers:
        ax.plot([100 * s for s in sps], [100 * acc[(name, s)] for s in sps], "o-", label=name, linewidth=1)
    ax.axhline(100 * result["baseline"], color="k", linestyle="--", linewidth=1)
    ax.set_xlabel("sparsity of that layer (%)"), ax.set_ylabel("validation accuracy (%)")
    ax.set_title("pruning sensitivity, one layer at a time")
    ax.legend(fontsize=6, ncol=2)
    fig.tight_layout()
    png = io.BytesIO()
    try:
        fig.savefig(png, format="png", dpi=100)
    finally:
        plt.close(fig)
    out.mkdir(parents=True, exist_ok=True)
    write_text_atomic(out / "sensitivity.json", json.dumps(result, indent=2) + "\n")
    write_text_atomic(out / "sensitivity.md", "\n".join(lines) + "\n")
    write_bytes_atomic(out / "sensitivity.png", png.getvalue())

