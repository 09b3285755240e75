"""`zipmoe bench e2e` end to end on a tiny model on CPU: builder, prompts, systems, metrics, report.

One module-scoped suite run (4 systems × one budget × batch 1 and 2, 3 new tokens) feeds most
tests; the rest are pure (metrics) or reuse the same workdir (resume, report).
"""

from __future__ import annotations

import argparse
import json
import math
import shutil
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from tests.tiny_models import build_tiny_model

from zipmoe.bench import e2e, report
from zipmoe.bench.baselines import Budget, Setup, hook_routers, make_system, routers
from zipmoe.bench.metrics import band, batch_record, nonfinite_paths, summarize
from zipmoe.bench.prompts import prompt_set
from zipmoe.cli.main import main as cli_main
from zipmoe.errors import ZipMoEError

ARGS = ["--isolation", "inline", "--layers", "2", "--scale", "0.25", "--budgets", "0.25", "--batches", "1", "2",
        "--prompts", "2", "--max-prompt-len", "16", "--new-tokens", "3", "--device", "cpu", "--workers", "1"]
SYSTEMS = ("zipmoe", "uncompressed", "accelerate", "transformers")


@pytest.fixture(scope="module")
def suite(tmp_path_factory: pytest.TempPathFactory) -> Path:
    work = tmp_path_factory.mktemp("e2e")
    assert e2e.main(["--workdir", str(work), "--systems", ",".join(SYSTEMS), *ARGS]) == 0
    return work


def test_workdir_holds_model_stores_and_one_json_per_run(suite: Path) -> None:
    assert (suite / "hf" / "model.safetensors.index.json").exists()
    assert (suite / "store-huffman" / "zipmoe.json").exists() and (suite / "store-raw" / "zipmoe.json").exists()
    assert json.loads((suite / "setup.json").read_text())["disk_bytes_per_s"] > 0
    runs = report.load_runs(suite)
    assert sorted(d["system"] for d in runs) == sorted(SYSTEMS)
    for d in runs:
        assert d["status"] == "complete", (d["system"], d.get("reason"))
        assert d["commit"] and d["command"].startswith("zipmoe bench e2e") and d["machine"]["cores"]
        assert set(d["batches"]) == {"1", "2"}
    leftovers = [p.name for p in suite.glob("runs/*/_warm-process*")]
    assert not leftovers, "the untimed process warm-up (--warm-process, on by default) left a file behind"
    for d in runs:  # every run came after the warm-up, which covered every prompt group
        (warm,) = d["warm_process"]
        assert warm["status"] == "complete" and warm["groups_covered"] == warm["groups"] == {"1": 2, "2": 1}


def test_a_resumed_run_keeps_each_calls_warm_up_record(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("ZIPMOE_LLAMA_CPP", raising=False)  # no llama.cpp build named: unavailable
    path = tmp_path / "run.json"
    path.write_text(json.dumps({"batches": {}, "warm_process": [{"call": 1}]}))
    spec = {"run_path": str(path), "system": "llama.cpp", "warm_process": {"call": 2}}  # unavailable here
    assert e2e.execute_run(spec) == "unavailable"
    assert json.loads(path.read_text())["warm_process"] == [{"call": 1}, {"call": 2}]


def _warm_inputs(tmp_path: Path) -> tuple[argparse.Namespace, Setup]:
    """Arguments and a setup for calling e2e._warm_process directly (execute_run patched): the replay on the
    named system (--warm-process 1); the default clone has its own test below."""
    parser = argparse.ArgumentParser()
    e2e.configure(parser)
    args = parser.parse_args(["--workdir", str(tmp_path), *ARGS, "--warm-process", "1"])
    setup = Setup(workdir=str(tmp_path), hf_dir="hf", stores={}, device="cpu", workers=1, disk_bytes_per_s=1.0,
                  routing_profile="qwen1.5-moe-a2.7b", seed=0, pad_token_id=0)
    return args, setup


def test_process_warm_up_replays_the_measured_workload(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """CUDA attention builds a graph per new (batch, query, key) length: the warm-up must meet every shape the
    measured runs will, so it replays the same prompts, batch sizes and token counts (not a short prefix)."""
    specs: list[dict] = []
    monkeypatch.setattr(e2e, "execute_run", lambda spec: specs.append(spec) or "complete")
    args, setup = _warm_inputs(tmp_path)
    prompts = {"vocab_size": 100, "n": 2, "seed": 0}
    e2e._warm_process("zipmoe", setup, Budget(frac=0.25, nbytes=1 << 30), prompts, args, 100, 1e12, tmp_path,
                      args.prompts, args.new_tokens)
    (spec,) = specs
    assert (spec["prompts"], spec["prompt_count"], spec["batches"], spec["new_tokens"]) == (
        prompts, args.prompts, args.batches, args.new_tokens)
    assert not list(tmp_path.iterdir()), "the scratch run file is removed"


def test_a_warm_up_cut_short_says_which_prompt_groups_it_covered(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                                 capsys: pytest.CaptureFixture) -> None:
    """A replay stopped at its cap leaves the first system's remaining groups cold; the runs must say so."""
    def partial(spec: dict) -> str:  # the replay reached the deadline after one batch-1 group of two
        Path(spec["run_path"]).write_text(json.dumps({"batches": {"1": {"records": [{}]}}}))
        return "partial"

    monkeypatch.setattr(e2e, "execute_run", partial)
    args, setup = _warm_inputs(tmp_path)
    record = e2e._warm_process("zipmoe", setup, Budget(frac=0.25, nbytes=1 << 30), {"n": 2}, args, 100, 1e12,
                               tmp_path, args.prompts, args.new_tokens)
    assert record["groups"] == {"1": 2, "2": 1} and record["groups_covered"] == {"1": 1, "2": 0}
    assert "WARNING the warm-up stopped at its cap" in capsys.readouterr().out
    assert not list(tmp_path.iterdir()), "the scratch run file is removed"
    assert record["status"] == "partial"
    runs = [{"system": "zipmoe", "warm_process": [record]}, {"system": "uncompressed", "warm_process": [record]}]
    text = report.markdown(runs)
    assert text.count("Process warm-up cut short") == 1 and "zipmoe (partial): {'1': 1, '2': 0} of" in text
    record = {**record, "groups_covered": record["groups"]}
    assert "cut short" not in report.markdown([{"system": "zipmoe", "warm_process": [record]}])


def test_a_failed_warm_up_is_not_blamed_on_the_deadline(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                        capsys: pytest.CaptureFixture) -> None:
    monkeypatch.setattr(e2e, "execute_run", lambda spec: "failed")
    args, setup = _warm_inputs(tmp_path)
    record = e2e._warm_process("zipmoe", setup, Budget(frac=0.25, nbytes=1 << 30), {"n": 2}, args, 100, 1e12,
                               tmp_path, args.prompts, args.new_tokens)
    out = capsys.readouterr().out
    assert record["status"] == "failed" and "ended failed" in out and "larger --deadline" not in out


def test_the_process_warm_up_gets_a_quarter_of_the_deadline(suite: Path, tmp_path: Path,
                                                            monkeypatch: pytest.MonkeyPatch) -> None:
    """A full replay given the whole deadline would leave a resumed call no time to measure, forever."""
    work = tmp_path / "w"
    shutil.copytree(suite, work, ignore=shutil.ignore_patterns("runs"))
    calls: list[tuple[str, float]] = []
    monkeypatch.setattr(e2e, "_warm_process", lambda name, *a: calls.append((name, a[-2])))
    args = [a if a != "3" else "2" for a in ARGS]  # other new-token count: fresh runs, not "skipped (done)"
    t0 = time.time()
    assert e2e.main(["--workdir", str(work), "--systems", "accelerate,zipmoe", "--deadline", "400", *args]) == 0
    (name, until), = calls
    assert name == "zipmoe", "the warm-up replays a system that runs in this process, not one isolated from it"
    assert until <= t0 + 0.25 * 400 + 5


def test_every_system_generates_the_same_tokens_and_every_metric_is_finite(suite: Path) -> None:
    runs = report.load_runs(suite)
    for d in runs:
        assert nonfinite_paths(d) == [], d["system"]
        for batch, sec in d["batches"].items():
            assert [r["tokens"] for r in sec["records"]] == [int(batch) * 3] * (2 // int(batch))
            s = sec["summary"]
            assert s["ttft_s"]["median"] > 0 and s["tpot_s"]["median"] > 0 and s["tok_per_s"] > 0
            assert sec["peak_host_rss"] > 0
    # the same prompts in every system: lengths per batch agree
    lens = {d["system"]: [r["prompt_lens"] for r in d["batches"]["1"]["records"]] for d in runs}
    assert len({json.dumps(v) for v in lens.values()}) == 1


def test_zipmoe_reads_fewer_bytes_than_uncompressed_for_the_same_tokens(suite: Path) -> None:
    by = {d["system"]: d for d in report.load_runs(suite)}
    z, u = by["zipmoe"], by["uncompressed"]
    assert z["memory_budget"] == u["memory_budget"] == by["accelerate"]["memory_budget"]
    for batch in ("1", "2"):
        zs, us = z["batches"][batch]["summary"], u["batches"][batch]["summary"]
        assert zs["tokens"] == us["tokens"]
        assert 0 < zs["bytes_read"] < us["bytes_read"]
        for s in (zs, us):
            assert math.isclose(sum(s["hit_rate"].values()), 1.0)
            assert 0 <= s["io_stall_share"] <= 1 and s["bound_ratio"] >= 1.0
    assert z["page_cache"] == "O_DIRECT" and z["system_info"]["direct_io"]
    assert u["system_info"]["pools"]["F"] > 0 and u["system_info"]["pools"]["C"] == 0
    assert "disk" in by["accelerate"]["system_info"]["device_map_modules"]  # it really offloads
    assert by["accelerate"]["page_cache"]  # says how the page cache was handled


def test_rerun_skips_complete_runs_and_resumes_a_partial_one(suite: Path) -> None:
    path = next(suite.glob("runs/*/zipmoe__0.25.json"))
    doc = json.loads(path.read_text())
    doc["status"] = "partial"
    del doc["batches"]["2"]
    doc["batches"]["1"]["records"] = doc["batches"]["1"]["records"][:1]
    path.write_text(json.dumps(doc))
    others = {p: p.stat().st_mtime_ns for p in suite.glob("runs/*/*.json") if p != path}
    resume = ["--workdir", str(suite), "--systems", ",".join(SYSTEMS), *ARGS, "--deadline", "500"]
    assert e2e.main(resume) == 0
    after = json.loads(path.read_text())
    assert after["status"] == "complete" and len(after["batches"]["1"]["records"]) == 2
    assert after["batches"]["1"]["records"][0] == doc["batches"]["1"]["records"][0]  # kept, not redone
    assert {p: p.stat().st_mtime_ns for p in others} == others
    # the run names every call that worked on it, and so does the report's list of commands
    first, second = after["commands"]
    assert second == "zipmoe bench e2e " + " ".join(resume) and first != second
    text = report.markdown(report.load_runs(suite))
    assert f"    {first}" in text and f"    {second}" in text


def test_a_later_call_asking_for_another_batch_size_adds_it_to_a_complete_run(suite: Path, tmp_path: Path) -> None:
    """Runs are one file per system × budget: a call with --batches 2 after one with --batches 1 must measure
    batch 2, not skip the run as done (on the device it did, 15 s of nothing, fourteenth session)."""
    work = tmp_path / "e2e"
    shutil.copytree(suite, work, ignore=shutil.ignore_patterns("runs"))
    at = ARGS.index("--batches")
    assert ARGS[at + 1 : at + 3] == ["1", "2"]
    first = ARGS[: at + 2] + ARGS[at + 3 :]  # --batches 1
    assert e2e.main(["--workdir", str(work), "--systems", "zipmoe", *first]) == 0
    path = next(work.glob("runs/*/zipmoe__0.25.json"))
    before = json.loads(path.read_text())
    assert before["status"] == "complete" and set(before["batches"]) == {"1"}
    assert e2e.main(["--workdir", str(work), "--systems", "zipmoe", *ARGS]) == 0  # --batches 1 2
    after = json.loads(path.read_text())
    assert after["status"] == "complete" and set(after["batches"]) == {"1", "2"}
    assert after["batches"]["1"] == before["batches"]["1"], "the batch already measured was redone"
    assert len(after["batches"]["2"]["records"]) == 1 and len(after["commands"]) == 2
    mtime = path.stat().st_mtime_ns
    assert e2e.main(["--workdir", str(work), "--systems", "zipmoe", *ARGS]) == 0  # nothing left: skipped
    assert path.stat().st_mtime_ns == mtime


def test_system_interface_and_deadline_stop(suite: Path) -> None:
    setup = Setup(workdir=str(suite), hf_dir=str(suite / "hf"), stores={"huffman": str(suite / "store-huffman")},
                  device="cpu", workers=1, disk_bytes_per_s=1e9, routing_profile="qwen1.5-moe-a2.7b", seed=0,
                  pad_token_id=0)
    prompts = prompt_set(1000, 2, max_len=12)
    system = make_system("zipmoe")
    system.prepare(setup, Budget(None, None))
    try:
        resident = system.model.zipmoe_engine.resident
        done = system.run(prompts, 4)
        stopped = system.run(prompts, 4, deadline=time.time())  # already past: stops after the first token
    finally:
        system.close()
    assert not done["aborted"] and done["new_tokens"] == 4 and done["tokens"] == 8
    assert stopped["aborted"] and stopped["new_tokens"] == 1
    # everything fits: load() preloaded every expert and the model's own kernels run on the F pool
    assert resident and done["hits"]["MISS"] == 0 and done["bytes_read"] == 0


def test_report_writes_plots_and_a_table_naming_every_system(suite: Path, tmp_path: Path) -> None:
    md = tmp_path / "BENCHMARKS.md"
    md.write_text("# Benchmarks\n\nkept text\n")
    assert e2e.main(["--workdir", str(suite), "--no-run", "--report", "--benchmarks-md", str(md),
                     "--json", str(tmp_path / "all.json")]) == 0
    for name in report.PLOTS:
        png = (suite / "report" / name).read_bytes()
        assert png[:8] == b"\x89PNG\r\n\x1a\n" and len(png) > 5000
    text = (suite / "report" / "e2e.md").read_text()
    for label in ("zipmoe", "uncompressed LRU", "HF Accelerate offload", "transformers (all on device)"):
        assert f"| {label} |" in text
    assert "Commit:" in text and "zipmoe bench e2e" in text and "Against the targets" in text
    assert "- zipmoe: workers" in text and "- uncompressed: workers" in text  # on a CPU the workers merge
    report.write_report(report.load_runs(suite), suite / "report", str(md))  # splice twice: one section
    body = md.read_text()
    assert body.startswith("# Benchmarks\n\nkept text") and body.count(report.BEGIN) == 1
    assert len(json.loads((tmp_path / "all.json").read_text())["runs"]) == len(SYSTEMS)


def test_optional_systems_report_not_available_cleanly(suite: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("ZIPMOE_LLAMA_CPP", raising=False)  # no llama.cpp build named
    assert e2e.main(["--workdir", str(suite), "--systems", "llama.cpp,dfloat11", *ARGS]) == 0
    docs = {d["system"]: d for d in report.load_runs(suite)}
    for name in ("llama.cpp", "dfloat11"):
        assert docs[name]["status"] == "unavailable" and "not available" in docs[name]["reason"]
    assert "Systems that did not run" in report.markdown(report.load_runs(suite))


def test_cli_dispatch_and_bad_input(tmp_path: Path) -> None:
    with pytest.raises(SystemExit) as exc:
        cli_main(["bench", "e2e", "--help"])
    assert exc.value.code == 0
    assert cli_main(["bench", "e2e", "--workdir", str(tmp_path), "--systems", "nope"]) == 2
    with pytest.raises(ZipMoEError, match="budgets"):
        e2e._budgets(["1.5"])
    with pytest.raises(ZipMoEError, match="unknown system"):
        make_system("deepspeed")


def test_a_batch_sections_peaks_keep_the_largest_and_an_unknown_one_erases_nothing() -> None:
    sec: dict = {}
    e2e.merge_peaks(sec, {"peak_host_rss": 5, "peak_gpu_reserved": None, "host_rss_method": "VmHWM"})
    e2e.merge_peaks(sec, {"peak_host_rss": 3, "peak_gpu_reserved": 7, "host_rss_method": "VmHWM"})
    e2e.merge_peaks(sec, {"peak_host_rss": None, "peak_gpu_reserved": None})  # nvidia-smi missed this group
    assert sec == {"peak_host_rss": 5, "peak_gpu_reserved": 7, "host_rss_method": "VmHWM"}


def test_metrics_from_known_steps() -> None:
    base = {"bytes_read": 100, "decode_s": 0.0, "stall_s": 0.0, "layer_s": 0.0, "io_busy_s": 0.0,
            "hits": {"F": 0, "C": 0, "S": 0, "E": 0, "MISS": 0}, "os_read_bytes": 7}
    steps = []
    for i, (s, b) in enumerate([(2.0, 1000), (0.5, 300), (0.7, 100)]):
        prev = steps[-1] if steps else base
        steps.append({"s": s, "bytes_read": prev["bytes_read"] + b, "decode_s": prev["decode_s"] + 0.4,
                      "stall_s": prev["stall_s"] + 0.1, "layer_s": prev["layer_s"] + 0.2, "io_busy_s": 0.0,
                      "hits": {**prev["hits"], "C": prev["hits"]["C"] + i, "MISS": prev["hits"]["MISS"] + 1},
                      "os_read_bytes": 7})
    rec = batch_record(base, steps, rows=2, prompt_lens=[5, 9], wall_s=4.0, disk_bytes_per_s=100.0, workers=2)
    assert rec["tokens"] == 6 and rec["ttft_s"] == 2.0 and rec["tpot_s"] == pytest.approx(0.6)
    assert rec["bytes_read"] == 1400 and rec["prefill_bytes_read"] == 1000 and rec["decode_step_bytes"] == 200
    assert rec["io_bound_s"] == pytest.approx(14.0) and rec["decode_bound_s"] == pytest.approx(0.6)
    assert rec["bound_s"] == pytest.approx(14.0) and rec["bound_ratio"] == pytest.approx(4.0 / 14.0)
    assert rec["decode_hits"] == {"F": 0, "C": 3, "S": 0, "E": 0, "MISS": 2}
    assert rec["decode_stall_s"] == pytest.approx(0.2) and rec["os_read_bytes"] == 0
    s = summarize([rec, {**rec, "e2e_s": 8.0, "tpot_s": 1.0}])
    assert s["tokens"] == 12 and s["tok_per_s"] == pytest.approx(1.0)
    assert s["bytes_per_token"] == pytest.approx(1400 / 6)
    assert s["hit_rate"]["C"] == pytest.approx(3 / 6) and s["io_stall_share"] == pytest.approx(0.5)
    assert s["tpot_s"]["median"] == pytest.approx(0.8) and s["decode_tok_per_s"] == pytest.approx(8 / 2.4)
    assert band([1.0, None, float("nan")]) == {"median": 1.0, "p10": 1.0, "p90": 1.0}
    assert nonfinite_paths({"a": [1.0, float("inf")]}) == [".a[1]"]


class _FixedRouting:
    """Stands in for the sampler: expert (layer + token + j) % E for slot j, recording each call."""

    def __init__(self, num_experts: int, top_k: int):
        self.rows, self.e, self.k, self.calls = [0], num_experts, top_k, []

    def topk(self, layer: int, rows: int, seq: int) -> np.ndarray:
        self.calls.append((layer, rows, seq))
        t = np.arange(rows * seq)[:, None]
        return ((layer + t + np.arange(self.k)[None, :]) % self.e).astype(np.int64)


@pytest.mark.parametrize("model_type", ["qwen2_moe", "qwen3_moe", "mixtral", "olmoe", "deepseek_v2"])
def test_router_hook_drives_every_architecture(model_type: str) -> None:
    model = build_tiny_model(model_type).eval()
    found = routers(model)
    experts = [m for n, m in model.named_modules() if n.endswith(".experts") and hasattr(m, "gate_up_proj")]
    assert len(found) == len(experts) > 0
    e, k = int(found[0][1].weight.shape[0]), int(found[0][1].top_k)
    fixed = _FixedRouting(e, k)
    hook_routers(model, fixed)
    seen: list[torch.Tensor] = []
    for m in experts:
        m.register_forward_pre_hook(lambda mod, args: seen.append(args[1].clone()))
    with torch.no_grad():
        model(torch.arange(3, 8)[None])
    assert [c[0] for c in fixed.calls] == [layer for layer, _ in found]
    for (layer, _), ids in zip(found, seen, strict=True):
        assert torch.equal(ids, torch.from_numpy(fixed.topk(layer, 1, 5)))


def test_the_commit_a_run_names_can_be_set_for_a_copied_tree(monkeypatch):
    from zipmoe.bench.baselines.workdir import commit

    monkeypatch.delenv("ZIPMOE_COMMIT", raising=False)
    here = commit()
    assert here and here != "sent-at-abc123"
    monkeypatch.setenv("ZIPMOE_COMMIT", "sent-at-abc123")
    assert commit() == "sent-at-abc123"


def test_a_sampled_system_runs_fewer_prompts_and_tokens_in_its_own_file(suite: Path) -> None:
    """--sample SYSTEM=PxT (for Accelerate's seconds per token): its own run file, the sample in its label."""
    assert e2e.main(["--workdir", str(suite), "--systems", "transformers", "--sample", "transformers=1x5", *ARGS]) == 0
    (doc,) = [d for d in report.load_runs(suite) if d["file"].endswith("__1x3.json")]  # 5 tokens capped at 3
    assert doc["status"] == "complete" and doc["system"] == "transformers"
    assert doc["label"].endswith("(1 prompts × 3 tokens)")
    one, two = doc["batches"]["1"]["records"], doc["batches"]["2"]["records"]
    assert len(one) == 1 and len(two) == 1  # the first prompt; at least one batch of two
    assert all(r["new_tokens"] == 3 for r in one + two)
    (warm,) = doc["warm_process"]  # the process warm-up replayed the sample, not the whole prompt set
    assert warm["groups"] == {"1": 1, "2": 1} and warm["groups_covered"] == warm["groups"]
    assert "| 1 × 3 |" in report.markdown([doc])
    for bad, why in ((["accelerate=2x8"], "--systems"), (["zipmoe=2"], "PROMPTSxTOKENS"),
                     (["zipmoe=9x8"], "--prompts"), (["zipmoe=1x8", "zipmoe=2x8"], "twice")):
        with pytest.raises(ZipMoEError, match=why):
            e2e.parse_samples(bad, ["zipmoe"], prompts=8)


def test_the_targets_take_a_complete_run_before_a_partial_one() -> None:
    summary = {"tpot_s": {"median": 1.0}}
    partial = {"system": "accelerate", "budget": 0.25, "batch": 1, "status": "partial", **summary}
    sampled = {**partial, "status": "complete", "tpot_s": {"median": 2.0}}
    assert report._find([partial, sampled], "accelerate", 0.25, 1) is sampled
    assert report._find([partial], "accelerate", 0.25, 1) is partial
    assert report._find([], "accelerate", 0.25, 1) is None


def test_the_attention_warm_up_replays_on_a_one_layer_clone(suite: Path, tmp_path: Path,
                                                            monkeypatch: pytest.MonkeyPatch) -> None:
    """--warm-process attention: the same prompts, batches and tokens through a one-decoder-layer clone of the
    model (plain transformers, random weights): every group covered, at a fraction of a replay's cost."""
    from zipmoe.bench.baselines.transformers_ref import AttentionWarmUp

    loaded: list[torch.nn.Module] = []
    real_load = AttentionWarmUp._load
    monkeypatch.setattr(AttentionWarmUp, "_load", lambda self, *a: loaded.append(real_load(self, *a)) or loaded[-1])
    parser = argparse.ArgumentParser()
    e2e.configure(parser)
    args = parser.parse_args(["--workdir", str(suite), *ARGS, "--warm-process", "attention"])
    setup, info = e2e.prepare_workdir(args, need_raw=False, need_offload=False)  # the suite's, already built
    vocab = info["config"]["vocab_size"]
    prompts = {"vocab_size": vocab, "n": 2, "seed": 0, "min_len": 8, "max_len": 16}
    record = e2e._warm_process("zipmoe", setup, Budget(frac=0.25, nbytes=1 << 30), prompts, args, vocab,
                               time.time() + 300, tmp_path, args.prompts, args.new_tokens)
    assert record["system"] == "attention-warmup" and record["status"] == "complete"
    assert record["groups_covered"] == record["groups"] == {"1": 2, "2": 1}
    (model,) = loaded
    assert model.config.num_hidden_layers == 1 and len(model.model.layers) == 1  # every layer of it: full attention
    plain = make_system("transformers")._load(setup, Budget(None, None))  # what the full model runs
    assert model.config._attn_implementation == plain.config._attn_implementation
    assert model.config._experts_implementation == plain.config._experts_implementation
    assert model.dtype == plain.dtype and model.generation_config.to_dict() == plain.generation_config.to_dict()
    assert not list(tmp_path.iterdir()), "the scratch run file is removed"


def test_the_warm_up_clone_keeps_one_layer_of_each_attention_type() -> None:
    """A sliding-window layer caps its key length and a full one does not: each type needs its own layer."""
    from transformers import Qwen2MoeConfig

    from zipmoe.bench.baselines.transformers_ref import one_layer_per_type

    config = Qwen2MoeConfig(num_hidden_layers=5, use_sliding_window=True, max_window_layers=2, sliding_window=64,
                            mlp_only_layers=[0, 3], layer_types=["full_attention", "full_attention",
                                                                 "sliding_attention", "sliding_attention",
                                                                 "full_attention"])
    clone = one_layer_per_type(config)
    assert clone.num_hidden_layers == 2 and clone.layer_types == ["full_attention", "sliding_attention"]
    assert clone.mlp_only_layers == [0]  # kept layers 0 and 2 of the original: only 0 was dense
    plain = one_layer_per_type(Qwen2MoeConfig(num_hidden_layers=4, layer_types=None))
    assert plain.num_hidden_layers == 1


def test_the_fused_variant_runs_beside_zipmoe_and_the_report_compares_them(suite: Path, tmp_path: Path) -> None:
    work = tmp_path / "w"
    shutil.copytree(suite, work, ignore=shutil.ignore_patterns("runs"))
    assert e2e.main(["--workdir", str(work), "--systems", "zipmoe,zipmoe-fused", *ARGS]) == 0
    by = {d["system"]: d for d in report.load_runs(work)}
    fused, z = by["zipmoe-fused"], by["zipmoe"]
    assert fused["status"] == "complete" and fused["memory_budget"] == z["memory_budget"]
    for batch in ("1", "2"):
        fs, zs = fused["batches"][batch]["summary"], z["batches"][batch]["summary"]
        assert fs["tokens"] == zs["tokens"] and fs["bytes_read"] > 0
    text = report.markdown(report.load_runs(work))
    assert "| zipmoe, fused decode |" in text and "zipmoe with fused decode ÷ zipmoe" in text


def test_the_report_says_where_the_engine_systems_steps_go_at_every_batch_size(suite: Path) -> None:
    runs = report.load_runs(suite)
    lines = report.trace_table(runs)
    rows = [line for line in lines if line.startswith("| zipmoe |") or line.startswith("| uncompressed LRU |")]
    # the engine systems traced their runs at batch 1 and 2; the others have no trace
    assert len(rows) == 4, lines
    batches = []
    for row in rows:
        cells = [c.strip() for c in row.strip("|").split("|")]
        batches.append(cells[2])
        step, bound, reads = (float(c) for c in cells[3:6])
        assert step > 0 and bound >= 0 and 0 <= reads <= step * 1.05  # reads in flight fit in the step
    assert sorted(batches) == ["1", "1", "2", "2"]
    assert "Where a decode step goes" in report.markdown(runs)
