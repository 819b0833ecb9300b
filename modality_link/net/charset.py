"""Specific Character Set (0008,0005) on the way in: tolerant decoding (PS3.3 C.12.1.1.2, PS3.5 §6.1).

Peers write (0008,0005) wrongly or not at all (REQUIREMENTS B8, B9, seed 001 "ISO_IR100"). Before
pydicom decodes a received dataset, :func:`repair_charset` rewrites known misspellings to the
defined terms, and fills in a missing value by looking at the raw bytes of the text elements:
ISO 2022 escape sequences mean Japanese (ISO 2022 IR 13 / IR 87), valid UTF-8 means ISO_IR 192,
anything else uses the node's default (ISO_IR 100 unless configured otherwise).

On the way out we write ISO_IR 100 when the values fit Latin-1, else ISO_IR 192 (DESIGN.md).
"""

from __future__ import annotations

import re

from pydicom.charset import python_encoding
from pydicom.datadict import dictionary_VR
from pydicom.dataelem import RawDataElement
from pydicom.dataset import Dataset

#: Text VRs whose values follow (0008,0005) (PS3.5 §6.1.2.3).
TEXT_VRS = {"SH", "LO", "ST", "LT", "UT", "PN", "UC"}

#: Terms seen in the field mapped to the defined term (case- and punctuation-insensitive key).
_ALIASES = {
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
    if key in _ALIASES:
        return _ALIASES[key]
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


def guess_charset(raw: list[bytes], default: str = "ISO_IR 100", seqs: list[bytes] = ()) -> str:
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


def repair_charset(ds: Dataset, default: str = "ISO_IR 100") -> Dataset:
    """Fix (0008,0005) of a received, not yet decoded dataset in place, then decode it.

    - misspelled terms become defined terms ("ISO_IR100" → "ISO_IR 100");
    - a missing or empty value is guessed from the bytes (see :func:`guess_charset`);
    - a single-byte declaration contradicted by ISO 2022 escapes is corrected to Japanese.
    """
    raw, seqs = _raw_text(ds)
    declared = ds.get("SpecificCharacterSet", "")
    if isinstance(declared, str):
        terms = [declared] if declared else []
    else:
        terms = list(declared)
    terms = [normalise_term(t) for t in terms]
    guessed = guess_charset(raw, default, seqs)
    if not any(terms):
        terms = guessed.split("\\") if guessed else []
    elif guessed == JAPANESE and not any("2022" in t for t in terms):
        terms = JAPANESE.split("\\")
    if terms:
        ds.SpecificCharacterSet = terms if len(terms) > 1 else terms[0]
    elif "SpecificCharacterSet" in ds:
        del ds.SpecificCharacterSet
    ds.decode()
    return ds


def charset_for(values: list[str]) -> str:
    """ISO_IR 100 when every value fits Latin-1, else ISO_IR 192 (DESIGN.md)."""
    try:
        for v in values:
            v.encode("latin-1")
        return "ISO_IR 100"
    except UnicodeEncodeError:
        return "ISO_IR 192"
