"""What every end-to-end system shares: the setup it gets, the routing hook, the generate loop.

bench stage. A system is prepare(setup, budget) → run(prompts, new_tokens) per batch → close();
run returns one metrics record (bench/metrics.py). Every system here is a transformers model, so
one loop drives them all: left-padded batch → model.generate (greedy, exactly new_tokens tokens)
with a StepProbe timing each forward and the calibrated routing hooked into every router, the same
per-prompt sequence for every system (random-weight models route degenerately).
B=batch rows T=tokens per row k=top-k; sizes in bytes, times in s.
"""

from __future__ import annotations

import re
import time
from dataclasses import asdict, dataclass, field
from typing import Any

import torch
from transformers import StoppingCriteria, StoppingCriteriaList

from zipmoe.bench.metrics import StepProbe, batch_record, os_read_bytes
from zipmoe.bench.prompts import Prompt
from zipmoe.bench.routing import RequestRouting, RouterOverride, RoutingSampler
from zipmoe.errors import ZipMoEError
from zipmoe.models.compute import to_device_async

_LAYER_RE = re.compile(r"(?:^|\.)layers\.(\d+)\.")
WARMUP_ROUTING_INDEX = 1 << 30  # routing stream of warm-up requests, apart from every prompt's


@dataclass(frozen=True)
class Setup:
    """Everything a system needs to load and run; plain data, so it can cross into a child process."""

    workdir: str  # the suite's working directory (scratch space such as offload folders goes here)
    hf_dir: str  # the HF checkpoint (BF16 safetensors) every system is built from
    stores: dict[str, str]  # exponent coder id -> converted store directory ("huffman", "raw")
    device: str  # "cuda" or "cpu"
    workers: int  # decode workers of our engine (the decode lower bound divides by it)
    disk_bytes_per_s: float  # measured O_DIRECT read bandwidth of the workdir's disk
    routing_profile: str  # bench/routing.py profile the sampler is calibrated to
    seed: int  # routing seed (prompts have their own)
    pad_token_id: int  # left-padding id of batched prompts
    experts_implementation: str | None = None  # transformers experts implementation (None: its default)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


@dataclass(frozen=True)
class Budget:
    """One memory budget of the comparison: a share of the BF16 expert bytes, as total bytes."""

    frac: float | None  # share of BF16 expert bytes; None = everything fits
    nbytes: int | None  # the total the system may hold (dense + staging + experts); None = unlimited

    @property
    def label(self) -> str:
        return "all" if self.frac is None else f"{self.frac:g}"


def routers(model: torch.nn.Module) -> list[tuple[int, torch.nn.Module]]:
    """(decoder layer, router) of every routed-MoE gate, ascending by layer.

    Matches transformers' router classes (Qwen2MoeTopKRouter, Qwen3MoeTopKRouter, MixtralTopKRouter,
    OlmoeTopKRouter, DeepseekV2TopkRouter; each returns (logits, top-k weights, top-k ids)) and, for
    other versions, any module named `….gate` that has a top_k.
    """
    found = []
    for name, module in model.named_modules():
        is_router = type(module).__name__.lower().endswith("router") or name.endswith(".gate")
        if is_router and hasattr(module, "top_k") and hasattr(module, "weight"):
            m = _LAYER_RE.search(name + ".")
            if m is None:
                raise ZipMoEError(f"router {name!r} is not under a '.layers.<n>.' path")
            found.append((int(m.group(1)), module))
    if not found:
        raise ZipMoEError(f"{type(model).__name__} has no transformers MoE router module (…TopKRouter) to "
                          "drive with the calibrated routing")
    return sorted(found, key=lambda x: x[0])


class PromptRouting(RouterOverride):
    """RouterOverride whose rows follow prompt indices, so prompt i routes the same in every system."""

    def begin_prompts(self, indices: list[int]) -> None:
        self.rows = [RequestRouting(self.sampler, i) for i in indices]


def sampler_for(model: torch.nn.Module, profile: str, seed: int) -> RoutingSampler:
    """The calibrated sampler for this model's MoE layers, experts and top-k."""
    found = routers(model)
    gate = found[0][1]
    e, k = int(getattr(gate, "num_experts", None) or gate.weight.shape[0]), int(gate.top_k)
    return RoutingSampler(profile, e, k, len(found), seed=seed, layer_ids=[layer for layer, _ in found])


def hook_routers(model: torch.nn.Module, override: RouterOverride) -> list[torch.utils.hooks.RemovableHandle]:
    """Replace each router's top-k ids by the override's (the weights stay the router's own).

    On CUDA the ids go over from pinned memory without blocking: a pageable `.to(device)` synchronises the
    stream, which a model's own routing does not do here, so every layer would wait for the kernels queued
    before it and the wait would show up as the model's code (BENCHMARKS.md, tenth session)."""
    handles = []
    for layer, module in routers(model):
        def hook(mod: torch.nn.Module, args: Any, output: Any, layer: int = layer) -> Any:
            logits, weights, _ = output
            rows = len(override.rows)
            if rows == 0 or logits.shape[0] % rows:
                raise ZipMoEError(f"router of layer {layer} got {logits.shape[0]} tokens for {rows} routed rows")
            ids = override.topk(layer, rows, logits.shape[0] // rows)
            return logits, weights, to_device_async(torch.from_numpy(ids), logits.device)

        handles.append(module.register_forward_hook(hook))
    return handles


@dataclass
class HFSystem:
    """Base of every system: subclasses load the model (_load) and may add counters (_counters)."""

    name: str = "base"  # the --systems name
    label: str = "base"  # how tables and plots name it
    page_cache: str = "n/a"  # how the page cache is kept from holding what the budget excludes
    info: dict[str, Any] = field(default_factory=dict)  # system facts for the run JSON
    model: Any = None
    setup: Setup | None = None

    def unavailable(self) -> str | None:
        """Why this system cannot run here (missing package, no device), or None."""
        return None

    def budgets(self, budgets: list[Budget]) -> list[Budget]:
        """The budgets this system runs at (the all-resident ceiling runs once)."""
        return budgets

    def page_cache_files(self, setup: Setup) -> list[str]:
        """The files it reads through the page cache, which the suite evicts before each of its budgeted runs
        (bench/e2e.py _isolation)."""
        return [setup.hf_dir]

    def _load(self, setup: Setup, budget: Budget) -> torch.nn.Module:
        raise NotImplementedError

    def reset_peak_memory(self) -> None:
        """Start a new peak interval for what peak_memory() reports (at each batch size's start)."""

    def peak_memory(self) -> dict[str, Any]:
        """Peaks that replace the harness process's own (bench/metrics.PeakMemory) for a system that runs
        elsewhere (a server process); {} where the model runs in this process."""
        return {}

    def _counters(self) -> dict[str, Any]:
        return {"os_read_bytes": os_read_bytes()}

    def _routing(self, setup: Setup) -> PromptRouting | None:
        """The calibrated routing every compared system runs (None: the model's own routers)."""
        return PromptRouting(sampler_for(self.model, setup.routing_profile, setup.seed))

    def prepare(self, setup: Setup, budget: Budget) -> None:
        """Load the model under `budget` and hook the calibrated routing into it."""
        self.setup = setup
        self.model = self._load(setup, budget)
        self.routing = self._routing(setup)
        self._hooks = hook_routers(self.model, self.routing) if self.routing is not None else []
        self.probe = StepProbe(self.model, self._counters, cuda=setup.device.startswith("cuda"))

    def run(self, prompts: list[Prompt], new_tokens: int, deadline: float | None = None) -> dict[str, Any]:
        """Generate exactly new_tokens for each prompt as one left-padded batch; its metrics record.

        deadline (epoch s): generation stops at the first step past it and the record says
        "aborted" (callers drop it), so a device call never overruns by more than one step.
        """
        assert self.setup is not None and self.model is not None, "prepare() first"
        pad = self.setup.pad_token_id
        width = max(len(p) for p in prompts)
        ids = torch.full((len(prompts), width), pad, dtype=torch.long)
        mask = torch.zeros_like(ids)
        for row, p in enumerate(prompts):
            ids[row, width - len(p):] = torch.tensor(p.token_ids)
            mask[row, width - len(p):] = 1
        if self.routing is not None:  # None: the model's own routers (the attention warm-up's clone)
            self.routing.begin_prompts([p.index for p in prompts])
        base = self.probe.start()
        t0 = _now(self.setup.device)
        with torch.no_grad():
            self.model.generate(input_ids=ids.to(self.setup.device), attention_mask=mask.to(self.setup.device),
                                max_new_tokens=new_tokens, min_new_tokens=new_tokens, do_sample=False,
                                pad_token_id=pad, stopping_criteria=StoppingCriteriaList([_Deadline(deadline)]))
        wall = _now(self.setup.device) - t0
        rec = batch_record(base, self.probe.steps, rows=len(prompts), prompt_lens=[len(p) for p in prompts],
                           wall_s=wall, disk_bytes_per_s=self.setup.disk_bytes_per_s, workers=self.setup.workers)
        rec["aborted"] = len(self.probe.steps) < new_tokens
        return rec

    def warmup(self, vocab_size: int) -> None:
        """One 8-token prefill on its own routing stream (kernel selection, allocator, first-call costs)."""
        ids = tuple(range(3, 11)) if vocab_size > 11 else (1,) * 8
        self.run([Prompt(WARMUP_ROUTING_INDEX, ids, 1)], 1)

    def close(self) -> None:
        """Free the model (and whatever the system set up for it)."""
        for h in getattr(self, "_hooks", []):
            h.remove()
        if getattr(self, "probe", None) is not None:
            self.probe.remove()
        self.model = None
        if self.setup is not None and self.setup.device.startswith("cuda"):
            torch.cuda.empty_cache()


class _Deadline(StoppingCriteria):
    """Stops generate() once the wall clock passes the deadline (None: never)."""

    def __init__(self, deadline: float | None):
        self.deadline = deadline

    def __call__(self, input_ids: torch.Tensor, scores: Any, **kwargs: Any) -> torch.Tensor:
        late = self.deadline is not None and time.time() > self.deadline
        return torch.full((input_ids.shape[0],), late, dtype=torch.bool, device=input_ids.device)


def _now(device: str) -> float:
    if device.startswith("cuda"):
        torch.cuda.synchronize()
    return time.perf_counter()
