"""Helpers for the worklist / MPPS / exam tests: free ports, peer tools, an in-process service."""

from __future__ import annotations

import os
import shutil
import socket
import time
from pathlib import Path
from typing import Any, Callable

import pytest

from modality_link import config
from modality_link.home import Home, free_port, temporary_home  # noqa: F401 (free_port: tests)
from modality_link.ipc import IpcClient
from modality_link.service import Service


def require_tool(path: str) -> str:
    """A peer tool must exist; in CI its absence fails the test, elsewhere it skips."""
    if not os.path.exists(path):
        if os.environ.get("CI") == "true":
            pytest.fail(f"peer tool {path} is missing in CI")
        pytest.skip(f"{path} not installed")
    return path


def wait_until(cond: Callable[[], Any], timeout: float = 15.0, what: str = "condition") -> Any:
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        value = cond()
        if value:
            return value
        time.sleep(0.05)
    raise AssertionError(f"timed out waiting for {what}")


def wait_port(port: int, timeout: float = 10.0) -> None:
    def up() -> bool:
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=0.2):
                return True
        except OSError:
            return False

    wait_until(up, timeout, f"port {port}")


def make_home(nodes: dict[str, config.Node], **timeouts: float) -> Home:
    """A home without a disk server, with these nodes and timeouts (connect=1.0 ...)."""
    return temporary_home(nodes=nodes, disk_server=False, **{f"timeouts__{k}": v for k, v in timeouts.items()})


class RunningService:
    def __init__(self, home: Home) -> None:
        self.home = home
        self.service = Service(home)
        self.service.start(log_to_stderr=False)

    def call(self, method: str, **params: Any) -> Any:
        with IpcClient(self.home.socket_path) as c:
            return c.call(method, **params)

    def stop(self) -> None:
        self.service.stop()


def spool_images(folder: Path, count: int = 3, seed: int = 1) -> list[str]:
    from sim import images

    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    for i, ds in enumerate(images.make_study("CT", images=count, seed=seed)):
        p = folder / f"img{i}.dcm"
        ds.save_as(p, enforce_file_format=True)
        paths.append(str(p))
    return paths


def cleanup(home: Home) -> None:
    shutil.rmtree(home.root, ignore_errors=True)
