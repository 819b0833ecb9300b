"""Exams: the kept worklist items, exams with their objects and series.

An exam is one Performed Procedure Step (PS3.4 Annex F): started from a worklist item (PS3.4
Annex K) or unscheduled, its acquired objects listed for the final N-SET (PS3.3 C.4.14), its
series marked complete for the auto-send rules (docs/design.md "Exams, MPPS and auto-send").
Its MPPS messages are jobs (`modality_link.mpps_outbox`); the exam names them.
"""

from __future__ import annotations

import time
from dataclasses import astuple, dataclass, fields

from modality_link.db.connection import Connection


@dataclass(frozen=True)
class WorklistItem:
    """A worklist item of the last query, by its Scheduled Procedure Step ID (0040,0009)."""

    sps_id: str
    node: str
    item_json: str  # the item in the DICOM JSON model (PS3.18 F.2)
    fetched_at: float


@dataclass(frozen=True)
class Exam:
    id: int
    state: str  # IN PROGRESS | COMPLETED | DISCONTINUED
    sps_id: str  # '' for an unscheduled exam
    item_json: str  # worklist item or local patient data (DICOM JSON model)
    study_uid: str
    study_id: str
    pps_id: str
    mpps_node: str  # '' when no MPPS node is configured
    mpps_uid: str  # '' until known (SCP-assigned UIDs)
    started_at: float
    ended_at: float | None
    reason: str  # the discontinuation reason (CID 9300), '' otherwise
    auto_queued_at: float | None  # when the auto-send rule "exam" was applied
    mpps_create_job: int | None  # the jobs that send its MPPS N-CREATE and N-SET
    mpps_set_job: int | None


@dataclass(frozen=True)
class ExamObject:
    """An object acquired in an exam: what the MPPS N-SET lists of it (PS3.3 C.4.14)."""

    sop_instance_uid: str
    sop_class_uid: str
    series_uid: str
    series_description: str
    protocol_name: str
    operator: str
    performing_physician: str
    is_image: bool


@dataclass(frozen=True)
class ExamSeries:
    """A series of an exam, with its number of objects and its auto-send state."""

    series_uid: str
    instances: int
    completed_at: float | None  # declared complete, or completed by the exam end
    queued_at: float | None  # the auto-send rule "series" applied


def _columns(cls: type) -> str:
    return ", ".join(f.name for f in fields(cls))


_EXAM = f"SELECT {_columns(Exam)} FROM exams"


class Exams:
    def __init__(self, conn: Connection) -> None:
        self._conn = conn

    # -- the kept worklist ----------------------------------------------------------------------

    def save_worklist_items(self, node: str, items: list[tuple[str, str]]) -> None:
        """Keep the items (SPS ID, item JSON) of the last query (an item seen again is replaced)."""
        now = time.time()
        with self._conn.transaction() as c:
            c.executemany(
                "INSERT OR REPLACE INTO worklist_items(sps_id, node, item_json, fetched_at) VALUES (?,?,?,?)",
                [(sps, node, js, now) for sps, js in items],
            )

    def worklist_item(self, sps_id: str) -> WorklistItem | None:
        row = self._conn.one(f"SELECT {_columns(WorklistItem)} FROM worklist_items WHERE sps_id=?", (sps_id,))
        return WorklistItem(**row) if row is not None else None

    # -- exams ----------------------------------------------------------------------------------

    def create(self, *, state: str, sps_id: str, item_json: str, study_uid: str, study_id: str, pps_id: str,
               mpps_node: str, mpps_uid: str, started_at: float) -> int:
        """Insert a started exam; return its id."""
        cur = self._conn.execute(
            """INSERT INTO exams(state, sps_id, item_json, study_uid, study_id, pps_id, mpps_node, mpps_uid,
                 started_at) VALUES (?,?,?,?,?,?,?,?,?)""",
            (state, sps_id, item_json, study_uid, study_id, pps_id, mpps_node, mpps_uid, started_at),
        )
        return int(cur.lastrowid or 0)

    def get(self, exam_id: int) -> Exam | None:
        row = self._conn.one(f"{_EXAM} WHERE id=?", (exam_id,))
        return Exam(**row) if row is not None else None

    def latest(self, limit: int = 100) -> list[Exam]:
        """The newest `limit` exams, newest first."""
        return [Exam(**r) for r in self._conn.query(f"{_EXAM} ORDER BY id DESC LIMIT ?", (limit,))]

    def set_mpps_uid(self, exam_id: int, mpps_uid: str) -> None:
        """The MPPS SOP Instance UID, once the SCP assigned it in the N-CREATE response."""
        self._conn.execute("UPDATE exams SET mpps_uid=? WHERE id=?", (mpps_uid, exam_id))

    def set_mpps_job(self, exam_id: int, message: str, job_id: int) -> None:
        """The job that sends the exam's MPPS N-CREATE (`message` "create") or N-SET ("set")."""
        column = {"create": "mpps_create_job", "set": "mpps_set_job"}[message]
        self._conn.execute(f"UPDATE exams SET {column}=? WHERE id=?", (job_id, exam_id))

    def end(self, exam_id: int, state: str, ended_at: float, reason: str = "") -> None:
        """The exam's final state (COMPLETED or DISCONTINUED with its CID 9300 `reason`)."""
        self._conn.execute("UPDATE exams SET state=?, ended_at=?, reason=? WHERE id=?",
                           (state, ended_at, reason, exam_id))

    def auto_queued(self, exam_id: int) -> None:
        """The auto-send rule "exam" was applied to the ended exam."""
        self._conn.execute("UPDATE exams SET auto_queued_at=? WHERE id=?", (time.time(), exam_id))

    def add_objects(self, exam_id: int, objects: list[ExamObject]) -> None:
        """The objects of one exam.add_image call, in one transaction."""
        now = time.time()
        cols = _columns(ExamObject)
        with self._conn.transaction() as c:
            c.executemany(
                f"INSERT OR REPLACE INTO exam_objects(exam_id, added_at, {cols}) "
                f"VALUES (?, ?, {', '.join('?' * len(fields(ExamObject)))})",
                [(exam_id, now, *astuple(o)) for o in objects],
            )

    def exam_of(self, sop_instance_uid: str) -> int | None:
        """The exam that holds an object, or None."""
        row = self._conn.one("SELECT exam_id FROM exam_objects WHERE sop_instance_uid=?", (sop_instance_uid,))
        return int(row["exam_id"]) if row is not None else None

    def objects(self, exam_id: int) -> list[ExamObject]:
        """The exam's objects in the order they were added."""
        rows = self._conn.query(
            f"SELECT {_columns(ExamObject)} FROM exam_objects WHERE exam_id=? ORDER BY added_at, rowid", (exam_id,)
        )
        return [ExamObject(**{**r, "is_image": bool(r["is_image"])}) for r in rows]

    def series(self, exam_id: int) -> list[ExamSeries]:
        """The series of an exam in acquisition order."""
        rows = self._conn.query(
            """SELECT o.series_uid, COUNT(*) AS instances, MIN(o.added_at) AS first_added,
                      s.completed_at, s.queued_at
               FROM exam_objects o LEFT JOIN exam_series s
                    ON s.exam_id = o.exam_id AND s.series_uid = o.series_uid
               WHERE o.exam_id=? GROUP BY o.series_uid ORDER BY first_added, o.series_uid""",
            (exam_id,),
        )
        return [ExamSeries(r["series_uid"], r["instances"], r["completed_at"], r["queued_at"]) for r in rows]

    def complete_series(self, exam_id: int, series_uid: str) -> bool:
        """Mark a series of an exam complete; False when it already was."""
        cur = self._conn.execute(
            "INSERT OR IGNORE INTO exam_series(exam_id, series_uid, completed_at) VALUES (?,?,?)",
            (exam_id, series_uid, time.time()),
        )
        return cur.rowcount == 1

    def series_queued(self, exam_id: int, series_uid: str) -> None:
        """The auto-send rule "series" was applied to a completed series."""
        self._conn.execute(
            "UPDATE exam_series SET queued_at=? WHERE exam_id=? AND series_uid=?", (time.time(), exam_id, series_uid)
        )

    def auto_send_due(self) -> tuple[list[tuple[int, str]], list[int]]:
        """What an earlier run left undone: completed series not yet queued by the rule
        "series" as (exam_id, series_uid), and ended exams not yet queued by the rule "exam"."""
        series = [
            (r["exam_id"], r["series_uid"])
            for r in self._conn.query(
                "SELECT exam_id, series_uid FROM exam_series WHERE queued_at IS NULL ORDER BY completed_at"
            )
        ]
        exams = [
            r["id"]
            for r in self._conn.query(
                "SELECT id FROM exams WHERE ended_at IS NOT NULL AND auto_queued_at IS NULL ORDER BY id"
            )
        ]
        return series, exams
