"""The bytes of a DICOM File (PS3.10 §7): preamble, File Meta Information, where the data set starts.

The one place that encodes and decodes the File Meta Information (PS3.10 §7.1, Table 7.1-1): the
archive writes it for every received or imported instance, media for every file of a file-set and
the DICOMDIR, and the Storage SCU and the media header reader look past it to the data set. The
File Meta is always Explicit VR Little Endian (PS3.10 §7.1), so it is encoded and walked here by
hand: pydicom's general encoder costs more than the rest of a received instance's copy.

Also here, because every element written by hand needs them: the VRs whose Explicit VR element has
a 4-byte length (PS3.5 §7.1.2, Table 7.1-1) and the padding of a value to an even length (PS3.5
§6.2, §7.1.1: a UI value with NUL, other text with a space).
"""

from __future__ import annotations

import mmap
import struct
from collections.abc import Mapping
from typing import BinaryIO

from pydicom.valuerep import VR

from modality_link import IMPLEMENTATION_CLASS_UID, IMPLEMENTATION_VERSION_NAME

#: The File Preamble (128 bytes, here zero) and the DICOM Prefix (PS3.10 §7.1).
PREAMBLE = b"\x00" * 128 + b"DICM"
#: Every VR of PS3.5 §6.2, as it appears in an Explicit VR element.
VR_BYTES = frozenset(vr.value.encode("ascii") for vr in VR)
#: VRs whose Explicit VR element has a reserved field and a 4-byte length (PS3.5 Table 7.1-1).
LONG_VRS = frozenset({"OB", "OD", "OF", "OL", "OV", "OW", "SQ", "SV", "UC", "UN", "UR", "UT", "UV"})
#: :data:`LONG_VRS` as the two bytes of an encoded element.
LONG_VR_BYTES = frozenset(v.encode("ascii") for v in LONG_VRS)
#: VRs padded with a space to an even length (PS3.5 §6.2); every other one with a NUL byte.
SPACE_PADDED_VRS = frozenset({"AE", "AS", "CS", "DA", "DS", "DT", "IS", "LO", "LT", "PN", "SH", "ST", "TM", "UC",
                              "UR", "UT"})

#: The File Meta Information's elements (PS3.10 Table 7.1-1) that this package writes or reads.
GROUP_LENGTH = 0x00020000
MEDIA_STORAGE_SOP_CLASS_UID = 0x00020002
MEDIA_STORAGE_SOP_INSTANCE_UID = 0x00020003
TRANSFER_SYNTAX_UID = 0x00020010
#: VRs of the File Meta elements after the group length (PS3.10 Table 7.1-1).
_META_VRS = frozenset({b"OB", b"UI", b"SH", b"AE", b"UR"})
#: Bytes read from the start of a file at a time while its File Meta is walked.
_CHUNK = 16384
_GROUP_LENGTH_HEAD = b"\x02\x00\x00\x00UL\x04\x00"


class Part10Error(ValueError):
    """The bytes are not a DICOM File: no ``DICM`` prefix after the preamble (PS3.10 §7.1), or a
    value too long for its VR."""


def padded(value: bytes, vr: str) -> bytes:
    """`value` padded to an even length (PS3.5 §7.1.1): a trailing space for the text VRs, a NUL
    byte for UI and the binary VRs (PS3.5 §6.2)."""
    if len(value) % 2:
        return value + (b" " if vr in SPACE_PADDED_VRS else b"\x00")
    return value


def encode_element(tag: int, vr: str, value: bytes) -> bytes:
    """One Explicit VR Little Endian element (PS3.5 §7.1.2), `value` already encoded (padded here)."""
    value = padded(value, vr)
    head = struct.pack("<HH", tag >> 16, tag & 0xFFFF) + vr.encode()
    if vr in LONG_VRS:
        return head + struct.pack("<HL", 0, len(value)) + value
    if len(value) > 0xFFFF:
        raise Part10Error(f"value of ({tag >> 16:04X},{tag & 0xFFFF:04X}) too long for VR {vr}")
    return head + struct.pack("<H", len(value)) + value


def encode_file_meta(sop_class_uid: str, sop_instance_uid: str, transfer_syntax_uid: str, source_ae_title: str) -> bytes:
    """Preamble, prefix and File Meta Information (PS3.10 §7.1) naming this implementation
    (Implementation Class UID and Version Name) and, when given, the Source AE Title."""
    ae = source_ae_title.strip()
    body = b"".join(
        (
            encode_element(0x00020001, "OB", b"\x00\x01"),  # File Meta Information Version
            encode_element(MEDIA_STORAGE_SOP_CLASS_UID, "UI", sop_class_uid.encode("ascii", "replace")),
            encode_element(MEDIA_STORAGE_SOP_INSTANCE_UID, "UI", sop_instance_uid.encode("ascii", "replace")),
            encode_element(TRANSFER_SYNTAX_UID, "UI", transfer_syntax_uid.encode("ascii", "replace")),
            encode_element(0x00020012, "UI", IMPLEMENTATION_CLASS_UID.encode("ascii")),
            encode_element(0x00020013, "SH", IMPLEMENTATION_VERSION_NAME.encode("ascii")),
            encode_element(0x00020016, "AE", ae.encode("ascii", "replace")) if ae else b"",
        )
    )
    return PREAMBLE + encode_element(GROUP_LENGTH, "UL", struct.pack("<L", len(body))) + body


def read_file_meta(fp: BinaryIO | mmap.mmap) -> tuple[int, dict[int, bytes], bytes]:
    """Walk the File Meta Information of the DICOM File `fp` (at its start): every group 0002
    element after the prefix, whatever its group length says (as pydicom reads it).

    Returns (offset of the data set, {tag: value as stored, padding included}, the bytes read
    from the start of the file: at least the File Meta, usually more). Raises
    :class:`Part10Error` when there is no ``DICM`` prefix after the preamble.
    """
    buf = fp.read(_CHUNK)
    if len(buf) < 132 or buf[128:132] != b"DICM":
        raise Part10Error("not a DICOM Part-10 file (no 'DICM' prefix after the preamble)")
    pos = 132
    meta: dict[int, bytes] = {}
    while True:
        if pos + 12 > len(buf):
            more = fp.read(_CHUNK)
            buf += more
        if pos + 8 > len(buf) or buf[pos : pos + 2] != b"\x02\x00":
            return pos, meta, buf
        (elem,) = struct.unpack_from("<H", buf, pos + 2)
        if buf[pos + 4 : pos + 6] in LONG_VR_BYTES:
            (length,) = struct.unpack_from("<L", buf, pos + 8)
            start = pos + 12
        else:
            (length,) = struct.unpack_from("<H", buf, pos + 6)
            start = pos + 8
        while start + length > len(buf):
            more = fp.read(max(_CHUNK, start + length - len(buf)))
            if not more:
                break
            buf += more
        meta[0x00020000 | elem] = buf[start : start + length]
        pos = start + length


def dataset_offset(fp: BinaryIO) -> int:
    """The offset of the data set of the DICOM File `fp` (at its start), after its File Meta."""
    return read_file_meta(fp)[0]


def meta_value(meta: Mapping[int, bytes], tag: int) -> str:
    """The File Meta element `tag` of `meta` (:func:`read_file_meta`) as text, padding removed;
    "" when absent."""
    return meta.get(tag, b"").rstrip(b"\x00 ").decode("ascii", "replace")


def is_regular_file_meta(buf: bytes, end: int) -> bool:
    """True if the File Meta Information of `buf` (the start of a file) ending at `end` is as
    PS3.10 §7.1 has it: its group length (0002,0000) first and right, tags ascending, each VR
    that of Table 7.1-1. Ours always is."""
    if buf[132:140] != _GROUP_LENGTH_HEAD or 144 + struct.unpack_from("<L", buf, 140)[0] != end:
        return False
    pos, previous = 144, 0
    while pos < end:
        group, elem = struct.unpack_from("<HH", buf, pos)
        vr = buf[pos + 4 : pos + 6]
        if group != 2 or elem <= previous or vr not in _META_VRS:
            return False
        previous = elem
        if vr == b"OB" or vr == b"UR":
            pos += 12 + struct.unpack_from("<L", buf, pos + 8)[0]
        else:
            pos += 8 + struct.unpack_from("<H", buf, pos + 6)[0]
    return pos == end
