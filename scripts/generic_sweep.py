"""Which HF MoE causal LMs does zipmoe serve bit-exactly through its generic rule (no adapter of their own)?

Per model type: a tiny random checkpoint (hidden 64, 2 layers, 8 experts), converted, loaded everything
fits / half / minimum, logits (batch 1 and 4, left padding) and greedy tokens torch.equal to plain
transformers on the CPU. One subprocess per type; a row per type printed and appended to
$ZIPMOE_SWEEP_DIR/results.jsonl (default /tmp/zipmoe-sweep).

    HF_HUB_OFFLINE=1 .venv/bin/python scripts/generic_sweep.py [TYPE ...]   # no TYPE: every type in TYPES
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time
import traceback
from pathlib import Path
from typing import Any

ROOT = Path(os.environ.get("ZIPMOE_SWEEP_DIR", "/tmp/zipmoe-sweep"))
RESULTS = ROOT / "results.jsonl"
REPO = Path(__file__).resolve().parents[1]

# priority order first, then the rest of the CausalLM-loadable @use_experts_implementation types
TYPES = [
    "deepseek_v3", "glm4_moe", "phimoe", "granitemoe", "granitemoeshared", "hunyuan_v1_moe", "ernie4_5_moe",
    "dots1", "minimax", "minimax_m2", "exaone_moe", "flex_olmo", "lfm2_moe", "qwen3_next", "qwen3_5_moe_text",
    "gpt_oss", "jamba", "cohere2_moe", "afmoe", "bailing_hybrid", "kimi_linear",
    "glm4_moe_lite", "deepseek_v32", "glm_moe_dsa", "solar_open", "mellum", "beam", "granitemoe_swa",
    "granitemoehybrid", "nemotron_h", "mimo_v2_flash", "laguna", "hy_v3", "dots3_note_text", "qwen4_exp_text",
    "axk1", "axk2", "deepseek_v4", "flint", "hy_v4", "kolibri1", "lara_mini", "zaya",
]

COMMON = dict(
    vocab_size=160, hidden_size=64, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
    head_dim=16, intermediate_size=96, moe_intermediate_size=32, num_experts=8, num_local_experts=8,
    n_routed_experts=8, moe_num_experts=8, num_experts_per_tok=3, moe_k=3, first_k_dense_replace=0,
    max_position_embeddings=256, tie_word_embeddings=False, decoder_sparse_step=1, mlp_only_layers=[],
    moe_layer_start_index=0, moe_layer_end_index=-1, moe_layer_interval=1, num_dense_layers=0,
    n_shared_experts=1, moe_topk=3, topk_group=1, n_group=1, shared_intermediate_size=32,
    shared_expert_intermediate_size=32, expert_interval=1, attn_layer_period=1, attn_layer_offset=0,
    expert_layer_period=1, expert_layer_offset=0, pad_token_id=0, bos_token_id=1, eos_token_id=2,
    # MLA (deepseek-style)
    kv_lora_rank=16, q_lora_rank=24, qk_nope_head_dim=8, qk_rope_head_dim=8, v_head_dim=16,
)

# per type: extra kwargs, and kwargs to drop from COMMON
OVERRIDES: dict[str, dict] = {
    "deepseek_v3": dict(head_dim=8, num_key_value_heads=4),
    "deepseek_v32": dict(head_dim=8, num_key_value_heads=4, index_n_heads=2, index_head_dim=16, index_topk=8),
    "glm_moe_dsa": dict(head_dim=8, num_key_value_heads=4, index_n_heads=2, index_head_dim=16, index_topk=8),
    "glm4_moe_lite": dict(head_dim=8, num_key_value_heads=4),
    "gpt_oss": dict(layer_types=["sliding_attention", "full_attention"], sliding_window=16),
    "qwen3_next": dict(layer_types=["linear_attention", "full_attention"], linear_num_value_heads=4,
                       linear_num_key_heads=2, linear_key_head_dim=16, linear_value_head_dim=16),
    "jamba": dict(attn_layer_period=2, attn_layer_offset=1, expert_layer_period=1, expert_layer_offset=0,
                  mamba_d_state=8, mamba_dt_rank=8, mamba_expand=2, use_mamba_kernels=False),
    "deepseek_v4": dict(mlp_layer_types=["moe", "moe"]),
    "nemotron_h": dict(layer_types=["linear_attention", "moe", "full_attention", "moe"], num_hidden_layers=4,
                       mamba_num_heads=4, mamba_head_dim=16, ssm_state_size=8, n_groups=1, chunk_size=16,
                       moe_shared_expert_intermediate_size=32),
    "zaya": dict(num_experts_per_tok=1),
    "axk1": dict(head_dim=8, num_key_value_heads=4),
    "axk2": dict(head_dim=8, num_key_value_heads=4),
    "granitemoehybrid": dict(layer_types=["linear_attention", "attention"], mamba_n_heads=4, mamba_d_head=32,
                             mamba_d_state=8, mamba_n_groups=1, mamba_chunk_size=16),
    "dots3_note_text": dict(num_key_value_heads=4),
    "qwen3_5_moe_text": dict(layer_types=["linear_attention", "full_attention"]),
    "qwen4_exp_text": dict(layer_types=["linear_attention", "full_attention"], indexer_n_heads=2, indexer_kv_heads=1,
                      indexer_head_dim=16, indexer_budget=8, indexer_compress_ratio=4, linear_num_value_heads=4,
                      linear_num_key_heads=2, linear_key_head_dim=16, linear_value_head_dim=16),
    "lfm2_moe": dict(num_dense_layers=0, layer_types=["conv", "full_attention"]),
    "minimax": dict(layer_types=["linear_attention", "full_attention"], block_size=16),
}

def tiny_config(model_type: str) -> tuple[Any, dict]:
    import inspect

    from transformers.models.auto.configuration_auto import CONFIG_MAPPING

    cls = CONFIG_MAPPING[model_type]
    default = cls()
    known = set(default.to_dict()) | set(inspect.signature(cls.__init__).parameters)
    known |= {f for f in getattr(cls, "__dataclass_fields__", {})}
    kwargs = {k: v for k, v in COMMON.items() if k in known}
    kwargs.update(OVERRIDES.get(model_type, {}))
    n = kwargs.get("num_hidden_layers", 2)
    for k in ("layer_types", "mlp_layer_types", "moe_layers_enabled"):
        d = getattr(default, k, None)
        if isinstance(d, list) and k not in kwargs and not isinstance(getattr(cls, k, None), property):
            kwargs[k] = (d * n)[:n] if k != "mlp_layer_types" else ["sparse"] * n
    return cls(**kwargs), kwargs


def run_one(model_type: str) -> dict:
    import torch
    import transformers
    from tests.engine.engine_helpers import budgets, padded_inputs
    from tests.tiny_models import _randomize_

    from zipmoe.convert import convert
    from zipmoe.models.load import load, unload

    torch.set_num_threads(1)
    res: dict = {"type": model_type, "stage": "config"}
    work = ROOT / "work" / model_type
    shutil.rmtree(work, ignore_errors=True)
    work.mkdir(parents=True)
    try:
        cfg, _ = tiny_config(model_type)
        res["stage"] = "build"
        model = transformers.AutoModelForCausalLM.from_config(cfg, dtype=torch.float32)
        _randomize_(model, 0)
        model = model.to(torch.bfloat16).eval()
        mods = [(n, type(m).__name__, {f: getattr(m, f) for f in ("has_gate", "is_concatenated", "is_transposed",
                                                                   "has_bias", "has_post_expert_norm")})
                for n, m in model.named_modules() if hasattr(m, "is_concatenated")]
        res["experts_modules"] = [f"{n} {c} {fl}" for n, c, fl in mods[:1]] + ([f"... {len(mods)} total"])
        sd_names = list(model.state_dict())
        res["model_expert_names"] = [k for k in sd_names if "expert" in k][:8]
        model.generation_config.pad_token_id = None
        model.save_pretrained(work / "hf")
        del model
        from safetensors import safe_open

        names = []
        for f in sorted((work / "hf").glob("*.safetensors")):
            with safe_open(str(f), "pt") as fh:
                names += list(fh.keys())
        res["ckpt_expert_names"] = sorted(k for k in names if "expert" in k and ".layers.0." in k)[:10]
        res["stage"] = "convert"
        store = convert(work / "hf", work / "store", progress=False, workers=2)
        res["stage"] = "reference"
        ref = transformers.AutoModelForCausalLM.from_pretrained(work / "hf").eval()
        res["reference_impl"] = getattr(ref.config, "_experts_implementation", None)
        b = budgets(store)
        res["checks"] = {}
        res["maxdiff"] = {}
        for name in ("all", "half", "minimum"):
            res["stage"] = f"load[{name}]"
            m = load(store, memory_budget=b[name], workers=1, preload=None if name == "all" else False)
            try:
                res[f"resident[{name}]"] = bool(m.zipmoe_engine.resident)
                for batch in (1, 4):
                    ids, mask = padded_inputs(batch)
                    res["stage"] = f"ref-forward[b{batch}]"
                    with torch.no_grad():
                        want = ref(input_ids=ids, attention_mask=mask).logits
                    res["stage"] = f"forward[{name},b{batch}]"
                    with torch.no_grad():
                        got = m(input_ids=ids, attention_mask=mask).logits
                    eq = torch.equal(got, want)
                    res["checks"][f"{name}/b{batch}/logits"] = eq
                    if not eq:
                        res["maxdiff"][f"{name}/b{batch}"] = (got.float() - want.float()).abs().max().item()
                    res["stage"] = f"generate[{name},b{batch}]"
                    gen = dict(max_new_tokens=4, do_sample=False, pad_token_id=0)
                    with torch.no_grad():
                        out = m.generate(input_ids=ids, attention_mask=mask, **gen)
                        ref_out = ref.generate(input_ids=ids, attention_mask=mask, **gen)
                    res["checks"][f"{name}/b{batch}/generate"] = torch.equal(out, ref_out)
            finally:
                unload(m)
        res["stage"] = "done"
        res["result"] = "pass" if all(res["checks"].values()) else "fail"
    except Exception as e:
        res["result"] = "error"
        res["error"] = f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"[:600]
        res["traceback_tail"] = traceback.format_exc().splitlines()[-6:]
    return res


def main(argv: list[str]) -> None:
    if argv[:1] == ["--one"]:
        print("RESULT " + json.dumps(run_one(argv[1])), flush=True)
        return
    types = argv or TYPES
    env = dict(os.environ, HF_HUB_OFFLINE="1", PYTHONPATH=str(REPO), OMP_NUM_THREADS="1")
    ROOT.mkdir(parents=True, exist_ok=True)
    rows = []
    for t in types:
        t0 = time.time()
        try:
            p = subprocess.run([sys.executable, __file__, "--one", t], capture_output=True, text=True, env=env,
                               timeout=300)
            line = next((ln for ln in p.stdout.splitlines() if ln.startswith("RESULT ")), None)
            res = json.loads(line[7:]) if line else {"type": t, "result": "crash",
                                                      "error": (p.stderr.strip().splitlines() or ["?"])[-1]}
        except subprocess.TimeoutExpired:
            res = {"type": t, "result": "timeout"}
        res["seconds"] = round(time.time() - t0, 1)
        with RESULTS.open("a") as f:
            f.write(json.dumps(res) + "\n")
        rows.append(res)
        detail = res.get("error") or ({k: v for k, v in res.get("checks", {}).items() if not v} or "")
        print(f"{t:20s} {res['result']:6s} {res.get('stage', ''):22s} {res['seconds']:6.1f}s {detail} "
              f"{res.get('maxdiff') or ''}", flush=True)
        shutil.rmtree(ROOT / "work" / t, ignore_errors=True)


if __name__ == "__main__":
    main(sys.argv[1:])
