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
"""

from __future__ import annotations

import hashlib
import logging
import shutil
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import pycdlib

import hw
from modality_link.media.disc import DiscResult, build_disc
from modality_link.media.iso import iso_path as iso9660_path
from modality_link.media.options import MediaError, MediaOptions
from modality_link.media.spanning import plan_discs

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
DISC_DONE = "done"
DISC_FAILED = "failed"


class BurnAborted(MediaError):
    """The burn stopped before its end (e.g. no next disc was inserted)."""


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


@dataclass
class BurnReport:
    """What :func:`burn_studies` did; ``ok`` only if every disc was written and verified."""

    discs: list[DiscReport] = field(default_factory=list)
    error: str = ""
    skipped: list[str] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return not self.error and bool(self.discs) and all(d.state == DISC_DONE for d in self.discs)


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
                        iso.get_file_from_iso_fp(out, iso_path=iso9660_path(f.file_id))
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


def readback_path(drive: hw.Drive) -> Path | None:
    """Where the medium of `drive` can be read as a file, if anywhere."""
    if isinstance(drive, hw.XorrisoDrive):
        return drive.readback_path
    if isinstance(drive, hw.ImageFileDrive):
        return drive.path
    return None


def iso_target(iso_out: Path, index: int, count: int) -> Path:
    """The image file of disc `index`: ``FILE`` for the first, ``FILE_2.iso``... for the others."""
    if index == 1 or count == 1:
        return iso_out
    return iso_out.with_name(f"{iso_out.stem}_{index}{iso_out.suffix}")


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
) -> BurnReport:
    """Burn the instance files `files` to `drive`, or export them as `iso_out`.

    Exactly one of `drive` and `iso_out` is given. The set is split into
    discs of ``options.capacity_bytes`` (each a complete file-set with its
    own DICOMDIR, PS3.10 §8); with `iso_out` disc *k* > 1 goes to
    ``<stem>_<k><suffix>``. `staging_root` receives the temporary staging
    folders and images (removed disc by disc). `next_disc(k, n)` is called
    before every disc after the first, once the previous one is ejected;
    it may raise to abort the burn.

    Never raises for a failure of the medium, the drive or the data: the
    returned :class:`BurnReport` names the failed disc and carries a sentence
    for the technologist in ``error``.
    """
    if (drive is None) == (iso_out is None):
        raise ValueError("burn_studies: give either a drive or an image file, not both or neither")
    staging_root = Path(staging_root)
    report = BurnReport()

    def tell(phase: str, k: int, n: int, fraction: float) -> None:
        if progress is not None:
            progress(phase, k, n, max(0.0, min(1.0, fraction)))

    try:
        options.validate()
        plans = plan_discs([Path(f) for f in files], options)
        if not plans:
            raise MediaError("nothing to burn: none of the instances can be written to a DICOM file-set")
        report.skipped = [str(p) for p in plans[0].skipped]
        device = drive.identity.device if drive is not None else ""
        for plan in plans:
            target = str(iso_target(Path(iso_out), plan.index, plan.count)) if iso_out is not None else device
            report.discs.append(DiscReport(plan.index, plan.count, plan.fileset_id, target,
                                           instances=len(plan.instances)))
        if drive is not None:
            _check_medium(drive, None)  # fail before mastering when no blank disc is in
    except (MediaError, hw.DriveError) as exc:
        report.error = str(exc)
        LOGGER.error("burn: %s", exc)
        return report

    for plan, disc in zip(plans, report.discs):
        k, n = plan.index, plan.count
        staging = staging_root / f"disc{k}"
        image = Path(disc.target) if iso_out is not None else staging_root / f"disc{k}.iso"
        try:
            if drive is not None and k > 1:
                if next_disc is not None:
                    next_disc(k, n)

            def build_progress(stage: str, done: int, total: int) -> None:
                base = 0.0 if stage == "stage" else 0.5
                tell(PHASE_BUILD, k, n, base + 0.5 * (done / total if total else 1.0))

            tell(PHASE_BUILD, k, n, 0.0)
            result = build_disc(plan, staging, image, options, build_progress)
            disc.image_bytes = result.iso_bytes
            if drive is None:
                tell(PHASE_VERIFY, k, n, 0.0)
                problems = check_files(image, result)
                if problems:
                    raise MediaError(f"disc {k} of {n} ({image}): read back, " + "; ".join(problems[:5]))
                disc.files_checked = len(result.files)
                tell(PHASE_VERIFY, k, n, 1.0)
            else:
                _burn_one(drive, image, result, disc, tell)
            disc.state = DISC_DONE
            disc.message = (f"disc {k} of {n}: {disc.instances} instance(s), "
                            f"{disc.files_checked} file(s) verified")
            LOGGER.info("burn: %s on %s", disc.message, disc.target)
        except (MediaError, hw.DriveError, OSError) as exc:
            disc.state = DISC_FAILED
            disc.message = str(exc)
            report.error = f"disc {k} of {n} failed: {exc}" if n > 1 else str(exc)
            LOGGER.error("burn: %s", report.error)
            return report
        finally:
            shutil.rmtree(staging, ignore_errors=True)
            if drive is not None:
                image.unlink(missing_ok=True)
    return report


def _burn_one(drive: hw.Drive, image: Path, result: DiscResult, disc: DiscReport,
              tell: Callable[[str, int, int, float], None]) -> None:
    """Write, verify and eject one disc; raise on any failure."""
    k, n = disc.index, disc.count
    device = drive.identity.device
    _check_medium(drive, image.stat().st_size)
    tell(PHASE_WRITE, k, n, 0.0)
    drive.write(image, progress=lambda p: tell(PHASE_WRITE, k, n, p.fraction))
    tell(PHASE_VERIFY, k, n, 0.0)
    verdict = drive.verify(image, progress=lambda p: tell(PHASE_VERIFY, k, n, 0.5 * p.fraction))
    if not verdict.ok:
        _eject(drive)
        raise hw.VerifyError(verdict.message, device=device, result=verdict)
    disc.medium_verified = True
    medium = readback_path(drive)
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
