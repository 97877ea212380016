"""What a compress run starts from: the model, its metadata, and (when known) its dataset,
splits and normalization, checked to fit each other before anything is computed."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from torch import nn

from edgesqueeze.errors import DataError, ModelError


@dataclass
class Inputs:
    """The model to compress, its metadata, and (when known) its dataset and splits."""

    loaded: Any  # checkpoint.LoadedModel
    meta: dict[str, Any]
    ds: Any = None  # data.Dataset, or None for a lossless run without data
    train: tuple = ((), ())
    val: tuple = ((), ())
    mean: Any = None
    std: Any = None


def _lift(loaded, meta: dict, shape, checkpoint) -> None:
    """A TorchScript / torch.export model made real Conv2d/Linear modules to compress, by
    running it on ``shape`` (recorded in ``meta["program"]``); a model rebuilt from its class
    is left as it is."""
    from edgesqueeze.models.program import lifted_module, program_kind

    kind = program_kind(loaded.model)
    if kind is None:
        return
    if not shape:
        what = "TorchScript archive" if kind == "torchscript" else "torch.export program"
        raise DataError(f"{checkpoint}: a {what} shows its layers only when run: pass --data NAME or "
                        "--input-shape C,H,W")
    meta["program"] = {"kind": kind}
    loaded.model = lifted_module(loaded.model, list(shape), what=str(checkpoint))


def load_inputs(checkpoint, *, dataset=None, default_dataset=None, data_dir=None, arch=None, arch_kwargs=None,
                 trust_pickle: bool = False, input_meta: dict | None = None, need_data: bool = True,
                 log=print) -> Inputs:
    """The model (any file :func:`~edgesqueeze.checkpoint.load_model` reads; a plain state_dict
    needs ``arch``), its dataset and splits (see :func:`~edgesqueeze.evaluation.training_data`)
    and its normalization. A plain state_dict records no dataset: the one given is written
    into the metadata, so the archive says what it was measured on."""
    from edgesqueeze.checkpoint import load_model
    from edgesqueeze.evaluation import training_data

    from edgesqueeze.evaluation import input_normalization, normalization_source

    loaded = load_model(checkpoint, arch=arch, arch_kwargs=arch_kwargs, trust_pickle=trust_pickle,
                        input_meta=input_meta, default_dataset=default_dataset)
    meta = dict(loaded.meta)
    if loaded.kind == "pickle" and "arch" not in meta:
        meta.update(class_spec(loaded.model, checkpoint, arch_kwargs))
    if "arch" not in meta and loaded.kind not in ("torchscript", "exported_program"):
        raise ModelError(f"{checkpoint}: a {loaded.kind} file does not record an edgesqueeze architecture; "
                         "compress needs an edgesqueeze checkpoint, a .esq archive, or a state_dict with --arch")
    name = dataset or meta.get("dataset")  # load_model filled in default_dataset where the file has none
    if not name:
        if need_data:
            raise DataError(f"{checkpoint}: does not record its dataset; pass --data NAME (e.g. --data imagenet-sample)")
        # a program's layers are found by running it: on the shape given (it said "has no Conv2d or
        # Linear layer", --input-shape or not), or refused
        _lift(loaded, meta, meta.get("input_shape"), checkpoint)
        return Inputs(loaded, meta)
    ds, train, val = training_data(meta, source=checkpoint, dataset=name, data_dir=data_dir)
    mean, std, how = input_normalization(meta, ds)
    if how.startswith("measured"):
        log(f"note: input normalization {how}")
    if meta.get("mean") is None or meta.get("std") is None:  # the dataset's statistics stand in
        meta["normalization_source"] = normalization_source(how, ds)
    check_fits(loaded.model, ds, checkpoint, meta)
    _lift(loaded, meta, ds.input_shape, checkpoint)
    # What the .esq needs to be fed like the model was: a file that names its dataset but
    # records no normalization (a state_dict whose dataset came from a recipe) gets the
    # normalization used here, or its exports would be fed raw pixels / 255.
    meta.setdefault("dataset", ds.name)
    meta.setdefault("input_shape", list(ds.input_shape))
    if meta.get("mean") is None or meta.get("std") is None:
        meta.update(mean=list(mean), std=list(std))
    if not meta.get("classes") and ds.classes is not None:
        meta["classes"] = [str(c) for c in ds.classes]
    return Inputs(loaded, meta, ds, train, val, mean, std)


def class_spec(model: nn.Module, source, arch_kwargs: dict | None) -> dict:
    """How an ``.esq`` will rebuild an unpickled model: its class as ``module:QualName``, built
    with ``arch_kwargs`` (default none) and checked to hold the same tensors as the pickle."""
    from edgesqueeze.checkpoint import load_state_dict_checked, rebuild

    cls = type(model)
    spec = f"{cls.__module__}:{cls.__qualname__}"
    if cls.__module__ in ("__main__", "__mp_main__") or "<locals>" in cls.__qualname__:
        raise ModelError(f"{source}: the pickled model's class {cls.__qualname__} was defined in a script "
                         f"({cls.__module__}), so an archive cannot name it; pass --arch path/to/file.py:"
                         f"{cls.__name__} (and --arch-kwargs) to say where it lives")
    kwargs = dict(arch_kwargs or {})
    if not kwargs:  # constructor arguments the instance kept under their own names (self.width = width)
        import inspect
        import json

        try:
            params = inspect.signature(cls).parameters
        except (TypeError, ValueError):
            params = {}
        for name in params:
            value = getattr(model, name, None) if name not in ("self", "args", "kwargs") else None
            if isinstance(value, (bool, int, float, str)) or (isinstance(value, (list, tuple)) and value
                                                                and all(isinstance(v, (int, float)) for v in value)):
                kwargs[name] = list(value) if isinstance(value, tuple) else value
        kwargs = json.loads(json.dumps(kwargs))
    try:
        rebuilt = rebuild(spec, kwargs)
        load_state_dict_checked(rebuilt, model.state_dict(), source=str(source))
    except ModelError as exc:
        raise ModelError(f"{exc} (an .esq of a pickled model rebuilds its class {spec}, here with kwargs "
                         f"{kwargs or '{}'}; pass the ones it was built with: --arch-kwargs '{{...}}')") from None
    return {"arch": spec, "arch_kwargs": dict(rebuilt.arch_kwargs)}


def check_fits(model: nn.Module, ds, source, meta: dict) -> None:
    """Refuse a dataset the model cannot take (shape, class count) with one clear line,
    before anything is computed, rather than a stack trace from inside a conv."""
    expected = meta.get("input_shape")
    if expected and list(ds.input_shape) != list(expected):
        raise DataError(f"dataset '{ds.name}' gives images of shape {list(ds.input_shape)} but {source} expects "
                        f"{list(expected)}; pass the dataset it was trained on (--data)")
    from edgesqueeze.models.probe import check_class_names, check_fits as probe

    probe(model, ds.input_shape, source=source, data=ds.name, num_classes=ds.num_classes)
    check_class_names(meta.get("classes"), ds, source)

