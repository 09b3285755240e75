"""`zipmoe` command: a dispatcher over subcommands that live in `zipmoe/cli/<name>.py`.

Only the chosen subcommand's module is imported (torch and transformers load only when a command
needs them); the others are listed in --help from a static summary if their module exists.
A ZipMoEError becomes one paragraph on stderr and exit status 2; Ctrl-C exits 130.
"""

from __future__ import annotations

import argparse
import importlib
import importlib.util
import logging
import sys
import traceback
from collections.abc import Sequence

from zipmoe import __version__
from zipmoe.cli import common
from zipmoe.errors import ZipMoEError

# Subcommand name -> one-line summary shown in `zipmoe --help`. Order is the order users meet them.
COMMANDS: dict[str, str] = {
    "demo": "build a small real-text MoE offline, convert it, and generate under a memory budget",
    "convert": "convert a BF16 Hugging Face MoE checkpoint into a compressed zipmoe store",
    "inspect": "show a store's sizes, exponent entropy and compression ratio vs the entropy floor",
    "verify": "check every checksum of a store, optionally bit-for-bit against the original checkpoint",
    "generate": "generate text for one prompt from a store",
    "chat": "interactive streaming chat with a store, using the model's chat template",
    "serve": "serve a store through an OpenAI-compatible HTTP API",
    "bench": "benchmarks: codec (exponent coders), engine (zipmoe vs uncompressed experts), e2e (all systems)",
}

_EPILOG = """examples:
  zipmoe convert ./Qwen1.5-MoE-A2.7B ./qwen-store
  zipmoe inspect ./qwen-store
  zipmoe verify ./qwen-store --against ./Qwen1.5-MoE-A2.7B

Run 'zipmoe COMMAND --help' for the flags of one command."""


def available_commands() -> list[str]:
    """Subcommands whose module is installed (others are written in parallel and may be absent)."""
    return [name for name in COMMANDS if importlib.util.find_spec(f"zipmoe.cli.{name}") is not None]


def _chosen_command(argv: Sequence[str], names: Sequence[str]) -> str | None:
    """The first argument naming a subcommand (global flags may precede it)."""
    for arg in argv:
        if arg in names:
            return arg
        if not arg.startswith("-"):
            return None
    return None


def build_parser(argv: Sequence[str] = ()) -> argparse.ArgumentParser:
    """The top-level parser; only the subcommand named in argv is imported and fully configured."""
    parser = argparse.ArgumentParser(
        prog="zipmoe",
        description="Serve BF16 Hugging Face MoE models bit-exactly from a losslessly compressed "
        "expert store under a memory budget.",
        epilog=_EPILOG,
        parents=[common.global_flags_parent()],
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.set_defaults(debug=False, verbose=0, command=None)
    parser.add_argument("--version", action="version", version=f"zipmoe {__version__}")
    subparsers = parser.add_subparsers(title="commands", metavar="COMMAND", dest="command")
    names = available_commands()
    chosen = _chosen_command(argv, names)
    for name in names:
        if name == chosen:
            importlib.import_module(f"zipmoe.cli.{name}").configure_parser(subparsers)
        else:
            common.add_subcommand(subparsers, name, help=COMMANDS[name])
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the `zipmoe` console script; returns the exit status (also via sys.exit)."""
    argv = list(sys.argv[1:] if argv is None else argv)
    parser = build_parser(argv)
    args = parser.parse_args(argv)
    if args.command is None:
        parser.print_help(sys.stderr)
        return common.EXIT_USER_ERROR
    common.setup_logging(args.verbose)
    module = importlib.import_module(f"zipmoe.cli.{args.command}")
    try:
        return int(module.run(args) or 0)
    except ZipMoEError as exc:
        if args.debug:
            traceback.print_exc()
        print(common.format_error(exc), file=sys.stderr)
        return common.EXIT_USER_ERROR
    except KeyboardInterrupt:
        print("zipmoe: interrupted", file=sys.stderr)
        return common.EXIT_INTERRUPTED
    except BrokenPipeError:
        logging.getLogger(__name__).debug("output pipe closed")
        return common.EXIT_OK


def entrypoint() -> None:
    """For `python -m zipmoe.cli.main`: exit with main()'s status."""
    sys.exit(main())


if __name__ == "__main__":
    entrypoint()
