"""The persistent job queue: a state machine over the ``jobs`` table that knows no job kind.

A job is a row (`modality_link.db.jobs`) with a kind, a node (its destination, or a drive), a
list of items and a state: queued -> running -> done | failed | cancelled. Each kind registers
an executor with :meth:`JobQueue.register`: ``send`` (`modality_link.sending`), ``commit``
(`modality_link.storage_commitment`) and ``burn`` (`modality_link.burns`) on the service's
queue, ``mpps`` (`modality_link.mpps_outbox`) on a queue of its own over tables of its own.
Worker threads claim due jobs, at most the node's ``max_associations`` at a time per node, and
run their executor; what an attempt's outcome does to the job (attempts, back-off, failure,
alerts) is docs/design.md "Jobs and failures" and "Sending and commitment".

- *Chaining*: a job may name the job that queued it (``parent_id``: a commit after its send,
  a resend after a failed commitment; ``jobs.show`` lists the children) and a job that must end
  before it starts (``after_id``: the N-SET after its N-CREATE).
- *Crash safety*: a job left 'running' by a crash is queued again at start-up, so every
  executor must be able to resume (a send resumes with the instances not yet acknowledged).
- *Cancel and retry* (``jobs.cancel``, ``jobs.retry``): a queued job is cancelled at once, a
  running one stops at its executor's next safe point (:meth:`JobContext.should_stop`).
"""

from __future__ import annotations

import logging
import threading
import time
from dataclasses import dataclass
from typing import Any, Callable

from modality_link.config import Config, ConfigError, Node
from modality_link.db import FINAL_STATES, Database, Job, Jobs
from modality_link.errors import Conflict, NotFound
from modality_link.jsonlog import log_context

LOG = logging.getLogger("modality_link.jobs")

STATES = ("queued", "running", *FINAL_STATES)
#: The longest back-off between two attempts, in seconds.
MAX_BACKOFF = 3600.0


class Retry(Exception):
    """The attempt failed in a way that may succeed later (lost peer, out of resources).

    The job is queued again after the back-off; after its last attempt it fails, unless
    `forever`: then it is tried again for as long as it takes (an MPPS message must arrive).
    """

    def __init__(self, message: str, forever: bool = False) -> None:
        super().__init__(message)
        self.forever = forever


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


#: ``executor(job, ctx)`` runs one attempt; None when the job is done, or a :class:`Wait`.
Executor = Callable[[Job, JobContext], "Wait | None"]
#: Called with the job row once a job has reached done, failed or cancelled.
EndHook = Callable[[Job], None]


def _retries_plus_one(node: Node | None) -> int:
    return (node.retries if node is not None else 0) + 1


@dataclass(frozen=True)
class Kind:
    """How the queue runs the jobs of one kind (see :meth:`JobQueue.register`)."""

    executor: Executor
    max_attempts: Callable[[Node | None], int] = _retries_plus_one
    on_end: EndHook | None = None
    on_retry: Callable[[dict[str, Any]], dict[str, Any]] | None = None


class JobQueue:
    """Worker threads over a jobs table: `rows`, else ``db.jobs``.

    `publish(type, **fields)` sends an IPC event (``job.progress``), `alert(code, message)` tells
    the operator; `db` is for the executors, which reach the rest of the database through it.
    """

    def __init__(
        self,
        db: Database,
        get_config: Callable[[], Config],
        publish: Callable[..., None] = lambda *a, **k: None,
        alert: Callable[..., None] = lambda *a, **k: None,
        workers: int = 4,
        rows: Jobs | None = None,
    ) -> None:
        self.db = db
        self.rows = rows if rows is not None else db.jobs
        self.get_config = get_config
        self.publish = publish
        self.alert = alert
        self.workers = workers
        self._kinds: dict[str, Kind] = {}
        self._cond = threading.Condition()
        self._busy: dict[str, int] = {}
        self._stop = threading.Event()
        self._cancelled: set[int] = set()
        self._threads: list[threading.Thread] = []

    def register(
        self,
        kind: str,
        executor: Executor,
        *,
        max_attempts: Callable[[Node | None], int] = _retries_plus_one,
        on_end: EndHook | None = None,
        on_retry: Callable[[dict[str, Any]], dict[str, Any]] | None = None,
    ) -> None:
        """Add a job kind: ``executor(job, ctx)`` runs one attempt of a job of that kind.

        - `max_attempts(node)`: the attempts of a new job to that configured node (None when
          the node is not configured); the node's ``retries`` + 1 unless given;
        - `on_end(job)` is called once the job's row holds its final state (done, failed or
          cancelled), after its executor returned; for a job cancelled while queued, at once.
          A kind with an end hook reports its own failures: the queue raises no ``job-failed``
          alert for it;
        - `on_retry(params)`: the params an operator's retry starts again with (default: as
          they are).
        """
        self._kinds[kind] = Kind(executor, max_attempts, on_end, on_retry)

    def node(self, job: Job) -> Node:
        """The configured node a job goes to; the job fails when it is not configured (any more)."""
        try:
            return self.get_config().node(job.node)
        except ConfigError as exc:
            raise Fail(str(exc)) from None

    def announce(self, job_id: int, **live: Any) -> None:
        """Publish a ``job.progress`` event with the job's current row; `live` fields (done,
        failed...) replace the row's, for an executor that counts faster than it writes."""
        self._progress(job_id, **live)

    # -- life cycle -----------------------------------------------------------------------------

    def start(self) -> None:
        n = self.rows.requeue_running()
        if n:
            LOG.warning("jobs: %d job(s) interrupted by an earlier stop queued again", n)
        self._stop.clear()
        for i in range(self.workers):
            t = threading.Thread(target=self._worker, name=f"job-worker-{i}", daemon=True)
            t.start()
            self._threads.append(t)

    def stop(self, timeout: float = 10.0) -> None:
        """Ask the running attempts to stop at their next safe point (they are queued again,
        :class:`Stopping`) and wait for the workers, `timeout` seconds for all of them."""
        self._stop.set()
        self.wake()
        deadline = time.monotonic() + timeout
        for t in self._threads:
            t.join(max(deadline - time.monotonic(), 0.0))
        self._threads = []

    def alive(self) -> bool:
        """Whether every worker thread still runs (the service's watchdog asks)."""
        return bool(self._threads) and all(t.is_alive() for t in self._threads)

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
        after_id: int | None = None,
    ) -> int:
        """Queue a job; `max_attempts` defaults to the kind's for the node (see :meth:`register`)."""
        if max_attempts is None:
            k = self._kinds.get(kind)
            n = self.get_config().nodes.get(node)
            max_attempts = k.max_attempts(n) if k is not None else _retries_plus_one(n)
        job_id = self.rows.add(kind, node, items, params or {}, max_attempts, parent_id, after_id=after_id)
        LOG.info("job %d: %s of %d item(s) to %s queued", job_id, kind, len(items), node)
        self._progress(job_id)
        self.wake()
        return job_id

    def show(self, job_id: int) -> dict[str, Any]:
        """The job as ``jobs.show`` gives it (docs/ipc.md)."""
        job = self._get(job_id)
        return {
            **job.to_dict(),
            "children": self.rows.children(job_id),
            "attempt_history": [a.to_dict() for a in self.rows.attempts(job_id)],
            "failed_items": [it.to_dict() for it in self.rows.items(job_id, "failed")[:100]],
            "warning_items": [it.to_dict() for it in self.rows.items(job_id, "warning")[:100]],
        }

    def _get(self, job_id: int) -> Job:
        job = self.rows.get(job_id)
        if job is None:
            raise NotFound(f"no job {job_id}")
        return job

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
            if self.rows.end(job_id, "cancelled", detail="cancelled by the operator", only_if=job.state):
                break
        LOG.info("job %d cancelled (was %s)", job_id, job.state)
        self._progress(job_id)
        if job.state == "queued":  # no executor runs: it has ended now
            self._ended(job_id)
        return self.show(job_id)

    def retry(self, job_id: int) -> dict[str, Any]:
        """Queue a failed or cancelled job again: attempts reset, failed items pending again.
        A queued job (waiting for its next attempt, or for a commitment report) is tried now."""
        job = self._get(job_id)
        if job.state == "queued":
            if self.rows.make_due(job_id):
                LOG.info("job %d: tried now at the operator's request", job_id)
            self._progress(job_id)
            self.wake()
            return self.show(job_id)
        if job.state not in ("failed", "cancelled"):
            raise Conflict(f"job {job_id} is {job.state}; only a failed, cancelled or queued job can be retried")
        self._cancelled.discard(job_id)
        self.rows.reset_items(job_id)
        kind = self._kinds.get(job.kind)
        params = kind.on_retry(dict(job.params)) if kind is not None and kind.on_retry else job.params
        self.rows.requeue(job_id, "retried by the operator", at=time.time(), attempts=0, error="",
                             params=params, only_if=None)
        self._progress(job_id)
        self.wake()
        return self.show(job_id)

    def _ended(self, job_id: int) -> None:
        job = self.rows.get(job_id)
        kind = self._kinds.get(job.kind) if job is not None else None
        if job is None or kind is None or kind.on_end is None or job.state not in FINAL_STATES:
            return
        try:
            kind.on_end(job)
        except Exception:  # a bug in a hook must not stop the worker
            LOG.exception("job %d: end hook raised", job_id)

    # -- the workers ------------------------------------------------------------------------------

    def _limits(self) -> dict[str, int]:
        return {name: n.max_associations for name, n in self.get_config().nodes.items()}

    def _worker(self) -> None:
        while not self._stop.is_set():
            with self._cond:
                job = self.rows.claim(self._busy, self._limits())
                if job is None:
                    due = self.rows.next_due()
                    wait = 1.0 if due is None else min(max(due - time.time(), 0.01), 1.0)
                    self._cond.wait(wait)
                    continue
                self._busy[job.node] = self._busy.get(job.node, 0) + 1
            try:
                with log_context(job_id=job.id, node=job.node):  # the fields of JSON log lines
                    self._execute(job)
            finally:
                with self._cond:
                    self._busy[job.node] -= 1
                    self._cond.notify_all()

    def _execute(self, job: Job) -> None:
        job_id = job.id
        ctx = JobContext(job_id, self._stop, self._cancelled)
        kind = self._kinds.get(job.kind)
        self._progress(job_id)
        started, outcome, error = time.time(), "done", ""
        try:
            if kind is None:
                raise Fail(f"no executor for jobs of kind {job.kind!r}")
            result = kind.executor(job, ctx)
        except Stopping:
            outcome = "interrupted"
            self.rows.requeue(job_id, "interrupted; will resume")
        except Retry as exc:
            error = str(exc)
            outcome = "retry" if self._attempt_failed(job, error, exc.forever) else "failed"
        except Fail as exc:
            outcome, error = "failed", str(exc)
            LOG.error("job %d failed: %s", job_id, exc)
            self.rows.end(job_id, "failed", detail="failed", attempts=job.attempts + 1, error=str(exc))
            if exc.alert:
                self._alert_failed(job, str(exc))
        except Exception as exc:  # a bug: keep the worker; an attempt like any other
            error = f"{type(exc).__name__}: {exc}"
            if error != job.last_error:  # the traceback once, not at every attempt
                LOG.exception("job %d: unexpected error", job_id)
            outcome = "retry" if self._attempt_failed(job, error) else "failed"
        else:
            if isinstance(result, Wait):
                outcome, error = "wait", result.detail
                self.rows.requeue(job_id, result.detail, at=result.until)
            else:
                self.rows.end(job_id, "done")
                LOG.info("job %d done", job_id)
        self.rows.add_attempt(job_id, started, outcome, error)
        self._progress(job_id)
        self._ended(job_id)

    def _attempt_failed(self, job: Job, error: str, forever: bool = False) -> bool:
        """Queue the job again after the node's back-off (True), or fail it after its last
        attempt (False)."""
        job_id = job.id
        attempts = job.attempts + 1
        if attempts < job.max_attempts or forever:
            node = self.get_config().nodes.get(job.node)
            base = node.retry_interval if node else 30.0
            delay = min(base * 2 ** min(attempts - 1, 32), MAX_BACKOFF)
            LOG.warning("job %d: attempt %d failed (%s); next in %.1f s", job_id, attempts, error, delay)
            detail = f"attempt {attempts} failed; retrying" if forever else \
                f"attempt {attempts} of {job.max_attempts} failed; retrying"
            self.rows.requeue(job_id, detail, at=time.time() + delay, attempts=attempts, error=error)
            return True
        LOG.error("job %d failed after %d attempt(s): %s", job_id, attempts, error)
        self.rows.end(job_id, "failed", detail=f"gave up after {attempts} attempt(s)", attempts=attempts,
                         error=error)
        self._alert_failed(job, error)
        return False

    def _alert_failed(self, job: Job, error: str) -> None:
        """The ``job-failed`` alert, for kinds that do not report their failures themselves."""
        kind = self._kinds.get(job.kind)
        if kind is None or kind.on_end is None:
            self.alert("job-failed", f"{job.kind} job {job.id} to {job.node} failed: {error}")

    def _progress(self, job_id: int, **live: Any) -> None:
        job = self.rows.get(job_id)
        if job is None:
            return
        fields = dict(
            job_id=job_id, kind=job.kind, node=job.node, state=job.state,
            total=job.total, done=job.done, failed=job.failed, warnings=job.warnings,
            detail=job.detail, last_error=job.last_error, parent_id=job.parent_id,
        )
        self.publish("job.progress", **(fields | live))
