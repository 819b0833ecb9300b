"""A real burner backend driving GNU xorriso.

:class:`XorrisoDrive` drives ``/usr/bin/xorriso`` (configurable).  The device
is either a real drive (``/dev/sr0``) or xorriso's ``stdio:`` pseudo-drive
(``stdio:/path/to/file``): a regular file that libburn writes exactly as it
writes a disc, which lets the real burn path run in tests.

Command lines
-------------
Every run starts with ``-no_rc`` (ignore site startup files) and
``-abort_on FAILURE``.

* media:   ``xorriso -no_rc -abort_on FAILURE -pkt_output on -outdev DEV -toc -tell_media_space``
  (``Media current``/``Media status``/``Media blocks``/``Media summary``/
  ``Drive type``/``Media space`` lines are parsed; ``-pkt_output on`` merges
  all channels on stdout with ``R:1:``/``I:1:`` prefixes).
* capabilities: ``xorriso ... -outdev DEV -list_profiles out`` (``Profile : 0x0009 (CD-R)`` lines).
* write:   ``xorriso -no_rc -abort_on FAILURE -return_with SORRY 32 -pacifier interval=0.25
  -as cdrecord -v dev=DEV padsize=300k [blank=as_needed] IMAGE``.
  The cdrecord emulation is xorriso's way of writing a prepared image as
  one data track; without ``-multi`` the medium is closed (a CD-R/DVD-R
  becomes "complete").  It works unchanged for ``stdio:`` files.
  ``padsize=300k`` keeps the image readable on TAO-written CDs (the last two
  blocks of a TAO track are unreadable).  Progress arrives as
  ``xorriso : UPDATE : 13 of 39 MB written`` lines (every 0.25 s); any SORRY
  event makes the run fail.
* verify:  ``xorriso ... -pkt_output on -outdev DEV -check_media use=outdev what=disc
  min_lba=0 max_lba=N-1 --`` (``Media region : lba , size , quality`` lines;
  qualities starting with ``-`` are unreadable), followed by a byte
  comparison of the image with the first image-size bytes read back from the
  medium (the ``stdio:`` file, or ``/dev/srN``).
* eject:   ``xorriso -no_rc -abort_on FAILURE -outdev DEV -eject all`` (harmless on ``stdio:``).

Write policy: only a blank medium is written.  A ``stdio:`` file that holds
data is reported "appendable" by libburn (it is overwritable); like an
appendable or closed disc it is refused with :class:`MediaNotBlankError`,
unless the drive was created with ``erase_rewritable=True``, in which case
rewritable media (CD-RW, DVD±RW, BD-RE, ``stdio:`` files) are blanked
first with ``blank=as_needed``.
"""

from __future__ import annotations

import os
import re
import subprocess
from dataclasses import dataclass
from pathlib import Path
from typing import Optional, Sequence, Type

from hw.drive import (
    BD_R, BD_RE, CD_R, CD_RW, DVD_PLUS_R, DVD_PLUS_R_DL, DVD_PLUS_RW, DVD_R,
    DVD_R_DL, DVD_RAM, DVD_RW, FILE, PHASE_DONE, PHASE_START, PHASE_WRITE,
    STATE_APPENDABLE, STATE_BLANK, STATE_COMPLETE, BurnError, BurnProgress,
    DriveError, DriveInfo, DriveUnavailableError, MediaInfo,
    MediaNotBlankError, MediaTooSmallError, NoMediaError, ProgressCallback,
    VerifyError, VerifyResult, blank_media_hint, format_bytes,
)
from hw.verify import BLOCK_SIZE, compare_image

__all__ = [
    "DEFAULT_XORRISO", "XorrisoDrive", "TocReport", "MediaRegion",
    "parse_toc", "media_from_toc", "parse_profiles", "parse_progress",
    "parse_check_media", "classify_failure", "kind_from_profile",
]

#: Where Debian installs xorriso.
DEFAULT_XORRISO = "/usr/bin/xorriso"

_PREFIX = re.compile(r"^[RIM]:\d+: ?")


def _lines(text: str) -> list[str]:
    """Output lines with ``-pkt_output`` channel prefixes removed."""
    return [_PREFIX.sub("", line).rstrip() for line in text.splitlines()]


# Parsing ---------------------------------------------------------------------


@dataclass(frozen=True)
class TocReport:
    """The facts parsed from ``-toc`` / ``-tell_media_space`` output."""

    media_current: Optional[str] = None
    media_status: Optional[str] = None
    readable_blocks: Optional[int] = None
    writable_blocks: Optional[int] = None
    overall_blocks: Optional[int] = None
    sessions: Optional[int] = None
    media_space_blocks: Optional[int] = None
    vendor: str = ""
    product: str = ""
    revision: Optional[str] = None


def parse_toc(text: str) -> TocReport:
    """Parse xorriso's ``-toc`` (and ``-tell_media_space``) output.

    The last occurrence of each line wins (``-toc`` repeats the drive report).
    """
    values: dict[str, object] = {}
    for line in _lines(text):
        if line.startswith("Media current:"):
            values["media_current"] = line.split(":", 1)[1].strip()
        elif line.startswith("Media status :"):
            values["media_status"] = line.split(":", 1)[1].strip()
        elif match := re.match(r"Media blocks\s*:\s*(\d+) readable\s*,\s*(\d+) writable\s*,\s*(\d+) overall", line):
            values["readable_blocks"], values["writable_blocks"], values["overall_blocks"] = map(int, match.groups())
        elif match := re.match(r"Media summary\s*:\s*(\d+) sessions?", line):
            values["sessions"] = int(match.group(1))
        elif match := re.match(r"Media space\s*:\s*(\d+)s", line):
            values["media_space_blocks"] = int(match.group(1))
        elif match := re.match(r"Drive type\s*:\s*vendor '([^']*)' product '([^']*)' revision '([^']*)'", line):
            values["vendor"] = match.group(1).strip()
            values["product"] = match.group(2).strip()
            values["revision"] = match.group(3).strip() or None
    return TocReport(**values)  # type: ignore[arg-type]


_PROFILE_KINDS: tuple[tuple[str, str], ...] = (
    ("CD-RW", CD_RW), ("CD-R", CD_R),
    ("DVD-RW", DVD_RW), ("DVD-R/DL", DVD_R_DL), ("DVD-R", DVD_R),
    ("DVD+RW", DVD_PLUS_RW), ("DVD+R/DL", DVD_PLUS_R_DL), ("DVD+R", DVD_PLUS_R),
    ("DVD-RAM", DVD_RAM), ("BD-RE", BD_RE), ("BD-R", BD_R),
    ("CD-ROM", "CD-ROM"), ("DVD-ROM", "DVD-ROM"), ("BD-ROM", "BD-ROM"),
)


def kind_from_profile(name: str) -> Optional[str]:
    """Map a libburn profile name (``"DVD-R sequential recording"``) to a media kind."""
    name = name.strip()
    if name.startswith("stdio file"):
        return FILE
    first = name.split(" ", 1)[0]
    for prefix, kind in _PROFILE_KINDS:
        if first == prefix:
            return kind
    return None


def media_from_toc(report: TocReport) -> MediaInfo:
    """Turn a :class:`TocReport` into :class:`MediaInfo`."""
    status = (report.media_status or "").lower()
    current = (report.media_current or "").lower()
    if not status or "not present" in status or "not present" in current or "no media" in current:
        return MediaInfo.absent()
    if "is blank" in status:
        state = STATE_BLANK
    elif "is closed" in status:
        state = STATE_COMPLETE
    elif "is appendable" in status:
        state = STATE_APPENDABLE
    else:  # "is written" without more, "is unsuitable", unknown: do not write
        state = STATE_COMPLETE
    capacity = report.overall_blocks * BLOCK_SIZE if report.overall_blocks is not None else None
    if report.writable_blocks is not None:
        free = report.writable_blocks * BLOCK_SIZE
    elif report.media_space_blocks is not None:
        free = report.media_space_blocks * BLOCK_SIZE
    else:
        free = None
    return MediaInfo(
        present=True,
        kind=kind_from_profile(report.media_current or ""),
        state=state,
        capacity_bytes=capacity,
        free_bytes=free,
        sessions=report.sessions,
    )


def parse_profiles(text: str) -> frozenset[str]:
    """Writable media kinds from ``-list_profiles`` lines (``Profile : 0x0009 (CD-R)``)."""
    kinds = set()
    for line in _lines(text):
        match = re.match(r"Profile\s*:\s*0x[0-9a-fA-F]+\s*\(([^)]*)\)", line)
        if match:
            kind = kind_from_profile(match.group(1))
            if kind is not None and not kind.endswith("-ROM"):
                kinds.add(kind)
    return frozenset(kinds)


_PROGRESS_PATTERNS: tuple[re.Pattern[str], ...] = (
    # cdrecord pacifier:  xorriso : UPDATE :   13 of   39 MB written (fifo 99%) [buf  50%]
    re.compile(r"(?P<done>\d+)\s+of\s+(?P<total>\d+)\s+MB written"),
    # xorriso pacifier:   Writing: sector 1234 of 5678  [fifo active, 99% fill]
    re.compile(r"Writing:\s+sector\s+(?P<done>\d+)\s+of\s+(?P<total>\d+)"),
    # cdrecord style:     Track 01: 12 of 39 MB written
    re.compile(r"Track\s+\d+:\s+(?P<done>\d+)\s+of\s+(?P<total>\d+)\s+MB written"),
    # mkisofs pacifier:   xorriso : UPDATE :  50.91% done
    re.compile(r"(?P<percent>\d+(?:\.\d+)?)% done"),
)


def parse_progress(line: str) -> Optional[float]:
    """The fraction (0..1) announced by a progress line, or ``None``."""
    for pattern in _PROGRESS_PATTERNS:
        match = pattern.search(line)
        if not match:
            continue
        if "percent" in pattern.groupindex:
            return min(1.0, float(match.group("percent")) / 100.0)
        total = int(match.group("total"))
        if total <= 0:
            return None
        return min(1.0, int(match.group("done")) / total)
    return None


@dataclass(frozen=True)
class MediaRegion:
    """One line of ``-check_media`` output: ``lba``, ``blocks``, ``quality``."""

    lba: int
    blocks: int
    quality: str

    @property
    def bad(self) -> bool:
        """Unreadable or corrupted data (quality ``- ...``), but not the
        intentionally unreadable ``tao_end`` / ``off_track`` blocks."""
        return self.quality.startswith("-") and not any(
            word in self.quality for word in ("tao_end", "off_track"))


def parse_check_media(text: str) -> list[MediaRegion]:
    """Parse ``Media region : lba , size , quality`` lines of ``-check_media``."""
    regions = []
    for line in _lines(text):
        match = re.match(r"Media region\s*:\s*(\d+)\s*,\s*(\d+)\s*,\s*(.+)$", line)
        if match:
            regions.append(MediaRegion(int(match.group(1)), int(match.group(2)), match.group(3).strip()))
    return regions


_EVENT = re.compile(r"^(?:libburn|libisofs|libisoburn|xorriso)\s*:\s*(FATAL|FAILURE|SORRY|MISHAP)\s*:\s*(.*)$")

_TOO_SMALL = ("exceeds free space", "larger than free space", "not enough space",
              "no space left", "file too large", "media too small", "too large for")
_NOT_BLANK = ("closed media with data", "is not a blank", "not blank", "closed or not recordable",
              "disc status unsuitable for writing", "media is not writeable",
              "need blank or appendable")
_NO_MEDIA = ("no media detected", "medium not present", "is not present",
             "no writeable media", "no media")
_UNAVAILABLE = ("cannot acquire drive", "cannot open", "not found", "cannot access",
                "permission denied", "device or resource busy", "neither stdio-path nor its directory exist",
                "not a known drive")


def _failure_lines(text: str) -> list[str]:
    found = []
    for line in _lines(text):
        match = _EVENT.match(line.strip())
        if match and not match.group(2).startswith("-abort_on"):
            found.append(match.group(2).strip())
    return found


def classify_failure(text: str, device: str, *,
                     capabilities: frozenset[str] = frozenset(),
                     image_size: Optional[int] = None,
                     default: Type[DriveError] = BurnError) -> DriveError:
    """Turn xorriso's output of a failed run into a :class:`DriveError`.

    The SORRY/FAILURE lines are matched against known phrases (too small,
    not blank, no media, cannot open); anything else becomes *default*.
    """
    lines = _failure_lines(text) or [line for line in _lines(text) if line.strip()][-3:]
    detail = "\n".join(lines)
    haystack = detail.lower()
    hint = blank_media_hint(capabilities)
    if any(phrase in haystack for phrase in _TOO_SMALL):
        need = f" ({format_bytes(image_size)})" if image_size is not None else ""
        return MediaTooSmallError(
            f"The disc in {device} is too small for this export{need}: "
            f"insert a disc with more space or export fewer studies.",
            device=device, detail=detail)
    if any(phrase in haystack for phrase in _NOT_BLANK):
        return MediaNotBlankError(f"The disc in {device} is not blank: insert {hint}.",
                                  device=device, detail=detail)
    if any(phrase in haystack for phrase in _NO_MEDIA):
        return NoMediaError(f"There is no disc in {device}: insert {hint}.",
                            device=device, detail=detail)
    if any(phrase in haystack for phrase in _UNAVAILABLE):
        return DriveUnavailableError(
            f"The drive {device} cannot be opened: check that it is connected "
            f"and not in use by another program.", device=device, detail=detail)
    reason = lines[-1] if lines else "unknown error"
    if default is BurnError:
        message = (f"Writing the disc in {device} failed ({reason}). The disc may be unusable: "
                   f"insert {hint} and try again.")
    elif default is VerifyError:
        message = f"The disc in {device} could not be read back for verification ({reason})."
    else:
        message = f"The drive {device} reported an error ({reason})."
    return default(message, device=device, detail=detail)


# The drive -------------------------------------------------------------------


class XorrisoDrive:
    """An optical drive (or ``stdio:`` pseudo-drive) driven by xorriso.

    Parameters
    ----------
    device:
        ``"/dev/srN"`` or ``"stdio:/path/to/file"``.
    xorriso:
        Path of the xorriso executable.
    info:
        Identity if already known (e.g. from udev); otherwise asked from
        xorriso on first use of :attr:`identity`.
    capabilities:
        Writable media kinds if already known (e.g. from udev); otherwise
        asked from xorriso (``-list_profiles``).
    erase_rewritable:
        Blank rewritable media that hold data before writing, instead of
        refusing them.
    timeout:
        Seconds allowed for the short queries (media, capabilities, eject).
    """

    def __init__(self, device: str, *, xorriso: "str | os.PathLike[str]" = DEFAULT_XORRISO,
                 info: Optional[DriveInfo] = None,
                 capabilities: Optional[frozenset[str]] = None,
                 erase_rewritable: bool = False,
                 timeout: float = 120.0) -> None:
        self.device = device
        self.xorriso = str(xorriso)
        self.erase_rewritable = erase_rewritable
        self.timeout = timeout
        self._info = info
        self._capabilities = capabilities

    def __repr__(self) -> str:
        return f"XorrisoDrive({self.device!r})"

    @property
    def is_pseudo_drive(self) -> bool:
        """``True`` for a ``stdio:`` pseudo-drive."""
        return self.device.startswith("stdio:")

    @property
    def readback_path(self) -> Path:
        """The path read back by :meth:`verify` (the ``stdio:`` file or ``/dev/srN``)."""
        for prefix in ("stdio:", "mmc:"):
            if self.device.startswith(prefix):
                return Path(self.device[len(prefix):])
        return Path(self.device)

    # running xorriso ------------------------------------------------------

    def _command(self, *args: str) -> list[str]:
        return [self.xorriso, "-no_rc", "-abort_on", "FAILURE", *args]

    def _env(self) -> dict[str, str]:
        env = dict(os.environ)
        env["LC_ALL"] = "C"
        return env

    def _run(self, args: Sequence[str], error: Type[DriveError]) -> str:
        """Run a short xorriso query; return its merged output or raise."""
        returncode, output = self._run_raw(args)
        if returncode != 0:
            raise classify_failure(output, self.device,
                                   capabilities=self._capabilities or frozenset(), default=error)
        return output

    def _run_raw(self, args: Sequence[str]) -> tuple[int, str]:
        """Run a short xorriso query; return its exit code and merged output."""
        try:
            completed = subprocess.run(
                self._command(*args), stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                text=True, errors="replace", timeout=self.timeout, env=self._env(), check=False)
        except FileNotFoundError as exc:
            raise DriveUnavailableError(
                f"The burning program {self.xorriso} is not installed: the drive {self.device} "
                f"cannot be used.", device=self.device, detail=str(exc)) from exc
        except subprocess.TimeoutExpired as exc:
            raise DriveUnavailableError(
                f"The drive {self.device} did not answer within {self.timeout:.0f} seconds.",
                device=self.device, detail=str(exc)) from exc
        return completed.returncode, completed.stdout

    def _toc(self) -> TocReport:
        return parse_toc(self._run(["-pkt_output", "on", "-outdev", self.device,
                                    "-toc", "-tell_media_space"], DriveUnavailableError))

    # Drive protocol -------------------------------------------------------

    @property
    def identity(self) -> DriveInfo:
        """Identity from udev if given, else from xorriso's ``Drive type`` line."""
        if self._info is None:
            report = self._toc()
            self._info = DriveInfo(device=self.device, vendor=report.vendor,
                                   model=report.product, revision=report.revision)
        return self._info

    def capabilities(self) -> frozenset[str]:
        """Writable media kinds (``{"file"}`` for a ``stdio:`` pseudo-drive)."""
        if self._capabilities is None:
            if self.is_pseudo_drive:
                self._capabilities = frozenset({FILE})
            else:
                self._capabilities = parse_profiles(self._run(
                    ["-pkt_output", "on", "-outdev", self.device, "-list_profiles", "out"],
                    DriveUnavailableError))
        return self._capabilities

    def media(self) -> MediaInfo:
        """The loaded medium, from ``-toc`` and ``-tell_media_space``."""
        return media_from_toc(self._toc())

    def write(self, image: Path, progress: Optional[ProgressCallback] = None) -> None:
        """Write *image* as one closed session; see the module docstring for the policy."""
        image = Path(image)
        if not image.is_file():
            raise FileNotFoundError(f"The image file {image} does not exist.")
        total = image.stat().st_size
        capabilities = self.capabilities()
        hint = blank_media_hint(capabilities)
        media = self.media()
        erase = False
        if not media.present:
            raise NoMediaError(f"There is no disc in {self.device}: insert {hint}.", device=self.device)
        if media.state != STATE_BLANK:
            if self.erase_rewritable and media.is_rewritable:
                erase = True
            else:
                raise MediaNotBlankError(
                    f"The disc in {self.device} is not blank: insert {hint}.", device=self.device,
                    detail=f"media state {media.state}, kind {media.kind}")
        room = media.capacity_bytes if erase else media.free_bytes
        if room is not None and total > room:
            raise MediaTooSmallError(
                f"The disc in {self.device} is too small for this export: it needs "
                f"{format_bytes(total)} but only {format_bytes(room)} are free. "
                f"Insert a disc with more space or export fewer studies.", device=self.device)

        args = ["-return_with", "SORRY", "32", "-pacifier", "interval=0.25",
                "-as", "cdrecord", "-v", f"dev={self.device}", "padsize=300k"]
        if erase:
            args.append("blank=as_needed")
        args.append(str(image))
        self._burn(args, total, capabilities, progress)

    def _burn(self, args: list[str], total: int, capabilities: frozenset[str],
              progress: Optional[ProgressCallback]) -> None:
        fraction = 0.0

        def report(phase: str, value: float, message: str) -> None:
            nonlocal fraction
            fraction = max(fraction, value)
            if progress is not None:
                progress(BurnProgress(int(total * fraction), total, fraction, phase, message))

        report(PHASE_START, 0.0, f"Preparing to write {format_bytes(total)} to {self.device}")
        output: list[str] = []
        try:
            process = subprocess.Popen(
                self._command(*args), stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                text=True, errors="replace", env=self._env())
        except FileNotFoundError as exc:
            raise DriveUnavailableError(
                f"The burning program {self.xorriso} is not installed: the drive {self.device} "
                f"cannot be used.", device=self.device, detail=str(exc)) from exc
        assert process.stdout is not None
        with process:
            try:
                for line in process.stdout:
                    line = line.rstrip()
                    output.append(line)
                    if "Beginning to write data track" in line:
                        report(PHASE_WRITE, 0.0, f"Writing to {self.device}")
                    value = parse_progress(line)
                    if value is not None:
                        # Until xorriso says it is done, the MB-granular count stays below 100 %.
                        report(PHASE_WRITE, min(value, 0.99),
                               f"Writing to {self.device}: {int(value * 100)} %")
            except BaseException:
                # The caller (e.g. its progress callback) gave up: do not leave xorriso running.
                process.kill()
                raise
            returncode = process.wait()
        text = "\n".join(output)
        succeeded = returncode == 0 and "completed successfully" in text and not _failure_lines(text)
        if not succeeded:
            raise classify_failure(text, self.device, capabilities=capabilities, image_size=total)
        report(PHASE_DONE, 1.0, f"Finished writing {format_bytes(total)} to {self.device}")

    def verify(self, image: Path, progress: Optional[ProgressCallback] = None) -> VerifyResult:
        """Check the medium with ``-check_media`` and compare it byte for byte with *image*."""
        image = Path(image)
        if not image.is_file():
            raise FileNotFoundError(f"The image file {image} does not exist.")
        media = self.media()
        if not media.present:
            raise NoMediaError(f"There is no disc in {self.device} to verify.", device=self.device)
        blocks = max(1, -(-image.stat().st_size // BLOCK_SIZE))
        returncode, output = self._run_raw(
            ["-pkt_output", "on", "-outdev", self.device, "-check_media",
             "use=outdev", "what=disc", "min_lba=0", f"max_lba={blocks - 1}", "--"])
        regions = parse_check_media(output)
        drive_problem: Optional[DriveError] = None
        if returncode != 0 or not regions:
            drive_problem = classify_failure(output, self.device, default=VerifyError)
            if isinstance(drive_problem, (DriveUnavailableError, NoMediaError)):
                raise drive_problem
        unreadable = tuple((region.lba * BLOCK_SIZE, region.blocks * BLOCK_SIZE)
                           for region in regions if region.bad and region.lba < blocks)
        try:
            with open(self.readback_path, "rb") as medium:
                result = compare_image(image, medium, device=self.device, progress=progress,
                                       extra_bad_ranges=unreadable)
        except OSError as exc:
            raise VerifyError(f"The disc in {self.device} could not be read back for verification "
                              f"({exc.strerror or exc}).", device=self.device, detail=str(exc)) from exc
        if drive_problem is not None and result.ok:
            # The bytes compared equal but the drive's own check failed: never report good.
            reason = (drive_problem.detail or "no report").splitlines()[-1]
            return VerifyResult(
                ok=False,
                message=(f"Verification failed: the drive could not check the disc in "
                         f"{self.device} ({reason}). Do not use it."),
                bytes_checked=result.bytes_checked, bad_ranges=result.bad_ranges,
                image_sha256=result.image_sha256, medium_sha256=result.medium_sha256)
        return result

    def eject(self) -> None:
        """Open the tray (``-eject all``); harmless for a ``stdio:`` pseudo-drive."""
        self._run(["-outdev", self.device, "-eject", "all"], DriveUnavailableError)

    def disc_inserted(self) -> None:
        """Nothing to do: :meth:`media` asks the drive what it holds."""
