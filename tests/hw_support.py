"""Helpers shared by the ``test_hw_*`` tests (images, xorriso lookup)."""

from __future__ import annotations

import io
import os
import random
from pathlib import Path

import pytest

from hw.xorriso import DEFAULT_XORRISO


def in_ci() -> bool:
    """``True`` when running in CI (``CI=true``)."""
    return os.environ.get("CI", "").strip().lower() in ("1", "true", "yes")


def require_xorriso() -> str:
    """Path of xorriso (``$XORRISO`` or ``/usr/bin/xorriso``).

    Missing xorriso fails the test in CI and skips it elsewhere.
    """
    path = os.environ.get("XORRISO", DEFAULT_XORRISO)
    if not (os.path.isfile(path) and os.access(path, os.X_OK)):
        message = f"xorriso not found at {path}"
        if in_ci():
            pytest.fail(message + " (required in CI)")
        pytest.skip(message)
    return path


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
