"""The persistent job queue (docs/design.md "Jobs and failures") and the send and commit jobs.

A job is a row in SQLite (`modality_link.db.jobs`) with a kind, a destination node, a list of
items (SOP Instance UIDs) and a state: queued -> running -> done | failed | cancelled. Worker
threads claim due jobs, at most ``node.max_associations`` at a time per destination.

Crash safety: every C-STORE success is committed to the database before the next instance is
sent, and a job left 'running' by a crash is queued again at start-up, so after SIGKILL a job
resumes with the instances not yet acknowledged; C-STORE is idempotent by SOP Instance UID.

Kinds:
- ``send``: C-STORE the items to the node (PS3.4 Annex B; `modality_link.net.storage`); retry
  with back-off; when every item is stored and commitment was asked for, queue a ``commit`` job
  for the same set.
- ``commit``: Storage Commitment Push (PS3.4 Annex J; `modality_link.net.commitment`); the
  report is matched by Transaction UID whether it comes on the N-ACTION's association or on a
  new one, before or after a restart (PS3.4 J.3.3); no report within ``commit_timeout`` -> the
  N-ACTION is repeated up to ``commit_retries`` times; failed instances are sent again and
  commitment asked once more, then a warning alert is raised (docs/design.md "Sending and
  commitment").
Other kinds register an executor with :meth:`JobQueue.register` (``burn``:
`modality_link.burns`), optionally with a hook called once the job has ended.
"""

from __future__ import annotations

import logging
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

from pynetdicom import evt
from pynetdicom.sop_class import StorageCommitmentPushModel

from modality_link import config
from modality_link.config import Config, ConfigError
from modality_link.db import FINAL_STATES, Database, Job, JobItem
from modality_link.errors import Conflict, Invalid, NotFound
from modality_link.net import commitment, storage
from modality_link.net.association import AssociationFailed, NoContextAccepted, associate, make_ae
from modality_link.net.status import COMMITMENT, PROCESSING_FAILURE, SUCCESS

LOG = logging.getLogger("modality_link.jobs")

STATES = ("queued", "running", "done", "failed", "cancelled")
MAX_BACKOFF = 3600.0


class Retry(Exception):
    """The attempt failed in a way that may succeed later (lost peer, out of resources)."""


class Fail(Exception):
    """The job cannot succeed; it ends failed with this sentence (and an alert unless quiet)."""

    def __init__(self, message: str, alert: bool = True) -> None:
        super().__init__(message)
        self.alert = alert


class Stopping(Exception):
    """The service stops or the job was cancelled during the attempt."""


@dataclass
class Wait:
    """Returned by an executor: queue the job again, without counting an attempt, until `until`."""

    until: float
    detail: str


@dataclass
class JobContext:
    """What an executor gets besides its job row."""

    job_id: int
    stop: threading.Event
    cancelled: set[int]

    def should_stop(self) -> bool:
        return self.stop.is_set() or self.job_id in self.cancelled


Executor = Callable[[Job, JobContext], "Wait | None"]
#: Called with the job row once a job has reached done, failed or cancelled.
EndHook = Callable[[Job], None]


class JobQueue:
    """Worker threads over the jobs table."""

    def __init__(
        self,
        db: Database,
        archive_root: Path,
        get_config: Callable[[], Config],
        publish: Callable[..., None] = lambda *a, **k: None,
        alert: Callable[..., None] = lambda *a, **k: None,
        workers: int = 4,
    ) -> None:
        self.db = db
        self.archive_root = Path(archive_root)
        self.get_config = get_config
        self.publish = publish
        self.alert = alert
        self.workers = workers
        self._executors: dict[str, Executor] = {"send": self._run_send, "commit": self._run_commit}
        self._on_end: dict[str, EndHook] = {}
        self._cond = threading.Condition()
        self._busy: dict[str, int] = {}
        self._stop = threading.Event()
        self._cancelled: set[int] = set()
        self._threads: list[threading.Thread] = []
        self._reports = commitment.ReportWaiter()
        self._associations = storage.AssociationPool()

    def register(self, kind: str, executor: Executor, on_end: EndHook | None = None) -> None:
        """Add a job kind (mpps, burn...): ``executor(job, ctx)`` returns None when done.

        `on_end(job)` is called once the job's row holds its final state (done, failed or
        cancelled), after its executor returned; for a job cancelled while queued, at once.
        """
        self._executors[kind] = executor
        if on_end is not None:
            self._on_end[kind] = on_end

    def announce(self, job_id: int) -> None:
        """Publish a ``job.progress`` event with the job's current row (an executor's progress)."""
        self._progress(job_id)

    # -- life cycle -----------------------------------------------------------------------------

    def start(self) -> None:
        n = self.db.jobs.requeue_running()
        if n:
            LOG.warning("jobs: %d job(s) interrupted by an earlier stop queued again", n)
        self._stop.clear()
        self._associations = storage.AssociationPool()
        for i in range(self.workers):
            t = threading.Thread(target=self._worker, name=f"job-worker-{i}", daemon=True)
            t.start()
            self._threads.append(t)

    def stop(self, timeout: float = 10.0) -> None:
        self._stop.set()
        self.wake()
        for t in self._threads:
            t.join(timeout)
        self._threads = []
        self._associations.close()

    def wake(self) -> None:
        with self._cond:
            self._cond.notify_all()

    # -- submitting and managing ------------------------------------------------------------------

    def submit(
        self,
        kind: str,
        node: str,
        items: list[str],
        params: dict[str, Any] | None = None,
        parent_id: int | None = None,
        max_attempts: int | None = None,
    ) -> int:
        cfg = self.get_config()
        n = cfg.nodes.get(node)
        if max_attempts is None:
            if kind == "commit":
                max_attempts = (n.commit_retries if n else 0) + 1
            else:
                max_attempts = (n.retries if n else 0) + 1
        job_id = self.db.jobs.add(kind, node, items, params or {}, max_attempts, parent_id)
        LOG.info("job %d: %s of %d item(s) to %s queued", job_id, kind, len(items), node)
        self._progress(job_id)
        self.wake()
        return job_id

    def submit_send(self, study_uids: list[str], node: str, commit: bool = False) -> int:
        """Queue a send job of every instance of the studies to `node` (the Send button)."""
        cfg = self.get_config()
        try:
            n = cfg.node(node)
        except ConfigError as exc:  # its message names the known nodes
            raise Invalid(str(exc)) from None
        if "store" not in n.roles:
            raise Invalid(f"nodes.{node}: this node has no 'store' role")
        if commit and "commit" not in n.roles:
            raise Invalid(f"nodes.{node}: this node has no 'commit' role (Storage Commitment)")
        uids: list[str] = []
        for study in study_uids:
            rows = self.db.index.study_instances(study)
            if not rows:
                raise NotFound(f"no study {study} in the archive")
            uids += [r.sop_instance_uid for r in rows]
        return self.submit("send", node, uids, {"commit": commit, "studies": study_uids})

    def on_exam_complete(self, study_uid: str, sop_instance_uids: list[str] | None = None) -> list[int]:
        """Auto-send rule "exam": queue the study to every node whose rule is "exam".

        From an exam end, `sop_instance_uids` are the exam's instances of the study (a second
        exam on the same study sends only its own); from an import, the whole study."""
        if sop_instance_uids is None:
            sop_instance_uids = [r.sop_instance_uid for r in self.db.index.study_instances(study_uid)]
        return self._auto("exam", sop_instance_uids, {"studies": [study_uid]})

    def on_series_complete(self, series_uid: str) -> list[int]:
        """Auto-send rule "series": queue the series to every node whose rule is "series"."""
        return self._auto("series", self.db.index.series_instance_uids(series_uid), {"series": series_uid})

    def _auto(self, rule: str, uids: list[str], extra: dict[str, Any] | None = None) -> list[int]:
        """Queue `uids` to each node with the `rule` and the store role, with Storage
        Commitment where the node has the commit role (docs/ipc.md, node settings)."""
        if not uids:
            return []
        jobs = []
        for name, node in self.get_config().nodes.items():
            if node.auto_send == rule and "store" in node.roles:
                params = {"commit": "commit" in node.roles, "auto": rule, **(extra or {})}
                jobs.append(self.submit("send", name, uids, params))
        return jobs

    def show(self, job_id: int) -> dict[str, Any]:
        """The job as ``jobs.show`` gives it (docs/ipc.md)."""
        job = self._get(job_id)
        return {
            **job.to_dict(),
            "children": self.db.jobs.children(job_id),
            "failed_items": [it.to_dict() for it in self.db.jobs.items(job_id, "failed")[:100]],
            "warning_items": [it.to_dict() for it in self.db.jobs.items(job_id, "warning")[:100]],
        }

    def _get(self, job_id: int) -> Job:
        job = self.db.jobs.get(job_id)
        if job is None:
            raise NotFound(f"no job {job_id}")
        return job

    def list(self) -> list[dict[str, Any]]:
        """The jobs as ``jobs.list`` gives them (docs/ipc.md)."""
        return [job.to_dict() for job in self.db.jobs.latest()]

    def cancel(self, job_id: int) -> dict[str, Any]:
        """Cancel a queued job, or ask a running one to stop at its next safe point.

        The row changes only from the state just read, so a job that ends (or is claimed by a
        worker) meanwhile is never marked cancelled after being done.
        """
        while True:
            job = self._get(job_id)
            if job.state not in ("queued", "running"):
                raise Conflict(f"job {job_id} is {job.state}; only a queued or running job can be cancelled")
            self._cancelled.add(job_id)
            if self.db.jobs.end(job_id, "cancelled", detail="cancelled by the operator", only_if=job.state):
                break
        LOG.info("job %d cancelled (was %s)", job_id, job.state)
        self._progress(job_id)
        if job.state == "queued":  # no executor runs: it has ended now
            self._ended(job_id)
        return self.show(job_id)

    def _ended(self, job_id: int) -> None:
        job = self.db.jobs.get(job_id)
        hook = self._on_end.get(job.kind) if job is not None else None
        if job is None or hook is None or job.state not in FINAL_STATES:
            return
        try:
            hook(job)
        except Exception:  # a bug in a hook must not stop the worker
            LOG.exception("job %d: end hook raised", job_id)

    def retry(self, job_id: int) -> dict[str, Any]:
        job = self._get(job_id)
        if job.state not in ("failed", "cancelled"):
            raise Conflict(f"job {job_id} is {job.state}; only a failed or cancelled job can be retried")
        self._cancelled.discard(job_id)
        self.db.jobs.reset_items(job_id)
        params = dict(job.params)
        params.pop("tx", None)
        params.pop("timeouts", None)
        self.db.jobs.requeue(job_id, "retried by the operator", at=time.time(), attempts=0, error="",
                             params=params, only_if=None)
        self._progress(job_id)
        self.wake()
        return self.show(job_id)

    # -- the workers ------------------------------------------------------------------------------

    def _limits(self) -> dict[str, int]:
        return {name: n.max_associations for name, n in self.get_config().nodes.items()}

    def _worker(self) -> None:
        while not self._stop.is_set():
            with self._cond:
                job = self.db.jobs.claim(self._busy, self._limits())
                if job is None:
                    due = self.db.jobs.next_due()
                    wait = 1.0 if due is None else min(max(due - time.time(), 0.01), 1.0)
                    self._cond.wait(wait)
                    continue
                self._busy[job.node] = self._busy.get(job.node, 0) + 1
            try:
                self._execute(job)
            finally:
                with self._cond:
                    self._busy[job.node] -= 1
                    self._cond.notify_all()

    def _execute(self, job: Job) -> None:
        job_id = job.id
        ctx = JobContext(job_id, self._stop, self._cancelled)
        executor = self._executors.get(job.kind)
        self._progress(job_id)
        try:
            if executor is None:
                raise Fail(f"no executor for jobs of kind {job.kind!r}")
            result = executor(job, ctx)
        except Stopping:
            self.db.jobs.requeue(job_id, "interrupted; will resume")
        except Retry as exc:
            self._attempt_failed(job, str(exc))
        except Fail as exc:
            LOG.error("job %d failed: %s", job_id, exc)
            self.db.jobs.end(job_id, "failed", detail="failed", attempts=job.attempts + 1, error=str(exc))
            if exc.alert:
                self.alert("job-failed", f"{job.kind} job {job_id} to {job.node} failed: {exc}")
        except Exception as exc:  # a bug: keep the worker; an attempt like any other
            error = f"{type(exc).__name__}: {exc}"
            if error != job.last_error:  # the traceback once, not at every attempt
                LOG.exception("job %d: unexpected error", job_id)
            self._attempt_failed(job, error)
        else:
            if isinstance(result, Wait):
                self.db.jobs.requeue(job_id, result.detail, at=result.until)
            else:
                self.db.jobs.end(job_id, "done")
                LOG.info("job %d done", job_id)
        self._progress(job_id)
        self._ended(job_id)

    def _attempt_failed(self, job: Job, error: str) -> None:
        """Queue the job again after the node's back-off (docs/design.md "Jobs and failures"),
        or fail it after its last attempt."""
        job_id = job.id
        attempts = job.attempts + 1
        if attempts < job.max_attempts:
            node = self.get_config().nodes.get(job.node)
            base = node.retry_interval if node else 30.0
            delay = min(base * 2 ** (attempts - 1), MAX_BACKOFF)
            LOG.warning("job %d: attempt %d failed (%s); next in %.1f s", job_id, attempts, error, delay)
            self.db.jobs.requeue(job_id, f"attempt {attempts} of {job.max_attempts} failed; retrying",
                                 at=time.time() + delay, attempts=attempts, error=error)
            return
        LOG.error("job %d failed after %d attempt(s): %s", job_id, attempts, error)
        self.db.jobs.end(job_id, "failed", detail=f"gave up after {attempts} attempt(s)", attempts=attempts,
                         error=error)
        self.alert("job-failed", f"{job.kind} job {job_id} to {job.node} failed: {error}")

    def _progress(self, job_id: int, **extra: Any) -> None:
        job = self.db.jobs.get(job_id)
        if job is None:
            return
        self.publish(
            "job.progress",
            job_id=job_id, kind=job.kind, node=job.node, state=job.state,
            total=job.total, done=job.done, failed=job.failed, warnings=job.warnings,
            detail=job.detail, last_error=job.last_error, parent_id=job.parent_id, **extra,
        )

    # -- send ---------------------------------------------------------------------------------------

    def _node(self, job: Job) -> config.Node:
        try:
            return self.get_config().node(job.node)
        except ConfigError as exc:
            raise Fail(str(exc)) from None

    def _run_send(self, job: Job, ctx: JobContext) -> Wait | None:
        cfg = self.get_config()
        node = self._node(job)
        job_id = job.id
        self.db.jobs.reset_items(job_id)  # failed items get another chance in this attempt
        instances: list[storage.Instance] = []
        for it in self.db.jobs.items(job_id, "pending"):
            row = self.db.index.instance(it.item)
            if row is None:
                self.db.jobs.set_item(job_id, it.item, "failed", None, "no longer in the archive")
                continue
            instances.append(storage.Instance(
                row.sop_instance_uid, row.sop_class_uid, row.transfer_syntax,
                self.archive_root / row.path,
            ))
        counts = {"done": job.total - len(instances), "failed": 0, "retryable": 0}
        total = job.total
        if instances:
            self.db.jobs.set_detail(job_id, f"sending {len(instances)} instance(s)")
            last_publish = [0.0]

            def on_result(inst: storage.Instance, out: storage.Outcome) -> bool:
                if out.state in ("done", "warning"):
                    self.db.jobs.mark_sent(job_id, job.node, inst.sop_instance_uid, out.state,
                                      out.status or 0, out.detail)
                    counts["done"] += 1
                    if out.state == "warning":
                        LOG.warning("job %d: %s stored with %s", job_id, inst.sop_instance_uid, out.detail)
                else:
                    self.db.jobs.set_item(job_id, inst.sop_instance_uid, "failed", out.status, out.detail)
                    counts["failed"] += 1
                    counts["retryable"] += out.retryable
                    LOG.error("job %d: %s %s", job_id, inst.sop_instance_uid, out.detail)
                now = time.monotonic()
                if now - last_publish[0] > 0.1 or counts["done"] + counts["failed"] == total:
                    last_publish[0] = now
                    self.publish("job.progress", job_id=job_id, kind="send", node=job.node,
                                 state="running", total=total, done=counts["done"],
                                 failed=counts["failed"], warnings=0, detail="sending",
                                 last_error="", parent_id=job.parent_id)
                return out.state != "failed" or node.failure_policy == "continue"

            while True:
                try:
                    assoc = self._associations.acquire(
                        job.node, node.host, node.port, cfg.station.ae_title, node.ae_title,
                        [i.sop_class_uid for i in instances], node.transfer_syntaxes, cfg.timeouts,
                        node.max_pdu)
                except AssociationFailed as exc:
                    raise Retry(str(exc)) from None
                answered = counts["done"] + counts["failed"]
                try:
                    storage.store_instances(assoc, instances, on_result, ctx.should_stop)
                except storage.AssociationLost as exc:
                    assoc.abort()
                    if assoc.reused and counts["done"] + counts["failed"] == answered:
                        # a kept association (idle_release) the peer dropped just as we used it: not a failure
                        LOG.info("job %d: the kept association to %s was gone (%s); opening a new one",
                                 job_id, assoc.peer, exc)
                        continue
                    raise Retry(f"{node.ae_title}@{node.host}:{node.port}: {exc}") from None
                except BaseException:
                    assoc.abort()
                    raise
                break
            if ctx.should_stop():
                assoc.abort()
                raise Stopping()
            self._associations.give_back(job.node, assoc, node.idle_release)
        failed = self.db.jobs.items(job_id, "failed")
        if failed:
            first = failed[0].detail
            msg = f"{len(failed)} of {total} instance(s) not stored (first: {first})"
            if counts["retryable"]:  # status.STORAGE.is_retryable; the others fail at once
                raise Retry(msg)
            raise Fail(msg)
        warnings = self.db.jobs.items(job_id, "warning")
        if warnings:
            self.db.jobs.set_detail(job_id, f"stored; {len(warnings)} with a warning ({warnings[0].detail})")
        else:
            self.db.jobs.set_detail(job_id, f"{total} instance(s) stored")
        params = job.params
        if params.get("commit"):
            uids = [it.item for it in self.db.jobs.items(job_id)]
            self.submit("commit", job.node, uids, {"round": params.get("round", 1)}, parent_id=job_id)
        return None

    # -- commit -------------------------------------------------------------------------------------

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
        LOG.info("commitment report for transaction %s from %s: %d committed, %d failed%s",
                 rep.transaction_uid, rep.calling_ae or node, len(committed), len(rep.failed),
                 f" ({rep.failure_text()})" if rep.failed else "")
        self._reports.seen(rep.transaction_uid)
        job = self.db.jobs.get(job_id)
        if job is not None and job.state == "queued":  # waiting: let a worker finish it now
            self.db.jobs.make_due(job_id)
            self.wake()
        self._progress(job_id)

    def _run_commit(self, job: Job, ctx: JobContext) -> Wait | None:
        cfg = self.get_config()
        node = self._node(job)
        job_id, params = job.id, dict(job.params)
        if "commit" not in node.roles:
            raise Fail(f"nodes.{job.node}: this node has no 'commit' role")
        tx = params.get("tx")
        if tx:
            row = self.db.jobs.transaction(tx)
            if row is not None and row.reported_at is not None:
                return self._commit_result(job, params)
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
        refs = []
        for uid in uids:
            if uid in done:
                continue
            inst = self.db.index.instance(uid)
            if inst is None:
                self.db.jobs.set_item(job_id, uid, "failed", None, "no longer in the archive")
                continue
            refs.append((inst.sop_class_uid, uid))
        if not refs:
            return self._commit_result(job, params)
        self._associations.release_idle(job.node)  # the node's max_associations counts this one too
        tx = commitment.new_transaction_uid()
        params.update(tx=tx, deadline=time.time() + node.commit_timeout,
                      requests=params.get("requests", 0) + 1)
        self.db.jobs.add_transaction(tx, job_id, job.node)
        self.db.jobs.set_detail(job_id, params=params,
                                detail=f"asking commitment of {len(refs)} instance(s), transaction {tx}")
        ae = make_ae(cfg.station.ae_title, cfg.timeouts, node.max_pdu)
        ae.add_requested_context(StorageCommitmentPushModel)
        handler = commitment.report_handler(self.handle_report)
        answered = threading.Event()  # our N-EVENT-REPORT-RSP left: safe to release
        got_here = threading.Event()  # a report came on this association

        def on_sent(event: evt.Event) -> None:
            if type(event.message).__name__ == "N_EVENT_REPORT_RSP":
                answered.set()

        def on_report(event: evt.Event) -> tuple[int, None]:
            got_here.set()
            return handler(event)

        handlers = [(evt.EVT_N_EVENT_REPORT, on_report), (evt.EVT_DIMSE_SENT, on_sent)]
        try:
            with associate(ae, node, evt_handlers=handlers) as assoc:
                try:
                    status = commitment.request(assoc, tx, refs)
                except ConnectionError as exc:
                    raise Retry(str(exc)) from None
                if status != SUCCESS:
                    assoc.abort()  # a refused request: docs/design.md "Sending and commitment"
                    msg = f"{node.ae_title} refused the commitment request (N-ACTION status 0x{status:04X})"
                    self.alert("commit-refused", msg)
                    raise Fail(msg)
                LOG.info("job %d: commitment of %d instance(s) requested, transaction %s",
                         job_id, len(refs), tx)
                end = time.monotonic() + node.commit_wait
                while time.monotonic() < end and assoc.is_established and not ctx.should_stop():
                    if self._reports.wait(tx, min(0.2, end - time.monotonic()), assoc):
                        if got_here.is_set():
                            answered.wait(5.0)
                        break
        except NoContextAccepted as exc:  # the node does not offer commitment: asking again won't help
            raise Fail(str(exc)) from None
        except AssociationFailed as exc:
            raise Retry(str(exc)) from None
        row = self.db.jobs.transaction(tx)
        if row is not None and row.reported_at is not None:
            return self._commit_result(job, params)
        return Wait(params["deadline"], f"waiting for the commitment report of transaction {tx}")

    def _commit_result(self, job: Job, params: dict[str, Any]) -> None:
        job_id = job.id
        failed = self.db.jobs.items(job_id, "failed")
        pending = self.db.jobs.items(job_id, "pending")
        if pending and not failed:
            # a report that left some out: ask again for the rest
            raise Retry(f"{len(pending)} instance(s) missing from the commitment report")
        if not failed:
            self.db.jobs.set_detail(job_id, f"{job.total} instance(s) committed")
            return None
        reasons = ", ".join(sorted({f.detail for f in failed}))
        msg = f"{len(failed)} of {job.total} instance(s) not committed ({reasons})"
        if params.get("round", 1) < 2:  # resend them and ask once more (docs/design.md "Sending and commitment")
            child = self.submit("send", job.node, [f.item for f in failed],
                                {"commit": True, "round": 2}, parent_id=job_id)
            raise Fail(f"{msg}; sending them again (job {child})", alert=False)
        self.alert("commit-failed", f"{job.node}: {msg} after a second attempt", level="warning")
        raise Fail(msg, alert=False)
