"""The Drive contract, run over every backend, plus backend specific knobs."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import pytest

import hw
from hw.drive import CD_R, DVD_R
from tests.support.discs import flip_byte, make_iso
from tests.support.tools import require_tool


@dataclass
class Backend:
    drive: hw.Drive
    corrupt: Callable[[int], None]
    write_once: bool  # a second write must raise MediaNotBlankError
    readable: bool = True  # the medium can be read back as a file (readback_path)


def _xorriso(tmp_path: Path) -> Backend:
    target = tmp_path / "pseudo-drive.iso"
    drive = hw.XorrisoDrive(f"stdio:{target}", xorriso=require_tool("xorriso"))
    return Backend(drive, lambda offset: flip_byte(target, offset), write_once=True)


def _imagefile(tmp_path: Path) -> Backend:
    target = tmp_path / "export.iso"
    return Backend(hw.ImageFileDrive(target), lambda offset: flip_byte(target, offset),
                   write_once=False)


def _simulated(tmp_path: Path) -> Backend:
    drive = hw.SimulatedDrive()
    return Backend(drive, drive.corrupt, write_once=True, readable=False)


BACKENDS = {"xorriso": _xorriso, "imagefile": _imagefile, "simulated": _simulated}


@pytest.fixture(params=sorted(BACKENDS))
def backend(request, tmp_path) -> Backend:
    return BACKENDS[request.param](tmp_path)


@pytest.fixture
def image(tmp_path) -> Path:
    return make_iso(tmp_path / "image.iso", size=2_000_000)


def test_is_a_drive(backend):
    drive = backend.drive
    assert isinstance(drive, hw.Drive)
    assert isinstance(drive.identity, hw.DriveInfo) and drive.identity.device
    assert drive.capabilities()


def test_starts_blank(backend):
    media = backend.drive.media()
    assert media.present and media.is_blank
    assert media.free_bytes is None or media.free_bytes > 0


def test_write_verify_corrupt(backend, image):
    drive = backend.drive
    events: list[hw.BurnProgress] = []
    drive.write(image, events.append)
    size = image.stat().st_size
    assert events[0].phase == "start"
    assert events[-1].phase == "done" and events[-1].fraction == 1.0
    assert all(event.bytes_total == size for event in events)
    fractions = [event.fraction for event in events]
    assert fractions == sorted(fractions) and all(0.0 <= f <= 1.0 for f in fractions)

    result = drive.verify(image)
    assert result.ok and result.bytes_checked == size and not result.bad_ranges
    assert "passed" in result.message

    backend.corrupt(size // 3)
    result = drive.verify(image)
    assert result.ok is False
    assert "does not match" in result.message
    assert len(result.bad_ranges) == 1
    offset, length = result.bad_ranges[0]
    assert offset <= size // 3 < offset + length


def test_verify_detects_wrong_image(backend, image, tmp_path):
    backend.drive.write(image)
    other = make_iso(tmp_path / "other.iso", size=2_000_000, seed=99)
    assert backend.drive.verify(other).ok is False


def test_second_write(backend, image):
    drive = backend.drive
    drive.write(image)
    if backend.write_once:
        with pytest.raises(hw.MediaNotBlankError) as info:
            drive.write(image)
        assert "is not blank" in str(info.value)
    else:
        drive.write(image)  # an export file is simply replaced
        assert drive.verify(image).ok


def test_missing_image(backend, tmp_path):
    with pytest.raises(FileNotFoundError):
        backend.drive.write(tmp_path / "nope.iso")


def test_eject(backend):
    backend.drive.eject()


def test_readback_path(backend, image):
    """Where a medium is a file, it holds the image after a write; otherwise there is none."""
    drive = backend.drive
    drive.write(image)
    path = drive.readback_path
    assert (path is not None) == backend.readable
    if path is not None:
        data = image.read_bytes()
        assert path.read_bytes()[:len(data)] == data


def test_disc_inserted(backend, image):
    """After the technologist says a disc is in, the drive holds a medium."""
    drive = backend.drive
    drive.write(image)
    drive.eject()
    drive.disc_inserted()
    assert drive.media().present


# Opening a drive by its configured name ---------------------------------------


def test_open_drive_by_name(tmp_path, image):
    assert isinstance(hw.open_drive("/dev/sr0"), hw.XorrisoDrive)
    pseudo = hw.open_drive(f"stdio:{tmp_path / 'disc.iso'}")
    assert isinstance(pseudo, hw.XorrisoDrive) and pseudo.readback_path == tmp_path / "disc.iso"
    sim = hw.open_drive("sim:bay")
    assert isinstance(sim, hw.Drive) and sim.identity.device == "sim:bay" and sim.media().is_blank
    corrupt = hw.open_drive("sim:corrupt")
    corrupt.write(image)
    assert not corrupt.verify(image).ok
    slow = hw.open_drive("sim:slow")
    assert isinstance(slow, hw.SimulatedDrive) and slow.bytes_per_second == hw.SIM_SLOW_BYTES_PER_SECOND
    with pytest.raises(ValueError, match="unknown drive 'floppy'"):
        hw.open_drive("floppy")


# SimulatedDrive fault injection ---------------------------------------------


def test_simulated_no_media(image):
    drive = hw.SimulatedDrive(present=False)
    assert drive.media() == hw.MediaInfo.absent()
    with pytest.raises(hw.NoMediaError, match="There is no disc in sim:0: insert a blank CD-R or DVD-R."):
        drive.write(image)
    with pytest.raises(hw.NoMediaError):
        drive.verify(image)


def test_simulated_not_blank(image):
    drive = hw.SimulatedDrive(state="complete")
    with pytest.raises(hw.MediaNotBlankError, match="The disc in sim:0 is not blank: insert a blank CD-R or DVD-R."):
        drive.write(image)


def test_simulated_too_small(image):
    drive = hw.SimulatedDrive(capacity_bytes=1_000_000)
    with pytest.raises(hw.MediaTooSmallError, match="too small"):
        drive.write(image)
    assert drive.media().is_blank  # nothing was written


def test_simulated_write_error(image):
    drive = hw.SimulatedDrive(fail_at=0.5)
    events: list[hw.BurnProgress] = []
    with pytest.raises(hw.BurnError, match="failed at 50 %"):
        drive.write(image, events.append)
    assert events and events[-1].fraction <= 0.5
    assert drive.media().state == "complete"  # a failed write-once disc is ruined
    assert drive.verify(image).ok is False


def test_simulated_corrupt_on_write(image):
    drive = hw.SimulatedDrive(corrupt_on_write=True)
    drive.write(image)
    result = drive.verify(image)
    assert not result.ok and "does not match" in result.message


def test_simulated_eject_and_insert(image):
    drive = hw.SimulatedDrive()
    drive.write(image)
    drive.eject()
    assert not drive.media().present
    drive.insert(DVD_R)
    media = drive.media()
    assert media.is_blank and media.kind == DVD_R
    drive.write(image)
    assert drive.verify(image).ok


def test_simulated_disc_inserted_is_blank(image):
    """The simulated drive cannot sense a disc: told one is in, it holds a blank CD-R."""
    drive = hw.SimulatedDrive()
    drive.write(image)
    drive.eject()
    drive.disc_inserted()
    media = drive.media()
    assert media.is_blank and media.kind == CD_R


def test_simulated_kinds_in_hint():
    drive = hw.SimulatedDrive(present=False, capabilities=frozenset({CD_R}))
    with pytest.raises(hw.NoMediaError, match="insert a blank CD-R."):
        drive.write(Path(__file__))


# ImageFileDrive specifics ----------------------------------------------------


def test_imagefile_capacity(tmp_path, image):
    drive = hw.ImageFileDrive(tmp_path / "export.iso", capacity_bytes=1_000)
    assert drive.media().capacity_bytes == 1_000
    with pytest.raises(hw.MediaTooSmallError):
        drive.write(image)
    assert not (tmp_path / "export.iso").exists()


def test_imagefile_verify_without_export(tmp_path, image):
    with pytest.raises(hw.NoMediaError):
        hw.ImageFileDrive(tmp_path / "export.iso").verify(image)


def test_imagefile_messages_name_the_file(tmp_path, image):
    drive = hw.ImageFileDrive(tmp_path / "export.iso")
    drive.write(image)
    assert "the export file" in drive.verify(image).message


def test_drives_are_reached_through_the_protocol():
    """Outside hw/ the service names no concrete drive class: it opens drives with
    hw.open_drive (or hw.discover) and uses only the Drive protocol."""
    root = Path(__file__).resolve().parents[1]
    concrete = ("XorrisoDrive", "ImageFileDrive", "SimulatedDrive")
    found = [f"{path.relative_to(root)}: {name}"
             for package in ("modality_link", "sim") for path in sorted((root / package).rglob("*.py"))
             for name in concrete if name in path.read_text(encoding="utf-8")]
    assert not found, found
