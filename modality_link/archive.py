"""The local disk archive: DICOM files by UID under the home folder, indexed in SQLite.

A file enters the archive in three steps (DESIGN.md "Persistence"): it is written to a temporary
name on the archive's file system and fsynced, renamed to its final name, and only then indexed.
A crash at any point leaves either no file, an unindexed complete file (found again by
:meth:`Archive.reconcile`), or an indexed complete file: never a half-written archive file.

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
import os
import re
import shutil
import struct
import uuid
import zlib
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO, Callable, Iterable, Iterator

from pydicom import dcmread
from pydicom.dataset import Dataset
from pydicom.errors import InvalidDicomError
from pydicom.uid import UID, DeflatedExplicitVRLittleEndian
from pydicom.valuerep import VR

from modality_link import IMPLEMENTATION_CLASS_UID, IMPLEMENTATION_VERSION_NAME
from modality_link.db import Database, InstanceRecord
from modality_link.net.charset import dataset_charset, decoded_text, text_of

LOG = logging.getLogger("modality_link.archive")

_UID = re.compile(r"^(0|[1-9][0-9]*)(\.(0|[1-9][0-9]*))*$")

#: Storage status codes (PS3.4 Annex B.2.3, PS3.7 Annex C).
STATUS_OUT_OF_RESOURCES = 0xA700
STATUS_DATASET_MISMATCH = 0xA900
STATUS_CANNOT_UNDERSTAND = 0xC000


class ArchiveError(Exception):
    """Storing failed; `status` is the DICOM status to answer with (PS3.4 B.2.3)."""

    status = STATUS_CANNOT_UNDERSTAND


class DiskFull(ArchiveError):
    status = STATUS_OUT_OF_RESOURCES


class DatasetMismatch(ArchiveError):
    status = STATUS_DATASET_MISMATCH


class CannotUnderstand(ArchiveError):
    status = STATUS_CANNOT_UNDERSTAND


def is_valid_uid(uid: object) -> bool:
    """True if `uid` is a UID by PS3.5 §9.1 (1-64 characters, digits and dots)."""
    return isinstance(uid, str) and 0 < len(uid) <= 64 and _UID.match(uid) is not None


def checked_uid(uid: object, what: str) -> str:
    """Return `uid` if valid, else raise :class:`DatasetMismatch` naming the attribute."""
    if not is_valid_uid(uid):
        shown = repr(uid)[:80]
        raise DatasetMismatch(f"{what} {shown} is not a valid UID (PS3.5 9.1)")
    return str(uid)


def _meta_end(fp: BinaryIO) -> int:
    """Offset of the first dataset byte of a PS3.10 file (after the File Meta group)."""
    fp.seek(0)
    head = fp.read(144)
    if len(head) < 144 or head[128:132] != b"DICM" or head[132:136] != b"\x02\x00\x00\x00":
        raise CannotUnderstand("not a PS3.10 file (no DICM prefix and group length)")
    # (0002,0000) UL, explicit VR little endian: tag, 'UL', length 4, value
    (group_length,) = struct.unpack("<I", head[140:144])
    return 144 + group_length


def _text(ds: Dataset, keyword: str) -> str:
    return text_of(ds.get(keyword, ""))


def read_header(path: Path) -> Dataset:
    """Read the dataset of a PS3.10 file without its pixel data, and check it is complete.

    Large values are skipped (deferred) rather than read; a value that runs past the end of the
    file, or bytes after the last element, make the dataset incomplete. For a deflated dataset
    (PS3.5 A.5) the positions are those of the inflated stream, which must end where the
    deflate stream does (at most 8 bytes may follow it: a pad byte, or a gzip trailer).
    """
    size = path.stat().st_size
    try:
        with open(path, "rb") as fp:
            ds = dcmread(fp, defer_size=4096)
            end = fp.tell()
            last = ds._dict[max(ds._dict)] if ds._dict else None
            syntax = ds.file_meta.get("TransferSyntaxUID")
            if syntax == DeflatedExplicitVRLittleEndian:
                size = end = _inflated_size(fp, _meta_end(fp))
            elif syntax and not UID(syntax).is_implicit_VR and ds._dict:
                fp.seek(_meta_end(fp) + 4)
                _check_explicit_vr(fp.read(2), UID(syntax))
    except (InvalidDicomError, EOFError, ValueError, KeyError, struct.error, OSError, zlib.error) as exc:
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


_VRS = frozenset(vr.value.encode("ascii") for vr in VR)


def _check_explicit_vr(vr: bytes, syntax: UID) -> None:
    """The first element of a data set in an explicit VR transfer syntax names its VR (PS3.5
    7.1.2). Some writers put an Implicit VR data set under an explicit syntax: pydicom guesses
    its way through such a file, but the peers we pass it to do not (DCMTK reads garbage)."""
    if vr not in _VRS:
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


def record_from_dataset(ds: Dataset, path: str, size: int, source_ae: str) -> InstanceRecord:
    """The index row for `ds` (the dataset's own UIDs, each checked).

    Text is stored as Unicode, decoded in the character set that really fits the bytes
    (:func:`modality_link.net.charset.dataset_charset`: misspelled terms corrected, a missing one
    guessed); the charset column keeps the declared (0008,0005).
    """
    charset = _text(ds, "SpecificCharacterSet")
    terms = dataset_charset(ds)
    return InstanceRecord(
        sop_instance_uid=checked_uid(ds.get("SOPInstanceUID"), "SOP Instance UID (0008,0018)"),
        sop_class_uid=checked_uid(ds.get("SOPClassUID"), "SOP Class UID (0008,0016)"),
        series_uid=checked_uid(ds.get("SeriesInstanceUID"), "Series Instance UID (0020,000E)"),
        study_uid=checked_uid(ds.get("StudyInstanceUID"), "Study Instance UID (0020,000D)"),
        transfer_syntax=str(ds.file_meta.TransferSyntaxUID),
        path=path,
        size=size,
        patient_id=decoded_text(ds, "PatientID", terms),
        patient_name=decoded_text(ds, "PatientName", terms),
        birth_date=decoded_text(ds, "PatientBirthDate", terms),
        sex=decoded_text(ds, "PatientSex", terms),
        study_date=decoded_text(ds, "StudyDate", terms),
        study_time=decoded_text(ds, "StudyTime", terms),
        accession=decoded_text(ds, "AccessionNumber", terms),
        study_id=decoded_text(ds, "StudyID", terms),
        study_description=decoded_text(ds, "StudyDescription", terms),
        referring_physician=decoded_text(ds, "ReferringPhysicianName", terms),
        charset=charset,
        modality=decoded_text(ds, "Modality", terms),
        series_number=decoded_text(ds, "SeriesNumber", terms),
        series_description=decoded_text(ds, "SeriesDescription", terms),
        body_part=decoded_text(ds, "BodyPartExamined", terms),
        instance_number=decoded_text(ds, "InstanceNumber", terms),
        source_ae=source_ae,
    )


def _element(group: int, elem: int, vr: bytes, value: bytes) -> bytes:
    """One explicit VR little endian element (PS3.5 §7.1.2)."""
    if vr in (b"OB", b"OW", b"UN", b"SQ", b"UT", b"UC", b"UR"):
        return struct.pack("<HH2s2xI", group, elem, vr, len(value)) + value
    return struct.pack("<HH2sH", group, elem, vr, len(value)) + value


def _padded(text: str, pad: bytes) -> bytes:
    raw = text.encode("ascii", "replace")
    return raw + pad if len(raw) % 2 else raw


def encode_file_meta(sop_class: str, sop_instance: str, transfer_syntax: str, source_ae: str) -> bytes:
    """Preamble, prefix and File Meta Information (PS3.10 §7.1) with our implementation identity.

    Encoded by hand (seven elements, explicit VR little endian): it is written for every received
    instance, and pydicom's general encoder costs more than the rest of the copy.
    """
    body = b"".join(
        [
            _element(0x0002, 0x0001, b"OB", b"\x00\x01"),
            _element(0x0002, 0x0002, b"UI", _padded(sop_class, b"\x00")),
            _element(0x0002, 0x0003, b"UI", _padded(sop_instance, b"\x00")),
            _element(0x0002, 0x0010, b"UI", _padded(transfer_syntax, b"\x00")),
            _element(0x0002, 0x0012, b"UI", _padded(IMPLEMENTATION_CLASS_UID, b"\x00")),
            _element(0x0002, 0x0013, b"SH", _padded(IMPLEMENTATION_VERSION_NAME, b" ")),
            _element(0x0002, 0x0016, b"AE", _padded(source_ae.strip(), b" ")) if source_ae.strip() else b"",
        ]
    )
    return b"\x00" * 128 + b"DICM" + _element(0x0002, 0x0000, b"UL", struct.pack("<I", len(body))) + body


@dataclass
class Archive:
    """Files under `root`, indexed in `db`."""

    root: Path
    db: Database
    min_free_mb: int = 512
    #: Called with (code, message) when the operator must be told (disk full...).
    on_alert: Callable[[str, str], None] | None = None

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

    def _disk_full(self, detail: str) -> DiskFull:
        msg = f"archive disk full: {detail}"
        if self.on_alert:
            self.on_alert("disk-full", msg)
        return DiskFull(msg)

    def store_part10(self, src: Path, source_ae: str, expected_uid: str | None = None) -> InstanceRecord:
        """Archive the PS3.10 file `src` (a received dataset or a file to import).

        The dataset bytes are copied unchanged after a File Meta group of our own.
        `expected_uid` is the C-STORE's Affected SOP Instance UID, which must match the dataset's.
        """
        self.check_space()
        ds = read_header(src)
        if expected_uid is None:  # a file to import: its own File Meta must describe it
            check_file_meta(ds)
        rec = record_from_dataset(ds, "", 0, source_ae)
        if expected_uid is not None:  # received: the C-STORE-RQ names what it carries
            for what, mine, theirs in (
                ("SOP Instance UID", rec.sop_instance_uid, expected_uid),
                ("SOP Class UID", rec.sop_class_uid, str(ds.file_meta.get("MediaStorageSOPClassUID", rec.sop_class_uid))),
            ):
                if mine != theirs:
                    raise DatasetMismatch(
                        f"{what} in the dataset ({mine}) differs from the C-STORE's Affected {what} ({theirs})"
                    )
        rec.path = self.path_for(rec)
        meta = encode_file_meta(rec.sop_class_uid, rec.sop_instance_uid, rec.transfer_syntax, source_ae)
        final = self.root / rec.path
        part = self.tmp_dir / f"{uuid.uuid4().hex}.part"
        try:
            with open(src, "rb") as fin, open(part, "wb") as fout:
                start = _meta_end(fin)
                fout.write(meta)
                fout.flush()
                fin.seek(start)
                remaining = os.fstat(fin.fileno()).st_size - start
                offset = start
                while remaining > 0:
                    sent = os.sendfile(fout.fileno(), fin.fileno(), offset, remaining)
                    if sent == 0:
                        raise CannotUnderstand("source file shrank while it was copied")
                    offset += sent
                    remaining -= sent
                os.fsync(fout.fileno())
                rec.size = os.fstat(fout.fileno()).st_size
            final.parent.mkdir(parents=True, exist_ok=True)
            os.replace(part, final)
        except OSError as exc:
            part.unlink(missing_ok=True)
            if exc.errno in (errno.ENOSPC, errno.EDQUOT):
                raise self._disk_full(str(exc)) from None
            raise
        except BaseException:
            part.unlink(missing_ok=True)
            raise
        old = self.db.index_instance(rec)
        if old is not None and old != rec.path:
            (self.root / old).unlink(missing_ok=True)
        return rec

    def import_paths(self, paths: Iterable[Path], source_ae: str = "") -> Iterator[tuple[Path, InstanceRecord | Exception]]:
        """Import files and folders (recursively); yields (path, record or error) per file."""
        for path in paths:
            path = Path(path)
            files = sorted(p for p in path.rglob("*") if p.is_file()) if path.is_dir() else [path]
            for f in files:
                if f.name == "DICOMDIR":
                    continue
                try:
                    yield f, self.store_part10(f, source_ae)
                except (ArchiveError, OSError) as exc:
                    yield f, exc

    def reconcile(self) -> int:
        """Index archive files that a crash left unindexed, and delete stale temporaries."""
        for part in self.tmp_dir.glob("*.part"):
            part.unlink(missing_ok=True)
        known = self.db.instance_paths()
        added = 0
        for f in self.root.glob("*/*/*.dcm"):
            rel = f.relative_to(self.root).as_posix()
            if rel in known:
                continue
            try:
                ds = read_header(f)
                rec = record_from_dataset(ds, rel, f.stat().st_size, "")
                rec.source_ae = str(ds.file_meta.get("SourceApplicationEntityTitle", ""))
                if self.path_for(rec) != rel:
                    raise DatasetMismatch("file name does not match its UIDs")
                self.db.index_instance(rec)
                added += 1
            except ArchiveError as exc:
                LOG.error("archive: %s is not a valid archive file (%s); left in place", rel, exc)
        return added
