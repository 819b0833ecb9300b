"""The long-running service: wiring only.

It builds the database, the archive, the memory cache, the job queue, the disk clean-up, the
listening AEs and the IPC server from the config, starts and stops them. The IPC methods are in
`modality_link.api`, the DICOM work in `modality_link.net`, the storage in `modality_link.archive`,
the schema in `modality_link.db`, the protocol in `modality_link.ipc`.
"""

from __future__ import annotations

import errno
import fcntl
import logging
import logging.handlers
import os
import signal
import socket
import threading
import time
from typing import Any

from modality_link import __version__, access, audit, config, systemd
from modality_link.api import Api
from modality_link.archive import Archive
from modality_link.autosend import AutoSend
from modality_link.burns import Burns
from modality_link.cleanup import Cleaner
from modality_link.db import Database, InstanceRecord
from modality_link.exam import ExamManager
from modality_link.home import Home
from modality_link.ipc import IpcClient, IpcError, IpcServer, NotRunning
from modality_link.jobs import JobQueue
from modality_link.jsonlog import JsonFormatter
from modality_link.mpps_outbox import MppsOutbox
from modality_link.memory import CachedInstance, MemoryCache
from modality_link.net.memory_server import MemoryServer
from modality_link.net.servers import StorageServer
from modality_link.sending import Sending
from modality_link.retrieving import Retrieving
from modality_link.storage_commitment import StorageCommitment

LOG = logging.getLogger("modality_link.service")
LOG_FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"
#: The service's umask: what it creates is its user's alone (docs/design.md "Files and permissions").
UMASK = 0o077


class ServiceError(Exception):
    """The service cannot start; the message says why."""


def setup_logging(home: Home, cfg: config.Config, to_stderr: bool = True) -> None:
    """A rotating log file in the home folder (and stderr for the foreground service), as text
    lines or JSON lines (``logging.format``, :mod:`modality_link.jsonlog`)."""
    root = logging.getLogger()
    for h in list(root.handlers):
        if getattr(h, "_modality_link", False):
            root.removeHandler(h)
            h.close()
    fmt = JsonFormatter() if cfg.logging.format == "json" else logging.Formatter(LOG_FORMAT)
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


def listen_error(key: str, listener: config.Listener, exc: OSError) -> str:
    """Why a listening AE cannot listen, naming the key to change and the command that does it."""
    port, address = listener.port, listener.bind_address or "every interface"
    if exc.errno == errno.EADDRINUSE:
        return (f"port {port} is in use by another program: change {key}.port "
                f"(modality-link config set {key}.port N), or stop the program that listens on it")
    if exc.errno == errno.EACCES:
        return (f"port {port} is below 1024 and needs privileges this user has not: change {key}.port "
                f"(modality-link config set {key}.port N, e.g. 11112)")
    if exc.errno == errno.EADDRNOTAVAIL or isinstance(exc, socket.gaierror):
        return (f"{key}.bind_address {address} is not an address of this machine: change it "
                f"(modality-link config unset {key}.bind_address listens on every interface)")
    return f"{key} cannot listen on {address} port {port}: {exc.strerror or exc}"


def _listen(server: StorageServer | MemoryServer, key: str, listener: config.Listener) -> None:
    """Start a listening AE; a socket error becomes a :class:`ServiceError` that names the fix."""
    try:
        server.start()
    except OSError as exc:
        raise ServiceError(listen_error(key, listener, exc)) from None


class Service:
    """One service per home folder."""

    def __init__(self, home: Home) -> None:
        self.home = home
        self.config = home.load_config()
        self.db: Database | None = None
        self.archive: Archive | None = None
        self.disk_server: StorageServer | None = None
        self.memory = MemoryCache(self.config.memory_server.cache_mb << 20)
        self.memory_server: MemoryServer | None = None
        self.ipc: IpcServer | None = None
        self.exams: ExamManager | None = None
        self.jobs: JobQueue | None = None
        self.sending: Sending | None = None
        self.commitment: StorageCommitment | None = None
        self.retrieving: Retrieving | None = None
        self.mpps: MppsOutbox | None = None
        self.autosend: AutoSend | None = None
        self.started_at = 0.0
        self._stop = threading.Event()
        self._lock_file: Any = None
        self.burns: Burns | None = None
        self.cleaner: Cleaner | None = None
        self.audit: audit.AuditTrail | None = None
        self._umask: int | None = None

    # -- life cycle -----------------------------------------------------------------------------

    def start(self, log_to_stderr: bool = True) -> None:
        self._umask = os.umask(UMASK)
        self._lock_home()
        setup_logging(self.home, self.config, log_to_stderr)
        group = access.socket_group(self.config.ipc)
        for change in self.home.secure(group):
            LOG.warning("home: %s", change)
        export = self.home.root / self.config.media.export_dir
        try:
            export.mkdir(mode=0o700, exist_ok=True)
        except OSError as exc:
            LOG.warning("media.export_dir %s cannot be made (%s): exports to it will fail", export, exc.strerror or exc)
        self.audit = audit.AuditTrail(self.home.log_dir / "audit.log", self.config)
        audit.install(self.audit)
        self.db = Database(self.home.db_path)
        self.archive = Archive(
            self.home.archive_dir, self.db, self.config.archive.min_free_mb, on_alert=self.alert
        )
        found = self.archive.reconcile()
        if found:
            LOG.warning("archive: indexed %d file(s) left unindexed by an earlier stop", found)
        cleaner = self.cleaner = Cleaner(self.archive, lambda: self.config, self.alert)
        self.archive.on_indexed = cleaner.poke
        # the job kinds register with the queue before its workers start
        self.jobs = JobQueue(self.db, lambda: self.config, self.publish, self.alert)
        self.sending = Sending(self.jobs, self.home.archive_dir, lambda: self.config)
        self.commitment = StorageCommitment(self.jobs, self.sending, lambda: self.config, self.alert,
                                            on_committed=cleaner.reconsider)
        self.retrieving = Retrieving(self.jobs, lambda: self.config)
        self.mpps = MppsOutbox(self.db, lambda: self.config, self.alert, self.publish)
        self.burns = Burns(
            self.jobs,
            self.home.archive_dir,
            lambda: self.config.media,
            lambda: self.config.station.ae_title,
            self.home.tmp_dir / "burn",
            self.publish,
            self.alert,
        )
        self._start_servers()
        self.autosend = AutoSend(self.db, self.sending, lambda: self.config, self.alert)
        self.exams = ExamManager(self.db, self.archive, lambda: self.config, self.home.tmp_dir, self.publish,
                                 self.mpps, self.autosend)
        self.autosend.resume()
        self.mpps.start()
        api = Api(self)
        self.ipc = IpcServer(self.home.socket_path, api.methods(), check=api.check, group=group,
                             journal=self.db.events)
        self.ipc.start()
        self.jobs.start()
        cleaner.start()
        self.started_at = time.time()
        audit.application_activity(started=True)
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
                self.config.disk_server, self.config.timeouts, self.archive, self.on_stored,
                on_report=self.commitment.handle_report if self.commitment is not None else None,
                nodes=lambda: self.config.nodes,
            )
            _listen(self.disk_server, "disk_server", self.config.disk_server)
        if self.config.memory_server.enabled:
            self.memory_server = MemoryServer(self.config.memory_server, self.config.timeouts, self.memory,
                                              self.on_memory_stored)
            _listen(self.memory_server, "memory_server", self.config.memory_server)

    def _stop_servers(self) -> None:
        if self.disk_server is not None:
            self.disk_server.stop()
            self.disk_server = None
        if self.memory_server is not None:
            self.memory_server.stop()
            self.memory_server = None

    def stop(self) -> None:
        """Drain and stop (docs/design.md "Unattended operation"): the listeners first (no new
        association; a C-STORE being received is finished and indexed, or its partial file
        removed), then the clean-up, the job queues (a running attempt stops at its next safe
        point and is queued again), the IPC socket and the database. Every step is bounded."""
        audit.application_activity(started=False)
        self._stop_servers()
        if self.cleaner is not None:
            self.cleaner.stop()
            self.cleaner = None
        if self.jobs is not None:
            self.jobs.stop()
            self.jobs = None
        if self.sending is not None:
            self.sending.close()
            self.sending = None
        if self.mpps is not None:
            self.mpps.stop()
            self.mpps = None
        if self.ipc is not None:
            self.ipc.stop()
            self.ipc = None
        self.exams = None
        if self.db is not None:
            self.db.close()
            self.db = None
        if self.audit is not None:
            audit.uninstall(self.audit)
            self.audit.close()
            self.audit = None
        if self._lock_file is not None:
            self._lock_file.close()
            self._lock_file = None
        if self._umask is not None:
            os.umask(self._umask)
            self._umask = None
        LOG.info("modality_link stopped")

    def reload_config(self) -> bool:
        """Re-read the config file and restart the listeners whose settings changed; whether
        they were. A :class:`ConfigError` leaves the running configuration as it was."""
        new = config.load(self.home.config_path)
        restart = (new.disk_server != self.config.disk_server or new.memory_server != self.config.memory_server
                   or new.timeouts != self.config.timeouts)
        audit.configuration_changed(self.config, new, self.home.config_path)
        self.config = new
        if self.audit is not None:
            self.audit.configure(new)
        self.memory.budget = new.memory_server.cache_mb << 20
        if self.archive is not None:
            self.archive.min_free_mb = new.archive.min_free_mb
        if restart:
            self._stop_servers()
            self._start_servers()
        if self.cleaner is not None:  # a new quota or new marks count at once
            self.cleaner.reconsider()
        LOG.info("config reloaded%s", " (listeners restarted)" if restart else "")
        return restart

    def on_memory_stored(self, item: CachedInstance) -> None:
        """Announce an instance the memory server keeps (``memory.stored``, docs/ipc.md); its
        attributes are decoded by the subscribers' writer threads, and only when someone
        subscribes."""
        if self.ipc is None:
            return

        def params() -> dict[str, Any]:
            rec = item.record
            return dict(sop_instance_uid=rec.sop_instance_uid, sop_class_uid=rec.sop_class_uid,
                        series_uid=rec.series_uid, study_uid=rec.study_uid, patient_id=rec.patient_id,
                        source_ae=rec.source_ae, bytes=item.size)

        self.ipc.publish_later("memory.stored", params)

    def run_forever(self) -> None:
        """Serve until SIGTERM or SIGINT, telling the service manager (sd_notify) that the
        service is ready, alive (watchdog) and stopping (docs/design.md "Unattended operation")."""
        for sig in (signal.SIGTERM, signal.SIGINT):
            signal.signal(sig, lambda *_: self._stop.set())
        status = self.status_line()
        systemd.notify("READY=1", f"STATUS={status}")
        watchdog = systemd.Watchdog(self.health, status)
        watchdog.start()
        self._stop.wait()
        LOG.info("stopping: draining the listeners, jobs and IPC clients")
        systemd.notify("STOPPING=1", "STATUS=stopping: draining the listeners, jobs and IPC clients")
        watchdog.stop()
        self.stop()

    def status_line(self) -> str:
        """One line for ``systemctl status``: what listens where."""
        servers = (("disk server", self.disk_server), ("memory server", self.memory_server))
        parts = [f"{name} {server.listener.ae_title} on port {server.port}"
                 for name, server in servers if server is not None]
        return "serving: " + (", ".join(parts) if parts else "no listener enabled")

    def health(self) -> str | None:
        """None when the service answers, else what does not (the watchdog's check): the job
        queues' workers run, the database answers, and the IPC server answers a request (any
        answer, an error included, shows that its loop runs)."""
        for name, queue in (("job queue", self.jobs), ("MPPS queue", self.mpps.queue if self.mpps else None)):
            if queue is None or not queue.alive():
                return f"the {name} has stopped"
        if self.db is None:
            return "the database is closed"
        self.db.ping()
        try:
            with IpcClient(self.home.socket_path, timeout=10.0) as client:
                client.call("nodes.list")
        except IpcError:
            pass
        except (NotRunning, OSError) as exc:
            return f"the IPC server does not answer ({exc})"
        return None

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

    def on_stored(self, rec: InstanceRecord) -> None:
        """Announce an instance that entered the archive (``instance.stored``, docs/ipc.md)."""
        self.publish(
            "instance.stored",
            sop_instance_uid=rec.sop_instance_uid,
            study_uid=rec.study_uid,
            source_ae=rec.source_ae,
        )
