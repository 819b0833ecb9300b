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
import time
from pathlib import Path

import pytest

from modality_link.ipc import (
    INVALID_PARAMS,
    INVALID_REQUEST,
    METHOD_NOT_FOUND,
    PARSE_ERROR,
    IpcClient,
    IpcServer,
    NotRunning,
)
from tests.support import REPO
from tests.support.service import InProcessService, ServiceProcess
from tests.support.waiting import wait_until


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
    wait_until(lambda: server._subscribers, 10, "the subscription", interval=0.02)
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
            handler.close()  # what finish() does while the event writer has work
        with caplog.at_level(logging.DEBUG, logger="modality_link.ipc"):
            for n in range(3):
                srv.publish("job.progress", job_id=n)
            assert [stay.next_event(5) for _ in range(3)] == [{"type": "job.progress", "job_id": n} for n in range(3)]
            wait_until(lambda: handler not in srv._subscribers and len(srv._subscribers) == 1, 10,
                       "the subscriber that left dropped", interval=0.01)
        assert not [r for r in caplog.records if r.exc_info or r.levelno >= logging.WARNING]
        # at most one debug line: a closed handler may be dropped before an event is written to it
        assert set(r.levelno for r in caplog.records if "client gone" in r.getMessage()) <= {logging.DEBUG}
    finally:
        release.set()
        leaver.close()
        stay.close()
        srv.stop()


def test_a_subscriber_that_stops_reading_is_dropped_never_waited_for(short_tmp: Path, caplog) -> None:
    """publish() only queues: a subscriber that reads nothing fills its queue and is dropped
    (its connection closed, one warning), while publishing never waits and a subscriber that
    reads gets every event."""
    srv = IpcServer(short_tmp / "t.sock", {}, event_queue=50, send_timeout=2)
    srv.start()
    mute = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    mute.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    mute.connect(str(srv.path))
    reader = IpcClient(srv.path, timeout=10)
    try:
        mute.sendall(b'{"jsonrpc":"2.0","id":1,"method":"events.subscribe"}\n')
        reader.call("events.subscribe")
        wait_until(lambda: len(srv._subscribers) == 2, 10, "two subscribers", interval=0.01)
        got: list[dict] = []

        def read_all() -> None:
            while len(got) < 2000:
                got.append(reader.next_event(10))

        threading.Thread(target=read_all, daemon=True).start()
        payload = "x" * 1000  # the mute client's socket buffers fill after a few hundred
        slowest = 0.0
        with caplog.at_level(logging.WARNING, logger="modality_link.ipc"):
            for n in range(2000):
                started = time.monotonic()
                srv.publish("memory.stored", n=n, payload=payload)
                slowest = max(slowest, time.monotonic() - started)
                if n % 40 == 39:  # a reader that keeps up: its queue never holds more than 40
                    wait_until(lambda: len(got) > n, 10, f"event {n} read", interval=0.01)
            wait_until(lambda: len(got) == 2000, 10, "2000 events read", interval=0.01)
            assert [e["n"] for e in got] == list(range(2000))
            wait_until(lambda: len(srv._subscribers) == 1, 10, "the mute subscriber dropped", interval=0.01)
        assert slowest < 1, f"one publish took {slowest:.2f} s: it waited for a client"
        assert [r for r in caplog.records if "left 50 events unread; dropped" in r.getMessage()]
    finally:
        mute.close()
        reader.close()
        srv.stop()


def test_the_subscribe_reply_comes_before_any_event(short_tmp: Path) -> None:
    """Events published while a client subscribes are queued and follow the reply: a client
    reading the reply to events.subscribe never meets an event first (IpcClient.call would
    skip it as noise and the event would be lost)."""
    srv = IpcServer(short_tmp / "t.sock", {}, event_queue=10**6)  # a flood: nobody is dropped here
    srv.start()
    stop = threading.Event()

    def publish() -> None:
        n = 0
        while not stop.is_set():
            srv.publish("job.progress", n=n)
            n += 1

    publisher = threading.Thread(target=publish, daemon=True)
    publisher.start()
    try:
        for _ in range(30):
            with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
                s.connect(str(srv.path))
                s.sendall(b'{"jsonrpc":"2.0","id":1,"method":"events.subscribe"}\n')
                lines = s.makefile("rb")
                assert json.loads(lines.readline()) == {"jsonrpc": "2.0", "id": 1, "result": {"subscribed": True}}
                assert json.loads(lines.readline())["method"] == "event"
    finally:
        stop.set()
        publisher.join(5)
        srv.stop()


def test_idle_connections_are_closed_and_their_number_capped(short_tmp: Path) -> None:
    """A connection that says nothing, or leaves a line unfinished, is closed after the idle
    timeout; one beyond the cap is told why and closed; a subscriber may wait for events."""
    srv = IpcServer(short_tmp / "t.sock", {"ping": lambda: "pong"}, max_connections=3, idle_timeout=0.5)
    srv.start()
    socks = []
    try:
        silent, partial, subscriber = (socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) for _ in range(3))
        for s in (silent, partial, subscriber):
            s.connect(str(srv.path))
            socks.append(s)
        subscriber.sendall(b'{"jsonrpc":"2.0","id":1,"method":"events.subscribe"}\n')
        partial.sendall(b'{"jsonrpc":"2.0","id":1,"meth')
        wait_until(lambda: len(srv._connections) == 3, 10, "three connections", interval=0.01)
        extra = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        socks.append(extra)
        extra.connect(str(srv.path))
        refused = json.loads(extra.makefile("rb").readline())
        assert "too many IPC connections (at most 3)" in refused["error"]["message"]
        for s in (silent, partial):  # closed by the server: EOF
            s.settimeout(10)
            assert s.recv(100) == b""
        wait_until(lambda: len(srv._connections) == 1, 10, "the idle connections closed", interval=0.01)
        assert IpcClient(srv.path, timeout=10).call("ping") == "pong"
        srv.publish("alert", code="x")
        reply = subscriber.makefile("rb")
        assert json.loads(reply.readline())["result"] == {"subscribed": True}
        assert json.loads(reply.readline())["params"] == {"type": "alert", "code": "x"}
    finally:
        for s in socks:
            s.close()
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


def test_second_service_on_the_same_home_is_refused(service: ServiceProcess) -> None:
    proc = subprocess.run(
        [sys.executable, "-m", "modality_link", "--home", str(service.home.root), "serve"],
        capture_output=True, text=True, timeout=60,
    )
    assert proc.returncode == 1
    assert "already running" in proc.stderr
    assert service.alive()


def test_echo_reports_status_and_round_trip(service: ServiceProcess) -> None:
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
    assert unknown.returncode == 2 and "no such node" in unknown.stderr  # an unknown node is invalid usage (docs/cli.md "Exit codes")


def test_import_files_and_folders(service: ServiceProcess, tmp_path: Path) -> None:
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


def test_every_ipc_method_is_documented(service_in_process: InProcessService) -> None:
    doc = (REPO / "docs" / "ipc.md").read_text(encoding="utf-8")
    documented = set(re.findall(r"^### `([a-z_.]+)`", doc, flags=re.M))
    methods = set(service_in_process.service.ipc.methods)
    missing = methods - documented
    assert not missing, f"IPC methods missing from docs/ipc.md: {sorted(missing)}"
    stale = documented - methods
    assert not stale, f"docs/ipc.md documents methods that do not exist: {sorted(stale)}"


def test_a_subscriber_that_stops_reading_does_not_stall_the_disk_server(service: ServiceProcess, short_tmp: Path):
    """The disk server publishes ``instance.stored`` for each image: a local client that
    subscribes and never reads must not hold up one C-STORE response (the socket's buffer
    holds some 900 such events; the images are more)."""
    from sim.images import write_study
    from tests.support.tools import dcmtk_env, require_tool

    files = write_study(short_tmp / "study", modality="CT", images=1200, rows=16, columns=16, seed=5)
    mute = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    mute.connect(str(service.home.socket_path))
    try:
        mute.sendall(b'{"jsonrpc":"2.0","id":1,"method":"events.subscribe"}\n')
        proc = subprocess.run(
            [require_tool("storescu"), "-aec", "MODLINK", "+sd", "127.0.0.1", str(service.port), str(short_tmp / "study")],
            env=dcmtk_env(), capture_output=True, text=True, timeout=240,
        )
        assert proc.returncode == 0, proc.stderr[-2000:]
        assert sum(s["instances"] for s in service.studies()) == len(files)
    finally:
        mute.close()


def test_events_written_before_a_calls_reply_are_kept_for_next_event(short_tmp: Path) -> None:
    """On a subscribed connection an event may arrive before the reply of the call that caused
    it: the client keeps it for next_event (and events()) instead of dropping it."""
    srv: IpcServer

    def act(n: int) -> str:
        for i in range(n):
            srv.publish("acted", i=i)
        # the events are written before the reply
        wait_until(lambda: all(h.events.empty() for h in srv._subscribers), 5, "the events written")
        return "done"

    srv = IpcServer(short_tmp / "t.sock", {"act": act})
    srv.start()
    try:
        with IpcClient(srv.path, timeout=10) as client:
            client.call("events.subscribe")
            assert client.call("act", n=3) == "done"
            assert [client.next_event(1)["i"] for _ in range(3)] == [0, 1, 2]
            assert client.next_event(0.2) is None
    finally:
        srv.stop()
