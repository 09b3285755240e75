"""Flags and error handling shared by every `zipmoe` subcommand.

Conventions (every subcommand module `zipmoe/cli/<name>.py` follows them):
- `configure_parser(subparsers)` registers the command with `add_subcommand(...)`, which adds the
  global flags (`--debug`, `-v/--verbose`) so they work before or after the subcommand name.
- Commands that run a model call `add_runtime_flags(parser)` for `--device`, `--memory-budget`,
  `--threads`, with the same names, units and help everywhere; those that load one also call
  `add_progress_flag(parser)` and load inside `with load_progress(not args.no_progress) as progress:`.
- `run(args) -> int` only turns arguments into a library call; it raises `ZipMoEError` for bad input
  and the dispatcher (`cli/main.py`) prints it as one paragraph and exits with status 2.
"""

from __future__ import annotations

import argparse
import contextlib
import logging
import os
import sys
import textwrap
from collections.abc import Callable, Iterator

from zipmoe.config import parse_size
from zipmoe.errors import ZipMoEError

EXIT_OK = 0
EXIT_FAILURE = 1  # the command ran and found a problem it reports itself (e.g. verify mismatch uses 2)
EXIT_USER_ERROR = 2  # a ZipMoEError: bad input, corrupt store, unsupported model; also argparse errors
EXIT_INTERRUPTED = 130  # Ctrl-C, as shells report SIGINT


def global_flags_parent() -> argparse.ArgumentParser:
    """A parent parser with the flags accepted by every command.

    Defaults are SUPPRESS so a subcommand parser never overwrites a value given before the
    subcommand name; the top-level parser sets the real defaults.
    """
    parent = argparse.ArgumentParser(add_help=False)
    parent.add_argument(
        "--debug", action="store_true", default=argparse.SUPPRESS,
        help="show the full traceback when a command fails (default: a one-paragraph message)",
    )
    parent.add_argument(
        "-v", "--verbose", action="count", default=argparse.SUPPRESS,
        help="more log output: -v for progress details (INFO), -vv for internals (DEBUG)",
    )
    return parent


def add_subcommand(
    subparsers: argparse._SubParsersAction, name: str, *, help: str, description: str | None = None
) -> argparse.ArgumentParser:
    """Register one subcommand with the shared global flags and a help layout that keeps newlines."""
    return subparsers.add_parser(
        name,
        help=help,
        description=description or help,
        parents=[global_flags_parent()],
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )


def size_arg(text: str) -> int:
    """argparse type: a size with units; a bad value becomes a usage error naming the flag."""
    try:
        return parse_size(text)
    except ZipMoEError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


def positive_int(text: str) -> int:
    """argparse type: an integer ≥ 1 (thread counts, shard counts, token counts)."""
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a whole number, got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1, got {value}")
    return value


def add_runtime_flags(parser: argparse.ArgumentParser, *, budget_required: bool = False) -> None:
    """--device, --memory-budget, --threads: the knobs of every command that runs a model."""
    group = parser.add_argument_group("runtime")
    group.add_argument(
        "--device", default="auto",
        help="where experts are computed: 'cpu', 'cuda', 'cuda:N' or 'auto' (CUDA if available, else CPU); "
        "default: %(default)s",
    )
    group.add_argument(
        "--memory-budget", type=size_arg, required=budget_required, default=None, metavar="SIZE",
        help="memory for cached experts, with units: '6GiB', '512MiB', '8GB' (GB/MB decimal, GiB/MiB "
        "binary) or bytes; default: everything fits (no offloading)",
    )
    add_threads_flag(group)


def add_threads_flag(parser: argparse.ArgumentParser | argparse._ArgumentGroup) -> None:
    """--threads N: CPU worker threads (decode workers, conversion encoders)."""
    parser.add_argument(
        "--threads", type=positive_int, default=None, metavar="N",
        help="CPU threads for exponent coding (decoding when serving, encoding when converting); "
        f"default: all cores ({_cores()} here)",
    )


def add_progress_flag(parser: argparse.ArgumentParser) -> None:
    """--no-progress: the loading bar is drawn on stderr only when it is a terminal, and not with this."""
    parser.add_argument("--no-progress", action="store_true",
                        help="do not show the loading progress bar (shown only when stderr is a terminal)")


@contextlib.contextmanager
def load_progress(enabled: bool) -> Iterator[Callable[[str, int, int], None] | None]:
    """A tqdm bar on stderr following the loading stages (zipmoe.models.load.load's `progress`);
    yields None (silent) when disabled or when stderr is not a terminal (logs, pipes, CI)."""
    if not enabled or not sys.stderr.isatty():
        yield None
        return
    from tqdm.auto import tqdm

    bar = tqdm(total=1, desc="loading", unit="stage", file=sys.stderr, leave=False,
               bar_format="{l_bar}{bar}| {n_fmt}/{total_fmt} [{elapsed}]")

    def update(stage: str, done: int, total: int) -> None:
        bar.total, bar.n = total, done
        bar.set_description(f"loading ({stage})", refresh=True)

    try:
        yield update
    finally:
        bar.close()


def _cores() -> int:
    """Cores this process may use (same rule as zipmoe.report.available_cores, without importing it)."""
    affinity = getattr(os, "sched_getaffinity", None)
    return len(affinity(0)) if affinity else os.cpu_count() or 1


def setup_logging(verbose: int) -> None:
    """Log to stderr: warnings by default, INFO with -v, DEBUG with -vv. Called once, in main()."""
    level = logging.WARNING if verbose <= 0 else logging.INFO if verbose == 1 else logging.DEBUG
    logging.basicConfig(level=level, format="%(levelname)s %(name)s: %(message)s", stream=sys.stderr)
    logging.getLogger("zipmoe").setLevel(level)


def format_error(exc: BaseException, width: int = 100) -> str:
    """One paragraph: 'zipmoe: error: <message>' wrapped, with the error class for searchability."""
    message = " ".join(str(exc).split()) or exc.__class__.__name__
    text = f"zipmoe: error ({exc.__class__.__name__}): {message}"
    return textwrap.fill(text, width=width, subsequent_indent="  ", break_on_hyphens=False)
