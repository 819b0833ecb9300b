"""Ingest benchmark: the acquisition hands a CT series to the service with `exam.add_image` (each
image completed with the exam's data and flushed before the reply), against DCMTK's network
receive of the same files (storescu into `storescp -od DIR`, nothing flushed), in the same run.

Two ways of handing over: one `exam.add_image` call with every path (what `modality-link exam add`
does), and one call per image (an acquisition that hands each image over as it is reconstructed).
The runs alternate DCMTK / ours; the ratio ours / DCMTK is taken run by run and its median printed
with the service's peak RSS (VmHWM). Target: ratio <= 1.0.
Usage: python bench/ingest.py [--images 300 1000] [--runs 3]
"""

from __future__ import annotations

import argparse
import os
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench.receive import peak_rss_mib, run_dcmtk, serving  # noqa: E402
from modality_link.home import free_port  # noqa: E402
from modality_link.ipc import IpcClient  # noqa: E402


def run_ours(files: list[str], per_image: bool) -> tuple[float, float]:
    """(seconds, peak RSS MiB) of `exam.add_image` of `files` into a new service's exam."""
    with serving(free_port()) as (home, proc), IpcClient(home / "ipc.sock", timeout=600) as client:
        exam = client.call("exam.start", patient_id="BENCH1", patient_name="Bench^Ingest")["exam_id"]
        t0 = time.perf_counter()
        if per_image:
            for f in files:
                client.call("exam.add_image", exam_id=exam, paths=[f])
        else:
            client.call("exam.add_image", exam_id=exam, paths=files)
        seconds = time.perf_counter() - t0
        rss = peak_rss_mib(proc.pid)
        assert client.call("status")["archive"]["instances"] == len(files)
        return seconds, rss


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--images", type=int, nargs="+", default=[300, 1000])
    ap.add_argument("--runs", type=int, default=3)
    args = ap.parse_args()
    from sim import images

    work = Path(tempfile.mkdtemp(prefix="mlbench"))
    try:
        for n in args.images:
            files = [str(p) for p in images.write_study(work / f"ct{n}", modality="CT", images=n, rows=512,
                                                        columns=512, seed=n)]
            size = sum(os.path.getsize(f) for f in files) / 1e6
            print(f"ingest: {n} CT images 512x512 ({size:.0f} MB): DCMTK storescu -> storescp -od, "
                  f"against exam.add_image")
            for per_image in (False, True):
                how = "one call per image" if per_image else "one call"
                ratios, dcmtk, ours, rss = [], [], [], []
                for i in range(args.runs):
                    dcmtk.append(run_dcmtk([files], work))
                    seconds, peak = run_ours(files, per_image)
                    ours.append(seconds)
                    rss.append(peak)
                    ratios.append(ours[-1] / dcmtk[-1])
                    print(f"  {how}, run {i + 1}: dcmtk {dcmtk[-1]:.2f} s, modality_link {ours[-1]:.2f} s "
                          f"(ratio {ratios[-1]:.2f}, peak RSS {peak:.0f} MiB)")
                print(f"{n} images, {how}: median dcmtk {statistics.median(dcmtk):.2f} s, modality_link "
                      f"{statistics.median(ours):.2f} s, ratio {statistics.median(ratios):.2f} (target <= 1.0), "
                      f"peak RSS {max(rss):.0f} MiB")
            shutil.rmtree(work / f"ct{n}", ignore_errors=True)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
