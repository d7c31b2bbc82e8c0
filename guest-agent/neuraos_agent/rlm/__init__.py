"""The RLM layer: Recursive Language Models over contexts far larger than a model's window.

Entry points: `RLM(...).ask(question, context)` (loop), `Sandbox` (the confined REPL),
the clients (`LlamaCppClient`, `OpenAICompatClient`, `LinkClient`), and `cli.ask_command`.
"""

from neuraos_agent.rlm.budget import Budget, Usage
from neuraos_agent.rlm.clients import (Completion, Embedder, LinkClient, LlamaCppClient, LLMClient,
                                       OpenAICompatClient, SentenceTransformerEmbedder)
from neuraos_agent.rlm.confine import Limits
from neuraos_agent.rlm.context import ContextInfo, CorpusRef, describe
from neuraos_agent.rlm.errors import BudgetExhausted, ClientError, RLMError, SandboxError
from neuraos_agent.rlm.loop import RLM, Answer, RLMConfig
from neuraos_agent.rlm.sandbox import Sandbox, SandboxConfig, TurnResult, Violation

__all__ = ["RLM", "RLMConfig", "Answer", "Budget", "Usage", "Sandbox", "SandboxConfig", "Limits", "TurnResult",
           "Violation", "LLMClient", "Completion", "Embedder", "LlamaCppClient", "OpenAICompatClient", "LinkClient",
           "SentenceTransformerEmbedder", "ContextInfo", "CorpusRef", "describe", "RLMError", "BudgetExhausted",
           "ClientError", "SandboxError"]
