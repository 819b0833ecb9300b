"""pydicom's test corpus and DCMTK conversions through every path of the service.

Each file of :mod:`tests.support.corpus` goes through the C-STORE receive of the disk server (its raw
data set bytes, so broken files reach the service), ``archive.import``, a send to DCMTK
``storescp`` (which accepts uncompressed transfer syntaxes only, so compressed sources are
converted), a send with Storage Commitment to Orthanc, and a burn to an ISO 9660 image checked
with ``dciodvfy`` and ``dcdirdmp`` and read back. A valid file keeps its SOP Instance UID and
attributes everywhere (pixel data equal after a lossless conversion); a broken file is refused
with a precise status and message and leaves nothing behind.

Several corpus files share a SOP Instance UID (MR_small.dcm in eight transfer syntaxes), so the
send and burn paths run on *partitions*: groups of files with distinct UIDs, each in its own
archive, lossless and lossy files apart.
"""

from __future__ import annotations

import dataclasses
import shutil
import struct
import subprocess
import tempfile
from pathlib import Path
from typing import Any, Iterator

import pycdlib  # noqa: F401 (the ISO is read back by xorriso and pydicom below)
import pytest
from pydicom.dataset import Dataset
from pydicom.fileset import FileSet
from pydicom.uid import ExplicitVRBigEndian, ExplicitVRLittleEndian, ImplicitVRLittleEndian

from modality_link import config
from modality_link.config import Timeouts
from modality_link.archive import pydicom_record
from modality_link.home import temporary_home
from modality_link.net.servers import ARCHIVE_TRANSFER_SYNTAXES
from modality_link.net.command import parse_command
from modality_link.net.storage import c_store_rq
from modality_link.net.upper_layer import Requestor
from modality_link.home import free_port
from modality_link.service import Service
from tests.support.corpus import CASES, Case, assert_same_dataset, corpus_files, made_cases, read
from tests.support.instances import dataset_bytes
from tests.support.peers import start_orthanc, start_storescp
from tests.support.service import InProcessService, call, cleanup, make_home, wait_chain
from tests.support.tools import require_tool

pytestmark = pytest.mark.interop


# -- fixtures ---------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def work() -> Iterator[Path]:
    d = Path(tempfile.mkdtemp(prefix="mlcorpus"))
    yield d
    shutil.rmtree(d, ignore_errors=True)


@pytest.fixture(scope="module")
def all_cases(work: Path) -> list[Case]:
    for tool in ("dcmconv", "dcmcjpeg", "dcmcjpls", "dcmcrle", "dcmodify"):
        require_tool(tool)
    return CASES + made_cases(work / "made")


def partitions(cases: list[Case]) -> list[list[Case]]:
    """Valid cases in groups whose SOP Instance UIDs are distinct; lossy files, and files a peer
    refuses, apart."""
    groups: list[tuple[tuple[bool, bool], set[str], list[Case]]] = []
    for case in cases:
        if not case.valid:
            continue
        uid = read(case.path).SOPInstanceUID
        lossy = (case.kind == "lossy", case.peer_refuses)
        for is_lossy, uids, members in groups:
            if is_lossy == lossy and uid not in uids:
                uids.add(uid)
                members.append(case)
                break
        else:
            groups.append((lossy, {uid}, [case]))
    return [members for _, _, members in groups]


def test_every_corpus_file_has_a_line():
    listed = {c.name for c in CASES}
    assert corpus_files() - listed == set(), "add a line to tests/support/corpus.py CASES"


# -- receive: raw data sets over a real association into the disk server ----------------------------------


@pytest.fixture(scope="module")
def receiver(work: Path) -> Iterator[tuple[Service, Any]]:
    home = make_home()
    svc = InProcessService(home)
    yield svc.service, home
    svc.stop()
    cleanup(home)


def archive_files(home: Any) -> dict[str, int]:
    """{path: modification time} of every file under the archive folder, temporaries included."""
    return {str(p): p.stat().st_mtime_ns for p in home.archive_dir.rglob("*") if p.is_file()}


def raw_dataset(case: Case) -> tuple[str, str, str, bytes]:
    """(SOP Class, SOP Instance, transfer syntax, data set bytes) as a sender would put them on
    the wire: the UIDs of the data set (else of the File Meta), the bytes after the File Meta."""
    ds = read(case.path)
    data = case.path.read_bytes()
    if data[128:132] == b"DICM":
        offset = 132
        while offset + 8 <= len(data) and data[offset:offset + 2] == b"\x02\x00":
            vr = data[offset + 4:offset + 6]
            if vr in (b"OB", b"OW", b"UN", b"SQ", b"UT", b"UC", b"UR"):
                offset += 12 + struct.unpack_from("<L", data, offset + 8)[0]
            else:
                offset += 8 + struct.unpack_from("<H", data, offset + 6)[0]
        body = data[offset:]
    else:
        body = data
    meta = getattr(ds, "file_meta", Dataset())
    ts = meta.get("TransferSyntaxUID")
    if not ts:
        implicit, little = ds.original_encoding if ds.original_encoding[0] is not None else (True, True)
        ts = ImplicitVRLittleEndian if implicit else (ExplicitVRLittleEndian if little else ExplicitVRBigEndian)
    sop_class = ds.get("SOPClassUID") or meta.get("MediaStorageSOPClassUID") or "1.2.840.10008.5.1.4.1.1.7"
    sop_instance = ds.get("SOPInstanceUID") or meta.get("MediaStorageSOPInstanceUID") or "1.2.3.4.5.6.7.8.9"
    return str(sop_class), str(sop_instance), str(ts), body


def c_store_raw(port: int, case: Case, called: str = "MODLINK") -> tuple[int, str]:
    """C-STORE the raw data set of `case` to the disk server (or the AE `called`); (status,
    error comment)."""
    sop_class, sop_instance, ts, body = raw_dataset(case)
    assoc = Requestor("127.0.0.1", port, "CORPUS", called, [(sop_class, [ts])], Timeouts()).open()
    try:
        ((cid, _),) = assoc.accepted()[sop_class]
        assoc.send_message(cid, c_store_rq(assoc.next_message_id(), sop_class, sop_instance), body)
        rsp = parse_command(assoc.receive_command(30))
        status = struct.unpack("<H", rsp[0x0900])[0]
        return status, rsp.get(0x0902, b"").decode("ascii", "replace").strip(" \x00")
    finally:
        assoc.release()


@pytest.mark.parametrize("case", CASES, ids=lambda c: c.id)
def test_receive(case: Case, receiver):
    service, home = receiver
    before = archive_files(home)
    status, comment = c_store_raw(service.disk_server.port, case)
    tmp_left = [p for p in home.archive_dir.joinpath(".tmp").glob("*") if p.is_file()]
    assert tmp_left == [], "a refused or stored data set left a temporary file"
    if case.valid or case.status is None:
        assert status == 0x0000, f"{case.name}: status 0x{status:04X} {comment}"
        sop = raw_dataset(case)[1]
        stored = list(home.archive_dir.rglob(f"{sop}.dcm"))
        assert len(stored) == 1
        assert dataset_bytes(stored[0]) == raw_dataset(case)[3]
        assert_same_dataset(read(case.path), read(stored[0]), case.name)
    else:
        assert status == case.status, f"{case.name}: status 0x{status:04X} {comment}"
        assert comment, "a refusal says why in its Error Comment (0000,0902)"
        assert archive_files(home) == before, "a refused data set changed the archive"


@pytest.mark.parametrize("case", CASES, ids=lambda c: c.id)
def test_receive_into_memory(case: Case, receiver, tmp_path: Path):
    """The memory server keeps what the disk server keeps, byte for byte, with the index row that
    pydicom's full read gives; it refuses the same files with the same status."""
    service, home = receiver
    before = call(home, "memory.list")["instances"]
    status, comment = c_store_raw(service.memory_server.port, case, "MODLINK_MEM")
    sop = raw_dataset(case)[1]
    if case.valid or case.status is None:
        assert status == 0x0000, f"{case.name}: status 0x{status:04X} {comment}"
        item = service.memory.get(sop)
        assert item is not None
        data = bytes(item.data)
        assert data.endswith(raw_dataset(case)[3])
        (tmp_path / "fetched.dcm").write_bytes(data)
        assert_same_dataset(read(case.path), read(tmp_path / "fetched.dcm"), case.name)
        row, reference = dataclasses.asdict(item.record), dataclasses.asdict(pydicom_record(data, "CORPUS"))
        for key in ("received_at", "size"):
            row.pop(key), reference.pop(key)
        assert row == reference
        assert item.record.size == len(data)
    else:
        assert status == case.status, f"{case.name}: status 0x{status:04X} {comment}"
        assert comment, "a refusal says why in its Error Comment (0000,0902)"
        assert call(home, "memory.list")["instances"] == before, "a refused data set was kept"


# -- import --------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("case", CASES, ids=lambda c: c.id)
def test_import(case: Case, receiver):
    service, home = receiver
    before = archive_files(home)
    result = call(home, "archive.import", paths=[str(case.path)])
    if case.valid:
        assert result["imported"] == 1, result
        ds = read(case.path)
        stored = list(home.archive_dir.rglob(f"{ds.SOPInstanceUID}.dcm"))
        assert dataset_bytes(stored[0]) == case.path.read_bytes()[-len(dataset_bytes(stored[0])):]
        assert_same_dataset(ds, read(stored[0]), case.name)
    else:
        assert result["imported"] == 0
        (failure,) = result["failed"]
        assert case.refuse in failure["error"], failure
        assert archive_files(home) == before, "a refused file changed the archive"
    assert [p for p in home.archive_dir.joinpath(".tmp").glob("*") if p.is_file()] == []


# -- exam add: the acquisition hands an image over, the service completes it with the exam's data --------

#: What exam.add_image replaces: the patient and study of the exam, its PPS, the character set.
EXAM_KEYS = {
    "PatientName", "PatientID", "IssuerOfPatientID", "PatientBirthDate", "PatientSex", "OtherPatientIDsSequence",
    "PatientBirthName", "PatientAge", "PatientWeight", "PatientSize", "EthnicGroup", "PatientComments",
    "ReferencedPatientSequence", "MedicalAlerts", "Allergies", "AdditionalPatientHistory", "PregnancyStatus",
    "SpecialNeeds", "PatientState", "StudyInstanceUID", "StudyID", "AccessionNumber", "RequestAttributesSequence",
    "ReferencedStudySequence", "ProcedureCodeSequence", "PerformedProcedureStepID",
    "PerformedProcedureStepStartDate", "PerformedProcedureStepStartTime",
    "ReferencedPerformedProcedureStepSequence", "SpecificCharacterSet",
}


@pytest.fixture(scope="module")
def acquisition() -> Iterator[tuple[Service, Any]]:
    """A console of its own: an image whose SOP Instance UID is archived already (by the receive
    and import tests) may not be added to an exam (docs/ipc.md, exam.add_image)."""
    home = make_home()
    svc = InProcessService(home)
    yield svc.service, home
    svc.stop()
    cleanup(home)


@pytest.fixture(scope="module")
def exam(acquisition) -> dict[str, Any]:
    service, home = acquisition
    return call(home, "exam.start", patient_id="CORPUS1", patient_name="Müller^Jörg")


@pytest.mark.parametrize("case", CASES, ids=lambda c: c.id)
def test_exam_add(case: Case, acquisition, exam):
    service, home = acquisition
    if not case.valid:
        with pytest.raises(Exception) as err:
            call(home, "exam.add_image", exam_id=exam["exam_id"], paths=[str(case.path)])
        assert case.refuse in str(err.value)
        return
    (uid,) = call(home, "exam.add_image", exam_id=exam["exam_id"], paths=[str(case.path)])["added"]
    src = read(case.path)
    assert uid == src.SOPInstanceUID
    (stored,) = home.archive_dir.glob(f"{exam['study_uid']}/*/{uid}.dcm")
    out = read(stored)
    assert out.PatientName == "Müller^Jörg" and out.PatientID == "CORPUS1"
    assert out.StudyInstanceUID == exam["study_uid"]
    kept = Dataset()
    for elem in src:
        if elem.keyword not in EXAM_KEYS:
            kept.add(elem)
    kept.file_meta = src.file_meta
    kept.set_original_encoding(*src.original_encoding, src.original_character_set)
    assert_same_dataset(kept, out, f"exam add {case.name}")


# -- send, commit and burn, one partition of distinct UIDs at a time ---------------------------------------


@pytest.fixture(scope="module")
def peers(work: Path) -> Iterator[dict[str, Any]]:
    scp_port = free_port()
    scp_out = work / "storescp"
    scp_out.mkdir()
    scp = start_storescp(scp_out, scp_port)
    orthanc = start_orthanc(work / "orthanc", overwrite=True)
    yield {"storescp": (scp_port, scp_out), "orthanc": orthanc}
    shutil.copy(orthanc.log, "/tmp/orthanc-corpus.log")
    scp.terminate()
    scp.wait()
    orthanc.stop()


#: Partitions of the corpus, computed when the tests are collected; "made" and "made-lossy" are the
#: DCMTK conversions, which are made when the tests run.
PARTITIONS = partitions(CASES)
PARTITION_IDS = [f"p{i}" for i in range(len(PARTITIONS))] + ["made", "made-lossy"]


@pytest.fixture(scope="module", params=PARTITION_IDS)
def partition(request, peers, all_cases) -> Iterator[dict[str, Any]]:
    """A service whose archive holds one partition; nodes PACS (DCMTK storescp) and ORTHANC."""
    part = request.param
    if part.startswith("made"):
        made = [c for c in all_cases if c not in CASES and (c.kind == "lossy") == part.endswith("lossy")]
        (cases,) = partitions(made)
    else:
        cases = PARTITIONS[int(part[1:])]
    scp_port, _ = peers["storescp"]
    orthanc = peers["orthanc"]
    node = dict(host="127.0.0.1", retry_interval=0.2, commit_wait=0.5, commit_timeout=30.0)
    home = temporary_home(nodes={
        "PACS": config.Node(ae_title="STORESCP", port=scp_port, roles=["store"], **node),
        # a PACS that takes every syntax the archive holds: each instance goes as it is stored
        "ORTHANC": config.Node(ae_title="ORTHANC", port=orthanc.dicom_port, roles=["store", "commit"],
                               transfer_syntaxes=list(ARCHIVE_TRANSFER_SYNTAXES), **node),
    })
    cfg = config.load(home.config_path)
    orthanc.allow(cfg.disk_server.ae_title, cfg.disk_server.port)
    service = InProcessService(home)
    try:
        result = call(home, "archive.import", paths=[str(c.path) for c in cases])
        yield {
            "name": part, "home": home, "import": result, "lossy": cases[0].kind == "lossy",
            "studies": sorted({s["study_uid"] for s in call(home, "studies.list")}),
            "sources": {read(c.path).SOPInstanceUID: c for c in cases},
        }
    finally:
        service.stop()
        cleanup(home)


def test_partition_imported(partition):
    assert partition["import"]["imported"] == len(partition["sources"]), partition["import"]


def test_send_to_storescp(partition, peers):
    """DCMTK storescp accepts uncompressed transfer syntaxes only: every compressed source is
    converted on the way, keeping its identity."""
    home, sources = partition["home"], partition["sources"]
    _, scp_out = peers["storescp"]
    for f in scp_out.iterdir():
        f.unlink()
    job = wait_chain(home, call(home, "send", study_uids=partition["studies"], node="PACS")["job_id"], 120)
    undecodable = {uid for uid, case in sources.items() if not case.decodable}
    assert job["state"] == ("failed" if undecodable else "done"), job
    failed = {f["item"]: f["detail"] for f in job["failed_items"]}
    assert set(failed) == undecodable, job
    assert all("decompress" in why for why in failed.values()), failed
    received = {read(f).SOPInstanceUID: f for f in scp_out.iterdir()}
    assert set(received) == set(sources) - undecodable
    warned = {w["item"]: w["detail"] for w in job["warning_items"]}
    for uid, case in sources.items():
        if uid in undecodable:
            continue
        out = read(received[uid])
        if case.kind == "lossy":  # decompressed, as PS3.5 8.2 permits, and said so
            assert out.LossyImageCompression == "01", case.name
            assert "lossy" in warned[uid] and "0028,2110" in warned[uid], job
            assert_same_dataset(read(case.path), out, f"storescp {case.name}", decoded=None)
        else:
            assert uid not in warned, job
            assert_same_dataset(read(case.path), out, f"storescp {case.name}")


def test_send_to_orthanc_with_commitment(partition, peers):
    """Orthanc takes every transfer syntax and reports commitment on a separate association."""
    home, sources = partition["home"], partition["sources"]
    orthanc = peers["orthanc"]
    job = wait_chain(home, call(home, "send", study_uids=partition["studies"], node="ORTHANC", commit=True)["job_id"],
                     120)
    refused = {uid for uid, case in sources.items() if case.peer_refuses}
    if refused:  # the peer's refusal is the job's failure, instance by instance
        assert job["state"] == "failed", job
        assert {f["item"]: "0xC000" in f["detail"] for f in job["failed_items"]} == dict.fromkeys(refused, True), job
        return
    assert job["state"] == "done", job
    counts = {s["study_uid"]: s["nodes"]["ORTHANC"] for s in call(home, "studies.list")}
    assert sum(c["committed"] for c in counts.values()) == len(sources), counts
    for uid, case in sources.items():
        assert_same_dataset(read(case.path), orthanc.instance(uid), f"orthanc {case.name}")


def test_burn_std_gen_cd(partition, work: Path):
    """STD-GEN-CD allows Explicit VR Little Endian only (PS3.11 D.3): lossless sources are
    converted, lossy ones refused with the reason."""
    home, sources = partition["home"], partition["sources"]
    iso = work / f"{partition['name']}.iso"
    res = call(home, "burn", study_uids=partition["studies"], iso=str(iso), wait=True)
    if partition["lossy"]:
        assert res["state"] == "failed" and "lossy" in res["error"].lower(), res
        assert not iso.exists()
        return
    assert res["state"] == "done", res
    found = check_iso(iso, work / partition["name"])
    assert set(found) == set(sources)
    for uid, case in sources.items():
        out = read(found[uid])
        assert out.file_meta.TransferSyntaxUID == ExplicitVRLittleEndian
        assert_same_dataset(read(case.path), out, f"disc {case.name}")


def check_iso(image: Path, out: Path) -> dict[str, Path]:
    """Extract the ISO with xorriso, validate its DICOMDIR with dciodvfy and dcdirdmp, and return
    SOP Instance UID -> file as the DICOMDIR references them."""
    proc = subprocess.run([require_tool("xorriso"), "-osirrox", "on", "-indev", str(image), "-extract", "/", str(out)],
                          capture_output=True, text=True, encoding="latin-1")
    assert proc.returncode == 0, proc.stderr
    dicomdir = out / "DICOMDIR"
    proc = subprocess.run([require_tool("dciodvfy"), str(dicomdir)], capture_output=True, text=True, encoding="latin-1")
    text = proc.stdout + proc.stderr
    assert not [line for line in text.splitlines() if line.startswith("Error")], text
    proc = subprocess.run([require_tool("dcdirdmp"), str(dicomdir)], capture_output=True, text=True, encoding="latin-1")
    assert proc.returncode == 0, proc.stderr
    found = {}
    for inst in FileSet(dicomdir):
        found[inst.SOPInstanceUID] = Path(inst.path)
    return found
