"""Modality Performed Procedure Step SOP Class - SCU (PS3.4 Annex F; modules PS3.3 C.4.13, C.4.14).

- N-CREATE at exam start, PPS Status "IN PROGRESS", with every attribute that a CT console sends
  or that a PACS's MPPS server requires (it refuses with 0x0121 when one is missing; PS3.4
  F.7.2.1 type table): PPS End Date/Time and the Performed Series Sequence are sent zero-length.
- N-SET at exam end: Performed Series Sequence referencing every object, PPS End Date/Time,
  final state COMPLETED or DISCONTINUED; DISCONTINUED carries a CID 9300 code in the PPS
  Discontinuation Reason Code Sequence (0040,0281). Nothing is sent after a final state.

Why these contents: docs/design.md "MPPS".
- When the N-CREATE names no Affected SOP Instance UID, the SCP assigns one in its response
  (PS3.7 10.1.5.1.2) and the caller uses it for the N-SET.

This module builds the datasets and sends one message; ordering, persistence and retries are
the outbox's (``modality_link.mpps_outbox``).
"""

from __future__ import annotations

import datetime
import logging
from dataclasses import dataclass, field
from typing import Any

from pydicom.dataset import Dataset
from pydicom.sequence import Sequence
from pynetdicom import evt
# pynetdicom makes its SOP class names when it is imported: mypy cannot see them
from pynetdicom.sop_class import ModalityPerformedProcedureStep  # type: ignore[attr-defined]

from modality_link.config import Node, Timeouts
from modality_link.net.association import PROPOSED_TRANSFER_SYNTAXES, AssociationFailed, associate, make_ae
from modality_link.net.charset import charset_for
from modality_link.net.status import MPPS, Category

LOG = logging.getLogger("modality_link.net.mpps")

MPPS_SOP_CLASS = "1.2.840.10008.3.1.2.3.3"
#: Retired SOP classes (PS3.3 C.4.14) that a CT console and a PACS's worklist server put in the
#: reference sequences (docs/design.md "MPPS").
DETACHED_PATIENT = "1.2.840.10008.3.1.2.1.1"
DETACHED_STUDY = "1.2.840.10008.3.1.2.3.1"

IN_PROGRESS, COMPLETED, DISCONTINUED = "IN PROGRESS", "COMPLETED", "DISCONTINUED"

#: CID 9300 "Procedure Discontinuation Reason" (PS3.16), scheme DCM.
DISCONTINUATION_REASONS: dict[str, str] = {
    "110500": "Doctor cancelled procedure",
    "110501": "Equipment failure",
    "110502": "Incorrect procedure ordered",
    "110503": "Patient allergic to media/contrast",
    "110504": "Patient died",
    "110505": "Patient refused to continue procedure",
    "110506": "Patient taken for treatment or surgery",
    "110507": "Patient did not arrive",
    "110508": "Patient pregnant",
    "110509": "Change of procedure for correct charging",
    "110510": "Duplicate order",
    "110511": "Nursing unit cancel",
    "110512": "Incorrect side ordered",
    "110513": "Discontinued for unspecified reason",
    "110514": "Incorrect worklist entry selected",
    "110515": "Patient condition prevented continuing",
    "110516": "Equipment change",
}

#: What an SCP answers when it did what was asked: success and the warnings of the MPPS status
#: table (0001, 0107, 0116; PS3.4 F.7.2.1.2, F.8.2.1.2). A code below 0x0100 counts as done too.
_DONE = MPPS.codes(Category.SUCCESS, Category.WARNING)


class MppsError(Exception):
    """Sending failed. `retryable` is True when the peer could not be reached or did not
    answer (the message must be sent again later); False when the peer answered a failure."""

    def __init__(self, message: str, retryable: bool, status: int | None = None) -> None:
        super().__init__(message)
        self.retryable = retryable
        self.status = status


@dataclass
class PerformedObject:
    """One object created during the exam, as the Performed Series Sequence lists it."""

    sop_class_uid: str
    sop_instance_uid: str
    series_uid: str
    series_description: str = ""
    protocol_name: str = ""
    operator: str = ""
    performing_physician: str = ""
    is_image: bool = True


@dataclass
class ProcedureStep:
    """What the N-CREATE says: patient, scheduled step(s) and the performed step."""

    pps_id: str
    station_aet: str
    station_name: str
    modality: str
    study_uid: str
    study_id: str
    start: datetime.datetime
    location: str = ""
    description: str = ""
    #: The worklist item (decoded) the exam was started from; None for an unscheduled exam.
    item: Dataset | None = None
    patient_name: str = ""
    patient_id: str = ""
    birth_date: str = ""
    sex: str = ""
    #: Retrieve AE Title for the Performed Series Sequence (our disk server).
    retrieve_aet: str = ""
    extra: dict[str, Any] = field(default_factory=dict)


def _code_item(value: str, scheme: str, meaning: str) -> Dataset:
    c = Dataset()
    c.CodeValue = value
    c.CodingSchemeDesignator = scheme
    c.CodeMeaning = meaning
    return c


def _copy_codes(src: Dataset | None, keyword: str) -> Sequence:
    out = Sequence()
    if src is not None:
        for item in src.get(keyword, None) or []:
            if item.get("CodeValue") or item.get("CodingSchemeDesignator"):
                out.append(_code_item(
                    str(item.get("CodeValue", "")), str(item.get("CodingSchemeDesignator", "")),
                    str(item.get("CodeMeaning", "")),
                ))
    return out


def _text(ds: Dataset | None, keyword: str) -> str:
    if ds is None:
        return ""
    v = ds.get(keyword, "")
    return "" if v is None else str(v)


def scheduled_step_attributes(step: ProcedureStep) -> Dataset:
    """One item of (0040,0270) (PS3.3 C.4.14 Table C.4-14); an unscheduled exam gets the IHE
    Scheduled Workflow unscheduled case: only the Study Instance UID, the others zero-length."""
    item = step.item
    sps = item.ScheduledProcedureStepSequence[0] if item is not None and item.get("ScheduledProcedureStepSequence") else None
    s = Dataset()
    s.StudyInstanceUID = step.study_uid
    s.AccessionNumber = _text(item, "AccessionNumber")
    ref = Sequence()
    if item is not None:
        for r in item.get("ReferencedStudySequence", None) or []:
            if r.get("ReferencedSOPInstanceUID"):
                rr = Dataset()
                rr.ReferencedSOPClassUID = str(r.get("ReferencedSOPClassUID") or DETACHED_STUDY)
                rr.ReferencedSOPInstanceUID = str(r.ReferencedSOPInstanceUID)
                ref.append(rr)
    s.ReferencedStudySequence = ref
    s.RequestedProcedureID = _text(item, "RequestedProcedureID")
    s.RequestedProcedureDescription = _text(item, "RequestedProcedureDescription")
    s.RequestedProcedureCodeSequence = _copy_codes(item, "RequestedProcedureCodeSequence")
    s.ScheduledProcedureStepID = _text(sps, "ScheduledProcedureStepID")
    s.ScheduledProcedureStepDescription = _text(sps, "ScheduledProcedureStepDescription")
    s.ScheduledProtocolCodeSequence = _copy_codes(sps, "ScheduledProtocolCodeSequence")
    return s


def build_n_create(step: ProcedureStep) -> Dataset:
    """The N-CREATE attribute list (PS3.4 F.7.2.1 Table F.7.2-1; docs/design.md "MPPS")."""
    item = step.item
    ds = Dataset()
    names = [step.patient_name, step.description, step.station_name, step.location]
    if item is not None:
        names += [_text(item, k) for k in ("PatientName", "RequestedProcedureDescription")]
    ds.SpecificCharacterSet = charset_for(names)
    # Performed Procedure Step Relationship (C.4.13)
    ds.ScheduledStepAttributesSequence = Sequence([scheduled_step_attributes(step)])
    ds.PatientName = step.patient_name
    ds.PatientID = step.patient_id
    ds.PatientBirthDate = step.birth_date
    ds.PatientSex = step.sex
    ds.IssuerOfPatientID = _text(item, "IssuerOfPatientID")
    refpat = Sequence()
    if item is not None:
        for r in item.get("ReferencedPatientSequence", None) or []:
            if r.get("ReferencedSOPInstanceUID"):
                rr = Dataset()
                rr.ReferencedSOPClassUID = str(r.get("ReferencedSOPClassUID") or DETACHED_PATIENT)
                rr.ReferencedSOPInstanceUID = str(r.ReferencedSOPInstanceUID)
                refpat.append(rr)
    ds.ReferencedPatientSequence = refpat
    ds.AdmissionID = _text(item, "AdmissionID")
    # Performed Procedure Step Information (C.4.14)
    ds.PerformedStationAETitle = step.station_aet
    ds.PerformedStationName = step.station_name
    ds.PerformedLocation = step.location
    ds.PerformedProcedureStepStartDate = step.start.strftime("%Y%m%d")
    ds.PerformedProcedureStepStartTime = step.start.strftime("%H%M%S")
    ds.PerformedProcedureStepEndDate = ""
    ds.PerformedProcedureStepEndTime = ""
    ds.PerformedProcedureStepStatus = IN_PROGRESS
    ds.PerformedProcedureStepID = step.pps_id
    ds.PerformedProcedureStepDescription = step.description
    ds.PerformedProcedureTypeDescription = _text(item, "RequestedProcedureDescription")
    ds.ProcedureCodeSequence = _copy_codes(item, "RequestedProcedureCodeSequence")
    ds.CommentsOnThePerformedProcedureStep = ""
    # Image Acquisition Results (C.4.15)
    ds.Modality = step.modality
    ds.StudyID = step.study_id
    sps = item.ScheduledProcedureStepSequence[0] if item is not None and item.get("ScheduledProcedureStepSequence") else None
    ds.PerformedProtocolCodeSequence = _copy_codes(sps, "ScheduledProtocolCodeSequence")
    ds.PerformedSeriesSequence = Sequence()
    return ds


def performed_series(objects: list[PerformedObject], retrieve_aet: str) -> Sequence:
    """(0040,0340): one item per series, images in (0008,1140), others in (0040,0220) (C.4.15)."""
    by_series: dict[str, list[PerformedObject]] = {}
    for o in objects:
        by_series.setdefault(o.series_uid, []).append(o)
    seq = Sequence()
    for series_uid, objs in by_series.items():
        first = objs[0]
        s = Dataset()
        s.PerformingPhysicianName = first.performing_physician
        s.OperatorsName = first.operator
        s.ProtocolName = first.protocol_name
        s.SeriesInstanceUID = series_uid
        s.SeriesDescription = first.series_description
        s.RetrieveAETitle = retrieve_aet
        images, others = Sequence(), Sequence()
        for o in objs:
            r = Dataset()
            r.ReferencedSOPClassUID = o.sop_class_uid
            r.ReferencedSOPInstanceUID = o.sop_instance_uid
            (images if o.is_image else others).append(r)
        s.ReferencedImageSequence = images
        s.ReferencedNonImageCompositeSOPInstanceSequence = others
        seq.append(s)
    return seq


def build_n_set(
    objects: list[PerformedObject],
    end: datetime.datetime,
    final_state: str,
    retrieve_aet: str,
    reason_code: str | None = None,
    charset: str = "ISO_IR 100",
) -> Dataset:
    """The final N-SET modification list (PS3.4 F.7.2.2 Table F.7.2-2)."""
    if final_state not in (COMPLETED, DISCONTINUED):
        raise ValueError(f"final state is COMPLETED or DISCONTINUED, not {final_state!r}")
    ds = Dataset()
    ds.SpecificCharacterSet = charset
    ds.PerformedSeriesSequence = performed_series(objects, retrieve_aet)
    ds.PerformedProcedureStepEndDate = end.strftime("%Y%m%d")
    ds.PerformedProcedureStepEndTime = end.strftime("%H%M%S")
    ds.PerformedProcedureStepStatus = final_state
    if final_state == DISCONTINUED:
        code = reason_code or "110513"
        if code not in DISCONTINUATION_REASONS:
            raise ValueError(
                f"discontinuation reason {code!r} is not in CID 9300 "
                f"(known: {', '.join(sorted(DISCONTINUATION_REASONS))})"
            )
        ds.PerformedProcedureStepDiscontinuationReasonCodeSequence = Sequence(
            [_code_item(code, "DCM", DISCONTINUATION_REASONS[code])]
        )
    return ds


def _refused(status: int) -> bool:
    """True if the SCP did not do what was asked (see :data:`_DONE`)."""
    return status not in _DONE and status >= 0x0100


def _status_error(what: str, target: str, status_ds: Dataset) -> MppsError:
    status = int(status_ds.Status)
    comment = status_ds.get("ErrorComment", "")
    return MppsError(
        f"MPPS {what} to {target} failed with status 0x{status:04X} ({MPPS.text(status)})"
        + (f": {comment}" if comment else ""),
        retryable=MPPS.is_retryable(status),
        status=status,
    )


def send_n_create(
    node: Node, calling_ae: str, timeouts: Timeouts, attrs: Dataset, sop_instance_uid: str | None
) -> str:
    """N-CREATE one MPPS instance; return its SOP Instance UID (ours, or the SCP's when
    `sop_instance_uid` is None). Raises :class:`MppsError`."""
    ae = make_ae(calling_ae, timeouts, node.max_pdu)
    ae.add_requested_context(ModalityPerformedProcedureStep, PROPOSED_TRANSFER_SYNTAXES)
    target = f"{node.ae_title}@{node.host}:{node.port}"
    seen: dict[str, str] = {}

    def on_recv(event: evt.Event) -> None:
        cs = getattr(event.message, "command_set", None)
        if cs is not None and "AffectedSOPInstanceUID" in cs:
            seen["uid"] = str(cs.AffectedSOPInstanceUID)

    try:
        with associate(ae, node, evt_handlers=[(evt.EVT_DIMSE_RECV, on_recv)]) as assoc:
            status_ds, _ = assoc.send_n_create(attrs, MPPS_SOP_CLASS, sop_instance_uid)
    except AssociationFailed as exc:
        raise MppsError(f"MPPS N-CREATE: {exc}", retryable=True) from None
    if "Status" not in status_ds:
        raise MppsError(f"MPPS N-CREATE to {target}: no response (timeout or abort)", retryable=True)
    if _refused(int(status_ds.Status)):
        raise _status_error("N-CREATE", target, status_ds)
    uid = sop_instance_uid or seen.get("uid")
    if not uid:
        raise MppsError(
            f"MPPS N-CREATE to {target}: the SCP assigned no SOP Instance UID", retryable=False,
            status=int(status_ds.Status),
        )
    LOG.info("MPPS N-CREATE %s to %s: 0x%04X", uid, target, int(status_ds.Status))
    return uid


def send_n_set(node: Node, calling_ae: str, timeouts: Timeouts, attrs: Dataset, sop_instance_uid: str) -> int:
    """N-SET the MPPS instance; return the (success or warning) status. Raises :class:`MppsError`."""
    ae = make_ae(calling_ae, timeouts, node.max_pdu)
    ae.add_requested_context(ModalityPerformedProcedureStep, PROPOSED_TRANSFER_SYNTAXES)
    target = f"{node.ae_title}@{node.host}:{node.port}"
    try:
        with associate(ae, node) as assoc:
            status_ds, _ = assoc.send_n_set(attrs, MPPS_SOP_CLASS, sop_instance_uid)
    except AssociationFailed as exc:
        raise MppsError(f"MPPS N-SET: {exc}", retryable=True) from None
    if "Status" not in status_ds:
        raise MppsError(f"MPPS N-SET to {target}: no response (timeout or abort)", retryable=True)
    status = int(status_ds.Status)
    if _refused(status):
        raise _status_error("N-SET", target, status_ds)
    LOG.info("MPPS N-SET %s to %s: 0x%04X", sop_instance_uid, target, status)
    return status
