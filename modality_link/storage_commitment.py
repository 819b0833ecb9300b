"""Commit jobs: Storage Commitment Push Model SCU (PS3.4 Annex J) of instances sent to a node.

A job of kind ``commit`` (:mod:`modality_link.jobs`) follows a send job asked to commit, with
the same node and items. An attempt asks commitment of the items not committed yet in a new
transaction (:func:`modality_link.net.commitment.request_commitment`) and waits for its report,
first on the N-ACTION's association (``commit_wait``), then in the queue without holding a
worker (``commit_timeout``, :class:`~modality_link.jobs.Wait`). The report is matched by its
Transaction UID whatever association it comes on and whenever it comes (:meth:`handle_report`,
also from the disk server). Timeouts, refusals and failed instances: docs/design.md "Sending
and commitment".
"""

from __future__ import annotations

import logging
import time
from typing import Any, Callable

from modality_link.config import Config, Node
from modality_link.db import Job
from modality_link.jobs import Fail, JobContext, JobQueue, Retry, Wait
from modality_link.net import commitment
from modality_link.net.status import COMMITMENT, PROCESSING_FAILURE
from modality_link.net.association import AssociationFailed, NoContextAccepted
from modality_link.sending import Sending, archived

LOG = logging.getLogger("modality_link.storage_commitment")

KIND = "commit"


def _commit_attempts(node: Node | None) -> int:
    return (node.commit_retries if node is not None else 0) + 1


def _new_transaction(params: dict[str, Any]) -> dict[str, Any]:
    """An operator's retry asks in a new transaction, with the node's timeouts counted anew."""
    return {k: v for k, v in params.items() if k not in ("tx", "timeouts")}


class StorageCommitment:
    """The ``commit`` jobs of a queue."""

    def __init__(self, queue: JobQueue, sending: Sending, get_config: Callable[[], Config],
                 alert: Callable[..., None], on_committed: Callable[[], None] | None = None) -> None:
        self.queue = queue
        self.db = queue.db
        self.sending = sending
        self.get_config = get_config
        self.alert = alert
        #: Called after a report committed instances (they may now be deleted: docs/design.md "Disk clean-up").
        self.on_committed = on_committed
        self._reports = commitment.ReportWaiter()
        queue.register(KIND, self.execute, max_attempts=_commit_attempts, on_retry=_new_transaction)

    def handle_report(self, rep: commitment.Report) -> None:
        """An N-EVENT-REPORT, on any association (PS3.4 J.3.3): record it against its transaction."""
        tx = self.db.jobs.transaction(rep.transaction_uid)
        if tx is None:
            raise commitment.ReportError(
                PROCESSING_FAILURE,
                f"unknown Transaction UID {rep.transaction_uid} (from {rep.calling_ae})",
            )
        node, job_id = tx.node, tx.job_id
        committed = [uid for _, uid in rep.committed]
        self.db.jobs.mark_committed(node, committed)
        items = {it.item for it in self.db.jobs.items(job_id)}
        for uid in committed:
            if uid in items:
                self.db.jobs.set_item(job_id, uid, "done", 0, "committed")
        for _, uid, reason in rep.failed:
            if uid in items:
                text = COMMITMENT.text(reason)
                self.db.jobs.set_item(job_id, uid, "failed", reason, f"not committed: 0x{reason:04X} {text}")
        self.db.jobs.transaction_reported(rep.transaction_uid)
        if committed and self.on_committed is not None:
            self.on_committed()
        LOG.info("commitment report for transaction %s from %s: %d committed, %d failed%s",
                 rep.transaction_uid, rep.calling_ae or node, len(committed), len(rep.failed),
                 f" ({rep.failure_text()})" if rep.failed else "")
        self._reports.seen(rep.transaction_uid)
        if self.db.jobs.make_due(job_id):  # it was waiting in the queue: let a worker finish it now
            self.queue.wake()
        self.queue.announce(job_id)

    def execute(self, job: Job, ctx: JobContext) -> Wait | None:
        """One attempt; see the module docstring."""
        cfg = self.get_config()
        node = self.queue.node(job)
        job_id, params = job.id, dict(job.params)
        if "commit" not in node.roles:
            raise Fail(f"nodes.{job.node}: this node has no 'commit' role")
        tx = params.get("tx")
        if tx:
            if self._reported(tx):
                self._result(job, params)
                return None
            if time.time() < params.get("deadline", 0):
                return Wait(params["deadline"], f"waiting for the commitment report of transaction {tx}")
            params["timeouts"] = params.get("timeouts", 0) + 1
            LOG.warning("job %d: no commitment report for transaction %s within %.0f s",
                        job_id, tx, node.commit_timeout)
            if params["timeouts"] > node.commit_retries:
                raise Fail(f"no commitment report after {params['timeouts']} request(s) "
                           f"(each waited {node.commit_timeout:.0f} s)")
        # items already committed (an earlier report) need no new request
        uids = [it.item for it in self.db.jobs.items(job_id)]
        done = self.db.jobs.committed(job.node, uids)
        for uid in done:
            self.db.jobs.set_item(job_id, uid, "done", 0, "committed")
        refs = [(r.sop_class_uid, r.sop_instance_uid)
                for r in archived(self.db, job_id, [uid for uid in uids if uid not in done])]
        if not refs:
            self._result(job, params)
            return None
        self.sending.associations.release_idle(job.node)  # the node's max_associations counts this one too
        tx = commitment.new_transaction_uid()
        params.update(tx=tx, deadline=time.time() + node.commit_timeout, requests=params.get("requests", 0) + 1)
        self.db.jobs.add_transaction(tx, job_id, job.node)
        self.db.jobs.set_detail(job_id, f"asking commitment of {len(refs)} instance(s), transaction {tx}",
                                params=params)
        try:
            commitment.request_commitment(node, cfg.station.ae_title, cfg.timeouts, tx, refs, self.handle_report,
                                          self._reports, node.commit_wait, ctx.should_stop)
        except commitment.Refused as exc:  # docs/design.md "Sending and commitment"
            msg = f"{node.ae_title} refused the commitment request ({exc})"
            self.alert("commit-refused", msg)
            raise Fail(msg) from None
        except NoContextAccepted as exc:  # the node does not offer commitment: asking again won't help
            raise Fail(str(exc)) from None
        except (AssociationFailed, ConnectionError) as exc:
            raise Retry(str(exc)) from None
        if self._reported(tx):
            self._result(job, params)
            return None
        return Wait(params["deadline"], f"waiting for the commitment report of transaction {tx}")

    def _reported(self, transaction_uid: str) -> bool:
        row = self.db.jobs.transaction(transaction_uid)
        return row is not None and row.reported_at is not None

    def _result(self, job: Job, params: dict[str, Any]) -> None:
        """The report of the job's instances is complete: done, or what to do with the failed."""
        job_id = job.id
        failed = self.db.jobs.items(job_id, "failed")
        pending = self.db.jobs.items(job_id, "pending")
        if pending and not failed:
            # a report that left some out: ask again for the rest
            raise Retry(f"{len(pending)} instance(s) missing from the commitment report")
        if not failed:
            self.db.jobs.set_detail(job_id, f"{job.total} instance(s) committed")
            return
        reasons = ", ".join(sorted({f.detail for f in failed}))
        msg = f"{len(failed)} of {job.total} instance(s) not committed ({reasons})"
        if params.get("round", 1) < 2:  # resend them and ask once more (docs/design.md "Sending and commitment")
            child = self.sending.send(job.node, [f.item for f in failed], {"commit": True, "round": 2},
                                      parent_id=job_id)
            raise Fail(f"{msg}; sending them again (job {child})", alert=False)
        self.alert("commit-failed", f"{job.node}: {msg} after a second attempt", level="warning")
        raise Fail(msg, alert=False)
