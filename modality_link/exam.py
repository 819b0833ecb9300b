"""The exam lifecycle: worklist item → exam start (MPPS N-CREATE) → images → exam end (N-SET).

- :meth:`ExamManager.query_worklist` runs the Modality Worklist query (PS3.4 Annex K) with the
  node's defaults and keeps the items by SPS ID in the database, so an exam can be started from
  them later.
- :meth:`ExamManager.start` starts an exam from a kept item, or unscheduled from local patient
  data (IHE Scheduled Workflow, "unscheduled case": a new Study Instance UID, no accession).
- :meth:`ExamManager.add_image` completes each handed-over PS3.10 file with the worklist
  attributes (PS3.17 Annex, the IHE SWF mapping of worklist to image attributes) and writes it
  into the archive.
- :meth:`ExamManager.series_complete` is the acquisition software's word that a series has all
  its images: the auto-send rule "series" queues it at once.
- :meth:`ExamManager.end` closes the exam COMPLETED or DISCONTINUED (CID 9300 reason). Series not
  yet declared complete are completed then, and the auto-send rules apply: "series" to each of
  those series, "exam" to the exam's instances.

The auto-send rules are applied by :mod:`modality_link.autosend`, the MPPS messages leave
through :mod:`modality_link.mpps_outbox`, never from the caller's thread. Why a discontinued
exam is still sent, and how the rules and the messages survive a stop: docs/design.md "Exams,
MPPS and auto-send".
"""

from __future__ import annotations

import base64
import binascii
import datetime
import json
import logging
import threading
import time
import uuid
from pathlib import Path
from typing import Any, Callable

from pydicom.dataelem import DataElement, RawDataElement
from pydicom.dataset import Dataset
from pydicom.multival import MultiValue
from pydicom.sequence import Sequence
from pydicom.uid import generate_uid

from modality_link import config
from modality_link.archive import Archive, ArchiveError, check_file_meta, read_header, record_from_dataset
from modality_link.autosend import AutoSend
from modality_link.coercion import PIXEL_DATA, Coerced, coerce_file
from modality_link.db import Database, Exam, ExamObject, InstanceRecord
from modality_link.errors import Conflict, DicomFailure, Invalid, NotFound, UnknownNode
from modality_link.mpps_outbox import CREATE, SET, MppsOutbox
from modality_link.net import mpps
from modality_link.net.charset import charset_for
from modality_link.net.worklist import WorklistQuery, find_worklist, item_summary, resolve_date

LOG = logging.getLogger("modality_link.exam")

#: Top-level attributes copied from the worklist item into every image (the Patient modules,
#: PS3.3 C.2.2-C.2.4, docs/design.md "Exams, MPPS and auto-send").
PATIENT_KEYS = (
    "PatientName", "PatientID", "IssuerOfPatientID", "PatientBirthDate", "PatientSex",
    "OtherPatientIDsSequence", "PatientBirthName", "PatientAge", "PatientWeight", "PatientSize",
    "EthnicGroup", "PatientComments", "ReferencedPatientSequence",
    # Patient Medical module (PS3.3 C.2.4)
    "MedicalAlerts", "Allergies", "AdditionalPatientHistory", "PregnancyStatus", "SpecialNeeds",
    "PatientState",
)
STUDY_KEYS = ("AccessionNumber", "ReferringPhysicianName", "ReferencedStudySequence")
NON_IMAGE_CLASSES = {
    "1.2.840.10008.5.1.4.1.1.88.59",  # KOS
    "1.2.840.10008.5.1.4.1.1.88.67",  # X-Ray Radiation Dose SR
    "1.2.840.10008.5.1.4.1.1.11.1",   # GSPS
    "1.2.840.10008.5.1.4.1.1.104.1",  # Encapsulated PDF
    "1.2.840.10008.5.1.4.1.1.66",     # Raw Data
}


def _json(ds: Dataset) -> str:
    return json.dumps(ds.to_json_dict(), ensure_ascii=False)


def _from_json(text: str) -> Dataset:
    return Dataset.from_json(text)


def _sps(item: Dataset) -> Dataset:
    seq = item.get("ScheduledProcedureStepSequence")
    return seq[0] if seq else Dataset()


def _texts(elem: DataElement) -> list[str]:
    """The text values of a decoded element, its items' included."""
    if elem.VR == "SQ":
        return [v for item in elem.value for e in item.elements() if not isinstance(e, RawDataElement)
                for v in _texts(e)]
    if elem.VR in ("PN", "LO", "SH", "LT", "ST", "UT", "UC") and elem.value is not None:
        return [str(v) for v in (elem.value if elem.VM > 1 else [elem.value])]
    return []


def _all_text(ds: Dataset) -> list[str]:
    return [v for elem in ds.iterall() if elem.VR != "SQ" for v in _texts(elem)]


def apply_worklist(ds: Dataset, exam: Exam, item: Dataset, scheduled: bool) -> Dataset:
    """Complete an acquired image with the exam's worklist data in place (the IHE SWF mapping of
    worklist to image attributes, PS3.17; docs/design.md "Exams, MPPS and auto-send")."""
    charset = ds.get("SpecificCharacterSet")
    declared = "\\".join(charset) if isinstance(charset, MultiValue) else str(charset or "")
    for key in PATIENT_KEYS:
        if key in item and item[key].value not in (None, ""):
            ds[key] = item[key]
        elif key in ("PatientName", "PatientID", "PatientBirthDate", "PatientSex"):
            setattr(ds, key, item.get(key, "") or "")
    ds.StudyInstanceUID = exam.study_uid
    ds.StudyID = exam.study_id
    if scheduled:
        for key in STUDY_KEYS:
            if key in item and item[key].value not in (None, ""):
                ds[key] = item[key]
        if item.get("RequestedProcedureCodeSequence"):
            ds.ProcedureCodeSequence = item.RequestedProcedureCodeSequence
        if item.get("RequestedProcedureDescription"):
            ds.StudyDescription = item.RequestedProcedureDescription
        sps = _sps(item)
        req = Dataset()
        req.RequestedProcedureID = item.get("RequestedProcedureID", "") or ""
        req.AccessionNumber = item.get("AccessionNumber", "") or ""
        req.StudyInstanceUID = exam.study_uid
        req.RequestedProcedureDescription = item.get("RequestedProcedureDescription", "") or ""
        if item.get("RequestedProcedureCodeSequence"):
            req.RequestedProcedureCodeSequence = item.RequestedProcedureCodeSequence
        req.ScheduledProcedureStepID = sps.get("ScheduledProcedureStepID", "") or ""
        req.ScheduledProcedureStepDescription = sps.get("ScheduledProcedureStepDescription", "") or ""
        if sps.get("ScheduledProtocolCodeSequence"):
            req.ScheduledProtocolCodeSequence = sps.ScheduledProtocolCodeSequence
        ds.RequestAttributesSequence = Sequence([req])
        if not ds.get("SeriesDescription") and sps.get("ScheduledProcedureStepDescription"):
            ds.SeriesDescription = sps.ScheduledProcedureStepDescription
    else:
        ds.AccessionNumber = ""
        for key in ("RequestAttributesSequence", "ReferencedStudySequence", "ProcedureCodeSequence"):
            if key in ds:
                del ds[key]
    # Performed Procedure Step summary (PS3.3 C.4.14 as used in General Series, C.7.3.1)
    started = datetime.datetime.fromtimestamp(exam.started_at)
    ds.PerformedProcedureStepID = exam.pps_id
    ds.PerformedProcedureStepStartDate = started.strftime("%Y%m%d")
    ds.PerformedProcedureStepStartTime = started.strftime("%H%M%S")
    if exam.mpps_uid:
        ref = Dataset()
        ref.ReferencedSOPClassUID = mpps.MPPS_SOP_CLASS
        ref.ReferencedSOPInstanceUID = exam.mpps_uid
        ds.ReferencedPerformedProcedureStepSequence = Sequence([ref])
    ds.SpecificCharacterSet = _coerced_charset(ds, declared)
    return ds


def _coerced_charset(ds: Dataset, declared: str) -> str:
    """The Specific Character Set of an image the worklist data were written into (ISO_IR 100
    when every value fits it, else ISO_IR 192: docs/design.md "Character sets").

    Elements not written here may still be undecoded bytes in the `declared` set; they stay
    bytes when they mean the same under the new declaration (the old one, or ASCII under a set
    that contains it), which spares decoding and encoding every element. Otherwise every element
    is decoded now, under the old declaration, and all text decides."""
    written = [v for e in ds.elements() if not isinstance(e, RawDataElement) for v in _texts(e)]
    new = charset_for(written)
    if declared == "ISO_IR 192":  # Unicode holds whatever was written
        return declared
    if declared in ("", "ISO_IR 6") or declared == new:  # ASCII bytes mean the same in both sets
        return new
    for _ in ds.iterall():  # decode under the old declaration before it changes
        pass
    return charset_for(_all_text(ds))


def _exam_object(rec: InstanceRecord, ds: Dataset, is_image: bool) -> ExamObject:
    """An archived image as its exam keeps it: what MPPS N-SET lists of it (PS3.3 C.4.14)."""
    return ExamObject(
        sop_instance_uid=rec.sop_instance_uid, sop_class_uid=rec.sop_class_uid, series_uid=rec.series_uid,
        series_description=str(ds.get("SeriesDescription", "") or ""),
        protocol_name=str(ds.get("ProtocolName", "") or ""),
        operator=str(ds.get("OperatorsName", "") or ""),
        performing_physician=str(ds.get("PerformingPhysicianName", "") or ""),
        is_image=is_image,
    )


class ExamManager:
    """The exams and the kept worklist of one service."""

    def __init__(
        self,
        db: Database,
        archive: Archive,
        get_config: Callable[[], config.Config],
        tmp_dir: Path,
        publish: Callable[..., None],
        outbox: MppsOutbox,
        auto_send: AutoSend,
    ) -> None:
        self.db = db
        self.archive = archive
        self.get_config = get_config
        self.tmp_dir = tmp_dir
        self.publish = publish
        self.outbox = outbox
        self.auto_send = auto_send
        #: Serialises state changes of exams and series (add_image, series_complete, end).
        self._lock = threading.RLock()

    # -- worklist -------------------------------------------------------------------------------

    def _node(self, name: str | None, role: str) -> tuple[str, config.Node] | None:
        cfg = self.get_config()
        if name:
            try:
                node = cfg.node(name)
            except config.ConfigError as exc:
                raise UnknownNode(str(exc), name) from None
            return name, node
        for n, node in cfg.nodes.items():
            if role in node.roles:
                return n, node
        return None

    def query_worklist(
        self,
        node: str | None = None,
        date: str | None = None,
        patient_name: str = "",
        patient_id: str = "",
        accession: str = "",
        modality: str | None = None,
        requested_procedure_id: str = "",
        station_aet: str | None = None,
    ) -> dict[str, Any]:
        found = self._node(node, "worklist")
        if found is None:
            raise NotFound("no worklist node is configured (a node with role 'worklist')")
        name, n = found
        cfg = self.get_config()

        def pick(value: str | None, default: str, ours: str) -> str:
            v = default if value is None else value
            if v == "":
                v = ours
            return "" if v == "*" else v

        try:
            q = WorklistQuery(
                station_aet=pick(station_aet, n.worklist_station_aet, cfg.station.ae_title),
                date=resolve_date(n.worklist_date if date is None else date),
                modality=pick(modality, n.worklist_modality, cfg.station.modality),
                patient_name=patient_name or "",
                patient_id=patient_id or "",
                accession=accession or "",
                requested_procedure_id=requested_procedure_id or "",
                limit=n.response_limit,
            )
        except ValueError as exc:
            raise Invalid(str(exc)) from None
        from modality_link.net.worklist import WorklistError

        try:
            res = find_worklist(n, cfg.station.ae_title, cfg.timeouts, q)
        except WorklistError as exc:
            raise DicomFailure(str(exc)) from None
        keep = []
        out = []
        for item in res.items:
            summary = item_summary(item)
            js = item.to_json_dict()
            if summary["sps_id"]:
                keep.append((summary["sps_id"], json.dumps(js, ensure_ascii=False)))
            out.append({**summary, "dataset": js})
        self.db.exams.save_worklist_items(name, keep)
        if res.partial:
            LOG.warning("worklist: %s", res.message)
        return {"node": name, "items": out, "partial": res.partial, "message": res.message,
                "status": res.status}

    # -- exams ----------------------------------------------------------------------------------

    def start(
        self,
        item: str | None = None,
        patient_id: str | None = None,
        patient_name: str | None = None,
        birth_date: str = "",
        sex: str = "",
    ) -> dict[str, Any]:
        cfg = self.get_config()
        if item:
            row = self.db.exams.worklist_item(item)
            if row is None:
                raise NotFound(f"no worklist item with SPS ID {item!r} (query the worklist first)")
            ds = _from_json(row.item_json)
            study_uid = str(ds.get("StudyInstanceUID", "") or "") or generate_uid()
            scheduled = True
        elif patient_id or patient_name:
            ds = Dataset()
            ds.PatientName = patient_name or ""
            ds.PatientID = patient_id or ""
            ds.PatientBirthDate = birth_date or ""
            ds.PatientSex = sex or ""
            study_uid = generate_uid()
            scheduled = False
        else:
            raise Invalid("exam.start: give a worklist item (SPS ID) or patient_id and patient_name")
        now = time.time()
        pps_id = f"PPS{int(now * 1000) % 10**13}"
        found = self._node(None, "mpps")
        mpps_node, node = found if found else ("", None)
        mpps_uid = "" if node is None or node.mpps_scp_assigns_uid else generate_uid()
        study_id = pps_id[-16:]
        exam_id = self.db.exams.create(
            state=mpps.IN_PROGRESS, sps_id=item or "", item_json=_json(ds), study_uid=study_uid,
            study_id=study_id, pps_id=pps_id, mpps_node=mpps_node, mpps_uid=mpps_uid, started_at=now,
        )
        if node is not None:
            step = mpps.ProcedureStep(
                pps_id=pps_id, station_aet=cfg.station.ae_title, station_name=cfg.station.name,
                modality=cfg.station.modality, study_uid=study_uid, study_id=study_id,
                start=datetime.datetime.fromtimestamp(now), location=cfg.station.institution,
                description=str(_sps(ds).get("ScheduledProcedureStepDescription", "") or "") if scheduled else "",
                item=ds if scheduled else None,
                patient_name=str(ds.get("PatientName", "") or ""), patient_id=str(ds.get("PatientID", "") or ""),
                birth_date=str(ds.get("PatientBirthDate", "") or ""), sex=str(ds.get("PatientSex", "") or ""),
            )
            self.outbox.add(exam_id, mpps_node, CREATE, _json(mpps.build_n_create(step)))
        self.publish("exam.state", exam_id=exam_id, state=mpps.IN_PROGRESS)
        LOG.info("exam %d started (%s), study %s", exam_id, f"SPS {item}" if item else "unscheduled", study_uid)
        return self.exam_info(exam_id)

    def _exam(self, exam_id: Any) -> Exam:
        try:
            eid = int(exam_id)
        except (TypeError, ValueError):
            raise Invalid(f"an exam id is a whole number, not {exam_id!r}") from None
        exam = self.db.exams.get(eid)
        if exam is None:
            raise NotFound(f"no exam {eid}")
        return exam

    def exam_info(self, exam_id: Any) -> dict[str, Any]:
        exam = self._exam(exam_id)
        return {
            "exam_id": exam.id, "state": exam.state, "sps_id": exam.sps_id,
            "study_uid": exam.study_uid, "pps_id": exam.pps_id, "mpps_uid": exam.mpps_uid,
            "mpps_node": exam.mpps_node, "objects": len(self.db.exams.objects(exam.id)),
            "series": [
                {"series_uid": se.series_uid, "instances": se.instances, "complete": se.completed_at is not None}
                for se in self.db.exams.series(exam.id)
            ],
            "mpps": self.outbox.messages(exam),
        }

    def add_image(self, exam_id: Any, paths: list[str] | None = None, data: list[str] | None = None) -> dict[str, Any]:
        """Complete acquired images with the exam's data and archive them, as one group.

        `paths` are PS3.10 files the service can read; `data` are PS3.10 files as base64 text
        (for an acquisition that keeps its images in memory). Every image is checked before any
        is stored: one that is incomplete or whose File Meta does not describe it refuses the
        whole call. Only the attributes before Pixel Data are decoded and encoded again
        (:mod:`modality_link.coercion`); the group is flushed to disk before this returns.
        """
        exam = self._exam(exam_id)
        if exam.state != mpps.IN_PROGRESS:
            raise Conflict(f"exam {exam.id} is {exam.state}: no more images may be added")
        if (paths is None) == (data is None) or not isinstance(paths or data, list) or not (paths or data):
            raise Invalid("exam.add_image: give paths (a list of PS3.10 file paths) or data "
                                       "(a list of base64-encoded PS3.10 files)")
        item = _from_json(exam.item_json)
        station = self.get_config().station.ae_title
        spooled: list[Path] = []
        try:
            if data is not None:
                spooled = [self._spool(i, text) for i, text in enumerate(data)]
            files = [(str(p), Path(p)) for p in paths] if paths is not None else \
                [(f"data[{i}]", f) for i, f in enumerate(spooled)]
            group, staged = [], []
            try:  # each image written and its flush begun while the next one is prepared
                for name, path in files:
                    coerced, rec, is_image = self._coerce(name, path, exam, item, station)
                    self._check_not_elsewhere(name, rec, exam)
                    staged.append(self.archive.stage_coerced(coerced, path, rec))
                    group.append((name, rec, _exam_object(rec, coerced.dataset, is_image)))
                with self._lock:  # not between the checks of series_complete or end and their effect
                    for name, rec, _ in group:
                        self._check_open(exam.id, rec.series_uid, name)
                    recs = self.archive.install_staged(staged)
                    self.db.exams.add_objects(exam.id, [row for _, _, row in group])
            except BaseException:
                self.archive.discard_staged(staged)
                raise
        finally:
            for f in spooled:
                f.unlink(missing_ok=True)
        return {"exam_id": exam.id, "added": [rec.sop_instance_uid for rec in recs]}

    def _spool(self, index: int, text: Any) -> Path:
        """Write one base64-encoded file of exam.add_image's `data` to the tmp folder."""
        try:
            raw = base64.b64decode(text, validate=True) if isinstance(text, str) else None
        except binascii.Error:
            raw = None
        if not raw:
            raise Invalid(f"exam.add_image: data[{index}] is not a base64-encoded file")
        path = self.tmp_dir / f"exam-{uuid.uuid4().hex}.dcm"
        path.write_bytes(raw)
        return path

    def _coerce(
        self, name: str, path: Path, exam: Exam, item: Dataset, station: str
    ) -> tuple[Coerced, InstanceRecord, bool]:
        """Check one image and complete it with the exam's data; (coerced, its index row, has
        pixels)."""
        if not path.is_file():
            raise NotFound(f"no such file: {name}")
        try:  # complete, and described by its own File Meta (PS3.10 7.1), before it is decoded
            header = read_header(path)
            check_file_meta(header)
            is_image = PIXEL_DATA in header and header.get("SOPClassUID") not in NON_IMAGE_CLASSES
            coerced = coerce_file(path, lambda ds: apply_worklist(ds, exam, item, scheduled=bool(exam.sps_id)),
                                  header)
            rec = record_from_dataset(coerced.dataset, "", 0, station)  # its UIDs valid, as the archive requires
        except ArchiveError as exc:
            raise Invalid(f"{name} refused: {exc}", exc.status) from None
        except Exception as exc:
            raise Invalid(f"{name}: not a DICOM file ({exc})") from None
        return coerced, rec, is_image

    def _check_not_elsewhere(self, name: str, rec: InstanceRecord, exam: Exam) -> None:
        """A SOP Instance UID identifies one instance (PS3.3 C.12.1.1.1): one already held by
        another exam, or archived in another study, is refused rather than moved out of it."""
        uid = rec.sop_instance_uid
        holder = self.db.exams.exam_of(uid)
        archived = self.db.index.instance(uid)
        if holder is not None and holder != exam.id:
            other = self.db.exams.get(holder)
            study = other.study_uid if other is not None else ""
            raise Conflict(f"{name}: SOP Instance UID {uid} is already archived in exam {holder} (study {study}); "
                           f"an image added again needs a new SOP Instance UID", param="paths",
                           details={"sop_instance_uid": uid, "exam_id": holder, "study_uid": study})
        if holder is None and archived is not None and archived.study_uid != exam.study_uid:
            raise Conflict(f"{name}: SOP Instance UID {uid} is already archived in study {archived.study_uid}; "
                           f"an image added again needs a new SOP Instance UID", param="paths",
                           details={"sop_instance_uid": uid, "exam_id": None, "study_uid": archived.study_uid})

    def _check_open(self, exam_id: int, series_uid: str, path: str) -> None:
        """Images may be added while the exam is in progress and their series not complete."""
        state = self._exam(exam_id).state
        if state != mpps.IN_PROGRESS:
            raise Conflict(f"exam {exam_id} is {state}: no more images may be added")
        done = {se.series_uid for se in self.db.exams.series(exam_id) if se.completed_at is not None}
        if series_uid in done:
            raise Conflict(f"{path}: series {series_uid} of exam {exam_id} was declared complete; "
                           "no more images may be added to it (use a new series)")

    def series_complete(self, exam_id: Any, series_uid: str) -> dict[str, Any]:
        """The acquisition software says series `series_uid` of the exam has all its images.

        The auto-send rule "series" queues the series to every node whose ``auto_send`` is
        "series". Declaring a series complete again changes nothing (the
        result says ``already_complete``); later images of that series are refused.
        """
        if not isinstance(series_uid, str) or not series_uid:
            raise Invalid("exam.series_complete: give series_uid (a Series Instance UID)")
        with self._lock:
            exam = self._exam(exam_id)
            if exam.state != mpps.IN_PROGRESS:
                raise Conflict(f"exam {exam.id} is {exam.state}: its series were completed at its end")
            series = {se.series_uid: se for se in self.db.exams.series(exam.id)}
            if series_uid not in series:
                raise NotFound(f"exam {exam.id} has no image of series {series_uid}")
            newly = self.db.exams.complete_series(exam.id, series_uid)
            jobs = self.auto_send.apply(exam.id)
        LOG.info("exam %d: series %s complete%s", exam.id, series_uid, "" if newly else " (again)")
        return {"exam_id": exam.id, "series_uid": series_uid, "instances": series[series_uid].instances,
                "already_complete": not newly, "jobs": jobs}

    def end(self, exam_id: Any, discontinue: str | None = None) -> dict[str, Any]:
        """Close the exam: queue the final MPPS N-SET, complete its open series and apply the
        auto-send rules, for COMPLETED and DISCONTINUED alike (see the module docstring).
        The result is the exam with ``jobs``, the ids of the send jobs queued."""
        with self._lock:
            return self._end(exam_id, discontinue)

    def _end(self, exam_id: Any, discontinue: str | None) -> dict[str, Any]:
        exam = self._exam(exam_id)
        if exam.state != mpps.IN_PROGRESS:
            raise Conflict(f"exam {exam.id} is already {exam.state}; a final state is sent once")
        final = mpps.DISCONTINUED if discontinue else mpps.COMPLETED
        if discontinue and discontinue not in mpps.DISCONTINUATION_REASONS:
            raise Invalid(f"discontinuation reason {discontinue!r} is not a CID 9300 code "
                f"(e.g. 110513 unspecified, 110501 equipment failure)",
            )
        now = time.time()
        if exam.mpps_node:
            cfg = self.get_config()
            objs = [
                mpps.PerformedObject(
                    o.sop_class_uid, o.sop_instance_uid, o.series_uid, o.series_description,
                    o.protocol_name, o.operator, o.performing_physician, o.is_image,
                )
                for o in self.db.exams.objects(exam.id)
            ]
            charset = charset_for([o.series_description + o.protocol_name + o.operator for o in objs])
            ds = mpps.build_n_set(
                objs, datetime.datetime.fromtimestamp(now), final,
                cfg.disk_server.ae_title, discontinue, charset,
            )
            self.outbox.add(exam.id, exam.mpps_node, SET, _json(ds))
        self.db.exams.end(exam.id, final, now, discontinue or "")
        for se in self.db.exams.series(exam.id):
            self.db.exams.complete_series(exam.id, se.series_uid)
        self.publish("exam.state", exam_id=exam.id, state=final)
        LOG.info("exam %d ended %s", exam.id, final)
        jobs = self.auto_send.apply(exam.id)
        return {**self.exam_info(exam.id), "jobs": jobs}
