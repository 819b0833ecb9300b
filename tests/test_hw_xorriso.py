"""The xorriso backend: output parsing, error mapping, and real runs on ``stdio:`` pseudo-drives."""

from __future__ import annotations

import os
import textwrap
from pathlib import Path

import pytest

import hw
from hw.drive import CD_R, DVD_R, FILE
from hw.xorriso import (
    XorrisoDrive, classify_failure, kind_from_profile, media_from_toc,
    parse_check_media, parse_profiles, parse_progress, parse_toc,
)
from tests.support.discs import flip_byte, make_iso
from tests.support.tools import require_tool

# Captured output -------------------------------------------------------------

#: xorriso 1.5.4, -pkt_output on -outdev stdio:EMPTY -toc -tell_media_space
TOC_STDIO_BLANK = """\
I:1: Drive current: -outdev 'stdio:/tmp/xo/empty.iso'
I:1: Media current: stdio file, overwriteable
I:1: Media status : is blank
I:1: Media summary: 0 sessions, 0 data blocks, 0 data, 79.6g free
R:1: Drive current: -outdev 'stdio:/tmp/xo/empty.iso'
R:1: Drive access : exclusive:unrestricted
R:1: Drive type   : vendor 'YOYODYNE' product 'WARP DRIVE' revision 'FX01'
R:1: Media current: stdio file, overwriteable
R:1: Media status : is blank
R:1: Media blocks : 0 readable , 41741574 writable , 41741574 overall
R:1: Media summary: 0 sessions, 0 data blocks, 0 data, 79.6g free
R:1: Media space  : 41741542s
R:1: After commit : 41741542s
"""

#: xorriso 1.5.4, -toc of a stdio file holding one ISO session.
TOC_STDIO_WRITTEN = """\
Drive current: -outdev 'stdio:/tmp/xo/img.iso'
Drive access : exclusive:unrestricted
Drive type   : vendor 'YOYODYNE' product 'WARP DRIVE' revision 'FX01'
Media current: stdio file, overwriteable
Media status : is written , is appendable
Media blocks : 331 readable , 41681600 writable , 41681952 overall
TOC layout   : Idx ,  sbsector ,       Size , Volume Id
ISO session  :   1 ,         0 ,       331s , TEST
Media summary: 1 session, 331 data blocks,  662k data, 79.5g free
Media nwa    : 352s
"""

TOC_CD_R_BLANK = """\
Drive current: -outdev '/dev/sr0'
Drive access : exclusive:unrestricted
Drive type   : vendor 'HL-DT-ST' product 'DVDRAM GH24NSD1' revision 'LG00'
Media current: CD-R
Media product: 97m26s66f/79m59s71f , Ritek Corp
Media status : is blank
Media blocks : 0 readable , 359846 writable , 359846 overall
Media summary: 0 sessions, 0 data blocks, 0 data,  703m free
"""

TOC_DVD_R_CLOSED = """\
Drive current: -outdev '/dev/sr0'
Drive type   : vendor 'HL-DT-ST' product 'DVDRAM GH24NSD1' revision 'LG00'
Media current: DVD-R sequential recording
Media status : is written , is closed
Media blocks : 1234567 readable , 0 writable , 2298496 overall
TOC layout   : Idx ,  sbsector ,       Size , Volume Id
ISO session  :   1 ,         0 ,   1234567s , PATIENT_CD
Media summary: 1 session, 1234567 data blocks, 2411m data,     0 free
"""

TOC_NO_MEDIUM = """\
Drive current: -outdev '/dev/sr0'
Drive type   : vendor 'HL-DT-ST' product 'DVDRAM GH24NSD1' revision 'LG00'
Media current: is not present
Media status : is not present
"""

PROFILES = """\
R:1: Profile      : 0x0012 (DVD-RAM)
R:1: Profile      : 0x0011 (DVD-R sequential recording)
R:1: Profile      : 0x0014 (DVD-RW sequential recording)
R:1: Profile      : 0x0013 (DVD-RW restricted overwrite)
R:1: Profile      : 0x001A (DVD+RW)
R:1: Profile      : 0x001B (DVD+R)
R:1: Profile      : 0x002B (DVD+R/DL)
R:1: Profile      : 0x0010 (DVD-ROM)
R:1: Profile      : 0x0009 (CD-R) (current)
R:1: Profile      : 0x000A (CD-RW)
R:1: Profile      : 0x0008 (CD-ROM)
"""

CHECK_MEDIA_GOOD = """\
I:1: xorriso : UPDATE : 331 of 331 blocks read in 1 s = 0.5xD
R:1: Media checks :        lba ,       size , quality
R:1: Media region :          0 ,        331 , + good
R:1: Media region :        331 ,      19701 , 0 untested
"""

CHECK_MEDIA_BAD = """\
Media checks :        lba ,       size , quality
Media region :          0 ,     100000 , + good
Media region :     100000 ,         32 , - unreadable
Media region :     100032 ,      57122 , + good
Media region :     157154 ,          2 , - tao_end
"""

#: A stdio target limited to 256 KiB (ulimit -f), xorriso 1.5.4.
ERR_FILE_TOO_LARGE = """\
Beginning to write data track.
libburn : SORRY : Cannot write desired amount of 32768 bytes. write(2) returned -1. : File too large
xorriso : FAILURE : libburn indicates failure with writing.
xorriso : NOTE : Gave up -outdev ''
xorriso : FAILURE : -as cdrecord: Job could not be performed properly.
xorriso : aborting : -abort_on 'FAILURE' encountered 'FAILURE'
"""

ERR_NO_DRIVE = """\
libburn : FAILURE : File object '/dev/sr0' not found
libburn : FAILURE : Cannot access '/dev/sr0' as SG_IO CDROM drive
xorriso : FAILURE : Cannot acquire drive '/dev/sr0'
xorriso : aborting : -abort_on 'FAILURE' encountered 'FAILURE'
"""

ERR_NO_DIR = """\
libburn : SORRY : Neither stdio-path nor its directory exist
xorriso : FAILURE : Cannot acquire drive 'stdio:/nonexistent/x.iso'
xorriso : FAILURE : -as cdrecord: Job could not be performed properly.
"""

ERR_CLOSED = """\
xorriso : FAILURE : Closed media with data detected. Need blank or appendable media.
xorriso : FAILURE : -as cdrecord: Job could not be performed properly.
"""

ERR_IMAGE_TOO_BIG = """\
xorriso : FAILURE : Image size 400000s exceeds free space on media 359846s
xorriso : FAILURE : -as cdrecord: Job could not be performed properly.
"""

ERR_NO_MEDIA = """\
libburn : SORRY : No media detected in drive
xorriso : FAILURE : -as cdrecord: Job could not be performed properly.
"""

ERR_WRITE = """\
libburn : FAILURE : SCSI error on write(16976,16): [3 0C 00] Write error.
xorriso : FAILURE : libburn indicates failure with writing.
"""


# Parsing ---------------------------------------------------------------------


def test_toc_of_empty_stdio_file_is_blank():
    report = parse_toc(TOC_STDIO_BLANK)
    assert (report.vendor, report.product, report.revision) == ("YOYODYNE", "WARP DRIVE", "FX01")
    media = media_from_toc(report)
    assert media.present and media.state == "blank" and media.kind == FILE
    assert media.free_bytes == 41741574 * 2048
    assert media.sessions == 0


def test_toc_of_written_stdio_file_is_appendable():
    media = media_from_toc(parse_toc(TOC_STDIO_WRITTEN))
    assert media.state == "appendable"
    assert media.sessions == 1


def test_toc_real_drive_states():
    blank = media_from_toc(parse_toc(TOC_CD_R_BLANK))
    assert (blank.kind, blank.state, blank.capacity_bytes) == (CD_R, "blank", 359846 * 2048)
    closed = media_from_toc(parse_toc(TOC_DVD_R_CLOSED))
    assert (closed.kind, closed.state, closed.free_bytes) == (DVD_R, "complete", 0)
    absent = media_from_toc(parse_toc(TOC_NO_MEDIUM))
    assert not absent.present and absent.state == "none"
    assert not media_from_toc(parse_toc("")).present


def test_profiles():
    kinds = parse_profiles(PROFILES)
    assert kinds == {"DVD-RAM", "DVD-R", "DVD-RW", "DVD+RW", "DVD+R", "DVD+R DL", "CD-R", "CD-RW"}
    assert kind_from_profile("BD-R sequential recording") == "BD-R"
    assert kind_from_profile("stdio file, overwriteable") == FILE


@pytest.mark.parametrize("line, fraction", [
    ("xorriso : UPDATE :   13 of   39 MB written (fifo 99%) [buf  50%]  53.7x.", 13 / 39),
    ("xorriso : UPDATE :    0 of    1 MB written [buf  50%]", 0.0),
    ("xorriso : UPDATE : Writing: sector 500 of 1000  [fifo active, 99% fill]", 0.5),
    ("Track 01:   20 of   40 MB written (fifo 100%) [buf  99%]   8.0x.", 0.5),
    ("xorriso : UPDATE :  50.91% done, estimate finish Thu Aug 01 22:57:33 2024", 0.5091),
    ("Beginning to write data track.", None),
])
def test_progress_lines(line, fraction):
    result = parse_progress(line)
    assert result == pytest.approx(fraction) if fraction is not None else result is None


def test_check_media_regions():
    good = parse_check_media(CHECK_MEDIA_GOOD)
    assert [(r.lba, r.blocks, r.bad) for r in good] == [(0, 331, False), (331, 19701, False)]
    bad = parse_check_media(CHECK_MEDIA_BAD)
    assert [r.lba for r in bad if r.bad] == [100000]  # tao_end is not damage


# Error mapping ---------------------------------------------------------------


@pytest.mark.parametrize("text, error, words", [
    (ERR_FILE_TOO_LARGE, hw.MediaTooSmallError, "too small"),
    (ERR_IMAGE_TOO_BIG, hw.MediaTooSmallError, "too small"),
    (ERR_CLOSED, hw.MediaNotBlankError, "is not blank: insert a blank CD-R or DVD-R"),
    (ERR_NO_MEDIA, hw.NoMediaError, "There is no disc in /dev/sr0"),
    (ERR_NO_DRIVE, hw.DriveUnavailableError, "cannot be opened"),
    (ERR_NO_DIR, hw.DriveUnavailableError, "cannot be opened"),
    (ERR_WRITE, hw.BurnError, "Writing the disc in /dev/sr0 failed"),
])
def test_error_mapping(text, error, words):
    exc = classify_failure(text, "/dev/sr0", capabilities=frozenset({CD_R, DVD_R}))
    assert type(exc) is error
    assert words in str(exc)
    assert str(exc).endswith(".")
    assert exc.device == "/dev/sr0"
    assert "aborting" not in (exc.detail or "")


def test_error_mapping_default_class():
    exc = classify_failure("xorriso : FAILURE : something odd", "/dev/sr0", default=hw.VerifyError)
    assert isinstance(exc, hw.VerifyError)
    assert "something odd" in str(exc)


# Real runs on stdio: pseudo-drives --------------------------------------------


@pytest.fixture
def xorriso() -> str:
    return require_tool("xorriso")


@pytest.fixture
def image(tmp_path) -> Path:
    return make_iso(tmp_path / "image.iso", size=3_000_000)


def test_stdio_empty_file_is_blank(xorriso, tmp_path):
    target = tmp_path / "disc.iso"
    target.touch()
    drive = XorrisoDrive(f"stdio:{target}", xorriso=xorriso)
    media = drive.media()
    assert media.present and media.is_blank and media.kind == FILE
    assert media.free_bytes and media.free_bytes > 0
    assert drive.capabilities() == {FILE}
    assert drive.identity.device == f"stdio:{target}"
    # A file that does not exist yet is a blank medium too.
    assert XorrisoDrive(f"stdio:{tmp_path / 'new.iso'}", xorriso=xorriso).media().is_blank


def test_stdio_write_verify_corrupt(xorriso, tmp_path, image):
    target = tmp_path / "disc.iso"
    drive = XorrisoDrive(f"stdio:{target}", xorriso=xorriso)
    events: list[hw.BurnProgress] = []
    drive.write(image, events.append)

    assert events[0].phase == "start" and events[0].fraction == 0.0
    assert events[-1].phase == "done" and events[-1].fraction == 1.0
    assert events[-1].bytes_done == events[-1].bytes_total == image.stat().st_size
    fractions = [event.fraction for event in events]
    assert fractions == sorted(fractions)

    media = drive.media()
    assert media.present and media.state != "blank" and media.sessions == 1
    assert target.read_bytes()[:image.stat().st_size] == image.read_bytes()

    verify_events: list[hw.BurnProgress] = []
    result = drive.verify(image, verify_events.append)
    assert result.ok, result.message
    assert result.bytes_checked == image.stat().st_size
    assert result.image_sha256 == result.medium_sha256
    assert verify_events[-1].fraction == 1.0

    flip_byte(target, 1_000_000)
    result = drive.verify(image)
    assert not result.ok
    assert "does not match" in result.message
    assert result.bad_ranges == ((1_000_000 // 2048 * 2048, 2048),)
    assert result.image_sha256 != result.medium_sha256
    with pytest.raises(hw.VerifyError, match="does not match"):
        result.raise_for_failure(drive.identity.device)

    drive.eject()  # harmless on a stdio: pseudo-drive


def test_stdio_truncated_medium_fails_verify(xorriso, tmp_path, image):
    target = tmp_path / "disc.iso"
    drive = XorrisoDrive(f"stdio:{target}", xorriso=xorriso)
    drive.write(image)
    with open(target, "r+b") as handle:
        handle.truncate(image.stat().st_size // 2)
    result = drive.verify(image)
    assert not result.ok
    assert "less data" in result.message


def test_stdio_written_medium_is_not_blank(xorriso, tmp_path, image):
    """Policy: a medium holding a session is never appended to or overwritten."""
    target = tmp_path / "disc.iso"
    drive = XorrisoDrive(f"stdio:{target}", xorriso=xorriso)
    drive.write(image)
    before = target.read_bytes()
    with pytest.raises(hw.MediaNotBlankError, match="is not blank"):
        drive.write(image)
    assert target.read_bytes() == before


def test_stdio_erase_rewritable_opt_in(xorriso, tmp_path, image):
    target = tmp_path / "disc.iso"
    XorrisoDrive(f"stdio:{target}", xorriso=xorriso).write(image)
    other = make_iso(tmp_path / "other.iso", size=500_000, seed=2)
    drive = XorrisoDrive(f"stdio:{target}", xorriso=xorriso, erase_rewritable=True)
    drive.write(other)
    assert drive.verify(other).ok


def test_stdio_too_small_medium(xorriso, tmp_path, image):
    """Emulate a small medium: xorriso runs with a 256 KiB file size limit."""
    wrapper = tmp_path / "xorriso-256k"
    wrapper.write_text(textwrap.dedent(f"""\
        #!/bin/sh
        ulimit -f 512
        exec {xorriso} "$@"
        """))
    wrapper.chmod(0o755)
    drive = XorrisoDrive(f"stdio:{tmp_path / 'small.iso'}", xorriso=wrapper)
    with pytest.raises(hw.MediaTooSmallError, match="too small"):
        drive.write(image)


def test_precheck_too_small(xorriso, tmp_path, image, monkeypatch):
    drive = XorrisoDrive(f"stdio:{tmp_path / 'disc.iso'}", xorriso=xorriso)
    small = hw.MediaInfo(present=True, kind=CD_R, state="blank", capacity_bytes=100_000,
                         free_bytes=100_000)
    monkeypatch.setattr(drive, "media", lambda: small)
    with pytest.raises(hw.MediaTooSmallError, match="only 100.0 kB are free"):
        drive.write(image)


def test_stdio_missing_directory_is_unavailable(xorriso, tmp_path, image):
    drive = XorrisoDrive(f"stdio:{tmp_path / 'missing' / 'disc.iso'}", xorriso=xorriso)
    with pytest.raises(hw.DriveError):
        drive.write(image)


def test_missing_xorriso_program(tmp_path, image):
    drive = XorrisoDrive("/dev/sr0", xorriso=tmp_path / "no-xorriso")
    with pytest.raises(hw.DriveUnavailableError, match="not installed"):
        drive.media()


def test_missing_real_drive(xorriso):
    if os.path.exists("/dev/sr7"):
        pytest.skip("/dev/sr7 exists on this machine")
    with pytest.raises(hw.DriveUnavailableError, match="/dev/sr7 cannot be opened"):
        XorrisoDrive("/dev/sr7", xorriso=xorriso).media()


def test_drive_check_failure_is_never_good(xorriso, tmp_path, image):
    """Bytes compare equal but xorriso's -check_media fails: the result is a failure."""
    target = tmp_path / "disc.iso"
    XorrisoDrive(f"stdio:{target}", xorriso=xorriso).write(image)
    wrapper = tmp_path / "xorriso-bad-read"
    wrapper.write_text(textwrap.dedent(f"""\
        #!/bin/sh
        for arg in "$@"; do
          if [ "$arg" = "-check_media" ]; then
            echo "libburn : SORRY : Read error on medium (fabricated)"
            echo "xorriso : FAILURE : -check_media: read failure"
            exit 32
          fi
        done
        exec {xorriso} "$@"
        """))
    wrapper.chmod(0o755)
    result = XorrisoDrive(f"stdio:{target}", xorriso=wrapper).verify(image)
    assert result.ok is False
    assert "could not check" in result.message
    assert result.image_sha256 == result.medium_sha256
