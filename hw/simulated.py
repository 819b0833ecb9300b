"""A simulated optical drive for the demo and for tests.

:class:`SimulatedDrive` behaves like a burner with a write-once disc: a blank
disc is written once and becomes "complete"; writing again raises
:class:`~hw.drive.MediaNotBlankError`.  The written bytes are kept in a
spooled temporary file (memory first, disk for large images), so
verification really compares bytes.

Fault injection knobs (constructor arguments, also plain attributes that may
be changed at any time):

* ``present=False``            – no disc (:class:`~hw.drive.NoMediaError`);
* ``state="complete"``         – disc not blank (:class:`~hw.drive.MediaNotBlankError`);
* ``capacity_bytes=N``         – small disc (:class:`~hw.drive.MediaTooSmallError`);
* ``fail_at=0.5``              – write error after 50 % (:class:`~hw.drive.BurnError`,
  the disc is then ruined: "complete" with partial data);
* ``corrupt_on_write=True``    – one byte is silently altered, so :meth:`verify` fails;
* ``bytes_per_second=N``       – pace writing like a real drive (demo).
"""

from __future__ import annotations

import tempfile
import threading
import time
from pathlib import Path
from typing import IO, Optional

from hw.drive import (
    CD_R, CD_RW, DVD_PLUS_R, DVD_PLUS_RW, DVD_R, DVD_RW, PHASE_DONE,
    PHASE_START, PHASE_WRITE, STATE_BLANK, STATE_COMPLETE, STATE_NONE,
    BurnError, BurnProgress, DriveInfo, MediaInfo, MediaNotBlankError,
    MediaTooSmallError, NoMediaError, ProgressCallback, VerifyResult,
    blank_media_hint, format_bytes,
)
from hw.verify import compare_image

__all__ = ["SimulatedDrive", "CD_R_CAPACITY", "DVD_R_CAPACITY"]

#: Capacity of an 80 minute CD-R (360 000 sectors of 2048 bytes).
CD_R_CAPACITY = 737_280_000
#: Capacity of a single layer DVD-R (2 298 496 sectors of 2048 bytes).
DVD_R_CAPACITY = 4_707_319_808

_DEFAULT_CAPABILITIES = frozenset({CD_R, CD_RW, DVD_R, DVD_RW, DVD_PLUS_R, DVD_PLUS_RW})
_CHUNK = 256 * 1024
_SPOOL_LIMIT = 64 * 1024 * 1024


class SimulatedDrive:
    """An in-memory burner with fault injection; see the module docstring.

    Parameters
    ----------
    device:
        Device name used in messages.
    kind:
        Kind of the loaded disc.
    state:
        Initial disc state (``"blank"``, ``"appendable"``, ``"complete"``).
    capacity_bytes:
        Size of the disc.
    present:
        ``False`` for an empty drive.
    fail_at:
        Fraction (0..1) of the image after which writing fails, or ``None``.
    corrupt_on_write:
        Alter one written byte so that verification fails.
    bytes_per_second:
        Simulated write speed, ``None`` for as fast as possible.
    capabilities:
        Writable media kinds of the simulated drive.
    """

    def __init__(self, device: str = "sim:0", *, kind: str = CD_R, state: str = STATE_BLANK,
                 capacity_bytes: int = CD_R_CAPACITY, present: bool = True,
                 fail_at: Optional[float] = None, corrupt_on_write: bool = False,
                 bytes_per_second: Optional[float] = None,
                 capabilities: frozenset[str] = _DEFAULT_CAPABILITIES) -> None:
        self.device = device
        self.kind = kind
        self.state = state if present else STATE_NONE
        self.capacity_bytes = capacity_bytes
        self.present = present
        self.fail_at = fail_at
        self.corrupt_on_write = corrupt_on_write
        self.bytes_per_second = bytes_per_second
        self._capabilities = frozenset(capabilities)
        self._data: Optional[IO[bytes]] = None
        self._written = 0
        self._lock = threading.RLock()
        self.ejected = False

    def __repr__(self) -> str:
        return f"SimulatedDrive({self.device!r}, kind={self.kind!r}, state={self.state!r})"

    # test / demo helpers ---------------------------------------------------

    def insert(self, kind: str = CD_R, *, state: str = STATE_BLANK,
               capacity_bytes: Optional[int] = None) -> None:
        """Load a new disc (discarding the old one)."""
        with self._lock:
            self._discard()
            self.present = True
            self.ejected = False
            self.kind = kind
            self.state = state
            if capacity_bytes is not None:
                self.capacity_bytes = capacity_bytes

    def corrupt(self, offset: int) -> None:
        """Flip all bits of the written byte at *offset* (simulated disc damage)."""
        with self._lock:
            if self._data is None or not 0 <= offset < self._written:
                raise IndexError(f"offset {offset} is outside the written data")
            self._data.seek(offset)
            value = self._data.read(1)[0]
            self._data.seek(offset)
            self._data.write(bytes([value ^ 0xFF]))

    @property
    def written_bytes(self) -> int:
        """Number of bytes on the current disc."""
        return self._written

    def _discard(self) -> None:
        if self._data is not None:
            self._data.close()
        self._data = None
        self._written = 0

    # Drive protocol -------------------------------------------------------

    @property
    def identity(self) -> DriveInfo:
        """A made-up drive identity."""
        return DriveInfo(device=self.device, vendor="modality_link", model="Simulated burner",
                         revision="1.0", serial="SIM0001")

    def capabilities(self) -> frozenset[str]:
        """The configured writable kinds."""
        return self._capabilities

    def media(self) -> MediaInfo:
        """The simulated disc."""
        with self._lock:
            if not self.present:
                return MediaInfo.absent()
            used = self._written
            free = 0 if self.state == STATE_COMPLETE else max(0, self.capacity_bytes - used)
            return MediaInfo(present=True, kind=self.kind, state=self.state,
                             capacity_bytes=self.capacity_bytes, free_bytes=free,
                             sessions=0 if self.state == STATE_BLANK else 1,
                             track_count=0 if self.state == STATE_BLANK else 1)

    def write(self, image: Path, progress: Optional[ProgressCallback] = None) -> None:
        """Write *image* to the blank simulated disc, closing it."""
        image = Path(image)
        if not image.is_file():
            raise FileNotFoundError(f"The image file {image} does not exist.")
        total = image.stat().st_size
        hint = blank_media_hint(self._capabilities)
        with self._lock:
            if not self.present:
                raise NoMediaError(f"There is no disc in {self.device}: insert {hint}.",
                                   device=self.device)
            if self.state != STATE_BLANK:
                raise MediaNotBlankError(f"The disc in {self.device} is not blank: insert {hint}.",
                                         device=self.device, detail=f"media state {self.state}")
            if total > self.capacity_bytes:
                raise MediaTooSmallError(
                    f"The disc in {self.device} is too small for this export: it needs "
                    f"{format_bytes(total)} but only {format_bytes(self.capacity_bytes)} are free. "
                    f"Insert a disc with more space or export fewer studies.", device=self.device)

            def report(done: int, phase: str, message: str) -> None:
                if progress is not None:
                    fraction = 1.0 if phase == PHASE_DONE or total == 0 else min(done / total, 0.99)
                    progress(BurnProgress(done, total, fraction, phase, message))

            report(0, PHASE_START, f"Preparing to write {format_bytes(total)} to {self.device}")
            self._discard()
            self._data = tempfile.SpooledTemporaryFile(max_size=_SPOOL_LIMIT)
            fail_after = None if self.fail_at is None else int(total * self.fail_at)
            done = 0
            with open(image, "rb") as source:
                while chunk := source.read(_CHUNK):
                    if fail_after is not None and done + len(chunk) > fail_after:
                        self._data.write(chunk[:max(0, fail_after - done)])
                        self._written = fail_after
                        self.state = STATE_COMPLETE  # a failed burn ruins a write-once disc
                        raise BurnError(
                            f"Writing the disc in {self.device} failed at "
                            f"{int(100 * fail_after / max(total, 1))} % (simulated write error). "
                            f"The disc is unusable: insert {hint} and try again.",
                            device=self.device, detail="simulated write error")
                    self._data.write(chunk)
                    done += len(chunk)
                    self._written = done
                    if self.bytes_per_second:
                        time.sleep(len(chunk) / self.bytes_per_second)
                    report(done, PHASE_WRITE, f"Writing to {self.device}: {int(100 * done / total)} %")
            if self.corrupt_on_write and total:
                self.corrupt(total // 2)
            self.state = STATE_COMPLETE
            report(total, PHASE_DONE, f"Finished writing {format_bytes(total)} to {self.device}")

    def verify(self, image: Path, progress: Optional[ProgressCallback] = None) -> VerifyResult:
        """Compare the simulated disc with *image*."""
        image = Path(image)
        if not image.is_file():
            raise FileNotFoundError(f"The image file {image} does not exist.")
        with self._lock:
            if not self.present:
                raise NoMediaError(f"There is no disc in {self.device} to verify.", device=self.device)
            medium = self._data
            if medium is None:
                medium = tempfile.SpooledTemporaryFile()
            medium.seek(0)
            return compare_image(image, _Limited(medium, self._written), device=self.device,
                                 progress=progress)

    def eject(self) -> None:
        """Remove the disc (like taking it out of the opened tray)."""
        with self._lock:
            self._discard()
            self.present = False
            self.state = STATE_NONE
            self.ejected = True

    @property
    def readback_path(self) -> None:
        """The simulated disc is not a file."""
        return None

    def disc_inserted(self) -> None:
        """Load a blank CD-R, as the technologist says (see :meth:`insert`)."""
        self.insert()


class _Limited:
    """A read-only view of the first *limit* bytes of a stream."""

    def __init__(self, stream: IO[bytes], limit: int) -> None:
        self._stream = stream
        self._left = limit

    def read(self, size: int = -1) -> bytes:
        if size < 0 or size > self._left:
            size = self._left
        data = self._stream.read(size)
        self._left -= len(data)
        return data
