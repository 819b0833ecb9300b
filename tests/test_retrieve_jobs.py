"""Loading priors through the service: `query` and `retrieve` (IPC and CLI) from DCMTK dcmqrscp
into the memory server (nothing in the archive or on disk) and into the archive; a C-MOVE that
exceeds the node's move_timeout is cancelled and the job fails saying so (the simulated PACS)."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path

import pytest
from pydicom import dcmread

from modality_link import config
from sim import images
from sim.pacs import Pacs
from tests.support.peers import Qrscp
from tests.support.service import ServiceProcess


def _files(root: Path) -> set[Path]:
    return {p for p in root.rglob("*") if p.is_file() and p.suffix not in (".log", ".sqlite", ".sqlite-wal",
                                                                            ".sqlite-shm")}


@pytest.fixture
def priors(short_tmp: Path) -> Iterator[tuple[ServiceProcess, Qrscp, list[Path]]]:
    files = images.write_study(short_tmp / "prior", modality="CT", images=5, rows=64, columns=64, seed=31)
    svc = ServiceProcess.start(short_tmp / "h")
    cfg = config.load(svc.home.config_path)
    scp = Qrscp(short_tmp / "qr", {cfg.memory_server.ae_title: cfg.memory_server.port,
                                   cfg.disk_server.ae_title: cfg.disk_server.port})
    try:
        scp.store(files)
        assert svc.cli("node", "add", "PRIORS", "--ae", "QRSCP", "--host", "127.0.0.1", "--port", str(scp.port),
                       "--roles", "qr").returncode == 0
        yield svc, scp, files
    finally:
        svc.stop()
        scp.stop()


def test_query_and_retrieve_into_memory_then_archive(priors) -> None:
    svc, scp, files = priors
    src = dcmread(files[0], stop_before_pixels=True)
    found = json.loads(svc.cli("query", "--from", "PRIORS", "-k", f"PatientID={src.PatientID}", "--json",
                               check=True).stdout)
    assert [m["0020000D"]["Value"][0] for m in found] == [src.StudyInstanceUID]
    series = svc.call("query", node="PRIORS", level="series", keys={"StudyInstanceUID": src.StudyInstanceUID})
    assert [m["0020000E"]["Value"][0] for m in series] == [src.SeriesInstanceUID]
    before = _files(svc.home.root)
    out = svc.cli("retrieve", "--from", "PRIORS", "--patient-id", src.PatientID, "--wait", check=True).stdout
    assert ": done: 1 study(ies) retrieved to MODLINK_MEM" in out, out
    assert svc.call("memory.list")["instances"] == 5
    assert svc.call("studies.list") == [] and _files(svc.home.root) == before, "nothing archived or on disk"
    out = svc.cli("retrieve", "--from", "PRIORS", "--study", src.StudyInstanceUID, "--to", "archive", "--wait",
                  check=True).stdout
    assert ": done:" in out
    (study,) = svc.call("studies.list")
    assert (study["study_uid"], study["instances"]) == (src.StudyInstanceUID, 5)


def test_retrieve_refusals(priors) -> None:
    svc, scp, files = priors
    missing = svc.cli("retrieve", "--from", "PRIORS", "--study", "1.2.3.4.5")
    assert missing.returncode == 1 and "PRIORS has no study 1.2.3.4.5" in missing.stderr
    assert svc.cli("node", "add", "STORE_ONLY", "--ae", "X", "--host", "127.0.0.1", "--port", "104",
                   "--roles", "store").returncode == 0
    wrong = svc.cli("retrieve", "--from", "STORE_ONLY", "--study", "1.2.3")
    assert wrong.returncode == 1 and "no 'qr' role" in wrong.stderr


def test_a_move_that_stalls_is_cancelled_and_the_job_fails(short_tmp: Path) -> None:
    files = images.write_study(short_tmp / "prior", modality="CT", images=3, rows=64, columns=64, seed=32)
    svc = ServiceProcess.start(short_tmp / "h")
    cfg = config.load(svc.home.config_path)
    pacs = Pacs(move_destinations={cfg.memory_server.ae_title: ("127.0.0.1", cfg.memory_server.port)},
                move_delay=30.0)
    pacs.preload(files)
    pacs.start()
    try:
        node = ("node", "add", "SLOW", "--ae", pacs.ae_title, "--host", "127.0.0.1", "--port", str(pacs.port),
                "--roles", "qr")
        assert svc.cli(*node).returncode == 0
        assert svc.cli("config", "set", "nodes.SLOW.move_timeout", "1").returncode == 0
        assert svc.cli("config", "set", "nodes.SLOW.retries", "0").returncode == 0
        uid = dcmread(files[0], stop_before_pixels=True).StudyInstanceUID
        res = svc.cli("retrieve", "--from", "SLOW", "--study", uid, "--wait", timeout=60)
        assert res.returncode == 1, res.stdout + res.stderr
        assert "no response for 1 s (move_timeout)" in res.stdout, res.stdout
        (job,) = [j for j in svc.call("jobs.list") if j["kind"] == "retrieve"]
        assert job["state"] == "failed" and "0xFE00" in svc.call("jobs.show", id=job["id"])["failed_items"][0]["detail"]
    finally:
        svc.stop()
        pacs.stop()
