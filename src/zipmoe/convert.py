"""convert: HF checkpoint (sharded safetensors, BF16) -> zipmoe store. The first arrow of the pipeline.

In: a checkpoint directory. The adapter's expert_tensor_plan says which tensors are routed experts;
each expert's projections (canonical gate, up, down) are flattened, concatenated, split into SM +
K exponent shards (codec.encode_expert), checked to decode back bit-exactly, and appended to the
store by StoreWriter; every other tensor goes bit-identical into dense safetensors. Out: the store.
Threads: the caller's thread reads the plan and writes in sorted order; W pool threads each read one
expert (lazily, via safetensors mmap) and encode it (the coders release the GIL). At most W + 1
experts are in flight, so memory stays ~(W + 1) × 4.5 bytes/weight of one expert, whatever the model.
W=workers K=exponent shards per expert n=weights of one expert; sizes in bytes.
"""

from __future__ import annotations

import functools
import logging
import os
import shutil
from collections import deque
from collections.abc import Iterator, Mapping
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np
import xxhash

from zipmoe import __version__
from zipmoe.checkpoint import Checkpoint
from zipmoe.codec import encode_expert, get_coder, shard_bounds
from zipmoe.codec.coders.base import ExponentCoder
from zipmoe.errors import ConversionError, UnsupportedModelError, ZipMoEError
from zipmoe.models.base import ExpertPlan, ProjSource
from zipmoe.models.plan import checkpoint_plan
from zipmoe.report import available_cores
from zipmoe.store.format import DTYPE_SIZES, TensorSpec
from zipmoe.store.reader import StoreReader
from zipmoe.store.writer import StoreWriter
from zipmoe.types import ExpertKey

log = logging.getLogger(__name__)

DEFAULT_SHARDS = 8  # K: enough for 8 decode workers per expert; shard_bounds merges tiny experts' shards
EXPECTED_SPLIT_RATIO = 0.6  # lower bound of stored/BF16 for split experts, for the free-space check
AUX_FILES = (
    "config.json", "generation_config.json", "tokenizer.json", "tokenizer_config.json",
    "special_tokens_map.json", "added_tokens.json", "vocab.json", "vocab.txt", "merges.txt",
    "tokenizer.model", "chat_template.jinja", "chat_template.json",
)


@dataclass(frozen=True, slots=True)
class _Encoded:
    """One expert ready for StoreWriter (built on a pool thread, written on the caller's)."""

    key: ExpertKey
    tensors: tuple[TensorSpec, ...]  # projection specs in flat-vector order
    sm: np.ndarray  # split: SM plane u8[n]; raw: the tensors' bytes
    shards: list[bytes]  # split: K coded exponent shards; raw: []
    bounds: list[tuple[int, int]]  # element range of each shard
    nbytes: int  # bytes of the expert in the checkpoint (progress)


def convert(
    hf_dir: str | os.PathLike,
    store_dir: str | os.PathLike,
    *,
    coder: str = "huffman",
    coder_params: Mapping[str, Any] | None = None,
    shards: int | None = None,
    workers: int | None = None,
    allow_raw: bool = False,
    overwrite: bool = False,
    progress: bool = True,
) -> Path:
    """Convert a BF16 HF MoE checkpoint into a verified store at store_dir; returns its path.

    Re-running after an interruption resumes from the experts already written and verified.
    Raises ConversionError on bad input (the message says what to fix) and CodecError on a bad coder.
    """
    ckpt = Checkpoint.open(hf_dir)
    try:
        plan = _plan(ckpt)
        raw_keys = _check_dtypes(ckpt, plan, allow_raw)
        exp_coder = get_coder(coder, **dict(coder_params or {}))
        workers = max(1, workers or available_cores())
        k = _effective_k(ckpt, plan, shards or DEFAULT_SHARDS)
        log.info("%s (adapter %s): %d experts in %d layers, %d dense tensors; coder %s, K=%d, %d workers",
                 plan.model_type, plan.adapter, len(plan.experts), len(plan.moe_layers), len(plan.dense),
                 exp_coder.codec_id, k, workers)
        writer = StoreWriter(
            store_dir, codec_id=exp_coder.codec_id, k=k, model_type=plan.model_type,
            codec_params=exp_coder.params(), metadata={"converter": f"zipmoe {__version__}",
                                                        "source": ckpt.root.name},
            overwrite=overwrite, source_fingerprint=ckpt.fingerprint(),
        )
        try:
            _check_free_space(ckpt, plan, writer, raw_keys)
            with _progress_bar(progress, _total_bytes(ckpt, plan), "convert") as bar:
                _write_experts(ckpt, plan, writer, exp_coder, k, workers, raw_keys, bar)
                _write_dense(ckpt, plan, writer, bar)
                writer.copy_files(p for name in AUX_FILES if (p := ckpt.root / name).is_file())
            return writer.finalize(check=functools.partial(_verify_written, show_progress=progress))
        finally:
            writer.close()
    finally:
        ckpt.close()


def _plan(ckpt: Checkpoint) -> ExpertPlan:
    """The adapter's plan; an unsupported model (no experts found, or a layout the engine cannot serve) is
    refused before anything is written."""
    try:
        return checkpoint_plan(ckpt.root, ckpt.names, ckpt.config, shapes=ckpt.shapes)
    except UnsupportedModelError as exc:
        raise ConversionError(f"{ckpt.root} is not a Mixture-of-Experts checkpoint zipmoe can convert: {exc}") from None


def _check_dtypes(ckpt: Checkpoint, plan: ExpertPlan, allow_raw: bool) -> frozenset[ExpertKey]:
    """Experts to store raw (non-BF16); without allow_raw any non-BF16 expert tensor is an error."""
    raw = set()
    for key, srcs in plan.experts.items():
        dtypes = {ckpt.dtype(s.tensor) for s in srcs}
        if dtypes == {"bfloat16"}:
            continue
        if not allow_raw:
            bad = next(s.tensor for s in srcs if ckpt.dtype(s.tensor) != "bfloat16")
            raise ConversionError(
                f"expert tensor {bad!r} ({key}) is {ckpt.dtype(bad)}, not bfloat16: zipmoe compresses BF16 "
                "experts only. Convert the checkpoint to BF16 first, or pass --allow-raw (allow_raw=True) "
                "to store non-BF16 experts uncompressed"
            )
        if len(dtypes) != 1 or not dtypes <= DTYPE_SIZES.keys():
            raise ConversionError(f"{key}: projections have dtypes {sorted(dtypes)}; a raw expert needs one "
                                  f"supported dtype ({', '.join(DTYPE_SIZES)})")
        raw.add(key)
    if raw:
        log.warning("%d of %d experts are not BF16 and are stored raw (uncompressed)",
                    len(raw), len(plan.experts))
    return frozenset(raw)


def _expert_numel(ckpt: Checkpoint, srcs: tuple[ProjSource, ...]) -> int:
    return sum(int(np.prod(_proj_shape(ckpt, s))) for s in srcs)


def _proj_shape(ckpt: Checkpoint, src: ProjSource) -> tuple[int, ...]:
    """Shape of one projection, from the safetensors header (no data read)."""
    shape = ckpt.shapes[src.tensor]
    if src.index is not None:
        shape = shape[1:]
    return (shape[0] // src.parts, *shape[1:])


def _effective_k(ckpt: Checkpoint, plan: ExpertPlan, k: int) -> int:
    """Shards per expert after shard_bounds' clamping; the store needs one K for every expert."""
    counts = {len(shard_bounds(_expert_numel(ckpt, srcs), k)) for srcs in plan.experts.values()}
    if len(counts) != 1:
        raise ConversionError(
            f"experts of different sizes would get {sorted(counts)} exponent shards with K={k}, but a store "
            "holds one K; pass --shards 1 (or a K all experts reach)"
        )
    return counts.pop()


def _total_bytes(ckpt: Checkpoint, plan: ExpertPlan) -> int:
    experts = sum(ckpt.nbytes_of(s) for srcs in plan.experts.values() for s in srcs)
    return experts + sum(ckpt.nbytes(n) for n in plan.dense)


def _check_free_space(ckpt: Checkpoint, plan: ExpertPlan, writer: StoreWriter,
                      raw: frozenset[ExpertKey]) -> None:
    """Fail before hours of work when the destination clearly cannot hold the store."""
    need = sum(ckpt.nbytes(n) for n in plan.dense)
    for key, srcs in plan.experts.items():
        if key not in writer.completed:
            ratio = 1.0 if key in raw else EXPECTED_SPLIT_RATIO
            need += int(ratio * sum(ckpt.nbytes_of(s) for s in srcs))
    free = _free_bytes(writer.tmp)
    if free < need:
        raise ConversionError(
            f"not enough free space for the store at {writer.dest}: it needs at least {need / 1e9:.2f} GB, "
            f"{free / 1e9:.2f} GB are free; free space or choose another destination"
        )


def _free_bytes(path: Path) -> int:
    """Free bytes on the file system holding path (tests replace this to simulate a full disk)."""
    return shutil.disk_usage(path).free


def _write_experts(ckpt: Checkpoint, plan: ExpertPlan, writer: StoreWriter, coder: ExponentCoder, k: int,
                   workers: int, raw: frozenset[ExpertKey], bar: Any) -> None:
    """Encode experts on W threads, write them in sorted order; at most W + 1 in flight."""
    done = writer.completed
    pending: deque[Future[_Encoded]] = deque()
    with ThreadPoolExecutor(workers, thread_name_prefix="zipmoe-encode") as pool:
        try:
            for key, srcs in plan.experts.items():
                if key in done:
                    bar.update(sum(ckpt.nbytes_of(s) for s in srcs))
                    continue
                pending.append(pool.submit(_encode_one, ckpt, key, srcs, coder, k, key in raw))
                while pending and (len(pending) > workers or pending[0].done()):
                    _write_one(writer, pending.popleft().result(), bar)
            while pending:
                _write_one(writer, pending.popleft().result(), bar)
        finally:
            for fut in pending:
                fut.cancel()


def _write_one(writer: StoreWriter, enc: _Encoded, bar: Any) -> None:
    if enc.shards:
        writer.add_expert(enc.key, enc.tensors, enc.sm, enc.shards, shard_bounds=enc.bounds)
    else:
        writer.add_raw_expert(enc.key, enc.tensors, enc.sm)
    bar.update(enc.nbytes)


def _encode_one(ckpt: Checkpoint, key: ExpertKey, srcs: tuple[ProjSource, ...], coder: ExponentCoder,
                k: int, raw: bool) -> _Encoded:
    """Read one expert's projections, flatten + concatenate them, encode, prove it decodes back."""
    parts = list(read_expert(ckpt, srcs))
    specs, offset = [], 0
    for src, arr in parts:
        specs.append(TensorSpec(
            name=src.proj, hf_name=src.tensor if src.index is None and src.parts == 1 else "",
            shape=_proj_shape(ckpt, src), dtype=ckpt.dtype(src.tensor), offset=offset, numel=arr.size,
            checksum=xxhash.xxh3_64_intdigest(arr),
        ))
        offset += arr.size
    nbytes = sum(a.nbytes for _, a in parts)
    flat = np.concatenate([a.reshape(-1) for _, a in parts])
    if raw:
        return _Encoded(key, tuple(specs), flat.view(np.uint8), [], [], nbytes)
    bounds = shard_bounds(flat.size, k)
    sm, shards = encode_expert(flat, coder, k)
    _check_roundtrip(key, flat, sm, shards, bounds, coder)
    return _Encoded(key, tuple(specs), sm, shards, bounds, nbytes)


def read_expert(ckpt: Checkpoint, srcs: tuple[ProjSource, ...]) -> Iterator[tuple[ProjSource, np.ndarray]]:
    """(source, contiguous array of its projection) per projection, in canonical order.

    BF16 comes back as uint16 bit patterns; a fused [E, ...] tensor is read one expert slice at a time.
    """
    cache: dict[tuple[str, int | None], np.ndarray] = {}
    for src in srcs:
        whole = cache.get((src.tensor, src.index))
        if whole is None:
            whole = ckpt.read(src.tensor, src.index)
            cache = {(src.tensor, src.index): whole}  # gate and up of a fused gate_up share one read
        yield src, np.ascontiguousarray(replace(src, index=None).take(whole))


def _check_roundtrip(key: ExpertKey, flat: np.ndarray, sm: np.ndarray, shards: list[bytes],
                     bounds: list[tuple[int, int]], coder: ExponentCoder) -> None:
    """Lossless is the product: decode what we are about to store and compare bit-for-bit."""
    out = np.empty_like(flat)
    for (a, b), payload in zip(bounds, shards, strict=True):
        coder.decode_merge_into(payload, sm[a:b], out[a:b])
    if not np.array_equal(out, flat):
        first = int(np.flatnonzero(out != flat)[0])
        raise ConversionError(f"{key}: coder {coder.codec_id!r} did not round-trip (first differing weight "
                              f"{first}); this is a zipmoe bug — please report it, or try --coder zstd")


def _write_dense(ckpt: Checkpoint, plan: ExpertPlan, writer: StoreWriter, bar: Any) -> None:
    """Non-expert tensors, bit-identical, one dense safetensors file per checkpoint shard (bounded memory)."""
    by_file: dict[str, list[str]] = {}
    for name in plan.dense:
        by_file.setdefault(ckpt.file_of(name), []).append(name)
    for i, file in enumerate(sorted(by_file), start=1):
        tensors = {}
        for name in by_file[file]:
            tensors[name] = (ckpt.dtype(name), ckpt.shapes[name], ckpt.read_bytes(name))
            bar.update(ckpt.nbytes(name))
        writer.add_dense_tensors(tensors, name=f"dense-{i:05d}-of-{len(by_file):05d}.safetensors",
                                 metadata={"format": "pt"})


def _verify_written(tmp: Path, show_progress: bool) -> None:
    """Re-read the whole finished temp store before it is installed (StoreWriter.finalize's check)."""
    try:
        with StoreReader(tmp, direct_io=False) as reader:
            total = sum(r.size for r in reader.manifest.files.values())
            with _progress_bar(show_progress, total, "verify") as bar:
                reader.verify_all(progress=bar.update)
                bar.update(total - bar.n)  # the tail padding is checked but not reported
    except ZipMoEError as exc:
        raise ConversionError(f"the written store failed verification, nothing was installed: {exc}. "
                              "Check the disk, then re-run the conversion") from None


def _progress_bar(enabled: bool, total: int | None, desc: str) -> Any:
    """A byte-unit tqdm bar (a no-op one when disabled)."""
    from tqdm.auto import tqdm

    return tqdm(total=total, desc=desc, unit="B", unit_scale=True, unit_divisor=1024, disable=not enabled,
                dynamic_ncols=True, leave=True)


__all__ = ["DEFAULT_SHARDS", "convert", "read_expert"]

