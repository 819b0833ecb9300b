"""Modality Worklist Information Model - FIND SCU (PS3.4 Annex K; module PS3.3 C.4.10).

The query identifier (PS3.4 K.6.1.2) asks for every return key below, each zero-length
(universal matching), because some worklist servers return only the keys requested
(docs/design.md "Worklist").
Matching keys (PS3.4 C.2.2.2): single value, wildcard (``*``, ``?``), range (``A-B`` on dates and
times) and universal (zero-length). The Scheduled Procedure Step Sequence (0040,0100) carries the
station, date and modality keys as one item (sequence matching, PS3.4 C.2.2.2.6).

A response limit stops the query with C-CANCEL (PS3.7 §9.3.2.3) once that many matches arrived;
the result then says it is partial. Every status (PS3.4 K.4.1.1.4: 0000, FF00, FF01, FE00, A700,
A900, C000-CFFF) and the lost association or timeout become a sentence in
:class:`WorklistError` or the result's ``message``.
"""

from __future__ import annotations

import datetime
import logging
from dataclasses import dataclass, field
from typing import Any

from pydicom.dataset import Dataset
from pydicom.sequence import Sequence
# pynetdicom makes its SOP class names when it is imported: mypy cannot see them
from pynetdicom.sop_class import ModalityWorklistInformationFind  # type: ignore[attr-defined]

from modality_link.config import Node, Timeouts
from modality_link import audit
from modality_link.net.association import PROPOSED_TRANSFER_SYNTAXES, AssociationFailed, associate, make_ae
from modality_link.net.charset import repair_charset
from modality_link.net.status import CANCEL, PENDING, PENDING_WARNING, SUCCESS, WORKLIST

LOG = logging.getLogger("modality_link.net.worklist")

#: Return keys at the top level of the identifier: what a CT console asks for and what a PACS's
#: worklist server returns (docs/design.md "Worklist").
TOP_KEYS = [
    # Patient Identification / Demographic / Medical (C.2.2, C.2.3, C.2.4)
    ("PatientName", "PN"), ("PatientID", "LO"), ("IssuerOfPatientID", "LO"),
    ("OtherPatientIDsSequence", "SQ"), ("PatientBirthName", "PN"),
    ("PatientBirthDate", "DA"), ("PatientSex", "CS"), ("PatientAge", "AS"),
    ("PatientWeight", "DS"), ("PatientSize", "DS"), ("EthnicGroup", "SH"),
    ("PatientComments", "LT"), ("ConfidentialityConstraintOnPatientDataDescription", "LO"),
    ("MedicalAlerts", "LO"), ("Allergies", "LO"), ("AdditionalPatientHistory", "LT"),
    ("PregnancyStatus", "US"), ("SpecialNeeds", "LO"), ("PatientState", "LO"),
    # Visit (C.3)
    ("ReferencedPatientSequence", "SQ"), ("AdmissionID", "LO"), ("CurrentPatientLocation", "LO"),
    # Requested Procedure (C.4.11)
    ("StudyInstanceUID", "UI"), ("ReferencedStudySequence", "SQ"),
    ("RequestedProcedureDescription", "LO"), ("RequestedProcedureCodeSequence", "SQ"),
    ("RequestedProcedureID", "SH"), ("ReasonForTheRequestedProcedure", "LO"),
    ("RequestedProcedurePriority", "SH"), ("PatientTransportArrangements", "LO"),
    ("NamesOfIntendedRecipientsOfResults", "PN"), ("RequestedProcedureComments", "LT"),
    # Imaging Service Request (C.4.12)
    ("AccessionNumber", "SH"), ("ReferringPhysicianName", "PN"), ("RequestingPhysician", "PN"),
    ("RequestingService", "LO"), ("ReasonForTheImagingServiceRequest", "LO"),
    ("FillerOrderNumberImagingServiceRequest", "LO"), ("ImagingServiceRequestComments", "LT"),
]
#: Return keys inside the Scheduled Procedure Step Sequence (C.4.10).
SPS_KEYS = [
    ("Modality", "CS"), ("RequestedContrastAgent", "LO"), ("ScheduledStationAETitle", "AE"),
    ("ScheduledProcedureStepStartDate", "DA"), ("ScheduledProcedureStepStartTime", "TM"),
    ("ScheduledPerformingPhysicianName", "PN"), ("ScheduledProcedureStepDescription", "LO"),
    ("ScheduledProtocolCodeSequence", "SQ"), ("ScheduledProcedureStepID", "SH"),
    ("ScheduledStationName", "SH"), ("ScheduledProcedureStepLocation", "SH"),
    ("PreMedication", "LO"), ("ScheduledProcedureStepStatus", "CS"),
]
#: Code Sequence items are asked for with their triplet (PS3.3 8.8).
CODE_KEYS = ("CodeValue", "CodingSchemeDesignator", "CodeMeaning")
_CODE_SEQUENCES = {
    "RequestedProcedureCodeSequence", "ScheduledProtocolCodeSequence",
}
_REF_SEQUENCES = {"ReferencedStudySequence", "ReferencedPatientSequence"}


class WorklistError(Exception):
    """The worklist query failed; the message says why, for the operator."""


@dataclass
class WorklistQuery:
    """Matching keys of one query. Empty strings mean universal matching (PS3.4 C.2.2.2.3)."""

    station_aet: str = ""
    #: "", "YYYYMMDD" or a range "YYYYMMDD-YYYYMMDD" / "-YYYYMMDD" / "YYYYMMDD-".
    date: str = ""
    time: str = ""
    modality: str = ""
    patient_name: str = ""
    patient_id: str = ""
    accession: str = ""
    requested_procedure_id: str = ""
    #: Stop with C-CANCEL after this many matches; 0 is no limit.
    limit: int = 0
    #: Specific Character Set of the request; "" sends none (default repertoire).
    charset: str = "ISO_IR 192"
    #: (0008,0201) Timezone Offset From UTC, e.g. "+0100"; "" sends none (PS3.3 C.12.1).
    timezone_offset: str = ""


@dataclass
class WorklistResult:
    items: list[Dataset] = field(default_factory=list)
    #: Final status of the C-FIND (0x0000, 0xFE00 after our C-CANCEL, ...).
    status: int = 0
    #: True when the limit stopped the query with C-CANCEL: the list is partial.
    partial: bool = False
    message: str = "success"


def resolve_date(text: str, today: datetime.date | None = None) -> str:
    """'today' → YYYYMMDD; YYYYMMDD and ranges are checked and returned; '' is universal."""
    text = (text or "").strip()
    if text.lower() == "today":
        return (today or datetime.date.today()).strftime("%Y%m%d")
    if text in ("", "*"):
        return ""
    parts = text.split("-")
    if len(parts) > 2 or not any(parts):
        raise ValueError(f"date: YYYYMMDD or YYYYMMDD-YYYYMMDD or 'today', not {text!r}")
    for p in parts:
        if p:
            try:
                datetime.datetime.strptime(p, "%Y%m%d")
            except ValueError:
                raise ValueError(f"date: {p!r} is not a date YYYYMMDD") from None
    return text


def _empty(ds: Dataset, keyword: str, vr: str) -> None:
    if vr == "SQ":
        item = Dataset()
        if keyword in _CODE_SEQUENCES:
            for k in CODE_KEYS:
                setattr(item, k, "")
        elif keyword in _REF_SEQUENCES:
            item.ReferencedSOPClassUID = ""
            item.ReferencedSOPInstanceUID = ""
        elif keyword == "OtherPatientIDsSequence":
            item.PatientID = ""
            item.IssuerOfPatientID = ""
        setattr(ds, keyword, Sequence([item]))
    elif vr == "US":
        ds.add_new(keyword, vr, None)
    else:
        setattr(ds, keyword, "")


def build_identifier(q: WorklistQuery) -> Dataset:
    """The C-FIND identifier for `q` with every return key of :data:`TOP_KEYS` and
    :data:`SPS_KEYS` (PS3.4 K.6.1.2)."""
    ds = Dataset()
    if q.charset:
        ds.SpecificCharacterSet = q.charset
    if q.timezone_offset:
        ds.TimezoneOffsetFromUTC = q.timezone_offset
    for keyword, vr in TOP_KEYS:
        _empty(ds, keyword, vr)
    ds.PatientName = q.patient_name
    ds.PatientID = q.patient_id
    ds.AccessionNumber = q.accession
    ds.RequestedProcedureID = q.requested_procedure_id
    sps = Dataset()
    for keyword, vr in SPS_KEYS:
        _empty(sps, keyword, vr)
    sps.ScheduledStationAETitle = q.station_aet
    sps.ScheduledProcedureStepStartDate = q.date
    sps.ScheduledProcedureStepStartTime = q.time
    sps.Modality = q.modality
    ds.ScheduledProcedureStepSequence = Sequence([sps])
    return ds


def find_worklist(
    node: Node,
    calling_ae: str,
    timeouts: Timeouts,
    query: WorklistQuery,
    default_charset: str = "ISO_IR 100",
) -> WorklistResult:
    """Query `node` and return the matching items, decoded to Unicode.

    Raises :class:`WorklistError` when the association fails, the peer answers a failure
    status, or no response arrives within the DIMSE timeout.
    """
    ae = make_ae(calling_ae, timeouts, node.max_pdu)
    ae.add_requested_context(ModalityWorklistInformationFind, PROPOSED_TRANSFER_SYNTAXES)
    identifier = build_identifier(query)
    result = WorklistResult()
    target = f"{node.ae_title}@{node.host}:{node.port}"
    try:
        with associate(ae, node) as assoc:
            if not any(cx.abstract_syntax == ModalityWorklistInformationFind for cx in assoc.accepted_contexts):
                raise WorklistError(f"worklist query to {target}: the peer does not accept the MWL FIND SOP class")
            msg_id = 1
            audit.query_sent(calling_ae, audit.Participant(node.ae_title, node.host), ModalityWorklistInformationFind,
                             identifier)
            responses = assoc.send_c_find(identifier, ModalityWorklistInformationFind, msg_id=msg_id)
            cancelled = False
            status = None
            for status_ds, ident in responses:
                if "Status" not in status_ds:
                    why = "no response within the DIMSE timeout" if assoc.is_aborted or not assoc.is_established else "association lost"
                    raise WorklistError(
                        f"worklist query to {target} failed: {why} ({len(result.items)} item(s) received)"
                    )
                status = int(status_ds.Status)
                if status in (PENDING, PENDING_WARNING):
                    if ident is not None and not cancelled:
                        try:
                            result.items.append(repair_charset(ident, default_charset))
                        except Exception as exc:  # a broken item must not lose the others
                            LOG.warning("worklist: undecodable item from %s skipped: %s", target, exc)
                    if query.limit and len(result.items) >= query.limit and not cancelled:
                        assoc.send_c_cancel(msg_id, query_model=ModalityWorklistInformationFind)
                        cancelled = True
                    continue
                break
            if status is None:
                raise WorklistError(f"worklist query to {target} failed: no response")
            result.status = status
            if status == SUCCESS:
                result.message = f"{len(result.items)} item(s)"
                if cancelled:  # the SCP finished before it saw our C-CANCEL
                    result.partial = True
                    result.message += f" (limit {query.limit} reached)"
            elif status == CANCEL:
                result.partial = True
                result.message = (
                    f"{len(result.items)} item(s): the response limit of {query.limit} was reached "
                    f"and the query was cancelled; the list is partial"
                    if cancelled
                    else f"{len(result.items)} item(s): the query was cancelled by the peer"
                )
            else:
                comment = status_ds.get("ErrorComment", "")
                raise WorklistError(
                    f"worklist query to {target} failed with status 0x{status:04X} ({WORKLIST.text(status)})"
                    + (f": {comment}" if comment else "")
                )
    except AssociationFailed as exc:
        raise WorklistError(f"worklist query failed: {exc}") from None
    items = result.items[: query.limit] if query.limit else result.items
    result.items = items
    LOG.info("worklist query to %s: %s", target, result.message)
    return result


def item_summary(item: Dataset) -> dict[str, Any]:
    """The fields an operator picks an item by; ``sps_id`` is what a CT console's screen calls
    the Examination ID (docs/design.md "Worklist")."""
    sps = item.ScheduledProcedureStepSequence[0] if item.get("ScheduledProcedureStepSequence") else Dataset()
    return {
        "sps_id": str(sps.get("ScheduledProcedureStepID", "") or ""),
        "patient_name": str(item.get("PatientName", "") or ""),
        "patient_id": str(item.get("PatientID", "") or ""),
        "birth_date": str(item.get("PatientBirthDate", "") or ""),
        "sex": str(item.get("PatientSex", "") or ""),
        "accession": str(item.get("AccessionNumber", "") or ""),
        "requested_procedure_id": str(item.get("RequestedProcedureID", "") or ""),
        "description": str(sps.get("ScheduledProcedureStepDescription", "") or "")
        or str(item.get("RequestedProcedureDescription", "") or ""),
        "modality": str(sps.get("Modality", "") or ""),
        "station_aet": str(sps.get("ScheduledStationAETitle", "") or ""),
        "start_date": str(sps.get("ScheduledProcedureStepStartDate", "") or ""),
        "start_time": str(sps.get("ScheduledProcedureStepStartTime", "") or ""),
        "status": str(sps.get("ScheduledProcedureStepStatus", "") or ""),
        "study_uid": str(item.get("StudyInstanceUID", "") or ""),
    }
