"""store: the on-disk expert store (spec: FORMAT.md). The only package that touches store files.

Arrow: convert -> StoreWriter -> store dir -> StoreReader -> cache/engine. Pure: no torch.
"""

from zipmoe.store.aligned import aligned_buffer, open_direct, read_direct_into
from zipmoe.store.format import ExpertEntry, FileRecord, Manifest, TensorSpec, validate
from zipmoe.store.reader import ExpertBytes, StoreReader
from zipmoe.store.writer import StoreWriter

__all__ = [
    "ExpertBytes",
    "ExpertEntry",
    "FileRecord",
    "Manifest",
    "StoreReader",
    "StoreWriter",
    "TensorSpec",
    "aligned_buffer",
    "open_direct",
    "read_direct_into",
    "validate",
]
