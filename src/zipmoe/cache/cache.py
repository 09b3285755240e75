"""The compression-aware expert cache: five states (F/C/S/E/miss), four pools, one memory budget.

Stage: cache lookup before a layer's schedule and cache update after it; engine thread only (not
thread-safe: the I/O thread and decode workers only write into slot views handed out here).
In: the layer's needed ExpertKeys. Out: each key's State, views of the slots holding its planes, and
the slots a loader writes into (Targets). No I/O, no allocation per expert: every byte lives in slabs
allocated at construction; state changes move slot ownership, never bytes.

Layout: F slab on the compute device [n_F, numel] bf16; SM slab in host memory with n_C + n_S slots
(C and S entries hold one each); E slab with n_C + n_E slots. An expert may be in F and in one host
pool at once (inclusive); its state is F if it has a committed F slot, else C/S/E by its host planes.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping, Sequence

import numpy as np
import torch

from zipmoe.cache.accounting import MemoryBudget
from zipmoe.cache.entries import PEND_E, PEND_F, PEND_SM, Lease, SlotEntry, Targets
from zipmoe.cache.policy import HOST_PLANES, AdmissionPolicy, Decision, EvictionPolicy, KeepAll, host_for, with_defaults
from zipmoe.cache.policy import eviction_factory as _eviction_factory
from zipmoe.cache.pools import POOLS, capacities_from_bytes, check_capacities, default_capacities, entry_bytes
from zipmoe.cache.slabs import PAGE, DeviceSlab, HostSlab, copy_full, copy_plane
from zipmoe.cache.staging import Staging, allocate_staging, staging_nbytes
from zipmoe.config import format_size
from zipmoe.errors import ZipMoEError
from zipmoe.types import ExpertKey, State

_LOOKUP = tuple(f"lookup.{s.name}" for s in State)  # counter names, built once (hot path)


class ExpertCache:
    """Five states, four pools and one MemoryBudget; see the module docstring for the layout.

    Pools are sized by `capacities` (entries per pool) or `pool_bytes` (bytes per pool); with neither,
    `default_capacities` splits what the budget has left after the staging slots.
    """

    def __init__(
        self, budget: MemoryBudget, numel: int, e_slot_bytes: int, device: str | torch.device = "cpu", *,
        capacities: Mapping[State, int] | None = None, pool_bytes: Mapping[State, int] | None = None,
        n_experts: int | None = None, eviction: str | Callable[[], EvictionPolicy] = "lru",
        admission: AdmissionPolicy | None = None, staging_slots: int = 0, align: int = PAGE,
        pin_host: bool | None = None, populate: bool = False,
    ):
        self.budget, self.device = budget, torch.device(device)
        self.numel, self.e_slot_bytes = numel, e_slot_bytes
        self.per_entry = entry_bytes(numel, e_slot_bytes, align)
        self.sm_stride, self.e_stride = self.per_entry[State.S], self.per_entry[State.E]
        self.pinned = self.device.type == "cuda" if pin_host is None else pin_host
        self.admission: AdmissionPolicy = admission or KeepAll()
        self._stagings: dict[str, Staging] = {}
        self._n_staging = 0
        staging_bytes = self.staging_nbytes(staging_slots)
        self.capacity = self._resolve_capacity(capacities, pool_bytes, n_experts, staging_bytes, align)
        pools = {p: self.capacity[p] * self.per_entry[p] for p in POOLS}
        sizes = ", ".join(f"{p.name} {self.capacity[p]} x {format_size(self.per_entry[p])}" for p in POOLS)
        what = f"{staging_slots} staging slots ({format_size(staging_bytes)}) + the expert pools ({sizes})"
        budget.ensure_fits(staging_bytes + sum(pools.values()), what)  # the whole minimum in one message
        factory = _eviction_factory(eviction)  # policies first: a bad one fails before anything is reserved
        self._pol: dict[State, EvictionPolicy] = {p: with_defaults(factory()) for p in POOLS}
        for p, pol in self._pol.items():
            pol.sized(self.capacity[p])
        # policies of pools that can hold something: the only ones an access concerns (hot path)
        self._live_pols = [pol for p, pol in self._pol.items() if self.capacity[p] > 0]
        self.default_staging = self.staging(staging_slots) if staging_slots else None
        try:
            self._allocate_pools(pools, populate)
        except BaseException:
            if self.default_staging is not None:
                self.release_staging(self.default_staging)
            raise
        # free slot lists per slab: F slab, SM slab (shared by C and S), E slab (shared by C and E)
        slabs = ((State.F, self._f.n), (State.S, self._sm.n), (State.E, self._e.n))
        self._free: dict[State, list[int]] = {p: list(range(n - 1, -1, -1)) for p, n in slabs}
        self._entries: dict[ExpertKey, SlotEntry] = {}
        self._pins: dict[ExpertKey, int] = {}
        self.counters: dict[str, int] = {}

    def _resolve_capacity(
        self, capacities: Mapping[State, int] | None, pool_bytes: Mapping[State, int] | None,
        n_experts: int | None, staging_bytes: int, align: int,
    ) -> dict[State, int]:
        if capacities is not None and pool_bytes is not None:
            raise ZipMoEError("give the pool sizes either as capacities (entries) or as pool_bytes, not both")
        if capacities is not None:
            return check_capacities(capacities)
        if pool_bytes is not None:
            return capacities_from_bytes(pool_bytes, self.per_entry)
        left = max(0, self.budget.free() - staging_bytes)
        return default_capacities(left, self.numel, self.e_slot_bytes, n_experts, align=align)

    def _allocate_pools(self, nbytes: Mapping[State, int], populate: bool) -> None:
        cap = self.capacity
        for p in POOLS:
            self.budget.reserve(f"pool.{p.name}", nbytes[p])
        try:
            self._f = DeviceSlab(cap[State.F], self.numel, self.device)
            pin = {"pinned": self.pinned, "populate": populate}
            self._sm = HostSlab(cap[State.C] + cap[State.S], self.sm_stride, **pin)
            self._e = HostSlab(cap[State.C] + cap[State.E], self.e_stride, **pin)
        except BaseException:
            for p in POOLS:
                self.budget.release(f"pool.{p.name}")
            raise

    # ---- lookup and views (hot path: no allocation) ----

    def state(self, key: ExpertKey) -> State:
        """The key's State from committed slots."""
        en = self._entries.get(key)
        return State.MISS if en is None else en.state()

    def _held(self, key: ExpertKey, slot: str, bit: int) -> SlotEntry:
        en = self._entries.get(key)
        if en is None or getattr(en, slot) < 0 or en.pending & bit:
            state = self.state(key).name
            raise ZipMoEError(f"{key} holds no {slot} slot (state {state}); check state() first")
        return en

    def f_view(self, key: ExpertKey) -> torch.Tensor:
        """Full BF16 expert [numel] on the device (state F)."""
        return self._f.views[self._held(key, "f", PEND_F).f]

    def f_u16(self, key: ExpertKey) -> np.ndarray:
        """Same memory as f_view, as numpy uint16 (CPU device only: the CPU merge kernels' output type)."""
        if self._f.u16 is None:
            raise ZipMoEError("f_u16() is only available when the compute device is the CPU; use f_view()")
        return self._f.u16[self._held(key, "f", PEND_F).f]

    def sm_view(self, key: ExpertKey) -> np.ndarray:
        """The SM plane, numpy uint8 [numel] in host memory (states C and S)."""
        return self._sm.views[self._held(key, "sm", PEND_SM).sm][: self.numel]

    def sm_tensor(self, key: ExpertKey) -> torch.Tensor:
        """The SM plane as a torch uint8 host tensor (pinned on CUDA), for H2D or a zero-copy GPU merge."""
        return self._sm.tensors[self._held(key, "sm", PEND_SM).sm][: self.numel]

    def e_view(self, key: ExpertKey) -> np.ndarray:
        """The compressed exponent region, numpy uint8 [e_nbytes] in host memory (states C and E)."""
        en = self._held(key, "e", PEND_E)
        return self._e.views[en.e][: en.e_nbytes]

    # ---- leases (pin/unpin) ----

    def acquire(self, keys: Iterable[ExpertKey], tokens: Sequence[int] | None = None) -> Lease:
        """Pin and look up a layer's experts; counts as one access of each (policies are touched), one
        layer call for the policies' clocks, with `tokens[i]` tokens routed to keys[i] (None: 1 each)."""
        keys = tuple(keys)
        weights = dict(zip(keys, tokens, strict=True)) if tokens is not None else {}
        for pol in self._live_pols:
            pol.accessed(weights)
        return Lease(self, keys)

    def _acquire_one(self, key: ExpertKey) -> State:
        en = self._entries.get(key)
        if en is None:
            en = self._entries[key] = SlotEntry()
        self._pins[key] = self._pins.get(key, 0) + 1
        for pol in self._live_pols:  # members are touched; the others may remember the access
            if key in pol:
                pol.touch(key)
            else:
                pol.seen(key)
        st = en.state()
        self._count(_LOOKUP[st])
        return st

    def pin(self, key: ExpertKey) -> None:
        """Protect `key` from eviction until the matching unpin()."""
        if key not in self._entries:
            self._entries[key] = SlotEntry()
        self._pins[key] = self._pins.get(key, 0) + 1

    def unpin(self, key: ExpertKey) -> None:
        """Undo one pin(); at zero pins, an uncommitted claim is aborted."""
        left = self._pins.get(key, 0) - 1
        if left < 0:
            raise ZipMoEError(f"{key} is not pinned")
        if left:
            self._pins[key] = left
            return
        del self._pins[key]
        if self._entries[key].pending:
            self.abort(key)

    # ---- admission: claim slots, fill them, commit ----

    def targets(self, key: ExpertKey) -> Targets:
        """Claim the slots the admission policy wants to fill from this load; evicts unpinned experts.

        The key must be leased. Planes the key already holds stay put (read them via sm_view/e_view);
        what the loader produces goes into the returned slots, or into staging where a field is None.
        """
        if key not in self._pins:
            raise ZipMoEError(f"targets({key}) needs the expert leased: call it inside cache.acquire(keys)")
        en = self._entries[key]
        st = en.state()
        if st is not State.F:  # idempotent: claims only what the key does not hold yet
            self._claim(key, en, self.admission.decide(key, st, self.capacity))
        en.handed = en.pending if st is not State.F else 0  # an F hit loads nothing
        full = en.f if en.handed & PEND_F else -1
        sm = en.sm if en.handed & PEND_SM else -1
        e = en.e if en.handed & PEND_E else -1
        return Targets(
            key=key,
            full=self._f.views[full] if full >= 0 else None,
            full_u16=self._f.u16[full] if full >= 0 and self._f.u16 is not None else None,
            sm=self._sm.views[sm] if sm >= 0 else None, sm_t=self._sm.tensors[sm] if sm >= 0 else None,
            e=self._e.views[e] if e >= 0 else None, e_t=self._e.tensors[e] if e >= 0 else None,
        )

    def _claim(self, key: ExpertKey, en: SlotEntry, dec: Decision) -> None:
        if dec.full and en.f < 0 and self._admits(State.F, key):
            slot = self._take_f()
            if slot >= 0:
                en.f, en.pending = slot, en.pending | PEND_F
                self._pol[State.F].insert(key)
        old = en.host()
        want = host_for(HOST_PLANES[old] | HOST_PLANES[dec.host])  # a load only adds planes
        if want != old and self._admits(want, key) and self._move_host(key, en, want):
            if en.sm >= 0 and "sm" not in HOST_PLANES[old]:
                en.pending |= PEND_SM
            if en.e >= 0 and "e" not in HOST_PLANES[old]:
                en.pending |= PEND_E

    def f_block(self, keys: Sequence[ExpertKey]) -> torch.Tensor | None:
        """The [len(keys), numel] view of the F slab when `keys` hold consecutive committed F slots in
        this order (a preload in key order lays a layer out so), else None. No copy."""
        slots = []
        for key in keys:
            en = self._entries.get(key)
            if en is None or en.f < 0 or en.pending & PEND_F:
                return None
            slots.append(en.f)
        if not slots or slots != list(range(slots[0], slots[0] + len(slots))):
            return None
        return self._f.tensor[slots[0] : slots[0] + len(slots)]

    def _admits(self, pool: State | None, key: ExpertKey) -> bool:
        """The pool's policy lets a load of `key` displace its next victim (always, while there is room)."""
        if pool is None:
            return True
        pol = self._pol[pool]
        if len(pol) < self.capacity[pool]:
            return True
        victim = pol.victim(self._pins)
        return victim is None or pol.admits(key, victim)  # None: no room, which the caller finds out

    def commit(self, key: ExpertKey, e_nbytes: int | None = None) -> None:
        """Every slot the last targets(key) returned is filled: make them part of the key's state.

        `e_nbytes`: size of the compressed exponent region if an E slot was filled (default: slot size).
        """
        en = self._entries.get(key)
        if en is None or key not in self._pins:
            raise ZipMoEError(f"commit({key}) needs the expert leased: call it inside cache.acquire(keys)")
        done = en.pending & en.handed
        if done & PEND_E:
            n = self.e_slot_bytes if e_nbytes is None else int(e_nbytes)
            if not 0 < n <= self.e_stride:
                raise ZipMoEError(
                    f"{key}: exponent region of {n} bytes does not fit the {self.e_stride}-byte E slot")
            en.e_nbytes = n
        for bit, name in ((PEND_F, "F"), (PEND_SM, "SM"), (PEND_E, "E")):
            if done & bit:
                self._count(f"admit.{name}")
        en.pending, en.handed = en.pending & ~done, 0

    def abort(self, key: ExpertKey) -> None:
        """A load failed: its claimed slots stay unfilled and never count as held.

        The F slot goes back to the pool; claimed host slots stay the key's (its next load refills them,
        an eviction frees them), so an abort never moves or drops anyone's committed planes.
        """
        en = self._entries[key]
        en.handed = 0
        if en.pending & PEND_F:
            self._pol[State.F].remove(key)
            self._free[State.F].append(en.f)
            en.f, en.pending = -1, en.pending & ~PEND_F

    def admit_copy(self, key: ExpertKey, sm: np.ndarray | None = None, e: np.ndarray | None = None,
                   full: torch.Tensor | np.ndarray | None = None) -> Targets:
        """targets + copy + commit, for loaders that used staging; copies only what the policy keeps."""
        t = self.targets(key)
        try:
            if t.sm is not None:
                copy_plane(t.sm, sm, self.numel, "SM plane", key)
            if t.e is not None:
                copy_plane(t.e, e, None, "exponent region", key)
            if t.full is not None:
                copy_full(t.full, full, self.numel, key)
        except BaseException:
            self.abort(key)
            raise
        self.commit(key, e_nbytes=None if e is None else e.nbytes)
        return t

    # ---- eviction and demotion (slot ownership moves, bytes never do) ----

    def _take_f(self) -> int:
        free = self._free[State.F]
        if not free:
            victim = self._pol[State.F].victim(self._pins) if self.capacity[State.F] else None
            if victim is None:
                return -1
            en = self._entries[victim]
            self._pol[State.F].remove(victim)
            free.append(en.f)
            en.f = -1
            self._count("evict.F")
        return free.pop()

    def _has_room(self, pool: State) -> bool:
        pol = self._pol[pool]
        cap = self.capacity[pool]
        return len(pol) < cap or (cap > 0 and pol.victim(self._pins) is not None)

    def _move_host(self, key: ExpertKey, en: SlotEntry, new: State | None) -> bool:
        """Move `key` to host pool `new`, evicting there if needed; False (no change) if there is no room."""
        old = en.host()
        if new == old:
            return True
        if new is not None and not self._has_room(new):
            return False
        if old is not None:
            self._pol[old].remove(key)  # leave first, so a cascade can reuse the place
        if new is not None:
            while len(self._pol[new]) >= self.capacity[new]:
                self._evict_host(self._pol[new].victim(self._pins), new)
        planes = HOST_PLANES[new]
        if en.sm >= 0 and "sm" not in planes:
            self._free[State.S].append(en.sm)
            en.sm, en.pending = -1, en.pending & ~PEND_SM
        if en.e >= 0 and "e" not in planes:
            self._free[State.E].append(en.e)
            en.e, en.e_nbytes, en.pending = -1, 0, en.pending & ~PEND_E
        if "sm" in planes and en.sm < 0:
            en.sm = self._free[State.S].pop()
        if "e" in planes and en.e < 0:
            en.e, en.e_nbytes = self._free[State.E].pop(), 0
        if new is not None:
            self._pol[new].insert(key)
        return True

    def _evict_host(self, victim: ExpertKey | None, pool: State) -> None:
        assert victim is not None, "room was checked before evicting"
        en = self._entries[victim]
        target = self.admission.demote(pool, self.capacity)
        if target is not None and not HOST_PLANES[target] < HOST_PLANES[pool]:
            target = None  # a demotion can only drop planes
        self._count(f"evict.{pool.name}")
        if target is not None and self._move_host(victim, en, target):
            self._count(f"demote.{pool.name}->{target.name}")
            return
        self._move_host(victim, en, None)

    # ---- staging, metrics, lifetime ----

    def staging_nbytes(self, n_slots: int, exp: bool | None = None) -> int:
        """Bytes staging(n_slots, exp) would reserve."""
        exp = self.device.type == "cuda" if exp is None else exp
        return staging_nbytes(n_slots, self.numel, self.sm_stride, self.e_stride, exp)

    def staging(self, n_slots: int, exp: bool | None = None) -> Staging:
        """Read buffers and merge outputs for `n_slots` in-flight experts, from the same budget.

        `exp` adds decoded-exponent host buffers (default: on CUDA, where the merge runs on the GPU).
        """
        exp = self.device.type == "cuda" if exp is None else exp
        name = f"staging.{self._n_staging}"
        self._n_staging += 1
        st = allocate_staging(self.budget, name, n_slots, self.numel, self.sm_stride, self.e_stride,
                              self.device, exp, self.pinned)
        self._stagings[name] = st
        return st

    def release_staging(self, st: Staging) -> None:
        """Return a staging allocation's bytes to the budget."""
        if self._stagings.pop(st.name, None) is not None:
            self.budget.release(st.name)
            st.close()

    def _count(self, name: str) -> None:
        self.counters[name] = self.counters.get(name, 0) + 1

    def occupancy(self) -> dict[State, int]:
        """Members per pool (pending claims included)."""
        return {p: len(self._pol[p]) for p in POOLS}

    def pool_nbytes(self) -> dict[State, int]:
        """Bytes each pool holds in the budget."""
        return {p: self.capacity[p] * self.per_entry[p] for p in POOLS}

    def e_fill(self) -> float:
        """Mean used share of the E slots in use (1 − the waste of max-sized E slots)."""
        used = [en.e_nbytes for en in self._entries.values() if en.e >= 0 and not en.pending & PEND_E]
        return float(np.mean(used)) / self.e_stride if used else 1.0

    def check_invariants(self) -> None:
        """Assert the bookkeeping is consistent (tests and debugging; O(entries))."""
        owners: dict[State, list[int]] = {State.F: [], State.S: [], State.E: []}
        members: dict[State, set[ExpertKey]] = {p: set() for p in POOLS}
        for key, en in self._entries.items():
            for pool, slot in ((State.F, en.f), (State.S, en.sm), (State.E, en.e)):
                if slot >= 0:
                    owners[pool].append(slot)
            if en.f >= 0:
                members[State.F].add(key)
            if en.host() is not None:
                members[en.host()].add(key)
        for pool, slab in ((State.F, self._f), (State.S, self._sm), (State.E, self._e)):
            used, free = owners[pool], self._free[pool]
            assert sorted(used + free) == list(range(slab.n)), f"{pool.name} slab slots leaked or shared"
        for p in POOLS:
            assert members[p] == {k for k in members[p] if k in self._pol[p]} and len(self._pol[p]) == len(
                members[p]), f"pool {p.name} policy out of sync"
            assert len(members[p]) <= self.capacity[p], f"pool {p.name} over capacity"
        assert self.budget.used() <= self.budget.total and self.budget.peak() <= self.budget.total

    def close(self) -> None:
        """Release every pool and staging reservation; views handed out must not be used afterwards."""
        for st in list(self._stagings.values()):
            self.release_staging(st)
        for p in POOLS:
            self.budget.release(f"pool.{p.name}")
        for slab in (self._f, self._sm, self._e):
            slab.close()
        self._entries.clear()
        self._pins.clear()

