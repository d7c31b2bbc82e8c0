"""The agent's end of the host–guest link: dial the controller and stay connected.

One *session* is one gRPC channel: Register, then a thread consuming the Commands stream while
this thread sends heartbeats and status reports. Any failure ends the session, and the agent
dials again after a capped exponential backoff, so it rides out a controller restart, a guest
resume or its own restart without anyone's help. Every session opens a fresh channel, which
makes reconnection explicit rather than left to gRPC's hidden channel state.
"""

from __future__ import annotations

import logging
import os
import threading
import time
from collections import deque
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Callable, Mapping

import grpc

from neuraos_agent import __version__
from neuraos_agent._gen import link_pb2, link_pb2_grpc
from neuraos_agent.cpus import SYSFS, CpuError, set_online_cpus
from neuraos_agent.intent import IntentSampler
from neuraos_agent.status import PROC, GuestStatus, read_boot_id, read_status

log = logging.getLogger("neuraos.agent")

DEFAULT_LINK = "10.0.2.100:50051"  # QEMU user-mode guestfwd to the controller's socket for us
MAX_MESSAGE_BYTES = 256 * 1024


def default_link_address(cmdline: Path = PROC / "cmdline") -> str:
    """The host's choice on the kernel command line (`neuraos.link=vsock:2:50051`), else
    NEURAOS_LINK, else the user-mode forward. The host sets the first per guest."""
    try:
        for word in cmdline.read_text().split():
            if word.startswith("neuraos.link="):
                return word.split("=", 1)[1]
    except OSError:
        pass
    return os.environ.get("NEURAOS_LINK") or DEFAULT_LINK


@dataclass
class AgentConfig:
    address: str = DEFAULT_LINK
    heartbeat_s: float | None = None  # None: the interval the host asks for when we register
    report_s: float = 30.0
    claimed_guest: str = ""  # what we believe our name is; the host checks it
    proc: Path = PROC
    sysfs: Path = SYSFS
    backoff_min_s: float = 0.2
    backoff_max_s: float = 5.0
    rpc_timeout_s: float = 5.0
    max_message_bytes: int = MAX_MESSAGE_BYTES


@dataclass
class AgentStats:
    """Counters for tests and logs: how the link has fared since the agent started."""

    sessions: int = 0
    registrations: int = 0
    heartbeats: int = 0
    reports: int = 0
    commands: int = 0
    alerts_sent: int = 0
    alerts_dropped: int = 0  # the outbox was full (link away for long)
    guest: str = ""  # the name the host knows our channel by
    last_error: str = ""


def status_message(status: GuestStatus) -> link_pb2.StatusReport:
    return link_pb2.StatusReport(**asdict(status))


class CommandRunner:
    """Carries out one host Command; failures become a CommandResult, never an exception.

    `handlers` adds kinds served by other parts of the agent (kind → function returning the
    output text); whatever they raise is reported to the host as the command's error.
    """

    def __init__(self, sysfs: Path = SYSFS,
                 handlers: Mapping[str, Callable[[link_pb2.Command], str]] | None = None) -> None:
        self.sysfs = sysfs
        self.handlers = dict(handlers or {})
        self.monitor = None  # the behaviour monitor (release / kill), once it runs

    def run(self, cmd: link_pb2.Command) -> link_pb2.CommandResult:
        kind = cmd.WhichOneof("kind")
        try:
            if kind == "set_online_cpus":
                online = set_online_cpus(cmd.set_online_cpus.count, root=self.sysfs)
                return link_pb2.CommandResult(id=cmd.id, ok=True, output=str(online))
            if kind == "ping":
                return link_pb2.CommandResult(id=cmd.id, ok=True, output=cmd.ping.payload)
            if kind in self.handlers:
                try:
                    return link_pb2.CommandResult(id=cmd.id, ok=True, output=self.handlers[kind](cmd))
                except Exception as exc:  # noqa: BLE001 - the host gets one line, the agent goes on
                    log.warning("command %s failed: %s", kind, exc)
                    return link_pb2.CommandResult(id=cmd.id, ok=False, error=str(exc) or type(exc).__name__)
            if kind in ("release", "kill"):
                if self.monitor is None:
                    return link_pb2.CommandResult(id=cmd.id, ok=False, error="the behaviour monitor is not running")
                pid = getattr(cmd, kind).pid
                out = self.monitor.release(pid) if kind == "release" else self.monitor.kill(pid)
                return link_pb2.CommandResult(id=cmd.id, ok=True, output=out)
            return link_pb2.CommandResult(id=cmd.id, ok=False, error=f"unknown command {kind or 'empty'}")
        except Exception as exc:  # CpuError, OSError, ContainError: the host gets the one line
            return link_pb2.CommandResult(id=cmd.id, ok=False, error=str(exc))


class AgentLink:
    """Keeps the guest linked to its controller until stop(); run() blocks, stop() is thread-safe."""

    def __init__(self, config: AgentConfig, runner: CommandRunner | None = None) -> None:
        self.config = config
        self.runner = runner or CommandRunner(config.sysfs)
        self.intent = IntentSampler(config.proc)
        self.stats = AgentStats()
        self.registered = threading.Event()  # set on every successful Register
        self._stop = threading.Event()
        self._lock = threading.Lock()
        self._session_end: threading.Event | None = None
        self._alerts: deque[link_pb2.AlertReport] = deque()
        self._alerts_lock = threading.Lock()

    def send_alert(self, report: link_pb2.AlertReport, limit: int = 512) -> None:
        """Queue an alert for the host; sent within ~0.1 s while linked, else when the link returns."""
        with self._alerts_lock:
            if len(self._alerts) >= limit:
                self._alerts.popleft()
                self.stats.alerts_dropped += 1
            self._alerts.append(report)

    def _flush_alerts(self, stub: link_pb2_grpc.LinkStub) -> None:
        while True:
            with self._alerts_lock:
                if not self._alerts:
                    return
                report = self._alerts[0]
            stub.Alert(report, timeout=self.config.rpc_timeout_s)  # on failure it stays queued
            with self._alerts_lock:
                if self._alerts and self._alerts[0] is report:
                    self._alerts.popleft()
            self.stats.alerts_sent += 1

    def stop(self) -> None:
        self._stop.set()
        with self._lock:
            if self._session_end is not None:
                self._session_end.set()

    def run(self) -> None:
        backoff = self.config.backoff_min_s
        while not self._stop.is_set():
            registered_before = self.stats.registrations
            try:
                self._session()
            except grpc.RpcError as exc:
                self._note_error(f"{exc.code().name}: {exc.details()}")
            except Exception as exc:  # a bug here must not take the link down for good
                log.exception("link session failed")
                self._note_error(repr(exc))
            if self.stats.registrations > registered_before:
                backoff = self.config.backoff_min_s  # the link worked; retry quickly
            if self._stop.wait(backoff):
                break
            backoff = min(backoff * 2, self.config.backoff_max_s)
        log.info("link stopped")

    def _note_error(self, what: str) -> None:
        """Warn once per outage (and when its cause changes); retries after that log at debug."""
        if self._stop.is_set():
            return
        level = logging.DEBUG if what == self.stats.last_error else logging.WARNING
        self.stats.last_error = what
        log.log(level, "link to %s down (%s); reconnecting", self.config.address, what)

    def _channel(self) -> grpc.Channel:
        n = self.config.max_message_bytes
        return grpc.insecure_channel(self.config.address, options=[
            ("grpc.max_receive_message_length", n),
            ("grpc.max_send_message_length", n),
            ("grpc.keepalive_time_ms", 10_000),
            ("grpc.keepalive_timeout_ms", 5_000),
            ("grpc.keepalive_permit_without_calls", 1),
            ("grpc.http2.max_pings_without_data", 0),
            ("grpc.initial_reconnect_backoff_ms", 200),
            ("grpc.min_reconnect_backoff_ms", 200),
            ("grpc.max_reconnect_backoff_ms", 5_000),
        ])

    def _session(self) -> None:
        cfg = self.config
        end = threading.Event()
        with self._lock:
            if self._stop.is_set():
                return
            self._session_end = end
        self.stats.sessions += 1
        channel = self._channel()
        stream = None
        consumer = None
        try:
            stub = link_pb2_grpc.LinkStub(channel)
            hello = link_pb2.Hello(agent_version=__version__, boot_id=read_boot_id(cfg.proc),
                                   claimed_guest=cfg.claimed_guest)
            reply = stub.Register(hello, timeout=cfg.rpc_timeout_s)
            self.stats.registrations += 1
            self.stats.guest = reply.guest
            self.stats.last_error = ""
            self.registered.set()
            interval = cfg.heartbeat_s or (reply.heartbeat_interval_ms / 1000) or 5.0
            log.info("registered with controller %s as guest %s (heartbeat %.3gs)",
                     reply.controller_version, reply.guest, interval)
            stream = stub.Commands(hello)
            consumer = threading.Thread(target=self._consume, args=(stub, stream, end),
                                        name="neuraos-agent-commands", daemon=True)
            consumer.start()
            self._beat_and_report(stub, end, interval)
        finally:
            end.set()
            if stream is not None:
                stream.cancel()
            channel.close()
            if consumer is not None:
                consumer.join(timeout=2)
            with self._lock:
                self._session_end = None

    def _beat_and_report(self, stub: link_pb2_grpc.LinkStub, end: threading.Event, interval: float) -> None:
        cfg = self.config
        seq = 0
        next_beat = next_report = time.monotonic()
        while not end.is_set():
            now = time.monotonic()
            if now >= next_beat:
                seq += 1
                stub.Beat(link_pb2.Heartbeat(seq=seq, sent_unix=time.time()), timeout=cfg.rpc_timeout_s)
                self.stats.heartbeats += 1
                next_beat = now + interval
            if now >= next_report:
                report = self._status_report()
                if report is not None:
                    stub.Report(report, timeout=cfg.rpc_timeout_s)
                    self.stats.reports += 1
                next_report = now + cfg.report_s
            self._flush_alerts(stub)
            end.wait(min(0.1, max(0.0, min(next_beat, next_report) - time.monotonic())))

    def _status_report(self) -> link_pb2.StatusReport | None:
        try:
            msg = status_message(read_status(self.config.proc, self.config.sysfs))
        except (OSError, ValueError) as exc:  # an odd /proc must not cost us the link
            log.warning("cannot read guest status: %s", exc)
            return None
        try:
            msg.intent.CopyFrom(link_pb2.Intent(**asdict(self.intent.sample())))
        except (OSError, ValueError, IndexError) as exc:
            log.warning("cannot read intent signals: %s", exc)
        return msg

    def _consume(self, stub: link_pb2_grpc.LinkStub, stream: grpc.Call, end: threading.Event) -> None:
        """Run each command the host pushes, one at a time, and answer it with Complete."""
        try:
            for cmd in stream:
                result = self.runner.run(cmd)
                self.stats.commands += 1
                log.info("command %d %s: %s", cmd.id, cmd.WhichOneof("kind"),
                         "ok" if result.ok else result.error)
                stub.Complete(result, timeout=self.config.rpc_timeout_s)
            if not end.is_set():
                log.info("controller closed the command stream")
        except grpc.RpcError as exc:
            if not end.is_set():
                self._note_error(f"command stream {exc.code().name}: {exc.details()}")
        except Exception:
            log.exception("command stream failed")
        finally:
            end.set()
