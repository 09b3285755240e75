"""`zipmoe bench e2e`: every system on the same model, prompts, budget, routing and disk (issue 6).

bench stage, driver. Steps, each resumable inside one workdir (a device call must end in 10 min):
  1. build the synthetic HF checkpoint (bench/synth.py), convert it to a Huffman store (and a `raw`
     one for the uncompressed baseline), measure O_DIRECT disk bandwidth → setup.json;
  2. for each system × budget: load, warm up, run the prompt set at each batch size → one run JSON
     (runs/<params>/<system>__<budget>[__PxT].json, PxT for a --sample), saved after every batch;
     runs complete at every asked batch size are skipped, others resume at the next batch; --deadline
     stops before a batch that would overrun;
  3. --report: tables + plots from every run JSON of the workdir (bench/report.py).
Budgets are shares of the BF16 expert bytes; every system gets the same total bytes (dense +
staging + share). Systems that read through the page cache run in a child process inside a cgroup
v2 memory.max when the machine allows it (baselines/isolation.py). Sizes in bytes, times in s.

    zipmoe bench e2e --workdir /tmp/e2e --layers 6 --systems zipmoe,uncompressed,accelerate,transformers \
        --budgets 0.25 0.5 --batches 1 16 --device cuda --sample accelerate=2x8 --report
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import subprocess
import sys
import time
import traceback
from pathlib import Path
from typing import Any

from zipmoe.bench import report as report_mod
from zipmoe.bench.baselines import SYSTEMS, Budget, Setup, make_system
from zipmoe.bench.baselines.isolation import MemoryCgroup, cgroup_unavailable, drop_caches, evict_files
from zipmoe.bench.baselines.workdir import machine_info, prepare_workdir, save_json
from zipmoe.bench.metrics import PeakMemory, summarize
from zipmoe.bench.prompts import prompt_set
from zipmoe.config import parse_size
from zipmoe.errors import ZipMoEError

SCHEMA = 1  # version of the run JSON layout
WARM_SHARE = 0.25  # of --deadline the process warm-up may use (a resumed call must still make progress)


def _budgets(values: list[str]) -> list[float | None]:
    out: list[float | None] = []
    for v in values:
        if v == "all":
            out.append(None)
            continue
        try:
            f = float(v)
        except ValueError:
            raise ZipMoEError(f"--budgets takes shares of the expert bytes in (0, 1] or 'all', got {v!r}") from None
        if not 0 < f <= 1:
            raise ZipMoEError(f"--budgets takes shares of the expert bytes in (0, 1] or 'all', got {v!r}")
        out.append(f)
    return out


def make_budget(frac: float | None, geometry: dict[str, int]) -> Budget:
    """Same total for every system: dense + the largest staging of the stores + frac × BF16 experts."""
    if frac is None:
        return Budget(None, None)
    return Budget(frac, geometry["dense"] + geometry["staging"] + int(frac * geometry["expert_bf16"]))


def groups(prompts: list, batch: int, count: int) -> list[list]:
    """Batches of `batch` consecutive prompts covering at least `count` prompts (at least one batch)."""
    n = max(1, count // batch)
    return [prompts[i * batch:(i + 1) * batch] for i in range(n)]


def parse_samples(values: list[str], names: list[str], prompts: int) -> dict[str, tuple[int, int]]:
    """--sample SYSTEM=PxT → {system: (prompts, new tokens)}: a smaller sample of the prompt set for a
    system whose every token costs seconds (Accelerate reads every expert per step, so its TPOT hardly
    depends on which tokens are measured), so that a whole suite fits a device session."""
    out: dict[str, tuple[int, int]] = {}
    for v in values:
        name, _, size = v.partition("=")
        p, _, t = size.partition("x")
        if name not in names or not (p.isdecimal() and t.isdecimal()) or int(p) < 1 or int(t) < 1:
            raise ZipMoEError(f"--sample takes SYSTEM=PROMPTSxTOKENS for a system in --systems ({', '.join(names)}), "
                              f"e.g. accelerate=2x8; got {v!r}")
        if int(p) > prompts:
            raise ZipMoEError(f"--sample {v}: {p} prompts is more than --prompts {prompts}; a sample is a subset")
        if name in out:
            raise ZipMoEError(f"--sample names {name} twice; give one sample per system")
        out[name] = (int(p), int(t))
    return out


def run_params(args: argparse.Namespace, setup: Setup) -> dict[str, Any]:
    """What makes two runs comparable; its digest names the runs folder."""
    return {"prompts": args.prompts, "max_prompt_len": args.max_prompt_len, "new_tokens": args.new_tokens,
            "prompt_seed": args.prompt_seed, "routing_seed": setup.seed, "device": setup.device,
            "workers": setup.workers, "warmup": args.warmup, "experts_implementation": setup.experts_implementation}


def execute_run(spec: dict[str, Any]) -> str:
    """One system × budget: load, warm up, each batch size's batches; returns the run's status."""
    path = Path(spec["run_path"])
    resumed = path.exists()
    doc = json.loads(path.read_text()) if resumed else {**spec["meta"], "batches": {}}
    system = make_system(spec["system"])
    doc.update(system=system.name, label=system.label + spec.get("sample", ""), status="running")
    command = spec.get("meta", {}).get("command")
    if command:  # every call that ran part of it, in order (a run begun before this list: its first command)
        if "commands" not in doc:
            doc["commands"] = [doc["command"]] if resumed and "command" in doc else []
        doc["commands"].append(command)
    if spec.get("warm_process"):  # one record per call that ran part of this run (a resumed run has several)
        doc.setdefault("warm_process", []).append(spec["warm_process"])
    reason = system.unavailable()
    if reason:
        doc.update(status="unavailable", reason=reason)
        save_json(path, doc)
        return "unavailable"
    setup, budget = Setup(**spec["setup"]), Budget(**spec["budget"])
    prompts = prompt_set(**spec["prompts"])
    try:
        t0 = time.perf_counter()
        system.prepare(setup, budget)
        doc.update(load_s=time.perf_counter() - t0, system_info=system.info,
                   page_cache=spec["page_cache"] or system.page_cache)
        if spec["warmup"]:
            system.warmup(spec["vocab_size"])
        status = _run_batches(system, spec, prompts, doc, path)
    except Exception as e:  # one system failing (OOM, budget too small) must not stop the suite
        status = "failed"
        doc.update(reason=f"{type(e).__name__}: {e}", traceback=traceback.format_exc(limit=8)[-4000:])
        print(f"e2e: {system.name} at budget {budget.label} failed: {doc['reason']}", file=sys.stderr)
    finally:
        system.close()
    doc["status"] = status
    save_json(path, doc)
    return status


def merge_peaks(sec: dict[str, Any], peaks: dict[str, Any]) -> None:
    """Fold one group's peaks into its batch section: the larger of each (a resumed section keeps its earlier
    peak); a peak unknown this time (None: a missed nvidia-smi) leaves what an earlier group saw."""
    for key, value in peaks.items():
        if value is None:
            sec.setdefault(key, None)
        else:
            sec[key] = max(sec.get(key) or 0, value) if isinstance(value, int) else value


def _run_batches(system: Any, spec: dict[str, Any], prompts: list, doc: dict, path: Path) -> str:
    last = None  # the previous batch run in this call: (seconds, rows × tokens), for the next estimate
    for batch in spec["batches"]:
        sec = doc["batches"].setdefault(str(batch), {"records": []})
        todo = groups(prompts, batch, spec["prompt_count"])[len(sec["records"]):]
        peak = PeakMemory(spec["setup"]["device"])
        peak.reset()
        system.reset_peak_memory()
        for group in todo:
            new = min(spec["new_tokens"] or 1 << 30, max(p.max_new_tokens for p in group))
            estimate = 0.0 if last is None else last[0] * len(group) * new / last[1]  # conservative
            if time.time() + estimate > spec["deadline"]:
                return "partial"
            rec = system.run(group, new, deadline=spec["deadline"])
            if rec.pop("aborted"):
                return "partial"
            last = (rec["e2e_s"], len(group) * new)
            rec["prompt_indices"] = [p.index for p in group]
            sec["records"].append(rec)
            merge_peaks(sec, {**peak.read(), **system.peak_memory()})
            sec["summary"] = summarize(sec["records"])
            save_json(path, doc)
    return "complete"


def _needs_isolation(system_name: str, budget: Budget) -> bool:
    """Systems that read through the page cache, at a budget that excludes part of the model."""
    return system_name in ("accelerate", "llama.cpp") and budget.nbytes is not None


def _isolation(system_name: str, mode: str, budget: Budget, setup: Setup, slack: int) -> tuple[str, Any]:
    """(page-cache note, cgroup or None) for one run; O_DIRECT and all-resident systems need nothing."""
    if not _needs_isolation(system_name, budget):
        return "", None
    # Evict first, whatever bounds the run: pages already cached stay charged to whoever read or wrote them (the
    # suite wrote the checkpoint and the GGUF just before), so a fresh cgroup does not bound them. Without this,
    # llama.cpp ran its whole GGUF from the page cache, 0 bytes read (fifteenth session, device).
    advised = evict_files(make_system(system_name).page_cache_files(setup))
    if mode != "inline" and (why := cgroup_unavailable()) is None:
        cg = MemoryCgroup(budget.nbytes + slack)
        return (f"cgroup v2 memory.max = budget + {slack} B process baseline; its files evicted with "
                f"posix_fadvise before the run ({advised} B)"), cg
    why = why if mode != "inline" else "--isolation inline"
    if mode != "inline" and drop_caches():
        return f"caches dropped before the run (no cgroup: {why}); not bounded during it", None
    return (f"model files evicted with posix_fadvise before the run ({advised} B; no cgroup: {why}; "
            "drop_caches not permitted); not bounded during it"), None


def _launch(spec: dict[str, Any], mode: str, cgroup: Any) -> str:
    """Run inline, or in a child process (joined to the cgroup) that writes the same run JSON."""
    if mode == "inline" or (mode == "auto" and cgroup is None):
        return execute_run(spec)
    path = Path(spec["run_path"])
    spec_path = path.with_suffix(".spec.json")
    save_json(spec_path, spec)
    timeout = max(60.0, spec["deadline"] - time.time() + 120)
    try:
        src = str(Path(__file__).resolve().parents[2])  # so the child imports this very zipmoe
        env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [src, os.environ.get("PYTHONPATH")]))}
        child = subprocess.run([sys.executable, "-m", "zipmoe.bench.e2e", "--child", str(spec_path)], check=False,
                               timeout=timeout, env=env, preexec_fn=cgroup.join if cgroup else None)
        code = f"exit status {child.returncode}"
    except subprocess.TimeoutExpired:
        code = "stopped after overrunning its deadline"
    finally:
        spec_path.unlink(missing_ok=True)
        peak = cgroup.peak() if cgroup is not None else None
        if cgroup is not None:
            cgroup.remove()
    doc = json.loads(path.read_text()) if path.exists() else {**spec["meta"], "system": spec["system"], "batches": {}}
    if doc.get("status") in (None, "running"):  # the child died mid-run (killed, out of memory)
        doc.update(status="failed", reason=f"child process {code} before finishing", page_cache=spec["page_cache"])
    if peak is not None:
        doc["cgroup_memory_peak"] = peak
    save_json(path, doc)
    return doc["status"]


def run_suite(args: argparse.Namespace) -> dict[str, str]:
    """Step 1 and 2: prepare the workdir, then every system × budget not yet complete."""
    deadline = time.time() + args.deadline
    names = [s for s in args.systems.split(",") if s]
    for name in names:
        if name not in SYSTEMS:
            raise ZipMoEError(f"unknown system {name!r} in --systems: choose from {', '.join(SYSTEMS)}")
    setup, info = prepare_workdir(args, need_raw="uncompressed" in names, need_offload="accelerate" in names,
                                  need_gguf="llama.cpp" in names)
    params = run_params(args, setup)
    digest = hashlib.sha256(json.dumps(params, sort_keys=True).encode()).hexdigest()[:10]
    runs_dir = Path(args.workdir) / "runs" / digest
    vocab = info["config"]["vocab_size"]
    exclude = tuple({setup.pad_token_id, *info["eos_ids"]})
    n_prompts = max(args.prompts, max(args.batches))
    prompts = dict(vocab_size=vocab, n=n_prompts, seed=args.prompt_seed, exclude_ids=exclude,
                   min_len=min(8, args.max_prompt_len), max_len=args.max_prompt_len)
    meta = {"schema": SCHEMA, "params": params, "model": info["model"], "machine": machine_info(setup.device),
            "commit": info["commit"], "command": "zipmoe bench e2e " + " ".join(args.argv)}
    samples = parse_samples(args.sample, names, args.prompts)
    statuses: dict[str, str] = {}
    warm, warm_record = str(args.warm_process) != "0", None
    for name in names:
        system = make_system(name)
        for budget in system.budgets([make_budget(f, info["geometry"]) for f in _budgets(args.budgets)]):
            run_id = f"{name}__{budget.label}"
            count, new_tokens, sample = args.prompts, args.new_tokens, ""
            if name in samples:  # its own file: records of another sample size never mix into it
                count, cap = samples[name]
                new_tokens = min(new_tokens or cap, cap)
                run_id += f"__{count}x{new_tokens}"
                sample = f" ({count} prompts × {new_tokens} tokens)"
            path = runs_dir / f"{run_id}.json"
            if path.exists() and _done(json.loads(path.read_text()), args.batches, count):
                statuses[run_id] = "skipped (done)"
                continue
            if time.time() > deadline - 0.05 * args.deadline:
                statuses[run_id] = "not started (deadline)"
                continue
            if warm and not _needs_isolation(name, budget) and args.isolation != "process":
                warm_until = min(deadline, time.time() + WARM_SHARE * args.deadline)
                warm_record = _warm_process(name, setup, budget, prompts, args, vocab, warm_until, runs_dir, count,
                                            new_tokens)
                warm = False
            # after the warm-up: dropping the page cache for a system that needs it must come last
            note, cgroup = _isolation(name, args.isolation, budget, setup, parse_size(args.cgroup_slack))
            spec = {"run_path": str(path), "system": name, "setup": setup.to_dict(),
                    "budget": {"frac": budget.frac, "nbytes": budget.nbytes}, "prompts": prompts,
                    "prompt_count": count, "batches": args.batches, "new_tokens": new_tokens,
                    "warmup": args.warmup, "vocab_size": vocab, "deadline": deadline, "page_cache": note,
                    "warm_process": warm_record, "sample": sample,
                    "meta": {**meta, "budget_frac": budget.frac, "memory_budget": budget.nbytes}}
            statuses[run_id] = _launch(spec, args.isolation, cgroup)
            print(f"e2e: {run_id}: {statuses[run_id]}", flush=True)
    return statuses


def _done(doc: dict[str, Any], batches: list[int], count: int) -> bool:
    """Whether a run needs no more work: unavailable here, or complete at every batch size asked for now. A run
    is one file per system × budget whatever --batches says, so a later call that asks for another batch size
    adds it to the finished run (it used to skip the run as done)."""
    if doc.get("status") == "unavailable":
        return True
    have = doc.get("batches", {})
    groups_at = {b: len(groups([], b, count)) for b in batches}  # how many batches _run_batches runs at b
    return doc.get("status") == "complete" and all(
        len(have.get(str(b), {}).get("records", [])) >= n for b, n in groups_at.items())


def _warm_process(name: str, setup: Any, budget: Any, prompts: dict, args: argparse.Namespace, vocab: int,
                  deadline: float, runs_dir: Path, count: int, new_tokens: int | None) -> dict:
    """An untimed, unreported replay of the first system's whole workload (same prompts, batch sizes and
    new tokens) before any measured run, on that system or (--warm-process attention) on AttentionWarmUp's
    clone with one decoder layer per layer type. On CUDA, torch's cuDNN attention builds an execution graph the
    first time a thread meets each (batch, query length, key length), about 8 ms per attention call on the
    device: the first system of a process ran 20–40 % slower for its whole run (its gaps between MoE layers
    were 50–85 ms longer per step; scripts/first_engine.py, BENCHMARKS.md fourth session), and the suite's
    fixed order charged that to zipmoe. After the replay every system meets shapes the process has seen.
    It stops at `deadline` (the caller gives it WARM_SHARE of the call), leaving the rest to the runs; then
    the first system's runs of the groups it did not reach pay the graph builds (a device run: 72 ms more
    per step outside the MoE layers on its last two prompts). So the returned record (kept in the JSON of
    each run this call then works on) says which groups per batch size it covered and how the replay
    ended, and an incomplete replay is announced."""
    if str(args.warm_process) == "attention":
        name = "attention-warmup"
    path = runs_dir / "_warm-process.scratch"
    path.unlink(missing_ok=True)  # one left by a killed call would resume, skipping its shapes
    spec = {"run_path": str(path), "system": name, "setup": setup.to_dict(),
            "budget": {"frac": budget.frac, "nbytes": budget.nbytes}, "prompts": prompts,
            "prompt_count": count, "batches": args.batches, "new_tokens": new_tokens, "warmup": 1,
            "vocab_size": vocab, "deadline": deadline, "page_cache": "", "meta": {}}
    t0 = time.perf_counter()
    try:
        status = execute_run(spec)
        done = json.loads(path.read_text()).get("batches", {}) if path.exists() else {}
    finally:
        path.unlink(missing_ok=True)
    total = {str(b): len(groups(list(range(count)), b, count)) for b in args.batches}
    covered = {b: len(done.get(b, {}).get("records", [])) for b in total}
    record = {"system": name, "status": status, "seconds": time.perf_counter() - t0, "groups_covered": covered,
              "groups": total}
    print(f"e2e: warmed the process with an untimed replay of {name} ({record['seconds']:.0f} s)", flush=True)
    if covered != total:
        why = ("stopped at its cap (WARM_SHARE of --deadline; give a larger --deadline)" if status == "partial"
               else f"ended {status} (see the errors above)")
        print(f"e2e: WARNING the warm-up {why} after {covered} of {total} prompt groups per batch size: on CUDA, "
              "the first run to meet the others pays their attention graph builds", flush=True)
    return record


def configure(p: argparse.ArgumentParser) -> None:
    p.add_argument("--workdir", help="model, stores and run JSONs live here (reused, resumed)")
    p.add_argument("--shape", default="qwen1.5-moe-a2.7b", help="synthetic model shape (bench/synth.py SHAPES)")
    p.add_argument("--layers", type=int, default=None, help="keep the first N decoder layers (quick runs)")
    p.add_argument("--scale", type=float, default=1.0, help="shrink hidden/intermediate/experts (0, 1]")
    p.add_argument("--model-seed", type=int, default=0)
    p.add_argument("--systems", default="zipmoe,uncompressed,accelerate,transformers",
                   help=f"comma-separated, from: {', '.join(SYSTEMS)}")
    p.add_argument("--budgets", nargs="+", default=["0.25", "0.5"], help="shares of BF16 expert bytes, or 'all'")
    p.add_argument("--batches", type=int, nargs="+", default=[1, 4, 16])
    p.add_argument("--device", default=None, help="cuda or cpu (default: cuda if available)")
    p.add_argument("--workers", type=int, default=None, help="decode workers (default: cores − 1)")
    p.add_argument("--prompts", type=int, default=8, help="prompts per batch size (at least one batch)")
    p.add_argument("--max-prompt-len", type=int, default=1024)
    p.add_argument("--new-tokens", type=int, default=None, help="cap on new tokens per request (default 64–128)")
    p.add_argument("--sample", nargs="+", default=[], metavar="SYSTEM=PxT",
                   help="measure SYSTEM on the first P prompts per batch size (at least one batch) and at most "
                        "T new tokens (e.g. accelerate=2x8: seconds per token); its label shows the sample")
    p.add_argument("--prompt-seed", type=int, default=0)
    p.add_argument("--routing-seed", type=int, default=0)
    p.add_argument("--warmup", type=int, choices=(0, 1), default=1, help="one 8-token prefill before measuring")
    p.add_argument("--warm-process", choices=("0", "1", "attention"), default="attention",
                   help="replay the workload untimed before any measured run (CUDA attention builds a graph per "
                        "new shape): attention (default) on a clone of the model with one decoder layer per layer "
                        "type (the same attention shapes: 25 s per call on the device instead of 118), 1 on the "
                        "first system, 0 not at all")
    p.add_argument("--experts-implementation", default=None, help="eager | grouped_mm (default: transformers')")
    p.add_argument("--isolation", choices=("auto", "process", "inline"), default="auto",
                   help="auto: child process in a cgroup for page-cache readers when possible")
    p.add_argument("--cgroup-slack", default="1GiB", help="process baseline added to memory.max")
    p.add_argument("--deadline", type=float, default=540.0, help="stop starting batches after this many s")
    p.add_argument("--json", default=None, help="also write every run of the workdir into one JSON file")
    p.add_argument("--report", action="store_true", help="write tables + PNG plots (workdir/report/)")
    p.add_argument("--no-run", action="store_true", help="only report on runs already in the workdir")
    p.add_argument("--benchmarks-md", default=None, help="splice the report section into this markdown file")
    p.add_argument("--child", default=None, help=argparse.SUPPRESS)


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    p = argparse.ArgumentParser(prog="zipmoe bench e2e", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    configure(p)
    args = p.parse_args(argv)
    if args.child:
        execute_run(json.loads(Path(args.child).read_text()))
        return 0
    if not args.workdir:
        p.error("--workdir is required")
    args.argv = argv
    args.device = args.device or ("cuda" if _cuda() else "cpu")
    statuses = {} if args.no_run else run_suite(args)
    left = [k for k, v in statuses.items() if v in ("partial", "not started (deadline)")]
    if left:
        print(f"e2e: deadline reached; run the same command again to resume {', '.join(left)}", flush=True)
    runs = report_mod.load_runs(Path(args.workdir))
    if args.json:
        save_json(Path(args.json), {"runs": runs})
    if args.report:
        out = report_mod.write_report(runs, Path(args.workdir) / "report", args.benchmarks_md)
        print(f"e2e: report written to {out}")
    return 0


def _cuda() -> bool:
    import torch

    return torch.cuda.is_available()


if __name__ == "__main__":
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    raise SystemExit(main())
