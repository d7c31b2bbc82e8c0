"""The RLM loop's model client over one of the host's model backends, in this process.

The loop speaks `LLMClient.complete(prompt, ...)`; the host's backends speak chat messages and
token streams (`hypervisor.inference.backends`). This adapter renders the prompt with the
model's own chat template, cuts a prompt that does not fit the window out of its middle (the
head and the tail carry the instructions and the question), and streams one answer.
"""

from __future__ import annotations

from typing import Sequence

from neuraos_agent.rlm.clients import Completion
from neuraos_agent.rlm.errors import ClientError

from hypervisor.inference.backends import Backend, GenParams, Message
from hypervisor.inference.errors import InferenceError

ELLIPSIS = "\n...\n"
MAX_CHARS_PER_TOKEN = 8  # no tokenizer here packs more: a longer text is cut by characters first


class BackendClient:
    def __init__(self, backend: Backend, *, slot: int | None = 0) -> None:
        self.backend = backend
        self.slot = slot
        self.window = backend.info().n_ctx or 2048
        # what the chat template adds around one user message
        self.template_reserve = backend.count_tokens(backend.render([Message("user", "")])) + 4

    def count_tokens(self, text: str) -> int:
        return self.backend.count_tokens(text)

    def fit(self, text: str, budget: int) -> tuple[str, bool]:
        """`text` cut to at most `budget` tokens by removing its middle."""
        budget = max(budget, 16)
        cut = False
        if len(text) > budget * MAX_CHARS_PER_TOKEN:
            text, cut = _cut_middle(text, budget * MAX_CHARS_PER_TOKEN), True
        n = self.count_tokens(text)
        while n > budget:
            text, cut = _cut_middle(text, int(len(text) * budget / n * 0.97) - len(ELLIPSIS)), True
            n = self.count_tokens(text)
        return text, cut

    def complete(self, prompt: str, *, max_tokens: int = 256, grammar: str | None = None,
                 stop: Sequence[str] | None = None, temperature: float = 0.0) -> Completion:
        max_tokens = max(1, min(max_tokens, self.window // 2))
        prompt, truncated = self.fit(prompt, self.window - max_tokens - self.template_reserve)
        params = GenParams(max_tokens=max_tokens, temperature=temperature, grammar=grammar,
                           stop=tuple(stop or ()))
        text: list[str] = []
        try:
            for piece in self.backend.stream(self.backend.render([Message("user", prompt)]), params, self.slot):
                text.append(piece.text)
                if piece.done:
                    return Completion("".join(text), piece.prompt_tokens, piece.completion_tokens, truncated)
        except InferenceError as exc:
            raise ClientError(f"the host's model backend failed: {exc}", hint=exc.hint) from exc
        raise ClientError("the host's model backend ended a stream without its last piece")


def _cut_middle(text: str, keep: int) -> str:
    keep = max(keep, 0)
    head = keep * 2 // 3
    tail = keep - head
    return text[:head] + ELLIPSIS + (text[len(text) - tail:] if tail else "")
