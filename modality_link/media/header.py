"""Lean reader of the header keys of a Part-10 file (PS3.10 §7, PS3.5 §7.1).

Reading a few keys of thousands of files through ``pydicom.dcmread`` costs
about a millisecond per file; this reader takes the File Meta from
:func:`modality_link.fileformat.read_file_meta` and parses the data set
elements of a Little Endian file directly from the bytes of the file, up to
the last key needed (never the Pixel Data), and keeps each key
as its complete Explicit VR Little Endian encoding, ready to be copied into a
Directory Record. Explicit VR Big Endian, Deflated, or a key that is a
Sequence in an Implicit VR file fall back to pydicom.
"""

from __future__ import annotations

import mmap
import os
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
from pydicom.uid import UID
from pydicom.valuerep import VR

from modality_link.fileformat import (
    LONG_VR_BYTES, SPACE_PADDED_VRS, TRANSFER_SYNTAX_UID, Part10Error, encode_element, is_regular_file_meta, meta_value,
    read_file_meta,
)
from modality_link.net.charset import TEXT_VRS, charset_terms, decode_values, effective_terms, python_encodings

_UNDEFINED = 0xFFFFFFFF
_ITEM, _ITEM_END, _SEQ_END = 0xFFFEE000, 0xFFFEE00D, 0xFFFEE0DD
_IMPLICIT_LE = "1.2.840.10008.1.2"
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


@dataclass
class Header:
    """Selected keys of one instance, each as its Explicit VR Little Endian encoding."""

    elements: dict[int, bytes] = field(default_factory=dict)
    meta: dict[int, bytes] = field(default_factory=dict)  # File Meta values, unpadded raw
    #: Raw text values and sequences of the whole data set (:func:`read_dataset` only).
    texts: list[bytes] | None = field(default=None, repr=False)
    sequences: list[bytes] = field(default_factory=list, repr=False)
    #: Wanted sequences of a walked data set (:func:`read_dataset`), each as its whole element
    #: in the file's own encoding (header, items, delimiters), for pydicom to read when present.
    kept_sequences: dict[int, bytes] = field(default_factory=dict, repr=False)
    _cache: dict[int, Any] = field(default_factory=dict, repr=False)
    _charset: list[str] | None = field(default=None, repr=False)

    @property
    def charset(self) -> list[str]:
        """Defined terms that decode this instance's text keys (docs/design.md "Character sets").

        The declared (0008,0005), normalised; if absent, guessed from the bytes of the keys read
        (of every text value and sequence of the data set, after :func:`read_dataset`).
        """
        if self._charset is None:
            declared = charset_terms(self.raw(0x00080005))
            if self.texts is None:
                self._charset = effective_terms(declared, [self.raw(t) or b"" for t in self.text_tags()])
            else:
                self._charset = effective_terms(declared, self.texts, seqs=self.sequences)
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
        return elem[12:] if elem[4:6] in LONG_VR_BYTES else elem[8:]

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
            self.decode([tag])
        return self._cache[tag]

    def decode(self, tags: Iterable[int]) -> None:
        """Decode the values of the keys `tags` that are present, all at once (:meth:`value`)."""
        todo = [t for t in tags if t in self.elements and t not in self._cache]
        if todo:
            raws = [(t, self.elements[t][4:6].decode(), self.raw(t) or b"") for t in todo]
            self._cache.update(zip(todo, decode_values(raws, self.charset)))


_VR_NAME = {vr.value.encode("ascii"): vr.value for vr in VR}
_IMPLICIT_HEAD = struct.Struct("<HHL")  # tag, value length (PS3.5 7.1.3)
_EXPLICIT_HEAD = struct.Struct("<HH2sH")  # tag, VR, value length (PS3.5 7.1.2)
_LENGTH = struct.Struct("<L")
#: pydicom reads a value longer than this only when asked (``defer_size`` of the archive's check).
_DEFERRED = 4096


@lru_cache(maxsize=None)
def _implicit_vr(tag: int) -> str:
    """The data dictionary's VR of `tag` for an Implicit VR element; "" when unknown (private)."""
    try:
        return dictionary_VR(tag)
    except KeyError:
        return ""


class _Reader:
    """Little Endian element walker over a window of the file (PS3.5 7.1, 7.5).

    Positions are file offsets; only the bytes around the element being read are held, so a
    value that is skipped (the Pixel Data) is never read.
    """

    def __init__(self, fp: BinaryIO | mmap.mmap, buf: bytes | mmap.mmap, implicit: bool, strict: bool = False) -> None:
        self.fp, self.buf, self.base, self.implicit = fp, buf, 0, implicit
        #: Refuse (:class:`_Fallback`) an unknown VR, and an undefined length on anything but a
        #: sequence inside an item (:func:`read_dataset`).
        self.strict = strict

    def need(self, end: int, pos: int) -> None:
        """Have the file's bytes [pos, end) in the window."""
        if pos < self.base or pos > self.base + len(self.buf):  # a jump: start a new window
            self.fp.seek(pos)
            self.base, self.buf = pos, b""
        while end > self.base + len(self.buf):
            more = self.fp.read(max(_CHUNK, end - self.base - len(self.buf)))
            if not more:
                raise _Fallback("truncated")
            self.buf = self.buf[pos - self.base :] + more
            self.base = pos

    def span(self, start: int, end: int) -> bytes:
        """The file's bytes [start, end), read if needed."""
        self.need(end, start)
        return self.buf[start - self.base : end - self.base]

    def element(self, pos: int) -> tuple[int, str | None, int, int]:
        """Return (tag, vr or None if implicit, value start, value length) at `pos`."""
        at = pos - self.base
        if at < 0 or at + 8 > len(self.buf):
            self.need(pos + 8, pos)
            at = pos - self.base
        if self.implicit:
            group, elem, length = _IMPLICIT_HEAD.unpack_from(self.buf, at)
            return (group << 16) | elem, None, pos + 8, length
        group, elem, vr, length = _EXPLICIT_HEAD.unpack_from(self.buf, at)
        tag = (group << 16) | elem
        if group == 0xFFFE:
            return tag, None, pos + 8, _LENGTH.unpack_from(self.buf, at + 4)[0]
        name = _VR_NAME.get(vr)
        if name is None:
            if self.strict:
                raise _Fallback(f"VR {vr!r}")
            name = vr.decode("latin-1")
        if vr in LONG_VR_BYTES:
            if at + 12 > len(self.buf):
                self.need(pos + 12, pos)
                at = pos - self.base
            return tag, name, pos + 12, _LENGTH.unpack_from(self.buf, at + 8)[0]
        return tag, name, pos + 8, length

    def skip_undefined(self, pos: int, sequence: bool = True) -> int:
        """Skip the items of an undefined-length value starting at `pos` (a sequence, PS3.5 7.5,
        or with `sequence` false encapsulated Pixel Data, A.4); return the end of its Sequence
        Delimitation Item. In strict mode the elements of a sequence's items are walked too."""
        while True:
            tag, _, start, length = self.element(pos)
            if tag == _SEQ_END:
                return start
            if tag != _ITEM:
                raise _Fallback("malformed sequence")
            if length == _UNDEFINED:
                pos = self._item(start, None)
            elif self.strict and sequence:
                pos = self._item(start, start + length)
            else:
                pos = start + length

    def _item(self, pos: int, end: int | None) -> int:
        """Walk the elements of an item from `pos` to `end` (defined length) or to its Item
        Delimitation Item (undefined length, `end` None); return where the item ends."""
        while pos != end:
            tag, vr, start, length = self.element(pos)
            if end is None and tag == _ITEM_END:
                return start
            if length != _UNDEFINED:
                pos = start + length
            elif self.strict and (vr or _implicit_vr(tag)) != "SQ":
                raise _Fallback("undefined length")
            else:
                pos = self.skip_undefined(start)
            if end is not None and pos > end:
                raise _Fallback("element beyond its item")
        return pos


def _strict_vr(reader: _Reader, tag: int, vr: str | None, length: int) -> str:
    """The VR of a top-level element of a data set walked to its end (:func:`read_dataset`),
    or :class:`_Fallback` for an undefined length on anything but a sequence (PS3.5 7.5) or
    encapsulated Pixel Data (A.4). (An unknown VR, PS3.5 6.2, stopped :meth:`_Reader.element`.)"""
    if vr is None:
        vr = _implicit_vr(tag)
    if length == _UNDEFINED and vr != "SQ" and not (tag == 0x7FE00010 and vr in ("OB", "OW") and not reader.implicit):
        raise _Fallback("undefined length")
    return vr


def _walk(reader: _Reader, pos: int, wanted: frozenset[int], header: Header, size: int | None) -> int:
    """Walk the data set's elements from `pos`, keeping the `wanted` ones in `header`; return
    where the walk stopped.

    Without `size` (media) the walk stops after the last wanted key, or at the end of the file.
    With `size` it is strict and walks the whole data set, which must end exactly at `size`
    (PS3.10 7.2): tags ascending (PS3.5 7.1), every VR known, every value inside the file; a
    wanted sequence (PS3.5 7.5) is kept whole in :attr:`Header.kept_sequences`; it also collects
    the raw text values and sequences that the character set is guessed from
    (:func:`modality_link.net.charset.effective_terms`), as pydicom would see them.
    """
    strict = size is not None
    last = 0xFFFFFFFF if strict else max(wanted)
    previous = -1
    while size is None or pos < size:
        try:
            tag, vr, start, length = reader.element(pos)
        except _Fallback:
            if not strict and reader.base + len(reader.buf) - pos < 8:  # end of file
                break
            raise
        if tag > last:
            break
        if strict:
            if tag <= previous:
                raise _Fallback("tags not ascending")
            previous = tag
            vr = _strict_vr(reader, tag, vr, length)
        if length == _UNDEFINED:
            if tag in wanted and not (strict and vr == "SQ"):
                raise _Fallback("sequence key")
            end = reader.skip_undefined(start, sequence=vr != "OB" and vr != "OW")
            if tag in wanted:
                header.kept_sequences[tag] = reader.span(pos, end)
        else:
            end = start + length
            if tag in wanted and strict and vr == "SQ":
                header.kept_sequences[tag] = reader.span(pos, end)
            elif tag in wanted:
                header.elements[tag] = _kept(reader, tag, vr, pos, start, end, strict)
            if strict and length <= _DEFERRED and (vr in TEXT_VRS or vr == "SQ"):
                kept = header.sequences if vr == "SQ" else header.texts
                if kept is not None:  # read_dataset gives the header a list of texts
                    kept.append(reader.span(start, end))
        pos = end
    if strict and pos != size:
        raise _Fallback("truncated or trailing bytes")
    return pos


def _kept(reader: _Reader, tag: int, vr: str | None, pos: int, start: int, end: int, strict: bool) -> bytes:
    """A wanted key as its Explicit VR Little Endian encoding."""
    if strict and ((end - start) % 2 or end - start > _DEFERRED or vr == "UN"):
        raise _Fallback("odd, long or UN key")  # pydicom's reading of it is the reference
    if reader.implicit:
        vr = vr_of(tag)
        if vr == "SQ" or " or " in vr:
            raise _Fallback("sequence or ambiguous key in implicit VR")
        return encode_element(tag, vr, reader.span(start, end))
    return reader.span(pos, end)  # Explicit VR Little Endian: the element as it is (incl. defined-length SQ)


def _little_endian(meta: dict[int, bytes]) -> bool | None:
    """Implicit (True) or Explicit (False) VR Little Endian by the File Meta's transfer syntax;
    None for one the lean reader leaves to pydicom (Big Endian, Deflated, none)."""
    ts = meta_value(meta, TRANSFER_SYNTAX_UID)
    if ts == "1.2.840.10008.1.2.2" or ts == "1.2.840.10008.1.2.1.99" or not ts:
        return None
    return ts == _IMPLICIT_LE


@lru_cache(maxsize=64)
def _walkable_syntax(value: bytes) -> bool:
    """True for a Transfer Syntax UID that pydicom knows (PS3.6 Table A-1), as it requires,
    whose data set is Little Endian and not deflated (PS3.5 A.5)."""
    uid = UID(value.rstrip(b"\x00 ").decode("ascii", "replace"))
    return uid.is_transfer_syntax and uid.is_little_endian and not uid.is_deflated


def read_dataset(fp: BinaryIO | mmap.mmap, wanted: Iterable[int]) -> Header | None:
    """Walk the whole data set of the Part-10 file `fp` (at its start) by its element headers
    (PS3.5 7.1; sequences 7.5; encapsulated Pixel Data A.4), reading no value but the keys
    `wanted` and the text that decides the character set (:attr:`Header.charset`). A file
    mapped in memory is walked where it lies, without reading it into buffers.

    Returns None when the walk cannot vouch for the file - Big Endian, Deflated, anything
    irregular, truncated or trailing bytes: the caller then reads it with pydicom, which says
    what is wrong. A data set that is walked ends exactly at the end of the file.
    """
    start = fp.tell()
    fp.seek(0, os.SEEK_END)  # a file, its bytes (io.BytesIO) or its mapping
    size = fp.tell()
    fp.seek(start)
    try:
        offset, meta, buf = read_file_meta(fp)
        implicit = _little_endian(meta)
        # a File Meta that is not as PS3.10 7.1 has it is left to pydicom, which reads it its own way
        if implicit is None or offset >= size or not is_regular_file_meta(buf, offset) \
                or not _walkable_syntax(meta.get(TRANSFER_SYNTAX_UID, b"")):
            return None
    except (Part10Error, struct.error):
        return None
    header = Header(meta=meta, texts=[], sequences=[])
    try:
        window = fp if isinstance(fp, mmap.mmap) else buf  # both hold the file from its first byte
        _walk(_Reader(fp, window, implicit, strict=True), offset, frozenset(wanted), header, size)
    except (_Fallback, struct.error, Part10Error, RecursionError):
        return None
    return header


def read_header(fp: BinaryIO, wanted: Iterable[int]) -> tuple[int, int, Header]:
    """Read the keys `wanted` (tags) from the Part-10 stream `fp` (at its start).

    Returns (offset of the data set, offset where reading stopped, header). Raises
    :class:`modality_link.fileformat.Part10Error` for a file that is not a DICOM File.
    """
    wanted = frozenset(wanted)
    offset, meta, buf = read_file_meta(fp)
    header = Header(meta=meta)
    try:
        implicit = _little_endian(meta)
        if implicit is None:
            raise _Fallback("not Little Endian")
        pos = _walk(_Reader(fp, buf, implicit), offset, wanted, header, None)
        return offset, pos, header
    except _Fallback:
        fp.seek(0)
        ds = dcmread(fp, stop_before_pixels=True, specific_tags=[Tag(t) for t in wanted])
        stop = fp.tell()
        for tag in sorted(t for t in ds.keys() if t in wanted):
            raw = ds.get_item(tag)
            vr = raw.VR or vr_of(tag)
            if vr in SPACE_PADDED_VRS and isinstance(raw.value, bytes):  # text is not byte-swapped: keep its encoding
                header.elements[int(tag)] = encode_element(int(tag), vr, raw.value)
                continue
            out = DicomBytesIO()
            out.is_little_endian, out.is_implicit_VR = True, False
            write_data_element(out, ds[tag], python_encodings(charset_terms(ds.get("SpecificCharacterSet"))))
            header.elements[int(tag)] = out.getvalue()
        return offset, stop, header
