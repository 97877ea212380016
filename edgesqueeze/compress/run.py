"""What every compress mode shares: the run's state and stage log (:class:`Run`), its result,
and the measurements the stages and the report use (sizes, density, original-vs-compressed
comparison)."""

from __future__ import annotations

import dataclasses
import functools
import hashlib
import json
import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import torch
from torch import nn

from edgesqueeze._io import sha256_file, write_bytes_atomic
from edgesqueeze.checkpoint import ESQ_META_FORMAT, esq_dumps, model_from_esq
from edgesqueeze.compress.inputs import Inputs
from edgesqueeze.compress.prune import layer_stats
from edgesqueeze.config.compress import CompressConfig
from edgesqueeze.errors import EdgesqueezeError
from edgesqueeze.models.layers import prunable_layers

Log = Callable[[str], None]


@dataclass
class CompressResult:
    model: nn.Module
    esq_path: Path
    esq_bytes: int
    report: dict[str, Any]
    out_dir: Path
    main: bool = True  # False on the ranks other than 0 of a torchrun launch: they wrote nothing


def float_bytes(model: nn.Module) -> int:
    """Bytes of the dense fp32 model: every floating tensor of its state_dict at 4 bytes."""
    return sum(t.numel() * 4 for t in model.state_dict().values() if torch.is_floating_point(t))


def shared_weight_names(model: nn.Module) -> list[str]:
    return [f"{name}.weight" for name in prunable_layers(model)]


def esq_meta(meta: dict, *, folded: bool, extra: dict) -> dict:
    """Archive metadata: the checkpoint's own (architecture, classes, normalization, ...)."""
    return {"format": ESQ_META_FORMAT, "folded_batchnorm": folded, **meta, **extra}


@dataclass
class Run:
    """What every mode shares: inputs, output folder, the stage log, evaluation helpers."""

    checkpoint: Path
    config: CompressConfig
    inp: Inputs
    out: Path
    seed: int
    recipe_hash: str | None
    progress: bool
    log: Log
    t_start: float
    teacher: nn.Module | None = None  # what retraining distils from (the checkpoint, or --teacher)
    teacher_path: Path | None = None
    resume: bool = False  # reuse out/pruned.pt from an earlier run with the same settings
    recipe_name: str | None = None  # the compress recipe's, recorded with its hash (not the training run's name)
    group: Any = None  # edgesqueeze.distributed.Group under torchrun: rank 0 alone evaluates stages and writes
    stages: list[dict[str, Any]] = field(default_factory=list)
    warnings: list[str] = field(default_factory=list)
    distributed: dict[str, Any] = field(default_factory=dict)  # digests checked identical on every rank
    folded_layers: list[list[str]] | None = None  # [layer, batchnorm] pairs this run folded (stages.fold)
    folded_head_scales: dict[str, float] = field(default_factory=dict)  # Linear head -> its BN's largest scale

    @functools.cached_property
    def source_sha256(self) -> str:
        """SHA-256 of the input file (read once: the archive and ``pruned.pt`` both record it)."""
        return sha256_file(self.checkpoint)

    def val_acc(self, m: nn.Module) -> float | None:
        from edgesqueeze.evaluation import evaluate

        x_val, y_val = self.inp.val
        if self.inp.ds is None or not len(x_val):
            return None
        return evaluate(m, x_val, y_val, mean=self.inp.mean, std=self.inp.std,
                        batch_size=self.config.eval_batch_size)["accuracy"]

    def test(self, m: nn.Module, x=None, y=None) -> dict[str, float] | None:
        from edgesqueeze.evaluation import evaluate

        if self.inp.ds is None:
            return None
        x, y = (self.inp.ds.test_x, self.inp.ds.test_y) if x is None else (x, y)
        return evaluate(m, x, y, mean=self.inp.mean, std=self.inp.std, batch_size=self.config.eval_batch_size)

    @property
    def main(self) -> bool:
        """This process writes files and logs: the only one, or rank 0 under torchrun."""
        return self.group is None or self.group.main

    def record(self, stage: str, m: nn.Module, size: int | None, note: str = "") -> None:
        acc = self.val_acc(m) if self.main else None  # the other ranks hold the same model
        self.stages.append({"stage": stage, "val_accuracy": acc, "bytes": size, "note": note})
        acc_txt = f"val {100 * acc:.2f}%" if acc is not None else "no val split"
        self.log(f"[{stage}] {acc_txt}" + (f", {size:,} B" if size else "") + (f" ({note})" if note else ""))

    def check_retraining(self, section: str, model: nn.Module, before: float | None, *,
                         what: str = "retraining", hint: str = "", then: str = "") -> bool:
        """Refuse non-finite weights, naming the stage; warn, in the log and the report, when
        retraining took validation accuracy from ``before`` more than halfway down to chance:
        the run diverged (a dead network still encodes fine, and its archive would otherwise
        look like any other). Returns whether it did (on every rank under torchrun); ``then``
        says what the caller does about it."""
        for name, tensor in model.state_dict().items():
            if torch.is_floating_point(tensor) and not bool(torch.isfinite(tensor).all()):
                raise EdgesqueezeError(f"compress.{section}: retraining diverged ({name} has NaN or infinite "
                                       f"values); lower compress.{section}.lr or set compress.{section}.grad_clip")
        after = self.stages[-1]["val_accuracy"]
        diverged = False
        if before is not None and after is not None and self.inp.ds is not None:
            chance = 1 / self.inp.ds.num_classes
            diverged = before > chance + 0.01 and after < chance + 0.5 * (before - chance)  # not from chance
            if diverged:
                msg = (f"compress.{section}: {what} took validation accuracy from {100 * before:.2f}% to "
                       f"{100 * after:.2f}% (chance {100 * chance:.0f}%){then}; {hint or 'it diverged:'} lower "
                       f"compress.{section}.lr or set compress.{section}.grad_clip")
                self.warnings.append(msg)
                self.log(f"warning: {msg}")
        if self.group is not None and getattr(self.group, "active", False):  # rank 0 alone evaluated
            from edgesqueeze import distributed

            diverged = bool(distributed.broadcast_object(self.group, diverged))
        return diverged

    def archive_meta(self, *, folded: bool, weights_sha256: str, reference_accuracy: float | None) -> dict:
        """The archive's metadata. Built before PTQ too, with a stand-in weights hash of the
        same length, because its (deflated) size counts against the byte budget."""
        # The full config is in report.json; the archive keeps its hash (small models: every byte counts),
        # without where the passes ran: --device cpu and auto on a CPU write the same bytes.
        config_sha = hashlib.sha256(json.dumps(without_devices(jsonable(self.config)),
                                               sort_keys=True).encode()).hexdigest()
        extra = {"compress_mode": self.config.mode, "compress_config_sha256": config_sha,
                 "source_sha256": self.source_sha256, "weights_sha256": weights_sha256,
                 "reference_accuracy": reference_accuracy,
                 "recipe_hash": self.recipe_hash or self.inp.meta.get("recipe_hash")}
        if self.recipe_hash and self.recipe_name:  # name and hash of one recipe (a ptq.yaml's hash once sat
            extra["recipe_name"] = self.recipe_name  # beside the training recipe's name)
        if self.config.mode != "lossless":  # retraining's and ptq's float sums depend on it: the same bytes
            extra["compress_threads"] = torch.get_num_threads()  # need the same count (a lossless run's do not)
        if folded and self.folded_layers is not None:
            extra["folded_layers"] = self.folded_layers
        return esq_meta({k: v for k, v in self.inp.meta.items() if k not in ("metrics", "compress_stage",
                                                                                "compress_threads")},
                        folded=folded, extra=extra)

    def encode(self, state: dict[str, torch.Tensor], meta: dict, *, shared: Any,
               codebook_dtype: str, chunk: int | None = None,
               extra: dict[str, torch.Tensor] | None = None,
               stored: nn.Module | None = None) -> tuple[bytes, list, nn.Module, Path]:
        """Encode ``model.esq`` and prove it decodes to exactly ``state``; :meth:`finish` writes
        it, after its report, so that a run interrupted between the two (the held-out
        evaluation, the plots) leaves no archive without its report. ``extra``: tensors
        stored beside the weights (a program's skeleton), not part of the model's state;
        ``stored``: the model ``state`` is from (what a program's decoded weights are put in
        for the report, instead of converting the restored TorchScript again)."""
        blob, stats = esq_dumps({**state, **(extra or {})}, meta, shared=shared, codebook_dtype=codebook_dtype,
                                chunk=chunk)
        esq_path = self.out / "model.esq"
        # checked before it is written: no wrong archive on disk. Its architecture is the
        # model's own, already built here (so the user's code it names is not news).
        decoded, _ = model_from_esq(blob, arch=meta.get("arch"))
        got = decoded.state_dict()
        for key, tensor in state.items():
            if key not in got or not torch.equal(got[key], tensor):
                raise EdgesqueezeError(f"decode check failed: {key} differs after the .esq round trip (a bug)")
        if meta.get("program"):  # the restored TorchScript / program: its weights, in the lifted model
            import copy

            if stored is None:
                from edgesqueeze.models.program import lifted_module

                decoded = lifted_module(decoded, meta.get("input_shape"), what=str(esq_path))
            else:
                lifted = copy.deepcopy(stored)
                with torch.no_grad():
                    for key, tensor in lifted.state_dict().items():
                        tensor.copy_(got[key])
                same_outputs(decoded, lifted.eval(), meta.get("input_shape"), what=str(esq_path))
                decoded = lifted
        self._note_raw_weights(stats, decoded)
        return blob, stats, decoded, esq_path

    def _note_raw_weights(self, stats: list, model: nn.Module) -> None:
        """Say which weights of other layer types (ConvTranspose2d, LayerNorm, embeddings, ...)
        the archive keeps as raw float32: only Conv2d and Linear weights are pruned and shared."""
        layers = set(prunable_layers(model))  # their weights are shared, their biases raw by design
        modules = dict(model.named_modules())
        # a parameter of the model itself (`x @ self.proj`) too: it was 51% of an archive, unsaid
        keys = set(model.state_dict())  # the model's own tensors (a program archive's __program__ is not one)
        raw = [s for s in stats if s.kind == "raw" and s.numel >= 256 and s.name in keys
               and (owner := s.name.rpartition(".")[0]) in modules and owner not in layers]
        if not raw:
            return

        def kind(name: str) -> str:  # a lifted program's generic module has no telling type
            owner = name.rpartition(".")[0]
            cls = type(modules[owner]).__name__
            if not owner:
                return f"a parameter of {cls} itself, " if cls != "Module" else "a parameter of the model itself, "
            return "" if cls == "Module" else f"{cls}, "

        shown = ", ".join(f"{s.name} ({kind(s.name)}{s.numel:,} values)" for s in raw[:6]) \
            + (", ..." if len(raw) > 6 else "")
        self.log(f"note: {len(raw)} tensor(s) of other layer types stay raw float32 in the .esq ({sum(s.bytes for s in raw):,} B; "
                 f"edgesqueeze prunes and shares Conv2d and Linear weights): {shown}")

    def finish(self, *, before: nn.Module, decoded: nn.Module, blob: bytes, stats: list, state: dict,
               dense_bytes: int, test_before, test_after, bits: dict, esq_path: Path,
               extra: dict[str, Any]) -> CompressResult:
        """Build and write the report; ``extra["evaluation"]`` gives the agreement the
        ``test`` section carries (held-out when there is a held-out set), for the CI gate."""
        from edgesqueeze.compress import report as report_mod

        report = report_mod.build(
            layers=stats, stages=self.stages, dense_bytes=dense_bytes, esq_bytes=len(blob), state=state,
            test_before=test_before, test_after=test_after, layer_rows=layer_stats(decoded), bits=bits,
            wall_s=time.perf_counter() - self.t_start, checkpoint=str(self.checkpoint), esq=str(esq_path),
            config=jsonable(self.config), agreement=agreement(extra.get("evaluation")),
            extra={"mode": self.config.mode, **extra},
        )
        report["totals"]["esq_sha256"] = hashlib.sha256(blob).hexdigest()  # check: is the .esq still this one?
        report["written_from"] = os.getcwd()  # where the relative paths above start
        report_mod.write(self.out, report, before=before, after=decoded)
        write_bytes_atomic(esq_path, blob)  # last: an archive on disk has its report beside it
        where = "held-out test" if "calibration" in extra else "test"
        acc = (f"; {where} {100 * test_before['accuracy']:.2f}% -> {100 * test_after['accuracy']:.2f}%"
               if test_before and test_after and "accuracy" in test_after else "")
        from edgesqueeze.compress.report import times

        self.log(f"{esq_path}: {len(blob):,} bytes ({times(dense_bytes, len(blob), 1)} dense fp32){acc}")
        return CompressResult(decoded, esq_path, len(blob), report, self.out)


def same_outputs(restored: nn.Module, lifted: nn.Module, input_shape, *, what: str) -> None:
    """Refuse an archive whose restored program (what ``eval``, ``export`` and ``verify``
    will run) computes other outputs than the model the report scores: the report would
    otherwise describe a model nobody gets. Checked on a fixed random batch of two."""
    if not input_shape:
        return
    x = torch.randn(2, *[int(d) for d in input_shape], generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        want, got = lifted(x), restored(x)
    if not (isinstance(want, torch.Tensor) and isinstance(got, torch.Tensor)):
        return
    scale = float(want.abs().max()) or 1.0
    diff = float((want - got).abs().max()) if want.shape == got.shape else float("inf")
    if diff > 1e-4 * scale:
        raise EdgesqueezeError(f"{what}: the program restored from the archive computes other outputs than "
                               f"the compressed model (largest difference {diff:.3g} of {scale:.3g}); this is a "
                               "bug, please report it with the model")


def agreement(evaluation: dict | None) -> float | None:
    ev = evaluation or {}
    row = ev.get("held_out") or ev.get("all") or {}
    return row.get("agreement")


def state_of(model: nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().contiguous() for k, v in model.state_dict().items()}


def compare(original: nn.Module, compressed: nn.Module, x, y, *, mean, std, batch_size: int) -> dict[str, Any]:
    """Top-1 of both models on ``(x, y)``, their top-1 agreement (the fraction of images
    on which both predict the same class: what a user sees change) and mean
    ``KL(original || compressed)`` in nats."""
    from edgesqueeze.evaluation import predict

    if not len(x):
        return {"n": 0}
    a = predict(original, x, mean=mean, std=std, batch_size=batch_size)
    b = predict(compressed, x, mean=mean, std=std, batch_size=batch_size)
    y = torch.as_tensor(y, dtype=torch.long)
    logp = torch.log_softmax(a, 1)
    kl = (logp.exp() * (logp - torch.log_softmax(b, 1))).sum(1).mean()
    return {"n": len(y), "top1_original": float((a.argmax(1) == y).float().mean()),
            "top1_compressed": float((b.argmax(1) == y).float().mean()),
            "agreement": float((a.argmax(1) == b.argmax(1)).float().mean()), "kl": float(kl)}


def density(model: nn.Module) -> float:
    rows = layer_stats(model)
    total = sum(r["numel"] for r in rows)
    return sum(r["nonzero"] for r in rows) / total if total else 1.0


def jsonable(cfg: Any) -> Any:
    return json.loads(json.dumps(dataclasses.asdict(cfg), default=str))


def without_devices(config: dict[str, Any]) -> dict[str, Any]:
    """A compress config's dict without its ``device`` fields (the retraining stages' and
    the calibration's): where a pass runs is not what it computes, as in recipe hashes."""
    return {k: {f: v for f, v in section.items() if f != "device"} if isinstance(section, dict) else section
            for k, section in config.items()}
