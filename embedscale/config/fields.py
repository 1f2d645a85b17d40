"""Field helpers of the schemas: a numeric field's range declared where the field is, checked by one function.

    lr: float = bounded(2e-5, gt=0)
    \"\"\"Peak learning rate ...\"\"\"

`check_fields(obj, section)` -- the first line of every schema's `__post_init__` -- turns choices into their enum
(choices.py) and checks every numeric field: NaN and infinities are refused for every float, and a declared bound
(`ge`, `gt`, `le`, `lt`) is enforced with a ValueError naming the full key, the value and the valid range. A
`None` (null) passes where the field allows it. Bounds that depend on another field (one key against another)
stay in the schema's `__post_init__`.
"""

from __future__ import annotations

import dataclasses
import functools
import math
import types
import typing
from typing import Any

from embedscale.config.choices import coerce_choices


def bounded(
    default: Any,
    *,
    ge: float | None = None,
    gt: float | None = None,
    le: float | None = None,
    lt: float | None = None,
    choices: type | None = None,
) -> Any:
    """A dataclass field with a default and the range its values must lie in."""
    metadata = {k: v for k, v in (("ge", ge), ("gt", gt), ("le", le), ("lt", lt)) if v is not None}
    if choices is not None:
        metadata["choices"] = choices
    return dataclasses.field(default=default, metadata=metadata)


@functools.cache
def _numeric_fields(cls: type) -> dict[str, tuple[type, dict]]:
    """{field: (int or float, its bounds)} of a dataclass's numeric fields (also `int | None`, ...)."""
    hints = typing.get_type_hints(cls)
    out = {}
    for f in dataclasses.fields(cls):
        t = hints[f.name]
        args = typing.get_args(t) if isinstance(t, types.UnionType) or typing.get_origin(t) is typing.Union else (t,)
        kinds = [a for a in args if a in (int, float)]
        if kinds and bool not in args:
            out[f.name] = (float if float in kinds else int, dict(f.metadata))
    return out


def _range_text(bounds: dict) -> str:
    low = f">= {bounds['ge']}" if "ge" in bounds else f"> {bounds['gt']}" if "gt" in bounds else ""
    high = f"<= {bounds['le']}" if "le" in bounds else f"< {bounds['lt']}" if "lt" in bounds else ""
    return " and ".join(p for p in (low, high) if p) or "a finite number"


def check_fields(obj: Any, section: str) -> None:
    """Choices to enums, then every numeric field finite and within its declared bounds (ValueError naming the key)."""
    coerce_choices(obj, section)
    for name, (_, bounds) in _numeric_fields(type(obj)).items():
        value = getattr(obj, name)
        if value is None or isinstance(value, bool):
            continue
        key = f"{section}.{name}" if section else name
        if isinstance(value, float) and not math.isfinite(value):
            raise ValueError(f"{key}={value} is not a finite number: use {_range_text(bounds)}")
        ok = (
            ("ge" not in bounds or value >= bounds["ge"])
            and ("gt" not in bounds or value > bounds["gt"])
            and ("le" not in bounds or value <= bounds["le"])
            and ("lt" not in bounds or value < bounds["lt"])
        )
        if not ok:
            raise ValueError(f"{key}={value} is out of range: use {_range_text(bounds)}")
