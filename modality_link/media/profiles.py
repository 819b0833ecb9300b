"""General Purpose application profiles (PS3.11 Annex D) and their transfer syntaxes.

* STD-GEN-CD (PS3.11 D.3): Explicit VR Little Endian only, 120 mm CD-R
  (PS3.12 Annex F).
* STD-GEN-DVD-JPEG (PS3.11 D.3.1.x): Explicit VR Little Endian, plus JPEG
  Baseline (Process 1), JPEG Extended (Process 2 & 4) and JPEG Lossless
  (Process 14 and Process 14 SV1).
* STD-GEN-DVD-J2K: Explicit VR Little Endian, plus JPEG 2000 (lossless only
  and lossy).

Files whose transfer syntax is not allowed by the profile are converted to
Explicit VR Little Endian (see :mod:`modality_link.media.convert`). The
DICOMDIR itself is always Explicit VR Little Endian (PS3.11 D.3.2).
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import lru_cache

from pydicom.uid import (
    ExplicitVRLittleEndian,
    JPEG2000,
    JPEG2000Lossless,
    JPEGBaseline8Bit,
    JPEGExtended12Bit,
    JPEGLossless,
    JPEGLosslessSV1,
    UID,
)

from modality_link.media.options import MediaError


@dataclass(frozen=True)
class Profile:
    """An application profile: its name and the transfer syntaxes it accepts."""

    name: str
    transfer_syntaxes: frozenset[str]
    medium: str


PROFILES: dict[str, Profile] = {
    "STD-GEN-CD": Profile("STD-GEN-CD", frozenset({ExplicitVRLittleEndian}), "CD-R"),
    "STD-GEN-DVD-JPEG": Profile(
        "STD-GEN-DVD-JPEG",
        frozenset(
            {ExplicitVRLittleEndian, JPEGBaseline8Bit, JPEGExtended12Bit, JPEGLossless, JPEGLosslessSV1}
        ),
        "DVD",
    ),
    "STD-GEN-DVD-J2K": Profile(
        "STD-GEN-DVD-J2K",
        frozenset({ExplicitVRLittleEndian, JPEG2000Lossless, JPEG2000}),
        "DVD",
    ),
}

#: Action: the data set is copied byte for byte, only File Meta is rewritten.
COPY = "copy"
#: Action: the data set is decoded and re-encoded as Explicit VR Little Endian.
CONVERT = "convert"


def get_profile(name: str) -> Profile:
    """Return the :class:`Profile` called `name` or raise :class:`MediaError`."""
    try:
        return PROFILES[name]
    except KeyError:
        raise MediaError(f"unknown application profile {name!r}; known: {', '.join(PROFILES)}") from None


def action_for(transfer_syntax: str, profile: Profile) -> str:
    """Return :data:`COPY` if `transfer_syntax` may be written as is under
    `profile`, otherwise :data:`CONVERT` (to Explicit VR Little Endian)."""
    return COPY if transfer_syntax in profile.transfer_syntaxes else CONVERT


@lru_cache(maxsize=64)
def output_transfer_syntax(transfer_syntax: str, profile: Profile) -> UID:
    """Transfer syntax of the written file for a source in `transfer_syntax`."""
    if transfer_syntax in profile.transfer_syntaxes:
        return UID(transfer_syntax)
    return ExplicitVRLittleEndian
