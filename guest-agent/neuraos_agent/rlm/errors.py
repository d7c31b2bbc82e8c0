"""The RLM layer's exceptions: one hierarchy, so callers catch `RLMError` and print one line."""

from __future__ import annotations


class RLMError(Exception):
    """Base of every expected failure in the RLM layer; `hint` says what to do about it."""

    hint: str = ""

    def __init__(self, message: str, hint: str = "") -> None:
        super().__init__(message)
        if hint:
            self.hint = hint


class ClientError(RLMError):
    """A model endpoint could not be reached, refused the request, or is not installed."""


class SandboxError(RLMError):
    """The sandbox could not be started or stopped answering (it is restarted, the agent is not)."""


class BudgetExhausted(RLMError):
    """A query ran out of depth, sub-calls, tokens, turns or wall time; `reason` names which."""

    def __init__(self, reason: str) -> None:
        super().__init__(f"budget exhausted: {reason}", hint="raise the budget or ask a narrower question")
        self.reason = reason


class OpsSyntaxError(RLMError):
    """A grammar-constrained turn did not parse as an op program (a weak model drifted)."""


class ContextError(RLMError):
    """A context source (path, vfs, logs) could not be resolved."""
