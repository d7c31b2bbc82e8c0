"""`neuraos-agent ask "QUESTION" [--context PATH|vfs|vfs:QUERY|logs|system] [--trace] [--json]`.

`add_ask_parser(subparsers)` registers the command and `cmd_ask(args)` runs it, so the agent's
main.py wires it in two lines. Models: the host's model service over the link by default,
`--endpoint URL` for any OpenAI-compatible server, `--gguf PATH` for llama.cpp in-process.
Every expected failure prints one line and a hint, never a traceback.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path
from typing import Any

from neuraos_agent.rlm.budget import Budget
from neuraos_agent.rlm.clients import (DEFAULT_LINK_WINDOW, LinkClient, LlamaCppClient, LLMClient,
                                       OpenAICompatClient)
from neuraos_agent.rlm.context import resolve
from neuraos_agent.rlm.errors import RLMError
from neuraos_agent.rlm.loop import RLM, RLMConfig
from neuraos_agent.rlm.trace import render


def default_trace_dir() -> Path:
    env = os.environ.get("NEURAOS_RLM_TRACE_DIR")
    if env:
        return Path(env)
    return Path("/var/lib/neuraos-agent/rlm-traces") if os.geteuid() == 0 else \
        Path.home() / ".local/state/neuraos-agent/rlm-traces"


def add_ask_parser(sub: Any) -> argparse.ArgumentParser:
    """Add `ask` to an argparse subparsers object (the agent's main.py)."""
    p = sub.add_parser("ask", help="answer a question over a large context with a recursive LM")
    p.add_argument("question")
    p.add_argument("--context", default="vfs", metavar="PATH|vfs|vfs:QUERY|logs|system",
                   help="what to read (default: the vector FS)")
    p.add_argument("--trace", action="store_true", help="show the turns, code, outputs and sub-calls")
    p.add_argument("--json", action="store_true", help="machine-readable output")
    p.add_argument("--mode", choices=("ops", "python"), default=None,
                   help="root writes op programs (small models) or Python (default: ops for llama.cpp "
                        "and the link, python for --endpoint)")
    p.add_argument("--endpoint", default=os.environ.get("NEURAOS_RLM_ENDPOINT"), metavar="URL",
                   help="an OpenAI-compatible endpoint (default: $NEURAOS_RLM_ENDPOINT, else the host's service)")
    p.add_argument("--model", default="default", help="model name at --endpoint")
    p.add_argument("--gguf", type=Path, metavar="PATH",
                   help="run this GGUF in-process with llama.cpp ('smollm2' for the packaged one)")
    p.add_argument("--window", type=int, default=None, help="model window in tokens")
    p.add_argument("--max-depth", type=int, default=1)
    p.add_argument("--max-sub-calls", type=int, default=64)
    p.add_argument("--max-tokens", type=int, default=200_000)
    p.add_argument("--max-wall", type=float, default=300.0, metavar="S")
    p.add_argument("--max-turns", type=int, default=6, help="root turns")
    p.add_argument("--trace-dir", type=Path, default=None, help=f"default: {default_trace_dir()}")
    p.set_defaults(func=cmd_ask)
    return p


def _client(args: argparse.Namespace) -> LLMClient:
    if args.gguf:
        path = None if str(args.gguf) == "smollm2" else args.gguf
        return LlamaCppClient(path, n_ctx=args.window or 2048)
    if args.endpoint:
        return OpenAICompatClient(args.endpoint, args.model, window=args.window or 8192)
    return LinkClient(window=args.window or int(os.environ.get("NEURAOS_RLM_WINDOW", DEFAULT_LINK_WINDOW)))


def cmd_ask(args: argparse.Namespace) -> int:
    try:
        context, source = resolve(args.context)
        client = _client(args)
        mode = args.mode or ("python" if args.endpoint and not args.gguf else "ops")
        config = RLMConfig(mode=mode, budget=Budget(args.max_depth, args.max_sub_calls, args.max_tokens, args.max_wall,
                                                         args.max_turns),
                           trace_dir=args.trace_dir or default_trace_dir())
        answer = RLM(client, config=config).ask(args.question, context, source=source)
    except RLMError as exc:
        print(f"neuraos-agent ask: {exc}", file=sys.stderr)
        if exc.hint:
            print(f"hint: {exc.hint}", file=sys.stderr)
        return 1
    except OSError as exc:
        print(f"neuraos-agent ask: {exc}", file=sys.stderr)
        return 1
    if args.json:
        doc = {"answer": answer.text, "finished": answer.finished, "stop_reason": answer.stop_reason,
               "usage": answer.usage, "trace_path": str(answer.trace_path) if answer.trace_path else None}
        if args.trace:
            doc["trace"] = answer.trace.to_dict()
        print(json.dumps(doc, indent=2))
        return 0 if answer.finished else 3
    if args.trace:
        print(render(answer.trace.to_dict()))
        print()
    print(answer.text)
    if not answer.finished:
        print(f"note: {answer.stop_reason}", file=sys.stderr)
    if answer.trace_path:
        print(f"trace: {answer.trace_path}", file=sys.stderr)
    return 0 if answer.finished else 3


def main(argv: list[str] | None = None) -> int:
    """`python -m neuraos_agent.rlm.cli ask ...` until main.py wires the command in."""
    parser = argparse.ArgumentParser(prog="neuraos-agent")
    add_ask_parser(parser.add_subparsers(dest="command", required=True))
    args = parser.parse_args(argv)
    return args.func(args)


if __name__ == "__main__":
    sys.exit(main())
