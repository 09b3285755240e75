"""Exponent coders behind one Protocol, found by codec id (the id the store records per chunk).

Modules are imported lazily, when a coder is first asked for, so importing zipmoe stays cheap.
"""

from __future__ import annotations

import importlib
from typing import Any

from zipmoe.codec.coders.base import ExponentCoder
from zipmoe.errors import CodecError

DEFAULT_CODER = "huffman"

# codec id -> (module, class); add a coder by adding a row
_REGISTRY: dict[str, tuple[str, str]] = {
    "huffman": ("zipmoe.codec.coders.huffman", "HuffmanCoder"),
    "zstd": ("zipmoe.codec.coders.zstd", "ZstdCoder"),
    "lz4": ("zipmoe.codec.coders.lz4", "Lz4Coder"),
    "raw": ("zipmoe.codec.coders.raw", "RawCoder"),
}


def available_coders() -> list[str]:
    """Codec ids get_coder accepts, default first."""
    return sorted(_REGISTRY, key=lambda c: (c != DEFAULT_CODER, c))


def get_coder(codec_id: str, **params: Any) -> ExponentCoder:
    """Build the coder a store chunk names; unknown ids or parameters raise CodecError."""
    if codec_id not in _REGISTRY:
        raise CodecError(
            f"unknown exponent codec {codec_id!r}; available: {', '.join(available_coders())}"
        )
    module, cls = _REGISTRY[codec_id]
    factory = getattr(importlib.import_module(module), cls)
    try:
        return factory(**params)  # type: ignore[no-any-return]
    except TypeError as e:
        raise CodecError(
            f"bad parameters {params!r} for codec {codec_id!r}: {e}; "
            f"available codecs: {', '.join(available_coders())}"
        ) from e


__all__ = ["DEFAULT_CODER", "ExponentCoder", "available_coders", "get_coder"]
