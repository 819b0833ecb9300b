"""The acceptor's Reply while a handler runs: pending responses, C-CANCEL-RQ (PS3.7 §9.3.2.3),
and C-STORE sub-operations on the same association (C-GET, PS3.4 C.4.3), with pynetdicom as
the requestor."""

from __future__ import annotations

import threading
from collections.abc import Iterator

import pytest
from pydicom.dataset import Dataset
from pydicom.uid import ExplicitVRLittleEndian, generate_uid
from pynetdicom import AE, build_role, evt
from pynetdicom.sop_class import (
    CTImageStorage,
    StudyRootQueryRetrieveInformationModelFind,
    StudyRootQueryRetrieveInformationModelGet,
)

from modality_link import config
from modality_link.home import free_port
from modality_link.net.acceptor import C_FIND_RQ, C_GET_RQ, Acceptor, DataSetSink, InMemory, Reply, Request, Service
from sim import images

FIND = str(StudyRootQueryRetrieveInformationModelFind)
GET = str(StudyRootQueryRetrieveInformationModelGet)


def _identifier(n: int) -> bytes:
    ds = Dataset()
    ds.QueryRetrieveLevel = "STUDY"
    ds.StudyInstanceUID = f"1.2.3.{n}"
    from pydicom.filebase import DicomBytesIO
    from pydicom.filewriter import write_dataset

    fp = DicomBytesIO()
    fp.is_little_endian, fp.is_implicit_VR = True, False  # the context's Explicit VR Little Endian
    write_dataset(fp, ds)
    return fp.getvalue()


class EndlessFind:
    """Pending responses until cancelled (then 0xFE00), at most `limit`."""

    def __init__(self, limit: int = 1_000_000) -> None:
        self.limit = limit
        self.sent = 0
        self.first_sent = threading.Event()

    def sink(self, request: Request) -> DataSetSink:
        return InMemory()

    def handle(self, request: Request, data: DataSetSink | None, reply: Reply) -> None:
        for n in range(self.limit):
            if reply.cancelled():
                reply(0xFE00)
                return
            reply(0xFF00, "", None, _identifier(n))
            self.sent += 1
            self.first_sent.set()
        reply(0x0000)


class GetOne:
    """A C-GET SCP that sends `files` as C-STORE sub-operations and reports the counts."""

    def __init__(self, datasets: list[Dataset]) -> None:
        self.datasets = datasets
        self.results: list[tuple[int, str]] = []

    def sink(self, request: Request) -> DataSetSink:
        return InMemory()

    def handle(self, request: Request, data: DataSetSink | None, reply: Reply) -> None:
        from pydicom.filebase import DicomBytesIO
        from pydicom.filewriter import write_dataset

        for ds in self.datasets:
            ((cid, ts),) = reply.storage_contexts(ds.SOPClassUID)
            assert ts == ExplicitVRLittleEndian
            fp = DicomBytesIO()
            fp.is_little_endian, fp.is_implicit_VR = True, False
            write_dataset(fp, ds)
            self.results.append(reply.store(cid, ds.SOPInstanceUID, fp.getvalue(), ("GETSCU", request.message_id)))
        failed = sum(1 for status, _ in self.results if status != 0)
        reply(0x0000 if not failed else 0xB000, "", None, None)


@pytest.fixture
def acceptor_with(request: pytest.FixtureRequest) -> Iterator[Acceptor]:
    handlers = request.param
    lst = config.Listener(ae_title="QRSCP", port=free_port(), bind_address="127.0.0.1")
    services = [
        Service([FIND], [ExplicitVRLittleEndian], {C_FIND_RQ: handlers["find"]}),
        Service([GET], [ExplicitVRLittleEndian], {C_GET_RQ: handlers["get"]}),
        Service([str(CTImageStorage)], [ExplicitVRLittleEndian], {}, requestor_scp=True),
    ]
    acc = Acceptor(lst, config.Timeouts(acse=5, network=5, artim=2), services, "qr-test")
    acc.start()
    yield acc
    acc.stop()
    assert acc.faults == 0


FIND_HANDLER = EndlessFind()


@pytest.mark.parametrize("acceptor_with", [{"find": FIND_HANDLER, "get": GetOne([])}], indirect=True)
def test_c_cancel_ends_a_find_with_fe00(acceptor_with: Acceptor) -> None:
    ae = AE(ae_title="FINDSCU")
    ae.add_requested_context(FIND, ExplicitVRLittleEndian)
    assoc = ae.associate("127.0.0.1", acceptor_with.port, ae_title="QRSCP")
    assert assoc.is_established
    query = Dataset()
    query.QueryRetrieveLevel = "STUDY"
    query.StudyInstanceUID = ""
    statuses = []
    try:
        for n, (status, identifier) in enumerate(assoc.send_c_find(query, FIND, msg_id=7)):
            statuses.append(status.Status)
            if n == 2:
                assoc.send_c_cancel(7, query_model=FIND)
        assert statuses[-1] == 0xFE00, [hex(s) for s in statuses[-3:]]
        assert statuses[:3] == [0xFF00] * 3
        assert FIND_HANDLER.sent < FIND_HANDLER.limit, "the cancel was honoured before the end"
        # the association goes on: a C-CANCEL-RQ for an answered request is ignored, and a new
        # find is served to its end
        assoc.send_c_cancel(7, query_model=FIND)
        FIND_HANDLER.limit = 3
        more = [s.Status for s, _ in assoc.send_c_find(query, FIND, msg_id=8)]
        assert more == [0xFF00, 0xFF00, 0xFF00, 0x0000] and assoc.is_established
    finally:
        assoc.release()


@pytest.fixture(scope="module")
def ct3(tmp_path_factory: pytest.TempPathFactory) -> list[Dataset]:
    from pydicom import dcmread

    paths = images.write_study(tmp_path_factory.mktemp("ct3"), modality="CT", images=3, rows=64, columns=64, seed=2)
    return [dcmread(p) for p in paths]


def test_c_get_sends_c_store_sub_operations_on_the_association(ct3: list[Dataset]) -> None:
    handler = GetOne(ct3)
    lst = config.Listener(ae_title="QRSCP", port=free_port(), bind_address="127.0.0.1")
    services = [
        Service([GET], [ExplicitVRLittleEndian], {C_GET_RQ: handler}),
        Service([str(CTImageStorage)], [ExplicitVRLittleEndian], {}, requestor_scp=True),
    ]
    acc = Acceptor(lst, config.Timeouts(acse=5, network=5, artim=2), services, "qr-test")
    acc.start()
    received: list[Dataset] = []

    def on_store(event: evt.Event) -> int:
        ds = event.dataset
        ds.file_meta = event.file_meta
        received.append(ds)
        return 0x0000 if len(received) != 2 else 0xA700  # the second one fails

    try:
        ae = AE(ae_title="GETSCU")
        ae.add_requested_context(GET, ExplicitVRLittleEndian)
        ae.add_requested_context(CTImageStorage, ExplicitVRLittleEndian)
        role = build_role(CTImageStorage, scp_role=True)
        assoc = ae.associate("127.0.0.1", acc.port, ae_title="QRSCP", ext_neg=[role],
                             evt_handlers=[(evt.EVT_C_STORE, on_store)])
        assert assoc.is_established
        query = Dataset()
        query.QueryRetrieveLevel = "STUDY"
        query.StudyInstanceUID = ct3[0].StudyInstanceUID
        try:
            final = [s.Status for s, _ in assoc.send_c_get(query, GET, msg_id=5)][-1]
        finally:
            assoc.release()
        assert final == 0xB000
        assert [ds.SOPInstanceUID for ds in received] == [ds.SOPInstanceUID for ds in ct3]
        assert [ds.PixelData for ds in received] == [ds.PixelData for ds in ct3]
        assert [status for status, _ in handler.results] == [0x0000, 0xA700, 0x0000]
    finally:
        acc.stop()
    assert acc.faults == 0


def test_a_store_sub_operation_without_the_scp_role_is_not_offered(ct3: list[Dataset]) -> None:
    """Without SCP/SCU Role Selection the requestor is only SCU of the storage class (PS3.7
    D.3.3.4): no context to send a C-STORE-RQ on."""
    seen: list[list[tuple[int, str]]] = []

    class Probe(GetOne):
        def handle(self, request: Request, data: DataSetSink | None, reply: Reply) -> None:
            seen.append(reply.storage_contexts(str(CTImageStorage)))
            reply(0xA702)  # Out of Resources: unable to perform sub-operations

    lst = config.Listener(ae_title="QRSCP", port=free_port(), bind_address="127.0.0.1")
    services = [
        Service([GET], [ExplicitVRLittleEndian], {C_GET_RQ: Probe([])}),
        Service([str(CTImageStorage)], [ExplicitVRLittleEndian], {}, requestor_scp=True),
    ]
    acc = Acceptor(lst, config.Timeouts(acse=5, network=5, artim=2), services, "qr-test")
    acc.start()
    try:
        ae = AE(ae_title="GETSCU")
        ae.add_requested_context(GET, ExplicitVRLittleEndian)
        ae.add_requested_context(CTImageStorage, ExplicitVRLittleEndian)
        assoc = ae.associate("127.0.0.1", acc.port, ae_title="QRSCP")
        query = Dataset()
        query.QueryRetrieveLevel = "STUDY"
        query.StudyInstanceUID = generate_uid()
        try:
            final = [s.Status for s, _ in assoc.send_c_get(query, GET)][-1]
        finally:
            assoc.release()
        assert final == 0xA702 and seen == [[]]
    finally:
        acc.stop()
