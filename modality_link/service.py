"""The long-running service: wiring only.

It builds the database, the archive, the listening AEs and the IPC server from the config,
starts them, and maps IPC methods onto them. The DICOM work is in `modality_link.net`, the
storage in `modality_link.archive`, the schema in `modality_link.db`, the protocol in
`modality_link.ipc`.
"""

from __future__ import annotations

import dataclasses
import fcntl
import functools
import logging
import logging.handlers
import os
import signal
import threading
import time
from pathlib import Path
from typing import Any, Callable

from modality_link import __version__, config
from modality_link.archive import Archive, ArchiveError
from modality_link.burns import Burns
from modality_link.config import ConfigError
from modality_link.db import Database, InstanceRecord
from modality_link.exam import ExamError, ExamManager
from modality_link.home import Home
from modality_link.ipc import (
    CONFIG_INVALID,
    CONFLICT,
    DICOM_FAILURE,
    INVALID_PARAMS,
    NOT_FOUND,
    IpcError,
    IpcServer,
)
from modality_link.jobs import JobQueue
from modality_link.net.echo import echo
from modality_link.net.servers import StorageServer

LOG = logging.getLogger("modality_link.service")
LOG_FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"


class ServiceError(Exception):
    """The service cannot start; the message says why."""


def setup_logging(home: Home, cfg: config.Config, to_stderr: bool = True) -> None:
    """A rotating log file in the home folder (and stderr for the foreground service)."""
    root = logging.getLogger()
    for h in list(root.handlers):
        if getattr(h, "_modality_link", False):
            root.removeHandler(h)
            h.close()
    fmt = logging.Formatter(LOG_FORMAT)
    handlers: list[logging.Handler] = [
        logging.handlers.RotatingFileHandler(
            home.log_dir / "modality-link.log",
            maxBytes=cfg.logging.max_bytes,
            backupCount=cfg.logging.backups,
            encoding="utf-8",
        )
    ]
    if to_stderr:
        handlers.append(logging.StreamHandler())
    for h in handlers:
        h.setFormatter(fmt)
        h._modality_link = True  # type: ignore[attr-defined]
        root.addHandler(h)
    root.setLevel(cfg.logging.level)
    # pynetdicom logs every PDU at INFO/DEBUG; our own lines name peer, status and reason.
    logging.getLogger("pynetdicom").setLevel(logging.WARNING if cfg.logging.level != "DEBUG" else logging.DEBUG)


class Service:
    """One service per home folder."""

    def __init__(self, home: Home) -> None:
        self.home = home
        self.config = home.load_config()
        self.db: Database | None = None
        self.archive: Archive | None = None
        self.disk_server: StorageServer | None = None
        self.ipc: IpcServer | None = None
        self.exams: ExamManager | None = None
        self.jobs: JobQueue | None = None
        self.started_at = 0.0
        self._stop = threading.Event()
        self._lock_file: Any = None
        self.burns: Burns | None = None

    # -- life cycle -----------------------------------------------------------------------------

    def start(self, log_to_stderr: bool = True) -> None:
        self._lock_home()
        setup_logging(self.home, self.config, log_to_stderr)
        self.db = Database(self.home.db_path)
        self.archive = Archive(
            self.home.archive_dir, self.db, self.config.archive.min_free_mb, on_alert=self.alert
        )
        found = self.archive.reconcile()
        if found:
            LOG.warning("archive: indexed %d file(s) left unindexed by an earlier stop", found)
        self.jobs = JobQueue(
            self.db, self.home.archive_dir, lambda: self.config, self.publish, self.alert
        )
        self.burns = Burns(  # registers the "burn" job kind before the workers start
            self.jobs,
            lambda: self.config.media,
            lambda: self.config.station.ae_title,
            self.home.tmp_dir / "burn",
            self.publish,
            self.alert,
        )
        self._start_servers()
        self.exams = ExamManager(
            self.db, self.archive, lambda: self.config, self.home.tmp_dir, self.alert, self.publish,
            on_series_complete=self.jobs.on_series_complete, on_exam_complete=self.jobs.on_exam_complete,
        )
        self.exams.resume_auto_send()
        self.exams.start_worker()
        self.ipc = IpcServer(self.home.socket_path, self.methods())
        self.ipc.start()
        self.jobs.start()
        self.started_at = time.time()
        LOG.info("modality_link %s serving home %s (pid %d)", __version__, self.home.root, os.getpid())

    def _lock_home(self) -> None:
        """One service per home folder: hold an exclusive lock on ``service.lock``."""
        self._lock_file = open(self.home.root / "service.lock", "a+")
        try:
            fcntl.flock(self._lock_file, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            self._lock_file.close()
            raise ServiceError(f"another modality-link service is already running on {self.home.root}") from None

    def _start_servers(self) -> None:
        assert self.archive is not None
        if self.config.disk_server.enabled:
            self.disk_server = StorageServer(
                self.config.disk_server, self.config.timeouts, self.archive, self._on_stored,
                on_report=self.jobs.handle_report if self.jobs is not None else None,
            )
            self.disk_server.start()

    def _stop_servers(self) -> None:
        if self.disk_server is not None:
            self.disk_server.stop()
            self.disk_server = None

    def stop(self) -> None:
        if self.jobs is not None:
            self.jobs.stop()
            self.jobs = None
        if self.ipc is not None:
            self.ipc.stop()
            self.ipc = None
        if self.exams is not None:
            self.exams.stop_worker()
            self.exams = None
        self._stop_servers()
        if self.db is not None:
            self.db.close()
            self.db = None
        if self._lock_file is not None:
            self._lock_file.close()
            self._lock_file = None
        LOG.info("modality_link stopped")

    def run_forever(self) -> None:
        """Serve until SIGTERM or SIGINT."""
        for sig in (signal.SIGTERM, signal.SIGINT):
            signal.signal(sig, lambda *_: self._stop.set())
        self._stop.wait()
        self.stop()

    # -- events ---------------------------------------------------------------------------------

    def publish(self, event_type: str, **params: Any) -> None:
        if self.ipc is not None:
            self.ipc.publish(event_type, **params)

    def alert(self, code: str, message: str, level: str = "error") -> None:
        """Tell the operator: one log line, a row in the alerts table, an IPC event."""
        LOG.error("ALERT %s: %s", code, message)
        if self.db is not None:
            self.db.alerts.add(level, code, message)
        self.publish("alert", code=code, level=level, message=message)

    def _on_stored(self, rec: InstanceRecord) -> None:
        self.publish(
            "instance.stored",
            sop_instance_uid=rec.sop_instance_uid,
            study_uid=rec.study_uid,
            source_ae=rec.source_ae,
        )

    # -- IPC methods ----------------------------------------------------------------------------

    def methods(self) -> dict[str, Callable[..., Any]]:
        """The IPC methods this service answers (documented in docs/ipc.md)."""
        burns = self.burns
        assert burns is not None, "methods() is called after start() built the burns"
        return {
            "status": self.status,
            "studies.list": self.studies_list,
            "archive.import": self.archive_import,
            "nodes.list": self.nodes_list,
            "nodes.echo": self.nodes_echo,
            "config.get": self.config_get,
            "config.set": self.config_set,
            "config.reload": self.config_reload,
            "alerts.list": self.alerts_list,
            "alerts.clear": self.alerts_clear,
            "worklist.query": self._exam_call("query_worklist"),
            "exam.start": self._exam_call("start"),
            "exam.add_image": self._exam_call("add_image"),
            "exam.series_complete": self._exam_call("series_complete"),
            "exam.end": self._exam_call("end"),
            "exam.show": self._exam_call("exam_info"),
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

    _EXAM_ERRORS = {"not_found": NOT_FOUND, "conflict": CONFLICT, "invalid": INVALID_PARAMS, "dicom": DICOM_FAILURE}

    def _exam_call(self, name: str) -> Callable[..., Any]:
        """An IPC method calling ExamManager.`name`, its errors mapped to IPC error codes."""

        assert self.exams is not None, "methods() is called after start() built the exam manager"
        target = getattr(self.exams, name)

        @functools.wraps(target)  # the IPC server checks the params against the signature
        def call(*args: Any, **params: Any) -> Any:
            try:
                return target(*args, **params)
            except ExamError as exc:
                raise IpcError(self._EXAM_ERRORS[exc.kind], str(exc)) from None

        return call

    def status(self) -> dict[str, Any]:
        assert self.db is not None
        studies = self.db.index.studies()
        listeners = {}
        for key, server in (("disk_server", self.disk_server),):
            lst = getattr(self.config, key)
            listeners[key] = {
                "ae_title": lst.ae_title,
                "port": server.port if server else lst.port,
                "running": server is not None,
            }
        return {
            "version": __version__,
            "pid": os.getpid(),
            "home": str(self.home.root),
            "uptime_s": round(time.time() - self.started_at, 1),
            "station": dataclasses.asdict(self.config.station),
            "listeners": listeners,
            "archive": {
                "studies": len(studies),
                "instances": sum(s.instances for s in studies),
            },
            "alerts": [a.to_dict() for a in self.db.alerts.latest(limit=20)],
        }

    def studies_list(self) -> list[dict[str, Any]]:
        assert self.db is not None
        counts = self.db.jobs.node_counts()
        return [{**s.to_dict(), "nodes": counts.get(s.study_uid, {})} for s in self.db.index.studies()]

    def archive_import(self, paths: list[str]) -> dict[str, Any]:
        assert self.archive is not None
        if not isinstance(paths, list) or not paths:
            raise IpcError(INVALID_PARAMS, "archive.import: give a list of file or folder paths")
        missing = [p for p in paths if not Path(p).exists()]
        if missing:
            raise IpcError(NOT_FOUND, f"no such file or folder: {', '.join(missing)}")
        imported, failed = 0, []
        studies: dict[str, None] = {}
        for path, result in self.archive.import_paths([Path(p) for p in paths], self.config.station.ae_title):
            if isinstance(result, (ArchiveError, OSError)):
                LOG.error("import: %s refused: %s", path, result)
                failed.append({"path": str(path), "error": str(result)})
            else:
                imported += 1
                studies[result.study_uid] = None
                self._on_stored(result)
        jobs = []
        if self.jobs is not None:  # auto-send rule "exam": an imported study counts as complete
            for study in studies:
                jobs += self.jobs.on_exam_complete(study)
        return {"imported": imported, "failed": failed, "jobs": jobs}

    # -- jobs (send, commit) -------------------------------------------------------------------

    def send(self, study_uids: list[str], node: str, commit: bool = False) -> dict[str, Any]:
        assert self.jobs is not None
        if not isinstance(study_uids, list) or not study_uids or not isinstance(node, str):
            raise IpcError(INVALID_PARAMS, "send: give study_uids (a list) and node (a name)")
        try:
            job_id = self.jobs.submit_send(study_uids, node, bool(commit))
        except ConfigError as exc:
            raise IpcError(INVALID_PARAMS, str(exc)) from None
        except KeyError as exc:
            raise IpcError(NOT_FOUND, str(exc.args[0])) from None
        return {"job_id": job_id}

    def jobs_list(self) -> list[dict[str, Any]]:
        assert self.jobs is not None
        return self.jobs.list()

    def _job_call(self, fn: Callable[[int], Any], id: Any) -> Any:
        if isinstance(id, bool) or not isinstance(id, int):
            raise IpcError(INVALID_PARAMS, "give the job id as a whole number")
        try:
            return fn(id)
        except KeyError as exc:
            raise IpcError(NOT_FOUND, str(exc.args[0])) from None
        except ValueError as exc:
            raise IpcError(CONFLICT, str(exc)) from None

    def jobs_show(self, id: int) -> dict[str, Any]:
        assert self.jobs is not None
        return self._job_call(self.jobs.show, id)

    def jobs_retry(self, id: int) -> dict[str, Any]:
        assert self.jobs is not None
        return self._job_call(self.jobs.retry, id)

    def jobs_cancel(self, id: int) -> dict[str, Any]:
        assert self.jobs is not None
        return self._job_call(self.jobs.cancel, id)

    def nodes_list(self) -> dict[str, Any]:
        return {name: dataclasses.asdict(node) for name, node in self.config.nodes.items()}

    def nodes_echo(self, name: str | None = None, all: bool = False) -> list[dict[str, Any]]:
        if all:
            names = list(self.config.nodes)
        elif name:
            names = [name]
        else:
            raise IpcError(INVALID_PARAMS, "nodes.echo: give a node name or all=true")
        results = []
        for n in names:
            try:
                node = self.config.node(n)
            except ConfigError as exc:
                raise IpcError(NOT_FOUND, str(exc)) from None
            res = echo(n, node, self.config.station.ae_title, self.config.timeouts)
            if not res.ok:
                LOG.error("echo: %s (%s@%s:%d): %s", n, node.ae_title, node.host, node.port, res.message)
            results.append(dataclasses.asdict(res))
        return results

    def config_get(self, key: str | None = None) -> Any:
        if key is None:
            return config.dumps(self.config)
        try:
            return config.get_value(self.config, key)
        except ConfigError as exc:
            raise IpcError(CONFIG_INVALID, str(exc)) from None

    def config_set(self, key: str, value: str) -> Any:
        try:
            config.set_value(self.home.config_path, key, str(value))
        except ConfigError as exc:
            raise IpcError(CONFIG_INVALID, str(exc)) from None
        self.config_reload()
        return config.get_value(self.config, key)

    def config_reload(self) -> dict[str, Any]:
        """Re-read the config file; restart listeners whose settings changed."""
        try:
            new = config.load(self.home.config_path)
        except ConfigError as exc:
            raise IpcError(CONFIG_INVALID, f"config not reloaded: {exc}") from None
        restart = (
            new.disk_server != self.config.disk_server
            or new.timeouts != self.config.timeouts
        )
        self.config = new
        if self.archive is not None:
            self.archive.min_free_mb = new.archive.min_free_mb
        if restart:
            self._stop_servers()
            self._start_servers()
        LOG.info("config reloaded%s", " (listeners restarted)" if restart else "")
        return {"reloaded": True, "listeners_restarted": restart}

    def alerts_list(self, include_cleared: bool = False) -> list[dict[str, Any]]:
        assert self.db is not None
        return [a.to_dict() for a in self.db.alerts.latest(include_cleared=include_cleared)]

    def alerts_clear(self, code: str | None = None) -> dict[str, Any]:
        assert self.db is not None
        self.db.alerts.clear(code)
        return {"cleared": True}
