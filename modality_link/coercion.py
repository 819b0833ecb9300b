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

import io
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

from pydicom import dcmread
from pydicom.dataelem import RawDataElement
from pydicom.dataset import Dataset
from pydicom.filebase import DicomBytesIO
from pydicom.filewriter import dcmwrite, write_dataset
from pydicom.tag import Tag
from pydicom.uid import UID, DeflatedExplicitVRLittleEndian

from modality_link.fileformat import dataset_offset

PIXEL_DATA = Tag(0x7FE0, 0x0010)


@dataclass
class Coerced:
    """An instance with coerced attributes: the edited data set (without its Pixel Data and what
    follows when `rest_offset` is set), its encoding, and where in the source file the bytes to
    copy after it start (None: `header` is the whole data set)."""

    dataset: Dataset
    transfer_syntax: UID
    header: bytes
    rest_offset: int | None


def coerce_file(path: Path, coerce: Callable[[Dataset], object], dataset: Dataset | None = None) -> Coerced:
    """Read `path` up to its Pixel Data, let `coerce` edit the data set in place, and encode the
    edited elements in the file's own transfer syntax.

    `dataset` is the file already read with its large values deferred (as
    :func:`modality_link.archive.read_header` reads it, to check it), so that it is not parsed
    twice; the Pixel Data element and what follows it are then left to be copied.

    Elements `coerce` does not touch stay undecoded and are written back as the bytes they were:
    if `coerce` declares another Specific Character Set under which those bytes would mean
    something else, it must decode them first (see :func:`modality_link.exam.apply_worklist`).
    Group Length elements (retired, PS3.5 7.2) are dropped: their values would no longer be true.
    """
    pixels = dataset._dict.get(PIXEL_DATA) if dataset is not None else None
    if pixels is not None and not hasattr(pixels, "value_tell"):
        dataset = None  # its Pixel Data were decoded already: where they start is not known
    ds: Dataset
    if dataset is None:
        with open(path, "rb") as fp:
            ds = dcmread(fp, stop_before_pixels=True)
            rest: int | None = fp.tell() if fp.tell() < os.fstat(fp.fileno()).st_size else None
    else:
        ds, rest = dataset, _pixel_data_offset(dataset)
    syntax = UID(ds.file_meta.TransferSyntaxUID)
    deflated = syntax == DeflatedExplicitVRLittleEndian
    if deflated:
        ds, rest = dcmread(path), None
    elif rest is not None:
        for tag in [t for t in ds.keys() if t >= PIXEL_DATA]:  # copied as bytes, not written twice
            del ds[tag]
    for tag, elem in list(ds._dict.items()):  # values left in the file by read_header: read them
        if isinstance(elem, RawDataElement) and elem.value is None and elem.length:
            ds[tag]
    for tag in [t for t in ds.keys() if t.element == 0x0000 and t.group != 0x0002]:
        del ds[tag]
    coerce(ds)
    if deflated:
        out = DicomBytesIO()
        dcmwrite(out, ds, enforce_file_format=True)
        part10 = out.getvalue()
        return Coerced(ds, syntax, part10[dataset_offset(io.BytesIO(part10)):], None)
    encoded = DicomBytesIO()
    encoded.is_little_endian = syntax.is_little_endian
    encoded.is_implicit_VR = syntax.is_implicit_VR
    write_dataset(encoded, ds)
    return Coerced(ds, syntax, encoded.getvalue(), rest)


def _pixel_data_offset(ds: Dataset) -> int | None:
    """Where the Pixel Data element of a data set read from a file starts in that file (None
    when it has none): its value's position less its header, 8 bytes in Implicit VR, 12 in
    Explicit VR (OB and OW have a 4-byte length, PS3.5 7.1.2)."""
    raw = ds._dict.get(PIXEL_DATA)
    if not isinstance(raw, RawDataElement):  # none, or decoded already
        return None
    return raw.value_tell - (8 if raw.is_implicit_VR else 12)

