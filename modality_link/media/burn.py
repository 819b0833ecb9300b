"""Burn a set of instances: plan, master, write, verify, eject, disc after disc.

The one module that drives a burn. For each disc of the (possibly spanned,
see :mod:`~modality_link.media.spanning`) set it

1. builds the file-set and its ISO 9660 Level 1 image (PS3.10 §8, PS3.12
   Annex F) with :func:`~modality_link.media.disc.build_disc`;
2. either keeps the image as the export file, or writes it to a blank medium
   through the drive HAL (:mod:`hw`) as one closed session (PS3.12 F.3: no
   multi-session for export);
3. verifies: the drive compares the medium with the image byte for byte
   (:meth:`hw.Drive.verify`), and, where the medium can be read as a file
   (an image file, a ``stdio:`` pseudo-drive, ``/dev/srN``), every file of the
   file-set read back through ISO 9660 is compared by SHA-256 with the file
   mastered from the archive (:class:`~modality_link.media.disc.DiscResult`).
   A disc that fails either check is reported as failed, never as good;
4. ejects the disc and asks for the next blank one (``next_disc``).

An image exported with ``--iso`` is mastered under a temporary name beside
its target (``.NAME.part``, never written through a symbolic link), read
back, flushed to disk and only then given its target's name - a new name, or
with ``overwrite`` in place of an existing file (docs/design.md "Files and
permissions") - so a target file is always a complete, verified image.

For a burn that runs as a persistent job (:mod:`modality_link.burns`):

* ``on_disc`` is told every change of a disc's state (planned ``pending``,
  ``building``, ``writing``, ``verifying``, then ``done``, ``failed`` or
  ``stopped``), so the discs can be shown and saved while the burn runs;
* ``earlier`` carries the discs a previous attempt finished: a disc already
  written and verified is not burned again, provided it holds the same
  instances (:func:`disc_digest`);
* ``should_stop`` is polled at the safe points: before a disc, while a disc
  is mastered, after the write and while it is verified, and by
  ``next_disc`` while it waits. A write to a disc is never interrupted:
  killing a CD-R/DVD-R write ruins the disc and may leave the drive needing
  a reset, so a stop asked during a write takes effect once the write ends;
  that disc is then ejected unverified and reported ``stopped``, never good.
"""

from __future__ import annotations

import hashlib
import logging
import os
import shutil
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import BinaryIO, cast

import pycdlib

import hw
from modality_link.fileformat import Part10Error
from modality_link.media.disc import DiscResult, build_disc
from modality_link.media.iso import iso_path as iso9660_path
from modality_link.media.options import MediaError, MediaOptions
from modality_link.media.spanning import DiscPlan, plan_discs

LOGGER = logging.getLogger(__name__)

#: Burn phases reported to :data:`BurnProgress` callbacks.
PHASE_BUILD = "build"
PHASE_WRITE = "write"
PHASE_VERIFY = "verify"

#: progress(phase, disc, discs, fraction): disc is 1-based, fraction 0.0-1.0 within the phase.
BurnProgress = Callable[[str, int, int, float], None]
#: next_disc(disc, discs): called before disc 2..n; returns once a blank disc is in the drive.
NextDisc = Callable[[int, int], None]

DISC_PENDING = "pending"
DISC_BUILDING = "building"
DISC_WRITING = "writing"
DISC_VERIFYING = "verifying"
DISC_DONE = "done"
DISC_FAILED = "failed"
#: The burn stopped (cancelled, or the service stopped) before this disc was finished.
DISC_STOPPED = "stopped"


class BurnAborted(MediaError):
    """The burn stopped before its end (e.g. no next disc was inserted)."""


class BurnStopped(Exception):
    """Raised at a safe point when the burn was asked to stop; not a failure of the burn."""


@dataclass
class DiscReport:
    """The outcome of one disc of a burn."""

    index: int
    count: int
    fileset_id: str
    #: The image file (``--iso``) or the drive's device name.
    target: str
    state: str = DISC_PENDING
    instances: int = 0
    image_bytes: int = 0
    #: True only when the drive's read-back compare passed (always False for an image file).
    medium_verified: bool = False
    #: Files of the file-set read back and found equal to what was mastered.
    files_checked: int = 0
    message: str = ""
    #: :func:`disc_digest` of the disc's instances: which instances this disc holds.
    digest: str = ""


@dataclass
class BurnReport:
    """What :func:`burn_studies` did; ``ok`` only if every disc was written and verified."""

    discs: list[DiscReport] = field(default_factory=list)
    error: str = ""
    skipped: list[str] = field(default_factory=list)
    #: The burn stopped at a safe point because ``should_stop`` said so.
    stopped: bool = False

    @property
    def ok(self) -> bool:
        return (not self.error and not self.stopped and bool(self.discs)
                and all(d.state == DISC_DONE for d in self.discs))


#: on_disc(disc, sop_instance_uids): `disc` changed state; the UIDs are the instances on it.
DiscUpdate = Callable[[DiscReport, Sequence[str]], None]


def disc_digest(plan: DiscPlan) -> str:
    """SHA-256 of the sorted SOP Instance UIDs of a planned disc (and its place in the set)."""
    text = f"{plan.index}/{plan.count}\n" + "\n".join(sorted(i.sop_instance_uid for i in plan.instances))
    return hashlib.sha256(text.encode("ascii", "replace")).hexdigest()


class _HashWriter:
    """A write-only file object that only hashes what it receives."""

    def __init__(self) -> None:
        self.hash = hashlib.sha256()
        self.size = 0

    def write(self, data: bytes) -> int:
        self.hash.update(data)
        self.size += len(data)
        return len(data)


def check_files(medium: Path, result: DiscResult) -> list[str]:
    """Read every file of `result` back from the ISO 9660 volume in `medium`.

    `medium` is an image file, a ``stdio:`` pseudo-drive file or a block
    device. Returns one sentence per file that is missing or differs (by
    size or SHA-256) from what :func:`build_disc` mastered; empty if all match.
    """
    problems: list[str] = []
    iso = pycdlib.PyCdlib()
    try:
        with open(medium, "rb") as fp:
            try:
                iso.open_fp(fp)
            except pycdlib.pycdlibexception.PyCdlibException as exc:
                return [f"{medium} holds no readable ISO 9660 volume ({exc})"]
            try:
                for f in result.files:
                    out = _HashWriter()
                    name = "/".join(f.file_id)
                    try:
                        iso.get_file_from_iso_fp(cast(BinaryIO, out), iso_path=iso9660_path(f.file_id))
                    except pycdlib.pycdlibexception.PyCdlibException:
                        problems.append(f"{name} is missing")
                        continue
                    if out.size != f.size or out.hash.hexdigest() != f.sha256:
                        problems.append(f"{name} differs from its source")
            finally:
                iso.close()
    except OSError as exc:
        return [f"{medium} could not be read ({exc.strerror or exc})"]
    return problems


def iso_target(iso_out: Path, index: int, count: int) -> Path:
    """The image file of disc `index`: ``FILE`` for the first, ``FILE_2.iso``... for the others."""
    if index == 1 or count == 1:
        return iso_out
    return iso_out.with_name(f"{iso_out.stem}_{index}{iso_out.suffix}")


def iso_part(target: Path) -> Path:
    """The temporary name an exported image is mastered under before it becomes `target`."""
    return target.with_name(f".{target.name}.part")


def _publish_file(part: Path, target: Path, overwrite: bool = False) -> None:
    """Flush `part` to disk and give it the name `target` (atomic within a file system): a new
    name (link(2) fails when `target` exists), or with `overwrite` in place of what is there -
    the name is replaced, a symbolic link is never followed."""
    with open(part, "rb") as fp:
        os.fsync(fp.fileno())
    if overwrite:
        os.replace(part, target)
    else:
        try:
            os.link(part, target)
        except FileExistsError:
            raise MediaError(f"{target} exists: an image file is not replaced unless asked to "
                             f"(overwrite, burn --force)") from None
        os.unlink(part)
    fd = os.open(target.parent, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _check_medium(drive: hw.Drive, needed: int | None) -> None:
    """Raise a :class:`hw.DriveError` unless a blank medium with room for `needed` bytes is loaded."""
    device = drive.identity.device
    hint = hw.drive.blank_media_hint(drive.capabilities())
    media = drive.media()
    if not media.present:
        raise hw.NoMediaError(f"There is no disc in {device}: insert {hint}.", device=device)
    if not media.is_blank:
        raise hw.MediaNotBlankError(f"The disc in {device} is not blank: insert {hint}.", device=device)
    room = media.free_bytes if media.free_bytes is not None else media.capacity_bytes
    if needed is not None and room is not None and needed > room:
        raise hw.MediaTooSmallError(
            f"The disc in {device} is too small: this disc of the set needs "
            f"{hw.drive.format_bytes(needed)} but only {hw.drive.format_bytes(room)} are free.",
            device=device)


def burn_studies(
    files: Sequence[Path],
    drive: hw.Drive | None,
    iso_out: Path | None,
    options: MediaOptions,
    staging_root: Path,
    progress: BurnProgress | None = None,
    next_disc: NextDisc | None = None,
    *,
    earlier: Mapping[int, DiscReport] | None = None,
    on_disc: DiscUpdate | None = None,
    should_stop: Callable[[], bool] | None = None,
    ask_first: bool = False,
    overwrite: bool = False,
) -> BurnReport:
    """Burn the instance files `files` to `drive`, or export them as `iso_out`.

    Exactly one of `drive` and `iso_out` is given. The set is split into
    discs of ``options.capacity_bytes`` (each a complete file-set with its
    own DICOMDIR, PS3.10 §8); with `iso_out` disc *k* > 1 goes to
    ``<stem>_<k><suffix>``. `staging_root` receives the temporary staging
    folders and images (removed disc by disc). `next_disc(k, n)` is called
    before every disc written after the first, once the previous one is
    ejected; it may raise :class:`BurnAborted` (the burn fails) or
    :class:`BurnStopped` (the burn stops).

    `earlier` maps disc numbers to the reports of an earlier attempt: a disc
    reported done there, with the same :func:`disc_digest`, is kept and not
    written again (an exported image only while its file still exists).
    With `ask_first`, a drive that holds no blank disc for the first disc
    still to write is answered by `next_disc` instead of a failure (a burn
    that waited for the drive or resumes after a restart). An image file
    replaces an existing file of its name only with `overwrite`. `on_disc`
    and `should_stop` are described in the module docstring.

    Never raises for a failure of the medium, the drive or the data: the
    returned :class:`BurnReport` names the failed disc and carries a sentence
    for the technologist in ``error``; a stop sets ``stopped``.
    """
    if (drive is None) == (iso_out is None):
        raise ValueError("burn_studies: give either a drive or an image file, not both or neither")
    staging_root = Path(staging_root)
    report = BurnReport()
    plans: list[DiscPlan] = []

    def tell(phase: str, k: int, n: int, fraction: float) -> None:
        if progress is not None:
            progress(phase, k, n, max(0.0, min(1.0, fraction)))

    def changed(disc: DiscReport, plan: DiscPlan) -> None:
        if on_disc is not None:
            on_disc(disc, [i.sop_instance_uid for i in plan.instances])

    def stop_point() -> None:
        if should_stop is not None and should_stop():
            raise BurnStopped("the burn was asked to stop")

    ask = False
    try:
        options.validate()
        plans = plan_discs([Path(f) for f in files], options)
        if not plans:
            raise MediaError("nothing to burn: none of the instances can be written to a DICOM file-set")
        report.skipped = [str(p) for p in plans[0].skipped]
        report.discs = _plan_reports(plans, drive, iso_out, earlier or {})
        for plan, disc in zip(plans, report.discs):
            changed(disc, plan)
        if drive is not None and any(d.state != DISC_DONE for d in report.discs):
            try:
                _check_medium(drive, None)  # fail before mastering when no blank disc is in
            except hw.DriveError:
                if not (ask_first and next_disc is not None):
                    raise
                ask = True
    except (MediaError, Part10Error, hw.DriveError) as exc:
        report.error = str(exc)
        LOGGER.error("burn: %s", exc)
        return report

    for plan, disc in zip(plans, report.discs):
        if disc.state == DISC_DONE:
            continue
        k, n = plan.index, plan.count
        staging = staging_root / f"disc{k}"
        image = iso_part(Path(disc.target)) if iso_out is not None else staging_root / f"disc{k}.iso"
        try:
            if drive is not None and next_disc is not None and ask:
                next_disc(k, n)
            ask = True  # every later disc of this call follows an ejected one
            stop_point()

            def build_progress(stage: str, done: int, total: int) -> None:
                stop_point()
                base = 0.0 if stage == "stage" else 0.5
                tell(PHASE_BUILD, k, n, base + 0.5 * (done / total if total else 1.0))

            disc.state = DISC_BUILDING
            changed(disc, plan)
            tell(PHASE_BUILD, k, n, 0.0)
            image.unlink(missing_ok=True)  # left by a crash: removed, never written through
            result = build_disc(plan, staging, image, options, build_progress)
            disc.image_bytes = result.iso_bytes
            stop_point()
            if drive is None:
                disc.state = DISC_VERIFYING
                changed(disc, plan)
                tell(PHASE_VERIFY, k, n, 0.0)
                problems = check_files(image, result)
                if problems:
                    raise MediaError(f"disc {k} of {n} ({disc.target}): read back, " + "; ".join(problems[:5]))
                _publish_file(image, Path(disc.target), overwrite)
                disc.files_checked = len(result.files)
                tell(PHASE_VERIFY, k, n, 1.0)
            else:
                _burn_one(drive, image, result, disc, tell, lambda d: changed(d, plan), stop_point)
            disc.state = DISC_DONE
            disc.message = (f"disc {k} of {n}: {disc.instances} instance(s), "
                            f"{disc.files_checked} file(s) verified")
            LOGGER.info("burn: %s on %s", disc.message, disc.target)
            changed(disc, plan)
        except BurnStopped:
            report.stopped = True
            if disc.state != DISC_PENDING:
                disc.state = DISC_STOPPED
                disc.message = disc.message or f"disc {k} of {n}: stopped before anything was written"
            LOGGER.warning("burn: stopped at disc %d of %d", k, n)
            changed(disc, plan)
            return report
        except (MediaError, Part10Error, hw.DriveError, OSError) as exc:
            disc.state = DISC_FAILED
            disc.message = str(exc)
            report.error = f"disc {k} of {n} failed: {exc}" if n > 1 else str(exc)
            LOGGER.error("burn: %s", report.error)
            changed(disc, plan)
            return report
        finally:
            shutil.rmtree(staging, ignore_errors=True)
            image.unlink(missing_ok=True)  # a staged image, or an export that did not become its target
    return report


def _plan_reports(plans: Sequence[DiscPlan], drive: hw.Drive | None, iso_out: Path | None,
                  earlier: Mapping[int, DiscReport]) -> list[DiscReport]:
    """One report per planned disc; discs finished by an earlier attempt are carried over."""
    device = drive.identity.device if drive is not None else ""
    out = []
    for plan in plans:
        k, n = plan.index, plan.count
        target = str(iso_target(Path(iso_out), k, n)) if iso_out is not None else device
        disc = DiscReport(k, n, plan.fileset_id, target, instances=len(plan.instances), digest=disc_digest(plan))
        before = earlier.get(k)
        if before is not None and before.state == DISC_DONE:
            if before.digest != disc.digest:
                raise MediaError(
                    f"disc {k} of {n} was burned earlier with other instances than this burn holds now "
                    f"(the studies or media settings changed since): start a new burn")
            if iso_out is None or Path(target).is_file():
                disc = before
        out.append(disc)
    return out


def _burn_one(drive: hw.Drive, image: Path, result: DiscResult, disc: DiscReport,
              tell: Callable[[str, int, int, float], None],
              changed: Callable[[DiscReport], None] = lambda d: None,
              stop_point: Callable[[], None] = lambda: None) -> None:
    """Write, verify and eject one disc; raise on any failure, :class:`BurnStopped` on a stop."""
    k, n = disc.index, disc.count
    device = drive.identity.device
    _check_medium(drive, image.stat().st_size)
    disc.state = DISC_WRITING
    changed(disc)
    tell(PHASE_WRITE, k, n, 0.0)
    drive.write(image, progress=lambda p: tell(PHASE_WRITE, k, n, p.fraction))  # never interrupted
    disc.state = DISC_VERIFYING
    changed(disc)
    try:
        stop_point()
        tell(PHASE_VERIFY, k, n, 0.0)

        def verify_progress(p: hw.BurnProgress) -> None:
            stop_point()
            tell(PHASE_VERIFY, k, n, 0.5 * p.fraction)

        verdict = drive.verify(image, progress=verify_progress)
    except BurnStopped:
        disc.message = f"disc {k} of {n} was written but not verified: do not use it"
        _eject(drive)
        raise
    if not verdict.ok:
        _eject(drive)
        raise hw.VerifyError(verdict.message, device=device, result=verdict)
    disc.medium_verified = True
    medium = drive.readback_path
    if medium is not None:
        problems = check_files(medium, result)
        if problems:
            _eject(drive)
            raise hw.VerifyError(
                f"Verification failed: files on the disc in {device} differ from the archive "
                f"({'; '.join(problems[:5])}). Do not use it.", device=device)
        disc.files_checked = len(result.files)
    tell(PHASE_VERIFY, k, n, 1.0)
    _eject(drive)


def _eject(drive: hw.Drive) -> None:
    try:
        drive.eject()
    except hw.DriveError as exc:  # the disc is written; a stuck tray is only worth a log line
        LOGGER.warning("burn: could not eject %s: %s", drive.identity.device, exc)
