"""Shared fixtures for the link tests: a LinkServer on tmp sockets and real agents in threads.

Both packages generate stubs from the same .proto (package neuraos.link.v1) under different
file names, and protobuf's default descriptor pool refuses a second copy of the same symbols in
one process. In production host and agent never share a process; here the agent is handed the
host's (identical) modules before it first imports its own, so the two run together as real
gRPC peers. The CLI tests run the agent as a subprocess, with its own stubs.
"""

from __future__ import annotations

import sys

from hypervisor.link._gen import link_pb2, link_pb2_grpc

sys.modules.setdefault("neuraos_agent._gen.link_pb2", link_pb2)
sys.modules.setdefault("neuraos_agent._gen.link_pb2_grpc", link_pb2_grpc)

import http.server  # noqa: E402
import json  # noqa: E402
import threading  # noqa: E402
import time  # noqa: E402
from dataclasses import dataclass  # noqa: E402
from pathlib import Path  # noqa: E402
from typing import Callable, Iterator  # noqa: E402

import pytest  # noqa: E402

from hypervisor.link.server import LinkEvent, LinkServer  # noqa: E402
from hypervisor.link.transport import UnixForwardTransport  # noqa: E402
from neuraos_agent.link import AgentConfig, AgentLink  # noqa: E402

HEARTBEAT_S = 0.05  # fast enough that "heartbeats continue" is checked in well under a second


def wait_until(predicate: Callable[[], object], timeout: float = 5.0, what: str = "condition") -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout}s waiting for {what}")
        time.sleep(0.01)


@dataclass
class RunningAgent:
    link: AgentLink
    thread: threading.Thread

    def stop(self) -> None:
        self.link.stop()
        self.thread.join(timeout=5)
        assert not self.thread.is_alive(), "the agent did not stop"


@pytest.fixture
def transport(tmp_path: Path) -> UnixForwardTransport:
    # qemu_user=None: there is no QEMU here to hand the sockets to
    return UnixForwardTransport(tmp_path / "link", qemu_user=None)


@pytest.fixture
def events() -> list[LinkEvent]:
    return []


@pytest.fixture
def server(transport: UnixForwardTransport, events: list[LinkEvent]) -> Iterator[LinkServer]:
    with LinkServer(transport, heartbeat_interval_s=HEARTBEAT_S, on_event=events.append) as link:
        yield link


@pytest.fixture
def start_agent() -> Iterator[Callable[..., RunningAgent]]:
    """Start real agents in threads; every one is stopped, and must stop, by the test's end."""
    running: list[RunningAgent] = []

    def start(address: str, **config: object) -> RunningAgent:
        config.setdefault("report_s", 0.1)
        config.setdefault("backoff_max_s", 0.5)
        link = AgentLink(AgentConfig(address=address, **config))  # type: ignore[arg-type]
        thread = threading.Thread(target=link.run, name="test-agent", daemon=True)
        thread.start()
        running.append(agent := RunningAgent(link, thread))
        return agent

    yield start
    for agent in running:
        agent.stop()


@pytest.fixture
def chat_server() -> Iterator[tuple[str, list[dict], list[str]]]:
    """A local OpenAI-compatible endpoint that replies from a script (a test double for a server)."""
    seen: list[dict] = []
    replies: list[str] = []

    class Handler(http.server.BaseHTTPRequestHandler):
        def do_POST(self) -> None:  # noqa: N802
            seen.append(json.loads(self.rfile.read(int(self.headers["Content-Length"]))))
            text = replies.pop(0) if replies else "FINAL(nothing)"
            body = json.dumps({"choices": [{"message": {"content": text}}],
                               "usage": {"prompt_tokens": 12, "completion_tokens": 1}}).encode()
            self.send_response(200)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, *a: object) -> None:
            pass

    server = http.server.HTTPServer(("127.0.0.1", 0), Handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        yield f"http://127.0.0.1:{server.server_port}/v1", seen, replies
    finally:
        server.shutdown()
        server.server_close()
