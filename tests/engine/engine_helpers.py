"""Budgets and inputs the engine tests (and scripts/generic_sweep.py) load stores under."""

from __future__ import annotations

import torch

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


def padded_inputs(batch: int, length: int = 7) -> tuple[torch.Tensor, torch.Tensor]:
    """(input_ids, attention_mask) [batch, length], seeded by batch; row r is left-padded by r + 1 tokens."""
    gen = torch.Generator().manual_seed(batch)
    ids = torch.randint(3, 150, (batch, length), generator=gen)
    mask = torch.ones_like(ids)
    for row in range(1, batch):
        mask[row, : row + 1] = 0
        ids[row, : row + 1] = 0
    return ids, mask
