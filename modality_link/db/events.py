"""The event journal: every IPC event the service published, numbered, for a client's replay.

Each event gets the next sequence number (``seq``, monotonic across restarts: SQLite's
AUTOINCREMENT never hands out a number again, even after the rows before it were pruned). A
client that reconnects asks ``events.subscribe {since: N}`` and gets what it missed
(docs/ipc.md "Events"). The journal is bounded: the newest :data:`KEEP_EVENTS` events of the
last :data:`KEEP_SECONDS` seconds are kept.
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass
from typing import Any

from modality_link.db.connection import Connection

#: Events kept for replay at most, and for how long (seconds).
KEEP_EVENTS = 10_000
KEEP_SECONDS = 24 * 3600.0
#: Appends between two prunings.
PRUNE_EVERY = 256


@dataclass(frozen=True)
class JournalEvent:
    seq: int
    time: float
    type: str
    params: dict[str, Any]


@dataclass(frozen=True)
class Replay:
    """What ``events.subscribe {since}`` replays: the kept events after `since`, whether they are
    all that happened after it (`complete`: false when older ones were pruned), and the
    journal's last sequence number."""

    events: list[JournalEvent]
    complete: bool
    last_seq: int


class Events:
    def __init__(self, conn: Connection, keep_events: int = KEEP_EVENTS, keep_seconds: float = KEEP_SECONDS) -> None:
        self._conn = conn
        self.keep_events = keep_events
        self.keep_seconds = keep_seconds
        self._appended = 0

    def append(self, event_type: str, params: dict[str, Any]) -> int:
        """Journal one event; its sequence number."""
        now = time.time()
        # not durable: an event lost in a power cut is one a client resynchronises after anyway
        with self._conn.transaction(durable=False) as c:
            cur = c.execute("INSERT INTO events(time, type, params) VALUES (?,?,?)",
                            (now, event_type, json.dumps(params, ensure_ascii=False, separators=(",", ":"))))
            seq = int(cur.lastrowid or 0)
            self._appended += 1
            if self._appended % PRUNE_EVERY == 0:
                c.execute("DELETE FROM events WHERE seq <= ? OR time < ?",
                          (seq - self.keep_events, now - self.keep_seconds))
        return seq

    def prune(self) -> None:
        """Drop the events beyond the bounds now (appends do it every :data:`PRUNE_EVERY`)."""
        last = self.last_seq()
        self._conn.execute("DELETE FROM events WHERE seq <= ? OR time < ?",
                           (last - self.keep_events, time.time() - self.keep_seconds))

    def last_seq(self) -> int:
        """The last sequence number handed out (0: none yet), pruned or not."""
        row = self._conn.one("SELECT seq FROM sqlite_sequence WHERE name='events'")
        return int(row["seq"]) if row is not None else 0

    def replay(self, since: int) -> Replay:
        """The kept events after `since` (oldest first), within the bounds."""
        last = self.last_seq()
        rows = self._conn.query("SELECT seq, time, type, params FROM events WHERE seq > ? AND time >= ? "
                                "ORDER BY seq LIMIT ?", (since, time.time() - self.keep_seconds, self.keep_events))
        events = [JournalEvent(r["seq"], r["time"], r["type"], json.loads(r["params"])) for r in rows]
        first = events[0].seq if events else last + 1
        complete = since <= last and first == since + 1
        return Replay(events, complete, last)
