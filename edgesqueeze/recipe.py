"""Recipes: one YAML file describes a whole pipeline, validated strictly before anything runs.

A recipe is ``yaml.safe_load``-ed, then converted field by field into frozen dataclasses.
Every refusal is a :class:`RecipeError` naming the dotted path of the field::

    train.lr: must be > 0, got -0.1
    model.archh: unknown key; did you mean 'arch'?

Each section is a dataclass; a field's allowed range lives in its ``metadata`` (``ge``,
``gt``, ``le``, ``lt``) and its type annotation drives conversion (``Literal`` for choices,
``X | None`` for optional values, nested dataclasses for sub-sections). Later stages
(compress, quantize, export, budget) add sections here the same way.
"""

from __future__ import annotations

import copy
import dataclasses
import hashlib
import json
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import yaml

from edgesqueeze._config import _build, _check_fields, _range
from edgesqueeze.config.budget import Budget
from edgesqueeze.config.compress import CompressConfig
from edgesqueeze.config.export import ExportConfig
from edgesqueeze.errors import DataError, RecipeError


class _Loader(yaml.SafeLoader):
    """``yaml.safe_load`` with YAML 1.2 numbers. PyYAML follows YAML 1.1, where ``1e-3`` (no
    dot) is the *string* '1e-3' (a learning rate written that way would be refused), ``010``
    is octal 8 (``seed: 0042`` was 34), and ``1:30`` is base 60 (``epochs: 1:30`` was 90):
    here numbers are decimal (``0x``/``0o`` prefixes excepted) and ``1:30`` is a string."""


_INT, _FLOAT = "tag:yaml.org,2002:int", "tag:yaml.org,2002:float"
_Loader.yaml_implicit_resolvers = {  # SafeLoader's, less its YAML 1.1 int and float patterns
    first: [(tag, rx) for tag, rx in resolvers if tag not in (_INT, _FLOAT)]
    for first, resolvers in yaml.SafeLoader.yaml_implicit_resolvers.items()}
_Loader.add_implicit_resolver(
    _INT, re.compile(r"^(?:[-+]?[0-9][0-9_]*|0x[0-9a-fA-F_]+|0o[0-7_]+)$"), list("-+0123456789"))
_Loader.add_implicit_resolver(
    _FLOAT,
    re.compile(r"""^(?:[-+]?(?:[0-9][0-9_]*)\.[0-9_]*(?:[eE][-+]?[0-9]+)?
    |[-+]?(?:[0-9][0-9_]*)(?:[eE][-+]?[0-9]+)
    |[-+]?\.[0-9_]+(?:[eE][-+]?[0-9]+)?
    |[-+]?\.(?:inf|Inf|INF)
    |\.(?:nan|NaN|NAN))$""", re.X),
    list("-+0123456789."))


def _yaml12_int(loader: _Loader, node: yaml.ScalarNode) -> int:
    text = loader.construct_scalar(node).replace("_", "")
    if text.startswith(("0x", "0o")):
        return int(text, 0)
    return int(text, 10)  # leading zeros are decimal


_Loader.add_constructor(_INT, _yaml12_int)

# A recipe's aliases may share a section (``<<: *defaults``), not build a structure that
# expands past this many values (nine nested aliases of a 419-byte file took 2 GB) or holds
# itself (``model: &m {kwargs: {x: *m}}``); nor may a recipe nest deeper than this.
_MAX_VALUES = 200_000
_MAX_DEPTH = 100
_MAX_TEXT = 1_000_000  # characters of a recipe file (a 3 MB one took 52 s and 1.1 GB to read)


def _no_duplicate_keys(loader: _Loader, node: yaml.MappingNode, deep: bool = False) -> dict:
    """A mapping whose key appears twice is refused: PyYAML keeps the last value silently,
    so ``epochs: 30`` further up a section would be ignored without a word. (Keys brought in
    by a ``<<`` merge may be overridden, as YAML intends.)"""
    seen: dict[Any, Any] = {}
    for key_node, _ in node.value:
        if key_node.tag == "tag:yaml.org,2002:merge" or not isinstance(key_node, yaml.ScalarNode):
            continue
        key = loader.construct_object(key_node)
        if key in seen:
            raise yaml.constructor.ConstructorError(
                None, None, f"duplicate key {key!r} (first on line {seen[key].line + 1}); keep one",
                key_node.start_mark)
        seen[key] = key_node.start_mark
    return yaml.SafeLoader.construct_mapping(loader, node, deep=deep)


_Loader.construct_mapping = _no_duplicate_keys  # type: ignore[method-assign]


def _check_shape(value: Any) -> None:
    """Refuse parsed YAML that holds itself, expands past ``_MAX_VALUES`` values through its
    aliases, or nests deeper than ``_MAX_DEPTH``: each is a ``RecipeError`` (every later step,
    hashing the recipe included, walks the expanded structure)."""
    sizes: dict[int, int] = {}
    open_: set[int] = set()

    def size(v: Any, depth: int) -> int:
        if not isinstance(v, (dict, list)):
            return 1
        if depth > _MAX_DEPTH:
            raise RecipeError(f"nested more than {_MAX_DEPTH} levels deep; a recipe is a few sections of "
                              "plain values")
        key = id(v)
        if key in open_:
            raise RecipeError("an alias (*name) refers to a section that holds it: a recipe cannot hold itself")
        if key in sizes:
            return sizes[key]
        open_.add(key)
        items = list(v.keys()) + list(v.values()) if isinstance(v, dict) else v
        n = 1 + sum(size(x, depth + 1) for x in items)
        open_.discard(key)
        if n > _MAX_VALUES:
            raise RecipeError(f"expands to more than {_MAX_VALUES:,} values through its aliases (*name); "
                              "a recipe is a few sections of plain values")
        sizes[key] = n
        return n

    size(value, 0)


def load_yaml(text: str) -> Any:
    """Parse ``text`` as a recipe or ``--set`` value is parsed (see :class:`_Loader`); a
    structure that holds itself, expands hugely through aliases or nests too deep is a
    :class:`RecipeError`."""
    try:
        value = yaml.load(text, Loader=_Loader)  # noqa: S506 - a SafeLoader subclass
    except RecursionError:
        raise RecipeError(f"nested more than {_MAX_DEPTH} levels deep; a recipe is a few sections of plain "
                          "values") from None
    _check_shape(value)
    return value


def _empty_stages(node: Any, cls: type, prefix: str = "") -> list[str]:
    """Dotted names of optional stage sections (``compress.prune: X | None``) that the YAML
    leaves *empty* (``prune:`` with nothing after it, its keys commented out, say): YAML reads
    that as null, which turns the stage off, while an empty ``train:`` means its defaults.
    An explicit ``null`` or ``~`` is not listed: that one says "off"."""
    import typing

    if not isinstance(node, yaml.MappingNode) or not dataclasses.is_dataclass(cls):
        return []
    hints = typing.get_type_hints(cls)
    found = []
    for key_node, value_node in node.value:
        if not isinstance(key_node, yaml.ScalarNode) or key_node.value not in hints:
            continue
        name = key_node.value
        tp = hints[name]
        args = [a for a in typing.get_args(tp) if a is not type(None)]
        section = args[0] if len(args) == 1 and dataclasses.is_dataclass(args[0]) else \
            (tp if dataclasses.is_dataclass(tp) else None)
        if section is None:
            continue
        dotted = f"{prefix}.{name}" if prefix else name
        optional = type(None) in typing.get_args(tp)
        if (optional and isinstance(value_node, yaml.ScalarNode) and value_node.tag == "tag:yaml.org,2002:null"
                and value_node.value == ""):
            found.append(dotted)
        else:
            found.extend(_empty_stages(value_node, section, dotted))
    return found


def yaml_problem(exc: yaml.YAMLError) -> str:
    """A YAML error in one line, "line L, column C: what (while ... at line L, column C)"
    (PyYAML's own text spans several lines, quoting the offending line with a caret)."""
    def at(mark) -> str:
        return f"line {mark.line + 1}, column {mark.column + 1}"

    problem, mark = getattr(exc, "problem", None), getattr(exc, "problem_mark", None)
    context, context_mark = getattr(exc, "context", None), getattr(exc, "context_mark", None)
    if not problem:
        return " ".join(str(exc).split())
    text = f"{at(mark)}: {problem}" if mark is not None else str(problem)
    if context:
        text += f" ({context}" + (f" at {at(context_mark)}" if context_mark is not None else "") + ")"
    return text


RECIPE_VERSION = 1


@dataclass(frozen=True)
class ModelConfig:
    """Which architecture to build; ``kwargs`` override its builder's defaults.

    ``arch`` is a registered name (``edgesqueeze models``) or the user's own class or builder,
    ``package.module:Class`` or ``path/to/file.py:Class``; in YAML the latter may be written
    ``import: ...`` instead of ``arch: ...``."""

    arch: str = "squeezenet_mnist"
    kwargs: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:  # built in Python too: held to the recipe's rules
        _check_fields(self)


@dataclass(frozen=True)
class AugmentSection:
    """Augmentation on tensors. ``None`` fields take the dataset's default."""

    crop_padding: int | None = field(default=None, metadata=_range(ge=0, le=64))
    hflip: bool | None = None
    rotate_deg: float | None = field(default=None, metadata=_range(ge=0, le=180))
    translate: float | None = field(default=None, metadata=_range(ge=0, le=0.5))
    resized_crop: tuple[float, ...] | None = None  # (lo, hi): the area fraction of a random resized crop

    def __post_init__(self) -> None:
        _check_fields(self)  # built in Python too: held to the recipe's rules
        if self.resized_crop is not None:
            rc = self.resized_crop
            if len(rc) != 2 or not 0 < rc[0] <= rc[1] <= 1:
                raise RecipeError(f"data.augmentation.resized_crop: expected [lo, hi], the fraction of the image "
                                  f"a crop covers, with 0 < lo <= hi <= 1 (ImageNet: [0.08, 1.0]), got {list(rc)}")


@dataclass(frozen=True)
class DataConfig:
    dataset: str = "digits"
    data_dir: str | None = None
    image_size: int | None = field(default=None, metadata=_range(ge=4, le=1024))
    val_fraction: float = field(default=0.1, metadata=_range(ge=0, lt=1))
    limit: int | None = field(default=None, metadata=_range(ge=10))
    augment: bool = True
    augmentation: AugmentSection = field(default_factory=AugmentSection)
    download: bool = True
    stream: bool = False  # imagefolder:PATH decoded batch by batch from disk (imagenet:PATH always is)
    # 3: a grayscale dataset's one channel repeated in three, for a model that takes RGB images
    # (a class of your own built for 3 channels, say); unset: the dataset's own channels.
    channels: Literal[3] | None = None

    def __post_init__(self) -> None:  # built in Python too: held to the recipe's rules
        _check_fields(self)
        from edgesqueeze._datasets import check_dataset_name

        try:  # on sight, naming the file and the field (training said it only when it read data)
            check_dataset_name(self.dataset)
        except DataError as exc:
            raise RecipeError(f"dataset: {exc}") from None


@dataclass(frozen=True)
class TrainConfig:
    epochs: float = field(default=10, metadata=_range(gt=0, le=10_000))
    batch_size: int = field(default=128, metadata=_range(ge=1, le=65_536))
    optimizer: Literal["sgd", "adamw", "adam"] = "sgd"
    lr: float = field(default=0.1, metadata=_range(gt=0, le=10))
    momentum: float = field(default=0.9, metadata=_range(ge=0, lt=1))
    nesterov: bool = True
    weight_decay: float = field(default=5e-4, metadata=_range(ge=0, le=1))
    schedule: Literal["cosine", "onecycle", "constant"] = "onecycle"
    warmup_fraction: float = field(default=0.15, metadata=_range(ge=0, lt=1))
    label_smoothing: float = field(default=0.0, metadata=_range(ge=0, lt=1))
    grad_clip: float | None = field(default=None, metadata=_range(gt=0))
    channels_last: bool = False
    threads: int = field(default=0, metadata=_range(ge=0, le=1024))
    eval_batch_size: int = field(default=512, metadata=_range(ge=1, le=65_536))
    device: str = "auto"  # auto | cpu | cuda | cuda:N | mps (edgesqueeze.device)
    precision: Literal["fp32", "bf16", "fp16"] = "fp32"  # mixed: CUDA; bf16 also on native-bf16 CPUs

    def __post_init__(self) -> None:  # built in Python too: held to the recipe's rules
        _check_fields(self)


@dataclass(frozen=True)
class Recipe:
    version: int
    name: str = "run"
    seed: int = field(default=0, metadata=_range(ge=0, le=2**31 - 1))
    output_dir: str | None = None
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    compress: CompressConfig | None = None
    export: ExportConfig | None = None
    # Sizes as "500KB" strings, so it stays a mapping here; checked now by Budget.from_dict.
    budget: dict[str, Any] | None = None

    def __post_init__(self) -> None:
        if self.version != RECIPE_VERSION or isinstance(self.version, bool):
            raise RecipeError(f"version: this edgesqueeze reads recipe version {RECIPE_VERSION}, got {self.version!r}")
        _check_fields(self)  # built in Python (Recipe(version=1, train=...)) too: held to the recipe's rules
        # the default output folder is artifacts/<name>: a name with a path in it wrote elsewhere
        if (not isinstance(self.name, str) or not self.name.strip() or self.name.strip() in (".", "..")
                or any(c in self.name for c in "/\\\0")):
            raise RecipeError(f"name: {self.name!r} is not a plain name (it names the default output folder "
                              "artifacts/<name>): use letters, digits, '-', '_' or '.', without '/'")
        self.budget_spec()

    def budget_formats_not_written(self) -> list[str]:
        """Formats ``budget.max_size_per_format`` limits that this recipe's ``export`` section
        does not write (a packed ``onnx-int8.esq`` without ``pack: true``, a format not in
        ``formats``): a size budget its own run can never check. ``pt`` and ``esq`` are
        train's and compress's; with no ``export`` section nothing is said."""
        if self.export is None:
            return []
        written = {"pt", "esq", *self.export.formats}
        if self.export.pack:
            written |= {f + ".esq" for f in self.export.formats if f != "tflite-micro"}
        return sorted(f for f in self.budget_spec().max_size_per_format if f not in written)

    def budget_spec(self):
        """The ``budget`` section as a :class:`edgesqueeze.config.budget.Budget` (empty when absent)."""
        return Budget.from_dict(self.budget)

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    def _hashed(self) -> dict:
        """``to_dict`` without where a run computes: the devices (a run started on a GPU may
        be resumed or reproduced on the CPU), and fp32 precision (the default, so recipes
        hash as they did before devices existed), and whether images are streamed from disk
        (the same batches either way). Likewise an unset ``depthwise`` in
        ``compress.prune`` / ``compress.cluster`` (added later) is left out."""
        d = self.to_dict()
        d["data"].pop("stream", None)  # in memory or streamed from disk: the same batches
        if d["data"].get("channels") is None:  # added later: unset, it is not hashed
            d["data"].pop("channels", None)
        augmentation = d["data"].get("augmentation") or {}
        if augmentation.get("resized_crop") is None:  # added later: unset, it is not hashed
            augmentation.pop("resized_crop", None)
        for key in ("prune", "cluster"):
            section = (d["compress"] or {}).get(key)
            if section and section.get("depthwise") is None:
                section.pop("depthwise", None)
        for section in (d["train"], *((d["compress"] or {}).get(k) or {}
                                      for k in ("prune_finetune", "cluster_finetune"))):
            section.pop("device", None)
            if section.get("precision") == "fp32":
                section.pop("precision")
        for stage in ("compress", "export"):  # where calibration passes run
            ((d.get(stage) or {}).get("calibration") or {}).pop("device", None)
        return d

    def hash(self) -> str:
        """SHA-256 of the canonical JSON form: what a run's artifacts record as provenance."""
        blob = json.dumps(self._hashed(), sort_keys=True, separators=(",", ":"))
        return hashlib.sha256(blob.encode()).hexdigest()

    def train_part(self) -> dict:
        """What determines training (seed, model, data, train), as :meth:`train_hash` hashes
        it: the thread count, the device and the evaluation batch size are left out (a run
        started on 1 thread may continue on 2, one started on a GPU on the CPU, and how many
        images are scored at once changes no weight)."""
        d = self._hashed()
        d["train"] = {k: v for k, v in d["train"].items() if k not in ("threads", "eval_batch_size")}
        return {k: d[k] for k in ("seed", "model", "data", "train")}

    def train_hash(self) -> str:
        """Hash of :meth:`train_part`: resuming checks it, so adding or editing a later stage
        (compress, export) does not orphan a run."""
        blob = json.dumps(self.train_part(), sort_keys=True, separators=(",", ":"))
        return hashlib.sha256(blob.encode()).hexdigest()

    def out_dir(self) -> Path:
        return Path(self.output_dir) if self.output_dir else Path("artifacts") / self.name


def recipe_from_dict(raw: Any, *, source: str = "recipe") -> Recipe:
    """Validate a parsed recipe. ``source`` names the file in error messages."""
    if not isinstance(raw, dict):
        raise RecipeError(f"{source}: a recipe is a YAML mapping with 'version: {RECIPE_VERSION}' at the top")
    if "version" not in raw:
        raise RecipeError(f"{source}: version: required key is missing (add 'version: {RECIPE_VERSION}')")
    if raw["version"] != RECIPE_VERSION:
        raise RecipeError(
            f"{source}: version: this edgesqueeze reads recipe version {RECIPE_VERSION}, got {raw['version']!r}"
        )
    model = raw.get("model")
    if isinstance(model, dict) and "import" in model:  # model: {import: pkg.mod:Class, kwargs: ...}
        if "arch" in model:
            raise RecipeError(f"{source}: model: give either 'arch' (a registered name) or 'import' "
                              "(package.module:Class), not both")
        spec = model["import"]
        if not isinstance(spec, str) or ":" not in spec:
            raise RecipeError(f"{source}: model.import: expected package.module:Class or path/to/file.py:Class, "
                              f"got {spec!r}")
        raw = {**raw, "model": {("arch" if k == "import" else k): v for k, v in model.items()}}
    try:
        return _build("", raw, Recipe)
    except RecipeError as exc:
        raise RecipeError(f"{source}: {exc}") from None


# mappings whose keys are names that may hold dots (layer names, packed format names): the rest
# of a --set key after one of these is one key (`budget.max_size_per_format.tflite-int8.esq=20KB`)
_NAMED_MAPPINGS = ("budget.max_size_per_format", "compress.prune.layers", "compress.cluster.layers",
                   "export.float_layers_by_format")
# stages a recipe turns on by naming them: a key --set inside one the recipe leaves off turns it on
_STAGE_DEFAULTS = {"compress.prune": "sparsity 0.5, oneshot", "compress.cluster": "bits 8",
                   "compress.ptq": "bits 7 (5-8), no target_bytes"}


def _other_stage(raw: Any, path: list[str], stage: str) -> bool:
    """Whether ``raw``'s section at ``path`` names a stage other than ``stage`` (a recipe that
    chose its stages, which a --set key now adds to)."""
    for part in path:
        raw = raw.get(part) if isinstance(raw, dict) else None
    stages = {s.rpartition(".")[2] for s in _STAGE_DEFAULTS}
    return isinstance(raw, dict) and any(k in stages and k != stage and raw[k] is not None for k in raw)


def _key_parts(key: str, item: str) -> list[str]:
    for mapping in _NAMED_MAPPINGS:
        if key.startswith(mapping + ".") and key != mapping + ".":
            return [*mapping.split("."), key[len(mapping) + 1:]]
    parts = key.split(".")
    if not all(parts):
        raise RecipeError(f"--set {item!r}: '{key}' has an empty part (a leading, trailing or doubled dot); "
                          "write section.key=value, e.g. train.epochs=3")
    return parts


def apply_overrides(raw: dict, overrides: list[str] | tuple[str, ...], *, say: bool = True) -> dict:
    """Apply ``section.key=value`` overrides (values parsed as YAML) to a raw recipe dict.

    A key under a mapping of names (``budget.max_size_per_format``, ``compress.prune.layers``,
    ``compress.cluster.layers``, ``export.float_layers_by_format``) keeps its dots:
    ``compress.prune.layers.features.0=0.3``. ``model.import`` replaces ``model.arch`` and the
    other way round. A key inside a stage the recipe leaves off (``compress.prune``,
    ``compress.cluster``, ``compress.ptq``) turns the stage on, with a Note saying so.

    >>> apply_overrides({"train": {"epochs": 5}}, ["train.epochs=1", "data.limit=300"])
    {'train': {'epochs': 1}, 'data': {'limit': 300}}
    """
    # a deep copy that keeps what YAML gave (a JSON round trip turned the int key of
    # `layers: {1: 0.5}` into '1', which then passed, and failed on a date or a recursive alias)
    given, raw = raw, copy.deepcopy(raw)
    for item in overrides:
        key, sep, text = item.partition("=")
        if not sep or not key.strip():
            raise RecipeError(f"--set {item!r}: expected KEY=VALUE, e.g. train.epochs=3")
        if not text.strip():
            raise RecipeError(f"--set {item!r}: no value; write {key.strip()}=null to unset it (a stage: to turn "
                              f"it off), {key.strip()}={{}} for a section's defaults, or {key.strip()}=\"''\" "
                              "for an empty string")
        node = raw
        parts = _key_parts(key.strip(), item)
        for i, part in enumerate(parts[:-1]):
            child = node.get(part) if isinstance(node, dict) else None
            if child is None:  # absent, or left empty in the file (`train:`): a section to fill
                child = node[part] = {}
                stage = ".".join(parts[:i + 1])
                if say and stage in _STAGE_DEFAULTS and _other_stage(given, parts[:i], part):  # max_drop=3 on a
                    # recipe naming other stages pruned to 50% unsaid (with none named, --set turns one on)
                    import warnings

                    from edgesqueeze.errors import Note

                    warnings.warn(f"--set {item}: turns on {stage}, which the recipe leaves off, with its defaults "
                                  f"for the keys not set ({_STAGE_DEFAULTS[stage]}); {stage}=null turns it off",
                                  Note, stacklevel=2)
            if not isinstance(child, dict):
                raise RecipeError(f"--set {item!r}: {part} is not a section")
            node = child
        if parts[:-1] == ["model"] and parts[-1] in ("import", "arch"):  # one replaces the other
            node.pop("arch" if parts[-1] == "import" else "import", None)
        try:
            node[parts[-1]] = load_yaml(text)
        except yaml.YAMLError as exc:
            raise RecipeError(f"--set {item!r}: value is not valid YAML ({yaml_problem(exc)})") from None
        except RecipeError as exc:
            raise RecipeError(f"--set {item!r}: {exc}") from None
    try:
        _check_shape(raw)
    except RecipeError as exc:
        raise RecipeError(f"with --set: {exc}") from None
    return raw


def replaced_by_overrides(path: str | Path, overrides: list[str] | tuple[str, ...]) -> list[str]:
    """One note per ``--set KEY={...}`` that replaces a mapping the recipe file sets: the
    keys of the file's mapping it drops go back to their defaults (``--set train={epochs: 2}``
    reset the recipe's batch_size and channels_last), which ``--set train.epochs=2`` keeps."""
    try:
        raw = _read_raw(Path(path), ())
    except RecipeError:
        return []  # load_recipe says what is wrong with the file
    notes = []
    for item in overrides:
        key, sep, text = item.partition("=")
        node: Any = raw
        for part in key.strip().split("."):
            node = node.get(part) if isinstance(node, dict) else None
        try:
            value = load_yaml(text) if sep else None
        except (yaml.YAMLError, RecipeError):
            continue
        if isinstance(node, dict) and isinstance(value, dict):
            lost = [str(k) for k in node if k not in value]
            if lost:
                shown = ", ".join(lost[:4]) + (", ..." if len(lost) > 4 else "")
                notes.append(f"note: --set {item} replaces the recipe's whole {key.strip()} section: {shown} go back "
                             f"to their defaults (--set {key.strip()}.{lost[0]}=... sets one key and keeps the rest)")
    return notes


def shipped_recipes_dir() -> Path | None:
    """The recipes that come with edgesqueeze: an installed package's ``edgesqueeze/recipes``
    (the wheel holds them), else a checkout's ``recipes/`` (an editable install's too)."""
    here = Path(__file__).resolve().parent
    for folder in (here / "recipes", here.parent / "recipes"):
        if folder.is_dir() and any(folder.glob("*.yaml")):
            return folder
    return None


def shipped_recipes() -> list[str]:
    """The names ``-r NAME`` takes (``squeezenet-digits``, ...)."""
    folder = shipped_recipes_dir()
    return sorted(p.stem for p in folder.glob("*.yaml")) if folder else []


def find_recipe(path: str | Path) -> Path:
    """``path`` when it exists; else, for a bare name such as ``squeezenet-digits`` (or
    ``squeezenet-digits.yaml``, or ``recipes/squeezenet-digits.yaml`` outside a checkout), the
    recipe edgesqueeze ships under that name; else ``path`` (which the reader then reports)."""
    path = Path(path)
    if path.exists():
        return path
    parts = path.parts
    if len(parts) == 1 or (len(parts) == 2 and parts[0] == "recipes"):
        folder = shipped_recipes_dir()
        name = path.name if path.suffix in (".yaml", ".yml") else f"{path.name}.yaml"
        if folder is not None and (folder / name).is_file():
            return folder / name
    return path


def _read_raw(path: Path, overrides: list[str] | tuple[str, ...], *, say: bool = True) -> Any:
    path = find_recipe(path)
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        names = shipped_recipes()
        raise RecipeError(f"{path}: recipe file not found; -r also takes the name of a recipe edgesqueeze ships"
                          + (f" ({', '.join(names)})" if names else "")) from None
    except (OSError, UnicodeDecodeError) as exc:
        raise RecipeError(f"{path}: cannot read recipe ({exc})") from None
    if len(text) > _MAX_TEXT:
        raise RecipeError(f"{path}: {len(text):,} characters; a recipe is a few sections of plain values "
                          f"(at most {_MAX_TEXT:,} characters read)")
    try:
        raw = load_yaml(text)
        empty = _empty_stages(yaml.compose(text, Loader=_Loader), Recipe)  # noqa: S506 - a SafeLoader
    except yaml.YAMLError as exc:
        raise RecipeError(f"{path}: not valid YAML: {yaml_problem(exc)}") from None
    except RecipeError as exc:
        raise RecipeError(f"{path}: {exc}") from None
    if empty:
        raise RecipeError(f"{path}: {empty[0]}: left empty, which YAML reads as null and would turn the stage "
                          f"off; write `{empty[0].rpartition('.')[2]}: {{}}` for its defaults, or "
                          f"`{empty[0].rpartition('.')[2]}: null` (or delete the key) to leave it off")
    if overrides:
        if not isinstance(raw, dict):  # an empty file or a list: --set has nothing to go into
            what = "is empty" if raw is None else f"holds a {type(raw).__name__}, not a mapping"
            raise RecipeError(f"{path}: {what}; a recipe is a YAML mapping with 'version: {RECIPE_VERSION}' "
                              "at the top")
        raw = apply_overrides(raw, overrides, say=say)
    return raw


def load_recipe(path: str | Path, overrides: list[str] | tuple[str, ...] = ()) -> Recipe:
    """The recipe at ``path`` (YAML), with ``overrides`` applied as ``--set`` does them
    (``["train.epochs=3", "data.limit=500"]``; one string is one override). Raises
    :class:`~edgesqueeze.errors.RecipeError` naming the file, the field or the override."""
    if isinstance(overrides, str):
        overrides = [overrides]
    if not isinstance(path, (str, Path)) or not all(isinstance(o, str) for o in overrides):
        raise RecipeError(f"load_recipe takes a path and a list of 'KEY=VALUE' strings, got {path!r}, "
                          f"{list(overrides)!r}")
    path = find_recipe(path)
    raw = _read_raw(path, overrides)
    try:
        recipe = recipe_from_dict(raw, source=str(path))
    except RecipeError as exc:  # a field --set gave: blame the option, not the file
        text = str(exc).removeprefix(f"{path}: ")
        where, _, why = text.partition(": ")

        def gave(override: str) -> bool:  # the field the error names (errors name full dotted paths), a
            key = override.partition("=")[0].strip()  # field inside it, or the section holding it
            return key == where or where.startswith((key + ".", key + "[")) or key.startswith(where + ".")

        item = next((o for o in reversed(overrides) if gave(o)), None)
        if item is None:
            raise
        key = item.partition("=")[0].strip()
        raise RecipeError(f"--set {item}: {why}" if where == key else f"--set {item}: {where}: {why}") from None
    if recipe.name == "run" and "name" not in (raw or {}):
        recipe = dataclasses.replace(recipe, name=path.stem)
    return recipe


def given_sections(path: str | Path, overrides: list[str] | tuple[str, ...] = ()) -> set[str]:
    """Top-level sections the recipe file (with ``overrides``) actually sets.

    A section left out takes defaults meant for training (``model: squeezenet_mnist``,
    ``data: digits``); ``compress`` must not let those stand in for what a plain state_dict
    does not say about itself, but a recipe that names its model and data may."""
    raw = _read_raw(Path(path), overrides, say=False)  # load_recipe said its notes
    return {k for k in raw if isinstance(k, str)} if isinstance(raw, dict) else set()


def given_fields(path: str | Path | None, overrides: list[str] | tuple[str, ...], section: str) -> set[str]:
    """The fields of ``section`` that the recipe file (``path``; None: ``--set`` alone) with
    ``overrides`` actually sets, as :func:`given_sections` for one section."""
    raw = _read_raw(Path(path), overrides, say=False) if path else apply_overrides({"version": 1}, overrides,
                                                                                    say=False)
    part = raw.get(section) if isinstance(raw, dict) else None
    return {k for k in part if isinstance(k, str)} if isinstance(part, dict) else set()
