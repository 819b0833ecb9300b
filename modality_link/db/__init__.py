"""The SQLite database: the only package that runs SQL or knows the schema.

Everything the service persists lives in one SQLite file in WAL mode, over one connection
(:mod:`.connection`); :mod:`.schema` creates and migrates it. One module per concern reads and
writes its tables and hands out typed rows (frozen dataclasses):

- :mod:`.index`: the archive index (patients, studies, series, instances);
- :mod:`.jobs`: the job queues (send, commit and burn jobs; MPPS messages), the per-node
  sent/committed state, commitment transactions;
- :mod:`.exams`: the kept worklist, exams, their objects and series;
- :mod:`.alerts`: what the operator must be told;
- :mod:`.events`: the journal of IPC events, for a client's replay;
- :mod:`.retention`: what the disk clean-up decides on, and the deletions under way.
"""

from __future__ import annotations

from pathlib import Path

from modality_link.db.alerts import Alert, Alerts
from modality_link.db.connection import Connection
from modality_link.db.events import Events, JournalEvent, Replay
from modality_link.db.exams import Exam, ExamObject, Exams, ExamSeries, WorklistItem
from modality_link.db.index import Index, InstanceRecord, InstanceRow, InstanceStudy, StudyRow, StudyUse
from modality_link.db.jobs import FINAL_STATES, Attempt, CommitTransaction, Job, JobItem, Jobs
from modality_link.db.retention import Retention, StudyFacts
from modality_link.db.schema import migrate

__all__ = [
    "Alert", "Attempt", "CommitTransaction", "Database", "Exam", "ExamObject", "ExamSeries", "FINAL_STATES",
    "Events", "InstanceRecord", "InstanceRow", "InstanceStudy", "Job", "JobItem", "Jobs", "JournalEvent", "Replay",
    "StudyFacts", "StudyRow", "StudyUse", "WorklistItem",
]


class Database:
    """The service's SQLite file: one connection, migrated on opening, and its parts."""

    def __init__(self, path: Path | str, read_only: bool = False) -> None:
        """Open (and migrate) the file; `read_only`: open it as it is, to read beside or after
        the service, creating and changing nothing (``jobs`` while no service runs)."""
        self.path = str(path)
        self._conn = Connection(path, read_only)
        if not read_only:
            migrate(self._conn)
        self.index = Index(self._conn)
        self.jobs = Jobs(self._conn)
        self.mpps_jobs = Jobs(self._conn, "mpps_jobs", "mpps_job_items")
        self.exams = Exams(self._conn)
        self.alerts = Alerts(self._conn)
        self.events = Events(self._conn)
        self.retention = Retention(self._conn)

    def ping(self) -> None:
        """One trivial statement: returns once the connection's lock is free and SQLite
        answers (the service's watchdog asks)."""
        self._conn.query("SELECT 1")

    def close(self) -> None:
        self._conn.close()
