"""CUDA: pinned host slabs of exactly the budgeted bytes and an F slab on the device."""

import numpy as np
import pytest
import torch

from zipmoe.cache import ExpertCache, MemoryBudget
from zipmoe.types import ExpertKey, State

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device"),
]


def test_cuda_cache_pins_host_slabs_and_keeps_f_on_the_device() -> None:
    numel = 3 * 1024 * 1024 + 5  # not a power of two: the slabs must not be rounded up
    budget = MemoryBudget("256MiB")
    cache = ExpertCache(budget, numel, 1_100_000, "cuda", capacities={State.F: 2, State.C: 3, State.S: 1},
                        staging_slots=1)
    assert cache._sm.pinned and cache._e.pinned and cache._sm.tensor.is_pinned()
    assert cache._sm.tensor.data_ptr() % 4096 == 0 and cache._f.tensor.device.type == "cuda"
    st = cache.default_staging
    assert st is not None and st.exp is not None and st.sm.pinned and st.full.tensor.is_cuda
    assert budget.used() == sum(budget.breakdown().values()) <= budget.total
    key = ExpertKey(1, 2)
    sm = np.random.default_rng(0).integers(0, 256, numel, dtype=np.uint8)
    full = torch.randn(numel, device="cuda").to(torch.bfloat16)
    with cache.acquire([key]):
        cache.admit_copy(key, sm=sm, e=np.ones(1000, np.uint8), full=full)
    assert torch.equal(cache.f_view(key), full)
    on_gpu = cache.sm_tensor(key).to("cuda", non_blocking=True)  # pinned H2D
    torch.cuda.synchronize()
    assert np.array_equal(on_gpu.cpu().numpy(), sm)
    cache.close()
    assert budget.used() == 0
