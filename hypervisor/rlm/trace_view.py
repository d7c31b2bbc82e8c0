"""Show an RLM trace (turns, code, outputs, sub-calls, tokens, time) with rich, and find stored ones.

Traces are the JSON files `neuraos_agent.rlm.trace.Trace.write` leaves, named
`rlm-<time>-<n>.json`; their ID is the name without `rlm-` and `.json`.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from rich.console import Group, RenderableType
from rich.panel import Panel
from rich.syntax import Syntax
from rich.table import Table
from rich.text import Text
from rich.tree import Tree

from hypervisor.errors import NeuraError

OUTPUT_LINES = 14


def trace_id(path: Path) -> str:
    return path.stem.removeprefix("rlm-")


def find(ref: str, folder: Path) -> Path:
    """A trace by file path, by ID (or a unique part of one), or `last`."""
    p = Path(ref).expanduser()
    if p.is_file():
        return p
    stored = sorted(folder.glob("rlm-*.json")) if folder.is_dir() else []
    if ref in ("last", "latest"):
        if not stored:
            raise NeuraError(f"no stored traces in {folder}", "run `neuraos ask QUESTION --context PATH` first")
        return max(stored, key=lambda f: f.stat().st_mtime)
    hits = [f for f in stored if ref in trace_id(f)]
    if len(hits) == 1:
        return hits[0]
    if not hits:
        raise NeuraError(f"no trace {ref!r} (not a file, nor an ID in {folder})",
                         "to ask a question and see its trace: neuraos ask \"QUESTION\" --context PATH --trace")
    raise NeuraError(f"{len(hits)} traces match {ref!r}", "give more of the ID: " + ", ".join(trace_id(f) for f in hits[:4]))


def load(path: Path) -> dict[str, Any]:
    try:
        doc = json.loads(path.read_text())
    except (OSError, ValueError) as exc:
        raise NeuraError(f"cannot read trace {path}: {exc}") from None
    if not isinstance(doc, dict) or "turns" not in doc or "question" not in doc:
        raise NeuraError(f"{path} is not an RLM trace")
    return doc


def _usage(u: dict[str, Any]) -> str:
    return (f"{u.get('model_calls', 0)} model calls ({u.get('root_calls', 0)} root, {u.get('sub_calls', 0)} sub), "
            f"{u.get('tokens', 0):,} tokens ({u.get('prompt_tokens', 0):,} in, {u.get('completion_tokens', 0):,} out), "
            f"{u.get('tool_calls', 0)} tool calls, {u.get('wall_s', 0):.1f} s")


def _sub_calls(calls: list[dict[str, Any]]) -> Table:
    t = Table(box=None, padding=(0, 1), show_edge=False, header_style="dim")
    for col, just in (("sub-call", "left"), ("depth", "right"), ("tokens in", "right"), ("out", "right"),
                      ("ms", "right"), ("reply", "left")):
        t.add_column(col, justify=just)  # type: ignore[arg-type]
    for c in calls:
        reply = Text(c.get("preview", "").replace("\n", " ")[:80])
        if c.get("error"):
            reply = Text(c["error"][:80], style="yellow")
        t.add_row(c["kind"], str(c["depth"]), str(c.get("prompt_tokens") or ""), str(c.get("completion_tokens") or ""),
                  f"{c.get('ms', 0):.0f}", reply)
    return t


def _tree(trace: dict[str, Any]) -> Tree:
    ctx = trace.get("context", {})
    head = Text.assemble(("RLM ", "bold"), (trace["question"], "bold cyan"),
                         f"\ncontext: {ctx.get('kind')} of {ctx.get('chars', 0):,} chars in {ctx.get('items', 0):,} "
                         f"{'lines' if ctx.get('kind') == 'text' else 'documents'}"
                         + (f" ({ctx['source']})" if ctx.get("source") else "")
                         + f"; mode {trace.get('mode')}, depth {trace.get('depth', 0)}")
    tree = Tree(head)
    for t in trace["turns"]:
        label = Text.assemble((f"turn {t['index']}", "bold"),
                              f"  {t.get('ms', 0) / 1000:.1f} s · root {t.get('prompt_tokens', 0)}+"
                              f"{t.get('completion_tokens', 0)} tokens · {len(t.get('sub_calls', []))} sub-calls")
        node = tree.add(label)
        if t.get("mode", trace.get("mode")) == "ops" and t.get("model_text"):
            node.add(Panel(Text(t["model_text"].strip()), title="root wrote", title_align="left",
                           border_style="dim", expand=False))
        if t.get("code", "").strip():
            node.add(Syntax(t["code"].rstrip(), "python", theme="ansi_dark", word_wrap=True))
        out = (t.get("output") or "").strip()
        if out:
            lines = out.splitlines()
            shown = "\n".join(lines[:OUTPUT_LINES]) + (f"\n... {len(lines) - OUTPUT_LINES} more lines"
                                                        if len(lines) > OUTPUT_LINES else "")
            node.add(Panel(Text(shown), title=f"output ({t.get('output_chars', len(out)):,} chars)",
                           title_align="left", border_style="dim"))
        for v in t.get("violations", []):
            node.add(Text(f"blocked {v['kind']}: {v['detail']}", style="bold red"))
        if t.get("error"):
            node.add(Text(t["error"].strip().splitlines()[-1], style="yellow"))
        if t.get("sub_calls"):
            node.add(_sub_calls(t["sub_calls"]))
        if t.get("final") is not None:
            node.add(Text.assemble(("FINAL ", "bold green"), str(t["final"])))
    for child in trace.get("children", []):
        tree.add(_tree(child))
    done = "green" if trace.get("finished") else "yellow"
    tree.add(Text.assemble(("answer: ", f"bold {done}"), trace.get("answer") or "(none)"))
    tree.add(Text(f"stop: {trace.get('stop_reason', '')}; {_usage(trace.get('usage', {}))}", style="dim"))
    return tree


def render(trace: dict[str, Any], path: Path | None = None) -> RenderableType:
    parts: list[RenderableType] = [_tree(trace)]
    conf = trace.get("confinement") or {}
    if conf:
        parts.append(Text(f"sandbox: namespaces {conf.get('namespaces')}, view {', '.join(conf.get('view', []))[:120]}",
                          style="dim"))
    if path is not None:
        parts.append(Text(f"trace {trace_id(path)}: {path}", style="dim"))
    return Group(*parts)
