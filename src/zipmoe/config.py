"""Configuration: small frozen dataclasses per stage and the one memory knob."""

from __future__ import annotations

import re

from zipmoe.errors import ZipMoEError

_UNITS = {
    "": 1, "b": 1,
    "k": 1000, "kb": 1000, "m": 1000**2, "mb": 1000**2, "g": 1000**3, "gb": 1000**3, "t": 1000**4, "tb": 1000**4,
    "kib": 1024, "mib": 1024**2, "gib": 1024**3, "tib": 1024**4,
}
_SIZE_RE = re.compile(r"^\s*([0-9]+(?:\.[0-9]+)?)\s*([a-zA-Z]*)\s*$")


def parse_size(value: int | float | str) -> int:
    """Bytes from an int or a string with units ("6GiB", "512 MB", "1.5g"); GB/MB are decimal, GiB/MiB binary."""
    if isinstance(value, bool):
        raise ZipMoEError(f"memory size must be a number of bytes or a string like '6GiB', got {value!r}")
    if isinstance(value, int | float):
        if value < 0:
            raise ZipMoEError(f"memory size must be non-negative, got {value!r}")
        return int(value)
    m = _SIZE_RE.match(str(value))
    unit = m.group(2).lower() if m else None
    if not m or unit not in _UNITS:
        raise ZipMoEError(
            f"cannot parse memory size {value!r}: write a number with an optional unit, "
            "e.g. '6GiB', '512MiB', '8GB' or '1500000000'"
        )
    return int(float(m.group(1)) * _UNITS[unit])


def format_size(n: int) -> str:
    """Human-readable binary size: 1536 -> '1.5 KiB'."""
    size = float(n)
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if abs(size) < 1024 or unit == "TiB":
            return f"{size:.0f} {unit}" if unit == "B" else f"{size:.2f} {unit}"
        size /= 1024
    raise AssertionError("unreachable")
