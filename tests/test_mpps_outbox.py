"""The MPPS outbox when sending a message raises a bug, not an MppsError (PS3.4 Annex F)."""

from __future__ import annotations

import logging
import sqlite3

from modality_link.config import Node, Timeouts
from sim.ris import RIS
from tests.support.service import InProcessService, cleanup, exam_home
from tests.support.waiting import wait_until


def test_a_message_that_raises_fails_after_the_node_retries(caplog) -> None:
    """A stored N-CREATE that cannot be decoded any more fails after 1 + retries attempts with
    the exception's type and message, the traceback logged once; the next exam's MPPS is not
    held up behind it."""
    with RIS() as ris:
        home = exam_home({"ris": Node(ae_title="RIS", host="127.0.0.1", port=ris.port, roles=["mpps"],
                                      retries=2, retry_interval=0.5)})
        svc = InProcessService(home)
        try:
            svc.service.mpps.stop()  # queue both exams' N-CREATEs before one is sent
            broken = svc.call("exam.start", patient_id="P1", patient_name="Broken^Row")["exam_id"]
            good = svc.call("exam.start", patient_id="P2", patient_name="Good^Row")["exam_id"]
            with sqlite3.connect(home.db_path) as db:
                db.execute("UPDATE mpps_jobs SET params=json_set(params, '$.dataset', '{\"0010') "
                           "WHERE json_extract(params, '$.exam_id')=?", (broken,))
            with caplog.at_level(logging.INFO, logger="modality_link.exam"):
                svc.service.mpps.start()
                wait_until(lambda: svc.call("exam.show", exam_id=good)["mpps"][0]["state"] == "sent",
                           15, "the second exam's N-CREATE sent")
                wait_until(lambda: svc.call("exam.show", exam_id=broken)["mpps"][0]["state"] != "queued",
                           15, "the first exam's N-CREATE given up")
            (row,) = svc.call("exam.show", exam_id=broken)["mpps"]
        finally:
            svc.stop()
            cleanup(home)
    assert row["state"] == "failed" and row["attempts"] == 3, row
    assert row["last_error"].startswith("JSONDecodeError: "), row
    tracebacks = [r for r in caplog.records if r.exc_info]
    assert len(tracebacks) == 1 and "unexpected error" in tracebacks[0].getMessage()
    assert [m["kind"] for m in ris.mpps_messages] == ["create"]


def test_messages_queued_before_the_upgrade_are_sent_after_it(monkeypatch) -> None:
    """Schema 4 -> 5: the MPPS outbox rows become jobs. A sent N-CREATE stays sent, the queued
    N-SET is sent by the upgraded service after it (with the N-CREATE's MPPS UID), and a
    failed message stays failed with its error."""
    import datetime
    import json

    from pydicom.uid import generate_uid

    from modality_link.db import Database, schema
    from modality_link.net import mpps

    with RIS() as ris:
        home = exam_home({"ris": Node(ae_title="RIS", host="127.0.0.1", port=ris.port, roles=["mpps"],
                                      retry_interval=0.5)})
        try:
            with monkeypatch.context() as m:
                m.setattr(schema, "MIGRATIONS", schema.MIGRATIONS[:4])
                old = Database(home.db_path)
                uid = generate_uid()
                step = mpps.ProcedureStep("PPS1", "MODLINK", "CT01", "CT", generate_uid(), "1",
                                          datetime.datetime.now(), patient_name="Up^Grade", patient_id="UP1")
                create = json.dumps(mpps.build_n_create(step).to_json_dict())
                nset = json.dumps(mpps.build_n_set([], datetime.datetime.now(), mpps.COMPLETED, "MODLINK")
                                  .to_json_dict())
                fields = dict(sps_id="", item_json="{}", study_uid=step.study_uid, study_id="1", pps_id="PPS1",
                              mpps_node="ris", mpps_uid=uid, started_at=1.0)
                pending = old.exams.create(state="COMPLETED", **fields)
                refused = old.exams.create(state="IN PROGRESS", **{**fields, "mpps_uid": generate_uid()})
                old.close()
            # the N-CREATE was sent before the upgrade
            assert mpps.send_n_create(Node(ae_title="RIS", host="127.0.0.1", port=ris.port), "MODLINK",
                                      Timeouts(), mpps.build_n_create(step), uid) == uid
            with sqlite3.connect(home.db_path) as db:
                rows = [(pending, "create", create, "sent", 1, ""), (pending, "set", nset, "queued", 2, "refused"),
                        (refused, "create", create, "failed", 1, "0x0121")]
                db.executemany("INSERT INTO mpps_outbox(exam_id, kind, node, dataset_json, state, attempts, "
                               "next_attempt, last_error, created_at, sent_at) VALUES (?,?,'ris',?,?,?,0,?,1,NULL)",
                               rows)
            svc = InProcessService(home)
            try:
                sent = wait_until(lambda: (r := svc.call("exam.show", exam_id=pending)["mpps"]) and
                                  all(m["state"] == "sent" for m in r) and r, 15, "the N-SET sent")
                failed = svc.call("exam.show", exam_id=refused)["mpps"]
                listed = svc.call("jobs.list")
            finally:
                svc.stop()
        finally:
            cleanup(home)
    assert [(m["kind"], m["state"], m["attempts"]) for m in sent] == [("create", "sent", 1), ("set", "sent", 3)]
    assert [(m["kind"], m["state"], m["last_error"]) for m in failed] == [("create", "failed", "0x0121")]
    assert [(m["kind"], m["uid"]) for m in ris.mpps_messages] == [("create", uid), ("set", uid)]
    assert listed == []  # MPPS messages are shown by exam.show, not as jobs
