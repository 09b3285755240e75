"""Lazy reader of a Hugging Face checkpoint directory (config.json + sharded safetensors).

Used by convert (HF -> store) and `verify --against` (store vs HF). Headers are read at open; tensor
data only when asked, one tensor or one expert slice of a fused tensor at a time, through
safetensors' mmap (torch framework: numpy cannot hold BF16). Arrays come back as unsigned integers
of the element size (BF16 -> uint16 bit patterns), so every dtype round-trips bit-identically.
Reads are thread-safe: convert's pool threads share one Checkpoint.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import numpy as np
import torch
import xxhash
from safetensors import SafetensorError, safe_open

from zipmoe.errors import ConversionError

INDEX_NAME = "model.safetensors.index.json"
# safetensors header dtype -> (dtype name used by the store and safetensors.TensorSpec, bytes per element)
DTYPES = {
    "BF16": ("bfloat16", 2), "F16": ("float16", 2), "F32": ("float32", 4), "F64": ("float64", 8),
    "BOOL": ("bool", 1), "I8": ("int8", 1), "U8": ("uint8", 1), "I16": ("int16", 2), "U16": ("uint16", 2),
    "I32": ("int32", 4), "U32": ("uint32", 4), "I64": ("int64", 8), "U64": ("uint64", 8),
    "F8_E4M3": ("float8_e4m3fn", 1), "F8_E5M2": ("float8_e5m2", 1),
}
_BITS = {1: torch.uint8, 2: torch.uint16, 4: torch.uint32, 8: torch.uint64}  # same-size views, bit-exact


class Checkpoint:
    """Tensor names, shapes and dtypes of every shard, and lazy reads; close() releases the mmaps."""

    def __init__(self, root: Path, config: dict[str, Any], files: list[str], index: dict[str, str] | None):
        self.root = root
        self.config = config
        self._where: dict[str, str] = {}  # tensor name -> shard file name
        self._handles: dict[str, Any] = {}
        self.shapes: dict[str, tuple[int, ...]] = {}
        self._dtypes: dict[str, tuple[str, int]] = {}  # name -> (store dtype name, bytes per element)
        for file in files:
            self._open_shard(file, index)
        missing = sorted(set(index or ()) - set(self.shapes))
        if missing:
            raise ConversionError(f"{root / INDEX_NAME} lists {missing[0]!r} in {index[missing[0]]}, which "
                                  "does not hold it: the checkpoint is inconsistent; re-download it")

    @classmethod
    def open(cls, path: str | os.PathLike) -> Checkpoint:
        """Validate the directory and read every safetensors header; ConversionError says what is wrong."""
        root = Path(path)
        if not root.exists():
            raise ConversionError(f"checkpoint directory {root} does not exist; check the path")
        if not root.is_dir():
            raise ConversionError(f"{root} is a file; pass the checkpoint directory that holds config.json "
                                  "and the *.safetensors files")
        config = _read_config(root)
        files, index = _shards(root)
        return cls(root, config, files, index)

    def _open_shard(self, file: str, index: dict[str, str] | None) -> None:
        path = self.root / file
        try:
            handle = safe_open(str(path), framework="pt")
        except (SafetensorError, OSError) as exc:
            raise ConversionError(f"cannot read {path}: {exc}; the file is not valid safetensors "
                                  "(truncated download?)") from None
        self._handles[file] = handle
        for name in handle.keys():  # noqa: SIM118 - safe_open is not iterable
            if index is not None and index.get(name) != file:
                continue  # the index is authoritative (as in transformers): it places this tensor elsewhere
            self._where[name] = file
            sl = handle.get_slice(name)
            self.shapes[name] = tuple(int(d) for d in sl.get_shape())
            if sl.get_dtype() not in DTYPES:
                raise ConversionError(f"tensor {name!r} in {path} has dtype {sl.get_dtype()}, which zipmoe "
                                      f"cannot store; supported: {', '.join(DTYPES)}")
            self._dtypes[name] = DTYPES[sl.get_dtype()]

    @property
    def names(self) -> list[str]:
        """Every tensor name of the checkpoint, sorted."""
        return sorted(self.shapes)

    def dtype(self, name: str) -> str:
        """Store dtype name of a tensor ("bfloat16", "float32", ...)."""
        return self._dtypes[name][0]

    def file_of(self, name: str) -> str:
        """The shard file holding a tensor."""
        return self._where[name]

    def nbytes(self, name: str) -> int:
        """Bytes of a whole tensor."""
        return int(np.prod(self.shapes[name], dtype=np.int64)) * self.itemsize(name)

    def nbytes_of(self, src: Any) -> int:
        """Bytes of one projection (a models.base.ProjSource): a fused tensor's expert slice or row block."""
        n = self.nbytes(src.tensor)
        if src.index is not None:
            n //= self.shapes[src.tensor][0]
        return n // src.parts

    def itemsize(self, name: str) -> int:
        """Bytes per element of a tensor."""
        return self._dtypes[name][1]

    def read(self, name: str, index: int | None = None) -> np.ndarray:
        """A tensor (or its slice [index] along dim 0) as unsigned ints of its element size, shape kept."""
        handle = self._handles[self._where[name]]
        t = handle.get_tensor(name) if index is None else handle.get_slice(name)[index]
        return t.contiguous().view(_BITS[t.element_size()]).numpy()

    def read_bytes(self, name: str) -> np.ndarray:
        """A whole tensor's raw little-endian bytes, flat uint8."""
        return self.read(name).reshape(-1).view(np.uint8)

    def fingerprint(self) -> str:
        """Identifies this checkpoint's content cheaply (names, sizes, mtimes, config) for resume safety."""
        h = xxhash.xxh3_64(json.dumps(self.config, sort_keys=True).encode())
        for file in sorted(set(self._where.values())):
            st = (self.root / file).stat()
            h.update(f"{file}:{st.st_size}:{st.st_mtime_ns};".encode())
        return h.hexdigest()

    def close(self) -> None:
        """Drop the shard handles (their mmaps close when garbage-collected)."""
        self._handles.clear()


def _read_config(root: Path) -> dict[str, Any]:
    path = root / "config.json"
    if not path.is_file():
        raise ConversionError(f"no config.json in {root}: not a Hugging Face checkpoint directory "
                              "(download the full model repository, not only the weights)")
    try:
        config = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, ValueError) as exc:
        raise ConversionError(f"cannot parse {path}: {exc}") from None
    if not isinstance(config, dict):
        raise ConversionError(f"{path} is not a JSON object")
    return config


def _shards(root: Path) -> tuple[list[str], dict[str, str] | None]:
    """Shard files to read and the index's tensor -> file map (None without an index: read every file)."""
    index = root / INDEX_NAME
    if index.is_file():
        try:
            weight_map = json.loads(index.read_text(encoding="utf-8"))["weight_map"]
            where = {str(k): str(v) for k, v in weight_map.items()}
        except (OSError, UnicodeDecodeError, ValueError, KeyError, TypeError, AttributeError) as exc:
            raise ConversionError(f"cannot parse {index}: {exc!r}; re-download the checkpoint") from None
        absent = sorted({f for f in where.values() if not (root / f).is_file()})
        if absent:
            raise ConversionError(f"{index} refers to {absent[0]}, which is missing from {root} "
                                  f"({len(absent)} shard(s) missing); finish the download")
        return sorted(set(where.values())), where
    files = sorted(p.name for p in root.glob("*.safetensors"))
    if not files:
        bins = sorted(p.name for p in root.glob("*.bin"))
        hint = (f" It has PyTorch weights ({bins[0]}): load it with transformers and save_pretrained() it to "
                "get safetensors." if bins else "")
        raise ConversionError(f"no *.safetensors files in {root}.{hint}")
    return files, None
