"""DICOM files for the tests: small synthetic CT/MR instances made here (for the media tests,
independent of sim/), simulated studies from sim.images, and the data set bytes of a file."""

from __future__ import annotations

import shutil
import tempfile
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Iterator

import numpy as np
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.encaps import encapsulate
from pydicom.uid import (
    CTImageStorage,
    ExplicitVRBigEndian,
    ExplicitVRLittleEndian,
    ImplicitVRLittleEndian,
    JPEGBaseline8Bit,
    MRImageStorage,
    RLELossless,
    generate_uid,
)

SOP_CLASSES = {"CT": CTImageStorage, "MR": MRImageStorage}


def make_instance(
    path: Path,
    *,
    modality: str = "CT",
    patient_id: str = "PID001",
    patient_name: str = "DOE^JANE",
    study_uid: str,
    series_uid: str,
    series_number: int = 1,
    instance_number: int = 1,
    transfer_syntax: str = ExplicitVRLittleEndian,
    rows: int = 32,
    columns: int = 32,
    seed: int = 0,
    sop_class: str | None = None,
) -> Path:
    """Write one 16-bit monochrome image with random pixels to `path`."""
    ds = Dataset()
    ds.SpecificCharacterSet = "ISO_IR 100"
    ds.SOPClassUID = sop_class or SOP_CLASSES[modality]
    ds.SOPInstanceUID = generate_uid()
    ds.ImageType = ["ORIGINAL", "PRIMARY", "AXIAL"]
    ds.StudyDate = "20240102"
    ds.StudyTime = "101500"
    ds.AccessionNumber = "ACC123"
    ds.Modality = modality
    ds.Manufacturer = "modality_link tests"
    ds.StudyDescription = f"Test study {patient_id}"
    ds.SeriesDescription = f"{modality} series {series_number}"
    ds.PatientName = patient_name
    ds.PatientID = patient_id
    ds.PatientBirthDate = "19700101"
    ds.PatientSex = "F"
    ds.StudyInstanceUID = study_uid
    ds.SeriesInstanceUID = series_uid
    ds.StudyID = "1"
    ds.SeriesNumber = series_number
    ds.InstanceNumber = instance_number
    ds.ImagePositionPatient = [0.0, 0.0, float(instance_number)]
    ds.ImageOrientationPatient = [1.0, 0.0, 0.0, 0.0, 1.0, 0.0]
    ds.FrameOfReferenceUID = generate_uid()
    ds.SamplesPerPixel = 1
    ds.PhotometricInterpretation = "MONOCHROME2"
    ds.Rows = rows
    ds.Columns = columns
    ds.PixelSpacing = [0.5, 0.5]
    ds.BitsAllocated = 16
    ds.BitsStored = 12
    ds.HighBit = 11
    ds.PixelRepresentation = 0
    ds.add_new(0x00090010, "LO", "MODLINK TEST")  # a private block, never copied to DICOMDIR
    ds.add_new(0x00091001, "LO", "private value")
    rng = np.random.default_rng(seed)
    arr = rng.integers(0, 4096, size=(rows, columns), dtype=np.uint16)
    ds.file_meta = FileMetaDataset()
    ds.file_meta.MediaStorageSOPClassUID = ds.SOPClassUID
    ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
    ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian if transfer_syntax == RLELossless else transfer_syntax
    ds.file_meta.ImplementationClassUID = "1.2.3.4"
    if transfer_syntax == ExplicitVRBigEndian:
        ds.PixelData = arr.astype(">u2").tobytes()
        ds["PixelData"].VR = "OW"
    elif transfer_syntax == RLELossless:
        ds.PixelData = arr.tobytes()
        ds["PixelData"].VR = "OW"
        ds.compress(RLELossless, generate_instance_uid=False)
    elif transfer_syntax == JPEGBaseline8Bit:
        ds.BitsAllocated = 8
        ds.BitsStored = 8
        ds.HighBit = 7
        ds.PixelData = encapsulate([b"\xff\xd8 not really a JPEG \xff\xd9"])
        ds["PixelData"].VR = "OB"
    else:
        ds.PixelData = arr.tobytes()
        ds["PixelData"].VR = "OW"
    path.parent.mkdir(parents=True, exist_ok=True)
    ds.save_as(path, enforce_file_format=True)
    return path


def make_series(
    directory: Path, count: int, *, modality: str = "CT", study_uid: str | None = None, series_number: int = 1,
    patient_id: str = "PID001", patient_name: str = "DOE^JANE", transfer_syntax: str = ExplicitVRLittleEndian,
    rows: int = 32, columns: int = 32,
) -> list[Path]:
    """Write `count` instances of one new series into `directory`."""
    study_uid = study_uid or generate_uid()
    series_uid = generate_uid()
    return [
        make_instance(
            directory / f"{modality}_{series_uid[-8:]}_{i:05d}.dcm", modality=modality, patient_id=patient_id,
            patient_name=patient_name, study_uid=study_uid, series_uid=series_uid, series_number=series_number,
            instance_number=i, transfer_syntax=transfer_syntax, rows=rows, columns=columns, seed=i,
        )
        for i in range(1, count + 1)
    ]


def spool_images(folder: Path, count: int = 3, seed: int = 1) -> list[str]:
    """`count` simulated CT images (sim.images) written to `folder`, as the acquisition spools them."""
    from sim import images

    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    for i, ds in enumerate(images.make_study("CT", images=count, seed=seed)):
        p = folder / f"img{i}.dcm"
        ds.save_as(p, enforce_file_format=True)
        paths.append(str(p))
    return paths


@contextmanager
def generated_study(**kw: Any) -> Iterator[Path]:
    """A temporary folder holding a study from :func:`sim.images.write_study` (its keywords)."""
    from sim import images

    d = Path(tempfile.mkdtemp(prefix="mlimg"))
    try:
        images.write_study(d, **kw)
        yield d
    finally:
        shutil.rmtree(d, ignore_errors=True)


def dataset_bytes(path: Path) -> bytes:
    """The bytes of a PS3.10 file after its File Meta group."""
    data = path.read_bytes()
    assert data[128:132] == b"DICM"
    group_length = int.from_bytes(data[140:144], "little")
    return data[144 + group_length:]


__all__ = [
    "ExplicitVRBigEndian", "ExplicitVRLittleEndian", "ImplicitVRLittleEndian", "JPEGBaseline8Bit",
    "RLELossless", "dataset_bytes", "generated_study", "make_instance", "make_series", "spool_images",
]
