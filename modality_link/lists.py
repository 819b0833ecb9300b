"""The lists a technologist reads - studies, jobs, exams - from the service's database.

The running service answers ``studies.list``, ``jobs.list`` and ``exam.list`` (docs/ipc.md) with
these functions over its own connection; while no service runs, ``modality-link jobs``,
``studies`` and ``exam list`` call them over the file opened read-only (:func:`read_only`), which
creates and changes nothing in the home (docs/design.md "The command line").
"""

from __future__ import annotations

import json
from typing import Any

from modality_link.db import Database, Exam, Jobs
from modality_link.db.jobs import local_time
from modality_link.home import Home

#: An MPPS message's state (docs/ipc.md ``exam.show``) from its job's: a running message is
#: still queued for the reader, a cancelled one failed.
MPPS_STATES = {"queued": "queued", "running": "queued", "done": "sent", "failed": "failed", "cancelled": "failed"}


class NoDatabase(Exception):
    """The home has no database yet (the service never ran there)."""


def read_only(home: Home) -> Database:
    """The home's database opened read-only (raises :class:`NoDatabase` when there is none)."""
    if not home.db_path.exists():
        raise NoDatabase(f"{home.db_path} does not exist: the service has never run in {home.root}")
    return Database(home.db_path, read_only=True)


def studies(db: Database) -> list[dict[str, Any]]:
    """The archive's studies as ``studies.list`` gives them (docs/ipc.md)."""
    counts = db.jobs.node_counts()
    usage = db.index.usage()
    out = []
    for s in db.index.studies():
        use = usage.get(s.study_uid)
        out.append({**s.to_dict(), "nodes": counts.get(s.study_uid, {}),
                    "protected": use.protected if use else False, "last_used": use.last_used if use else None})
    return out


def jobs(db: Database) -> list[dict[str, Any]]:
    """The jobs as ``jobs.list`` gives them (docs/ipc.md), newest first."""
    return [job.to_dict() for job in db.jobs.latest()]


def _text(item: dict[str, Any], tag: str) -> str:
    """A text value of a data set in the DICOM JSON model (PS3.18 F.2); PN as its alphabetic group."""
    values = item.get(tag, {}).get("Value") or [""]
    value = values[0]
    return str(value.get("Alphabetic", "") if isinstance(value, dict) else value)


def exam_row(exam: Exam, mpps_jobs: Jobs) -> dict[str, Any]:
    """An exam as ``exam.list`` gives it (docs/ipc.md): who, when, its state and its MPPS."""
    item = json.loads(exam.item_json or "{}")
    mpps = []
    for kind, job_id in (("create", exam.mpps_create_job), ("set", exam.mpps_set_job)):
        job = mpps_jobs.get(job_id) if job_id is not None else None
        if job is not None:
            sent = job.state == "done"
            mpps.append({"kind": kind, "state": MPPS_STATES[job.state], "last_error": "" if sent else job.last_error})
    return {
        "exam_id": exam.id, "state": exam.state, "sps_id": exam.sps_id, "study_uid": exam.study_uid,
        "patient_id": _text(item, "00100020"), "patient_name": _text(item, "00100010"),
        "started_at": exam.started_at, "ended_at": exam.ended_at,
        "started": local_time(exam.started_at), "ended": local_time(exam.ended_at), "mpps": mpps,
    }


def exams(db: Database, limit: int = 100) -> list[dict[str, Any]]:
    """The latest `limit` exams, newest first."""
    return [exam_row(e, db.mpps_jobs) for e in db.exams.latest(limit)]
