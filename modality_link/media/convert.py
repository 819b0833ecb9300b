"""Writing instances on a medium, converted to Explicit VR Little Endian (PS3.5 A.2) when the
application profile does not allow their transfer syntax (PS3.11 Annex D).

A :data:`~modality_link.media.profiles.COPY` instance keeps its data set bytes; any other is
re-encoded by :func:`modality_link.transcode.transcode`, the conversion the Storage SCU uses too:
Implicit VR Little Endian, Explicit VR Big Endian (retired), Deflated and compressed syntaxes
(RLE, JPEG, JPEG-LS, JPEG 2000: the decoders of docs/design.md) become Explicit VR Little
Endian with the same SOP Instance UID and attributes. A lossy source is never decompressed onto a profile
that does not allow its syntax: the burn fails with a :class:`MediaError` naming the instance and
why (docs/design.md, "Identity and transfer syntaxes").
"""

from __future__ import annotations

import shutil
from pathlib import Path

from pydicom.uid import UID, ExplicitVRLittleEndian

from modality_link import transcode
from modality_link.fileformat import encode_file_meta
from modality_link.media.fileset import Instance, instance_head
from modality_link.media.options import MediaError
from modality_link.media.profiles import COPY, Profile


def write_instance(inst: Instance, dest: Path, profile: Profile, source_ae_title: str) -> None:
    """Write `inst` as a Part-10 file at `dest` for `profile`.

    A :data:`~modality_link.media.profiles.COPY` instance gets new File Meta
    and its data set bytes copied unchanged; otherwise the data set is
    converted to Explicit VR Little Endian.
    """
    dest.parent.mkdir(parents=True, exist_ok=True)
    if inst.action == COPY:
        with open(inst.path, "rb") as src, open(dest, "wb") as out:
            out.write(instance_head(inst, profile, source_ae_title))
            src.seek(inst.dataset_offset)
            shutil.copyfileobj(src, out, 1 << 20)
        return

    ts = UID(inst.transfer_syntax_uid)
    what = f"SOP Instance {inst.sop_instance_uid} ({inst.path}, {ts.name})"
    try:
        converted = transcode.transcode(inst.path, ExplicitVRLittleEndian, allow_lossy=False)
    except transcode.LossySource as exc:
        allowed = ", ".join(sorted(UID(t).name for t in profile.transfer_syntaxes))
        raise MediaError(
            f"{what} cannot be written for profile {profile.name}: {exc}, and {profile.name} allows "
            f"only {allowed}; a lossy image is never decompressed onto a medium -- choose a "
            "profile that accepts its transfer syntax, or leave it off"
        ) from exc
    except transcode.TranscodeError as exc:
        raise MediaError(
            f"{what} cannot be converted to Explicit VR Little Endian for profile {profile.name}: {exc}"
        ) from exc
    with open(dest, "wb") as out:
        out.write(encode_file_meta(inst.sop_class_uid, inst.sop_instance_uid, ExplicitVRLittleEndian,
                                   source_ae_title))
        out.write(converted.data)
