"""The IPC methods of the service (docs/ipc.md): thin calls into the domain modules.

This module and `modality_link.service` are the only ones besides `modality_link.ipc` that know the
IPC protocol exists. Each method calls the exam manager, job queue, burns, archive or config, and
turns the domain's :class:`~modality_link.errors.RequestError` into an :class:`IpcError` with
the code docs/ipc.md "Errors" gives; a DICOM status behind the error goes into the error's
``data`` as ``{"status": N}``, the parameter at fault as ``{"param": NAME}`` and a configuration
key as ``{"key": KEY}``.

Before a method runs, :meth:`Api.check` holds its parameters against the method's schema
(:data:`SCHEMAS`: type and range of each, -32602 naming the parameter) and the caller's role
against :data:`ENGINEER_METHODS` and the targets a technologist may name (docs/ipc.md "Roles",
-32010).
"""

from __future__ import annotations

import base64
import dataclasses
import functools
import logging
import math
import mmap
import os
import re
import time
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable

from pydicom.datadict import tag_for_keyword
from pydicom.dataset import Dataset

from modality_link import __version__, access, audit, config, lists, selftest
from modality_link.archive import file_kind
from modality_link.config import ConfigError
from modality_link.db import InstanceRecord
from modality_link.errors import Conflict, DicomFailure, Invalid, NotFound, RequestError, UnknownNode
from modality_link.ipc import (
    CONFIG_INVALID, CONFLICT, DICOM_FAILURE, FORBIDDEN, INVALID_PARAMS, MAX_LINE, NOT_FOUND, PROTOCOL_MISMATCH,
    PROTOCOL_VERSION, IpcError, Peer,
)
from modality_link.net import retrieve
from modality_link.net.echo import echo, echo_services
from modality_link.retrieving import STUDY_KEYS

if TYPE_CHECKING:
    from modality_link.service import Service

LOG = logging.getLogger("modality_link.api")

#: IPC error code of each domain error (docs/ipc.md "Errors").
ERROR_CODES: dict[type[RequestError], int] = {
    NotFound: NOT_FOUND,
    Conflict: CONFLICT,
    Invalid: INVALID_PARAMS,
    DicomFailure: DICOM_FAILURE,
}


def ipc_error(exc: RequestError) -> IpcError:
    """The IPC error for a domain error: in ``data`` its DICOM status, the parameter at fault
    and its details, where it has them (docs/ipc.md "Errors")."""
    code = next(c for cls, c in ERROR_CODES.items() if isinstance(exc, cls))
    data: dict[str, Any] = dict(exc.details)
    if exc.status is not None:
        data["status"] = exc.status
    if exc.param is not None:
        data["param"] = exc.param
    return IpcError(code, str(exc), data or None)


def _mapped(fn: Callable[..., Any]) -> Callable[..., Any]:
    """`fn` with its domain errors raised as IPC errors (its signature kept: the IPC server
    checks the params against it)."""

    @functools.wraps(fn)
    def call(*args: Any, **params: Any) -> Any:
        try:
            return fn(*args, **params)
        except RequestError as exc:
            raise ipc_error(exc) from None

    return call


def write_new_file(path: Path, data: bytes | mmap.mmap) -> None:
    """Write `data` to the new file `path` whole or not at all: a temporary beside it, flushed,
    then linked to its name (link(2) fails if the name appeared meanwhile)."""
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        with open(tmp, "xb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        try:
            os.link(tmp, path)
        except FileExistsError:
            raise Conflict(f"{path} exists; name a new file") from None
    finally:
        tmp.unlink(missing_ok=True)


# -- parameters (docs/ipc.md "Errors": -32602 names the parameter) ------------------------------


@dataclass(frozen=True)
class Param:
    """What one parameter of a method may be: its type; for numbers their range, for text and
    lists their length; for lists and objects the rule of each item (object keys are text)."""

    kind: type
    required: bool = False
    low: int = 0
    high: int = 2**63 - 1
    items: "Param | None" = None


TEXT = Param(str, high=1024)
NAME = Param(str, required=True, low=1, high=1024)
UID = Param(str, low=1, high=64)  # PS3.5 §9.1: at most 64 characters
PATH = Param(str, low=1, high=4096)
FLAG = Param(bool)
ID = Param(int, required=True, low=1)  # a row id of SQLite: 1 to 2**63-1
UIDS = Param(list, required=True, low=1, high=100_000, items=UID)
PATHS = Param(list, required=True, low=1, high=100_000, items=PATH)

#: The parameters of every method, by name (docs/ipc.md "Methods"); null is an absent parameter.
SCHEMAS: dict[str, dict[str, Param]] = {
    "hello": {"client": TEXT, "protocol": Param(str, required=True, low=1, high=32)},
    "status": {},
    "studies.list": {},
    "studies.protect": {"study_uid": UID},
    "studies.unprotect": {"study_uid": UID},
    "cleanup": {"dry_run": FLAG},
    "archive.import": {"paths": PATHS},
    "nodes.list": {},
    "nodes.echo": {"name": TEXT, "all": FLAG, "services": FLAG},
    "config.get": {"key": TEXT},
    "config.set": {"key": NAME, "value": Param(object, required=True, high=MAX_LINE)},
    "config.reload": {},
    "alerts.list": {"include_cleared": FLAG},
    "alerts.clear": {"code": TEXT},
    "alerts.ack": {"id": ID},
    "memory.list": {},
    "memory.fetch": {"sop_instance_uid": UID, "path": PATH},
    "memory.clear": {},
    "query": {"node": NAME, "level": TEXT, "keys": Param(dict, high=1000, items=TEXT), "model": TEXT},
    "retrieve": {"node": NAME, "study_uid": UID, "patient_id": TEXT, "to": TEXT},
    "worklist.query": {k: TEXT for k in ("node", "date", "patient_name", "patient_id", "accession",
                                         "modality", "requested_procedure_id", "station_aet")},
    "exam.start": {k: TEXT for k in ("item", "patient_id", "patient_name", "birth_date", "sex")},
    "exam.add_image": {"exam_id": ID, "paths": Param(list, low=1, high=100_000, items=PATH),
                       "data": Param(list, low=1, high=100_000, items=Param(str, low=1, high=MAX_LINE))},
    "exam.series_complete": {"exam_id": ID, "series_uid": UID},
    "exam.end": {"exam_id": ID, "discontinue": TEXT},
    "exam.show": {"exam_id": ID},
    "exam.list": {"limit": Param(int, low=1, high=10_000)},
    "send": {"study_uids": UIDS, "node": NAME, "commit": FLAG},
    "jobs.list": {},
    "jobs.show": {"id": ID},
    "jobs.retry": {"id": ID},
    "jobs.cancel": {"id": ID},
    "burn": {"study_uids": UIDS, "drive": TEXT, "iso": PATH, "profile": TEXT, "wait": FLAG, "overwrite": FLAG},
    "burn.status": {"id": ID},
    "burn.list": {},
    "burn.disc_inserted": {"id": ID},
    "burn.cancel": {"id": ID},
    "drives.list": {},
    "events.subscribe": {"since": Param(int)},
    "selftest": {},
}

_KINDS = {bool: "true or false", int: "a whole number", str: "text",
          list: "a list", dict: "an object", object: "text, a number or true/false"}


def _check_value(where: str, value: Any, rule: Param) -> None:
    """Raise -32602 naming `where` unless `value` keeps `rule`."""
    kind = rule.kind
    if kind is object:
        ok = isinstance(value, (str, int, float, bool)) and (not isinstance(value, float) or math.isfinite(value))
    else:
        ok = isinstance(value, kind) and not (kind is int and isinstance(value, bool))
    if not ok:
        raise IpcError(INVALID_PARAMS, f"{where} must be {_KINDS[kind]}, not {_shown(value)}")
    if kind is int:
        if not rule.low <= value <= rule.high:
            raise IpcError(INVALID_PARAMS, f"{where} must be from {rule.low} to {rule.high}, not {_shown(value)}")
    elif isinstance(value, (str, list, dict)):
        if not rule.low <= len(value) <= rule.high:
            raise IpcError(INVALID_PARAMS, f"{where} must have from {rule.low} to {rule.high} "
                                           f"{'characters' if isinstance(value, str) else 'items'}, not {len(value)}")
    if isinstance(value, str):
        if "\0" in value or not value.isascii() and _not_utf8(value):
            raise IpcError(INVALID_PARAMS, f"{where} must be Unicode text without NUL characters")
    elif isinstance(value, list) and rule.items is not None:
        for i, item in enumerate(value):
            _check_value(f"{where}[{i}]", item, rule.items)
    elif isinstance(value, dict) and rule.items is not None:
        for key, item in value.items():
            _check_value(f"{where}[{key!r}]", item, rule.items)


def _not_utf8(text: str) -> bool:
    try:
        text.encode("utf-8")
        return False
    except UnicodeEncodeError:  # a lone surrogate (JSON "\ud800")
        return True


def _shown(value: Any) -> str:
    text = repr(value) if not isinstance(value, (list, dict)) else type(value).__name__
    return text if len(text) <= 40 else text[:37] + "..."


def check_params(method: str, params: dict[str, Any]) -> None:
    """Raise -32602 naming the parameter unless `params` keep the method's :data:`SCHEMAS`."""
    schema = SCHEMAS[method]
    for name, value in params.items():
        rule = schema.get(name)
        if rule is None:
            raise IpcError(INVALID_PARAMS, f"{method}: no parameter {name!r} (it takes: {', '.join(schema) or 'none'})",
                           {"param": name})
        if value is not None:
            try:
                _check_value(f"{method}: {name}", value, rule)
            except IpcError as exc:
                exc.data = {"param": name}
                raise
    missing = [name for name, rule in schema.items() if rule.required and params.get(name) is None]
    if missing:
        raise IpcError(INVALID_PARAMS, f"{method}: {missing[0]} is missing", {"param": missing[0]})


# -- roles (docs/ipc.md "Roles") --------------------------------------------------------------------

#: The methods only a service engineer may call, and why; every other method is the
#: technologist's too, but for the targets :meth:`Api.engineer_target` names.
ENGINEER_METHODS: dict[str, str] = {
    "config.get": "it reads the service's configuration",
    "config.set": "it changes the service's configuration",
    "config.reload": "it changes the service's configuration",
    "nodes.echo": "it tests the network configuration",
    "studies.unprotect": "it lets the disk clean-up delete a study",
    "cleanup": "it deletes studies",
    "memory.clear": "it deletes what the memory server holds",
    "selftest": "it checks the service's files, database and network configuration",
}

#: Optical drive devices a technologist may name besides those of ``media.drives``.
OPTICAL_DRIVE = re.compile(r"/dev/sr\d+|sim:.*")


class Api:
    """The IPC methods of one running :class:`~modality_link.service.Service`."""

    def __init__(self, service: Service) -> None:
        self.service = service

    def methods(self) -> dict[str, Callable[..., Any]]:
        """Method name -> callable, as docs/ipc.md lists them."""
        svc = self.service
        assert svc.exams is not None and svc.jobs is not None and svc.burns is not None, \
            "the API is built after the service started its parts"
        exams, burns = svc.exams, svc.burns
        table: dict[str, Callable[..., Any]] = {
            "hello": self.hello,
            "status": self.status,
            "studies.list": self.studies_list,
            "studies.protect": self.studies_protect,
            "studies.unprotect": self.studies_unprotect,
            "cleanup": self.cleanup,
            "archive.import": self.archive_import,
            "nodes.list": self.nodes_list,
            "nodes.echo": self.nodes_echo,
            "config.get": self.config_get,
            "config.set": self.config_set,
            "config.reload": self.config_reload,
            "alerts.list": self.alerts_list,
            "alerts.clear": self.alerts_clear,
            "alerts.ack": self.alerts_ack,
            "memory.list": self.memory_list,
            "memory.fetch": self.memory_fetch,
            "memory.clear": self.memory_clear,
            "query": self.query,
            "retrieve": self.retrieve,
            "worklist.query": exams.query_worklist,
            "exam.start": exams.start,
            "exam.add_image": exams.add_image,
            "exam.series_complete": exams.series_complete,
            "exam.end": exams.end,
            "exam.show": exams.exam_info,
            "exam.list": self.exam_list,
            "send": self.send,
            "jobs.list": self.jobs_list,
            "jobs.show": self.jobs_show,
            "jobs.retry": self.jobs_retry,
            "jobs.cancel": self.jobs_cancel,
            "burn": burns.start,
            "burn.status": burns.status,
            "burn.list": burns.list,
            "burn.disc_inserted": burns.disc_inserted,
            "burn.cancel": burns.cancel,
            "drives.list": burns.drives,
            "selftest": self.selftest,
        }
        return {name: _mapped(fn) for name, fn in table.items()}

    # -- parameters and roles -----------------------------------------------------------------

    def check(self, peer: Peer, method: str, params: dict[str, Any]) -> None:
        """Refuse a request whose parameters break the method's schema (-32602) or whose
        caller's role may not make it (-32010, the message says which role and why)."""
        check_params(method, params)
        ipc = self.service.config.ipc
        role = access.role_of(peer.uid, peer.groups, ipc)
        if role == access.ENGINEER:
            return
        engineers = f"the service engineer (root, the service's user or group {ipc.engineer_group!r}, ipc.engineer_group)"
        refusal = None
        if role is None:
            refusal = (f"{method}: refused: user {peer.uid} is not in group {ipc.technologist_group!r} "
                       f"(ipc.technologist_group), whose members may use the service, nor is it {engineers}")
        elif why := ENGINEER_METHODS.get(method) or self.engineer_target(method, params):
            refusal = f"{method}: refused: only {engineers} may do this, since {why}; user {peer.uid} is a technologist"
        if refusal is not None:
            audit.restricted_function(f"uid {peer.uid}", refusal)
            raise IpcError(FORBIDDEN, refusal)

    def engineer_target(self, method: str, params: dict[str, Any]) -> str | None:
        """Why a technologist may not name this target (a file written outside the export folder,
        a drive that is not an optical drive, an import outside ``media.import_dirs``), or None."""
        svc = self.service
        media = svc.config.media
        export = svc.home.root / media.export_dir
        outside = f"outside the export folder {export} (media.export_dir)"
        if method == "archive.import":
            for path in params["paths"]:
                if not any(access.inside(path, Path(d)) for d in media.import_dirs):
                    return f"{path} is outside the folders of removable media ({', '.join(media.import_dirs)}, " \
                           f"media.import_dirs)"
        elif method == "memory.fetch" and params.get("path") is not None:
            if not access.inside(params["path"], export):
                return f"it writes {params['path']}, {outside}"
        elif method == "burn":
            iso, drive = params.get("iso"), params.get("drive")
            if iso is not None and not access.inside(iso, export):
                return f"it writes {iso}, {outside}"
            if isinstance(drive, str) and drive not in media.drives:
                if drive.startswith("stdio:") and not access.inside(drive[len("stdio:"):], export):
                    return f"the pseudo-drive {drive} writes a file {outside}"
                if not drive.startswith("stdio:") and not OPTICAL_DRIVE.fullmatch(drive):
                    return f"{drive} is not an optical drive (/dev/srN) nor one of media.drives"
        return None

    # -- service and archive --------------------------------------------------------------------

    def hello(self, protocol: str, client: str = "") -> dict[str, Any]:
        """The handshake (docs/ipc.md "Versions"): the service's protocol version; a client of
        another major version is refused, since its requests or its reading of the results may
        not mean what it thinks."""
        major, _, minor = protocol.partition(".")
        if not (major.isdigit() and (not minor or minor.isdigit())):
            raise IpcError(INVALID_PARAMS, f"hello: protocol is MAJOR.MINOR (e.g. {PROTOCOL_VERSION!r}), "
                                           f"not {protocol!r}", {"param": "protocol"})
        ours = PROTOCOL_VERSION.split(".")[0]
        if int(major) != int(ours):
            raise IpcError(PROTOCOL_MISMATCH,
                           f"hello: this service speaks protocol {PROTOCOL_VERSION}; a client of protocol "
                           f"{protocol} (major {int(major)}) cannot be served: use a client for major {ours}",
                           {"param": "protocol", "protocol": PROTOCOL_VERSION})
        if client:
            LOG.info("ipc: hello from %s (protocol %s)", client, protocol)
        return {"protocol": PROTOCOL_VERSION, "service": "modality_link", "version": __version__}

    def status(self) -> dict[str, Any]:
        svc = self.service
        assert svc.db is not None
        studies = svc.db.index.studies()
        listeners = {}
        for key, server in (("disk_server", svc.disk_server), ("memory_server", svc.memory_server)):
            lst = getattr(svc.config, key)
            listeners[key] = {
                "ae_title": lst.ae_title,
                "port": server.port if server else lst.port,
                "running": server is not None,
            }
        return {
            "version": __version__,
            "protocol": PROTOCOL_VERSION,
            "pid": os.getpid(),
            "home": str(svc.home.root),
            "uptime_s": round(time.time() - svc.started_at, 1),
            "station": dataclasses.asdict(svc.config.station),
            "listeners": listeners,
            "archive": {
                "studies": len(studies),
                "instances": sum(s.instances for s in studies),
            },
            "memory": {"instances": len(svc.memory), "bytes": svc.memory.used_bytes,
                       "budget_bytes": svc.memory.budget},
            "alerts": [a.to_dict() for a in svc.db.alerts.latest(limit=20)],
            "warnings": config.warnings(svc.config),
            "last_event_seq": svc.db.events.last_seq(),
        }

    def selftest(self) -> dict[str, Any]:
        """The self test inside the running service (docs/design.md "Self-test")."""
        svc = self.service
        assert svc.archive is not None and svc.burns is not None
        listening = {key: server.port for key, server in (("disk_server", svc.disk_server),
                                                         ("memory_server", svc.memory_server))
                     if server is not None}
        running = selftest.Check("service", True, f"running (pid {os.getpid()}, up "
                                                  f"{time.time() - svc.started_at:.0f} s), answering over IPC")
        return selftest.run(svc.home, svc.config, running, listening, svc.burns.drives,
                            svc.archive.wait_indexed).to_dict()

    def studies_list(self) -> list[dict[str, Any]]:
        assert self.service.db is not None
        return lists.studies(self.service.db)

    def exam_list(self, limit: int = 100) -> list[dict[str, Any]]:
        """The latest exams, newest first (docs/ipc.md ``exam.list``)."""
        assert self.service.db is not None
        return lists.exams(self.service.db, limit)

    def studies_protect(self, study_uid: str) -> dict[str, Any]:
        """Keep a study from the disk clean-up (docs/design.md "Disk clean-up")."""
        return self._protect(study_uid, True)

    def studies_unprotect(self, study_uid: str) -> dict[str, Any]:
        return self._protect(study_uid, False)

    def _protect(self, study_uid: str, protected: bool) -> dict[str, Any]:
        db = self.service.db
        assert db is not None
        if not db.index.protect(study_uid, protected):
            raise NotFound(f"no study {study_uid} in the archive")
        LOG.info("study %s %s", study_uid, "protected" if protected else "no longer protected")
        if not protected and self.service.cleaner is not None:
            self.service.cleaner.reconsider()  # it may go now
        return {"study_uid": study_uid, "protected": protected}

    def cleanup(self, dry_run: bool = False) -> dict[str, Any]:
        """Run the disk clean-up now, or say what it would delete (docs/design.md "Disk clean-up")."""
        cleaner = self.service.cleaner
        assert cleaner is not None
        return cleaner.run(dry_run=dry_run)

    def archive_import(self, paths: list[str]) -> dict[str, Any]:
        """Import files or folders; the auto-send rule "exam" takes each imported study as a
        complete exam (docs/design.md "Jobs and failures")."""
        svc = self.service
        assert svc.archive is not None and svc.autosend is not None
        missing = [p for p in paths if not Path(p).exists()]
        if missing:
            raise NotFound(f"no such file or folder: {', '.join(missing)}")
        resolved = [Path(os.path.realpath(p)) for p in paths]  # a link given by name is followed, once
        for given, path in zip(paths, resolved):
            kind = file_kind(path)
            if kind is not None:
                raise Invalid(f"archive.import: {given} is {kind}, not a regular file or a folder")
        imported, failed = 0, []
        studies: dict[str, None] = {}
        for path, result in svc.archive.import_paths(resolved, svc.config.station.ae_title):
            if not isinstance(result, InstanceRecord):
                LOG.error("import: %s refused: %s", path, result)
                failed.append({"path": str(path), "error": str(result)})
            else:
                imported += 1
                studies[result.study_uid] = None
                svc.on_stored(result)
        jobs = []
        for study in studies:
            jobs += svc.autosend.on_exam_complete(study)
        return {"imported": imported, "failed": failed, "jobs": jobs}

    # -- memory server ----------------------------------------------------------------------------

    def memory_list(self) -> dict[str, Any]:
        """The memory server's cache: studies, their series and instances, bytes."""
        memory = self.service.memory
        return {"studies": memory.studies(), "instances": len(memory), "bytes": memory.used_bytes,
                "budget_bytes": memory.budget}

    def memory_fetch(self, sop_instance_uid: str, path: str | None = None) -> dict[str, Any]:
        """One cached instance as PS3.10 bytes: base64 in the result, or written to `path` (an
        absolute path in an existing folder, not an existing file; written whole or not at all)."""
        item = self.service.memory.get(sop_instance_uid)
        if item is None:
            raise NotFound(f"no instance {sop_instance_uid} in the memory server")
        rec = item.record
        out: dict[str, Any] = {"sop_instance_uid": rec.sop_instance_uid, "sop_class_uid": rec.sop_class_uid,
                               "study_uid": rec.study_uid, "series_uid": rec.series_uid,
                               "transfer_syntax": rec.transfer_syntax, "bytes": item.size}
        if path is None:
            out["data"] = base64.b64encode(item.data).decode("ascii")
            return out
        if not isinstance(path, str) or not os.path.isabs(path) or not os.path.isdir(os.path.dirname(path)):
            raise Invalid(f"memory.fetch: {path!r} is not an absolute path in an existing folder")
        if os.path.lexists(path):
            raise Conflict(f"memory.fetch: {path} exists; name a new file")
        write_new_file(Path(path), item.data)
        out["path"] = path
        return out

    def memory_clear(self) -> dict[str, Any]:
        return {"cleared": self.service.memory.clear()}

    # -- Query/Retrieve SCU -------------------------------------------------------------------------

    def query(self, node: str, level: str = "STUDY", keys: dict[str, str] | None = None,
              model: str = "study") -> list[dict[str, Any]]:
        """C-FIND at `node`: matches in the DICOM JSON model (PS3.18 F.2). `keys` are keywords
        with their matching values ("" asks for the attribute to be returned)."""
        retrieving = self.service.retrieving
        assert retrieving is not None
        level = level.upper() if isinstance(level, str) else level
        if level not in retrieve.LEVELS:
            raise Invalid(f"query: level is one of {', '.join(retrieve.LEVELS).lower()}, not {level!r}")
        if model not in retrieve.MODELS:
            raise Invalid(f"query: model is study or patient, not {model!r}")
        identifier = Dataset()
        identifier.QueryRetrieveLevel = level
        defaults = {"PATIENT": ("PatientID", "PatientName", "PatientBirthDate", "PatientSex"),
                    "STUDY": STUDY_KEYS,
                    "SERIES": ("StudyInstanceUID", "SeriesInstanceUID", "Modality", "SeriesNumber",
                               "SeriesDescription", "NumberOfSeriesRelatedInstances"),
                    "IMAGE": ("StudyInstanceUID", "SeriesInstanceUID", "SOPInstanceUID", "SOPClassUID",
                              "InstanceNumber")}[level]
        wanted = {k: "" for k in defaults} | dict(keys or {})
        for keyword, value in wanted.items():
            if not isinstance(keyword, str) or not isinstance(value, str) or tag_for_keyword(keyword) is None:
                raise Invalid(f"query: {keyword!r} is not a DICOM keyword with a text value")
            setattr(identifier, keyword, value)
        try:
            cfg = self.service.config
            matches = retrieve.find(retrieving.node(node), cfg.station.ae_title, cfg.timeouts, identifier, model)
        except retrieve.QueryError as exc:
            raise DicomFailure(str(exc), exc.status) from None
        return [m.to_json_dict() for m in matches]

    def retrieve(self, node: str, study_uid: str | None = None, patient_id: str | None = None,
                 to: str = "memory") -> dict[str, Any]:
        """Queue the retrieve of a prior study (or a patient's studies) from `node`."""
        retrieving = self.service.retrieving
        assert retrieving is not None
        return {"job_id": retrieving.submit(node, study_uid, patient_id, to)}

    # -- jobs -----------------------------------------------------------------------------------

    def send(self, study_uids: list[str], node: str, commit: bool = False) -> dict[str, Any]:
        sending = self.service.sending
        assert sending is not None
        return {"job_id": sending.submit(study_uids, node, bool(commit))}

    def jobs_list(self) -> list[dict[str, Any]]:
        assert self.service.db is not None
        return lists.jobs(self.service.db)

    def jobs_show(self, id: int) -> dict[str, Any]:
        assert self.service.jobs is not None
        return self.service.jobs.show(id)

    def jobs_retry(self, id: int) -> dict[str, Any]:
        assert self.service.jobs is not None
        return self.service.jobs.retry(id)

    def jobs_cancel(self, id: int) -> dict[str, Any]:
        assert self.service.jobs is not None
        return self.service.jobs.cancel(id)

    # -- nodes and config -----------------------------------------------------------------------

    def nodes_list(self) -> dict[str, Any]:
        return {name: dataclasses.asdict(node) for name, node in self.service.config.nodes.items()}

    def nodes_echo(self, name: str | None = None, all: bool = False, services: bool = False) -> list[dict[str, Any]]:
        cfg = self.service.config
        if all:
            names = list(cfg.nodes)
        elif name:
            names = [name]
        else:
            raise Invalid("nodes.echo: give a node name or all=true")
        results = []
        for n in names:
            try:
                node = cfg.node(n)
            except ConfigError as exc:
                raise UnknownNode(str(exc), n) from None
            if services:
                results.append(echo_services(n, node, cfg.station.ae_title, cfg.timeouts).to_dict())
                continue
            res = echo(n, node, cfg.station.ae_title, cfg.timeouts)
            if not res.ok:
                LOG.error("echo: %s (%s@%s:%d): %s", n, node.ae_title, node.host, node.port, res.message)
            results.append(dataclasses.asdict(res))
        return results

    def config_get(self, key: str | None = None) -> Any:
        cfg = self.service.config
        if key is None:
            return config.dumps(cfg)
        try:
            return config.get_value(cfg, key)
        except ConfigError as exc:
            raise IpcError(CONFIG_INVALID, str(exc), {"key": key}) from None

    def config_set(self, key: str, value: str) -> Any:
        try:
            config.set_value(self.service.home.config_path, key, str(value))
        except ConfigError as exc:
            raise IpcError(CONFIG_INVALID, str(exc), {"key": key}) from None
        self.config_reload()
        return config.get_value(self.service.config, key)

    def config_reload(self) -> dict[str, Any]:
        """Re-read the config file; the service restarts listeners whose settings changed."""
        try:
            restarted = self.service.reload_config()
        except ConfigError as exc:
            raise IpcError(CONFIG_INVALID, f"config not reloaded: {exc}") from None
        return {"reloaded": True, "listeners_restarted": restarted}

    # -- alerts ---------------------------------------------------------------------------------

    def alerts_list(self, include_cleared: bool = False) -> list[dict[str, Any]]:
        assert self.service.db is not None
        return [a.to_dict() for a in self.service.db.alerts.latest(include_cleared=include_cleared)]

    def alerts_clear(self, code: str | None = None) -> dict[str, Any]:
        assert self.service.db is not None
        self.service.db.alerts.clear(code)
        return {"cleared": True}

    def alerts_ack(self, id: int) -> dict[str, Any]:
        """Acknowledge one alert (mark it cleared) by its id."""
        assert self.service.db is not None
        if not self.service.db.alerts.acknowledge(id):
            raise NotFound(f"no alert {id}")
        return {"id": id, "cleared": True}
