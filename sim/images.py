"""Generate realistic, synthetic CT and MR series for tests and demos.

The generated instances follow the composite IODs of DICOM PS3.3:

* CT Image IOD (PS3.3 A.3), SOP Class 1.2.840.10008.5.1.4.1.1.2
* MR Image IOD (PS3.3 A.4), SOP Class 1.2.840.10008.5.1.4.1.1.4

Each dataset carries the Patient (C.7.1.1), General Study (C.7.2.1),
Patient Study (C.7.2.2), General Series (C.7.3.1), Frame of Reference
(C.7.4.1), General Equipment (C.7.5.1), General Acquisition (C.7.10.1),
General Image (C.7.6.1), Image Plane (C.7.6.2), Image Pixel (C.7.6.3),
CT Image (C.8.2.1) or MR Image (C.8.3.1), VOI LUT (C.11.2) and SOP Common
(C.12.1) modules, plus the File Meta Information of PS3.10 7.1, so that
``ds.save_as(path, enforce_file_format=True)`` writes a conformant Part 10
file.

Pixel data are a simple anatomical phantom (body, fat, lungs, liver,
kidneys, spine, aorta) built from ellipses whose sizes vary along the
slice axis, plus Gaussian noise.  Everything is deterministic for a given
``seed`` (including UIDs and dates); without a seed, UIDs come straight
from :func:`pydicom.uid.generate_uid` and the dates are "now".

Usage::

    python -m sim.images OUT --studies 2 --images 30 --modality MR
"""

from __future__ import annotations

import argparse
import datetime
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.uid import (
    UID,
    ExplicitVRLittleEndian,
    ImplicitVRLittleEndian,
    generate_uid,
)

__all__ = [
    "PatientSpec", "make_study", "write_study", "main",
    "CT_IMAGE_STORAGE", "MR_IMAGE_STORAGE", "PATIENT_NAMES", "JAPANESE_PATIENT",
]

CT_IMAGE_STORAGE = UID("1.2.840.10008.5.1.4.1.1.2")
MR_IMAGE_STORAGE = UID("1.2.840.10008.5.1.4.1.1.4")

#: Image Type (0008,0008), PS3.3 C.8.2.1.1.1 and C.8.3.1.1.1.  Value 3 "M"
#: (magnitude, as scanners commonly write it) is not one of the standard's
#: defined terms for MR, so dciodvfy reports a warning (not an error) for it.
CT_IMAGE_TYPE = ("ORIGINAL", "PRIMARY", "AXIAL")
MR_IMAGE_TYPE = ("ORIGINAL", "PRIMARY", "M")

_SUPPORTED_SYNTAXES = (ExplicitVRLittleEndian, ImplicitVRLittleEndian)

MANUFACTURER = "modality_link sim"
INSTITUTION = "Simulated General Hospital"
REFERRING_PHYSICIANS = ("Lefèvre^Claire^^Dr.", "Okafor^Chidi^^Dr.", "Schröder^Björn^^Dr.", "Patel^Anika^^Dr.")


@dataclass
class PatientSpec:
    """Identity of the simulated patient (Patient Module, PS3.3 C.7.1.1).

    ``patient_name`` is a DICOM PN value (``Family^Given^Middle^Prefix^Suffix``,
    optionally with ideographic/phonetic groups separated by ``=``).
    ``birth_date`` is a DA value (``YYYYMMDD``) or empty; ``sex`` is
    ``M``, ``F`` or ``O``.
    """

    patient_id: str
    patient_name: str
    birth_date: str = ""
    sex: str = "O"


#: Patients picked at random when :func:`make_study` gets no ``patient``.
#: All names are representable in ISO 8859-1 (``ISO_IR 100``).
PATIENT_NAMES: tuple[tuple[str, str], ...] = (
    ("Müller^Jürgen", "M"),
    ("Lefèvre^Amélie", "F"),
    ("García Núñez^José^Luis", "M"),
    ("Østergaard^Søren", "M"),
    ("Johansson^Åsa", "F"),
    ("Schäfer^Anna^Maria", "F"),
    ("Dubois^François", "M"),
    ("O'Brien^Siobhan", "F"),
    ("Rossi^Giulia", "F"),
    ("Smith^John^Robert", "M"),
    ("Nguyen^Thi Mai", "F"),
    ("Kowalski^Piotr", "M"),
    ("Gonçalves^João", "M"),
    ("Doe^Jane", "F"),
)

#: An example patient with a Japanese name (needs ``ISO_IR 192``).
JAPANESE_PATIENT = PatientSpec("JP000123", "Yamada^Tarou=山田^太郎=やまだ^たろう", "19650412", "M")


# --------------------------------------------------------------------------
# Acquisition protocols
# --------------------------------------------------------------------------

# Phantom components, painted in this order (later ones on top).  Geometry
# is in mm in the patient's axial plane (x to the patient's left, y
# posterior), ``t`` is the relative slice position 0..1 (head to feet).
_COMPONENTS = (
    # name,      cx,    cy,    a,     b
    ("fat",       0.0,   5.0, 170.0, 120.0),
    ("muscle",    0.0,   5.0, 158.0, 108.0),
    ("lung_r",  -70.0,  -5.0,  58.0,  75.0),
    ("lung_l",   72.0,  -5.0,  52.0,  72.0),
    ("liver",   -55.0,  -5.0,  80.0,  60.0),
    ("kidney_r", -62.0,  58.0,  22.0,  32.0),
    ("kidney_l",  62.0,  58.0,  22.0,  32.0),
    ("aorta",   -12.0,  45.0,  12.0,  12.0),
    ("spine",     0.0,  72.0,  20.0,  17.0),
    ("marrow",    0.0,  72.0,  14.0,  11.0),
    ("canal",     0.0,  96.0,   8.0,   8.0),
)

# CT numbers in HU, per component (index 0 is air outside the body).
_CT_HU: dict[str, float] = {"air": -1000, "fat": -100, "muscle": 45, "lung_r": -850, "lung_l": -850, "liver": 60,
          "kidney_r": 150, "kidney_l": 150, "aorta": 250, "spine": 900, "marrow": 250, "canal": 15}


@dataclass(frozen=True)
class _CTProtocol:
    description: str
    kernel: str
    slice_thickness: float
    kvp: float = 120.0
    tube_current: int = 200
    body_part: str = "CHEST"
    window: tuple[float, float] = (40.0, 400.0)


@dataclass(frozen=True)
class _MRProtocol:
    """One MR sequence (MR Image Module, PS3.3 C.8.3.1)."""

    description: str
    scanning_sequence: tuple[str, ...]
    sequence_variant: tuple[str, ...]
    scan_options: tuple[str, ...]
    acquisition_type: str
    repetition_time: float
    echo_time: float
    echo_train_length: int
    flip_angle: float
    signal: dict[str, float] = field(default_factory=dict)
    inversion_time: float | None = None
    slice_thickness: float = 5.0
    body_part: str = "ABDOMEN"


_CT_PROTOCOLS = (
    _CTProtocol("Thorax-Abdomen 5.0 mm", "STANDARD", 5.0),
    _CTProtocol("Thorax-Abdomen 1.25 mm bone", "BONE", 1.25, window=(500.0, 2000.0)),
    _CTProtocol("Lung 2.5 mm", "LUNG", 2.5, window=(-600.0, 1500.0)),
)

_T1: dict[str, float] = {"air": 0, "fat": 1500, "muscle": 600, "lung_r": 40, "lung_l": 40, "liver": 800,
       "kidney_r": 700, "kidney_l": 700, "aorta": 150, "spine": 60, "marrow": 1300, "canal": 300}
_T2: dict[str, float] = {"air": 0, "fat": 1100, "muscle": 400, "lung_r": 30, "lung_l": 30, "liver": 350,
       "kidney_r": 1200, "kidney_l": 1200, "aorta": 100, "spine": 50, "marrow": 700, "canal": 2200}
_FLAIR: dict[str, float] = {**_T2, "canal": 150, "fat": 900}

_MR_PROTOCOLS = (
    _MRProtocol("t1_se_tra", ("SE",), ("SK",), ("SP",), "2D", 550.0, 12.0, 1, 90.0, _T1),
    _MRProtocol("t2_tse_tra", ("SE",), ("SK", "SP"), ("FS",), "2D", 4200.0, 96.0, 15, 150.0, _T2),
    _MRProtocol("flair_tra", ("IR", "SE"), ("SK", "SP", "MP"), ("SP",), "2D", 9000.0, 110.0, 17, 150.0,
                _FLAIR, inversion_time=2500.0),
    _MRProtocol("t1_vibe_3d", ("GR",), ("SP",), ("PFP",), "3D", 4.5, 2.1, 1, 10.0, _T1, slice_thickness=2.0),
)


# --------------------------------------------------------------------------
# Pixel phantom
# --------------------------------------------------------------------------


class _Phantom:
    """Precomputed ellipse distance fields; slices are cheap thresholds.

    For each component the normalised squared radius
    ``((x - cx) / a)**2 + ((y - cy) / b)**2`` is computed once; a slice
    paints the pixels where it is below ``scale(t)**2``, which grows or
    shrinks each ellipse about its centre along the slice axis.
    """

    def __init__(self, rows: int, columns: int, spacing: float) -> None:
        y = (np.arange(rows, dtype=np.float32) - (rows - 1) / 2) * spacing
        x = (np.arange(columns, dtype=np.float32) - (columns - 1) / 2) * spacing
        self.shape = (rows, columns)
        self.radii = [
            ((x[None, :] - cx) / a) ** 2 + ((y[:, None] - cy) / b) ** 2
            for _, cx, cy, a, b in _COMPONENTS
        ]

    @staticmethod
    def scales(t: float) -> list[float]:
        """Per-component scale factor at relative slice position ``t``."""

        def bump(centre: float, half_width: float) -> float:
            d = (t - centre) / half_width
            return float(np.sqrt(max(0.0, 1.0 - d * d)))

        body = 1.0 + 0.06 * np.sin(2 * np.pi * t)
        lung = bump(0.15, 0.45)
        return [
            body, body,                      # fat, muscle
            lung, lung * 0.95,               # lungs
            bump(0.55, 0.35),                # liver
            bump(0.75, 0.2), bump(0.78, 0.2),  # kidneys
            1.0,                             # aorta
            1.0 + 0.05 * np.cos(9 * t), 1.0 + 0.05 * np.cos(9 * t), 1.0,  # spine
        ]

    def labels(self, t: float) -> np.ndarray:
        """Label image (0 = air, k = component k) at slice position ``t``."""
        label = np.zeros(self.shape, dtype=np.uint8)
        for k, (r2, s) in enumerate(zip(self.radii, self.scales(t)), start=1):
            if s > 0:
                label[r2 < s * s] = k
        return label


def _lut(values: dict[str, float]) -> np.ndarray:
    return np.array([values["air"]] + [values[c[0]] for c in _COMPONENTS], dtype=np.float32)


# --------------------------------------------------------------------------
# Datasets
# --------------------------------------------------------------------------


class _UIDs:
    """UID source: random, or deterministic (still from generate_uid) when seeded."""

    def __init__(self, rng: np.random.Generator | None) -> None:
        self._rng = rng

    def __call__(self) -> UID:
        if self._rng is None:
            return generate_uid()
        return generate_uid(entropy_srcs=[self._rng.bytes(16).hex()])


def _charset(*names: str) -> str:
    """Specific Character Set (PS3.3 C.12.1.1.2) able to encode ``names``."""
    try:
        for name in names:
            name.encode("latin_1")
    except UnicodeEncodeError:
        return "ISO_IR 192"
    return "ISO_IR 100"


def _age(birth_date: str, on: datetime.date) -> str:
    """Patient's Age (AS) on date ``on``, or "" if the birth date is unknown."""
    try:
        born = datetime.datetime.strptime(birth_date, "%Y%m%d").date()
    except ValueError:
        return ""
    years = on.year - born.year - ((on.month, on.day) < (born.month, born.day))
    return f"{max(years, 0):03d}Y"


def _random_patient(rng: np.random.Generator) -> PatientSpec:
    name, sex = PATIENT_NAMES[int(rng.integers(len(PATIENT_NAMES)))]
    born = datetime.date(1935, 1, 1) + datetime.timedelta(days=int(rng.integers(0, 365 * 70)))
    return PatientSpec(f"SIM{int(rng.integers(10**6, 10**7))}", name, born.strftime("%Y%m%d"), sex)


def _ds(value: float) -> str:
    """Format a number as a DS value (max. 16 characters)."""
    return f"{value:.10g}"


def make_study(
    modality: str = "CT",
    images: int = 10,
    series: int = 1,
    patient: PatientSpec | None = None,
    rows: int = 64,
    columns: int = 64,
    seed: int | None = None,
    study_uid: str | None = None,
    accession: str = "",
    transfer_syntax: str = ExplicitVRLittleEndian,
    *,
    pixel_representation: int | None = None,
) -> list[Dataset]:
    """Return the instances of one simulated study.

    Parameters
    ----------
    modality : str
        ``"CT"`` (CT Image IOD, PS3.3 A.3) or ``"MR"`` (MR Image IOD, A.4).
    images : int
        Number of images (slices) *per series*.
    series : int
        Number of series; each uses the next acquisition protocol (CT
        reconstructions, MR sequences) and shares the study's Frame of
        Reference.
    patient : PatientSpec, optional
        The patient; a random one from :data:`PATIENT_NAMES` if omitted.
    rows, columns : int
        Image matrix.
    seed : int, optional
        Makes pixels, patient, dates and UIDs reproducible.
    study_uid : str, optional
        Study Instance UID to use instead of a new one.
    accession : str
        Accession Number (Type 2, may be empty).
    transfer_syntax : str
        Explicit (default) or Implicit VR Little Endian.
    pixel_representation : int, optional
        0 (unsigned) or 1 (two's complement); default 0.  Only MR may be signed
        (16 bits stored); CT always uses unsigned 12-bit storage with
        Rescale Intercept -1000.

    Returns
    -------
    list of pydicom.dataset.Dataset
        ``images * series`` datasets ordered by series then Instance
        Number, each with ``file_meta`` set.
    """
    modality = modality.upper()
    if modality not in ("CT", "MR"):
        raise ValueError(f"unsupported modality {modality!r} (use 'CT' or 'MR')")
    if transfer_syntax not in _SUPPORTED_SYNTAXES:
        raise ValueError(f"unsupported transfer syntax {transfer_syntax!r}")
    if images < 1 or series < 1 or rows < 1 or columns < 1:
        raise ValueError("images, series, rows and columns must be positive")
    if pixel_representation is None:
        pixel_representation = 0
    if pixel_representation not in (0, 1) or (modality == "CT" and pixel_representation != 0):
        raise ValueError("pixel_representation must be 0, or 1 for MR")

    rng = np.random.default_rng(seed)
    new_uid = _UIDs(rng if seed is not None else None)
    if patient is None:
        patient = _random_patient(rng)
    if seed is None:
        start = datetime.datetime.now().replace(microsecond=0)
    else:
        start = datetime.datetime(2024, 1, 1, 8) + datetime.timedelta(
            days=int(rng.integers(0, 366)), seconds=int(rng.integers(0, 9 * 3600)))
    referring = REFERRING_PHYSICIANS[int(rng.integers(len(REFERRING_PHYSICIANS)))]

    # Study level: Patient, General Study, Patient Study modules.
    study = Dataset()
    study.SpecificCharacterSet = _charset(patient.patient_name, referring)
    study.PatientName = patient.patient_name
    study.PatientID = patient.patient_id
    study.PatientBirthDate = patient.birth_date
    study.PatientSex = patient.sex
    study.StudyInstanceUID = study_uid or new_uid()
    study.StudyDate = start.strftime("%Y%m%d")
    study.StudyTime = start.strftime("%H%M%S")
    study.ReferringPhysicianName = referring
    study.StudyID = str(int(rng.integers(1000, 100000)))
    study.AccessionNumber = accession
    study.StudyDescription = "CT Thorax-Abdomen" if modality == "CT" else "MR Abdomen"
    age = _age(patient.birth_date, start.date())
    if age:
        study.PatientAge = age
    frame_of_reference = new_uid()

    fov = 400.0 if modality == "CT" else 380.0
    spacing = fov / max(rows, columns)
    phantom = _Phantom(rows, columns, spacing)
    out: list[Dataset] = []
    proto: _CTProtocol | _MRProtocol
    for s in range(series):
        series_time = start + datetime.timedelta(minutes=3 * s)
        if modality == "CT":
            proto = _CT_PROTOCOLS[s % len(_CT_PROTOCOLS)]
            lut, noise, window = _lut(_CT_HU) + 1000.0, 12.0, proto.window
        else:
            proto = _MR_PROTOCOLS[s % len(_MR_PROTOCOLS)]
            lut, noise = _lut(proto.signal), 25.0
            window = (800.0, 1800.0)
        series_ds = _series(study, modality, proto, s + 1, new_uid(), frame_of_reference, series_time)
        for i in range(images):
            t = i / (images - 1) if images > 1 else 0.5
            values = lut[phantom.labels(t)]
            values += rng.standard_normal(values.shape, dtype=np.float32) * noise
            if modality == "MR":
                np.abs(values, out=values)  # magnitude images: Rician-like noise floor
            pixels = np.clip(np.rint(values), 0, 4095)
            ds = _image(series_ds, modality, proto, i, rows, columns, spacing, pixels,
                        pixel_representation, window,
                        series_time + datetime.timedelta(seconds=i), new_uid())
            ds.file_meta = _file_meta(ds, transfer_syntax)
            out.append(ds)
    return out


def _series(study: Dataset, modality: str, proto: _CTProtocol | _MRProtocol, number: int,
            uid: UID, frame_of_reference: UID, when: datetime.datetime) -> Dataset:
    """General Series, Frame of Reference and General Equipment modules."""
    ds = Dataset()
    ds.update(study)
    ds.Modality = modality
    ds.SeriesInstanceUID = uid
    ds.SeriesNumber = number
    ds.SeriesDate = when.strftime("%Y%m%d")
    ds.SeriesTime = when.strftime("%H%M%S")
    ds.SeriesDescription = proto.description
    ds.BodyPartExamined = proto.body_part
    ds.PatientPosition = "HFS"
    ds.FrameOfReferenceUID = frame_of_reference
    ds.PositionReferenceIndicator = ""
    ds.Manufacturer = MANUFACTURER
    ds.InstitutionName = INSTITUTION
    ds.StationName = f"SIM{modality}01"
    ds.ManufacturerModelName = f"SimScan {modality}"
    ds.DeviceSerialNumber = "0001"
    ds.SoftwareVersions = "1.0"
    return ds


def _image(series: Dataset, modality: str, proto: _CTProtocol | _MRProtocol, index: int,
           rows: int, columns: int, spacing: float, pixels: np.ndarray,
           pixel_representation: int, window: tuple[float, float],
           when: datetime.datetime, uid: UID) -> Dataset:
    """General Image, Image Plane, Image Pixel, CT/MR Image, VOI LUT, SOP Common."""
    ds = Dataset()
    ds.update(series)
    sop_class = CT_IMAGE_STORAGE if modality == "CT" else MR_IMAGE_STORAGE
    ds.SOPClassUID = sop_class
    ds.SOPInstanceUID = uid
    ds.InstanceCreationDate = when.strftime("%Y%m%d")
    ds.InstanceCreationTime = when.strftime("%H%M%S")
    # General Acquisition / General Image
    ds.AcquisitionNumber = 1
    ds.AcquisitionDate = ds.ContentDate = when.strftime("%Y%m%d")
    ds.AcquisitionTime = ds.ContentTime = when.strftime("%H%M%S")
    ds.InstanceNumber = index + 1
    ds.ImageType = list(CT_IMAGE_TYPE if modality == "CT" else MR_IMAGE_TYPE)
    ds.BurnedInAnnotation = "NO"
    # Image Plane: axial slices, head to feet (z decreasing).
    z = -index * proto.slice_thickness
    ds.PixelSpacing = [_ds(spacing), _ds(spacing)]
    ds.ImageOrientationPatient = [1, 0, 0, 0, 1, 0]
    ds.ImagePositionPatient = [_ds(-(columns - 1) / 2 * spacing), _ds(-(rows - 1) / 2 * spacing), _ds(z)]
    ds.SliceThickness = _ds(proto.slice_thickness)
    ds.SliceLocation = _ds(z)
    # Image Pixel
    ds.SamplesPerPixel = 1
    ds.PhotometricInterpretation = "MONOCHROME2"
    ds.Rows = rows
    ds.Columns = columns
    ds.BitsAllocated = 16
    # Unsigned: 12 bits stored (0..4095); signed: 16 bits so 0..4095 stays positive.
    ds.BitsStored = 16 if pixel_representation else 12
    ds.HighBit = ds.BitsStored - 1
    ds.PixelRepresentation = pixel_representation
    dtype = "<i2" if pixel_representation else "<u2"
    ds.add_new(0x7FE00010, "OW", pixels.astype(dtype).tobytes())
    # VOI LUT
    ds.WindowCenter = _ds(window[0])
    ds.WindowWidth = _ds(window[1])
    if modality == "CT":
        assert isinstance(proto, _CTProtocol)
        ds.RescaleIntercept = "-1000"
        ds.RescaleSlope = "1"
        ds.RescaleType = "HU"
        ds.KVP = _ds(proto.kvp)
        ds.XRayTubeCurrent = proto.tube_current
        ds.ExposureTime = 500
        ds.ConvolutionKernel = proto.kernel
        ds.DataCollectionDiameter = "500"
        ds.ReconstructionDiameter = _ds(spacing * max(rows, columns))
        ds.GantryDetectorTilt = "0"
        ds.TableHeight = "150"
        ds.RotationDirection = "CW"
        ds.ScanOptions = "HELICAL MODE"
    else:
        assert isinstance(proto, _MRProtocol)
        ds.ScanningSequence = list(proto.scanning_sequence)
        ds.SequenceVariant = list(proto.sequence_variant)
        ds.ScanOptions = list(proto.scan_options)
        ds.MRAcquisitionType = proto.acquisition_type
        ds.SequenceName = proto.description
        ds.RepetitionTime = _ds(proto.repetition_time)
        ds.EchoTime = _ds(proto.echo_time)
        if proto.inversion_time is not None:
            ds.InversionTime = _ds(proto.inversion_time)
        ds.EchoTrainLength = proto.echo_train_length
        ds.FlipAngle = _ds(proto.flip_angle)
        ds.NumberOfAverages = "1"
        ds.ImagingFrequency = "63.8976"
        ds.ImagedNucleus = "1H"
        ds.MagneticFieldStrength = "1.5"
        ds.SpacingBetweenSlices = _ds(proto.slice_thickness)
        ds.PixelBandwidth = "200"
    return ds


def _file_meta(ds: Dataset, transfer_syntax: str) -> FileMetaDataset:
    """File Meta Information (PS3.10 7.1); pydicom adds the rest on write."""
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = ds.SOPClassUID
    meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
    meta.TransferSyntaxUID = UID(transfer_syntax)
    return meta


def write_study(out_dir: Path, **kwargs) -> list[Path]:
    """Write :func:`make_study` ``(**kwargs)`` to ``out_dir/<SOPInstanceUID>.dcm``."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    paths = []
    for ds in make_study(**kwargs):
        path = out_dir / f"{ds.SOPInstanceUID}.dcm"
        ds.save_as(path, enforce_file_format=True)
        paths.append(path)
    return paths


def main(argv: list[str] | None = None) -> int:
    """Command line: write ``--studies`` simulated studies into ``OUT``."""
    parser = argparse.ArgumentParser(prog="python -m sim.images", description=__doc__.splitlines()[0])
    parser.add_argument("out", type=Path, metavar="OUT", help="output directory")
    parser.add_argument("--studies", type=int, default=1, metavar="N")
    parser.add_argument("--images", type=int, default=10, metavar="M", help="images per series")
    parser.add_argument("--series", type=int, default=1, metavar="S")
    parser.add_argument("--modality", choices=("CT", "MR"), type=str.upper, default="CT")
    parser.add_argument("--rows", type=int, help="default 512 (CT) or 256 (MR)")
    parser.add_argument("--columns", type=int, help="default 512 (CT) or 256 (MR)")
    parser.add_argument("--seed", type=int, help="make the output reproducible")
    parser.add_argument("--implicit", action="store_true", help="Implicit VR Little Endian")
    args = parser.parse_args(argv)
    if min(args.studies, args.images, args.series) < 1:
        parser.error("--studies, --images and --series must be positive")

    size = 512 if args.modality == "CT" else 256
    seeds: list[int | None] = [None] * args.studies
    if args.seed is not None:
        seeds = [int(s) for s in np.random.default_rng(args.seed).integers(0, 2**62, args.studies)]
    total = 0
    for seed in seeds:
        paths = write_study(
            args.out, modality=args.modality, images=args.images, series=args.series,
            rows=args.rows or size, columns=args.columns or size, seed=seed,
            transfer_syntax=ImplicitVRLittleEndian if args.implicit else ExplicitVRLittleEndian)
        total += len(paths)
    print(f"wrote {total} files in {args.studies} studies to {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
