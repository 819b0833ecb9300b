"""modality_link.transcode on its own: every variant of tests/support/transcode.VARIANTS (made by
DCMTK from pydicom's CT_small.dcm / MR_small.dcm and a simulated CT) into every native syntax,
and pydicom's whole test corpus round-tripped through every native syntax. Identity (SOP
Instance UID and every attribute) and pixel data are compared with the source each time."""

from __future__ import annotations

import warnings
from pathlib import Path

import numpy as np
import pytest
from pydicom import dcmread
from pydicom.dataset import Dataset
from pydicom.uid import (UID, DeflatedExplicitVRLittleEndian, ExplicitVRBigEndian, ExplicitVRLittleEndian,
                         ImplicitVRLittleEndian)

from modality_link import transcode
from modality_link.fileformat import encode_file_meta
from tests.support.transcode import PIXEL_MODULE, BY_NAME, TEST_FILES, VARIANTS, Cases, differences, make_cases, reread

@pytest.fixture(scope="module")
def cases(tmp_path_factory) -> Cases:
    return make_cases(tmp_path_factory.mktemp("cases"))


@pytest.mark.parametrize("target", transcode.TARGETS, ids=lambda t: UID(t).name)
@pytest.mark.parametrize("variant", [v.name for v in VARIANTS])
def test_variant_to_every_native_syntax(cases: Cases, variant: str, target: str):
    made = cases.of(variant)
    if not made:
        pytest.skip(f"no source could be made as {variant}")
    for case in made:
        plain, source = dcmread(case.plain), dcmread(case.path)
        src_ts = UID(source.file_meta.TransferSyntaxUID)
        if not BY_NAME[variant].decodable:  # the reason, never a half-made file
            with pytest.raises(transcode.TranscodeError, match="decompress"):
                transcode.transcode(case.path, target)
            continue
        out = transcode.transcode(case.path, target)
        got = reread(out)
        assert got.SOPInstanceUID == source.SOPInstanceUID == case.uid
        assert out.decompressed == src_ts.is_compressed
        skip = PIXEL_MODULE if out.decompressed else set()
        assert differences(source, got, skip) == [], case.name
        if case.lossy:
            assert out.lossy and got.LossyImageCompression == "01", case.name
            assert got.LossyImageCompressionMethod
            continue
        assert not out.lossy
        assert np.array_equal(got.pixel_array, plain.pixel_array), case.name
        if UID(target).is_little_endian:  # byte-equal; Big Endian: the same values, swapped
            assert got.PixelData == plain.PixelData, case.name


def corpus() -> list[Path]:
    out = []
    for f in sorted(TEST_FILES.glob("*.dcm")):
        try:
            ds = dcmread(f, stop_before_pixels=True)
            ts = UID(ds.file_meta.TransferSyntaxUID)
        except Exception:  # no File Meta, or no Transfer Syntax UID: not a Part-10 file to send
            continue
        if ts in transcode.TARGETS:
            out.append(f)
    return out


@pytest.mark.parametrize("path", corpus(), ids=lambda p: p.name)
def test_corpus_round_trip_through_every_native_syntax(path: Path, tmp_path: Path):
    """Source -> each native syntax -> back to the source's syntax: the same data set each way
    (but for what Implicit VR cannot say: a private element's VR)."""
    source = dcmread(path)
    src_ts = UID(source.file_meta.TransferSyntaxUID)
    for target in transcode.TARGETS:
        there = transcode.transcode(path, target)
        got = reread(there)
        assert got.get("SOPInstanceUID") == source.get("SOPInstanceUID")
        middle = tmp_path / "middle.dcm"
        middle.write_bytes(encode_file_meta("1.2.3", "1.2.3", target, "T") + there.data)
        back = reread(transcode.transcode(middle, src_ts)) if target != src_ts else got
        assert differences(source, back) == [], (path.name, UID(target).name)
        if target.is_little_endian == src_ts.is_little_endian:
            assert differences(source, got) == [], (path.name, UID(target).name)
        if "PixelData" in source and "BitsAllocated" in source and "Rows" in source:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                try:
                    expected = source.pixel_array
                except ValueError:  # MR_truncated: fewer bytes than its header says
                    continue
            if source["PixelData"].VR == back["PixelData"].VR:  # (8-bit OW in Big Endian becomes OB)
                assert source.PixelData == back.PixelData
            assert np.array_equal(back.pixel_array, expected), path.name
            if source.BitsAllocated > 16 and src_ts.is_little_endian != UID(target).is_little_endian:
                # OW is 16-bit words (PS3.5 §6.2, as DCMTK swaps it): pydicom reads 32-bit cells
                continue
            assert np.array_equal(got.pixel_array, expected), (path.name, UID(target).name)


def test_big_endian_swaps_every_binary_vr(tmp_path):
    ds = Dataset()
    ds.SOPClassUID = "1.2.840.10008.5.1.4.1.1.7"
    ds.SOPInstanceUID = "1.2.3.4.5"
    ds.add_new(0x00091010, "LO", "BYTE ORDER")
    ds.add_new(0x00091011, "OW", bytes(range(8)))
    ds.add_new(0x00091012, "OF", bytes(range(8)))
    ds.add_new(0x00091013, "OD", bytes(range(16)))
    ds.add_new(0x00091014, "OL", bytes(range(8)))
    ds.add_new(0x00091015, "OV", bytes(range(16)))
    ds.add_new(0x00091016, "US", [1, 0x1234])
    ds.add_new(0x00091017, "SL", -5)
    ds.add_new(0x00091018, "FD", 1.5)
    ds.add_new(0x00091019, "AT", [0x00100020, 0x7FE00010])
    ds.add_new(0x0009101A, "OB", b"\x01\x02\x03")  # odd length: written padded, never swapped
    ds.add_new(0x0009101B, "UN", b"\x01\x02")
    src = tmp_path / "le.dcm"
    src.write_bytes(encode_file_meta(ds.SOPClassUID, ds.SOPInstanceUID, ExplicitVRLittleEndian, "T")
                    + transcode.encode(ds, ExplicitVRLittleEndian))
    big = transcode.transcode(src, ExplicitVRBigEndian).data
    assert bytes(range(8)) not in big  # every OW/OF/OL word reversed
    assert bytes([1, 0, 3, 2, 5, 4, 7, 6]) in big  # OW by 16-bit words
    assert bytes([3, 2, 1, 0, 7, 6, 5, 4]) in big  # OF/OL by 32-bit words
    assert bytes([7, 6, 5, 4, 3, 2, 1, 0, 15, 14, 13, 12, 11, 10, 9, 8]) in big  # OD/OV by 64-bit words
    assert b"\x00\x01\x12\x34" in big and b"\xff\xff\xff\xfb" in big  # US, SL re-encoded
    assert b"\x00\x10\x00\x20\x7f\xe0\x00\x10" in big  # AT: group, element
    back = tmp_path / "be.dcm"
    back.write_bytes(encode_file_meta(ds.SOPClassUID, ds.SOPInstanceUID, ExplicitVRBigEndian, "T") + big)
    for target in (ExplicitVRLittleEndian, ImplicitVRLittleEndian, DeflatedExplicitVRLittleEndian):
        got = reread(transcode.transcode(back, target))
        for tag in (0x00091011, 0x00091012, 0x00091013, 0x00091014, 0x00091015, 0x00091016, 0x00091017,
                    0x00091018, 0x00091019, 0x0009101B):
            if target == ImplicitVRLittleEndian:
                assert got[tag].value == ds[tag].value or got[tag].VR == "UN"
            else:
                assert got[tag].value == ds[tag].value, (UID(target).name, hex(tag))
        assert got[0x0009101A].value.rstrip(b"\x00") == b"\x01\x02\x03"


@pytest.mark.parametrize("name,lossy", [
    ("JPEG-lossy.dcm", True), ("JPGExtended.dcm", True), ("SC_rgb_jpeg_dcmtk.dcm", True),
    ("JPEGLSNearLossless_08.dcm", True), ("SC_rgb_jls_lossy_line.dcm", True),
    ("693_J2KI.dcm", True), ("MR_small_jpeg_ls_lossless.dcm", False), ("MR_small_jp2klossless.dcm", False),
    ("MR_small_RLE.dcm", False), ("SC_rgb_jpeg_gdcm.dcm", False), ("MR_small.dcm", False),
])
def test_lossy_reason(name: str, lossy: bool):
    ds = dcmread(TEST_FILES / name)
    assert bool(transcode.lossy_reason(ds, UID(ds.file_meta.TransferSyntaxUID))) is lossy


def test_lossy_source_refused_when_not_allowed(cases: Cases):
    case = cases.of("jpeg-baseline")[0]
    with pytest.raises(transcode.LossySource, match="lossy"):
        transcode.transcode(case.path, ExplicitVRLittleEndian, allow_lossy=False)
    lossless = cases.of("jpeg-sv1")[0]
    assert not transcode.transcode(lossless.path, ExplicitVRLittleEndian, allow_lossy=False).lossy


def test_undecodable_is_a_transcode_error():
    with pytest.raises(transcode.TranscodeError, match="cannot decompress"):
        transcode.transcode(TEST_FILES / "JPEG2000-embedded-sequence-delimiter.dcm", ExplicitVRLittleEndian)


def test_ycbcr_becomes_rgb_after_decompression():
    out = transcode.transcode(TEST_FILES / "SC_rgb_dcmtk_+eb+cy+s2.dcm", ExplicitVRLittleEndian)
    got = reread(out)
    src = dcmread(TEST_FILES / "SC_rgb_dcmtk_+eb+cy+s2.dcm")
    assert src.PhotometricInterpretation == "YBR_FULL_422"
    assert got.PhotometricInterpretation == "RGB" and got.PlanarConfiguration == 0
    assert got.SOPInstanceUID == src.SOPInstanceUID
    assert got.LossyImageCompression == "01" and got.LossyImageCompressionMethod == "ISO_10918_1"


def test_icon_image_in_the_compressed_syntax_is_decompressed_too(tmp_path: Path):
    """PS3.5 A.4: an Icon Image Sequence item may be encapsulated in the data set's syntax."""
    ds = dcmread(TEST_FILES / "MR_small_RLE.dcm")
    icon = Dataset()
    for keyword in ("SamplesPerPixel", "PhotometricInterpretation", "Rows", "Columns", "BitsAllocated",
                    "BitsStored", "HighBit", "PixelRepresentation"):
        setattr(icon, keyword, ds[keyword].value)
    icon.add(dcmread(TEST_FILES / "MR_small_RLE.dcm")["PixelData"])
    ds.IconImageSequence = [icon]
    src = tmp_path / "icon.dcm"
    ds.save_as(src)
    got = reread(transcode.transcode(src, ExplicitVRLittleEndian))
    item = got.IconImageSequence[0]
    assert not item["PixelData"].is_undefined_length
    assert item.PixelData == got.PixelData == dcmread(TEST_FILES / "MR_small.dcm").PixelData
    assert got.SOPInstanceUID == ds.SOPInstanceUID
