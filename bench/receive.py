"""Receive benchmark: DCMTK storescu sends one 300-image CT series, once into DCMTK
`storescp -od DIR` and once into our disk server (files + index), in the same run.

Prints each run's seconds, the medians and the ratio ours / DCMTK's (target: <= 1.0).
Usage: python bench/receive.py [--images 300] [--runs 3]
"""

from __future__ import annotations

import argparse
import os
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from modality_link.home import free_port  # noqa: E402

STORESCU = "/usr/bin/storescu"
STORESCP = "/usr/bin/storescp"


def wait_port(port: int) -> None:
    for _ in range(200):
        try:
            socket.create_connection(("127.0.0.1", port), timeout=0.5).close()
            return
        except OSError:
            time.sleep(0.05)
    raise TimeoutError(port)


def send(files: list[str], port: int, called: str) -> float:
    env = dict(os.environ, TCP_NODELAY="1")
    t0 = time.perf_counter()
    subprocess.run([STORESCU, "-aec", called, "127.0.0.1", str(port), *files], env=env, check=True)
    return time.perf_counter() - t0


def run_dcmtk(files: list[str], work: Path) -> float:
    out = work / "storescp"
    shutil.rmtree(out, ignore_errors=True)
    out.mkdir()
    port = free_port()
    proc = subprocess.Popen([STORESCP, "-od", str(out), str(port)], env=dict(os.environ, TCP_NODELAY="1"))
    try:
        wait_port(port)
        return send(files, port, "ANY-SCP")
    finally:
        proc.terminate()
        proc.wait()


def run_ours(files: list[str], work: Path) -> float:
    home = Path(tempfile.mkdtemp(prefix="mlb", dir="/tmp"))
    port = free_port()
    ml = [sys.executable, "-m", "modality_link", "--home", str(home)]
    subprocess.run([*ml, "config", "set", "disk_server.port", str(port)], check=True, capture_output=True)
    proc = subprocess.Popen([*ml, "serve"], stderr=subprocess.DEVNULL)
    try:
        wait_port(port)
        seconds = send(files, port, "MODLINK")
        studies = subprocess.run([*ml, "status", "--json"], check=True, capture_output=True, text=True).stdout
        assert f'"instances": {len(files)}' in studies, studies
        return seconds
    finally:
        proc.terminate()
        proc.wait()
        shutil.rmtree(home, ignore_errors=True)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--images", type=int, default=300)
    ap.add_argument("--runs", type=int, default=3)
    args = ap.parse_args()
    from sim import images

    work = Path(tempfile.mkdtemp(prefix="mlbench"))
    try:
        files = [str(p) for p in images.write_study(work / "ct", modality="CT", images=args.images, rows=512, columns=512, seed=1)]
        size = sum(os.path.getsize(f) for f in files) / 1e6
        print(f"receive: {args.images} CT images 512x512, {size:.0f} MB, DCMTK storescu -> storescp -od / our disk server")
        dcmtk, ours = [], []
        for i in range(args.runs):
            dcmtk.append(run_dcmtk(files, work))
            ours.append(run_ours(files, work))
            print(f"  run {i + 1}: dcmtk storescp {dcmtk[-1]:.2f} s, modality_link {ours[-1]:.2f} s")
        d, o = statistics.median(dcmtk), statistics.median(ours)
        print(f"median: dcmtk storescp {d:.2f} s, modality_link {o:.2f} s, ratio ours/dcmtk {o / d:.2f} (target <= 1.0)")
    finally:
        shutil.rmtree(work, ignore_errors=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
