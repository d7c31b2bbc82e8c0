"""The controller's small on-disk store (SQLite, WAL).

Holds what libvirt does not: each guest's NeuraOS settings, the last heartbeat
and status its agent sent, and an event log. Every write is one transaction, so a
controller killed at any point restarts with everything it had committed.
"""

from __future__ import annotations

import json
import sqlite3
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from hypervisor.errors import StateError

SCHEMA = """
CREATE TABLE IF NOT EXISTS guests (
  name TEXT PRIMARY KEY,
  spec TEXT NOT NULL,
  created REAL NOT NULL,
  desired_vcpus INTEGER,
  desired_memory_mib INTEGER,
  last_heartbeat REAL,
  heartbeats INTEGER NOT NULL DEFAULT 0,
  status TEXT,
  lifecycle TEXT
);
CREATE TABLE IF NOT EXISTS events (
  id INTEGER PRIMARY KEY AUTOINCREMENT,
  at REAL NOT NULL,
  guest TEXT,
  kind TEXT NOT NULL,
  detail TEXT
);
"""


@dataclass(frozen=True)
class GuestRecord:
    name: str
    spec: dict[str, Any]
    created: float
    desired_vcpus: int | None
    desired_memory_mib: int | None
    last_heartbeat: float | None
    heartbeats: int
    status: dict[str, Any] | None
    lifecycle: str | None


@dataclass(frozen=True)
class Event:
    at: float
    guest: str | None
    kind: str
    detail: str


class SqliteFile:
    """One SQLite file shared by threads: opened in WAL mode with its schema, one lock.

    A write that fails (disk full, locked too long) raises one StateError naming the file.
    """

    def __init__(self, path: Path, schema: str, what: str) -> None:
        self.path = path
        self.what = what
        self._lock = threading.Lock()
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            self._db = sqlite3.connect(str(path), check_same_thread=False, timeout=10)
            self._db.execute("PRAGMA journal_mode=WAL")
            self._db.executescript(schema)
        except sqlite3.DatabaseError as e:
            raise StateError(f"{what} {path} unusable: {e}") from None

    def close(self) -> None:
        with self._lock:
            self._db.close()

    def _exec(self, sql: str, args: tuple) -> sqlite3.Cursor:
        with self._lock:
            try:
                with self._db:
                    return self._db.execute(sql, args)
            except sqlite3.OperationalError as e:
                raise StateError(f"cannot write {self.what} {self.path}: {e}") from None

    def _rows(self, sql: str, args: tuple = ()) -> list[tuple]:
        with self._lock:
            return self._db.execute(sql, args).fetchall()


class Store(SqliteFile):
    def __init__(self, path: Path) -> None:
        super().__init__(path, SCHEMA, "state store")

    def put_guest(self, name: str, spec: dict[str, Any]) -> None:
        self._exec(
            "INSERT INTO guests(name, spec, created) VALUES(?,?,?) "
            "ON CONFLICT(name) DO UPDATE SET spec=excluded.spec",
            (name, json.dumps(spec), time.time()))

    def drop_guest(self, name: str) -> None:
        self._exec("DELETE FROM guests WHERE name=?", (name,))

    def set_desired(self, name: str, vcpus: int | None = None, memory_mib: int | None = None) -> None:
        if vcpus is not None:
            self._exec("UPDATE guests SET desired_vcpus=? WHERE name=?", (vcpus, name))
        if memory_mib is not None:
            self._exec("UPDATE guests SET desired_memory_mib=? WHERE name=?", (memory_mib, name))

    def heartbeat(self, name: str, at: float) -> None:
        self._exec("UPDATE guests SET last_heartbeat=?, heartbeats=heartbeats+1 WHERE name=?", (at, name))

    def status(self, name: str, status: dict[str, Any]) -> None:
        self._exec("UPDATE guests SET status=? WHERE name=?", (json.dumps(status), name))

    def lifecycle(self, name: str, state: str) -> None:
        self._exec("UPDATE guests SET lifecycle=? WHERE name=?", (state, name))

    def event(self, guest: str | None, kind: str, detail: str = "") -> None:
        self._exec("INSERT INTO events(at, guest, kind, detail) VALUES(?,?,?,?)",
                    (time.time(), guest, kind, detail))

    def guest(self, name: str) -> GuestRecord | None:
        rows = self._query("SELECT * FROM guests WHERE name=?", (name,))
        return rows[0] if rows else None

    def guests(self) -> list[GuestRecord]:
        return self._query("SELECT * FROM guests ORDER BY name", ())

    def events(self, guest: str | None = None, limit: int = 50) -> list[Event]:
        sql = "SELECT at, guest, kind, detail FROM events"
        args: tuple = ()
        if guest is not None:
            sql += " WHERE guest=?"
            args = (guest,)
        rows = self._rows(sql + " ORDER BY id DESC LIMIT ?", args + (limit,))
        return [Event(*r) for r in reversed(rows)]

    def _query(self, sql: str, args: tuple) -> list[GuestRecord]:
        rows = self._rows(sql, args)
        return [GuestRecord(r[0], json.loads(r[1]), r[2], r[3], r[4], r[5], r[6],
                            json.loads(r[7]) if r[7] else None, r[8]) for r in rows]
