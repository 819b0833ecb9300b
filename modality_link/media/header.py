"""Lean reader of the header keys of a Part-10 file (PS3.10 §7, PS3.5 §7.1).

Reading a few keys of thousands of files through ``pydicom.dcmread`` costs
about a millisecond per file; this reader parses the File Meta and the data
set elements of a Little Endian file directly from the first bytes of the
file, up to the last key needed (never the Pixel Data), and keeps each key
as its complete Explicit VR Little Endian encoding, ready to be copied into a
Directory Record. Explicit VR Big Endian, Deflated, or a key that is a
Sequence in an Implicit VR file fall back to pydicom.
"""

from __future__ import annotations

import struct
from collections.abc import Iterable
from dataclasses import dataclass, field
from functools import lru_cache
from typing import Any, BinaryIO

from pydicom import dcmread
from pydicom.datadict import dictionary_VR, tag_for_keyword
from pydicom.filebase import DicomBytesIO
from pydicom.filewriter import write_data_element
from pydicom.tag import Tag

from modality_link.media.options import MediaError
from modality_link.net.charset import TEXT_VRS, charset_terms, decode_value, effective_terms, python_encodings

LONG_VRS = frozenset({"OB", "OD", "OF", "OL", "OV", "OW", "SQ", "SV", "UC", "UN", "UR", "UT", "UV"})
_LONG_VR_BYTES = frozenset(v.encode() for v in LONG_VRS)
_TEXT_VRS = frozenset({"AE", "AS", "CS", "DA", "DS", "DT", "IS", "LO", "LT", "PN", "SH", "ST", "TM", "UC", "UR", "UT"})
_UNDEFINED = 0xFFFFFFFF
_ITEM, _ITEM_END, _SEQ_END = 0xFFFEE000, 0xFFFEE00D, 0xFFFEE0DD
_IMPLICIT_LE = "1.2.840.10008.1.2"
_EXPLICIT_LE = "1.2.840.10008.1.2.1"
_CHUNK = 16384


class _Fallback(Exception):
    """The fast path cannot read this file; use pydicom."""


@lru_cache(maxsize=None)
def tag_of(keyword: str) -> int:
    tag = tag_for_keyword(keyword)
    if tag is None:
        raise KeyError(keyword)
    return tag


@lru_cache(maxsize=None)
def vr_of(tag: int) -> str:
    return dictionary_VR(tag)


def encode_element(tag: int, vr: str, value: bytes) -> bytes:
    """One Explicit VR Little Endian element, `value` already encoded (padded here)."""
    if len(value) % 2:
        value += b" " if vr in _TEXT_VRS else b"\x00"
    head = struct.pack("<HH", tag >> 16, tag & 0xFFFF) + vr.encode()
    if vr in LONG_VRS:
        return head + struct.pack("<HL", 0, len(value)) + value
    if len(value) > 0xFFFF:
        raise MediaError(f"value of ({tag >> 16:04X},{tag & 0xFFFF:04X}) too long for VR {vr}")
    return head + struct.pack("<H", len(value)) + value


@dataclass
class Header:
    """Selected keys of one instance, each as its Explicit VR Little Endian encoding."""

    elements: dict[int, bytes] = field(default_factory=dict)
    meta: dict[int, bytes] = field(default_factory=dict)  # File Meta values, unpadded raw
    _cache: dict[int, Any] = field(default_factory=dict, repr=False)
    _charset: list[str] | None = field(default=None, repr=False)

    @property
    def charset(self) -> list[str]:
        """Defined terms that decode this instance's text keys (docs/design.md "Character sets").

        The declared (0008,0005), normalised; if absent, guessed from the bytes of the keys read.
        """
        if self._charset is None:
            self._charset = effective_terms(
                charset_terms(self.raw(0x00080005)), [self.raw(t) or b"" for t in self.text_tags()]
            )
        return self._charset

    def text_tags(self) -> list[int]:
        """Tags of the keys whose value follows (0008,0005): text VRs and sequences."""
        return [t for t, e in self.elements.items() if t != 0x00080005 and e[4:6].decode() in (*TEXT_VRS, "SQ")]

    def is_ascii(self, tag: int) -> bool:
        """True if the value of `tag` has no byte above 0x7F and no ESC (so is the same in any charset)."""
        raw = self.raw(tag) or b""
        return raw.isascii() and b"\x1b" not in raw

    def __contains__(self, keyword: str) -> bool:
        return tag_of(keyword) in self.elements

    def raw(self, tag: int) -> bytes | None:
        """Value bytes of `tag` (Little Endian), or None if absent."""
        elem = self.elements.get(tag)
        if elem is None:
            return None
        return elem[12:] if elem[4:6] in _LONG_VR_BYTES else elem[8:]

    def text(self, keyword: str) -> str:
        """Value of a text or UID key as str, trailing padding removed."""
        raw = self.raw(tag_of(keyword))
        return "" if raw is None else raw.rstrip(b" \x00").decode("latin-1").strip()

    def integer(self, keyword: str, default: int = 0) -> int:
        """Value of an IS, US or UL key as int."""
        tag = tag_of(keyword)
        raw = self.raw(tag)
        if not raw:
            return default
        try:
            vr = vr_of(tag)
            if vr == "US":
                return struct.unpack_from("<H", raw)[0]
            if vr == "UL":
                return struct.unpack_from("<L", raw)[0]
            return int(raw.split(b"\\")[0].strip(b" \x00") or default)
        except (ValueError, struct.error):
            return default

    def get(self, keyword: str, default: Any = None) -> Any:
        """Value of `keyword` decoded by pydicom (character set aware), or `default`."""
        tag = tag_of(keyword)
        return self.value(tag) if tag in self.elements else default

    def value(self, tag: int) -> Any:
        """Value of the key `tag` (present), decoded in :attr:`charset` by pydicom."""
        if tag not in self._cache:
            vr = self.elements[tag][4:6].decode()
            self._cache[tag] = decode_value(tag, vr, self.raw(tag) or b"", self.charset)
        return self._cache[tag]


def _parse_meta(buf: bytes) -> tuple[int, dict[int, bytes]]:
    if len(buf) < 132 or buf[128:132] != b"DICM":
        raise MediaError("not a DICOM Part-10 file (no 'DICM' prefix after the preamble)")
    pos, meta = 132, {}
    while pos + 8 <= len(buf) and buf[pos : pos + 2] == b"\x02\x00":
        (elem,) = struct.unpack_from("<H", buf, pos + 2)
        if buf[pos + 4 : pos + 6] in _LONG_VR_BYTES:
            (length,) = struct.unpack_from("<L", buf, pos + 8)
            start = pos + 12
        else:
            (length,) = struct.unpack_from("<H", buf, pos + 6)
            start = pos + 8
        meta[0x00020000 | elem] = buf[start : start + length]
        pos = start + length
    return pos, meta


class _Reader:
    """Little Endian element walker over a growing buffer of the file."""

    def __init__(self, fp: BinaryIO, buf: bytes, implicit: bool) -> None:
        self.fp, self.buf, self.implicit = fp, buf, implicit

    def need(self, end: int) -> None:
        while end > len(self.buf):
            more = self.fp.read(max(_CHUNK, end - len(self.buf)))
            if not more:
                raise _Fallback("truncated")
            self.buf += more

    def element(self, pos: int) -> tuple[int, str | None, int, int]:
        """Return (tag, vr or None if implicit, value start, value length) at `pos`."""
        self.need(pos + 12)
        group, elem = struct.unpack_from("<HH", self.buf, pos)
        tag = (group << 16) | elem
        if self.implicit or group == 0xFFFE:
            (length,) = struct.unpack_from("<L", self.buf, pos + 4)
            return tag, None, pos + 8, length
        vr = self.buf[pos + 4 : pos + 6]
        if vr in _LONG_VR_BYTES:
            (length,) = struct.unpack_from("<L", self.buf, pos + 8)
            return tag, vr.decode(), pos + 12, length
        (length,) = struct.unpack_from("<H", self.buf, pos + 6)
        return tag, vr.decode("latin-1"), pos + 8, length

    def skip_undefined(self, pos: int) -> int:
        """Skip the items of an undefined-length value starting at `pos`; return the end."""
        while True:
            tag, _, start, length = self.element(pos)
            if tag == _SEQ_END:
                return start
            if tag != _ITEM:
                raise _Fallback("malformed sequence")
            if length != _UNDEFINED:
                pos = start + length
                continue
            pos = start
            while True:  # elements of an undefined-length item
                tag, _, start, length = self.element(pos)
                if tag == _ITEM_END:
                    pos = start
                    break
                pos = self.skip_undefined(start) if length == _UNDEFINED else start + length


def read_header(fp: BinaryIO, wanted: Iterable[int]) -> tuple[int, int, Header]:
    """Read the keys `wanted` (tags) from the Part-10 stream `fp` (at its start).

    Returns (offset of the data set, offset where reading stopped, header).
    """
    wanted = frozenset(wanted)
    last = max(wanted)
    buf = fp.read(_CHUNK)
    offset, meta = _parse_meta(buf)
    ts = meta.get(0x00020010, b"").rstrip(b"\x00 ").decode("ascii", "replace")
    header = Header(meta=meta)
    try:
        if ts == "1.2.840.10008.1.2.2" or ts == "1.2.840.10008.1.2.1.99" or not ts:
            raise _Fallback(ts)
        implicit = ts == _IMPLICIT_LE
        reader = _Reader(fp, buf, implicit)
        pos = offset
        while True:
            try:
                tag, vr, start, length = reader.element(pos)
            except _Fallback:
                if len(reader.buf) - pos < 8:  # end of file
                    break
                raise
            if tag > last:
                break
            if length == _UNDEFINED:
                if tag in wanted:
                    raise _Fallback("sequence key")
                end = reader.skip_undefined(start)
            else:
                end = start + length
                if tag in wanted:
                    reader.need(end)
                    if implicit:
                        vr = vr_of(tag)
                        if vr == "SQ" or " or " in vr:
                            raise _Fallback("sequence or ambiguous key in implicit VR")
                        header.elements[tag] = encode_element(tag, vr, reader.buf[start:end])
                    else:  # Explicit VR Little Endian: the element as it is (incl. defined-length SQ)
                        header.elements[tag] = reader.buf[pos:end]
            pos = end
        return offset, pos, header
    except _Fallback:
        fp.seek(0)
        ds = dcmread(fp, stop_before_pixels=True, specific_tags=[Tag(t) for t in wanted])
        stop = fp.tell()
        for tag in sorted(t for t in ds.keys() if t in wanted):
            raw = ds.get_item(tag)
            vr = raw.VR or vr_of(tag)
            if vr in _TEXT_VRS and isinstance(raw.value, bytes):  # text is not byte-swapped: keep its encoding
                header.elements[int(tag)] = encode_element(int(tag), vr, raw.value)
                continue
            out = DicomBytesIO()
            out.is_little_endian, out.is_implicit_VR = True, False
            write_data_element(out, ds[tag], python_encodings(charset_terms(ds.get("SpecificCharacterSet"))))
            header.elements[int(tag)] = out.getvalue()
        return offset, stop, header
