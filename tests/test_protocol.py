"""The integrator's protocol (docs/ipc.md "Versions", "Errors", "Events"): the handshake, error
data, parameters refused before any side effect, SOP Instance UIDs held by another exam, and
the event journal replayed after a restart of the service."""

from __future__ import annotations

from pathlib import Path

import pytest
from pydicom import dcmread

from modality_link.config import Node
from modality_link.home import free_port
from modality_link.ipc import (
    CONFIG_INVALID, CONFLICT, INVALID_PARAMS, PROTOCOL_MISMATCH, PROTOCOL_VERSION, IpcClient, IpcError,
)
from sim.ris import RIS
from tests.support.instances import spool_images
from tests.support.service import InProcessService, ServiceProcess, cleanup, exam_home
from tests.support.waiting import wait_until


def test_hello_and_status_carry_the_protocol_version(service_in_process: InProcessService) -> None:
    svc = service_in_process
    assert svc.call("status")["protocol"] == PROTOCOL_VERSION
    major = PROTOCOL_VERSION.split(".")[0]
    hello = svc.call("hello", client="acquisition 2.3", protocol=f"{major}.99")
    assert hello["protocol"] == PROTOCOL_VERSION and hello["service"] == "modality_link"
    with pytest.raises(IpcError, match=rf"speaks protocol {PROTOCOL_VERSION}.*major {int(major) + 1}") as other:
        svc.call("hello", client="future", protocol=f"{int(major) + 1}.0")
    assert other.value.code == PROTOCOL_MISMATCH
    assert other.value.data == {"param": "protocol", "protocol": PROTOCOL_VERSION}
    with pytest.raises(IpcError, match="MAJOR.MINOR") as bad:
        svc.call("hello", protocol="one")
    assert (bad.value.code, bad.value.data) == (INVALID_PARAMS, {"param": "protocol"})


def test_error_data_names_the_parameter_or_the_key(service_in_process: InProcessService) -> None:
    svc = service_in_process
    with pytest.raises(IpcError) as wrong:
        svc.call("jobs.show", id="7")
    assert (wrong.value.code, wrong.value.data) == (INVALID_PARAMS, {"param": "id"})
    with pytest.raises(IpcError) as unknown:
        svc.call("jobs.show", id=7, verbose=True)
    assert unknown.value.data == {"param": "verbose"}
    with pytest.raises(IpcError) as key:
        svc.call("config.set", key="disk_server.port", value="not a port")
    assert (key.value.code, key.value.data) == (CONFIG_INVALID, {"key": "disk_server.port"})


def test_exam_start_of_wrong_types_is_refused_before_any_n_create() -> None:
    with RIS() as ris:
        home = exam_home({"ris": Node(ae_title="RIS", host="127.0.0.1", port=ris.port, roles=["worklist", "mpps"],
                                      retry_interval=0.2)})
        svc = InProcessService(home)
        try:
            for params, param in (({"patient_id": 12345, "patient_name": "Doe^Jane"}, "patient_id"),
                                  ({"patient_id": "P1", "patient_name": ["Doe", "Jane"]}, "patient_name")):
                with pytest.raises(IpcError) as refused:
                    svc.call("exam.start", **params)
                assert (refused.value.code, refused.value.data) == (INVALID_PARAMS, {"param": param})
            assert svc.service.db.exams.get(1) is None
            # a good one then goes out, so the RIS would have seen the others
            ex = svc.call("exam.start", patient_id="P1", patient_name="Doe^Jane")
            wait_until(lambda: ris.mpps_messages, 15, "the N-CREATE")
            assert ex["exam_id"] == 1 and len(ris.mpps_messages) == 1
        finally:
            svc.stop()
            cleanup(home)


def test_an_archived_sop_instance_uid_added_to_another_exam_is_a_conflict(tmp_path: Path) -> None:
    home = exam_home({})
    svc = InProcessService(home)
    try:
        first = svc.call("exam.start", patient_id="P1", patient_name="First^Exam")
        paths = spool_images(tmp_path / "s", 2)
        svc.call("exam.add_image", exam_id=first["exam_id"], paths=paths)
        svc.call("exam.add_image", exam_id=first["exam_id"], paths=paths[:1])  # the same exam again: harmless
        second = svc.call("exam.start", patient_id="P1", patient_name="First^Exam")
        uid = dcmread(paths[0]).SOPInstanceUID
        with pytest.raises(IpcError, match=rf"{uid} is already archived in exam {first['exam_id']} "
                                           rf"\(study {first['study_uid']}\)") as conflict:
            svc.call("exam.add_image", exam_id=second["exam_id"], paths=paths)
        assert conflict.value.code == CONFLICT
        assert conflict.value.data == {"sop_instance_uid": uid, "exam_id": first["exam_id"],
                                       "study_uid": first["study_uid"], "param": "paths"}
        studies = {s["study_uid"]: s["instances"] for s in svc.call("studies.list")}
        assert studies == {first["study_uid"]: 2}
        assert len(svc.service.db.exams.objects(first["exam_id"])) == 2
        assert svc.service.db.exams.objects(second["exam_id"]) == []
    finally:
        svc.stop()
        cleanup(home)


def test_events_are_numbered_and_replayed_after_a_restart(short_tmp: Path, tmp_path: Path) -> None:
    svc = ServiceProcess.start(short_tmp / "home", disk_server=False)
    try:
        with IpcClient(svc.home.socket_path, timeout=20) as client:
            sub = client.call("events.subscribe")
            assert sub["subscribed"] is True and sub["complete"] is True
            start = sub["last_seq"]
            ex = client.call("exam.start", patient_id="R1", patient_name="Replay^Ruth")
            first = wait_until(lambda: client.next_event(5), 10, "an event")
            assert first["type"] == "exam.state" and first["seq"] == start + 1
        # while no client listens: the exam ends
        svc.call("exam.add_image", exam_id=ex["exam_id"], paths=spool_images(tmp_path / "s", 1))
        svc.call("exam.end", exam_id=ex["exam_id"])
        svc.proc.terminate()
        svc.proc.wait(30)
        svc = ServiceProcess(svc.home)
        with IpcClient(svc.home.socket_path, timeout=20) as client:
            sub = client.call("events.subscribe", since=first["seq"])
            assert sub["complete"] is True and sub["replayed"] >= 1 and sub["last_seq"] > first["seq"]
            replayed = [client.next_event(5) for _ in range(sub["replayed"])]
        seqs = [e["seq"] for e in replayed]
        assert seqs == list(range(first["seq"] + 1, first["seq"] + 1 + len(seqs)))
        assert {"type": "exam.state", "exam_id": ex["exam_id"], "state": "COMPLETED"}.items() <= \
            next(e for e in replayed if e["type"] == "exam.state").items()
        # a `since` older than the journal keeps, or newer than its last number, is said to be incomplete
        with IpcClient(svc.home.socket_path, timeout=20) as client:
            assert client.call("events.subscribe", since=sub["last_seq"] + 1000)["complete"] is False
        with IpcClient(svc.home.socket_path, timeout=20) as client:
            with pytest.raises(IpcError) as bad:
                client.call("events.subscribe", since="1")
            assert bad.value.data == {"param": "since"}
    finally:
        svc.proc.terminate()
        svc.proc.wait(30)
        cleanup(svc.home)


def test_the_journal_is_bounded_and_says_what_it_lost(tmp_path: Path) -> None:
    from modality_link.db import Database

    db = Database(tmp_path / "index.sqlite")
    db.events.keep_events = 5
    seqs = [db.events.append("alert", {"code": "x", "n": i}) for i in range(12)]
    assert seqs == list(range(1, 13))
    db.events.prune()
    kept = db.events.replay(0)
    assert [e.seq for e in kept.events] == list(range(8, 13)) and kept.complete is False
    assert db.events.replay(7).complete is True and db.events.replay(6).complete is False
    assert kept.events[0].params == {"code": "x", "n": 7}
    db.close()
    db = Database(tmp_path / "index.sqlite")  # numbers go on after a restart, never handed out again
    assert db.events.append("alert", {}) == 13
    db.close()
