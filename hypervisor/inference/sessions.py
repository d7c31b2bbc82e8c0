"""Guests' conversations and the live slots their KV state occupies.

Sessions are keyed by (guest, session id), the guest taken from the channel, so one guest's id
can never name another guest's session. A backend with KV save/restore has a few live slots
(the fast tier); a session that needs one while all are taken displaces the least recently
used idle session, whose KV state is parked in a `StateStore` (RAM, NVMe) and restored into a
slot when that session speaks again, instead of prefilling its whole history anew. A slot that
passes to another guest is always cleared or overwritten, so no guest's prompt can reuse (and
time) another guest's cached prefix; within one guest, a new session may reuse the prefix its
sibling left in the slot (agents of one guest share long system prompts and documents).
"""

from __future__ import annotations

import logging
import threading
import time
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Callable

from hypervisor.inference.backends import Backend, Message
from hypervisor.inference.errors import InferenceError, InvalidRequest, QuotaExceeded, SessionBusy, SessionNotFound
from hypervisor.errors import NeuraError
from hypervisor.inference.parking import Key, StateStore

if TYPE_CHECKING:
    from hypervisor.kvpager.cost import RestoreCost

log = logging.getLogger("neuraos.inference")

KV_SOURCES = ("fresh", "slot", "ram", "nvme", "prefill", "recompute")  # where a request's KV prefix came from
# "prefill": the state was lost (never parked, evicted, corrupt); "recompute": it was parked, but
# the measured costs said prefilling it again is faster than reading it back from its tier


@dataclass
class Session:
    key: Key
    raw: bool = False
    messages: list[Message] = field(default_factory=list)  # chat history
    text: str = ""  # raw history
    turns: int = 0
    tokens: int = 0  # tokens of KV state held for it
    slot: int | None = None
    busy: bool = False
    last_used: float = 0.0

    @property
    def ephemeral(self) -> bool:
        return self.key[1] == ""


@dataclass(frozen=True)
class SessionInfo:
    guest: str
    session: str
    tokens: int
    tier: str  # slot | ram | nvme | none
    turns: int


class SessionTable:
    def __init__(self, clock: Callable[[], float] = time.monotonic) -> None:
        self._sessions: dict[Key, Session] = {}
        self._lock = threading.Lock()
        self.clock = clock

    def open(self, guest: str, sid: str, *, resume: bool, raw: bool, max_sessions: int) -> Session:
        """Mark the (guest, sid) session busy, creating it unless `resume`; sid "" is one-shot."""
        key = (guest, sid)
        with self._lock:
            session = self._sessions.get(key) if sid else None
            if session is None:
                if resume:
                    raise SessionNotFound(f"guest {guest} has no session {sid[:64]!r}")
                if sid and sum(1 for k in self._sessions if k[0] == guest) >= max_sessions:
                    raise QuotaExceeded(f"guest {guest} already keeps {max_sessions} sessions",
                                        hint="close a session (CloseSession) or raise the guest's quota")
                session = Session(key, raw=raw)
                if sid:
                    self._sessions[key] = session
            elif session.busy:
                raise SessionBusy(f"session {sid[:64]!r} is already generating")
            elif session.raw != raw:
                raise InvalidRequest(f"session {sid[:64]!r} was started {'raw' if session.raw else 'as chat'}")
            session.busy = True
            return session

    def done(self, session: Session) -> None:
        with self._lock:
            session.busy = False
            session.last_used = self.clock()

    def remove(self, guest: str, sid: str) -> Session | None:
        with self._lock:
            session = self._sessions.get((guest, sid))
            if session is None or session.busy:
                return None
            return self._sessions.pop((guest, sid))

    def of(self, guest: str | None = None) -> list[Session]:
        with self._lock:
            return [s for k, s in sorted(self._sessions.items()) if guest is None or k[0] == guest]


class SlotPool:
    """Assigns live backend slots to sessions, parking and restoring KV state through `store`.

    `store=None` parks nothing: a displaced session is re-prefilled when it returns (the
    baseline the pager is measured against). `reuse_guest_prefix=False` also clears a slot
    between sessions of the same guest (a pure re-prefill baseline). With `cost`, every restore
    is timed into it, and a parked state comes back by restore or by re-prefill, whichever it
    measures cheaper for that tier and size.
    """

    def __init__(self, backend: Backend, slots: int, store: StateStore | None,
                 clock: Callable[[], float] = time.monotonic, reuse_guest_prefix: bool = True,
                 cost: RestoreCost | None = None) -> None:
        self.backend = backend
        self.store = store
        self.cost = cost
        self.clock = clock
        self.reuse_guest_prefix = reuse_guest_prefix
        self._owners: list[Session | None] = [None] * slots
        self._last_guest: list[str | None] = [None] * slots  # whose KV the slot holds
        self._cond = threading.Condition()
        self.parked_bytes = 0
        self.restores = {"ram": 0, "nvme": 0}
        self.recomputes = 0  # parked states re-prefilled by choice (cheaper than their tier)

    @property
    def slots(self) -> int:
        return len(self._owners)

    def acquire(self, session: Session, timeout: float) -> tuple[int, str]:
        """A slot holding `session`'s KV state (restored if parked); returns (slot, kv source)."""
        deadline = self.clock() + timeout
        with self._cond:
            while True:
                if session.slot is not None and self._owners[session.slot] is session:
                    return session.slot, "slot"
                slot = self._free_slot()
                if slot is not None:
                    break
                remaining = deadline - self.clock()
                if remaining <= 0:
                    raise InferenceError("every model slot is busy generating", hint="retry shortly")
                self._cond.wait(min(remaining, 0.5))
            victim = self._owners[slot]
            if victim is not None:
                self._park(slot, victim)
            self._owners[slot] = session
            session.slot = slot
            return slot, self._load(slot, session)

    def _free_slot(self) -> int | None:
        empty = [i for i, s in enumerate(self._owners) if s is None]
        if empty:
            return empty[0]
        idle = [(s.last_used, i) for i, s in enumerate(self._owners) if s is not None and not s.busy]
        return min(idle)[1] if idle else None

    def _park(self, slot: int, victim: Session) -> None:
        victim.slot = None
        if victim.ephemeral or self.store is None or not victim.tokens:
            return
        try:
            state = self.backend.save(slot)
            self.store.put(victim.key, state)
        except NeuraError as exc:  # parking is an optimisation: the victim re-prefills instead
            log.warning("kv: could not park %s/%s: %s", *victim.key, exc)
            return
        if self.cost is not None:
            self.cost.observe_state(state.nbytes, len(state.tokens))
        self.parked_bytes += state.nbytes

    def _load(self, slot: int, session: Session) -> str:
        guest, self._last_guest[slot] = self._last_guest[slot], session.key[0]
        lost = "fresh" if session.turns == 0 else "prefill"
        if not (self.reuse_guest_prefix and guest == session.key[0]):
            self.backend.clear(slot)
        if self.store is None or session.turns == 0:
            return lost
        if self.cost is not None and not self._worth_restoring(session):
            self.store.drop(session.key)  # the slot's prefill replaces it; parked again when displaced
            self.recomputes += 1
            return "recompute"
        t0 = time.perf_counter()
        state, tier = self.store.get(session.key)
        if state is None:
            return lost
        try:
            self.backend.restore(slot, state)
        except InferenceError:
            self.backend.clear(slot)
            return lost
        if self.cost is not None:
            self.cost.observe_restore(tier, state.nbytes, time.perf_counter() - t0, len(state.tokens))
        self.store.drop(session.key)  # it lives in the slot now
        self.restores[tier] = self.restores.get(tier, 0) + 1
        return tier

    def _worth_restoring(self, session: Session) -> bool:
        """Ask the cost model: read the parked state back, or prefill the session's tokens again?"""
        assert self.cost is not None and self.store is not None
        tier, nbytes = self.store.tier(session.key), self.store.nbytes(session.key)
        if tier == "none" or nbytes <= 0:
            return True  # nothing to weigh: `get` finds it missing and the turn re-prefills
        choice = self.cost.choose(tier, nbytes, session.tokens)
        log.debug("kv: %s/%s from %s: %s (restore %s s, prefill %s s)", *session.key, tier,
                  "restore" if choice.restore else "re-prefill", choice.restore_s, choice.prefill_s)
        return choice.restore

    def release(self, session: Session) -> None:
        with self._cond:
            if session.ephemeral and session.slot is not None:
                self._owners[session.slot] = None  # cleared by whoever takes it next
                session.slot = None
            self._cond.notify_all()

    def forget(self, session: Session) -> None:
        """The session is closed: free its slot and drop any parked state."""
        with self._cond:
            if session.slot is not None and self._owners[session.slot] is session:
                self._owners[session.slot] = None
                self.backend.clear(session.slot)
            session.slot = None
            if self.store is not None:
                self.store.drop(session.key)
            self._cond.notify_all()

    def tier(self, session: Session) -> str:
        if session.slot is not None:
            return "slot"
        return self.store.tier(session.key) if self.store is not None else "none"

    def occupancy(self) -> list[str | None]:
        with self._cond:
            return [None if s is None else f"{s.key[0]}/{s.key[1]}" for s in self._owners]
