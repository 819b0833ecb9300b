"""Coercion of an instance's attributes without touching its pixel data (PS3.4 B.4.1.3).

When the acquisition hands an image over (``exam add``), the service completes it with the
exam's patient, study and request attributes. Only the attributes before Pixel Data change, so
only they are decoded and encoded again; the Pixel Data element and whatever follows it are
copied as bytes, in the transfer syntax the file has. A 512x512 CT image is 0.5 MB of pixel data
behind a header of a few kilobytes: decoding and re-encoding the whole data set was most of what
``exam add`` cost.

A deflated data set (PS3.5 A.5) is one compressed stream, so it has no "rest" to copy: such a
file is decoded and encoded whole.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Callable

from pydicom import dcmread
from pydicom.dataset import Dataset
from pydicom.filebase import DicomBytesIO
from pydicom.filewriter import dcmwrite, write_dataset
from pydicom.uid import UID, DeflatedExplicitVRLittleEndian


@dataclass
class Coerced:
    """An instance with coerced attributes: the edited data set (without its pixel data when
    `rest_offset` is set), the encoding of its elements before Pixel Data, and where in the
    source file the bytes to copy after them start (None: `header` is the whole data set)."""

    dataset: Dataset
    transfer_syntax: UID
    header: bytes
    rest_offset: int | None


def coerce_file(path: Path, coerce: Callable[[Dataset], object]) -> Coerced:
    """Read `path` up to its Pixel Data, let `coerce` edit the data set in place, and encode the
    edited elements in the file's own transfer syntax.

    Every element is decoded before `coerce` runs, so that text is written again in whatever
    Specific Character Set `coerce` leaves (an element still raw would keep the old encoding's
    bytes under the new declaration). Group Length elements (retired, PS3.5 7.2) are dropped:
    their values would no longer be true.
    """
    with open(path, "rb") as fp:
        ds = dcmread(fp, stop_before_pixels=True)
        rest = fp.tell()
    syntax = UID(ds.file_meta.TransferSyntaxUID)
    if syntax == DeflatedExplicitVRLittleEndian:
        ds, rest = dcmread(path), None
    for _ in ds.iterall():  # decode every raw element, recursively
        pass
    for tag in [t for t in ds.keys() if t.element == 0x0000 and t.group != 0x0002]:
        del ds[tag]
    coerce(ds)
    fp = DicomBytesIO()
    fp.is_little_endian = syntax.is_little_endian
    fp.is_implicit_VR = syntax.is_implicit_VR
    if rest is None:
        out = DicomBytesIO()
        dcmwrite(out, ds, enforce_file_format=True)
        return Coerced(ds, syntax, _dataset_of(out.getvalue()), None)
    write_dataset(fp, ds)
    return Coerced(ds, syntax, fp.getvalue(), rest)


def _dataset_of(part10: bytes) -> bytes:
    """The data set bytes of an encoded PS3.10 file (after its File Meta group)."""
    group_length = int.from_bytes(part10[140:144], "little")
    return part10[144 + group_length:]
