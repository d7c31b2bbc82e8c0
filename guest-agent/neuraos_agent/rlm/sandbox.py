"""The parent side of the REPL sandbox: start it confined, run turns, serve its calls, survive it.

The REPL is a separate process in new user, mount, pid and net namespaces (`unshare` from
util-linux), which then confines itself further (see `confine` and `seccomp`). Wall time is
enforced from here: time spent serving a model call does not count, a turn past its limit
gets SIGALRM (the REPL keeps its state) and, past a grace period, the whole process group is
killed and a fresh REPL started — the agent itself never goes down with it.
"""

from __future__ import annotations

import json
import os
import selectors
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Callable, Sequence

from neuraos_agent.rlm import context as ctx
from neuraos_agent.rlm import protocol
from neuraos_agent.rlm.confine import Limits, View
from neuraos_agent.rlm.errors import SandboxError

CallHandler = Callable[[str, list, dict], Any]  # (fn, args, kwargs) -> JSON-able value

UNSHARE = ("--user", "--map-root-user", "--mount", "--pid", "--fork", "--net", "--kill-child")
_BOOT = ("import sys; sys.path.insert(0, sys.argv[1]); "
         "from neuraos_agent.rlm.repl import main; main(sys.argv[2])")


@dataclass(frozen=True)
class SandboxConfig:
    limits: Limits = Limits()
    namespaces: bool | None = True      # None: where `unshare` works; False: limits + filter only (no view)
    extra_ro_paths: tuple[str, ...] = ()
    grace_s: float = 3.0                # after SIGALRM, how long a turn has to wind down before a kill
    startup_timeout_s: float = 30.0


@dataclass(frozen=True)
class Violation:
    kind: str      # network | filesystem | process | memory | cpu | time | crash | native
    detail: str


@dataclass
class TurnResult:
    output: str
    output_chars: int
    error: str | None
    violations: list[Violation] = field(default_factory=list)
    final: str | None = None
    candidate: str | None = None
    ms: float = 0.0
    restarted: bool = False           # the REPL was killed and replaced: its variables are gone

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


_USERNS_OK: bool | None = None


def namespaces_available() -> bool:
    """Whether unprivileged-style user namespaces work here (probed once)."""
    global _USERNS_OK
    if _USERNS_OK is None:
        exe = shutil.which("unshare")
        _USERNS_OK = bool(exe) and subprocess.run([exe, *UNSHARE, "true"], capture_output=True,
                                                  timeout=10).returncode == 0
    return _USERNS_OK


def _package_parent() -> Path:
    return Path(__file__).resolve().parents[2]


def _runtime_paths() -> tuple[str, ...]:
    """What CPython and the REPL need to see: the interpreter, its libraries, this package."""
    paths = {sys.base_prefix, os.path.dirname(os.path.realpath(sys.executable)), "/usr",
             str(_package_parent() / "neuraos_agent")}
    for link in ("/lib", "/lib64"):
        if os.path.isdir(link) and not os.path.islink(link):
            paths.add(link)
    real = sorted({os.path.realpath(p) for p in paths if os.path.exists(p)})
    return tuple(p for p in real if not any(p != q and p.startswith(q.rstrip("/") + "/") for q in real))


def _children(pid: int) -> list[int]:
    out = []
    for d in Path("/proc").iterdir():
        if d.name.isdigit():
            try:
                stat = (d / "stat").read_text()
            except OSError:
                continue
            if int(stat.rsplit(")", 1)[1].split()[1]) == pid:
                out.append(int(d.name))
    return out


class Sandbox:
    """A confined, persistent REPL over one context. Use as a context manager."""

    def __init__(self, context: ctx.Context, *, config: SandboxConfig = SandboxConfig(),
                 tools: Sequence[str] = ()) -> None:
        self.context = context
        self.config = config
        self.tools = tuple(tools)
        self.confinement: dict[str, Any] = {}
        self.restarts = 0
        self._proc: subprocess.Popen[bytes] | None = None
        self._tmp: tempfile.TemporaryDirectory[str] | None = None
        self._buf = b""
        self._repl_pid: int | None = None

    # -- lifetime -------------------------------------------------------------------------------
    def __enter__(self) -> Sandbox:
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def start(self) -> None:
        if self._tmp is None:
            self._tmp = tempfile.TemporaryDirectory(prefix="neuraos-rlm-")
            base = Path(self._tmp.name)
            (base / "root").mkdir()
            self._corpus = ctx.stage(self.context, base / "context")
        base = Path(self._tmp.name)
        use_ns = self.config.namespaces
        if use_ns is None:
            use_ns = namespaces_available()
        elif use_ns and not namespaces_available():
            raise SandboxError("user namespaces are not available here",
                               hint="enable kernel.unprivileged_userns_clone, or set namespaces=False")
        if not use_ns and self._corpus and not (base / "context" / "corpus").is_symlink():
            (base / "context" / "corpus").rmdir()
            (base / "context" / "corpus").symlink_to(self._corpus)
        view = View(root=str(base / "root"), ro_paths=_runtime_paths() + tuple(self.config.extra_ro_paths),
                    context_dir=str(base / "context"), corpus_dir=str(self._corpus) if self._corpus else None,
                    scratch_mib=self.config.limits.scratch_mib, namespaces=use_ns)
        spec = json.dumps({"view": view.to_dict(), "limits": asdict(self.config.limits), "tools": list(self.tools)})
        py = [sys.executable, "-I", "-S", "-B", "-c", _BOOT, str(_package_parent()), spec]
        cmd = [shutil.which("unshare") or "unshare", *UNSHARE, "--", *py] if use_ns else py
        env = {"PATH": "/usr/bin:/bin", "LANG": "C.UTF-8", "PYTHONHASHSEED": "0"}
        self._stderr = open(base / "stderr.log", "ab")
        self._proc = subprocess.Popen(cmd, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=self._stderr,
                                      env=env, start_new_session=True)
        self._buf = b""
        try:
            msg = self._read(time.monotonic() + self.config.startup_timeout_s)
        except (EOFError, TimeoutError, protocol.ProtocolError) as exc:
            tail = self._stderr_tail()
            self._kill()
            raise SandboxError(f"the REPL sandbox did not start: {exc}; {tail}",
                               hint="check that util-linux unshare and libseccomp2 are installed") from exc
        self.confinement = msg.get("confinement", {})
        self._repl_pid = (_children(self._proc.pid) or [self._proc.pid])[0] if use_ns else self._proc.pid

    def close(self) -> None:
        if self._proc and self._proc.poll() is None:
            try:
                protocol.send(self._proc.stdin, {"op": "shutdown"})  # type: ignore[arg-type]
                self._proc.wait(timeout=2)
            except (OSError, subprocess.TimeoutExpired, ValueError):
                pass
        self._kill()
        if self._tmp:
            self._tmp.cleanup()
            self._tmp = None

    def _kill(self) -> None:
        if self._proc is None:
            return
        if self._proc.poll() is None:
            try:
                os.killpg(self._proc.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        try:
            self._proc.wait(timeout=5)
        except subprocess.TimeoutExpired:
            pass
        for f in (self._proc.stdin, self._proc.stdout):
            try:
                f and f.close()
            except OSError:
                pass
        self._stderr.close()
        self._proc = None

    def _restart(self) -> None:
        self._kill()
        self.restarts += 1
        self.start()

    @property
    def alive(self) -> bool:
        return self._proc is not None and self._proc.poll() is None

    # -- the wire -------------------------------------------------------------------------------
    def _read(self, deadline: float) -> dict[str, Any]:
        assert self._proc and self._proc.stdout
        fd = self._proc.stdout.fileno()
        while b"\n" not in self._buf:
            left = deadline - time.monotonic()
            if left <= 0:
                raise TimeoutError("no answer from the REPL in time")
            with selectors.DefaultSelector() as sel:
                sel.register(fd, selectors.EVENT_READ)
                if not sel.select(min(left, 1.0)):
                    continue
            chunk = os.read(fd, 1 << 20)
            if not chunk:
                raise EOFError("the REPL process ended")
            self._buf += chunk
            if len(self._buf) > protocol.MAX_LINE:
                raise protocol.ProtocolError("message too long")
        line, self._buf = self._buf.split(b"\n", 1)
        msg = json.loads(line)
        if not isinstance(msg, dict) or "op" not in msg:
            raise protocol.ProtocolError("malformed message")
        return msg

    def _stderr_tail(self) -> str:
        try:
            return (Path(self._tmp.name) / "stderr.log").read_text(errors="replace")[-600:].strip()  # type: ignore[union-attr]
        except OSError:
            return ""

    # -- a turn ---------------------------------------------------------------------------------
    def run(self, code: str, on_call: CallHandler | None = None, *, turn: int = 0,
            wall_s: float | None = None) -> TurnResult:
        """Run `code` in the REPL; model calls it makes are served by `on_call`."""
        if not self.alive:
            self._restart()
        assert self._proc and self._proc.stdin
        limit = min(wall_s, self.config.limits.turn_wall_s) if wall_s else self.config.limits.turn_wall_s
        started = time.monotonic()
        deadline = started + limit
        alarmed = False
        try:
            protocol.send(self._proc.stdin, {"op": "exec", "code": code, "turn": turn})
            while True:
                try:
                    msg = self._read(deadline)
                except TimeoutError:
                    if alarmed:
                        raise
                    alarmed = True
                    self._signal(signal.SIGALRM)
                    deadline = time.monotonic() + self.config.grace_s
                    continue
                if msg["op"] == "result":
                    res = TurnResult(msg.get("output", ""), int(msg.get("output_chars", 0)), msg.get("error"),
                                     [Violation(v["kind"], v["detail"]) for v in msg.get("violations", [])],
                                     msg.get("final"), msg.get("candidate"), float(msg.get("ms", 0)))
                    if alarmed and not any(v.kind == "time" for v in res.violations):
                        res.violations.append(Violation("time", f"turn ran past {limit:g} s"))
                    return res
                if msg["op"] == "call":
                    t0 = time.monotonic()
                    reply = self._serve(msg, on_call)
                    deadline += time.monotonic() - t0  # waiting on a model is not the REPL's time
                    protocol.send(self._proc.stdin, reply)
        except (EOFError, TimeoutError, protocol.ProtocolError, BrokenPipeError, ValueError) as exc:
            return self._failed_turn(exc, limit, started)

    def _serve(self, msg: dict[str, Any], on_call: CallHandler | None) -> dict[str, Any]:
        if on_call is None:
            return {"op": "reply", "id": msg.get("id"), "ok": False, "error": "no model is attached to this REPL"}
        try:
            value = on_call(str(msg.get("fn")), list(msg.get("args") or []), dict(msg.get("kwargs") or {}))
            return {"op": "reply", "id": msg.get("id"), "ok": True, "value": value}
        except Exception as exc:  # noqa: BLE001  (reported to the program, which may recover)
            return {"op": "reply", "id": msg.get("id"), "ok": False, "error": f"{type(exc).__name__}: {exc}"}

    def _signal(self, sig: int) -> None:
        if self._repl_pid:
            try:
                os.kill(self._repl_pid, sig)
            except ProcessLookupError:
                pass

    def _failed_turn(self, exc: Exception, limit: float, started: float) -> TurnResult:
        rc = self._proc.poll() if self._proc else None
        if isinstance(exc, TimeoutError):
            v = Violation("time", f"turn ran past {limit:g} s and did not stop; the REPL was killed")
        elif rc is not None and rc < 0:
            name = signal.Signals(-rc).name
            kind = "cpu" if -rc in (signal.SIGXCPU, signal.SIGKILL) else "crash"
            v = Violation(kind, f"the REPL was killed by {name}")
        else:
            v = Violation("crash", f"the REPL stopped answering ({exc}); exit status {rc}")
        self._restart()
        return TurnResult("", 0, f"{v.detail}; a fresh REPL was started and earlier variables are gone",
                          [v], ms=round((time.monotonic() - started) * 1000, 1), restarted=True)
