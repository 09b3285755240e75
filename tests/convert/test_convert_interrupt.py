"""kill -9 in the middle of a conversion: nothing loads as a store; re-running resumes and completes."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from tests.convert.synthetic import write_checkpoint

from zipmoe import convert as convert_module
from zipmoe.errors import StoreIncompleteError
from zipmoe.report import verify_store
from zipmoe.store.reader import StoreReader

# Runs the real converter, slowed down per written expert so the kill lands mid-run.
_SLOW_CONVERT = """
import sys, time
import zipmoe.convert as c
real = c._write_one
def slow(*args):
    time.sleep(0.1)
    real(*args)
c._write_one = slow
c.convert(sys.argv[1], sys.argv[2], workers=1, progress=False)
"""


def _journal_lines(tmp_dir: Path) -> int:
    try:
        return (tmp_dir / ".zipmoe-journal").read_text().count("\n")
    except OSError:
        return 0


def test_kill_9_then_resume(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    hf = write_checkpoint(tmp_path / "hf", layers=4, experts=8)
    dest = tmp_path / "store"
    tmp_dir = tmp_path / "store.zipmoe-tmp"
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)}
    proc = subprocess.Popen([sys.executable, "-c", _SLOW_CONVERT, str(hf), str(dest)], env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    deadline = time.monotonic() + 120
    while _journal_lines(tmp_dir) < 5 and proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.02)
    assert proc.poll() is None, f"converter ended before it could be killed: {proc.stderr.read().decode()}"
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    proc.stderr.close()

    assert not dest.exists()
    with pytest.raises(StoreIncompleteError, match="interrupted"):
        StoreReader(tmp_dir)
    written = _journal_lines(tmp_dir) - 1  # minus the header line
    assert 0 < written < 32

    encoded = []
    real = convert_module._encode_one
    monkeypatch.setattr(convert_module, "_encode_one", lambda ckpt, key, *a: encoded.append(key) or
                        real(ckpt, key, *a))
    store = convert_module.convert(hf, dest, workers=1, progress=False)
    # resumed: experts whose bytes re-verify on disk are not encoded again (the last journaled one or
    # two may be re-done: their bytes can still sit in the killed process's write buffer)
    assert len(encoded) <= 32 - written + 2 and len(encoded) < 32
    assert not tmp_dir.exists()
    assert verify_store(store, against=hf, progress=False).experts == 32
