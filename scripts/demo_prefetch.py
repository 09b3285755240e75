"""Prefetch on a real-text model: the demo's upcycled SmolLM2 MoE (run `zipmoe demo --workdir DIR`
first), its own router-based next-layer prediction, prefetch off vs on, two interleaved repeats.

    python scripts/demo_prefetch.py DIR/smollm2-moe.zipmoe
"""
import statistics
import sys

import transformers

from zipmoe.models.load import load, unload

store = sys.argv[1]
tok = transformers.AutoTokenizer.from_pretrained(store)
msgs = [{"role": "user", "content": "Explain in three sentences why the sky is blue."}]
ids = tok.apply_chat_template(msgs, add_generation_prompt=True, return_tensors="pt")
ids = ids["input_ids"] if hasattr(ids, "keys") else ids
res = {}
for _rep in range(2):
    for prefetch in (False, True):
        m = load(store, memory_budget=428_679_987, prefetch=prefetch, workers=1)
        st = m.zipmoe_engine.stats
        n0 = len(st.step_s)
        out = m.generate(input_ids=ids, max_new_tokens=32, min_new_tokens=32, do_sample=False)
        steps = st.step_s[n0:]
        snap = st.snapshot()
        pf = m.zipmoe_engine.prefetcher.counters.snapshot() if prefetch else None
        tokens = out[0, ids.shape[1]:].tolist()
        res.setdefault(prefetch, []).append((statistics.median(steps[1:]), snap["hit_rate"], pf, tokens))
        unload(m)
for k, v in res.items():
    hits = {a: round(b, 2) for a, b in v[-1][1].items()}
    print("prefetch", k, "TPOT medians", [round(x[0], 3) for x in v], "hits", hits, "prefetch", v[-1][2])
print("same tokens:", res[False][0][3] == res[True][0][3])
