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

    def schema(self) -> dict[str, Any]:
        out: dict[str, Any] = {"type": [self.type, "null"] if self.nullable else self.type}
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


def _f(name: str, type: str, description: str = "", nullable: bool = False, enum: str | None = None) -> Field:
    return Field(name, type, description, nullable, enum)


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
       "time `created, updated, next_attempt` (null when none)"
_EXAM = "the exam: `exam_id, state, sps_id, study_uid, pps_id, mpps_uid, mpps_node, objects, series, mpps`"
_BURN = "the burn as in `burn.status`"

#: Each method: a summary, its result's JSON type and what the result holds (docs/ipc.md "Methods"
#: has the whole story); for the acquisition sequence the result's fields.
METHODS: dict[str, tuple[str, str, str, tuple[Field, ...]]] = {
    "hello": ("the handshake: the service's protocol version; another major is refused", "object", "", (
        _f("protocol", "string", "MAJOR.MINOR"), _f("service", "string"), _f("version", "string"))),
    "status": ("the service's state", "object", "`version, protocol, pid, home, uptime_s, station, listeners, "
                                                "archive, memory, alerts, last_event_seq, warnings`", (
        _f("protocol", "string"), _f("last_event_seq", "integer", "the last event's sequence number"),
        _f("warnings", "array", "sentences about settings that make a commitment report or a C-MOVE "
                                "unreachable (docs/design.md \"One identity\")"))),
    "studies.list": ("the archive's studies", "array", "studies", ()),
    "studies.protect": ("keep a study from the disk clean-up", "object", "`study_uid, protected`", ()),
    "studies.unprotect": ("let the disk clean-up delete a study again", "object", "`study_uid, protected`", ()),
    "cleanup": ("run the disk clean-up now, or say what it would delete", "object", "what it deleted", ()),
    "archive.import": ("import PS3.10 files or folders", "object", "`imported, failed, jobs`", ()),
    "nodes.list": ("the configured nodes", "object", "NAME: the node's settings", ()),
    "nodes.echo": ("C-ECHO configured nodes, or (`services`) propose each role's SOP classes", "array",
                   "`node, ok, status, rtt_ms, message` each; with `services`: `node, ok, rtt_ms, message, "
                   "services` (`role, sop_class, name, accepted, detail` each)", ()),
    "config.get": ("a configuration value, or the whole file as TOML", "any", "the value", ()),
    "config.set": ("set, validate, write and reload one value", "any", "the new value", ()),
    "config.reload": ("re-read the configuration file", "object", "`reloaded, listeners_restarted`", ()),
    "alerts.list": ("the alerts, newest first", "array", "`id, time, level, code, message, cleared` each", ()),
    "alerts.clear": ("mark alerts as seen", "object", "`cleared`", ()),
    "alerts.ack": ("acknowledge one alert by its id", "object", "`id, cleared`", ()),
    "memory.list": ("what the memory server holds", "object", "`instances, bytes, budget_bytes, studies`", ()),
    "memory.fetch": ("one instance of the memory server as a PS3.10 file", "object", "the instance, `data` or "
                                                                                    "`path`", ()),
    "memory.clear": ("drop what the memory server holds", "object", "`cleared`", ()),
    "query": ("C-FIND at a node", "array", "matches in the DICOM JSON model (PS3.18 F.2)", ()),
    "retrieve": ("queue a retrieve job", "object", "`job_id`", ()),
    "worklist.query": ("C-FIND the Modality Worklist", "object", "`node, items, partial, message, status`", ()),
    "exam.start": ("start an exam: MPPS N-CREATE queued", "object", _EXAM, (
        EXAM_ID, _f("state", "string", enum="exam_state"), _f("study_uid", "string"), _f("sps_id", "string"))),
    "exam.add_image": ("archive acquired images of an exam, as one group", "object", "", (
        EXAM_ID, _f("added", "array", "the SOP Instance UIDs archived"))),
    "exam.series_complete": ("a series has all its images: its auto-send", "object", "", (
        EXAM_ID, _f("series_uid", "string"), _f("instances", "integer"), _f("already_complete", "boolean"),
        _f("jobs", "array", "send job ids"))),
    "exam.end": ("end an exam: MPPS N-SET queued, auto-send applied", "object", f"{_EXAM}, `jobs`", (
        EXAM_ID, _f("state", "string", enum="exam_state"), _f("jobs", "array", "send job ids"))),
    "exam.show": ("an exam", "object", _EXAM, (EXAM_ID, _f("state", "string", enum="exam_state"))),
    "exam.list": ("the newest exams, newest first (`limit`, default 50)", "array", _EXAM, ()),
    "send": ("queue a send job (and its commit job)", "object", "", (_f("job_id", "integer"),)),
    "jobs.list": ("the jobs, newest first", "array", _JOB, ()),
    "jobs.show": ("a job with its children and failed items", "object", f"{_JOB}, `children, failed_items, "
                                                                         f"warning_items`", (
        _f("id", "integer"), _f("kind", "string", enum="job_kind"), _f("state", "string", enum="job_state"),
        _f("parent_id", "integer", nullable=True), _f("children", "array", "ids of the jobs it queued"),
        _f("attempt_history", "array", "each attempt: started, ended (ISO 8601), outcome (done, retry, wait, "
                                       "failed, interrupted), error"))),
    "jobs.retry": ("queue a failed or cancelled job again", "object", _JOB, ()),
    "jobs.cancel": ("cancel a queued or running job", "object", _JOB, ()),
    "burn": ("burn studies to a disc or an ISO image", "object", _BURN, ()),
    "burn.status": ("a burn", "object", _BURN, ()),
    "burn.list": ("the latest 200 burns", "array", _BURN, ()),
    "burn.disc_inserted": ("the next blank disc is in the drive", "object", "`id, disc`", ()),
    "burn.cancel": ("cancel a burn", "object", _BURN, ()),
    "drives.list": ("the optical drives", "array", "`device, description, media, capabilities, busy` each", ()),
    "events.subscribe": ("turn this connection into an event stream; with `since`, replay what came after it",
                         "object", "", (
        _f("subscribed", "boolean"), _f("last_seq", "integer", "the journal's last sequence number"),
        _f("replayed", "integer", "events written before the live ones"),
        _f("complete", "boolean", "false: events after `since` were pruned (or `since` is not this journal's); "
                                  "resynchronise with jobs.list, exam.show..."))),
    "selftest": ("the self test inside the service", "object", "`ok, mode, checks`", ()),
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
                           "required": [f.name for f in fields]}
    if description:
        out["description"] = description
    return out


def document() -> dict[str, Any]:
    """The OpenRPC document of the protocol."""
    methods = []
    for name, (summary, kind, holds, fields) in METHODS.items():
        result: dict[str, Any] = _object(fields, holds) if fields else {"description": holds}
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
