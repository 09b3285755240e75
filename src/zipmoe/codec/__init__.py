"""codec: BF16 bits ⇄ (SM plane, exponent plane), exponent coders, merge kernels.

Pure: numpy + numba, no torch, no files, no threads of its own. Kernels compile on first use.
"""

from zipmoe.codec.coders import DEFAULT_CODER, ExponentCoder, available_coders, get_coder
from zipmoe.codec.merge import merge_into
from zipmoe.codec.planes import merge_reference, split_bf16, split_into
from zipmoe.codec.shards import encode_expert, exponent_entropy, floor_bytes, shard_bounds

__all__ = [
    "DEFAULT_CODER",
    "ExponentCoder",
    "available_coders",
    "encode_expert",
    "exponent_entropy",
    "floor_bytes",
    "get_coder",
    "merge_into",
    "merge_reference",
    "shard_bounds",
    "split_bf16",
    "split_into",
]
