"""The exam lifecycle through the service's IPC against the simulated RIS (real associations)."""

from __future__ import annotations

from pathlib import Path

import pytest
from pydicom import dcmread

from modality_link.config import Node
from modality_link.home import free_port
from modality_link.ipc import INVALID_PARAMS, IpcError
from sim.ris import RIS
from tests.support.instances import spool_images
from tests.support.service import InProcessService, cleanup, exam_home
from tests.support.waiting import wait_until


def _ris_node(port: int, **kw) -> dict[str, Node]:
    return {"ris": Node(ae_title="RIS", host="127.0.0.1", port=port, roles=["worklist", "mpps"],
                        worklist_date="", retry_interval=0.5, **kw)}


def _sent(svc: InProcessService, exam_id: int, n: int = 2) -> list[dict]:
    return wait_until(lambda: (r := svc.call("exam.show", exam_id=exam_id)["mpps"]) and
                      len(r) == n and all(m["state"] == "sent" for m in r) and r, 15, "MPPS sent")


@pytest.mark.parametrize("mode", ["standard", "001", "mpps-assigns-uid"])
def test_full_exam(mode: str, tmp_path: Path) -> None:
    with RIS(mode=mode) as ris:
        home = exam_home(_ris_node(ris.port, mpps_scp_assigns_uid=(mode == "mpps-assigns-uid")))
        svc = InProcessService(home)
        try:
            items = svc.call("worklist.query")["items"]
            assert [i["sps_id"] for i in items] == ["SPS0001", "SPS0002", "SPS0003"]
            ex = svc.call("exam.start", item="SPS0001")
            paths = spool_images(tmp_path / "spool", 3)
            added = svc.call("exam.add_image", exam_id=ex["exam_id"], paths=paths)["added"]
            svc.call("exam.end", exam_id=ex["exam_id"])
            _sent(svc, ex["exam_id"])
            info = svc.call("exam.show", exam_id=ex["exam_id"])
            with pytest.raises(IpcError, match="already COMPLETED"):
                svc.call("exam.end", exam_id=ex["exam_id"])
            # the archived image carries the worklist data (the IHE Scheduled Workflow mapping)
            inst = svc.service.db.index.instance(added[0])
            ds = dcmread(home.archive_dir / inst.path)
            assert str(ds.PatientName) == "Müller^Jürgen" and ds.AccessionNumber == "ACC0001"
            assert ds.StudyInstanceUID == items[0]["study_uid"]
            req = ds.RequestAttributesSequence[0]
            assert req.RequestedProcedureID == "RP0001" and req.ScheduledProcedureStepID == "SPS0001"
            assert req.ScheduledProtocolCodeSequence[0].CodeValue == "P1"
            assert ds.ProcedureCodeSequence[0].CodeValue == "RPID1"
            assert ds.ReferencedStudySequence[0].ReferencedSOPInstanceUID == items[0]["study_uid"]
        finally:
            svc.stop()
            cleanup(home)
    kinds = [(m["kind"], m["status"]) for m in ris.mpps_messages]
    assert kinds == [("create", 0), ("set", 0)]
    assert ris.mpps_messages[0]["uid"] == ris.mpps_messages[1]["uid"] == info["mpps_uid"]
    uid = info["mpps_uid"]
    assert ris.instances[uid]["states"] == ["IN PROGRESS", "COMPLETED"]
    refs = ris.mpps_messages[1]["dataset"]["00400340"]["Value"][0]["00081140"]["Value"]
    assert sorted(r["00081155"]["Value"][0] for r in refs) == sorted(added)


def test_discontinued_and_unscheduled(tmp_path: Path) -> None:
    with RIS(mode="001") as ris:
        home = exam_home(_ris_node(ris.port))
        svc = InProcessService(home)
        try:
            ex = svc.call("exam.start", patient_id="EMERG1", patient_name="Doe^John")
            svc.call("exam.add_image", exam_id=ex["exam_id"], paths=spool_images(tmp_path / "s", 1))
            with pytest.raises(IpcError, match="CID 9300"):
                svc.call("exam.end", exam_id=ex["exam_id"], discontinue="999")
            svc.call("exam.end", exam_id=ex["exam_id"], discontinue="110501")
            _sent(svc, ex["exam_id"])
        finally:
            svc.stop()
            cleanup(home)
    create, nset = (m["dataset"] for m in ris.mpps_messages)
    ssa = create["00400270"]["Value"][0]
    assert ssa["0020000D"]["Value"] == [ex["study_uid"]] and "Value" not in ssa["00080050"]
    assert nset["00400252"]["Value"] == ["DISCONTINUED"]
    assert nset["00400281"]["Value"][0]["00080100"]["Value"] == ["110501"]


def test_mode_001_refuses_incomplete_n_create() -> None:
    """The 001 SCP's 0x0121 check is real: a dataset missing Study ID is refused."""
    import datetime

    from modality_link.config import Timeouts
    from modality_link.net import mpps

    with RIS(mode="001") as ris:
        node = Node(ae_title="RIS", host="127.0.0.1", port=ris.port)
        step = mpps.ProcedureStep("P1", "MODLINK", "CT01", "CT", "1.2.3", "1", datetime.datetime.now())
        ds = mpps.build_n_create(step)
        assert mpps.send_n_create(node, "MODLINK", Timeouts(), ds, "1.2.3.9") == "1.2.3.9"
        del ds.StudyID
        with pytest.raises(mpps.MppsError, match="0x0121") as exc:
            mpps.send_n_create(node, "MODLINK", Timeouts(), ds, "1.2.3.10")
        assert not exc.value.retryable


def test_ris_down_at_start_then_up_across_restart(tmp_path: Path) -> None:
    port = free_port()
    home = exam_home(_ris_node(port), connect=1.0)
    svc = InProcessService(home)
    try:
        ex = svc.call("exam.start", patient_id="P9", patient_name="Down^Ris")
        svc.call("exam.add_image", exam_id=ex["exam_id"], paths=spool_images(tmp_path / "s", 2))
        svc.call("exam.end", exam_id=ex["exam_id"])
        wait_until(lambda: svc.call("exam.show", exam_id=ex["exam_id"])["mpps"][0]["attempts"] >= 1, 10, "a failed attempt")
    finally:
        svc.stop()
    # restart the service, then bring the RIS up: the queue is replayed in order, once
    svc = InProcessService(home)
    try:
        assert [m["state"] for m in svc.call("exam.show", exam_id=ex["exam_id"])["mpps"]] == ["queued", "queued"]
        with RIS(port=port) as ris:
            svc.service.mpps.wake()
            _sent(svc, ex["exam_id"])
            wait_until(lambda: len(ris.mpps_messages) == 2, 5, "two messages")
            import time
            time.sleep(1.0)
        assert [(m["kind"], m["status"]) for m in ris.mpps_messages] == [("create", 0), ("set", 0)]
        assert svc.call("exam.show", exam_id=ex["exam_id"])["state"] == "COMPLETED"
    finally:
        svc.stop()
        cleanup(home)


def test_images_as_bytes_and_one_group(tmp_path: Path) -> None:
    """exam.add_image takes PS3.10 files as base64 `data` as well as `paths`; a call is one
    group: a bad image refuses it whole and nothing of it is archived; the pixel data of what
    is archived are the source's bytes."""
    import base64

    home = exam_home({})
    svc = InProcessService(home)
    try:
        ex = svc.call("exam.start", patient_id="BYTES1", patient_name="Bytes^Bea")
        paths = spool_images(tmp_path / "s", 3)
        truncated = tmp_path / "truncated.dcm"
        truncated.write_bytes(Path(paths[2]).read_bytes()[:-100])
        with pytest.raises(IpcError, match="truncated.dcm refused: dataset is truncated") as refused:
            svc.call("exam.add_image", exam_id=ex["exam_id"], paths=[*paths[:2], str(truncated)])
        # the archive's DICOM status travels with the IPC error (docs/ipc.md "Errors")
        assert (refused.value.code, refused.value.data) == (INVALID_PARAMS, {"status": 0xC000})
        assert svc.call("studies.list") == []
        with pytest.raises(IpcError, match=r"data\[0\] is not a base64-encoded file"):
            svc.call("exam.add_image", exam_id=ex["exam_id"], data=["not base64!"])
        data = [base64.b64encode(Path(p).read_bytes()).decode("ascii") for p in paths]
        added = svc.call("exam.add_image", exam_id=ex["exam_id"], data=data)["added"]
        assert added == [dcmread(p).SOPInstanceUID for p in paths]
        for uid, src in zip(added, paths):
            ds = dcmread(home.archive_dir / svc.service.db.index.instance(uid).path)
            assert str(ds.PatientName) == "Bytes^Bea" and ds.StudyInstanceUID == ex["study_uid"]
            assert ds.PixelData == dcmread(src).PixelData
        assert [o.sop_instance_uid for o in svc.service.db.exams.objects(ex["exam_id"])] == added
        assert not list(home.tmp_dir.glob("exam-*"))
    finally:
        svc.stop()
        cleanup(home)
