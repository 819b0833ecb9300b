"""The disk clean-up (docs/design.md "Disk clean-up"): a real service, real files, real SQLite,
Storage Commitment by the simulated PACS on loopback.

- only committed, unprotected, idle studies go, least recently used first, down to the low
  mark; a protected study, one with a queued send, one of an open exam and an uncommitted one
  stay; a dry run lists the same studies a real run then deletes;
- an archive filled with data that may not be deleted raises one alert with the numbers, and
  nothing is deleted;
- SIGKILL of ``serve`` while a cleanup deletes many studies leaves files and index consistent.
"""

from __future__ import annotations

import json
import math
import random
import shutil
import sqlite3
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any, Iterator

import pytest
from pydicom import dcmread

from modality_link.archive import Archive
from modality_link.config import Node
from modality_link.home import Home, free_port, temporary_home
from modality_link.ipc import IpcError
from sim import images
from sim.pacs import Pacs
from tests.support.acceptor import local_server
from tests.support.service import InProcessService, ServiceProcess, call, wait_chain
from tests.support.tools import dcmtk_env, require_tool
from tests.support.waiting import wait_until

MIB = 1 << 20


@pytest.fixture
def pacs() -> Iterator[Pacs]:
    p = Pacs(ae_title="SIMPACS", commit_mode="same").start()
    yield p
    p.stop()


def pacs_node(pacs: Pacs, **kw: Any) -> Node:
    """The simulated PACS as node PACS: store and commit, quick retries."""
    settings: dict[str, Any] = {"ae_title": pacs.ae_title, "host": "127.0.0.1", "port": pacs.port,
                                "roles": ["store", "commit"], "retry_interval": 0.2, "commit_wait": 10.0}
    return Node(**(settings | kw))


def write_studies(folder: Path, count: int, images_each: int = 4, seed: int = 0) -> list[Path]:
    """`count` CT studies of 128x128 images, each in its own folder."""
    out = []
    for n in range(count):
        d = folder / f"study{n:02d}"
        images.write_study(d, modality="CT", images=images_each, rows=128, columns=128, seed=seed + n)
        out.append(d)
    return out


def import_study(home: Home, folder: Path) -> str:
    """Import one study's folder; its Study Instance UID."""
    res = call(home, "archive.import", paths=[str(folder)])
    assert res["imported"] and not res["failed"], res
    return str(dcmread(next(folder.iterdir()), stop_before_pixels=True).StudyInstanceUID)


def study_files(home: Home) -> dict[str, int]:
    """{Study Instance UID: bytes of its files} of the archive folder."""
    return {d.name: sum(f.stat().st_size for f in d.glob("*/*.dcm"))
            for d in home.archive_dir.iterdir() if d.is_dir() and d.name != ".tmp"}


def send_committed(home: Home, study_uids: list[str], node: str = "PACS") -> None:
    job = call(home, "send", study_uids=study_uids, node=node, commit=True)
    last = wait_chain(home, job["job_id"])
    assert last["kind"] == "commit" and last["state"] == "done", last


def cli(home: Home, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "modality_link", "--home", str(home.root), *args],
                          capture_output=True, text=True, timeout=120)


def set_marks(home: Home, quota_mb: int, high: int, low: int) -> None:
    """The quota and the marks, in an order each step of which is valid (low < high)."""
    call(home, "config.set", key="archive.cleanup_low", value="0")
    call(home, "config.set", key="archive.cleanup_high", value=str(high))
    call(home, "config.set", key="archive.cleanup_low", value=str(low))
    call(home, "config.set", key="archive.quota_mb", value=str(quota_mb))


def consistent(home: Home) -> set[str]:
    """Check the archive folder against its index (the service stopped, or not deleting):
    every row has its file, every file its row, no deletion mark and no temporary is left;
    return the studies the index holds."""
    db = sqlite3.connect(f"file:{home.db_path}?mode=ro", uri=True)
    try:
        rows = dict(db.execute("SELECT path, size FROM instances").fetchall())
        marks = db.execute("SELECT COUNT(*) FROM deletions").fetchone()[0]
        studies = {r[0] for r in db.execute("SELECT study_uid FROM studies")}
        empty = db.execute("""SELECT COUNT(*) FROM studies s WHERE NOT EXISTS
                              (SELECT 1 FROM series se WHERE se.study_uid=s.study_uid)""").fetchone()[0]
    finally:
        db.close()
    files = {p.relative_to(home.archive_dir).as_posix(): p.stat().st_size for p in home.archive_dir.glob("*/*/*.dcm")}
    assert rows == files, f"rows without files: {sorted(rows.keys() - files.keys())[:3]}, " \
                          f"files without rows: {sorted(files.keys() - rows.keys())[:3]}"
    assert marks == 0 and empty == 0
    assert [p for p in (home.archive_dir / ".tmp").iterdir()] == []
    assert {p.split("/")[0] for p in files} == studies
    assert {d.name for d in home.archive_dir.iterdir() if d.name != ".tmp"} == studies, "empty folders left"
    return studies


def test_only_committed_idle_unprotected_studies_go_lru_first(short_tmp: Path, pacs: Pacs) -> None:
    closed = free_port()  # nothing listens there: a send to OFFLINE stays queued for its retry
    home = temporary_home(short_tmp / "h", nodes={
        "PACS": pacs_node(pacs),
        "OFFLINE": Node(ae_title="OFFLINE", host="127.0.0.1", port=closed, roles=["store"], retry_interval=3600),
    }, archive__quota_mb=100)
    svc = InProcessService(home)
    try:
        assert svc.service.cleaner is not None
        svc.service.cleaner.stop()  # the test decides when the policy runs (IPC cleanup runs it at once)
        folders = write_studies(short_tmp / "in", 8)
        uncommitted, protected, queued, *eligible = [import_study(home, f) for f in folders]
        # an exam in progress whose images are committed already (sent at series completion)
        exam = call(home, "exam.start", patient_id="OPEN1", patient_name="Open^Exam")
        spool = write_studies(short_tmp / "spool", 1, seed=50)[0]
        call(home, "exam.add_image", exam_id=exam["exam_id"], paths=[str(p) for p in sorted(spool.iterdir())])
        open_exam = exam["study_uid"]
        # use: the blocked studies first (they would be the first to go), then the others in order
        for study in [protected, queued, open_exam, *eligible]:
            send_committed(home, [study])
        job = call(home, "send", study_uids=[queued], node="OFFLINE")["job_id"]
        wait_until(lambda: call(home, "jobs.show", id=job)["attempts"] == 1, 30, "the first failed attempt")
        assert call(home, "jobs.show", id=job)["state"] == "queued"
        assert cli(home, "studies", "protect", protected).returncode == 0
        listed = {s["study_uid"]: s for s in call(home, "studies.list")}
        assert listed[protected]["protected"] and not listed[queued]["protected"]
        assert listed[eligible[0]]["last_used"] < listed[eligible[1]]["last_used"] < listed[eligible[4]]["last_used"]

        # marks such that exactly the three least recently used eligible studies must go
        sizes = study_files(home)
        total = sum(sizes.values())
        quota = math.ceil(total / MIB) * MIB
        first3 = sum(sizes[s] for s in eligible[:3])
        low = math.ceil(100 * (total - first3) / quota)
        assert low < 100 * (total - first3 + sizes[eligible[2]]) / quota, "the studies are too small for whole percents"
        high = int(100 * total / quota) - 1
        assert low < high
        set_marks(home, quota // MIB, high, low)

        dry = cli(home, "cleanup", "--dry-run", "--json")
        assert dry.returncode == 0, dry.stderr
        would = json.loads(dry.stdout)
        assert would["dry_run"] and would["above_high"]
        assert [s["study_uid"] for s in would["deleted"]] == eligible[:3], json.dumps(would, indent=1)
        assert study_files(home) == sizes, "a dry run deleted something"
        assert would["blocked"] == {
            "protected": {"studies": 1, "bytes": sizes[protected]},
            "open-exam": {"studies": 1, "bytes": sizes[open_exam]},
            "active-job": {"studies": 1, "bytes": sizes[queued]},
            "uncommitted": {"studies": 1, "bytes": sizes[uncommitted]},
        }

        done = call(home, "cleanup")
        assert [s["study_uid"] for s in done["deleted"]] == eligible[:3]
        assert done["deleted_bytes"] == first3 and done["after"]["percent"] <= low < done["before"]["percent"]
        assert set(study_files(home)) == set(sizes) - set(eligible[:3])
        assert {s["study_uid"] for s in call(home, "studies.list")} == set(sizes) - set(eligible[:3])
        consistent(home)
        assert not [a for a in call(home, "alerts.list") if a["code"] == "disk-cleanup-blocked"]
        # below the high mark now: a second run deletes nothing
        again = call(home, "cleanup")
        assert not again["above_high"] and again["deleted"] == []

        with pytest.raises(IpcError) as exc:
            call(home, "studies.protect", study_uid=eligible[0])
        assert exc.value.code == -32002
        out = cli(home, "studies", "unprotect", protected)
        assert out.returncode == 0 and "not protected" in out.stdout
    finally:
        svc.stop()


def test_a_disk_full_of_uncommitted_data_raises_one_alert_and_deletes_nothing(short_tmp: Path, pacs: Pacs) -> None:
    """The service's own runs (after a new quota, after a commitment report) find nothing they
    may delete: one alert naming the studies and bytes that hold the archive, raised once,
    cleared when resolved."""
    svc = ServiceProcess.start(short_tmp / "h", nodes={"PACS": pacs_node(pacs)}, archive__quota_mb=100,
                               archive__cleanup_high=50, archive__cleanup_low=25)
    try:
        write_studies(short_tmp / "in", 6)
        assert svc.cli("import", str(short_tmp / "in")).returncode == 0
        sizes = study_files(svc.home)
        total = sum(sizes.values())
        studies = sorted(sizes)
        assert 50 < 100 * (total - sizes[studies[0]]) / MIB and total < MIB, "the study sizes do not fit the test"

        def alerts() -> list[dict[str, Any]]:
            return [a for a in svc.call("alerts.list") if a["code"] == "disk-cleanup-blocked"]

        assert svc.cli("config", "set", "archive.quota_mb", "1").returncode == 0
        (alert,) = wait_until(alerts, 30, "the disk-cleanup-blocked alert")
        assert f"6 study(ies) ({total / 1e6:.1f} MB) not committed at PACS" in alert["message"], alert
        assert alert["level"] == "warning"
        run = json.loads(svc.cli("cleanup", "--json").stdout)
        assert run["above_high"] and run["deleted"] == []
        assert run["blocked"] == {"uncommitted": {"studies": 6, "bytes": total}}
        assert study_files(svc.home) == sizes
        text = svc.cli("cleanup", "--dry-run").stdout
        assert "kept (uncommitted): 6 study(ies)" in text, text
        assert len(alerts()) == 1, "raised again for the same condition"

        # one study committed: the run its commitment report starts deletes it; the others
        # still hold the archive above the high mark, and the alert is not raised again
        send_committed(svc.home, studies[:1])
        wait_until(lambda: studies[0] not in study_files(svc.home), 30, "the committed study deleted")
        assert set(study_files(svc.home)) == set(studies[1:])
        assert len(alerts()) == 1
        assert "deleted study " + studies[0] in svc.log()

        # a larger quota resolves it: the alert is cleared
        assert svc.cli("config", "set", "archive.quota_mb", "100").returncode == 0
        wait_until(lambda: not alerts(), 30, "the alert cleared")
        consistent(svc.home)
    finally:
        svc.stop()


def test_without_a_commit_node_a_copy_sent_by_an_auto_send_rule_counts_and_without_any_nothing_goes(
        short_tmp: Path, pacs: Pacs) -> None:
    home = temporary_home(short_tmp / "h", archive__quota_mb=1, archive__cleanup_high=10, archive__cleanup_low=5)
    svc = InProcessService(home)
    try:
        assert svc.service.cleaner is not None
        svc.service.cleaner.stop()
        (folder,) = write_studies(short_tmp / "in", 1)
        study = import_study(home, folder)
        run = call(home, "cleanup")
        assert run["above_high"] and run["deleted"] == [] and list(run["blocked"]) == ["no-copy"]
        assert "no copy elsewhere" in [a for a in call(home, "alerts.list") if a["code"] == "disk-cleanup-blocked"][0][
            "message"]
        # a store-only node with an auto-send rule: a copy sent there is enough
        assert cli(home, "node", "add", "PACS", "--ae", pacs.ae_title, "--host", "127.0.0.1", "--port", str(pacs.port),
                   "--roles", "store").returncode == 0
        assert cli(home, "config", "set", "nodes.PACS.auto_send", "exam").returncode == 0
        run = call(home, "cleanup", dry_run=True)
        assert run["blocked"] == {"unsent": {"studies": 1, "bytes": study_files(home)[study]}} and run["copies"] == "sent"
        job = call(home, "send", study_uids=[study], node="PACS")["job_id"]
        assert wait_chain(home, job)["state"] == "done"
        run = call(home, "cleanup")
        assert [s["study_uid"] for s in run["deleted"]] == [study]
        consistent(home)
    finally:
        svc.stop()


def test_without_a_quota_the_file_system_less_the_reserve_counts(short_tmp: Path) -> None:
    svc = InProcessService(temporary_home(short_tmp / "h", archive__quota_mb=0, archive__min_free_mb=64))
    try:
        run = svc.call("cleanup", dry_run=True)
        disk = shutil.disk_usage(svc.home.archive_dir)
        before = run["before"]
        assert before["quota"] is False
        assert abs(before["used_bytes"] - disk.used) < 100 * MIB
        assert abs(before["capacity_bytes"] - (disk.used + disk.free - 64 * MIB)) < 100 * MIB
        assert run["above_high"] == (before["percent"] > 90)
    finally:
        svc.stop()


def test_a_study_being_deleted_holds_installs_into_it(archive: Archive, tmp_path: Path) -> None:
    """An instance imported into a study while it is being deleted waits for the deletion, then
    enters the archive whole: file and row."""
    files = images.write_study(tmp_path / "in", images=3, seed=4)
    for f in files[:2]:
        archive.store_part10(f, "")
    (study,) = [s.study_uid for s in archive.db.index.studies()]
    late: list[threading.Thread] = []

    def mark() -> list[str] | None:
        late.append(threading.Thread(target=archive.store_part10, args=(files[2], "")))
        late[0].start()
        late[0].join(0.5)
        assert late[0].is_alive(), "an import into the study did not wait for its deletion"
        return archive.db.retention.mark_deleting(study, [], True, lambda facts: True)

    assert archive.delete_study(study, mark, timeout=2)
    late[0].join(10)
    (row,) = archive.db.index.study_instances(study)
    assert (archive.root / row.path).is_file()
    assert [p.relative_to(archive.root).as_posix() for p in archive.root.glob("*/*/*.dcm")] == [row.path]
    assert archive.db.retention.pending_deletions() == {}


def test_received_instances_do_not_hold_up_a_deletion(short_tmp: Path) -> None:
    """Every instance the disk server received releases its study once indexed: a deletion right
    after the association starts at once."""
    server = local_server(short_tmp / "srv")
    try:
        files = images.write_study(short_tmp / "in", images=5, rows=64, columns=64, seed=6)
        out = subprocess.run([require_tool("storescu"), "-aec", "MODLINK", "127.0.0.1", str(server.port),
                              *map(str, files)], env=dcmtk_env(), capture_output=True, text=True, timeout=60)
        assert out.returncode == 0, out.stderr
        (study,) = [s.study_uid for s in server.archive.db.index.studies()]
        assert server.archive.delete_study(
            study, lambda: server.archive.db.retention.mark_deleting(study, [], True, lambda facts: True), timeout=2)
        assert server.stray_files() == [] and server.archive.db.index.studies() == []
    finally:
        server.stop()


def reimport(svc: ServiceProcess, folders: list[Path]) -> None:
    res = svc.call("archive.import", paths=[str(f) for f in folders])
    assert not res["failed"], res


def test_sigkill_during_a_cleanup_leaves_files_and_index_consistent(short_tmp: Path, pacs: Pacs) -> None:
    """Each round makes the archive exceed its quota, runs a cleanup over IPC and kills
    ``serve`` (SIGKILL) after a random number of studies are gone, at a random moment or (every
    other round) as soon as a study is marked for deletion; the next start must leave
    every row with its file and every file with its row, and every study whose deletion was
    marked gone completely. The studies are imported again for the next round (their commitment
    is remembered)."""
    rounds, count = 10, 30
    root = short_tmp / "h"
    rng = random.Random(13)
    svc = ServiceProcess.start(root, nodes={"PACS": pacs_node(pacs)}, archive__quota_mb=100,
                               archive__cleanup_high=50, archive__cleanup_low=2)
    folders = write_studies(short_tmp / "in", count, images_each=3)
    interrupted = 0
    marked_rounds = 0
    try:
        reimport(svc, folders)
        all_studies = sorted(study_files(svc.home))
        send_committed(svc.home, all_studies)
        for round_ in range(rounds):
            sizes = study_files(svc.home)
            assert sorted(sizes) == all_studies
            quota_mb = max(1, math.floor(sum(sizes.values()) / MIB))
            assert svc.cli("config", "set", "archive.quota_mb", str(quota_mb)).returncode == 0
            result: list[Any] = []

            def run() -> None:
                try:
                    result.append(svc.call("cleanup"))
                except Exception as exc:  # the service was killed under the call
                    result.append(exc)

            caller = threading.Thread(target=run)
            caller.start()
            k = rng.randint(1, count - 5)
            archive = svc.home.archive_dir
            wait_until(lambda: sum(1 for d in archive.iterdir() if d.name != ".tmp") <= count - k, 60,
                       f"{k} studies deleted", interval=0.002)
            if round_ % 2:  # the moment a study is marked: its files are going
                watch = sqlite3.connect(f"file:{svc.home.db_path}?mode=ro", uri=True)
                try:
                    wait_until(lambda: watch.execute("SELECT 1 FROM deletions").fetchone(), 60,
                               "a study being deleted", interval=0.0002)
                finally:
                    watch.close()
            else:  # any moment
                time.sleep(rng.uniform(0, 0.01))
            svc.proc.kill()
            svc.proc.wait()
            caller.join(30)
            interrupted += not isinstance(result[0], dict)
            db = sqlite3.connect(f"file:{svc.home.db_path}?mode=ro", uri=True)
            try:
                marked = {r[0] for r in db.execute("SELECT DISTINCT study_uid FROM deletions")}
            finally:
                db.close()
            marked_rounds += bool(marked)
            # no cleanup at the next start: the quota is raised while no service runs
            assert svc.cli("config", "set", "archive.quota_mb", "100").returncode == 0
            svc = ServiceProcess.start(root)
            held = consistent(svc.home)
            assert not held & marked, f"studies whose deletion was under way are still there: {held & marked}"
            assert len(held) < count
            reimport(svc, folders)  # the deleted studies come back for the next round
            consistent(svc.home)
        assert interrupted >= rounds // 2, f"only {interrupted} of {rounds} kills landed during the cleanup"
        assert marked_rounds >= rounds // 4, f"only {marked_rounds} kills landed while a study was being deleted"
    finally:
        svc.stop()
