"""`zipmoe chat STORE`: an interactive, streaming chat using the model's own chat template."""

from __future__ import annotations

import argparse
import sys

from zipmoe.cli import common
from zipmoe.cli.generate import add_sampling_flags, format_stats, sampling_params
from zipmoe.errors import ZipMoEError

_DESCRIPTION = """Chat with a model from a zipmoe store; replies stream as they are generated.

commands inside the chat:
  /stats    TTFT, TPOT and cache hit rates of the last reply (and the whole session)
  /reset    forget the conversation so far
  /system TEXT   set the system message (and reset)
  /exit     quit (or Ctrl-D)

example:
  zipmoe chat ./store --memory-budget 4GiB --temperature 0.7"""

_HELP = "commands: /stats  /reset  /system TEXT  /exit"


def configure_parser(subparsers: argparse._SubParsersAction) -> argparse.ArgumentParser:
    parser = common.add_subcommand(subparsers, "chat", help="interactive streaming chat with a store",
                                   description=_DESCRIPTION)
    parser.add_argument("store", help="zipmoe store directory (from 'zipmoe convert') or HF checkpoint")
    parser.add_argument("--system", default=None, metavar="TEXT", help="system message for the conversation")
    add_sampling_flags(parser)
    common.add_runtime_flags(parser)
    common.add_progress_flag(parser)
    return parser


class ChatSession:
    """The conversation and the numbers of its replies; reads stdin, streams to stdout."""

    def __init__(self, handle, params, system: str | None):
        self.handle, self.params, self.system = handle, params, system
        self.messages: list[dict[str, str]] = []
        self.session_start = handle.stats()
        self.last: tuple | None = None  # (result, stats before, stats after) of the last reply

    def reply(self, text: str) -> None:
        from zipmoe.generation import encode_chat, write_stream

        head = [{"role": "system", "content": self.system}] if self.system else []
        messages = [*self.messages, {"role": "user", "content": text}]
        ids = encode_chat(self.handle, head + messages)
        if len(ids) >= self.handle.context_length:
            print(f"(the conversation has {len(ids)} tokens, over the model's context of "
                  f"{self.handle.context_length}; /reset to start over)")
            return
        before = self.handle.stats()
        result = write_stream(sys.stdout, self.handle, ids, self.params)
        print()
        self.messages = [*messages, {"role": "assistant", "content": result.text}]
        self.last = (result, before, self.handle.stats())

    def command(self, line: str) -> bool:
        """Handle a /command; returns False to quit."""
        name, _, rest = line.partition(" ")
        if name in ("/exit", "/quit"):
            return False
        if name == "/stats":
            if self.last is None:
                print("(no reply yet)")
            else:
                print(format_stats(*self.last))
                if self.session_start.get("hits") is not None:
                    after = self.handle.stats()
                    print("session: " + format_stats(self.last[0], self.session_start, after).split("\n")[-1])
        elif name == "/reset":
            self.messages = []
            print("(conversation cleared)")
        elif name == "/system":
            self.system, self.messages = rest.strip() or None, []
            print("(system message set; conversation cleared)")
        else:
            print(_HELP)
        return True


def run(args: argparse.Namespace) -> int:
    from zipmoe.generation import load_handle

    params = sampling_params(args)
    with common.load_progress(not args.no_progress) as progress:
        handle = load_handle(args.store, device=args.device, memory_budget=args.memory_budget,
                             threads=args.threads, progress=progress)
    if not getattr(handle.tokenizer, "chat_template", None):
        raise ZipMoEError(f"model {handle.model_id!r} has no chat template; use 'zipmoe generate' instead")
    session = ChatSession(handle, params, args.system)
    interactive = sys.stdin.isatty()
    if interactive:
        print(f"chatting with {handle.model_id} ({_HELP})")
    while True:
        try:
            line = input("> " if interactive else "")
        except EOFError:
            break
        line = line.strip()
        if not line:
            continue
        if line.startswith("/"):
            if not session.command(line):
                break
            continue
        session.reply(line)
    return common.EXIT_OK
