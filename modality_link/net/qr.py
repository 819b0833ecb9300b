"""Query/Retrieve SCP of the disk server: C-FIND, C-MOVE and C-GET (PS3.4 Annex C) for the
Patient Root and Study Root Information Models (PS3.4 C.6.1, C.6.2), answered from the archive
index, never by opening a file (docs/design.md "Query/Retrieve SCP").

- Hierarchical search only (PS3.4 C.4.1.3.1): an identifier with keys of a level below its
  Query/Retrieve Level is refused with 0xA900, one without a single value in the unique key of
  each level above with 0xC000, both with an Error Comment that says so; the Extended
  Negotiation answers "relational queries not supported" (PS3.4 C.5.1.1).
- Matching (PS3.4 C.2.2.2): single value, wildcard ``*`` ``?``, range of DA/TM/DT, universal,
  list of UIDs, sequence (one item level deep); Person Names case-insensitively, by component
  group; combined date and time range matching (C.2.2.2.5.1) when it was negotiated. The query
  is decoded in its own Specific Character Set (:mod:`modality_link.net.charset`); answers are
  in ISO_IR 192 when a value is not ASCII.
- Unsupported keys are neither matched nor returned (PS3.4 C.2.2.1.3); their presence makes the
  pending status 0xFF01.
- C-MOVE sends to configured nodes only (else 0xA801), all sub-operations over one association
  (PS3.4 C.4.2.3); C-GET over the requestor's association where it took the SCP role (C.4.3.3).
  A C-CANCEL-RQ ends either between responses with 0xFE00.
"""

from __future__ import annotations

import logging
import re
import struct
from dataclasses import dataclass, field
from io import BytesIO
from pathlib import Path
from typing import Any, Callable, Iterable, Iterator, Sequence

from pydicom.datadict import dictionary_VR
from pydicom.dataset import Dataset
from pydicom.filereader import read_dataset
from pydicom.uid import ExplicitVRBigEndian, ImplicitVRLittleEndian

from modality_link import audit
from modality_link.archive import IMAGE_KEYS, REQUEST_ATTRIBUTES, REQUEST_KEYS, SERIES_KEYS, Archive
from modality_link.config import Listener, Node, Timeouts
from modality_link.db import InstanceRow
from modality_link.media.header import tag_of, vr_of
from modality_link.net.acceptor import C_FIND_RQ, C_GET_RQ, C_MOVE_RQ, DataSetSink, InMemory, Reply, Request, Service
from modality_link.net.association import AssociationFailed
from modality_link.net.charset import repair_charset, text_of
from modality_link.net.status import (
    CANCEL,
    IDENTIFIER_MISMATCH,
    MISSING_UNIQUE_KEYS,
    MOVE_DESTINATION_UNKNOWN,
    OUT_OF_RESOURCES,
    PENDING,
    PENDING_WARNING,
    SOME_SUB_OPERATIONS_FAILED,
    SUB_OPERATIONS_IMPOSSIBLE,
    SUCCESS,
    UNABLE_TO_PROCESS,
)
from modality_link.net.storage import Instance, Outcome, Ready, build_contexts, classify, prepare, store_instances
from modality_link.net.upper_layer import AssociationLost, Requestor

LOG = logging.getLogger("modality_link.net.qr")

#: SOP Class UIDs of the information models (PS3.4 C.6.1.2, C.6.2.2; PS3.6 Annex A).
PATIENT_ROOT_FIND = "1.2.840.10008.5.1.4.1.2.1.1"
PATIENT_ROOT_MOVE = "1.2.840.10008.5.1.4.1.2.1.2"
PATIENT_ROOT_GET = "1.2.840.10008.5.1.4.1.2.1.3"
STUDY_ROOT_FIND = "1.2.840.10008.5.1.4.1.2.2.1"
STUDY_ROOT_MOVE = "1.2.840.10008.5.1.4.1.2.2.2"
STUDY_ROOT_GET = "1.2.840.10008.5.1.4.1.2.2.3"
PATIENT_ROOT = (PATIENT_ROOT_FIND, PATIENT_ROOT_MOVE, PATIENT_ROOT_GET)

#: Transfer syntaxes of the Q/R contexts: identifiers are decoded, so native ones only.
QR_TRANSFER_SYNTAXES = ["1.2.840.10008.1.2.1", ImplicitVRLittleEndian, ExplicitVRBigEndian]

UNIQUE = {"PATIENT": "PatientID", "STUDY": "StudyInstanceUID", "SERIES": "SeriesInstanceUID",
          "IMAGE": "SOPInstanceUID"}
#: The keys answered at each level of the Patient Root model: the R and U keys (PS3.4 C.6.1.1.2-5),
#: the optional keys of docs/design.md "Query/Retrieve SCP", and the computed keys.
_PATIENT = ("PatientName", "PatientID", "PatientBirthDate", "PatientSex")
_PATIENT_COUNTS = ("NumberOfPatientRelatedStudies", "NumberOfPatientRelatedSeries",
                   "NumberOfPatientRelatedInstances")
_STUDY = ("StudyDate", "StudyTime", "AccessionNumber", "StudyID", "StudyInstanceUID", "StudyDescription",
          "ReferringPhysicianName", "ModalitiesInStudy", "NumberOfStudyRelatedSeries",
          "NumberOfStudyRelatedInstances")
_SERIES = ("Modality", "SeriesNumber", "SeriesInstanceUID", "SeriesDescription", "BodyPartExamined",
           "NumberOfSeriesRelatedInstances", *SERIES_KEYS, REQUEST_ATTRIBUTES)
_IMAGE = ("InstanceNumber", "SOPInstanceUID", "SOPClassUID", *IMAGE_KEYS)
#: Keys that are only returned, never matched (PS3.4 C.6.1.1.2: "-" in the matching column).
COMPUTED = frozenset({*_PATIENT_COUNTS, "NumberOfStudyRelatedSeries", "NumberOfStudyRelatedInstances",
                      "NumberOfSeriesRelatedInstances"})
#: Level of each key, per model. In the Study Root model the patient's keys are study keys
#: (PS3.4 C.6.2.1.2); the patient's counts are not answered there.
_LEVEL_OF = {
    "PATIENT_ROOT": {**dict.fromkeys((*_PATIENT, *_PATIENT_COUNTS), "PATIENT"), **dict.fromkeys(_STUDY, "STUDY"),
                     **dict.fromkeys(_SERIES, "SERIES"), **dict.fromkeys(_IMAGE, "IMAGE")},
    "STUDY_ROOT": {**dict.fromkeys((*_PATIENT, *_STUDY), "STUDY"), **dict.fromkeys(_SERIES, "SERIES"),
                   **dict.fromkeys(_IMAGE, "IMAGE")},
}
LEVELS = {"PATIENT_ROOT": ("PATIENT", "STUDY", "SERIES", "IMAGE"), "STUDY_ROOT": ("STUDY", "SERIES", "IMAGE")}
#: Attributes of an identifier that are no keys (PS3.4 C.4.1.1.3.1-2).
_NOT_KEYS = frozenset({"QueryRetrieveLevel", "SpecificCharacterSet", "RetrieveAETitle", "InstanceAvailability",
                       "TimezoneOffsetFromUTC", "QueryRetrieveView"})
#: Date and time keys matched together by combined date and time range matching (C.2.2.2.5.1).
_DATE_TIME_PAIRS = (("StudyDate", "StudyTime"), ("SeriesDate", "SeriesTime"), ("ContentDate", "ContentTime"),
                    ("InstanceCreationDate", "InstanceCreationTime"),
                    ("PerformedProcedureStepStartDate", "PerformedProcedureStepStartTime"))


class QueryError(Exception):
    """A request refused with `status` (PS3.4 C.4.1.1.4); the message is its Error Comment."""

    def __init__(self, status: int, comment: str) -> None:
        super().__init__(comment)
        self.status = status


def model_of(sop_class: str) -> str:
    return "PATIENT_ROOT" if sop_class in PATIENT_ROOT else "STUDY_ROOT"


def decode_identifier(data: bytes, transfer_syntax: str) -> Dataset:
    """The identifier of a request in its presentation context's syntax, decoded in its own
    Specific Character Set (PS3.5 6.1; misspelled terms repaired, :func:`repair_charset`)."""
    try:
        ds = read_dataset(BytesIO(data), transfer_syntax == ImplicitVRLittleEndian,
                          transfer_syntax != ExplicitVRBigEndian)
        return repair_charset(ds)
    except Exception as exc:  # a data set pydicom cannot read
        raise QueryError(UNABLE_TO_PROCESS, f"the identifier cannot be read: {exc}") from None


def _level(ds: Dataset, model: str) -> str:
    level = text_of(ds.get("QueryRetrieveLevel")).strip().upper()
    if level not in LEVELS[model]:
        raise QueryError(IDENTIFIER_MISMATCH, f"Query/Retrieve Level (0008,0052) {level or 'missing'}: not one of "
                                              f"{', '.join(LEVELS[model])} of this model (PS3.4 C.6)")
    return level


def _single(ds: Dataset, keyword: str) -> str | None:
    """The value of a unique key if it holds one single value (no wildcard, no list)."""
    value = text_of(ds.get(keyword)).strip()
    return value if value and not any(c in value for c in "*?\\") else None


# -- matching (PS3.4 C.2.2.2) ----------------------------------------------------------------------

Match = Callable[[Any], bool]


def _wildcard(pattern: str) -> Match:
    """Single value or wildcard matching of one value (C.2.2.2.1, C.2.2.2.4)."""
    if "*" not in pattern and "?" not in pattern:
        return lambda value: value == pattern
    rx = re.compile("".join(".*" if c == "*" else "." if c == "?" else re.escape(c) for c in pattern), re.S)
    return lambda value: rx.fullmatch(value) is not None


def _any_value(patterns: list[Match]) -> Match:
    """A stored value matches when one of its values matches one of the query's values."""
    def match(stored: Any) -> bool:
        values = [v.strip() for v in text_of(stored).split("\\")]
        return any(p(v) for v in values for p in patterns)
    return match


def _name_groups(name: str) -> list[str]:
    """The component groups of a Person Name, case-folded, trailing ^ and spaces dropped."""
    return [g.rstrip("^ ").casefold() for g in name.split("=")]


def _person_name(query: str) -> Match:
    """PN matching, case-insensitive (C.2.2.2.1): a query of one component group matches any
    group of the stored name (alphabetic, ideographic, phonetic) or the whole name; a query of
    several groups matches group by group, an empty group universally."""
    groups = [None if g in ("", "*") else _wildcard(g) for g in _name_groups(query)]

    def match(stored: Any) -> bool:
        name = text_of(stored)
        mine = _name_groups(name)
        if len(groups) == 1:
            only = groups[0]
            return only is None or any(only(g) for g in (name.casefold().rstrip("^ "), *mine))
        return all(p is None or (i < len(mine) and p(mine[i])) for i, p in enumerate(groups))
    return match


def _time(value: str, upper: bool) -> str:
    """A TM value as HHMMSS.FFFFFF; the missing digits of a reduced precision are the lowest
    (lower bound) or highest (upper bound) they can be (PS3.5 6.2, TM)."""
    value = value.replace(":", "").strip()
    whole, _, fraction = value.partition(".")
    whole = whole + ("235959"[len(whole):] if upper else "000000"[len(whole):]) if len(whole) < 6 else whole[:6]
    return f"{whole}.{fraction.ljust(6, '9' if upper else '0')[:6]}"


def _date(value: str) -> str:
    return value.replace(".", "").strip()  # the ACR-NEMA form YYYY.MM.DD (PS3.5 6.2, note)


def _bounds(vr: str, query: str) -> tuple[str, str]:
    """(lower, upper) of a DA or TM single value or range ("a-b", "-b", "a-"), normalised so
    that strings compare as the points in time do."""
    low, dash, high = query.partition("-")
    if not dash:
        high = low
    if vr == "DA":
        return _date(low) or "00000000", _date(high) or "99999999"
    return _time(low, False) if low.strip() else "", _time(high, True) if high.strip() else "999999.999999"


def _range(vr: str, query: str) -> Match:
    """Range (or single value) matching of dates and times (C.2.2.2.5); an empty stored value
    matches no range."""
    low, high = _bounds(vr, query)

    def match(stored: Any) -> bool:
        value = text_of(stored).strip()
        if not value:
            return False
        point = _date(value) if vr == "DA" else _time(value, False)
        return low <= point <= high
    return match


def _combined(date_query: str, time_query: str) -> Callable[[dict[str, Any], str, str], bool]:
    """Combined date and time range matching (C.2.2.2.5.1): the pair is one DT range, from the
    first date at the first time to the last date at the last time."""
    d_low, dash, d_high = date_query.partition("-")
    t_low, _, t_high = time_query.partition("-") if "-" in time_query else (time_query, "", time_query)
    if not dash:
        d_high = d_low
    low = (_date(d_low) + _time(t_low, False)) if d_low.strip() else ""
    high = (_date(d_high) + _time(t_high, True)) if d_high.strip() else "9" * 21

    def match(row: dict[str, Any], date_key: str, time_key: str) -> bool:
        date = _date(text_of(row.get(date_key)))
        if not date:
            return False
        return low <= date + _time(text_of(row.get(time_key)) or "000000", False) <= high
    return match


def matcher(keyword: str, query: str) -> Match | None:
    """The matching of one key (C.2.2.2) for the query value `query` (decoded, multiple values
    joined by backslashes); None for universal matching."""
    vr = dictionary_VR(keyword)
    if query.strip() in ("", "*"):
        return None
    if vr == "UI":  # list of UID matching (C.2.2.2.2)
        uids = {u.strip() for u in query.split("\\")}
        return lambda stored: text_of(stored).strip() in uids
    if vr in ("DA", "TM"):
        return _range(vr, query)
    if vr == "PN":
        return _person_name(query)
    return _any_value([_wildcard(v.strip()) for v in query.split("\\")])


def literal(keyword: str, query: str) -> str:
    """The longest run of the query value without wildcards that every matching value has in
    it (case-folded for a Person Name, :func:`_name_groups`); "" when there is none to rely on
    (UIDs, dates and times, lists of values)."""
    vr = dictionary_VR(keyword)
    if vr in ("UI", "DA", "TM") or "\\" in query:
        return ""
    parts = _name_groups(query) if vr == "PN" else [query.strip()]
    return max((run for part in parts for run in re.split(r"[*?]", part)), key=len, default="")


@dataclass
class Query:
    """A C-FIND identifier checked against its model (PS3.4 C.4.1.2.1, C.4.1.3.1)."""

    model: str
    level: str
    #: Requested keys of the levels answered, in the identifier's order.
    keys: list[str] = field(default_factory=list)
    #: The unique keys restricted to lists of values, for the index (:meth:`Index.qr_entities`).
    scope: dict[str, list[str]] = field(default_factory=dict)
    matches: list[tuple[str, Match]] = field(default_factory=list)
    combined: list[tuple[str, str, Callable[[dict[str, Any], str, str], bool]]] = field(default_factory=list)
    #: The Request Attributes Sequence's item keys requested and their matching.
    request_keys: list[str] = field(default_factory=list)
    request_matches: list[tuple[int, Match]] = field(default_factory=list)
    #: Keys the identifier has that we do not support (PS3.4 C.2.2.1.3): pending 0xFF01.
    unsupported: list[str] = field(default_factory=list)
    #: Text every match has in the value of a key (:func:`literal`), for the index to preselect.
    contains: dict[str, str] = field(default_factory=dict)

    @classmethod
    def parse(cls, sop_class: str, ds: Dataset, combined_date_time: bool = False) -> "Query":
        model = model_of(sop_class)
        query = cls(model, _level(ds, model))
        levels = LEVELS[model]
        depth = levels.index(query.level)
        for upper in levels[:depth]:  # hierarchical: one value in each unique key above
            value = _single(ds, UNIQUE[upper])
            if value is None:
                raise QueryError(UNABLE_TO_PROCESS, f"relational query: no single {UNIQUE[upper]} value "
                                                    "(PS3.4 C.4.1.2.1)")
            query.scope[UNIQUE[upper]] = [value]
        values: dict[str, str] = {}
        for elem in ds:
            keyword = elem.keyword
            if keyword in _NOT_KEYS:
                if keyword == "InstanceAvailability":  # returned when asked for (PS3.4 C.4.1.1.3.2)
                    query.keys.append(keyword)
                continue
            level = _LEVEL_OF[model].get(keyword)
            if level is None:
                query.unsupported.append(keyword or str(elem.tag))
                continue
            if levels.index(level) > depth:
                raise QueryError(IDENTIFIER_MISMATCH, f"relational query: {keyword} is a {level} key "
                                                      "(PS3.4 C.4.1.3.1)")
            query.keys.append(keyword)
            if keyword == REQUEST_ATTRIBUTES:
                query._request_sequence(elem.value)
            elif keyword not in COMPUTED and keyword not in query.scope:
                values[keyword] = text_of(elem.value)
        unique = UNIQUE[query.level]
        if unique in values and dictionary_VR(unique) == "UI" and values[unique].strip():
            query.scope[unique] = [u.strip() for u in values.pop(unique).split("\\")]
        if combined_date_time:
            for date_key, time_key in _DATE_TIME_PAIRS:
                date, time = values.get(date_key, "").strip(), values.get(time_key, "").strip()
                if "-" in date and time:
                    values.pop(date_key), values.pop(time_key)
                    query.combined.append((date_key, time_key, _combined(date, time)))
        for keyword, value in values.items():
            match = matcher(keyword, value)
            if match is not None:
                query.matches.append((keyword, match))
                text = literal(keyword, value)
                if text:
                    query.contains[keyword] = text
        return query

    @property
    def counts(self) -> bool:
        """Whether a computed key is requested (else the index need not count)."""
        return any(k in COMPUTED or k == "ModalitiesInStudy" for k in self.keys)

    def _request_sequence(self, items: Sequence[Dataset]) -> None:
        """Sequence matching one item level deep (C.2.2.2.6): the first item's keys."""
        item = items[0] if items else Dataset()
        for elem in item:
            if elem.keyword not in REQUEST_KEYS:
                self.unsupported.append(f"{REQUEST_ATTRIBUTES}>{elem.keyword}")
                continue
            self.request_keys.append(elem.keyword)
            match = matcher(elem.keyword, text_of(elem.value))
            if match is not None:
                self.request_matches.append((REQUEST_KEYS.index(elem.keyword), match))
        if not items:  # a zero-length sequence: every item key is returned
            self.request_keys = list(REQUEST_KEYS)

    def matching_requests(self, row: dict[str, Any]) -> list[tuple[str, str]] | None:
        """The items of the entity's Request Attributes Sequence that match; None: no match."""
        items = row.get(REQUEST_ATTRIBUTES) or []
        if not self.request_matches:
            return list(items)
        found = [item for item in items if all(m(item[i]) for i, m in self.request_matches)]
        return found or None

    def answers(self, rows: Iterable[dict[str, Any]], retrieve_ae: str, transfer_syntax: str) -> Iterator[bytes]:
        """The response identifiers of the matching entities (PS3.4 C.4.1.2.2, C.4.1.3.1),
        encoded in `transfer_syntax`."""
        writer = IdentifierWriter(transfer_syntax)
        request_tags = sorted((tag_of(k), k) for k in self.request_keys)
        keys = sorted((tag_of(k), k) for k in {*self.keys, "QueryRetrieveLevel", "RetrieveAETitle"})
        fixed = {"QueryRetrieveLevel": self.level, "RetrieveAETitle": retrieve_ae, "InstanceAvailability": "ONLINE"}
        for row in rows:
            if not all(m(row.get(k)) for k, m in self.matches):
                continue
            if not all(m(row, d, t) for d, t, m in self.combined):
                continue
            requests = self.matching_requests(row) if REQUEST_ATTRIBUTES in self.keys else []
            if requests is None:
                continue
            values: list[tuple[int, str, Any]] = []
            for tag, keyword in keys:
                if keyword == REQUEST_ATTRIBUTES:
                    items = [[(t, k, item[REQUEST_KEYS.index(k)]) for t, k in request_tags] for item in requests]
                    values.append((tag, keyword, items))
                else:
                    values.append((tag, keyword, fixed.get(keyword, row.get(keyword))))
            yield writer.identifier(values)


class IdentifierWriter:
    """Encodes response identifiers (PS3.5 7.1) in a native transfer syntax, element by element:
    answering thousands of matches through pydicom's writer would cost more than the query.
    Text goes out as ASCII when it is, else in UTF-8 under Specific Character Set ISO_IR 192."""

    def __init__(self, transfer_syntax: str) -> None:
        self.explicit = transfer_syntax != ImplicitVRLittleEndian
        self.order = ">" if transfer_syntax == ExplicitVRBigEndian else "<"

    def identifier(self, values: Sequence[tuple[int, str, Any]]) -> bytes:
        """`values` (tag, keyword, value) in ascending tag order; None or "" is a zero-length
        value, a list of items (each such a list) a sequence."""
        ascii_only = all(_is_ascii(v) for _, _, v in values)
        body = b"".join(self._element(tag, keyword, value) for tag, keyword, value in values)
        if ascii_only:
            return body
        return self._element(0x00080005, "SpecificCharacterSet", "ISO_IR 192") + body

    def _element(self, tag: int, keyword: str, value: Any) -> bytes:
        vr = vr_of(tag)
        if vr == "SQ":
            items = b"".join(self._header(0xFFFEE000, "", len(item)) + item for item in
                             (b"".join(self._element(t, k, v) for t, k, v in elements) for elements in value or []))
            return self._header(tag, vr, len(items)) + items
        if value is None or value == "":
            raw = b""
        elif vr in _BINARY_VRS:
            raw = b"".join(struct.pack(self.order + _BINARY_VRS[vr], int(v)) for v in str(value).split("\\"))
        else:
            raw = str(value).encode("utf-8")
            if len(raw) % 2:
                raw += b"\x00" if vr == "UI" else b" "
        return self._header(tag, vr, len(raw)) + raw

    def _header(self, tag: int, vr: str, length: int) -> bytes:
        group, element = tag >> 16, tag & 0xFFFF
        o = self.order
        if not self.explicit or group == 0xFFFE:
            return struct.pack(o + "HHL", group, element, length)
        if vr in _LONG_VRS:
            return struct.pack(o + "HH2sHL", group, element, vr.encode(), 0, length)
        return struct.pack(o + "HH2sH", group, element, vr.encode(), length)


_BINARY_VRS = {"US": "H", "UL": "L", "SS": "h", "SL": "l"}
_LONG_VRS = frozenset({"OB", "OD", "OF", "OL", "OV", "OW", "SQ", "SV", "UC", "UN", "UR", "UT", "UV"})


def _is_ascii(value: Any) -> bool:
    if isinstance(value, str):
        return value.isascii()
    if isinstance(value, list):
        return all(_is_ascii(v) for item in value for _, _, v in item)
    return True


def retrieve_scope(sop_class: str, ds: Dataset) -> dict[str, list[str]]:
    """The unique keys of a C-MOVE or C-GET identifier (PS3.4 C.4.2.2.1, C.4.3.2.1): one value
    for each level above the Query/Retrieve Level, one or a list at it. Refused with 0xC001
    when one is missing, 0xA900 when the level is not of the model."""
    model = model_of(sop_class)
    level = _level(ds, model)
    levels = LEVELS[model]
    scope: dict[str, list[str]] = {}
    for upper in levels[:levels.index(level) + 1]:
        key = UNIQUE[upper]
        if upper == level:
            values = [v.strip() for v in text_of(ds.get(key)).split("\\") if v.strip()]
            if any(c in v for v in values for c in "*?"):
                values = []
        else:
            single = _single(ds, key)
            values = [single] if single else []
        if not values:
            raise QueryError(MISSING_UNIQUE_KEYS, f"missing unique key {key} (PS3.4 C.4.2.2.1)")
        scope[key] = values
    return scope


# -- the handlers ------------------------------------------------------------------------------------


@dataclass
class QrContext:
    """What the Q/R SCP answers from: the archive and its index, the AE title it answers as,
    the timeouts, and the configured nodes (the only C-MOVE destinations)."""

    archive: Archive
    listener: Listener
    timeouts: Timeouts
    nodes: Callable[[], dict[str, Node]]


def _failure(what: str, request: Request, exc: Exception) -> QueryError:
    """A fault while answering: 0xA700 when resources ran out, else 0xC000 (logged)."""
    if isinstance(exc, QueryError):
        return exc
    if isinstance(exc, (MemoryError, OSError)):
        LOG.error("%s from %s: out of resources: %s", what, request.peer, exc)
        return QueryError(OUT_OF_RESOURCES, f"out of resources: {exc}")
    LOG.exception("%s from %s failed", what, request.peer)
    return QueryError(UNABLE_TO_PROCESS, f"unable to process: {exc}")


class FindHandler:
    """C-FIND SCP (PS3.4 C.4.1.3): one pending response per match, between which a C-CANCEL-RQ
    is honoured; then success."""

    def __init__(self, qr: QrContext) -> None:
        self.qr = qr

    def sink(self, request: Request) -> DataSetSink:
        return InMemory()

    def handle(self, request: Request, data: DataSetSink | None, reply: Reply) -> None:
        if not isinstance(data, InMemory):
            reply(IDENTIFIER_MISMATCH, "C-FIND-RQ without an identifier")
            return
        audit.query_received(request.peer, request.abstract_syntax, request.transfer_syntax, bytes(data.data))
        try:
            ds = decode_identifier(bytes(data.data), request.transfer_syntax)
            combined = reply.extended_negotiation()[1:2] == b"\x01"  # PS3.4 C.5.1.1, byte 2
            query = Query.parse(request.abstract_syntax, ds, combined)
            rows = self.qr.archive.db.index.qr_entities(query.level, query.scope, query.counts, query.contains)
            answers = query.answers(rows, self.qr.listener.ae_title, request.transfer_syntax)
        except Exception as exc:
            self._refuse(request, reply, exc)
            return
        pending = PENDING_WARNING if query.unsupported else PENDING
        count = 0
        while True:
            try:  # only the next answer: a requestor gone while we reply ends the association
                identifier = next(answers, None)
            except Exception as exc:
                self._refuse(request, reply, exc)
                return
            if identifier is None:
                break
            if reply.cancelled():
                LOG.info("C-FIND from %s cancelled after %d match(es)", request.peer, count)
                reply(CANCEL)
                return
            reply(pending, "", None, identifier)
            count += 1
        LOG.info("C-FIND %s level from %s: %d match(es)", query.level, request.peer, count)
        reply(SUCCESS)

    @staticmethod
    def _refuse(request: Request, reply: Reply, exc: Exception) -> None:
        failure = _failure("C-FIND", request, exc)
        LOG.warning("C-FIND from %s refused (0x%04X): %s", request.peer, failure.status, failure)
        reply(failure.status, str(failure))


@dataclass
class SubOperations:
    """The counts of a C-MOVE's or C-GET's C-STORE sub-operations (PS3.7 9.3.3.2, 9.3.4.2) and
    the responses that report them."""

    reply: Reply
    transfer_syntax: str
    remaining: int
    completed: int = 0
    failed: int = 0
    warning: int = 0
    failed_uids: list[str] = field(default_factory=list)

    def done(self, uid: str, outcome: Outcome) -> bool:
        """Count one sub-operation and send a pending response with the counts."""
        self.remaining -= 1
        if outcome.state == "done":
            self.completed += 1
        elif outcome.state == "warning":
            self.warning += 1
        else:
            self.failed += 1
            self.failed_uids.append(uid)
            LOG.warning("sub-operation for %s failed: %s", uid, outcome.detail)
        if self.remaining:
            self.reply(PENDING, "", self._counts(True), None)
        return True

    def fail_rest(self, uids: Sequence[str]) -> None:
        self.failed += len(uids)
        self.failed_uids += uids
        self.remaining = 0

    def _counts(self, with_remaining: bool) -> dict[int, bytes]:
        counts = {0x1021: self.completed, 0x1022: self.failed, 0x1023: self.warning}
        if with_remaining:
            counts[0x1020] = self.remaining
        return {element: value.to_bytes(2, "little") for element, value in counts.items()}

    def final(self, cancelled: bool, comment: str = "") -> None:
        """The final response: 0xFE00 when cancelled, 0x0000 when every sub-operation succeeded,
        0xA702 when none did, else 0xB000; the failed UIDs in the identifier (PS3.4 C.4.2.1.5)."""
        if cancelled:
            status = CANCEL
        elif not self.failed and not self.warning:
            status = SUCCESS
        elif not self.completed and not self.warning:
            status = SUB_OPERATIONS_IMPOSSIBLE
        else:
            status = SOME_SUB_OPERATIONS_FAILED
        identifier = None
        if self.failed_uids:
            identifier = IdentifierWriter(self.transfer_syntax).identifier(
                [(tag_of("FailedSOPInstanceUIDList"), "FailedSOPInstanceUIDList", "\\".join(self.failed_uids))])
        self.reply(status, comment, self._counts(cancelled), identifier)


def _instances(qr: QrContext, rows: list[InstanceRow]) -> list[Instance]:
    root = qr.archive.root
    return [Instance(r.sop_instance_uid, r.sop_class_uid, r.transfer_syntax, Path(root) / r.path) for r in rows]


class _Retrieve:
    """What C-MOVE and C-GET share: the identifier's unique keys and the instances below them."""

    def __init__(self, qr: QrContext) -> None:
        self.qr = qr

    def sink(self, request: Request) -> DataSetSink:
        return InMemory()

    def instances(self, request: Request, data: DataSetSink | None) -> list[Instance]:
        if not isinstance(data, InMemory):
            raise QueryError(IDENTIFIER_MISMATCH, "request without an identifier")
        ds = decode_identifier(bytes(data.data), request.transfer_syntax)
        scope = retrieve_scope(request.abstract_syntax, ds)
        return _instances(self.qr, self.qr.archive.db.index.qr_instances(scope))

    def touch(self, uids: Sequence[str]) -> None:
        """A retrieve is a use of the studies (docs/design.md "Disk clean-up": least recently
        used go first)."""
        if uids:
            self.qr.archive.db.index.touch_instances(list(uids))

    def report(self, request: Request, destination: audit.Participant, uids: Iterable[str],
               failed: Sequence[str]) -> None:
        """What this request sent (`uids`, those in `failed` not transferred) to the audit trail."""
        studies = self.qr.archive.db.index.instance_studies(sorted(set(uids) | set(failed)))
        audit.sent(audit.Participant(request.peer.called_ae), destination, studies, set(failed),
                   audit.remote(request.peer))


class MoveHandler(_Retrieve):
    """C-MOVE SCP (PS3.4 C.4.2.3): the instances go to a configured node as C-STORE
    sub-operations over one association, with a pending response after each."""

    def handle(self, request: Request, data: DataSetSink | None, reply: Reply) -> None:
        destination = request.command.get(0x0600, b"").rstrip(b" \x00").decode("ascii", "replace").strip()
        try:
            instances = self.instances(request, data)
            node = next((n for n in self.qr.nodes().values() if n.ae_title.strip() == destination), None)
            if node is None:
                raise QueryError(MOVE_DESTINATION_UNKNOWN, f"move destination {destination!r} is not a "
                                                           "configured node")
        except Exception as exc:
            failure = _failure("C-MOVE", request, exc)
            LOG.warning("C-MOVE from %s to %r refused (0x%04X): %s", request.peer, destination, failure.status,
                        failure)
            reply(failure.status, str(failure))
            return
        counts = SubOperations(reply, request.transfer_syntax, len(instances))
        if not instances:
            counts.final(False)
            return
        LOG.info("C-MOVE from %s: %d instance(s) to %s", request.peer, len(instances), destination)
        try:
            assoc = Requestor(node.host, node.port, self.qr.listener.ae_title, node.ae_title,
                              build_move_contexts(instances, node), self.qr.timeouts, node.max_pdu,
                              tls=node.tls()).open()
        except AssociationFailed as exc:
            counts.fail_rest([i.sop_instance_uid for i in instances])
            LOG.warning("C-MOVE from %s: cannot open an association to %s: %s", request.peer, destination, exc)
            counts.final(False, f"cannot open an association to {destination}: {exc}")
            return
        sent: set[str] = set()

        def on_result(inst: Instance, outcome: Outcome) -> bool:
            sent.add(inst.sop_instance_uid)
            return counts.done(inst.sop_instance_uid, outcome)

        comment = ""
        try:
            store_instances(assoc, instances, on_result, reply.cancelled,
                            move_originator=(request.peer.calling_ae, request.message_id))
        except AssociationLost as exc:  # what was not acknowledged failed
            comment = f"the association to {destination} was lost: {exc}"
            LOG.warning("C-MOVE from %s: %s", request.peer, comment)
            counts.fail_rest([i.sop_instance_uid for i in instances if i.sop_instance_uid not in sent])
        finally:
            if assoc.is_open:
                assoc.release()
            else:
                assoc.close()
        self.touch(sorted(sent))
        self.report(request, audit.Participant(node.ae_title, node.host), sent, counts.failed_uids)
        counts.final(reply.cancelled() and counts.remaining > 0, comment)


def build_move_contexts(instances: Sequence[Instance], node: Node) -> list[tuple[str, list[str]]]:
    """The presentation contexts of a C-MOVE's association: the instances' SOP classes in the
    node's transfer syntaxes (as a send job proposes them)."""
    return build_contexts([i.sop_class_uid for i in instances], node.transfer_syntaxes)


class GetHandler(_Retrieve):
    """C-GET SCP (PS3.4 C.4.3.3): the instances go back over the requestor's association on the
    storage contexts where it took the SCP role, each converted to the context's transfer
    syntax when needed (or counted as failed when it cannot be)."""

    def handle(self, request: Request, data: DataSetSink | None, reply: Reply) -> None:
        try:
            instances = self.instances(request, data)
        except Exception as exc:
            failure = _failure("C-GET", request, exc)
            reply(failure.status, str(failure))
            return
        counts = SubOperations(reply, request.transfer_syntax, len(instances))
        sent: list[str] = []
        for inst in instances:
            if reply.cancelled():
                self.touch(sent)
                self.report(request, audit.remote(request.peer), sent, counts.failed_uids)
                counts.final(True)
                return
            ready = prepare(inst, reply.storage_contexts(inst.sop_class_uid),
                            lambda: "the requestor took no SCP role for it (PS3.7 D.3.3.4)")
            counts.done(inst.sop_instance_uid, self._store(reply, inst, ready))
            sent.append(inst.sop_instance_uid)
        self.touch(sent)
        self.report(request, audit.remote(request.peer), sent, counts.failed_uids)
        counts.final(False)

    @staticmethod
    def _store(reply: Reply, inst: Instance, ready: Ready | Outcome) -> Outcome:
        if isinstance(ready, Outcome):
            return ready
        try:
            data = bytes(ready.data) if isinstance(ready.data, memoryview) else ready.data.read(ready.size)
        finally:
            ready.close()
        status, comment = reply.store(ready.context_id, inst.sop_instance_uid, data)
        outcome = classify(status)
        if comment and outcome.state != "done":
            outcome.detail += f" ({comment})"
        return outcome


def qr_services(qr: QrContext) -> list[Service]:
    """The Q/R services of the disk server's acceptor."""
    find, move, get = FindHandler(qr), MoveHandler(qr), GetHandler(qr)
    return [
        Service([PATIENT_ROOT_FIND, STUDY_ROOT_FIND], QR_TRANSFER_SYNTAXES, {C_FIND_RQ: find},
                extended_negotiation=find_extended_negotiation),
        Service([PATIENT_ROOT_MOVE, STUDY_ROOT_MOVE], QR_TRANSFER_SYNTAXES, {C_MOVE_RQ: move}),
        Service([PATIENT_ROOT_GET, STUDY_ROOT_GET], QR_TRANSFER_SYNTAXES, {C_GET_RQ: get}),
    ]


def find_extended_negotiation(requested: bytes) -> bytes:
    """Our answer to a C-FIND SOP Class Extended Negotiation (PS3.4 C.5.1.1): relational
    queries not supported, combined date and time matching as requested, no fuzzy semantic
    matching of person names, no timezone adjustment."""
    combined = requested[1:2] == b"\x01"
    return bytes([0, 1 if combined else 0, 0, 0])[:max(len(requested), 1)]


