"""The host's models, from inside the guest: `embed(texts)` and `complete(prompt, ...)`.

The guest keeps no model of its own (DESIGN.md, "Where models run"): it asks the controller
over its link, which knows the guest by the channel. Sessions named here are this guest's
only; the host keeps their KV state so a follow-up turn does not pay for the history again.
numpy is imported only by `embed`, so agents that never embed do not need it.
"""

from __future__ import annotations

import threading
from dataclasses import dataclass
from typing import TYPE_CHECKING, Iterator, Sequence

import grpc

from neuraos_agent._gen import link_pb2, link_pb2_grpc
from neuraos_agent.link import MAX_MESSAGE_BYTES, default_link_address

if TYPE_CHECKING:
    import numpy as np

EMBED_BATCH = 128  # texts per Embed call: 128 x 384 float32 fits the link's message limit


class ModelsError(Exception):
    """The host refused or failed a model call; `code` is the gRPC status name."""

    def __init__(self, code: str, message: str) -> None:
        super().__init__(f"{code}: {message}")
        self.code = code
        self.message = message


def _error(exc: grpc.RpcError) -> ModelsError:
    return ModelsError(exc.code().name, exc.details() or "")


@dataclass(frozen=True)
class Usage:
    prompt_tokens: int
    cached_tokens: int  # history served from kept KV state instead of prefilled again
    completion_tokens: int
    ttft_ms: float
    kv_source: str  # fresh | slot | ram | nvme | prefill


class Completion:
    """A streaming answer: iterate for text chunks as they arrive, or read `.text` to wait.

    Iterating a second time replays nothing; `.text`, `.finish_reason` and `.usage` are filled
    in once the stream has ended.
    """

    def __init__(self, call: grpc.Call) -> None:
        self._call = call
        self._chunks: list[str] = []
        self.finish_reason = ""
        self.usage: Usage | None = None
        self._done = False

    def __iter__(self) -> Iterator[str]:
        if self._done:
            return
        try:
            for chunk in self._call:
                if chunk.text:
                    self._chunks.append(chunk.text)
                    yield chunk.text
                if chunk.done:
                    u = chunk.usage
                    self.finish_reason = chunk.finish_reason
                    self.usage = Usage(u.prompt_tokens, u.cached_tokens, u.completion_tokens, u.ttft_ms,
                                       u.kv_source)
        except grpc.RpcError as exc:
            raise _error(exc) from None
        finally:
            self._done = True

    @property
    def text(self) -> str:
        for _ in self:
            pass
        return "".join(self._chunks)

    def cancel(self) -> None:
        self._call.cancel()


class ModelsClient:
    """One channel to the host's Models service; a context manager, safe across threads."""

    def __init__(self, address: str | None = None, timeout_s: float = 300.0) -> None:
        self.address = address or default_link_address()
        self.timeout_s = timeout_s
        self._channel = grpc.insecure_channel(self.address, options=[
            ("grpc.max_receive_message_length", MAX_MESSAGE_BYTES),
            ("grpc.max_send_message_length", MAX_MESSAGE_BYTES),
        ])
        self._stub = link_pb2_grpc.ModelsStub(self._channel)

    def __enter__(self) -> ModelsClient:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        self._channel.close()

    def complete(self, prompt: str, *, max_tokens: int = 0, temperature: float = 0.0, top_p: float = 0.0,
                 seed: int = 0, grammar: str | None = None, session: str | None = None, resume: bool = False,
                 raw: bool = False, system: str = "", stop: Sequence[str] = ()) -> Completion:
        """Ask the host's language model; `session` continues this guest's conversation of that id."""
        request = link_pb2.CompleteRequest(
            prompt=prompt, max_tokens=max_tokens, temperature=temperature, top_p=top_p, seed=seed,
            grammar=grammar or "", session=session or "", resume=resume, raw=raw, system=system, stop=list(stop))
        return Completion(self._stub.Complete(request, timeout=self.timeout_s))

    def embed(self, texts: Sequence[str]) -> np.ndarray:
        """(len(texts), dim) float32 rows, L2-normalised; long lists go in several calls."""
        import numpy as np

        parts = []
        for i in range(0, len(texts), EMBED_BATCH):
            try:
                reply = self._stub.Embed(link_pb2.EmbedRequest(texts=list(texts[i:i + EMBED_BATCH])),
                                         timeout=self.timeout_s)
            except grpc.RpcError as exc:
                raise _error(exc) from None
            parts.append(np.frombuffer(reply.vectors, dtype="<f4").reshape(-1, reply.dim))
        if not parts:
            return np.zeros((0, 0), dtype=np.float32)
        return np.concatenate(parts).astype(np.float32, copy=False)

    def sessions(self) -> list[link_pb2.SessionInfo]:
        try:
            return list(self._stub.Sessions(link_pb2.SessionsRequest(), timeout=self.timeout_s).sessions)
        except grpc.RpcError as exc:
            raise _error(exc) from None

    def close_session(self, session: str) -> bool:
        try:
            return self._stub.CloseSession(link_pb2.CloseSessionRequest(session=session),
                                           timeout=self.timeout_s).closed
        except grpc.RpcError as exc:
            raise _error(exc) from None


_default: ModelsClient | None = None
_default_lock = threading.Lock()


def client() -> ModelsClient:
    """The process-wide client on NEURAOS_LINK (or the user-mode forward)."""
    global _default
    with _default_lock:
        if _default is None:
            _default = ModelsClient()
        return _default


def embed(texts: Sequence[str]) -> np.ndarray:
    return client().embed(texts)


def complete(prompt: str, **kwargs: object) -> Completion:
    return client().complete(prompt, **kwargs)  # type: ignore[arg-type]
