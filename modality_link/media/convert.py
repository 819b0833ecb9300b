"""Transfer syntax conversion of instances to Explicit VR Little Endian (PS3.5 A.2).

Used for instances whose transfer syntax the application profile does not
allow (PS3.11 Annex D): Implicit VR Little Endian, Explicit VR Big Endian
(retired), Deflated, and compressed syntaxes (decompressed with pydicom's
pixel data plugins; RLE Lossless is always available, JPEG and JPEG 2000
need pylibjpeg or GDCM). Pixel Data of an uncompressed source is kept byte
for byte (byte-swapped for a Big Endian source).
"""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
from pydicom import dcmread
from pydicom.dataset import Dataset
from pydicom.filebase import DicomFileLike
from pydicom.filewriter import write_dataset, write_file_meta_info
from pydicom.uid import UID, ExplicitVRLittleEndian

from modality_link.media.fileset import PREAMBLE, Instance, file_meta, instance_head
from modality_link.media.options import MediaError
from modality_link.media.profiles import COPY, Profile

_SWAP_WIDTH = {"OW": 2, "OF": 4, "OL": 4, "OD": 8, "OV": 8}


def _swap_to_little_endian(ds: Dataset) -> None:
    """Byte-swap the binary (OW/OF/OL/OD/OV) values of a Big Endian data set."""
    for elem in ds.iterall():
        width = _SWAP_WIDTH.get(elem.VR)
        if width and isinstance(elem.value, (bytes, bytearray)) and len(elem.value) % width == 0:
            elem.value = np.frombuffer(elem.value, f">u{width}").astype(f"<u{width}").tobytes()


def write_instance(inst: Instance, dest: Path, profile: Profile, source_ae_title: str) -> None:
    """Write `inst` as a Part-10 file at `dest` for `profile`.

    A :data:`~modality_link.media.profiles.COPY` instance gets new File Meta
    and its data set bytes copied unchanged; otherwise the data set is
    decoded and re-encoded as Explicit VR Little Endian.
    """
    dest.parent.mkdir(parents=True, exist_ok=True)
    if inst.action == COPY:
        with open(inst.path, "rb") as src, open(dest, "wb") as out:
            out.write(instance_head(inst, profile, source_ae_title))
            src.seek(inst.dataset_offset)
            shutil.copyfileobj(src, out, 1 << 20)
        return

    ts = UID(inst.transfer_syntax_uid)
    ds = dcmread(inst.path)
    if ts.is_compressed:
        try:
            ds.decompress(generate_instance_uid=False)
        except Exception as exc:  # no plugin, or a plugin failed
            raise MediaError(
                f"cannot decompress SOP Instance {inst.sop_instance_uid} ({inst.path}) in transfer syntax "
                f"{ts.name} ({ts}) for profile {profile.name}: {exc} -- install pylibjpeg (with the "
                "openjpeg/libjpeg plugins) or python-gdcm, or choose a profile that accepts this syntax"
            ) from exc
    elif not ts.is_little_endian:
        _swap_to_little_endian(ds)
    meta = file_meta(inst.sop_class_uid, inst.sop_instance_uid, ExplicitVRLittleEndian, source_ae_title)
    with open(dest, "wb") as out:
        fp = DicomFileLike(out)
        fp.is_little_endian = True
        fp.is_implicit_VR = False
        fp.write(PREAMBLE)
        write_file_meta_info(fp, meta, enforce_standard=True)
        write_dataset(fp, ds)
