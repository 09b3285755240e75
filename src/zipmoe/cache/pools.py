"""Pool geometry: bytes per entry of each pool, capacities from bytes, and the default split.

Stage: load time. numel = BF16 weights per expert; sizes in bytes.

Slot sizes (one expert shape class per cache):
  F = 2·numel (BF16 on the compute device)
  S = SM plane, numel bytes rounded up to the host alignment (4 KiB, for O_DIRECT)
  E = the largest compressed exponent region of the store, rounded up likewise
  C = S + E
E slots are sized for the largest expert, so an E or C entry wastes (max − own) E-region bytes; with
real weights the compressed exponent regions of one model differ by a few percent, so the waste is a
few percent of the E pool (`ExpertCache.e_fill()` reports it). A byte arena would avoid it at the cost
of fragmentation and compaction copies.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping

from zipmoe.cache.slabs import PAGE, align_up
from zipmoe.errors import ZipMoEError
from zipmoe.types import State

POOLS = (State.F, State.C, State.S, State.E)
DEFAULT_F_SHARE = 0.0  # F share when not every expert fits in F: coverage (C) beats decode savings (F)
# when reads bound the step; measured on the device, 2026-11-28: 8 workers decode 10.8 GB/s of BF16 vs a
# 1.7 GB/s disk. The planner (issue 4) replaces this split with one from profiled costs.


def uniform_numel(numels: Iterable[int]) -> int:
    """The one numel shared by every expert; raise if the model mixes expert shapes."""
    distinct = sorted(set(numels))
    if len(distinct) != 1:
        raise ZipMoEError(
            f"the expert cache needs every routed expert to have the same number of weights, found "
            f"{distinct[:8]}{'…' if len(distinct) > 8 else ''}; models with several expert shapes are not "
            "supported yet"
        )
    return distinct[0]


def entry_bytes(numel: int, e_slot_bytes: int, align: int = PAGE) -> dict[State, int]:
    """Bytes one entry of each pool takes, slot padding included."""
    if numel <= 0 or e_slot_bytes <= 0:
        raise ZipMoEError(f"expert geometry must be positive, got numel={numel}, e_slot_bytes={e_slot_bytes}")
    sm, e = align_up(numel, align), align_up(e_slot_bytes, align)
    return {State.F: 2 * numel, State.C: sm + e, State.S: sm, State.E: e}


def capacities_from_bytes(
    pool_bytes: Mapping[State, int], per_entry: Mapping[State, int]
) -> dict[State, int]:
    """Entries per pool that fit in the given bytes per pool (rounded down)."""
    unknown = set(pool_bytes) - set(POOLS)
    if unknown:
        raise ZipMoEError(f"pool_bytes keys must be State.F/C/S/E, got {sorted(unknown)}")
    return {p: int(pool_bytes.get(p, 0)) // per_entry[p] for p in POOLS}


def check_capacities(capacities: Mapping[State, int]) -> dict[State, int]:
    """Validate user capacities: only F/C/S/E, non-negative ints; missing pools get 0."""
    unknown = set(capacities) - set(POOLS)
    if unknown:
        raise ZipMoEError(f"capacities keys must be State.F/C/S/E, got {sorted(unknown)}")
    out = {p: int(capacities.get(p, 0)) for p in POOLS}
    if any(v < 0 for v in out.values()):
        raise ZipMoEError(f"pool capacities must be >= 0, got {out}")
    return out


def default_capacities(
    total: int, numel: int, e_slot_bytes: int, n_experts: int | None = None,
    f_share: float = DEFAULT_F_SHARE, align: int = PAGE,
) -> dict[State, int]:
    """A simple split of `total` pool bytes until the planner replaces it.

    Every expert in F if that fits; else every expert in C and the rest to F if that fits; else C gets
    (1 − f_share) of the bytes and F the rest. With the default inclusive KeepAll admission F is a hot
    subset of C, so C's coverage is what keeps disk reads down and F what saves decode work.
    """
    if not 0.0 <= f_share <= 1.0:
        raise ZipMoEError(f"f_share must be in [0, 1], got {f_share}")
    per = entry_bytes(numel, e_slot_bytes, align)
    if n_experts is not None and total >= n_experts * per[State.F]:
        return {State.F: n_experts, State.C: 0, State.S: 0, State.E: 0}
    if n_experts is not None and total >= n_experts * per[State.C]:
        c = n_experts
    else:
        c = int(total * (1.0 - f_share)) // per[State.C]
    f = (total - c * per[State.C]) // per[State.F]
    if n_experts is not None:
        f = min(f, n_experts)
    return {State.F: f, State.C: c, State.S: 0, State.E: 0}
