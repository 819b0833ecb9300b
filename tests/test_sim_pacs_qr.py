"""The simulated PACS as a Query/Retrieve SCP, driven by our Q/R SCU (net/retrieve.py): priors
found and moved into the memory server, a slow move, a partial failure."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest
from pydicom import dcmread
from pydicom.dataset import Dataset

from modality_link import config
from modality_link.home import free_port
from modality_link.memory import MemoryCache
from modality_link.net.memory_server import MemoryServer
from modality_link.net.retrieve import QueryError, find, move
from sim import images
from sim.pacs import Pacs

TIMEOUTS = config.Timeouts(connect=5, acse=5, dimse=30, network=30)


@pytest.fixture
def memory_server() -> Iterator[MemoryServer]:
    server = MemoryServer(config.MemoryServer(port=free_port(), bind_address="127.0.0.1"), TIMEOUTS,
                          MemoryCache(64 << 20))
    server.start()
    yield server
    server.stop()


@pytest.fixture
def prior(tmp_path: Path) -> list[Path]:
    return images.write_study(tmp_path / "prior", modality="CT", images=6, rows=64, columns=64, seed=21)


def _pacs(prior: list[Path], memory_server: MemoryServer, **quirks: object) -> Pacs:
    pacs = Pacs(move_destinations={"MODLINK_MEM": ("127.0.0.1", memory_server.port)}, **quirks)  # type: ignore[arg-type]
    assert pacs.preload(prior) == len(prior)
    return pacs.start()


def _node(pacs: Pacs) -> config.Node:
    return config.Node(ae_title=pacs.ae_title, host="127.0.0.1", port=pacs.port, roles=["query"])


def _study(uid: str = "") -> Dataset:
    ds = Dataset()
    ds.QueryRetrieveLevel = "STUDY"
    ds.StudyInstanceUID = uid
    ds.PatientID = ""
    ds.PatientName = ""
    ds.StudyDate = ""
    return ds


def test_priors_are_found_and_moved_into_the_memory_server(prior, memory_server) -> None:
    pacs = _pacs(prior, memory_server, move_delay=0.05)
    try:
        src = dcmread(prior[0], stop_before_pixels=True)
        query = _study()
        query.PatientID = src.PatientID
        (match,) = find(_node(pacs), "MODLINK", TIMEOUTS, query)
        assert match.StudyInstanceUID == src.StudyInstanceUID and match.PatientName == src.PatientName
        query = _study()
        query.StudyDate = f"{src.StudyDate}-"
        assert [m.StudyInstanceUID for m in find(_node(pacs), "MODLINK", TIMEOUTS, query)] == [src.StudyInstanceUID]
        query.StudyDate = "19000101-19001231"
        assert find(_node(pacs), "MODLINK", TIMEOUTS, query) == []
        progress: list[int] = []
        result = move(_node(pacs), "MODLINK", TIMEOUTS, "MODLINK_MEM", _study(src.StudyInstanceUID),
                      on_progress=lambda p: progress.append(p.completed))
        assert result.status == 0x0000 and result.progress.completed == 6
        assert progress == sorted(progress) and progress[-1] >= 5, "pending responses count the sub-operations"
        assert len(memory_server.cache) == 6
    finally:
        pacs.stop()


def test_partial_failure_and_unknown_destination(prior, memory_server) -> None:
    pacs = _pacs(prior, memory_server, move_fail_every=2)
    try:
        uid = dcmread(prior[0], stop_before_pixels=True).StudyInstanceUID
        result = move(_node(pacs), "MODLINK", TIMEOUTS, "MODLINK_MEM", _study(uid))
        assert result.status == 0xB000
        assert (result.progress.completed, result.progress.failed) == (3, 3)
        assert len(result.failed_uids) == 3 and len(memory_server.cache) == 3
        with pytest.raises(QueryError) as e:
            move(_node(pacs), "MODLINK", TIMEOUTS, "ELSEWHERE", _study(uid))
        assert e.value.status == 0xA801
    finally:
        pacs.stop()
