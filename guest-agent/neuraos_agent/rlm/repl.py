"""The REPL that runs inside the sandbox: a persistent namespace where `context` is a variable.

Started by `sandbox.Sandbox` as `python -I -S -c ...` under `unshare`; it confines itself
(`confine.build_view`, `confine.apply_limits`, `seccomp.install_filter`) before it reads any
code. Model calls (`llm_query`, `rlm_query`, `embed`, tools) are messages to the parent, which
alone holds a model client: this process has no network at all. Escape attempts are seen by an
audit hook (for the report) and stopped by the kernel (the view, the limits, the filter).
"""

from __future__ import annotations

import collections  # noqa: F401  (offered to programs, imported before the filter)
import io
import itertools  # noqa: F401
import json
import math  # noqa: F401
import os
import re  # noqa: F401
import resource
import signal
import statistics  # noqa: F401
import sys
import time
import traceback
from dataclasses import asdict
from typing import Any, BinaryIO

from neuraos_agent.rlm import helpers, protocol
from neuraos_agent.rlm.confine import CONTEXT, SCRATCH, Confinement, Limits, View, apply_limits, build_view

OUTPUT_CAP = 200_000  # characters kept per turn inside the sandbox; the parent cuts further


class TurnTimeout(Exception):
    """The turn ran past its wall-time limit."""


class CpuLimit(Exception):
    """The turn ran past its CPU-time limit."""


class CallFailed(Exception):
    """A model call or tool failed in the parent (e.g. a budget ran out)."""


class _CappedOutput(io.TextIOBase):
    def __init__(self, cap: int) -> None:
        self.parts: list[str] = []
        self.kept = 0
        self.total = 0
        self.cap = cap

    def write(self, s: str) -> int:
        self.total += len(s)
        if self.kept < self.cap:
            piece = s[: self.cap - self.kept]
            self.parts.append(piece)
            self.kept += len(piece)
        return len(s)

    def getvalue(self) -> str:
        return "".join(self.parts)


_PROCESS_EVENTS = ("os.fork", "os.forkpty", "os.system", "os.exec", "os.posix_spawn", "os.spawn",
                   "subprocess.Popen", "os.startfile", "pty.spawn")


class Auditor:
    """Records what a turn tried to do that the sandbox forbids (the kernel does the stopping)."""

    def __init__(self, allowed_prefixes: tuple[str, ...], writable: tuple[str, ...]) -> None:
        self.allowed = allowed_prefixes
        self.writable = writable
        self.attempts: list[dict[str, str]] = []
        self.armed = False

    def __call__(self, event: str, args: tuple[Any, ...]) -> None:
        if not self.armed:
            return
        if event.startswith("socket."):
            self._note("network", f"{event}{args[:3]!r}")
        elif event in _PROCESS_EVENTS:
            self._note("process", event)
        elif event == "open" and args and isinstance(args[0], (str, bytes)):
            path = os.path.abspath(os.fsdecode(args[0]))
            mode = args[1] if len(args) > 1 and isinstance(args[1], str) else ""
            flags = args[2] if len(args) > 2 and isinstance(args[2], int) else 0
            writes = any(c in mode for c in "wax+") or flags & (os.O_WRONLY | os.O_RDWR | os.O_CREAT | os.O_APPEND)
            if not _under(path, self.allowed):
                self._note("filesystem", f"open {path}")
            elif writes and not _under(path, self.writable):
                self._note("filesystem", f"write {path}")
        elif event in ("ctypes.dlopen", "ctypes.dlsym"):
            self._note("native", event)

    def _note(self, kind: str, detail: str) -> None:
        if len(self.attempts) < 20:
            self.attempts.append({"kind": kind, "detail": detail[:200]})


def _under(path: str, prefixes: tuple[str, ...]) -> bool:
    return any(path == p or path.startswith(p.rstrip("/") + "/") for p in prefixes)


def load_context(manifest_dir: str) -> Any:
    """The context variable: a string, a list of documents, or a lazily read `Corpus`."""
    with open(os.path.join(manifest_dir, "manifest.json"), encoding="utf-8") as fh:
        manifest = json.load(fh)
    kind = manifest["kind"]
    if kind == "text":
        with open(os.path.join(manifest_dir, "context.txt"), encoding="utf-8") as fh:
            return fh.read()
    if kind == "documents":
        with open(os.path.join(manifest_dir, "context.json"), encoding="utf-8") as fh:
            return json.load(fh)
    if kind == "corpus":
        return helpers.Corpus(os.path.join(manifest_dir, "corpus"))
    raise ValueError(f"unknown context kind {kind!r}")


class Repl:
    def __init__(self, to_parent: BinaryIO, from_parent: BinaryIO, limits: Limits, auditor: Auditor,
                 tool_names: list[str], context: Any) -> None:
        self.out, self.inp = to_parent, from_parent
        self.limits = limits
        self.auditor = auditor
        self.final: str | None = None
        self._next_id = 0
        self._reserve: bytearray | None = bytearray(2 * 1024 * 1024)  # freed to report a MemoryError
        self.ns: dict[str, Any] = {"__name__": "__rlm__", "context": context}
        for name in helpers.__all__:
            self.ns[name] = getattr(helpers, name)
        self.ns.update(llm_query=self.llm_query, llm_query_batched=self.llm_query_batched,
                       rlm_query=self.rlm_query, embed=self.embed, FINAL=self.FINAL, FINAL_VAR=self.FINAL_VAR,
                       show_vars=self.show_vars)
        for name in tool_names:
            self.ns[name] = self._tool(name)

    # -- calls served by the parent -------------------------------------------------------------
    def call(self, fn: str, *args: Any, **kwargs: Any) -> Any:
        self._next_id += 1
        protocol.send(self.out, {"op": "call", "id": self._next_id, "fn": fn, "args": list(args), "kwargs": kwargs})
        msg = protocol.recv(self.inp)
        if msg.get("op") != "reply" or msg.get("id") != self._next_id:
            raise protocol.ProtocolError(f"unexpected {msg.get('op')} while waiting for a reply")
        if not msg.get("ok"):
            raise CallFailed(msg.get("error", "call failed"))
        return msg.get("value")

    def llm_query(self, prompt: str, max_tokens: int = 256, grammar: str | None = None) -> str:
        """One model call on a prompt that fits the window."""
        return self.call("llm_query", str(prompt), max_tokens=max_tokens, grammar=grammar)

    def llm_query_batched(self, prompts: list[str], max_tokens: int = 256, grammar: str | None = None) -> list[str]:
        return [self.llm_query(p, max_tokens, grammar) for p in prompts]

    def rlm_query(self, prompt: str, piece: Any = None) -> str:
        """A recursive RLM over `piece` (a plain call once the depth limit is reached)."""
        return self.call("rlm_query", str(prompt), helpers.as_text(piece) if piece is not None else None)

    def embed(self, texts: list[str]) -> list[list[float]]:
        return self.call("embed", [helpers.as_text(t) for t in helpers._items(texts)])

    def _tool(self, name: str) -> Any:
        def tool(*args: Any, **kwargs: Any) -> Any:
            return self.call(name, *[_plain(a) for a in args], **{k: _plain(v) for k, v in kwargs.items()})
        tool.__name__ = name
        return tool

    # -- finishing ------------------------------------------------------------------------------
    def FINAL(self, answer: Any) -> Any:  # noqa: N802  (the RLM paper's name)
        self.final = _answer_text(answer)
        return answer

    def FINAL_VAR(self, name: str) -> Any:  # noqa: N802
        if name not in self.ns:
            raise NameError(f"FINAL_VAR: no variable named {name!r}")
        return self.FINAL(self.ns[name])

    def show_vars(self) -> dict[str, str]:
        skip = set(helpers.__all__) | {"llm_query", "llm_query_batched", "rlm_query", "embed", "FINAL", "FINAL_VAR",
                                       "show_vars", "__name__", "__builtins__"}
        return {k: type(v).__name__ for k, v in self.ns.items() if k not in skip and not callable(v)}

    # -- one turn -------------------------------------------------------------------------------
    def run(self, code: str, turn: int) -> dict[str, Any]:
        out = _CappedOutput(OUTPUT_CAP)
        self.final = None
        self.auditor.attempts = []
        error: str | None = None
        violations: list[dict[str, str]] = []
        used = sum(resource.getrusage(resource.RUSAGE_SELF)[:2])
        hard = resource.getrlimit(resource.RLIMIT_CPU)[1]
        resource.setrlimit(resource.RLIMIT_CPU, (min(int(used + self.limits.turn_cpu_s) + 1, hard - 1), hard))
        started = time.monotonic()
        saved = sys.stdout, sys.stderr
        sys.stdout = sys.stderr = out
        self.auditor.armed = True
        try:
            exec(compile(code, f"<turn {turn}>", "exec"), self.ns)  # noqa: S102  (this is the sandbox)
        except MemoryError:
            self._reserve = None
            violations.append({"kind": "memory", "detail": f"exceeded {self.limits.memory_mib} MiB"})
            error = "MemoryError: the memory limit was reached"
        except TurnTimeout:
            violations.append({"kind": "time", "detail": f"turn ran past {self.limits.turn_wall_s:g} s"})
            error = "TurnTimeout: the turn's wall-time limit was reached"
        except CpuLimit:
            violations.append({"kind": "cpu", "detail": f"turn used more than {self.limits.turn_cpu_s:g} CPU s"})
            error = "CpuLimit: the turn's CPU limit was reached"
        except BaseException as exc:  # noqa: BLE001  (user code may raise anything, SystemExit included)
            tb = traceback.format_exception(type(exc), exc, exc.__traceback__)
            error = "".join(tb[-3:])[-2000:]
        finally:
            self.auditor.armed = False
            sys.stdout, sys.stderr = saved
        if self._reserve is None:
            self._reserve = bytearray(2 * 1024 * 1024) if _try_alloc() else None
        violations.extend(self.auditor.attempts)
        return {"op": "result", "output": out.getvalue(), "output_chars": out.total, "error": error,
                "violations": violations, "final": self.final, "candidate": self._candidate(),
                "ms": round((time.monotonic() - started) * 1000, 1)}

    def _candidate(self) -> str | None:
        for name in ("answer", "_"):
            if name in self.ns and self.ns[name] is not None:
                try:
                    return _answer_text(self.ns[name])[:2000]
                except Exception:  # noqa: BLE001
                    return None
        return None

    def serve(self) -> None:
        while True:
            try:
                msg = protocol.recv(self.inp)
            except EOFError:
                return
            if msg["op"] == "shutdown":
                return
            if msg["op"] == "exec":
                protocol.send(self.out, self.run(msg["code"], int(msg.get("turn", 0))))
            else:
                protocol.send(self.out, {"op": "result", "output": "", "error": f"unknown op {msg['op']}",
                                         "violations": [], "final": None, "candidate": None, "ms": 0})


def _plain(x: Any) -> Any:
    """Tool arguments cross the pipe as JSON: documents become text."""
    if isinstance(x, (str, int, float, bool)) or x is None:
        return x
    if isinstance(x, dict):
        return {str(k): _plain(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [_plain(i) for i in x]
    return helpers.as_text(x)


def _answer_text(x: Any) -> str:
    if isinstance(x, (list, tuple)) and len(x) == 1:
        return _answer_text(x[0])
    if isinstance(x, float) and x.is_integer():
        x = int(x)
    return x if isinstance(x, str) else helpers.as_text(x) if isinstance(x, (list, tuple, dict)) else str(x)


def _try_alloc() -> bool:
    try:
        bytearray(2 * 1024 * 1024)
        return True
    except MemoryError:
        return False


def _raise(exc: type[Exception]) -> Any:
    def handler(signum: int, frame: Any) -> None:
        raise exc()
    return handler


def main(spec_json: str) -> None:
    """Entry point inside the sandbox; `spec_json` carries the view, limits and tool names."""
    spec = json.loads(spec_json)
    view, limits = View(**{**spec["view"], "ro_paths": tuple(spec["view"]["ro_paths"])}), Limits(**spec["limits"])
    to_parent = os.fdopen(os.dup(1), "wb")
    from_parent = os.fdopen(os.dup(0), "rb")
    devnull = os.open(os.devnull, os.O_RDWR)
    os.dup2(devnull, 0)
    os.dup2(devnull, 1)
    os.close(devnull)
    report = Confinement()
    if view.namespaces:
        report.view = build_view(view)
        report.namespaces = True
        os.environ["TMPDIR"] = "/scratch"  # /tmp may be a read-only dir when a visible path lies under it
        context_dir = CONTEXT
        allowed = tuple(report.view) + ("/dev/null", "/dev/zero", "/dev/urandom", "/tmp")
    else:
        context_dir = view.context_dir or ""
        allowed = tuple(view.ro_paths) + ((context_dir,) if context_dir else ()) + ("/dev", view.root)
    report.limits = apply_limits(limits)
    signal.signal(signal.SIGALRM, _raise(TurnTimeout))
    signal.signal(signal.SIGXCPU, _raise(CpuLimit))
    auditor = Auditor(allowed, (SCRATCH, "/tmp", "/dev/null") if view.namespaces else (view.root, "/dev/null"))
    sys.addaudithook(auditor)
    from neuraos_agent.rlm import seccomp

    report.seccomp = seccomp.install_filter()
    os.chdir(SCRATCH if view.namespaces else view.root)
    context = load_context(context_dir) if context_dir else ""
    repl = Repl(to_parent, from_parent, limits, auditor, list(spec.get("tools", [])), context)
    protocol.send(to_parent, {"op": "ready", "confinement": asdict(report), "pid": os.getpid()})
    repl.serve()
