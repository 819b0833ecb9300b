"""Receive benchmark: DCMTK storescu sends 300-image CT series into DCMTK `storescp --fork -od DIR`
and into our disk server (files + index, every acknowledged image flushed), in the same run.

Two loads: one sender, and three senders in parallel (a different series each). The runs
alternate DCMTK / ours, the ratio ours / DCMTK is taken run by run and its median printed with
our service's peak RSS (VmHWM). Target: ratio <= 1.0.
Usage: python bench/receive.py [--images 300] [--runs 3] [--senders 1 3]
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
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from modality_link.home import free_port  # noqa: E402
from modality_link.ipc import IpcClient  # noqa: E402

STORESCU = "/usr/bin/storescu"
STORESCP = "/usr/bin/storescp"
ENV = dict(os.environ, TCP_NODELAY="1")


def wait_port(port: int) -> None:
    for _ in range(400):
        try:
            socket.create_connection(("127.0.0.1", port), timeout=0.5).close()
            return
        except OSError:
            time.sleep(0.05)
    raise TimeoutError(port)


def send(series: list[list[str]], port: int, called: str) -> float:
    """Run one storescu per series at once; seconds until the last one is done."""
    t0 = time.perf_counter()
    procs = [subprocess.Popen([STORESCU, "-aec", called, "127.0.0.1", str(port), *files], env=ENV)
             for files in series]
    for p in procs:
        if p.wait() != 0:
            raise RuntimeError(f"storescu exited with {p.returncode}")
    return time.perf_counter() - t0


def run_dcmtk(series: list[list[str]], work: Path) -> float:
    out = work / "storescp"
    shutil.rmtree(out, ignore_errors=True)
    out.mkdir()
    port = free_port()
    proc = subprocess.Popen([STORESCP, "--fork", "-od", str(out), str(port)], env=ENV)
    try:
        wait_port(port)
        return send(series, port, "ANY-SCP")
    finally:
        proc.terminate()
        proc.wait()


def peak_rss_mib(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    return float("nan")


def cpu_seconds(pid: int) -> tuple[float, float]:
    """(user, system) CPU seconds used by process `pid` so far."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    tick = os.sysconf("SC_CLK_TCK")
    return int(fields[11]) / tick, int(fields[12]) / tick


@contextmanager
def serving(port: int, **settings: str) -> Iterator[tuple[Path, subprocess.Popen]]:
    """`modality-link serve` in a new temporary home, its disk server on `port` and the memory
    server on a free port (or as `settings` say: ``memory_server__port="5000"``), ready for
    associations and IPC; (home, process). Stopped and removed afterwards."""
    home = Path(tempfile.mkdtemp(prefix="mlb", dir="/tmp"))
    ml = [sys.executable, "-m", "modality_link", "--home", str(home)]
    settings = {"disk_server__port": str(port), "memory_server__port": str(free_port()), **settings}
    for key, value in settings.items():
        subprocess.run([*ml, "config", "set", key.replace("__", "."), value], check=True, capture_output=True)
    proc = subprocess.Popen([*ml, "serve"], stderr=subprocess.DEVNULL)
    try:
        wait_port(port)
        for _ in range(400):  # the IPC socket comes up after the listeners
            if (home / "ipc.sock").exists():
                break
            time.sleep(0.05)
        yield home, proc
    finally:
        proc.terminate()
        proc.wait()
        shutil.rmtree(home, ignore_errors=True)


def run_ours(series: list[list[str]]) -> tuple[float, float, tuple[float, float]]:
    """(seconds, peak RSS MiB, (user, system) CPU seconds) of our disk server receiving `series`."""
    port = free_port()
    with serving(port) as (home, proc):
        before = cpu_seconds(proc.pid)
        seconds = send(series, port, "MODLINK")
        after = cpu_seconds(proc.pid)
        rss = peak_rss_mib(proc.pid)
        with IpcClient(home / "ipc.sock") as client:
            instances = client.call("status")["archive"]["instances"]
        assert instances == sum(len(s) for s in series), instances
        return seconds, rss, (after[0] - before[0], after[1] - before[1])


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--images", type=int, default=300)
    ap.add_argument("--runs", type=int, default=3)
    ap.add_argument("--senders", type=int, nargs="+", default=[1, 3])
    args = ap.parse_args()
    from sim import images

    work = Path(tempfile.mkdtemp(prefix="mlbench"))
    try:
        all_series = [
            [str(p) for p in images.write_study(work / f"ct{i}", modality="CT", images=args.images, rows=512,
                                                columns=512, seed=1 + i)]
            for i in range(max(args.senders))
        ]
        size = sum(os.path.getsize(f) for f in all_series[0]) / 1e6
        print(f"receive: {args.images} CT images 512x512 ({size:.0f} MB) per sender, DCMTK storescu -> "
              f"storescp --fork -od / our disk server")
        for n in args.senders:
            series = all_series[:n]
            ratios, dcmtk, ours, rss = [], [], [], []
            for i in range(args.runs):
                dcmtk.append(run_dcmtk(series, work))
                seconds, peak, (user, system) = run_ours(series)
                ours.append(seconds)
                rss.append(peak)
                ratios.append(ours[-1] / dcmtk[-1])
                print(f"  {n} sender(s), run {i + 1}: dcmtk {dcmtk[-1]:.2f} s, modality_link {ours[-1]:.2f} s "
                      f"(ratio {ratios[-1]:.2f}, peak RSS {peak:.0f} MiB, CPU user {user:.2f} s system {system:.2f} s)")
            print(f"{n} sender(s): median dcmtk {statistics.median(dcmtk):.2f} s, modality_link "
                  f"{statistics.median(ours):.2f} s, ratio {statistics.median(ratios):.2f} (target <= 1.0), "
                  f"peak RSS {max(rss):.0f} MiB")
    finally:
        shutil.rmtree(work, ignore_errors=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
