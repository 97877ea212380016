"""One forward pass on zeros before any real work: does the model take these images, and does
it give what every command needs (one logits tensor, a row per image, one logit per class)?

A model that does not is refused with one line that says which of those fails and what to do,
instead of a stack trace from inside a conv, a ``'tuple' object has no attribute 'shape'``
or a matmul error from a trace that recorded its batch size.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from ..errors import DataError, ModelError

__all__ = ["check_fits", "reason"]


def reason(exc: BaseException) -> str:
    """The line of ``exc`` that says what went wrong. A TorchScript error starts with 'The
    following operation failed in the TorchScript interpreter.' and ends with the real one."""
    lines = [line.strip() for line in str(exc).strip().splitlines() if line.strip()]
    if not lines:
        return type(exc).__name__
    i = len(lines) - 1 if "TorchScript interpreter" in lines[0] else 0
    line = lines[i]
    if line.endswith(":") and i + 1 < len(lines):  # "... exported input tree spec:" said nothing alone
        line = f"{line} {lines[i + 1]}"
    return line[:200]


def required_inputs(model: nn.Module) -> list[str] | None:
    """The names of the inputs ``model``'s forward needs (its positional parameters without a
    default; a TorchScript module's from its schema), or None where that is not known
    (``*args``, no signature)."""
    import inspect

    schema = getattr(getattr(model, "forward", None), "schema", None)
    if schema is not None:  # a TorchScript method: its arguments, self first
        try:
            return [a.name for a in list(schema.arguments)[1:] if not a.has_default_value()]
        except (AttributeError, RuntimeError):
            return None
    try:
        params = inspect.signature(model.forward).parameters.values()
    except (TypeError, ValueError):
        return None
    if any(p.kind == p.VAR_POSITIONAL for p in params):
        return None
    return [p.name for p in params if p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD) and p.default is p.empty]


def _forward(model: nn.Module, batch: int, shape: list[int]) -> Any:
    with torch.no_grad():
        return model(torch.zeros(batch, *shape))


def check_class_names(classes, ds, source: Any) -> None:
    """Refuse a dataset whose class names differ from the ones the model was trained with
    (same count, other names or order: its labels would be matched by position, and every
    accuracy measured would be wrong)."""
    if classes and list(map(str, classes)) != list(map(str, ds.classes)):
        mine, theirs = list(map(str, classes)), list(map(str, ds.classes))
        first = next((i for i, (a, b) in enumerate(zip(mine, theirs)) if a != b), min(len(mine), len(theirs)))
        raise DataError(f"{source}: its classes ({', '.join(mine[:4])}{', ...' if len(mine) > 4 else ''}) are not "
                        f"dataset '{ds.name}''s ({', '.join(theirs[:4])}{', ...' if len(theirs) > 4 else ''}; "
                        f"class {first} is {theirs[first] if first < len(theirs) else 'missing'!r} there, "
                        f"{mine[first] if first < len(mine) else 'missing'!r} in the model): labels would be "
                        "matched by position; pass the dataset it was trained on (--data)")


def check_fits(model: nn.Module, input_shape, *, source: Any, data: str | None = None,
               num_classes: int | None = None) -> int:
    """Run ``model`` (in eval mode) on batches of 1 and 2 zero images of ``input_shape``;
    return its class count. ``data`` (a dataset name) and ``num_classes`` say where the
    images come from and what the output must have."""
    shape = [int(d) for d in input_shape]
    what = f"'{data}' images of shape {shape}" if data else f"inputs of shape {shape}"
    todo = "pass the dataset it was trained on (--data)" if data else "pass --input-shape C,H,W"
    model.eval()
    outs, errors = {}, {}
    for batch in (1, 2):
        try:
            outs[batch] = _forward(model, batch, shape)
        except Exception as exc:  # noqa: BLE001 - the user's forward can raise anything
            errors[batch] = exc
    if len(errors) == 2:
        needs = required_inputs(model)
        if needs is not None and len(needs) != 1:  # not the images' fault: say what is
            takes = f"{len(needs)} inputs ({', '.join(needs)})" if needs else "no input"
            raise ModelError(f"{source}: its forward takes {takes}; edgesqueeze runs models on one image tensor: "
                             "wrap it in a module whose forward(x) takes the images alone and supplies the rest, "
                             "and save that wrapper")
        why = reason(errors[1])
        if any(s in str(errors[1]) for s in ("input tree spec", "Expected a value of type 'Dict",
                                               "Expected a value of type 'List", "Expected a value of type 'Tuple")):
            raise ModelError(f"{source}: its forward takes a structure (a dict, list or tuple), not one image tensor "
                             f"({why}); wrap it in a module whose forward(x) takes the images alone and builds the "
                             "structure, and save that wrapper")
        if "Guard failed" in str(errors[1]):  # the program fixes a size the images do not have
            todo = ("pass --input-shape C,H,W with the size it was exported for (a gray dataset's images are then "
                    "repeated into 3 channels, a colour one's made gray, with a note)")
        raise DataError(f"{source} does not run on {what} ({why}); {todo}")
    if errors:
        ran, failed = (1, 2) if 2 in errors else (2, 1)
        raise ModelError(f"{source} runs on a batch of {ran} but not of {failed} ({reason(errors[failed])}): it "
                         "was traced or exported with a fixed batch size (x.view(2, -1) in forward, say). Use x.flatten(1) "
                         "and trace again, or save it with torch.jit.script, or torch.export with a dynamic batch "
                         "dimension")
    out = outs[1]
    if not isinstance(out, torch.Tensor):
        raise ModelError(f"{source} returns a {type(out).__name__}, not one tensor of logits; edgesqueeze needs "
                         "forward(x) to return the logits [batch, classes]: wrap the model in a module whose "
                         "forward returns that output, and save the wrapper")
    if out.dim() != 2 or not isinstance(outs[2], torch.Tensor) or tuple(outs[2].shape[:1]) != (2,):
        raise ModelError(f"{source} outputs shape {list(out.shape)} for one image; edgesqueeze needs logits of "
                         "shape [batch, classes] (flatten or pool the last feature map in forward)")
    if num_classes is not None and out.shape[-1] != num_classes:
        if data is None:
            raise DataError(f"{source} outputs {out.shape[-1]} logits but {num_classes} class names are given "
                            "(--classes, or the file's own); give one name per logit")
        raise DataError(f"dataset '{data}' has {num_classes} classes but {source} outputs {out.shape[-1]}; {todo}")
    return int(out.shape[-1])
