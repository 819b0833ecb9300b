"""The IPC protocol described for programs: an OpenRPC document (https://spec.open-rpc.org).

docs/ipc.md explains the protocol to a person; this module says the same for a program:
every method with its parameters (from :data:`modality_link.api.SCHEMAS`, the rules the
service checks each request against, so the document and the checks cannot differ), its
result, every event with its fields, every enumeration (job states and kinds, exam states,
MPPS messages, alert codes, event types) and every error with its code, each field with its
type and whether it may be null. ``python -m modality_link.ipc_schema`` writes
``docs/ipc.openrpc.json`` and the generated tables of docs/ipc.md ("Errors", "Events",
"Enumerations"); tests/test_ipc_schema.py fails when code and document differ.
"""

from __future__ import annotations

import argparse
import json
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from modality_link import ipc
from modality_link.api import SCHEMAS, Param

# -- enumerations ---------------------------------------------------------------------------------

#: Each enumeration: its values, each with what it means.
ENUMS: dict[str, dict[str, str]] = {
    "job_state": {
        "queued": "waiting for its turn, its next attempt (`next_attempt_at`) or a Storage Commitment report",
        "running": "an attempt is under way",
        "done": "ended: every item done (with warnings, if any)",
        "failed": "ended: gave up (`last_error` says why); `jobs.retry` queues it again",
        "cancelled": "ended: cancelled by the operator",
    },
    "job_kind": {
        "send": "C-STORE of studies to a node (PS3.4 Annex B)",
        "commit": "Storage Commitment Push of what a send stored (PS3.4 Annex J); a child of the send",
        "retrieve": "C-FIND then C-MOVE of prior studies into the memory server or the archive (PS3.4 Annex C)",
        "burn": "studies written to a disc or an ISO 9660 image (PS3.12 Annex F)",
    },
    "exam_state": {
        "IN PROGRESS": "started (MPPS N-CREATE queued): images may be added",
        "COMPLETED": "ended (MPPS N-SET COMPLETED queued)",
        "DISCONTINUED": "ended early (MPPS N-SET DISCONTINUED with a CID 9300 reason queued)",
    },
    "mpps_message": {
        "create": "the N-CREATE that starts the Modality Performed Procedure Step (PS3.4 F.7.2.1)",
        "set": "the N-SET that ends it COMPLETED or DISCONTINUED (PS3.4 F.7.2.2)",
    },
    "alert_level": {"warning": "the operator should know", "error": "the operator must act"},
    "alert_code": {
        "disk-full": "the archive's file system or quota has no room for an incoming instance",
        "disk-cleanup-blocked": "the archive stays above the clean-up's high mark: what holds the data is named",
        "job-failed": "a send or retrieve job gave up after its last attempt",
        "commit-refused": "a node's Storage Commitment report named failed instances",
        "commit-failed": "no Storage Commitment report came, after a second attempt",
        "auto-send-failed": "an auto-send rule could not queue its jobs (applied again at the next start)",
        "mpps-unreachable": "an MPPS message is not delivered yet after several attempts (it is still tried)",
        "mpps-refused": "the MPPS node refused an MPPS message (it is not sent again)",
        "burn-failed": "a burn ended failed",
    },
    "burn_phase": {"build": "the image is mastered", "write": "the disc is written",
                   "verify": "the disc is read back and compared"},
    "burn_end": {"done": "every disc written and verified", "failed": "a disc failed (`error` says why)",
                 "cancelled": "cancelled by the operator"},
}

# -- events ---------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Field:
    """One field of an event or result: its JSON type, whether it may be null, its enumeration."""

    name: str
    type: str  # a JSON Schema type: string, integer, number, boolean, object, array
    description: str = ""
    nullable: bool = False
    enum: str | None = None  # a key of ENUMS
    #: An object's fields, or an array's items: their fields (an object each) or their JSON type.
    fields: tuple[Field, ...] | None = None
    items: tuple[Field, ...] | str | None = None
    #: False: present in some answers only (docs/ipc.md says which).
    required: bool = True

    def schema(self) -> dict[str, Any]:
        out: dict[str, Any] = {"type": [self.type, "null"] if self.nullable else self.type}
        if self.fields is not None:
            out |= _object(self.fields)
            out["type"] = ["object", "null"] if self.nullable else "object"
        if self.items is not None:
            out["items"] = {"type": self.items} if isinstance(self.items, str) else _object(self.items)
        if self.enum is not None:
            out = {"$ref": f"#/components/schemas/{self.enum}"}
            if self.nullable:
                out = {"oneOf": [out, {"type": "null"}]}
        if self.description:
            out["description"] = self.description
        return out

    def shown(self) -> str:
        kind = f"{self.enum}" if self.enum else self.type
        return f"`{self.name}` ({kind}{' or null' if self.nullable else ''})"


def _f(name: str, type: str, description: str = "", nullable: bool = False, enum: str | None = None,
       fields: tuple[Field, ...] | None = None, items: tuple[Field, ...] | str | None = None) -> Field:
    return Field(name, type, description, nullable, enum, fields, items)


def _all(type: str, *names: str) -> tuple[Field, ...]:
    """Fields of one JSON type, without descriptions."""
    return tuple(_f(n, type) for n in names)


EXAM_ID = _f("exam_id", "integer")
JOB_ID = _f("id", "integer", "the burn's job id")

#: Each event: what it says and its fields besides ``type`` and ``seq`` (docs/ipc.md "Events").
EVENTS: dict[str, tuple[str, tuple[Field, ...]]] = {
    "instance.stored": ("an instance entered the archive (C-STORE or import)", (
        _f("sop_instance_uid", "string"), _f("study_uid", "string"), _f("source_ae", "string"))),
    "memory.stored": ("the memory server keeps a new instance; fetch it with `memory.fetch` (not journaled: "
                      "`seq` is null and it is never replayed)", (
        _f("sop_instance_uid", "string"), _f("sop_class_uid", "string"), _f("series_uid", "string"),
        _f("study_uid", "string"), _f("patient_id", "string"), _f("source_ae", "string"), _f("bytes", "integer"))),
    "alert": ("the operator must be told", (
        _f("code", "string", enum="alert_code"), _f("level", "string", enum="alert_level"),
        _f("message", "string", "a sentence for the operator"))),
    "exam.state": ("an exam started, ended or was discontinued", (
        EXAM_ID, _f("state", "string", enum="exam_state"))),
    "mpps.sent": ("an MPPS message left the outbox and the MPPS node accepted it", (
        EXAM_ID, _f("kind", "string", enum="mpps_message"))),
    "mpps.failed": ("the MPPS node refused an MPPS message (alert `mpps-refused`)", (
        EXAM_ID, _f("kind", "string", enum="mpps_message"), _f("error", "string"))),
    "job.progress": ("a job was queued, started, ended, or counted more items (at most every 0.1 s)", (
        _f("job_id", "integer"), _f("kind", "string", enum="job_kind"), _f("node", "string"),
        _f("state", "string", enum="job_state"), _f("total", "integer"), _f("done", "integer"),
        _f("failed", "integer"), _f("warnings", "integer"), _f("detail", "string", "what it does or waits for"),
        _f("last_error", "string", "empty when there was none"),
        _f("parent_id", "integer", "the job that queued this one", nullable=True))),
    "burn.progress": ("a burn's phase advanced", (
        JOB_ID, _f("phase", "string", enum="burn_phase"), _f("disc", "integer"), _f("discs", "integer"),
        _f("fraction", "number", "0.0-1.0 within the phase"))),
    "burn.disc": ("a disc of the burn changed state", (
        JOB_ID, _f("disc", "object", "one entry of `discs` as in `burn.status`"))),
    "burn.insert_disc": ("put blank disc `disc` of `discs` in, then call `burn.disc_inserted`", (
        JOB_ID, _f("disc", "integer"), _f("discs", "integer"), _f("message", "string"))),
    "burn.done": ("the burn ended; sent once its job row holds that state", (
        JOB_ID, _f("state", "string", enum="burn_end"), _f("error", "string", "a sentence, empty when done"))),
}

ENUMS["event_type"] = {name: description for name, (description, _) in EVENTS.items()}

#: The fields every event has.
EVENT_COMMON = (
    _f("type", "string", enum="event_type"),
    _f("seq", "integer", "the event's sequence number (monotonic, kept across restarts; null: not journaled)",
       nullable=True),
)

# -- errors ---------------------------------------------------------------------------------------

#: Each error: its name, code and meaning (docs/ipc.md "Errors").
ERRORS: tuple[tuple[str, int, str], ...] = (
    ("PARSE_ERROR", ipc.PARSE_ERROR, "the line is not valid JSON (or nested too deeply to read); the connection "
                                     "stays open"),
    ("INVALID_REQUEST", ipc.INVALID_REQUEST, "not a JSON-RPC 2.0 request (its version member is not `\"2.0\"`, no method, an "
                                             "`id` that is not a string, number or null), or the line is too long"),
    ("METHOD_NOT_FOUND", ipc.METHOD_NOT_FOUND, "no such method"),
    ("INVALID_PARAMS", ipc.INVALID_PARAMS, "a parameter missing, unknown, of the wrong type (JSON `true` is not a "
                                           "number) or out of range, or a request the parameters make wrong; "
                                           "the message names it and `data.param` is its name; nothing was done"),
    ("INTERNAL_ERROR", ipc.INTERNAL_ERROR, "internal error (a bug: the service logs it and keeps running)"),
    ("CONFIG_INVALID", ipc.CONFIG_INVALID, "a configuration value breaks a rule; the message names the key and the "
                                           "rule, `data.key` is the key"),
    ("NOT_FOUND", ipc.NOT_FOUND, "something named does not exist (node, study, exam, job, file)"),
    ("DICOM_FAILURE", ipc.DICOM_FAILURE, "a DICOM operation failed (association refused or aborted, failure "
                                         "status in `data.status`)"),
    ("CONFLICT", ipc.CONFLICT, "conflict with the current state (an exam that ended, a job still running, a SOP "
                               "Instance UID archived in another exam: `data` names it)"),
    ("FORBIDDEN", ipc.FORBIDDEN, "the caller's role may not do this; the message names the role needed, the group "
                                 "that gives it and why (see Roles)"),
    ("PROTOCOL_MISMATCH", ipc.PROTOCOL_MISMATCH, "`hello` from a client of another major protocol version; "
                                                 "`data.protocol` is the service's"),
)

#: What an error's ``data`` may hold (every member optional).
ERROR_DATA = (
    _f("status", "integer", "the DICOM status behind the error (PS3.7 Annex C)"),
    _f("param", "string", "the request's parameter at fault"),
    _f("key", "string", "the configuration key at fault"),
    _f("protocol", "string", "the service's protocol version (PROTOCOL_MISMATCH)"),
    _f("sop_instance_uid", "string", "a SOP Instance UID already archived (CONFLICT)"),
    _f("exam_id", "integer", "the exam that holds it, null when it was archived outside an exam", nullable=True),
    _f("study_uid", "string", "the study that holds it"),
    _f("node", "string", "a node name that is not configured (NOT_FOUND)"),
)

# -- methods --------------------------------------------------------------------------------------

_JOB = "a job: `id, kind, node, state, params, parent_id, attempts, max_attempts, next_attempt_at, last_error, " \
       "detail, created_at, updated_at, total, done, warnings, failed`, and the same times as ISO 8601 local " \
       "time `created, updated, next_attempt` (\"\" when none)"
_EXAM = "the exam: `exam_id, state, sps_id, study_uid, pps_id, mpps_uid, mpps_node, objects, series, mpps`"
_BURN = "the burn as in `burn.status`"

#: A job's row (``jobs.list``; modality_link/db/jobs.py ``Job.to_dict``).
JOB_FIELDS = (
    _f("id", "integer"), _f("kind", "string", enum="job_kind"), _f("node", "string"),
    _f("state", "string", enum="job_state"),
    _f("params", "object", "what the job works on (its kind's own members: studies, commit, study_uid...)"),
    _f("parent_id", "integer", "the job that queued this one", nullable=True),
    *_all("integer", "attempts", "max_attempts"),
    _f("next_attempt_at", "number", "Unix seconds", nullable=True), *_all("string", "last_error", "detail"),
    *_all("number", "created_at", "updated_at"), *_all("integer", "total", "done", "warnings", "failed"),
    _f("created", "string", "ISO 8601 local time"), _f("updated", "string", "ISO 8601 local time"),
    _f("next_attempt", "string", "ISO 8601 local time while queued, else \"\""),
)
_ITEM = (_f("item", "string", "a SOP Instance UID"), _f("state", "string"),
         _f("status", "integer", "the last DICOM status", nullable=True), _f("detail", "string"))
#: A job with its history (``jobs.show``, ``jobs.retry``, ``jobs.cancel``).
JOB_SHOWN = JOB_FIELDS + (
    _f("children", "array", "ids of the jobs it queued", items="integer"),
    _f("attempt_history", "array", "each attempt: started, ended (ISO 8601), outcome (done, retry, wait, "
                                   "failed, interrupted), error", items=(
        *_all("string", "started", "ended"), _f("started_at", "number"), _f("ended_at", "number", nullable=True),
        _f("outcome", "string"), _f("error", "string"))),
    _f("failed_items", "array", items=_ITEM), _f("warning_items", "array", items=_ITEM),
)
_MPPS_MESSAGE = (
    *_all("integer", "id", "exam_id"), _f("kind", "string", enum="mpps_message"), _f("node", "string"),
    _f("state", "string"), _f("attempts", "integer"), _f("next_attempt", "number", "Unix seconds"),
    _f("last_error", "string"), _f("created_at", "number"), _f("sent_at", "number", nullable=True),
)
#: An exam (``exam.show``; modality_link/exam.py).
EXAM_FIELDS = (
    EXAM_ID, _f("state", "string", enum="exam_state"),
    *_all("string", "sps_id", "study_uid", "pps_id", "mpps_uid", "mpps_node"), _f("objects", "integer"),
    _f("series", "array", items=(_f("series_uid", "string"), _f("instances", "integer"),
                                 _f("complete", "boolean"))),
    _f("mpps", "array", "its MPPS messages (PS3.4 Annex F)", items=_MPPS_MESSAGE),
)
_DISC = (
    *_all("integer", "index", "count"), *_all("string", "fileset_id", "target", "state"),
    *_all("integer", "instances", "image_bytes"), _f("medium_verified", "boolean"), _f("files_checked", "integer"),
    *_all("string", "message", "digest"),
)
#: A burn (``burn.status``; modality_link/burns.py).
BURN_FIELDS = (
    *_all("integer", "id", "job_id"), _f("study_uids", "array", items="string"),
    *_all("string", "target", "profile"), _f("state", "string", enum="job_state"),
    *_all("string", "error", "detail"), _f("stopping", "boolean"), _f("discs", "array", items=_DISC),
    _f("waiting_for_disc", "object", "the disc asked for (`burn.insert_disc`)", nullable=True),
    _f("queued", "number", nullable=True), _f("started", "number", nullable=True),
    _f("finished", "number", nullable=True),
)
_DISK = (*_all("integer", "used_bytes", "capacity_bytes"), _f("quota", "boolean"), _f("percent", "number"))
_LISTENER = (_f("ae_title", "string"), _f("port", "integer"), _f("running", "boolean"))
ALERT_FIELDS = (_f("id", "integer"), _f("time", "number", "Unix seconds"), _f("level", "string", enum="alert_level"),
                _f("code", "string", enum="alert_code"), _f("message", "string"),
                _f("cleared", "integer", "1 once acknowledged or cleared, else 0"))

#: Each method: a summary, its result's JSON type and what the result holds (docs/ipc.md "Methods"
#: has the whole story); for the acquisition sequence the result's fields.
METHODS: dict[str, tuple[str, str, str, tuple[Field, ...]]] = {
    "hello": ("the handshake: the service's protocol version; another major is refused", "object", "", (
        _f("protocol", "string", "MAJOR.MINOR"), _f("service", "string"), _f("version", "string"))),
    "status": ("the service's state", "object", "`version, protocol, pid, home, uptime_s, station, listeners, "
                                                "archive, memory, alerts, last_event_seq, warnings`", (
        _f("version", "string"), _f("protocol", "string"), _f("pid", "integer"), _f("home", "string"),
        _f("uptime_s", "number"), _f("station", "object", fields=_all("string", "ae_title", "modality", "name",
                                                                     "institution")),
        _f("listeners", "object", fields=(_f("disk_server", "object", fields=_LISTENER),
                                          _f("memory_server", "object", fields=_LISTENER))),
        _f("archive", "object", fields=_all("integer", "studies", "instances")),
        _f("memory", "object", fields=_all("integer", "instances", "bytes", "budget_bytes")),
        _f("alerts", "array", "the latest 20 alerts not cleared", items=ALERT_FIELDS),
        _f("last_event_seq", "integer", "the last event's sequence number"),
        _f("warnings", "array", "sentences about settings that make a commitment report or a C-MOVE "
                                "unreachable (docs/design.md \"One identity\")", items="string"))),
    "studies.list": ("the archive's studies", "array", "studies", (
        *_all("string", "study_uid", "patient_id", "patient_name", "birth_date", "sex", "study_date", "study_time",
              "accession", "study_id", "description"), *_all("integer", "series", "instances"),
        _f("modalities", "string"), _f("nodes", "object", "node name: the study's state there"),
        _f("protected", "boolean"), _f("last_used", "number", "Unix seconds", nullable=True))),
    "studies.protect": ("keep a study from the disk clean-up", "object", "`study_uid, protected`", (_f("study_uid", "string"), _f("protected", "boolean"))),
    "studies.unprotect": ("let the disk clean-up delete a study again", "object", "`study_uid, protected`", (_f("study_uid", "string"), _f("protected", "boolean"))),
    "cleanup": ("run the disk clean-up now, or say what it would delete", "object", "what it deleted", (
        _f("dry_run", "boolean"), *_all("integer", "high", "low"), _f("above_high", "boolean"),
        _f("before", "object", fields=_DISK), _f("after", "object", fields=_DISK),
        _f("deleted", "array", "the studies deleted (or that would be)", items="object"),
        _f("deleted_bytes", "integer"), _f("blocked", "object", "what holds data back, by reason"),
        _f("nodes", "array", items="string"), _f("copies", "string"))),
    "archive.import": ("import PS3.10 files or folders", "object", "`imported, failed, jobs`", (
        _f("imported", "integer"), _f("failed", "array", items=(_f("path", "string"), _f("error", "string"))),
        _f("jobs", "array", "send job ids", items="integer"))),
    "nodes.list": ("the configured nodes", "object", "NAME: the node's settings", ()),
    "nodes.echo": ("C-ECHO configured nodes, or (`services`) propose each role's SOP classes", "array",
                   "`node, ok, status, rtt_ms, message` each; with `services`: `node, ok, rtt_ms, message, "
                   "services` (`role, sop_class, name, accepted, detail` each)", (
        _f("node", "string"), _f("ok", "boolean"),
        Field("status", "integer", "the C-ECHO status (not with `services`)", nullable=True, required=False),
        _f("rtt_ms", "number", nullable=True), _f("message", "string"),
        Field("services", "array", "with `services`: each role's SOP class proposed", required=False,
              items=(*_all("string", "role", "sop_class", "name"), _f("accepted", "boolean"), _f("detail", "string"))))),
    "config.get": ("a configuration value, or the whole file as TOML", "any", "the value", ()),
    "config.set": ("set, validate, write and reload one value", "any", "the new value", ()),
    "config.reload": ("re-read the configuration file", "object", "`reloaded, listeners_restarted`", (_f("reloaded", "boolean"), _f("listeners_restarted", "boolean"))),
    "alerts.list": ("the alerts, newest first", "array", "`id, time, level, code, message, cleared` each", ALERT_FIELDS),
    "alerts.clear": ("mark alerts as seen", "object", "`cleared`", (_f("cleared", "boolean"),)),
    "alerts.ack": ("acknowledge one alert by its id", "object", "`id, cleared`", (_f("id", "integer"), _f("cleared", "boolean"))),
    "memory.list": ("what the memory server holds", "object", "`instances, bytes, budget_bytes, studies`", (
        _f("studies", "array", items=(
            *_all("string", "study_uid", "patient_id", "patient_name", "study_date", "accession", "study_description"),
            *_all("integer", "instances", "bytes"),
            _f("series", "array", items=(
                *_all("string", "series_uid", "modality", "series_number", "series_description"),
                *_all("integer", "instances", "bytes"), _f("sop_instance_uids", "array", items="string"))))),
        *_all("integer", "instances", "bytes", "budget_bytes"))),
    "memory.fetch": ("one instance of the memory server as a PS3.10 file", "object", "the instance, `data` or "
                                                                                    "`path`", ()),
    "memory.clear": ("drop what the memory server holds", "object", "`cleared`", (_f("cleared", "integer", "instances dropped"),)),
    "query": ("C-FIND at a node", "array", "matches in the DICOM JSON model (PS3.18 F.2)", ()),
    "retrieve": ("queue a retrieve job", "object", "`job_id`", (_f("job_id", "integer"),)),
    "worklist.query": ("C-FIND the Modality Worklist", "object", "`node, items, partial, message, status`", (
        _f("node", "string"),
        _f("items", "array", "the scheduled procedure steps", items=(
            *_all("string", "sps_id", "patient_name", "patient_id", "birth_date", "sex", "accession",
                  "requested_procedure_id", "description", "modality", "station_aet", "start_date", "start_time",
                  "status", "study_uid"),
            _f("dataset", "object", "the whole item in the DICOM JSON model (PS3.18 F.2)"))),
        _f("partial", "boolean"), _f("message", "string"), _f("status", "integer", nullable=True))),
    "exam.start": ("start an exam: MPPS N-CREATE queued", "object", _EXAM, EXAM_FIELDS),
    "exam.add_image": ("archive acquired images of an exam, as one group", "object", "", (EXAM_ID, _f("added", "array", "the SOP Instance UIDs archived", items="string"))),
    "exam.series_complete": ("a series has all its images: its auto-send", "object", "", (
        EXAM_ID, _f("series_uid", "string"), _f("instances", "integer"), _f("already_complete", "boolean"),
        _f("jobs", "array", "send job ids", items="integer"))),
    "exam.end": ("end an exam: MPPS N-SET queued, auto-send applied", "object", f"{_EXAM}, `jobs`", EXAM_FIELDS + (_f("jobs", "array", "send job ids", items="integer"),)),
    "exam.show": ("an exam", "object", _EXAM, EXAM_FIELDS),
    "exam.list": ("the newest exams, newest first (`limit`, default 100)", "array", _EXAM, (
        EXAM_ID, _f("state", "string", enum="exam_state"), *_all("string", "sps_id", "study_uid", "patient_id",
                                                                 "patient_name"),
        _f("started_at", "number"), _f("ended_at", "number", nullable=True),
        _f("started", "string", "ISO 8601 local time"), _f("ended", "string", "ISO 8601 local time, \"\" if not ended"),
        _f("mpps", "array", items=(_f("kind", "string", enum="mpps_message"), _f("state", "string"),
                                   _f("last_error", "string"))))),
    "send": ("queue a send job (and its commit job)", "object", "", (_f("job_id", "integer"),)),
    "jobs.list": ("the jobs, newest first", "array", _JOB, JOB_FIELDS),
    "jobs.show": ("a job with its children and failed items", "object", f"{_JOB}, `children, failed_items, "
                                                                         f"warning_items`", JOB_SHOWN),
    "jobs.retry": ("queue a failed or cancelled job again", "object", _JOB, JOB_SHOWN),
    "jobs.cancel": ("cancel a queued or running job", "object", _JOB, JOB_SHOWN),
    "burn": ("burn studies to a disc or an ISO image", "object", _BURN, BURN_FIELDS),
    "burn.status": ("a burn", "object", _BURN, BURN_FIELDS),
    "burn.list": ("the latest 200 burns", "array", _BURN, BURN_FIELDS),
    "burn.disc_inserted": ("the next blank disc is in the drive", "object", "`id, disc`", (_f("id", "integer"), _f("disc", "integer"))),
    "burn.cancel": ("cancel a burn", "object", _BURN, BURN_FIELDS),
    "drives.list": ("the optical drives", "array", "`device, description, media, capabilities, busy` each", ()),
    "events.subscribe": ("turn this connection into an event stream; with `since`, replay what came after it",
                         "object", "", (
        _f("subscribed", "boolean"), _f("last_seq", "integer", "the journal's last sequence number"),
        _f("replayed", "integer", "events written before the live ones"),
        _f("complete", "boolean", "false: events after `since` were pruned (or `since` is not this journal's); "
                                  "resynchronise with jobs.list, exam.show..."))),
    "selftest": ("the self test inside the service", "object", "`ok, mode, checks`", (
        _f("ok", "boolean"), _f("mode", "string"),
        _f("checks", "array", items=(_f("name", "string"), _f("ok", "boolean"), _f("detail", "string"))))),
}

# -- the document ---------------------------------------------------------------------------------

_TYPES = {bool: "boolean", int: "integer", str: "string", list: "array", dict: "object"}


def param_schema(rule: Param) -> dict[str, Any]:
    """A parameter rule of :data:`~modality_link.api.SCHEMAS` as JSON Schema."""
    if rule.kind is object:
        return {"type": ["string", "number", "boolean"]}
    out: dict[str, Any] = {"type": _TYPES[rule.kind]}
    if rule.kind is int:
        out |= {"minimum": rule.low, "maximum": rule.high}
    elif rule.kind is str:
        out |= {"minLength": rule.low, "maxLength": rule.high}
    elif rule.kind is list:
        out |= {"minItems": rule.low, "maxItems": rule.high}
    elif rule.kind is dict:
        out |= {"maxProperties": rule.high}
    if rule.items is not None:
        out["items" if rule.kind is list else "additionalProperties"] = param_schema(rule.items)
    return out


def _object(fields: tuple[Field, ...], description: str = "") -> dict[str, Any]:
    out: dict[str, Any] = {"type": "object", "properties": {f.name: f.schema() for f in fields},
                           "required": [f.name for f in fields if f.required], "additionalProperties": False}
    if description:
        out["description"] = description
    return out


def document() -> dict[str, Any]:
    """The OpenRPC document of the protocol."""
    methods = []
    for name, (summary, kind, holds, fields) in METHODS.items():
        result: dict[str, Any] = {"description": holds}
        if fields and kind == "array":  # the fields of each item
            result |= {"type": "array", "items": _object(fields)}
        elif fields:
            result = _object(fields, holds)
        if not fields and kind != "any":
            result["type"] = kind
        params = [{"name": p, "required": rule.required,
                   "schema": param_schema(rule) if rule.required else
                   {"oneOf": [param_schema(rule), {"type": "null"}]}}
                  for p, rule in SCHEMAS[name].items()]
        methods.append({"name": name, "summary": summary, "paramStructure": "either", "params": params,
                        "result": {"name": "result", "schema": result}})
    events = {name: _object(EVENT_COMMON + fields, description) for name, (description, fields) in EVENTS.items()}
    return {
        "openrpc": "1.2.6",
        "info": {"title": "modality_link IPC", "version": ipc.PROTOCOL_VERSION,
                 "description": "JSON-RPC 2.0, one JSON object per line, over the Unix socket HOME/ipc.sock "
                                "(docs/ipc.md). Events are notifications `event` whose params are one of "
                                "x-events."},
        "methods": methods,
        "components": {
            "schemas": {name: {"type": "string", "enum": list(values),
                               "description": "; ".join(f"{v}: {d}" for v, d in values.items())}
                        for name, values in ENUMS.items()},
            "errors": {name: {"code": code, "message": meaning} for name, code, meaning in ERRORS},
            "x-error-data": _object(()) | {"properties": {f.name: f.schema() for f in ERROR_DATA}},
        },
        "x-events": events,
    }


# -- docs/ipc.md's tables -------------------------------------------------------------------------


def tables() -> dict[str, str]:
    """The generated tables of docs/ipc.md, by name."""
    errors = ["| name | code | meaning |", "|---|---|---|"]
    errors += [f"| `{name}` | {code} | {meaning} |" for name, code, meaning in ERRORS]
    data = ["| `data` member | type | meaning |", "|---|---|---|"]
    data += [f"| `{f.name}` | {f.type}{' or null' if f.nullable else ''} | {f.description} |" for f in ERROR_DATA]
    events = ["| type | fields (besides `type` and `seq`) | meaning |", "|---|---|---|"]
    events += [f"| `{name}` | {', '.join(f.shown() for f in fields)} | {description} |"
               for name, (description, fields) in EVENTS.items()]
    enums = ["| enumeration | value | meaning |", "|---|---|---|"]
    enums += [f"| {name} | `{value}` | {meaning} |" for name, values in ENUMS.items() for value, meaning in values.items()]
    return {"errors": "\n".join(errors + [""] + data), "events": "\n".join(events), "enums": "\n".join(enums)}


BEGIN = "<!-- generated by `python -m modality_link.ipc_schema`: {name} -->"
END = "<!-- end of generated {name} -->"


def fill(markdown: str) -> str:
    """`markdown` with each generated block replaced by what :func:`tables` gives now."""
    for name, table in tables().items():
        begin, end = BEGIN.format(name=name), END.format(name=name)
        pattern = re.compile(re.escape(begin) + r".*?" + re.escape(end), re.S)
        if not pattern.search(markdown):
            raise ValueError(f"docs/ipc.md has no block {begin!r} ... {end!r}")
        markdown = pattern.sub(lambda _: f"{begin}\n{table}\n{end}", markdown)
    return markdown


def dumps() -> str:
    return json.dumps(document(), indent=2, ensure_ascii=False) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m modality_link.ipc_schema", description=__doc__.splitlines()[0])
    parser.add_argument("--docs", type=Path, default=Path(__file__).resolve().parent.parent / "docs",
                        help="the docs folder whose ipc.openrpc.json and ipc.md are written (default: the repository's)")
    args = parser.parse_args(argv)
    (args.docs / "ipc.openrpc.json").write_text(dumps(), encoding="utf-8")
    md = args.docs / "ipc.md"
    md.write_text(fill(md.read_text(encoding="utf-8")), encoding="utf-8")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
