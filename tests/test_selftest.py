"""`modality-link selftest` (docs/design.md "Self-test"): every row passes on a fresh home with a
running service, and each check made to fail on purpose fails its row and the exit code."""

from __future__ import annotations

import json
import os
import stat
import subprocess
import sys
from pathlib import Path
from typing import Any, Iterator

import pytest

from modality_link import config
from modality_link.home import Home, free_port, temporary_home
from sim import images
from tests.support.peers import start_storescp
from tests.support.service import InProcessService


def selftest(home: Home, *args: str) -> tuple[int, dict[str, Any]]:
    """`modality-link selftest --json`: its exit code and its report."""
    res = subprocess.run([sys.executable, "-m", "modality_link", "--home", str(home.root), "selftest", "--json",
                          *args], capture_output=True, text=True, timeout=300)
    assert res.stdout, res.stderr
    return res.returncode, json.loads(res.stdout)


def rows(report: dict[str, Any]) -> dict[str, dict[str, Any]]:
    return {c["name"]: c for c in report["checks"]}


def failed(report: dict[str, Any]) -> set[str]:
    return {c["name"] for c in report["checks"] if not c["ok"]}


def private(home: Home) -> None:
    """Folders 0700, files 0600, the socket 0660: the modes the service gives its home (the
    self test only checks them)."""
    for folder, dirs, files in os.walk(home.root):
        os.chmod(folder, 0o700)
        for name in files:
            path = os.path.join(folder, name)
            mode = os.lstat(path).st_mode
            if not stat.S_ISLNK(mode):
                os.chmod(path, 0o660 if stat.S_ISSOCK(mode) else 0o600)


@pytest.fixture
def storescp(short_tmp: Path) -> Iterator[int]:
    """DCMTK storescp on a free port: a node that answers C-ECHO."""
    port = free_port()
    (short_tmp / "scp").mkdir()
    proc = start_storescp(short_tmp / "scp", port)
    yield port
    proc.terminate()
    proc.wait()


@pytest.fixture
def console(short_tmp: Path, storescp: int) -> Iterator[InProcessService]:
    """A running service with a node that answers, a simulated drive and a few archived images."""
    nodes = {"PACS": config.Node(ae_title="STORESCP", host="127.0.0.1", port=storescp)}
    home = temporary_home(short_tmp / "home", nodes=nodes, media__drives=["sim:burner"])
    svc = InProcessService(home)
    study = images.write_study(short_tmp / "study", modality="CT", images=3, rows=32, columns=32, seed=9)
    assert svc.call("archive.import", paths=[str(p) for p in study])["imported"] == 3
    private(home)
    yield svc
    svc.stop()


@pytest.mark.interop
def test_all_checks_pass_on_a_fresh_home_with_a_running_service(console: InProcessService) -> None:
    code, report = selftest(console.home)
    assert failed(report) == set(), report
    assert code == 0 and report["ok"] and report["mode"] == "service"
    checks = rows(report)
    for name in ("service", "home permissions", "free space", "database integrity", "archive files",
                 "listener disk server", "listener memory server", "node PACS", "drive sim:burner"):
        assert name in checks, name
    assert checks["archive files"]["detail"].startswith("3 indexed file(s)")
    text = subprocess.run([sys.executable, "-m", "modality_link", "--home", str(console.home.root), "selftest"],
                          capture_output=True, text=True, timeout=300)
    assert text.returncode == 0
    assert text.stdout.splitlines()[0].split() == ["CHECK", "RESULT", "DETAIL"]
    assert "all checks passed (in the running service)" in text.stdout


@pytest.mark.interop
def test_a_home_readable_by_others_fails(console: InProcessService) -> None:
    os.chmod(console.home.root, 0o755)
    code, report = selftest(console.home)
    assert code == 1 and failed(report) == {"home permissions"}
    assert "home 0755" in rows(report)["home permissions"]["detail"]


@pytest.mark.interop
def test_a_deleted_archive_file_fails(console: InProcessService) -> None:
    victim = next(console.home.archive_dir.glob("*/*/*.dcm"))
    victim.unlink()
    code, report = selftest(console.home)
    assert code == 1 and failed(report) == {"archive files"}
    detail = rows(report)["archive files"]["detail"]
    assert "1 file(s) indexed but missing" in detail and victim.name in detail


@pytest.mark.interop
def test_a_file_the_index_does_not_know_fails(console: InProcessService) -> None:
    stray = console.home.archive_dir / "1.2.3" / "1.2.3.4" / "1.2.3.4.5.dcm"
    stray.parent.mkdir(parents=True)
    stray.write_bytes(b"\0" * 132)
    os.chmod(stray, 0o600)
    for d in (stray.parent, stray.parent.parent):
        os.chmod(d, 0o700)
    code, report = selftest(console.home)
    assert code == 1 and failed(report) == {"archive files"}
    assert "1 file(s) in the archive but not indexed (1.2.3/1.2.3.4/1.2.3.4.5.dcm)" in rows(report)["archive files"]["detail"]


@pytest.mark.interop
def test_a_node_on_a_closed_port_fails(console: InProcessService) -> None:
    closed = free_port()
    res = console.call("config.set", key="nodes.PACS.port", value=str(closed))
    assert res == closed
    private(console.home)  # the config file was written anew
    code, report = selftest(console.home)
    assert code == 1 and failed(report) == {"node PACS"}
    assert f"STORESCP@127.0.0.1:{closed}" in rows(report)["node PACS"]["detail"]


def corrupt_a_page(db: Path, number: int = 2) -> None:
    """Overwrite page `number` (counted from 1) with random bytes; page 1, with the file header
    and the schema, stays readable."""
    with open(db, "r+b") as fh:
        page = int.from_bytes(fh.read(18)[16:18], "big") or 65536
        assert os.fstat(fh.fileno()).st_size >= number * page, "the file has fewer pages"
        fh.seek((number - 1) * page)
        fh.write(os.urandom(page))


def test_a_corrupt_database_page_fails_without_a_service(short_tmp: Path) -> None:
    home = temporary_home(short_tmp / "home")
    svc = InProcessService(home)  # creates the database, then stops: the self test runs directly
    svc.stop()
    private(home)
    code, report = selftest(home)
    assert code == 1 and report["mode"] == "direct"
    assert failed(report) == {"service"}, report  # the rest passes: only the service does not run
    assert "not running" in rows(report)["service"]["detail"]
    corrupt_a_page(home.db_path)
    code, report = selftest(home)
    assert code == 1
    assert {"service", "database integrity"} <= failed(report)
    assert rows(report)["database integrity"]["detail"] != "PRAGMA integrity_check: ok"


def test_free_space_below_the_reserve_fails(short_tmp: Path) -> None:
    home = temporary_home(short_tmp / "home", archive__min_free_mb=10**9)
    private(home)
    code, report = selftest(home)
    assert code == 1
    assert "free space" in failed(report)
    assert "C-STOREs are refused" in rows(report)["free space"]["detail"]
