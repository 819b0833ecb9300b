"""Byte-for-byte comparison of an image with what a medium returns.

Shared by all backends: the medium is anything that can be opened as a binary
stream (a regular file, ``/dev/srN``, an in-memory buffer).  The comparison
works in 2048-byte blocks (the optical sector size) and reports every
differing or missing block as a bad range, so a corrupted disc can never be
reported as good.
"""

from __future__ import annotations

import hashlib
from pathlib import Path
from typing import Optional, Protocol

from hw.drive import (
    PHASE_DONE, PHASE_START, PHASE_VERIFY, BurnProgress, ProgressCallback,
    VerifyResult, format_bytes,
)

__all__ = ["BLOCK_SIZE", "Readable", "compare_image", "merge_ranges"]


class Readable(Protocol):
    """What the comparison needs of a medium: ``read(size)`` (a binary file is one)."""

    def read(self, size: int = -1, /) -> bytes:
        ...

#: Optical media sector size in bytes.
BLOCK_SIZE = 2048
_CHUNK = 1024 * 1024  # a multiple of BLOCK_SIZE


def merge_ranges(ranges: list[tuple[int, int]]) -> tuple[tuple[int, int], ...]:
    """Merge overlapping or adjacent ``(offset, length)`` ranges, sorted by offset."""
    merged: list[list[int]] = []
    for offset, length in sorted(ranges):
        if length <= 0:
            continue
        if merged and offset <= merged[-1][0] + merged[-1][1]:
            end = max(merged[-1][0] + merged[-1][1], offset + length)
            merged[-1][1] = end - merged[-1][0]
        else:
            merged.append([offset, length])
    return tuple((offset, length) for offset, length in merged)


def _read_full(stream: Readable, size: int) -> bytes:
    """Read up to *size* bytes, retrying short reads; fewer only at end of data."""
    parts = []
    remaining = size
    while remaining > 0:
        data = stream.read(remaining)
        if not data:
            break
        parts.append(data)
        remaining -= len(data)
    return b"".join(parts)


def _diff_blocks(offset: int, expected: bytes, actual: bytes) -> list[tuple[int, int]]:
    """Bad ranges (block granular) of one chunk."""
    bad: list[tuple[int, int]] = []
    for start in range(0, len(expected), BLOCK_SIZE):
        want = expected[start:start + BLOCK_SIZE]
        got = actual[start:start + BLOCK_SIZE]
        if want != got:
            bad.append((offset + start, len(want)))
    return bad


def compare_image(image: Path, medium: Readable, *, device: str,
                  progress: Optional[ProgressCallback] = None,
                  extra_bad_ranges: tuple[tuple[int, int], ...] = (),
                  medium_name: Optional[str] = None) -> VerifyResult:
    """Compare *image* with the first ``image size`` bytes of *medium*.

    Parameters
    ----------
    image:
        The image file that was written.
    medium:
        A binary stream positioned at the start of the written data.
    device:
        Device name used in the result message.
    progress:
        Optional callback receiving ``"start"``, ``"verify"`` and ``"done"`` events.
    extra_bad_ranges:
        Ranges already known to be bad (e.g. reported unreadable by the drive);
        they make the result fail even if the bytes compare equal.
    medium_name:
        How messages name the medium; default ``"the disc in DEVICE"``.

    Returns
    -------
    VerifyResult
        ``ok`` is ``True`` only if all bytes are equal and no extra bad ranges
        were given.
    """
    total = Path(image).stat().st_size
    name = medium_name or f"the disc in {device}"
    image_hash = hashlib.sha256()
    medium_hash = hashlib.sha256()
    bad: list[tuple[int, int]] = list(extra_bad_ranges)
    done = 0
    short_read = False

    def report(phase: str, message: str) -> None:
        if progress is not None:
            fraction = 1.0 if total == 0 else min(1.0, done / total)
            if phase != PHASE_DONE:
                fraction = min(fraction, 0.999)
            progress(BurnProgress(done, total, fraction, phase, message))

    report(PHASE_START, f"Verifying {name}")
    with open(image, "rb") as source:
        while done < total:
            expected = _read_full(source, min(_CHUNK, total - done))
            if not expected:
                break
            actual = b"" if short_read else _read_full(medium, len(expected))
            image_hash.update(expected)
            medium_hash.update(actual)
            if len(actual) < len(expected):
                short_read = True
            if actual != expected:
                bad.extend(_diff_blocks(done, expected, actual))
            done += len(expected)
            report(PHASE_VERIFY, f"Verified {format_bytes(done)} of {format_bytes(total)}")

    bad_ranges = merge_ranges(bad)
    if short_read:
        message = (f"Verification failed: {name} holds less data than the image "
                   f"({format_bytes(total)}). Do not use it.")
    elif bad_ranges:
        bad_bytes = sum(length for _, length in bad_ranges)
        message = (f"Verification failed: {name} does not match the image "
                   f"({format_bytes(bad_bytes)} in {len(bad_ranges)} region(s) differ or "
                   f"are unreadable). Do not use it.")
    else:
        message = f"Verification passed: {name} matches the image ({format_bytes(total)})."
    result = VerifyResult(
        ok=not short_read and not bad_ranges,
        message=message,
        bytes_checked=done,
        bad_ranges=bad_ranges,
        image_sha256=image_hash.hexdigest(),
        medium_sha256=None if short_read else medium_hash.hexdigest(),
    )
    report(PHASE_DONE, message)
    return result
