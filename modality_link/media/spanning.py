"""Disc spanning: split a set of instances into self-contained file-sets.

Instances are packed in patient -> study -> series order onto discs of
``MediaOptions.capacity_bytes``. A series is never split unless it alone
exceeds a disc, in which case it is split by instance (filling the current
disc first). Each disc is a complete file-set (PS3.10 §8) with its own
DICOMDIR, README.TXT and ISO 9660 image.

The size of each disc is bounded from above before it is built: ISO 9660
system area, volume descriptors, path tables and directory records
(:mod:`modality_link.media.iso`), each file rounded to 2048-byte sectors,
and bounds of the DICOMDIR, README.TXT and INDEX.HTM sizes.
:func:`modality_link.media.disc.build_disc` checks the real image size.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

from modality_link.media import iso, pdi
from modality_link.media.fileset import (
    DICOMDIR_BASE_BYTES,
    PATIENT_KEYS,
    SERIES_KEYS,
    STUDY_KEYS,
    Instance,
    group_instances,
    instance_record_bound,
    read_instance,
    record_size_bound,
)
from modality_link.media.options import MediaError, MediaOptions, disc_fileset_id
from modality_link.media.profiles import get_profile, refusal

LOGGER = logging.getLogger(__name__)

_DIR_RECORD = iso.record_length("PAT00001")
_FILE_RECORD = iso.record_length("IM000001.;1")
_ROOT_RECORDS = [iso.record_length(n) for n in ("DICOM", "DICOMDIR.;1", "INDEX.HTM;1", "README.TXT;1")]


@dataclass
class DiscPlan:
    """One disc of a (possibly spanned) set: which instances go on it."""

    index: int  # 1-based
    count: int
    fileset_id: str
    instances: list[Instance]
    #: Upper bound of the ISO image size, in bytes.
    estimated_bytes: int
    #: Source files left off every disc (no directory record type, duplicates).
    skipped: list[Path] = field(default_factory=list)


@dataclass
class _Disc:
    """Running size bound of a disc being filled."""

    options: MediaOptions
    instances: list[Instance] = field(default_factory=list)
    # patient key -> study uid -> series uid -> number of instances
    tree: dict[str, dict[str, dict[str, int]]] = field(default_factory=dict)
    file_sectors: int = 0
    dicomdir: int = DICOMDIR_BASE_BYTES
    index: int = pdi.INDEX_BASE_BYTES
    readme: int = pdi.README_BASE_BYTES

    def copy(self) -> _Disc:
        tree = {p: {s: dict(se) for s, se in st.items()} for p, st in self.tree.items()}
        return _Disc(self.options, [], tree, self.file_sectors, self.dicomdir, self.index, self.readme)

    def add(self, chunk: Sequence[Instance]) -> None:
        """Add instances of one series."""
        if not chunk:
            return
        first = chunk[0]
        h = first.header
        studies = self.tree.get(first.patient_key)
        if studies is None:
            studies = self.tree[first.patient_key] = {}
            self.dicomdir += record_size_bound(h, PATIENT_KEYS)
            self.index += pdi.INDEX_ROW_BYTES + pdi.text_bound(h.get(k) for k, _ in PATIENT_KEYS)
            self.readme += pdi.README_ROW_BYTES + pdi.text_bound(h.get(k) for k, _ in PATIENT_KEYS)
        series = studies.get(first.study_uid)
        if series is None:
            series = studies[first.study_uid] = {}
            self.dicomdir += record_size_bound(h, STUDY_KEYS)
            self.index += pdi.INDEX_ROW_BYTES + pdi.text_bound(h.get(k) for k, _ in STUDY_KEYS)
        if first.series_uid not in series:
            series[first.series_uid] = 0
            self.dicomdir += record_size_bound(h, SERIES_KEYS)
            self.index += pdi.INDEX_ROW_BYTES + pdi.text_bound(h.get(k) for k, _ in SERIES_KEYS)
        series[first.series_uid] += len(chunk)
        for inst in chunk:
            self.dicomdir += instance_record_bound(inst, get_profile(self.options.profile))
            self.file_sectors += -(-inst.output_size // iso.SECTOR)
        self.instances.extend(chunk)

    def size(self) -> int:
        """Upper bound of the ISO image size of the disc."""
        names = ["DICOM"]
        sectors = iso.directory_sectors(_ROOT_RECORDS)
        sectors += iso.uniform_directory_sectors(len(self.tree), _DIR_RECORD)
        for studies in self.tree.values():
            names.append("PAT00001")
            sectors += iso.uniform_directory_sectors(len(studies), _DIR_RECORD)
            for series in studies.values():
                names.append("STU00001")
                sectors += iso.uniform_directory_sectors(len(series), _DIR_RECORD)
                for count in series.values():
                    names.append("SER00001")
                    sectors += iso.uniform_directory_sectors(count, _FILE_RECORD)
        readme = self.readme + 4 * (len(self.options.creator) + len(self.options.contact))
        others = [self.dicomdir, readme, self.index if self.options.web_index else 0]
        return iso.estimate_iso_bytes(sectors + self.file_sectors, iso.path_table_sectors(names), others)

    def fits(self, chunk: Sequence[Instance]) -> bool:
        trial = self.copy()
        trial.add(chunk)
        return trial.size() <= self.options.capacity_bytes


def read_instances(files: Sequence[Path], options: MediaOptions) -> tuple[list[Instance], list[Path]]:
    """Read the headers of `files`; return the usable instances and the skipped paths.

    Raises :class:`MediaError` naming every file the profile refuses (PS3.11: an application
    profile lists the SOP Classes a medium may hold); nothing is left off silently.
    """
    profile = get_profile(options.profile)
    instances: list[Instance] = []
    skipped: list[Path] = []
    refused: list[str] = []
    seen: set[str] = set()
    for path in files:
        inst = read_instance(Path(path), profile, options.source_ae_title)
        if inst is None:
            skipped.append(Path(path))
        elif (why := refusal(profile, inst.sop_class_uid)) is not None:
            refused.append(f"{path} (instance {inst.sop_instance_uid}): {why}")
        elif inst.sop_instance_uid in seen:
            LOGGER.warning("%s: duplicate SOP Instance UID %s left off the medium", path, inst.sop_instance_uid)
            skipped.append(Path(path))
        else:
            seen.add(inst.sop_instance_uid)
            instances.append(inst)
    if refused:
        raise MediaError(f"{len(refused)} instance(s) not allowed on a {profile.name} medium: " + "; ".join(refused))
    return instances, skipped


def plan_instances(instances: Sequence[Instance], options: MediaOptions) -> list[list[Instance]]:
    """Pack `instances` onto discs; returns the instances of each disc."""
    patients = group_instances(instances)
    discs: list[list[Instance]] = []
    current = _Disc(options)

    def close() -> _Disc:
        if current.instances:
            discs.append(current.instances)
        return _Disc(options)

    for patient in patients.values():
        for study in patient.studies.values():
            for series in study.series.values():
                chunk = sorted(series.instances, key=lambda i: (i.instance_number, str(i.path)))
                if current.fits(chunk):
                    current.add(chunk)
                    continue
                if _Disc(options).fits(chunk):
                    current = close()
                    current.add(chunk)
                    continue
                # One series larger than a disc: split it by instance.
                while chunk:
                    lo, hi = 0, len(chunk)  # largest k with current.fits(chunk[:k])
                    while lo < hi:
                        mid = (lo + hi + 1) // 2
                        if current.fits(chunk[:mid]):
                            lo = mid
                        else:
                            hi = mid - 1
                    if lo == 0:
                        if not current.instances:
                            raise MediaError(
                                f"{chunk[0].path}: instance of {chunk[0].output_size} bytes does not fit "
                                f"on a disc of {options.capacity_bytes} bytes"
                            )
                        current = close()
                        continue
                    current.add(chunk[:lo])
                    chunk = chunk[lo:]
                    if chunk:
                        current = close()
    close()
    return discs


def plan_discs(files: Sequence[Path], options: MediaOptions) -> list[DiscPlan]:
    """Plan the discs needed to write `files` (DICOM Part-10 files).

    Reads only the header keys of each file. Raises :class:`MediaError` if
    no file can be written or a single instance exceeds a disc.
    """
    options.validate()
    instances, skipped = read_instances(files, options)
    if not instances:
        raise MediaError("no DICOM instance to write")
    groups = plan_instances(instances, options)
    plans = []
    for k, disc_instances in enumerate(groups, 1):
        bound = _Disc(options)
        for patient in group_instances(disc_instances).values():
            for study in patient.studies.values():
                for se in study.series.values():
                    bound.add(se.instances)
        plans.append(
            DiscPlan(k, len(groups), disc_fileset_id(options.fileset_id, k, len(groups)), disc_instances,
                     bound.size(), skipped)
        )
    return plans
