"""Run JSONs of `zipmoe bench e2e` → a BENCHMARKS.md section (markdown tables) + PNG plots.

bench stage, offline (runs anywhere the JSONs are, e.g. after fetching them from the device).
In: every runs/*/*.json of a workdir. Out: report/e2e.md and three plots — TPOT vs budget per
system (batch 1, 10–90 % bands), throughput vs batch size, and a stacked time breakdown per
request (prefill, decode I/O+decode stall, decode expert compute, decode other).
Sizes in bytes (shown in MB/GiB), times in s.
"""

from __future__ import annotations

import json
import os
import re
import statistics
from collections.abc import Iterable
from pathlib import Path
from typing import Any

BEGIN, END = "<!-- zipmoe-bench-e2e:begin -->", "<!-- zipmoe-bench-e2e:end -->"
ORDER = ("zipmoe", "zipmoe-fused", "uncompressed", "accelerate", "transformers", "llama.cpp", "dfloat11")
PLOTS = ("tpot_vs_budget.png", "throughput_vs_batch.png", "time_breakdown.png")


def load_runs(workdir: Path) -> list[dict[str, Any]]:
    """Every run JSON under workdir/runs (specs and temp files skipped), in a stable order."""
    runs = []
    for p in sorted((workdir / "runs").glob("*/*.json")):
        if p.name.endswith(".spec.json"):
            continue
        doc = json.loads(p.read_text())
        doc["file"] = str(p.relative_to(workdir))
        runs.append(doc)
    return sorted(runs, key=_key)


def _key(doc: dict[str, Any]) -> tuple:
    name = doc.get("system", "")
    frac = doc.get("budget_frac")
    return (ORDER.index(name) if name in ORDER else len(ORDER), name, 2.0 if frac is None else frac)


def rows(runs: Iterable[dict[str, Any]]) -> list[dict[str, Any]]:
    """One flat row per (run, batch size) that has records."""
    out = []
    for doc in runs:
        for batch, sec in sorted(doc.get("batches", {}).items(), key=lambda kv: int(kv[0])):
            if sec.get("summary"):
                out.append({"system": doc["system"], "label": doc.get("label", doc["system"]),
                            "budget": doc.get("budget_frac"), "batch": int(batch), "status": doc.get("status"),
                            "params": doc.get("params", {}), **sec["summary"],
                            **{k: v for k, v in sec.items() if k.startswith("peak_")}})
    return out


def _f(x: float | None, fmt: str = "{:.3f}") -> str:
    return "–" if x is None else fmt.format(x)


def _band(b: dict[str, Any] | None) -> str:
    if not b or b.get("median") is None:
        return "–"
    return f"{b['median']:.3f} ({b['p10']:.3f}–{b['p90']:.3f})"


def _budget(frac: float | None) -> str:
    return "all" if frac is None else f"{100 * frac:g} %"


def _hits(r: dict[str, Any]) -> str:
    h = r.get("hit_rate")
    return "–" if not h else " / ".join(f"{h.get(k, 0):.2f}" for k in ("F", "C", "S", "E", "MISS"))


def table(rs: list[dict[str, Any]]) -> str:
    """The main markdown table: one line per system × budget × batch size."""
    head = ("| system | budget | batch | prompts × new tokens | TTFT s (p10–p90) | TPOT s (p10–p90) | tok/s "
            "| MB read/token | hits F/C/S/E/miss | I/O-stall | run s / lower bound s | peak RSS GiB | peak GPU GiB "
            "| status |")
    lines = [head, "|" + "---|" * (head.count("|") - 1)]
    for r in sorted(rs, key=lambda r: (r["batch"], r["budget"] if r["budget"] is not None else 2.0,
                                       ORDER.index(r["system"]) if r["system"] in ORDER else 99)):
        bound = "–" if r.get("bound_ratio") is None else f"{r['bound_ratio']:.2f}× ({r['bound_s']:.2f})"
        gpu, rss = (None if r.get(k) is None else r[k] / 2**30 for k in ("peak_gpu_reserved", "peak_host_rss"))
        lines.append(
            f"| {r['label']} | {_budget(r['budget'])} | {r['batch']} | {r['prompts']} × {r['tokens'] // r['prompts']} "
            f"| {_band(r['ttft_s'])} "
            f"| {_band(r['tpot_s'])} | {_f(r['tok_per_s'], '{:.2f}')} "
            f"| {_f(None if r.get('bytes_per_token') is None else r['bytes_per_token'] / 1e6, '{:.1f}')} "
            f"| {_hits(r)} | {_f(r.get('io_stall_share'), '{:.0%}')} | {bound} "
            f"| {_f(rss, '{:.2f}')} | {_f(gpu, '{:.2f}')} "
            f"| {r['status']} |")
    return "\n".join(lines)


def _find(rs: list[dict[str, Any]], system: str, budget: float | None, batch: int) -> dict[str, Any] | None:
    """The row of a system × budget × batch; a complete run before a partial one (a sampled run of a
    system beside a cut-off full one, say)."""
    found = [r for r in rs if r["system"] == system and r["budget"] == budget and r["batch"] == batch]
    return next((r for r in found if r["status"] == "complete"), found[0] if found else None)


def _median(value: Any) -> float | None:
    """A row's value: the median of a band, or the number itself."""
    return value["median"] if isinstance(value, dict) else value


def targets(rs: list[dict[str, Any]]) -> list[str]:
    """Issue 6's headline ratios, from whatever rows exist (missing ones are said so)."""
    out = []

    def ratio(what: str, num: dict | None, den: dict | None, key: str, want: float, invert: bool = False) -> None:
        if num is None or den is None:
            out.append(f"- {what}: not measured in these runs")
            return
        a, b = (num[key]["median"], den[key]["median"]) if isinstance(num[key], dict) else (num[key], den[key])
        if not a or not b:
            out.append(f"- {what}: not measured in these runs")
            return
        x = b / a if invert else a / b
        out.append(f"- {what}: **{x:.2f}×** (target ≥ {want}×: {'met' if x >= want else 'NOT met'})")

    for q in (0.25,):
        z1, z16 = _find(rs, "zipmoe", q, 1), _find(rs, "zipmoe", q, 16)
        ratio(f"TPOT batch 1 at {_budget(q)}, uncompressed LRU ÷ zipmoe", _find(rs, "uncompressed", q, 1), z1,
              "tpot_s", 2)
        ratio(f"TPOT batch 1 at {_budget(q)}, Accelerate ÷ zipmoe", _find(rs, "accelerate", q, 1), z1, "tpot_s", 10)
        ratio(f"throughput batch 16 at {_budget(q)}, zipmoe ÷ Accelerate", z16, _find(rs, "accelerate", q, 16),
              "tok_per_s", 3)
        ratio(f"throughput batch 16 at {_budget(q)}, zipmoe ÷ uncompressed LRU", z16,
              _find(rs, "uncompressed", q, 16), "tok_per_s", 1.8)
        for batch in (1, 16):  # no target: llama.cpp runs its own routing (see its rows' label)
            llama, z = _find(rs, "llama.cpp", q, batch), _find(rs, "zipmoe", q, batch)
            if llama is not None and z is not None:
                (lt, zt), (lr, zr) = ((_median(r["tpot_s"]) for r in (llama, z)),
                                      (r["tok_per_s"] for r in (llama, z)))
                if lt and zt and lr and zr:
                    out.append(f"- batch {batch} at {_budget(q)}, llama.cpp ÷ zipmoe: TPOT **{lt / zt:.2f}×**, "
                               f"tokens/s over prefill + decode **{lr / zr:.2f}×** (no target; llama.cpp on the "
                               "model's own routing, not the calibrated sampler)")
        fused = _find(rs, "zipmoe-fused", q, 1)
        if fused is not None and z1 is not None:  # an option's A/B, not a target
            a, b = (_median(r["tpot_s"]) for r in (fused, z1))
            if a and b:
                out.append(f"- TPOT batch 1 at {_budget(q)}, zipmoe with fused decode ÷ zipmoe: **{a / b:.2f}×** "
                           "(no target)")
    ratio("everything fits, batch 1: transformers TPOT ÷ zipmoe TPOT", _find(rs, "transformers", None, 1),
          _find(rs, "zipmoe", None, 1), "tpot_s", 0.9)
    worst = max((r["bound_ratio"] for r in rs if r["system"] == "zipmoe" and r.get("bound_ratio")), default=None)
    out.append(f"- zipmoe run time ÷ own lower bound, worst run: "
               f"{'not measured' if worst is None else f'**{worst:.2f}×** (target ≤ 1.3×)'}")
    return out


# (trace_summary key, column): where a decode step of an engine system went, ms per step
TRACE_COLUMNS = (("read_union_ms_sum_per_step", "reads in flight"), ("after_last_read_ms_sum_per_step",
                 "after the last read"), ("model_between_ms_sum_per_step", "model's code between layers"),
                 ("experts_tail_ms_sum_per_step", "our tail"), ("experts_head_ms_sum_per_step", "our head"),
                 ("sync_wait_ms_sum_per_step", "of it: device wait"), ("before_first_read_ms_sum_per_step",
                 "before the first read"))


def trace_table(runs: list[dict[str, Any]]) -> list[str]:
    """Per engine run and batch size: medians over its batches of the trace's per-step sums (bench/metrics.py
    trace_summary) beside the step's I/O bound; [] when no run recorded a trace."""
    lines = []
    for doc, batch in ((d, b) for d in runs for b in sorted(d.get("batches", {}), key=int)):
        recs = [r for r in doc["batches"][batch].get("records", []) if r.get("trace")]
        if not recs:
            continue
        cells = []
        for key, _ in TRACE_COLUMNS:
            vals = [r["trace"][key] for r in recs if r["trace"].get(key) is not None]
            cells.append(_f(statistics.median(vals) if vals else None, "{:.1f}"))
        tpot = statistics.median(r["tpot_s"] for r in recs) * 1e3
        bound = [r["tpot_io_bound_s"] for r in recs if r.get("tpot_io_bound_s")]
        lines.append(f"| {doc.get('label', doc['system'])} | {_budget(doc.get('budget_frac'))} | {batch} | {tpot:.1f} "
                     f"| {_f(statistics.median(bound) * 1e3 if bound else None, '{:.1f}')} | " + " | ".join(cells)
                     + " |")
    if not lines:
        return []
    head = "| system | budget | batch | step ms | I/O bound ms | " + " | ".join(c for _, c in TRACE_COLUMNS) + " |"
    return ["Where a decode step goes (engine trace, ms per step, medians over a batch size's generate() calls; "
            "the gap between layers is the model's code + our tail + our head):", "", head,
            "|" + "---|" * (head.count("|") - 1), *lines, ""]


def markdown(runs: list[dict[str, Any]], plot_dir: str = ".") -> str:
    """The BENCHMARKS.md section: provenance, table, targets, systems that did not run, plots."""
    rs = rows(runs)
    first = next((d for d in runs if d.get("machine")), {})
    m, model = first.get("machine", {}), first.get("model", {})
    gpu = f", GPU {m['gpu']}" if m.get("gpu") else ""
    commits = sorted({d.get("commit", "?") for d in runs})
    commands = sorted({c for d in runs for c in d.get("commands") or [d.get("command", "?")]})
    notes = sorted({f"{d['system']}: {d['page_cache']}" for d in runs if d.get("page_cache")})
    merges = sorted({f"{d['system']}: {r['merge']}" for d in runs for b in (d.get("batches") or {}).values()
                     for r in b.get("records", []) if r.get("merge")})
    skipped = [f"- {d['system']} at {_budget(d.get('budget_frac'))}: {d['status']} — {d.get('reason', '')}"
               for d in runs if d.get("status") in ("unavailable", "failed")]
    parts = [
        BEGIN, "## End-to-end (issue 6) — generated by `zipmoe bench e2e --report`", "",
        f"Machine: {m.get('cpu', '?')}, {m.get('cores', '?')} cores, "
        f"{(m.get('ram_bytes') or 0) / 2**30:.0f} GiB RAM{gpu}; torch {m.get('torch', '?')}, "
        f"transformers {m.get('transformers', '?')}; device `{m.get('device', '?')}`. Commit: {', '.join(commits)}.",
        f"Model: synthetic `{model.get('shape', '?')}` (layers={model.get('layers')}, scale={model.get('scale')}), "
        f"{model.get('experts', '?')} routed experts, {(model.get('expert_bf16_bytes') or 0) / 1e9:.2f} GB BF16 "
        f"experts stored in {(model.get('expert_stored_bytes') or 0) / 1e9:.2f} GB; budgets are shares of the "
        "BF16 expert bytes on top of dense weights + staging, the same total for every system. Routing: the "
        "calibrated sampler, same sequence per prompt for every system"
        + (" except llama.cpp, whose router cannot be replaced (its own routing)." if any(
            d.get("system") == "llama.cpp" and d.get("status") != "unavailable" for d in runs) else "."),
        "", "Commands:", "", *[f"    {c}" for c in commands], "",
        table(rs), "", "Against the targets (issue 6):", *targets(rs), "", *trace_table(runs),
        "Page cache:", *[f"- {n}" for n in notes], "",
        *(["Where experts are recombined (workers: fused decode; triton / torch: late merge on the device):",
           *[f"- {n}" for n in merges], ""] if merges else []),
    ]
    cold = sorted({f"- {w['system']} ({w['status']}): {w['groups_covered']} of {w['groups']} prompt groups per "
                   "batch size" for d in runs for w in d.get("warm_process", []) if w["groups_covered"] != w["groups"]})
    if cold:
        parts += ["Process warm-up cut short (the first run to meet a group it missed pays that group's CUDA "
                  "attention graph builds):", *cold, ""]
    if skipped:
        parts += ["Systems that did not run:", *skipped, ""]
    parts += [f"![TPOT vs budget]({plot_dir}/{PLOTS[0]}) ![throughput vs batch]({plot_dir}/{PLOTS[1]}) "
              f"![time breakdown]({plot_dir}/{PLOTS[2]})", END]
    return "\n".join(parts) + "\n"


def splice(md_path: Path, section: str) -> None:
    """Replace the generated section of a markdown file (between markers), or append it."""
    text = md_path.read_text() if md_path.exists() else ""
    pattern = re.compile(re.escape(BEGIN) + ".*?" + re.escape(END) + "\n?", re.S)
    text = pattern.sub(lambda _: section, text) if pattern.search(text) else text.rstrip("\n") + "\n\n" + section
    md_path.write_text(text)


def write_report(runs: list[dict[str, Any]], out_dir: Path, benchmarks_md: str | None = None) -> Path:
    """report/e2e.md + the three PNGs; optionally splice the section into benchmarks_md."""
    out_dir.mkdir(parents=True, exist_ok=True)
    rs = rows(runs)
    plot_tpot_vs_budget(rs, out_dir / PLOTS[0])
    plot_throughput_vs_batch(rs, out_dir / PLOTS[1])
    plot_time_breakdown(rs, out_dir / PLOTS[2])
    (out_dir / "e2e.md").write_text(markdown(runs, "."))
    if benchmarks_md:  # image links relative to the markdown file (copy the PNGs into the repo to keep them)
        md = Path(benchmarks_md)
        splice(md, markdown(runs, os.path.relpath(out_dir.resolve(), md.resolve().parent)))
    return out_dir / "e2e.md"


# ---------------------------------------------------------------- plots (matplotlib, headless)

def _pyplot() -> Any:
    import matplotlib

    matplotlib.use("Agg")  # no display on CI or the device
    import matplotlib.pyplot as plt

    return plt


def _save(fig: Any, ax: Any, path: Path, title: str) -> None:
    ax.set_title(title, fontsize=10)
    if ax.get_legend_handles_labels()[0]:
        ax.legend(fontsize=8)
    ax.grid(True, alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    _pyplot().close(fig)


def plot_tpot_vs_budget(rs: list[dict[str, Any]], path: Path) -> None:
    """Median TPOT at the smallest batch size vs budget, 10–90 % bars; all-resident runs as lines."""
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(6, 4))
    batch = min((r["batch"] for r in rs), default=1)
    for name in dict.fromkeys(r["system"] for r in rs):
        mine = sorted((r for r in rs if r["system"] == name and r["batch"] == batch and r["tpot_s"]["median"]),
                      key=lambda r: 2.0 if r["budget"] is None else r["budget"])
        sized = [r for r in mine if r["budget"] is not None]
        if sized:
            y = [r["tpot_s"]["median"] for r in sized]
            err = [[m - r["tpot_s"]["p10"] for m, r in zip(y, sized, strict=True)],
                   [r["tpot_s"]["p90"] - m for m, r in zip(y, sized, strict=True)]]
            ax.errorbar([100 * r["budget"] for r in sized], y, yerr=err, marker="o", capsize=3, label=mine[0]["label"])
        for r in mine:
            if r["budget"] is None:
                ax.axhline(r["tpot_s"]["median"], linestyle="--", linewidth=1, color="0.3",
                           label=f"{r['label']}, budget all")
    ax.set_xlabel("expert budget (% of BF16 expert bytes)")
    ax.set_ylabel("TPOT, s (median, 10–90 %)")
    ax.set_yscale("log")
    _save(fig, ax, path, f"Time per output token vs budget (batch {batch})")


def plot_throughput_vs_batch(rs: list[dict[str, Any]], path: Path) -> None:
    """Generated tokens per second of wall time vs batch size, one line per system × budget."""
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(6, 4))
    for key in dict.fromkeys((r["system"], r["budget"]) for r in rs):
        mine = sorted((r for r in rs if (r["system"], r["budget"]) == key and r["tok_per_s"]), key=lambda r: r["batch"])
        if mine:
            ax.plot([r["batch"] for r in mine], [r["tok_per_s"] for r in mine], marker="o",
                    label=f"{mine[0]['label']}, {_budget(key[1])}")
    ax.set_xscale("log", base=2)
    ax.set_yscale("log")
    ax.set_xlabel("batch size")
    ax.set_ylabel("tokens / s (end to end)")
    _save(fig, ax, path, "Throughput vs batch size")


def breakdown(r: dict[str, Any]) -> dict[str, float]:
    """Seconds per batch in prefill and in decode: stall, expert compute, everything else."""
    n = max(1, r["batches"])
    decode = r["decode_wall_s"] / n
    stall = (r.get("decode_stall_s") or 0.0) / n
    experts = max(0.0, (r.get("decode_layer_s") or 0.0) / n - stall)
    return {"prefill": r["prefill_s"] / n, "decode: I/O + decode stall": stall,
            "decode: expert compute": experts, "decode: other": max(0.0, decode - stall - experts)}


def plot_time_breakdown(rs: list[dict[str, Any]], path: Path) -> None:
    """Stacked bars per system × budget at the smallest batch size: where a request's time goes."""
    plt = _pyplot()
    batch = min((r["batch"] for r in rs), default=1)
    mine = [r for r in rs if r["batch"] == batch]
    fig, ax = plt.subplots(figsize=(max(6, 1.1 * len(mine)), 4))
    parts = [breakdown(r) for r in mine]
    bottom = [0.0] * len(mine)
    for part in ("prefill", "decode: I/O + decode stall", "decode: expert compute", "decode: other"):
        vals = [p[part] for p in parts]
        ax.bar(range(len(mine)), vals, bottom=bottom, label=part)
        bottom = [b + v for b, v in zip(bottom, vals, strict=True)]
    ax.set_xticks(range(len(mine)), [f"{r['label']}\n{_budget(r['budget'])}" for r in mine], fontsize=7)
    ax.set_ylabel("seconds per request (mean)")
    _save(fig, ax, path, f"Time breakdown per request (batch {batch})")
