"""Token generation shared by `zipmoe generate`, `zipmoe chat` and the server (user surface).

In: a ModelHandle (model + tokenizer + stats) and prompt token ids; out: text deltas as tokens are
sampled, then a GenerationResult with usage counts and timings. A `Generation` advances one token per
`step()` call, so the server's engine thread can interleave many requests on one model; every call
runs on the thread that owns the model. Times in seconds.
"""

from __future__ import annotations

import contextlib
import json
import logging
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TextIO

import torch

from zipmoe.errors import ZipMoEError

log = logging.getLogger("zipmoe.generation")

STORE_MANIFEST = "zipmoe.json"  # a directory holding this file is a zipmoe store
MAX_STOPS = 4  # stop strings per request (OpenAI's limit)
MAX_STOP_CHARS = 256  # characters per stop string: bounds the per-token stop search


@dataclass
class ModelHandle:
    """What the user surface needs from a loaded model; built only by `load_handle` (one switch)."""

    model: Any  # a transformers PreTrainedModel in eval mode; generate() unchanged
    tokenizer: Any  # the model's own tokenizer (chat template included when it has one)
    model_id: str  # name shown by /v1/models and checked against requests
    stats_fn: Callable[[], dict] | None = None  # engine cache statistics snapshot (None: plain HF)
    eos_ids: frozenset[int] = frozenset()  # tokens that end a generation

    @property
    def context_length(self) -> int:
        """Tokens the model attends over (prompt + completion)."""
        return int(getattr(self.model.config, "max_position_embeddings", None) or 2048)

    def stats(self) -> dict:
        """Cumulative engine statistics, or {} when the model is not served by the engine."""
        return dict(self.stats_fn()) if self.stats_fn is not None else {}


def resolve_device(device: str | None) -> str:
    """'auto' (or None) means CUDA when available, else CPU."""
    if device in (None, "auto"):
        return "cuda" if torch.cuda.is_available() else "cpu"
    return device


def load_handle(
    path: str | Path,
    device: str | None = "cpu",
    memory_budget: int | str | None = None,
    threads: int | None = None,
    model_id: str | None = None,
    progress: Callable[[str, int, int], None] | None = None,
) -> ModelHandle:
    """Load a zipmoe store through the engine, or any local HF checkpoint with plain transformers.

    progress(stage, done, total) follows a store's loading stages (see zipmoe.models.load.load);
    transformers reports its own for a checkpoint."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    path = Path(path).expanduser()
    if not (path / "config.json").is_file() and not (path / STORE_MANIFEST).is_file():
        raise ZipMoEError(
            f"{path} is not a model directory (no config.json or {STORE_MANIFEST}); pass a store made "
            "by 'zipmoe convert' or a local Hugging Face checkpoint directory"
        )
    _check_decoder_only(path)
    device = resolve_device(device)
    stats_fn = None
    if (path / STORE_MANIFEST).is_file():
        model, stats_fn = _load_store(path, device, memory_budget, threads, progress)
    else:
        if memory_budget is not None:
            log.warning("%s is not a zipmoe store: --memory-budget is ignored (everything is loaded)", path)
        model = AutoModelForCausalLM.from_pretrained(path, dtype="auto").to(device)
    try:
        tokenizer = AutoTokenizer.from_pretrained(path)
    except (OSError, ValueError) as exc:
        raise ZipMoEError(f"cannot load a tokenizer from {path}: {exc}; it needs tokenizer files") from exc
    model.eval()
    return ModelHandle(model, tokenizer, model_id or path.name, stats_fn, _eos_ids(model, tokenizer))


def _check_decoder_only(path: Path) -> None:
    """This loop feeds a causal LM its own tokens; an encoder-decoder model needs model.generate()."""
    try:
        config = json.loads((path / "config.json").read_text())
    except (OSError, ValueError):
        return  # the loader below reports a missing or broken config
    if config.get("is_encoder_decoder"):
        raise ZipMoEError(
            f"{path} holds an encoder-decoder model ({config.get('model_type')}); generate, chat and serve run "
            "decoder-only models. Use the Python API: model = zipmoe.load(store, memory_budget=...) and "
            "tokenizer = transformers.AutoTokenizer.from_pretrained(store), then "
            "model.generate(**tokenizer(text, return_tensors='pt'))"
        )


def _load_store(
    path: Path, device: str, budget: int | str | None, threads: int | None,
    progress: Callable[[str, int, int], None] | None,
) -> tuple[Any, Callable]:
    """The engine path: zipmoe.load + its statistics (kept here so the switch lives in one place)."""
    from zipmoe.models.load import load

    model = load(str(path), device=device, memory_budget=budget, workers=threads, progress=progress)
    return model, model.zipmoe_engine.stats.snapshot


def _eos_ids(model: Any, tokenizer: Any) -> frozenset[int]:
    ids: set[int] = set()
    gen_cfg = getattr(model, "generation_config", None)
    for value in (getattr(gen_cfg, "eos_token_id", None), getattr(tokenizer, "eos_token_id", None)):
        if isinstance(value, int):
            ids.add(value)
        elif isinstance(value, list | tuple):
            ids.update(int(v) for v in value)
    return frozenset(ids)


def encode_prompt(handle: ModelHandle, prompt: str) -> list[int]:
    """A plain completion prompt as the tokenizer encodes it (special tokens such as BOS included)."""
    return list(handle.tokenizer(prompt).input_ids)


def encode_chat(handle: ModelHandle, messages: Sequence[dict[str, str]]) -> list[int]:
    """Messages rendered with the model's own chat template, ready for the assistant's turn."""
    tok = handle.tokenizer
    if not getattr(tok, "chat_template", None):
        raise ZipMoEError(f"model {handle.model_id!r} has no chat template; use plain completion instead")
    text = tok.apply_chat_template(list(messages), tokenize=False, add_generation_prompt=True)
    return list(tok(text, add_special_tokens=False).input_ids)


@dataclass(frozen=True)
class SamplingParams:
    """How to pick tokens; temperature 0 is greedy (deterministic, what bit-exact tests compare)."""

    max_tokens: int = 256  # upper bound on sampled tokens; also stopped by EOS, stop strings, context end
    temperature: float = 0.0  # 0 = greedy argmax
    top_p: float = 1.0  # nucleus sampling mass, (0, 1]
    seed: int | None = None  # per-request RNG seed: same seed, same text, whatever else runs
    stop: tuple[str, ...] = ()  # text that ends the generation (not included in the output)

    def __post_init__(self) -> None:
        if len(self.stop) > MAX_STOPS:
            raise ZipMoEError(f"at most {MAX_STOPS} stop strings are allowed, got {len(self.stop)}")
        if any(len(s) > MAX_STOP_CHARS for s in self.stop):
            longest = max(len(s) for s in self.stop)
            raise ZipMoEError(f"a stop string may have at most {MAX_STOP_CHARS} characters, got one of {longest}")


@dataclass
class GenerationResult:
    text: str  # the completion (stop string excluded)
    prompt_tokens: int
    completion_tokens: int  # tokens sampled, EOS included
    finish_reason: str  # "stop" (EOS or stop string) or "length"
    ttft_s: float  # submission -> first token
    tpot_s: float  # mean time per output token after the first
    token_ids: list[int] = field(default_factory=list)


class Generation:
    """One request's decoding state: KV cache, sampled ids, text already handed out. Not thread-safe."""

    def __init__(self, handle: ModelHandle, prompt_ids: Sequence[int], params: SamplingParams,
                 t_submit: float | None = None):
        if not prompt_ids:
            raise ZipMoEError("the prompt is empty: give at least one token of text")
        self.handle, self.params = handle, params
        self.prompt_ids = list(prompt_ids)
        self.ids: list[int] = []
        self.text = ""  # text handed out so far
        self.finish_reason: str | None = None
        self.t_submit = time.perf_counter() if t_submit is None else t_submit
        self._t_first = self._t_last = 0.0
        self._cache: Any = None
        self._limit = min(params.max_tokens, handle.context_length - len(self.prompt_ids))
        self._rng = torch.Generator().manual_seed(params.seed if params.seed is not None else
                                                  int(torch.randint(0, 2**62, ()).item()))

    @property
    def finished(self) -> bool:
        return self.finish_reason is not None

    def step(self) -> str:
        """Run one forward (the prefill first), sample one token; returns the new text (may be '')."""
        if self.finished:
            return ""
        if self._limit <= 0:
            self.finish_reason = "length"
            return self._flush()
        token = self._sample(self._forward())
        now = time.perf_counter()
        self._t_first = self._t_first or now
        self._t_last = now
        self.ids.append(token)
        if token in self.handle.eos_ids:
            self.finish_reason = "stop"
            return self._flush()
        if len(self.ids) >= self._limit:
            self.finish_reason = "length"
        return self._advance_text()

    def result(self) -> GenerationResult:
        n = len(self.ids)
        return GenerationResult(
            text=self.text, prompt_tokens=len(self.prompt_ids), completion_tokens=n,
            finish_reason=self.finish_reason or "length",
            ttft_s=(self._t_first - self.t_submit) if n else 0.0,
            tpot_s=(self._t_last - self._t_first) / (n - 1) if n > 1 else 0.0,
            token_ids=list(self.ids),
        )

    def release(self) -> None:
        """Drop the KV cache now (a cancelled request must not hold memory until GC)."""
        self._cache = None

    def _forward(self) -> torch.Tensor:
        model = self.handle.model
        new = self.prompt_ids if self._cache is None else self.ids[-1:]
        ids = torch.tensor([new], dtype=torch.long, device=model.device)
        # decode steps run as in model.generate(), which may switch kernels for them (GPU grouped_mm →
        # batched_mm, models/compute.py), so the text equals plain transformers' bit for bit
        decode_mode = getattr(model, "_optimize_model_for_decode", None) if self._cache is not None else None
        with torch.inference_mode(), (decode_mode() if decode_mode is not None else contextlib.nullcontext()):
            out = model(input_ids=ids, cache=self._cache, use_cache=True, logits_to_keep=1)
        self._cache = out.cache
        return out.logits[0, -1].float()

    def _sample(self, logits: torch.Tensor) -> int:
        p = self.params
        if p.temperature <= 0:
            return int(torch.argmax(logits).item())
        scaled = logits.cpu().double()  # float64 and max-shifted: a tiny temperature must not overflow to NaN
        probs = torch.softmax((scaled - scaled.max()) / p.temperature, dim=-1).float()
        if p.top_p < 1.0:
            sorted_p, order = torch.sort(probs, descending=True)
            drop = (torch.cumsum(sorted_p, 0) - sorted_p) >= p.top_p  # keep the smallest set reaching top_p
            sorted_p[drop] = 0.0
            probs = torch.zeros_like(probs).scatter_(0, order, sorted_p)
        return int(torch.multinomial(probs, 1, generator=self._rng).item())

    def _decode(self) -> str:
        return self.handle.tokenizer.decode(
            [t for t in self.ids if t not in self.handle.eos_ids],
            skip_special_tokens=True, clean_up_tokenization_spaces=False,
        )

    def _advance_text(self) -> str:
        """New text that is safe to hand out: not a partial UTF-8 char, not a possible stop prefix."""
        full = self._decode()
        cut = _find_stop(full, self.params.stop, start=self._stop_window())
        if cut is not None:
            self.finish_reason = "stop"
            return self._emit(full[:cut])
        if self.finished:
            return self._emit(full)
        safe = len(full) - _stop_holdback(full, self.params.stop)
        while safe > len(self.text) and full[safe - 1] == "\ufffd":
            safe -= 1
        return self._emit(full[:safe])

    def _flush(self) -> str:
        full = self._decode()
        cut = _find_stop(full, self.params.stop, start=self._stop_window())
        return self._emit(full if cut is None else full[:cut])

    def _stop_window(self) -> int:
        """Where a stop not seen yet can start: the text handed out held none, so it ends after that."""
        return max(0, len(self.text) - _longest(self.params.stop) + 1)

    def _emit(self, upto: str) -> str:
        if not upto.startswith(self.text):  # the tokenizer re-segmented earlier text: send nothing wrong
            log.debug("decoded text changed under already-sent text; holding the difference")
            return ""
        delta, self.text = upto[len(self.text):], upto
        return delta


def _longest(stop: Sequence[str]) -> int:
    return max((len(s) for s in stop), default=0)


def _find_stop(text: str, stop: Sequence[str], start: int) -> int | None:
    """Index of the earliest stop string in text[start:] (only that window is searched), else None."""
    hits = [i for s in stop if s and (i := text.find(s, start)) >= 0]
    return min(hits) if hits else None


def _stop_holdback(text: str, stop: Sequence[str]) -> int:
    """Length of the longest suffix of text that begins some stop string (it may still complete).

    Only the last len(s) - 1 characters can hold such a suffix, so only they are looked at: each
    place where s's first character occurs there is a candidate, tried from the longest suffix down.
    """
    best = 0
    for s in stop:
        i = text.find(s[0], max(0, len(text) - len(s) + 1)) if s else -1
        while i >= 0 and len(text) - i > best:
            if s.startswith(text[i:]):
                best = len(text) - i
                break
            i = text.find(s[0], i + 1)
    return best


def stream(handle: ModelHandle, prompt_ids: Sequence[int], params: SamplingParams) -> Iterator[str]:
    """Yield text deltas until the generation ends; the final GenerationResult is the return value."""
    gen = Generation(handle, prompt_ids, params)
    while not gen.finished:
        delta = gen.step()
        if delta:
            yield delta
    gen.release()
    return gen.result()



def write_stream(
    out: TextIO, handle: ModelHandle, prompt_ids: Sequence[int], params: SamplingParams
) -> GenerationResult:
    """Stream the completion's text to a file-like `out` as it is generated; return the result."""
    gen = stream(handle, prompt_ids, params)
    while True:
        try:
            out.write(next(gen))
            out.flush()
        except StopIteration as stop:
            return stop.value

def generate(handle: ModelHandle, prompt_ids: Sequence[int], params: SamplingParams) -> GenerationResult:
    """Run one generation to the end (the same steps as the server, so greedy text matches it)."""
    gen = Generation(handle, prompt_ids, params)
    while not gen.finished:
        gen.step()
    gen.release()
    return gen.result()
