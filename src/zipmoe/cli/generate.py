"""`zipmoe generate STORE PROMPT`: one prompt in, the generated text out (streamed to stdout)."""

from __future__ import annotations

import argparse
import sys

from zipmoe.cli import common
from zipmoe.errors import ZipMoEError

_DESCRIPTION = """Generate text for one prompt from a zipmoe store (or a local Hugging Face checkpoint).

The text is streamed to stdout as it is generated; --stats prints timings and cache hit rates to
stderr. Greedy decoding (the default, --temperature 0) gives exactly the text the server returns.

examples:
  zipmoe generate ./store "The capital of France is" --max-tokens 20
  zipmoe generate ./store "Write a haiku about disks" --chat --temperature 0.7 --seed 1
  echo "Tell me a joke" | zipmoe generate ./store - --chat --memory-budget 2GiB"""


def add_sampling_flags(parser: argparse.ArgumentParser) -> None:
    """--max-tokens, --temperature, --top-p, --seed, --stop: shared with `zipmoe chat`."""
    g = parser.add_argument_group("sampling")
    g.add_argument("--max-tokens", type=common.positive_int, default=256, metavar="N",
                   help="most tokens to generate (default: %(default)s)")
    g.add_argument("--temperature", type=float, default=0.0, metavar="T",
                   help="0 = greedy, deterministic (default); higher = more random, e.g. 0.7")
    g.add_argument("--top-p", type=float, default=1.0, metavar="P",
                   help="nucleus sampling: sample among the most likely tokens holding mass P (default: 1)")
    g.add_argument("--seed", type=int, default=None, help="random seed for sampling (same seed, same text)")
    g.add_argument("--stop", action="append", default=[], metavar="TEXT",
                   help="stop when this text appears (not printed); may be repeated")


def configure_parser(subparsers: argparse._SubParsersAction) -> argparse.ArgumentParser:
    parser = common.add_subcommand(subparsers, "generate", help="generate text for one prompt from a store",
                                   description=_DESCRIPTION)
    parser.add_argument("store", help="zipmoe store directory (from 'zipmoe convert') or HF checkpoint")
    parser.add_argument("prompt", help="the prompt text; '-' reads it from stdin")
    parser.add_argument("--chat", action="store_true",
                        help="wrap the prompt as a user message with the model's chat template")
    parser.add_argument("--system", default=None, metavar="TEXT", help="system message (with --chat)")
    parser.add_argument("--stats", action="store_true",
                        help="print tokens, TTFT, TPOT and cache hit rates to stderr afterwards")
    add_sampling_flags(parser)
    common.add_runtime_flags(parser)
    common.add_progress_flag(parser)
    return parser


def sampling_params(args: argparse.Namespace):
    """SamplingParams from the flags, with the ranges checked."""
    from zipmoe.generation import SamplingParams

    if not 0.0 <= args.temperature <= 2.0:
        raise ZipMoEError(f"--temperature must be between 0 and 2, got {args.temperature}")
    if not 0.0 < args.top_p <= 1.0:
        raise ZipMoEError(f"--top-p must be in (0, 1], got {args.top_p}")
    return SamplingParams(max_tokens=args.max_tokens, temperature=args.temperature, top_p=args.top_p,
                          seed=args.seed, stop=tuple(s for s in args.stop if s))


def format_stats(result, before: dict, after: dict) -> str:
    """One line of request numbers (+ cache hit rates when the engine serves the model)."""
    line = (f"[{result.prompt_tokens} prompt + {result.completion_tokens} generated tokens, "
            f"TTFT {result.ttft_s * 1000:.0f} ms, TPOT {result.tpot_s * 1000:.1f} ms, "
            f"finish: {result.finish_reason}]")
    if after.get("hits"):
        hits = {k: after["hits"][k] - before.get("hits", {}).get(k, 0) for k in after["hits"]}
        served = sum(hits.values()) or 1
        rates = " ".join(f"{k} {v / served:.0%}" for k, v in hits.items())
        read = (after.get("bytes_read", 0) - before.get("bytes_read", 0)) / 2**20
        line += f"\n[experts served by state: {rates}; read {read:.1f} MiB]"
    return line


def run(args: argparse.Namespace) -> int:
    from zipmoe.generation import encode_chat, encode_prompt, load_handle, write_stream

    params = sampling_params(args)
    prompt = sys.stdin.read() if args.prompt == "-" else args.prompt
    if not prompt.strip():
        raise ZipMoEError("the prompt is empty: pass some text, or '-' to read it from stdin")
    with common.load_progress(not args.no_progress) as progress:
        handle = load_handle(args.store, device=args.device, memory_budget=args.memory_budget,
                             threads=args.threads, progress=progress)
    if args.chat:
        messages = ([{"role": "system", "content": args.system}] if args.system else [])
        ids = encode_chat(handle, [*messages, {"role": "user", "content": prompt}])
    else:
        ids = encode_prompt(handle, prompt)
    if len(ids) >= handle.context_length:
        raise ZipMoEError(f"the prompt has {len(ids)} tokens but the model's context is "
                          f"{handle.context_length}; shorten it")
    before = handle.stats()
    result = write_stream(sys.stdout, handle, ids, params)
    sys.stdout.write("\n")
    if args.stats:
        print(format_stats(result, before, handle.stats()), file=sys.stderr)
    return common.EXIT_OK
