"""Text decoding in one place (modality_link.net.charset) through pydicom's charset mapping:
the media header reader and the archive index give the same Unicode as pydicom for every file
of pydicom's charset_files, plus absent, misspelled, GBK and undeclared UTF-8/Latin-1 values."""

from __future__ import annotations

import os
from pathlib import Path

import pydicom
import pytest
from pydicom import dcmread
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.uid import ExplicitVRLittleEndian, ImplicitVRLittleEndian, SecondaryCaptureImageStorage, generate_uid

from modality_link.archive import Archive
from modality_link.media.fileset import _HEADER_TAGS
from modality_link.media.header import read_header
from modality_link.net.charset import charset_terms, effective_terms, normalise_term

CHARSET_FILES = sorted((Path(os.path.dirname(pydicom.__file__)) / "data" / "charset_files").glob("*.dcm"))

#: Names as pydicom's own tests spell them (pydicom/tests/test_charset.py).
KNOWN_NAMES = {
    "chrFren.dcm": "Buc^Jérôme",
    "chrGerm.dcm": "Äneas^Rüdiger",
    "chrH31.dcm": "Yamada^Tarou=山田^太郎=やまだ^たろう",
    "chrH32.dcm": "ﾔﾏﾀﾞ^ﾀﾛｳ=山田^太郎=やまだ^たろう",
    "chrI2.dcm": "Hong^Gildong=洪^吉洞=홍^길동",
    "chrX1.dcm": "Wang^XiaoDong=王^小東",
    "chrX2.dcm": "Wang^XiaoDong=王^小东",
    "chrRuss.dcm": "Люкceмбypг",
}


def write_named(path: Path, raw_name: bytes, charset: str | None, transfer_syntax: str = ExplicitVRLittleEndian,
                patient_id: str = "P1") -> Path:
    """A small Secondary Capture whose Patient's Name holds the bytes `raw_name` as they are."""
    ds = Dataset()
    if charset is not None:
        ds.SpecificCharacterSet = charset
    ds.SOPClassUID = SecondaryCaptureImageStorage
    ds.SOPInstanceUID = generate_uid()
    ds.StudyInstanceUID = generate_uid()
    ds.SeriesInstanceUID = generate_uid()
    ds.PatientID = patient_id
    ds.Modality = "OT"
    ds.add_new(0x00100010, "PN", raw_name)  # bytes: written unchanged, whatever the charset
    ds.file_meta = FileMetaDataset()
    ds.file_meta.TransferSyntaxUID = transfer_syntax
    ds.file_meta.MediaStorageSOPClassUID = ds.SOPClassUID
    ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
    ds.save_as(path, enforce_file_format=True)
    return path


#: (Specific Character Set as written, Patient's Name bytes, expected Unicode name)
WRITTEN = [
    (None, b"DOE^JOHN", "DOE^JOHN"),  # default repertoire
    (None, "MÜLLER^JÖRG".encode("latin-1"), "MÜLLER^JÖRG"),  # undeclared Latin-1, as pydicom tolerates
    (None, "MÜLLER^JÖRG".encode("utf-8"), "MÜLLER^JÖRG"),  # undeclared UTF-8
    ("ISO_IR100", "Buc^Jérôme".encode("latin-1"), "Buc^Jérôme"),  # misspelled
    ("ISO-IR 100", "Buc^Jérôme".encode("latin-1"), "Buc^Jérôme"),
    ("ISO_IR 192", "Wang^XiaoDong=王^小東".encode("utf-8"), "Wang^XiaoDong=王^小東"),
    ("GB18030", "Wang^XiaoDong=王^小东".encode("gb18030"), "Wang^XiaoDong=王^小东"),
    ("GBK", "Wang^XiaoDong=王^小东".encode("gbk"), "Wang^XiaoDong=王^小东"),
    # chrH32's bytes: JIS X 0201 katakana in G1, JIS X 0208 kanji after ESC $ B (PS3.5 H.3.2)
    ("ISO 2022 IR 13\\ISO 2022 IR 87", b"\xd4\xcf\xc0\xde^\xc0\xdb\xb3=\x1b$B;3ED\x1b(J^\x1b$BB@O:\x1b(J",
     "ﾔﾏﾀﾞ^ﾀﾛｳ=山田^太郎"),
]


@pytest.mark.parametrize(
    "term, fixed",
    [("ISO_IR100", "ISO_IR 100"), ("ISO-IR 100", "ISO_IR 100"), ("ISO IR 192", "ISO_IR 192"), ("UTF-8", "ISO_IR 192"),
     ("ISO 2022 IR87", "ISO 2022 IR 87"), ("ISO_2022_IR_13", "ISO 2022 IR 13"), ("GB18030", "GB18030"), ("", "")],
)
def test_misspelled_terms_are_normalised(term: str, fixed: str) -> None:
    assert normalise_term(term) == fixed


def test_effective_terms() -> None:
    assert charset_terms(b"\\ISO 2022 IR 87 ") == ["", "ISO 2022 IR 87"]
    assert charset_terms(None) == [] and charset_terms("") == []
    assert effective_terms([], [b"DOE^JOHN"]) == []
    assert effective_terms([], ["É".encode("latin-1")]) == ["ISO_IR 100"]
    assert effective_terms([], ["É".encode("utf-8")]) == ["ISO_IR 192"]
    assert effective_terms(["ISO_IR100"], [b"x"]) == ["ISO_IR 100"]
    assert effective_terms(["ISO_IR 100"], [b"\x1b$B;3\x1b(B"]) == ["ISO 2022 IR 13", "ISO 2022 IR 87"]


def _header_name(path: Path) -> str:
    with open(path, "rb") as fp:
        _, _, header = read_header(fp, _HEADER_TAGS)
    name = header.get("PatientName")
    return "" if name is None else str(name)


@pytest.mark.parametrize("path", CHARSET_FILES, ids=lambda p: p.name)
def test_header_reader_decodes_like_pydicom(path: Path) -> None:
    expected = str(dcmread(path, stop_before_pixels=True).get("PatientName") or "")
    assert _header_name(path) == expected
    if path.name in KNOWN_NAMES:
        assert expected == KNOWN_NAMES[path.name]


@pytest.mark.parametrize("charset, raw, name", WRITTEN)
@pytest.mark.parametrize("ts", [ExplicitVRLittleEndian, ImplicitVRLittleEndian])
def test_header_reader_decodes_written(tmp_path: Path, charset, raw, name, ts) -> None:
    assert _header_name(write_named(tmp_path / "a.dcm", raw, charset, ts)) == name


def test_index_stores_unicode_names(archive: Archive, tmp_path: Path) -> None:
    expected: dict[str, str] = {}  # Study Instance UID -> name (each file here is its patient's only study)
    sources = []
    for path in CHARSET_FILES:
        ds = dcmread(path, stop_before_pixels=True)
        accepted = (path.read_bytes()[128:132] == b"DICM" and "StudyInstanceUID" in ds
                    and ds.file_meta.get("MediaStorageSOPInstanceUID") == ds.SOPInstanceUID)
        if accepted:  # what the archive imports (PS3.10 7.1: the File Meta describes the data set)
            sources.append(path)
            expected[ds.StudyInstanceUID] = str(ds.get("PatientName") or "")
    assert len(sources) >= 12
    for i, (charset, raw, name) in enumerate(WRITTEN):
        path = write_named(tmp_path / f"w{i}.dcm", raw, charset, patient_id=f"W{i}")
        sources.append(path)
        expected[dcmread(path).StudyInstanceUID] = name
    for path, rec in archive.import_paths(sources):
        assert not isinstance(rec, Exception), (path, rec)
    stored = {s.study_uid: s.patient_name for s in archive.db.index.studies()}
    assert stored == expected
