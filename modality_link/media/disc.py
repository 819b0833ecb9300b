"""Build one disc: staging directory, DICOMDIR, IHE PDI files and ISO 9660 image."""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import modality_link
from modality_link.media import iso, pdi
from modality_link.media.convert import write_instance
from modality_link.media.fileset import assign_file_ids, encode_dicomdir, group_instances, instance_head
from modality_link.media.options import MediaError, MediaOptions
from modality_link.media.profiles import CONVERT, get_profile
from modality_link.media.spanning import DiscPlan, plan_discs

LOGGER = logging.getLogger(__name__)

#: progress(stage, done, total); stage is "stage" (writing staged files) or "iso" (bytes of the image).
Progress = Callable[[str, int, int], None]


@dataclass
class DiscFile:
    """A file written on a disc, for read-back verification."""

    file_id: tuple[str, ...]
    source: Path | None  # None for DICOMDIR, README.TXT, INDEX.HTM
    sha256: str
    size: int


@dataclass
class DiscResult:
    """What :func:`build_disc` wrote."""

    index: int
    count: int
    fileset_id: str
    staging: Path
    iso_path: Path | None
    iso_bytes: int
    #: Every file of the file-set, DICOM instances first.
    files: list[DiscFile] = field(default_factory=list)
    skipped: list[Path] = field(default_factory=list)

    @property
    def instances(self) -> list[DiscFile]:
        return [f for f in self.files if f.source is not None]


def build_disc(
    plan: DiscPlan,
    staging: Path,
    iso_path: Path | None,
    options: MediaOptions,
    progress: Progress | None = None,
) -> DiscResult:
    """Write the disc `plan`.

    `staging` receives DICOMDIR, README.TXT, INDEX.HTM and every converted
    instance (conversion is never done in memory). Instances copied as they
    are (only their File Meta is replaced) are streamed from their source
    straight into the image at `iso_path`; if `iso_path` is ``None`` no image
    is made and `staging` receives the whole file-set instead.

    Raises :class:`MediaError` if the image exceeds ``options.capacity_bytes``.
    """
    options.validate()
    profile = get_profile(options.profile)
    staging = Path(staging)
    staging.mkdir(parents=True, exist_ok=True)
    patients = group_instances(plan.instances)
    placed = assign_file_ids(patients)

    files: list[iso.IsoFile] = []
    sources: dict[tuple[str, ...], Path | None] = {}
    for n, (fid, inst) in enumerate(placed, 1):
        sources[fid] = inst.path
        if iso_path is None or inst.action == CONVERT:
            dest = staging.joinpath(*fid)
            write_instance(inst, dest, profile, options.source_ae_title)
            content = iso.LazyFile(dest)
        else:
            content = iso.LazyFile(inst.path, instance_head(inst, profile, options.source_ae_title),
                                   inst.dataset_offset)
        files.append(iso.IsoFile(fid, content))
        if progress is not None:
            progress("stage", n, len(placed))

    generated = {
        ("DICOMDIR",): encode_dicomdir(
            patients, {id(inst): fid for fid, inst in placed}, plan.fileset_id, options.source_ae_title, profile
        ),
        ("README.TXT",): pdi.readme_text(
            patients, plan.fileset_id, plan.index, plan.count, options.creator, options.contact,
            profile.name, options.web_index,
        ),
    }
    if options.web_index:
        generated[("INDEX.HTM",)] = pdi.index_html(patients, plan.fileset_id, plan.index, plan.count)
    for fid, data in generated.items():
        dest = staging.joinpath(*fid)
        dest.write_bytes(data)
        files.append(iso.IsoFile(fid, iso.LazyFile(dest)))
        sources[fid] = None

    iso_bytes = 0
    if iso_path is not None:
        iso_path = Path(iso_path)
        iso_path.parent.mkdir(parents=True, exist_ok=True)
        cb = (lambda done, total: progress("iso", done, total)) if progress is not None else None
        digests = iso.write_iso(
            files, iso_path, plan.fileset_id, plan.count, plan.index,
            f"MODALITY_LINK {modality_link.__version__}", cb,
        )
        iso_bytes = iso_path.stat().st_size
        if iso_bytes > options.capacity_bytes:
            raise MediaError(
                f"{iso_path}: image of {iso_bytes} bytes exceeds the capacity of {options.capacity_bytes} bytes"
            )
        if iso_bytes > plan.estimated_bytes:
            LOGGER.warning("%s: %d bytes, more than the planned %d", iso_path, iso_bytes, plan.estimated_bytes)
    else:
        digests = {f.components: f.content.sha256 for f in files}
        for f in files:
            f.content.close()

    result = DiscResult(plan.index, plan.count, plan.fileset_id, staging, iso_path, iso_bytes, skipped=plan.skipped)
    result.files = [DiscFile(f.components, sources[f.components], digests[f.components], f.content.length)
                    for f in files]
    return result


def build_media(
    files: Sequence[Path], out_dir: Path, options: MediaOptions, progress: Progress | None = None
) -> list[DiscResult]:
    """Plan and build every disc of `files` into `out_dir`.

    Images are ``<out_dir>/<fileset_id>_<k>.iso``; staging directories
    ``<out_dir>/<fileset_id>_<k>/``.
    """
    out_dir = Path(out_dir)
    results = []
    for plan in plan_discs(files, options):
        stem = f"{options.fileset_id}_{plan.index}"
        results.append(build_disc(plan, out_dir / stem, out_dir / f"{stem}.iso", options, progress))
    return results
