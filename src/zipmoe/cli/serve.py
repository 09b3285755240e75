"""`zipmoe serve STORE`: an OpenAI-compatible HTTP API over a store (FastAPI + uvicorn)."""

from __future__ import annotations

import argparse
import os

from zipmoe.cli import common
from zipmoe.errors import ZipMoEError

_DESCRIPTION = """Serve a zipmoe store through an OpenAI-compatible API:
  GET /v1/models, POST /v1/chat/completions, POST /v1/completions (streaming with "stream": true),
  GET /health, GET /metrics (Prometheus: TTFT/TPOT, tokens, cache hits per state, bytes read).

Binds 127.0.0.1 (this machine only) unless --host says otherwise; with --api-key (or the
ZIPMOE_API_KEY environment variable) every /v1 request needs 'Authorization: Bearer KEY'.

examples:
  zipmoe serve ./store --memory-budget 6GiB --port 8000
  curl http://127.0.0.1:8000/v1/chat/completions -H 'Content-Type: application/json' \\
    -d '{"model": "store", "messages": [{"role": "user", "content": "Hi"}]}'"""


def _port(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a port number, got {text!r}") from None
    if not 0 <= value <= 65535:
        raise argparse.ArgumentTypeError(f"port must be between 0 and 65535, got {value}")
    return value


def configure_parser(subparsers: argparse._SubParsersAction) -> argparse.ArgumentParser:
    parser = common.add_subcommand(subparsers, "serve", help="serve a store through an OpenAI-compatible API",
                                   description=_DESCRIPTION)
    parser.add_argument("store", help="zipmoe store directory (from 'zipmoe convert') or HF checkpoint")
    parser.add_argument("--host", default="127.0.0.1",
                        help="address to bind (default: %(default)s; 0.0.0.0 exposes it to the network)")
    parser.add_argument("--port", type=_port, default=8000, help="TCP port (default: %(default)s)")
    parser.add_argument("--api-key", default=os.environ.get("ZIPMOE_API_KEY"), metavar="KEY",
                        help="require 'Authorization: Bearer KEY' (default: $ZIPMOE_API_KEY, else none)")
    parser.add_argument("--model-id", default=None, metavar="NAME",
                        help="model name clients must send (default: the store directory's name)")
    parser.add_argument("--max-running", type=common.positive_int, default=16, metavar="N",
                        help="requests decoded at once; more wait in a queue (default: %(default)s)")
    common.add_runtime_flags(parser)
    common.add_progress_flag(parser)
    return parser


def run(args: argparse.Namespace) -> int:
    from zipmoe.generation import load_handle
    from zipmoe.serve.app import run_server

    if args.api_key is not None and not args.api_key.strip():
        raise ZipMoEError("--api-key is empty: give a non-empty key, or leave the flag out")
    with common.load_progress(not args.no_progress) as progress:
        handle = load_handle(args.store, device=args.device, memory_budget=args.memory_budget,
                             threads=args.threads, model_id=args.model_id, progress=progress)
    key_note = ", API key required" if args.api_key else ""
    print(f"serving {handle.model_id!r} on http://{args.host}:{args.port}/v1 "
          f"(context {handle.context_length} tokens{key_note})", flush=True)
    run_server(handle, host=args.host, port=args.port, api_key=args.api_key, max_running=args.max_running,
               log_level="warning" if args.verbose <= 0 else "info")
    return common.EXIT_OK
