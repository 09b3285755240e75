"""`zipmoe bench <suite> [args]`: dispatch to a benchmark module in zipmoe.bench.

Each suite is a module `zipmoe.bench.<name>` exposing `main(argv) -> int` with its own argparse
(so `zipmoe bench codec --help` shows the suite's flags; `zipmoe bench engine ...` is the same as
`python -m zipmoe.bench.engine ...`). Suites are listed only if installed.
"""

from __future__ import annotations

import argparse
import importlib
import importlib.util

from zipmoe.cli import common
from zipmoe.errors import ZipMoEError

# suite name -> (module, one-line summary)
SUITES: dict[str, tuple[str, str]] = {
    "codec": ("zipmoe.bench.codec", "exponent coders vs zipnn and zstd: ratio vs floor, encode/decode GB/s"),
    "engine": ("zipmoe.bench.engine", "one engine, compressed vs uncompressed experts under a budget: "
               "TTFT, TPOT, bytes read"),
    "e2e": ("zipmoe.bench.e2e", "end-to-end: every system (zipmoe, offloading baselines) on one model, "
            "budget and routing; resumable, with a report"),
}


def available_suites() -> dict[str, tuple[str, str]]:
    """Suites whose module is installed."""
    return {name: v for name, v in SUITES.items() if importlib.util.find_spec(v[0]) is not None}


def configure_parser(subparsers: argparse._SubParsersAction) -> None:
    """Register `zipmoe bench SUITE [ARGS...]`."""
    suites = available_suites()
    listing = "\n".join(f"  {name:8s} {summary}" for name, (_, summary) in suites.items())
    listing = listing or "  (none installed)"
    p = common.add_subcommand(
        subparsers, "bench",
        help="benchmarks: codec (exponent coders), engine (zipmoe vs uncompressed experts), e2e (all systems)",
        description=f"Run a benchmark suite.\n\nsuites:\n{listing}\n\n"
        "Run 'zipmoe bench SUITE --help' for the suite's flags.",
    )
    p.add_argument("suite", metavar="SUITE", help="which benchmark: " + ", ".join(suites or SUITES))
    p.add_argument("suite_args", nargs=argparse.REMAINDER, metavar="ARGS", help="passed to the suite")


def run(args: argparse.Namespace) -> int:
    """Import the suite module and hand it the remaining arguments."""
    suites = available_suites()
    if args.suite not in suites:
        known = ", ".join(suites) or "none"
        raise ZipMoEError(f"unknown benchmark suite {args.suite!r}; installed suites: {known}")
    module = importlib.import_module(suites[args.suite][0])
    return int(module.main(list(args.suite_args)) or 0)
