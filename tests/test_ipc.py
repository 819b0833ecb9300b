"""The IPC protocol: JSON-RPC 2.0 errors, events, the CLI without a service, and docs/ipc.md."""

from __future__ import annotations

import json
import logging
import re
import socket
import stat
import subprocess
import sys
import threading
from pathlib import Path

import pytest

from modality_link.home import temporary_home
from modality_link.ipc import (
    INVALID_PARAMS,
    INVALID_REQUEST,
    METHOD_NOT_FOUND,
    PARSE_ERROR,
    IpcClient,
    IpcServer,
    NotRunning,
)
from modality_link.service import Service
from tests.conftest import REPO, RunningService


def _raw(path: Path, line: bytes) -> dict:
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
        s.connect(str(path))
        s.sendall(line + b"\n")
        return json.loads(s.makefile("rb").readline())


@pytest.fixture
def server(short_tmp: Path):
    def add(a: int, b: int) -> int:
        return a + b

    srv = IpcServer(short_tmp / "t.sock", {"add": add})
    srv.start()
    yield srv
    srv.stop()


def test_jsonrpc_errors(server: IpcServer) -> None:
    p = server.path
    assert _raw(p, b'{"jsonrpc":"2.0","id":1,"method":"add","params":{"a":1,"b":2}}')["result"] == 3
    assert _raw(p, b'{"jsonrpc":"2.0","id":2,"method":"add","params":[4,5]}')["result"] == 9
    assert _raw(p, b"{not json")["error"]["code"] == PARSE_ERROR
    assert _raw(p, b'{"id":3,"method":"add"}')["error"]["code"] == INVALID_REQUEST
    err = _raw(p, b'{"jsonrpc":"2.0","id":4,"method":"nope"}')["error"]
    assert err["code"] == METHOD_NOT_FOUND and "nope" in err["message"]
    err = _raw(p, b'{"jsonrpc":"2.0","id":5,"method":"add","params":{"a":1}}')["error"]
    assert err["code"] == INVALID_PARAMS and "b" in err["message"]
    assert stat.S_IMODE(p.stat().st_mode) == 0o660


def test_events_reach_subscribers(server: IpcServer) -> None:
    client = IpcClient(server.path, timeout=10)
    got: list[dict] = []

    def listen() -> None:
        for ev in client.events():
            got.append(ev)
            return

    t = threading.Thread(target=listen)
    t.start()
    for _ in range(100):
        if server._subscribers:
            break
        threading.Event().wait(0.02)
    server.publish("job.progress", job=7, done=3, total=10)
    t.join(10)
    client.close()
    assert got == [{"type": "job.progress", "job": 7, "done": 3, "total": 10}]


@pytest.mark.parametrize("gone", ["socket closed", "stream closed"])
def test_a_subscriber_that_left_is_dropped_quietly(short_tmp: Path, caplog, gone: str) -> None:
    """A subscriber that closed its connection before the server noticed (its handler busy
    in a request), or whose stream the server closed while an event was on its way, is
    dropped with one debug line; no traceback, and the other subscribers get the events."""
    release = threading.Event()
    srv = IpcServer(short_tmp / "t.sock", {"hold": lambda: release.wait(30)})
    srv.start()
    leaver = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    leaver.connect(str(srv.path))
    stay = IpcClient(srv.path, timeout=10)
    try:
        leaver.sendall(b'{"jsonrpc":"2.0","id":1,"method":"events.subscribe"}\n')
        assert json.loads(leaver.makefile("rb").readline())["result"] == {"subscribed": True}
        (handler,) = srv._subscribers
        stay.call("events.subscribe")
        if gone == "socket closed":
            # its handler waits there; a notification, so that nothing is sent back later
            leaver.sendall(b'{"jsonrpc":"2.0","method":"hold"}\n')
            leaver.close()
        else:
            with handler.write_lock:  # what finish() does while a publisher holds the handler
                handler.wfile.close()
        with caplog.at_level(logging.DEBUG, logger="modality_link.ipc"):
            for n in range(3):
                srv.publish("job.progress", job_id=n)
        assert handler not in srv._subscribers and len(srv._subscribers) == 1
        assert [stay.next_event(5) for _ in range(3)] == [{"type": "job.progress", "job_id": n} for n in range(3)]
        assert not [r for r in caplog.records if r.exc_info or r.levelno >= logging.WARNING]
        assert [r.levelno for r in caplog.records if "client gone" in r.getMessage()] == [logging.DEBUG]
    finally:
        release.set()
        leaver.close()
        stay.close()
        srv.stop()


def test_client_says_when_no_service_runs(short_tmp: Path) -> None:
    with pytest.raises(NotRunning, match="no modality-link service is running"):
        IpcClient(short_tmp / "missing.sock")
    for args in (["status"], ["studies", "--json"], ["echo", "--all"], ["import", str(short_tmp)]):
        proc = subprocess.run(
            [sys.executable, "-m", "modality_link", "--home", str(short_tmp / "h"), *args],
            capture_output=True, text=True, timeout=60,
        )
        assert proc.returncode == 3, args
        assert "no modality-link service is running" in proc.stderr
        assert "modality-link serve" in proc.stderr


def test_second_service_on_the_same_home_is_refused(service: RunningService) -> None:
    proc = subprocess.run(
        [sys.executable, "-m", "modality_link", "--home", str(service.home.root), "serve"],
        capture_output=True, text=True, timeout=60,
    )
    assert proc.returncode == 1
    assert "already running" in proc.stderr
    assert service.alive()


def test_echo_reports_status_and_round_trip(service: RunningService) -> None:
    # The service echoes itself (its own disk server as a node) and a node where no one listens.
    assert service.cli("node", "add", "SELF", "--ae", "MODLINK", "--host", "127.0.0.1", "--port", str(service.port)).returncode == 0
    assert service.cli("node", "add", "DEAD", "--ae", "DEAD", "--host", "127.0.0.1", "--port", "9").returncode == 0
    ok = service.cli("echo", "SELF")
    assert ok.returncode == 0, ok.stderr
    assert re.search(r"SELF: OK status 0x0000 [\d.]+ ms", ok.stdout)
    both = service.cli("echo", "--all")
    assert both.returncode == 1
    assert "DEAD: FAILED" in both.stdout
    assert "DEAD" in service.log()
    unknown = service.cli("echo", "NOBODY")
    assert unknown.returncode == 1 and "no such node" in unknown.stderr


def test_import_files_and_folders(service: RunningService, tmp_path: Path) -> None:
    from sim import images

    images.write_study(tmp_path / "a" / "deep", modality="CT", images=3, seed=1)
    images.write_study(tmp_path / "b", modality="MR", images=2, seed=2)
    (tmp_path / "a" / "notes.txt").write_text("not DICOM")
    proc = service.cli("import", str(tmp_path / "a"), str(tmp_path / "b"))
    assert proc.returncode == 1  # notes.txt is refused, the rest imported
    assert "imported 5 file(s)" in proc.stdout
    assert "notes.txt" in proc.stderr
    studies = service.studies()
    assert sorted(s["instances"] for s in studies) == [2, 3]
    assert sorted(s["modalities"] for s in studies) == ["CT", "MR"]


def test_every_ipc_method_is_documented(short_tmp: Path) -> None:
    doc = (REPO / "docs" / "ipc.md").read_text(encoding="utf-8")
    documented = set(re.findall(r"^### `([a-z_.]+)`", doc, flags=re.M))
    home = temporary_home(short_tmp)
    service = Service(home)
    service.start(log_to_stderr=False)
    try:
        methods = set(service.ipc.methods)
    finally:
        service.stop()
    missing = methods - documented
    assert not missing, f"IPC methods missing from docs/ipc.md: {sorted(missing)}"
    stale = documented - methods
    assert not stale, f"docs/ipc.md documents methods that do not exist: {sorted(stale)}"
