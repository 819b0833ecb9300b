"""Memory server benchmark: DCMTK storescu sends a 300-image CT series into DCMTK
`storescp -od` writing to a RAM folder (/dev/shm) and into our memory server (RAM cache, nothing
on disk), in the same run.

The runs alternate DCMTK / ours; the ratio ours / DCMTK is taken run by run and its median printed
with our service's peak RSS (VmHWM). Target: ratio <= 1.0.
Usage: python bench/memory.py [--images 300] [--runs 5]
"""

from __future__ import annotations

import argparse
import shutil
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench.receive import ENV, STORESCP, peak_rss_mib, send, serving, wait_port  # noqa: E402
from modality_link.home import free_port  # noqa: E402
from modality_link.ipc import IpcClient  # noqa: E402



def run_dcmtk_ram(files: list[str]) -> float:
    out = Path(tempfile.mkdtemp(prefix="mlbench", dir="/dev/shm"))
    port = free_port()
    proc = subprocess.Popen([STORESCP, "--fork", "-od", str(out), str(port)], env=ENV)
    try:
        wait_port(port)
        return send([files], port, "ANY-SCP")
    finally:
        proc.terminate()
        proc.wait()
        shutil.rmtree(out, ignore_errors=True)


def run_ours(files: list[str]) -> tuple[float, float]:
    mem_port = free_port()
    with serving(free_port(), memory_server__port=str(mem_port)) as (home, proc):
        wait_port(mem_port)
        seconds = send([files], mem_port, "MODLINK_MEM")
        rss = peak_rss_mib(proc.pid)
        with IpcClient(home / "ipc.sock") as client:
            held = client.call("memory.list")["instances"]
        assert held == len(files), held
        return seconds, rss


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--images", type=int, default=300)
    ap.add_argument("--runs", type=int, default=5)
    args = ap.parse_args()
    from sim import images

    work = Path(tempfile.mkdtemp(prefix="mlbench"))
    try:
        files = [str(p) for p in images.write_study(work / "ct", modality="CT", images=args.images, rows=512,
                                                     columns=512, seed=1)]
        print(f"memory: {args.images} CT images 512x512, DCMTK storescu -> storescp -od /dev/shm / our memory server")
        ratios, dcmtk, ours, rss = [], [], [], []
        for i in range(args.runs):
            dcmtk.append(run_dcmtk_ram(files))
            seconds, peak = run_ours(files)
            ours.append(seconds)
            rss.append(peak)
            ratios.append(seconds / dcmtk[-1])
            print(f"  run {i + 1}: dcmtk {dcmtk[-1]:.2f} s, modality_link {seconds:.2f} s "
                  f"(ratio {ratios[-1]:.2f}, peak RSS {peak:.0f} MiB)")
        print(f"median dcmtk {statistics.median(dcmtk):.2f} s, modality_link {statistics.median(ours):.2f} s, "
              f"ratio {statistics.median(ratios):.2f} (target <= 1.0), peak RSS {max(rss):.0f} MiB")
    finally:
        shutil.rmtree(work, ignore_errors=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
