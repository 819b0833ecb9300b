"""Options and errors shared by the media (PS3.10/PS3.11/PS3.12) package."""

from __future__ import annotations

import re
from dataclasses import dataclass

#: Capacity of a 700 MB CD-R (PS3.12 Annex F, 120 mm CD-R), in bytes.
CD_CAPACITY = 700 * 1024 * 1024
#: Capacity of a single-layer 120 mm DVD-R (PS3.12 Annex R), in bytes.
DVD_CAPACITY = 4_700_000_000

_FILESET_ID = re.compile(r"^[A-Z0-9_]{1,16}$")
_AE_TITLE = re.compile(r"^[\x20-\x5b\x5d-\x7e]{1,16}$")  # PS3.5 6.2 AE: no backslash


class MediaError(Exception):
    """Raised when a file-set or disc cannot be built as requested."""


@dataclass
class MediaOptions:
    """Options for building DICOM interchange media.

    Attributes
    ----------
    profile:
        Application profile (PS3.11): ``"STD-GEN-CD"``, ``"STD-GEN-DVD-JPEG"``,
        ``"STD-GEN-DVD-J2K"`` or ``"STD-CTMR-CD"``.
    fileset_id:
        File-set ID (0004,1130), also used as the ISO 9660 volume identifier,
        so restricted to ``A-Z 0-9 _`` and at most 16 characters. When a set
        spans several discs, disc *k* gets ``<fileset_id[:13]>_<k>``
        (see :func:`disc_fileset_id`).
    source_ae_title:
        Source Application Entity Title (0002,0016) written to File Meta.
    capacity_bytes:
        Usable capacity of one disc; planned discs never exceed it.
    web_index:
        Write the optional IHE PDI ``INDEX.HTM`` at the root.
    creator, contact:
        Shown in ``README.TXT`` (IHE RAD TF-2 PDI).
    """

    profile: str = "STD-GEN-CD"
    fileset_id: str = "MODLINK"
    source_ae_title: str = "MODLINK"
    capacity_bytes: int = CD_CAPACITY
    web_index: bool = True
    creator: str = "modality_link"
    contact: str = ""

    def validate(self) -> None:
        """Raise :class:`MediaError` if an option is out of range."""
        if not _FILESET_ID.match(self.fileset_id):
            raise MediaError(
                f"fileset_id {self.fileset_id!r} must be 1-16 characters from "
                "A-Z, 0-9 and _ (CS, PS3.3 F.3.2.1, and ISO 9660 d-characters)"
            )
        if not _AE_TITLE.match(self.source_ae_title) or not self.source_ae_title.strip():
            raise MediaError(f"source_ae_title {self.source_ae_title!r} is not a valid AE title")
        if self.capacity_bytes < 1024 * 1024:
            raise MediaError("capacity_bytes must be at least 1 MiB")
        # imported here to keep options.py free of dependencies
        from modality_link.media.profiles import get_profile

        get_profile(self.profile)


def disc_fileset_id(fileset_id: str, index: int, count: int) -> str:
    """Return the File-set ID of disc `index` (1-based) of `count`.

    A single disc keeps `fileset_id`; discs of a spanned set get a
    ``_<k>`` suffix so each self-contained file-set (PS3.10 §8.1) and each ISO
    volume has a distinct identifier, while staying within 16 characters.
    """
    if count <= 1:
        return fileset_id
    suffix = f"_{index}"
    return fileset_id[: 16 - len(suffix)] + suffix
