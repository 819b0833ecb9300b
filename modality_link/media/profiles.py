"""General Purpose application profiles (PS3.11 Annex D) and their transfer syntaxes.

* STD-GEN-CD (PS3.11 D.3): Explicit VR Little Endian only, 120 mm CD-R
  (PS3.12 Annex F).
* STD-GEN-DVD-JPEG (PS3.11 D.3.1.x): Explicit VR Little Endian, plus JPEG
  Baseline (Process 1), JPEG Extended (Process 2 & 4) and JPEG Lossless
  (Process 14 and Process 14 SV1).
* STD-GEN-DVD-J2K: Explicit VR Little Endian, plus JPEG 2000 (lossless only
  and lossy).
* STD-CTMR-CD (PS3.11 Annex F, CT and MR Image profile): CT, MR and Secondary
  Capture images, Grayscale Softcopy Presentation States and X-Ray Radiation
  Dose SR (CP-1182), in Explicit VR Little Endian or, for images, JPEG
  Lossless Process 14 SV1; IMAGE records carry additional keys (PS3.11 F.3.3).

The General Purpose profiles take every composite SOP Class (PS3.11 D.2); a
class with no standard record type gets a PRIVATE record. The CT/MR profile
refuses any other class (:func:`refusal`).

Files whose transfer syntax is not allowed by the profile are converted to
Explicit VR Little Endian (see :mod:`modality_link.media.convert`). The
DICOMDIR itself is always Explicit VR Little Endian (PS3.11 D.3.2).
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import lru_cache

from pydicom.uid import (
    CTImageStorage,
    ExplicitVRLittleEndian,
    GrayscaleSoftcopyPresentationStateStorage,
    JPEG2000,
    JPEG2000Lossless,
    JPEGBaseline8Bit,
    JPEGExtended12Bit,
    JPEGLossless,
    JPEGLosslessSV1,
    MRImageStorage,
    SecondaryCaptureImageStorage,
    UID,
    XRayRadiationDoseSRStorage,
)

from modality_link.media.options import MediaError


@dataclass(frozen=True)
class Profile:
    """An application profile: its name, the transfer syntaxes and SOP Classes it accepts
    (``None``: every composite SOP Class) and the keys its IMAGE records add (keyword, type)."""

    name: str
    transfer_syntaxes: frozenset[str]
    medium: str
    sop_classes: frozenset[str] | None = None
    image_keys: tuple[tuple[str, int], ...] = ()
    #: Transfer syntaxes other than Explicit VR Little Endian allowed for images only.
    image_only_syntaxes: frozenset[str] = frozenset()


#: Image SOP Classes of STD-CTMR (PS3.11 F.3.1); JPEG Lossless SV1 applies to them only.
CTMR_IMAGES = frozenset({CTImageStorage, MRImageStorage, SecondaryCaptureImageStorage})


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
    "STD-CTMR-CD": Profile(
        "STD-CTMR-CD",
        frozenset({ExplicitVRLittleEndian, JPEGLosslessSV1}),
        "CD-R",
        sop_classes=CTMR_IMAGES | {GrayscaleSoftcopyPresentationStateStorage, XRayRadiationDoseSRStorage},
        # PS3.11 F.3.3: Rows and Columns Type 1; the geometry keys Type 1C (when the image has them).
        image_keys=(
            ("Rows", 1), ("Columns", 1), ("ImagePositionPatient", 3), ("ImageOrientationPatient", 3),
            ("FrameOfReferenceUID", 3), ("PixelSpacing", 3),
        ),
        image_only_syntaxes=frozenset({JPEGLosslessSV1}),
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


def action_for(transfer_syntax: str, profile: Profile, is_image: bool = True) -> str:
    """Return :data:`COPY` if `transfer_syntax` may be written as is under
    `profile` (for an image, or for a non-image when the syntax is not one the
    profile allows for images only), otherwise :data:`CONVERT` (to Explicit VR
    Little Endian)."""
    if transfer_syntax not in profile.transfer_syntaxes:
        return CONVERT
    return COPY if is_image or transfer_syntax not in profile.image_only_syntaxes else CONVERT


@lru_cache(maxsize=64)
def output_transfer_syntax(transfer_syntax: str, profile: Profile, is_image: bool = True) -> UID:
    """Transfer syntax of the written file for a source in `transfer_syntax`."""
    if action_for(transfer_syntax, profile, is_image) == COPY:
        return UID(transfer_syntax)
    return ExplicitVRLittleEndian


def refusal(profile: Profile, sop_class_uid: str) -> str | None:
    """Why `profile` cannot hold an instance of `sop_class_uid`, or None if it can.

    A transfer syntax outside the profile is never a reason: the instance is converted to
    Explicit VR Little Endian (:func:`action_for`).
    """
    if profile.sop_classes is not None and sop_class_uid not in profile.sop_classes:
        allowed = ", ".join(sorted(UID(u).name for u in profile.sop_classes))
        return f"SOP Class {UID(sop_class_uid).name} ({sop_class_uid}) is not allowed by {profile.name} ({allowed})"
    return None
