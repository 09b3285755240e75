"""Shared vocabulary passed between stages: small frozen dataclasses, no live objects.

L=layers E=experts K=exponent shards per expert W=decode workers; sizes in bytes, times in seconds.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass
from typing import NamedTuple


class ExpertKey(NamedTuple):
    """One routed expert of one MoE layer (a tuple: hashing is on the hot path)."""

    layer: int  # decoder layer index as in the HF checkpoint (not the index among MoE layers)
    expert: int  # expert index within the layer

    def __str__(self) -> str:
        return f"layer {self.layer} expert {self.expert}"


class State(enum.IntEnum):
    """How an expert is held by the cache (DESIGN.md §2)."""

    F = 0  # full BF16 on the compute device, ready to compute
    C = 1  # SM plane + compressed exponent shards in host memory
    S = 2  # SM plane only; the exponent shards must be read from disk
    E = 3  # compressed exponent shards only; the SM plane must be read from disk
    MISS = 4  # nothing resident; read both planes


@dataclass(frozen=True, slots=True)
class ChunkRef:
    """Where one stored chunk lives in the store's data file."""

    offset: int  # bytes from the start of experts.bin; multiple of 4096
    length: int  # stored (possibly compressed) bytes
    raw_length: int  # bytes after decoding (== length for raw chunks)
    checksum: int  # xxh3_64 of the stored bytes
    codec: str  # "raw" for SM planes, else an exponent coder id (codec/coders registry)
