"""Benchmark: 300 CT images (512x512) to DCMTK storescp -od DIR, by DCMTK storescu and by our
`send --wait` (service already running; only the send is timed), in turn. Prints the medians and
the ratios (of the medians, and the median of the run-by-run ratios, which holds when the
machine's speed drifts). Run it with the README's venv python (or `tox -e bench`): the CLI's start
is part of our time.

    python3 bench/send.py [--images 300] [--reps 3]
"""

from __future__ import annotations

import argparse
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from modality_link import config  # noqa: E402
from modality_link.home import free_port, temporary_home  # noqa: E402
from modality_link.ipc import IpcClient  # noqa: E402
from sim import images  # noqa: E402

ENV = dict(os.environ, TCP_NODELAY="1", PYTHONPATH=str(ROOT))


def main() -> int:
    p = argparse.ArgumentParser()
    p.add_argument("--images", type=int, default=300)
    p.add_argument("--reps", type=int, default=3)
    a = p.parse_args()
    work = Path(tempfile.mkdtemp(prefix="mlbench"))
    src = work / "src"
    files = images.write_study(src, modality="CT", images=a.images, rows=512, columns=512, seed=5)
    out = work / "out"
    out.mkdir()
    port = free_port()
    scp = subprocess.Popen(["/usr/bin/storescp", "-od", str(out), "-aet", "STORESCP", str(port)],
                           env=ENV, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    # storescp serves one association at a time: release ours at the end of the job so that
    # DCMTK's storescu, next in the same run, is not kept waiting behind it.
    home = temporary_home(nodes={"SCP": config.Node(ae_title="STORESCP", host="127.0.0.1", port=port,
                                                    roles=["store"], idle_release=0)})
    ml = [sys.executable, "-m", "modality_link", "--home", str(home.root)]
    service = subprocess.Popen([*ml, "serve"], env=ENV, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        for _ in range(200):
            if home.socket_path.exists():
                break
            time.sleep(0.05)
        time.sleep(0.5)
        subprocess.run([*ml, "import", str(src)], env=ENV, check=True, stdout=subprocess.DEVNULL)
        with IpcClient(home.socket_path) as c:
            study = c.call("studies.list")[0]["study_uid"]
        dcmtk, ours = [], []
        for _ in range(a.reps):
            for d in out.iterdir():
                d.unlink()
            t = time.perf_counter()
            subprocess.run(["/usr/bin/storescu", "-aec", "STORESCP", "127.0.0.1", str(port),
                            *map(str, files)], env=ENV, check=True)
            dcmtk.append(time.perf_counter() - t)
            for d in out.iterdir():
                d.unlink()
            t = time.perf_counter()
            subprocess.run([*ml, "send", study, "--to", "SCP", "--wait"], env=ENV, check=True,
                           stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
            ours.append(time.perf_counter() - t)
            assert len(list(out.iterdir())) == a.images
        md, mo = statistics.median(dcmtk), statistics.median(ours)
        print(f"DCMTK storescu: {md:.2f} s (runs {', '.join(f'{x:.2f}' for x in dcmtk)})")
        print(f"modality-link send --wait: {mo:.2f} s (runs {', '.join(f'{x:.2f}' for x in ours)})")
        pairs = sorted(o / d for o, d in zip(ours, dcmtk))
        print(f"ratio ours/DCMTK: {mo / md:.2f}x of the medians; run by run "
              f"{statistics.median(pairs):.2f}x (min {pairs[0]:.2f}, max {pairs[-1]:.2f}) "
              f"({a.images} images of 512x512)")
    finally:
        service.terminate()
        service.wait()
        scp.terminate()
        scp.wait()
        shutil.rmtree(work, ignore_errors=True)
        shutil.rmtree(home.root, ignore_errors=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
