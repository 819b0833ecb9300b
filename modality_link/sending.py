"""Send jobs: C-STORE of archived instances to a node (Storage Service Class SCU, PS3.4 Annex B).

A job of kind ``send`` (:mod:`modality_link.jobs`) has the node as its node and SOP Instance
UIDs as its items. Each attempt sends the items not yet stored over an association of
:class:`~modality_link.net.storage.AssociationPool`, kept open for the node's next job
(``idle_release``); every C-STORE success is committed to the database before the next instance
is sent, so after a crash a job resumes with the instances not yet acknowledged (C-STORE is
idempotent by SOP Instance UID). Which failures are retried: docs/design.md "Jobs and failures".
When every item is stored and commitment was asked for, a ``commit`` job follows for the same
instances (:mod:`modality_link.storage_commitment`).
"""

from __future__ import annotations

import logging
import time
from pathlib import Path
from typing import Any, Callable

from modality_link import audit, jsonlog
from modality_link.config import Config, ConfigError
from modality_link.db import Database, InstanceRow, Job
from modality_link.errors import Invalid, NotFound, UnknownNode, missing_role
from modality_link.jobs import Fail, JobContext, JobQueue, Retry, Stopping
from modality_link.net import storage
from modality_link.net.association import AssociationFailed

LOG = logging.getLogger("modality_link.sending")

KIND = "send"
#: The kind of the job that follows a send asked to commit (`modality_link.storage_commitment`).
COMMIT_KIND = "commit"
#: Least time between two ``job.progress`` events of a running send (seconds).
PROGRESS_INTERVAL = 0.1


def archived(db: Database, job_id: int, uids: list[str]) -> list[InstanceRow]:
    """The index rows of the job's items `uids`; an item no longer in the archive fails."""
    rows = []
    for uid in uids:
        row = db.index.instance(uid)
        if row is None:
            db.jobs.set_item(job_id, uid, "failed", None, "no longer in the archive")
        else:
            rows.append(row)
    return rows


class Sending:
    """The ``send`` jobs of a queue, and the associations they keep open between jobs."""

    def __init__(self, queue: JobQueue, archive_root: Path, get_config: Callable[[], Config]) -> None:
        self.queue = queue
        self.db = queue.db
        self.archive_root = Path(archive_root)
        self.get_config = get_config
        self.associations = storage.AssociationPool()
        queue.register(KIND, self.execute)

    def close(self) -> None:
        """Release the associations kept open (the service stops)."""
        self.associations.close()

    def submit(self, study_uids: list[str], node: str, commit: bool = False) -> int:
        """Queue a send job of every instance of the studies to `node` (the Send button)."""
        cfg = self.get_config()
        try:
            n = cfg.node(node)
        except ConfigError as exc:  # its message names the known nodes
            raise UnknownNode(str(exc), node) from None
        if "store" not in n.roles:
            raise Invalid(missing_role(node, "store", n.roles))
        if commit and "commit" not in n.roles:
            raise Invalid(missing_role(node, "commit", n.roles, "Storage Commitment"))
        uids: list[str] = []
        for study in study_uids:
            rows = self.db.index.study_instances(study)
            if not rows:
                raise NotFound(f"no study {study} in the archive")
            uids += [r.sop_instance_uid for r in rows]
        return self.send(node, uids, {"commit": commit, "studies": study_uids})

    def send(self, node: str, uids: list[str], params: dict[str, Any], parent_id: int | None = None) -> int:
        """Queue a send job of the instances `uids` to `node`; ``params["commit"]`` asks for
        Storage Commitment once they are stored."""
        return self.queue.submit(KIND, node, uids, params, parent_id=parent_id)

    def execute(self, job: Job, ctx: JobContext) -> None:
        """One attempt: send the items not stored yet; see the module docstring."""
        cfg = self.get_config()
        node = self.queue.node(job)
        job_id = job.id
        jsonlog.bind(peer=f"{node.host}:{node.port}", calling_ae=cfg.station.ae_title, called_ae=node.ae_title)
        self.db.jobs.reset_items(job_id)  # failed items get another chance in this attempt
        pending = [it.item for it in self.db.jobs.items(job_id, "pending")]
        self.db.index.touch_instances(pending)  # a use: docs/design.md "Disk clean-up"
        instances = [
            storage.Instance(r.sop_instance_uid, r.sop_class_uid, r.transfer_syntax, self.archive_root / r.path)
            for r in archived(self.db, job_id, pending)
        ]
        counts = {"done": job.total - len(instances), "failed": 0, "retryable": 0}
        total = job.total
        if instances:
            self.db.jobs.set_detail(job_id, f"sending {len(instances)} instance(s)")
            last_publish = [0.0]
            studies = self.db.index.instance_studies([i.sop_instance_uid for i in instances])
            sent = audit.Transfer(audit.Participant(cfg.station.ae_title), audit.Participant(node.ae_title, node.host))

            def on_result(inst: storage.Instance, out: storage.Outcome) -> bool:
                sent.add(studies.get(inst.sop_instance_uid), out.state != "failed")
                if out.state in ("done", "warning"):
                    self.db.jobs.mark_sent(job_id, job.node, inst.sop_instance_uid, out.state, out.status or 0,
                                           out.detail)
                    counts["done"] += 1
                    if out.state == "warning":
                        LOG.warning("job %d: %s stored with %s", job_id, inst.sop_instance_uid, out.detail,
                                    extra={"status": out.status})
                else:
                    self.db.jobs.set_item(job_id, inst.sop_instance_uid, "failed", out.status, out.detail)
                    counts["failed"] += 1
                    counts["retryable"] += out.retryable
                    LOG.error("job %d: %s %s", job_id, inst.sop_instance_uid, out.detail, extra={"status": out.status})
                now = time.monotonic()
                if now - last_publish[0] > PROGRESS_INTERVAL or counts["done"] + counts["failed"] == total:
                    last_publish[0] = now
                    self.queue.announce(job_id, state="running", total=total, done=counts["done"],
                                        failed=counts["failed"], warnings=0, detail="sending", last_error="")
                return out.state != "failed" or node.failure_policy == "continue"

            while True:
                try:
                    assoc = self.associations.acquire(
                        job.node, node.host, node.port, cfg.station.ae_title, node.ae_title,
                        [i.sop_class_uid for i in instances], node.transfer_syntaxes, cfg.timeouts,
                        node.max_pdu, node.tls())
                except AssociationFailed as exc:
                    raise Retry(str(exc)) from None
                answered = counts["done"] + counts["failed"]
                try:
                    storage.store_instances(assoc, instances, on_result, ctx.should_stop)
                except storage.AssociationLost as exc:
                    assoc.abort()
                    if assoc.reused and counts["done"] + counts["failed"] == answered:
                        # a kept association the peer dropped just as we used it: not a failure
                        # (docs/design.md "Sending and commitment")
                        LOG.info("job %d: the kept association to %s was gone (%s); opening a new one",
                                 job_id, assoc.peer, exc)
                        continue
                    raise Retry(f"{node.ae_title}@{node.host}:{node.port}: {exc}") from None
                except BaseException:
                    assoc.abort()
                    raise
                finally:
                    audit.transferred(sent)
                break
            if ctx.should_stop():
                assoc.abort()
                raise Stopping()
            self.associations.give_back(job.node, assoc, node.idle_release)
        failed = self.db.jobs.items(job_id, "failed")
        if failed:
            msg = f"{len(failed)} of {total} instance(s) not stored (first: {failed[0].detail})"
            if counts["retryable"]:  # status.STORAGE.is_retryable; the others fail at once
                raise Retry(msg)
            raise Fail(msg)
        warnings = self.db.jobs.items(job_id, "warning")
        if warnings:
            self.db.jobs.set_detail(job_id, f"stored; {len(warnings)} with a warning ({warnings[0].detail})")
        else:
            self.db.jobs.set_detail(job_id, f"{total} instance(s) stored")
        if job.params.get("commit"):
            uids = [it.item for it in self.db.jobs.items(job_id)]
            self.queue.submit(COMMIT_KIND, job.node, uids, {"round": job.params.get("round", 1)}, parent_id=job_id)
