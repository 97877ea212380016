"""The layers compression works on: every Conv2d and Linear of a model, by module name.

Pruning, weight sharing and their recipe sections (``compress.prune.layers``,
``compress.cluster.layers``) all name layers this way, so the lookup and the check of
user-given names live here, below both.
"""

from __future__ import annotations

import difflib
from collections.abc import Iterable, Sequence

from torch import nn

from ..errors import RecipeError

__all__ = ["check_layer_names", "prunable_layers"]


def prunable_layers(model: nn.Module) -> dict[str, nn.Module]:
    """Every Conv2d and Linear by module name, in module order."""
    return {name: m for name, m in model.named_modules() if isinstance(m, (nn.Conv2d, nn.Linear))}


def check_layer_names(wanted: Iterable[str], known: Sequence[str], path: str) -> None:
    """Refuse names that are not prunable layers of the model, suggesting the closest one."""
    for name in wanted:
        if name in known:
            continue
        hint = difflib.get_close_matches(name, list(known), n=1, cutoff=0.6)
        if hint:
            tip = f"; did you mean '{hint[0]}'?"
        else:
            shown = ", ".join(list(known)[:8]) + (", ..." if len(known) > 8 else "")
            tip = f"; the model's Conv2d/Linear layers are: {shown} ({len(known)} in all)"
        raise RecipeError(f"{path}.{name}: no Conv2d or Linear layer of that name{tip}")
