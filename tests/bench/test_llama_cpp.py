"""The e2e suite's llama.cpp system: finding a build, converting a checkpoint to GGUF, serving batches.

The first tests run everywhere (CI has no llama.cpp build). Those marked llama_cpp need the build that
ZIPMOE_LLAMA_CPP names (`bash scripts/llama_cpp_build.sh <sdist> <dir>`) and run with `pytest -m llama_cpp`
where it exists (the dev machine and the device); CI deselects them like the GPU tests.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from types import ModuleType, SimpleNamespace

import pytest

from zipmoe.bench import e2e, report
from zipmoe.bench.baselines import Budget, Setup
from zipmoe.bench.baselines.llama_cpp import ENV, LlamaCppSystem, convert_to_gguf, llama_cpp_build
from zipmoe.bench.metrics import proc_number
from zipmoe.bench.prompts import Prompt
from zipmoe.errors import ZipMoEError

ARGS = ["--isolation", "inline", "--layers", "2", "--scale", "0.25", "--budgets", "0.25", "--batches", "1", "2",
        "--prompts", "2", "--max-prompt-len", "16", "--new-tokens", "3", "--device", "cpu", "--workers", "1"]


def test_a_missing_or_incomplete_build_is_reported_with_how_to_make_one(tmp_path: Path,
                                                                      monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv(ENV, raising=False)
    assert "is not set" in llama_cpp_build() and "scripts/llama_cpp_build.sh" in llama_cpp_build()
    monkeypatch.setenv(ENV, str(tmp_path))
    assert "no executable build/bin/llama-server" in llama_cpp_build()
    server = tmp_path / "build" / "bin" / "llama-server"
    server.parent.mkdir(parents=True)
    server.write_text("#!/bin/sh\n")
    server.chmod(0o755)
    assert "no source/convert_hf_to_gguf.py" in llama_cpp_build()
    assert LlamaCppSystem().unavailable() == llama_cpp_build()


def test_a_failed_conversion_raises_and_leaves_no_gguf(tmp_path: Path) -> None:
    script = tmp_path / "llama.cpp" / "convert_hf_to_gguf.py"  # no conversion/ package beside it
    script.parent.mkdir()
    script.write_text("raise SystemExit('unreachable')\n")
    out = tmp_path / "gguf" / "model-bf16.gguf"
    with pytest.raises(ZipMoEError, match=r"convert_hf_to_gguf\.py failed"):
        convert_to_gguf(script, str(tmp_path), out)
    assert not out.exists() and not list(out.parent.glob("*.part"))


def test_memory_peaks_are_the_servers_not_the_harness_process(tmp_path: Path,
                                                                monkeypatch: pytest.MonkeyPatch) -> None:
    """The table once showed the harness's 0.8 GiB RSS and 0 GPU bytes for a llama-server holding gigabytes."""
    server = subprocess.Popen([sys.executable, "-c", "import sys, time; b = bytearray(64 << 20); print('up'); "
                               "sys.stdout.flush(); sys.stdin.readline(); del b; print('freed'); "
                               "sys.stdout.flush(); time.sleep(60)"],
                              stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    try:
        assert server.stdin is not None and server.stdout is not None and server.stdout.readline() == "up\n"
        smi = tmp_path / "nvidia-smi"  # lists another process and the server, as `--format=csv,noheader,nounits`
        smi.write_text(f"#!/bin/sh\necho '1, 999'\necho '{server.pid}, 1536'\n")
        smi.chmod(0o755)
        monkeypatch.setenv("PATH", f"{tmp_path}:{os.environ['PATH']}")
        system = LlamaCppSystem()
        system.proc, system.setup = server, SimpleNamespace(device="cuda")
        peaks = system.peak_memory()
        server_hwm = proc_number("status", "VmHWM", server.pid, 1024)  # it may still grow by a page or two
        assert server_hwm is not None and abs(peaks["peak_host_rss"] - server_hwm) < 1 << 20
        assert peaks["peak_host_rss"] >= 64 << 20
        assert peaks["peak_host_rss"] != proc_number("status", "VmHWM", scale=1024)
        assert peaks["peak_gpu_reserved"] == peaks["peak_gpu_allocated"] == 1536 << 20
        smi.write_text("#!/bin/sh\necho '1, 999'\n")  # the server not listed (another PID namespace): unknown
        assert system.peak_memory()["peak_gpu_reserved"] is None
        system.setup = SimpleNamespace(device="cpu")
        assert "peak_gpu_reserved" not in system.peak_memory()
        server.stdin.write("\n")  # the server frees its 64 MiB: a new interval's peak no longer counts them
        server.stdin.flush()
        assert server.stdout.readline() == "freed\n"
        system.reset_peak_memory()
        assert system.peak_memory()["peak_host_rss"] < 48 << 20
    finally:
        server.kill()
        server.wait()
        for pipe in (server.stdin, server.stdout):
            if pipe is not None:
                pipe.close()


@pytest.fixture(scope="module")
def suite(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """One suite run of llama.cpp next to transformers, on a tiny model on the CPU."""
    found = llama_cpp_build()
    assert not isinstance(found, str), found  # selected with -m llama_cpp: a missing build is a failure
    work = tmp_path_factory.mktemp("e2e")
    assert e2e.main(["--workdir", str(work), "--systems", "llama.cpp,transformers", "--report", *ARGS]) == 0
    return work


@pytest.fixture(scope="module")
def gguf_module(suite: Path) -> ModuleType:
    """llama.cpp's own GGUF reader (gguf-py), from the build's source."""
    found = llama_cpp_build()
    assert not isinstance(found, str), found
    sys.path.insert(0, str(found[1].parent / "gguf-py"))
    try:
        import gguf
    finally:
        sys.path.pop(0)
    return gguf


@pytest.mark.llama_cpp
def test_the_gguf_has_the_models_tensors_and_a_placeholder_vocabulary(
        suite: Path, gguf_module: ModuleType) -> None:
    gguf = gguf_module
    reader = gguf.GGUFReader(str(suite / "gguf" / "model-bf16.gguf"))
    config = json.loads((suite / "hf" / "config.json").read_text())
    assert len(reader.fields["tokenizer.ggml.tokens"].data) == config["vocab_size"]
    names = {t.name for t in reader.tensors}
    for layer in range(config["num_hidden_layers"]):
        assert f"blk.{layer}.ffn_gate_exps.weight" in names and f"blk.{layer}.ffn_down_shexp.weight" in names
    experts = next(t for t in reader.tensors if t.name == "blk.0.ffn_up_exps.weight")
    assert experts.tensor_type == gguf.GGMLQuantizationType.BF16  # unquantized, like every other system
    assert list(experts.shape) == [config["hidden_size"], config["moe_intermediate_size"], config["num_experts"]]


@pytest.mark.llama_cpp
def test_the_suite_runs_llama_cpp_at_each_batch_size_and_reports_it(suite: Path) -> None:
    run = {d["system"]: d for d in report.load_runs(suite)}["llama.cpp"]
    assert run["status"] == "complete", run.get("reason")
    assert "--n-cpu-moe" not in run["system_info"]["command"]  # on a CPU every weight is on the CPU already
    for batch in ("1", "2"):
        for rec in run["batches"][batch]["records"]:
            assert rec["rows"] == int(batch) and rec["new_tokens"] == 3 and rec["own_routing"]
            assert 0 < rec["ttft_s"] <= rec["e2e_s"] and 0 < rec["tpot_s"] < rec["e2e_s"]
            assert [t["predicted_n"] for t in rec["server_timings"]] == [3] * int(batch)
            assert [t["prompt_n"] for t in rec["server_timings"]] == rec["prompt_lens"]
            assert rec["server_peak_rss_bytes"] > (suite / "gguf" / "model-bf16.gguf").stat().st_size // 4
        assert run["batches"][batch]["summary"]["tok_per_s"] > 0
    gguf_bytes = (suite / "gguf" / "model-bf16.gguf").stat().st_size
    assert f"evicted with posix_fadvise before the run ({gguf_bytes} B;" in run["page_cache"]  # its file, not hf/
    text = (suite / "report" / "e2e.md").read_text()
    assert "| llama.cpp (experts offloaded; own routing) |" in text and "except llama.cpp" in text


@pytest.mark.llama_cpp
def test_close_stops_the_server_and_a_batch_over_the_slots_is_refused(suite: Path) -> None:
    setup = Setup(workdir=str(suite), hf_dir=str(suite / "hf"), stores={}, device="cpu", workers=1,
                  disk_bytes_per_s=1e9, routing_profile="qwen1.5-moe-a2.7b", seed=0, pad_token_id=0)
    system = LlamaCppSystem()
    system.prepare(setup, Budget(None, None))  # on the suite's GGUF
    pid = system.proc.pid
    try:
        with pytest.raises(ZipMoEError, match="at most 16 prompts"):
            system.run([Prompt(i, (5, 6, 7), 2) for i in range(17)], 2)
        assert system.run([Prompt(0, (5, 6, 7), 2)], 2)["tokens"] == 2
    finally:
        system.close()
    assert not Path(f"/proc/{pid}").exists() or "Z (zombie)" in Path(f"/proc/{pid}/status").read_text()


def test_a_cgroup_run_first_evicts_the_files_the_system_reads_through_the_page_cache(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Pages cached before the run stay charged to the suite, not to the run's new cgroup, so without the
    eviction llama.cpp served its whole GGUF from memory (0 bytes read on the device) under a 25 % budget."""
    gguf = tmp_path / "gguf" / "model-bf16.gguf"
    gguf.parent.mkdir()
    gguf.write_bytes(b"\0" * 8192)
    evicted, made = [], []

    class FakeCgroup:  # CI cannot make cgroups; only the order of what _isolation does is under test
        def __init__(self, limit: int) -> None:
            made.append((limit, list(evicted)))

    monkeypatch.setattr(e2e, "cgroup_unavailable", lambda: None)
    monkeypatch.setattr(e2e, "MemoryCgroup", FakeCgroup)
    monkeypatch.setattr(e2e, "evict_files", lambda paths: evicted.extend(paths) or 8192)
    setup = Setup(workdir=str(tmp_path), hf_dir=str(tmp_path / "hf"), stores={}, device="cpu", workers=1,
                  disk_bytes_per_s=1e9, routing_profile="qwen1.5-moe-a2.7b", seed=0, pad_token_id=0)
    note, cgroup = e2e._isolation("llama.cpp", "auto", Budget(0.25, 1 << 30), setup, 1 << 20)
    assert isinstance(cgroup, FakeCgroup) and made == [((1 << 30) + (1 << 20), [str(gguf)])]
    assert "cgroup v2 memory.max" in note and "evicted with posix_fadvise before the run (8192 B)" in note
    evicted.clear()
    e2e._isolation("accelerate", "auto", Budget(0.25, 1 << 30), setup, 1 << 20)
    assert evicted == [setup.hf_dir]


def test_the_report_compares_llama_cpp_with_zipmoe_and_says_its_routing_is_its_own() -> None:
    def row(system: str, tpot: float, rate: float) -> dict:
        return {"system": system, "budget": 0.25, "batch": 1, "status": "complete",
                "tpot_s": {"median": tpot, "p10": tpot, "p90": tpot}, "tok_per_s": rate}

    lines = report.targets([row("zipmoe", 0.1, 8.0), row("llama.cpp", 0.08, 6.0)])
    (line,) = [x for x in lines if "llama.cpp ÷ zipmoe" in x]
    assert "TPOT **0.80×**" in line and "**0.75×**" in line and "own routing" in line
    assert not [x for x in report.targets([row("zipmoe", 0.1, 8.0)]) if "llama.cpp" in x]
