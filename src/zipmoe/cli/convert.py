"""`zipmoe convert HF_DIR STORE`: parse flags, call zipmoe.convert.convert()."""

from __future__ import annotations

import argparse
import json

from zipmoe.cli import common
from zipmoe.config import format_size
from zipmoe.errors import ConversionError

_DESCRIPTION = """Convert a BF16 Hugging Face MoE checkpoint (a directory with config.json and
*.safetensors) into a zipmoe store: routed-expert weights are split into a raw sign+mantissa plane
and an entropy-coded exponent plane (lossless, ~66% of BF16); everything else is copied unchanged.

The store is written to a temporary directory, every chunk is re-read and checked, and only then
is it renamed to STORE. An interrupted run (Ctrl-C, kill -9, power loss) never leaves a directory
that loads as a store; run the same command again to finish the job."""


def configure_parser(subparsers: argparse._SubParsersAction) -> None:
    """Register `zipmoe convert`."""
    p = common.add_subcommand(
        subparsers, "convert", help="convert a BF16 Hugging Face MoE checkpoint into a zipmoe store",
        description=_DESCRIPTION,
    )
    p.add_argument("hf_dir", metavar="HF_DIR", help="checkpoint directory (config.json + safetensors)")
    p.add_argument("store", metavar="STORE", help="store directory to create")
    p.add_argument(
        "--coder", default="huffman",
        help="exponent coder: 'huffman' (default: near the entropy floor, fast decode), 'zstd', 'lz4', 'raw'",
    )
    p.add_argument(
        "--coder-param", action="append", default=[], metavar="KEY=VALUE",
        help="a coder parameter, repeatable; VALUE is parsed as JSON when it can be "
        "(e.g. --coder zstd --coder-param level=3)",
    )
    p.add_argument(
        "--shards", type=common.positive_int, default=None, metavar="K",
        help="exponent shards per expert: K decode workers can decode one expert in parallel "
        "(default: the codec's recommendation)",
    )
    common.add_threads_flag(p)
    p.add_argument(
        "--allow-raw", action="store_true",
        help="store non-BF16 expert tensors (e.g. FP16, FP32) raw and uncompressed instead of failing",
    )
    p.add_argument("--overwrite", action="store_true", help="replace STORE if it already exists")
    p.add_argument("--no-progress", action="store_true", help="do not show the progress bar")


def parse_coder_params(items: list[str]) -> dict[str, object]:
    """['level=3', 'name=x'] -> {'level': 3, 'name': 'x'}; a malformed item is a ConversionError."""
    params: dict[str, object] = {}
    for item in items:
        key, sep, value = item.partition("=")
        if not sep or not key:
            raise ConversionError(f"--coder-param expects KEY=VALUE (e.g. level=3), got {item!r}")
        try:
            params[key] = json.loads(value)
        except json.JSONDecodeError:
            params[key] = value
    return params


def run(args: argparse.Namespace) -> int:
    """Convert and print where the store went and its size."""
    from zipmoe.convert import convert

    store = convert(
        args.hf_dir, args.store,
        coder=args.coder, coder_params=parse_coder_params(args.coder_param), shards=args.shards,
        workers=args.threads, allow_raw=args.allow_raw, overwrite=args.overwrite,
        progress=not args.no_progress,
    )
    from zipmoe.store.reader import StoreReader

    with StoreReader(store, direct_io=False) as reader:
        sizes, n = reader.expert_bytes, len(reader.entries)
    ratio = sizes.stored / sizes.original if sizes.original else 0.0
    print(f"wrote {store}: {n} experts, {format_size(sizes.original)} -> {format_size(sizes.stored)} "
          f"({ratio:.1%} of the original); check it any time with: zipmoe verify {store}")
    return common.EXIT_OK
