"""The host's model service: Complete (streaming) and Embed for every guest over its link.

One backend and one embedding model serve all guests. The guest is whatever channel the call
came in on (`handlers(guest)` binds it; the LinkServer builds one set per guest channel), never
a field of the request, so quotas and sessions are that guest's alone. Every refusal is an
`InferenceError` with its gRPC status, raised before any work is done where possible.

Wiring: `LinkServer(transport, services=service.handlers)`.
"""

from __future__ import annotations

import json
import logging
import os
import threading
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Callable, Iterator, Mapping, Sequence

import grpc

from hypervisor.inference.backends import Backend, GenParams, Message
from hypervisor.inference.embed import EmbedBatcher
from hypervisor.inference.errors import BackendUnavailable, InferenceError, InvalidRequest
from hypervisor.inference.parking import StateStore
from hypervisor.inference.quotas import GuestLimits, GuestQuota
from hypervisor.inference.sessions import KV_SOURCES, Session, SessionInfo, SessionTable, SlotPool
from hypervisor.link._gen import link_pb2

if TYPE_CHECKING:
    import numpy as np

    from hypervisor.kvpager.cost import RestoreCost

log = logging.getLogger("neuraos.inference")

SERVICE = link_pb2.DESCRIPTOR.services_by_name["Models"].full_name
_SID_MAX = 128


@dataclass(frozen=True)
class ServiceConfig:
    default_max_tokens: int = 128
    max_tokens_limit: int = 1024
    max_prompt_chars: int = 32_000
    max_grammar_chars: int = 64_000
    max_stops: int = 8
    max_embed_texts: int = 128  # 128 x 384 float32 stays under the link's 256 KiB messages
    max_embed_chars: int = 8_192
    # An embedding token is a forward pass through MiniLM (22 M parameters, no generation): about
    # a twentieth of an LLM token's compute, so a guest indexing its files is not throttled as if
    # it were generating text (at full weight, 1,000 short files took 140 s of quota waits).
    embed_token_weight: float = 0.05
    slot_wait_s: float = 30.0
    quota: GuestQuota = GuestQuota()
    guest_quotas: Mapping[str, GuestQuota] = field(default_factory=dict)
    snapshot_path: Path | None = None  # where `neuraos models` / `neuraos kv` read the live state
    snapshot_every_s: float = 1.0


@dataclass(frozen=True)
class CompleteArgs:
    """A Complete request as plain data (the proto's fields, validated by the service)."""

    prompt: str
    max_tokens: int = 0
    temperature: float = 0.0
    top_p: float = 0.0
    seed: int = 0
    grammar: str = ""
    session: str = ""
    resume: bool = False
    raw: bool = False
    system: str = ""
    stop: tuple[str, ...] = ()

    @classmethod
    def from_proto(cls, msg: link_pb2.CompleteRequest) -> CompleteArgs:
        return cls(msg.prompt, msg.max_tokens, msg.temperature, msg.top_p, msg.seed, msg.grammar, msg.session,
                   msg.resume, msg.raw, msg.system, tuple(msg.stop))


@dataclass(frozen=True)
class Usage:
    prompt_tokens: int
    cached_tokens: int
    completion_tokens: int
    ttft_ms: float
    kv_source: str
    finish_reason: str


@dataclass(frozen=True)
class Chunk:
    text: str
    usage: Usage | None = None  # set on the last chunk only


@dataclass
class GuestCounters:
    requests: int = 0
    refused: int = 0
    prompt_tokens: int = 0
    cached_tokens: int = 0
    completion_tokens: int = 0
    embed_texts: int = 0
    kv: dict[str, int] = field(default_factory=lambda: dict.fromkeys(KV_SOURCES, 0))

    @property
    def kv_hit_rate(self) -> float | None:
        """Of the turns that continued a session, how many found their KV state kept."""
        kept = self.kv["slot"] + self.kv["ram"] + self.kv["nvme"]
        total = kept + self.kv["prefill"]
        return kept / total if total else None


class ModelService:
    def __init__(self, backend: Backend | None, embedder: EmbedBatcher | None = None,
                 config: ServiceConfig = ServiceConfig(), store: StateStore | None = None,
                 clock: Callable[[], float] = time.monotonic, cost: RestoreCost | None = None) -> None:
        self.backend = backend
        self.embedder = embedder
        self.config = config
        self.store = store
        self.clock = clock
        self.cost = cost  # measured restore vs re-prefill costs: decides how a parked session returns
        self.sessions = SessionTable(clock)
        info = backend.info() if backend is not None else None
        self.pool = (SlotPool(backend, info.slots, store, clock, cost=cost)
                     if info is not None and info.kv_state else None)
        self._limits: dict[str, GuestLimits] = {}
        self._counters: dict[str, GuestCounters] = {}
        self._lock = threading.Lock()
        self._snapshot_at = 0.0

    # -- wiring -------------------------------------------------------------------------------

    def handlers(self, guest: str) -> list[grpc.GenericRpcHandler]:
        """The Models service for one guest's channel: pass `service.handlers` to LinkServer."""
        servicer = _ModelsServicer(self, guest)
        req = link_pb2
        return [grpc.method_handlers_generic_handler(SERVICE, {
            "Complete": grpc.unary_stream_rpc_method_handler(
                servicer.Complete, request_deserializer=req.CompleteRequest.FromString,
                response_serializer=req.CompleteChunk.SerializeToString),
            "Embed": grpc.unary_unary_rpc_method_handler(
                servicer.Embed, request_deserializer=req.EmbedRequest.FromString,
                response_serializer=req.EmbedReply.SerializeToString),
            "Sessions": grpc.unary_unary_rpc_method_handler(
                servicer.Sessions, request_deserializer=req.SessionsRequest.FromString,
                response_serializer=req.SessionsReply.SerializeToString),
            "CloseSession": grpc.unary_unary_rpc_method_handler(
                servicer.CloseSession, request_deserializer=req.CloseSessionRequest.FromString,
                response_serializer=req.CloseSessionReply.SerializeToString),
        })]

    def limits(self, guest: str) -> GuestLimits:
        with self._lock:
            limits = self._limits.get(guest)
            if limits is None:
                quota = self.config.guest_quotas.get(guest, self.config.quota)
                limits = self._limits[guest] = GuestLimits(guest, quota, self.clock)
            return limits

    def set_quota(self, guest: str, quota: GuestQuota) -> None:
        """Change one guest's model quota live (the operator's lever); others are untouched."""
        self.limits(guest).set_quota(quota)

    def counters(self, guest: str) -> GuestCounters:
        with self._lock:
            return self._counters.setdefault(guest, GuestCounters())

    def _admit(self, guest: str) -> tuple[GuestLimits, GuestCounters]:
        """Take one of the guest's concurrent-call slots, counting a refusal."""
        limits, counters = self.limits(guest), self.counters(guest)
        try:
            limits.enter()
        except InferenceError:
            counters.refused += 1
            raise
        return limits, counters

    # -- Complete -----------------------------------------------------------------------------

    def _validate(self, args: CompleteArgs) -> GenParams:
        cfg = self.config
        if self.backend is None:
            raise BackendUnavailable("no language model backend is loaded on this host")
        if not args.prompt.strip():
            raise InvalidRequest("empty prompt")
        if len(args.prompt) + len(args.system) > cfg.max_prompt_chars:
            raise InvalidRequest(f"prompt longer than {cfg.max_prompt_chars} characters")
        if args.max_tokens > cfg.max_tokens_limit:
            raise InvalidRequest(f"max_tokens {args.max_tokens} is over the limit of {cfg.max_tokens_limit}")
        if not 0.0 <= args.temperature <= 2.0 or not 0.0 <= args.top_p <= 1.0:
            raise InvalidRequest("temperature must be in [0, 2] and top_p in [0, 1]")
        if len(args.session) > _SID_MAX:
            raise InvalidRequest(f"session id longer than {_SID_MAX} characters")
        if args.resume and not args.session:
            raise InvalidRequest("resume needs a session id")
        if len(args.stop) > cfg.max_stops or any(not s or len(s) > 64 for s in args.stop):
            raise InvalidRequest(f"at most {cfg.max_stops} stop strings of 1-64 characters")
        if args.grammar:
            if len(args.grammar) > cfg.max_grammar_chars:
                raise InvalidRequest(f"grammar longer than {cfg.max_grammar_chars} characters")
            self.backend.check_grammar(args.grammar)
        return GenParams(max_tokens=args.max_tokens or cfg.default_max_tokens, temperature=args.temperature,
                         top_p=args.top_p or 0.95, seed=args.seed, grammar=args.grammar or None,
                         stop=args.stop)

    def _prompt(self, session: Session, args: CompleteArgs) -> tuple[str, list[Message]]:
        assert self.backend is not None
        if session.raw:
            return session.text + args.prompt, []
        messages = list(session.messages)
        if not messages and args.system:
            messages.append(Message("system", args.system))
        messages.append(Message("user", args.prompt))
        return self.backend.render(messages), messages

    def complete(self, guest: str, args: CompleteArgs,
                 cancelled: Callable[[], bool] = lambda: False) -> Iterator[Chunk]:
        """Stream the answer to `args` for `guest`; the last chunk carries the Usage."""
        t0 = time.perf_counter()
        params = self._validate(args)
        assert self.backend is not None
        limits, counters = self._admit(guest)
        try:
            session = self.sessions.open(guest, args.session, resume=args.resume, raw=args.raw,
                                         max_sessions=limits.quota.max_sessions)
        except InferenceError:
            limits.leave()
            counters.refused += 1
            raise
        slot = None
        try:
            prompt, messages = self._prompt(session, args)
            if self.pool is not None:
                slot, source = self.pool.acquire(session, self.config.slot_wait_s)
            else:
                source = "fresh" if session.turns == 0 else "engine"  # the engine's own prefix cache
            first_ms = None
            text = []
            last = None
            t_engine = time.perf_counter()  # from here to the first token: the engine's prefill
            prefill_s = 0.0
            for piece in self.backend.stream(prompt, params, slot):
                if first_ms is None:
                    first_ms = (time.perf_counter() - t0) * 1000
                    prefill_s = time.perf_counter() - t_engine
                if piece.done:
                    last = piece
                    break
                if piece.text:
                    text.append(piece.text)
                    yield Chunk(piece.text)
                if cancelled():
                    break
            if last is None:  # cancelled mid-stream: keep nothing of this turn, but pay for it
                limits.bucket.charge(len(text))
                return
            if last.text:
                text.append(last.text)
            if self.cost is not None:
                self.cost.observe_prefill(last.prompt_tokens - last.cached_tokens, prefill_s)
            answer = "".join(text)
            if session.raw:
                session.text = prompt + answer
            else:
                session.messages = [*messages, Message("assistant", answer)]
            session.turns += 1
            session.tokens = last.prompt_tokens + last.completion_tokens
            limits.bucket.charge(last.prompt_tokens - last.cached_tokens + last.completion_tokens)
            with self._lock:
                counters.requests += 1
                counters.prompt_tokens += last.prompt_tokens
                counters.cached_tokens += last.cached_tokens
                counters.completion_tokens += last.completion_tokens
                counters.kv[source] = counters.kv.get(source, 0) + 1
            yield Chunk(last.text, Usage(last.prompt_tokens, last.cached_tokens, last.completion_tokens,
                                         round(first_ms or 0.0, 3), source, last.finish_reason))
        finally:
            if self.pool is not None:
                self.pool.release(session)
            self.sessions.done(session)
            limits.leave()
            self._maybe_snapshot()

    # -- Embed and sessions -------------------------------------------------------------------

    def embed(self, guest: str, texts: Sequence[str]) -> np.ndarray:
        cfg = self.config
        if self.embedder is None:
            raise BackendUnavailable("no embedding model is loaded on this host")
        if not texts:
            raise InvalidRequest("no texts to embed")
        if len(texts) > cfg.max_embed_texts:
            raise InvalidRequest(f"at most {cfg.max_embed_texts} texts per Embed call")
        if any(len(t) > cfg.max_embed_chars for t in texts):
            raise InvalidRequest(f"a text is longer than {cfg.max_embed_chars} characters")
        limits, counters = self._admit(guest)
        try:
            vectors = self.embedder.embed(guest, texts)
            tokens = sum(len(t) for t in texts) / 4 + len(texts)  # ~4 characters a token
            limits.bucket.charge(tokens * cfg.embed_token_weight)
            with self._lock:
                counters.embed_texts += len(texts)
            return vectors
        finally:
            limits.leave()

    def list_sessions(self, guest: str) -> list[SessionInfo]:
        return [SessionInfo(s.key[0], s.key[1], s.tokens, self.pool.tier(s) if self.pool else "none", s.turns)
                for s in self.sessions.of(guest)]

    def close_session(self, guest: str, sid: str) -> bool:
        session = self.sessions.remove(guest, sid)
        if session is None:
            return False
        if self.pool is not None:
            self.pool.forget(session)
        return True

    # -- what the CLI shows -------------------------------------------------------------------

    def snapshot(self) -> dict:
        """Plain data for `neuraos models` and `neuraos kv` (written to `snapshot_path`)."""
        backend = self.backend.info() if self.backend is not None else None
        guests = {}
        with self._lock:
            counters = {g: (asdict(c), c.kv_hit_rate) for g, c in self._counters.items()}
        for guest, (c, hit) in sorted(counters.items()):
            sessions = self.list_sessions(guest)
            tiers = {t: sum(1 for s in sessions if s.tier == t) for t in ("slot", "ram", "nvme", "none")}
            guests[guest] = {**c, "kv_hit_rate": hit, "sessions": len(sessions), "sessions_by_tier": tiers,
                             "kv_tokens": sum(s.tokens for s in sessions)}
        embed = None
        if self.embedder is not None:
            e = self.embedder
            embed = {"model": e.model, "dim": e.dim, "batches": e.batches, "requests": e.requests, "texts": e.texts}
        return {
            "at_unix": time.time(),
            "backend": asdict(backend) if backend else None,
            "embedder": embed,
            "slots": self.pool.occupancy() if self.pool is not None else [],
            "tiers": self.store.usage() if self.store is not None else {},
            "restores": dict(self.pool.restores) if self.pool is not None else {},
            "restore_cost": self.cost.snapshot() if self.cost is not None else None,
            "guests": guests,
        }

    def _maybe_snapshot(self, force: bool = False) -> None:
        path = self.config.snapshot_path
        now = self.clock()
        if path is None or (not force and now - self._snapshot_at < self.config.snapshot_every_s):
            return
        self._snapshot_at = now
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            tmp = path.with_suffix(".tmp")
            tmp.write_text(json.dumps(self.snapshot()))
            os.replace(tmp, path)
        except OSError as exc:
            log.warning("model service: cannot write %s: %s", path, exc)

    def close(self) -> None:
        """Write a last snapshot; the backend and embedder are closed by whoever made them."""
        self._maybe_snapshot(force=True)


class _ModelsServicer:
    """The Models gRPC service on one guest's channel; `guest` is fixed by that channel."""

    def __init__(self, service: ModelService, guest: str) -> None:
        self.service = service
        self.guest = guest

    def _fail(self, context: grpc.ServicerContext, exc: InferenceError) -> None:
        log.info("models: refused guest %s: %s", self.guest, exc)
        context.abort(exc.code, str(exc))

    def Complete(self, request: link_pb2.CompleteRequest, context: grpc.ServicerContext
                 ) -> Iterator[link_pb2.CompleteChunk]:
        gone = threading.Event()
        context.add_callback(gone.set)
        try:
            stream = self.service.complete(self.guest, CompleteArgs.from_proto(request), cancelled=gone.is_set)
            for chunk in stream:
                if chunk.usage is None:
                    yield link_pb2.CompleteChunk(text=chunk.text)
                    continue
                u = chunk.usage
                yield link_pb2.CompleteChunk(text=chunk.text, done=True, finish_reason=u.finish_reason,
                                             usage=link_pb2.CompletionUsage(
                                                 prompt_tokens=u.prompt_tokens, cached_tokens=u.cached_tokens,
                                                 completion_tokens=u.completion_tokens, ttft_ms=u.ttft_ms,
                                                 kv_source=u.kv_source))
        except InferenceError as exc:
            self._fail(context, exc)

    def Embed(self, request: link_pb2.EmbedRequest, context: grpc.ServicerContext) -> link_pb2.EmbedReply:
        try:
            vectors = self.service.embed(self.guest, list(request.texts))
        except InferenceError as exc:
            self._fail(context, exc)
        embedder = self.service.embedder
        assert embedder is not None
        return link_pb2.EmbedReply(dim=embedder.dim, vectors=vectors.astype("<f4").tobytes(), model=embedder.model)

    def Sessions(self, request: link_pb2.SessionsRequest, context: grpc.ServicerContext) -> link_pb2.SessionsReply:
        return link_pb2.SessionsReply(sessions=[
            link_pb2.SessionInfo(session=s.session, tokens=s.tokens, tier=s.tier, turns=s.turns)
            for s in self.service.list_sessions(self.guest)])

    def CloseSession(self, request: link_pb2.CloseSessionRequest,
                     context: grpc.ServicerContext) -> link_pb2.CloseSessionReply:
        return link_pb2.CloseSessionReply(closed=self.service.close_session(self.guest, request.session))
