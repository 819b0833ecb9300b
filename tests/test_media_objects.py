"""Burning every kind of object and character set: studies from pydicom's test corpus go through
the archive (real SQLite index) and burn_studies to an ISO image, read back with xorriso, checked
with dicom3tools (dciodvfy, dcdirdmp) and pydicom.

Each DICOMDIR must have no dciodvfy error and no empty Type 1 key; the names read back from it,
from README.TXT and from INDEX.HTM must equal the sources' decoded names (docs/design.md
"Character sets", "Media")."""

from __future__ import annotations

import html
import logging
import os
import subprocess
from pathlib import Path

import pydicom
import pytest
from pydicom import dcmread
from pydicom.uid import (
    ExplicitVRLittleEndian,
    ImplicitVRLittleEndian,
    JPEGBaseline8Bit,
    JPEGLosslessSV1,
    generate_uid,
)

from modality_link.archive import Archive
from modality_link.media import MediaOptions
from modality_link.media.burn import burn_studies
from modality_link.fileformat import dataset_offset
from modality_link.media.fileset import INSTANCE_KEYS, PATIENT_KEYS, SERIES_KEYS, STUDY_KEYS, date_time_value
from modality_link.media.profiles import get_profile
from tests.support.instances import make_instance

DATA = Path(os.path.dirname(pydicom.__file__)) / "data"
TYPE1 = {
    "PATIENT": [k for k, t in PATIENT_KEYS if t == 1],
    "STUDY": [k for k, t in STUDY_KEYS if t == 1],
    "SERIES": [k for k, t in SERIES_KEYS if t == 1],
    **{rtype: [k for k, t in keys if t == 1] for rtype, keys in INSTANCE_KEYS.items()},
}


def part10(src: Path, dest: Path) -> Path:
    """`src` as a Part-10 file whose File Meta describes its data set, as the archive requires
    (PS3.10 7.1): a few corpus files have no File Meta, or one naming another SOP Instance."""
    ds = dcmread(src, force=True)
    if src.read_bytes()[128:132] == b"DICM" and ds.file_meta.get("MediaStorageSOPInstanceUID") == ds.SOPInstanceUID:
        dest.write_bytes(src.read_bytes())  # the data set bytes are kept
    else:
        ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
        ds.save_as(dest, enforce_file_format=True)
    return dest


def without(path: Path, *keywords: str) -> Path:
    """Rewrite `path` without the elements `keywords`."""
    ds = dcmread(path)
    for keyword in keywords:
        if keyword in ds:
            delattr(ds, keyword)
    ds.save_as(path, enforce_file_format=True)
    return path


def import_all(archive: Archive, files: list[Path]) -> list[Path]:
    out = []
    for path, rec in archive.import_paths(files):
        assert not isinstance(rec, Exception), (path, rec)
        out.append(archive.root / rec.path)
    return out


def burn(files: list[Path], tmp_path: Path, tools: dict[str, str], profile: str = "STD-GEN-CD") -> Path:
    """Burn `files` to one ISO image, extract it and return the extracted folder."""
    iso = tmp_path / "out" / "disc.iso"
    report = burn_studies(files, None, iso, MediaOptions(profile=profile), tmp_path / "staging")
    assert [d.state for d in report.discs] == ["done"], report
    extracted = tmp_path / "x"
    proc = subprocess.run([tools["xorriso"], "-osirrox", "on", "-indev", str(iso), "-extract", "/", str(extracted)],
                          capture_output=True, text=True, encoding="latin-1")
    assert proc.returncode == 0, proc.stderr
    return extracted


def check_dicomdir(extracted: Path, tools: dict[str, str]) -> pydicom.Dataset:
    """dciodvfy reports no error, dcdirdmp reads it, no record has an empty Type 1 key."""
    dicomdir = extracted / "DICOMDIR"
    proc = subprocess.run([tools["dciodvfy"], str(dicomdir)], capture_output=True)
    text = (proc.stdout + proc.stderr).decode("utf-8", "replace")
    assert "BasicDirectory" in text
    assert not [line for line in text.splitlines() if line.startswith("Error")], text
    proc = subprocess.run([tools["dcdirdmp"], str(dicomdir)], capture_output=True)
    assert proc.returncode == 0, proc.stderr
    ds = dcmread(dicomdir)
    records = ds.DirectoryRecordSequence
    assert (proc.stdout + proc.stderr).count(b"PATIENT ") == sum(r.DirectoryRecordType == "PATIENT" for r in records)
    for record in records:
        for keyword in TYPE1[record.DirectoryRecordType]:
            value = record.get(keyword)
            assert value is not None and str(value).strip() != "", (record.DirectoryRecordType, keyword)
    return ds


def names_by_instance(ds: pydicom.Dataset) -> dict[str, tuple[str, str]]:
    """SOP Instance UID -> (Patient's Name of its PATIENT record, its record type), depth-first order."""
    out: dict[str, tuple[str, str]] = {}
    patient = ""
    for record in ds.DirectoryRecordSequence:
        if record.DirectoryRecordType == "PATIENT":
            patient = str(record.get("PatientName") or "")
        elif "ReferencedSOPInstanceUIDInFile" in record:
            out[record.ReferencedSOPInstanceUIDInFile] = (patient, record.DirectoryRecordType)
    return out


#: Scenario -> (corpus files or generated ones, record types on the disc, (0008,0005) of the records:
#: one character set kept when all sources agree, else ISO_IR 192; None: not checked)
SCENARIOS = {
    "no-charset": (["MR_small_bigendian.dcm", "gen:no-charset", "gen:empty-charset"], {"IMAGE"}, "ISO_IR 100"),
    "utf8": (["chrX1.dcm"], {"IMAGE"}, "ISO_IR 192"),
    "iso2022-ir13-ir87": (["chrH32.dcm"], {"IMAGE"}, ["ISO 2022 IR 13", "ISO 2022 IR 87"]),
    "iso2022-mixed": (
        ["chrH31.dcm", "chrH32.dcm", "chrJapMulti.dcm", "chrI2.dcm", "chrKoreanMulti.dcm"], {"IMAGE"}, "ISO_IR 192",
    ),
    "single-byte-and-gb18030": (
        ["chrFren.dcm", "chrGerm.dcm", "chrGreek.dcm", "chrRuss.dcm", "chrArab.dcm", "chrHbrw.dcm", "chrX2.dcm"],
        {"IMAGE"},
        "ISO_IR 192",
    ),
    "rt": (["rtplan.dcm", "rtdose.dcm", "rtstruct.dcm"], {"RT PLAN", "RT DOSE", "RT STRUCTURE SET"}, None),
    "sr-and-ecg": (["reportsi.dcm", "test-SR.dcm", "waveform_ecg.dcm"], {"SR DOCUMENT", "WAVEFORM"}, None),
}


def source(name: str, dest: Path) -> Path:
    if name.startswith("gen:"):  # a CT with a Latin-1 name and no or an empty (0008,0005), as consoles write
        path = make_instance(dest / f"{name[4:]}.dcm", study_uid=generate_uid(), series_uid=generate_uid(),
                             patient_id=name[4:], patient_name="DOE^JOHN")
        ds = dcmread(path)
        if name == "gen:no-charset":
            del ds.SpecificCharacterSet
            ds["PatientName"].value = "MÜLLER^JÖRG".encode("latin-1")
        else:
            ds.SpecificCharacterSet = ""
        ds.save_as(path, enforce_file_format=True)
        return path
    folder = "charset_files" if name.startswith("chr") else "test_files"
    path = part10(DATA / folder / name, dest / name)
    if name == "test-SR.dcm":  # it shares its SOP Instance UID with reportsi.dcm
        ds = dcmread(path)
        ds.SOPInstanceUID = ds.file_meta.MediaStorageSOPInstanceUID = generate_uid()
        ds.save_as(path, enforce_file_format=True)
    return path


@pytest.mark.parametrize("scenario", list(SCENARIOS))
def test_burn_reads_back_names_and_records(scenario: str, archive: Archive, tmp_path: Path, tools) -> None:
    names, rtypes, charset = SCENARIOS[scenario]
    (tmp_path / "in").mkdir()
    files = import_all(archive, [source(n, tmp_path / "in") for n in names])
    expected = {}
    for f in files:
        ds = dcmread(f, stop_before_pixels=True)
        expected[ds.SOPInstanceUID] = str(ds.get("PatientName") or "")
    if scenario == "no-charset":
        assert "MÜLLER^JÖRG" in expected.values()
    extracted = burn(files, tmp_path, tools)
    dicomdir = check_dicomdir(extracted, tools)
    found = names_by_instance(dicomdir)
    assert {uid: name for uid, (name, _) in found.items()} == expected
    assert {rtype for _, rtype in found.values()} == rtypes
    if charset is not None:
        assert {str(r.get("SpecificCharacterSet")) for r in dicomdir.DirectoryRecordSequence} == {str(charset)}
    readme = (extracted / "README.TXT").read_text("utf-8")
    index = (extracted / "INDEX.HTM").read_text("utf-8")
    assert 'charset=UTF-8' in index
    for name in expected.values():
        assert name in readme and html.escape(name) in index


def test_sources_lacking_type1_keys_get_invented_values(archive: Archive, tmp_path: Path, tools, caplog) -> None:
    study = generate_uid()
    src = [make_instance(tmp_path / "in" / f"{i}.dcm", study_uid=study, series_uid=generate_uid(), instance_number=i)
           for i in (1, 2)]
    for path in src:
        without(path, "PatientID", "StudyDate", "StudyTime", "StudyID", "SeriesNumber", "InstanceNumber", "Modality")
    sr = part10(DATA / "test_files" / "reportsi.dcm", tmp_path / "in" / "sr.dcm")
    without(sr, "PatientID", "StudyID", "ContentDate", "ContentTime", "InstanceNumber")
    files = import_all(archive, [*src, sr])
    with caplog.at_level(logging.WARNING, logger="modality_link.media.fileset"):
        extracted = burn(files, tmp_path, tools)
    records = check_dicomdir(extracted, tools).DirectoryRecordSequence
    patients = [r for r in records if r.DirectoryRecordType == "PATIENT"]
    assert sorted(r.PatientID for r in patients) == ["MODLINKPAT000001", "MODLINKPAT000002"]
    studies = [r for r in records if r.DirectoryRecordType == "STUDY"]
    assert all(r.StudyID.startswith("MODLINKSTU") for r in studies)
    assert sorted(r.Modality for r in records if r.DirectoryRecordType == "SERIES") == ["OT", "OT", "SR"]
    assert sorted(int(r.SeriesNumber) for r in records if r.DirectoryRecordType == "SERIES") == [1, 1, 2]  # SR: 1
    # Each invented value is logged with the instance it stands for.
    assert "Type 1 key PatientID is missing or empty; invented MODLINKPAT000001" in caplog.text
    assert str(files[0]) in caplog.text or str(files[1]) in caplog.text


def test_private_sop_class_gets_a_private_record(archive: Archive, tmp_path: Path, tools) -> None:
    study, series = generate_uid(), generate_uid()
    good = make_instance(tmp_path / "in" / "a.dcm", study_uid=study, series_uid=series)
    private = make_instance(tmp_path / "in" / "b.dcm", study_uid=study, series_uid=series, sop_class="1.2.3.4.5.6.7")
    files = import_all(archive, [good, private])
    records = check_dicomdir(burn(files, tmp_path, tools), tools).DirectoryRecordSequence
    (rec,) = [r for r in records if r.DirectoryRecordType == "PRIVATE"]
    assert rec.PrivateRecordUID == "1.2.3.4.5.6.7" and rec.ReferencedSOPClassUIDInFile == "1.2.3.4.5.6.7"


def test_ctmr_profile_refuses_what_it_does_not_allow(archive: Archive, tmp_path: Path) -> None:
    (tmp_path / "in").mkdir()
    ct = make_instance(tmp_path / "in" / "ct.dcm", study_uid=generate_uid(), series_uid=generate_uid())
    plan = part10(DATA / "test_files" / "rtplan.dcm", tmp_path / "in" / "rtplan.dcm")
    private = make_instance(tmp_path / "in" / "p.dcm", study_uid=generate_uid(), series_uid=generate_uid(),
                            sop_class="1.2.3.4.5.6.7")
    files = import_all(archive, [ct, plan, private])
    report = burn_studies(files, None, tmp_path / "o.iso", MediaOptions(profile="STD-CTMR-CD"), tmp_path / "st")
    text = report.error or ""
    assert "2 instance(s) not allowed on a STD-CTMR-CD medium" in text
    assert str(files[1]) in text and "RT Plan Storage" in text and "1.2.3.4.5.6.7" in text
    assert str(files[0]) not in text
    assert not (tmp_path / "o.iso").exists()


def test_ctmr_profile_copies_jpeg_lossless_sv1_and_converts_the_rest(archive: Archive, tmp_path: Path, tools):
    study = generate_uid()
    jpeg = make_instance(tmp_path / "in" / "j.dcm", study_uid=study, series_uid=generate_uid(),
                         transfer_syntax=JPEGBaseline8Bit)
    ds = dcmread(jpeg)
    ds.file_meta.TransferSyntaxUID = JPEGLosslessSV1  # encapsulated frames are copied, never decoded
    ds.save_as(jpeg, enforce_file_format=True)
    mr = make_instance(tmp_path / "in" / "m.dcm", modality="MR", study_uid=study, series_uid=generate_uid(),
                       transfer_syntax=ImplicitVRLittleEndian)
    files = import_all(archive, [jpeg, mr])
    extracted = burn(files, tmp_path, tools, profile="STD-CTMR-CD")
    records = check_dicomdir(extracted, tools).DirectoryRecordSequence
    images = {r.ReferencedSOPInstanceUIDInFile: r for r in records if r.DirectoryRecordType == "IMAGE"}
    for path in files:
        src = dcmread(path, stop_before_pixels=True)
        rec = images[src.SOPInstanceUID]
        assert rec.Rows == src.Rows and rec.Columns == src.Columns
        assert list(rec.ImagePositionPatient) == list(src.ImagePositionPatient)
        on_disc = extracted.joinpath(*rec.ReferencedFileID)
        if src.file_meta.TransferSyntaxUID == JPEGLosslessSV1:
            assert rec.ReferencedTransferSyntaxUIDInFile == JPEGLosslessSV1
            with open(on_disc, "rb") as a, open(path, "rb") as b:  # the data set byte for byte
                a.seek(dataset_offset(a))
                b.seek(dataset_offset(b))
                assert a.read() == b.read()
        else:
            assert rec.ReferencedTransferSyntaxUIDInFile == ExplicitVRLittleEndian
            assert dcmread(on_disc).file_meta.TransferSyntaxUID == ExplicitVRLittleEndian
    assert get_profile("STD-CTMR-CD").medium == "CD-R"


@pytest.mark.parametrize("vr, raw, expected", [
    ("DA", b"20240131", b"20240131"),
    ("DA", b"1997.04.24", b"19970424"),  # ACR-NEMA form (PS3.5 6.2)
    ("DA", b"24.04.1997", None),
    ("DA", b"", None),
    ("TM", b"140438 ", b"140438"),
    ("TM", b"14:04:38", b"140438"),
    ("TM", b"14:04:38.123456", b"140438.123456"),
    ("TM", b"1404", b"1404"),
    ("TM", b"2 pm", None),
])
def test_directory_record_dates_and_times(vr: str, raw: bytes, expected: bytes | None) -> None:
    assert date_time_value(vr, raw) == expected
