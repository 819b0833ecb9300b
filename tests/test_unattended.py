"""Unattended operation (docs/design.md "Unattended operation"): sd_notify readiness, watchdog
and stopping messages from a real `serve`, the drain after SIGTERM in the middle of a storescu
transfer, JSON log lines of a real run, and the systemd unit `install-service` writes."""

from __future__ import annotations

import json
import os
import re
import signal
import socket
import sqlite3
import subprocess
import sys
import time
import uuid
from pathlib import Path

import pytest
from pydicom import dcmread
from pydicom.dataset import Dataset
from pynetdicom import AE
from pynetdicom.sop_class import CTImageStorage  # type: ignore[attr-defined]

from modality_link import config, service_unit, systemd
from modality_link.archive import read_header
from modality_link.db.check import indexed_files
from modality_link.home import free_port
from sim import images
from tests.support.peers import start_storescp
from tests.support.service import ServiceProcess, wait_chain
from tests.support.tools import acknowledged, dcmtk_env, require_tool
from tests.support.waiting import wait_until


# -- sd_notify ------------------------------------------------------------------------------------


class NotifySocket:
    """What the service manager listens on: a datagram socket at a path or an abstract name."""

    def __init__(self, tmp: Path, abstract: bool) -> None:
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        if abstract:
            name = f"modality-link-test-{uuid.uuid4().hex}"
            self.sock.bind("\0" + name)
            self.env = "@" + name
        else:
            path = tmp / "notify.sock"
            self.sock.bind(str(path))
            self.env = str(path)
        self.messages: list[str] = []

    def wait_for(self, assignment: str, deadline: float = 30.0) -> str:
        """The first message (since the last one returned) holding `assignment`."""
        end = time.monotonic() + deadline
        while True:
            for i, msg in enumerate(self.messages):
                if assignment in msg.split("\n"):
                    del self.messages[:i + 1]
                    return msg
            left = end - time.monotonic()
            if left <= 0:
                raise AssertionError(f"no {assignment} within {deadline:g} s; got {self.messages}")
            self.sock.settimeout(left)
            try:
                self.messages.append(self.sock.recv(4096).decode("utf-8"))
            except socket.timeout:
                continue

    def close(self) -> None:
        self.sock.close()


@pytest.mark.parametrize("abstract", [False, True], ids=["path", "abstract"])
def test_serve_notifies_ready_watchdog_and_stopping(short_tmp: Path, abstract: bool) -> None:
    notify = NotifySocket(short_tmp, abstract)
    svc = ServiceProcess.start(short_tmp / "h", env={"NOTIFY_SOCKET": notify.env, "WATCHDOG_USEC": "1000000"})
    try:
        ready = notify.wait_for("READY=1")
        assert f"STATUS=serving: disk server MODLINK on port {svc.port}" in ready.split("\n")[1], ready
        for _ in range(2):  # pings keep coming, every half of WATCHDOG_USEC
            notify.wait_for("WATCHDOG=1", deadline=10)
        svc.proc.send_signal(signal.SIGTERM)
        stopping = notify.wait_for("STOPPING=1")
        assert "STATUS=stopping" in stopping
        assert svc.proc.wait(timeout=service_unit.TIMEOUT_STOP_SEC) == 0
    finally:
        svc.stop()
        notify.close()


def test_watchdog_pings_only_while_the_check_passes(short_tmp: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    notify = NotifySocket(short_tmp, abstract=False)
    monkeypatch.setenv("NOTIFY_SOCKET", notify.env)
    problem: list[str | None] = ["the job queue has stopped"]
    dog = systemd.Watchdog(lambda: problem[0], status="serving: test", interval=0.05)
    dog.start()
    try:
        sick = notify.wait_for("STATUS=not answering: the job queue has stopped")
        assert "WATCHDOG=1" not in sick
        assert all("WATCHDOG=1" not in m for m in notify.messages)
        problem[0] = None
        recovered = notify.wait_for("WATCHDOG=1")
        assert "STATUS=serving: test" in recovered.split("\n")
    finally:
        dog.stop()
        notify.close()


def test_notify_without_a_socket_does_nothing(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("NOTIFY_SOCKET", raising=False)
    assert systemd.notify("READY=1") is False
    monkeypatch.setenv("WATCHDOG_USEC", "30000000")
    monkeypatch.setenv("WATCHDOG_PID", str(os.getpid()))
    assert systemd.watchdog_interval() == 15.0
    monkeypatch.setenv("WATCHDOG_PID", str(os.getpid() + 1))  # meant for another process
    assert systemd.watchdog_interval() is None


# -- SIGTERM drains -------------------------------------------------------------------------------

IMAGES = 200


@pytest.mark.interop
def test_sigterm_during_storescu_drains_and_exits_0(short_tmp: Path) -> None:
    """SIGTERM while storescu sends: `serve` exits 0 within the unit's stop timeout, and what it
    leaves is consistent: every indexed file exists with its size, every archive file is indexed
    and complete, no temporary is left, every acknowledged image is there."""
    storescu = require_tool("storescu")
    study = images.write_study(short_tmp / "s", modality="CT", images=IMAGES, rows=256, columns=256, seed=41)
    svc = ServiceProcess.start(short_tmp / "h")
    try:
        sender = subprocess.Popen([storescu, "-v", "-aec", "MODLINK", "127.0.0.1", str(svc.port), *map(str, study)],
                                  env=dcmtk_env(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        first = dcmread(study[0], stop_before_pixels=True)
        series = svc.home.archive_dir / first.StudyInstanceUID / first.SeriesInstanceUID
        wait_until(lambda: series.is_dir() and sum(1 for _ in series.glob("*.dcm")) >= 20, 60,
                   "20 files of the study archived", interval=0.01)
        started = time.monotonic()
        svc.proc.send_signal(signal.SIGTERM)
        assert svc.proc.wait(timeout=service_unit.TIMEOUT_STOP_SEC) == 0
        took = time.monotonic() - started
        out, _ = sender.communicate(timeout=60)
    finally:
        svc.stop()
    acked = acknowledged(out)
    assert len(acked) < IMAGES, "the transfer ended before SIGTERM: nothing was interrupted"
    assert took < service_unit.TIMEOUT_STOP_SEC
    archive = svc.home.archive_dir
    indexed = indexed_files(svc.home.db_path)
    on_disk = {p.relative_to(archive).as_posix(): p.stat().st_size for p in archive.glob("*/*/*.dcm")}
    assert indexed == on_disk, "index rows and archive files (with their sizes) differ"
    assert list((archive / ".tmp").iterdir()) == [], "temporaries left after the drain"
    for path in on_disk:
        read_header(archive / path)  # complete: raises on a truncated data set
    uids = {Path(p).stem for p in indexed}
    assert {dcmread(f, stop_before_pixels=True).SOPInstanceUID for f in acked} <= uids
    log = svc.log()
    assert "stopping: draining" in log
    assert "unexpected fault" not in log, log[log.find("unexpected fault"):][:3000]


@pytest.mark.interop
def test_sigterm_during_a_send_job_queues_it_again(short_tmp: Path) -> None:
    """SIGTERM while a send job runs: the attempt stops between two instances and the job is
    queued again without counting an attempt; the next start sends the rest."""
    scp_dir = short_tmp / "scp"
    scp_dir.mkdir()
    port = free_port()
    scp = start_storescp(scp_dir, port)
    try:
        pacs = config.Node(ae_title="STORESCP", host="127.0.0.1", port=port, retry_interval=0.2)
        svc = ServiceProcess.start(short_tmp / "h", nodes={"PACS": pacs})
        try:
            study = images.write_study(short_tmp / "s", modality="CT", images=IMAGES, rows=256, columns=256,
                                       seed=43)
            assert svc.call("archive.import", paths=[str(short_tmp / "s")])["imported"] == IMAGES
            study_uid = dcmread(study[0], stop_before_pixels=True).StudyInstanceUID
            job_id = svc.call("send", study_uids=[study_uid], node="PACS")["job_id"]
            wait_until(lambda: svc.call("jobs.show", id=job_id)["done"] >= 10, 60, "10 instances sent")
            svc.proc.send_signal(signal.SIGTERM)
            assert svc.proc.wait(timeout=service_unit.TIMEOUT_STOP_SEC) == 0
        finally:
            svc.stop()
        db = sqlite3.connect(f"file:{svc.home.db_path}?mode=ro", uri=True)
        try:
            state, detail, attempts, done = db.execute(
                "SELECT state, detail, attempts, (SELECT COUNT(*) FROM job_items WHERE job_id=jobs.id AND "
                "state='done') FROM jobs WHERE id=?", (job_id,)).fetchone()
        finally:
            db.close()
        assert 10 <= done < IMAGES, "the job was not interrupted in the middle"
        assert (state, detail, attempts) == ("queued", "interrupted; will resume", 0)
        again = ServiceProcess(svc.home)
        try:
            job = wait_chain(again.home, job_id, timeout=120)
            assert job["state"] == "done", job
        finally:
            again.stop()
        assert len(list(scp_dir.iterdir())) == IMAGES
    finally:
        scp.terminate()
        scp.wait()


# -- JSON log lines -------------------------------------------------------------------------------


def test_json_log_lines_carry_peer_ae_titles_status_and_job_id(short_tmp: Path) -> None:
    closed = free_port()
    pacs = config.Node(ae_title="PACS", host="127.0.0.1", port=closed, retries=0, retry_interval=0.1)
    svc = ServiceProcess.start(short_tmp / "h", nodes={"PACS": pacs}, logging__format="json")
    try:
        study = images.write_study(short_tmp / "s", modality="CT", images=1, rows=32, columns=32, seed=3)
        good = dcmread(study[0])
        bad = Dataset()  # no Study Instance UID: refused with 0xA900 (PS3.4 B.2.3)
        bad.SOPClassUID, bad.SOPInstanceUID = CTImageStorage, "1.2.3.4.5"
        bad.file_meta = good.file_meta
        ae = AE(ae_title="JSONTEST")
        ae.add_requested_context(CTImageStorage)
        assoc = ae.associate("127.0.0.1", svc.port, ae_title="MODLINK")
        assert assoc.is_established
        assert assoc.send_c_store(good).Status == 0
        assert assoc.send_c_store(bad).Status == 0xA900
        assoc.release()
        sent = svc.cli("send", good.StudyInstanceUID, "--to", "PACS", "--wait")
        assert sent.returncode == 1, sent.stdout + sent.stderr
        job_id = int(re.search(r"job (\d+) queued", sent.stdout).group(1))
        wait_until(lambda: f'"job_id": {job_id}' in svc.log(), 10, "the job's log lines")
    finally:
        svc.stop()
    lines = [json.loads(line) for line in svc.log().splitlines()]  # every line is one JSON object
    assert all({"time", "level", "logger", "message"} <= line.keys() for line in lines)
    assert all(re.fullmatch(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3}Z", line["time"]) for line in lines)
    refused = [line for line in lines if line.get("status") == "0xA900"]
    assert refused, lines
    assert refused[0]["calling_ae"] == "JSONTEST" and refused[0]["called_ae"] == "MODLINK"
    assert refused[0]["peer"].startswith("127.0.0.1:") and refused[0]["level"] == "ERROR"
    job_lines = [line for line in lines if line.get("job_id") == job_id]
    assert any(line["level"] == "ERROR" and line.get("called_ae") == "PACS"
               and line.get("peer") == f"127.0.0.1:{closed}" for line in job_lines), job_lines
    assert all(line["node"] == "PACS" for line in job_lines)


# -- the systemd unit -----------------------------------------------------------------------------


def install_service(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "modality_link", "install-service", *args],
                          capture_output=True, text=True, timeout=60)


def test_install_service_writes_the_unit_and_the_home_below_root(tmp_path: Path) -> None:
    res = install_service("--root", str(tmp_path), "--home", "/var/lib/ml-test", "--user", "ml-test")
    assert res.returncode == 0, res.stderr
    unit = tmp_path / "etc/systemd/system/modality-link.service"
    assert f"wrote {unit}" in res.stdout
    text = unit.read_text()
    lines = set(text.splitlines())
    for directive in ("Type=notify", f"WatchdogSec={service_unit.WATCHDOG_SEC}", "Restart=on-failure",
                      "User=ml-test", f"TimeoutStopSec={service_unit.TIMEOUT_STOP_SEC}", "ProtectSystem=strict",
                      "ReadWritePaths=/var/lib/ml-test", "NoNewPrivileges=yes", "UMask=0077",
                      "WantedBy=multi-user.target"):
        assert directive in lines, directive
    exec_start = next(line for line in lines if line.startswith("ExecStart="))
    assert exec_start.endswith(" -m modality_link --home /var/lib/ml-test serve")
    assert oct(unit.stat().st_mode & 0o777) == "0o644"
    home = tmp_path / "var/lib/ml-test"
    assert home.is_dir() and oct(home.stat().st_mode & 0o777) == "0o700"
    again = install_service("--root", str(tmp_path), "--home", "/var/lib/ml-test", "--user", "ml-test")
    assert "is up to date" in again.stdout


def test_install_service_dry_run_changes_nothing(tmp_path: Path) -> None:
    res = install_service("--root", str(tmp_path), "--dry-run")
    assert res.returncode == 0, res.stderr
    assert "would write" in res.stdout and "Type=notify" in res.stdout
    assert list(tmp_path.iterdir()) == []


def test_install_service_refuses_a_home_it_must_not_take(tmp_path: Path) -> None:
    for home in ("/", "relative/home", "/var/lib"):
        res = install_service("--root", str(tmp_path), "--home", home)
        assert res.returncode == 1 and "--home" in res.stderr, (home, res.stderr)
    other = tmp_path / "srv/data"
    other.mkdir(parents=True)
    (other / "something.txt").write_text("not ours")
    res = install_service("--root", str(tmp_path), "--home", "/srv/data")
    assert res.returncode == 1 and "not a modality-link home" in res.stderr
    assert not (tmp_path / "etc").exists()


def test_install_on_the_running_system_plans_the_user_and_systemctl(tmp_path: Path) -> None:
    """What a system install would do (no systemd runs in a test container, so only the plan):
    a missing user is created, an existing one used, systemd reloaded and the unit enabled."""
    new = service_unit.plan(service_unit.Installation(user="ml-no-such-user", home=tmp_path / "h"))
    assert new[0].startswith("create the system user ml-no-such-user")
    assert new[-1] == f"systemctl daemon-reload; systemctl enable {service_unit.UNIT_NAME}"
    assert f"write /etc/systemd/system/{service_unit.UNIT_NAME} (mode 0644)" in new
    existing = service_unit.plan(service_unit.Installation(user="root", home=tmp_path / "h"))
    assert existing[0] == "use the existing system user root"


def test_systemd_analyze_verifies_the_unit(tmp_path: Path) -> None:
    analyze = require_tool("systemd-analyze")  # Debian's systemd package; in CI a missing tool fails
    res = install_service("--root", str(tmp_path), "--home", str(tmp_path / "home"))
    assert res.returncode == 0, res.stderr
    unit = tmp_path / "etc/systemd/system/modality-link.service"
    check = subprocess.run([analyze, "verify", str(unit)], capture_output=True, text=True, timeout=60)
    assert check.returncode == 0, check.stderr
    assert "modality-link.service" not in check.stdout + check.stderr, check.stdout + check.stderr
