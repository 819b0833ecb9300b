"""Burn requests of the service: one background thread per burn, state kept in memory.

TODO: burns move into the persistent job queue (``modality_link/jobs.py``, REQUIREMENTS L1)
when it lands; until then a burn does not survive a restart of the service.

The burn itself is :func:`modality_link.media.burn.burn_studies`; this module resolves drives
(:mod:`hw`), collects the archive files of the studies, turns progress into IPC events
(``burn.progress``, ``burn.insert_disc``, ``burn.done``) and waits for ``burn.disc_inserted``
between the discs of a spanned set.
"""

from __future__ import annotations

import dataclasses
import itertools
import logging
import shutil
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import hw
from modality_link.config import Media
from modality_link.ipc import CONFLICT, INVALID_PARAMS, NOT_FOUND, IpcError
from modality_link.media import MediaError, MediaOptions
from modality_link.media.burn import BurnAborted, BurnReport, burn_studies

LOG = logging.getLogger("modality_link.burns")

STATE_RUNNING = "running"
STATE_DONE = "done"
STATE_FAILED = "failed"

#: Least time between two ``burn.progress`` events of the same phase and disc (seconds).
PROGRESS_INTERVAL = 0.25


def open_drive(device: str) -> hw.Drive:
    """The :class:`hw.Drive` for a device name.

    ``stdio:/path`` and ``/dev/srN`` are driven by xorriso; ``sim:NAME`` is a simulated burner
    with a blank CD-R (``sim:corrupt`` damages what it writes, so verification fails).
    """
    if device.startswith("sim:"):
        return hw.SimulatedDrive(device, corrupt_on_write=device == "sim:corrupt")
    if device.startswith(("stdio:", "/dev/")):
        return hw.XorrisoDrive(device)
    raise IpcError(INVALID_PARAMS, f"unknown drive {device!r}: give /dev/srN, stdio:/path or sim:NAME")


@dataclass
class Burn:
    """One burn request and its progress."""

    id: str
    study_uids: list[str]
    target: str
    profile: str
    state: str = STATE_RUNNING
    error: str = ""
    discs: list[dict[str, Any]] = field(default_factory=list)
    waiting_for_disc: int | None = None
    started: float = field(default_factory=time.time)
    finished: float | None = None
    inserted: threading.Event = field(default_factory=threading.Event, repr=False)
    done: threading.Event = field(default_factory=threading.Event, repr=False)

    def to_json(self) -> dict[str, Any]:
        return {
            "id": self.id, "study_uids": self.study_uids, "target": self.target,
            "profile": self.profile, "state": self.state, "error": self.error,
            "discs": self.discs, "waiting_for_disc": self.waiting_for_disc,
            "started": self.started, "finished": self.finished,
        }


class Burns:
    """The service's burns.

    `files_of(study_uid)` gives the archive files of a study; `publish(type, **fields)` sends an
    IPC event; `alert(code, message)` tells the operator.
    """

    def __init__(
        self,
        media: Callable[[], Media],
        source_ae_title: Callable[[], str],
        files_of: Callable[[str], list[Path]],
        staging_dir: Path,
        publish: Callable[..., None],
        alert: Callable[[str, str], None],
    ) -> None:
        self._media = media
        self._source_ae_title = source_ae_title
        self._files_of = files_of
        self._staging_dir = Path(staging_dir)
        self._publish = publish
        self._alert = alert
        self._burns: dict[str, Burn] = {}
        self._busy: set[str] = set()
        self._lock = threading.Lock()
        self._ids = itertools.count(1)

    # -- IPC ------------------------------------------------------------------------------------

    def start(self, study_uids: list[str], drive: str | None = None, iso: str | None = None,
              profile: str | None = None, wait: bool = False) -> dict[str, Any]:
        if not isinstance(study_uids, list) or not study_uids or not all(isinstance(u, str) for u in study_uids):
            raise IpcError(INVALID_PARAMS, "burn: give study_uids, a list of Study Instance UIDs")
        if (drive is None) == (iso is None):
            raise IpcError(INVALID_PARAMS, "burn: give either a drive or an iso file name")
        cfg = self._media()
        options = MediaOptions(profile=profile or cfg.profile, fileset_id=cfg.fileset_id,
                               source_ae_title=self._source_ae_title(), capacity_bytes=cfg.capacity_bytes)
        try:
            options.validate()
        except MediaError as exc:
            raise IpcError(INVALID_PARAMS, f"burn: {exc}") from None
        files: list[Path] = []
        for uid in study_uids:
            found = self._files_of(uid)
            if not found:
                raise IpcError(NOT_FOUND, f"no study {uid} in the archive")
            files.extend(found)
        iso_out: Path | None = None
        the_drive: hw.Drive | None = None
        if iso is not None:
            iso_out = Path(iso)
            if not iso_out.is_absolute() or not iso_out.parent.is_dir():
                raise IpcError(INVALID_PARAMS, f"burn: {iso} is not an absolute path in an existing folder")
            target = str(iso_out)
        else:
            assert drive is not None
            the_drive = open_drive(drive)
            target = drive
        with self._lock:
            if target in self._busy:
                raise IpcError(CONFLICT, f"{target} is busy with another burn")
            self._busy.add(target)
            burn = Burn(f"burn-{next(self._ids)}", list(study_uids), target, options.profile)
            self._burns[burn.id] = burn
        LOG.info("%s: %d instance(s) of %d study(ies) to %s (%s)",
                 burn.id, len(files), len(study_uids), target, options.profile)
        thread = threading.Thread(
            target=self._run, args=(burn, files, the_drive, iso_out, options, cfg.disc_timeout_s),
            name=burn.id, daemon=True)
        thread.start()
        if wait:
            burn.done.wait()
        return burn.to_json()

    def status(self, id: str) -> dict[str, Any]:
        return self._get(id).to_json()

    def list(self) -> list[dict[str, Any]]:
        with self._lock:
            return [b.to_json() for b in self._burns.values()]

    def disc_inserted(self, id: str) -> dict[str, Any]:
        burn = self._get(id)
        if burn.waiting_for_disc is None:
            raise IpcError(CONFLICT, f"{id} is not waiting for a disc (state {burn.state})")
        burn.inserted.set()
        return {"id": id, "disc": burn.waiting_for_disc}

    def drives(self) -> list[dict[str, Any]]:
        devices: list[hw.Drive] = []
        try:
            devices.extend(hw.discover())
        except Exception as exc:  # no udev (container, CI): configured drives only
            LOG.warning("drives: udev discovery failed: %s", exc)
        known = {d.identity.device for d in devices}
        for name in self._media().drives:
            if name not in known:
                devices.append(open_drive(name))
        out = []
        for d in devices:
            entry: dict[str, Any] = {"device": d.identity.device, "description": d.identity.description}
            try:
                entry["media"] = dataclasses.asdict(d.media())
                entry["capabilities"] = sorted(d.capabilities())
            except hw.DriveError as exc:
                entry["media"] = None
                entry["error"] = str(exc)
            with self._lock:
                entry["busy"] = entry["device"] in self._busy
            out.append(entry)
        return out

    # -- the burn thread ------------------------------------------------------------------------

    def _get(self, id: str) -> Burn:
        with self._lock:
            burn = self._burns.get(id)
        if burn is None:
            raise IpcError(NOT_FOUND, f"no burn {id}")
        return burn

    def _run(self, burn: Burn, files: list[Path], drive: hw.Drive | None, iso_out: Path | None,
             options: MediaOptions, disc_timeout: float) -> None:
        last: dict[tuple[str, int], float] = {}

        def progress(phase: str, disc: int, discs: int, fraction: float) -> None:
            now = time.monotonic()
            key = (phase, disc)
            if fraction < 1.0 and key in last and now - last[key] < PROGRESS_INTERVAL:
                return
            last[key] = now
            self._publish("burn.progress", id=burn.id, phase=phase, disc=disc, discs=discs,
                          fraction=round(fraction, 3))

        def next_disc(disc: int, discs: int) -> None:
            burn.inserted.clear()
            burn.waiting_for_disc = disc
            message = f"Insert blank disc {disc} of {discs} into {burn.target}."
            LOG.info("%s: %s", burn.id, message)
            self._publish("burn.insert_disc", id=burn.id, disc=disc, discs=discs, message=message)
            try:
                if not burn.inserted.wait(disc_timeout):
                    raise BurnAborted(f"no blank disc {disc} of {discs} was inserted within {disc_timeout:.0f} s")
            finally:
                burn.waiting_for_disc = None
            if isinstance(drive, hw.SimulatedDrive):
                drive.insert()

        staging = self._staging_dir / burn.id
        try:
            report = burn_studies(files, drive, iso_out, options, staging, progress, next_disc)
        except Exception as exc:  # a bug: the burn fails, the service keeps running
            LOG.exception("%s: burn raised", burn.id)
            report = BurnReport(error=f"internal error: {exc}")
        finally:
            shutil.rmtree(staging, ignore_errors=True)
        burn.discs = [dataclasses.asdict(d) for d in report.discs]
        burn.error = report.error
        burn.state = STATE_DONE if report.ok else STATE_FAILED
        burn.finished = time.time()
        with self._lock:
            self._busy.discard(burn.target)
        if report.ok:
            LOG.info("%s: done, %d disc(s) written and verified to %s", burn.id, len(report.discs), burn.target)
        else:
            self._alert("burn-failed", f"{burn.id} to {burn.target} failed: {report.error}")
        self._publish("burn.done", id=burn.id, state=burn.state, error=burn.error)
        burn.done.set()
