"""The local disk archive: DICOM files by UID under the home folder, indexed in SQLite.

A file enters the archive in three steps (docs/design.md "The listening side"): it is written to
a temporary name on the archive's file system and flushed (fdatasync), renamed to its final name
and its directory flushed (POSIX makes a rename durable only by an fsync of the directory), and
only then indexed. A crash at any point leaves either no file, an unindexed complete file (found
again by :meth:`Archive.reconcile`), or an indexed complete file: never a half-written archive
file. A received instance (:meth:`Archive.receive`) is written as it arrives and indexed by a
background thread after it was acknowledged; the release of its association waits for that.

A study leaves the archive only by :meth:`Archive.delete_study` (the disk clean-up,
docs/design.md "Disk clean-up"): its instances are marked in the index, its files removed, then
its rows, while no instance may be installed into it; :meth:`Archive.reconcile` finishes a
deletion a crash interrupted.

Paths are built from the Study, Series and SOP Instance UIDs of the dataset, after each was
checked to be a valid UID (PS3.5 §9.1: 1-64 characters, digits and dots, no empty component and
no leading zero). A UID that came over the wire never reaches the file system unchecked.

Files are stored as PS3.10 files whose File Meta Information we write ourselves (Implementation
Class UID and Version Name, Source AE Title of the sender); the dataset bytes are copied as
received, never decoded and re-encoded. A Deflated Explicit VR Little Endian dataset (PS3.5 A.5)
is stored deflated, as received; its completeness is checked on the inflated stream.
"""

from __future__ import annotations

import errno
import logging
import mmap
import os
import re
import shutil
import stat
import struct
import threading
import uuid
import zlib
from collections import deque
from concurrent.futures import Future, ThreadPoolExecutor
from contextlib import contextmanager
from dataclasses import dataclass, field
from io import BytesIO
from pathlib import Path
from typing import TYPE_CHECKING, Any, BinaryIO, Callable, Iterable, Iterator, Sequence

from pydicom import dcmread
from pydicom.datadict import dictionary_VR
from pydicom.dataset import Dataset
from pydicom.errors import InvalidDicomError
from pydicom.filereader import read_dataset as read_dataset_bytes
from pydicom.sequence import Sequence as DicomSequence
from pydicom.uid import UID, DeflatedExplicitVRLittleEndian, ImplicitVRLittleEndian

from modality_link.db import Database, InstanceRecord
from modality_link.fileformat import (
    TRANSFER_SYNTAX_UID, VR_BYTES, Part10Error, dataset_offset, encode_file_meta, meta_value,
)
from modality_link.media.header import Header, read_dataset, tag_of
from modality_link.net.status import CANNOT_UNDERSTAND, DATA_SET_MISMATCH, OUT_OF_RESOURCES
from modality_link.net.charset import dataset_charset, decoded_text, text_of

if TYPE_CHECKING:
    from modality_link.coercion import Coerced

LOG = logging.getLogger("modality_link.archive")

_UID = re.compile(r"^(0|[1-9][0-9]*)(\.(0|[1-9][0-9]*))*$")

class ArchiveError(Exception):
    """Storing failed; `status` is the DICOM status to answer with (PS3.4 B.2.3)."""

    status = CANNOT_UNDERSTAND


class DiskFull(ArchiveError):
    status = OUT_OF_RESOURCES


class DatasetMismatch(ArchiveError):
    status = DATA_SET_MISMATCH


class CannotUnderstand(ArchiveError):
    status = CANNOT_UNDERSTAND


def is_valid_uid(uid: object) -> bool:
    """True if `uid` is a UID by PS3.5 §9.1 (1-64 characters, digits and dots)."""
    return isinstance(uid, str) and 0 < len(uid) <= 64 and _UID.match(uid) is not None


def checked_uid(uid: object, what: str) -> str:
    """Return `uid` if valid, else raise :class:`DatasetMismatch` naming the attribute."""
    if not is_valid_uid(uid):
        shown = repr(uid)[:80]
        raise DatasetMismatch(f"{what} {shown} is not a valid UID (PS3.5 9.1)")
    return str(uid)


#: Why a file without the PS3.10 header (PS3.10 §7.1) is refused, in the operator's words.
NOT_DICOM = "not a DICOM file (no DICM prefix after the 128-byte preamble, PS3.10 7.1)"


def _dataset_offset(fp: BinaryIO) -> int:
    """Where the data set of the PS3.10 file `fp` starts (after its File Meta group)."""
    fp.seek(0)
    try:
        return dataset_offset(fp)
    except (Part10Error, struct.error):
        raise CannotUnderstand("not a PS3.10 file (no DICM prefix and File Meta group)") from None


def _text(ds: Dataset, keyword: str) -> str:
    return text_of(ds.get(keyword, ""))


def read_header(source: Path | bytes) -> Dataset:
    """Read the dataset of a PS3.10 file (its path, or its bytes) without its pixel data, and
    check it is complete.

    Large values are skipped (deferred) rather than read; a value that runs past the end of the
    file, or bytes after the last element, make the dataset incomplete. For a deflated dataset
    (PS3.5 A.5) the positions are those of the inflated stream, which must end where the
    deflate stream does (at most 8 bytes may follow it: a pad byte, or a gzip trailer).
    """
    size = len(source) if isinstance(source, bytes) else source.stat().st_size
    try:
        with (BytesIO(source) if isinstance(source, bytes) else open(source, "rb")) as fp:
            # bytes are in memory already: nothing to gain by deferring, and nothing to re-open
            ds = dcmread(fp, defer_size=None if isinstance(source, bytes) else 4096)
            end = fp.tell()
            last = ds._dict[max(ds._dict)] if ds._dict else None
            syntax = ds.file_meta.get("TransferSyntaxUID")
            if syntax == DeflatedExplicitVRLittleEndian:
                size = end = _inflated_size(fp, _dataset_offset(fp))
            elif syntax and not UID(syntax).is_implicit_VR and ds._dict:
                fp.seek(_dataset_offset(fp) + 4)
                _check_explicit_vr(fp.read(2), UID(syntax))
    except InvalidDicomError:
        # pydicom's own text suggests force=True, which is no advice for an operator
        raise CannotUnderstand(NOT_DICOM) from None
    except (EOFError, ValueError, KeyError, struct.error, OSError, zlib.error) as exc:
        raise CannotUnderstand(f"dataset cannot be parsed: {exc}") from None
    if end > size:
        raise CannotUnderstand(f"dataset is truncated: {end - size} bytes missing at its end")
    value_tell = getattr(last, "value_tell", None)
    length = getattr(last, "length", None)
    if value_tell is not None and length not in (None, 0xFFFFFFFF) and value_tell + length != size:
        raise CannotUnderstand(
            f"dataset is truncated or has trailing bytes: last element ends at "
            f"{value_tell + length}, file has {size}"
        )
    return ds


def _check_explicit_vr(vr: bytes, syntax: UID) -> None:
    """The first element of a data set in an explicit VR transfer syntax names its VR (PS3.5
    7.1.2). Some writers put an Implicit VR data set under an explicit syntax: pydicom guesses
    its way through such a file, but the peers we pass it to do not (DCMTK reads garbage)."""
    if vr not in VR_BYTES:
        raise CannotUnderstand(
            f"the data set is not encoded in Explicit VR although its transfer syntax {syntax.name} requires "
            f"it (PS3.5 7.1.2): its first element has VR {vr!r}"
        )


def check_file_meta(ds: Dataset) -> None:
    """Refuse a file whose File Meta Information does not describe its data set (PS3.10 §7.1):
    no Transfer Syntax UID, or another SOP Class or SOP Instance than the data set's. Such a
    file cannot be told apart from a damaged one, so it is refused rather than guessed at. (A data
    set without the UID itself is refused by :func:`record_from_dataset`.)"""
    meta = getattr(ds, "file_meta", None) or Dataset()
    if not meta.get("TransferSyntaxUID"):
        raise CannotUnderstand("the File Meta Information has no Transfer Syntax UID (0002,0010), PS3.10 7.1")
    for what, keyword, meta_what, meta_keyword in (
        ("SOP Class UID (0008,0016)", "SOPClassUID", "Media Storage SOP Class UID (0002,0002)",
         "MediaStorageSOPClassUID"),
        ("SOP Instance UID (0008,0018)", "SOPInstanceUID", "Media Storage SOP Instance UID (0002,0003)",
         "MediaStorageSOPInstanceUID"),
    ):
        if keyword in ds and str(meta.get(meta_keyword, "")) != str(ds.get(keyword, "")):
            raise DatasetMismatch(
                f"{what} of the data set ({ds.get(keyword)}) differs from the File Meta's {meta_what} "
                f"({meta.get(meta_keyword)}), PS3.10 7.1"
            )


def _inflated_size(fp: BinaryIO, start: int) -> int:
    """Length of the inflated dataset of a deflated PS3.10 file whose dataset starts at `start`."""
    fp.seek(start)
    inflater = zlib.decompressobj(-zlib.MAX_WBITS)
    total = 0
    while not inflater.eof:
        chunk = fp.read(1 << 20)
        if not chunk:
            raise CannotUnderstand("deflated dataset is truncated: its deflate stream does not end")
        total += len(inflater.decompress(chunk))
    rest = len(inflater.unused_data) + len(fp.read(9))
    if rest > 8:  # a pad byte, or the 8-byte gzip trailer (CRC-32, size) some writers leave
        raise CannotUnderstand("deflated dataset has trailing bytes after its deflate stream")
    return total + len(inflater.flush())


#: The index's attributes (:class:`InstanceRecord` field, keyword), in the order of its columns.
_INDEXED_TEXT = (
    ("patient_id", "PatientID"), ("patient_name", "PatientName"), ("birth_date", "PatientBirthDate"),
    ("sex", "PatientSex"), ("study_date", "StudyDate"), ("study_time", "StudyTime"),
    ("accession", "AccessionNumber"), ("study_id", "StudyID"), ("study_description", "StudyDescription"),
    ("referring_physician", "ReferringPhysicianName"), ("modality", "Modality"),
    ("series_number", "SeriesNumber"), ("series_description", "SeriesDescription"),
    ("body_part", "BodyPartExamined"), ("instance_number", "InstanceNumber"),
)
#: The indexed UIDs (field, keyword, the File Meta's keyword that must hold the same UID).
_INDEXED_UIDS = (
    ("sop_instance_uid", "SOPInstanceUID", "MediaStorageSOPInstanceUID"),
    ("sop_class_uid", "SOPClassUID", "MediaStorageSOPClassUID"),
    ("series_uid", "SeriesInstanceUID", None),
    ("study_uid", "StudyInstanceUID", None),
)
#: Optional keys the Query/Retrieve SCP answers at the series and at the image level
#: (docs/design.md "Query/Retrieve SCP"), kept in :attr:`InstanceRecord.series_keys` and
#: :attr:`InstanceRecord.image_keys` when the instance has them.
SERIES_KEYS = ("SeriesDate", "SeriesTime", "ProtocolName", "PerformedProcedureStepStartDate",
               "PerformedProcedureStepStartTime")
IMAGE_KEYS = (
    "ImageType", "InstanceCreationDate", "InstanceCreationTime", "ContentDate", "ContentTime",
    "ContrastBolusAgent", "ScanOptions", "SequenceName", "SliceThickness", "EchoNumbers", "TriggerTime",
    "GantryDetectorTilt", "AcquisitionNumber", "ImagePositionPatient", "ImageOrientationPatient",
    "FrameOfReferenceUID", "SliceLocation", "SamplesPerPixel", "Rows", "Columns", "PixelSpacing",
    "BitsAllocated",
)
#: The Request Attributes Sequence and the keys of its items that are indexed (PS3.4 C.6.1.1.4).
REQUEST_ATTRIBUTES = "RequestAttributesSequence"
REQUEST_KEYS = ("RequestedProcedureID", "ScheduledProcedureStepID")
_INDEXED_TAGS = frozenset(tag_of(k) for k in ("SpecificCharacterSet", *(k for _, k in _INDEXED_TEXT),
                                              *(k for _, k, _ in _INDEXED_UIDS), *SERIES_KEYS, *IMAGE_KEYS,
                                              REQUEST_ATTRIBUTES))
#: How the optional keys are read: text in the default repertoire only (PS3.5 6.1.2.3) is
#: taken as ASCII without pydicom, binary values are unpacked; the rest is decoded in the data
#: set's character set like the columns above.
_ASCII_VRS = frozenset({"AE", "AS", "CS", "DA", "DS", "DT", "IS", "TM", "UI"})
_BINARY_VRS = {"US": "H", "UL": "L", "SS": "h", "SL": "l", "FL": "f", "FD": "d"}
#: (keyword, tag, VR) of the optional keys of each level.
_SERIES_OPTIONAL = [(k, tag_of(k), dictionary_VR(k)) for k in SERIES_KEYS]
_IMAGE_OPTIONAL = [(k, tag_of(k), dictionary_VR(k)) for k in IMAGE_KEYS]
_DECODED_OPTIONAL = frozenset(tag for _, tag, vr in (*_SERIES_OPTIONAL, *_IMAGE_OPTIONAL)
                              if vr not in _ASCII_VRS and vr not in _BINARY_VRS)
_UID_TAGS = frozenset(tag_of(k) for _, k, _ in _INDEXED_UIDS)
#: What :func:`header_record` has pydicom decode: the columns, the UIDs and the optional text.
_DECODED_TAGS = (_INDEXED_TAGS - {tag for _, tag, _ in (*_SERIES_OPTIONAL, *_IMAGE_OPTIONAL)}) | _DECODED_OPTIONAL


def _ascii_text(raw: bytes) -> str:
    """An ASCII value as the index keeps it: each value without leading and trailing spaces
    (and NUL padding), values joined by backslashes."""
    text = raw.decode("ascii", "replace")
    if "\\" not in text:
        return text.strip(" \x00")
    return "\\".join(v.strip(" \x00") for v in text.split("\\"))


def _binary_text(raw: bytes, vr: str, order: str) -> str:
    code = _BINARY_VRS[vr]
    count = len(raw) // struct.calcsize(code)
    return "\\".join(str(v) for v in struct.unpack(f"{order}{count}{code}", raw[:count * struct.calcsize(code)]))


def _keys_of(keys: Sequence[tuple[str, int, str]], raw: Callable[[int], bytes | str | None],
             decoded: Callable[[str], object], order: str = "<") -> dict[str, str]:
    """{keyword: text} of the optional `keys` (keyword, tag, VR) present: `raw` gives an
    element's value bytes in byte `order` (None when absent; text when pydicom converted it
    already), `decoded` its value decoded in the data set's character set."""
    out = {}
    for keyword, tag, vr in keys:
        value = raw(tag)
        if value is None:
            continue
        if isinstance(value, str):
            out[keyword] = value if vr in _BINARY_VRS else _ascii_text(value.encode("ascii", "replace"))
        elif vr in _ASCII_VRS:
            out[keyword] = _ascii_text(value)
        elif vr in _BINARY_VRS:
            out[keyword] = _binary_text(value, vr, order)
        else:
            out[keyword] = text_of(decoded(keyword))
    return out


def _requests(sequence: object, terms: Sequence[str]) -> list[tuple[str, str]]:
    """(Requested Procedure ID, Scheduled Procedure Step ID) of each item of a Request
    Attributes Sequence, decoded in the data set's character set `terms`."""
    if not isinstance(sequence, DicomSequence):
        return []
    return [(decoded_text(item, REQUEST_KEYS[0], terms), decoded_text(item, REQUEST_KEYS[1], terms))
            for item in sequence if isinstance(item, Dataset)]


def _kept_sequence(raw: bytes, implicit: bool) -> object:
    """The value of one sequence element kept whole by the header walk, read by pydicom."""
    ds = read_dataset_bytes(BytesIO(raw), implicit, True)
    return ds.get(REQUEST_ATTRIBUTES)


def lean_header(fp: BinaryIO | mmap.mmap) -> Header | None:
    """The header keys of a complete, regular Little Endian file `fp` whose UIDs are valid and
    are the File Meta's (PS3.10 7.1), read by a walk of its element headers
    (:func:`modality_link.media.header.read_dataset`, PS3.5 7.1) that decodes only the UIDs: the
    validation of :func:`lean_record`, without its text. None for anything else - refused, Big
    Endian, Deflated, irregular - which :func:`pydicom_record` then reads, and refuses with its
    message."""
    header = read_dataset(fp, _INDEXED_TAGS)
    if header is None:
        return None
    for _, keyword, meta_keyword in _INDEXED_UIDS:
        uid = header_uid(header, keyword)
        if not is_valid_uid(uid):
            return None
        if meta_keyword is not None and meta_value(header.meta, tag_of(meta_keyword)) != uid:
            return None
    return header


def header_uid(header: Header, keyword: str) -> object:
    """A UID key of `header`: a UI value is ASCII (PS3.5 9.1), read as pydicom reads it (its
    trailing NULs and spaces dropped) without deciding the character set; another VR by pydicom."""
    tag = tag_of(keyword)
    element = header.elements.get(tag)
    if element is not None and element[4:6] == b"UI":
        return (header.raw(tag) or b"").decode("latin-1").rstrip("\0 ")
    return header.get(keyword)


def _rstripped(raw: bytes) -> str:
    return raw.decode("ascii").rstrip(" \x00")


def _each_rstripped(raw: bytes) -> str:
    return "\\".join(v.rstrip("\x00 ") for v in raw.decode("ascii").split("\\"))


#: pydicom's reading of a value of these VRs as one str (``text_of``) when its bytes are ASCII
#: without ESC, and so read the same in every character set (PS3.5 6.1.2.3): padding dropped from
#: the whole value (AS, CS, DA, DT, TM: pydicom's multi_string; ST, LT, UT, PN: one string), or
#: from each value (SH, LO, UC). AE, UI, IS, DS and a PN with component groups ("=") are left to
#: pydicom, which rewrites them (leading spaces, numbers, empty groups).
_ASCII_READS: dict[bytes, Callable[[bytes], str]] = {
    **{vr: _rstripped for vr in (b"AS", b"CS", b"DA", b"DT", b"TM", b"ST", b"LT", b"UT", b"PN")},
    **{vr: _each_rstripped for vr in (b"SH", b"LO", b"UC")},
}


def _ascii_read(header: Header, tag: int) -> str | None:
    """The text of key `tag` as pydicom would give it, read without pydicom when :data:`_ASCII_READS`
    can; None when it cannot (or the key is absent)."""
    element = header.elements.get(tag)
    if element is None:
        return None
    read = _ASCII_READS.get(element[4:6])
    raw = header.raw(tag) or b""
    if read is None or not raw.isascii() or b"\x1b" in raw or (b"=" in raw and element[4:6] == b"PN"):
        return None
    return read(raw)


def header_record(header: Header, source_ae: str) -> InstanceRecord:
    """The index row of a file that :func:`lean_header` read: its text decoded in the data set's
    character set, the same row as :func:`pydicom_record` gives."""
    fast = {tag: value for tag in _DECODED_TAGS if (value := _ascii_read(header, tag)) is not None}
    header.decode(_DECODED_TAGS - fast.keys() - _UID_TAGS)  # the rest by pydicom, at once (UIDs: header_uid)

    def text(keyword: str) -> str:
        tag = tag_of(keyword)
        return fast[tag] if tag in fast else text_of(header.get(keyword))

    values: dict[str, Any] = {name: str(header_uid(header, keyword)) for name, keyword, _ in _INDEXED_UIDS}
    for name, keyword in _INDEXED_TEXT:
        values[name] = text(keyword)
    transfer_syntax = meta_value(header.meta, TRANSFER_SYNTAX_UID)
    sequence = header.kept_sequences.get(tag_of(REQUEST_ATTRIBUTES))
    return InstanceRecord(
        **values,
        transfer_syntax=transfer_syntax,
        path="",
        size=0,
        charset=text("SpecificCharacterSet"),
        source_ae=source_ae,
        series_keys=_keys_of(_SERIES_OPTIONAL, header.raw, text),
        image_keys=_keys_of(_IMAGE_OPTIONAL, header.raw, text),
        requests=_requests(_kept_sequence(sequence, transfer_syntax == ImplicitVRLittleEndian), header.charset)
        if sequence is not None else [],
    )


def lean_record(source: str | bytes, source_ae: str) -> InstanceRecord | None:
    """The index row of a complete, regular Little Endian file (its path, or its bytes) by
    :func:`lean_header` and :func:`header_record`; the same row as :func:`read_header`,
    :func:`check_file_meta` and :func:`record_from_dataset` give. None for anything else."""
    with (open(source, "rb") if isinstance(source, str) else BytesIO(source)) as fp:
        header = lean_header(fp)
    return None if header is None else header_record(header, source_ae)


def record_from_dataset(ds: Dataset, path: str, size: int, source_ae: str) -> InstanceRecord:
    """The index row for `ds` (the dataset's own UIDs, each checked).

    Text is stored as Unicode, decoded in the character set that really fits the bytes
    (:func:`modality_link.net.charset.dataset_charset`: misspelled terms corrected, a missing one
    guessed); the charset column keeps the declared (0008,0005).
    """
    charset = _text(ds, "SpecificCharacterSet")
    terms = dataset_charset(ds)

    def raw(tag: int) -> bytes | str | None:
        elem = ds.get_item(tag)
        if elem is None:
            return None
        return elem.value if isinstance(elem.value, bytes) else text_of(elem.value)  # raw, or converted

    order = "<" if ds.original_encoding[1] in (None, True) else ">"
    texts: dict[str, Any] = {name: decoded_text(ds, keyword, terms) for name, keyword in _INDEXED_TEXT}
    return InstanceRecord(
        sop_instance_uid=checked_uid(ds.get("SOPInstanceUID"), "SOP Instance UID (0008,0018)"),
        sop_class_uid=checked_uid(ds.get("SOPClassUID"), "SOP Class UID (0008,0016)"),
        series_uid=checked_uid(ds.get("SeriesInstanceUID"), "Series Instance UID (0020,000E)"),
        study_uid=checked_uid(ds.get("StudyInstanceUID"), "Study Instance UID (0020,000D)"),
        transfer_syntax=str(ds.file_meta.TransferSyntaxUID),
        path=path,
        size=size,
        charset=charset,
        **texts,
        source_ae=source_ae,
        series_keys=_keys_of(_SERIES_OPTIONAL, raw, lambda k: decoded_text(ds, k, terms), order),
        image_keys=_keys_of(_IMAGE_OPTIONAL, raw, lambda k: decoded_text(ds, k, terms), order),
        requests=_requests(ds.get(REQUEST_ATTRIBUTES), terms),
    )


@dataclass
class Archive:
    """Files under `root`, indexed in `db`."""

    root: Path
    db: Database
    min_free_mb: int = 512
    #: Called with (code, message) when the operator must be told (disk full...).
    on_alert: Callable[[str, str], None] | None = None
    #: Called after an instance was indexed (the disk clean-up checks the space, debounced).
    on_indexed: Callable[[], None] | None = None
    _dir_sync: "DirectorySync" = field(init=False, repr=False)
    _indexer: "Indexer" = field(init=False, repr=False)
    _guard: "StudyGuard" = field(init=False, repr=False)

    def __post_init__(self) -> None:
        self._dir_sync = DirectorySync()
        self._guard = StudyGuard()
        self._indexer = Indexer(self._index_received)

    @property
    def tmp_dir(self) -> Path:
        return self.root / ".tmp"

    def path_for(self, rec: InstanceRecord) -> str:
        """Relative path of an instance: STUDY_UID/SERIES_UID/SOP_INSTANCE_UID.dcm."""
        parts = (
            checked_uid(rec.study_uid, "Study Instance UID"),
            checked_uid(rec.series_uid, "Series Instance UID"),
            checked_uid(rec.sop_instance_uid, "SOP Instance UID") + ".dcm",
        )
        return "/".join(parts)

    def check_space(self) -> None:
        """Raise :class:`DiskFull` when the free space is below the configured reserve."""
        free = shutil.disk_usage(self.root).free
        if free < self.min_free_mb * 1024 * 1024:
            raise self._disk_full(f"{free // (1024 * 1024)} MiB free, {self.min_free_mb} MiB reserve")

    def _no_space(self, exc: OSError) -> Exception:
        """:class:`DiskFull` (with its alert) for a file system out of space, else `exc`."""
        return self._disk_full(str(exc)) if exc.errno in (errno.ENOSPC, errno.EDQUOT) else exc

    def _disk_full(self, detail: str) -> DiskFull:
        msg = f"archive disk full: {detail}"
        if self.on_alert:
            self.on_alert("disk-full", msg)
        return DiskFull(msg)

    def store_part10(self, src: Path, source_ae: str) -> InstanceRecord:
        """Archive the PS3.10 file `src` (a file to import), indexed before this returns.

        The dataset bytes are copied unchanged after a File Meta group of our own; the file's own
        File Meta must describe its data set.
        """
        self.check_space()
        rec = validate_received(str(src), source_ae)
        rec.path = self.path_for(rec)
        meta = encode_file_meta(rec.sop_class_uid, rec.sop_instance_uid, rec.transfer_syntax, source_ae)
        part = self.tmp_dir / f"{uuid.uuid4().hex}.part"
        with self._guard.installing([rec.study_uid]):
            with self._removed_on_failure(part), open(src, "rb") as fin, open(part, "wb") as fout:
                fout.write(meta)
                fout.flush()
                _copy_from(src, _dataset_offset(fin), fout.fileno())
                rec.size = os.fstat(fout.fileno()).st_size
                self._install(fout.fileno(), part, rec)
            self._index(rec)
        return rec

    @contextmanager
    def _removed_on_failure(self, part: Path) -> Iterator[None]:
        """Remove the temporary `part` when the block fails; a failed write answers as
        :meth:`_no_space` says (disk full: 0xA700)."""
        try:
            yield
        except OSError as exc:
            part.unlink(missing_ok=True)
            raise self._no_space(exc) from None
        except BaseException:
            part.unlink(missing_ok=True)
            raise

    def stage_coerced(self, coerced: "Coerced", src: Path, rec: InstanceRecord) -> "Staged":
        """Write an instance whose attributes were coerced (:mod:`modality_link.coercion`) to a
        temporary file: its File Meta, the coerced elements, and the bytes of `src` from
        ``rest_offset`` on, copied without being decoded. Its fdatasync starts at once in a
        flusher thread, while the caller prepares the next one; :meth:`install_staged` makes a
        group durable and indexes it, :meth:`discard_staged` drops it. `rec` is
        ``record_from_dataset(coerced.dataset, ...)``."""
        self.check_space()
        rec.path = self.path_for(rec)
        part = self.tmp_dir / f"{uuid.uuid4().hex}.part"
        with self._removed_on_failure(part), open(part, "wb") as out:
            out.write(encode_file_meta(rec.sop_class_uid, rec.sop_instance_uid, coerced.transfer_syntax,
                                       rec.source_ae))
            out.write(coerced.header)
            out.flush()
            if coerced.rest_offset is not None:
                _copy_from(src, coerced.rest_offset, out.fileno())
            rec.size = os.fstat(out.fileno()).st_size
        return Staged(part, rec, _flusher().submit(_fdatasync_path, part))

    def install_staged(self, group: Sequence["Staged"]) -> list[InstanceRecord]:
        """Make staged files durable as one group - each flushed, renamed, and each directory
        fsynced once - and index them. On an error the files not yet renamed are removed (those
        renamed are complete archive files, indexed by ``reconcile``)."""
        with self._guard.installing([staged.rec.study_uid for staged in group]):
            try:
                for staged in group:
                    staged.synced.result()
                self._rename_durably([(staged.part, staged.rec) for staged in group])
            except OSError as exc:
                self.discard_staged(group)
                raise self._no_space(exc) from None
            except BaseException:
                self.discard_staged(group)
                raise
            for staged in group:
                self._index(staged.rec, flush=False)  # reconcile() rebuilds these rows from the files
        return [staged.rec for staged in group]

    @staticmethod
    def discard_staged(group: Sequence["Staged"]) -> None:
        for staged in group:
            staged.synced.cancel()
            staged.part.unlink(missing_ok=True)

    def receive(self, sop_class: str, sop_instance: str, transfer_syntax: str, source_ae: str) -> "IncomingInstance":
        """Start receiving a C-STORE data set (PS3.7 9.3.1): a file in the tmp dir that the
        fragments are written to as they arrive; raise :class:`DiskFull` below the reserve."""
        self.check_space()
        return IncomingInstance(self, sop_class, sop_instance, transfer_syntax, source_ae)

    def _install(self, fd: int | None, part: Path, rec: InstanceRecord) -> None:
        """Make `part` the durable archive file of `rec`: fdatasync its data (unless the caller
        did: `fd` None), rename it to its final name, fsync the directories whose entries changed."""
        if fd is not None:
            os.fdatasync(fd)
        self._rename_durably([(part, rec)])

    def _rename_durably(self, moves: Sequence[tuple[Path, InstanceRecord]]) -> None:
        """Rename flushed temporaries to their archive names, then fsync each directory whose
        entries changed once (POSIX: a rename is durable once its directory is synced)."""
        directories: dict[Path, None] = {}
        for part, rec in moves:
            final = self.root / rec.path
            directories.update(dict.fromkeys(_make_dirs(final.parent, self.root)))
            os.replace(part, final)
            directories[final.parent] = None
        for directory in directories:
            self._dir_sync.sync(directory)

    def _index(self, rec: InstanceRecord, flush: bool = True) -> None:
        old = self.db.index.add(rec, flush)
        if old is not None and old != rec.path:
            (self.root / old).unlink(missing_ok=True)
        if self.on_indexed is not None:
            self.on_indexed()

    def _install_received(self, part: Path, rec: InstanceRecord) -> None:
        """Install a received instance whose file was flushed; its study stays guarded against
        deletion until the indexer has written its row (:meth:`_index_received`)."""
        self._guard.enter([rec.study_uid])
        try:
            self._install(None, part, rec)
        except BaseException:
            self._guard.leave([rec.study_uid])
            raise

    def _index_received(self, rec: InstanceRecord) -> None:
        try:
            self._index(rec, flush=False)
        finally:
            self._guard.leave([rec.study_uid])

    def index_later(self, rec: InstanceRecord, then: Callable[[InstanceRecord], None] | None = None) -> int:
        """Queue the index row of a file :meth:`IncomingInstance.finish` installed (every such
        file must be queued); return a ticket for :meth:`wait_indexed`. `then` is called with
        the record once it is indexed."""
        return self._indexer.put(rec, then)

    def wait_indexed(self, ticket: int | None = None, timeout: float = 60.0) -> bool:
        """Wait until the rows queued up to `ticket` (all queued rows when None) are indexed."""
        return self._indexer.wait(ticket, timeout)

    def import_paths(self, paths: Iterable[Path], source_ae: str = "") -> Iterator[tuple[Path, InstanceRecord | ArchiveError | OSError]]:
        """Import files and folders (recursively); yields (path, record or error) per file.

        Only regular files are read: a FIFO, a device, a socket or a symbolic link (not
        followed, also inside a folder) is refused without being opened (:func:`regular_file`)."""
        for path in paths:
            path = Path(path)
            files = sorted(path.rglob("*")) if path.is_dir() else [path]
            for f in files:
                if f.name == "DICOMDIR":
                    continue
                result: InstanceRecord | ArchiveError | OSError
                try:
                    if stat.S_ISDIR(os.lstat(f).st_mode):
                        continue
                    with regular_file(f) as opened:
                        result = self.store_part10(opened, source_ae)
                except (ArchiveError, OSError) as exc:
                    result = exc
                yield f, result

    # -- deleting studies (docs/design.md "Disk clean-up") -------------------------------------------

    def delete_study(self, study_uid: str, mark: Callable[[], Sequence[str] | None], timeout: float = 10.0) -> bool:
        """Delete a study's files and index rows, crash-safe; whether it was deleted.

        No instance is installed into the study meanwhile (an association storing into it waits),
        and none whose row is still on its way is overlooked: the deletion starts once they are
        indexed (within `timeout`, else the study stays). `mark()` checks once more that the
        study may go and records its instances as being deleted in one transaction, returning
        the relative paths of their files (or None: it stays); the files are removed and their
        directories synced, then the rows removed in one transaction."""
        if not self._guard.begin_delete(study_uid, timeout):
            return False
        try:
            paths = mark()
            if paths is None:
                return False
            self._delete_marked(study_uid, paths)
            return True
        finally:
            self._guard.end_delete(study_uid)

    def finish_deletions(self) -> int:
        """Finish the deletions a crash interrupted (at start, before anything is indexed again);
        how many studies."""
        pending = self.db.retention.pending_deletions()
        for study_uid, paths in pending.items():
            LOG.warning("archive: finishing the deletion of study %s (%d file(s)) an earlier stop interrupted",
                        study_uid, len(paths))
            self._delete_marked(study_uid, paths)
        return len(pending)

    def _delete_marked(self, study_uid: str, paths: Sequence[str]) -> None:
        """Remove the marked files and the directories left empty, make that durable (a file
        that came back after a power cut would be indexed again), then the rows and marks."""
        series_dirs = dict.fromkeys((self.root / p).parent for p in paths)
        for p in paths:
            (self.root / p).unlink(missing_ok=True)
        to_sync: dict[Path, None] = {}
        for d in (*series_dirs, *dict.fromkeys(d.parent for d in series_dirs)):
            try:
                d.rmdir()
            except FileNotFoundError:
                pass
            except OSError:  # not empty: instances of the study that are not deleted
                to_sync[d] = None
            else:
                to_sync[d.parent] = None
        for d in to_sync:
            if d.is_dir():
                self._dir_sync.sync(d)
        self.db.retention.finish_deleting(study_uid)

    def reconcile(self) -> int:
        """Index archive files that a crash left unindexed (and read again those indexed before
        the Query/Retrieve keys were), delete stale temporaries; return how many were unindexed."""
        for part in self.tmp_dir.glob("*.part"):
            part.unlink(missing_ok=True)
        self.finish_deletions()  # first: no file of a study being deleted is indexed again
        known = self.db.index.paths()
        added = 0
        # rows indexed before the Query/Retrieve keys were (schema version 7) are read again
        stale = set(self.db.index.paths_without_keys())
        for f in self.root.glob("*/*/*.dcm"):
            rel = f.relative_to(self.root).as_posix()
            if rel in known and rel not in stale:
                continue
            try:
                ds = read_header(f)
                rec = record_from_dataset(ds, rel, f.stat().st_size, "")
                rec.source_ae = str(ds.file_meta.get("SourceApplicationEntityTitle", ""))
                if self.path_for(rec) != rel:
                    raise DatasetMismatch("file name does not match its UIDs")
                indexed = self.db.index.instance(rec.sop_instance_uid) if rel in stale else None
                if indexed is not None:  # read again for its keys: it keeps when it came, and from whom
                    rec.received_at, rec.source_ae = indexed.received_at, indexed.source_ae
                self._index(rec)
                added += rel not in known
            except ArchiveError as exc:
                LOG.error("archive: %s is not a valid archive file (%s); left in place", rel, exc)
        return added


#: Pixel data elements (PS3.6 group 7FE0): deferred by :func:`read_header`, never indexed.
_PIXEL_DATA = (0x7FE00008, 0x7FE00009, 0x7FE00010)


#: What an entry of a folder is when it is not a regular file or a folder (lstat(2) types).
_FILE_KINDS = ((stat.S_ISLNK, "a symbolic link"), (stat.S_ISFIFO, "a FIFO"), (stat.S_ISSOCK, "a socket"),
               (stat.S_ISCHR, "a character device"), (stat.S_ISBLK, "a block device"))


def file_kind(path: str | os.PathLike[str]) -> str | None:
    """None for a regular file or a folder, else what `path` itself is ("a FIFO"...): its
    lstat, so a symbolic link is not followed and nothing is opened."""
    mode = os.lstat(path).st_mode
    if stat.S_ISREG(mode) or stat.S_ISDIR(mode):
        return None
    return next((name for is_kind, name in _FILE_KINDS if is_kind(mode)), "not a regular file")


@contextmanager
def regular_file(path: Path) -> Iterator[Path]:
    """Open `path` for reading only when it is a regular file, and yield a name of the open
    file (``/proc/self/fd/N``: the same file even if `path` is replaced meanwhile).

    Anything else is refused with :class:`CannotUnderstand` naming it, never opened for
    reading: its lstat is looked at first, and the open (non-blocking, not following a
    symbolic link) is checked once more with fstat."""
    kind = file_kind(path)
    if kind is not None or stat.S_ISDIR(os.lstat(path).st_mode):
        raise CannotUnderstand(f"{path} is {kind or 'a folder'}, not a regular file")
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | os.O_NOFOLLOW | os.O_CLOEXEC)
    except OSError as exc:
        if exc.errno != errno.ELOOP:
            raise
        raise CannotUnderstand(f"{path} is a symbolic link, not a regular file") from None
    try:
        if not stat.S_ISREG(os.fstat(fd).st_mode):
            raise CannotUnderstand(f"{path} is not a regular file")
        yield Path(f"/proc/self/fd/{fd}")
    finally:
        os.close(fd)


def validate_received(source: str | bytes, source_ae: str) -> InstanceRecord:
    """The index row of a received or imported file (its path, or its bytes), its path left to
    :meth:`Archive.path_for`: by :func:`lean_record` when it can tell, else by
    :func:`pydicom_record`."""
    rec = lean_record(source, source_ae)
    return rec if rec is not None else pydicom_record(source, source_ae)


def pydicom_record(source: str | bytes, source_ae: str) -> InstanceRecord:
    """The index row of a file by :func:`read_header` (complete), :func:`check_file_meta` (its
    File Meta, for a received file built from the C-STORE-RQ, describes the data set) and
    :func:`record_from_dataset` (valid UIDs). The pixel data are dropped before the record is
    made: looking at every element for the character set would read them back from the file."""
    ds = read_header(Path(source) if isinstance(source, str) else source)
    check_file_meta(ds)
    for tag in _PIXEL_DATA:
        if tag in ds:
            del ds[tag]
    return record_from_dataset(ds, "", 0, source_ae)


@dataclass
class Staged:
    """A file written to the archive's tmp folder, its fdatasync under way (`synced`)."""

    part: Path
    rec: InstanceRecord
    synced: "Future[None]"


def _fdatasync_path(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fdatasync(fd)
    finally:
        os.close(fd)


def _copy_from(src: Path, offset: int, fd: int) -> None:
    """Append the bytes of `src` from `offset` on to the file `fd`, in the kernel (sendfile)."""
    with open(src, "rb") as fin:
        remaining = os.fstat(fin.fileno()).st_size - offset
        while remaining > 0:
            sent = os.sendfile(fd, fin.fileno(), offset, remaining)
            if sent == 0:
                raise CannotUnderstand(f"{src} shrank while it was copied")
            offset += sent
            remaining -= sent


def _make_dirs(directory: Path, root: Path) -> list[Path]:
    """Create `directory` and its missing parents below `root`; return the parents whose
    entries changed (each must be fsynced for the new directory to survive a crash)."""
    missing = []
    d = directory
    while d != root and not d.is_dir():
        missing.append(d)
        d = d.parent
    changed = []
    for d in reversed(missing):
        try:
            d.mkdir()
        except FileExistsError:  # another association made it meanwhile
            continue
        changed.append(d.parent)
    return changed


class IncomingInstance:
    """A C-STORE data set being received: written to ``.tmp/<random>.part`` after a File Meta
    group built from the C-STORE-RQ and the presentation context, never decoded, never copied.

    Fragments go to :meth:`write` as they arrive; :meth:`finish` validates the file with
    :func:`validate_received` (complete; the data set's SOP Class and Instance UIDs are the
    C-STORE-RQ's Affected ones; valid UIDs), then makes it durable under its final name.
    :meth:`discard` removes it at once (an aborted association).
    """

    #: Free space is checked again after every this many bytes of one data set.
    SPACE_CHECK_BYTES = 64 << 20

    def __init__(self, archive: Archive, sop_class: str, sop_instance: str, transfer_syntax: str,
                 source_ae: str) -> None:
        self.archive = archive
        self.source_ae = source_ae
        self.part = archive.tmp_dir / f"{uuid.uuid4().hex}.part"
        self.error: ArchiveError | None = None
        self._unchecked = 0
        try:
            self._file: BinaryIO | None = open(self.part, "wb")
        except OSError as exc:
            raise archive._no_space(exc) from None
        self.write(encode_file_meta(sop_class, sop_instance, transfer_syntax, source_ae))

    def write(self, data: bytes | memoryview) -> None:
        """Append a fragment; after a failure (disk full) the rest is dropped, and
        :meth:`finish` raises that failure."""
        if self._file is None:
            return
        try:
            self._file.write(data)
            self._unchecked += len(data)
            if self._unchecked > self.SPACE_CHECK_BYTES:
                self._unchecked = 0
                self.archive.check_space()
        except OSError as exc:
            error = self.archive._no_space(exc)
            self._fail(error if isinstance(error, DiskFull)
                       else CannotUnderstand(f"cannot write the data set: {exc.strerror or exc}"))
        except ArchiveError as exc:
            self._fail(exc)

    def _fail(self, error: ArchiveError) -> None:
        self.error = error
        self.discard()

    def discard(self) -> None:
        """Remove the partial file now."""
        if self._file is not None:
            try:
                self._file.close()
            except OSError:
                pass
            self._file = None
        self.part.unlink(missing_ok=True)

    def finish(self) -> InstanceRecord:
        """Validate and install the complete data set; raise :class:`ArchiveError` (nothing
        kept) when it is refused. The index row is queued (:meth:`Archive.index_later`)."""
        if self.error is not None or self._file is None:
            self.discard()
            raise self.error or CannotUnderstand("the data set was discarded")
        try:
            self._file.flush()
            # The data goes to disk while the header is checked (a thread waiting in fdatasync
            # does not hold the GIL); a refused file was flushed for nothing, and is removed.
            synced = _flusher().submit(os.fdatasync, self._file.fileno())
            try:
                rec = validate_received(str(self.part), self.source_ae)
            finally:
                synced.result()
            rec.path = self.archive.path_for(rec)
            rec.size = self._file.tell()
            self.archive._install_received(self.part, rec)
        except OSError as exc:
            self.discard()
            raise self.archive._no_space(exc) from None
        except BaseException:
            self.discard()
            raise
        self._file.close()
        self._file = None
        return rec


_FLUSHER: ThreadPoolExecutor | None = None
_FLUSHER_LOCK = threading.Lock()


def _flusher() -> ThreadPoolExecutor:
    """Threads that wait in fdatasync for the receiving threads."""
    global _FLUSHER
    with _FLUSHER_LOCK:
        if _FLUSHER is None:
            _FLUSHER = ThreadPoolExecutor(max_workers=8, thread_name_prefix="archive-fdatasync")
        return _FLUSHER


class StudyGuard:
    """Installs into a study against its deletion (docs/design.md "Disk clean-up"): an install
    counts from the rename of its file until its index row is written; a deletion waits until
    none counts, and installs into the study wait until the deletion has ended."""

    def __init__(self) -> None:
        self._cond = threading.Condition()
        self._installing: dict[str, int] = {}
        self._deleting: set[str] = set()

    def enter(self, study_uids: Iterable[str]) -> None:
        studies = sorted(set(study_uids))
        with self._cond:
            self._cond.wait_for(lambda: self._deleting.isdisjoint(studies))
            for uid in studies:
                self._installing[uid] = self._installing.get(uid, 0) + 1

    def leave(self, study_uids: Iterable[str]) -> None:
        with self._cond:
            for uid in set(study_uids):
                left = self._installing.get(uid, 0) - 1
                if left > 0:
                    self._installing[uid] = left
                else:
                    self._installing.pop(uid, None)
            self._cond.notify_all()

    @contextmanager
    def installing(self, study_uids: Iterable[str]) -> Iterator[None]:
        studies = list(study_uids)
        self.enter(studies)
        try:
            yield
        finally:
            self.leave(studies)

    def begin_delete(self, study_uid: str, timeout: float) -> bool:
        """Hold new installs into the study and wait for those under way; False (and nothing
        held) when they have not ended within `timeout` seconds."""
        with self._cond:
            if study_uid in self._deleting:
                return False
            self._deleting.add(study_uid)
            if self._cond.wait_for(lambda: study_uid not in self._installing, timeout):
                return True
            self._deleting.discard(study_uid)
            self._cond.notify_all()
            return False

    def end_delete(self, study_uid: str) -> None:
        with self._cond:
            self._deleting.discard(study_uid)
            self._cond.notify_all()


class DirectorySync:
    """fsync of a directory after names were renamed into it (POSIX: a rename is durable once
    its directory is synced). Callers whose rename happened before a sync started share that
    sync: concurrent associations writing into one series folder pay one fsync (group commit)."""

    def __init__(self) -> None:
        self._cond = threading.Condition()
        #: directory -> [renames requested, renames covered by a finished sync, a sync running]
        self._state: dict[Path, list] = {}

    def sync(self, directory: Path) -> None:
        with self._cond:
            state = self._state.setdefault(directory, [0, 0, False])
            state[0] += 1
            ticket = state[0]
            while state[1] < ticket:
                if state[2]:
                    self._cond.wait()
                    continue
                state[2] = True
                target = state[0]
                self._cond.release()
                try:
                    fd = os.open(directory, os.O_RDONLY | os.O_DIRECTORY)
                    try:
                        os.fsync(fd)
                    finally:
                        os.close(fd)
                finally:
                    self._cond.acquire()
                    state[2] = False
                    self._cond.notify_all()
                state[1] = target
            if state[0] == state[1] and not state[2] and self._state.get(directory) is state:
                del self._state[directory]


class Indexer:
    """One thread that writes index rows after their files are durable, so that a C-STORE
    response waits for the file only (docs/design.md "The listening side"). A crash before the
    row is written leaves a complete unindexed file, which :meth:`Archive.reconcile` indexes."""

    def __init__(self, index: Callable[[InstanceRecord], None]) -> None:
        self._index = index
        self._cond = threading.Condition()
        self._queue: deque[tuple[int, InstanceRecord, Callable[[InstanceRecord], None] | None]] = deque()
        self._queued = 0
        self._done = 0
        self._thread: threading.Thread | None = None

    def put(self, rec: InstanceRecord, then: Callable[[InstanceRecord], None] | None) -> int:
        with self._cond:
            self._queued += 1
            self._queue.append((self._queued, rec, then))
            if self._thread is None:
                self._thread = threading.Thread(target=self._run, name="archive-indexer", daemon=True)
                self._thread.start()
            self._cond.notify_all()
            return self._queued

    def wait(self, ticket: int | None, timeout: float) -> bool:
        with self._cond:
            target = self._queued if ticket is None else ticket
            return self._cond.wait_for(lambda: self._done >= target, timeout)

    def _run(self) -> None:
        while True:
            with self._cond:
                self._cond.wait_for(lambda: bool(self._queue))
                ticket, rec, then = self._queue.popleft()
            try:
                self._index(rec)
                if then is not None:
                    then(rec)
            except Exception:  # the file is durable; the next start's reconcile indexes it
                LOG.exception("archive: indexing %s failed; reconcile will index it at the next start",
                              rec.path)
            with self._cond:
                self._done = ticket
                self._cond.notify_all()

