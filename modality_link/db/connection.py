"""The one SQLite connection of the service, shared by its threads.

SQLite allows one writer at a time and the service has several threads (one per association,
the IPC server, the job workers), so every statement runs under one lock. A statement alone
commits by itself (autocommit); statements that must stand or fall together run in
:meth:`Connection.transaction`.
"""

from __future__ import annotations

import sqlite3
import threading
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Iterator, Sequence


def read_only_uri(path: Path) -> str:
    """The URI that opens `path` read-only. A read-only reader of a WAL database creates the
    ``-wal`` and ``-shm`` files when they are missing (and leaves them, owned by whoever ran
    it); they are missing exactly when no connection has the file open and its last one
    checkpointed it, and then the file is complete and unchanging and is read as ``immutable``."""
    wal = path.with_name(path.name + "-wal")
    mode = "mode=ro" if wal.exists() else "mode=ro&immutable=1"
    return f"{path.absolute().as_uri()}?{mode}"


class Connection:
    """One SQLite file in WAL mode, its statements serialised by a lock."""

    def __init__(self, path: Path | str, read_only: bool = False) -> None:
        self._lock = threading.RLock()
        if read_only:  # beside the service, or after it: create nothing, change nothing
            self._conn = sqlite3.connect(read_only_uri(Path(path)), uri=True, check_same_thread=False,
                                         isolation_level=None, timeout=10.0)
            self._conn.row_factory = sqlite3.Row
            return
        self._conn = sqlite3.connect(str(path), check_same_thread=False, isolation_level=None)
        self._conn.row_factory = sqlite3.Row
        self._conn.execute("PRAGMA journal_mode=WAL")
        # FULL: a committed row survives a power cut (an archive file was fsynced before its row).
        self._conn.execute("PRAGMA synchronous=FULL")
        self._conn.execute("PRAGMA foreign_keys=ON")
        self._conn.execute("PRAGMA busy_timeout=10000")

    def close(self) -> None:
        with self._lock:
            self._conn.close()

    def query(self, sql: str, args: Sequence[Any] = ()) -> list[sqlite3.Row]:
        """The rows of one SELECT."""
        with self._lock:
            return self._conn.execute(sql, args).fetchall()

    def one(self, sql: str, args: Sequence[Any] = ()) -> sqlite3.Row | None:
        """The first row of one SELECT, or None."""
        rows = self.query(sql, args)
        return rows[0] if rows else None

    def execute(self, sql: str, args: Sequence[Any] = ()) -> sqlite3.Cursor:
        """One statement, committed on its own."""
        with self._lock:
            return self._conn.execute(sql, args)

    @contextmanager
    def transaction(self, durable: bool = True) -> Iterator[sqlite3.Connection]:
        """A write transaction: every statement run on the connection it yields, or none.

        ``durable=False`` commits with synchronous=NORMAL: in WAL mode the transaction survives
        a crash of the process (SIGKILL), a power cut may lose it. For rows that can be rebuilt
        or whose loss only repeats idempotent work; it saves one fsync per commit.
        """
        with self._lock:
            c = self._conn
            if not durable:
                c.execute("PRAGMA synchronous=NORMAL")
            try:
                c.execute("BEGIN IMMEDIATE")
                try:
                    yield c
                    c.execute("COMMIT")
                except BaseException:
                    c.execute("ROLLBACK")
                    raise
            finally:
                if not durable:
                    c.execute("PRAGMA synchronous=FULL")

    def user_version(self) -> int:
        """The schema version recorded in the file (PRAGMA user_version)."""
        return int(self.query("PRAGMA user_version")[0][0])

    def run_script(self, script: str, version: int) -> None:
        """Run a migration script and record `version`, all or nothing.

        sqlite3's ``executescript`` commits any open transaction before it starts, so the script
        carries its own BEGIN and COMMIT instead of running in :meth:`transaction`.
        """
        with self._lock:
            try:
                self._conn.executescript(f"BEGIN IMMEDIATE; {script}; PRAGMA user_version={version}; COMMIT;")
            except BaseException:
                if self._conn.in_transaction:
                    self._conn.execute("ROLLBACK")
                raise
