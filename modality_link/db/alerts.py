"""Alerts: what the operator must be told (disk full, a failed job, an MPPS refused...)."""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Any

from modality_link.db.connection import Connection


@dataclass(frozen=True)
class Alert:
    id: int
    time: float
    level: str  # warning | error
    code: str  # e.g. disk-full
    message: str
    cleared: bool

    def to_dict(self) -> dict[str, Any]:
        """The alert as ``alerts.list`` and ``status`` show it (docs/ipc.md); `cleared` is 0 or 1."""
        return {"id": self.id, "time": self.time, "level": self.level, "code": self.code,
                "message": self.message, "cleared": int(self.cleared)}


class Alerts:
    def __init__(self, conn: Connection) -> None:
        self._conn = conn

    def add(self, level: str, code: str, message: str) -> int:
        cur = self._conn.execute(
            "INSERT INTO alerts(time, level, code, message) VALUES (?,?,?,?)", (time.time(), level, code, message)
        )
        return int(cur.lastrowid or 0)

    def latest(self, limit: int = 50, include_cleared: bool = False) -> list[Alert]:
        """The newest alerts first; cleared ones only with `include_cleared`."""
        where = "" if include_cleared else "WHERE cleared=0"
        rows = self._conn.query(
            f"SELECT id, time, level, code, message, cleared FROM alerts {where} ORDER BY id DESC LIMIT ?", (limit,)
        )
        return [Alert(r["id"], r["time"], r["level"], r["code"], r["message"], bool(r["cleared"])) for r in rows]

    def raised(self, code: str) -> bool:
        """Whether an alert of `code` is raised and not cleared."""
        return self._conn.one("SELECT 1 FROM alerts WHERE code=? AND cleared=0 LIMIT 1", (code,)) is not None

    def clear(self, code: str | None = None) -> None:
        """Mark the alerts of `code` (every alert when None) cleared."""
        if code is None:
            self._conn.execute("UPDATE alerts SET cleared=1")
        else:
            self._conn.execute("UPDATE alerts SET cleared=1 WHERE code=?", (code,))

    def acknowledge(self, alert_id: int) -> bool:
        """Mark the alert `alert_id` cleared (acknowledged); whether there is such an alert."""
        if self._conn.one("SELECT 1 FROM alerts WHERE id=?", (alert_id,)) is None:
            return False
        self._conn.execute("UPDATE alerts SET cleared=1 WHERE id=?", (alert_id,))
        return True
