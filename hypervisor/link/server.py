"""The controller's end of the host–guest link: a gRPC server per guest channel.

Identity comes from the channel, never from the message: on the unix-forward transport each
guest has its own socket and its own `grpc.server`, so a call on `web-1.sock` is web-1 whatever
its Hello says; on vsock the peer CID is looked up. A guest can only read and complete its own
commands, and one guest flooding or garbling its channel exhausts only its own server's threads.

The agent dials in, `Register`s, keeps one `Commands` stream open (which is also how we know it is
connected), sends `Beat` and `Report` on its own schedule, and answers each command with
`Complete`. `send_command` blocks until that answer or its timeout; delivery is at most once.

Other host services for guests (the model service) ride the same channels: `services(name)`
returns their handlers for one guest, already bound to that guest's name, so they inherit the
channel's identity, message limits and thread bounds.
"""

from __future__ import annotations

import itertools
import logging
import threading
import time
from collections import deque
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Callable, Iterator, Sequence

import grpc

from hypervisor import __version__
from hypervisor.errors import AgentTimeout, LinkError
from hypervisor.link._gen import link_pb2
from hypervisor.link.transport import Listener, Transport, check_guest_name

log = logging.getLogger("neuraos.link")

SERVICE = link_pb2.DESCRIPTOR.services_by_name["Link"].full_name
MAX_MESSAGE_BYTES = 256 * 1024
_TEXT_LIMIT = 256  # longest agent_version / boot_id / kernel string we keep


@dataclass(frozen=True)
class GuestStatus:
    """The agent's last StatusReport, as plain data the controller can store."""

    agent_version: str
    uptime_s: float
    load1: float
    load5: float
    load15: float
    mem_total_kib: int
    mem_available_kib: int
    cpus_online: int
    cpus_present: int
    kernel: str
    boot_id: str
    received_unix: float
    intent: dict[str, float | str] | None = None  # raw; the telemetry collector sanitises it

    @classmethod
    def from_proto(cls, msg: link_pb2.StatusReport, received_unix: float) -> GuestStatus:
        return cls(
            agent_version=msg.agent_version[:_TEXT_LIMIT],
            uptime_s=msg.uptime_s,
            load1=msg.load1,
            load5=msg.load5,
            load15=msg.load15,
            mem_total_kib=msg.mem_total_kib,
            mem_available_kib=msg.mem_available_kib,
            cpus_online=msg.cpus_online,
            cpus_present=msg.cpus_present,
            kernel=msg.kernel[:_TEXT_LIMIT],
            boot_id=msg.boot_id[:_TEXT_LIMIT],
            received_unix=received_unix,
            intent=_intent(msg) if msg.HasField("intent") else None,
        )


def _intent(msg: link_pb2.StatusReport) -> dict[str, float | str]:
    i = msg.intent
    return {"run_queue": i.run_queue, "top_cpu_pct": i.top_cpu_pct, "top_comm": i.top_comm[:64],
            "pending_rlm_jobs": i.pending_rlm_jobs, "file_write_bps": i.file_write_bps,
            "jobs_due_s": i.jobs_due_s, "net_rx_bps": i.net_rx_bps, "net_tx_bps": i.net_tx_bps}


@dataclass
class GuestLinkState:
    """What the controller knows about one guest's link. Callers always get a copy."""

    guest: str
    connected: bool = False
    agent_version: str = ""
    boot_id: str = ""
    registrations: int = 0
    last_registered_unix: float | None = None
    heartbeats: int = 0
    last_heartbeat_monotonic: float | None = None
    last_heartbeat_unix: float | None = None
    status: GuestStatus | None = None
    refused: int = 0
    last_refusal: str = ""


@dataclass(frozen=True)
class CommandResult:
    id: int
    ok: bool
    error: str = ""
    output: str = ""


@dataclass(frozen=True)
class LinkEvent:
    """Passed to `on_event`; kind is connected, disconnected, heartbeat, status or refused."""

    guest: str
    kind: str
    state: GuestLinkState
    detail: str = ""


EventHook = Callable[[LinkEvent], None]
AlertHook = Callable[[str, link_pb2.AlertReport], None]  # guest name (from the channel), the report
ServiceFactory = Callable[[str], Sequence[grpc.GenericRpcHandler]]  # guest name -> its handlers


@dataclass
class _Pending:
    done: threading.Event = field(default_factory=threading.Event)
    result: CommandResult | None = None
    error: str = ""


class _Outbox:
    """Commands waiting for the guest's stream; `wake` lets a waiting stream re-check why it runs."""

    def __init__(self) -> None:
        self._items: deque[link_pb2.Command] = deque()
        self._cond = threading.Condition()

    def put(self, cmd: link_pb2.Command) -> None:
        with self._cond:
            self._items.append(cmd)
            self._cond.notify()

    def put_back(self, cmd: link_pb2.Command) -> None:
        with self._cond:
            self._items.appendleft(cmd)
            self._cond.notify()

    def take(self, timeout: float) -> link_pb2.Command | None:
        with self._cond:
            if not self._items:
                self._cond.wait(timeout)
            return self._items.popleft() if self._items else None

    def wake(self) -> None:
        with self._cond:
            self._cond.notify_all()


@dataclass
class _Server:
    listener: Listener
    grpc_server: grpc.Server
    executor: ThreadPoolExecutor


@dataclass
class _Guest:
    name: str
    state: GuestLinkState
    cid: int | None = None
    server: _Server | None = None  # unix-forward: this guest's own server
    registered: bool = False  # a Register arrived since this channel's server started
    stream_gen: int = 0  # the newest Commands stream; older ones end
    outbox: _Outbox = field(default_factory=_Outbox)
    pending: dict[int, _Pending] = field(default_factory=dict)
    closing: threading.Event = field(default_factory=threading.Event)
    extra: Sequence[grpc.GenericRpcHandler] = ()  # other services, bound to this guest

    def close(self, why: str) -> None:
        self.closing.set()
        self.outbox.wake()
        for pending in self.pending.values():
            pending.error = why
            pending.done.set()
        self.pending.clear()


class LinkServer:
    """Serves every guest's link; use as a context manager or call start()/stop()."""

    def __init__(
        self,
        transport: Transport,
        *,
        heartbeat_interval_s: float = 5.0,
        on_event: EventHook | None = None,
        max_message_bytes: int = MAX_MESSAGE_BYTES,
        max_workers: int = 8,
        max_concurrent_rpcs: int = 8,
        stop_grace_s: float = 0.5,
        services: ServiceFactory | None = None,
        on_alert: AlertHook | None = None,
    ) -> None:
        self.transport = transport
        self.on_alert = on_alert  # behavioural zero trust: where the guests' alerts go
        self.services = services
        self.heartbeat_interval_s = heartbeat_interval_s
        self.on_event = on_event
        self.max_message_bytes = max_message_bytes
        self.max_workers = max_workers
        self.max_concurrent_rpcs = max_concurrent_rpcs
        self.stop_grace_s = stop_grace_s
        self._lock = threading.Lock()
        self._changed = threading.Condition(self._lock)
        self._guests: dict[str, _Guest] = {}
        self._cids: dict[int, str] = {}
        self._shared: _Server | None = None
        self._running = False
        self._ids = itertools.count(1)

    # -- lifetime ---------------------------------------------------------------------------

    def __enter__(self) -> LinkServer:
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def start(self) -> None:
        with self._lock:
            self._running = True

    def stop(self) -> None:
        """Close every channel: open Commands streams end, waiting send_command calls fail."""
        with self._lock:
            self._running = False
            guests = list(self._guests.values())
            self._guests.clear()
            self._cids.clear()
            servers = [g.server for g in guests if g.server is not None]
            if self._shared is not None:
                servers.append(self._shared)
                self._shared = None
            for guest in guests:
                guest.close("link server stopped")
            self._changed.notify_all()
        self._stop_servers(servers)

    def add_guest(self, name: str, cid: int | None = None) -> Path | None:
        """Start serving `name`; returns its socket path (unix-forward) or None (vsock: pass cid)."""
        check_guest_name(name)
        listener = self.transport.listener(name)
        with self._lock:
            if not self._running:
                raise LinkError("the link server is not running", hint="start the LinkServer first")
            existing = self._guests.get(name)
            if existing is not None:
                if existing.cid is not None and cid is not None and existing.cid != cid:
                    self._cids.pop(existing.cid, None)  # libvirt gave the guest a new CID
                    existing.cid = cid
                    self._cids[cid] = name
                return listener.socket_path
            guest = _Guest(name=name, state=GuestLinkState(guest=name))
            if self.services is not None:
                guest.extra = tuple(self.services(name))
            if listener.guest is None:
                if cid is None:
                    raise LinkError(f"guest {name}: the vsock transport needs the guest's CID")
                if self._shared is None:
                    self._shared = self._bind(listener, None)
                guest.cid = cid
                self._cids[cid] = name
            else:
                guest.server = self._bind(listener, guest)
            self._guests[name] = guest
        log.info("link: serving guest %s on %s", name, listener.address)
        return listener.socket_path

    def remove_guest(self, name: str) -> None:
        """Stop serving `name` (its socket goes away); unknown names are ignored."""
        with self._lock:
            guest = self._guests.pop(name, None)
            if guest is None:
                return
            if guest.cid is not None:
                self._cids.pop(guest.cid, None)
            guest.close(f"guest {name} removed from the link")
            self._changed.notify_all()
        if guest.server is not None:
            self._stop_servers([guest.server])
        log.info("link: stopped serving guest %s", name)

    def guests(self) -> list[str]:
        with self._lock:
            return sorted(self._guests)

    def state(self, name: str) -> GuestLinkState:
        with self._lock:
            return replace(self._guest(name).state)

    # -- asking the guest -------------------------------------------------------------------

    def send_command(self, name: str, command: link_pb2.Command, timeout: float) -> CommandResult:
        """Queue `command` for the guest and block until the agent Completes it."""
        cmd = link_pb2.Command()
        cmd.CopyFrom(command)
        cmd.id = next(self._ids)
        what = cmd.WhichOneof("kind") or "empty command"
        pending = _Pending()
        with self._lock:
            guest = self._guest(name)
            guest.pending[cmd.id] = pending
        guest.outbox.put(cmd)
        if not pending.done.wait(timeout):
            with self._lock:
                guest.pending.pop(cmd.id, None)
            if not pending.done.is_set():
                raise LinkError(f"guest {name} did not complete {what} (command {cmd.id}) within {timeout:g}s")
        if pending.result is None:
            raise LinkError(f"guest {name}: {what} (command {cmd.id}) abandoned: {pending.error}")
        return pending.result

    def set_online_cpus(self, name: str, count: int, timeout: float = 10.0) -> int:
        """Have the guest keep CPUs 0..count-1 online; returns how many are online after."""
        cmd = link_pb2.Command(set_online_cpus=link_pb2.SetOnlineCpus(count=count))
        result = self.send_command(name, cmd, timeout)
        if not result.ok:
            raise LinkError(f"guest {name} could not set {count} CPUs online: {result.error}",
                            hint="the guest's CPUs must be present (hot-plugged) before they can go online")
        try:
            return int(result.output)
        except ValueError:
            raise LinkError(f"guest {name} answered set_online_cpus with {result.output!r}, not a count") from None

    def ping(self, name: str, payload: str = "", timeout: float = 5.0) -> CommandResult:
        """Round trip through the agent's command loop: proves it is alive and responsive."""
        return self.send_command(name, link_pb2.Command(ping=link_pb2.Ping(payload=payload)), timeout)

    def wait_for_heartbeat(self, name: str, timeout: float, after: float | None = None) -> GuestLinkState:
        """Block until a heartbeat newer than `after` (time.monotonic()), or any if None, arrives."""
        deadline = time.monotonic() + timeout
        with self._changed:
            while True:
                state = self._guest(name).state
                seen = state.last_heartbeat_monotonic
                if seen is not None and (after is None or seen > after):
                    return replace(state)
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    raise AgentTimeout(f"no heartbeat from guest {name}'s agent within {timeout:g}s")
                self._changed.wait(remaining)

    # -- internals --------------------------------------------------------------------------

    def _guest(self, name: str) -> _Guest:
        guest = self._guests.get(name)
        if guest is None:
            raise LinkError(f"guest {name!r} is not on the link", hint="the controller adds guests as it starts them")
        return guest

    def _bind(self, listener: Listener, guest: _Guest | None) -> _Server:
        """One grpc.server with bounded threads, RPCs and message sizes, bound to `listener`."""
        label = listener.guest or self.transport.kind
        servicer = _LinkServicer(self, guest)
        handlers: list[grpc.GenericRpcHandler] = [_handlers(servicer, servicer.malformed)]
        if guest is not None:
            handlers.extend(guest.extra)
        elif self.services is not None:
            handlers.append(_PeerRouted(self))
        executor = ThreadPoolExecutor(self.max_workers, thread_name_prefix=f"neuraos-link-{label}")
        server = grpc.server(
            executor,
            handlers=handlers,
            options=[
                ("grpc.max_receive_message_length", self.max_message_bytes),
                ("grpc.max_send_message_length", self.max_message_bytes),
                ("grpc.so_reuseport", 0),
                ("grpc.keepalive_time_ms", 20_000),
                ("grpc.keepalive_timeout_ms", 10_000),
                ("grpc.keepalive_permit_without_calls", 1),
                ("grpc.http2.min_recv_ping_interval_without_data_ms", 5_000),
            ],
            maximum_concurrent_rpcs=self.max_concurrent_rpcs,
        )
        self.transport.before_bind(listener)
        try:
            bound = server.add_insecure_port(listener.address)
        except RuntimeError as exc:
            bound = 0
            log.debug("bind %s: %s", listener.address, exc)
        if not bound:
            executor.shutdown(wait=False)
            raise LinkError(f"cannot listen on {listener.address}",
                            hint="another controller may be running, or the directory is not writable")
        self.transport.after_bind(listener)
        server.start()
        return _Server(listener, server, executor)

    def _stop_servers(self, servers: list[_Server]) -> None:
        stopped = [s.grpc_server.stop(self.stop_grace_s) for s in servers]
        for server, done in zip(servers, stopped):
            done.wait(self.stop_grace_s + 5)
            server.executor.shutdown(wait=False)
            self.transport.after_stop(server.listener)

    def _emit(self, guest: _Guest, kind: str, detail: str = "") -> None:
        """Call the hook outside the lock: it may persist state or call back into us."""
        if self.on_event is None:
            return
        with self._lock:
            snapshot = replace(guest.state)
        try:
            self.on_event(LinkEvent(guest.name, kind, snapshot, detail))
        except Exception:
            log.exception("link: on_event hook failed for %s %s", guest.name, kind)

    def _refuse(self, guest: _Guest, reason: str) -> None:
        with self._lock:
            guest.state.refused += 1
            guest.state.last_refusal = reason
        log.warning("link: refused guest %s: %s", guest.name, reason)
        self._emit(guest, "refused", reason)

    def _resolve(self, fixed: _Guest | None, peer: str) -> _Guest | None:
        if fixed is not None:
            return None if fixed.closing.is_set() else fixed
        with self._lock:
            name = self.transport.guest_for_peer(peer, dict(self._cids))
            return self._guests.get(name) if name is not None else None


class _LinkServicer:
    """The Link service on one listener; `fixed` is its guest, or None when peers say who."""

    def __init__(self, link: LinkServer, fixed: _Guest | None) -> None:
        self.link = link
        self.fixed = fixed

    def malformed(self, method: str, size: int) -> None:
        reason = f"undecodable {method} request ({size} bytes)"
        if self.fixed is not None:
            self.link._refuse(self.fixed, reason)
        else:
            log.warning("link: refused %s on the shared listener", reason)

    def _guest(self, context: grpc.ServicerContext, *, registered: bool = True) -> _Guest:
        guest = self.link._resolve(self.fixed, context.peer())
        if guest is None:
            if self.fixed is None:
                log.warning("link: refused unknown peer %s", context.peer())
                context.abort(grpc.StatusCode.PERMISSION_DENIED, "unknown peer")
            context.abort(grpc.StatusCode.UNAVAILABLE, "guest is leaving the link")
        if registered and not guest.registered:
            context.abort(grpc.StatusCode.FAILED_PRECONDITION, "Register first")
        return guest

    def _check_claim(self, guest: _Guest, hello: link_pb2.Hello, context: grpc.ServicerContext) -> None:
        claimed = hello.claimed_guest
        if claimed and claimed != guest.name:
            self.link._refuse(guest, f"Hello claimed to be guest {claimed[:64]!r}")
            context.abort(grpc.StatusCode.PERMISSION_DENIED, f"this channel belongs to guest {guest.name}")

    def Register(self, request: link_pb2.Hello, context: grpc.ServicerContext) -> link_pb2.HelloReply:
        guest = self._guest(context, registered=False)
        self._check_claim(guest, request, context)
        link = self.link
        with link._lock:
            state = guest.state
            reboot = bool(state.boot_id) and state.boot_id != request.boot_id
            guest.registered = True
            state.connected = True
            state.agent_version = request.agent_version[:_TEXT_LIMIT]
            state.boot_id = request.boot_id[:_TEXT_LIMIT]
            state.registrations += 1
            state.last_registered_unix = time.time()
            link._changed.notify_all()
        log.info("link: guest %s registered (agent %s, boot %s%s)", guest.name, state.agent_version,
                 state.boot_id, ", rebooted" if reboot else "")
        link._emit(guest, "connected", "rebooted" if reboot else "")
        return link_pb2.HelloReply(
            guest=guest.name,
            heartbeat_interval_ms=max(1, round(link.heartbeat_interval_s * 1000)),
            controller_version=__version__,
        )

    def Beat(self, request: link_pb2.Heartbeat, context: grpc.ServicerContext) -> link_pb2.HeartbeatAck:
        guest = self._guest(context)
        link = self.link
        with link._lock:
            guest.state.heartbeats += 1
            guest.state.last_heartbeat_monotonic = time.monotonic()
            guest.state.last_heartbeat_unix = now = time.time()
            link._changed.notify_all()
        link._emit(guest, "heartbeat")
        return link_pb2.HeartbeatAck(seq=request.seq, received_unix=now)

    def Report(self, request: link_pb2.StatusReport, context: grpc.ServicerContext) -> link_pb2.ReportAck:
        guest = self._guest(context)
        link = self.link
        with link._lock:
            guest.state.status = GuestStatus.from_proto(request, time.time())
            link._changed.notify_all()
        link._emit(guest, "status")
        return link_pb2.ReportAck(accepted=True)

    def Commands(self, request: link_pb2.Hello, context: grpc.ServicerContext) -> Iterator[link_pb2.Command]:
        guest = self._guest(context)
        self._check_claim(guest, request, context)
        link = self.link
        with link._lock:
            guest.stream_gen += 1
            gen = guest.stream_gen
            guest.state.connected = True
        guest.outbox.wake()  # an older stream of this guest sees it is superseded and ends
        ended = threading.Event()

        def on_rpc_done() -> None:
            ended.set()
            guest.outbox.wake()

        def still_wanted() -> bool:
            return (not ended.is_set() and not guest.closing.is_set() and context.is_active()
                    and guest.stream_gen == gen)

        try:
            if not context.add_callback(on_rpc_done):
                return  # the agent hung up already
            while still_wanted():
                cmd = guest.outbox.take(timeout=1.0)
                if cmd is None:
                    continue
                if not still_wanted():
                    guest.outbox.put_back(cmd)
                    break
                if cmd.id in guest.pending:  # else its sender gave up waiting
                    yield cmd
        finally:
            disconnected = False
            with link._lock:
                if guest.stream_gen == gen and not guest.closing.is_set():
                    guest.state.connected = False
                    disconnected = True
            if disconnected:
                log.info("link: guest %s disconnected", guest.name)
                link._emit(guest, "disconnected")

    def Complete(self, request: link_pb2.CommandResult, context: grpc.ServicerContext) -> link_pb2.ResultAck:
        guest = self._guest(context)
        with self.link._lock:
            pending = guest.pending.pop(request.id, None)
        if pending is None:
            return link_pb2.ResultAck(accepted=False)
        pending.result = CommandResult(id=request.id, ok=request.ok, error=request.error[:4096],
                                       output=request.output[:4096])
        pending.done.set()
        return link_pb2.ResultAck(accepted=True)


def _alert(servicer: _LinkServicer, request: link_pb2.AlertReport,
           context: grpc.ServicerContext) -> link_pb2.AlertAck:
    """A guest's monitor contained (or flagged) a process: hand it to the hook, named by the channel."""
    guest = servicer._guest(context)
    hook = servicer.link.on_alert
    if hook is None:
        log.warning("link: alert from guest %s for pid %d dropped: no alert store", guest.name, request.pid)
        return link_pb2.AlertAck(accepted=False)
    try:
        hook(guest.name, request)
    except Exception:
        log.exception("link: storing an alert from guest %s failed", guest.name)
        return link_pb2.AlertAck(accepted=False)
    return link_pb2.AlertAck(accepted=True)


def _handlers(servicer: _LinkServicer, malformed: Callable[[str, int], None]) -> grpc.GenericRpcHandler:
    """The Link service's handlers, with decoders that count undecodable requests as refusals."""

    def decoder(method: str, message: type) -> Callable[[bytes], object]:
        def decode(data: bytes) -> object:
            try:
                return message.FromString(data)
            except Exception:
                malformed(method, len(data))
                raise

        return decode

    def unary(method: str, request: type, reply: type) -> grpc.RpcMethodHandler:
        return grpc.unary_unary_rpc_method_handler(
            getattr(servicer, method), request_deserializer=decoder(method, request),
            response_serializer=reply.SerializeToString)

    return grpc.method_handlers_generic_handler(SERVICE, {
        "Register": unary("Register", link_pb2.Hello, link_pb2.HelloReply),
        "Beat": unary("Beat", link_pb2.Heartbeat, link_pb2.HeartbeatAck),
        "Report": unary("Report", link_pb2.StatusReport, link_pb2.ReportAck),
        "Commands": grpc.unary_stream_rpc_method_handler(
            servicer.Commands, request_deserializer=decoder("Commands", link_pb2.Hello),
            response_serializer=link_pb2.Command.SerializeToString),
        "Complete": unary("Complete", link_pb2.CommandResult, link_pb2.ResultAck),
        "Alert": grpc.unary_unary_rpc_method_handler(
            lambda req, ctx: _alert(servicer, req, ctx), request_deserializer=decoder("Alert", link_pb2.AlertReport),
            response_serializer=link_pb2.AlertAck.SerializeToString),
    })


class _PeerRouted(grpc.GenericRpcHandler):
    """Extra services on a shared listener: each call runs the calling guest's own handler.

    gRPC picks a handler before the peer is known, so the method's shape comes from any guest's
    handlers and the behaviour is looked up per call from `context.peer()`; unknown peers are
    refused exactly as on the Link service.
    """

    _KINDS = ("unary_unary", "unary_stream", "stream_unary", "stream_stream")

    def __init__(self, link: LinkServer) -> None:
        self.link = link

    def _lookup(self, guest: _Guest | None, details: grpc.HandlerCallDetails) -> grpc.RpcMethodHandler | None:
        for handler in guest.extra if guest is not None else ():
            found = handler.service(details)
            if found is not None:
                return found
        return None

    def service(self, details: grpc.HandlerCallDetails) -> grpc.RpcMethodHandler | None:
        with self.link._lock:
            sample = next((g for g in self.link._guests.values() if g.cid is not None and g.extra), None)
        shape = self._lookup(sample, details)
        if shape is None:
            return None
        kind = next(k for k in self._KINDS if getattr(shape, k) is not None)

        def behaviour(request: object, context: grpc.ServicerContext) -> object:
            guest = self.link._resolve(None, context.peer())
            own = self._lookup(guest, details)
            if own is None:
                log.warning("link: refused unknown peer %s for %s", context.peer(), details.method)
                context.abort(grpc.StatusCode.PERMISSION_DENIED, "unknown peer")
            return getattr(own, kind)(request, context)

        return shape._replace(**{kind: behaviour})
