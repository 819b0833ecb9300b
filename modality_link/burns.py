"""Burn requests of the service: jobs of kind ``burn`` in the persistent job queue.

A burn is a row of the job queue (:mod:`modality_link.jobs`), so it is
queued, survives a crash or a restart of the service, and can be cancelled like a send job:

- ``node`` is ``drive:DEV`` (``drive:/dev/sr0``, ``drive:stdio:/path``, ``drive:sim:NAME``) or
  ``iso:PATH``. Unknown nodes may run one job at a time, so burns to one drive (or one image
  file) run one after another: a burn asked for while the drive is busy is queued behind the
  running one, and when it starts it asks for a blank disc (``burn.insert_disc``, disc 1) if the
  drive holds none.
- the items are the SOP Instance UIDs of the studies when the burn was asked for (a burn writes
  what the technologist saw, even if images arrive later); an item is ``done`` once the disc it
  is on was written and verified, ``failed`` if that disc failed.
- the params hold the media options of the request and ``discs``: one entry per planned disc with
  its state, saved at every change. A disc already written and verified is not burned again
  when the job resumes after a restart or is retried; the job goes on with the next disc.

:func:`modality_link.media.burn.burn_studies` does the burn; this module resolves drives
(:mod:`hw`), turns progress into IPC events (``burn.progress``, ``burn.disc``,
``burn.insert_disc``, ``burn.done``) and waits for ``burn.disc_inserted`` between the discs of
a spanned set. Cancelling (``burn.cancel`` or ``jobs.cancel``) stops a queued burn at once and
a running one at the next safe point (see :mod:`modality_link.media.burn`: a disc being written
is finished first, then ejected unverified and reported ``stopped``).
"""

from __future__ import annotations

import builtins
import dataclasses
import logging
import shutil
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Sequence

import hw
from modality_link import audit
from modality_link.archive import file_kind
from modality_link.config import Media
from modality_link.db import Database, Job
from modality_link.errors import Conflict, Invalid, NotFound
from modality_link.jobs import FINAL_STATES, Fail, JobContext, JobQueue, Stopping
from modality_link.media import MediaError, MediaOptions
from modality_link.media.burn import (
    DISC_DONE, DISC_FAILED, DISC_STOPPED, DISC_VERIFYING, DISC_WRITING, BurnAborted, BurnStopped, DiscReport,
    burn_studies,
)
from modality_link.media.profiles import PROFILES

LOG = logging.getLogger("modality_link.burns")

KIND = "burn"

#: Least time between two ``burn.progress`` events of the same phase and disc (seconds).
PROGRESS_INTERVAL = 0.25


def list_drives(configured: list[str], busy: set[Any]) -> list[dict[str, Any]]:
    """The drives udev finds plus the `configured` ones (``media.drives``), each with its media
    (or the error reading it) and whether it is in `busy` (as ``drives.list`` gives them,
    docs/ipc.md)."""
    devices: list[hw.Drive] = []
    try:
        devices.extend(hw.discover())
    except Exception as exc:  # no udev (container, CI): configured drives only
        LOG.warning("drives: udev discovery failed: %s", exc)
    known = {d.identity.device for d in devices}
    for name in configured:
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
        entry["busy"] = entry["device"] in busy
        out.append(entry)
    return out


def open_drive(device: str) -> hw.Drive:
    """The drive called `device` (:func:`hw.open_drive`); an unknown name is :class:`Invalid`."""
    try:
        return hw.open_drive(device)
    except ValueError as exc:
        raise Invalid(str(exc)) from None


def check_target(path: Path, overwrite: bool) -> None:
    """A burn may write the file `path`: it does not exist, or it is a regular file and
    `overwrite` is set (a ``stdio:`` pseudo-drive's file is its medium: xorriso writes only a
    blank, empty one). A symbolic link is never followed, a FIFO or device never written."""
    try:
        kind = file_kind(path)
    except FileNotFoundError:
        return
    except OSError as exc:
        raise Invalid(f"burn: {path} cannot be written ({exc.strerror or exc})") from None
    if kind is not None:
        raise Invalid(f"burn: {path} is {kind}; a burn writes only a regular file and never follows a link")
    if path.is_dir():
        raise Invalid(f"burn: {path} is a folder; name a file")
    if not overwrite:
        raise Conflict(f"burn: {path} exists; it is replaced only when asked to (overwrite, burn --force)")


def check_pseudo_drive(device: str) -> None:
    """The file of a ``stdio:`` pseudo-drive is new or a regular file (its medium: xorriso
    writes only an empty one), never a link, FIFO or device (:func:`check_target`)."""
    if device.startswith("stdio:"):
        check_target(Path(device[len("stdio:"):]), overwrite=True)


def drive_node(device: str) -> str:
    """The job queue node of a drive: burns to one drive run one at a time."""
    return f"drive:{device}"


def iso_node(path: Path) -> str:
    """The job queue node of an image file export."""
    return f"iso:{path}"


@dataclass
class _DiscWait:
    """A burn waiting for ``burn.disc_inserted``."""

    disc: int
    inserted: threading.Event = field(default_factory=threading.Event)


class Burns:
    """The service's burns, on top of the job queue.

    `media()` gives the ``[media]`` config, `source_ae_title()` the station's AE title;
    `publish(type, **fields)` sends an IPC event; `alert(code, message)` tells the operator.
    """

    def __init__(
        self,
        jobs: JobQueue,
        archive_root: Path,
        media: Callable[[], Media],
        source_ae_title: Callable[[], str],
        staging_dir: Path,
        publish: Callable[..., None],
        alert: Callable[[str, str], None],
    ) -> None:
        self._jobs = jobs
        self._db: Database = jobs.db
        self._archive_root = Path(archive_root)
        self._media = media
        self._source_ae_title = source_ae_title
        self._staging_dir = Path(staging_dir)
        self._publish = publish
        self._alert = alert
        self._lock = threading.Lock()
        self._waiting: dict[int, _DiscWait] = {}
        self._active: set[int] = set()  # jobs whose executor runs
        jobs.register(KIND, self.execute, on_end=self.on_end)

    # -- IPC ------------------------------------------------------------------------------------

    def start(self, study_uids: list[str], drive: str | None = None, iso: str | None = None,
              profile: str | None = None, wait: bool = False, overwrite: bool = False) -> dict[str, Any]:
        """Queue a burn job; with `wait`, return once it has ended. An image file replaces an
        existing file only with `overwrite` (:func:`check_target`)."""
        if not isinstance(study_uids, list) or not study_uids or not all(isinstance(u, str) for u in study_uids):
            raise Invalid("burn: give study_uids, a list of Study Instance UIDs")
        if (drive is None) == (iso is None):
            raise Invalid("burn: give either a drive or an iso file name")
        cfg = self._media()
        options = MediaOptions(profile=profile or cfg.profile, fileset_id=cfg.fileset_id,
                               source_ae_title=self._source_ae_title(), capacity_bytes=cfg.capacity_bytes)
        try:
            options.validate()
        except MediaError as exc:
            raise Invalid(f"burn: {exc}") from None
        uids: list[str] = []
        for study in study_uids:
            rows = self._db.index.study_instances(study)
            if not rows:
                raise NotFound(f"no study {study} in the archive")
            uids.extend(r.sop_instance_uid for r in rows)
        if iso is not None:
            iso_out = Path(iso)
            if not iso_out.is_absolute() or not iso_out.parent.is_dir():
                raise Invalid(f"burn: {iso} is not an absolute path in an existing folder")
            check_target(iso_out, overwrite)
            target, node = str(iso_out), iso_node(iso_out)
        else:
            assert drive is not None
            open_drive(drive)  # an unknown kind of device is refused now, not when the job runs
            check_pseudo_drive(drive)
            target, node = drive, drive_node(drive)
        ahead = self._db.jobs.latest(kind=KIND, states=("queued", "running"), node=node)
        params = {
            "study_uids": list(study_uids), "target": target, "drive": drive, "iso": target if iso else None,
            **dataclasses.asdict(options), "waited": bool(ahead), "discs": [], "overwrite": bool(overwrite),
        }
        job_id = self._jobs.submit(KIND, node, uids, params, max_attempts=1)
        if ahead:
            self._db.jobs.set_detail(job_id, f"waiting for {target}: another burn uses it", only_if="queued")
        LOG.info("burn job %d: %d instance(s) of %d study(ies) to %s (%s)%s", job_id, len(uids),
                 len(study_uids), target, options.profile, " queued behind another burn" if ahead else "")
        if wait:
            while not self._ended(self._job(job_id)):
                time.sleep(0.1)
        return self.status(job_id)

    def status(self, id: int) -> dict[str, Any]:
        """The burn `id` (a job id) with its discs."""
        return self._to_json(self._job(id))

    def list(self) -> list[dict[str, Any]]:
        """The latest burns, oldest first."""
        return [self._to_json(j) for j in reversed(self._db.jobs.latest(kind=KIND))]

    def disc_inserted(self, id: int) -> dict[str, Any]:
        """The technologist put the blank disc asked for by ``burn.insert_disc`` in."""
        job = self._job(id)
        with self._lock:
            wait = self._waiting.get(job.id)
        if wait is None:
            raise Conflict(f"burn {id} is not waiting for a disc (state {job.state})")
        wait.inserted.set()
        return {"id": job.id, "disc": wait.disc}

    def cancel(self, id: int) -> dict[str, Any]:
        """Cancel a queued burn, or stop a running one at its next safe point."""
        self._job(id)
        self._jobs.cancel(id)
        return self.status(id)

    def drives(self) -> builtins.list[dict[str, Any]]:  # builtins: `list` is a method here
        """Drives found by udev plus the configured ones, with their media and whether a burn uses them."""
        busy = {j.params.get("drive") for j in self._db.jobs.latest(kind=KIND, states=("running",))}
        return list_drives(self._media().drives, busy)

    # -- job rows ---------------------------------------------------------------------------------

    def _job(self, id: Any) -> Job:
        if isinstance(id, bool) or not isinstance(id, int):
            raise Invalid("give the burn id (its job id) as a whole number")
        job = self._db.jobs.get(id)
        if job is None or job.kind != KIND:
            raise NotFound(f"no burn {id}")
        return job

    def _stopping(self, job: Job) -> bool:
        """Cancelled, but its executor is still finishing (e.g. the disc being written)."""
        with self._lock:
            return job.state in FINAL_STATES and job.id in self._active

    def _ended(self, job: Job) -> bool:
        return job.state in FINAL_STATES and not self._stopping(job)

    def _to_json(self, job: Job) -> dict[str, Any]:
        p = job.params
        with self._lock:
            wait = self._waiting.get(job.id)
        state = job.state
        error = "" if state == "done" else job.last_error or (job.detail if state == "cancelled" else "")
        return {
            "id": job.id, "job_id": job.id, "study_uids": p.get("study_uids", []),
            "target": p.get("target", ""), "profile": p.get("profile", ""), "state": state,
            "error": error, "detail": job.detail, "stopping": self._stopping(job),
            "discs": p.get("discs", []), "waiting_for_disc": wait.disc if wait is not None else None,
            "queued": job.created_at, "started": p.get("started_at"),
            "finished": job.updated_at if self._ended(job) else None,
        }

    # -- the executor -----------------------------------------------------------------------------

    def execute(self, job: Job, ctx: JobContext) -> None:
        """Run (or resume) a burn job; see the module docstring."""
        job_id = job.id
        with self._lock:
            self._active.add(job_id)
        staging = self._staging_dir / str(job_id)
        shutil.rmtree(staging, ignore_errors=True)  # left by a crash of an earlier attempt
        try:
            self._run(job, ctx, staging)
        finally:
            shutil.rmtree(staging, ignore_errors=True)
            with self._lock:
                self._active.discard(job_id)
                self._waiting.pop(job_id, None)

    def _run(self, job: Job, ctx: JobContext, staging: Path) -> None:
        job_id = job.id
        params = dict(job.params)
        fields = {f.name for f in dataclasses.fields(MediaOptions)}
        options = MediaOptions(**{k: v for k, v in params.items() if k in fields})
        disc_fields = {f.name for f in dataclasses.fields(DiscReport)}
        earlier = {d["index"]: DiscReport(**{k: v for k, v in d.items() if k in disc_fields})
                   for d in params.get("discs", [])}
        resumed = bool(earlier)
        params.setdefault("started_at", time.time())
        files, uid_of = self._files(job_id)
        self._db.index.touch_instances(list(uid_of.values()))  # a use: docs/design.md "Disk clean-up"
        if params.get("drive"):
            try:  # checked again: the file may have been replaced since the burn was asked for
                check_pseudo_drive(params["drive"])
            except (Invalid, Conflict) as exc:
                raise Fail(str(exc), alert=False) from None
        drive = open_drive(params["drive"]) if params.get("drive") else None
        iso_out = Path(params["iso"]) if params.get("iso") else None
        target = params["target"]
        discs: dict[int, dict[str, Any]] = {}
        self._db.jobs.set_detail(job_id, f"resuming the burn to {target}" if resumed else f"planning the burn to {target}",
                                 params=params)
        LOG.info("burn job %d: %s to %s", job_id, "resumed" if resumed else "started", target)
        last: dict[tuple[str, int], float] = {}

        def progress(phase: str, disc: int, count: int, fraction: float) -> None:
            now = time.monotonic()
            key = (phase, disc)
            if fraction < 1.0 and key in last and now - last[key] < PROGRESS_INTERVAL:
                return
            last[key] = now
            self._publish("burn.progress", id=job_id, phase=phase, disc=disc, discs=count,
                          fraction=round(fraction, 3))

        def on_disc(disc: DiscReport, uids: Sequence[str]) -> None:
            entry = dataclasses.asdict(disc)
            # the data left on a medium written in this attempt: an export (docs/design.md "Audit trail")
            if disc.state in (DISC_DONE, DISC_FAILED, DISC_STOPPED) and discs.get(disc.index, {}).get("state") in (
                    DISC_WRITING, DISC_VERIFYING):
                audit.exported(disc.target, iso_out is not None, disc.fileset_id, PROFILES[options.profile].medium,
                               self._db.index.instance_studies(list(uids)).values(), disc.state == DISC_DONE)
            discs[disc.index] = entry
            params["discs"] = [discs[k] for k in sorted(discs)]
            self._db.jobs.set_detail(job_id, f"disc {disc.index} of {disc.count}: {disc.state}", params=params)
            if disc.state in (DISC_DONE, DISC_FAILED):
                self._db.jobs.set_items(job_id, list(uids), disc.state,
                                   f"disc {disc.index} of {disc.count}" if disc.state == DISC_DONE else disc.message)
            self._publish("burn.disc", id=job_id, disc=entry)
            self._jobs.announce(job_id)

        def next_disc(disc: int, count: int) -> None:
            self._wait_for_disc(job_id, ctx, target, disc, count)
            if drive is not None:
                drive.disc_inserted()

        try:
            report = burn_studies(files, drive, iso_out, options, staging, progress, next_disc,
                                  earlier=earlier, on_disc=on_disc, should_stop=ctx.should_stop,
                                  ask_first=resumed or bool(params.get("waited")),
                                  overwrite=bool(params.get("overwrite")))
        except Exception as exc:  # a bug: the burn fails, the service keeps running
            LOG.exception("burn job %d: burn raised", job_id)
            raise Fail(f"internal error: {exc}", alert=False) from None
        if report.stopped:
            if job_id in ctx.cancelled:
                notes = [d.message for d in report.discs if d.state == DISC_STOPPED]
                self._db.jobs.set_detail(job_id, "cancelled by the operator",
                                         error="; ".join(notes) or "cancelled by the operator")
            raise Stopping()
        if not report.ok:
            raise Fail(report.error, alert=False)
        for path in report.skipped:
            uid = uid_of.get(path)
            if uid is not None:
                self._db.jobs.set_item(job_id, uid, "warning", None, "left off the medium: not a storable DICOM file")
        n = len(report.discs)
        self._db.jobs.set_detail(job_id, f"{n} disc(s) written and verified to {target}")
        LOG.info("burn job %d: done, %d disc(s) written and verified to %s", job_id, n, target)

    def _files(self, job_id: int) -> tuple[builtins.list[Path], dict[str, str]]:
        """The archive files of the job's instances, and file -> SOP Instance UID."""
        files: list[Path] = []
        uid_of: dict[str, str] = {}
        missing: list[str] = []
        for it in self._db.jobs.items(job_id):
            row = self._db.index.instance(it.item)
            if row is None:
                missing.append(it.item)
                continue
            path = self._archive_root / row.path
            files.append(path)
            uid_of[str(path)] = it.item
        if missing:
            raise Fail(f"{len(missing)} instance(s) of this burn are no longer in the archive "
                       f"(first: {missing[0]}): start a new burn", alert=False)
        return files, uid_of

    def _wait_for_disc(self, job_id: int, ctx: JobContext, target: str, disc: int, count: int) -> None:
        """Ask for blank disc `disc` of `count` and wait for ``burn.disc_inserted``."""
        wait = _DiscWait(disc)
        with self._lock:
            self._waiting[job_id] = wait
        message = f"Insert blank disc {disc} of {count} into {target}."
        LOG.info("burn job %d: %s", job_id, message)
        self._db.jobs.set_detail(job_id, f"waiting for blank disc {disc} of {count}")
        self._publish("burn.insert_disc", id=job_id, disc=disc, discs=count, message=message)
        timeout = self._media().disc_timeout_s
        deadline = time.monotonic() + timeout
        try:
            while not wait.inserted.wait(0.2):
                if ctx.should_stop():
                    raise BurnStopped(f"stopped while waiting for disc {disc} of {count}")
                if time.monotonic() > deadline:
                    raise BurnAborted(f"no blank disc {disc} of {count} was inserted within {timeout:.0f} s")
        finally:
            with self._lock:
                self._waiting.pop(job_id, None)

    def on_end(self, job: Job) -> None:
        """The job ended (its row holds the final state): ``burn.done``, and an alert if it failed."""
        info = self._to_json(job)
        if job.state == "failed":
            self._alert("burn-failed", f"burn {job.id} to {info['target']} failed: {info['error']}")
        self._publish("burn.done", id=job.id, state=job.state, error=info["error"])
