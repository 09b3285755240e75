"""System "llama.cpp": llama.cpp's llama-server on a BF16 GGUF of the checkpoint, experts offloaded (issue 6).

bench stage. What users pick when a MoE model does not fit their GPU: dense weights and KV cache on the GPU
(`-ngl 999`), every layer's expert tensors left in the mmap'ed GGUF on the CPU (`--n-cpu-moe <layers>`),
where llama.cpp computes them. The mmap goes through the page cache, which the suite bounds with the same
cgroup v2 memory.max as Accelerate's (the server is a child of the run's process, so it is inside it).

Not like the other systems, and every record says so:
- routing is the model's own: llama.cpp's router cannot be replaced from outside, so the calibrated sampler
  does not drive it. Random-weight models route degenerately (a 25 % LRU cache keeps ~69 % of experts), which
  flatters any cache, the page cache included;
- times come from the server's own per-request timings (prompt_ms, predicted_ms), not from a per-step probe.
A batch of B prompts is B concurrent /completion requests to a server with B or more slots: llama.cpp
decodes its busy slots together, one token each per step.

Where llama.cpp comes from: `bash scripts/llama_cpp_build.sh SRC DEST` builds llama-server from the
llama-cpp-python sdist and links DEST/source to the source (for convert_hf_to_gguf.py); ZIPMOE_LLAMA_CPP=DEST
points the suite at it. The checkpoint has no tokenizer (prompts are token ids), so the GGUF gets a
placeholder vocabulary of the model's size: one token string per id, never used to tokenize.
"""

from __future__ import annotations

import contextlib
import json
import os
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from zipmoe.bench.baselines.base import Budget, HFSystem, Setup
from zipmoe.bench.metrics import gpu_bytes_of, lower_bounds, os_read_bytes, proc_number
from zipmoe.bench.prompts import Prompt
from zipmoe.errors import ZipMoEError

ENV = "ZIPMOE_LLAMA_CPP"  # a build folder of scripts/llama_cpp_build.sh
SLOTS = 16  # server slots: the largest batch the suite runs
SLOT_CONTEXT = 2048  # tokens per slot: the longest prompt (1024) + the most new tokens (128), with room
START_TIMEOUT_S = 600.0  # loading a GGUF of tens of GB through a bounded page cache is slow

# Runs convert_hf_to_gguf.py with every model class's set_vocab replaced by a placeholder BPE vocabulary
# (the synthetic checkpoint has no tokenizer). argv: script, checkpoint, out file.
_CONVERT = r"""
import runpy, sys
script, model, out = sys.argv[1:4]
sys.path.insert(0, str(__import__("pathlib").Path(script).parent))
from conversion import base

def placeholder_vocab(self):
    n = int(self.hparams["vocab_size"])
    w = self.gguf_writer
    w.add_tokenizer_model("gpt2")
    w.add_tokenizer_pre("default")
    w.add_token_list([f"<|t{i}|>" for i in range(n)])
    w.add_token_types([1] * n)  # normal
    w.add_token_merges(["<|t0|> <|t1|>"])  # llama.cpp's BPE loader wants at least one merge
    for key, add in (("bos_token_id", w.add_bos_token_id), ("eos_token_id", w.add_eos_token_id)):
        tid = self.hparams.get(key)
        if isinstance(tid, list):
            tid = tid[0] if tid else None
        if isinstance(tid, int) and 0 <= tid < n:
            add(tid)
    w.add_add_bos_token(False)

seen, todo = set(), [base.ModelBase]
while todo:
    cls = todo.pop()
    for sub in cls.__subclasses__():
        if sub not in seen:
            seen.add(sub)
            todo.append(sub)
            if "set_vocab" in vars(sub):
                sub.set_vocab = placeholder_vocab
base.TextModel.set_vocab = placeholder_vocab
sys.argv = [script, model, "--outtype", "bf16", "--outfile", out]
runpy.run_path(script, run_name="__main__")
"""


def llama_cpp_build() -> tuple[Path, Path] | str:
    """(llama-server, convert_hf_to_gguf.py) of the build ZIPMOE_LLAMA_CPP names, or why there is none."""
    root = os.environ.get(ENV)
    how = f"build it with `bash scripts/llama_cpp_build.sh <llama-cpp-python sdist> <dir>` and set {ENV}=<dir>"
    if not root:
        return f"not available: {ENV} is not set ({how})"
    server = Path(root) / "build" / "bin" / "llama-server"
    convert = Path(root) / "source" / "convert_hf_to_gguf.py"
    if not server.is_file() or not os.access(server, os.X_OK):
        return f"not available: no executable build/bin/llama-server under {ENV}={root} ({how})"
    if not convert.is_file():
        return f"not available: no source/convert_hf_to_gguf.py under {ENV}={root} ({how})"
    return server, convert


def convert_to_gguf(convert: Path, hf_dir: str, out: Path) -> float:
    """Write the checkpoint as a BF16 GGUF (atomically: a killed conversion leaves no file that looks done);
    the seconds it took."""
    out.parent.mkdir(parents=True, exist_ok=True)
    part = out.with_suffix(".gguf.part")
    t0 = time.perf_counter()
    done = subprocess.run([sys.executable, "-c", _CONVERT, str(convert), hf_dir, str(part)],
                          capture_output=True, text=True, check=False)
    if done.returncode != 0 or not part.is_file():
        part.unlink(missing_ok=True)
        raise ZipMoEError(f"convert_hf_to_gguf.py failed on {hf_dir} (exit {done.returncode}):\n"
                          f"{(done.stderr or done.stdout)[-3000:]}")
    os.replace(part, out)
    return time.perf_counter() - t0


def gguf_path(workdir: str | Path) -> Path:
    """Where the suite keeps a workdir's GGUF (made in step 1, bench/baselines/workdir.py)."""
    return Path(workdir) / "gguf" / "model-bf16.gguf"


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@dataclass
class LlamaCppSystem(HFSystem):
    name: str = "llama.cpp"
    label: str = "llama.cpp (experts offloaded; own routing)"
    page_cache: str = "see isolation"

    def unavailable(self) -> str | None:
        found = llama_cpp_build()
        return found if isinstance(found, str) else None

    def page_cache_files(self, setup: Setup) -> list[str]:
        return [str(gguf_path(setup.workdir))]

    def prepare(self, setup: Setup, budget: Budget) -> None:
        found = llama_cpp_build()
        if isinstance(found, str):
            raise ZipMoEError(found)
        server = found[0]
        self.setup = setup
        gguf = gguf_path(setup.workdir)
        if not gguf.is_file():
            raise ZipMoEError(f"no GGUF at {gguf}: `zipmoe bench e2e --systems llama.cpp` converts the checkpoint "
                              f"first, when {ENV} names a llama.cpp build")
        config = json.loads((Path(setup.hf_dir) / "config.json").read_text())
        layers = int(config["num_hidden_layers"])
        self.port = _free_port()
        cmd = [str(server), "-m", str(gguf), "--host", "127.0.0.1", "--port", str(self.port),
               "-np", str(SLOTS), "-c", str(SLOTS * SLOT_CONTEXT), "-t", str(os.cpu_count() or 1),
               "--no-webui"]
        env = dict(os.environ)
        if setup.device.startswith("cuda"):
            cmd += ["-ngl", "999", "--n-cpu-moe", str(layers)]
        else:
            # A CUDA build with -ngl 0 still sends large prompt matmuls to a visible GPU: hide it.
            cmd += ["-ngl", "0"]
            env["CUDA_VISIBLE_DEVICES"] = ""
        self.log_path = gguf.with_name(f"llama-server-{self.port}.log")
        self._log = self.log_path.open("w")
        self.proc = subprocess.Popen(cmd, stdout=self._log, stderr=subprocess.STDOUT, env=env)
        self._wait_ready()
        hidden = "" if setup.device.startswith("cuda") else "CUDA_VISIBLE_DEVICES= "
        self.info = {"command": hidden + " ".join(cmd), "gguf_bytes": gguf.stat().st_size,
                     "routing": "the model's own (llama.cpp's router cannot take the calibrated sampler)",
                     "timing": "llama-server per-request timings"}
        self.routing = None

    def _wait_ready(self) -> None:
        deadline = time.time() + START_TIMEOUT_S
        while time.time() < deadline:
            if self.proc.poll() is not None:
                raise ZipMoEError(f"llama-server exited with status {self.proc.returncode} while loading: "
                                  f"{self._log_tail()}")
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{self.port}/health", timeout=5) as r:
                    if r.status == 200:
                        return
            except (urllib.error.URLError, OSError):
                pass
            time.sleep(0.5)
        raise ZipMoEError(f"llama-server was not ready after {START_TIMEOUT_S:.0f} s: {self._log_tail()}")

    def _log_tail(self) -> str:
        self._log.flush()
        return self.log_path.read_text(errors="replace")[-2000:]

    def _complete(self, prompt: Prompt, new_tokens: int) -> dict[str, Any]:
        body = {"prompt": list(prompt.token_ids), "n_predict": new_tokens, "ignore_eos": True,
                "temperature": 0.0, "cache_prompt": False}
        req = urllib.request.Request(f"http://127.0.0.1:{self.port}/completion", data=json.dumps(body).encode(),
                                     headers={"Content-Type": "application/json"})
        with urllib.request.urlopen(req, timeout=START_TIMEOUT_S) as r:
            return json.loads(r.read())

    def run(self, prompts: list[Prompt], new_tokens: int, deadline: float | None = None) -> dict[str, Any]:
        """B concurrent requests, each exactly new_tokens long; one record in batch_record's layout.

        Times are the server's: TTFT is the slowest row's prompt time, TPOT the median row's time per
        generated token, the decode wall the slowest row's generation time. `deadline` is not checked: a
        request runs to its end, so a record is never partial (the suite's estimate before each batch and the
        child process's timeout keep a call inside its time)."""
        assert self.setup is not None, "prepare() first"
        if len(prompts) > SLOTS:
            raise ZipMoEError(f"llama.cpp system runs batches of at most {SLOTS} prompts, got {len(prompts)}")
        before = os_read_bytes(self.proc.pid)
        t0 = time.perf_counter()
        with ThreadPoolExecutor(len(prompts)) as pool:
            answers = list(pool.map(lambda p: self._complete(p, new_tokens), prompts))
        wall = time.perf_counter() - t0
        after = os_read_bytes(self.proc.pid)
        timings = [a["timings"] for a in answers]
        generated = [int(t["predicted_n"]) for t in timings]
        if any(n != new_tokens for n in generated):
            raise ZipMoEError(f"llama-server generated {generated} tokens per row, asked for {new_tokens}")
        rows = len(prompts)
        decode_wall = max(t["predicted_ms"] for t in timings) / 1e3
        per_token = sorted(t["predicted_per_token_ms"] / 1e3 for t in timings)
        bytes_read = after - before if before is not None and after is not None else None
        rec: dict[str, Any] = {
            "rows": rows, "prompt_lens": [len(p) for p in prompts], "new_tokens": new_tokens,
            "tokens": rows * new_tokens, "e2e_s": wall, "ttft_s": max(t["prompt_ms"] for t in timings) / 1e3,
            "tpot_s": per_token[len(per_token) // 2], "decode_s_wall": decode_wall,
            "tok_per_s": rows * new_tokens / wall, "decode_tok_per_s": sum(generated) / decode_wall,
            "bytes_read": bytes_read, "os_read_bytes": bytes_read, "prefill_bytes_read": None,
            "decode_step_bytes": None, "decode_s": None, "stall_s": None, "layer_s": None,
            "own_routing": True, "server_timings": timings,
            "server_peak_rss_bytes": proc_number("status", "VmHWM", self.proc.pid, 1024),
        }
        rec.update(lower_bounds(rec, self.setup.disk_bytes_per_s, self.setup.workers))
        rec["aborted"] = False
        return rec

    def reset_peak_memory(self) -> None:
        # As bench/metrics.PeakMemory does for this process: VmHWM restarts from the current RSS. Where the
        # write is refused, VmHWM stays the server's lifetime peak, its load included.
        with contextlib.suppress(OSError):
            Path(f"/proc/{self.proc.pid}/clear_refs").write_text("5")

    def peak_memory(self) -> dict[str, Any]:
        """The server's peaks, not the harness's: its VmHWM and, on CUDA, the GPU memory nvidia-smi says it holds
        (llama.cpp allocates its buffers at load). nvidia-smi counts the CUDA context (~0.5 GiB), which torch's
        allocator peak of the in-process systems leaves out."""
        out: dict[str, Any] = {"peak_host_rss": proc_number("status", "VmHWM", self.proc.pid, 1024),
                               "host_rss_method": "llama-server VmHWM"}
        if self.setup is not None and self.setup.device.startswith("cuda"):
            gpu = gpu_bytes_of(self.proc.pid)
            out.update(peak_gpu_allocated=gpu, peak_gpu_reserved=gpu,
                       gpu_method="llama-server, nvidia-smi used_memory (CUDA context included)")
        return out

    def close(self) -> None:
        proc = getattr(self, "proc", None)
        if proc is not None and proc.poll() is None:
            proc.terminate()
            try:
                proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
        if getattr(self, "_log", None) is not None:
            self._log.close()
        self.proc = None
        super().close()
