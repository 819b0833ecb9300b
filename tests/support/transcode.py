"""Source files in every transfer syntax, for the transcoding tests and bench/decoders.py.

Each variant is made from a plain source (pydicom's CT_small.dcm / MR_small.dcm, or a simulated
512x512 CT) by the DCMTK tool a user would have run (dcmconv, dcmcjpeg, dcmcjpls, dcmcrle), or,
for JPEG 2000 (Debian's DCMTK has no dcmcjp2k), by pydicom's own encoder (pylibjpeg-openjpeg).
"""

from __future__ import annotations

import io
import os
import subprocess
from dataclasses import dataclass
from pathlib import Path

import pydicom
from pydicom import dcmread
from pydicom.dataset import Dataset
from pydicom.uid import JPEG2000, JPEG2000Lossless

from modality_link.fileformat import encode_file_meta
from modality_link.transcode import Converted

TEST_FILES = Path(pydicom.__file__).parent / "data" / "test_files"
#: Attributes decompression sets (PS3.5 §8.2, PS3.3 C.7.6.3, C.7.6.1.1.5).
PIXEL_MODULE = {0x00280004, 0x00280006, 0x00280008, 0x00282110, 0x00282114}


@dataclass(frozen=True)
class Variant:
    """One way of making a file: a name, the command (DCMTK tool and options, or "pydicom"
    and a J2K syntax) and whether the result is lossy."""

    name: str
    tool: str
    options: tuple[str, ...] = ()
    lossy: bool = False
    #: False where no decoder we install can decompress it (docs/design.md, "Decoders").
    decodable: bool = True


#: One line per conversion path; `make` below turns a line into a file.
VARIANTS: tuple[Variant, ...] = (
    Variant("ile", "dcmconv", ("+ti",)),
    Variant("ele", "dcmconv", ("+te",)),
    Variant("ebe", "dcmconv", ("+tb",)),
    Variant("deflated", "dcmconv", ("+td",)),
    Variant("rle", "dcmcrle"),
    Variant("jpeg-sv1", "dcmcjpeg", ("+e1",)),
    Variant("jpeg-lossless", "dcmcjpeg", ("+el",)),
    Variant("jpeg-baseline", "dcmcjpeg", ("+eb",), lossy=True),
    Variant("jpeg-extended", "dcmcjpeg", ("+ee",), lossy=True, decodable=False),  # 12-bit: GDCM has no decoder
    Variant("jpeg-ls", "dcmcjpls", ("+el",)),
    Variant("jpeg-ls-near", "dcmcjpls", ("+en",), lossy=True),
    Variant("j2k-lossless", "pydicom", (JPEG2000Lossless,)),
    Variant("j2k-lossy", "pydicom", (JPEG2000,), lossy=True),
)
BY_NAME = {v.name: v for v in VARIANTS}
DECODABLE = tuple(v for v in VARIANTS if v.decodable)


def make(variant: Variant | str, source: Path, out: Path) -> Path:
    """Write `source` converted by `variant` to `out`; return `out`."""
    v = BY_NAME[variant] if isinstance(variant, str) else variant
    out.parent.mkdir(parents=True, exist_ok=True)
    if v.tool == "pydicom":
        ds = dcmread(source)
        if v.options[0] == JPEG2000:
            ds.compress(JPEG2000, encoding_plugin="pylibjpeg", j2k_cr=[15], generate_instance_uid=False)
        else:
            ds.compress(JPEG2000Lossless, encoding_plugin="pylibjpeg", generate_instance_uid=False)
        ds.save_as(out, enforce_file_format=True)
        return out
    tool = f"/usr/bin/{v.tool}"
    # a lossy DCMTK encoding would give the image a new UID by default; keep it (+un): the
    # tests compare what the peer received with the file they sent
    uid = ("+un",) if v.tool in ("dcmcjpeg", "dcmcjpls") else ()
    subprocess.run([tool, *v.options, *uid, str(source), str(out)], check=True,
                   env=dict(os.environ), capture_output=True)
    return out


def sim_ct(out: Path, rows: int = 512, columns: int = 512) -> Path:
    """One simulated CT image (12 bits stored, unsigned) in Explicit VR Little Endian."""
    from sim import images

    paths = images.write_study(out, modality="CT", images=1, rows=rows, columns=columns, seed=5)
    return paths[0]


@dataclass(frozen=True)
class Case:
    """A source converted by one variant: `plain` is the uncompressed Explicit VR Little Endian
    file it was made from, with its own SOP Instance UID `uid` (so that every case can sit in
    one archive), `path` the converted file."""

    name: str
    variant: str
    uid: str
    plain: Path
    path: Path
    lossy: bool


@dataclass
class Cases:
    all: list[Case]
    #: (variant, source) pairs the tool refused (dcmcjpls +en on signed pixels, for one).
    refused: list[tuple[str, str]]

    def of(self, variant: str) -> list[Case]:
        return [c for c in self.all if c.variant == variant]


def make_cases(out: Path, variants: tuple[Variant, ...] = VARIANTS, ct_size: int = 64) -> Cases:
    """Every variant of CT_small.dcm, MR_small.dcm and a simulated CT, each with a new UID."""
    from pydicom.uid import generate_uid

    sources = {"CT_small": TEST_FILES / "CT_small.dcm", "MR_small": TEST_FILES / "MR_small.dcm",
               "simCT": sim_ct(out / "sim", ct_size, ct_size)}
    cases, refused = [], []
    for v in variants:
        for name, source in sources.items():
            ds = dcmread(source)
            uid = generate_uid(prefix="1.2.826.0.1.3680043.10.543.")
            ds.SOPInstanceUID = uid
            ds.file_meta.MediaStorageSOPInstanceUID = uid
            plain = out / "plain" / f"{name}-{v.name}.dcm"
            plain.parent.mkdir(parents=True, exist_ok=True)
            ds.save_as(plain, enforce_file_format=True)
            try:
                path = make(v, plain, out / "cases" / f"{name}-{v.name}.dcm")
            except subprocess.CalledProcessError:
                refused.append((v.name, name))
                continue
            cases.append(Case(f"{name}-{v.name}", v.name, uid, plain, path, v.lossy))
    return Cases(cases, refused)


def reread(out: Converted) -> Dataset:
    head = encode_file_meta("1.2.3", "1.2.3", out.transfer_syntax, "TEST")
    return dcmread(io.BytesIO(head + out.data))


def differences(a: Dataset, b: Dataset, skip: set[int] = frozenset(), where: str = "") -> list[str]:
    """Attributes of `a` and `b` that differ (values as pydicom reads them); private values are
    compared only when both sides know their VR (Implicit VR makes an unknown private element UN)."""
    out = []
    tags = {t for t in a.keys() if t.element != 0} | {t for t in b.keys() if t.element != 0}
    # Pixel Data compared by the callers; Data Set Trailing Padding has no meaning (PS3.10 §7.2)
    for tag in sorted(tags - {0x7FE00010, 0xFFFCFFFC} - skip):
        if tag not in a or tag not in b:
            out.append(f"{where}{tag} only in {'source' if tag in a else 'result'}")
            continue
        x, y = a[tag], b[tag]
        if x.VR == "SQ" and y.VR == "SQ":
            if len(x.value) != len(y.value):
                out.append(f"{where}{tag}: {len(x.value)} items != {len(y.value)}")
            for i, (p, q) in enumerate(zip(x.value, y.value)):
                out.extend(differences(p, q, skip, f"{where}{tag}[{i}]."))
        elif tag.is_private and "UN" in (x.VR, y.VR):
            continue
        elif x.value != y.value:
            out.append(f"{where}{tag} {x.VR}: {str(x.value)[:40]!r} != {str(y.value)[:40]!r}")
    return out
