"""DICOM File-set (PS3.10 §8) and its DICOMDIR (Basic Directory IOD, PS3.3 A.38, F.3, F.5).

The record tree is built with plain dicts (patient -> study -> series ->
instances) and the record offsets are computed here in two passes, so that
building a DICOMDIR is linear in the number of instances. The File Meta
Information of every file is encoded by :mod:`modality_link.fileformat`.

Record Offsets (PS3.3 F.3.2.2) count bytes from the first byte of the file,
i.e. from the first byte of the File Preamble, which PS3.10 §7.1 makes part
of the File Meta Information.
"""

from __future__ import annotations

import datetime
import logging
import os
import re
import struct
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from functools import lru_cache
from pathlib import Path

from pydicom.dataelem import DataElement
from pydicom.dataset import Dataset
from pydicom.filebase import DicomBytesIO
from pydicom.filewriter import write_data_element
from pydicom.sequence import Sequence as PydicomSequence
from pydicom.fileset import _FOUR_LEVEL_SOP_CLASSES, _SINGLE_LEVEL_SOP_CLASSES
from pydicom.uid import UID, ExplicitVRLittleEndian, MediaStorageDirectoryStorage, generate_uid

from modality_link.fileformat import (
    MEDIA_STORAGE_SOP_CLASS_UID, MEDIA_STORAGE_SOP_INSTANCE_UID, TRANSFER_SYNTAX_UID, encode_element, encode_file_meta,
    meta_value,
)
from modality_link.media.header import Header, read_header, tag_of, vr_of
from modality_link.media.options import MediaError
from modality_link.media.profiles import COPY, Profile, action_for, output_transfer_syntax
from modality_link.net.charset import python_encodings

LOGGER = logging.getLogger(__name__)

#: Maximum number of components of a File ID (PS3.10 §8.5, PS3.12 F.3.2).
MAX_FILE_ID_COMPONENTS = 8
#: Maximum length of one File ID component.
MAX_COMPONENT_LENGTH = 8
#: Top-level directory that holds the instances.
DATA_DIRECTORY = "DICOM"

# Keys copied into each Directory Record: (keyword, record key type), PS3.3 F.5.
# Type 1 must have a value (invented when the source lacks it, see :class:`Inventor`), type 2 is
# present (maybe empty), type 3 and 1C only if present in the instance. No private attribute is
# ever copied.
PATIENT_KEYS: tuple[tuple[str, int], ...] = (
    ("PatientName", 2),
    ("PatientID", 1),
    ("PatientBirthDate", 3),
    ("PatientSex", 3),
)
STUDY_KEYS: tuple[tuple[str, int], ...] = (
    ("StudyDate", 1),
    ("StudyTime", 1),
    ("AccessionNumber", 2),
    ("StudyDescription", 2),
    ("StudyInstanceUID", 1),
    ("StudyID", 1),
)
SERIES_KEYS: tuple[tuple[str, int], ...] = (
    ("Modality", 1),
    ("SeriesDescription", 3),
    ("SeriesInstanceUID", 1),
    ("SeriesNumber", 1),
)
# Content Identification (PS3.3 10.9) keys shared by several record types.
_CONTENT_ID: tuple[tuple[str, int], ...] = (
    ("ContentDate", 1), ("ContentTime", 1), ("InstanceNumber", 1), ("ContentLabel", 1),
    ("ContentDescription", 2), ("ContentCreatorName", 2),
)
_CONTENT_DATE_TIME = (("ContentDate", 1), ("ContentTime", 1))
#: Keys of the instance-level records, by Directory Record Type (PS3.3 F.5.4-F.5.x, Table F.4-1),
#: the same keys pydicom's ``pydicom.fileset.DIRECTORY_RECORDERS`` and DCMTK's dcmmkdir write.
INSTANCE_KEYS: dict[str, tuple[tuple[str, int], ...]] = {
    "IMAGE": (("ImageType", 3), ("InstanceNumber", 1), ("Rows", 3), ("Columns", 3)),
    "RT DOSE": (("InstanceNumber", 1), ("DoseSummationType", 1), ("DoseComment", 3)),
    "RT STRUCTURE SET": (
        ("InstanceNumber", 1), ("StructureSetLabel", 1), ("StructureSetDate", 2), ("StructureSetTime", 2),
    ),
    "RT PLAN": (("InstanceNumber", 1), ("RTPlanLabel", 1), ("RTPlanDate", 2), ("RTPlanTime", 2)),
    "RT TREAT RECORD": (("InstanceNumber", 1), ("TreatmentDate", 2), ("TreatmentTime", 2)),
    "PRESENTATION": (
        ("PresentationCreationDate", 1),
        ("PresentationCreationTime", 1),
        ("InstanceNumber", 1),
        ("ContentLabel", 1),
        ("ContentDescription", 2),
        ("ContentCreatorName", 2),
        ("ReferencedSeriesSequence", 3),
    ),
    "WAVEFORM": (("InstanceNumber", 1), *_CONTENT_DATE_TIME),
    "SR DOCUMENT": (
        *_CONTENT_DATE_TIME,
        ("InstanceNumber", 1),
        ("ConceptNameCodeSequence", 1),
        ("CompletionFlag", 1),
        ("VerificationFlag", 1),
        ("VerificationDateTime", 3),  # 1C: from the last Verifying Observer (PS3.3 F.5.x), see _record
    ),
    "KEY OBJECT DOC": (*_CONTENT_DATE_TIME, ("InstanceNumber", 1), ("ConceptNameCodeSequence", 1)),
    "SPECTROSCOPY": (
        ("ImageType", 1), *_CONTENT_DATE_TIME, ("InstanceNumber", 1), ("NumberOfFrames", 1), ("Rows", 1),
        ("Columns", 1), ("DataPointRows", 1), ("DataPointColumns", 1),
    ),
    "RAW DATA": (*_CONTENT_DATE_TIME, ("InstanceNumber", 2)),
    "REGISTRATION": _CONTENT_ID,
    "FIDUCIAL": _CONTENT_ID,
    "ENCAP DOC": (
        ("ContentDate", 2),
        ("ContentTime", 2),
        ("InstanceNumber", 1),
        ("ConceptNameCodeSequence", 2),
        ("DocumentTitle", 2),
        ("HL7InstanceIdentifier", 3),
        ("MIMETypeOfEncapsulatedDocument", 1),
    ),
    "VALUE MAP": _CONTENT_ID,
    "STEREOMETRIC": (),
    "PLAN": (),
    "MEASUREMENT": _CONTENT_ID,
    "SURFACE": _CONTENT_ID,
    "SURFACE SCAN": _CONTENT_DATE_TIME,
    "TRACT": _CONTENT_ID,
    "ASSESSMENT": (("InstanceNumber", 1), ("InstanceCreationDate", 1), ("InstanceCreationTime", 2)),
    "RADIOTHERAPY": (
        ("InstanceNumber", 1), ("UserContentLabel", 3), ("UserContentLongLabel", 3),
        ("ContentDescription", 2), ("ContentCreatorName", 2),
    ),
    "ANNOTATION": _CONTENT_ID,
    #: PRIVATE records (PS3.3 F.5.x) carry the Private Record UID (0004,1432) only.
    "PRIVATE": (),
}

#: Keys read from each instance to invent a missing Type 1 date or time (dcmmkdir --invent).
_DATE_TIME_SOURCES = ("SeriesDate", "SeriesTime", "AcquisitionDate", "AcquisitionTime", "InstanceCreationDate",
                      "InstanceCreationTime")

#: Record keys whose value an instance holds in the last item of a sequence (PS3.3 C.17.2:
#: Verification DateTime of the last Verifying Observer is the SR's).
_FROM_LAST_ITEM = {"VerificationDateTime": "VerifyingObserverSequence"}

_HEADER_KEYWORDS: list[str] = sorted(
    {*_FROM_LAST_ITEM.values(), "SOPClassUID", "SOPInstanceUID", "SpecificCharacterSet", "NumberOfFrames", "SamplesPerPixel", "BitsAllocated",
     "Rows", "Columns", "PhotometricInterpretation", "ImagePositionPatient", "ImageOrientationPatient",
     "FrameOfReferenceUID", "PixelSpacing", *_DATE_TIME_SOURCES}
    | {k for keys in (PATIENT_KEYS, STUDY_KEYS, SERIES_KEYS) for k, _ in keys}
    | {k for keys in INSTANCE_KEYS.values() for k, _ in keys}
)
_HEADER_TAGS: frozenset[int] = frozenset(tag_of(k) for k in _HEADER_KEYWORDS)
_BINARY_VRS = frozenset({"US", "SS", "UL", "SL", "FL", "FD", "AT"})  # a zero or 0x20 byte is a value
#: Record types that are not placed under a SERIES (PS3.3 Table F.4-1): top-level records.
SINGLE_LEVEL_RECORDS = frozenset(_SINGLE_LEVEL_SOP_CLASSES.values())


@lru_cache(maxsize=256)
def record_type(sop_class_uid: str, modality: str = "", is_image: bool = False) -> str:
    """Directory Record Type (0004,1430) for an instance (PS3.3 F.4, Table F.4-1).

    pydicom's own tables (``pydicom.fileset``) first, with its rules for the Radiotherapy and
    Procedure Protocol modalities; then the record type named by the SOP Class ("... Plan
    Storage", "... SR Storage", "Encapsulated ..."); an image IOD (``is_image``: it has Rows) is
    an ``IMAGE``; anything else, notably a private SOP Class, a ``PRIVATE`` record (PS3.3 F.5.x).
    Single-level types (HANGING PROTOCOL, PALETTE, IMPLANT...) are returned as such; they have no
    place under a series (see :func:`read_instance`).
    """
    uid = UID(sop_class_uid)
    if uid in _SINGLE_LEVEL_SOP_CLASSES:
        return _SINGLE_LEVEL_SOP_CLASSES[uid]
    if modality in ("RTINTENT", "RTSEGANN", "RTRAD", "RTRECORD"):
        return "RADIOTHERAPY"
    if modality == "PLAN":
        return "PLAN"
    if uid in _FOUR_LEVEL_SOP_CLASSES:
        return _FOUR_LEVEL_SOP_CLASSES[uid]
    name = uid.name
    rules = (
        (name.startswith("Encapsulated "), "ENCAP DOC"),
        (name.startswith("RT ") and name.endswith("Plan Storage"), "RT PLAN"),
        (" SR Storage" in name, "SR DOCUMENT"),
        ("Presentation State Storage" in name, "PRESENTATION"),
        ("Waveform Storage" in name, "WAVEFORM"),
        ("Annotations Storage" in name, "ANNOTATION"),
        ("Procedure Protocol Storage" in name or name == "Protocol Approval Storage", "PLAN"),
        ("Radiation" in name and sop_class_uid.startswith("1.2.840.10008.5.1.4.1.1.481."), "RADIOTHERAPY"),
        ("Image Storage" in name or (is_image and name.endswith("Storage")), "IMAGE"),
    )
    return next((rtype for matches, rtype in rules if matches), "PRIVATE")


@dataclass
class Instance:
    """What the file-set needs to know about one source Part-10 file."""

    path: Path
    header: Header  # the keys of `_HEADER_KEYWORDS` only, never pixel data
    sop_class_uid: str
    sop_instance_uid: str
    transfer_syntax_uid: str
    record_type: str
    action: str  # profiles.COPY or profiles.CONVERT
    dataset_offset: int  # byte offset of the data set (after File Meta) in the source
    source_size: int
    #: Exact size of the written file for COPY, an upper bound for CONVERT.
    output_size: int

    @property
    def patient_id(self) -> str:
        return self.header.text("PatientID")

    @property
    def patient_key(self) -> str:
        """What groups instances into one PATIENT record: the Patient ID, or the name without one."""
        return self.patient_id or "name:" + self.header.text("PatientName")

    @property
    def study_uid(self) -> str:
        return self.header.text("StudyInstanceUID")

    @property
    def series_uid(self) -> str:
        return self.header.text("SeriesInstanceUID")

    @property
    def instance_number(self) -> int:
        return self.header.integer("InstanceNumber")


def instance_head(inst: Instance, profile: Profile, source_ae_title: str) -> bytes:
    """Bytes that replace the source File Meta when `inst` is copied as is."""
    ts = output_transfer_syntax(inst.transfer_syntax_uid, profile, inst.record_type == "IMAGE")
    return encode_file_meta(inst.sop_class_uid, inst.sop_instance_uid, ts, source_ae_title)


def read_instance(path: Path, profile: Profile, source_ae_title: str = "MODLINK") -> Instance | None:
    """Read the header keys of the Part-10 file `path`.

    Returns ``None`` (with a warning) for a SOP Class whose record type is single-level (HANGING
    PROTOCOL, PALETTE, IMPLANT...: PS3.3 Table F.4-1 places them at the root, not under a
    patient's series, and a modality never produces them). Whether `profile` allows the instance
    is checked by :func:`modality_link.media.profiles.refusal`.
    """
    path = Path(path)
    with open(path, "rb") as fp:
        offset, header_end, header = read_header(fp, _HEADER_TAGS)
        size = os.fstat(fp.fileno()).st_size
    meta = header.meta
    ts = meta_value(meta, TRANSFER_SYNTAX_UID)
    sop_class = header.text("SOPClassUID") or meta_value(meta, MEDIA_STORAGE_SOP_CLASS_UID)
    sop_instance = header.text("SOPInstanceUID") or meta_value(meta, MEDIA_STORAGE_SOP_INSTANCE_UID)
    if not ts or not sop_class or not sop_instance:
        raise MediaError(f"{path}: missing Transfer Syntax, SOP Class or SOP Instance UID")
    rtype = record_type(sop_class, header.text("Modality"), "Rows" in header)
    if rtype in SINGLE_LEVEL_RECORDS:
        LOGGER.warning(
            "%s: SOP Class %s (%s) has the single-level record type %s, which has no place under a series; "
            "instance %s left off the medium", path, sop_class, UID(sop_class).name, rtype, sop_instance,
        )
        return None
    action = action_for(ts, profile, rtype == "IMAGE")
    if action == COPY:
        head = encode_file_meta(sop_class, sop_instance, ts, source_ae_title)
        out_size = len(head) + size - offset
    else:
        out_size = _converted_size_bound(header, ts, offset, header_end, size)
    return Instance(path, header, sop_class, sop_instance, ts, rtype, action, offset, size, out_size)


def _converted_size_bound(header: Header, ts: str, offset: int, header_end: int, size: int) -> int:
    """Upper bound of the size of a file after conversion to Explicit VR Little Endian.

    Explicit VR costs at most 4 more bytes per element than Implicit VR and
    an element takes at least 8 bytes, so the non-pixel part grows by at most
    half; Pixel Data keeps its size when uncompressed and becomes Rows x
    Columns x Frames x Samples x Bits Allocated / 8 bytes when decompressed.
    """
    rows = header.integer("Rows")
    cols = header.integer("Columns")
    frames = header.integer("NumberOfFrames", 1) or 1
    samples = header.integer("SamplesPerPixel", 1) or 1
    bits = header.integer("BitsAllocated", 16) or 16
    pixels = (rows * cols * frames * samples * bits + 7) // 8 + 16
    ts = UID(ts)
    meta = 512
    if ts.is_deflated:  # the stream positions say nothing about the inflated size
        return meta + 16 * size + pixels
    before_pixels = (header_end - offset) * 3 // 2 + 64
    rest = size - header_end  # Pixel Data element as stored and any trailing elements
    if ts.is_compressed:
        return meta + before_pixels + pixels + 64
    pixel_element = min(rest, pixels + 12)
    return meta + before_pixels + pixel_element + 4 + (rest - pixel_element) * 3 // 2 + 64


# ---------------------------------------------------------------------------
# Layout: File IDs (PS3.10 §8.5, PS3.12 F.3.2) and the record tree
# ---------------------------------------------------------------------------


@dataclass
class SeriesNode:
    uid: str
    instances: list[Instance] = field(default_factory=list)


@dataclass
class StudyNode:
    uid: str
    series: dict[str, SeriesNode] = field(default_factory=dict)


@dataclass
class PatientNode:
    patient_id: str
    studies: dict[str, StudyNode] = field(default_factory=dict)


def group_instances(instances: Iterable[Instance]) -> dict[str, PatientNode]:
    """Group `instances` by patient (:attr:`Instance.patient_key`) -> Study -> Series, in input order (linear)."""
    patients: dict[str, PatientNode] = {}
    for inst in instances:
        patient = patients.get(inst.patient_key)
        if patient is None:
            patient = patients[inst.patient_key] = PatientNode(inst.patient_id)
        study = patient.studies.get(inst.study_uid)
        if study is None:
            study = patient.studies[inst.study_uid] = StudyNode(inst.study_uid)
        series = study.series.get(inst.series_uid)
        if series is None:
            series = study.series[inst.series_uid] = SeriesNode(inst.series_uid)
        series.instances.append(inst)
    return patients


def file_id(patient: int, study: int, series: int, instance: int) -> tuple[str, ...]:
    """File ID components ``DICOM/PATppppp/STUsssss/SERrrrrr/IMiiiiii`` (1-based).

    Five components of at most 8 characters from ``A-Z 0-9 _``, no extension
    (PS3.12 F.3.2); up to 99 999 patients/studies/series and 999 999
    instances per series.
    """
    if max(patient, study, series) > 99_999 or instance > 999_999:
        raise MediaError("file-set too large for the PATnnnnn/STUnnnnn/SERnnnnn/IMnnnnnn File ID scheme")
    return (DATA_DIRECTORY, f"PAT{patient:05d}", f"STU{study:05d}", f"SER{series:05d}", f"IM{instance:06d}")


def assign_file_ids(patients: dict[str, PatientNode]) -> list[tuple[tuple[str, ...], Instance]]:
    """File IDs of every instance of the tree, in directory order."""
    out: list[tuple[tuple[str, ...], Instance]] = []
    for p, patient in enumerate(patients.values(), 1):
        for s, study in enumerate(patient.studies.values(), 1):
            for r, series in enumerate(study.series.values(), 1):
                for i, inst in enumerate(series.instances, 1):
                    out.append((file_id(p, s, r, i), inst))
    return out


# ---------------------------------------------------------------------------
# DICOMDIR encoding
# ---------------------------------------------------------------------------

_ITEM = b"\xfe\xff\x00\xe0"
_SEQ_DELIM = b"\xfe\xff\xdd\xe0\x00\x00\x00\x00"
_DIRECTORY_RECORD_SEQUENCE_UNDEFINED = b"\x04\x00\x20\x12SQ\x00\x00\xff\xff\xff\xff"
# Positions of the UL values in an encoded record item (item header 8 bytes,
# then (0004,1400) UL, (0004,1410) US, (0004,1420) UL as its first elements).
_NEXT_POS = 8 + 8
_LOWER_POS = 8 + 8 + 4 + 8 + 2 + 8


_FIXED = (
    encode_element(0x00041400, "UL", b"\x00\x00\x00\x00")  # Offset of the Next Directory Record
    + encode_element(0x00041410, "US", b"\xff\xff")  # Record In-use Flag
    + encode_element(0x00041420, "UL", b"\x00\x00\x00\x00")  # Offset of Referenced Lower-Level Directory Entity
)


@dataclass
class DirectoryCharset:
    """Character set of the records of one DICOMDIR (docs/design.md "Character sets").

    Each record copies its keys' encoded bytes from its source instance, and sources on one disc
    may use different character sets. When every source whose keys are not plain ASCII uses the
    same (0008,0005), the bytes are copied as they are and that value is written in every record
    (PS3.3 F.3.2.2, Table F.3-3: (0008,0005) is Type 1C in a Directory Record). Otherwise every
    non-ASCII key is decoded in its source's character set and re-encoded in ISO_IR 192 (UTF-8),
    which every record then declares.
    """

    terms: list[str]
    reencode: bool = False

    @classmethod
    def of(cls, instances: Iterable[Instance]) -> DirectoryCharset:
        found = {tuple(i.header.charset) for i in instances
                 if not all(i.header.is_ascii(t) for t in i.header.text_tags())}
        if len(found) <= 1:
            return cls(list(next(iter(found), ())))
        return cls(["ISO_IR 192"], True)

    def element(self) -> bytes:
        """The encoded (0008,0005) of each record, or nothing for the default repertoire."""
        return encode_element(0x00080005, "CS", "\\".join(self.terms).encode("ascii")) if self.terms else b""

    def encoded(self, header: Header, tag: int) -> bytes:
        """The key `tag` of `header` (present) in this character set, Explicit VR Little Endian."""
        if not self.reencode or header.is_ascii(tag):
            return header.elements[tag]
        value = header.value(tag)
        if isinstance(value, PydicomSequence):
            for item in value:
                _convert_all(item)
        out = DicomBytesIO()
        out.is_little_endian, out.is_implicit_VR = True, False
        write_data_element(out, DataElement(tag, header.elements[tag][4:6].decode(), value),
                           python_encodings(self.terms))
        return out.getvalue()


def _convert_all(ds: Dataset) -> None:
    """Decode every element of a sequence item (pydicom converts them lazily), so that writing
    it re-encodes the text instead of copying the raw bytes."""
    for elem in ds:
        if elem.VR == "SQ":
            for item in elem.value:
                _convert_all(item)


#: Values invented for Type 1 keys with no natural source (PS3.3 F.5 defined terms).
_INVENTED_TERMS = {
    "Modality": b"OT",
    "CompletionFlag": b"PARTIAL",
    "VerificationFlag": b"UNVERIFIED",
    "ContentLabel": b"UNNAMED",
    "RTPlanLabel": b"UNNAMED",
    "StructureSetLabel": b"UNNAMED",
}
#: Where a missing date or time is taken from, in order, before the current date or time.
_INVENT_FROM = {
    "DA": ("StudyDate", "SeriesDate", "AcquisitionDate", "ContentDate", "InstanceCreationDate"),
    "TM": ("StudyTime", "SeriesTime", "AcquisitionTime", "ContentTime", "InstanceCreationTime"),
}


_DA = re.compile(rb"^[0-9]{8}$")
_TM = re.compile(rb"^[0-9]{2}([0-9]{2}([0-9]{2}(\.[0-9]{1,6})?)?)?$")
_ACR_NEMA = {"DA": re.compile(rb"^[0-9]{4}\.[0-9]{2}\.[0-9]{2}$"),
             "TM": re.compile(rb"^[0-9]{2}:[0-9]{2}(:[0-9]{2}(\.[0-9]{1,6})?)?$")}


def date_time_value(vr: str, raw: bytes) -> bytes | None:
    """`raw` as a valid DA or TM value (PS3.5 Table 6.2-1), or None.

    Files written before DICOM 3.0 hold dates as ``YYYY.MM.DD`` and times as ``HH:MM:SS``
    (the ACR-NEMA forms PS3.5 6.2 lists as retired); a directory record gets them in the current
    form, as ``dcmmkdir`` does, so that the DICOMDIR stays valid.
    """
    value = raw.strip(b" \x00")
    if _ACR_NEMA[vr].match(value):
        value = value.replace(b".", b"") if vr == "DA" else value.replace(b":", b"")
    return value if (_DA if vr == "DA" else _TM).match(value) else None


@dataclass
class Inventor:
    """Values for the Type 1 keys a source lacks, so that the DICOMDIR stays valid (PS3.3 F.5).

    As ``dcmmkdir --invent`` does (DCMTK dcddirif.cc): numbered Patient IDs and Study IDs (a
    prefix and six digits), counters for Series and Instance Numbers, and a missing date or
    time taken from the instance's other dates and times, else the current one. Each invented
    value is logged with the instance it stands for.
    """

    now: datetime.datetime = field(default_factory=datetime.datetime.now)
    counters: dict[str, int] = field(default_factory=dict)

    def invent(self, keyword: str, header: Header) -> bytes | None:
        """A value for the missing key `keyword` of `header`, or None if none can be made up."""
        if keyword in ("PatientID", "StudyID"):
            return f"MODLINK{keyword[:3].upper()}{self._next(keyword):06d}".encode("ascii")
        if keyword in _INVENTED_TERMS:
            return _INVENTED_TERMS[keyword]
        vr = vr_of(tag_of(keyword))
        if vr in _INVENT_FROM:
            for source in _INVENT_FROM[vr]:
                value = date_time_value(vr, header.raw(tag_of(source)) or b"")
                if value:
                    return value
            return self.now.strftime("%Y%m%d" if vr == "DA" else "%H%M%S").encode("ascii")
        if vr == "IS":
            return str(self._next(keyword)).encode("ascii")
        return None

    def _next(self, keyword: str) -> int:
        self.counters[keyword] = self.counters.get(keyword, 0) + 1
        return self.counters[keyword]


def record_keys(rtype: str, profile: Profile) -> tuple[tuple[str, int], ...]:
    """The keys of an instance record of type `rtype` under `profile` (its additional IMAGE keys
    override the general ones)."""
    if rtype != "IMAGE" or not profile.image_keys:
        return INSTANCE_KEYS[rtype]
    keys = dict(INSTANCE_KEYS[rtype])
    keys.update(profile.image_keys)
    return tuple(keys.items())


def _record(rtype: str, header: Header, keys: Sequence[tuple[str, int]], what: str, charset: DirectoryCharset,
            inventor: Inventor, extra: bytes = b"") -> bytearray:
    """Encode one Directory Record item (PS3.3 F.3.2.2) from the keys of `header`.

    The keys are copied as encoded in the instance (Explicit VR Little
    Endian, see :mod:`~modality_link.media.header`), or re-encoded by
    `charset`; a missing Type 1 key gets a value from `inventor`. `extra`
    holds the encoded (0004,1432) and (0004,15xx) elements. The three offsets
    are zero here and patched by :func:`encode_dicomdir`.
    """
    parts = [_FIXED, encode_element(0x00041430, "CS", rtype.encode("ascii")), extra, charset.element()]
    for keyword, key_type in sorted(keys, key=lambda k: tag_of(k[0])):  # all after (0008,0005)
        tag = tag_of(keyword)
        raw = header.raw(tag)
        if raw and vr_of(tag) in ("DA", "TM") and raw.strip(b" \x00"):
            value = date_time_value(vr_of(tag), raw)
            if value is not None:
                parts.append(encode_element(tag, vr_of(tag), value))
                continue
            LOGGER.warning("%s: %s record: %s %r is not a valid %s value", what, rtype, keyword, raw, vr_of(tag))
        elif raw and (raw.strip(b" \x00") or vr_of(tag) in _BINARY_VRS):  # a text of padding only is empty
            parts.append(charset.encoded(header, tag))
            continue
        if keyword in _FROM_LAST_ITEM and _FROM_LAST_ITEM[keyword] in header:
            items = header.get(_FROM_LAST_ITEM[keyword])
            last = str(items[-1].get(keyword, "")) if items else ""
            if last:
                parts.append(encode_element(tag, vr_of(tag), last.encode("ascii")))
                continue
        if key_type == 3:
            continue
        value = inventor.invent(keyword, header) if key_type == 1 else b""
        if value is None:
            LOGGER.warning("%s: %s record: Type 1 key %s is missing or empty", what, rtype, keyword)
        elif value:
            LOGGER.warning("%s: %s record: Type 1 key %s is missing or empty; invented %s", what, rtype, keyword,
                           value.decode("ascii"))
        parts.append(encode_element(tag, vr_of(tag), value or b""))
    body = b"".join(parts)
    return bytearray(_ITEM + struct.pack("<L", len(body)) + body)


def _instance_record(inst: Instance, fid: tuple[str, ...], profile: Profile, charset: DirectoryCharset,
                     inventor: Inventor) -> bytearray:
    """The instance-level record of `inst`, referencing its File ID `fid` (PS3.3 F.3.2.2)."""
    ts = output_transfer_syntax(inst.transfer_syntax_uid, profile, inst.record_type == "IMAGE")
    private = b""
    if inst.record_type == "PRIVATE":  # Private Record UID (0004,1432): the private SOP Class
        private = encode_element(0x00041432, "UI", inst.sop_class_uid.encode("ascii"))
    extra = b"".join(
        (
            private,
            encode_element(0x00041500, "CS", "\\".join(fid).encode("ascii")),
            encode_element(0x00041510, "UI", inst.sop_class_uid.encode("ascii")),
            encode_element(0x00041511, "UI", inst.sop_instance_uid.encode("ascii")),
            encode_element(0x00041512, "UI", ts.encode("ascii")),
        )
    )
    keys = record_keys(inst.record_type, profile)
    return _record(inst.record_type, inst.header, keys, str(inst.path), charset, inventor, extra)


@dataclass
class _Node:
    item: bytearray
    children: list[_Node] = field(default_factory=list)
    offset: int = 0


def encode_dicomdir(
    patients: dict[str, PatientNode],
    file_ids: dict[int, tuple[str, ...]],
    fileset_id: str,
    source_ae_title: str,
    profile: Profile,
) -> bytes:
    """Encode the DICOMDIR of the file-set `patients` (PS3.3 F.3, F.5).

    `file_ids` maps ``id(instance)`` to its File ID components. Records are
    emitted depth first (PATIENT, its STUDYs, each STUDY's SERIES, each
    SERIES' instance records), each with a defined length, inside a Directory
    Record Sequence of undefined length. Linear in the number of instances.
    """
    charset = DirectoryCharset.of(i for p in patients.values() for st in p.studies.values()
                                  for se in st.series.values() for i in se.instances)
    inventor = Inventor()
    roots: list[_Node] = []
    for patient in patients.values():
        first = next(iter(next(iter(patient.studies.values())).series.values())).instances[0]
        p_node = _Node(_record("PATIENT", first.header, PATIENT_KEYS, f"{first.path} (patient {patient.patient_id!r})",
                               charset, inventor))
        roots.append(p_node)
        for study in patient.studies.values():
            first = next(iter(study.series.values())).instances[0]
            s_node = _Node(_record("STUDY", first.header, STUDY_KEYS, f"{first.path} (study {study.uid})",
                                   charset, inventor))
            p_node.children.append(s_node)
            for series in study.series.values():
                first = series.instances[0]
                r_node = _Node(_record("SERIES", first.header, SERIES_KEYS, f"{first.path} (series {series.uid})",
                                       charset, inventor))
                s_node.children.append(r_node)
                for inst in series.instances:
                    r_node.children.append(_Node(_instance_record(inst, file_ids[id(inst)], profile, charset,
                                                                  inventor)))

    head = encode_file_meta(MediaStorageDirectoryStorage, generate_uid(), ExplicitVRLittleEndian, source_ae_title)

    def root_dataset(first: int, last: int) -> bytes:
        return b"".join(
            (
                encode_element(0x00041130, "CS", fileset_id.encode("ascii")),  # File-set ID
                # Offsets of the First and Last Directory Records of the Root Directory Entity
                encode_element(0x00041200, "UL", struct.pack("<L", first)),
                encode_element(0x00041202, "UL", struct.pack("<L", last)),
                encode_element(0x00041212, "US", b"\x00\x00"),  # File-set Consistency Flag
            )
        )

    # Pass 1: offsets (all offset values are fixed-length UL, so sizes are known).
    pos = len(head) + len(root_dataset(0, 0)) + len(_DIRECTORY_RECORD_SEQUENCE_UNDEFINED)
    order: list[_Node] = []
    stack = list(reversed(roots))
    while stack:
        node = stack.pop()
        node.offset = pos
        pos += len(node.item)
        order.append(node)
        stack.extend(reversed(node.children))

    # Pass 2: patch the Next and Lower-level offsets.
    def link(siblings: list[_Node]) -> None:
        for i, node in enumerate(siblings):
            nxt = siblings[i + 1].offset if i + 1 < len(siblings) else 0
            struct.pack_into("<L", node.item, _NEXT_POS, nxt)
            struct.pack_into("<L", node.item, _LOWER_POS, node.children[0].offset if node.children else 0)

    link(roots)
    for node in order:
        link(node.children)

    parts = [head, root_dataset(roots[0].offset if roots else 0, roots[-1].offset if roots else 0)]
    parts.append(_DIRECTORY_RECORD_SEQUENCE_UNDEFINED)
    parts.extend(bytes(node.item) for node in order)
    parts.append(_SEQ_DELIM)
    return b"".join(parts)


# ---------------------------------------------------------------------------
# Size bounds, for disc spanning
# ---------------------------------------------------------------------------

#: Upper bound of the DICOMDIR bytes outside the records (preamble, File Meta,
#: root keys, sequence header and delimiter).
DICOMDIR_BASE_BYTES = 1024
_FILE_ID_BYTES = 12 + len("DICOM\\PAT00001\\STU00001\\SER00001\\IM000001")


def record_size_bound(header: Header, keys: Sequence[tuple[str, int]]) -> int:
    """Upper bound of the encoded size of a Directory Record built from `header`.

    Re-encoding in UTF-8 (:class:`DirectoryCharset`) at most doubles a key; an invented value
    takes at most 16 bytes.
    """
    size = 8 + len(_FIXED) + 8 + 16 + 8 + 64
    for keyword, _ in keys:
        size += 2 * len(header.elements.get(tag_of(keyword), b"")) + 12 + 16
    return size


def instance_record_bound(inst: Instance, profile: Profile) -> int:
    """Upper bound of the encoded size of the instance-level record of `inst`."""
    keys = record_keys(inst.record_type, profile)
    return record_size_bound(inst.header, keys) + _FILE_ID_BYTES + 4 * (8 + 64)
