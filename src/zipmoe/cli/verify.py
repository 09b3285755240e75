"""`zipmoe verify STORE [--against HF_DIR]`: every checksum, every expert decoded (zipmoe.report)."""

from __future__ import annotations

import argparse

from zipmoe.cli import common
from zipmoe.config import format_size

_DESCRIPTION = """Check a store end to end: the manifest and its invariants, the checksum of every
chunk and file, and every expert decoded and compared with the checksum of its original BF16 bytes.
With --against, also compare every expert and dense tensor (and config/tokenizer files) bit-for-bit
with the original checkpoint.

Exit status 0 when everything matches; 2 with a message naming the first corrupt chunk or
mismatching tensor."""


def configure_parser(subparsers: argparse._SubParsersAction) -> None:
    """Register `zipmoe verify`."""
    p = common.add_subcommand(subparsers, "verify", help="check every checksum of a store, optionally "
                              "bit-for-bit against the original checkpoint", description=_DESCRIPTION)
    p.add_argument("store", metavar="STORE", help="store directory (made by zipmoe convert)")
    p.add_argument("--against", metavar="HF_DIR", default=None,
                   help="the checkpoint the store was converted from: compare every tensor bit-for-bit")
    common.add_threads_flag(p)
    p.add_argument("--no-progress", action="store_true", help="do not show the progress bars")


def run(args: argparse.Namespace) -> int:
    """Verify and print a one-paragraph summary."""
    from zipmoe.report import verify_store

    r = verify_store(args.store, against=args.against, workers=args.threads, progress=not args.no_progress)
    print(f"OK {r.store}: all checksums of {format_size(r.checked_bytes)} of files verified; "
          f"{r.experts} experts "
          f"({r.tensors} tensors, {format_size(r.expert_bytes)} of original weights) decoded and matched.")
    if r.against:
        print(f"Bit-identical to {r.against}: every expert tensor, {r.dense_tensors} dense tensors and "
              f"{r.files_compared} copied files.")
    return common.EXIT_OK
