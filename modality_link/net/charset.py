"""Specific Character Set (0008,0005) on the way in: tolerant decoding (PS3.3 C.12.1.1.2, PS3.5 §6.1).

Peers write (0008,0005) wrongly or not at all (a PACS's worklist server writes "ISO_IR100"). Before
pydicom decodes a received dataset, :func:`repair_charset` rewrites known misspellings to the
defined terms, and fills in a missing value by looking at the raw bytes of the text elements:
ISO 2022 escape sequences mean Japanese (ISO 2022 IR 13 / IR 87), valid UTF-8 means ISO_IR 192,
anything else uses the node's default (ISO_IR 100 unless configured otherwise).

On the way out we write ISO_IR 100 when the values fit Latin-1, else ISO_IR 192 (docs/design.md
"Character sets").

This module is the one place that turns encoded text into Unicode (docs/design.md "Character
sets"): the media reader, the DICOMDIR writer, the PDI files, the archive index and the worklist
all go through :func:`effective_terms` and :func:`decode_value`, which use pydicom's own mapping of
the defined terms to Python codecs (``pydicom.charset.convert_encodings``) and its decoder for code
extensions (PS3.5 §6.1.2.5). A defined term is never handed to Python as a codec name.
"""

from __future__ import annotations

import logging
import re
import warnings
from collections.abc import Iterable, Sequence
from typing import Any

from pydicom.charset import convert_encodings, python_encoding
from pydicom.datadict import dictionary_VR
from pydicom.dataelem import RawDataElement, convert_raw_data_element
from pydicom.dataset import Dataset
from pydicom.tag import Tag

LOGGER = logging.getLogger(__name__)

#: Text VRs whose values follow (0008,0005) (PS3.5 §6.1.2.3).
TEXT_VRS = {"SH", "LO", "ST", "LT", "UT", "PN", "UC"}

#: Terms seen in the field mapped to the defined term (case- and punctuation-insensitive key).
ALIASES = {
    "UTF8": "ISO_IR 192",
    "UTF-8": "ISO_IR 192",
    "ISOIR192": "ISO_IR 192",
    "LATIN1": "ISO_IR 100",
    "ISO88591": "ISO_IR 100",
}

JAPANESE = "ISO 2022 IR 13\\ISO 2022 IR 87"


def normalise_term(term: str) -> str:
    """Return the PS3.3 C.12.1.1.2 defined term for `term` (e.g. "ISO_IR100" → "ISO_IR 100")."""
    term = term.strip()
    if term == "" or term in python_encoding:
        return term
    key = re.sub(r"[\s_-]", "", term.upper())
    if key in ALIASES:
        return ALIASES[key]
    m = re.fullmatch(r"ISO2022IR(\d+)", key)
    if m:
        fixed = f"ISO 2022 IR {int(m.group(1))}"
        return fixed if fixed in python_encoding else term
    m = re.fullmatch(r"ISOIR(\d+)", key)
    if m:
        fixed = f"ISO_IR {int(m.group(1))}"
        return fixed if fixed in python_encoding else term
    return term


def _raw_text(ds: Dataset) -> tuple[list[bytes], list[bytes]]:
    """Raw bytes of (text elements, sequences) of a dataset not yet decoded.

    With Implicit VR the raw elements carry no VR, so the data dictionary gives it. Sequences are
    scanned as raw bytes (only for escape sequences): converting them here would fix their
    items' character set before we repaired (0008,0005).
    """
    text: list[bytes] = []
    seqs: list[bytes] = []
    for elem in ds.elements():
        value = elem.value
        if not isinstance(value, (bytes, bytearray)) or not value:
            continue
        vr = elem.VR
        if vr is None:
            try:
                vr = dictionary_VR(elem.tag)
            except KeyError:
                continue
        if vr in TEXT_VRS:
            text.append(bytes(value))
        elif vr == "SQ":
            seqs.append(bytes(value))
    return text, seqs


def guess_charset(raw: Sequence[bytes], default: str = "ISO_IR 100", seqs: Sequence[bytes] = ()) -> str:
    """Guess (0008,0005) from raw text bytes when a peer sent none."""
    blob = b"".join(raw)
    if any(esc in b for b in (blob, *seqs) for esc in (b"\x1b$B", b"\x1b(J", b"\x1b)I")):
        return JAPANESE
    if not any(b >= 0x80 for b in blob):
        return ""
    try:
        blob.decode("utf-8")
        return "ISO_IR 192"
    except UnicodeDecodeError:
        return default


def charset_terms(value: str | bytes | Iterable[Any] | None) -> list[str]:
    """The defined terms of a (0008,0005) value (str with backslashes, list, bytes or None), each
    normalised by :func:`normalise_term`; ``[]`` when absent or empty (PS3.3 C.12.1.1.2)."""
    if value is None:
        return []
    if isinstance(value, (bytes, bytearray)):
        value = bytes(value).rstrip(b" \x00").decode("ascii", "replace")
    terms = value.split("\\") if isinstance(value, str) else [str(v) for v in value]
    terms = [normalise_term(t) for t in terms]
    return terms if any(terms) else []


def effective_terms(declared: Sequence[str], raw: Iterable[bytes], default: str = "ISO_IR 100",
                    seqs: Sequence[bytes] = ()) -> list[str]:
    """The character set that really decodes the text values `raw` of a data set.

    - misspelled declared terms are normalised ("ISO_IR100" → "ISO_IR 100");
    - nothing declared: guessed from the bytes (:func:`guess_charset`), so that the default
      repertoire stays the default for ASCII and non-ASCII bytes are not lost;
    - a single-byte declaration contradicted by ISO 2022 escapes becomes Japanese.
    """
    terms = [normalise_term(t) for t in declared]
    guessed = guess_charset(list(raw), default, seqs)
    if not any(terms):
        return guessed.split("\\") if guessed else []
    if guessed == JAPANESE and not any("2022" in t for t in terms):
        return JAPANESE.split("\\")
    return terms


def python_encodings(terms: Sequence[str]) -> list[str]:
    """Python codecs for the defined terms `terms`, by pydicom's mapping (PS3.3 C.12.1.1.2).

    Unknown terms fall back to the default repertoire with a log line (pydicom's behaviour),
    never to an exception.
    """
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        encodings = convert_encodings(list(terms) or ["ISO_IR 6"])
    for w in caught:
        LOGGER.warning("Specific Character Set %s: %s", "\\".join(terms), w.message)
    return encodings


def decode_value(tag: int, vr: str, raw: bytes, terms: Sequence[str]) -> Any:
    """The value of one encoded element (Little Endian), decoded by pydicom in `terms` (PS3.5 §6.1)."""
    return decode_values([(tag, vr, raw)], terms)[0]


def decode_values(elements: Sequence[tuple[int, str, bytes]], terms: Sequence[str]) -> list[Any]:
    """The values of encoded elements (tag, VR, Little Endian bytes), decoded by pydicom in
    `terms` (PS3.5 §6.1): :func:`decode_value` for several at the cost of one."""
    encodings = python_encodings(terms)
    values, warned = [], []
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        for tag, vr, raw in elements:
            seen = len(caught)
            elem = RawDataElement(Tag(tag), vr, len(raw), raw, 0, False, True)
            values.append(convert_raw_data_element(elem, encoding=encodings).value)
            warned += [(tag, w) for w in caught[seen:]]
    for tag, w in warned:
        LOGGER.warning("(%04X,%04X): %s", tag >> 16, tag & 0xFFFF, w.message)
    return values


def text_of(value: Any) -> str:
    """A decoded value as one str: multiple values joined by a backslash, None as ""."""
    if value is None:
        return ""
    if isinstance(value, (list, tuple)) or type(value).__name__ == "MultiValue":
        return "\\".join(str(v) for v in value)
    return str(value)


def dataset_charset(ds: Dataset, default: str = "ISO_IR 100") -> list[str]:
    """The :func:`effective_terms` of a data set read but not yet decoded (raw elements)."""
    raw, seqs = _raw_text(ds)
    return effective_terms(charset_terms(ds.get("SpecificCharacterSet")), raw, default, seqs)


def decoded_text(ds: Dataset, keyword: str, terms: Sequence[str]) -> str:
    """The value of `keyword` in `ds` as one str, decoded in `terms` (see :func:`dataset_charset`).

    pydicom decodes a file's values in the (0008,0005) it read; this decodes the raw value
    itself, so a corrected or guessed character set applies.
    """
    elem = ds.get_item(keyword)
    if elem is None:
        return ""
    if isinstance(elem, RawDataElement) and isinstance(elem.value, bytes):
        vr = elem.VR or dictionary_VR(elem.tag)
        return text_of(decode_value(int(elem.tag), vr, elem.value, terms))
    return text_of(elem.value)


def repair_charset(ds: Dataset, default: str = "ISO_IR 100") -> Dataset:
    """Fix (0008,0005) of a received, not yet decoded dataset in place (:func:`dataset_charset`),
    then decode it."""
    terms = dataset_charset(ds, default)
    if terms:
        ds.SpecificCharacterSet = terms if len(terms) > 1 else terms[0]
    elif "SpecificCharacterSet" in ds:
        del ds.SpecificCharacterSet
    ds.decode()
    return ds


def charset_for(values: list[str]) -> str:
    """ISO_IR 100 when every value fits Latin-1, else ISO_IR 192 (docs/design.md "Character sets")."""
    try:
        for v in values:
            v.encode("latin-1")
        return "ISO_IR 100"
    except UnicodeEncodeError:
        return "ISO_IR 192"
