"""The codec benchmark's machinery on tiny inputs (the benchmark itself is run by hand)."""

from __future__ import annotations

import numpy as np
import pytest

from zipmoe.bench import codec as bench
from zipmoe.errors import ZipMoEError


def test_bf16_bits_rounds_to_nearest_even_and_keeps_nans():
    x = np.array([1.0, 1.0 + 2**-8, 1.0 + 3 * 2**-8, -0.0, np.inf, np.nan], np.float32)
    assert bench.bf16_bits(x).tolist() == [0x3F80, 0x3F80, 0x3F82, 0x8000, 0x7F80, 0x7FC0]


def test_prepare_and_time_give_a_row_per_candidate():
    blobs = bench.gaussian_experts(0.4, 0.2)
    prepared = [bench.prepare("g", name, factory(), blobs)
                for name, factory in bench.candidates(k=2).items() if name in ("huffman", "zstd-L1")]
    bench.time_round_robin(prepared, threads=(1, 2), repeats=1)
    for p in prepared:
        assert 1.4 < p.row.ratio < 1.6 and 0.99 < p.row.vs_floor < 1.1
        assert set(p.row.decode_gbps) == {1, 2} and p.row.encode_gbps > 0
    table = bench.format_table({"params": {"threads": [1, 2]}, "inputs": {},
                                "rows": [bench.asdict(p.row) for p in prepared]})
    assert "huffman" in table and "zstd-L1" in table


def test_prepare_rejects_a_lossy_candidate():
    def lossy(blobs, outs):
        def task() -> None:
            outs[0][:] = 0
        return 10, [task]

    with pytest.raises(ZipMoEError, match="bit-exactly"):
        bench.prepare("g", "lossy", lossy, [np.ones(70000, np.uint16)])
