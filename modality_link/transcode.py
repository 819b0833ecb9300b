"""Transfer syntax conversion that never changes identity (docs/design.md, "Identity and transfer
syntaxes").

One function, :func:`transcode`, used by the Storage SCU (:mod:`modality_link.net.storage`) and by
media (:mod:`modality_link.media.convert`). It re-encodes a Part-10 file's data set in one of the
native transfer syntaxes (:data:`TARGETS`):

* Implicit VR Little Endian (PS3.5 A.1), Explicit VR Little Endian (A.2), Explicit VR Big Endian
  (A.3, retired) and Deflated Explicit VR Little Endian (A.5), from any of them;
* from any compressed syntax pydicom has a decoder for (RLE and JPEG 2000 with the pylibjpeg
  plugins, JPEG and JPEG-LS with GDCM: docs/design.md "Decoders"), by decompressing the Pixel Data.

What it keeps: the SOP Instance UID and every attribute; values as read (raw element bytes are
written unchanged when the byte order stays); OW/OF/OL/OD/OV values byte-swapped word by word and
US/SS/UL/SL/FL/FD/AT values re-encoded when the byte order changes; sequences, private
sequences and UN values. What it changes, as PS3.5 §8.2 and PS3.3 C.7.6.3 require after
decompression: Pixel Data (native, OB or OW), Photometric Interpretation (as pydicom decodes: the
JPEG 2000 colour transforms become RGB; YBR_FULL_422 and YBR_FULL become RGB for a lossy source and
stay YBR_FULL for a lossless one, whose values a colour conversion would round), Planar
Configuration (0), Number of Frames; for a lossy source Lossy Image Compression (0028,2110) is "01" (PS3.3 C.7.6.1.1.5: once
"01", never reset) and Lossy Image Compression Method is added when missing. Retired group length
elements (gggg,0000) are not written (PS3.5 §7.2), since they would be wrong after re-encoding.

Whether a lossy source may be decompressed is the caller's decision (`allow_lossy`): media refuse
it, the Storage SCU sends it and says so.
"""

from __future__ import annotations

import struct
import warnings
import zlib
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from pydicom import dcmread
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.filebase import DicomBytesIO
from pydicom.filewriter import correct_ambiguous_vr, write_dataset
from pydicom.uid import (
    UID,
    DeflatedExplicitVRLittleEndian,
    ExplicitVRBigEndian,
    ExplicitVRLittleEndian,
    ImplicitVRLittleEndian,
)

#: Syntaxes :func:`transcode` writes: the native (uncompressed) ones and Deflated.
TARGETS = (ExplicitVRLittleEndian, ImplicitVRLittleEndian, ExplicitVRBigEndian, DeflatedExplicitVRLittleEndian)

#: Compressed syntaxes whose process is always lossless.
LOSSLESS_COMPRESSED = frozenset({
    "1.2.840.10008.1.2.5",        # RLE Lossless
    "1.2.840.10008.1.2.4.57",     # JPEG Lossless, Non-Hierarchical (Process 14)
    "1.2.840.10008.1.2.4.70",     # JPEG Lossless, Process 14, Selection Value 1
    "1.2.840.10008.1.2.4.80",     # JPEG-LS Lossless
    "1.2.840.10008.1.2.4.90",     # JPEG 2000 Lossless Only
    "1.2.840.10008.1.2.4.201",    # HTJ2K Lossless
    "1.2.840.10008.1.2.4.202",    # HTJ2K Lossless RPCL
})
_JPEG_LS_NEAR = "1.2.840.10008.1.2.4.81"
_J2K_MAYBE_LOSSY = frozenset({"1.2.840.10008.1.2.4.91", "1.2.840.10008.1.2.4.203"})
#: Lossy Image Compression Method (0028,2114) defined terms (PS3.3 C.7.6.1.1.5.1).
_METHOD = {"1.2.840.10008.1.2.4.50": "ISO_10918_1", "1.2.840.10008.1.2.4.51": "ISO_10918_1",
           _JPEG_LS_NEAR: "ISO_14495_1", "1.2.840.10008.1.2.4.91": "ISO_15444_1",
           "1.2.840.10008.1.2.4.203": "ISO_15444_15"}
#: Word size of the binary VRs whose values are byte-swapped between little and big endian. OW is
#: 16-bit words whatever Bits Allocated says (PS3.5 §6.2), as DCMTK 3.6.7 swaps 32-bit Pixel Data.
_SWAP_WIDTH = {"OW": 2, "OF": 4, "OL": 4, "OD": 8, "OV": 8}


class TranscodeError(Exception):
    """The data set cannot be converted (unreadable, or no decoder for its Pixel Data)."""


class LossySource(TranscodeError):
    """Converting would decompress a lossy source, and the caller does not allow it."""


@dataclass
class Converted:
    """A data set re-encoded by :func:`transcode`."""

    #: The encoded data set, without preamble and File Meta, in `transfer_syntax`.
    data: bytes
    transfer_syntax: UID
    source_syntax: UID
    #: The Pixel Data were decompressed.
    decompressed: bool
    #: Why the source counts as lossy ("" when it does not); only set when `decompressed`.
    lossy: str = ""


def can_convert(source: str, target: str) -> bool:
    """True if :func:`transcode` may turn `source` into `target` (a decoder may still be missing
    for a compressed source; that shows as :class:`TranscodeError`)."""
    return target in TARGETS and source != target


def transcode(path: Path, target: str, *, allow_lossy: bool = True) -> Converted:
    """The data set of the Part-10 file `path` encoded in `target` (one of :data:`TARGETS`).

    Raises :class:`LossySource` when that means decompressing a lossy source and `allow_lossy`
    is false, :class:`TranscodeError` when it cannot be read or decoded.
    """
    target_uid = UID(target)
    if target_uid not in TARGETS:
        raise TranscodeError(f"cannot convert to {target_uid.name} ({target_uid}): not a native syntax")
    try:
        ds = dcmread(path)
    except Exception as exc:  # noqa: BLE001 - any parse failure
        raise TranscodeError(f"cannot read {Path(path).name}: {exc}") from exc
    source = UID(ds.file_meta.TransferSyntaxUID)
    decompressed, lossy = False, ""
    if source.is_compressed and "PixelData" in ds:  # (a compressed syntax without Pixel Data
        lossy = lossy_reason(ds, source)         # is Explicit VR Little Endian, PS3.5 A.4)
        if lossy and not allow_lossy:
            raise LossySource(f"its Pixel Data are lossy ({lossy}) and would have to be decompressed")
        _decompress(ds, source, as_rgb=bool(lossy))
        decompressed = True
        if lossy:
            ds.LossyImageCompression = "01"
            if "LossyImageCompressionMethod" not in ds and source in _METHOD:
                ds.LossyImageCompressionMethod = _METHOD[source]
    source_little = source.is_little_endian  # (compressed syntaxes and decoded pixels are too)
    if source_little != target_uid.is_little_endian:
        _swap_byte_order(ds, source_little)
    data = encode(ds, target_uid)
    return Converted(data, target_uid, source, decompressed, lossy)


def encode(ds: Dataset, target: UID) -> bytes:
    """`ds` (its values already in `target`'s byte order) written in the native syntax `target`."""
    fp = DicomBytesIO()
    fp.is_little_endian = target.is_little_endian
    fp.is_implicit_VR = target.is_implicit_VR
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)
        write_dataset(fp, ds)
    data = fp.getvalue()
    if target.is_deflated:  # PS3.5 A.5: the Explicit VR Little Endian encoding, deflated (RFC 1951)
        packer = zlib.compressobj(6, zlib.DEFLATED, -zlib.MAX_WBITS)
        data = packer.compress(data) + packer.flush()
        if len(data) % 2:
            data += b"\x00"  # even, as pydicom writes it: DCMTK refuses an odd data set PDV
    return data


def _decompress(ds: Dataset, source: UID, as_rgb: bool) -> None:
    """Decompress the Pixel Data of `ds` and of any item with encapsulated Pixel Data (an Icon
    Image Sequence may be compressed in the same syntax, PS3.5 A.4), keeping every UID.

    `as_rgb`: YCbCr data become RGB (for a lossy source); a lossless one keeps its colour space
    (YBR_FULL_422 upsampled becomes YBR_FULL), since a YCbCr to RGB conversion rounds."""
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            try:
                ds.decompress(generate_instance_uid=False, as_rgb=as_rgb)
            except ValueError as exc:
                if "read-only" not in str(exc):
                    raise
                # pydicom 3.0's decompress() corrects the sign of JPEG 2000 samples whose
                # signedness differs from Pixel Representation in place, on a read-only
                # buffer; its array path makes a copy first
                ds.set_pixel_data(ds.pixel_array, ds.PhotometricInterpretation, ds.BitsStored,
                                  generate_instance_uid=False)
            for elem in list(ds.iterall()):
                if elem.VR != "SQ":
                    continue
                for item in elem.value:
                    pixels = item.get((0x7FE0, 0x0010))
                    if pixels is not None and pixels.is_undefined_length:
                        item.file_meta = FileMetaDataset()
                        item.file_meta.TransferSyntaxUID = source
                        item.decompress(generate_instance_uid=False, as_rgb=as_rgb)
                        del item.file_meta
    except Exception as exc:  # noqa: BLE001 - no plugin, or a plugin failed
        raise TranscodeError(
            f"cannot decompress {source.name} ({source}): {exc}".replace("\n", " ").strip()
        ) from exc


def _swap_byte_order(ds: Dataset, source_little: bool) -> None:
    """Prepare `ds` for the other byte order: every element parsed (numbers are then written in
    the target's order by pydicom), ambiguous VRs resolved, binary words swapped."""
    for _ in ds.iterall():  # parses raw elements, recursively
        pass
    correct_ambiguous_vr(ds, source_little)
    _byte_pixels_as_ob(ds, source_little)
    for elem in ds.iterall():
        width = _SWAP_WIDTH.get(elem.VR)
        value = elem.value
        if not width or not isinstance(value, (bytes, bytearray)) or elem.is_undefined_length:
            continue
        whole = len(value) - len(value) % width  # an odd trailing byte stays where it is
        order, other = ("<", ">") if source_little else (">", "<")
        swapped = np.frombuffer(value, f"{order}u{width}", whole // width).astype(f"{other}u{width}").tobytes()
        elem.value = swapped + bytes(value[whole:])


def _byte_pixels_as_ob(ds: Dataset, source_little: bool) -> None:
    """Pixel Data of at most 8 bits in OW (as Implicit VR always says, PS3.5 A.1) become the byte
    stream OB they are: in the other byte order an OW value would be swapped by 16-bit words."""
    items = [ds] + [item for elem in ds.iterall() if elem.VR == "SQ" for item in elem.value]
    for item in items:
        pixels = item.get((0x7FE0, 0x0010))
        bits = item.get("BitsAllocated")
        if pixels is None or pixels.VR != "OW" or not isinstance(bits, int) or bits > 8 \
                or not isinstance(pixels.value, (bytes, bytearray)) or pixels.is_undefined_length:
            continue
        if not source_little:
            value = pixels.value
            whole = len(value) - len(value) % 2
            pixels.value = np.frombuffer(value, ">u2", whole // 2).astype("<u2").tobytes() + bytes(value[whole:])
        pixels.VR = "OB"


def lossy_reason(ds: Dataset, ts: UID) -> str:
    """Why the Pixel Data of `ds`, stored in `ts`, are lossy; "" if they are not.

    Lossy: (0028,2110) "01"; JPEG other than Process 14; JPEG-LS with NEAR > 0 in its first scan;
    JPEG 2000 ".91" (or HTJ2K) with the irreversible 9-7 wavelet, or without (0028,2110) "00" (the
    reversible wavelet may still have been truncated, so only the creator can say).
    """
    if str(ds.get("LossyImageCompression", "")).strip() == "01":
        return "marked lossy by (0028,2110)"
    if not ts.is_compressed or ts in LOSSLESS_COMPRESSED:
        return ""
    first = _first_fragment(ds)
    if ts == _JPEG_LS_NEAR:
        near = _jpeg_ls_near(first)
        if near == 0:
            return ""
        return f"{ts.name} with NEAR={near}" if near is not None else f"{ts.name}"
    if ts in _J2K_MAYBE_LOSSY:
        transform = _j2k_transform(first)
        if transform == 0:
            return f"{ts.name}, irreversible 9-7 wavelet"
        if str(ds.get("LossyImageCompression", "")).strip() == "00":
            return ""
        return f"{ts.name} (reversible wavelet, but the data set does not say Lossy Image Compression 00)"
    return f"{ts.name} is a lossy compression"


def _first_fragment(ds: Dataset) -> bytes:
    """The first fragment of encapsulated Pixel Data (PS3.5 A.4), or b""."""
    try:
        data = ds["PixelData"].value
        if not isinstance(data, (bytes, bytearray)) or data[:4] != b"\xfe\xff\x00\xe0":
            return b""
        (bot,) = struct.unpack_from("<L", data, 4)
        pos = 8 + bot
        if data[pos:pos + 4] != b"\xfe\xff\x00\xe0":
            return b""
        (length,) = struct.unpack_from("<L", data, pos + 4)
        return bytes(data[pos + 8:pos + 8 + length])
    except (KeyError, struct.error):
        return b""


def _segments(stream: bytes, start: int):
    """(marker, offset of its segment) for the marker segments of a JPEG-family stream from
    `start`, until the first one without a length."""
    pos = start
    while pos + 4 <= len(stream) and stream[pos] == 0xFF:
        marker = stream[pos + 1]
        yield marker, pos
        if marker in (0xD8, 0x01, 0x4F) or 0xD0 <= marker <= 0xD7:
            pos += 2
            continue
        (length,) = struct.unpack_from(">H", stream, pos + 2)
        pos += 2 + length


def _jpeg_ls_near(stream: bytes) -> int | None:
    """NEAR of the first scan (SOS, ITU-T T.87 C.2.3) of a JPEG-LS stream; None if not found."""
    for marker, pos in _segments(stream, 0):
        if marker == 0xDA:
            count = stream[pos + 4]
            idx = pos + 5 + 2 * count
            return stream[idx] if idx < len(stream) else None
    return None


def _j2k_transform(stream: bytes) -> int | None:
    """Wavelet transformation in the COD segment of a JPEG 2000 codestream (ISO 15444-1 A.6.1):
    0 irreversible 9-7, 1 reversible 5-3; None if not found."""
    start = stream.find(b"\xff\x4f\xff\x51")  # SOC SIZ, also inside a JP2 wrapper
    if start < 0:
        return None
    for marker, pos in _segments(stream, start):
        if marker == 0x52 and pos + 13 < len(stream):
            return stream[pos + 13]
        if marker == 0x90:  # first tile-part: the main header is over
            break
    return None
