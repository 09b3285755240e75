"""Resume support: the journal of completed experts a writer keeps in its temp dir (FORMAT.md §6).

Arrow: StoreWriter appends one line per expert after its bytes are written; a re-run calls recover(),
which keeps the longest prefix of journaled experts whose bytes in experts.bin re-verify by checksum.
The journal's presence marks a directory as unfinished, so the reader never loads it as a store.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import IO, Any

import xxhash

from zipmoe.errors import ZipMoEError
from zipmoe.store.format import DATA_NAME, JOURNAL_NAME, ExpertEntry, align_up
from zipmoe.store.manifest_json import compact_json, expert_from_json, expert_to_json

JOURNAL_VERSION = 1


def start(tmp: Path, header: dict[str, Any], entries: list[ExpertEntry]) -> IO[str]:
    """(Re)write the journal with `header` and `entries`, atomically; return it open for appending."""
    path = tmp / JOURNAL_NAME
    part = path.with_name(path.name + ".part")
    with open(part, "w", encoding="ascii") as f:
        f.write(compact_json({"journal": JOURNAL_VERSION, "header": header}) + "\n")
        f.writelines(compact_json(expert_to_json(e), sort_keys=False) + "\n" for e in entries)
        f.flush()
        os.fsync(f.fileno())
    os.replace(part, path)
    return open(path, "a", encoding="ascii")


def append(journal: IO[str], entry: ExpertEntry) -> None:
    """Record that `entry`'s bytes are fully written (no fsync: recover() re-verifies them anyway)."""
    journal.write(compact_json(expert_to_json(entry), sort_keys=False) + "\n")
    journal.flush()


def recover(tmp: Path, header: dict[str, Any]) -> tuple[list[ExpertEntry], int, Any]:
    """Journaled experts whose bytes re-verify, the data end they reach, and the xxh3 state over [0, end)."""
    hasher = xxhash.xxh3_64()
    entries = _read(tmp / JOURNAL_NAME, header)
    good: list[ExpertEntry] = []
    end = 0
    if entries and (tmp / DATA_NAME).is_file():
        with open(tmp / DATA_NAME, "rb") as f:
            for entry in entries:
                new_end = _verify(f, entry, end, hasher)
                if new_end is None:
                    break
                good.append(entry)
                end = new_end
    return good, end, hasher


def _read(path: Path, header: dict[str, Any]) -> list[ExpertEntry]:
    """Entries of a journal written with the same header; [] if absent, foreign or unreadable."""
    try:
        lines = path.read_text(encoding="ascii").split("\n")
        first = json.loads(lines[0])
    except (OSError, ValueError):
        return []
    if first != {"journal": JOURNAL_VERSION, "header": json.loads(compact_json(header))}:
        return []
    entries = []
    for i, line in enumerate(lines[1:]):
        try:
            entries.append(expert_from_json(json.loads(line), i))
        except (ValueError, ZipMoEError):
            break  # a torn last line from a kill: everything before it is still usable
    return entries


def _verify(f: IO[bytes], entry: ExpertEntry, end: int, hasher: Any) -> int | None:
    """Check entry's regions continue the layout at `end` and match their checksums; return the new end."""
    chunks = [entry.sm, *entry.e_shards]
    if entry.sm.offset != align_up(end) or (
        entry.e_shards and entry.e_offset != align_up(entry.sm.offset + entry.sm.length)
    ):
        return None
    stop = max(c.offset + c.length for c in chunks)
    f.seek(end)
    data = f.read(stop - end)
    if len(data) != stop - end:
        return None
    for c in chunks:
        if (
            xxhash.xxh3_64_intdigest(memoryview(data)[c.offset - end : c.offset - end + c.length])
            != c.checksum
        ):
            return None
    hasher.update(data)
    return stop
