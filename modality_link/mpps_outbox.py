"""The MPPS outbox: each N-CREATE and N-SET of an exam is a job of kind ``mpps`` (PS3.4 Annex F).

:mod:`modality_link.net.mpps` builds the data sets and sends one message; this module queues
them in a job queue of their own (:mod:`modality_link.jobs` over the ``mpps_jobs`` table, one
worker) so that they leave in the background, survive a restart and are retried with the
queue's back-off (docs/design.md "Exams, MPPS and auto-send"):

- an exam's N-SET waits until its N-CREATE has ended (the job's ``after_id``), and needs the
  MPPS SOP Instance UID that the N-CREATE gave or the SCP assigned in its response;
- an SCP that cannot be reached is tried again for as long as it takes; an unforeseen error
  counts against the node's ``retries``; a refusal fails the message at once, alerts the
  operator (``mpps-refused``), and an N-SET after a failed N-CREATE is not sent;
- ``exam.show`` lists the messages as the outbox rows of docs/ipc.md; ``jobs.list`` and the
  ``job.progress`` events show the service's other queue only.
"""

from __future__ import annotations

import logging
from typing import Any, Callable

from pydicom.dataset import Dataset

from modality_link.config import Config
from modality_link.db import Database, Exam, Job
from modality_link.jobs import Fail, JobContext, JobQueue, Retry
from modality_link.lists import MPPS_STATES
from modality_link.net import mpps

LOG = logging.getLogger("modality_link.mpps_outbox")

KIND = "mpps"
CREATE, SET = "create", "set"
#: The attempt after which the operator is told that MPPS could not be delivered yet.
UNREACHABLE_ALERT_AT = 3

#: A job's state as the outbox row of ``exam.show`` says it (docs/ipc.md).


class MppsOutbox:
    """The MPPS messages of the exams of one database, and the queue that sends them."""

    def __init__(self, db: Database, get_config: Callable[[], Config], alert: Callable[..., None],
                 publish: Callable[..., None]) -> None:
        self.db = db
        self.get_config = get_config
        self.alert = alert
        self.publish = publish
        self.queue = JobQueue(db, get_config, alert=alert, workers=1, rows=db.mpps_jobs)
        self.queue.register(KIND, self.execute, on_end=self.on_end)

    def start(self) -> None:
        self.queue.start()

    def stop(self) -> None:
        self.queue.stop()

    def wake(self) -> None:
        """Look for due messages now (a test that brought the SCP up)."""
        self.queue.wake()

    def add(self, exam_id: int, node: str, message: str, dataset_json: str) -> int:
        """Queue the exam's N-CREATE (`message` "create") or N-SET ("set") to `node`; its data
        set in the DICOM JSON model (PS3.18 F.2), as text: a message that cannot be read fails
        alone, the job row stays readable."""
        exam = self.db.exams.get(exam_id)
        after = exam.mpps_create_job if exam is not None and message == SET else None
        params = {"exam_id": exam_id, "message": message, "dataset": dataset_json}
        job_id = self.queue.submit(KIND, node, [], params, after_id=after)
        self.db.exams.set_mpps_job(exam_id, message, job_id)
        return job_id

    def messages(self, exam: Exam) -> list[dict[str, Any]]:
        """The exam's messages as ``exam.show`` lists them: its MPPS outbox rows (docs/ipc.md)."""
        rows = []
        for job_id in (exam.mpps_create_job, exam.mpps_set_job):
            job = self.db.mpps_jobs.get(job_id) if job_id is not None else None
            if job is not None:
                rows.append(_outbox_row(job))
        return rows

    def execute(self, job: Job, ctx: JobContext) -> None:
        """Send one message; see the module docstring."""
        exam_id, message = job.params["exam_id"], job.params["message"]
        if job.after_id is not None:
            before = self.db.mpps_jobs.get(job.after_id)
            if before is not None and before.state != "done":
                raise Fail(f"not sent: the N-CREATE failed ({before.last_error or before.detail})", alert=False)
        cfg = self.get_config()
        node = cfg.nodes.get(job.node)
        if node is None:
            raise Retry(f"node {job.node!r} is no longer configured", forever=True)
        exam = self.db.exams.get(exam_id)
        if exam is None:
            raise Fail(f"no exam {exam_id}", alert=False)
        ds = Dataset.from_json(job.params["dataset"])
        try:
            if message == CREATE:
                uid = mpps.send_n_create(node, cfg.station.ae_title, cfg.timeouts, ds, exam.mpps_uid or None)
                if uid != exam.mpps_uid:
                    self.db.exams.set_mpps_uid(exam_id, uid)
            else:
                if not exam.mpps_uid:
                    raise mpps.MppsError("N-SET before the MPPS SOP Instance UID is known", retryable=True)
                mpps.send_n_set(node, cfg.station.ae_title, cfg.timeouts, ds, exam.mpps_uid)
        except mpps.MppsError as exc:
            if not exc.retryable:
                raise Fail(str(exc), alert=False) from None
            if job.attempts + 1 == UNREACHABLE_ALERT_AT:
                self.alert("mpps-unreachable", f"exam {exam_id}: MPPS {message} not delivered yet: {exc}")
            raise Retry(str(exc), forever=True) from None

    def on_end(self, job: Job) -> None:
        """``mpps.sent``, or ``mpps.failed`` with the ``mpps-refused`` alert (docs/ipc.md); an
        N-SET left unsent because its N-CREATE failed adds nothing to the N-CREATE's report."""
        exam_id, message = job.params["exam_id"], job.params["message"]
        if job.state == "done":
            self.publish("mpps.sent", exam_id=exam_id, kind=message)
            return
        before = self.db.mpps_jobs.get(job.after_id) if job.after_id is not None else None
        if before is not None and before.state != "done":
            return
        error = job.last_error or job.detail
        self.alert("mpps-refused", f"exam {exam_id}: {error}")
        self.publish("mpps.failed", exam_id=exam_id, kind=message, error=error)


def _outbox_row(job: Job) -> dict[str, Any]:
    """An MPPS job as the outbox row ``exam.show`` lists (docs/ipc.md): once sent, `attempts`
    counts the attempt that sent it, `last_error` is empty and `sent_at` is when it was sent."""
    sent = job.state == "done"
    return {
        "id": job.id, "exam_id": job.params["exam_id"], "kind": job.params["message"], "node": job.node,
        "state": MPPS_STATES[job.state], "attempts": job.attempts + int(sent), "next_attempt": job.next_attempt_at,
        "last_error": "" if sent else job.last_error, "created_at": job.created_at,
        "sent_at": job.updated_at if sent else None,
    }
