"""SIGKILL of `modality-link serve` while DCMTK storescu sends: what was acknowledged survives.

Each round sends a new 200-image study and kills the service at a random moment (after a random
number of its files reached their final name, plus up to 10 ms); the next
round's start (which reconciles the archive) is where the previous round is checked: every
image storescu saw a success response for is indexed and byte-identical, no index row lacks
its file, no file lacks its row, and no temporary is left.
"""

from __future__ import annotations

import random
import sqlite3
import subprocess
import time
from pathlib import Path

from pydicom import dcmread

from sim import images
from tests.support.instances import dataset_bytes
from tests.support.service import ServiceProcess
from tests.support.tools import acknowledged, dcmtk_env, require_tool
from tests.support.waiting import wait_until

ROUNDS = 30
IMAGES = 200


def check(svc: ServiceProcess, acked: list[Path]) -> None:
    archive = svc.home.archive_dir
    db = sqlite3.connect(f"file:{svc.home.db_path}?mode=ro", uri=True)
    try:
        rows = dict(db.execute("SELECT sop_instance_uid, path FROM instances").fetchall())
    finally:
        db.close()
    for f in acked:
        uid = dcmread(f, stop_before_pixels=True).SOPInstanceUID
        assert uid in rows, f"acknowledged {uid} is not indexed after the restart"
        assert dataset_bytes(archive / rows[uid]) == dataset_bytes(f), f"{uid} differs"
    files = {p.relative_to(archive).as_posix() for p in archive.glob("*/*/*.dcm")}
    assert set(rows.values()) == files, "index rows and archive files differ"
    assert list((archive / ".tmp").iterdir()) == [], "temporaries left after the restart"


def test_sigkill_during_receive_loses_nothing_acknowledged(short_tmp: Path) -> None:
    storescu = require_tool("storescu")
    root = short_tmp / "h"
    rng = random.Random(11)
    acked: list[Path] = []
    cut: list[int] = []  # acknowledged images of the rounds killed mid-receive
    for round_ in range(ROUNDS + 1):
        svc = ServiceProcess.start(root)
        try:
            check(svc, acked)
            if round_ == ROUNDS:
                break
            study = images.write_study(short_tmp / f"s{round_}", modality="CT", images=IMAGES, rows=64,
                                       columns=64, seed=100 + round_)
            sender = subprocess.Popen(
                [storescu, "-v", "-aec", "MODLINK", "127.0.0.1", str(svc.port), *map(str, study)],
                env=dcmtk_env(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
            )
            # A random moment of the receive, whatever the machine's load: once the k-th file
            # has its final name (acknowledged or about to be), give or take a few milliseconds.
            first = dcmread(study[0], stop_before_pixels=True)
            series = svc.home.archive_dir / first.StudyInstanceUID / first.SeriesInstanceUID
            k = rng.randint(1, IMAGES - 1)
            wait_until(lambda: series.is_dir() and sum(1 for _ in series.glob("*.dcm")) >= k, 60,
                       f"{k} files of the study archived", interval=0.002)
            time.sleep(rng.uniform(0, 0.01))
            svc.proc.kill()
            svc.proc.wait()
            out, _ = sender.communicate(timeout=60)
            acked = acknowledged(out)
            if 0 < len(acked) < IMAGES:
                cut.append(len(acked))
        finally:
            svc.stop()
    assert len(cut) >= ROUNDS - 3, f"too few kills landed mid-receive: {cut}"
