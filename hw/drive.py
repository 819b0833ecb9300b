"""The optical drive contract: the ``Drive`` protocol, its data types and errors.

Everything that burns or exports a DICOM media image (a real burner driven by
xorriso, an image file, a simulated drive) implements :class:`Drive`.  Callers
only ever see this module's types, so they never depend on a particular
backend.

Vocabulary
----------
*Media kinds* are short strings such as ``"CD-R"`` or ``"DVD+RW"`` (see the
``CD_R`` ... ``BD_RE`` constants); ``"file"`` (:data:`FILE`) is the kind of a
medium that is really a regular file (an image-file export or xorriso's
``stdio:`` pseudo-drive).

*Media states* are ``"none"`` (no medium), ``"blank"``, ``"appendable"`` (data
present, more sessions may follow) and ``"complete"`` (closed, nothing more
can be written).

Policy for writing
------------------
Export discs are written as a single, closed session.  A backend refuses to
write to a medium whose state is not ``"blank"`` (:class:`MediaNotBlankError`);
it never appends to a disc that already holds data.  Backends that can erase
rewritable media offer that as an explicit opt-in.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Optional, Protocol, runtime_checkable

__all__ = [
    "BD_R", "BD_RE", "CD_R", "CD_RW", "DVD_PLUS_R", "DVD_PLUS_R_DL",
    "DVD_PLUS_RW", "DVD_R", "DVD_RAM", "DVD_RW", "DVD_R_DL", "FILE",
    "WRITE_ONCE_KINDS", "REWRITABLE_KINDS", "MEDIA_STATES",
    "STATE_NONE", "STATE_BLANK", "STATE_APPENDABLE", "STATE_COMPLETE",
    "PHASE_START", "PHASE_WRITE", "PHASE_VERIFY", "PHASE_DONE",
    "DriveInfo", "MediaInfo", "BurnProgress", "VerifyResult",
    "ProgressCallback", "Drive",
    "DriveError", "DriveUnavailableError", "NoMediaError",
    "MediaNotBlankError", "MediaTooSmallError", "BurnError", "VerifyError",
    "blank_media_hint", "format_bytes",
]

# Media kinds -----------------------------------------------------------------
CD_R = "CD-R"
CD_RW = "CD-RW"
DVD_R = "DVD-R"
DVD_RW = "DVD-RW"
DVD_R_DL = "DVD-R DL"
DVD_PLUS_R = "DVD+R"
DVD_PLUS_RW = "DVD+RW"
DVD_PLUS_R_DL = "DVD+R DL"
DVD_RAM = "DVD-RAM"
BD_R = "BD-R"
BD_RE = "BD-RE"
#: A "medium" that is a regular file (image export, xorriso ``stdio:`` drive).
FILE = "file"

#: Writable kinds that can be written only once (preferred for export).
WRITE_ONCE_KINDS: tuple[str, ...] = (CD_R, DVD_R, DVD_PLUS_R, DVD_R_DL, DVD_PLUS_R_DL, BD_R)
#: Writable kinds that can be erased and written again.
REWRITABLE_KINDS: tuple[str, ...] = (CD_RW, DVD_RW, DVD_PLUS_RW, DVD_RAM, BD_RE, FILE)

# Media states ----------------------------------------------------------------
STATE_NONE = "none"
STATE_BLANK = "blank"
STATE_APPENDABLE = "appendable"
STATE_COMPLETE = "complete"
MEDIA_STATES: tuple[str, ...] = (STATE_NONE, STATE_BLANK, STATE_APPENDABLE, STATE_COMPLETE)

# Progress phases -------------------------------------------------------------
PHASE_START = "start"
PHASE_WRITE = "write"
PHASE_VERIFY = "verify"
PHASE_DONE = "done"


@dataclass(frozen=True)
class DriveInfo:
    """Identity of a drive.

    Attributes
    ----------
    device:
        The address used to open the drive, e.g. ``"/dev/sr0"``,
        ``"stdio:/tmp/disc.iso"`` or ``"sim:0"``.
    vendor, model:
        As reported by the drive (empty string if unknown).
    revision:
        Firmware revision, or ``None`` if unknown.
    serial:
        Serial number, or ``None`` if unknown.
    """

    device: str
    vendor: str = ""
    model: str = ""
    revision: Optional[str] = None
    serial: Optional[str] = None

    @property
    def description(self) -> str:
        """A short human readable name, e.g. ``"HL-DT-ST DVDRAM GH24NSD1 (/dev/sr0)"``."""
        name = " ".join(part for part in (self.vendor, self.model) if part)
        return f"{name} ({self.device})" if name else self.device


@dataclass(frozen=True)
class MediaInfo:
    """The medium currently in a drive.

    Attributes
    ----------
    present:
        ``True`` if a medium is loaded.
    kind:
        Media kind (``"CD-R"``, ``"DVD+RW"``, ``"file"`` ...), ``None`` if
        unknown or no medium.
    state:
        One of :data:`MEDIA_STATES`.
    capacity_bytes:
        Total recordable size of the medium, ``None`` if unknown.
    free_bytes:
        Bytes that can still be written, ``None`` if unknown.
    sessions, track_count:
        Number of sessions / tracks on the medium, ``None`` if unknown.
    """

    present: bool
    kind: Optional[str] = None
    state: str = STATE_NONE
    capacity_bytes: Optional[int] = None
    free_bytes: Optional[int] = None
    sessions: Optional[int] = None
    track_count: Optional[int] = None

    def __post_init__(self) -> None:
        if self.state not in MEDIA_STATES:
            raise ValueError(f"unknown media state {self.state!r}")
        if not self.present and self.state != STATE_NONE:
            raise ValueError("a missing medium must have state 'none'")

    @property
    def is_blank(self) -> bool:
        """``True`` if a blank medium is loaded."""
        return self.present and self.state == STATE_BLANK

    @property
    def is_rewritable(self) -> bool:
        """``True`` if the medium can be erased and written again."""
        return self.kind in REWRITABLE_KINDS

    @classmethod
    def absent(cls) -> "MediaInfo":
        """The :class:`MediaInfo` of an empty drive."""
        return cls(present=False)


@dataclass(frozen=True)
class BurnProgress:
    """A progress report during :meth:`Drive.write` or :meth:`Drive.verify`.

    ``fraction`` runs from 0.0 to 1.0 and never decreases within one
    operation; ``phase`` is one of ``"start"``, ``"write"``, ``"verify"``,
    ``"done"``; ``message`` is a short sentence for display.
    """

    bytes_done: int
    bytes_total: int
    fraction: float
    phase: str
    message: str = ""


#: The type of the progress callbacks taken by :meth:`Drive.write` and :meth:`Drive.verify`.
ProgressCallback = Callable[[BurnProgress], None]


@dataclass(frozen=True)
class VerifyResult:
    """Outcome of a read-back verification.

    Attributes
    ----------
    ok:
        ``True`` only if every byte of the image was read back identically
        (and the drive reported no unreadable blocks).
    message:
        A sentence for the technologist.
    bytes_checked:
        Number of image bytes compared.
    bad_ranges:
        ``(offset, length)`` byte ranges of the image that were unreadable or
        different on the medium, merged and sorted.
    image_sha256, medium_sha256:
        SHA-256 of the image and of the same number of bytes read back from
        the medium (``medium_sha256`` is ``None`` if the medium could not be
        read completely).
    """

    ok: bool
    message: str
    bytes_checked: int = 0
    bad_ranges: tuple[tuple[int, int], ...] = field(default_factory=tuple)
    image_sha256: Optional[str] = None
    medium_sha256: Optional[str] = None

    def raise_for_failure(self, device: str = "") -> None:
        """Raise :class:`VerifyError` if the verification failed."""
        if not self.ok:
            raise VerifyError(self.message, device=device or None, result=self)


@runtime_checkable
class Drive(Protocol):
    """What the rest of the system may do with a drive.

    All methods raise :class:`DriveError` subclasses with messages meant for
    the technologist at the console.
    """

    @property
    def identity(self) -> DriveInfo:
        """Who the drive is (device path, vendor, model ...)."""
        ...

    def capabilities(self) -> frozenset[str]:
        """The media kinds this drive can write (e.g. ``{"CD-R", "DVD-R"}``)."""
        ...

    def media(self) -> MediaInfo:
        """Describe the medium currently loaded."""
        ...

    def write(self, image: Path, progress: Optional[ProgressCallback] = None) -> None:
        """Write *image* (an ISO 9660 file) to the blank medium as one closed session.

        Raises :class:`NoMediaError`, :class:`MediaNotBlankError`,
        :class:`MediaTooSmallError`, :class:`BurnError` or
        :class:`DriveUnavailableError`.
        """
        ...

    def verify(self, image: Path, progress: Optional[ProgressCallback] = None) -> VerifyResult:
        """Read the medium back and compare it with *image*.

        A difference is reported as ``VerifyResult(ok=False, ...)``, never as
        success.  Raises :class:`NoMediaError` or :class:`VerifyError` if the
        comparison cannot be carried out at all.
        """
        ...

    def eject(self) -> None:
        """Open the tray (a no-op for drives without one)."""
        ...

    @property
    def readback_path(self) -> Optional[Path]:
        """Where the written medium can be read back as a file (an image file, a ``stdio:``
        file, ``/dev/srN``), so that its ISO 9660 volume can be checked file by file; ``None``
        for a drive whose medium is not a file."""
        ...

    def disc_inserted(self) -> None:
        """The technologist says a new disc is in the drive, after being asked for one.

        A drive that senses its medium does nothing; one that cannot (the simulated drive)
        takes the word for it and holds a blank disc from now on.
        """
        ...


# Errors ----------------------------------------------------------------------


class DriveError(Exception):
    """Base class of all drive errors.

    ``str(error)`` is a complete sentence suitable for the console; ``device``
    names the drive and ``detail`` keeps the raw tool output (for the log).
    """

    def __init__(self, message: str, *, device: Optional[str] = None,
                 detail: Optional[str] = None) -> None:
        super().__init__(message)
        self.message = message
        self.device = device
        self.detail = detail


class DriveUnavailableError(DriveError):
    """The drive cannot be opened (missing, busy, no permission)."""


class NoMediaError(DriveError):
    """There is no medium in the drive."""


class MediaNotBlankError(DriveError):
    """The medium already holds data."""


class MediaTooSmallError(DriveError):
    """The image does not fit on the medium."""


class BurnError(DriveError):
    """Writing failed."""


class VerifyError(DriveError):
    """Read-back verification failed or could not be carried out."""

    def __init__(self, message: str, *, device: Optional[str] = None,
                 detail: Optional[str] = None,
                 result: Optional[VerifyResult] = None) -> None:
        super().__init__(message, device=device, detail=detail)
        self.result = result


# Helpers for messages --------------------------------------------------------


def format_bytes(count: int) -> str:
    """Format a byte count for people: ``format_bytes(737280000) == "737.3 MB"``."""
    value = float(count)
    for unit in ("bytes", "kB", "MB", "GB", "TB"):
        if value < 1000 or unit == "TB":
            return f"{int(value)} bytes" if unit == "bytes" else f"{value:.1f} {unit}"
        value /= 1000
    raise AssertionError("unreachable")


def blank_media_hint(capabilities: frozenset[str]) -> str:
    """Name the blank media a technologist should insert, e.g. ``"a blank CD-R or DVD-R"``.

    Prefers write-once kinds the drive supports; at most two are named.
    """
    kinds = [kind for kind in WRITE_ONCE_KINDS if kind in capabilities][:2]
    if not kinds:
        kinds = [kind for kind in REWRITABLE_KINDS if kind in capabilities and kind != FILE][:2]
    if not kinds:
        return "a blank disc"
    return "a blank " + " or ".join(kinds)
