"""Shared fixtures: free loopback ports, short temporary homes, reference tools, a real service."""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator

import pytest

from modality_link import config
from modality_link.archive import Archive
from modality_link.db import Database
from modality_link.home import Home, temporary_home
from modality_link.ipc import IpcClient, NotRunning

IN_CI = os.environ.get("CI", "").strip().lower() in ("1", "true", "yes")
REPO = Path(__file__).resolve().parent.parent


def require_tool(name: str) -> str:
    """Absolute path of a reference tool from a Debian package (pynetdicom's apps shadow
    DCMTK's names on PATH). Missing: a failure in CI, a skip elsewhere."""
    path = name if name.startswith("/") else f"/usr/bin/{name}"
    if not (os.path.isfile(path) and os.access(path, os.X_OK)):
        if IN_CI:
            pytest.fail(f"{path} is required in CI (see .ci/run)")
        pytest.skip(f"{path} not installed")
    return path


def dcmtk_env() -> dict[str, str]:
    """DCMTK tools stall ~40 ms per C-STORE without TCP_NODELAY=1."""
    return dict(os.environ, TCP_NODELAY="1")


def wait_port(port: int, timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=0.5):
                return
        except OSError:
            time.sleep(0.05)
    raise TimeoutError(f"nothing listens on port {port}")


@pytest.fixture
def short_tmp() -> Iterator[Path]:
    """A temporary folder with a short path (Unix socket paths have at most 107 bytes)."""
    d = Path(tempfile.mkdtemp(prefix="ml"))
    yield d
    shutil.rmtree(d, ignore_errors=True)


@pytest.fixture
def archive(tmp_path: Path) -> Archive:
    """An archive in a temporary folder with its SQLite index, no free-space reserve."""
    root = tmp_path / "archive"
    (root / ".tmp").mkdir(parents=True)
    return Archive(root, Database(tmp_path / "db.sqlite"), min_free_mb=0)


@dataclass
class RunningService:
    """A `modality-link serve` subprocess on a temporary home."""

    home: Home
    port: int
    proc: subprocess.Popen

    def cli(self, *args: str, check: bool = False, timeout: float = 120) -> subprocess.CompletedProcess:
        return subprocess.run(
            [sys.executable, "-m", "modality_link", "--home", str(self.home.root), *args],
            capture_output=True, text=True, timeout=timeout, check=check,
        )

    def call(self, method: str, **params: Any) -> Any:
        with IpcClient(self.home.socket_path) as client:
            return client.call(method, **params)

    def studies(self) -> list[dict[str, Any]]:
        out = self.cli("studies", "--json", check=True).stdout
        return json.loads(out)

    def log(self) -> str:
        return (self.home.log_dir / "modality-link.log").read_text(encoding="utf-8")

    def alive(self) -> bool:
        return self.proc.poll() is None


def start_service(root: Path, nodes: dict[str, config.Node] | None = None, **settings: Any) -> RunningService:
    """Start `serve` on `root`; `settings` are dotted config keys (disk_server__port=...)."""
    home = temporary_home(root, nodes=nodes, **settings)
    port = config.load(home.config_path).disk_server.port
    proc = subprocess.Popen(
        [sys.executable, "-m", "modality_link", "--home", str(root), "serve"],
        stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
    )
    svc = RunningService(home, port, proc)
    deadline = time.monotonic() + 20
    while True:
        try:
            svc.call("status")
            break
        except (NotRunning, OSError):
            if proc.poll() is not None or time.monotonic() > deadline:
                err = proc.stderr.read().decode() if proc.stderr else ""
                proc.kill()
                raise RuntimeError(f"service did not start: {err}")
            time.sleep(0.1)
    return svc


def stop_service(svc: RunningService) -> None:
    if svc.proc.poll() is None:
        svc.proc.send_signal(signal.SIGTERM)
        try:
            svc.proc.wait(timeout=15)
        except subprocess.TimeoutExpired:
            svc.proc.kill()
            svc.proc.wait()


@pytest.fixture
def service(short_tmp: Path) -> Iterator[RunningService]:
    svc = start_service(short_tmp / "home")
    yield svc
    stop_service(svc)


def dataset_bytes(path: Path) -> bytes:
    """The bytes of a PS3.10 file after its File Meta group."""
    data = path.read_bytes()
    assert data[128:132] == b"DICM"
    group_length = int.from_bytes(data[140:144], "little")
    return data[144 + group_length:]
