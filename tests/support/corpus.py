"""The real-world corpus: every file of pydicom's test corpus, and variants made with DCMTK.

pydicom installs its test files with the package (``pydicom/data/test_files`` and
``pydicom/data/charset_files``): files written by pydicom's, GDCM's and DCMTK's authors, in every
transfer syntax, with no, single-byte, ISO 2022 and UTF-8 character sets, RT, SR and waveform
objects, and deliberately broken files. :data:`CASES` says, one line a file, what each path of
the service must do with it; :func:`made_cases` adds files converted by DCMTK tools
(``dcmconv``, ``dcmcjpeg``, ``dcmcjpls``, ``dcmcrle``, ``dcmodify``) at test time.

A new file is one line in :data:`CASES`. Its ``kind``:

* ``image`` / ``object``: valid; every path keeps its SOP Instance UID and attributes, pixel
  data equal after any lossless conversion;
* ``lossy``: valid, lossy compressed (PS3.5 §8.2.1): never silently decompressed;
* ``broken``: import must refuse it with a message containing ``refuse``; the network receive
  must answer ``status`` with a message containing ``refuse`` (None: the data set is valid on
  the network, where there is no File Meta, and must be stored).

:func:`assert_same_dataset` compares what came out of a path with what went in.
"""

from __future__ import annotations

import shutil
import subprocess
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pydicom
from pydicom import dcmread
from pydicom.dataset import Dataset
from pydicom.uid import generate_uid

from tests.support.tools import dcmtk_env, require_tool

DATA = Path(pydicom.__file__).parent / "data"
TEST_FILES = DATA / "test_files"
CHARSET_FILES = DATA / "charset_files"


@dataclass(frozen=True)
class Case:
    name: str
    path: Path
    kind: str  # image, object, lossy or broken
    #: broken: the words the import's refusal must contain
    refuse: str = ""
    #: broken: the C-STORE status of the raw data set over the network (None: stored)
    status: int | None = None
    #: False where no decoder we install can decompress it (docs/design.md, "Decoders"): it can
    #: be sent only where its own transfer syntax is accepted
    decodable: bool = True
    #: Orthanc (DCMTK's parser) refuses this valid file with 0xC000: a peer's limitation that the
    #: send job must report as a failed instance
    peer_refuses: bool = False

    @property
    def id(self) -> str:
        return self.name

    @property
    def valid(self) -> bool:
        return self.kind != "broken"


def _t(name: str, kind: str = "image", refuse: str = "", status: int | None = None, decodable: bool = True) -> Case:
    return Case(name, TEST_FILES / name, kind, refuse, status, decodable)


def _c(name: str, kind: str = "image", refuse: str = "", status: int | None = None) -> Case:
    return Case(name, CHARSET_FILES / name, kind, refuse, status)


_MISMATCH = "SOP Instance UID"
_NO_META = "File Meta"
_NO_UID = "SOP Instance UID"

CASES: list[Case] = [
    # -- uncompressed, every byte order and VR encoding ------------------------------------------
    _t("CT_small.dcm"),
    _t("MR_small.dcm"),
    _t("MR_small_implicit.dcm"),
    _t("MR_small_bigendian.dcm"),
    _t("MR_small_expb.dcm"),
    _t("MR_small_padded.dcm"),
    _t("ExplVR_BigEnd.dcm"),
    _t("SC_rgb_small_odd.dcm"),
    _t("SC_rgb_small_odd_big_endian.dcm"),
    _t("SC_ybr_full_422_uncompressed.dcm"),
    _t("SC_rgb_jpeg_dcmd.dcm"),
    _t("examples_overlay.dcm"),
    _t("examples_palette.dcm"),
    _t("examples_rgb_color.dcm"),
    _t("liver_1frame.dcm"),
    _t("liver_expb_1frame.dcm"),
    _t("image_dfl.dcm"),  # Deflated Explicit VR Little Endian (PS3.5 A.5)
    # -- lossless compression ---------------------------------------------------------------------
    _t("MR_small_RLE.dcm"),
    _t("SC_rgb_rle.dcm"),
    _t("SC_rgb_rle_16bit.dcm"),
    _t("SC_rgb_rle_16bit_2frame.dcm"),
    _t("SC_rgb_rle_2frame.dcm"),
    _t("SC_rgb_rle_32bit.dcm"),
    _t("SC_rgb_rle_32bit_2frame.dcm"),
    _t("MR_small_jp2klossless.dcm"),
    _t("MR_small_jpeg_ls_lossless.dcm"),
    _t("SC_rgb_jpeg_gdcm.dcm"),  # JPEG Lossless SV1
    _t("GDCMJ2K_TextGBR.dcm"),  # JPEG 2000 Lossless Only
    _t("J2K_pixelrep_mismatch.dcm"),  # signedness of the J2K stream differs from (0028,0103)
    _t("examples_jpeg2k.dcm"),
    # SOP UIDs encoded with VR UN (allowed, PS3.5 6.2.2): DCMTK does not read them as UIDs
    Case("rtdose_rle.dcm", TEST_FILES / "rtdose_rle.dcm", "object", peer_refuses=True),
    Case("rtdose_rle_1frame.dcm", TEST_FILES / "rtdose_rle_1frame.dcm", "object", peer_refuses=True),
    # -- lossy compression: JPEG baseline/extended, JPEG-LS near-lossless, JPEG 2000 ----------------
    _t("JPEG-lossy.dcm", "lossy", decodable=False),  # 12-bit JPEG Extended
    _t("JPGExtended.dcm", "lossy", decodable=False),
    _t("SC_jpeg_no_color_transform.dcm", "lossy"),
    _t("SC_jpeg_no_color_transform_2.dcm", "lossy"),
    _t("SC_rgb_dcmtk_+eb+cr.dcm", "lossy"),
    _t("SC_rgb_dcmtk_+eb+cy+n1.dcm", "lossy"),
    _t("SC_rgb_dcmtk_+eb+cy+n2.dcm", "lossy"),
    _t("SC_rgb_dcmtk_+eb+cy+np.dcm", "lossy"),
    _t("SC_rgb_dcmtk_+eb+cy+s2.dcm", "lossy"),
    _t("SC_rgb_dcmtk_+eb+cy+s4.dcm", "lossy"),
    _t("SC_rgb_jpeg_app14_dcmd.dcm", "lossy"),
    _t("SC_rgb_jpeg_dcmtk.dcm", "lossy"),
    _t("SC_rgb_jpeg_lossy_gdcm.dcm", "lossy"),
    _t("SC_rgb_small_odd_jpeg.dcm", "lossy"),
    _t("examples_ybr_color.dcm", "lossy"),
    _t("693_J2KI.dcm", "lossy"),
    _t("JPEG2000.dcm", "lossy"),
    _t("JPEG2000-embedded-sequence-delimiter.dcm", "lossy", decodable=False),  # no decoder reads its header
    _t("SC_rgb_gdcm_KY.dcm", "lossy"),
    # -- non-image objects --------------------------------------------------------------------------
    _t("reportsi.dcm", "object"),
    _t("reportsi_with_empty_number_tags.dcm", "object"),
    _t("test-SR.dcm", "object"),
    _t("waveform_ecg.dcm", "object"),
    # -- character sets (PS3.5 §6.1): single-byte, ISO 2022 code extensions, UTF-8, GB18030 --------
    *(_c(n) for n in (
        "chrArab.dcm", "chrFren.dcm", "chrFrenMulti.dcm", "chrGerm.dcm", "chrGreek.dcm", "chrH31.dcm",
        "chrH32.dcm", "chrHbrw.dcm", "chrI2.dcm", "chrKoreanMulti.dcm", "chrRuss.dcm", "chrX1.dcm",
        "chrX2.dcm",
    )),
    # -- broken: the File Meta names another SOP Instance than the data set (PS3.10 §7.1) -----------
    _t("rtdose.dcm", "broken", _MISMATCH),
    _t("rtdose_1frame.dcm", "broken", _MISMATCH),
    _t("rtdose_expb.dcm", "broken", _MISMATCH),
    _t("rtdose_expb_1frame.dcm", "broken", _MISMATCH),
    _t("rtplan.dcm", "broken", _MISMATCH),
    _c("chrJapMulti.dcm", "broken", _MISMATCH),
    _c("chrJapMultiExplicitIR6.dcm", "broken", _MISMATCH),
    # a bad VR, and the File Meta's UID differs too
    _t("badVR.dcm", "broken", _MISMATCH),
    # -- broken: an Implicit VR data set under an explicit transfer syntax (PS3.5 7.1.2) -----------
    _t("SC_rgb_jpeg.dcm", "broken", "not encoded in Explicit VR", 0xC000),
    # -- broken: truncated ------------------------------------------------------------------------
    _t("MR_truncated.dcm", "broken", "truncated", 0xC000),
    _t("rtplan_truncated.dcm", "broken", "truncated", 0xC000),
    # -- broken: no File Meta (PS3.10 §7.1); on the network the data set alone is valid ------------
    _t("rtstruct.dcm", "broken", _NO_META),
    _t("no_meta.dcm", "broken", _NO_META, 0xC000),
    _t("ExplVR_BigEndNoMeta.dcm", "broken", _NO_META),
    _t("ExplVR_LitEndNoMeta.dcm", "broken", _NO_META),
    # -- broken: no SOP Class / SOP Instance UID in the data set ------------------------------------
    _t("UN_sequence.dcm", "broken", _NO_UID, 0xA900),
    _t("empty_charset_LEI.dcm", "broken", _NO_UID, 0xA900),
    _t("meta_missing_tsyntax.dcm", "broken", "Transfer Syntax", 0xA900),
    _t("nested_priv_SQ.dcm", "broken", _NO_UID, 0xA900),
    _t("no_meta_group_length.dcm", "broken", _NO_UID, 0xA900),
    _t("priv_SQ.dcm", "broken", _NO_UID, 0xA900),
    _c("chrSQEncoding.dcm", "broken", _NO_UID, 0xA900),
    # -- broken: no Study / Series Instance UID (Type 1, PS3.3 C.7.2.1, C.7.3.1) --------------------
    *(_t(n, "broken", "Series Instance UID", 0xA900) for n in (
        "JPEGLSNearLossless_08.dcm", "JPEGLSNearLossless_16.dcm", "SC_rgb_jls_lossy_line.dcm",
        "SC_rgb_jls_lossy_sample.dcm",
    )),
    _c("chrSQEncoding1.dcm", "broken", _NO_UID, 0xA900),
]


def corpus_files() -> set[str]:
    """Every .dcm file of pydicom's corpus, to check that :data:`CASES` covers them all."""
    return {p.name for d in (TEST_FILES, CHARSET_FILES) for p in d.glob("*.dcm")}


#: DCMTK conversions of CT_small.dcm / MR_small.dcm: (name, source, tool, options, kind).
#: Each gets its own SOP Instance UID first so that all can live in one archive.
MADE = [
    ("ct_ile.dcm", "CT_small.dcm", "dcmconv", ["+ti"], "image"),
    ("ct_ebe.dcm", "CT_small.dcm", "dcmconv", ["+tb"], "image"),
    ("ct_deflated.dcm", "CT_small.dcm", "dcmconv", ["+td"], "image"),
    ("ct_jpeg_sv1.dcm", "CT_small.dcm", "dcmcjpeg", ["+e1", "+un"], "image"),
    ("ct_jpeg_lossless14.dcm", "CT_small.dcm", "dcmcjpeg", ["+el", "+un"], "image"),
    ("ct_jpeg_extended.dcm", "CT_small.dcm", "dcmcjpeg", ["+ee", "+un"], "lossy"),
    ("ct_jpegls_lossless.dcm", "CT_small.dcm", "dcmcjpls", ["+el", "+un"], "image"),
    ("mr_jpegls_near.dcm", "examples_overlay.dcm", "dcmcjpls", ["+en", "+un"], "lossy"),
    ("ct_rle.dcm", "CT_small.dcm", "dcmcrle", ["+un"], "image"),
    ("mr_rle.dcm", "MR_small.dcm", "dcmcrle", ["+un"], "image"),
    ("mr_jpeg_sv1.dcm", "MR_small.dcm", "dcmcjpeg", ["+e1", "+un"], "image"),
    ("mr_deflated.dcm", "MR_small.dcm", "dcmconv", ["+td"], "image"),
    # no Patient ID, Study Date/Time, Study ID: Type 1 keys of a DICOMDIR must be invented
    ("ct_no_ids.dcm", "CT_small.dcm", "dcmodify",
     ["-ea", "(0010,0020)", "-ea", "(0008,0020)", "-ea", "(0008,0030)", "-ea", "(0020,0010)"], "image"),
    # no Specific Character Set at all (the most common case)
    ("ct_no_charset.dcm", "CT_small.dcm", "dcmodify", ["-ea", "(0008,0005)"], "image"),
]


#: 12-bit JPEG Extended: no decoder we install reads it (docs/design.md, "Decoders").
UNDECODABLE_MADE = {"ct_jpeg_extended.dcm"}


def made_cases(out: Path) -> list[Case]:
    """Write the :data:`MADE` variants into `out` with DCMTK; return them as cases."""
    out.mkdir(parents=True, exist_ok=True)
    cases = []
    for name, source, tool, options, kind in MADE:
        base = out / f"src_{name}"
        ds = dcmread(TEST_FILES / source)
        uid = generate_uid()
        ds.SOPInstanceUID = uid
        ds.file_meta.MediaStorageSOPInstanceUID = uid
        ds.save_as(base, enforce_file_format=True)
        dest = out / name
        if tool == "dcmodify":
            shutil.copy(base, dest)
            args = [require_tool(tool), "-nb", *options, str(dest)]
        else:
            args = [require_tool(tool), *options, str(base), str(dest)]
        proc = subprocess.run(args, capture_output=True, text=True, env=dcmtk_env())
        assert proc.returncode == 0, f"{' '.join(args)}: {proc.stderr}"
        base.unlink()
        cases.append(Case(name, dest, kind, decodable=name not in UNDECODABLE_MADE))
    return cases


# -- comparing what came out with what went in ---------------------------------------------------------


#: Attributes that a decompression rightly changes (PS3.5 §8.2; PS3.3 C.7.6.3.1.2, C.7.6.1.1.5).
CHANGED_BY_DECODING = {0x00280004, 0x00280006, 0x00282110, 0x00282112, 0x00282114, 0x7FE00010}
#: Data Set Trailing Padding has no meaning and a receiver may drop it (PS3.10 7.2): DCMTK does.
IGNORED = {0xFFFCFFFC}
_SWAP = {"OW": 2, "OF": 4, "OL": 4, "OD": 8, "OV": 8}


def _value(elem: Any, big_endian: bool) -> Any:
    width = _SWAP.get(elem.VR)
    if width and isinstance(elem.value, (bytes, bytearray)) and len(elem.value) % width == 0:
        return np.frombuffer(elem.value, f"{'>' if big_endian else '<'}u{width}").tolist()
    return elem.value


def assert_same_dataset(src: Dataset, out: Dataset, what: str, decoded: bool | None = False) -> None:
    """Every attribute of `src` is in `out` with the same value (text compared decoded, binary
    values compared as numbers whatever the byte order). The attributes that decompression
    changes are left out; pixel data are compared byte for byte when the transfer syntax is the
    same, as arrays when it is not or `decoded` is true, by their shape only when `decoded` is
    None (a lossy source)."""
    assert out.SOPInstanceUID == src.SOPInstanceUID, f"{what}: SOP Instance UID changed"
    assert out.SOPClassUID == src.SOPClassUID, f"{what}: SOP Class UID changed"
    src_be = not src.original_encoding[1] if src.original_encoding else False
    out_be = not out.original_encoding[1] if out.original_encoding else False
    for elem in src:
        if elem.tag.group == 0x0002 or elem.tag.element == 0x0000 or elem.tag in CHANGED_BY_DECODING | IGNORED:
            continue  # File Meta; group lengths (retired, PS3.5 7.2); what decoding changes
        assert elem.tag in out, f"{what}: {elem.tag} {elem.keyword} missing"
        mine = out[elem.tag]
        if elem.VR == "SQ":
            assert len(mine.value) == len(elem.value), f"{what}: {elem.keyword} items"
            for a, b in zip(elem.value, mine.value):
                assert_same_dataset_items(a, b, f"{what} > {elem.keyword}", src_be, out_be)
            continue
        assert _value(mine, out_be) == _value(elem, src_be), f"{what}: {elem.tag} {elem.keyword} differs"
    if "PixelData" in src and decoded is None:  # lossy: decoded by another decoder, the same size
        assert src.pixel_array.shape == out.pixel_array.shape, f"{what}: pixel data differ in shape"
    elif "PixelData" in src:
        if decoded or src.file_meta.TransferSyntaxUID != out.file_meta.TransferSyntaxUID:
            assert np.array_equal(src.pixel_array, out.pixel_array), f"{what}: pixel data differ"
        else:
            assert out.PixelData == src.PixelData, f"{what}: pixel data differ"


def assert_same_dataset_items(src: Dataset, out: Dataset, what: str, src_be: bool, out_be: bool) -> None:
    for elem in src:
        assert elem.tag in out, f"{what}: {elem.tag} {elem.keyword} missing"
        mine = out[elem.tag]
        if elem.VR == "SQ":
            for a, b in zip(elem.value, mine.value):
                assert_same_dataset_items(a, b, f"{what} > {elem.keyword}", src_be, out_be)
            continue
        assert _value(mine, out_be) == _value(elem, src_be), f"{what}: {elem.tag} {elem.keyword} differs"


def read(path: Path) -> Dataset:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return dcmread(path, force=True)
