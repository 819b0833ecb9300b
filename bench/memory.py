"""Memory server benchmark: DCMTK storescu sends a 300-image CT series into DCMTK
`storescp -od` writing to a RAM folder (/dev/shm) and into our memory server (RAM cache, nothing
on disk), in the same run.

Two loads on our side: nobody subscribed to IPC events, and a viewer subscribed (each arrival is
then decoded and announced as ``memory.stored``; the viewer reads every event). The runs alternate
DCMTK / ours; the ratio ours / DCMTK is taken run by run and its median printed with the cache's
bytes (held in memory files, so not in the peak RSS, VmHWM, printed beside). Target: ratio <= 1.0.
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


def run_ours(files: list[str], subscribed: bool) -> tuple[float, float, float]:
    """(seconds, peak RSS MiB, cache MiB) of our memory server receiving `files`."""
    mem_port = free_port()
    with serving(free_port(), memory_server__port=str(mem_port)) as (home, proc):
        wait_port(mem_port)
        with IpcClient(home / "ipc.sock") as viewer:
            if subscribed:
                viewer.call("events.subscribe")
            seconds = send([files], mem_port, "MODLINK_MEM")
            events = 0
            while subscribed and events < len(files):
                event = viewer.next_event(30)
                assert event is not None, f"{events} memory.stored events"
                events += event["type"] == "memory.stored"
        rss = peak_rss_mib(proc.pid)
        with IpcClient(home / "ipc.sock") as client:
            held = client.call("memory.list")
        assert held["instances"] == len(files), held["instances"]
        return seconds, rss, held["bytes"] / (1 << 20)


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
        results: dict[str, list[tuple[float, float, float, float]]] = {"no subscriber": [], "a subscriber": []}
        for i in range(args.runs):
            for load, runs in results.items():
                dcmtk = run_dcmtk_ram(files)
                seconds, rss, cache = run_ours(files, load == "a subscriber")
                runs.append((seconds / dcmtk, dcmtk, seconds, rss))
                print(f"  run {i + 1}, {load}: dcmtk {dcmtk:.2f} s, modality_link {seconds:.2f} s "
                      f"(ratio {seconds / dcmtk:.2f}, cache {cache:.0f} MiB, peak RSS {rss:.0f} MiB)")
        for load, runs in results.items():
            print(f"{load}: median dcmtk {statistics.median(r[1] for r in runs):.2f} s, modality_link "
                  f"{statistics.median(r[2] for r in runs):.2f} s, ratio {statistics.median(r[0] for r in runs):.2f} "
                  f"(target <= 1.0), peak RSS {max(r[3] for r in runs):.0f} MiB")
    finally:
        shutil.rmtree(work, ignore_errors=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
