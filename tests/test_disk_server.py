"""The disk server (Storage + Verification SCP) against real DCMTK peers and hostile senders."""

from __future__ import annotations

import socket
import subprocess
import threading
import time
from pathlib import Path

import pytest
from pydicom import dcmread
from pydicom.uid import ExplicitVRLittleEndian
from pynetdicom import AE, _config
from pynetdicom.sop_class import CTImageStorage, Verification

from sim import images
from tests.support.instances import dataset_bytes
from tests.support.service import ServiceProcess
from tests.support.tools import dcmtk_env, missing, require_tool
from tests.support.waiting import wait_until


@pytest.fixture(scope="module")
def ct300(tmp_path_factory: pytest.TempPathFactory) -> list[Path]:
    out = tmp_path_factory.mktemp("ct300")
    return images.write_study(out, modality="CT", images=300, rows=512, columns=512, seed=7)


def archived(svc: ServiceProcess, sop_uid: str) -> list[Path]:
    return list(svc.home.archive_dir.glob(f"*/*/{sop_uid}.dcm"))


def test_storescu_300_ct_images_arrive_unchanged(service: ServiceProcess, ct300: list[Path]) -> None:
    storescu = require_tool("storescu")
    proc = subprocess.run(
        [storescu, "-aet", "CT_SCANNER", "-aec", "MODLINK", "127.0.0.1", str(service.port), *map(str, ct300)],
        env=dcmtk_env(), capture_output=True, text=True, timeout=300,
    )
    assert proc.returncode == 0, proc.stderr
    studies = service.studies()
    assert len(studies) == 1
    assert studies[0]["instances"] == 300
    assert studies[0]["modalities"] == "CT"
    for src in ct300:
        sop = dcmread(src, stop_before_pixels=True).SOPInstanceUID
        (dst,) = archived(service, sop)
        assert dataset_bytes(dst) == dataset_bytes(src), f"{sop} differs from what was sent"
    meta = dcmread(dst, stop_before_pixels=True).file_meta
    assert meta.ImplementationClassUID == "2.25.303082821956123276942924895321046201115"
    assert meta.SourceApplicationEntityTitle == "CT_SCANNER"
    assert meta.TransferSyntaxUID == ExplicitVRLittleEndian
    # Re-sending replaces: still 300 instances, no duplicate rows or files.
    proc = subprocess.run(
        [require_tool("storescu"), "-aec", "MODLINK", "127.0.0.1", str(service.port), *map(str, ct300[:10])],
        env=dcmtk_env(), capture_output=True, text=True, timeout=120,
    )
    assert proc.returncode == 0
    assert service.studies()[0]["instances"] == 300
    assert len(list(service.home.archive_dir.glob("*/*/*.dcm"))) == 300


def test_echoscu_and_calling_ae_allow_list(short_tmp: Path) -> None:
    echoscu = require_tool("echoscu")
    svc = ServiceProcess.start(short_tmp / "h", disk_server__allowed_calling_aets=["GOOD_SCU"])
    try:
        ok = subprocess.run(
            [echoscu, "-aet", "GOOD_SCU", "-aec", "MODLINK", "127.0.0.1", str(svc.port)],
            env=dcmtk_env(), capture_output=True, text=True, timeout=60,
        )
        assert ok.returncode == 0, ok.stderr
        bad = subprocess.run(
            [echoscu, "-aet", "INTRUDER", "-aec", "MODLINK", "127.0.0.1", str(svc.port)],
            env=dcmtk_env(), capture_output=True, text=True, timeout=60,
        )
        assert bad.returncode != 0
        assert "Calling AE Title Not Recognized" in bad.stdout + bad.stderr
        wait_until(lambda: any("INTRUDER" in l and "refused" in l for l in svc.log().splitlines()), 10,
                   "the refusal of INTRUDER in the log")
        lines = [l for l in svc.log().splitlines() if "refused" in l]
        assert any("INTRUDER" in l and "permanent" in l and "calling AE title not recognized" in l for l in lines)
        # A wrong called AE title is refused too (PS3.8 Table 9-21 reason 7).
        wrong = subprocess.run(
            [echoscu, "-aet", "GOOD_SCU", "-aec", "SOMEONE", "127.0.0.1", str(svc.port)],
            env=dcmtk_env(), capture_output=True, text=True, timeout=60,
        )
        assert wrong.returncode != 0
        assert "Called AE Title Not Recognized" in wrong.stdout + wrong.stderr
    finally:
        svc.stop()


def test_echoscu_without_allow_list(service: ServiceProcess) -> None:
    proc = subprocess.run(
        [require_tool("echoscu"), "-aet", "ANYONE", "-aec", "MODLINK", "127.0.0.1", str(service.port)],
        env=dcmtk_env(), capture_output=True, text=True, timeout=60,
    )
    assert proc.returncode == 0, proc.stderr


def _send_raw_file(port: int, path: Path, sop_class: str, ts: str = ExplicitVRLittleEndian) -> int:
    """C-STORE the bytes of `path` as they are (pynetdicom's chunked send), return the status."""
    ae = AE(ae_title="HOSTILE")
    ae.add_requested_context(sop_class, ts)
    assoc = ae.associate("127.0.0.1", port, ae_title="MODLINK")
    assert assoc.is_established
    old = _config.STORE_SEND_CHUNKED_DATASET
    _config.STORE_SEND_CHUNKED_DATASET = True
    try:
        rsp = assoc.send_c_store(path)
    finally:
        _config.STORE_SEND_CHUNKED_DATASET = old
        assoc.release()
    return int(rsp.Status)


def _archive_consistent(svc: ServiceProcess) -> None:
    files = {p.name[:-4] for p in svc.home.archive_dir.glob("*/*/*.dcm")}
    indexed = sum(s["instances"] for s in svc.studies())
    assert len(files) == indexed
    assert list((svc.home.archive_dir / ".tmp").glob("*")) == []


def test_truncated_and_invalid_datasets_are_refused(service: ServiceProcess, tmp_path: Path) -> None:
    (good,) = images.write_study(tmp_path / "g", modality="CT", images=1, seed=3)
    data = good.read_bytes()
    truncated = tmp_path / "truncated.dcm"
    truncated.write_bytes(data[: len(data) - 1000])
    status = _send_raw_file(service.port, truncated, CTImageStorage)
    assert status & 0xF000 == 0xC000, hex(status)
    ds = dcmread(good, stop_before_pixels=True)
    assert archived(service, ds.SOPInstanceUID) == []
    log = service.log()
    assert "HOSTILE" in log and "0xC000" in log and "truncated" in log

    # A UID that would escape the archive folder is refused before it reaches a path.
    evil = images.make_study("CT", images=1, seed=4)[0]
    evil.StudyInstanceUID = "../../../../tmp/evil"
    evil_path = tmp_path / "evil.dcm"
    evil.save_as(evil_path, enforce_file_format=True)
    status = _send_raw_file(service.port, evil_path, CTImageStorage)
    assert status == 0xA900
    assert not Path("/tmp/evil").exists()
    assert service.alive()
    _archive_consistent(service)


def test_garbage_pdu_and_abort_do_not_disturb_a_parallel_association(
    service: ServiceProcess, tmp_path: Path
) -> None:
    study = images.make_study("CT", images=30, seed=11)
    results: dict[str, object] = {}

    def good_sender() -> None:
        ae = AE(ae_title="GOOD")
        ae.add_requested_context(CTImageStorage, ExplicitVRLittleEndian)
        assoc = ae.associate("127.0.0.1", service.port, ae_title="MODLINK")
        statuses = []
        for ds in study:
            statuses.append(int(assoc.send_c_store(ds).Status))
            time.sleep(0.01)
        assoc.release()
        results["statuses"] = statuses

    t = threading.Thread(target=good_sender)
    t.start()
    # Garbage bytes where an A-ASSOCIATE-RQ belongs, then a valid header with a nonsense body.
    for payload in (b"\xde\xad\xbe\xef" * 64, b"\x01\x00\x00\x00\x00\x10" + b"\xff" * 16):
        with socket.create_connection(("127.0.0.1", service.port)) as s:
            s.sendall(payload)
            s.settimeout(5)
            try:
                s.recv(1024)
            except (socket.timeout, ConnectionResetError):
                pass
    # An association that drops its TCP connection in the middle of a dataset.
    ae = AE(ae_title="DROPPER")
    ae.add_requested_context(CTImageStorage, ExplicitVRLittleEndian)
    ae.maximum_pdu_size = 0
    assoc = ae.associate("127.0.0.1", service.port, ae_title="MODLINK", max_pdu=16384)
    assert assoc.is_established
    sock = assoc.dul.socket.socket
    # P-DATA-TF carrying the first dataset fragment only, then a hard close.
    half = images.make_study("CT", images=1, seed=12, rows=256, columns=256)[0]
    from pydicom.filewriter import dcmwrite
    import io

    buf = io.BytesIO()
    dcmwrite(buf, half, enforce_file_format=False)
    cx = assoc.accepted_contexts[0].context_id
    from pydicom.dataset import Dataset
    from pynetdicom.dsutils import encode

    cmd = Dataset()
    cmd.AffectedSOPClassUID = CTImageStorage
    cmd.CommandField = 0x0001
    cmd.MessageID = 1
    cmd.Priority = 0
    cmd.CommandDataSetType = 0x0000
    cmd.AffectedSOPInstanceUID = half.SOPInstanceUID
    raw = encode(cmd, True, True)
    cmd.CommandGroupLength = len(raw)
    raw = encode(cmd, True, True)

    def pdata(ctrl: int, value: bytes) -> bytes:
        item = bytes([cx, ctrl]) + value
        return b"\x04\x00" + (len(item) + 4).to_bytes(4, "big") + (len(item)).to_bytes(4, "big") + item

    sock.sendall(pdata(0x03, raw) + pdata(0x00, buf.getvalue()[:8000]))
    time.sleep(0.2)
    sock.shutdown(socket.SHUT_RDWR)
    sock.close()
    t.join(60)
    assert results["statuses"] == [0] * 30
    assert service.alive()
    assert service.call("status")["archive"]["instances"] == 30
    assert archived(service, half.SOPInstanceUID) == []
    _archive_consistent(service)


def test_acceptor_limit_rejects_with_local_limit_exceeded(short_tmp: Path) -> None:
    svc = ServiceProcess.start(short_tmp / "h", disk_server__max_associations=1)
    try:
        ae = AE(ae_title="FIRST")
        ae.add_requested_context(Verification)
        first = ae.associate("127.0.0.1", svc.port, ae_title="MODLINK")
        assert first.is_established
        proc = subprocess.run(
            [require_tool("echoscu"), "-aec", "MODLINK", "127.0.0.1", str(svc.port)],
            env=dcmtk_env(), capture_output=True, text=True, timeout=60,
        )
        assert proc.returncode != 0
        assert "Local Limit Exceeded" in proc.stdout + proc.stderr
        first.release()
        time.sleep(0.3)
        proc = subprocess.run(
            [require_tool("echoscu"), "-aec", "MODLINK", "127.0.0.1", str(svc.port)],
            env=dcmtk_env(), capture_output=True, text=True, timeout=60,
        )
        assert proc.returncode == 0
        assert "local limit exceeded" in svc.log()
    finally:
        svc.stop()


def test_reserve_below_watermark_answers_a700_and_alerts(short_tmp: Path) -> None:
    svc = ServiceProcess.start(short_tmp / "h", archive__min_free_mb=10**9)
    try:
        study = images.make_study("CT", images=2, seed=5)
        ae = AE(ae_title="SENDER")
        ae.add_requested_context(CTImageStorage, ExplicitVRLittleEndian)
        assoc = ae.associate("127.0.0.1", svc.port, ae_title="MODLINK")
        rsp = assoc.send_c_store(study[0])
        assoc.release()
        assert rsp.Status == 0xA700
        assert "reserve" in str(rsp.get("ErrorComment", ""))
        st = svc.call("status")
        assert any(a["code"] == "disk-full" for a in st["alerts"])
        assert st["archive"]["instances"] == 0
        assert "0xA700" in svc.log()
    finally:
        svc.stop()


def test_really_full_file_system_answers_a700(short_tmp: Path) -> None:
    """The archive on a 1 MiB tmpfs: ENOSPC mid-write becomes A700, nothing half-written."""
    root = short_tmp / "h"
    archive = root / "archive"
    archive.mkdir(parents=True)
    mount = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=1m", "tmpfs", str(archive)], capture_output=True)
    if mount.returncode != 0:
        missing(f"mounting a tmpfs for the disk-full test needs root: {mount.stderr!r}")
    try:
        svc = ServiceProcess.start(root, archive__min_free_mb=0)
        try:
            study = images.make_study("CT", images=30, rows=128, columns=128, seed=6)
            ae = AE(ae_title="SENDER")
            ae.add_requested_context(CTImageStorage, ExplicitVRLittleEndian)
            assoc = ae.associate("127.0.0.1", svc.port, ae_title="MODLINK")
            statuses = [int(assoc.send_c_store(ds).Status) for ds in study]
            assoc.release()
            assert statuses[0] == 0
            assert 0xA700 in statuses
            stored = statuses.count(0)
            assert svc.call("status")["archive"]["instances"] == stored
            assert any(a["code"] == "disk-full" for a in svc.call("alerts.list"))
            _archive_consistent(svc)
            assert svc.alive()
        finally:
            svc.stop()
    finally:
        subprocess.run(["umount", str(archive)], check=False)
