"""The disk server's Query/Retrieve SCP (net/qr.py, PS3.4 Annex C) against DCMTK findscu,
movescu and getscu, and pynetdicom where DCMTK cannot ask (Extended Negotiation): every answer
compared with what the index holds."""

from __future__ import annotations

import re
import subprocess
import sys
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import pydicom
import pytest
from pydicom import dcmread
from pydicom.dataset import Dataset
from pydicom.uid import ExplicitVRBigEndian, ExplicitVRLittleEndian, ImplicitVRLittleEndian
from pynetdicom import AE, build_role, evt
from pynetdicom.pdu_primitives import SOPClassExtendedNegotiation
from pynetdicom.sop_class import (
    CTImageStorage,
    StudyRootQueryRetrieveInformationModelFind,
    StudyRootQueryRetrieveInformationModelGet,
    StudyRootQueryRetrieveInformationModelMove,
)

from modality_link import config
from modality_link.archive import Archive
from modality_link.db import Database
from modality_link.home import free_port
from modality_link.net.charset import text_of
from modality_link.net.servers import StorageServer
from sim import images
from sim.ris import RIS
from tests.support.instances import dataset_bytes, spool_images
from tests.support.peers import start_storescp
from tests.support.service import InProcessService, ServiceProcess, cleanup, exam_home
from tests.support.tools import dcmtk_env, require_tool
from tests.support.waiting import wait_port

TIMEOUTS = config.Timeouts(connect=5, acse=5, dimse=30, network=30, artim=5)
CHARSETS = Path(pydicom.__file__).parent / "data" / "charset_files"
STUDY_A, STUDY_B, STUDY_C = (f"1.2.826.0.1.3680043.10.543.{n}" for n in (1, 2, 3))


@dataclass
class Archived:
    """The disk server on an archive of a few studies; `files` by SOP Instance UID."""

    archive: Archive
    server: StorageServer
    nodes: dict[str, config.Node]
    files: dict[str, Path]

    @property
    def port(self) -> int:
        return self.server.port


def _study(out: Path, study_uid: str, patient: tuple[str, str], date: str, time: str, modality: str,
           series: list[int], seed: int, requests: Sequence[tuple[str, str]] = ()) -> list[Path]:
    paths = []
    for n, count in enumerate(series):
        for path in images.write_study(out / f"{seed}-{n}", modality=modality, images=count, rows=16, columns=16,
                                       seed=seed * 10 + n):
            ds = dcmread(path)
            ds.PatientName, ds.PatientID = patient
            ds.StudyInstanceUID, ds.StudyDate, ds.StudyTime = study_uid, date, time
            ds.SeriesInstanceUID = f"{study_uid}.{n + 1}"
            ds.SeriesNumber = n + 1
            ds.AccessionNumber = f"ACC{seed}"
            ds.StudyID = f"S{seed}"
            ds.SeriesDate, ds.SeriesTime = date, time
            ds.PerformedProcedureStepStartDate, ds.PerformedProcedureStepStartTime = date, time
            items = []
            for rp, sps in requests:
                item = Dataset()
                item.RequestedProcedureID, item.ScheduledProcedureStepID = rp, sps
                items.append(item)
            if items:
                ds.RequestAttributesSequence = items
            ds.save_as(path, enforce_file_format=True)
            paths.append(path)
    return paths


@pytest.fixture(scope="module")
def archived(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Archived]:
    tmp = tmp_path_factory.mktemp("qr")
    files = [
        *_study(tmp / "a", STUDY_A, ("Doe^John", "P1"), "20240110", "083000", "CT", [3, 2], 1,
                [("RP1", "SPS1"), ("RP1", "SPS2")]),
        *_study(tmp / "b", STUDY_B, ("Smith^Anna", "P2"), "20240215", "143000", "MR", [2], 2, [("RP2", "SPS3")]),
        *_study(tmp / "c", STUDY_C, ("Many^Images", "P3"), "20230101", "120000", "CT", [300], 3),
        CHARSETS / "chrH31.dcm", CHARSETS / "chrGreek.dcm", CHARSETS / "chrX1.dcm",
    ]
    root = tmp / "archive"
    (root / ".tmp").mkdir(parents=True)
    archive = Archive(root, Database(tmp / "db.sqlite"), min_free_mb=0)
    stored = {}
    for path, rec in archive.import_paths(files):
        assert not isinstance(rec, Exception), f"{path}: {rec}"
        stored[rec.sop_instance_uid] = root / rec.path
    nodes: dict[str, config.Node] = {}
    listener = config.Listener(ae_title="MODLINK", port=free_port(), bind_address="127.0.0.1")
    server = StorageServer(listener, TIMEOUTS, archive, nodes=lambda: nodes)
    server.start()
    yield Archived(archive, server, nodes, stored)
    server.stop()
    assert server.acceptor.faults == 0


def findscu(port: int, model: str, *keys: str, out: Path, files: tuple[str, ...] = (),
            extra: tuple[str, ...] = ()) -> tuple[list[Dataset], str]:
    """findscu -P/-S with `keys` (and query `files`); the responses it extracted, and its log."""
    out.mkdir(parents=True, exist_ok=True)
    for old in out.glob("rsp*.dcm"):
        old.unlink()
    args = [require_tool("findscu"), "-v", model, "-aec", "MODLINK", "-X", "-od", str(out), *extra]
    for key in keys:
        args += ["-k", key]
    proc = subprocess.run([*args, "127.0.0.1", str(port), *files], env=dcmtk_env(), capture_output=True,
                          text=True, errors="replace", timeout=60)
    return [dcmread(p) for p in sorted(out.glob("rsp*.dcm"))], proc.stdout + proc.stderr


def index_rows(a: Archived, level: str, **scope: list[str]) -> list[dict]:
    return list(a.archive.db.index.qr_entities(level, dict(scope)))


def uids(responses: list[Dataset], keyword: str) -> list[str]:
    return [str(r.get(keyword, "")) for r in responses]


# -- C-FIND ------------------------------------------------------------------------------------------


def test_study_root_study_level_single_wildcard_range_universal(archived: Archived, tmp_path: Path) -> None:
    keys = ("QueryRetrieveLevel=STUDY", "StudyInstanceUID", "PatientName", "PatientID", "StudyDate", "StudyTime",
            "AccessionNumber", "StudyID", "ModalitiesInStudy", "NumberOfStudyRelatedSeries",
            "NumberOfStudyRelatedInstances", "InstanceAvailability")
    # universal: every study, each as the index holds it
    found, log = findscu(archived.port, "-S", *keys, out=tmp_path)
    rows = {r["StudyInstanceUID"]: r for r in index_rows(archived, "STUDY")}
    assert sorted(uids(found, "StudyInstanceUID")) == sorted(rows), log
    for ds in found:
        row = rows[ds.StudyInstanceUID]
        for keyword in ("PatientID", "StudyDate", "StudyTime", "AccessionNumber", "StudyID"):
            assert str(ds.get(keyword, "")) == row[keyword], keyword
        assert str(ds.PatientName) == row["PatientName"]
        assert int(ds.NumberOfStudyRelatedSeries) == row["NumberOfStudyRelatedSeries"]
        assert int(ds.NumberOfStudyRelatedInstances) == row["NumberOfStudyRelatedInstances"]
        assert text_of(ds.ModalitiesInStudy) == row["ModalitiesInStudy"]
    a = next(ds for ds in found if ds.StudyInstanceUID == STUDY_A)
    assert (a.NumberOfStudyRelatedSeries, a.NumberOfStudyRelatedInstances, a.ModalitiesInStudy) == (2, 5, "CT")
    assert a.QueryRetrieveLevel == "STUDY" and a.RetrieveAETitle == "MODLINK" and a.InstanceAvailability == "ONLINE"
    assert "SpecificCharacterSet" not in a  # all ASCII
    # single value, case-insensitive wildcard on the name, date range, time range
    for key, expected in [("PatientID=P2", [STUDY_B]), ("PatientName=doe*", [STUDY_A]),
                          ("PatientName=?MITH^ANNA", [STUDY_B]), ("StudyDate=20240101-20240131", [STUDY_A]),
                          ("StudyDate=20240201-", [STUDY_B]), ("StudyDate=-20240110", [STUDY_A, STUDY_C]),
                          ("StudyTime=1400-1500", [STUDY_B]), ("AccessionNumber=ACC?", [STUDY_A, STUDY_B, STUDY_C]),
                          ("ModalitiesInStudy=MR", [STUDY_B]), ("StudyID=S1", [STUDY_A])]:
        found, log = findscu(archived.port, "-S", *keys, key, out=tmp_path)
        assert sorted(uids(found, "StudyInstanceUID")) == sorted(expected), (key, log)
    # list of UIDs (C.2.2.2.2)
    found, _ = findscu(archived.port, "-S", "QueryRetrieveLevel=STUDY", f"StudyInstanceUID={STUDY_A}\\{STUDY_B}\\1.2.3",
                       out=tmp_path)
    assert sorted(uids(found, "StudyInstanceUID")) == [STUDY_A, STUDY_B]


def test_patient_root_at_each_level(archived: Archived, tmp_path: Path) -> None:
    found, log = findscu(archived.port, "-P", "QueryRetrieveLevel=PATIENT", "PatientID", "PatientName",
                         "NumberOfPatientRelatedStudies", "NumberOfPatientRelatedInstances", out=tmp_path)
    rows = {r["PatientID"]: r for r in index_rows(archived, "PATIENT")}
    assert sorted(uids(found, "PatientID")) == sorted(rows), log
    p1 = next(ds for ds in found if ds.PatientID == "P1")
    assert (str(p1.PatientName), p1.NumberOfPatientRelatedStudies, p1.NumberOfPatientRelatedInstances) == \
        ("Doe^John", 1, 5)
    found, log = findscu(archived.port, "-P", "QueryRetrieveLevel=STUDY", "PatientID=P1", "StudyInstanceUID",
                         "StudyDate", out=tmp_path)
    assert uids(found, "StudyInstanceUID") == [STUDY_A], log
    found, log = findscu(archived.port, "-P", "QueryRetrieveLevel=SERIES", "PatientID=P1",
                         f"StudyInstanceUID={STUDY_A}", "SeriesInstanceUID", "Modality", "SeriesNumber",
                         "NumberOfSeriesRelatedInstances", out=tmp_path)
    assert uids(found, "SeriesInstanceUID") == [f"{STUDY_A}.1", f"{STUDY_A}.2"], log
    assert [ds.NumberOfSeriesRelatedInstances for ds in found] == [3, 2]
    found, log = findscu(archived.port, "-P", "QueryRetrieveLevel=IMAGE", "PatientID=P1",
                         f"StudyInstanceUID={STUDY_A}", f"SeriesInstanceUID={STUDY_A}.1", "SOPInstanceUID",
                         "InstanceNumber", "Rows", "ImageType", "SOPClassUID", "PatientComments", out=tmp_path)
    images_ = index_rows(archived, "IMAGE", SeriesInstanceUID=[f"{STUDY_A}.1"])
    assert uids(found, "SOPInstanceUID") == [r["SOPInstanceUID"] for r in images_], log
    for ds, row in zip(found, images_):
        assert (str(ds.InstanceNumber), str(ds.Rows), "\\".join(ds.ImageType), ds.SOPClassUID) == \
            (row["InstanceNumber"], row["Rows"], row["ImageType"], row["SOPClassUID"])
        assert "PatientComments" not in ds  # an unsupported key is not returned
    assert "Pending: WarningUnsupportedOptionalKeys" in log, log  # 0xFF01


def test_series_level_keys_and_request_attributes(archived: Archived, tmp_path: Path) -> None:
    base = ("QueryRetrieveLevel=SERIES", f"StudyInstanceUID={STUDY_A}", "SeriesInstanceUID", "Modality",
            "SeriesDate", "PerformedProcedureStepStartDate", "PerformedProcedureStepStartTime")
    found, log = findscu(archived.port, "-S", *base, "RequestAttributesSequence[0].RequestedProcedureID",
                         "RequestAttributesSequence[0].ScheduledProcedureStepID", out=tmp_path)
    assert len(found) == 2, log
    assert [(i.RequestedProcedureID, i.ScheduledProcedureStepID) for i in found[0].RequestAttributesSequence] == \
        [("RP1", "SPS1"), ("RP1", "SPS2")]
    assert found[0].PerformedProcedureStepStartDate == "20240110"
    # matched one item level deep: the items that match are returned
    found, log = findscu(archived.port, "-S", *base, "RequestAttributesSequence[0].ScheduledProcedureStepID=SPS2",
                         out=tmp_path)
    assert len(found) == 2, log
    assert [i.ScheduledProcedureStepID for i in found[0].RequestAttributesSequence] == ["SPS2"]
    found, _ = findscu(archived.port, "-S", *base, "RequestAttributesSequence[0].RequestedProcedureID=RP9",
                       out=tmp_path)
    assert found == []
    found, _ = findscu(archived.port, "-S", *base, "PerformedProcedureStepStartTime=0800-0900", out=tmp_path)
    assert len(found) == 2
    found, _ = findscu(archived.port, "-S", *base, "PerformedProcedureStepStartTime=0900-", out=tmp_path)
    assert found == []


def test_relational_queries_are_refused(archived: Archived, tmp_path: Path) -> None:
    """PS3.4 C.4.1.3.1: hierarchical only; the Error Comment (0000,0902) says why (findscu -d)."""
    # a key below the level
    found, log = findscu(archived.port, "-S", "QueryRetrieveLevel=STUDY", "StudyInstanceUID", "Modality=CT",
                         out=tmp_path, extra=("-d",))
    assert found == [] and "0xa900: Error: Data Set does not match SOP Class" in log, log
    assert "[relational query: Modality is a SERIES key (PS3.4 C.4.1.3.1)]" in log, log
    # no unique key of the level above, or a wildcard in it
    for keys in (["SeriesInstanceUID"], ["StudyInstanceUID=1.2*", "SeriesInstanceUID"]):
        found, log = findscu(archived.port, "-S", "QueryRetrieveLevel=SERIES", *keys, out=tmp_path, extra=("-d",))
        assert found == [] and "DIMSE Status                  : 0xc000" in log, log
        assert "[relational query: no single StudyInstanceUID value" in log, log
    # the study root model has no PATIENT level
    found, log = findscu(archived.port, "-S", "QueryRetrieveLevel=PATIENT", "PatientID", out=tmp_path)
    assert found == [] and "DataSetDoesNotMatchSOPClass" in log, log


@pytest.mark.parametrize("file, charset, name", [
    ("chrH31.dcm", "ISO 2022 IR 87", "Yamada^Tarou=山田^太郎=やまだ^たろう"),
    ("chrGreek.dcm", "ISO_IR 126", "Διονυσιος"),
])
def test_a_name_query_in_its_own_character_set(archived: Archived, tmp_path: Path, file: str, charset: str,
                                               name: str) -> None:
    expected = dcmread(CHARSETS / file, stop_before_pixels=True)
    assert str(expected.PatientName) == name
    ideographic = name.split("=")[1] if "=" in name else name
    query = tmp_path / "query.dcm"
    ds = Dataset()
    ds.SpecificCharacterSet = ["", charset] if "2022" in charset else charset
    ds.QueryRetrieveLevel = "STUDY"
    ds.PatientName = ideographic[:2] + "*"
    ds.StudyInstanceUID = ""
    ds.save_as(query, implicit_vr=False, little_endian=True)
    found, log = findscu(archived.port, "-S", out=tmp_path / "out", files=(str(query),))
    assert uids(found, "StudyInstanceUID") == [expected.StudyInstanceUID], log
    assert found[0].SpecificCharacterSet == "ISO_IR 192"
    assert str(found[0].PatientName) == name
    # and the Latin name of the Japanese patient, case-insensitively
    if "=" in name:
        found, log = findscu(archived.port, "-S", "QueryRetrieveLevel=STUDY", "PatientName=YAMADA*",
                             "StudyInstanceUID", out=tmp_path / "out")
        assert uids(found, "StudyInstanceUID") == [expected.StudyInstanceUID], log


def test_combined_date_time_range_when_negotiated(archived: Archived) -> None:
    """PS3.4 C.2.2.2.5.1: with Extended Negotiation, 20240110-20240216 and 0800-1200 are one
    range from 2024-01-10 08:00 to 2024-02-16 12:00 (study B, 2024-02-15 14:30, is inside);
    without it, the date and the time match apart (14:30 is not within 08:00-12:00)."""
    query = Dataset()
    query.QueryRetrieveLevel = "STUDY"
    query.StudyInstanceUID = ""
    query.StudyDate = "20240110-20240216"
    query.StudyTime = "0800-1200"

    def ask(combined: bool | None) -> list[str]:
        ae = AE(ae_title="FINDSCU")
        ae.add_requested_context(StudyRootQueryRetrieveInformationModelFind)
        negotiation = []
        if combined is not None:
            item = SOPClassExtendedNegotiation()
            item.sop_class_uid = StudyRootQueryRetrieveInformationModelFind
            item.service_class_application_information = b"\x01\x01" if combined else b"\x00\x00"
            negotiation.append(item)
        assoc = ae.associate("127.0.0.1", archived.port, ae_title="MODLINK", ext_neg=negotiation)
        assert assoc.is_established
        try:
            return [str(ds.StudyInstanceUID) for _, ds in
                    assoc.send_c_find(query, StudyRootQueryRetrieveInformationModelFind) if ds is not None]
        finally:
            assoc.release()

    assert ask(None) == [STUDY_A]
    assert ask(False) == [STUDY_A]
    assert ask(True) == [STUDY_A, STUDY_B]


def test_cancel_after_the_first_responses(archived: Archived, tmp_path: Path) -> None:
    """findscu --cancel 3 on a 300-image series at IMAGE level: 0xFE00 long before the end
    (a few more pending responses may precede it, PS3.4 C.4.1.3.1)."""
    keys = ("QueryRetrieveLevel=IMAGE", f"StudyInstanceUID={STUDY_C}", f"SeriesInstanceUID={STUDY_C}.1",
            "SOPInstanceUID", "InstanceNumber")
    found, log = findscu(archived.port, "-S", *keys, out=tmp_path)
    assert len(found) == 300, log[-500:]
    found, log = findscu(archived.port, "-S", *keys, out=tmp_path, extra=("--cancel", "3"))
    assert "Received Final Find Response (Cancel: MatchingTerminatedDueToCancelRequest)" in log, log[-800:]
    assert 3 <= len(found) < 300


# -- C-MOVE and C-GET ----------------------------------------------------------------------------------


def movescu(port: int, destination: str, *keys: str, model: str = "-S") -> str:
    args = [require_tool("movescu"), "-d", model, "-aet", "MOVESCU", "-aec", "MODLINK", "-aem", destination]
    for key in keys:
        args += ["-k", key]
    proc = subprocess.run([*args, "127.0.0.1", str(port)], env=dcmtk_env(), capture_output=True, text=True,
                          errors="replace", timeout=120)
    return proc.stdout + proc.stderr


def c_get(port: int, query: Dataset, model: str, storage: str, syntax: str, on_store: Callable[[evt.Event], int],
          msg_id: int = 1) -> tuple[Dataset, Dataset | None]:
    """A C-GET by pynetdicom taking the SCP role for `storage` in `syntax`: its final response
    (status, identifier); `on_store` answers each C-STORE sub-operation."""
    ae = AE(ae_title="GETSCU")
    ae.add_requested_context(model)
    ae.add_requested_context(storage, syntax)
    assoc = ae.associate("127.0.0.1", port, ae_title="MODLINK", ext_neg=[build_role(storage, scp_role=True)],
                         evt_handlers=[(evt.EVT_C_STORE, on_store)])
    assert assoc.is_established
    try:
        return list(assoc.send_c_get(query, model, msg_id=msg_id))[-1]
    finally:
        assoc.release()


def test_movescu_to_a_configured_storescp(archived: Archived, tmp_path: Path) -> None:
    port = free_port()
    proc = start_storescp(tmp_path, port)
    archived.nodes["STORE"] = config.Node(ae_title="STORESCP", host="127.0.0.1", port=port, roles=["store"])
    try:
        log = movescu(archived.port, "STORESCP", "QueryRetrieveLevel=STUDY", f"StudyInstanceUID={STUDY_A}")
        assert "DIMSE Status                  : 0x0000: Success" in log, log[-1500:]
        assert re.search(r"Completed Suboperations +: 5", log), log[-1500:]
        expected = [r.sop_instance_uid for r in archived.archive.db.index.study_instances(STUDY_A)]
        received = {dcmread(p, stop_before_pixels=True).SOPInstanceUID: p for p in tmp_path.glob("*.*")
                    if p.is_file()}
        assert sorted(received) == sorted(expected)
        for uid, path in received.items():
            assert dataset_bytes(path) == dataset_bytes(archived.files[uid]), uid
        # the patient root model at SERIES level: one series
        for p in list(tmp_path.glob("*.*")):
            p.unlink()
        log = movescu(archived.port, "STORESCP", "QueryRetrieveLevel=SERIES", "PatientID=P1",
                      f"StudyInstanceUID={STUDY_A}", f"SeriesInstanceUID={STUDY_A}.2", model="-P")
        assert re.search(r"Completed Suboperations +: 2", log), log[-1500:]
        assert len([p for p in tmp_path.glob("*.*") if p.is_file()]) == 2
    finally:
        del archived.nodes["STORE"]
        proc.terminate()
        proc.wait(10)


def test_move_refusals(archived: Archived) -> None:
    log = movescu(archived.port, "NOBODY", "QueryRetrieveLevel=STUDY", f"StudyInstanceUID={STUDY_A}")
    assert "0xa801" in log and "[move destination 'NOBODY' is not a configured node]" in log, log[-1500:]
    log = movescu(archived.port, "NOBODY", "QueryRetrieveLevel=SERIES", f"SeriesInstanceUID={STUDY_A}.1")
    assert "0xc001" in log and "missing unique key StudyInstanceUID" in log, log[-1500:]


#: A Storage SCP that dies (os._exit, as a kill would) when the `n`-th C-STORE arrives, before answering it.
_DYING_SCP = """
import os, sys
from pynetdicom import AE, evt, AllStoragePresentationContexts
seen = []
def on_store(event):
    seen.append(1)
    if len(seen) == int(sys.argv[2]):
        os._exit(1)
    return 0x0000
ae = AE(ae_title="DYING")
ae.supported_contexts = AllStoragePresentationContexts
ae.start_server(("127.0.0.1", int(sys.argv[1])), evt_handlers=[(evt.EVT_C_STORE, on_store)])
"""


@pytest.mark.parametrize("dies_at, final, completed", [(3, 0xB000, 2), (1, 0xA702, 0)])
def test_a_destination_killed_mid_move(archived: Archived, dies_at: int, final: int, completed: int) -> None:
    port = free_port()
    proc = subprocess.Popen([sys.executable, "-c", _DYING_SCP, str(port), str(dies_at)])
    archived.nodes["DYING"] = config.Node(ae_title="DYING", host="127.0.0.1", port=port, roles=["store"])
    try:
        wait_port(port)
        ae = AE(ae_title="MOVESCU")
        ae.add_requested_context(StudyRootQueryRetrieveInformationModelMove)
        assoc = ae.associate("127.0.0.1", archived.port, ae_title="MODLINK")
        query = Dataset()
        query.QueryRetrieveLevel = "STUDY"
        query.StudyInstanceUID = STUDY_A
        try:
            responses = list(assoc.send_c_move(query, "DYING", StudyRootQueryRetrieveInformationModelMove))
        finally:
            assoc.release()
        status, identifier = responses[-1]
        pending = [s for s, _ in responses[:-1]]
        assert status.Status == final
        assert (status.NumberOfCompletedSuboperations, status.NumberOfFailedSuboperations,
                status.NumberOfWarningSuboperations) == (completed, 5 - completed, 0)
        assert [s.NumberOfCompletedSuboperations for s in pending] == list(range(1, completed + 1))
        expected = [r.sop_instance_uid for r in archived.archive.db.index.study_instances(STUDY_A)]
        assert list(identifier.FailedSOPInstanceUIDList) == expected[completed:]
    finally:
        del archived.nodes["DYING"]
        proc.kill()
        proc.wait(10)


def test_getscu_retrieves_a_study(archived: Archived, tmp_path: Path) -> None:
    proc = subprocess.run([require_tool("getscu"), "-v", "-S", "-aec", "MODLINK", "-od", str(tmp_path),
                           "-k", "QueryRetrieveLevel=STUDY", "-k", f"StudyInstanceUID={STUDY_B}",
                           "127.0.0.1", str(archived.port)], env=dcmtk_env(), capture_output=True, text=True,
                          errors="replace", timeout=120)
    log = proc.stdout + proc.stderr
    assert proc.returncode == 0 and "Received C-GET Response (Success)" in log, log[-1500:]
    assert "Number of Completed Suboperations : 2" in log, log[-1500:]
    received = {dcmread(p, stop_before_pixels=True).SOPInstanceUID: p for p in tmp_path.iterdir()}
    expected = [r.sop_instance_uid for r in archived.archive.db.index.study_instances(STUDY_B)]
    assert sorted(received) == sorted(expected)
    for uid, path in received.items():  # getscu writes what it received again (sequences of
        got, sent = dcmread(path), dcmread(archived.files[uid])  # undefined length): equal data sets
        assert got == sent and got.file_meta.TransferSyntaxUID == sent.file_meta.TransferSyntaxUID, uid


def test_c_get_converts_to_the_accepted_transfer_syntax(archived: Archived) -> None:
    """The requestor accepts CT only in Implicit VR Little Endian: each image is converted
    (PS3.4 C.4.3.3); MR it takes in no syntax, so those sub-operations fail."""
    received: list[Dataset] = []

    def on_store(event: evt.Event) -> int:
        ds = event.dataset
        ds.file_meta = event.file_meta
        received.append(ds)
        return 0x0000

    query = Dataset()
    query.QueryRetrieveLevel = "STUDY"
    query.StudyInstanceUID = STUDY_A
    status, _ = c_get(archived.port, query, StudyRootQueryRetrieveInformationModelGet, CTImageStorage,
                      ImplicitVRLittleEndian, on_store)
    assert status.Status == 0x0000 and status.NumberOfCompletedSuboperations == 5
    assert {ds.file_meta.TransferSyntaxUID for ds in received} == {ImplicitVRLittleEndian}
    for ds in received:
        original = dcmread(archived.files[ds.SOPInstanceUID])
        assert ds.PixelData == original.PixelData and ds.PatientName == original.PatientName


# -- the index behind it --------------------------------------------------------------------------------


def test_reconcile_reads_again_rows_indexed_before_the_query_keys(archive: Archive, tmp_path: Path) -> None:
    """Rows of an index from before schema version 7 have no optional keys: the start's
    reconcile() reads their files again, and then the keys are answered."""
    import sqlite3

    files = _study(tmp_path / "src", STUDY_A, ("Doe^John", "P1"), "20240110", "083000", "CT", [2], 1, [("RP1", "S1")])
    for path, rec in archive.import_paths(files):
        assert not isinstance(rec, Exception), rec
    db = sqlite3.connect(archive.db.path)
    with db:
        db.execute("UPDATE instances SET attributes=NULL")
        db.execute("UPDATE series SET attributes=NULL")
    db.close()
    assert len(archive.db.index.paths_without_keys()) == 2
    before = {r.sop_instance_uid: r for r in archive.db.index.study_instances(STUDY_A)}
    assert archive.reconcile() == 0  # nothing was unindexed
    assert {r.sop_instance_uid: r for r in archive.db.index.study_instances(STUDY_A)} == before
    assert archive.db.index.paths_without_keys() == []
    (series,) = archive.db.index.qr_entities("SERIES", {"StudyInstanceUID": [STUDY_A]})
    assert (series["SeriesDate"], series["RequestAttributesSequence"]) == ("20240110", [("RP1", "S1")])
    assert {row["Rows"] for row in archive.db.index.qr_entities("IMAGE", {})} == {"16"}


def test_the_service_answers_and_moves_to_its_nodes(short_tmp: Path) -> None:
    """`modality-link serve`: what storescu sent is found by findscu and moved by movescu to a
    node of the configuration."""
    files = _study(short_tmp / "src", STUDY_B, ("Smith^Anna", "P2"), "20240215", "143000", "MR", [3], 2)
    dest_port = free_port()
    out = short_tmp / "received"
    out.mkdir()
    storescp = start_storescp(out, dest_port)
    nodes = {"VIEWER": config.Node(ae_title="STORESCP", host="127.0.0.1", port=dest_port, roles=["store"])}
    svc = ServiceProcess.start(short_tmp / "home", nodes=nodes)
    try:
        sent = subprocess.run([require_tool("storescu"), "-aec", "MODLINK", "127.0.0.1", str(svc.port),
                               *map(str, files)], env=dcmtk_env(), capture_output=True, text=True, timeout=60)
        assert sent.returncode == 0, sent.stderr
        found, log = findscu(svc.port, "-S", "QueryRetrieveLevel=SERIES", f"StudyInstanceUID={STUDY_B}",
                             "SeriesInstanceUID", "NumberOfSeriesRelatedInstances", out=short_tmp / "find")
        assert [(ds.SeriesInstanceUID, ds.NumberOfSeriesRelatedInstances) for ds in found] == [(f"{STUDY_B}.1", 3)], log
        (before,) = svc.call("studies.list")
        log = movescu(svc.port, "STORESCP", "QueryRetrieveLevel=STUDY", f"StudyInstanceUID={STUDY_B}")
        assert re.search(r"Completed Suboperations +: 3", log), log[-1500:]
        assert sorted(dataset_bytes(p) for p in out.iterdir()) == sorted(dataset_bytes(p) for p in files)
        (after,) = svc.call("studies.list")  # a retrieve is a use (docs/design.md "Disk clean-up")
        assert after["last_used"] > before["last_used"]
    finally:
        svc.stop()
        storescp.terminate()
        storescp.wait(10)


@pytest.mark.parametrize("syntax", [ImplicitVRLittleEndian, ExplicitVRLittleEndian, ExplicitVRBigEndian])
def test_answers_in_each_transfer_syntax(archived: Archived, syntax: str) -> None:
    """The identifiers are written element by element (IdentifierWriter): pydicom reads them back
    as the index holds them in each native syntax, sequences and binary values included."""
    ae = AE(ae_title="FINDSCU")
    ae.add_requested_context(StudyRootQueryRetrieveInformationModelFind, syntax)
    assoc = ae.associate("127.0.0.1", archived.port, ae_title="MODLINK")
    assert assoc.is_established
    query = Dataset()
    query.QueryRetrieveLevel = "IMAGE"
    query.StudyInstanceUID = STUDY_A
    query.SeriesInstanceUID = f"{STUDY_A}.1"
    query.SOPInstanceUID = ""
    query.Rows = None
    query.ImageType = ""
    query.PatientName = ""
    query.InstanceNumber = ""
    series = Dataset()
    series.QueryRetrieveLevel = "SERIES"
    series.StudyInstanceUID = STUDY_A
    series.SeriesInstanceUID = ""
    series.RequestAttributesSequence = [Dataset()]
    series.RequestAttributesSequence[0].ScheduledProcedureStepID = ""
    series.RequestAttributesSequence[0].RequestedProcedureID = ""
    try:
        images_ = [ds for status, ds in assoc.send_c_find(query, StudyRootQueryRetrieveInformationModelFind)
                   if status.Status in (0xFF00, 0xFF01)]
        found = [ds for status, ds in assoc.send_c_find(series, StudyRootQueryRetrieveInformationModelFind)
                 if status.Status in (0xFF00, 0xFF01)]
    finally:
        assoc.release()
    rows = index_rows(archived, "IMAGE", SeriesInstanceUID=[f"{STUDY_A}.1"])
    assert [(ds.SOPInstanceUID, ds.Rows, list(ds.ImageType), str(ds.PatientName), str(ds.InstanceNumber))
            for ds in images_] == \
        [(r["SOPInstanceUID"], int(r["Rows"]), r["ImageType"].split("\\"), r["PatientName"], r["InstanceNumber"])
         for r in rows]
    assert [[(i.RequestedProcedureID, i.ScheduledProcedureStepID) for i in ds.RequestAttributesSequence]
            for ds in found] == [[("RP1", "SPS1"), ("RP1", "SPS2")]] * 2


def test_exam_add_indexes_the_request_attributes(tmp_path: Path) -> None:
    """An image completed with the worklist item by `exam add` is found by its Requested
    Procedure and Scheduled Procedure Step IDs (PS3.4 C.6.2.1.3: Request Attributes Sequence)."""
    with RIS() as ris:
        home = exam_home({"ris": config.Node(ae_title="RIS", host="127.0.0.1", port=ris.port,
                                             roles=["worklist", "mpps"], worklist_date="")})
        svc = InProcessService(home)
        try:
            (item, *_) = svc.call("worklist.query")["items"]
            ex = svc.call("exam.start", item=item["sps_id"])
            added = svc.call("exam.add_image", exam_id=ex["exam_id"], paths=spool_images(tmp_path / "s", 2))["added"]
            index = svc.service.db.index
            (series,) = index.qr_entities("SERIES", {"StudyInstanceUID": [item["study_uid"]]})
            assert series["RequestAttributesSequence"] == [("RP0001", "SPS0001")]
            assert sorted(r["SOPInstanceUID"] for r in index.qr_entities("IMAGE", {})) == sorted(added)
        finally:
            svc.stop()
            cleanup(home)


def test_c_move_and_c_get_cancelled(archived: Archived, tmp_path: Path) -> None:
    """A C-CANCEL-RQ stops the sub-operations of a 300-image C-MOVE and C-GET: 0xFE00 with the
    counts so far and the remaining count (PS3.4 C.4.2.3.1, C.4.3.3.1)."""
    port = free_port()
    proc = start_storescp(tmp_path, port)
    archived.nodes["STORE"] = config.Node(ae_title="STORESCP", host="127.0.0.1", port=port, roles=["store"])
    query = Dataset()
    query.QueryRetrieveLevel = "SERIES"
    query.StudyInstanceUID = STUDY_C
    query.SeriesInstanceUID = f"{STUDY_C}.1"
    try:
        ae = AE(ae_title="MOVESCU")
        ae.add_requested_context(StudyRootQueryRetrieveInformationModelMove)
        assoc = ae.associate("127.0.0.1", archived.port, ae_title="MODLINK")
        try:
            responses = []
            for status, _ in assoc.send_c_move(query, "STORESCP", StudyRootQueryRetrieveInformationModelMove,
                                               msg_id=9):
                responses.append(status)
                if len(responses) == 1:
                    assoc.send_c_cancel(9, query_model=StudyRootQueryRetrieveInformationModelMove)
        finally:
            assoc.release()
    finally:
        del archived.nodes["STORE"]
        proc.terminate()
        proc.wait(10)
    final = responses[-1]
    assert final.Status == 0xFE00
    done = final.NumberOfCompletedSuboperations
    assert 1 <= done < 300 and final.NumberOfRemainingSuboperations == 300 - done
    # C-GET: the requestor cancels from its C-STORE handler, after the second image
    stored: list[int] = []

    def on_store(event: evt.Event) -> int:
        stored.append(1)
        if len(stored) == 2:
            event.assoc.send_c_cancel(11, query_model=StudyRootQueryRetrieveInformationModelGet)
        return 0x0000

    final, _ = c_get(archived.port, query, StudyRootQueryRetrieveInformationModelGet, CTImageStorage,
                     ExplicitVRLittleEndian, on_store, msg_id=11)
    assert final.Status == 0xFE00
    assert 2 <= final.NumberOfCompletedSuboperations < 300
    assert final.NumberOfRemainingSuboperations == 300 - final.NumberOfCompletedSuboperations


def test_retrieve_levels_and_sub_operations_that_cannot_be_done(archived: Archived) -> None:
    """C-GET at PATIENT level (Patient Root) and at IMAGE level with a list of SOP Instance UIDs;
    instances of a SOP class the requestor took no SCP role for fail (0xA702 when none is left,
    with the Failed SOP Instance UID List)."""
    from pynetdicom.sop_class import MRImageStorage, PatientRootQueryRetrieveInformationModelGet

    def get(query: Dataset, model: str, storage: str) -> tuple[Dataset, Dataset | None, list[str]]:
        received: list[str] = []

        def on_store(event: evt.Event) -> int:
            received.append(event.request.AffectedSOPInstanceUID)
            return 0x0000

        status, identifier = c_get(archived.port, query, model, storage, ExplicitVRLittleEndian, on_store)
        return status, identifier, received

    mr = [r.sop_instance_uid for r in archived.archive.db.index.study_instances(STUDY_B)]
    patient = Dataset()
    patient.QueryRetrieveLevel = "PATIENT"
    patient.PatientID = "P2"
    status, _, received = get(patient, PatientRootQueryRetrieveInformationModelGet, MRImageStorage)
    assert status.Status == 0x0000 and sorted(received) == sorted(mr)
    ct = [r.sop_instance_uid for r in archived.archive.db.index.study_instances(STUDY_A)]
    image = Dataset()
    image.QueryRetrieveLevel = "IMAGE"
    image.StudyInstanceUID = STUDY_A
    image.SeriesInstanceUID = f"{STUDY_A}.1"
    image.SOPInstanceUID = ct[:2]
    status, _, received = get(image, StudyRootQueryRetrieveInformationModelGet, CTImageStorage)
    assert status.Status == 0x0000 and sorted(received) == sorted(ct[:2])
    status, identifier, received = get(image, StudyRootQueryRetrieveInformationModelGet, MRImageStorage)
    assert status.Status == 0xA702 and received == []
    assert (status.NumberOfCompletedSuboperations, status.NumberOfFailedSuboperations) == (0, 2)
    assert sorted(identifier.FailedSOPInstanceUIDList) == sorted(ct[:2])
