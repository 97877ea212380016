"""The ``budget`` section of a recipe: sizes, accuracy floors, drops, agreement. Only the spec;
the gate that holds artifacts against it is :mod:`edgesqueeze.budget`.

Torch-free on purpose: ``edgesqueeze check report.json`` must run on a CI runner that only
has the report, and the device runtime may gate its own measurements.

Sizes are bytes in code. Humans write them with SI or binary units, both understood::

    >>> parse_size("500KB"), parse_size("0.5 MB"), parse_size("64KiB"), parse_size(1234)
    (500000, 500000, 65536, 1234)
"""

from __future__ import annotations

import math
import re
from decimal import Decimal
from dataclasses import asdict, dataclass, field
from typing import Any, Sequence

from edgesqueeze.errors import EdgesqueezeError, RecipeError

__all__ = ["ARTIFACT_FORMATS", "Budget", "BudgetSpecError", "format_size", "parse_fraction", "parse_size"]

_UNITS = {"": 1, "b": 1, "kb": 1000, "mb": 1000 ** 2, "gb": 1000 ** 3,
          "kib": 1024, "mib": 1024 ** 2, "gib": 1024 ** 3}
_SIZE = re.compile(r"^\s*([0-9]+(?:\.[0-9]*)?|\.[0-9]+)\s*([A-Za-z]*)\s*$")
ARTIFACT_FORMATS = ("pt", "esq", "onnx", "onnx-int8", "tflite", "tflite-int8", "tflite-micro",
                    "onnx.esq", "onnx-int8.esq", "tflite.esq", "tflite-int8.esq")  # .esq: packed files


class BudgetSpecError(EdgesqueezeError):
    """A budget that cannot be read (``0.5 parsecs``): a usage error, exit code 2."""


def parse_size(value: str | int | float, *, what: str = "size") -> int:
    """Bytes from ``1234``, ``"500KB"``, ``"0.5 MB"``, ``"64KiB"`` (KB = 1000 B, KiB = 1024 B)."""
    if isinstance(value, bool):
        raise BudgetSpecError(f"{what}: expected a size like 500KB, got {value!r}")
    if isinstance(value, (int, float)):
        if not math.isfinite(value) or value < 1 or value != int(value):
            # `max_size: 0.5` meant 0.5 MB, not 0 B (it was truncated to a limit nothing meets)
            raise BudgetSpecError(f"{what}: a number alone is bytes, and must be a whole number >= 1, got "
                                  f"{value!r}; give a unit for other sizes (500KB, 0.5MB, 64KiB)")
        return int(value)
    m = _SIZE.match(str(value))
    if not m:
        raise BudgetSpecError(f"{what}: cannot read {value!r} as a size; write e.g. 500KB, 0.5MB, "
                              "64KiB or 123456 (bytes)")
    unit = m.group(2).lower()
    if unit not in _UNITS:
        raise BudgetSpecError(f"{what}: unknown unit {m.group(2)!r} in {value!r}; use B, KB, MB, GB "
                              "(powers of 1000) or KiB, MiB, GiB (powers of 1024)")
    # a limit never admits more than it says: 17448.6B holds files of 17,448 B (round() made it 17,449)
    exact = float(m.group(1)) * _UNITS[unit]
    size = math.floor(exact + max(1e-9, abs(exact) * 1e-12))  # 17.449KB is 17448.999999999998 in floats
    if size < 1:
        raise BudgetSpecError(f"{what}: {value!r} is less than one byte; a size limit is at least 1 B")
    return size


def format_hint(fmt: Any, choices: Sequence[str] = ARTIFACT_FORMATS) -> str:
    """``"; did you mean 'tflite-int8'?"`` for a format name close to one of ``choices``
    (by default the ones ``verify`` gives: ``tflite_int8``, ``TFLite-INT8``), or ""."""
    import difflib

    hint = difflib.get_close_matches(str(fmt).replace("_", "-").lower(), list(choices), n=1)
    return f"; did you mean {hint[0]!r}?" if hint else ""


def format_size(n: int | None) -> str:
    """``15,804 B (15.8 kB)``: exact bytes first, an SI reading after."""
    if n is None:
        return "-"
    if n < 1000:
        return f"{n:,} B"
    for unit, scale in (("kB", 1e3), ("MB", 1e6), ("GB", 1e9)):
        shown = f"{n / scale:.1f}"
        if float(shown) < 1000 or unit == "GB":  # 999,950 B is 1.0 MB, not 1000.0 kB
            return f"{n:,} B ({shown} {unit})"
    return f"{n:,} B"


def parse_fraction(value: Any, what: str) -> float | None:
    """Accuracy floors as fractions (0.99) or percentages ("99%")."""
    if value is None:
        return None
    if isinstance(value, str) and value.strip().endswith("%"):
        try:  # in decimal: float("99.4") / 100 is 0.9940000000000001, above 9,940 of 10,000 images
            value = float(Decimal(value.strip()[:-1]) / 100)
        except (ArithmeticError, ValueError):
            raise BudgetSpecError(f"{what}: cannot read {value!r}; write 0.99 or 99%") from None
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0 <= value <= 1:
        raise BudgetSpecError(f"{what}: expected a fraction in [0, 1] (0.99) or a percentage "
                              f"('99%'), got {value!r}")
    return float(value)


@dataclass(frozen=True)
class Budget:
    """What every artifact must hold. ``None`` means "not checked".

    ``max_size`` applies to every artifact, ``max_size_per_format`` (keys: pt, esq, onnx,
    onnx-int8, tflite, tflite-int8, and the packed forms onnx.esq ... tflite-int8.esq)
    overrides it per format. ``min_accuracy`` and
    ``min_agreement`` are fractions; ``max_drop`` is in accuracy *points* against the float
    model the artifact came from.
    """

    max_size: int | None = None
    max_size_per_format: dict[str, int] = field(default_factory=dict)
    min_accuracy: float | None = None
    max_drop: float | None = None
    min_agreement: float | None = None

    @classmethod
    def from_dict(cls, raw: Any, *, path: str = "budget") -> Budget:
        if raw is None:
            return cls()
        if not isinstance(raw, dict):
            raise RecipeError(f"{path}: expected a mapping, got {type(raw).__name__}")
        known = {"max_size", "max_size_per_format", "min_accuracy", "max_drop", "min_agreement"}
        for key in raw:
            if key not in known:
                import difflib

                hint = difflib.get_close_matches(str(key), sorted(known), n=1)
                extra = f"; did you mean {hint[0]!r}?" if hint else f"; allowed keys: {', '.join(sorted(known))}"
                raise RecipeError(f"{path}.{key}: unknown key{extra}")
        per = raw.get("max_size_per_format")
        per = {} if per is None else per  # `0`, `false`, `[]` and `''` were taken as no limits
        if not isinstance(per, dict):
            raise RecipeError(f"{path}.max_size_per_format: expected a mapping of format to size "
                              f"(tflite-int8: 100KB), got {per!r}")
        for fmt in per:
            if fmt not in ARTIFACT_FORMATS:
                raise RecipeError(f"{path}.max_size_per_format.{fmt}: unknown format{format_hint(fmt)}; use "
                                  f"{', '.join(ARTIFACT_FORMATS)}")
        drop = raw.get("max_drop")
        if drop is not None and (isinstance(drop, bool) or not isinstance(drop, (int, float))
                                 or not math.isfinite(drop) or not 0 <= drop <= 100):
            raise RecipeError(f"{path}.max_drop: expected accuracy points in [0, 100] (0.5), got {drop!r}")
        try:
            return cls(
                max_size=None if raw.get("max_size") is None else parse_size(raw["max_size"], what=f"{path}.max_size"),
                max_size_per_format={f: parse_size(v, what=f"{path}.max_size_per_format.{f}") for f, v in per.items()},
                min_accuracy=parse_fraction(raw.get("min_accuracy"), f"{path}.min_accuracy"),
                max_drop=None if drop is None else float(drop),
                min_agreement=parse_fraction(raw.get("min_agreement"), f"{path}.min_agreement"),
            )
        except BudgetSpecError as exc:
            raise RecipeError(str(exc)) from None

    def is_empty(self) -> bool:
        return (self.max_size is None and not self.max_size_per_format and self.min_accuracy is None
                and self.max_drop is None and self.min_agreement is None)

    def size_limit(self, fmt: str) -> int | None:
        """The size limit on a file of format ``fmt``. ``max_size`` judges the files that ship
        (everything but the float reference ``.pt``); a ``.pt`` is judged only when
        ``max_size_per_format`` names ``pt`` itself."""
        if fmt in self.max_size_per_format:
            return self.max_size_per_format[fmt]
        return None if fmt == "pt" else self.max_size

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)
