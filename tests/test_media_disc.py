"""Build a CT + MR disc (STD-GEN-CD) and read it back with xorriso, pycdlib,
dicom3tools and pydicom."""

from __future__ import annotations

import hashlib
import logging
import re
import subprocess
from pathlib import Path

import pycdlib
import pytest
from pydicom import dcmread
from pydicom.fileset import FileSet
from pydicom.uid import ExplicitVRLittleEndian, HangingProtocolStorage, JPEGBaseline8Bit, generate_uid

import modality_link
from modality_link.media import MediaError, MediaOptions, build_disc, build_media, plan_discs
from modality_link.fileformat import dataset_offset

from tests.support.instances import (
    ExplicitVRBigEndian,
    ImplicitVRLittleEndian,
    RLELossless,
    make_instance,
    make_series,
)
from tests.support.tools import require_tool

LEVEL1_DIR = re.compile(r"^[A-Z0-9_]{1,8}$")
LEVEL1_FILE = re.compile(r"^[A-Z0-9_]{1,8}(\.[A-Z0-9_]{1,3})?$")


@pytest.fixture(scope="module")
def disc(tmp_path_factory):
    root = tmp_path_factory.mktemp("disc")
    study = generate_uid()
    src = root / "src"
    files = make_series(src, 6, modality="CT", study_uid=study, series_number=1)
    files += make_series(src, 5, modality="MR", study_uid=study, series_number=2,
                         transfer_syntax=ImplicitVRLittleEndian)
    files += make_series(src, 3, modality="CT", patient_id="PID002", patient_name="ROE^RICHARD",
                         transfer_syntax=RLELossless)
    files += make_series(src, 2, modality="MR", patient_id="PID003", patient_name="MÜLLER^JÖRG",
                         transfer_syntax=ExplicitVRBigEndian)
    options = MediaOptions(fileset_id="TESTSET", source_ae_title="CONSOLE1", contact="radiology@example.org")
    results = build_media(files, root / "out", options)
    assert len(results) == 1
    result = results[0]
    extracted = root / "x"
    proc = subprocess.run([require_tool("xorriso"), "-osirrox", "on", "-indev", str(result.iso_path), "-extract", "/",
                           str(extracted)], capture_output=True, text=True, encoding="latin-1")
    assert proc.returncode == 0, proc.stderr
    return {"files": files, "result": result, "x": extracted, "options": options}


def test_layout_is_iso9660_level1(disc):
    x: Path = disc["x"]
    assert (x / "DICOMDIR").is_file() and (x / "README.TXT").is_file() and (x / "INDEX.HTM").is_file()
    for path in x.rglob("*"):
        rel = path.relative_to(x)
        assert len(rel.parts) <= 8
        assert (LEVEL1_DIR if path.is_dir() else LEVEL1_FILE).match(path.name), rel
    assert not list(x.glob("AUTORUN*"))
    assert disc["result"].iso_bytes % 2048 == 0


def test_dciodvfy_has_no_errors(disc):
    proc = subprocess.run([require_tool("dciodvfy"), str(disc["x"] / "DICOMDIR")], capture_output=True, text=True, encoding="latin-1")
    out = proc.stdout + proc.stderr
    assert "BasicDirectory" in out
    assert not [line for line in out.splitlines() if line.startswith("Error")], out


def test_dcdirdmp_lists_every_record(disc):
    proc = subprocess.run([require_tool("dcdirdmp"), str(disc["x"] / "DICOMDIR")], capture_output=True, text=True, encoding="latin-1")
    out = proc.stdout + proc.stderr  # dcdirdmp writes the listing to stderr
    kinds = [line.strip().split(" ")[0] for line in out.splitlines() if line.strip()]
    assert kinds.count("PATIENT") == 3
    assert kinds.count("STUDY") == 3
    assert kinds.count("SERIES") == 4
    assert kinds.count("IMAGE") == 16
    assert out.count("-> DICOM\\PAT") == 16


def test_dicomdir_offsets_and_keys(disc):
    ds = dcmread(disc["x"] / "DICOMDIR")
    assert ds.file_meta.MediaStorageSOPClassUID == "1.2.840.10008.1.3.10"
    assert ds.file_meta.TransferSyntaxUID == ExplicitVRLittleEndian
    assert ds.file_meta.ImplementationClassUID == modality_link.IMPLEMENTATION_CLASS_UID
    assert ds.file_meta.SourceApplicationEntityTitle == "CONSOLE1"
    assert ds.FileSetID == "TESTSET"
    records = ds.DirectoryRecordSequence
    by_offset = {r.seq_item_tell: r for r in records}
    assert ds.OffsetOfTheFirstDirectoryRecordOfTheRootDirectoryEntity == records[0].seq_item_tell
    assert by_offset[ds.OffsetOfTheLastDirectoryRecordOfTheRootDirectoryEntity].DirectoryRecordType == "PATIENT"
    reached = {records[0].seq_item_tell}
    for r in records:
        assert r.RecordInUseFlag == 0xFFFF
        assert not any(elem.tag.is_private for elem in r)
        for off in (r.OffsetOfTheNextDirectoryRecord, r.OffsetOfReferencedLowerLevelDirectoryEntity):
            if off:
                assert off in by_offset
                reached.add(off)
        if r.DirectoryRecordType == "IMAGE":
            assert r.ReferencedTransferSyntaxUIDInFile == ExplicitVRLittleEndian
            assert r.ReferencedFileID[0] == "DICOM" and len(r.ReferencedFileID) == 5
    assert reached == set(by_offset)  # every record reachable, none dangling
    patient = records[0]
    assert patient.DirectoryRecordType == "PATIENT" and patient.PatientID == "PID001"
    study = by_offset[patient.OffsetOfReferencedLowerLevelDirectoryEntity]
    for keyword in ("StudyDate", "StudyTime", "StudyDescription", "StudyInstanceUID", "StudyID", "AccessionNumber"):
        assert keyword in study
    series = by_offset[study.OffsetOfReferencedLowerLevelDirectoryEntity]
    assert series.Modality == "CT" and series.SeriesNumber == 1 and "SeriesInstanceUID" in series
    names = {str(r.PatientName) for r in records if r.DirectoryRecordType == "PATIENT"}
    assert "MÜLLER^JÖRG" in names


def test_pydicom_fileset_finds_all_instances(disc):
    fs = FileSet(dcmread(disc["x"] / "DICOMDIR"))
    uids = {dcmread(p, stop_before_pixels=True).SOPInstanceUID for p in disc["files"]}
    assert {inst.SOPInstanceUID for inst in fs} == uids
    for inst in fs:
        assert Path(inst.path).is_file()


def test_referenced_files_exist(disc):
    ds = dcmread(disc["x"] / "DICOMDIR")
    refs = [r.ReferencedFileID for r in ds.DirectoryRecordSequence if "ReferencedFileID" in r]
    assert len(refs) == len(disc["files"])
    for ref in refs:
        assert disc["x"].joinpath(*ref).is_file()


def test_instances_match_their_source(disc):
    x = disc["x"]
    result = disc["result"]
    assert len(result.instances) == len(disc["files"])
    for f in result.files:
        written = x.joinpath(*f.file_id).read_bytes()
        assert hashlib.sha256(written).hexdigest() == f.sha256 and len(written) == f.size
        if f.source is None:
            continue
        src = dcmread(f.source)
        out = dcmread(x.joinpath(*f.file_id))
        assert out.file_meta.TransferSyntaxUID == ExplicitVRLittleEndian
        assert out.file_meta.ImplementationClassUID == modality_link.IMPLEMENTATION_CLASS_UID
        assert out.file_meta.ImplementationVersionName == modality_link.IMPLEMENTATION_VERSION_NAME
        assert out.file_meta.SourceApplicationEntityTitle == "CONSOLE1"
        assert out.SOPInstanceUID == src.SOPInstanceUID
        ts = src.file_meta.TransferSyntaxUID
        if ts == ExplicitVRLittleEndian:  # data set byte for byte
            with open(f.source, "rb") as fp:
                off = dataset_offset(fp)
                fp.seek(off)
                src_dataset = fp.read()
            with open(x.joinpath(*f.file_id), "rb") as fp:
                fp.seek(dataset_offset(fp))
                assert fp.read() == src_dataset
        elif ts == ImplicitVRLittleEndian:
            assert out.PixelData == src.PixelData
            assert out["PixelData"].VR == "OW"
        else:  # Big Endian, RLE: same pixel values
            assert (out.pixel_array == src.pixel_array).all()
        assert out.PatientName == src.PatientName and out[0x00091001].value == src[0x00091001].value


def test_pycdlib_reads_the_image(disc, tmp_path):
    iso = pycdlib.PyCdlib()
    iso.open(str(disc["result"].iso_path))
    try:
        assert iso.pvd.volume_identifier.rstrip(b" ") == b"TESTSET"
        names = [c.file_identifier() for c in iso.list_children(iso_path="/")]
        assert b"DICOMDIR.;1" in names and b"README.TXT;1" in names
        for f in disc["result"].files[:5]:
            out = tmp_path / "f"
            name = f.file_id[-1] if "." in f.file_id[-1] else f.file_id[-1] + "."
            iso.get_file_from_iso(str(out), iso_path="/" + "/".join((*f.file_id[:-1], name)) + ";1")
            assert hashlib.sha256(out.read_bytes()).hexdigest() == f.sha256
    finally:
        iso.close()


def test_readme_and_web_index(disc):
    readme = (disc["x"] / "README.TXT").read_text("utf-8")
    assert "disc 1 of 1" in readme and "DICOM viewer" in readme and "radiology@example.org" in readme
    assert "modality_link" in readme
    index = (disc["x"] / "INDEX.HTM").read_text("utf-8")
    assert "<script" not in index.lower() and "charset=UTF-8" in index
    assert "ROE^RICHARD" in index and "MÜLLER^JÖRG" in index and "MÜLLER^JÖRG" in readme


def test_staging_only_has_the_whole_fileset(tmp_path):
    files = make_series(tmp_path / "src", 3)
    options = MediaOptions()
    plan = plan_discs(files, options)[0]
    result = build_disc(plan, tmp_path / "stage", None, options)
    assert result.iso_path is None
    for f in result.files:
        data = (tmp_path / "stage").joinpath(*f.file_id).read_bytes()
        assert hashlib.sha256(data).hexdigest() == f.sha256


def test_compressed_without_decoder_names_instance(tmp_path):
    study, series = generate_uid(), generate_uid()
    path = make_instance(tmp_path / "j.dcm", study_uid=study, series_uid=series, transfer_syntax=JPEGBaseline8Bit)
    uid = dcmread(path, stop_before_pixels=True).SOPInstanceUID
    plan = plan_discs([path], MediaOptions())[0]
    try:
        build_disc(plan, tmp_path / "stage", tmp_path / "a.iso", MediaOptions())
    except MediaError as exc:
        assert uid in str(exc) and "JPEG Baseline" in str(exc) and str(path) in str(exc)
    else:  # a JPEG plugin is installed, but the fake stream cannot decode
        pytest.fail("decoding a fake JPEG stream succeeded")


def test_dvd_jpeg_profile_passes_jpeg_through(tmp_path):
    study, series = generate_uid(), generate_uid()
    path = make_instance(tmp_path / "j.dcm", study_uid=study, series_uid=series, transfer_syntax=JPEGBaseline8Bit)
    options = MediaOptions(profile="STD-GEN-DVD-JPEG", capacity_bytes=4_700_000_000)
    plan = plan_discs([path], options)[0]
    result = build_disc(plan, tmp_path / "stage", None, options)
    written = (tmp_path / "stage").joinpath(*result.instances[0].file_id)
    assert dcmread(written).file_meta.TransferSyntaxUID == JPEGBaseline8Bit
    with open(path, "rb") as a, open(written, "rb") as b:
        a.seek(dataset_offset(a))
        b.seek(dataset_offset(b))
        assert a.read() == b.read()
    dicomdir = dcmread(tmp_path / "stage" / "DICOMDIR")
    assert dicomdir.DirectoryRecordSequence[-1].ReferencedTransferSyntaxUIDInFile == JPEGBaseline8Bit


def test_single_level_storage_class_is_skipped(tmp_path, caplog):
    study, series = generate_uid(), generate_uid()
    good = make_instance(tmp_path / "a.dcm", study_uid=study, series_uid=series)
    hp = make_instance(tmp_path / "b.dcm", study_uid=study, series_uid=series, sop_class=HangingProtocolStorage)
    with caplog.at_level(logging.WARNING):
        plans = plan_discs([good, hp], MediaOptions())
    assert [i.path for i in plans[0].instances] == [good]
    assert plans[0].skipped == [hp]
    assert "single-level record type HANGING PROTOCOL" in caplog.text


def test_invalid_options(tmp_path):
    with pytest.raises(MediaError):
        plan_discs([], MediaOptions(fileset_id="lower case"))
    with pytest.raises(MediaError):
        plan_discs([], MediaOptions(profile="STD-XYZ"))
