"""The guests' behaviour alerts, kept on the host (SQLite, WAL, `<state_dir>/security.db`).

An alert arrives over a guest's link (`Link.Alert`); the guest's name comes from the
channel, never from the report. Operator actions (`neuraos release` / `kill`) are queued
in the same database: the CLI is a separate process from the controller that holds the
link, so it writes a request and waits for the controller's `ActionPump` to answer it.
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from hypervisor.state import SqliteFile

SCHEMA = """
CREATE TABLE IF NOT EXISTS alerts (
  seq INTEGER PRIMARY KEY AUTOINCREMENT,
  guest TEXT NOT NULL,
  id TEXT NOT NULL,
  received REAL NOT NULL,
  pid INTEGER NOT NULL,
  contained INTEGER NOT NULL,
  state TEXT NOT NULL,           -- contained | alerted | released | killed
  report TEXT NOT NULL,          -- the AlertReport as JSON
  UNIQUE(guest, id)
);
CREATE TABLE IF NOT EXISTS actions (
  seq INTEGER PRIMARY KEY AUTOINCREMENT,
  guest TEXT NOT NULL,
  pid INTEGER NOT NULL,
  kind TEXT NOT NULL,            -- release | kill
  requested REAL NOT NULL,
  done REAL,
  ok INTEGER,
  result TEXT
);
"""

_TEXT = 512  # longest string kept from a report field
_LIST = 64  # longest list kept


@dataclass(frozen=True)
class AlertRecord:
    seq: int
    guest: str
    id: str
    received: float
    pid: int
    contained: bool
    state: str
    report: dict[str, Any]


@dataclass(frozen=True)
class ActionRecord:
    seq: int
    guest: str
    pid: int
    kind: str
    requested: float
    done: float | None
    ok: bool | None
    result: str | None


def report_dict(msg: Any) -> dict[str, Any]:
    """An AlertReport as bounded plain data (a guest cannot make the host keep megabytes)."""
    from google.protobuf.json_format import MessageToDict

    d = MessageToDict(msg, preserving_proto_field_name=True, always_print_fields_with_no_presence=True)
    for k, v in d.items():
        if isinstance(v, str):
            d[k] = v[:_TEXT]
        elif isinstance(v, list):
            d[k] = [str(x)[:_TEXT] for x in v[:_LIST]]
    return d


class AlertStore(SqliteFile):
    def __init__(self, path: Path) -> None:
        super().__init__(path, SCHEMA, "alert store")

    def record(self, guest: str, msg: Any) -> None:
        """The LinkServer's `on_alert` hook. A repeated alert (same guest and id) is kept once."""
        d = report_dict(msg)
        self._exec("INSERT OR IGNORE INTO alerts(guest, id, received, pid, contained, state, report) "
                   "VALUES(?,?,?,?,?,?,?)",
                   (guest, str(d.get("id", ""))[:64], time.time(), int(d.get("pid", 0)),
                    int(bool(d.get("contained"))), "contained" if d.get("contained") else "alerted", json.dumps(d)))

    def alerts(self, guest: str | None = None, limit: int = 50) -> list[AlertRecord]:
        sql, args = "SELECT seq, guest, id, received, pid, contained, state, report FROM alerts", ()
        if guest is not None:
            sql, args = sql + " WHERE guest=?", (guest,)
        rows = self._rows(sql + " ORDER BY seq DESC LIMIT ?", args + (limit,))
        return [AlertRecord(r[0], r[1], r[2], r[3], r[4], bool(r[5]), r[6], json.loads(r[7]))
                for r in reversed(rows)]

    def set_state(self, guest: str, pid: int, state: str) -> None:
        self._exec("UPDATE alerts SET state=? WHERE guest=? AND pid=? AND state IN ('contained', 'alerted')",
                   (state, guest, pid))

    # -- operator actions ------------------------------------------------------------------

    def request(self, guest: str, pid: int, kind: str) -> int:
        return int(self._exec("INSERT INTO actions(guest, pid, kind, requested) VALUES(?,?,?,?)",
                              (guest, pid, kind, time.time())).lastrowid)

    def pending(self) -> list[ActionRecord]:
        rows = self._rows("SELECT * FROM actions WHERE done IS NULL ORDER BY seq")
        return [ActionRecord(*r[:6], None, None) for r in rows]

    def finish(self, seq: int, ok: bool, result: str) -> None:
        self._exec("UPDATE actions SET done=?, ok=?, result=? WHERE seq=?", (time.time(), int(ok), result[:4096], seq))

    def action(self, seq: int) -> ActionRecord | None:
        rows = self._rows("SELECT * FROM actions WHERE seq=?", (seq,))
        r = rows[0] if rows else None
        return None if r is None else ActionRecord(r[0], r[1], r[2], r[3], r[4], r[5],
                                                   None if r[6] is None else bool(r[6]), r[7])
