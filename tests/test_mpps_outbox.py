"""The MPPS outbox when sending a message raises a bug, not an MppsError (PS3.4 Annex F)."""

from __future__ import annotations

import logging
import sqlite3

from modality_link.config import Node
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
            svc.service.exams.stop_worker()  # queue both exams' N-CREATEs before one is sent
            broken = svc.call("exam.start", patient_id="P1", patient_name="Broken^Row")["exam_id"]
            good = svc.call("exam.start", patient_id="P2", patient_name="Good^Row")["exam_id"]
            with sqlite3.connect(home.db_path) as db:
                db.execute("UPDATE mpps_outbox SET dataset_json='{\"0010' WHERE exam_id=?", (broken,))
            with caplog.at_level(logging.INFO, logger="modality_link.exam"):
                svc.service.exams.start_worker()
                wait_until(lambda: svc.call("exam.show", exam_id=good)["mpps"][0]["state"] == "sent",
                           15, "the second exam's N-CREATE sent")
            (row,) = svc.call("exam.show", exam_id=broken)["mpps"]
        finally:
            svc.stop()
            cleanup(home)
    assert row["state"] == "failed" and row["attempts"] == 3, row
    assert row["last_error"].startswith("JSONDecodeError: "), row
    tracebacks = [r for r in caplog.records if r.exc_info]
    assert len(tracebacks) == 1 and "unexpected error" in tracebacks[0].getMessage()
    assert [m["kind"] for m in ris.mpps_messages] == ["create"]
