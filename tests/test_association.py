"""Why an association failed, told in one sentence (PS3.8 §9.3, Table 9-18), against real peers:
pynetdicom acceptors, DCMTK storescp, a silent socket, a full listen backlog, a closed port."""

from __future__ import annotations

import socket
import time
from pathlib import Path
from typing import Any, Iterator

import pytest
from pydicom.uid import ExplicitVRBigEndian, ExplicitVRLittleEndian, ImplicitVRLittleEndian
from pynetdicom import AE, build_role
from pynetdicom.sop_class import (
    CTImageStorage,
    ModalityPerformedProcedureStep,
    StorageCommitmentPushModel,
    Verification,
)

from modality_link.config import Node, Timeouts
from modality_link.net.association import AssociationFailed, NoContextAccepted, associate, make_ae
from modality_link.home import free_port
from sim import images
from tests.support.peers import start_storescp
from tests.support.service import InProcessService, call, cleanup, exam_home, make_home, wait_chain
from tests.support.waiting import wait_until


def _associate(port: int, contexts: list[Any], ext_neg: list[Any] | None = None,
               timeouts: Timeouts | None = None) -> None:
    ae = make_ae("MODLINK", timeouts or Timeouts())
    for cx in contexts:
        ae.add_requested_context(*cx) if isinstance(cx, tuple) else ae.add_requested_context(cx)
    with associate(ae, Node(ae_title="PEER", host="127.0.0.1", port=port), ext_neg=ext_neg):
        pass


@pytest.fixture(scope="module")
def peer() -> Iterator[int]:
    """A pynetdicom acceptor: Verification; CT only in Explicit VR Big Endian; Storage
    Commitment in neither role."""
    ae = AE("PEER")
    ae.add_supported_context(Verification)
    ae.add_supported_context(CTImageStorage, [ExplicitVRBigEndian])
    ae.add_supported_context(StorageCommitmentPushModel, scu_role=False, scp_role=False)
    server = ae.start_server(("127.0.0.1", 0), block=False)
    yield int(server.server_address[1])
    server.shutdown()


@pytest.mark.parametrize(
    "contexts, ext_neg, expected",
    [
        ([ModalityPerformedProcedureStep], None,
         "Modality Performed Procedure Step (1.2.840.10008.3.1.2.3.3): abstract syntax not supported"),
        ([(CTImageStorage, [ExplicitVRLittleEndian]), (CTImageStorage, [ImplicitVRLittleEndian])], None,
         "CT Image Storage (1.2.840.10008.5.1.4.1.1.2): transfer syntaxes not supported"),
        ([StorageCommitmentPushModel], [build_role(StorageCommitmentPushModel, scp_role=True)],
         "Storage Commitment Push Model (1.2.840.10008.1.20.1): user rejection"),
    ],
    ids=["abstract-syntax", "transfer-syntaxes", "user-rejection"],
)
def test_no_accepted_context_names_syntax_and_reason(peer: int, contexts, ext_neg, expected: str) -> None:
    with pytest.raises(NoContextAccepted) as exc:
        _associate(peer, contexts, ext_neg)
    msg = str(exc.value)
    assert f"association to PEER@127.0.0.1:{peer} failed: the peer accepted the association but none" in msg
    assert expected in msg and "no answer" not in msg
    assert exc.value.reason == "no-context"
    assert {uid for uid, _, _ in exc.value.rejected} == {str(c[0] if isinstance(c, tuple) else c) for c in contexts}


def test_one_accepted_context_is_enough(peer: int) -> None:
    _associate(peer, [ModalityPerformedProcedureStep, Verification])


def test_connection_refused() -> None:
    port = free_port()
    with pytest.raises(AssociationFailed, match=f"connection refused \\(nothing listens on 127.0.0.1:{port}\\)") as exc:
        _associate(port, [Verification])
    assert exc.value.reason == "refused"


def test_connect_timeout() -> None:
    """A listener whose accept queue is full drops our SYN: the TCP connect times out."""
    lsock = socket.socket()
    lsock.bind(("127.0.0.1", 0))
    lsock.listen(0)
    port = lsock.getsockname()[1]
    fillers = []
    try:
        for _ in range(3):
            c = socket.socket()
            c.setblocking(False)
            c.connect_ex(("127.0.0.1", port))
            fillers.append(c)
        time.sleep(0.2)
        start = time.monotonic()
        with pytest.raises(AssociationFailed, match="timed out: no TCP connection within 1 s") as exc:
            _associate(port, [Verification], timeouts=Timeouts(connect=1.0))
        assert exc.value.reason == "timeout" and time.monotonic() - start < 5
    finally:
        for c in fillers:
            c.close()
        lsock.close()


def test_silent_peer_acse_timeout() -> None:
    """TCP connects, the A-ASSOCIATE-RQ gets no answer (PS3.8 §9.1.5 ARTIM)."""
    with socket.socket() as lsock:
        lsock.bind(("127.0.0.1", 0))
        lsock.listen(5)
        with pytest.raises(AssociationFailed, match="connected, but no answer to the association "
                                                    "request within 0.5 s") as exc:
            _associate(lsock.getsockname()[1], [Verification], timeouts=Timeouts(acse=0.5))
    assert exc.value.reason == "no-answer"


@pytest.fixture
def storescp(tmp_path: Path) -> Iterator[int]:
    """DCMTK storescp: Storage SOP classes and Verification only (no MPPS, no commitment)."""
    port = free_port()
    out = tmp_path / "out"
    out.mkdir()
    proc = start_storescp(out, port)
    try:
        yield port
    finally:
        proc.terminate()
        proc.wait()


def test_mpps_to_a_storage_only_peer_says_why(storescp: int, tmp_path: Path) -> None:
    """The MPPS node points at a PACS by mistake: the outbox row says that the peer does not
    support Modality Performed Procedure Step, instead of 'no answer'."""
    node = Node(ae_title="STORESCP", host="127.0.0.1", port=storescp, roles=["mpps"], retry_interval=0.5)
    home = exam_home({"ris": node})
    svc = InProcessService(home)
    try:
        exam = svc.call("exam.start", patient_id="P1", patient_name="Wrong^Port")
        row = wait_until(lambda: (r := svc.call("exam.show", exam_id=exam["exam_id"])["mpps"][0])["attempts"] >= 1
                         and r, 10, "an N-CREATE attempt")
        assert row["state"] == "queued"
        assert (f"association to STORESCP@127.0.0.1:{storescp} failed: the peer accepted the association but "
                "none of the proposed presentation contexts: Modality Performed Procedure Step "
                "(1.2.840.10008.3.1.2.3.3): abstract syntax not supported") in row["last_error"]
    finally:
        svc.stop()
        cleanup(home)


def test_commit_job_fails_at_once_when_the_node_has_no_commitment(storescp: int, tmp_path: Path) -> None:
    """Send succeeds, the commit job fails on its first attempt (no retries of a configuration
    mistake) and names the Storage Commitment Push Model."""
    images.write_study(tmp_path / "study", modality="CT", images=2, rows=32, columns=32, seed=4)
    home = make_home(ae_title="STORESCP", port=storescp, commit_retries=3)
    service = InProcessService(home)
    try:
        call(home, "archive.import", paths=[str(tmp_path / "study")])
        study = call(home, "studies.list")[0]["study_uid"]
        job = wait_chain(home, call(home, "send", study_uids=[study], node="PACS", commit=True)["job_id"])
        assert job["kind"] == "commit" and job["state"] == "failed" and job["attempts"] == 1, job
        assert "Storage Commitment Push Model (1.2.840.10008.1.20.1): abstract syntax not supported" in job["last_error"]
    finally:
        service.stop()
        cleanup(home)
