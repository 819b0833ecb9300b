"""A "drive" that exports the image to a file.

:class:`ImageFileDrive` keeps the :class:`~hw.drive.Drive` contract for
"export to file": its medium is always present and blank (each write
replaces the file), writing copies the image with progress, and verification
compares the file with the image byte for byte.
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path
from typing import Optional

from hw.drive import (
    FILE, PHASE_DONE, PHASE_START, PHASE_WRITE, STATE_BLANK, BurnError,
    BurnProgress, DriveInfo, MediaInfo, MediaTooSmallError, NoMediaError,
    ProgressCallback, VerifyError, VerifyResult, format_bytes,
)
from hw.verify import compare_image

__all__ = ["ImageFileDrive"]

_CHUNK = 1024 * 1024


class ImageFileDrive:
    """Write images to the file *path*.

    Parameters
    ----------
    path:
        The target file; its directory must exist.
    capacity_bytes:
        Size of the pretend medium.  ``None`` means the free space of the
        file system holding *path*.
    """

    def __init__(self, path: "str | os.PathLike[str]", *,
                 capacity_bytes: Optional[int] = None) -> None:
        self.path = Path(path)
        self.capacity_bytes = capacity_bytes

    def __repr__(self) -> str:
        return f"ImageFileDrive({str(self.path)!r})"

    @property
    def identity(self) -> DriveInfo:
        """A file "drive": device is the target path."""
        return DriveInfo(device=str(self.path), vendor="modality_link", model="image file export")

    def capabilities(self) -> frozenset[str]:
        """Only the ``"file"`` kind."""
        return frozenset({FILE})

    def _capacity(self) -> Optional[int]:
        if self.capacity_bytes is not None:
            return self.capacity_bytes
        try:
            usage = shutil.disk_usage(self.path.parent)
        except OSError:
            return None
        existing = self.path.stat().st_size if self.path.is_file() else 0
        return usage.free + existing

    def media(self) -> MediaInfo:
        """Always a blank ``"file"`` medium (a write replaces the file)."""
        capacity = self._capacity()
        return MediaInfo(present=True, kind=FILE, state=STATE_BLANK,
                         capacity_bytes=capacity, free_bytes=capacity, sessions=0)

    def write(self, image: Path, progress: Optional[ProgressCallback] = None) -> None:
        """Copy *image* to the target file (via a temporary file, then rename)."""
        image = Path(image)
        if not image.is_file():
            raise FileNotFoundError(f"The image file {image} does not exist.")
        total = image.stat().st_size
        capacity = self._capacity()
        if capacity is not None and total > capacity:
            raise MediaTooSmallError(
                f"There is not enough space for the export file {self.path}: it needs "
                f"{format_bytes(total)} but only {format_bytes(capacity)} are available.",
                device=str(self.path))

        def report(done: int, phase: str, message: str) -> None:
            if progress is not None:
                fraction = 1.0 if phase == PHASE_DONE or total == 0 else min(done / total, 0.99)
                progress(BurnProgress(done, total, fraction, phase, message))

        report(0, PHASE_START, f"Exporting {format_bytes(total)} to {self.path}")
        partial = self.path.with_name(self.path.name + ".part")
        done = 0
        try:
            with open(image, "rb") as source, open(partial, "wb") as target:
                while chunk := source.read(_CHUNK):
                    target.write(chunk)
                    done += len(chunk)
                    report(done, PHASE_WRITE, f"Exported {format_bytes(done)} of {format_bytes(total)}")
                target.flush()
                os.fsync(target.fileno())
            os.replace(partial, self.path)
        except OSError as exc:
            partial.unlink(missing_ok=True)
            raise BurnError(f"Exporting to the file {self.path} failed ({exc.strerror or exc}).",
                            device=str(self.path), detail=str(exc)) from exc
        report(total, PHASE_DONE, f"Exported {format_bytes(total)} to {self.path}")

    def verify(self, image: Path, progress: Optional[ProgressCallback] = None) -> VerifyResult:
        """Compare the exported file with *image*."""
        image = Path(image)
        if not image.is_file():
            raise FileNotFoundError(f"The image file {image} does not exist.")
        if not self.path.is_file():
            raise NoMediaError(f"The export file {self.path} does not exist: nothing to verify.",
                               device=str(self.path))
        try:
            with open(self.path, "rb") as medium:
                return compare_image(image, medium, device=str(self.path), progress=progress,
                                     medium_name=f"the export file {self.path}")
        except OSError as exc:
            raise VerifyError(f"The export file {self.path} could not be read back "
                              f"({exc.strerror or exc}).", device=str(self.path),
                              detail=str(exc)) from exc

    def eject(self) -> None:
        """Nothing to eject."""

    @property
    def readback_path(self) -> Path:
        """The export file."""
        return self.path

    def disc_inserted(self) -> None:
        """Nothing to do: the "medium" is always there."""
