"""The record of one query: every turn, its code and output, every sub-call, tokens and time.

Written as JSON for `neuraos ask --trace` and for debugging a weak root model's programs.
"""

from __future__ import annotations

import json
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any


@dataclass
class SubCall:
    kind: str                  # llm_query | rlm_query | embed | a tool's name
    depth: int
    prompt_chars: int = 0
    prompt_tokens: int = 0
    completion_tokens: int = 0
    ms: float = 0.0
    preview: str = ""          # the start of the reply
    error: str | None = None


@dataclass
class Turn:
    index: int
    prompt_tokens: int
    completion_tokens: int
    model_text: str            # what the root wrote
    code: str                  # the Python run in the REPL (compiled from ops in ops mode)
    output: str                # the output as the root saw it (truncated)
    output_chars: int
    error: str | None = None
    violations: list[dict[str, str]] = field(default_factory=list)
    final: str | None = None
    sub_calls: list[SubCall] = field(default_factory=list)
    ms: float = 0.0


@dataclass
class Trace:
    question: str
    context: dict[str, Any]
    mode: str
    depth: int
    budget: dict[str, Any]
    turns: list[Turn] = field(default_factory=list)
    answer: str = ""
    finished: bool = False     # the root called FINAL (or re-ran a program to the same result); False when
                               # a budget or error ended it
    stop_reason: str = ""
    usage: dict[str, Any] = field(default_factory=dict)
    confinement: dict[str, Any] = field(default_factory=dict)
    children: list["Trace"] = field(default_factory=list)
    created: float = field(default_factory=time.time)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    def write(self, folder: Path) -> Path:
        folder.mkdir(parents=True, exist_ok=True)
        stamp = time.strftime("%Y%m%dT%H%M%S", time.localtime(self.created))
        path = folder / f"rlm-{stamp}-{abs(hash((self.question, self.created))) % 10**8:08d}.json"
        path.write_text(json.dumps(self.to_dict(), indent=1))
        return path


def render(trace: dict[str, Any], indent: str = "") -> str:
    """A short human-readable view of a trace (for `ask --trace`)."""
    u = trace.get("usage", {})
    out = [f"{indent}question: {trace['question']}",
           f"{indent}context: {trace['context'].get('kind')} {trace['context'].get('chars', 0):,} chars; "
           f"mode {trace['mode']}, depth {trace['depth']}",
           f"{indent}stop: {trace['stop_reason']}; {u.get('model_calls', 0)} model calls, "
           f"{u.get('tokens', 0)} tokens, {u.get('wall_s', 0):.1f} s"]
    for t in trace["turns"]:
        out.append(f"{indent}-- turn {t['index']} ({t['ms']:.0f} ms, {len(t['sub_calls'])} sub-calls)")
        out += [f"{indent}   > {ln}" for ln in t["code"].splitlines()]
        if t["output"].strip():
            out += [f"{indent}   | {ln}" for ln in t["output"].strip().splitlines()[:12]]
        if t["error"]:
            out.append(f"{indent}   ! {t['error'].strip().splitlines()[-1]}")
        for v in t["violations"]:
            out.append(f"{indent}   ! blocked {v['kind']}: {v['detail']}")
    for child in trace.get("children", []):
        out.append(render(child, indent + "    "))
    out.append(f"{indent}answer: {trace['answer']}")
    return "\n".join(out)
