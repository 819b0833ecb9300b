"""Storage SCU and Storage Commitment SCU against the simulated PACS in each quirk mode
(PS3.4 Annex B and Annex J; the failures, retries and statuses of docs/design.md "Jobs and
failures"). Real associations on loopback."""

from __future__ import annotations

from pathlib import Path

import pytest
from pydicom import dcmread
from pydicom.uid import ImplicitVRLittleEndian

from modality_link import config
from sim.pacs import Pacs
from tests.support.instances import generated_study
from tests.support.service import InProcessService, call, cleanup, make_home, wait_chain
from tests.support.waiting import wait_until


@pytest.fixture(scope="module")
def study_dir():
    with generated_study(modality="CT", images=10, rows=64, columns=64, seed=3) as d:
        yield d


class Rig:
    """A service in a temporary home, node PACS = a simulated PACS with quirks."""

    def __init__(self, study_dir: Path, node_kw: dict | None = None, **pacs_kw) -> None:
        self.pacs = Pacs(**pacs_kw).start()
        self.home = make_home(ae_title="SIMPACS", port=self.pacs.port, **(node_kw or {}))
        cfg = config.load(self.home.config_path)
        self.pacs.report_to = (cfg.disk_server.ae_title, "127.0.0.1", cfg.disk_server.port)
        self.service = InProcessService(self.home)
        call(self.home, "archive.import", paths=[str(study_dir)])
        self.study = call(self.home, "studies.list")[0]["study_uid"]

    def send(self, commit: bool = True, timeout: float = 30.0) -> dict:
        job = call(self.home, "send", study_uids=[self.study], node="PACS", commit=commit)
        return wait_chain(self.home, job["job_id"], timeout)

    def nodes(self) -> dict:
        return call(self.home, "studies.list")[0]["nodes"]

    def close(self) -> None:
        self.service.stop()
        self.pacs.stop()
        cleanup(self.home)


@pytest.fixture
def rig(study_dir):
    made: list[Rig] = []

    def make(node_kw: dict | None = None, **kw) -> Rig:
        r = Rig(study_dir, node_kw, **kw)
        made.append(r)
        return r

    yield make
    for r in made:
        r.close()


@pytest.mark.parametrize("mode", ["same", "new", "new-role"])
def test_commitment_report_modes(rig, mode):
    r = rig(commit_mode=mode)
    job = r.send()
    assert job["kind"] == "commit" and job["state"] == "done", job
    assert len(r.pacs.received) == 10
    assert r.pacs.reports_sent[0][1] == mode
    assert r.nodes() == {"PACS": {"sent": 10, "committed": 10}}
    # the N-ACTION names every instance sent (PS3.4 J.3.2)
    action = r.pacs.actions[0]
    assert action.TransactionUID and len(action.ReferencedSOPSequence) == 10


def test_report_later_than_same_association_wait(rig):
    """The report comes after our same-association wait, on a new association (PS3.4 J.3.3)."""
    r = rig(node_kw={"commit_wait": 0.3}, commit_mode="same", commit_delay=1.0)
    job = r.send()
    assert job["state"] == "done", job
    assert r.pacs.reports_sent[0][1] == "new"


def test_several_reports_on_one_association(rig, study_dir):
    """Two transactions reported on one new association."""
    r = rig(node_kw={"commit_wait": 0.0}, commit_mode="multi", multi_count=2)
    first = call(r.home, "send", study_uids=[r.study], node="PACS", commit=True)["job_id"]
    second = call(r.home, "send", study_uids=[r.study], node="PACS", commit=True)["job_id"]
    assert wait_chain(r.home, first)["state"] == "done"
    assert wait_chain(r.home, second)["state"] == "done"
    assert r.pacs.report_associations == 1 and len(r.pacs.reports_sent) == 2


def test_partial_failure_resent_and_recommitted(rig):
    """2 of 10 fail -> those 2 resent, commitment asked again -> all committed."""
    r = rig(commit_mode="same", fail_commit=2, fail_commit_rounds=1)
    job = r.send()
    assert job["state"] == "done" and job["total"] == 2, job
    assert r.nodes()["PACS"]["committed"] == 10
    alerts = call(r.home, "alerts.list")
    assert not [a for a in alerts if a["code"] == "commit-failed"]


def test_partial_failure_twice_raises_warning(rig):
    r = rig(commit_mode="same", fail_commit=2, fail_commit_rounds=99)
    job = r.send()
    assert job["state"] == "failed" and "not committed" in job["last_error"], job
    assert r.nodes()["PACS"]["committed"] == 8
    alerts = call(r.home, "alerts.list")
    assert [a for a in alerts if a["code"] == "commit-failed" and a["level"] == "warning"]


def test_never_reporting_times_out_and_retries(rig):
    """No report -> the N-ACTION is repeated commit_retries times, then the job fails."""
    r = rig(node_kw={"commit_wait": 0.2, "commit_timeout": 0.5, "commit_retries": 2}, commit_mode="never")
    job = r.send()
    assert job["state"] == "failed" and "no commitment report" in job["last_error"], job
    assert len(r.pacs.actions) == 3
    assert r.nodes()["PACS"] == {"sent": 10, "committed": 0}


def test_n_action_refused(rig):
    """N-ACTION-RSP != 0000 -> transaction failed, operator told."""
    r = rig(commit_mode="same", action_status=0x0110)
    job = r.send()
    assert job["state"] == "failed" and "0x0110" in job["last_error"]
    assert [a for a in call(r.home, "alerts.list") if a["code"] == "commit-refused"]


@pytest.mark.parametrize("status", [0xB000, 0xB006, 0xB007])
def test_store_warning_statuses_count_as_stored(rig, status):
    r = rig(store_status=status)
    job = r.send(commit=False)
    assert job["state"] == "done" and job["warnings"] == 10, job
    assert "warning" in job["detail"]


@pytest.mark.parametrize("status", [0xA700, 0x0213])
def test_retryable_failures_are_retried(rig, status):
    """Out of resources is retried after the interval; here the peer recovers."""
    r = rig(node_kw={"retries": 2}, store_status=lambda i, uid: status if i < 3 else 0)
    job = r.send(commit=False)
    assert job["state"] == "done" and job["attempts"] == 1, job
    assert len(r.pacs.received) == 10


@pytest.mark.parametrize("status", [0xA900, 0xC000, 0x0122])
def test_refusal_that_cannot_succeed_fails_at_once(rig, status):
    """A refusal that the same request would get again fails the job at its first attempt,
    with the status and its meaning, although the node allows retries."""
    r = rig(node_kw={"retries": 3}, store_status=status)
    job = r.send(commit=False)
    assert job["state"] == "failed" and job["attempts"] == 1, job
    assert f"0x{status:04X}" in job["last_error"], job
    if status == 0xA900:
        assert "Data Set Does Not Match SOP Class" in job["last_error"], job
    assert r.pacs.store_calls == 10 and not r.pacs.received  # each instance sent once


@pytest.mark.parametrize("status", [0xA700, 0xA701, 0xA900, 0xC000, 0xC001, 0xC006, 0x0110])
def test_failure_statuses_continue_policy(rig, status):
    """Every failure status: with policy continue the other instances are stored, the job fails."""
    r = rig(node_kw={"retries": 0, "failure_policy": "continue"},
            store_status=lambda i, uid: status if i % 5 == 0 else 0)
    job = r.send(commit=False)
    assert job["state"] == "failed" and f"0x{status:04X}" in job["last_error"], job
    assert len(r.pacs.received) == 8
    show = call(r.home, "jobs.show", id=job["id"])
    assert len(show["failed_items"]) == 2


def test_failure_policy_stop(rig):
    r = rig(node_kw={"retries": 0, "failure_policy": "stop"},
            store_status=lambda i, uid: 0xC000 if i == 2 else 0)
    job = r.send(commit=False)
    assert job["state"] == "failed"
    assert r.pacs.store_calls == 3 and len(r.pacs.received) == 2


def test_abort_mid_transfer_requeues(rig):
    """The peer aborts after 4 C-STOREs -> the job goes back to queued and completes."""
    r = rig(abort_after=4)
    job = r.send()
    assert job["state"] == "done", job
    assert len(r.pacs.received) == 10
    send_job = call(r.home, "jobs.show", id=job["parent_id"])
    assert send_job["attempts"] == 1 and "abort" in send_job["last_error"]


def test_slow_acknowledgements(rig):
    r = rig(ack_delay=0.1)
    job = r.send()
    assert job["state"] == "done" and len(r.pacs.received) == 10


def test_ile_only_peer_gets_converted_pixels_identical(rig, study_dir):
    """Stored ELE, the peer accepts only ILE -> sent in ILE, pixel data identical
    (docs/design.md "Identity and transfer syntaxes")."""
    r = rig(transfer_syntaxes=[ImplicitVRLittleEndian])
    job = r.send(commit=False)
    assert job["state"] == "done", job
    import hashlib
    for f in study_dir.iterdir():
        ds = dcmread(f)
        got = r.pacs.received[ds.SOPInstanceUID]
        assert got.transfer_syntax == ImplicitVRLittleEndian
        assert got.pixel_sha256 == hashlib.sha256(ds.PixelData).hexdigest()


def test_rejected_sop_class_fails_those_instances(rig):
    r = rig(reject_sop_classes=("1.2.840.10008.5.1.4.1.1.2",), node_kw={"retries": 0})
    job = r.send(commit=False)
    # every context rejected: pynetdicom aborts the association set-up itself
    assert job["state"] == "failed" and len(r.pacs.received) == 0


def test_cancel_and_retry(rig):
    r = rig(node_kw={"retries": 5, "retry_interval": 30.0}, store_status=0xA700)
    job_id = call(r.home, "send", study_uids=[r.study], node="PACS")["job_id"]
    wait_until(lambda: call(r.home, "jobs.show", id=job_id)["attempts"] >= 1, 30, "the first failed attempt")
    assert call(r.home, "jobs.cancel", id=job_id)["state"] == "cancelled"
    r.pacs.store_status = 0
    assert call(r.home, "jobs.retry", id=job_id)["state"] == "queued"
    assert wait_chain(r.home, job_id)["state"] == "done"


def test_auto_send_exam_rule_on_import(study_dir):
    pacs = Pacs(commit_mode="same").start()
    home = make_home(ae_title="SIMPACS", port=pacs.port, auto_send="exam")
    service = InProcessService(home)
    try:
        res = call(home, "archive.import", paths=[str(study_dir)])
        assert len(res["jobs"]) == 1
        job = wait_chain(home, res["jobs"][0])
        assert job["kind"] == "commit" and job["state"] == "done"
    finally:
        service.stop()
        pacs.stop()
        cleanup(home)
