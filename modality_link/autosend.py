"""The auto-send rules: send jobs queued without a Send button (docs/ipc.md, node ``auto_send``).

- ``exam``: an ended exam's instances (COMPLETED or DISCONTINUED), and a study imported with
  ``archive.import`` (it counts as a completed exam), go to every node whose rule is "exam";
- ``series``: a series declared complete (``exam.series_complete``), or completed by the end of
  its exam, goes to every node whose rule is "series".

Either asks for Storage Commitment where the node has the ``commit`` role. Each application to
an exam is recorded after its jobs are queued, and what a stop or a failure left undone is
applied at the next start (:meth:`AutoSend.resume`; docs/design.md "Exams, MPPS and auto-send").
"""

from __future__ import annotations

import logging
import threading
from typing import Any, Callable

from modality_link.config import Config
from modality_link.db import Database
from modality_link.sending import Sending

LOG = logging.getLogger("modality_link.autosend")


class AutoSend:
    """The rules "exam" and "series" over the exams of one database."""

    def __init__(self, db: Database, sending: Sending, get_config: Callable[[], Config],
                 alert: Callable[..., None]) -> None:
        self.db = db
        self.sending = sending
        self.get_config = get_config
        self.alert = alert
        self._lock = threading.Lock()

    def on_exam_complete(self, study_uid: str, sop_instance_uids: list[str] | None = None) -> list[int]:
        """Rule "exam": queue the study to every node whose rule is "exam"; the job ids.

        From an exam end, `sop_instance_uids` are the exam's instances of the study (a second
        exam on the same study sends only its own); from an import, the whole study."""
        if sop_instance_uids is None:
            sop_instance_uids = [r.sop_instance_uid for r in self.db.index.study_instances(study_uid)]
        return self._queue("exam", sop_instance_uids, {"studies": [study_uid]})

    def on_series_complete(self, series_uid: str) -> list[int]:
        """Rule "series": queue the series to every node whose rule is "series"; the job ids."""
        return self._queue("series", self.db.index.series_instance_uids(series_uid), {"series": series_uid})

    def _queue(self, rule: str, uids: list[str], extra: dict[str, Any]) -> list[int]:
        """Queue `uids` to each node with the `rule` and the store role, with Storage
        Commitment where the node has the commit role."""
        if not uids:
            return []
        jobs = []
        for name, node in self.get_config().nodes.items():
            if node.auto_send == rule and "store" in node.roles:
                params = {"commit": "commit" in node.roles, "auto": rule, **extra}
                jobs.append(self.sending.send(name, uids, params))
        return jobs

    def apply(self, exam_id: int) -> list[int]:
        """Apply the rules still due for this exam: "series" to its completed series not yet
        queued, "exam" once it has ended; the queued job ids. A failure to queue is logged and
        alerted (``auto-send-failed``), and what it should have done stays due for :meth:`resume`."""
        jobs: list[int] = []
        with self._lock:
            exam = self.db.exams.get(exam_id)
            assert exam is not None, exam_id
            for se in self.db.exams.series(exam_id):
                if se.completed_at is None or se.queued_at is not None:
                    continue
                try:
                    jobs += self.on_series_complete(se.series_uid)
                except Exception as exc:
                    LOG.exception("exam %d: auto-send of series %s", exam_id, se.series_uid)
                    self.alert("auto-send-failed", f"exam {exam_id}: series {se.series_uid} not queued: {exc}")
                    continue
                self.db.exams.series_queued(exam_id, se.series_uid)
            if exam.ended_at is not None and exam.auto_queued_at is None:
                uids = [o.sop_instance_uid for o in self.db.exams.objects(exam_id)]
                try:
                    jobs += self.on_exam_complete(exam.study_uid, uids) if uids else []
                except Exception as exc:
                    LOG.exception("exam %d: auto-send of the exam", exam_id)
                    self.alert("auto-send-failed", f"exam {exam_id}: study {exam.study_uid} not queued: {exc}")
                else:
                    self.db.exams.auto_queued(exam_id)
        return jobs

    def resume(self) -> list[int]:
        """At start-up: apply the rules that an earlier run left due; the queued job ids."""
        series, exams = self.db.exams.auto_send_due()
        jobs: list[int] = []
        for exam_id in dict.fromkeys([e for e, _ in series] + exams):
            jobs += self.apply(exam_id)
        if jobs:
            LOG.warning("auto-send: %d job(s) queued that an earlier run left due", len(jobs))
        return jobs
