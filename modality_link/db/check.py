"""Read-only looks at the database file for the self test (docs/design.md "Self-test").

Each opens its own read-only connection (``mode=ro``): it works beside the running service's
connection (WAL readers do not block the writer), and run by hand as another user it creates
nothing in the home - no journal files, no upgraded schema, no file owned by the wrong user.
"""

from __future__ import annotations

import sqlite3
from pathlib import Path

from modality_link.db.connection import read_only_uri


class DatabaseUnreadable(Exception):
    """The database file cannot be opened or read; the message says why."""


def _connect(path: Path) -> sqlite3.Connection:
    """A read-only connection (:func:`~modality_link.db.connection.read_only_uri`)."""
    if not path.exists():
        raise DatabaseUnreadable(f"{path} does not exist")
    try:
        return sqlite3.connect(read_only_uri(path), uri=True, timeout=10.0)
    except sqlite3.Error as exc:
        raise DatabaseUnreadable(f"{path}: {exc}") from None


def integrity_problems(path: Path, limit: int = 20) -> list[str]:
    """What ``PRAGMA integrity_check`` reports (at most `limit` lines); empty when the file is
    sound. A file SQLite cannot read at all is one problem."""
    try:
        conn = _connect(path)
    except DatabaseUnreadable as exc:
        return [str(exc)]
    try:
        rows = conn.execute(f"PRAGMA integrity_check({int(limit)})").fetchall()
    except sqlite3.Error as exc:
        return [str(exc)]
    finally:
        conn.close()
    lines = [str(r[0]) for r in rows]
    return [] if lines == ["ok"] else lines


def indexed_files(path: Path) -> dict[str, int]:
    """Every indexed archive file: relative path -> size in bytes, as the index holds them."""
    conn = _connect(path)
    try:
        return {str(p): int(size) for p, size in conn.execute("SELECT path, size FROM instances")}
    except sqlite3.Error as exc:
        raise DatabaseUnreadable(f"{path}: {exc}") from None
    finally:
        conn.close()
