"""The ``compress`` section of a recipe and the configs of its stages: only configuration.

Each stage's frozen Config (:class:`PruneConfig`, :class:`ClusterConfig`, :class:`PTQConfig`,
retraining's :class:`FinetuneConfig` with :class:`DistillConfig`, PTQ's
:class:`CalibrationConfig`) validates every field when built, from Python or from a recipe
(``from_dict`` names the dotted path of a bad field), and round-trips through ``to_dict``.
:class:`CompressConfig` assembles them; which stages it names decides the pipeline's mode.

No stage code here: :mod:`edgesqueeze.recipe` builds these without importing the stages, and
the stages (``edgesqueeze.compress.prune``, ``cluster``, ``ptq``, ``pipeline``) read them.
The few methods that resolve a config against a model (``PruneConfig.targets``,
``ClusterConfig.bits_for``) need only the model's layer names and types
(:mod:`edgesqueeze.models.layers`), imported when they run: reading a recipe needs no torch
(``edgesqueeze check -r RECIPE`` runs on a device with the runtime install).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, ClassVar, Literal

from edgesqueeze._config import _check_fields, _check_layer_values, _check_range, _config_from_dict, _range
from edgesqueeze.errors import RecipeError

if TYPE_CHECKING:
    from torch import nn

__all__ = ["CalibrationConfig", "ClusterConfig", "CompressConfig", "DistillConfig", "FinetuneConfig",
           "PTQConfig", "PruneConfig", "polynomial_sparsity"]


# ---------------------------------------------------------------------------------------
# Pruning


def polynomial_sparsity(step: int, *, final: float, initial: float = 0.0, begin: int = 0,
                        end: int = 1, frequency: int = 1) -> float:
    """Zhu & Gupta (2017) gradual schedule: ``s_t = s_f + (s_i - s_f)(1 - (t - t0)/n)^3``.

    Sparsity rises fast while redundant weights are plentiful and slowly at the end, so
    fine-tuning can recover between steps. Before ``begin`` nothing is pruned; from ``end``
    on the sparsity is ``final``; in between ``t`` is held at the last multiple of
    ``frequency`` after ``begin`` (masks change only every ``frequency`` steps).

    Example (0 -> 0.8 over 10 steps)::

        >>> [round(polynomial_sparsity(t, final=0.8, end=10), 3) for t in (0, 5, 10)]
        [0.0, 0.7, 0.8]
    """
    if step < begin:
        return 0.0
    if step >= end:
        return final
    t = begin + ((step - begin) // frequency) * frequency
    frac = (t - begin) / (end - begin)
    return final + (initial - final) * (1.0 - frac) ** 3


@dataclass(frozen=True)
class PruneConfig:
    """How sparse each layer ends up, and when.

    A layer's target sparsity is the first that applies of: ``layers[name]``; ``first_conv``
    / ``last_conv`` (the shallowest and the deepest Conv2d by data flow, traced with torch.fx,
    else the first and last in module order: the stem sees raw pixels and the last conv is
    SqueezeNet's classifier, both usually kept denser); ``depthwise`` for
    depthwise convs (``groups == in_channels``; Zhu & Gupta, 2017, left MobileNet's unpruned:
    few weights, each filter only 9); ``conv`` / ``linear`` by type; ``sparsity``. ``schedule: oneshot`` prunes to the target at step
    ``begin``; ``gradual`` follows :func:`polynomial_sparsity` from ``initial_sparsity`` (capped
    at each layer's target) at ``begin`` to the target at ``end``, updating every
    ``frequency`` steps. Steps are whatever the caller counts (optimizer steps or epochs).
    """

    VERSION: ClassVar[int] = 1

    sparsity: float | Literal["auto"] = field(default=0.5, metadata=_range(ge=0, lt=1))
    conv: float | None = field(default=None, metadata=_range(ge=0, lt=1))
    linear: float | None = field(default=None, metadata=_range(ge=0, lt=1))
    first_conv: float | None = field(default=None, metadata=_range(ge=0, lt=1))
    last_conv: float | None = field(default=None, metadata=_range(ge=0, lt=1))
    depthwise: float | None = field(default=None, metadata=_range(ge=0, lt=1))
    layers: dict[str, float] = field(default_factory=dict)
    schedule: Literal["oneshot", "gradual"] = "oneshot"
    initial_sparsity: float = field(default=0.0, metadata=_range(ge=0, lt=1))
    begin: int = field(default=0, metadata=_range(ge=0))
    end: int = field(default=0, metadata=_range(ge=0))
    frequency: int = field(default=1, metadata=_range(ge=1))
    max_drop: float = field(default=0.5, metadata=_range(gt=0, le=100))
    scan: tuple[float, ...] = (0.5, 0.6, 0.7, 0.8, 0.85, 0.9, 0.93, 0.95, 0.97)

    def __post_init__(self) -> None:
        _check_fields(self)
        object.__setattr__(self, "layers",
                           _check_layer_values("layers", self.layers, float, {"ge": 0, "lt": 1}))
        for i, v in enumerate(self.scan):
            _check_range(f"scan[{i}]", v, {"ge": 0, "lt": 1})
        object.__setattr__(self, "scan", tuple(sorted(self.scan)))
        if self.sparsity == "auto" and not self.scan:
            raise RecipeError("scan: sparsity 'auto' needs at least one sparsity to scan")
        # end 0 means "the caller decides" (the compress pipeline: 70% of the retraining)
        if self.schedule == "gradual" and self.end and self.end <= self.begin:
            raise RecipeError(f"end: must be > begin ({self.begin}) for schedule 'gradual', "
                              f"got {self.end}")

    def to_dict(self) -> dict[str, Any]:
        return {"version": self.VERSION, **dataclasses.asdict(self)}

    @classmethod
    def from_dict(cls, raw: Any, *, path: str = "prune") -> PruneConfig:
        return _config_from_dict(cls, raw, path)

    def targets(self, model: nn.Module, *, path: str = "prune") -> dict[str, float]:
        """Final sparsity of every prunable layer of ``model``; unknown ``layers`` refused."""
        if self.sparsity == "auto":
            raise RecipeError(f"{path}.sparsity: 'auto' must be resolved by a sensitivity scan "
                              "first (edgesqueeze.compress.prune.resolve_auto)")
        from edgesqueeze.models.layers import prunable_layers

        explicit = self.explicit(model, path=path)
        return {name: explicit.get(name, self.sparsity) for name in prunable_layers(model)}

    def explicit(self, model: nn.Module, *, path: str = "prune") -> dict[str, float]:
        """The layers whose sparsity is set by name, type, or as first/last conv."""
        from torch import nn

        from edgesqueeze.models.layers import check_layer_names, is_depthwise, prunable_layers

        layers = prunable_layers(model)
        check_layer_names(self.layers, list(layers), f"{path}.layers", kept=_kept_layers(model))
        # the first and last conv of the model, kept ones included: with the stem kept,
        # first_conv moved to the next conv (features.4.squeeze pruned to 0.5, not 0.8)
        convs = [n for n, m in model.named_modules() if isinstance(m, nn.Conv2d)]
        first, last = (convs[0], convs[-1]) if convs else (None, None)
        if convs and (self.first_conv is not None or self.last_conv is not None):
            first, last = _first_and_last(model, convs) or (first, last)
        out = {}
        for name, m in layers.items():
            s = self.conv if isinstance(m, nn.Conv2d) else self.linear
            if self.depthwise is not None and is_depthwise(m):
                s = self.depthwise
            if name == first and self.first_conv is not None:
                s = self.first_conv
            if name == last and self.last_conv is not None:
                s = self.last_conv
            s = self.layers.get(name, s)
            if s is not None:
                out[name] = s
        return out

    def sparsity_at(self, step: int | None, final: float) -> float:
        """The schedule's sparsity for a layer whose target is ``final`` (``None``: the end)."""
        if step is None:
            return final
        if self.schedule == "oneshot":
            return final if step >= self.begin else 0.0
        if self.end <= self.begin:
            raise RecipeError("end: schedule 'gradual' needs end > begin (steps); set end")
        return polynomial_sparsity(step, final=final, initial=min(self.initial_sparsity, final),
                                   begin=self.begin, end=self.end, frequency=self.frequency)


def _kept_layers(model: nn.Module) -> list[str]:
    from torch import nn

    from edgesqueeze.models.layers import prunable_layers

    able = prunable_layers(model)
    return [n for n, m in model.named_modules() if isinstance(m, (nn.Conv2d, nn.Linear)) and n not in able]


def _first_and_last(model: nn.Module, convs: list[str]) -> tuple[str, str] | None:
    """The first and last of ``convs`` by data flow, not by registration order (a classifier
    declared before the stem, a ResNet shortcut registered after the block's last conv):
    each conv's depth is the most convs on a path from the input to it (torch.fx); the first
    is the shallowest, the last the deepest (on a tie, the earlier / later call). None when
    the model does not trace: registration order then stands."""
    from torch import fx

    try:
        graph = fx.symbolic_trace(model).graph
    except Exception:  # noqa: BLE001 - fx raises many types for untraceable Python
        return None
    wanted = set(convs)
    depth: dict[fx.Node, int] = {}
    calls: list[tuple[int, int, str]] = []  # (depth, position, name)
    for i, node in enumerate(graph.nodes):
        d = max((depth.get(a, 0) for a in node.all_input_nodes), default=0)
        if node.op == "call_module" and node.target in wanted:
            d += 1
            calls.append((d, i, str(node.target)))
        depth[node] = d
    if not calls:
        return None
    first = min(calls, key=lambda c: (c[0], c[1]))[2]
    last = max(calls, key=lambda c: (c[0], c[1]))[2]
    return first, last


# ---------------------------------------------------------------------------------------
# Weight sharing


@dataclass(frozen=True)
class ClusterConfig:
    """Bits per layer and how to find the centroids.

    A layer's bits: ``layers[name]`` if given, else ``depthwise`` for a depthwise conv
    (``groups == in_channels``: 9 weights per 3x3 filter, the layers that coarse sharing hurts
    most, and a few percent of the weights), else ``conv`` / ``linear`` by type, else ``bits``. The paper used 8 bits for conv and 5 for FC layers; SqueezeNet at 6 bits reached
    0.47 MB. ``codebook_dtype`` is what the container stores; centroids are rounded to it
    before the weights are rewritten, so the model runs with the stored values.
    ``bias_dtype: float16`` rounds the biases of the shared layers to float16 after weight
    sharing (and after centroid retraining): the archive then stores them in 2 bytes each
    instead of 4 (the raw section keeps a float32 tensor as float16 when that is exact). On
    the CIFAR-10 SqueezeNet, whose folded BatchNorm leaves a bias on every conv, that is
    4.8 KB of a 98 KB archive.
    """

    VERSION: ClassVar[int] = 1

    bits: int = field(default=8, metadata=_range(ge=1, le=8))
    conv: int | None = field(default=None, metadata=_range(ge=1, le=8))
    linear: int | None = field(default=None, metadata=_range(ge=1, le=8))
    depthwise: int | None = field(default=None, metadata=_range(ge=1, le=8))
    layers: dict[str, int] = field(default_factory=dict)
    init: Literal["linear", "kmeans++", "density"] = "linear"
    max_iter: int = field(default=100, metadata=_range(ge=1, le=10_000))
    codebook_dtype: Literal["float16", "float32"] = "float32"
    bias_dtype: Literal["float16", "float32"] = "float32"
    include_zero: bool = False
    seed: int = field(default=0, metadata=_range(ge=0, le=2**31 - 1))

    def __post_init__(self) -> None:
        _check_fields(self)
        object.__setattr__(self, "layers",
                           _check_layer_values("layers", self.layers, int, {"ge": 1, "le": 8}))

    def to_dict(self) -> dict[str, Any]:
        return {"version": self.VERSION, **dataclasses.asdict(self)}

    @classmethod
    def from_dict(cls, raw: Any, *, path: str = "cluster") -> ClusterConfig:
        return _config_from_dict(cls, raw, path)

    def bits_for(self, model: nn.Module, *, path: str = "cluster") -> dict[str, int]:
        """Bits of every Conv2d/Linear layer of ``model``; unknown ``layers`` refused."""
        from torch import nn

        from edgesqueeze.models.layers import check_layer_names, is_depthwise, prunable_layers

        layers = prunable_layers(model)
        check_layer_names(self.layers, list(layers), f"{path}.layers", kept=_kept_layers(model))
        out = {}
        for name, m in layers.items():
            typed = self.conv if isinstance(m, nn.Conv2d) else self.linear
            if self.depthwise is not None and is_depthwise(m):
                typed = self.depthwise
            out[name] = self.layers.get(name, typed if typed is not None else self.bits)
        return out


# ---------------------------------------------------------------------------------------
# Post-training re-clustering


@dataclass(frozen=True)
class PTQConfig:
    """How to re-compress a pruned, shared model after training, from calibration images.

    Size: ``target_bytes`` is the budget for the whole ``.esq`` archive (as written by
    :func:`~edgesqueeze.checkpoint.esq_dumps` with the caller's ``meta``); without it
    the budget is what plain ``bits``-bit clustering of every layer would take, so the stage
    buys fidelity at the naive size. ``allocation: uniform`` gives every layer ``bits``
    (the naive baseline when everything else is off).

    Candidates per layer: ``levels_per_octave`` codebook sizes per doubling, geometrically
    spaced from ``2**min_bits`` to ``2**max_bits`` (4 per octave: 32, 38, 45, 54, 64, ...).
    A size between powers of two still needs ``ceil(log2 k)`` bits fixed-width, but its
    Huffman-coded indices cost fewer bytes: a finer grid lets the allocator fill the budget.

    ``weighting``: the k-means sample weights: ``activation`` (each weight's input energy,
    the diagonal of the layer's output-error Hessian), ``fisher`` (its diagonal Fisher),
    ``fisher_smooth`` (the Fisher's rank-1 approximation ``row_sum x column_sum / total``,
    far less noisy with few images) or ``none``. ``fisher_samples`` labels are drawn from
    the model per calibration image to estimate the Fisher. ``gptq`` re-assigns labels to
    cancel errors in each layer's output; ``gptq_damp`` regularises its inverse Hessian.

    Distillation: ``distill_steps`` Adam steps of ``distill_batch`` images (sampled with
    replacement from the calibration set, then augmented by ``augment``) on the codebooks,
    and the biases if ``distill_bias``; learning rate ``distill_lr`` with a cosine decay.

    Defaults were chosen by 2-fold cross-validation on the 100 ImageNet sample images
    (calibrate on 50, score KL and agreement on the other 50), at a 466 KB budget:
    ``levels_per_octave`` 4 over 2 and 1, ``activation`` weighting over ``none``, ``fisher``
    and ``fisher_smooth``, ``gptq_damp`` 0.01 over 0.1, bias correction on, distillation off,
    float16 codebooks (6.7 KB smaller for SqueezeNet, no measurable loss). ``fisher_samples``
    and the distillation settings were not tuned. ``benchmarks/results/imagenet_lossy.json``
    holds the measurements.
    """

    VERSION: ClassVar[int] = 1

    target_bytes: int | None = field(default=None, metadata=_range(ge=1))
    bits: int = field(default=7, metadata=_range(ge=1, le=8))
    min_bits: int = field(default=5, metadata=_range(ge=1, le=8))
    max_bits: int = field(default=8, metadata=_range(ge=1, le=8))
    levels_per_octave: int = field(default=4, metadata=_range(ge=1, le=8))
    allocation: Literal["fisher", "uniform"] = "fisher"
    weighting: Literal["fisher", "fisher_smooth", "activation", "none"] = "activation"
    fisher_samples: int = field(default=2, metadata=_range(ge=1, le=64))
    gptq: bool = True
    gptq_damp: float = field(default=0.01, metadata=_range(gt=0, le=10))
    bias_correction: bool = True
    distill_steps: int = field(default=0, metadata=_range(ge=0, le=100_000))
    distill_lr: float = field(default=3e-5, metadata=_range(gt=0, le=1))
    distill_batch: int = field(default=10, metadata=_range(ge=1, le=4096))
    distill_bias: bool = True
    augment: Literal["none", "flip", "flip_crop"] = "flip_crop"
    codebook_dtype: Literal["float16", "float32"] = "float16"
    init: Literal["linear", "kmeans++", "density"] = "linear"
    max_iter: int = field(default=100, metadata=_range(ge=1, le=10_000))
    batch_size: int = field(default=10, metadata=_range(ge=1, le=4096))
    seed: int = field(default=0, metadata=_range(ge=0, le=2**31 - 1))

    def __post_init__(self) -> None:
        _check_fields(self)
        if self.min_bits > self.max_bits:
            raise RecipeError(f"min_bits: must be <= max_bits ({self.max_bits}), "
                              f"got {self.min_bits}")

    def to_dict(self) -> dict[str, Any]:
        return {"version": self.VERSION, **dataclasses.asdict(self)}

    @classmethod
    def from_dict(cls, raw: Any, *, path: str = "ptq") -> PTQConfig:
        """Strict: unknown keys, wrong types and out-of-range values name the dotted field."""
        return _config_from_dict(cls, raw, path)

    def replace(self, **changes: Any) -> PTQConfig:
        return dataclasses.replace(self, **changes)


# ---------------------------------------------------------------------------------------
# Retraining and the whole section


@dataclass(frozen=True)
class DistillConfig:
    """Retrain by distillation from the teacher (the model given to ``compress``, or
    ``--teacher``): the loss is ``(1 - alpha)`` times the cross-entropy with the labels plus
    ``alpha`` times the temperature-``T`` soft-target term (:class:`edgesqueeze.train.DistillLoss`).
    The teacher's predictions carry what the labels do not (which wrong classes are close),
    so the pruned and shared model recovers more of the original's accuracy per epoch; each
    step costs one more forward pass of the teacher (about a third of a step).

    Centroid retraining moves every weight of a cluster at once (a centroid's gradient is
    the sum of its weights'), which makes it the fragile stage: on the CIFAR-10 SqueezeNet at
    lr 0.002, distillation diverged within 3 steps (gradient norm 3 -> 300, a dead network);
    with ``grad_clip: 2`` it held. A run that collapses is flagged in the log and report."""

    alpha: float = field(default=0.9, metadata=_range(ge=0, le=1))
    temperature: float = field(default=4.0, metadata=_range(gt=0, le=100))

    def __post_init__(self) -> None:  # built in Python too: held to the recipe's rules
        _check_fields(self)


@dataclass(frozen=True)
class FinetuneConfig:
    """Retraining after a stage: the fields mean what they mean in ``train``; ``distill``
    (e.g. ``distill: {alpha: 0.9, temperature: 4}``, or ``distill: {}`` for those defaults)
    learns from the teacher's outputs as well as the labels."""

    epochs: float = field(default=1.0, metadata=_range(ge=0, le=1000))
    batch_size: int = field(default=128, metadata=_range(ge=1, le=65_536))
    optimizer: Literal["sgd", "adamw", "adam"] = "sgd"
    lr: float = field(default=0.01, metadata=_range(gt=0, le=10))
    momentum: float = field(default=0.9, metadata=_range(ge=0, lt=1))
    nesterov: bool = True
    weight_decay: float = field(default=0.0, metadata=_range(ge=0, le=1))
    schedule: Literal["cosine", "onecycle", "constant"] = "cosine"
    warmup_fraction: float = field(default=0.0, metadata=_range(ge=0, lt=1))
    label_smoothing: float = field(default=0.0, metadata=_range(ge=0, lt=1))
    grad_clip: float | None = field(default=None, metadata=_range(gt=0))
    channels_last: bool = False
    augment: bool = True
    distill: DistillConfig | None = None
    device: str = "auto"  # auto | cpu | cuda | cuda:N | mps (edgesqueeze.device)
    precision: Literal["fp32", "bf16", "fp16"] = "fp32"  # mixed: CUDA; bf16 also on native-bf16 CPUs

    def __post_init__(self) -> None:  # built in Python too: held to the recipe's rules
        _check_fields(self)


@dataclass(frozen=True)
class CalibrationConfig:
    """Where ``compress.ptq`` takes its calibration images (their labels are never used).

    ``images`` are drawn without replacement, seeded by the recipe's ``seed``, from
    ``split``: ``auto`` is the training split, or the test split when the dataset has none
    (``imagenet-sample``). Test images not drawn are the held-out set the report scores on;
    the drawn ones are never presented as held-out. With seed 0, 50 of ``imagenet-sample``'s
    100 images are exactly fold 0 of ``benchmarks/imagenet_lossy.py``, so its cross-validated
    numbers are what the held-out half should show.

    ``device``: where the statistics pass (a forward and ``fisher_samples`` backward passes
    per image, and the layers' input Hessians) runs; ``auto`` takes CUDA when present. The
    clustering and the files stay on the CPU. ``compress --device`` sets it with the
    retraining stages' devices; like theirs, it is left out of the recipe's hash.
    """

    images: int = field(default=50, metadata=_range(ge=1, le=1_000_000))
    split: Literal["auto", "train", "test"] = "auto"
    device: str = "auto"  # where ptq's statistics pass runs: auto | cpu | cuda | cuda:N | mps

    def __post_init__(self) -> None:  # built in Python too: held to the recipe's rules
        _check_fields(self)


@dataclass(frozen=True)
class CompressConfig:
    """The ``compress`` section of a recipe. Which stages it names decides what runs:

    - ``prune`` and/or ``cluster``: Deep Compression with retraining (needs a training split);
    - ``ptq``: post-training re-clustering of an already pruned (and usually already shared)
      model to a byte budget, from ``calibration`` images only, keeping its zeros: for models
      whose training set is not at hand, like the released ImageNet SqueezeNet;
    - none of them: a lossless re-encoding. Existing zeros and codebooks are detected and
      kept, every weight is bit-identical to the source, and BatchNorm is left unfolded
      (folding rounds, so it would change weights).

    ``keep_layers`` names layers (or modules: every Conv2d/Linear inside) that no stage may
    touch: not pruned, not shared, not retrained; stored as they are.
    """

    VERSION: ClassVar[int] = 1

    # true: BatchNorm folded into the conv before it (Conv1d/2d/3d) before clustering, so what is
    # clustered is what runs; a Linear head keeps its BatchNorm1d, live while retraining (export
    # folds it, which spreads that layer's shared values over its rows). "all": the head's too
    # (2-D [N, features] only), so its int8 export keeps them; retraining then lacks that
    # BatchNorm's normalization and may need a lower cluster_finetune.lr or a grad_clip (a test
    # model's head collapsed at lr 0.002 and held with grad_clip 1). false: nothing folded.
    fold_batchnorm: bool | Literal["all"] = True
    keep_layers: tuple[str, ...] = ()
    prune: PruneConfig | None = None
    prune_finetune: FinetuneConfig = field(default_factory=FinetuneConfig)
    cluster: ClusterConfig | None = None
    cluster_finetune: FinetuneConfig = field(default_factory=FinetuneConfig)
    ptq: PTQConfig | None = None
    calibration: CalibrationConfig = field(default_factory=CalibrationConfig)
    eval_batch_size: int = field(default=512, metadata=_range(ge=1, le=65_536))

    def __post_init__(self) -> None:
        _check_fields(self)  # built in Python too: held to the recipe's rules
        # Refused rather than silently ordered: each combination has a clearer alternative.
        if self.ptq is not None and self.prune is not None:
            raise RecipeError("compress.ptq: cannot be combined with compress.prune (pruning retrains on a "
                              "training split, ptq keeps the model's zeros and uses no training); prune in one "
                              "run, then compress that run's model.esq with a ptq-only recipe")
        if self.ptq is not None and self.cluster is not None:
            raise RecipeError("compress.ptq: cannot be combined with compress.cluster (both choose the "
                              "codebooks); keep cluster to retrain centroids on a training split, or ptq "
                              "for calibration images only")
        default = FinetuneConfig()
        for name in ("prune_finetune", "cluster_finetune"):  # ignored by ptq, yet in the archive's recipe hash
            # (--device sets every section's device, which is not a setting of the recipe's)
            if self.ptq is not None and dataclasses.replace(getattr(self, name), device=default.device) != default:
                raise RecipeError(f"compress.{name}: ptq does not retrain, so it would be ignored; leave it out "
                                  "(compress.ptq.distill_steps tunes the centroids on calibration images)")

    @property
    def mode(self) -> Literal["ptq", "retrain", "lossless"]:
        """``ptq``, ``retrain`` (prune and/or cluster) or ``lossless`` (nothing changes a weight)."""
        if self.ptq is not None:
            return "ptq"
        if self.prune is not None or self.cluster is not None:
            return "retrain"
        return "lossless"
