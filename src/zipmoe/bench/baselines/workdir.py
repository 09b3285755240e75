"""The inputs every system shares, prepared once per workdir: checkpoint, stores, disk bandwidth.

bench stage, step 1 of `zipmoe bench e2e` (resumable: each artefact is reused when complete and
rebuilt when a killed call left it partial): hf/ (synthetic HF checkpoint, index written last),
store-huffman/ and store-raw/ (manifest written last), gguf/ (llama.cpp's BF16 copy, renamed into place
when whole), setup.json (measured O_DIRECT bandwidth).
Also the provenance every run JSON carries: machine and commit. Sizes in bytes, times in s.
"""

from __future__ import annotations

import json
import os
import platform
import shutil
import subprocess
import threading
import time
from pathlib import Path
from typing import Any

import numpy as np

from zipmoe.bench.baselines.base import Setup
from zipmoe.bench.baselines.llama_cpp import convert_to_gguf, gguf_path, llama_cpp_build
from zipmoe.bench.baselines.zipmoe_engine import store_geometry
from zipmoe.bench.synth import build_synthetic, scaled_config, tensor_table
from zipmoe.convert import convert
from zipmoe.errors import ZipMoEError
from zipmoe.models.load import default_workers
from zipmoe.store.aligned import aligned_buffer, open_direct, read_direct_into

PROFILES = {"deepseek-v2-lite": "deepseek-v2-lite"}  # shape -> routing profile (default: Qwen1.5-MoE's)


def routing_profile_for(shape: str) -> str:
    """The measured routing profile (data/routing_profiles.json) the sampler uses for a synthetic shape."""
    return PROFILES.get(shape, "qwen1.5-moe-a2.7b")


def save_json(path: Path, doc: Any) -> None:
    """Write atomically (a killed call never leaves half a JSON)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(f".{os.getpid()}.tmp")
    tmp.write_text(json.dumps(doc, indent=1))
    tmp.replace(path)


def disk_bandwidth(data_file: Path, chunk: int = 16 << 20, total: int = 1 << 30, threads: int = 2,
                   passes: int = 3) -> float:
    """O_DIRECT read bandwidth (B/s) of a file: the best of `passes` passes, each reading whole chunks in
    random order (≤ total bytes, no chunk twice over all passes while the file has enough) with `threads`
    readers at once, as the engine's I/O channel reads by default (load(io_threads=2)); only the reads are timed
    (files opened and buffers allocated first, the readers released together). The best pass, because the
    result is a lower bound's denominator: one 1 GiB pass on the device measured 1.6 GB/s in a call where
    the uncompressed engine then read at 6 % more than that (a run faster than its "bound"). Dirty pages are
    flushed first: a benchmark measures right after building its stores, and their writeback would slow
    the reads (a device run measured 1.0 GB/s so, while the engine then read at 1.5 GB/s)."""
    os.sync()
    size = data_file.stat().st_size
    chunk = min(chunk, max(4096, size // 4096 * 4096))
    order = np.random.default_rng(0).permutation(max(1, size // chunk))
    per_pass = max(1, total // chunk)
    threads = max(1, min(threads, per_pass, len(order)))
    fds = [open_direct(str(data_file))[0] for _ in range(threads)]
    try:
        bufs = [aligned_buffer(chunk) for _ in range(threads)]
        best = 0.0
        for p in range(passes):
            at = (p * per_pass) % len(order)
            offsets = np.roll(order, -at)[:per_pass]
            nbytes = sum(min(chunk, size - int(i) * chunk) for i in offsets)
            best = max(best, nbytes / _timed_reads(fds, bufs, offsets, chunk, size))
    finally:
        for fd in fds:
            os.close(fd)
    return best


def _timed_reads(fds: list[int], bufs: list[np.ndarray], offsets: np.ndarray, chunk: int, size: int) -> float:
    """Seconds for len(fds) threads to read the chunks at `offsets` (thread t takes every t-th one)."""
    threads = len(fds)
    start = threading.Barrier(threads + 1)
    failed: list[BaseException] = []

    def read(t: int) -> None:
        start.wait()
        try:
            for i in offsets[t::threads]:
                read_direct_into(fds[t], int(i) * chunk, min(chunk, size - int(i) * chunk), bufs[t])
        except BaseException as exc:  # re-raised on the caller's thread
            failed.append(exc)

    readers = [threading.Thread(target=read, args=(t,), daemon=True) for t in range(threads)]
    for r in readers:
        r.start()
    start.wait()
    t0 = time.perf_counter()
    for r in readers:
        r.join()
    elapsed = time.perf_counter() - t0
    if failed:
        raise failed[0]
    return elapsed


def _checkpoint(args: Any, hf: Path, copies: float) -> None:
    want = {"shape": args.shape, "layers": args.layers, "scale": args.scale, "seed": args.model_seed}
    if (hf / "model.safetensors.index.json").exists():
        have = json.loads((hf / "synthetic.json").read_text())
        if any(have.get(k) != v for k, v in want.items()):
            raise ZipMoEError(f"{hf} holds a {({k: have.get(k) for k in want})} model, not {want}: "
                              "use another --workdir for another model")
        return
    shutil.rmtree(hf, ignore_errors=True)  # a killed build: start over
    cfg = scaled_config(args.shape, layers=args.layers, scale=args.scale)
    total = sum(s.nbytes for s in tensor_table(cfg))
    hf.parent.mkdir(parents=True, exist_ok=True)
    free = shutil.disk_usage(hf.parent).free
    if free < copies * total:
        raise ZipMoEError(f"{args.shape} with layers={args.layers} scale={args.scale} needs ~{copies * total / 1e9:.1f}"
                          f" GB in {hf.parent} (checkpoint, stores, offload folder), {free / 1e9:.1f} GB free: "
                          "use --layers, or fewer systems")
    build_synthetic(args.shape, hf, layers=args.layers, scale=args.scale, seed=args.model_seed,
                    workers=args.workers_total, progress=False)


def _store(hf: Path, dest: Path, coder: str, workers: int) -> None:
    if not (dest / "zipmoe.json").exists():
        convert(hf, dest, coder=coder, workers=workers, overwrite=dest.exists(), progress=False)


def prepare_workdir(args: Any, need_raw: bool, need_offload: bool = False,
                    need_gguf: bool = False) -> tuple[Setup, dict[str, Any]]:
    """Build/convert/measure what is missing; the Setup for every system and the model facts.

    need_raw: also the uncompressed store; need_offload: room for Accelerate's offload folder;
    need_gguf: llama.cpp's GGUF copy too, where a llama.cpp build is named (else its system reports why not).
    """
    work = Path(args.workdir)
    args.workers_total = (args.workers or default_workers()) + 1
    hf = work / "hf"
    _checkpoint(args, hf, 1.7 + need_raw + need_offload + need_gguf)  # checkpoint 1, Huffman store ~0.7, others ~1
    stores = {"huffman": work / "store-huffman"}
    if need_raw:
        stores["raw"] = work / "store-raw"
    for coder, dest in stores.items():
        _store(hf, dest, coder, args.workers_total)
    geos = {c: store_geometry(d, args.device) for c, d in stores.items()}
    geometry = {**geos["huffman"], "staging": max(g["staging"] for g in geos.values())}
    setup_file = work / "setup.json"
    measured = json.loads(setup_file.read_text()) if setup_file.exists() else {}
    if "disk_bytes_per_s" not in measured:
        measured["disk_bytes_per_s"] = disk_bandwidth(max(stores.values(), key=lambda d: (d / "experts.bin")
                                                          .stat().st_size) / "experts.bin")
        save_json(setup_file, measured)
    if need_gguf and not isinstance(found := llama_cpp_build(), str) and not gguf_path(work).is_file():
        # after the disk probe: with the conversion before it, the probe (which syncs first) measured 1.67 GB/s
        # against 2.0–2.4 in earlier sessions, and zipmoe then ran at 0.95× its "bound" (fifteenth session)
        seconds = convert_to_gguf(found[1], str(hf), gguf_path(work))
        os.sync()
        print(f"e2e: converted the checkpoint to {gguf_path(work)} in {seconds:.0f} s", flush=True)
    cfg = json.loads((hf / "config.json").read_text())
    eos = cfg.get("eos_token_id")
    setup = Setup(workdir=str(work), hf_dir=str(hf), stores={k: str(v) for k, v in stores.items()},
                  device=args.device, workers=args.workers or default_workers(),
                  disk_bytes_per_s=measured["disk_bytes_per_s"], routing_profile=routing_profile_for(args.shape),
                  seed=args.routing_seed,
                  pad_token_id=int(cfg.get("pad_token_id") or 0), experts_implementation=args.experts_implementation)
    model = {**json.loads((hf / "synthetic.json").read_text()), **{f"{k}_bytes": v for k, v in geometry.items()
                                                                  if k != "numel" and k != "entries"},
             "experts": geometry["entries"], "expert_numel": geometry["numel"], "model_type": cfg["model_type"]}
    info = {"config": cfg, "eos_ids": eos if isinstance(eos, list) else [eos] if eos is not None else [],
            "geometry": geometry, "model": model, "commit": commit()}
    return setup, info


def commit() -> str:
    """The source commit (with '+dirty' when tracked files changed). $ZIPMOE_COMMIT, when set, wins: the
    device machine's copy of the tree carries a stale .git, so its runs name the commit they were sent at."""
    if os.environ.get("ZIPMOE_COMMIT"):
        return os.environ["ZIPMOE_COMMIT"]
    root = Path(__file__).resolve().parents[4]
    try:
        head = subprocess.run(["git", "-C", str(root), "rev-parse", "--short=12", "HEAD"], capture_output=True,
                              text=True, timeout=10, check=True).stdout.strip()
        dirty = subprocess.run(["git", "-C", str(root), "status", "--porcelain", "--untracked-files=no"],
                               capture_output=True, text=True, timeout=10).stdout.strip()
        return head + ("+dirty" if dirty else "")
    except (OSError, subprocess.SubprocessError):
        return os.environ.get("ZIPMOE_COMMIT", "unknown")


def machine_info(device: str) -> dict[str, Any]:
    """What the numbers depend on: CPU, cores, RAM, GPU, library versions."""
    import torch
    import transformers

    cpu = next((line.split(":", 1)[1].strip() for line in _read("/proc/cpuinfo").splitlines()
                if line.startswith("model name")), platform.processor())
    mem = next((int(line.split()[1]) * 1024 for line in _read("/proc/meminfo").splitlines()
                if line.startswith("MemTotal:")), None)
    info = {"cpu": cpu, "cores": os.cpu_count(), "ram_bytes": mem, "platform": platform.platform(),
            "python": platform.python_version(), "torch": torch.__version__,
            "transformers": transformers.__version__, "device": device}
    if device.startswith("cuda") and torch.cuda.is_available():
        props = torch.cuda.get_device_properties(0)
        info.update(gpu=props.name, gpu_memory_bytes=props.total_memory)
    return info


def _read(path: str) -> str:
    try:
        return Path(path).read_text()
    except OSError:
        return ""
