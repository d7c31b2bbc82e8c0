"""The root loop of a Recursive Language Model (Zhang, Kraska & Khattab, 2025).

The root model gets the question and a description of the context, never the context. Each
turn it writes code (an op program, or Python), the sandboxed REPL runs it, and the root sees
the truncated output. Sub-calls (`llm_query`, `rlm_query`, embeddings, tools) go through this
loop, which charges them to one shared `Usage`; when a budget runs out the loop ends with the
best answer so far and says so. Every query leaves a `Trace`.
"""

from __future__ import annotations

import re
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Mapping

from neuraos_agent.rlm import ops, prompts
from neuraos_agent.rlm.budget import Budget, Usage
from neuraos_agent.rlm.clients import Embedder, LLMClient
from neuraos_agent.rlm.context import Context, ContextInfo, describe
from neuraos_agent.rlm.errors import BudgetExhausted, OpsSyntaxError, RLMError
from neuraos_agent.rlm.sandbox import Sandbox, SandboxConfig, TurnResult
from neuraos_agent.rlm.trace import SubCall, Trace, Turn

Tool = Callable[..., Any]


@dataclass(frozen=True)
class RLMConfig:
    mode: str = "ops"                       # ops: grammar-constrained programs; python: free-form code
    budget: Budget = Budget()
    sandbox: SandboxConfig = SandboxConfig()
    max_output_chars: int = 1200            # REPL output the root sees per turn
    root_max_tokens: int | None = None      # default: 96 in ops mode, 1024 in python mode
    sub_max_tokens: int = 256
    answer_tokens: int = 24                 # `answer`/`ask` ops: a short answer
    temperature: float = 0.0
    trace_dir: Path | None = None           # every query's trace is written here when set


@dataclass(frozen=True)
class Answer:
    text: str
    finished: bool          # the root called FINAL; False when a budget, the turn limit or an error ended it
    stop_reason: str
    trace: Trace
    trace_path: Path | None = None

    @property
    def usage(self) -> dict[str, Any]:
        return self.trace.usage


def truncate(text: str, limit: int) -> str:
    if len(text) <= limit:
        return text
    return text[:limit] + f"\n... [{len(text) - limit:,} more characters not shown]"


_CODE = re.compile(r"```(?:repl|python|py)?\s*\n(.*?)```", re.S)
_FINAL = re.compile(r"^\s*FINAL\((.*)\)\s*$", re.M)
_FINAL_VAR = re.compile(r"^\s*FINAL_VAR\((.*)\)\s*$", re.M)


def python_turn(text: str) -> tuple[str, str | None]:
    """Code to run from a free-form turn, and a FINAL(...) written outside code, if any."""
    blocks = _CODE.findall(text)
    code = "\n".join(blocks)
    outside = _CODE.sub("", text)
    if m := _FINAL_VAR.search(outside):
        code += f"\nFINAL_VAR({m.group(1).strip().strip(chr(39) + chr(34))!r})\n"
    elif m := _FINAL.search(outside):
        return code, m.group(1).strip().strip("'\"")
    return code, None


def _offered(tool: Tool | None, question: str) -> bool:
    """A tool with a label set (a classifier) is offered to op programs only for questions that
    name one of its labels: a small root otherwise reaches for it on any text."""
    if tool is None:
        return False
    labels = getattr(tool, "labels", None)
    return not labels or any(str(lab).lower() in question.lower() for lab in labels)


_SCALAR_OPS = ("first", "count", "top", "vote", "compare", "answer")


def _shows_an_answer(program: str) -> bool:
    """An op program whose last step shows a single computed value (not the text itself)."""
    lines = [ln.split() for ln in program.strip().splitlines() if ln.strip()]
    return len(lines) >= 2 and lines[-1] == ["show"] and lines[-2][0] in _SCALAR_OPS


@dataclass
class _Query:
    """One (possibly recursive) query: its depth, trace, and the usage shared with its parent."""

    question: str
    depth: int
    usage: Usage
    trace: Trace
    answer_grammar: str | None
    exhausted: str | None = None
    turn_calls: list[SubCall] = field(default_factory=list)


class RLM:
    """Answer questions over contexts far larger than the model's window.

    `root` writes the programs; `sub` (default: the same client) serves `llm_query`. `tools`
    are extra functions the REPL may call (run here, in the agent, e.g. an embedding
    classifier); `embedder` serves `embed()` and the built-in `rank` tool.
    """

    def __init__(self, root: LLMClient, *, sub: LLMClient | None = None, config: RLMConfig = RLMConfig(),
                 tools: Mapping[str, Tool] | None = None, embedder: Embedder | None = None) -> None:
        if config.mode not in ("ops", "python"):
            raise RLMError(f"unknown mode {config.mode!r}", hint="use ops or python")
        self.root = root
        self.sub = sub or root
        self.config = config
        self.embedder = embedder
        self.tools: dict[str, Tool] = dict(tools or {})
        if embedder is not None and "rank" not in self.tools:
            from neuraos_agent.rlm.tools import EmbeddingRanker

            self.tools["rank"] = EmbeddingRanker(embedder)

    # -- public ---------------------------------------------------------------------------------
    def ask(self, question: str, context: Context, *, answer_grammar: str | None = None,
            source: str = "") -> Answer:
        """Answer `question` over `context`; always returns, with `finished` False if a budget ended it."""
        usage = Usage()
        answer = self._run(question, context, depth=0, usage=usage, answer_grammar=answer_grammar, source=source)
        path = answer.trace.write(self.config.trace_dir) if self.config.trace_dir else None
        return Answer(answer.text, answer.finished, answer.stop_reason, answer.trace, path)

    # -- the loop -------------------------------------------------------------------------------
    def _run(self, question: str, context: Context, *, depth: int, usage: Usage, answer_grammar: str | None,
             source: str = "") -> Answer:
        cfg, budget = self.config, self.config.budget
        info = describe(context, source)
        trace = Trace(question, info.to_dict(), cfg.mode, depth, budget.to_dict())
        q = _Query(question, depth, usage, trace, answer_grammar)
        vocab = ops.Vocabulary(fields=info.record_fields,
                               tools=tuple(t for t in ("classify", "rank") if _offered(self.tools.get(t), question)))
        steps: list[prompts.Step] = []
        best, finished, stop = "", False, ""
        seen: set[tuple[str, str]] = set()
        try:
            sandbox = Sandbox(context, config=cfg.sandbox, tools=tuple(self.tools))
            sandbox.start()
        except RLMError as exc:
            trace.stop_reason = f"error: {exc}"
            trace.usage = usage.to_dict()
            return Answer("", False, trace.stop_reason, trace)
        try:
            trace.confinement = sandbox.confinement
            sandbox.run(f"question = {question!r}\nanswer_grammar = {answer_grammar!r}\n"
                        f"answer_tokens = {cfg.answer_tokens}\n")
            for index in range(budget.max_turns):
                try:
                    usage.check(budget)
                except BudgetExhausted as exc:
                    stop = exc.reason
                    break
                turn, result = self._turn(q, sandbox, info, vocab, steps, index)
                trace.turns.append(turn)
                if result is not None and result.candidate:
                    best = result.candidate
                if turn.final is not None and turn.final.strip():
                    best, finished, stop = turn.final.strip(), True, "final"
                    break
                if q.exhausted:
                    stop = q.exhausted
                    break
                # An op program that computed an answer, showed it, and is then run again to the
                # same output is a fixpoint: another turn can learn nothing, so its value is the
                # answer (SmolLM2 writes `answer; show` and repeats it until the turns run out).
                ran = (turn.code.strip(), turn.output.strip())
                if (ran in seen and _shows_an_answer(turn.model_text) and not turn.error and result is not None
                        and result.candidate):
                    best, finished = result.candidate.strip(), True
                    stop = "converged: the root ran the same program again and got the same result"
                    break
                seen.add(ran)
                steps.append(prompts.Step(turn.model_text if cfg.mode == "ops" else turn.code, turn.output))
            else:
                stop = f"turns ({budget.max_turns})"
        finally:
            sandbox.close()
        trace.answer, trace.finished = best, finished
        trace.stop_reason = stop if finished else f"budget exhausted: {stop}; best answer so far"
        trace.usage = usage.to_dict()
        return Answer(best, finished, trace.stop_reason, trace)

    def _turn(self, q: _Query, sandbox: Sandbox, info: ContextInfo, vocab: ops.Vocabulary,
              steps: list[prompts.Step], index: int) -> tuple[Turn, TurnResult | None]:
        cfg = self.config
        started = time.monotonic()
        window = getattr(self.root, "window", None)
        if cfg.mode == "ops":
            prompt = prompts.ops_prompt(q.question, info, vocab, steps, window)
            grammar, max_tokens = ops.grammar(q.question, vocab), cfg.root_max_tokens or 96
        else:
            prompt = prompts.python_prompt(q.question, info, tuple(self.tools), steps, window,
                                           cfg.budget.max_depth - q.depth)
            grammar, max_tokens = None, cfg.root_max_tokens or 1024
        c = self.root.complete(prompt, max_tokens=max_tokens, grammar=grammar, temperature=cfg.temperature)
        q.usage.charge(c.prompt_tokens, c.completion_tokens, root=True)
        turn = Turn(index, c.prompt_tokens, c.completion_tokens, c.text, "", "", 0)
        literal_final: str | None = None
        try:
            if cfg.mode == "ops":
                turn.code = ops.compile_ops(ops.parse(c.text, vocab))
            else:
                turn.code, literal_final = python_turn(c.text)
        except OpsSyntaxError as exc:
            turn.error = f"OpsSyntaxError: {exc}"
            turn.output = turn.error
        result: TurnResult | None = None
        if turn.code.strip():
            q.turn_calls = []
            result = sandbox.run(turn.code, lambda fn, a, k: self._serve(q, fn, a, k), turn=index + 1,
                                 wall_s=max(0.5, q.usage.remaining_wall_s(cfg.budget)))
            shown = result.output + (f"\n{result.error}" if result.error else "")
            turn.output, turn.output_chars = truncate(shown, cfg.max_output_chars), result.output_chars
            turn.error = result.error
            turn.violations = [{"kind": v.kind, "detail": v.detail} for v in result.violations]
            turn.final = result.final
            turn.sub_calls = q.turn_calls
        elif turn.error is None and literal_final is None:
            turn.error = "no code in this turn"
            turn.output = "(no ```repl block found; write code or FINAL(answer))"
        if literal_final is not None and not turn.final:
            turn.final = literal_final
        turn.ms = round((time.monotonic() - started) * 1000, 1)
        return turn, result

    # -- calls from the REPL --------------------------------------------------------------------
    def _serve(self, q: _Query, fn: str, args: list, kwargs: dict) -> Any:
        try:
            if fn == "llm_query":
                return self._llm_query(q, str(args[0]), int(kwargs.get("max_tokens") or self.config.sub_max_tokens),
                                       kwargs.get("grammar"))
            if fn == "rlm_query":
                return self._rlm_query(q, str(args[0]), args[1] if len(args) > 1 else None)
            if fn == "embed":
                if self.embedder is None:
                    raise RLMError("no embedding model is attached")
                texts = [str(t) for t in args[0]]
                q.usage.embed_texts += len(texts)
                return self.embedder.embed(texts)
            if fn in self.tools:
                q.usage.check(self.config.budget)
                q.usage.tool_calls += 1
                t0 = time.monotonic()
                value = self.tools[fn](*args, **kwargs)
                q.turn_calls.append(SubCall(fn, q.depth, ms=round((time.monotonic() - t0) * 1000, 1),
                                            preview=str(value)[:120]))
                return value
            raise RLMError(f"unknown call {fn!r}")
        except BudgetExhausted as exc:
            q.exhausted = q.exhausted or exc.reason
            raise

    def _llm_query(self, q: _Query, prompt: str, max_tokens: int, grammar: str | None) -> str:
        q.usage.check(self.config.budget, sub_call=True)
        t0 = time.monotonic()
        c = self.sub.complete(prompt, max_tokens=min(max_tokens, self.config.sub_max_tokens), grammar=grammar,
                              temperature=self.config.temperature)
        q.usage.charge(c.prompt_tokens, c.completion_tokens, root=False)
        q.turn_calls.append(SubCall("llm_query", q.depth, len(prompt), c.prompt_tokens, c.completion_tokens,
                                    round((time.monotonic() - t0) * 1000, 1), c.text[:120]))
        return c.text

    def _rlm_query(self, q: _Query, prompt: str, piece: str | None) -> str:
        if piece is None or q.depth + 1 > self.config.budget.max_depth:
            # at the depth limit a recursive call is a plain call on what fits
            return self._llm_query(q, prompt if piece is None else f"{piece}\n\n{prompt}",
                                   self.config.sub_max_tokens, None)
        q.usage.check(self.config.budget, sub_call=True)
        q.usage.sub_calls += 1
        t0 = time.monotonic()
        child = self._run(prompt, piece, depth=q.depth + 1, usage=q.usage, answer_grammar=q.answer_grammar)
        q.trace.children.append(child.trace)
        q.turn_calls.append(SubCall("rlm_query", q.depth, len(piece), ms=round((time.monotonic() - t0) * 1000, 1),
                                    preview=child.text[:120],
                                    error=None if child.finished else child.stop_reason))
        if not child.finished and "budget" in child.stop_reason and q.exhausted is None:
            q.exhausted = child.stop_reason
        return child.text
