"""`neuraos ask`: the operator asks a question over files, folders, globs or stdin.

    neuraos ask "QUESTION" --context PATH|GLOB|- [--context ...] [--trace] [--json] [budgets]
    neuraos ask --trace [ID|FILE|last]          show a stored trace

The RLM loop is the guest agent's (`neuraos_agent.rlm`): the root model never sees the
context, only a sandboxed REPL does. Models: the host's llama.cpp backend in this process
(the packaged SmolLM2 unless --gguf), or the OpenAI-compatible endpoint given by --endpoint
or the config's `rlm_endpoint`. Wired into `build_parser` by `register(add)`.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path
from typing import Any, Callable

from rich.console import Console

from hypervisor.config import Config
from hypervisor.errors import NeuraError

out = Console()
err = Console(stderr=True)


def trace_dir(cfg: Config) -> Path:
    return cfg.state_dir / "rlm-traces"


def register(add: Callable[..., argparse.ArgumentParser]) -> None:
    p = add("ask", cmd_ask, "answer a question over files or stdin with a recursive language model")
    p.add_argument("question", nargs="?", help="the question (leave out with --trace ID to show a stored trace)")
    p.add_argument("-c", "--context", action="append", default=[], metavar="PATH|GLOB|-",
                   help="files, folders or globs to read (repeatable); - or none for stdin")
    p.add_argument("--trace", nargs="?", const=True, default=None, metavar="ID|FILE",
                   help="show the trace (turns, code, outputs, sub-calls, tokens, time); with an ID, FILE or "
                        "'last' and no question, show a stored one")
    p.add_argument("--mode", choices=("ops", "python"), default=None,
                   help="root writes op programs (small models; default for llama.cpp) or Python (default for "
                        "an endpoint)")
    p.add_argument("--endpoint", default=None, metavar="URL",
                   help="an OpenAI-compatible endpoint (default: the config's rlm_endpoint, else llama.cpp here)")
    p.add_argument("--model", default=None, help="model name at the endpoint (default: the config's rlm_model)")
    p.add_argument("--gguf", type=Path, default=None, metavar="PATH", help="a GGUF for llama.cpp (default: SmolLM2)")
    p.add_argument("--window", type=int, default=None, help="model window in tokens (default 2048 for llama.cpp)")
    p.add_argument("--threads", type=int, default=None, help="llama.cpp threads (default: all CPUs, at most 8)")
    p.add_argument("--embed", action="store_true",
                   help="load the host's embedding model so programs may rank pieces by meaning (the `rank` "
                        "tool); off by default: loading it takes longer than most questions")
    p.add_argument("--max-depth", type=int, default=1, help="levels of rlm_query below the root")
    p.add_argument("--max-sub-calls", type=int, default=64)
    p.add_argument("--max-tokens", type=int, default=200_000, help="all model calls together")
    p.add_argument("--max-wall", type=float, default=300.0, metavar="S")
    p.add_argument("--max-turns", type=int, default=6, help="root turns")
    p.add_argument("--trace-dir", type=Path, default=None, help="where traces are kept (default: STATE_DIR/rlm-traces)")


def _budget(args: argparse.Namespace):
    from neuraos_agent.rlm import Budget

    for name in ("max_depth", "max_sub_calls", "max_tokens", "max_turns"):
        if getattr(args, name) < (0 if name == "max_depth" else 1):
            raise NeuraError(f"--{name.replace('_', '-')} must be at least {0 if name == 'max_depth' else 1}")
    if args.max_wall <= 0:
        raise NeuraError("--max-wall must be a positive number of seconds")
    return Budget(args.max_depth, args.max_sub_calls, args.max_tokens, args.max_wall, args.max_turns)


def _client(args: argparse.Namespace, cfg: Config) -> tuple[Any, str, Callable[[], None]]:
    """(LLM client, a description, close)."""
    from neuraos_agent.rlm.clients import OpenAICompatClient

    endpoint = args.endpoint or cfg.rlm_endpoint
    if endpoint and not args.gguf:
        model = args.model or cfg.rlm_model
        return OpenAICompatClient(endpoint, model, window=args.window or 8192), f"{model} at {endpoint}", lambda: None
    from hypervisor.inference.backends import LlamaCppBackend, LlamaCppConfig
    from hypervisor.rlm.backend_client import BackendClient

    if args.gguf and not args.gguf.is_file():
        raise NeuraError(f"no GGUF model at {args.gguf}")
    threads = args.threads or min(8, os.cpu_count() or 2)
    backend = LlamaCppBackend(LlamaCppConfig(model_path=args.gguf, slots=1, n_ctx=args.window or 2048,
                                             n_threads=threads))
    return BackendClient(backend), f"llama.cpp {backend.model} (n_ctx {backend.config.n_ctx}, {threads} threads)", \
        backend.close


class _HostEmbedder:
    """The host's MiniLM behind the loop's `Embedder` protocol (lists of floats)."""

    def __init__(self) -> None:
        from hypervisor.inference.embed import MiniLMEmbedder

        self._model = MiniLMEmbedder()

    def embed(self, texts):
        return self._model.encode(list(texts)).tolist()


def _embedder(args: argparse.Namespace):
    if not args.embed:
        return None
    from hypervisor.inference.errors import BackendUnavailable

    try:
        return _HostEmbedder()
    except BackendUnavailable as exc:
        raise NeuraError(str(exc), "leave out --embed, or install the embedding model") from None


def _show_stored(args: argparse.Namespace, cfg: Config) -> int:
    from hypervisor.rlm import trace_view

    folder = args.trace_dir or trace_dir(cfg)
    path = trace_view.find("last" if args.trace is True else args.trace, folder)
    doc = trace_view.load(path)
    if args.json:
        print(json.dumps({"trace_id": trace_view.trace_id(path), "trace_path": str(path), "trace": doc}))
    else:
        out.print(trace_view.render(doc, path))
    return 0


def cmd_ask(args: argparse.Namespace, cfg: Config) -> int:
    if args.question is None:
        if args.trace is None:
            raise NeuraError("no question", 'neuraos ask "QUESTION" --context PATH, or --trace ID to show a trace')
        return _show_stored(args, cfg)
    if isinstance(args.trace, str):
        raise NeuraError("--trace takes an ID only without a question",
                         'put --trace last: neuraos ask "QUESTION" --context PATH --trace')
    if not args.question.strip():
        raise NeuraError("the question is empty")
    from neuraos_agent.rlm import RLM, RLMConfig
    from neuraos_agent.rlm.errors import RLMError

    from hypervisor.rlm import trace_view
    from hypervisor.rlm.sources import gather

    budget = _budget(args)
    context, source = gather(args.context)
    folder = args.trace_dir or trace_dir(cfg)
    status = err.status("loading the model", spinner="dots") if not args.json else None
    close: Callable[[], None] = lambda: None
    try:
        if status:
            status.start()
        client, model_desc, close = _client(args, cfg)
        mode = args.mode or ("python" if (args.endpoint or cfg.rlm_endpoint) and not args.gguf else "ops")
        embedder = _embedder(args)
        if status:
            status.update(f"asking {model_desc} over {source}")
        rlm = RLM(client, config=RLMConfig(mode=mode, budget=budget, trace_dir=folder), embedder=embedder)
        answer = rlm.ask(args.question, context, source=source)
    except RLMError as exc:
        raise NeuraError(str(exc), exc.hint or None) from None
    finally:
        if status:
            status.stop()
        close()
    path = answer.trace_path
    if args.json:
        doc: dict[str, Any] = {"answer": answer.text, "finished": answer.finished, "stop_reason": answer.stop_reason,
                               "usage": answer.usage, "model": model_desc,
                               "trace_id": trace_view.trace_id(path) if path else None,
                               "trace_path": str(path) if path else None}
        if args.trace:
            doc["trace"] = answer.trace.to_dict()
        print(json.dumps(doc))
        return 0 if answer.finished else 3
    if args.trace:
        out.print(trace_view.render(answer.trace.to_dict(), path))
        out.print()
    out.print(answer.text or "(no answer)", highlight=False, markup=False)
    u = answer.usage
    err.print(f"[dim]{model_desc}; {u.get('model_calls', 0)} model calls, {u.get('tokens', 0):,} tokens, "
              f"{u.get('wall_s', 0):.1f} s" + (f"; trace {trace_view.trace_id(path)}" if path else "") + "[/]",
              highlight=False)
    if not answer.finished:
        err.print(f"[yellow]note:[/] {answer.stop_reason}", highlight=False)
    return 0 if answer.finished else 3
