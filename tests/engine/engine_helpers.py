"""Budgets the engine tests load stores under."""

from __future__ import annotations

from zipmoe.store.reader import StoreReader


def budgets(store) -> dict[str, int | None]:
    """everything fits / about half the experts / the minimum (pools hold ~one expert per layer)."""
    with StoreReader(store) as r:
        n = len(r.entries)
        numel = next(iter(r.entries.values())).numel
        layers = len({k.layer for k in r.entries})
        dense = sum(p.stat().st_size for p in r.dense_files())
    base = dense + 8 * numel * 6  # dense + staging (slots × (BF16 + SM + E + exp) with page padding)
    return {"all": None, "half": base + n * numel, "minimum": base + layers * numel * 2 + 3 * 4096 * layers}
