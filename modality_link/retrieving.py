"""Retrieve jobs: load prior studies from a node into the memory server or the archive
(Query/Retrieve SCU, PS3.4 Annex C: C-FIND, then C-MOVE to one of our own AEs).

``retrieve`` asks the node (a node with the ``qr`` role) which studies match - one Study Instance
UID, or every study of a Patient ID - and queues a job of kind ``retrieve`` whose items are those
studies. Each attempt moves the studies not yet retrieved, one C-MOVE each, to the memory server
(``to="memory"``) or the disk server (``"archive"``); the pending responses' counts are the job's
progress. A move that gets no response for the node's ``move_timeout`` seconds is cancelled
(C-CANCEL-RQ) and retried with the node's back-off, like a move that ended with failures (B000,
A7xx) or a lost association; a refusal that asking again cannot change (the node does not know
our AE, A801; A9xx, Cxxx) fails the job naming the remote status (docs/design.md "Loading priors").
"""

from __future__ import annotations

import logging
from typing import Callable

from pydicom.dataset import Dataset

from modality_link.config import Config, ConfigError, Node
from modality_link.db import Job
from modality_link.errors import DicomFailure, Invalid, NotFound, UnknownNode, missing_role
from modality_link.jobs import Fail, JobContext, JobQueue, Retry, Stopping
from modality_link.net import retrieve, status
from modality_link.net.retrieve import MoveProgress, QueryError

LOG = logging.getLogger("modality_link.retrieving")

KIND = "retrieve"
DESTINATIONS = ("memory", "archive")
#: Study-level keys asked for when the studies of a retrieve are looked up (PS3.4 C.6.2.1.2).
STUDY_KEYS = ("StudyInstanceUID", "PatientID", "PatientName", "StudyDate", "StudyDescription", "AccessionNumber",
              "NumberOfStudyRelatedInstances")


def study_query(study_uid: str = "", patient_id: str = "") -> Dataset:
    """A Study Root STUDY-level identifier (PS3.4 C.6.2.1) for one study or a patient's studies."""
    ds = Dataset()
    ds.QueryRetrieveLevel = "STUDY"
    for keyword in STUDY_KEYS:
        setattr(ds, keyword, "")
    ds.StudyInstanceUID = study_uid
    ds.PatientID = patient_id
    return ds


class Retrieving:
    """The ``retrieve`` jobs of a queue."""

    def __init__(self, queue: JobQueue, get_config: Callable[[], Config]) -> None:
        self.queue = queue
        self.db = queue.db
        self.get_config = get_config
        queue.register(KIND, self.execute)

    def node(self, name: str) -> Node:
        """The configured node `name`, which must have the ``qr`` role."""
        try:
            node = self.get_config().node(name)
        except ConfigError as exc:
            raise UnknownNode(str(exc), name) from None
        if "qr" not in node.roles:
            raise Invalid(missing_role(name, "qr", node.roles, "Query/Retrieve"))
        return node

    def destination(self, to: str) -> str:
        """Our AE title a C-MOVE sends to: the memory server's or the disk server's."""
        cfg = self.get_config()
        if to not in DESTINATIONS:
            raise Invalid(f"retrieve: 'to' is memory or archive, not {to!r}")
        listener = cfg.memory_server if to == "memory" else cfg.disk_server
        if not listener.enabled:
            raise Invalid(f"retrieve: the {'memory' if to == 'memory' else 'disk'} server is not enabled")
        return listener.ae_title

    def find_studies(self, name: str, identifier: Dataset) -> list[Dataset]:
        """C-FIND at node `name` (Study Root); a failure says which and why."""
        cfg = self.get_config()
        try:
            return retrieve.find(self.node(name), cfg.station.ae_title, cfg.timeouts, identifier)
        except QueryError as exc:
            raise DicomFailure(str(exc), exc.status) from None

    def submit(self, node: str, study_uid: str | None = None, patient_id: str | None = None,
               to: str = "memory") -> int:
        """Queue the retrieve of a study, or of every study of a patient, from `node`."""
        if (study_uid is None) == (patient_id is None) or not (study_uid or patient_id):
            raise Invalid("retrieve: give either study_uid or patient_id")
        for value in (study_uid, patient_id):
            if value is not None and (not isinstance(value, str) or "*" in value or "?" in value or "\\" in value):
                raise Invalid(f"retrieve: {value!r} is not one Study Instance UID or Patient ID")
        self.destination(to)
        found = self.find_studies(node, study_query(study_uid or "", patient_id or ""))
        uids = list(dict.fromkeys(str(ds.StudyInstanceUID) for ds in found if ds.get("StudyInstanceUID")))
        if not uids:
            what = f"study {study_uid}" if study_uid else f"study of patient {patient_id}"
            raise NotFound(f"{node} has no {what}")
        params = {"to": to, "study_uid": study_uid, "patient_id": patient_id,
                  "instances": sum(int(ds.get("NumberOfStudyRelatedInstances") or 0) for ds in found)}
        return self.queue.submit(KIND, node, uids, params)

    def execute(self, job: Job, ctx: JobContext) -> None:
        """One attempt: move each study not retrieved yet; see the module docstring."""
        cfg = self.get_config()
        node = self.queue.node(job)
        destination = self.destination(str(job.params.get("to", "memory")))
        self.db.jobs.reset_items(job.id)
        pending = [it.item for it in self.db.jobs.items(job.id, "pending")]
        done = job.total - len(pending)
        retryable: list[str] = []
        for n, study in enumerate(pending, start=1):
            where = f"study {done + n} of {job.total}"

            def progress(p: MoveProgress, where: str = where) -> None:
                total = p.completed + p.failed + p.warning + (p.remaining or 0)
                self.queue.announce(job.id, state="running", detail=f"{where}: {p.completed} of {total} instance(s)")

            self.db.jobs.set_detail(job.id, f"{where}: moving to {destination}")
            identifier = Dataset()
            identifier.QueryRetrieveLevel = "STUDY"
            identifier.StudyInstanceUID = study
            try:
                result = retrieve.move(node, cfg.station.ae_title, cfg.timeouts, destination, identifier,
                                       move_timeout=node.move_timeout, on_progress=progress,
                                       should_stop=ctx.should_stop)
            except QueryError as exc:
                code = exc.status
                if code is None or status.QR_MOVE.is_retryable(code):  # no association, out of resources
                    self.db.jobs.set_item(job.id, study, "failed", code, str(exc))
                    retryable.append(str(exc))
                    continue
                self.db.jobs.set_item(job.id, study, "failed", code, str(exc))
                raise Fail(str(exc)) from None
            if ctx.should_stop():
                raise Stopping()
            p = result.progress
            if result.status == status.SUCCESS:
                self.db.jobs.set_item(job.id, study, "done", result.status, f"{p.completed} instance(s)")
                continue
            why = (f"{result.cancelled}; " if result.cancelled else "") + result.message
            if result.failed_uids:
                why += f" (first failed: {result.failed_uids[0]})"
            self.db.jobs.set_item(job.id, study, "failed", result.status,
                                  f"status 0x{result.status:04X} ({status.QR_MOVE.text(result.status)}): {why}")
            retryable.append(f"{study}: {why}")
        if retryable:
            raise Retry(f"{len(retryable)} of {job.total} study(ies) not retrieved (first: {retryable[0]})")
        self.db.jobs.set_detail(job.id, f"{job.total} study(ies) retrieved to {destination}")
