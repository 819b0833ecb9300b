"""The send association (modality_link.net.upper_layer) against real peers on loopback:
kept open between jobs and released after idle (nodes.*.idle_release), a peer that closes a kept
association, the peer's maximum PDU length (PS3.8 §9.3.5), rejection and negotiation reasons
(PS3.8 Tables 9-18 and 9-21), and a peer that never answers (the DIMSE timeout)."""

from __future__ import annotations

import hashlib
import shutil
import tempfile
import time
from pathlib import Path

import pytest
from pydicom import dcmread

from modality_link import config
from modality_link.config import Timeouts
from modality_link.net import storage, upper_layer
from modality_link.net.association import AssociationFailed
from modality_link.home import free_port
from sim.pacs import Pacs
from tests.support.instances import generated_study
from tests.support.peers import start_storescp
from tests.support.service import InProcessService, call, cleanup, make_home, wait_chain
from tests.support.waiting import wait_until

CT = "1.2.840.10008.5.1.4.1.1.2"
SYNTAXES = ["1.2.840.10008.1.2.1", "1.2.840.10008.1.2"]


@pytest.fixture(scope="module")
def study_dir():
    with generated_study(modality="CT", images=6, rows=64, columns=64, seed=11) as d:
        yield d


def instances(d: Path) -> list[storage.Instance]:
    out = []
    for f in sorted(d.iterdir()):
        ds = dcmread(f, stop_before_pixels=True)
        out.append(storage.Instance(ds.SOPInstanceUID, ds.SOPClassUID, ds.file_meta.TransferSyntaxUID, f))
    return out


class Station:
    """A service whose node PACS is a simulated PACS; `timeouts` edits the config first."""

    def __init__(self, study_dir: Path, node_kw: dict, pacs: Pacs, **timeouts: float) -> None:
        self.pacs = pacs.start()
        self.home = make_home(ae_title=pacs.ae_title, port=self.pacs.port, **node_kw)
        cfg = config.load(self.home.config_path)
        for key, value in timeouts.items():
            setattr(cfg.timeouts, key, value)
        config.save(cfg, self.home.config_path)
        self.service = InProcessService(self.home)
        call(self.home, "archive.import", paths=[str(study_dir)])
        self.study = call(self.home, "studies.list")[0]["study_uid"]

    def send(self) -> dict:
        job = call(self.home, "send", study_uids=[self.study], node="PACS", commit=False)
        return wait_chain(self.home, job["job_id"], 30)

    def close(self) -> None:
        self.service.stop()
        self.pacs.stop()
        cleanup(self.home)


@pytest.fixture
def station(study_dir):
    made: list[Station] = []

    def make(node_kw: dict | None = None, pacs: Pacs | None = None, **timeouts: float) -> Station:
        s = Station(study_dir, {"roles": ["store"], **(node_kw or {})}, pacs or Pacs(), **timeouts)
        made.append(s)
        return s

    yield make
    for s in made:
        s.close()


def test_jobs_to_one_node_share_one_association(station):
    """The association stays open after a job; the next job to the node reuses it, and it
    is released (A-RELEASE, not aborted) when the service stops."""
    s = station({"idle_release": 30})
    assert s.send()["state"] == "done"
    assert s.send()["state"] == "done"
    assert s.pacs.associations == 1 and s.pacs.store_calls == 12 and s.pacs.max_open == 1
    s.service.stop()
    assert wait_until(lambda: s.pacs.released == 1, 5.0, "the association released")


def test_idle_association_released_after_idle_release(station):
    s = station({"idle_release": 0.5})
    assert s.send()["state"] == "done"
    assert wait_until(lambda: s.pacs.released == 1, 5.0, "the idle association released")
    assert s.send()["state"] == "done"
    assert s.pacs.associations == 2  # the first was released: a new one for the second job


def test_idle_release_zero_releases_at_job_end(station):
    s = station({"idle_release": 0})
    assert s.send()["state"] == "done"
    assert wait_until(lambda: s.pacs.released == 1, 2.0, "the association released at the job's end")


def test_peer_closing_a_kept_association_costs_no_attempt(station):
    """A PACS that aborts idle associations: the next job opens a new one, no retry counted."""
    s = station({"idle_release": 30, "retries": 0})
    assert s.send()["state"] == "done"
    assert s.pacs.abort_associations() == 1
    time.sleep(0.2)
    job = s.send()
    assert job["state"] == "done" and job["attempts"] == 0, job
    assert s.pacs.associations == 2 and len(s.pacs.received) == 6


def test_kept_association_dropped_at_first_use_is_replaced_without_an_attempt(station):
    """The peer aborts a kept association on the first C-STORE of the next job (its idle
    timeout raced our reuse): the job goes on at once on a new association."""
    s = station({"idle_release": 30, "retries": 0}, Pacs(abort_after=7))
    assert s.send()["state"] == "done"
    job = s.send()
    assert job["state"] == "done" and job["attempts"] == 0, job
    assert s.pacs.associations == 2 and len(s.pacs.received) == 6


def test_rejected_sop_class_names_the_negotiation_reason(station):
    """PS3.8 Table 9-18: the instances fail with the reason the peer gave."""
    s = station({"retries": 0}, Pacs(reject_sop_classes=(CT,)))
    job = s.send()
    assert job["state"] == "failed"
    detail = job["failed_items"][0]["detail"]
    assert "rejected its SOP class" in detail and "abstract syntax not supported" in detail, detail


def test_silent_peer_hits_the_dimse_timeout(station):
    """No C-STORE response within the DIMSE timeout -> association aborted, job retried."""
    s = station({"retries": 1, "retry_interval": 0.2}, Pacs(ack_delay=3.0), dimse=1.0)
    t = time.monotonic()
    job = s.send()
    assert time.monotonic() - t < 20
    assert job["state"] == "failed", job
    assert "DIMSE timeout" in job["last_error"], job["last_error"]


def test_wrong_called_ae_rejection_reason(study_dir):
    pacs = Pacs()
    pacs.ae.require_called_aet = True
    pacs.start()
    try:
        with pytest.raises(AssociationFailed, match="called AE title not recognized"):
            storage.AssociationPool().acquire(
                "k", "127.0.0.1", pacs.port, "MODLINK", "NOTPACS", [CT], SYNTAXES, Timeouts(), 16384)
    finally:
        pacs.stop()


def test_nobody_listening_says_connection_refused():
    with pytest.raises(AssociationFailed, match="cannot connect"):
        storage.AssociationPool().acquire(
            "k", "127.0.0.1", free_port(), "MODLINK", "PACS", [CT], SYNTAXES, Timeouts(), 16384)


@pytest.mark.parametrize("max_pdu, streamed", [("4096", False), ("131072", False), ("4096", True)])
def test_peer_max_pdu_fragmentation_to_storescp(study_dir, max_pdu, streamed, monkeypatch):
    """Fragments never exceed the peer's maximum PDU length (storescp rejects a larger one),
    whether the file is sent from memory or streamed from disk a block at a time (a large
    multi-frame object; here the thresholds are lowered). Pixel data arrives identical."""
    if streamed:
        monkeypatch.setattr(storage, "IN_MEMORY", 1000)
        monkeypatch.setattr(upper_layer, "STREAM_BLOCK", 3000)
    out = Path(tempfile.mkdtemp(prefix="mlscp"))
    port = free_port()
    scp = start_storescp(out, port, "--max-pdu", max_pdu)
    try:
        insts = instances(study_dir)
        assoc = storage.AssociationPool().acquire(
            "k", "127.0.0.1", port, "MODLINK", "STORESCP", [CT], SYNTAXES, Timeouts(), 16384)
        assert assoc.peer_max_pdu == int(max_pdu)
        results = []
        storage.store_instances(assoc, insts, lambda i, o: results.append(o.state) or True)
        assoc.release()
        assert results == ["done"] * len(insts)
        for inst in insts:
            got = dcmread(next(out.glob(f"*{inst.sop_instance_uid}*")))
            assert hashlib.sha256(got.PixelData).digest() == hashlib.sha256(dcmread(inst.path).PixelData).digest()
    finally:
        scp.terminate()
        scp.wait(10)
        shutil.rmtree(out, ignore_errors=True)


def test_commit_job_releases_the_kept_send_association(station):
    """The node's limit of one association holds when the commitment job opens
    its own: the idle send association is released first."""
    s = station({"idle_release": 30, "roles": ["store", "commit"], "commit_wait": 5.0})
    job = call(s.home, "send", study_uids=[s.study], node="PACS", commit=True)
    last = wait_chain(s.home, job["job_id"], 30)
    assert last["kind"] == "commit" and last["state"] == "done", last
    assert s.pacs.associations == 2 and s.pacs.max_open == 1
