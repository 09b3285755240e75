"""`zipmoe inspect STORE [--json]`: sizes, exponent entropy and ratio vs the floor (zipmoe.report)."""

from __future__ import annotations

import argparse
import json
from typing import Any

from zipmoe.cli import common
from zipmoe.config import format_size

_DESCRIPTION = """Show how well a store is compressed: for every projection of every MoE layer, the
weights, BF16 size, stored size, ratio (stored / BF16), order-0 exponent entropy H (bits per weight)
and the lossless floor (8 + H) / 16 that no order-0 coder can beat. Rows 'all' aggregate.

Entropy needs the exponent planes, so every exponent shard is read (checksums verified) and decoded."""

_COLUMNS = ("layer", "proj", "weights", "BF16", "stored", "ratio", "floor", "H bits", "vs floor")


def configure_parser(subparsers: argparse._SubParsersAction) -> None:
    """Register `zipmoe inspect`."""
    p = common.add_subcommand(subparsers, "inspect", help="show a store's sizes, exponent entropy and "
                              "compression ratio vs the entropy floor", description=_DESCRIPTION)
    p.add_argument("store", metavar="STORE", help="store directory (made by zipmoe convert)")
    p.add_argument("--json", action="store_true", help="print the full report as JSON instead of a table")
    p.add_argument("--summary", action="store_true", help="table: only the totals, not one row per layer")
    common.add_threads_flag(p)
    p.add_argument("--no-progress", action="store_true", help="do not show the progress bar")


def _cells(layer: Any, proj: str, row: dict[str, Any]) -> list[str]:
    return [str(layer), proj, f"{row['numel']:,}", format_size(row["bf16_bytes"]),
            format_size(row["stored_bytes"]),
            f"{row['ratio']:.4f}", f"{row['floor_ratio']:.4f}", f"{row['entropy_bits']:.3f}",
            f"{row['ratio_vs_floor']:.4f}"]


def format_table(report: dict[str, Any], summary: bool = False) -> str:
    """The report as plain aligned text (no dependency on rich)."""
    rows: list[list[str]] = []
    if not summary:
        cells_by_layer: dict[Any, list[dict[str, Any]]] = {}
        for cell in report["by_layer_projection"]:
            cells_by_layer.setdefault(cell["layer"], []).append(cell)
        for layer_row in report["by_layer"]:
            rows += [_cells(c["layer"], c["proj"], c) for c in cells_by_layer[layer_row["layer"]]]
            rows.append(_cells(layer_row["layer"], "all", layer_row))
    rows += [_cells("all", r["proj"], r) for r in report["by_projection"]]
    rows.append(_cells("all", "all", report["total"]))
    widths = [max(len(c), *(len(r[i]) for r in rows)) for i, c in enumerate(_COLUMNS)]
    fmt = "  ".join(f"{{:{'<' if i < 2 else '>'}{w}}}" for i, w in enumerate(widths))
    codec = report["codec"]
    files = report["files"]
    head = [
        f"store       {report['store']}",
        f"model_type  {report['model_type']}   experts {report['experts']} in "
        f"{report['moe_layers']} MoE layers"
        + (f" ({report['raw_experts']} stored raw)" if report["raw_experts"] else ""),
        f"codec       {codec['id']} {json.dumps(codec['params'])}  K={codec['k']} shards per expert",
        f"files       experts.bin {format_size(files['experts_bin_bytes'])}, dense weights "
        f"{format_size(files['dense_bytes'])}, other {format_size(files['other_bytes'])}",
        "",
        fmt.format(*_COLUMNS),
    ]
    return "\n".join(head + [fmt.format(*r) for r in rows])


def run(args: argparse.Namespace) -> int:
    """Inspect the store and print a table or JSON."""
    from zipmoe.report import inspect_store

    report = inspect_store(args.store, workers=args.threads, progress=not args.no_progress and not args.json)
    print(json.dumps(report, indent=2) if args.json else format_table(report, args.summary))
    return common.EXIT_OK
