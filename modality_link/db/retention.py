"""The archive's life cycle in the database: what the disk clean-up needs to know of each study,
and the deletions under way (docs/design.md "Disk clean-up").

A study is deleted in three steps: :meth:`Retention.mark_deleting` checks in one transaction
that it may still be deleted and records each of its instances in ``deletions``; the archive
removes the files; :meth:`Retention.finish_deleting` removes the instance, series, study (and
patient, once it has no study) rows and the marks in one transaction. A crash between the steps
leaves marks, and the next start finishes the deletion (:meth:`Retention.pending_deletions`).
Which studies may go is the policy's business (`modality_link.cleanup`); this module only reads
the facts it decides on: size, last use, protection, open exams, active jobs, and the copies
at other nodes (committed, or sent).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable, Sequence

from modality_link.db.connection import Connection


@dataclass(frozen=True)
class StudyFacts:
    """One archived study as the clean-up sees it."""

    study_uid: str
    patient_id: str
    patient_name: str
    study_date: str
    instances: int
    bytes: int
    last_used: float  # its newest instance's arrival, or its last send, retrieve or burn
    protected: bool
    open_exam: bool  # an exam of the study is IN PROGRESS
    active_job: bool  # a queued or running job names the study or one of its instances
    #: node -> how many of its instances that node holds (committed, or sent: see :meth:`Retention.studies`)
    copies: dict[str, int] = field(default_factory=dict)


#: Jobs that still use what they name.
_ACTIVE = "j.state IN ('queued', 'running')"


class Retention:
    """The clean-up's facts and the deletion marks."""

    def __init__(self, conn: Connection) -> None:
        self._conn = conn

    def archive_bytes(self) -> int:
        """The bytes of every indexed file."""
        row = self._conn.one("SELECT COALESCE(SUM(size), 0) FROM instances")
        return int(row[0]) if row is not None else 0

    def studies(self, nodes: Sequence[str], committed: bool, study_uid: str | None = None) -> list[StudyFacts]:
        """The facts of every study not being deleted (or of `study_uid` only). `copies` counts
        the instances committed at each of `nodes` (`committed`), else those sent there."""
        where, args = ("AND s.study_uid=?", [study_uid]) if study_uid is not None else ("", [])
        rows = self._conn.query(
            f"""SELECT s.study_uid, p.patient_id, p.patient_name, s.study_date,
                       COUNT(*) AS instances, SUM(i.size) AS bytes, MAX(i.received_at) AS stored_at,
                       u.used_at, COALESCE(u.protected, 0) AS protected,
                       EXISTS (SELECT 1 FROM exams e WHERE e.study_uid=s.study_uid AND e.state='IN PROGRESS')
                         AS open_exam
                FROM studies s JOIN patients p ON p.pk=s.patient_pk
                JOIN series se ON se.study_uid=s.study_uid JOIN instances i ON i.series_uid=se.series_uid
                LEFT JOIN study_usage u ON u.study_uid=s.study_uid
                WHERE NOT EXISTS (SELECT 1 FROM deletions d WHERE d.study_uid=s.study_uid) {where}
                GROUP BY s.study_uid""",
            args,
        )
        busy = self._active_studies(study_uid)
        copies = self._copies(nodes, committed, study_uid)
        return [
            StudyFacts(
                study_uid=r["study_uid"], patient_id=r["patient_id"], patient_name=r["patient_name"],
                study_date=r["study_date"], instances=r["instances"], bytes=r["bytes"],
                last_used=max(r["stored_at"], r["used_at"] or 0.0), protected=bool(r["protected"]),
                open_exam=bool(r["open_exam"]), active_job=r["study_uid"] in busy,
                copies=copies.get(r["study_uid"], {}),
            )
            for r in rows
        ]

    def _active_studies(self, study_uid: str | None) -> set[str]:
        """Studies that a queued or running job names, by an instance (send, commit, burn) or by
        their Study Instance UID (retrieve)."""
        rows = self._conn.query(
            f"""SELECT se.study_uid FROM jobs j JOIN job_items ji ON ji.job_id=j.id
                  JOIN instances i ON i.sop_instance_uid=ji.item JOIN series se ON se.series_uid=i.series_uid
                  WHERE {_ACTIVE}
                UNION SELECT ji.item FROM jobs j JOIN job_items ji ON ji.job_id=j.id WHERE {_ACTIVE}"""
        )
        found = {r[0] for r in rows}
        return found if study_uid is None else found & {study_uid}

    def _copies(self, nodes: Sequence[str], committed: bool, study_uid: str | None) -> dict[str, dict[str, int]]:
        """{study_uid: {node: instances committed (or sent) there}} for `nodes`."""
        if not nodes:
            return {}
        column = "committed_at" if committed else "sent_at"
        where, args = ("AND se.study_uid=?", [study_uid]) if study_uid is not None else ("", [])
        rows = self._conn.query(
            f"""SELECT se.study_uid, n.node, COUNT(*) AS n
                FROM node_instances n JOIN instances i ON i.sop_instance_uid=n.sop_instance_uid
                JOIN series se ON se.series_uid=i.series_uid
                WHERE n.{column} IS NOT NULL AND n.node IN ({",".join("?" * len(nodes))}) {where}
                GROUP BY se.study_uid, n.node""",
            [*nodes, *args],
        )
        out: dict[str, dict[str, int]] = {}
        for r in rows:
            out.setdefault(r["study_uid"], {})[r["node"]] = r["n"]
        return out

    # -- deleting ---------------------------------------------------------------------------------

    def mark_deleting(self, study_uid: str, nodes: Sequence[str], committed: bool,
                      may_delete: Callable[[StudyFacts], bool]) -> list[str] | None:
        """In one transaction: if `may_delete` still says yes to the study's facts (as
        :meth:`studies` gives them), record each of its instances as being deleted; the
        relative paths of their files, or None (the study is gone or may not be deleted now)."""
        with self._conn.transaction() as c:
            facts = self.studies(nodes, committed, study_uid)
            if not facts or not may_delete(facts[0]):
                return None
            rows = c.execute(
                """SELECT i.sop_instance_uid, i.path FROM instances i JOIN series se USING(series_uid)
                   WHERE se.study_uid=?""", (study_uid,)).fetchall()
            c.executemany("INSERT OR REPLACE INTO deletions(sop_instance_uid, study_uid, path) VALUES (?,?,?)",
                          [(r["sop_instance_uid"], study_uid, r["path"]) for r in rows])
        return [r["path"] for r in rows]

    def pending_deletions(self) -> dict[str, list[str]]:
        """Deletions a crash interrupted: {study_uid: relative paths of its marked files}."""
        out: dict[str, list[str]] = {}
        for r in self._conn.query("SELECT study_uid, path FROM deletions ORDER BY study_uid, path"):
            out.setdefault(r["study_uid"], []).append(r["path"])
        return out

    def finish_deleting(self, study_uid: str) -> None:
        """The marked files of the study are gone: remove their rows, the series, study and
        patient rows left empty, the study's use and its marks, in one transaction."""
        with self._conn.transaction() as c:
            patient = c.execute("SELECT patient_pk FROM studies WHERE study_uid=?", (study_uid,)).fetchone()
            c.execute("DELETE FROM instances WHERE sop_instance_uid IN "
                      "(SELECT sop_instance_uid FROM deletions WHERE study_uid=?)", (study_uid,))
            c.execute("""DELETE FROM series WHERE study_uid=? AND NOT EXISTS
                           (SELECT 1 FROM instances i WHERE i.series_uid=series.series_uid)""", (study_uid,))
            c.execute("DELETE FROM studies WHERE study_uid=? AND NOT EXISTS (SELECT 1 FROM series WHERE study_uid=?)",
                      (study_uid, study_uid))
            if c.execute("SELECT 1 FROM studies WHERE study_uid=?", (study_uid,)).fetchone() is None:
                c.execute("DELETE FROM study_usage WHERE study_uid=?", (study_uid,))
                if patient is not None:
                    c.execute("DELETE FROM patients WHERE pk=? AND NOT EXISTS (SELECT 1 FROM studies WHERE patient_pk=?)",
                              (patient[0], patient[0]))
            c.execute("DELETE FROM deletions WHERE study_uid=?", (study_uid,))
