"""Tests for sim.images, the synthetic CT/MR series generator."""

import subprocess

import numpy as np
import pydicom
import pytest
from pydicom.uid import ExplicitVRLittleEndian, ImplicitVRLittleEndian

from sim.images import (
    CT_IMAGE_STORAGE,
    JAPANESE_PATIENT,
    MR_IMAGE_STORAGE,
    PatientSpec,
    main,
    make_study,
    write_study,
)
from tests.support.tools import require_tool

DCIODVFY = "/usr/bin/dciodvfy"


def test_ct_shapes_and_modules():
    dss = make_study("CT", images=4, series=2, rows=32, columns=48, seed=1)
    assert len(dss) == 8
    for ds in dss:
        assert ds.SOPClassUID == CT_IMAGE_STORAGE
        assert ds.file_meta.MediaStorageSOPClassUID == CT_IMAGE_STORAGE
        assert ds.file_meta.MediaStorageSOPInstanceUID == ds.SOPInstanceUID
        assert ds.file_meta.TransferSyntaxUID == ExplicitVRLittleEndian
        assert (ds.Rows, ds.Columns) == (32, 48)
        assert ds.pixel_array.shape == (32, 48)
        assert ds.Modality == "CT"
        assert ds.Manufacturer == "modality_link sim"
        assert ds.PatientPosition == "HFS"
        assert (ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation) == (16, 12, 11, 0)
        assert ds.SpecificCharacterSet == "ISO_IR 100"
    assert [ds.InstanceNumber for ds in dss] == [1, 2, 3, 4] * 2
    assert [ds.SeriesNumber for ds in dss] == [1] * 4 + [2] * 4
    # Slices advance along z by the slice thickness within a series.
    z = [float(ds.ImagePositionPatient[2]) for ds in dss[:4]]
    steps = np.diff(z)
    assert np.allclose(np.abs(steps), float(dss[0].SliceThickness)) and np.all(steps < 0)


def test_image_type_is_three_values():
    ct = make_study("CT", images=1, rows=8, columns=8, seed=1)[0]
    mr = make_study("MR", images=1, rows=8, columns=8, seed=1)[0]
    assert list(ct.ImageType) == ["ORIGINAL", "PRIMARY", "AXIAL"]
    assert ct["ImageType"].VM == 3
    assert mr["ImageType"].VM == 3 and list(mr.ImageType)[:2] == ["ORIGINAL", "PRIMARY"]


def test_uids_unique_and_shared():
    dss = make_study("MR", images=5, series=3, rows=16, columns=16)
    assert len({ds.SOPInstanceUID for ds in dss}) == 15
    assert len({ds.StudyInstanceUID for ds in dss}) == 1
    assert len({ds.SeriesInstanceUID for ds in dss}) == 3
    assert len({ds.FrameOfReferenceUID for ds in dss}) == 1
    uids = {dss[0].StudyInstanceUID, dss[0].SeriesInstanceUID, dss[0].FrameOfReferenceUID, dss[0].SOPInstanceUID}
    assert len(uids) == 4
    assert all(pydicom.uid.UID(u).is_valid for u in uids)
    # A second study gets new UIDs.
    other = make_study("MR", images=1, rows=8, columns=8)
    assert other[0].StudyInstanceUID != dss[0].StudyInstanceUID
    assert make_study(images=1, rows=8, columns=8, study_uid="1.2.3.4")[0].StudyInstanceUID == "1.2.3.4"


def test_deterministic_with_seed():
    a = make_study("CT", images=3, rows=24, columns=24, seed=42)
    b = make_study("CT", images=3, rows=24, columns=24, seed=42)
    c = make_study("CT", images=3, rows=24, columns=24, seed=43)
    for x, y in zip(a, b):
        assert x.PixelData == y.PixelData
        assert x.SOPInstanceUID == y.SOPInstanceUID
        assert x.PatientName == y.PatientName and x.StudyDate == y.StudyDate
    assert a[0].PixelData != c[0].PixelData
    assert a[0].SOPInstanceUID != c[0].SOPInstanceUID


def test_slices_differ():
    dss = make_study("CT", images=6, rows=64, columns=64, seed=3)
    arrays = [ds.pixel_array.astype(float) for ds in dss]
    means = [a.mean() for a in arrays]
    assert len({round(m, 1) for m in means}) == len(means)
    # Not just noise: the anatomy changes between the first and last slice.
    assert abs(means[0] - means[-1]) > 10


def test_ct_rescale_values_sane():
    ds = make_study("CT", images=5, rows=64, columns=64, seed=5)[2]
    assert float(ds.RescaleIntercept) == -1000 and float(ds.RescaleSlope) == 1
    assert ds.RescaleType == "HU"
    assert float(ds.KVP) > 0 and float(ds.SliceThickness) > 0
    hu = ds.pixel_array.astype(float) * float(ds.RescaleSlope) + float(ds.RescaleIntercept)
    assert hu.min() >= -1100 and hu.max() <= 3095
    assert abs(hu[0, 0] + 1000) < 100  # corner is air
    r, c = ds.Rows // 2, ds.Columns // 2
    assert -200 < np.median(hu[r - 2:r + 3, c - 2:c + 3]) < 200  # centre is soft tissue
    assert ds.pixel_array.max() <= 4095


def test_mr_signed_path():
    dss = make_study("MR", images=3, series=4, rows=32, columns=32, seed=9, pixel_representation=1)
    for ds in dss:
        assert ds.SOPClassUID == MR_IMAGE_STORAGE
        assert ds.PixelRepresentation == 1
        arr = ds.pixel_array
        assert arr.dtype == np.int16
        assert arr.min() >= 0 and arr.max() > 500
        for keyword in ("ScanningSequence", "SequenceVariant", "ScanOptions", "MRAcquisitionType",
                        "RepetitionTime", "EchoTime", "EchoTrainLength", "MagneticFieldStrength",
                        "ImagedNucleus"):
            assert keyword in ds
    assert "InversionTime" in dss[6]  # the FLAIR series
    unsigned = make_study("MR", images=1, rows=8, columns=8, seed=9)[0]
    assert unsigned.PixelRepresentation == 0 and unsigned.pixel_array.dtype == np.uint16
    with pytest.raises(ValueError):
        make_study("CT", images=1, pixel_representation=1)


def test_charset_and_patient():
    p = PatientSpec("P1", "Müller^Jürgen", "19700101", "M")
    ds = make_study("CT", images=1, rows=8, columns=8, patient=p, accession="ACC1")[0]
    assert ds.SpecificCharacterSet == "ISO_IR 100"
    assert (ds.PatientID, str(ds.PatientName), ds.PatientSex, ds.AccessionNumber) == ("P1", "Müller^Jürgen", "M", "ACC1")
    jp = make_study("CT", images=1, rows=8, columns=8, patient=JAPANESE_PATIENT)[0]
    assert jp.SpecificCharacterSet == "ISO_IR 192"


def test_write_and_reread(tmp_path):
    paths = write_study(tmp_path / "s", modality="CT", images=3, rows=16, columns=16, seed=1,
                        transfer_syntax=ImplicitVRLittleEndian)
    assert len(paths) == 3
    for path in paths:
        ds = pydicom.dcmread(path)
        assert path.name == f"{ds.SOPInstanceUID}.dcm"
        assert ds.file_meta.TransferSyntaxUID == ImplicitVRLittleEndian
        assert ds.pixel_array.shape == (16, 16)
        assert str(ds.PatientName)


def test_invalid_arguments():
    with pytest.raises(ValueError):
        make_study("US")
    with pytest.raises(ValueError):
        make_study(transfer_syntax="1.2.840.10008.1.2.4.50")


def test_cli(tmp_path, capsys):
    assert main([str(tmp_path), "--studies", "2", "--images", "3", "--rows", "16", "--columns", "16",
                 "--modality", "MR", "--seed", "7"]) == 0
    files = sorted(tmp_path.glob("*.dcm"))
    assert len(files) == 6
    dss = [pydicom.dcmread(f) for f in files]
    assert len({ds.StudyInstanceUID for ds in dss}) == 2
    assert {ds.Modality for ds in dss} == {"MR"}


@pytest.mark.interop
@pytest.mark.parametrize("modality, extra", [
    ("CT", {}),
    ("MR", {}),
    ("MR", {"pixel_representation": 1, "series": 4, "images": 1}),
    ("CT", {"patient": JAPANESE_PATIENT, "transfer_syntax": ImplicitVRLittleEndian}),
])
def test_dciodvfy_no_errors(tmp_path, modality, extra):
    require_tool(DCIODVFY)
    kwargs = {"images": 2, "rows": 32, "columns": 32, "seed": 11, **extra}
    for path in write_study(tmp_path, modality=modality, **kwargs):
        proc = subprocess.run([DCIODVFY, str(path)], capture_output=True, text=True, timeout=60)
        output = proc.stdout + proc.stderr
        errors = [line for line in output.splitlines() if "Error" in line]
        assert not errors, output
