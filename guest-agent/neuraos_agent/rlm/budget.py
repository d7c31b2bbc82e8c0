"""Budgets for one query and the usage that is charged against them, shared down the recursion.

A budget never crashes a query: the loop catches `BudgetExhausted`, ends with the best answer
so far and says which budget ran out.
"""

from __future__ import annotations

import time
from dataclasses import asdict, dataclass, field

from neuraos_agent.rlm.errors import BudgetExhausted


@dataclass(frozen=True)
class Budget:
    max_depth: int = 1            # levels of rlm_query below the root; at the limit it is a plain call
    max_sub_calls: int = 64       # llm_query / rlm_query calls in the whole query tree
    max_tokens: int = 200_000     # prompt + completion tokens of every model call, root included
    max_wall_s: float = 300.0
    max_turns: int = 6            # root turns (each one model call and one REPL run)

    def to_dict(self) -> dict:
        return asdict(self)


@dataclass
class Usage:
    root_calls: int = 0
    sub_calls: int = 0
    prompt_tokens: int = 0
    completion_tokens: int = 0
    tool_calls: int = 0
    embed_texts: int = 0
    started: float = field(default_factory=time.monotonic)

    @property
    def tokens(self) -> int:
        return self.prompt_tokens + self.completion_tokens

    @property
    def model_calls(self) -> int:
        return self.root_calls + self.sub_calls

    @property
    def wall_s(self) -> float:
        return time.monotonic() - self.started

    def charge(self, prompt_tokens: int, completion_tokens: int, *, root: bool) -> None:
        self.prompt_tokens += prompt_tokens
        self.completion_tokens += completion_tokens
        if root:
            self.root_calls += 1
        else:
            self.sub_calls += 1

    def check(self, budget: Budget, *, sub_call: bool = False) -> None:
        """Raise `BudgetExhausted` if the next call would be over budget."""
        if self.wall_s >= budget.max_wall_s:
            raise BudgetExhausted(f"wall time ({budget.max_wall_s:g} s)")
        if self.tokens >= budget.max_tokens:
            raise BudgetExhausted(f"tokens ({budget.max_tokens})")
        if sub_call and self.sub_calls >= budget.max_sub_calls:
            raise BudgetExhausted(f"sub-calls ({budget.max_sub_calls})")

    def remaining_wall_s(self, budget: Budget) -> float:
        return max(0.0, budget.max_wall_s - self.wall_s)

    def to_dict(self) -> dict:
        return {"model_calls": self.model_calls, "root_calls": self.root_calls, "sub_calls": self.sub_calls,
                "prompt_tokens": self.prompt_tokens, "completion_tokens": self.completion_tokens,
                "tokens": self.tokens, "tool_calls": self.tool_calls, "embed_texts": self.embed_texts,
                "wall_s": round(self.wall_s, 3)}
