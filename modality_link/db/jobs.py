"""The job queues' rows: jobs and their items, the per-node sent and committed state of each
instance, and Storage Commitment transactions (PS3.4 J.3).

A job has a kind, a node (its destination, or a drive), items and a state: queued -> running ->
done | failed | cancelled. What the states mean and when they change is the queue's business
(`modality_link.jobs`); this module only reads and writes them. Two queues have the same
columns in their own tables: ``jobs``/``job_items`` (send, commit, burn) and
``mpps_jobs``/``mpps_job_items`` (the MPPS messages, `modality_link.mpps_outbox`).
"""

from __future__ import annotations

import datetime
import json
import time
from dataclasses import dataclass, replace
from typing import Any, Sequence

from modality_link.db.connection import Connection

FINAL_STATES = ("done", "failed", "cancelled")


@dataclass(frozen=True)
class Job:
    """A job with the counts of its items."""

    id: int
    kind: str
    node: str
    state: str
    params: dict[str, Any]
    parent_id: int | None  # the job that queued this one
    after_id: int | None  # the job that must end before this one starts
    attempts: int
    max_attempts: int
    next_attempt_at: float
    last_error: str
    detail: str  # what the job does or waits for, in words
    created_at: float
    updated_at: float
    total: int
    done: int  # items done or stored with a warning
    warnings: int
    failed: int

    def to_dict(self) -> dict[str, Any]:
        """The job as ``jobs.list`` shows it (docs/ipc.md)."""
        return {
            "id": self.id, "kind": self.kind, "node": self.node, "state": self.state,
            "params": self.params, "parent_id": self.parent_id, "attempts": self.attempts,
            "max_attempts": self.max_attempts, "next_attempt_at": self.next_attempt_at,
            "last_error": self.last_error, "detail": self.detail, "created_at": self.created_at,
            "updated_at": self.updated_at, "total": self.total, "done": self.done,
            "warnings": self.warnings, "failed": self.failed,
            "created": local_time(self.created_at), "updated": local_time(self.updated_at),
            "next_attempt": local_time(self.next_attempt_at) if self.state == "queued" else "",
        }


def local_time(t: float | None) -> str:
    """`t` (Unix seconds) as ISO 8601 local time with its UTC offset; "" for none."""
    if not t:
        return ""
    return datetime.datetime.fromtimestamp(t).astimezone().isoformat(timespec="seconds")


@dataclass(frozen=True)
class Attempt:
    """One attempt of a job: when it ran, how it ended and with which error."""

    started_at: float
    ended_at: float
    outcome: str  # done | retry | wait | failed | interrupted
    error: str

    def to_dict(self) -> dict[str, Any]:
        return {"started": local_time(self.started_at), "ended": local_time(self.ended_at),
                "started_at": self.started_at, "ended_at": self.ended_at, "outcome": self.outcome,
                "error": self.error}


@dataclass(frozen=True)
class JobItem:
    """One item of a job (a SOP Instance UID for send, commit and burn)."""

    item: str
    state: str  # pending | done | warning | failed
    status: int | None  # the last DICOM status
    detail: str

    def to_dict(self) -> dict[str, Any]:
        return {"item": self.item, "state": self.state, "status": self.status, "detail": self.detail}


@dataclass(frozen=True)
class CommitTransaction:
    """A Storage Commitment request (PS3.4 J.3.2) and whether its report came (J.3.3)."""

    transaction_uid: str
    job_id: int
    node: str
    requested_at: float
    reported_at: float | None




def _job(row: Any) -> Job:
    return Job(**{k: row[k] for k in row.keys()} | {"params": json.loads(row["params"])})


def _marks(values: Sequence[Any]) -> str:
    return ",".join("?" * len(values))


class Jobs:
    """Jobs and their items in the tables `jobs` and `items`; the per-node instance state and
    commitment transactions (of the send and commit jobs)."""

    def __init__(self, conn: Connection, jobs: str = "jobs", items: str = "job_items") -> None:
        assert (jobs, items) in (("jobs", "job_items"), ("mpps_jobs", "mpps_job_items")), (jobs, items)
        self._conn = conn
        self._jobs = jobs
        self._items = items
        self._select = (
            "SELECT j.id, j.kind, j.node, j.state, j.params, j.parent_id, j.after_id, j.attempts, j.max_attempts, "
            "j.next_attempt_at, j.last_error, j.detail, j.created_at, j.updated_at, "
            f"(SELECT COUNT(*) FROM {items} WHERE job_id=j.id) AS total, "
            f"(SELECT COUNT(*) FROM {items} WHERE job_id=j.id AND state IN ('done','warning')) AS done, "
            f"(SELECT COUNT(*) FROM {items} WHERE job_id=j.id AND state='warning') AS warnings, "
            f"(SELECT COUNT(*) FROM {items} WHERE job_id=j.id AND state='failed') AS failed "
            f"FROM {jobs} j"
        )
        #: A queued job that may start: the job it comes after, if any, has ended.
        self._ready = (
            f"j.state='queued' AND (j.after_id IS NULL OR NOT EXISTS (SELECT 1 FROM {jobs} a "
            "WHERE a.id=j.after_id AND a.state NOT IN ('done','failed','cancelled')))"
        )

    # -- jobs -----------------------------------------------------------------------------------

    def add(self, kind: str, node: str, items: list[str], params: dict[str, Any], max_attempts: int,
            parent_id: int | None = None, detail: str = "", after_id: int | None = None) -> int:
        """Insert a queued job with its items; return its id."""
        now = time.time()
        with self._conn.transaction() as c:
            cur = c.execute(
                f"""INSERT INTO {self._jobs}(kind, node, state, params, parent_id, after_id, max_attempts,
                      next_attempt_at, detail, created_at, updated_at)
                    VALUES (?,?,'queued',?,?,?,?,?,?,?,?)""",
                (kind, node, json.dumps(params), parent_id, after_id, max_attempts, now, detail, now, now),
            )
            job_id = int(cur.lastrowid or 0)
            c.executemany(
                f"INSERT OR IGNORE INTO {self._items}(job_id, seq, item) VALUES (?,?,?)",
                [(job_id, i, item) for i, item in enumerate(items)],
            )
        return job_id

    def get(self, job_id: int) -> Job | None:
        row = self._conn.one(f"{self._select} WHERE id=?", (job_id,))
        return _job(row) if row is not None else None

    def latest(self, limit: int = 200, kind: str | None = None, states: tuple[str, ...] = (),
               node: str | None = None) -> list[Job]:
        """The newest `limit` jobs, newest first; only of `kind`, in `states`, to `node` if given."""
        where: list[str] = []
        args: list[Any] = []
        if kind is not None:
            where.append("kind=?")
            args.append(kind)
        if states:
            where.append(f"state IN ({_marks(states)})")
            args.extend(states)
        if node is not None:
            where.append("node=?")
            args.append(node)
        cond = f"WHERE {' AND '.join(where)} " if where else ""
        return [_job(r) for r in self._conn.query(f"{self._select} {cond}ORDER BY id DESC LIMIT ?", (*args, limit))]

    def children(self, job_id: int) -> list[int]:
        """The ids of the jobs this one queued, oldest first."""
        return [r[0] for r in self._conn.query(f"SELECT id FROM {self._jobs} WHERE parent_id=? ORDER BY id", (job_id,))]

    def requeue_running(self) -> int:
        """At start-up: a job left 'running' by a crash goes back to 'queued'; how many did."""
        cur = self._conn.execute(f"UPDATE {self._jobs} SET state='queued', updated_at=? WHERE state='running'",
                                 (time.time(),))
        return cur.rowcount

    def claim(self, busy: dict[str, int], limits: dict[str, int]) -> Job | None:
        """Mark the oldest due queued job whose node is below its limit (1 for a node without
        one) and whose `after_id` job has ended as running; return it."""
        now = time.time()
        with self._conn.transaction() as c:
            rows = c.execute(f"{self._select} WHERE {self._ready} AND next_attempt_at<=? "
                             "ORDER BY next_attempt_at, id", (now,)).fetchall()
            for r in rows:
                if busy.get(r["node"], 0) < limits.get(r["node"], 1):
                    c.execute(f"UPDATE {self._jobs} SET state='running', updated_at=? WHERE id=?", (now, r["id"]))
                    return replace(_job(r), state="running")
        return None

    def next_due(self) -> float | None:
        """When the next queued job that may start is due (None: none)."""
        row = self._conn.one(f"SELECT MIN(next_attempt_at) FROM {self._jobs} j WHERE {self._ready}")
        return row[0] if row is not None else None

    def requeue(self, job_id: int, detail: str, *, at: float | None = None, attempts: int | None = None,
                error: str | None = None, params: dict[str, Any] | None = None,
                only_if: str | None = "running") -> bool:
        """Queue the job again (due `at`, else when it was), with its attempts, last error and
        params if given. With `only_if`, only while the job is in that state; whether it changed."""
        return self._update(job_id, only_if, state="queued", detail=detail, next_attempt_at=at,
                            attempts=attempts, last_error=error, params=params)

    def end(self, job_id: int, state: str, *, detail: str | None = None, attempts: int | None = None,
            error: str | None = None, only_if: str | None = "running") -> bool:
        """Give the job its final `state` (done, failed or cancelled). With `only_if`, only while
        it is in that state (a job cancelled meanwhile is not marked done); whether it changed."""
        assert state in FINAL_STATES, state
        return self._update(job_id, only_if, state=state, detail=detail, attempts=attempts, last_error=error)

    def set_detail(self, job_id: int, detail: str, *, params: dict[str, Any] | None = None,
                   error: str | None = None, only_if: str | None = None) -> bool:
        """Say what the job does or waits for, with its params and last error if given."""
        return self._update(job_id, only_if, detail=detail, params=params, last_error=error)

    def make_due(self, job_id: int) -> bool:
        """A queued (waiting) job is due now; whether it was queued."""
        return self._update(job_id, "queued", next_attempt_at=time.time())

    def _update(self, job_id: int, only_if: str | None, **columns: Any) -> bool:
        values = {k: v for k, v in columns.items() if v is not None}
        if "params" in values:
            values["params"] = json.dumps(values["params"])
        values["updated_at"] = time.time()
        sql = f"UPDATE {self._jobs} SET {', '.join(f'{k}=?' for k in values)} WHERE id=?"
        args: list[Any] = [*values.values(), job_id]
        if only_if is not None:
            sql += " AND state=?"
            args.append(only_if)
        return self._conn.execute(sql, args).rowcount > 0

    def add_attempt(self, job_id: int, started_at: float, outcome: str, error: str = "") -> None:
        """Record an attempt of a job of the ``jobs`` table (the MPPS queue keeps none)."""
        if self._jobs == "jobs":
            self._conn.execute(
                "INSERT INTO job_attempts(job_id, started_at, ended_at, outcome, error) VALUES (?,?,?,?,?)",
                (job_id, started_at, time.time(), outcome, error),
            )

    def attempts(self, job_id: int, limit: int = 100) -> list[Attempt]:
        """The job's last `limit` attempts, oldest first."""
        if self._jobs != "jobs":
            return []
        rows = self._conn.query(
            "SELECT started_at, ended_at, outcome, error FROM job_attempts WHERE job_id=? "
            "ORDER BY started_at DESC LIMIT ?", (job_id, limit))
        return [Attempt(**r) for r in reversed(rows)]

    # -- items ----------------------------------------------------------------------------------

    def items(self, job_id: int, state: str | None = None) -> list[JobItem]:
        """The items of a job in the order they were queued; only those in `state` if given."""
        sql = f"SELECT item, state, status, detail FROM {self._items} WHERE job_id=?"
        args: tuple[Any, ...] = (job_id,)
        if state is not None:
            sql += " AND state=?"
            args = (job_id, state)
        return [JobItem(**r) for r in self._conn.query(sql + " ORDER BY seq", args)]

    def set_item(self, job_id: int, item: str, state: str, status: int | None = None, detail: str = "") -> None:
        self._conn.execute(
            f"UPDATE {self._items} SET state=?, status=?, detail=? WHERE job_id=? AND item=?",
            (state, status, detail, job_id, item),
        )

    def set_items(self, job_id: int, items: list[str], state: str, detail: str = "") -> None:
        """Set the state of many items of a job in one transaction (a disc of a burn)."""
        with self._conn.transaction() as c:
            c.executemany(
                f"UPDATE {self._items} SET state=?, status=NULL, detail=? WHERE job_id=? AND item=?",
                [(state, detail, job_id, item) for item in items],
            )

    def reset_items(self, job_id: int, states: tuple[str, ...] = ("failed",)) -> None:
        """Items in `states` become pending again (a retry sends them once more)."""
        self._conn.execute(
            f"UPDATE {self._items} SET state='pending', status=NULL, detail='' "
            f"WHERE job_id=? AND state IN ({_marks(states)})",
            (job_id, *states),
        )

    # -- per-node instance state ----------------------------------------------------------------

    def mark_sent(self, job_id: int, node: str, uid: str, state: str, status: int, detail: str = "") -> None:
        """One C-STORE succeeded: the job item and the node's sent state, in one transaction.

        Not durable (synchronous=NORMAL): the row survives a crash of the process; a power cut
        may lose the last marks, which only means a resend (C-STORE is idempotent by SOP
        Instance UID), and it saves one fsync per instance.
        """
        with self._conn.transaction(durable=False) as c:
            c.execute(
                f"UPDATE {self._items} SET state=?, status=?, detail=? WHERE job_id=? AND item=?",
                (state, status, detail, job_id, uid),
            )
            c.execute(
                """INSERT INTO node_instances(node, sop_instance_uid, sent_at, committed_at)
                   VALUES (?,?,?,NULL)
                   ON CONFLICT(node, sop_instance_uid)
                   DO UPDATE SET sent_at=excluded.sent_at, committed_at=NULL""",
                (node, uid, time.time()),
            )

    def mark_committed(self, node: str, uids: list[str]) -> None:
        now = time.time()
        with self._conn.transaction() as c:
            c.executemany(
                """INSERT INTO node_instances(node, sop_instance_uid, sent_at, committed_at)
                   VALUES (?,?,NULL,?)
                   ON CONFLICT(node, sop_instance_uid) DO UPDATE SET committed_at=excluded.committed_at""",
                [(node, u, now) for u in uids],
            )

    def committed(self, node: str, uids: list[str]) -> set[str]:
        """Those of `uids` that `node` has committed."""
        out: set[str] = set()
        for i in range(0, len(uids), 500):
            chunk = uids[i : i + 500]
            out |= {
                r[0]
                for r in self._conn.query(
                    f"SELECT sop_instance_uid FROM node_instances WHERE node=? AND "
                    f"committed_at IS NOT NULL AND sop_instance_uid IN ({_marks(chunk)})",
                    (node, *chunk),
                )
            }
        return out

    def node_counts(self) -> dict[str, dict[str, dict[str, int]]]:
        """{study_uid: {node: {"sent": n, "committed": m}}} from the per-node instance state."""
        rows = self._conn.query(
            """SELECT se.study_uid, n.node, COUNT(n.sent_at) AS sent, COUNT(n.committed_at) AS committed
               FROM node_instances n JOIN instances i USING(sop_instance_uid)
               JOIN series se USING(series_uid) GROUP BY se.study_uid, n.node"""
        )
        out: dict[str, dict[str, dict[str, int]]] = {}
        for r in rows:
            out.setdefault(r["study_uid"], {})[r["node"]] = {"sent": r["sent"], "committed": r["committed"]}
        return out

    # -- Storage Commitment transactions --------------------------------------------------------

    def add_transaction(self, transaction_uid: str, job_id: int, node: str) -> None:
        self._conn.execute(
            "INSERT INTO commit_transactions(transaction_uid, job_id, node, requested_at) VALUES (?,?,?,?)",
            (transaction_uid, job_id, node, time.time()),
        )

    def transaction(self, transaction_uid: str) -> CommitTransaction | None:
        row = self._conn.one(
            "SELECT transaction_uid, job_id, node, requested_at, reported_at FROM commit_transactions "
            "WHERE transaction_uid=?",
            (transaction_uid,),
        )
        return CommitTransaction(**row) if row is not None else None

    def transaction_reported(self, transaction_uid: str) -> None:
        self._conn.execute(
            "UPDATE commit_transactions SET reported_at=? WHERE transaction_uid=?", (time.time(), transaction_uid)
        )
