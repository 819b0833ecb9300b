"""Auto-send rules "exam" and "series" (nodes.*.auto_send) end to end: a real `serve`
process, the simulated PACS on loopback, images handed over with exam.add_image, no `send`."""

from __future__ import annotations

from collections import defaultdict
from pathlib import Path
from typing import Iterator

import pytest

from modality_link.config import Node
from modality_link.ipc import IpcError
from sim import images
from sim.pacs import Pacs
from tests.support.service import InProcessService, ServiceProcess, cleanup, make_home, wait_chain
from tests.support.waiting import wait_until


def spool_series(folder: Path, series: int, per_series: int, seed: int = 7) -> dict[str, list[str]]:
    """A CT study of `series` series written to `folder`: {Series Instance UID: [paths]}, in order."""
    folder.mkdir(parents=True, exist_ok=True)
    out: dict[str, list[str]] = defaultdict(list)
    for i, ds in enumerate(images.make_study("CT", images=per_series, series=series, rows=64, columns=64, seed=seed)):
        p = folder / f"img{i:03d}.dcm"
        ds.save_as(p, enforce_file_format=True)
        out[str(ds.SeriesInstanceUID)].append(str(p))
    return dict(out)


def pacs_node(pacs: Pacs, auto_send: str, roles: tuple[str, ...] = ("store", "commit")) -> Node:
    return Node(ae_title=pacs.ae_title, host="127.0.0.1", port=pacs.port, roles=list(roles),
                auto_send=auto_send, retry_interval=0.2, commit_wait=5.0, commit_timeout=10.0)


@pytest.fixture
def pacs() -> Iterator[Pacs]:
    p = Pacs(ae_title="SIMPACS", commit_mode="new-role").start()
    yield p
    p.stop()


def _serve(root: Path, pacs: Pacs, **nodes: Node) -> ServiceProcess:
    svc = ServiceProcess.start(root, nodes=nodes)
    pacs.report_to = ("MODLINK", "127.0.0.1", svc.port)  # the N-EVENT-REPORT comes on a new association
    return svc


def test_exam_end_sends_the_exam_with_commitment(short_tmp: Path, pacs: Pacs) -> None:
    """exam start → add images → exam end: the PACS holds every instance and commits them,
    without any `send`; a node whose rule is not "exam" gets nothing."""
    with Pacs(ae_title="OTHER") as other:
        svc = _serve(short_tmp / "home", pacs, PACS=pacs_node(pacs, "exam"), OTHER=pacs_node(other, "none"))
        try:
            exam = svc.call("exam.start", patient_id="AUTO1", patient_name="Auto^Send")
            spooled = spool_series(short_tmp / "spool", series=2, per_series=3)
            added = []
            for paths in spooled.values():
                added += svc.call("exam.add_image", exam_id=exam["exam_id"], paths=paths)["added"]
            assert not pacs.received  # nothing leaves before the exam ends
            end = svc.cli("exam", "end", str(exam["exam_id"]), check=True).stdout
            assert f"exam {exam['exam_id']}: COMPLETED, auto-send job" in end, end
            (job_id,) = [j["id"] for j in svc.call("jobs.list") if j["kind"] == "send"]
            last = wait_chain(svc.home, job_id)
            assert last["kind"] == "commit" and last["state"] == "done", last
            assert sorted(pacs.received) == sorted(added)
            assert pacs.store_calls == len(added) == 6
            assert len(pacs.actions) == 1 and len(pacs.actions[0].ReferencedSOPSequence) == 6
            (study,) = svc.studies()
            assert study["study_uid"] == exam["study_uid"]
            assert study["nodes"] == {"PACS": {"sent": 6, "committed": 6}}
            send = svc.call("jobs.show", id=job_id)
            assert send["params"]["auto"] == "exam" and send["params"]["commit"] is True
            assert not other.received and other.store_calls == 0
        finally:
            svc.stop()


def test_discontinued_exam_is_still_sent(short_tmp: Path, pacs: Pacs) -> None:
    """DISCONTINUED (CID 9300 110501): the acquired images still go to the PACS; a node
    without the commit role gets no commitment request."""
    svc = _serve(short_tmp / "home", pacs, PACS=pacs_node(pacs, "exam", roles=("store",)))
    try:
        exam = svc.call("exam.start", patient_id="AUTO2", patient_name="Stopped^Early")
        (paths,) = spool_series(short_tmp / "spool", series=1, per_series=4).values()
        added = svc.call("exam.add_image", exam_id=exam["exam_id"], paths=paths)["added"]
        res = svc.call("exam.end", exam_id=exam["exam_id"], discontinue="110501")
        assert res["state"] == "DISCONTINUED" and len(res["jobs"]) == 1
        job = wait_chain(svc.home, res["jobs"][0])
        assert job["kind"] == "send" and job["state"] == "done" and not job["children"], job
        assert sorted(pacs.received) == sorted(added)
        assert not pacs.actions
        # an exam discontinued before any image sends nothing
        empty = svc.call("exam.start", patient_id="AUTO3", patient_name="No^Images")
        assert svc.call("exam.end", exam_id=empty["exam_id"], discontinue="110513")["jobs"] == []
    finally:
        svc.stop()


def test_series_rule(short_tmp: Path, pacs: Pacs) -> None:
    """Rule "series": the first series is at the PACS (and committed) before the second is
    declared complete; the second is declared by the CLI, the third is completed by the exam
    end; every instance is stored exactly once."""
    svc = _serve(short_tmp / "home", pacs, PACS=pacs_node(pacs, "series"))
    try:
        exam = svc.call("exam.start", patient_id="AUTO4", patient_name="Series^Rule")
        eid = exam["exam_id"]
        (s1, p1), (s2, p2), (s3, p3) = spool_series(short_tmp / "spool", series=3, per_series=2).items()
        a1 = svc.call("exam.add_image", exam_id=eid, paths=p1)["added"]
        a2 = svc.call("exam.add_image", exam_id=eid, paths=p2[:1])["added"]
        res = svc.call("exam.series_complete", exam_id=eid, series_uid=s1)
        assert res["instances"] == 2 and not res["already_complete"] and len(res["jobs"]) == 1
        assert wait_chain(svc.home, res["jobs"][0])["state"] == "done"
        assert sorted(pacs.received) == sorted(a1)  # series 1 only: series 2 is still open
        assert svc.studies()[0]["nodes"]["PACS"] == {"sent": 2, "committed": 2}

        again = svc.call("exam.series_complete", exam_id=eid, series_uid=s1)
        assert again["already_complete"] and again["jobs"] == []
        with pytest.raises(IpcError, match="declared complete"):
            svc.call("exam.add_image", exam_id=eid, paths=p1[:1])
        with pytest.raises(IpcError, match="no image of series") as exc:
            svc.call("exam.series_complete", exam_id=eid, series_uid=s3)
        assert exc.value.code == -32002

        a2 += svc.call("exam.add_image", exam_id=eid, paths=p2[1:])["added"]
        out = svc.cli("exam", "series-complete", str(eid), s2, check=True).stdout
        assert f"series {s2} complete, 2 object(s), auto-send job" in out, out
        a3 = svc.call("exam.add_image", exam_id=eid, paths=p3)["added"]
        shown = svc.call("exam.show", exam_id=eid)["series"]
        assert [(s["series_uid"], s["complete"]) for s in shown] == [(s1, True), (s2, True), (s3, False)]

        end = svc.call("exam.end", exam_id=eid)
        assert len(end["jobs"]) == 1  # series 3 only
        assert all(s["complete"] for s in end["series"])
        sends = [j for j in svc.call("jobs.list") if j["kind"] == "send"]
        assert sorted(j["params"]["series"] for j in sends) == sorted([s1, s2, s3])
        for j in sends:
            assert wait_chain(svc.home, j["id"])["state"] == "done"
        assert sorted(pacs.received) == sorted(a1 + a2 + a3)
        assert pacs.store_calls == 6  # nothing sent twice
        assert svc.studies()[0]["nodes"]["PACS"] == {"sent": 6, "committed": 6}
        with pytest.raises(IpcError, match="completed at its end"):
            svc.call("exam.series_complete", exam_id=eid, series_uid=s3)
    finally:
        svc.stop()


def test_auto_send_left_due_is_applied_at_the_next_start(short_tmp: Path, pacs: Pacs) -> None:
    """The rule could not queue its job at the exam end (here: the job queue raised); the exam
    still ends, the operator is alerted, and the next start of the service queues the send."""
    home = make_home(ae_title=pacs.ae_title, port=pacs.port, roles=["store"], auto_send="exam")
    svc = InProcessService(home)
    try:
        def broken(study_uid: str, uids: list[str]) -> list[int]:
            raise RuntimeError("database is locked")

        svc.service.autosend.on_exam_complete = broken
        exam = svc.call("exam.start", patient_id="AUTO5", patient_name="Crash^Between")
        (paths,) = spool_series(short_tmp / "spool", series=1, per_series=3).values()
        added = svc.call("exam.add_image", exam_id=exam["exam_id"], paths=paths)["added"]
        res = svc.call("exam.end", exam_id=exam["exam_id"])
        assert res["state"] == "COMPLETED" and res["jobs"] == []
        assert [a for a in svc.call("alerts.list") if a["code"] == "auto-send-failed"]
        assert svc.call("jobs.list") == []
    finally:
        svc.stop()
    svc = InProcessService(home)
    try:
        (job,) = wait_until(lambda: svc.call("jobs.list"), 10, "the resumed send job")
        assert job["params"]["auto"] == "exam"
        assert wait_chain(home, job["id"])["state"] == "done"
        assert sorted(pacs.received) == sorted(added)
    finally:
        svc.stop()
    svc = InProcessService(home)  # applied once: a third start queues nothing more
    try:
        assert len(svc.call("jobs.list")) == 1
    finally:
        svc.stop()
        cleanup(home)


def test_upgrade_does_not_resend_exams_ended_before_it(short_tmp: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Schema 3 → 4: exams that ended before the upgrade count as already auto-sent, open ones not."""
    from modality_link.db import Database, schema

    path = short_tmp / "index.sqlite"
    with monkeypatch.context() as m:
        m.setattr(schema, "MIGRATIONS", schema.MIGRATIONS[:3])
        old = Database(path)
        fields = dict(sps_id="", item_json="{}", study_uid="1.2.3", study_id="1", pps_id="P", mpps_node="",
                      mpps_uid="", started_at=1.0)
        ended = old.exams.create(state="COMPLETED", **fields)
        old.exams.end(ended, "COMPLETED", ended_at=2.0)
        running = old.exams.create(state="IN PROGRESS", **fields)
        old.close()
    new = Database(path)
    try:
        assert new.exams.auto_send_due() == ([], [])
        new.exams.end(running, "COMPLETED", ended_at=3.0)
        assert new.exams.auto_send_due() == ([], [running])
    finally:
        new.close()
