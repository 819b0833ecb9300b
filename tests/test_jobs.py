"""The job queue's persistence and the node settings it uses (docs/design.md "Jobs and failures")."""

from __future__ import annotations

import logging

import pytest

from modality_link import config
from modality_link.config import ConfigError
from modality_link.db import Database, Job
from modality_link.jobs import FINAL_STATES, JobContext, JobQueue, Retry
from tests.support.waiting import wait_until


def test_running_job_is_requeued_after_a_crash(tmp_path):
    db = Database(tmp_path / "i.sqlite")
    job = db.jobs.add("send", "PACS", ["1.2.3", "1.2.4"], {"commit": True}, 3)
    assert db.jobs.claim({}, {"PACS": 1}).id == job
    db.jobs.mark_sent(job, "PACS", "1.2.3", "done", 0)
    db.close()
    db = Database(tmp_path / "i.sqlite")  # "restart"
    assert db.jobs.requeue_running() == 1
    row = db.jobs.get(job)
    assert row.state == "queued" and row.done == 1 and row.params == {"commit": True}
    assert [i.item for i in db.jobs.items(job, "pending")] == ["1.2.4"]


def test_per_destination_limit(tmp_path):
    db = Database(tmp_path / "i.sqlite")
    a = db.jobs.add("send", "PACS", ["1"], {}, 1)
    db.jobs.add("send", "PACS", ["2"], {}, 1)
    c = db.jobs.add("send", "OTHER", ["3"], {}, 1)
    assert db.jobs.claim({}, {"PACS": 1, "OTHER": 1}).id == a
    assert db.jobs.claim({"PACS": 1}, {"PACS": 1, "OTHER": 1}).id == c
    assert db.jobs.claim({"PACS": 1, "OTHER": 1}, {"PACS": 1, "OTHER": 1}) is None


def test_cancelled_job_is_not_marked_done(tmp_path):
    db = Database(tmp_path / "i.sqlite")
    job = db.jobs.add("send", "PACS", ["1"], {}, 1)
    db.jobs.claim({}, {"PACS": 1})
    db.jobs.end(job, "cancelled", only_if=None)
    assert not db.jobs.end(job, "done", only_if="running")
    assert db.jobs.get(job).state == "cancelled"


@pytest.mark.parametrize("key,value,words", [
    ("transfer_syntaxes", ["1.2.3"], "not a transfer syntax"),
    ("transfer_syntaxes", [], "non-empty"),
    ("max_associations", 0, "max_associations"),
    ("failure_policy", "ignore", "one of stop, continue"),
    ("auto_send", "study", "one of none, exam, series"),
    ("commit_wait", -1, "commit_wait"),
    ("retries", -1, "retries"),
])
def test_node_settings_validated(key, value, words):
    node = config.Node(ae_title="PACS")
    setattr(node, key, value)
    with pytest.raises(ConfigError, match=words):
        node.validate("nodes.PACS")


def test_unexpected_exception_fails_the_job_after_its_attempts(tmp_path, caplog):
    """An executor bug is an attempt like any other: after the node's retries the job fails
    with the exception's type and message, and the traceback is logged once."""
    cfg = config.Config()
    cfg.nodes["PACS"] = config.Node(ae_title="PACS", retries=2, retry_interval=0.05)
    alerts: list[tuple] = []
    queue = JobQueue(Database(tmp_path / "i.sqlite"), lambda: cfg,
                     alert=lambda *a, **k: alerts.append(a))
    calls: list[int] = []

    def broken(job: Job, ctx: JobContext) -> None:
        calls.append(job.attempts)
        raise KeyError("SOPInstanceUID")

    queue.register("broken", broken)
    queue.start()
    try:
        with caplog.at_level(logging.DEBUG, logger="modality_link.jobs"):
            job_id = queue.submit("broken", "PACS", ["1.2.3"])
            job = wait_until(lambda: (j := queue.show(job_id))["state"] in FINAL_STATES and j, 15, "the job's end")
    finally:
        queue.stop()
    assert job["state"] == "failed" and job["attempts"] == 3, job
    assert job["last_error"] == "KeyError: 'SOPInstanceUID'"
    assert calls == [0, 1, 2]
    tracebacks = [r for r in caplog.records if r.exc_info]
    assert len(tracebacks) == 1 and "unexpected error" in tracebacks[0].getMessage()
    assert [a[0] for a in alerts] == ["job-failed"] and "KeyError" in alerts[0][1]


def test_a_job_waits_for_the_job_it_comes_after(tmp_path):
    """after_id: the N-SET of an exam is not claimed while its N-CREATE has not ended."""
    db = Database(tmp_path / "i.sqlite")
    first = db.mpps_jobs.add("mpps", "RIS", [], {}, 1)
    second = db.mpps_jobs.add("mpps", "RIS", [], {}, 1, after_id=first)
    assert db.mpps_jobs.claim({}, {"RIS": 2}).id == first
    assert db.mpps_jobs.claim({}, {"RIS": 2}) is None
    assert db.mpps_jobs.next_due() is None  # nothing may start: no busy wait for the second
    db.mpps_jobs.end(first, "failed")
    assert db.mpps_jobs.claim({}, {"RIS": 2}).id == second
    assert db.jobs.latest() == []  # the MPPS queue has tables of its own


def test_retry_forever_outlasts_max_attempts(tmp_path):
    """A peer that cannot be reached yet (Retry(forever=True)) is tried again past the node's
    retries, with the back-off; the job ends done once an attempt succeeds."""
    cfg = config.Config()
    cfg.nodes["RIS"] = config.Node(ae_title="RIS", retries=0, retry_interval=0.01)
    queue = JobQueue(Database(tmp_path / "i.sqlite"), lambda: cfg)
    calls: list[int] = []

    def unreachable(job: Job, ctx: JobContext) -> None:
        calls.append(job.attempts)
        if len(calls) < 4:
            raise Retry("connection refused", forever=True)

    queue.register("flaky", unreachable)
    queue.start()
    try:
        job_id = queue.submit("flaky", "RIS", [])
        job = wait_until(lambda: (j := queue.show(job_id))["state"] in FINAL_STATES and j, 15, "the job's end")
    finally:
        queue.stop()
    assert job["state"] == "done" and job["max_attempts"] == 1 and job["attempts"] == 3, job
    assert calls == [0, 1, 2, 3]
