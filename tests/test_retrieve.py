"""The Query/Retrieve SCU (net/retrieve.py) against DCMTK dcmqrscp, a real Q/R SCP, moving into
our memory server in this process; and its C-MOVE watchdog against an SCP that stalls."""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from pydicom import dcmread
from pydicom.dataset import Dataset
from pynetdicom import AE, evt
from pynetdicom.sop_class import CTImageStorage, StudyRootQueryRetrieveInformationModelMove

from modality_link import config
from modality_link.home import free_port
from modality_link.memory import MemoryCache
from modality_link.net.memory_server import MemoryServer
from modality_link.net.retrieve import QueryError, find, move
from sim import images
from tests.support.peers import Qrscp

TIMEOUTS = config.Timeouts(connect=5, acse=5, dimse=30, network=30)


@pytest.fixture
def memory_server() -> Iterator[MemoryServer]:
    lst = config.MemoryServer(port=free_port(), bind_address="127.0.0.1")
    server = MemoryServer(lst, TIMEOUTS, MemoryCache(64 << 20))
    server.start()
    yield server
    server.stop()


@pytest.fixture
def qrscp(tmp_path: Path, memory_server: MemoryServer) -> Iterator[tuple[Qrscp, list[Path]]]:
    files = images.write_study(tmp_path / "prior", modality="CT", images=6, rows=128, columns=128, seed=11)
    scp = Qrscp(tmp_path / "qr", {"MODLINK_MEM": memory_server.port})
    try:
        scp.store(files)
        yield scp, files
    finally:
        scp.stop()


def _study_query(**keys: str) -> Dataset:
    ds = Dataset()
    ds.QueryRetrieveLevel = "STUDY"
    for k in ("StudyInstanceUID", "PatientID", "PatientName", "StudyDate", "AccessionNumber"):
        setattr(ds, k, keys.get(k, ""))
    return ds


def test_find_then_move_a_prior_into_the_memory_server(qrscp, memory_server: MemoryServer) -> None:
    scp, files = qrscp
    src = dcmread(files[0], stop_before_pixels=True)
    (match,) = find(scp.node, "MODLINK", TIMEOUTS, _study_query(PatientID=src.PatientID))
    assert match.StudyInstanceUID == src.StudyInstanceUID and match.PatientName == src.PatientName
    seen = []
    query = Dataset()
    query.QueryRetrieveLevel = "STUDY"
    query.StudyInstanceUID = src.StudyInstanceUID
    result = move(scp.node, "MODLINK", TIMEOUTS, "MODLINK_MEM", query,
                  on_progress=lambda p: seen.append((p.remaining, p.completed)))
    assert result.status == 0x0000, result
    assert (result.progress.completed, result.progress.failed) == (6, 0)
    assert seen and seen[-1][1] <= 6, "pending responses reported progress"
    cache = memory_server.cache
    assert len(cache) == 6
    for f in files:
        sop = dcmread(f, stop_before_pixels=True).SOPInstanceUID
        item = cache.get(sop)
        assert item is not None and item.record.study_uid == src.StudyInstanceUID


def test_an_unknown_destination_is_the_scp_s_failure(qrscp) -> None:
    scp, files = qrscp
    query = Dataset()
    query.QueryRetrieveLevel = "STUDY"
    query.StudyInstanceUID = dcmread(files[0], stop_before_pixels=True).StudyInstanceUID
    with pytest.raises(QueryError) as e:
        move(scp.node, "MODLINK", TIMEOUTS, "NOWHERE", query)
    assert e.value.status == 0xA801 and "Move destination unknown" in str(e.value)


class StallingMoveScp:
    """A pynetdicom Q/R SCP whose C-MOVE announces 3 sub-operations and then never goes on,
    until it is cancelled."""

    def __init__(self, destination_port: int, deaf: bool = False) -> None:
        self.cancelled = threading.Event()
        self.release = threading.Event()
        ae = AE(ae_title="STALL")
        ae.add_supported_context(StudyRootQueryRetrieveInformationModelMove)
        ae.add_requested_context(CTImageStorage)
        self.port = free_port()

        def on_move(event: evt.Event):
            yield "127.0.0.1", destination_port  # associated to, but no sub-operation is started
            yield 3
            # the peer polls for the C-CANCEL (pynetdicom has no callback for it); release ends it
            while not (event.is_cancelled and not deaf) and not self.release.wait(0.05):
                pass
            self.cancelled.set()
            yield 0xFE00, None

        self.server = ae.start_server(("127.0.0.1", self.port), block=False,
                                      evt_handlers=[(evt.EVT_C_MOVE, on_move)])
        self.node = config.Node(ae_title="STALL", host="127.0.0.1", port=self.port)


def test_a_stalled_move_is_cancelled_after_move_timeout(memory_server: MemoryServer) -> None:
    scp = StallingMoveScp(memory_server.port)
    try:
        query = Dataset()
        query.QueryRetrieveLevel = "STUDY"
        query.StudyInstanceUID = "1.2.3"
        started = time.monotonic()
        result = move(scp.node, "MODLINK", TIMEOUTS, "MODLINK_MEM", query, move_timeout=1.0)
        assert result.status == 0xFE00 and scp.cancelled.is_set()
        assert "no response for 1 s (move_timeout)" in result.cancelled
        assert time.monotonic() - started < 10
        scp.cancelled.clear()
        asked = time.monotonic()  # the operator stops the job half a second in
        result = move(scp.node, "MODLINK", TIMEOUTS, "MODLINK_MEM", query, move_timeout=60,
                      should_stop=lambda: time.monotonic() - asked > 0.5)
        assert scp.cancelled.is_set()
        assert result.status == 0xFE00 and result.cancelled == "stopped by the operator"
    finally:
        scp.server.shutdown()


def test_an_scp_that_ignores_the_cancel_is_aborted(memory_server: MemoryServer) -> None:
    scp = StallingMoveScp(memory_server.port, deaf=True)
    try:
        query = Dataset()
        query.QueryRetrieveLevel = "STUDY"
        query.StudyInstanceUID = "1.2.3"
        started = time.monotonic()
        with pytest.raises(QueryError, match="no final response after C-CANCEL-RQ"):
            move(scp.node, "MODLINK", TIMEOUTS, "MODLINK_MEM", query, move_timeout=1.0, cancel_grace=1.0)
        assert time.monotonic() - started < 8, "the abort ended the wait at once"
    finally:
        scp.release.set()
        scp.server.shutdown()
