"""DICOM interchange media: file-sets with DICOMDIR on CD/DVD ISO 9660 images.

* :mod:`~modality_link.media.profiles` -- application profiles (PS3.11 Annex D)
* :mod:`~modality_link.media.fileset` -- File IDs and DICOMDIR (PS3.10 §8, PS3.3 F)
* :mod:`~modality_link.media.convert` -- transfer syntax conversion
* :mod:`~modality_link.media.pdi` -- IHE PDI README.TXT and INDEX.HTM
* :mod:`~modality_link.media.iso` -- ISO 9660 Level 1 mastering (PS3.12 Annex F)
* :mod:`~modality_link.media.spanning` -- splitting a set over several discs
* :mod:`~modality_link.media.disc` -- building discs (public entry points)
"""

from modality_link.media.disc import DiscFile, DiscResult, Progress, build_disc, build_media
from modality_link.media.options import CD_CAPACITY, DVD_CAPACITY, MediaError, MediaOptions
from modality_link.media.spanning import DiscPlan, plan_discs

__all__ = [
    "CD_CAPACITY",
    "DVD_CAPACITY",
    "DiscFile",
    "DiscPlan",
    "DiscResult",
    "MediaError",
    "MediaOptions",
    "Progress",
    "build_disc",
    "build_media",
    "plan_discs",
]
