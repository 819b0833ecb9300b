"""The IPC methods of the service (docs/ipc.md): thin calls into the domain modules.

This module and `modality_link.service` are the only ones besides `modality_link.ipc` that know the
IPC protocol exists. Each method calls the exam manager, job queue, burns, archive or config, and
turns the domain's :class:`~modality_link.errors.RequestError` into an :class:`IpcError` with
the code docs/ipc.md "Errors" gives; a DICOM status behind the error goes into the error's
``data`` as ``{"status": N}``.
"""

from __future__ import annotations

import base64
import dataclasses
import functools
import logging
import mmap
import os
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable

from pydicom.datadict import tag_for_keyword
from pydicom.dataset import Dataset

from modality_link import __version__, config
from modality_link.config import ConfigError
from modality_link.db import InstanceRecord
from modality_link.errors import Conflict, DicomFailure, Invalid, NotFound, RequestError
from modality_link.ipc import CONFIG_INVALID, CONFLICT, DICOM_FAILURE, INVALID_PARAMS, NOT_FOUND, IpcError
from modality_link.net import retrieve
from modality_link.net.echo import echo
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
    """The IPC error for a domain error, its DICOM status (if any) in ``data``."""
    code = next(c for cls, c in ERROR_CODES.items() if isinstance(exc, cls))
    return IpcError(code, str(exc), None if exc.status is None else {"status": exc.status})


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


def _job_id(id: Any) -> int:
    if isinstance(id, bool) or not isinstance(id, int):
        raise Invalid("give the job id as a whole number")
    return id


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
        }
        return {name: _mapped(fn) for name, fn in table.items()}

    # -- service and archive --------------------------------------------------------------------

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
        }

    def studies_list(self) -> list[dict[str, Any]]:
        db = self.service.db
        assert db is not None
        counts = db.jobs.node_counts()
        usage = db.index.usage()
        out = []
        for s in db.index.studies():
            use = usage.get(s.study_uid)
            out.append({**s.to_dict(), "nodes": counts.get(s.study_uid, {}),
                        "protected": use.protected if use else False, "last_used": use.last_used if use else None})
        return out

    def studies_protect(self, study_uid: str) -> dict[str, Any]:
        """Keep a study from the disk clean-up (docs/design.md "Disk clean-up")."""
        return self._protect(study_uid, True)

    def studies_unprotect(self, study_uid: str) -> dict[str, Any]:
        return self._protect(study_uid, False)

    def _protect(self, study_uid: str, protected: bool) -> dict[str, Any]:
        db = self.service.db
        assert db is not None
        if not isinstance(study_uid, str) or not study_uid:
            raise Invalid("give study_uid, a Study Instance UID")
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
        if not isinstance(dry_run, bool):
            raise Invalid("cleanup: dry_run is true or false")
        return cleaner.run(dry_run=dry_run)

    def archive_import(self, paths: list[str]) -> dict[str, Any]:
        """Import files or folders; the auto-send rule "exam" takes each imported study as a
        complete exam (docs/design.md "Jobs and failures")."""
        svc = self.service
        assert svc.archive is not None and svc.autosend is not None
        if not isinstance(paths, list) or not paths or not all(isinstance(p, str) for p in paths):
            raise Invalid("archive.import: give a list of file or folder paths")
        missing = [p for p in paths if not Path(p).exists()]
        if missing:
            raise NotFound(f"no such file or folder: {', '.join(missing)}")
        imported, failed = 0, []
        studies: dict[str, None] = {}
        for path, result in svc.archive.import_paths([Path(p) for p in paths], svc.config.station.ae_title):
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
        if not isinstance(sop_instance_uid, str) or not sop_instance_uid:
            raise Invalid("memory.fetch: give sop_instance_uid, a SOP Instance UID")
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
        if not isinstance(study_uids, list) or not study_uids or not isinstance(node, str):
            raise Invalid("send: give study_uids (a list) and node (a name)")
        return {"job_id": sending.submit(study_uids, node, bool(commit))}

    def jobs_list(self) -> list[dict[str, Any]]:
        assert self.service.jobs is not None
        return self.service.jobs.list()

    def jobs_show(self, id: int) -> dict[str, Any]:
        assert self.service.jobs is not None
        return self.service.jobs.show(_job_id(id))

    def jobs_retry(self, id: int) -> dict[str, Any]:
        assert self.service.jobs is not None
        return self.service.jobs.retry(_job_id(id))

    def jobs_cancel(self, id: int) -> dict[str, Any]:
        assert self.service.jobs is not None
        return self.service.jobs.cancel(_job_id(id))

    # -- nodes and config -----------------------------------------------------------------------

    def nodes_list(self) -> dict[str, Any]:
        return {name: dataclasses.asdict(node) for name, node in self.service.config.nodes.items()}

    def nodes_echo(self, name: str | None = None, all: bool = False) -> list[dict[str, Any]]:
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
                raise NotFound(str(exc)) from None
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
            raise IpcError(CONFIG_INVALID, str(exc)) from None

    def config_set(self, key: str, value: str) -> Any:
        try:
            config.set_value(self.service.home.config_path, key, str(value))
        except ConfigError as exc:
            raise IpcError(CONFIG_INVALID, str(exc)) from None
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
