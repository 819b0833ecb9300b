"""Discs: small ISO 9660 images for the drive tests, and written discs read back and checked
(xorriso extracts, dicom3tools' dciodvfy and dcdirdmp check the DICOMDIR, pydicom reads it)."""

from __future__ import annotations

import io
import random
import re
import subprocess
from pathlib import Path

from pydicom import dcmread
from pydicom.fileset import FileSet
from pydicom.uid import ExplicitVRLittleEndian


def make_iso(path: Path, size: int = 1_500_000, seed: int = 1) -> Path:
    """Write a small ISO 9660 image (with pycdlib) holding *size* random bytes."""
    import pycdlib

    rng = random.Random(seed)
    payload = rng.randbytes(size)
    iso = pycdlib.PyCdlib()
    iso.new(interchange_level=3, joliet=3, vol_ident="HWTEST")
    iso.add_fp(io.BytesIO(payload), len(payload), "/IMAGE.DAT;1", joliet_path="/image.dat")
    readme = b"hw test disc\n"
    iso.add_fp(io.BytesIO(readme), len(readme), "/README.TXT;1", joliet_path="/README.TXT")
    iso.write(str(path))
    iso.close()
    return path


def flip_byte(path: Path, offset: int) -> None:
    """Invert the byte at *offset* of the file *path*."""
    with open(path, "r+b") as handle:
        handle.seek(offset)
        value = handle.read(1)[0]
        handle.seek(offset)
        handle.write(bytes([value ^ 0xFF]))


#: An ISO 9660 Level 1 file or folder name (PS3.12 Annex F).
LEVEL1 = re.compile(r"^[A-Z0-9_]{1,8}$")


def check_disc(image: Path, out: Path, tools: dict[str, str]) -> dict[str, Path]:
    """Extract `image` and check its file-set; return SOP Instance UID -> extracted file."""
    proc = subprocess.run([tools["xorriso"], "-osirrox", "on", "-indev", str(image), "-extract", "/", str(out)],
                          capture_output=True, text=True, encoding="latin-1")
    assert proc.returncode == 0, proc.stderr
    dicomdir = out / "DICOMDIR"
    assert dicomdir.is_file()
    for path in out.rglob("*"):
        rel = path.relative_to(out)
        assert len(rel.parts) <= 8
        assert all(LEVEL1.match(p) or p in ("README.TXT", "INDEX.HTM") for p in rel.parts), rel
    proc = subprocess.run([tools["dciodvfy"], str(dicomdir)], capture_output=True, text=True, encoding="latin-1")
    text = proc.stdout + proc.stderr
    assert "BasicDirectory" in text
    assert not [line for line in text.splitlines() if line.startswith("Error")], text
    proc = subprocess.run([tools["dcdirdmp"], str(dicomdir)], capture_output=True, text=True, encoding="latin-1")
    listing = proc.stdout + proc.stderr
    fs = FileSet(dicomdir)
    found: dict[str, Path] = {}
    for inst in fs:
        path = Path(inst.path)
        assert path.is_file(), path
        found[inst.SOPInstanceUID] = path
    kinds = [line.strip().split(" ")[0] for line in listing.splitlines() if line.strip()]
    assert kinds.count("IMAGE") == len(found) > 0, listing
    assert listing.count("-> DICOM\\PAT") == len(found)
    return found


def check_against_archive(found: dict[str, Path], sources: dict[str, tuple[Path, str]]) -> None:
    for uid, path in found.items():
        out = dcmread(path)
        src = dcmread(sources[uid][0])
        assert out.file_meta.TransferSyntaxUID == ExplicitVRLittleEndian  # STD-GEN-CD
        assert out.SOPInstanceUID == src.SOPInstanceUID
        assert out.PixelData == src.PixelData
