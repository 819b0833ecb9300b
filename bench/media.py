"""Benchmark: modality_link.media vs DCMTK dcmmkdir + genisoimage.

Builds a single CT series of 4 000 small instances and a 1 300-image series,
then for each makes a DICOMDIR + ISO 9660 Level 1 image twice, on the same
files: with modality_link.media (in a child process, whose peak RSS is taken
from os.wait4) and with /usr/bin/dcmmkdir + /usr/bin/genisoimage -iso-level 1.

    python3 bench/media.py            # 4000 x 64x64 and the CD-sized 1300 x 512x512 (~680 MB)
    python3 bench/media.py --quick    # 4000 x 32x32 and 1300 x 64x64
    python3 bench/media.py --large-size 256   # 1300 x 256x256 (~170 MB), for a small disk
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.uid import CTImageStorage, ExplicitVRLittleEndian, generate_uid

ROOT = Path(__file__).resolve().parents[1]

CHILD = r"""
import json, sys, time, resource
from pathlib import Path
sys.path.insert(0, sys.argv[3])
from modality_link.media import MediaOptions, build_disc, plan_discs
from modality_link.media.fileset import assign_file_ids, encode_dicomdir, group_instances
from modality_link.media.profiles import get_profile
files = sorted(Path(sys.argv[1]).rglob("IM*"))
out = Path(sys.argv[2])
options = MediaOptions(capacity_bytes=8 * 1024**3)
t0 = time.perf_counter()
plans = plan_discs(files, options)
t1 = time.perf_counter()
patients = group_instances(plans[0].instances)
ids = {id(i): f for f, i in assign_file_ids(patients)}
dicomdir = encode_dicomdir(patients, ids, "BENCH", "BENCH", get_profile(options.profile))
t2 = time.perf_counter()
result = build_disc(plans[0], out / "stage", out / "ours.iso", options)
t3 = time.perf_counter()
print(json.dumps({"headers": t1 - t0, "dicomdir": t2 - t1, "build_disc": t3 - t2,
                  "total": (t1 - t0) + (t3 - t2), "iso_bytes": result.iso_bytes, "dicomdir_bytes": len(dicomdir)}))
"""


def make_series(root: Path, count: int, size: int) -> None:
    """Write `count` CT instances of `size` x `size` into root/DICOM/S1/IMnnnnnn."""
    study, series, frame = generate_uid(), generate_uid(), generate_uid()
    directory = root / "DICOM" / "S1"
    directory.mkdir(parents=True)
    rng = np.random.default_rng(0)
    pixels = rng.integers(0, 4096, size=(size, size), dtype=np.uint16).tobytes()
    for i in range(1, count + 1):
        ds = Dataset()
        ds.SpecificCharacterSet = "ISO_IR 100"
        ds.ImageType = ["ORIGINAL", "PRIMARY", "AXIAL"]
        ds.SOPClassUID = CTImageStorage
        ds.SOPInstanceUID = generate_uid()
        ds.StudyDate, ds.StudyTime, ds.AccessionNumber, ds.Modality = "20240102", "101500", "ACC1", "CT"
        ds.StudyDescription, ds.SeriesDescription = "Bench study", "Bench series"
        ds.PatientName, ds.PatientID, ds.PatientBirthDate, ds.PatientSex = "BENCH^MARK", "BENCH1", "19700101", "O"
        ds.StudyInstanceUID, ds.SeriesInstanceUID, ds.FrameOfReferenceUID = study, series, frame
        ds.StudyID, ds.SeriesNumber, ds.InstanceNumber = "1", 1, i
        ds.ImagePositionPatient = [0.0, 0.0, float(i)]
        ds.ImageOrientationPatient = [1.0, 0.0, 0.0, 0.0, 1.0, 0.0]
        ds.SamplesPerPixel, ds.PhotometricInterpretation = 1, "MONOCHROME2"
        ds.Rows = ds.Columns = size
        ds.PixelSpacing = [0.5, 0.5]
        ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, 12, 11, 0
        ds.RescaleIntercept, ds.RescaleSlope = -1024, 1
        ds.PixelData = pixels
        ds["PixelData"].VR = "OW"
        ds.file_meta = FileMetaDataset()
        ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
        ds.save_as(directory / f"IM{i:06d}", enforce_file_format=True)


def run_ours(src: Path, work: Path) -> dict:
    out = work / "ours"
    out.mkdir()
    proc = subprocess.Popen([sys.executable, "-c", CHILD, str(src), str(out), str(ROOT)], stdout=subprocess.PIPE,
                            text=True)
    stdout = proc.stdout.read()  # type: ignore[union-attr]
    _, status, usage = os.wait4(proc.pid, 0)
    proc.returncode = os.waitstatus_to_exitcode(status)
    if proc.returncode:
        raise SystemExit(f"modality_link child failed ({proc.returncode})")
    figures = json.loads(stdout.strip().splitlines()[-1])
    figures["peak_rss_mb"] = usage.ru_maxrss / 1024  # KiB on Linux
    return figures


def run_dcmtk(src: Path, work: Path) -> dict:
    for tool in ("/usr/bin/dcmmkdir", "/usr/bin/genisoimage"):
        if not os.access(tool, os.X_OK):
            raise SystemExit(f"{tool} is needed for the comparison")
    tree = work / "dcmtk"
    shutil.copytree(src, tree)  # dcmmkdir writes DICOMDIR next to the files; not timed
    t0 = time.perf_counter()
    subprocess.run(["/usr/bin/dcmmkdir", "+r", "-Pgp", "+D", "DICOMDIR", "DICOM"], cwd=tree, check=True,
                   stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    t1 = time.perf_counter()
    subprocess.run(["/usr/bin/genisoimage", "-quiet", "-iso-level", "1", "-o", str(work / "dcmtk.iso"), str(tree)],
                   check=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    t2 = time.perf_counter()
    return {"dcmmkdir": t1 - t0, "genisoimage": t2 - t1, "total": t2 - t0}


def bench(name: str, count: int, size: int, base: Path) -> dict:
    work = base / name
    src = work / "src"
    t = time.perf_counter()
    make_series(src, count, size)
    print(f"\n== {name}: {count} instances of {size}x{size} (generated in {time.perf_counter() - t:.1f} s)")
    ours = run_ours(src, work)
    dcmtk = run_dcmtk(src, work)
    print(f"  modality_link: headers {ours['headers']:.2f} s, DICOMDIR {ours['dicomdir']:.3f} s, "
          f"build_disc (DICOMDIR+ISO) {ours['build_disc']:.2f} s, total {ours['total']:.2f} s, "
          f"peak RSS {ours['peak_rss_mb']:.0f} MB, ISO {ours['iso_bytes'] / 1e6:.1f} MB")
    print(f"  DCMTK:         dcmmkdir {dcmtk['dcmmkdir']:.2f} s, genisoimage {dcmtk['genisoimage']:.2f} s, "
          f"total {dcmtk['total']:.2f} s")
    ratio_dir = dcmtk["dcmmkdir"] / (ours["headers"] + ours["dicomdir"])
    ratio = dcmtk["total"] / ours["total"]
    print(f"  ratio DCMTK/ours: DICOMDIR (headers included) {ratio_dir:.1f}x, DICOMDIR+ISO {ratio:.1f}x")
    shutil.rmtree(work)
    return {"ours": ours, "dcmtk": dcmtk, "ratio": ratio, "ratio_dicomdir": ratio_dir}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="small images (4000 x 32x32, 1300 x 64x64)")
    parser.add_argument("--small-size", type=int, default=None, help="matrix of the 4000-instance series")
    parser.add_argument("--large-size", type=int, default=None, help="matrix of the 1300-instance series")
    parser.add_argument("--tmp", type=Path, default=None, help="work directory (default: system temp)")
    args = parser.parse_args()
    small = args.small_size or (32 if args.quick else 64)
    large = args.large_size or (64 if args.quick else 512)
    with tempfile.TemporaryDirectory(dir=args.tmp) as tmp:
        a = bench("series4000", 4000, small, Path(tmp))
        b = bench("series1300", 1300, large, Path(tmp))
    ok = a["ratio"] >= 10 and b["ratio"] >= 1 and max(a["ours"]["peak_rss_mb"], b["ours"]["peak_rss_mb"]) < 200
    print(f"\ntargets (>=10x on 4000, >=1x on 1300, peak < 200 MB): {'met' if ok else 'NOT met'}")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
