"""disk_bandwidth: the denominator of every I/O lower bound, so it must be the best rate seen, on reads
that do not repeat (a repeated chunk could come from a cache below O_DIRECT)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from zipmoe.bench.baselines import workdir


def _data_file(tmp_path: Path, mib: int) -> Path:
    path = tmp_path / "experts.bin"
    path.write_bytes(np.random.default_rng(0).integers(0, 256, mib << 20, dtype=np.uint8).tobytes())
    return path


def test_the_best_pass_counts_and_no_chunk_is_read_twice(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    seen: list[list[int]] = []
    times = iter([2.0, 0.5, 4.0])

    def fake_reads(fds, bufs, offsets, chunk, size):
        seen.append([int(i) for i in offsets])
        return next(times)

    monkeypatch.setattr(workdir, "_timed_reads", fake_reads)
    bw = workdir.disk_bandwidth(_data_file(tmp_path, 8), chunk=1 << 20, total=2 << 20, threads=2, passes=3)
    assert bw == pytest.approx((2 << 20) / 0.5)
    flat = [i for p in seen for i in p]
    assert len(seen) == 3 and all(len(p) == 2 for p in seen) and len(set(flat)) == len(flat)


def test_real_reads_give_a_finite_rate(tmp_path: Path) -> None:
    bw = workdir.disk_bandwidth(_data_file(tmp_path, 4), chunk=1 << 20, total=2 << 20, threads=2, passes=2)
    assert 0 < bw < float("inf")
