"""hw: the optical drive hardware abstraction layer.

A standalone layer (it never imports ``modality_link``).  Everything that can
receive a DICOM media image implements the :class:`~hw.drive.Drive`
protocol:

* :class:`~hw.xorriso.XorrisoDrive` – a real burner (or xorriso ``stdio:`` pseudo-drive);
* :class:`~hw.imagefile.ImageFileDrive` – export to an image file;
* :class:`~hw.simulated.SimulatedDrive` – a simulated burner with fault injection.

:func:`open_drive` opens a drive by its configured name; :func:`discover`
finds the optical drives known to udev.

Typical use::

    import hw
    for drive in hw.discover():
        media = drive.media()
        if media.is_blank:
            drive.write(image, progress=print)
            drive.verify(image).raise_for_failure(drive.identity.device)
"""

from __future__ import annotations

import os
from typing import Optional

from hw.drive import (
    MEDIA_STATES, STATE_APPENDABLE, STATE_BLANK, STATE_COMPLETE, STATE_NONE,
    BurnError, BurnProgress, Drive, DriveError, DriveInfo,
    DriveUnavailableError, MediaInfo, MediaNotBlankError, MediaTooSmallError,
    NoMediaError, ProgressCallback, VerifyError, VerifyResult,
)
from hw.imagefile import ImageFileDrive
from hw.simulated import SimulatedDrive
from hw.udev import (
    DriveSnapshot, MediaEvent, Probe, RecordedProbe, UdevProbe,
    find_optical_drives,
)
from hw.xorriso import DEFAULT_XORRISO, XorrisoDrive

__all__ = [
    "Drive", "DriveInfo", "MediaInfo", "BurnProgress", "VerifyResult", "ProgressCallback",
    "MEDIA_STATES", "STATE_NONE", "STATE_BLANK", "STATE_APPENDABLE", "STATE_COMPLETE",
    "DriveError", "DriveUnavailableError", "NoMediaError", "MediaNotBlankError",
    "MediaTooSmallError", "BurnError", "VerifyError",
    "XorrisoDrive", "ImageFileDrive", "SimulatedDrive", "DEFAULT_XORRISO",
    "Probe", "UdevProbe", "RecordedProbe", "DriveSnapshot", "MediaEvent",
    "find_optical_drives", "discover", "open_drive", "SIM_SLOW_BYTES_PER_SECOND",
]

#: Write speed of the ``sim:slow`` drive: a 4x CD (4 x 150 KiB/s), to watch a burn run.
SIM_SLOW_BYTES_PER_SECOND = 4 * 150 * 1024


def open_drive(name: str, *, xorriso: "str | os.PathLike[str]" = DEFAULT_XORRISO) -> Drive:
    """The drive called `name` in the configuration or a burn request.

    * ``/dev/srN`` – an optical drive, and ``stdio:PATH`` – xorriso's pseudo-drive writing the
      file PATH: :class:`XorrisoDrive`;
    * ``sim:NAME`` – a :class:`SimulatedDrive` holding a blank CD-R; ``sim:corrupt`` damages
      what it writes (so verification fails), ``sim:slow`` writes at 4x CD speed.

    Raises :class:`ValueError` for any other name.
    """
    if name.startswith("sim:"):
        speed = SIM_SLOW_BYTES_PER_SECOND if name == "sim:slow" else None
        return SimulatedDrive(name, corrupt_on_write=name == "sim:corrupt", bytes_per_second=speed)
    if name.startswith(("stdio:", "/dev/")):
        return XorrisoDrive(name, xorriso=xorriso)
    raise ValueError(f"unknown drive {name!r}: give /dev/srN, stdio:/path or sim:NAME")


def discover(probe: Optional[Probe] = None, *,
             xorriso: "str | os.PathLike[str]" = DEFAULT_XORRISO) -> list[XorrisoDrive]:
    """The optical drives known to udev, as :class:`XorrisoDrive` objects.

    Parameters
    ----------
    probe:
        Where to look; the real udev database (:class:`UdevProbe`) by default.
    xorriso:
        Path of the xorriso executable used by the returned drives.

    Identity and capabilities come from udev; media state is asked from the
    drive (xorriso) whenever :meth:`XorrisoDrive.media` is called.
    """
    if probe is None:
        probe = UdevProbe()
    return [XorrisoDrive(snapshot.info.device, xorriso=xorriso, info=snapshot.info,
                         capabilities=snapshot.capabilities)
            for snapshot in find_optical_drives(probe)]
