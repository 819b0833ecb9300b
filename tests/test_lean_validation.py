"""The lean check of a received file (archive.lean_record over media.header.read_dataset) gives
the same index row as pydicom's full read, or leaves the file to it: never accepts what pydicom
refuses, never indexes other text."""

from __future__ import annotations

import dataclasses
import os
import random
import warnings
from pathlib import Path

import pydicom
import pytest
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.uid import ExplicitVRLittleEndian, ImplicitVRLittleEndian

from modality_link.archive import ArchiveError, CannotUnderstand, lean_record, pydicom_record, validate_received
from sim import images

_DATA = Path(pydicom.__file__).parent / "data"
CORPUS = sorted([*(_DATA / "test_files").rglob("*.dcm"), *(_DATA / "charset_files").glob("*.dcm")])


def _row(rec) -> dict:
    row = dataclasses.asdict(rec)
    row.pop("received_at")
    return row


@pytest.mark.parametrize("path", CORPUS, ids=lambda p: p.name)
def test_lean_record_is_pydicoms_or_none(path: Path) -> None:
    lean = lean_record(str(path), "CT1")
    try:
        reference = pydicom_record(str(path), "CT1")
    except ArchiveError as exc:
        assert lean is None, f"the lean check accepts what pydicom refuses: {exc}"
        return
    if lean is not None:
        assert _row(lean) == _row(reference)


@pytest.mark.parametrize("path", CORPUS, ids=lambda p: p.name)
def test_bytes_validate_as_their_file(path: Path) -> None:
    """The memory server validates the bytes it received, the disk server the file it wrote:
    the same row, or the same refusal."""
    data = path.read_bytes()
    lean = lean_record(data, "CT1")
    assert (lean is None) == (lean_record(str(path), "CT1") is None)
    try:
        reference = validate_received(str(path), "CT1")
    except ArchiveError as exc:
        with pytest.raises(ArchiveError) as refused:
            validate_received(data, "CT1")
        assert refused.value.status == exc.status and str(refused.value)  # pydicom's wording may differ
        return
    assert _row(validate_received(data, "CT1")) == _row(reference)


def test_lean_record_reads_most_little_endian_files() -> None:
    """The fast path is taken for regular files (else it would be dead code that passes)."""
    names = {p.name for p in CORPUS if lean_record(str(p), "") is not None}
    for name in ("CT_small.dcm", "MR_small.dcm", "JPEG2000.dcm", "SC_rgb_rle.dcm", "MR_small_implicit.dcm",
                 "test-SR.dcm", "chrH31.dcm", "chrX1.dcm"):
        assert name in names, name
    assert len(names) >= 50, len(names)


@pytest.mark.parametrize("ts", [ExplicitVRLittleEndian, ImplicitVRLittleEndian])
def test_lean_record_of_generated_ct(tmp_path: Path, ts) -> None:
    (path,) = images.write_study(tmp_path / "ct", modality="CT", images=1, rows=64, columns=64, seed=3)
    ds = pydicom.dcmread(path)
    ds.file_meta.TransferSyntaxUID = ts
    ds.save_as(path, enforce_file_format=True)
    lean = lean_record(str(path), "CT1")
    assert lean is not None
    assert _row(lean) == _row(pydicom_record(str(path), "CT1"))


def _named(path: Path, name: bytes, charset: bytes | None, comment: bytes = b"") -> Path:
    """An Explicit VR file whose PatientName is `name` (raw), declared `charset`, with an
    Image Comments (LT) holding `comment`: the character set guess looks at every text value."""
    ds = Dataset()
    if charset is not None:
        ds.add_new(0x00080005, "CS", charset)
    ds.add_new(0x00080016, "UI", "1.2.840.10008.5.1.4.1.1.7")
    ds.add_new(0x00080018, "UI", "1.2.3.4")
    ds.add_new(0x00100010, "PN", name)
    ds.add_new(0x0020000D, "UI", "1.2.3")
    ds.add_new(0x0020000E, "UI", "1.2.3.1")
    ds.add_new(0x00204000, "LT", comment)
    ds.file_meta = FileMetaDataset()
    ds.file_meta.MediaStorageSOPClassUID = ds[0x00080016].value
    ds.file_meta.MediaStorageSOPInstanceUID = ds[0x00080018].value
    ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds.save_as(path, enforce_file_format=True)
    return path


@pytest.mark.parametrize("name, charset, comment, expected", [
    ("Müller".encode("latin-1"), None, b"", "Müller"),
    ("Müller".encode("utf-8"), None, b"", "Müller"),
    (b"Mueller", None, "é".encode("utf-8"), "Mueller"),
    (b"YAMADA^TARO", b"ISO_IR 100", b"\x1b$B;3\x1b(B", "YAMADA^TARO"),
    ("Müller".encode("latin-1"), b"ISO_IR100", b"", "Müller"),
])
def test_lean_record_charset_like_pydicom(tmp_path: Path, name, charset, comment, expected) -> None:
    path = _named(tmp_path / "a.dcm", name, charset, comment)
    lean = lean_record(str(path), "")
    assert lean is not None
    assert lean.patient_name == expected
    assert _row(lean) == _row(pydicom_record(str(path), ""))


def test_lean_record_leaves_broken_files_to_pydicom(tmp_path: Path) -> None:
    good = _named(tmp_path / "good.dcm", b"DOE^J", None)
    data = good.read_bytes()
    assert lean_record(str(good), "") is not None
    # also a File Meta cut in the middle of an element, a Transfer Syntax UID that is none
    ts = data.index(b"1.2.840.10008.1.2.1\x00")
    for what, broken in (("truncated", data[:-3]), ("trailing", data + b"\x00\x00\x00\x00"),
                         ("cut header", data[:-7]), ("cut meta", data[:ts - 6]),
                         ("no transfer syntax", data[:ts] + b"1.2.840.10008.1.1.1\x00" + data[ts + 20:])):
        path = tmp_path / f"{what}.dcm"
        path.write_bytes(broken)
        assert lean_record(str(path), "") is None, what
        with pytest.raises(CannotUnderstand):
            validate_received(str(path), "")
    # a SOP Instance UID that differs from the File Meta's: refused with pydicom's message
    at = data.rindex(b"1.2.3.4")
    (tmp_path / "other.dcm").write_bytes(data[:at] + b"1.2.3.5" + data[at + 7:])
    assert lean_record(str(tmp_path / "other.dcm"), "") is None
    with pytest.raises(ArchiveError, match="differs from the File Meta"):
        validate_received(str(tmp_path / "other.dcm"), "")
    assert os.path.exists(good)


def test_lean_record_on_damaged_files(tmp_path: Path) -> None:
    """Random damage (bytes changed, cut out, inserted, the file cut short) to regular files: the
    walk never raises, and what it accepts pydicom accepts with the same row. 600 files, fixed seed."""
    rng = random.Random(11)
    sources = [p.read_bytes() for p in CORPUS if p.name in ("CT_small.dcm", "MR_small_implicit.dcm",
                                                            "JPEG2000.dcm", "test-SR.dcm", "chrH31.dcm")]
    accepted = 0
    for n in range(600):
        data = bytearray(rng.choice(sources))
        for _ in range(rng.randint(1, 4)):
            if len(data) < 200:
                break
            at = rng.randrange(132, min(len(data), 3000) if rng.random() < 0.8 else len(data))
            what = rng.random()
            if what < 0.5:
                data[at] = rng.randrange(256)
            elif what < 0.7:
                del data[at:at + rng.randint(1, 8)]
            elif what < 0.85:
                data[at:at] = bytes(rng.randrange(256) for _ in range(rng.randint(1, 8)))
            else:
                del data[at:]
        path = tmp_path / f"{n}.dcm"
        path.write_bytes(data)
        lean = lean_record(str(path), "")
        if lean is None:
            continue
        accepted += 1
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            assert _row(lean) == _row(pydicom_record(str(path), "")), n
    assert accepted > 30  # damage in values that no one checks (pixels, unindexed text) is accepted


@pytest.mark.parametrize("vr", ["AE", "AS", "CS", "DA", "DT", "TM", "UI", "ST", "LT", "UT", "PN", "SH", "LO", "UC",
                                "IS", "DS"])
@pytest.mark.parametrize("charset", [["ISO_IR 100"], ["ISO_IR 192"], ["ISO 2022 IR 6", "ISO 2022 IR 87"],
                                     ["ISO_IR 13"], ["GB18030"]])
def test_ascii_values_read_as_pydicom_reads_them(vr: str, charset: list[str]) -> None:
    """The index's reading of ASCII text without pydicom (archive._ascii_read) gives pydicom's
    value, padding, backslashes, NULs and PN component groups included; what it cannot read the
    same way it leaves to pydicom."""
    from modality_link.archive import _ascii_read
    from modality_link.fileformat import encode_element
    from modality_link.media.header import Header
    from modality_link.net.charset import decode_values, text_of

    rng = random.Random(f"{vr}{charset}")
    alphabet = "AB z09^=\\ \x00.-_/+:"
    tag = 0x00100010
    for _ in range(400):
        raw = "".join(rng.choice(alphabet) for _ in range(rng.randint(0, 14))).encode()
        raw += b" " * (len(raw) % 2)
        header = Header(elements={tag: encode_element(tag, vr, raw)})
        fast = _ascii_read(header, tag)
        if fast is None:
            continue
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            assert fast == text_of(decode_values([(tag, vr, raw)], charset)[0]), (vr, raw)
