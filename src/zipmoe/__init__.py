"""zipmoe: serve BF16 Hugging Face MoE models bit-exactly from a losslessly compressed expert store.

The pipeline, top to bottom (each arrow is a package):

    HF checkpoint ──convert──▶ store/      SM plane raw + exponent plane in K coded shards, checksummed
                               codec/      bytes ⇄ planes: split, exponent coders, merge kernels
    load(store, device, memory_budget)
        cache/      which experts are resident, in which state (F / C / S / E / miss), byte accounting
        planner/    routing statistics + profiled costs + budget → pool sizes (pure numerics)
        scheduler/  a layer's needed experts → Plan (pure) → executor (I/O thread + decode workers)
        engine/     one MoE layer: lookup → schedule → execute → compute → cache.commit
        models/     one adapter per HF model_type; plugs the engine into transformers
    serve/ cli/ bench/   user surface: OpenAI-compatible server, commands, benchmarks
"""

__version__ = "0.1.0"

__all__ = ["convert", "load", "unload"]


def __getattr__(name: str):
    """Lazy public API: `import zipmoe` stays light (no torch, no numba) until a function is used."""
    if name in ("load", "unload"):
        from zipmoe.models import load as _load

        return getattr(_load, name)
    if name == "convert":
        from zipmoe.convert import convert

        return convert
    raise AttributeError(f"module 'zipmoe' has no attribute {name!r}")
