"""Coercion of the attributes before Pixel Data, the rest copied as bytes (PS3.4 B.4.1.3):
every valid file of the corpus comes out with the new values, everything else as it was."""

from __future__ import annotations

import warnings
from pathlib import Path

import pytest
from pydicom import dcmread

from modality_link.archive import read_header
from modality_link.fileformat import encode_file_meta
from modality_link.coercion import coerce_file
from tests.support.corpus import CASES, Case, assert_same_dataset

NEW_NAME = "Γιάννης^Ωμέγα"  # not Latin-1: the header is written again in ISO_IR 192


def _coerce(ds) -> None:
    for _ in ds.iterall():  # another character set follows: decode under the old one first
        pass
    ds.PatientName = NEW_NAME
    ds.PatientID = "NEW-1"
    ds.SpecificCharacterSet = "ISO_IR 192"


@pytest.mark.parametrize("checked", [False, True], ids=["read here", "read by the archive's check"])
@pytest.mark.parametrize("case", [c for c in CASES if c.valid], ids=lambda c: c.id)
def test_coerced_file_keeps_all_but_the_coerced(case: Case, checked: bool, tmp_path: Path) -> None:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        src = dcmread(case.path)
        out = coerce_file(case.path, _coerce, read_header(case.path) if checked else None)
        path = tmp_path / "out.dcm"
        with open(path, "wb") as fp:
            fp.write(encode_file_meta(src.SOPClassUID, src.SOPInstanceUID, out.transfer_syntax, "TEST"))
            fp.write(out.header)
            if out.rest_offset is not None:
                fp.write(case.path.read_bytes()[out.rest_offset:])
        got = dcmread(path)
    assert got.PatientName == NEW_NAME and got.PatientID == "NEW-1"
    assert got.file_meta.TransferSyntaxUID == src.file_meta.TransferSyntaxUID
    for keyword in ("PatientName", "PatientID", "SpecificCharacterSet"):
        if keyword in src:
            del src[keyword]
    for keyword in ("PatientName", "PatientID", "SpecificCharacterSet"):
        del got[keyword]
    assert_same_dataset(src, got, case.name)
    if "PixelData" in src:
        assert got.PixelData == src.PixelData
