"""The SQLite database: the one module that knows the schema.

Everything the service persists lives in one SQLite file in WAL mode: the archive index at
patient / study / series / instance level (the keys Query/Retrieve needs, PS3.4 C.6), alerts for
the operator, and the job queue. Other modules call the functions here and never write SQL.

Job kinds share the version 2 ``jobs``/``job_items`` tables: ``send`` and ``commit`` (node = a
configured node, items = SOP Instance UIDs) and ``burn`` (node = ``drive:DEV`` or ``iso:PATH``,
items = the SOP Instance UIDs to write, params = the burn's options and its discs).

Writes are serialised by a lock: SQLite allows one writer at a time and the service has several
threads (one per association, the IPC server, workers).
"""

from __future__ import annotations

import json
import sqlite3
import threading
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

_SCHEMA = [
    # version 1
    """
    CREATE TABLE patients (
        pk INTEGER PRIMARY KEY,
        patient_key TEXT NOT NULL UNIQUE,       -- Patient ID, or the name when the ID is empty
        patient_id TEXT NOT NULL,
        patient_name TEXT NOT NULL,
        birth_date TEXT NOT NULL,
        sex TEXT NOT NULL
    );
    CREATE INDEX patients_name ON patients(patient_name);
    CREATE TABLE studies (
        study_uid TEXT PRIMARY KEY,
        patient_pk INTEGER NOT NULL REFERENCES patients(pk),
        study_date TEXT NOT NULL,
        study_time TEXT NOT NULL,
        accession TEXT NOT NULL,
        study_id TEXT NOT NULL,
        description TEXT NOT NULL,
        referring_physician TEXT NOT NULL,
        charset TEXT NOT NULL
    );
    CREATE INDEX studies_patient ON studies(patient_pk);
    CREATE INDEX studies_date ON studies(study_date);
    CREATE INDEX studies_accession ON studies(accession);
    CREATE TABLE series (
        series_uid TEXT PRIMARY KEY,
        study_uid TEXT NOT NULL REFERENCES studies(study_uid),
        modality TEXT NOT NULL,
        series_number TEXT NOT NULL,
        description TEXT NOT NULL,
        body_part TEXT NOT NULL
    );
    CREATE INDEX series_study ON series(study_uid);
    CREATE TABLE instances (
        sop_instance_uid TEXT PRIMARY KEY,
        series_uid TEXT NOT NULL REFERENCES series(series_uid),
        sop_class_uid TEXT NOT NULL,
        instance_number TEXT NOT NULL,
        transfer_syntax TEXT NOT NULL,
        size INTEGER NOT NULL,
        path TEXT NOT NULL,                     -- relative to the archive folder
        source_ae TEXT NOT NULL,
        received_at REAL NOT NULL
    );
    CREATE INDEX instances_series ON instances(series_uid);
    CREATE TABLE alerts (
        id INTEGER PRIMARY KEY,
        time REAL NOT NULL,
        level TEXT NOT NULL,                    -- warning | error
        code TEXT NOT NULL,                     -- e.g. disk-full
        message TEXT NOT NULL,
        cleared INTEGER NOT NULL DEFAULT 0
    );
    """,
    # version 2: the job queue (DESIGN.md "Jobs"), per-node sent/committed state, Storage
    # Commitment transactions (PS3.4 J.3)
    """
    CREATE TABLE jobs (
        id INTEGER PRIMARY KEY,
        kind TEXT NOT NULL,                     -- send | commit (later: mpps, burn, retrieve)
        node TEXT NOT NULL,                     -- destination node name ('' if none)
        state TEXT NOT NULL,                    -- queued | running | done | failed | cancelled
        params TEXT NOT NULL DEFAULT '{}',      -- JSON, the kind's own parameters
        parent_id INTEGER REFERENCES jobs(id),  -- the job that queued this one
        attempts INTEGER NOT NULL DEFAULT 0,
        max_attempts INTEGER NOT NULL DEFAULT 1,
        next_attempt_at REAL NOT NULL,
        last_error TEXT NOT NULL DEFAULT '',
        detail TEXT NOT NULL DEFAULT '',        -- what the job does or waits for, in words
        created_at REAL NOT NULL,
        updated_at REAL NOT NULL
    );
    CREATE INDEX jobs_state ON jobs(state, next_attempt_at);
    CREATE INDEX jobs_parent ON jobs(parent_id);
    CREATE TABLE job_items (
        job_id INTEGER NOT NULL REFERENCES jobs(id),
        seq INTEGER NOT NULL,
        item TEXT NOT NULL,                     -- a SOP Instance UID for send and commit
        state TEXT NOT NULL DEFAULT 'pending',  -- pending | done | warning | failed
        status INTEGER,                         -- the last DICOM status
        detail TEXT NOT NULL DEFAULT '',
        PRIMARY KEY (job_id, item)
    );
    CREATE TABLE node_instances (
        node TEXT NOT NULL,
        sop_instance_uid TEXT NOT NULL,
        sent_at REAL,
        committed_at REAL,
        PRIMARY KEY (node, sop_instance_uid)
    );
    CREATE INDEX node_instances_uid ON node_instances(sop_instance_uid);
    CREATE TABLE commit_transactions (
        transaction_uid TEXT PRIMARY KEY,
        job_id INTEGER NOT NULL REFERENCES jobs(id),
        node TEXT NOT NULL,
        requested_at REAL NOT NULL,
        reported_at REAL
    );
    """,
    # version 3: worklist items, exams and the MPPS outbox (issue 4)
    """
    CREATE TABLE worklist_items (
        sps_id TEXT PRIMARY KEY,                -- Scheduled Procedure Step ID (0040,0009)
        node TEXT NOT NULL,
        item_json TEXT NOT NULL,                -- the item in the DICOM JSON model
        fetched_at REAL NOT NULL
    );
    CREATE TABLE exams (
        id INTEGER PRIMARY KEY,
        state TEXT NOT NULL,                    -- IN PROGRESS | COMPLETED | DISCONTINUED
        sps_id TEXT NOT NULL,                   -- '' for an unscheduled exam
        item_json TEXT NOT NULL,                -- worklist item or local patient data (JSON model)
        study_uid TEXT NOT NULL,
        study_id TEXT NOT NULL,
        pps_id TEXT NOT NULL,
        mpps_node TEXT NOT NULL,                -- '' when no MPPS node is configured
        mpps_uid TEXT NOT NULL,                 -- '' until known (SCP-assigned UIDs)
        started_at REAL NOT NULL,
        ended_at REAL,
        reason TEXT NOT NULL DEFAULT ''
    );
    CREATE TABLE exam_objects (
        sop_instance_uid TEXT PRIMARY KEY,
        exam_id INTEGER NOT NULL REFERENCES exams(id),
        sop_class_uid TEXT NOT NULL,
        series_uid TEXT NOT NULL,
        series_description TEXT NOT NULL,
        protocol_name TEXT NOT NULL,
        operator TEXT NOT NULL,
        performing_physician TEXT NOT NULL,
        is_image INTEGER NOT NULL,
        added_at REAL NOT NULL
    );
    CREATE INDEX exam_objects_exam ON exam_objects(exam_id);
    CREATE TABLE mpps_outbox (
        id INTEGER PRIMARY KEY,                 -- the order messages are sent in
        exam_id INTEGER NOT NULL REFERENCES exams(id),
        kind TEXT NOT NULL,                     -- create | set
        node TEXT NOT NULL,
        dataset_json TEXT NOT NULL,
        state TEXT NOT NULL,                    -- queued | sent | failed
        attempts INTEGER NOT NULL DEFAULT 0,
        next_attempt REAL NOT NULL,
        last_error TEXT NOT NULL DEFAULT '',
        created_at REAL NOT NULL,
        sent_at REAL
    );
    CREATE INDEX mpps_outbox_state ON mpps_outbox(state, id);
    """,
    # version 4: auto-send rules "series" and "exam" (REQUIREMENTS D2, issue 5)
    """
    CREATE TABLE exam_series (
        exam_id INTEGER NOT NULL REFERENCES exams(id),
        series_uid TEXT NOT NULL,
        completed_at REAL NOT NULL,             -- declared complete, or completed by the exam end
        queued_at REAL,                         -- rule "series" applied (NULL: still to do)
        PRIMARY KEY (exam_id, series_uid)
    );
    ALTER TABLE exams ADD COLUMN auto_queued_at REAL;  -- rule "exam" applied (NULL: still to do)
    UPDATE exams SET auto_queued_at = ended_at WHERE ended_at IS NOT NULL;
    """,
]


@dataclass
class InstanceRecord:
    """The index row of one archived instance, with its patient, study and series keys."""

    sop_instance_uid: str
    sop_class_uid: str
    series_uid: str
    study_uid: str
    transfer_syntax: str
    path: str
    size: int
    patient_id: str = ""
    patient_name: str = ""
    birth_date: str = ""
    sex: str = ""
    study_date: str = ""
    study_time: str = ""
    accession: str = ""
    study_id: str = ""
    study_description: str = ""
    referring_physician: str = ""
    charset: str = ""
    modality: str = ""
    series_number: str = ""
    series_description: str = ""
    body_part: str = ""
    instance_number: str = ""
    source_ae: str = ""
    received_at: float = field(default_factory=time.time)


class Database:
    """One SQLite connection shared by the service's threads, writes under a lock."""

    def __init__(self, path: Path | str) -> None:
        self.path = str(path)
        self._lock = threading.RLock()
        self._conn = sqlite3.connect(self.path, check_same_thread=False, isolation_level=None)
        self._conn.row_factory = sqlite3.Row
        self._conn.execute("PRAGMA journal_mode=WAL")
        # FULL: a committed index row survives a power cut (the file was fsynced before).
        self._conn.execute("PRAGMA synchronous=FULL")
        self._conn.execute("PRAGMA foreign_keys=ON")
        self._conn.execute("PRAGMA busy_timeout=10000")
        self._migrate()

    def _migrate(self) -> None:
        with self._lock:
            version = self._conn.execute("PRAGMA user_version").fetchone()[0]
            for number, script in enumerate(_SCHEMA[version:], start=version + 1):
                self._conn.executescript(f"BEGIN; {script}; PRAGMA user_version={number}; COMMIT;")

    def close(self) -> None:
        with self._lock:
            self._conn.close()

    def _query(self, sql: str, args: tuple = ()) -> list[sqlite3.Row]:
        with self._lock:
            return self._conn.execute(sql, args).fetchall()

    # -- archive index --------------------------------------------------------------------------

    def index_instance(self, rec: InstanceRecord, flush: bool = True) -> str | None:
        """Insert or replace the row of `rec`; return the previous relative path, if any.

        Re-storing an existing SOP Instance UID replaces its row (never a second row); a study or
        series that no longer has any instance afterwards is removed. ``flush=False`` commits
        with synchronous=NORMAL (survives a process crash, not a power cut): for rows that
        `Archive.reconcile` rebuilds from their files.
        """
        r = asdict(rec)
        key = rec.patient_id or f"name:{rec.patient_name}"
        with self._lock:
            c = self._conn
            if not flush:
                c.execute("PRAGMA synchronous=NORMAL")
            c.execute("BEGIN IMMEDIATE")
            try:
                old = c.execute(
                    "SELECT path, series_uid FROM instances WHERE sop_instance_uid=?",
                    (rec.sop_instance_uid,),
                ).fetchone()
                c.execute(
                    """INSERT INTO patients(patient_key, patient_id, patient_name, birth_date, sex)
                       VALUES (?,?,?,?,?)
                       ON CONFLICT(patient_key) DO UPDATE SET patient_name=excluded.patient_name,
                         birth_date=excluded.birth_date, sex=excluded.sex""",
                    (key, rec.patient_id, rec.patient_name, rec.birth_date, rec.sex),
                )
                pk = c.execute("SELECT pk FROM patients WHERE patient_key=?", (key,)).fetchone()[0]
                c.execute(
                    """INSERT INTO studies(study_uid, patient_pk, study_date, study_time, accession,
                         study_id, description, referring_physician, charset)
                       VALUES (:study_uid, :pk, :study_date, :study_time, :accession, :study_id,
                         :study_description, :referring_physician, :charset)
                       ON CONFLICT(study_uid) DO UPDATE SET patient_pk=excluded.patient_pk""",
                    r | {"pk": pk},
                )
                c.execute(
                    """INSERT INTO series(series_uid, study_uid, modality, series_number,
                         description, body_part)
                       VALUES (:series_uid, :study_uid, :modality, :series_number,
                         :series_description, :body_part)
                       ON CONFLICT(series_uid) DO UPDATE SET study_uid=excluded.study_uid""",
                    r,
                )
                c.execute(
                    """INSERT OR REPLACE INTO instances(sop_instance_uid, series_uid, sop_class_uid,
                         instance_number, transfer_syntax, size, path, source_ae, received_at)
                       VALUES (:sop_instance_uid, :series_uid, :sop_class_uid, :instance_number,
                         :transfer_syntax, :size, :path, :source_ae, :received_at)""",
                    r,
                )
                if old is not None and old["series_uid"] != rec.series_uid:
                    self._drop_empty(old["series_uid"])
                c.execute("COMMIT")
            except BaseException:
                c.execute("ROLLBACK")
                raise
            finally:
                if not flush:
                    c.execute("PRAGMA synchronous=FULL")
        return old["path"] if old is not None else None

    def _drop_empty(self, series_uid: str) -> None:
        c = self._conn
        row = c.execute("SELECT study_uid FROM series WHERE series_uid=?", (series_uid,)).fetchone()
        if row is None:
            return
        c.execute(
            "DELETE FROM series WHERE series_uid=? AND NOT EXISTS "
            "(SELECT 1 FROM instances WHERE series_uid=?)",
            (series_uid, series_uid),
        )
        c.execute(
            "DELETE FROM studies WHERE study_uid=? AND NOT EXISTS "
            "(SELECT 1 FROM series WHERE study_uid=?)",
            (row["study_uid"], row["study_uid"]),
        )

    def instance(self, sop_instance_uid: str) -> dict[str, Any] | None:
        rows = self._query(
            "SELECT * FROM instances WHERE sop_instance_uid=?", (sop_instance_uid,)
        )
        return dict(rows[0]) if rows else None

    def instance_paths(self) -> set[str]:
        """Every indexed relative path (for reconciling the archive with the index)."""
        return {r[0] for r in self._query("SELECT path FROM instances")}

    def studies(self) -> list[dict[str, Any]]:
        """One dict per study with its patient and counts (the CLI's `studies`)."""
        rows = self._query(
            """SELECT s.study_uid, p.patient_id, p.patient_name, p.birth_date, p.sex,
                      s.study_date, s.study_time, s.accession, s.study_id, s.description,
                      (SELECT COUNT(*) FROM series se WHERE se.study_uid=s.study_uid) AS series,
                      (SELECT COUNT(*) FROM instances i JOIN series se USING(series_uid)
                         WHERE se.study_uid=s.study_uid) AS instances,
                      (SELECT GROUP_CONCAT(DISTINCT se.modality) FROM series se
                         WHERE se.study_uid=s.study_uid) AS modalities
               FROM studies s JOIN patients p ON p.pk=s.patient_pk
               ORDER BY s.study_date, s.study_time, s.study_uid"""
        )
        return [dict(r) for r in rows]

    def study_node_counts(self) -> dict[str, dict[str, dict[str, int]]]:
        """{study_uid: {node: {"sent": n, "committed": m}}} from the per-node instance state."""
        rows = self._query(
            """SELECT se.study_uid, n.node, COUNT(n.sent_at) AS sent,
                      COUNT(n.committed_at) AS committed
               FROM node_instances n JOIN instances i USING(sop_instance_uid)
               JOIN series se USING(series_uid) GROUP BY se.study_uid, n.node"""
        )
        out: dict[str, dict[str, dict[str, int]]] = {}
        for r in rows:
            out.setdefault(r["study_uid"], {})[r["node"]] = {
                "sent": r["sent"], "committed": r["committed"]
            }
        return out

    def series_instance_uids(self, series_uid: str) -> list[str]:
        rows = self._query(
            "SELECT sop_instance_uid FROM instances WHERE series_uid=? "
            "ORDER BY CAST(instance_number AS INTEGER)",
            (series_uid,),
        )
        return [r[0] for r in rows]

    def study_instances(self, study_uid: str) -> list[dict[str, Any]]:
        rows = self._query(
            """SELECT i.*, se.study_uid FROM instances i JOIN series se USING(series_uid)
               WHERE se.study_uid=? ORDER BY se.series_number, CAST(i.instance_number AS INTEGER)""",
            (study_uid,),
        )
        return [dict(r) for r in rows]

    # -- alerts ---------------------------------------------------------------------------------

    def add_alert(self, level: str, code: str, message: str) -> int:
        with self._lock:
            cur = self._conn.execute(
                "INSERT INTO alerts(time, level, code, message) VALUES (?,?,?,?)",
                (time.time(), level, code, message),
            )
            return int(cur.lastrowid)

    def alerts(self, limit: int = 50, include_cleared: bool = False) -> list[dict[str, Any]]:
        where = "" if include_cleared else "WHERE cleared=0"
        rows = self._query(f"SELECT * FROM alerts {where} ORDER BY id DESC LIMIT ?", (limit,))
        return [dict(r) for r in rows]

    def clear_alerts(self, code: str | None = None) -> None:
        with self._lock:
            if code is None:
                self._conn.execute("UPDATE alerts SET cleared=1")
            else:
                self._conn.execute("UPDATE alerts SET cleared=1 WHERE code=?", (code,))


    # -- jobs -----------------------------------------------------------------------------------

    def add_job(
        self,
        kind: str,
        node: str,
        items: list[str],
        params: dict[str, Any],
        max_attempts: int,
        parent_id: int | None = None,
        detail: str = "",
    ) -> int:
        """Insert a queued job with its items; return its id."""
        now = time.time()
        with self._lock:
            c = self._conn
            c.execute("BEGIN IMMEDIATE")
            try:
                cur = c.execute(
                    """INSERT INTO jobs(kind, node, state, params, parent_id, max_attempts,
                         next_attempt_at, detail, created_at, updated_at)
                       VALUES (?,?,'queued',?,?,?,?,?,?,?)""",
                    (kind, node, json.dumps(params), parent_id, max_attempts, now, detail, now, now),
                )
                job_id = int(cur.lastrowid)
                c.executemany(
                    "INSERT OR IGNORE INTO job_items(job_id, seq, item) VALUES (?,?,?)",
                    [(job_id, i, item) for i, item in enumerate(items)],
                )
                c.execute("COMMIT")
            except BaseException:
                c.execute("ROLLBACK")
                raise
        return job_id

    def job(self, job_id: int) -> dict[str, Any] | None:
        rows = self._query(
            f"SELECT {_JOB_COLUMNS} FROM jobs j WHERE id=?", (job_id,)
        )
        return _job_dict(rows[0]) if rows else None

    def jobs(self, limit: int = 200, kind: str | None = None, states: tuple[str, ...] = (),
             node: str | None = None) -> list[dict[str, Any]]:
        """The newest `limit` jobs, newest first; only of `kind`, in `states`, to `node` if given."""
        where, args = [], []
        if kind is not None:
            where.append("kind=?")
            args.append(kind)
        if states:
            where.append(f"state IN ({','.join('?' * len(states))})")
            args.extend(states)
        if node is not None:
            where.append("node=?")
            args.append(node)
        cond = f"WHERE {' AND '.join(where)} " if where else ""
        rows = self._query(f"SELECT {_JOB_COLUMNS} FROM jobs j {cond}ORDER BY id DESC LIMIT ?", (*args, limit))
        return [_job_dict(r) for r in rows]

    def child_jobs(self, job_id: int) -> list[int]:
        return [r[0] for r in self._query("SELECT id FROM jobs WHERE parent_id=? ORDER BY id", (job_id,))]

    def requeue_running_jobs(self) -> int:
        """At start-up: a job left 'running' by a crash goes back to 'queued'."""
        with self._lock:
            cur = self._conn.execute(
                "UPDATE jobs SET state='queued', updated_at=? WHERE state='running'", (time.time(),)
            )
            return cur.rowcount

    def claim_job(self, busy: dict[str, int], limits: dict[str, int]) -> dict[str, Any] | None:
        """Mark the oldest due queued job whose node is below its limit as running; return it."""
        now = time.time()
        with self._lock:
            rows = self._conn.execute(
                f"SELECT {_JOB_COLUMNS} FROM jobs j WHERE state='queued' AND next_attempt_at<=? "
                "ORDER BY next_attempt_at, id",
                (now,),
            ).fetchall()
            for r in rows:
                if busy.get(r["node"], 0) < limits.get(r["node"], 1):
                    self._conn.execute(
                        "UPDATE jobs SET state='running', updated_at=? WHERE id=? AND state='queued'",
                        (now, r["id"]),
                    )
                    job = _job_dict(r)
                    job["state"] = "running"
                    return job
        return None

    def next_due(self) -> float | None:
        rows = self._query("SELECT MIN(next_attempt_at) FROM jobs WHERE state='queued'")
        return rows[0][0] if rows else None

    def update_job(self, job_id: int, *, only_if: str | None = None, **fields: Any) -> bool:
        """Set columns of a job (state, attempts, next_attempt_at, last_error, detail, params).

        With `only_if`, the row changes only while its state is that one (so that a job
        cancelled meanwhile is not marked done); return whether it changed.
        """
        if "params" in fields:
            fields["params"] = json.dumps(fields["params"])
        fields["updated_at"] = time.time()
        sets = ", ".join(f"{k}=?" for k in fields)
        sql = f"UPDATE jobs SET {sets} WHERE id=?"
        args: list[Any] = [*fields.values(), job_id]
        if only_if is not None:
            sql += " AND state=?"
            args.append(only_if)
        with self._lock:
            return self._conn.execute(sql, args).rowcount > 0

    def job_items(self, job_id: int, state: str | None = None) -> list[dict[str, Any]]:
        sql = "SELECT item, state, status, detail FROM job_items WHERE job_id=?"
        args: tuple = (job_id,)
        if state is not None:
            sql += " AND state=?"
            args = (job_id, state)
        return [dict(r) for r in self._query(sql + " ORDER BY seq", args)]

    def set_item(self, job_id: int, item: str, state: str, status: int | None = None, detail: str = "") -> None:
        with self._lock:
            self._conn.execute(
                "UPDATE job_items SET state=?, status=?, detail=? WHERE job_id=? AND item=?",
                (state, status, detail, job_id, item),
            )

    def set_items(self, job_id: int, items: list[str], state: str, detail: str = "") -> None:
        """Set the state of many items of a job in one transaction (a disc of a burn)."""
        self._execute_many(
            "UPDATE job_items SET state=?, status=NULL, detail=? WHERE job_id=? AND item=?",
            [(state, detail, job_id, item) for item in items],
        )

    def _execute_many(self, sql: str, rows: list[tuple[Any, ...]]) -> None:
        """Run `sql` for every row in one write transaction (all rows or none)."""
        with self._lock:
            self._conn.execute("BEGIN IMMEDIATE")
            try:
                self._conn.executemany(sql, rows)
                self._conn.execute("COMMIT")
            except BaseException:
                self._conn.execute("ROLLBACK")
                raise

    def reset_items(self, job_id: int, states: tuple[str, ...] = ("failed",)) -> None:
        marks = ",".join("?" * len(states))
        with self._lock:
            self._conn.execute(
                f"UPDATE job_items SET state='pending', status=NULL, detail='' "
                f"WHERE job_id=? AND state IN ({marks})",
                (job_id, *states),
            )

    # -- per-node instance state and Storage Commitment transactions --------------------------

    def mark_sent(self, job_id: int, node: str, uid: str, state: str, status: int, detail: str = "") -> None:
        """One C-STORE succeeded: the job item and the node's sent state, in one transaction.

        Written with synchronous=NORMAL: in WAL mode the row survives a crash of the process
        (SIGKILL); a power cut may lose the last marks, which only means a resend (C-STORE is
        idempotent by SOP Instance UID), and saves one fsync per instance.
        """
        now = time.time()
        with self._lock:
            c = self._conn
            c.execute("PRAGMA synchronous=NORMAL")
            c.execute("BEGIN IMMEDIATE")
            try:
                c.execute(
                    "UPDATE job_items SET state=?, status=?, detail=? WHERE job_id=? AND item=?",
                    (state, status, detail, job_id, uid),
                )
                c.execute(
                    """INSERT INTO node_instances(node, sop_instance_uid, sent_at, committed_at)
                       VALUES (?,?,?,NULL)
                       ON CONFLICT(node, sop_instance_uid)
                       DO UPDATE SET sent_at=excluded.sent_at, committed_at=NULL""",
                    (node, uid, now),
                )
                c.execute("COMMIT")
            except BaseException:
                c.execute("ROLLBACK")
                raise
            finally:
                c.execute("PRAGMA synchronous=FULL")

    def mark_committed(self, node: str, uids: list[str]) -> None:
        now = time.time()
        with self._lock:
            self._conn.executemany(
                """INSERT INTO node_instances(node, sop_instance_uid, sent_at, committed_at)
                   VALUES (?,?,NULL,?)
                   ON CONFLICT(node, sop_instance_uid) DO UPDATE SET committed_at=excluded.committed_at""",
                [(node, u, now) for u in uids],
            )

    def committed(self, node: str, uids: list[str]) -> set[str]:
        out: set[str] = set()
        for i in range(0, len(uids), 500):
            chunk = uids[i : i + 500]
            marks = ",".join("?" * len(chunk))
            out |= {
                r[0]
                for r in self._query(
                    f"SELECT sop_instance_uid FROM node_instances WHERE node=? AND "
                    f"committed_at IS NOT NULL AND sop_instance_uid IN ({marks})",
                    (node, *chunk),
                )
            }
        return out

    def add_transaction(self, transaction_uid: str, job_id: int, node: str) -> None:
        with self._lock:
            self._conn.execute(
                "INSERT INTO commit_transactions(transaction_uid, job_id, node, requested_at) VALUES (?,?,?,?)",
                (transaction_uid, job_id, node, time.time()),
            )

    def transaction(self, transaction_uid: str) -> dict[str, Any] | None:
        rows = self._query("SELECT * FROM commit_transactions WHERE transaction_uid=?", (transaction_uid,))
        return dict(rows[0]) if rows else None

    def transaction_reported(self, transaction_uid: str) -> None:
        with self._lock:
            self._conn.execute(
                "UPDATE commit_transactions SET reported_at=? WHERE transaction_uid=?",
                (time.time(), transaction_uid),
            )



    # -- worklist, exams, MPPS outbox -------------------------------------------------------------

    def save_worklist_items(self, node: str, items: list[tuple[str, str]]) -> None:
        """Keep the items of the last query by SPS ID (an item seen again is replaced)."""
        now = time.time()
        with self._lock:
            c = self._conn
            c.execute("BEGIN IMMEDIATE")
            try:
                c.executemany(
                    "INSERT OR REPLACE INTO worklist_items(sps_id, node, item_json, fetched_at) VALUES (?,?,?,?)",
                    [(sps, node, js, now) for sps, js in items],
                )
                c.execute("COMMIT")
            except BaseException:
                c.execute("ROLLBACK")
                raise

    def worklist_item(self, sps_id: str) -> dict[str, Any] | None:
        rows = self._query("SELECT * FROM worklist_items WHERE sps_id=?", (sps_id,))
        return dict(rows[0]) if rows else None

    def create_exam(self, **fields: Any) -> int:
        cols = ", ".join(fields)
        marks = ", ".join("?" for _ in fields)
        with self._lock:
            cur = self._conn.execute(f"INSERT INTO exams({cols}) VALUES ({marks})", tuple(fields.values()))
            return int(cur.lastrowid)

    _EXAM_FIELDS = {"state", "mpps_uid", "ended_at", "reason", "auto_queued_at"}

    def update_exam(self, exam_id: int, **fields: Any) -> None:
        assert set(fields) <= self._EXAM_FIELDS, fields
        sets = ", ".join(f"{k}=?" for k in fields)
        with self._lock:
            self._conn.execute(f"UPDATE exams SET {sets} WHERE id=?", (*fields.values(), exam_id))

    def exam(self, exam_id: int) -> dict[str, Any] | None:
        rows = self._query("SELECT * FROM exams WHERE id=?", (exam_id,))
        return dict(rows[0]) if rows else None

    def exams(self, limit: int = 100) -> list[dict[str, Any]]:
        return [dict(r) for r in self._query("SELECT * FROM exams ORDER BY id DESC LIMIT ?", (limit,))]

    def add_exam_objects(self, exam_id: int, rows: list[dict[str, Any]]) -> None:
        """The rows of one exam.add_image call, in one transaction."""
        if not rows:
            return
        now = time.time()
        cols = ["exam_id", "added_at", *rows[0]]
        self._execute_many(
            f"INSERT OR REPLACE INTO exam_objects({', '.join(cols)}) VALUES ({', '.join('?' for _ in cols)})",
            [(exam_id, now, *row.values()) for row in rows],
        )

    def exam_objects(self, exam_id: int) -> list[dict[str, Any]]:
        rows = self._query("SELECT * FROM exam_objects WHERE exam_id=? ORDER BY added_at, rowid", (exam_id,))
        return [dict(r) for r in rows]

    def exam_series(self, exam_id: int) -> list[dict[str, Any]]:
        """The series of an exam in acquisition order: series_uid, instances, completed_at, queued_at."""
        rows = self._query(
            """SELECT o.series_uid, COUNT(*) AS instances, MIN(o.added_at) AS first_added,
                      s.completed_at, s.queued_at
               FROM exam_objects o LEFT JOIN exam_series s
                    ON s.exam_id = o.exam_id AND s.series_uid = o.series_uid
               WHERE o.exam_id=? GROUP BY o.series_uid ORDER BY first_added, o.series_uid""",
            (exam_id,),
        )
        return [{k: r[k] for k in ("series_uid", "instances", "completed_at", "queued_at")} for r in rows]

    def complete_series(self, exam_id: int, series_uid: str) -> bool:
        """Mark a series of an exam complete; False when it already was."""
        with self._lock:
            cur = self._conn.execute(
                "INSERT OR IGNORE INTO exam_series(exam_id, series_uid, completed_at) VALUES (?,?,?)",
                (exam_id, series_uid, time.time()),
            )
            return cur.rowcount == 1

    def series_queued(self, exam_id: int, series_uid: str) -> None:
        with self._lock:
            self._conn.execute(
                "UPDATE exam_series SET queued_at=? WHERE exam_id=? AND series_uid=?",
                (time.time(), exam_id, series_uid),
            )

    def auto_send_due(self) -> tuple[list[tuple[int, str]], list[int]]:
        """What an earlier run left undone: completed series not yet queued by the rule
        "series" as (exam_id, series_uid), and ended exams not yet queued by the rule "exam"."""
        series = [
            (r["exam_id"], r["series_uid"])
            for r in self._query(
                "SELECT exam_id, series_uid FROM exam_series WHERE queued_at IS NULL ORDER BY completed_at"
            )
        ]
        exams = [
            r["id"]
            for r in self._query("SELECT id FROM exams WHERE ended_at IS NOT NULL AND auto_queued_at IS NULL ORDER BY id")
        ]
        return series, exams

    def outbox_add(self, exam_id: int, kind: str, node: str, dataset_json: str) -> int:
        now = time.time()
        with self._lock:
            cur = self._conn.execute(
                """INSERT INTO mpps_outbox(exam_id, kind, node, dataset_json, state, next_attempt, created_at)
                   VALUES (?,?,?,?, 'queued', ?, ?)""",
                (exam_id, kind, node, dataset_json, now, now),
            )
            return int(cur.lastrowid)

    def outbox_head(self) -> dict[str, Any] | None:
        """The oldest queued message: messages leave in the order they were queued."""
        rows = self._query("SELECT * FROM mpps_outbox WHERE state='queued' ORDER BY id LIMIT 1")
        return dict(rows[0]) if rows else None

    def outbox_update(self, row_id: int, **fields: Any) -> None:
        assert set(fields) <= {"state", "attempts", "next_attempt", "last_error", "sent_at"}, fields
        sets = ", ".join(f"{k}=?" for k in fields)
        with self._lock:
            self._conn.execute(f"UPDATE mpps_outbox SET {sets} WHERE id=?", (*fields.values(), row_id))

    def outbox_fail_exam(self, exam_id: int, error: str) -> None:
        """Give up the queued messages of an exam whose N-CREATE was refused."""
        with self._lock:
            self._conn.execute(
                "UPDATE mpps_outbox SET state='failed', last_error=? WHERE exam_id=? AND state='queued'",
                (error, exam_id),
            )

    def outbox(self, exam_id: int | None = None) -> list[dict[str, Any]]:
        if exam_id is None:
            rows = self._query("SELECT * FROM mpps_outbox ORDER BY id")
        else:
            rows = self._query("SELECT * FROM mpps_outbox WHERE exam_id=? ORDER BY id", (exam_id,))
        return [{k: r[k] for k in r.keys() if k != "dataset_json"} for r in rows]


_JOB_COLUMNS = (
    "j.*, (SELECT COUNT(*) FROM job_items WHERE job_id=j.id) AS total, "
    "(SELECT COUNT(*) FROM job_items WHERE job_id=j.id AND state IN ('done','warning')) AS done, "
    "(SELECT COUNT(*) FROM job_items WHERE job_id=j.id AND state='warning') AS warnings, "
    "(SELECT COUNT(*) FROM job_items WHERE job_id=j.id AND state='failed') AS failed"
)


def _job_dict(row: sqlite3.Row) -> dict[str, Any]:
    d = dict(row)
    d["params"] = json.loads(d["params"])
    return d
