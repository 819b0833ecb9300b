"""Helpers for the storage, commitment and job tests: a service in a temporary home, peers."""

from __future__ import annotations

import os
import shutil
import tempfile
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Iterator

import pytest

from modality_link import config
from modality_link.home import Home, free_port, temporary_home  # noqa: F401 (free_port: bench/send.py)
from modality_link.ipc import IpcClient

IN_CI = os.environ.get("CI", "").lower() in ("1", "true", "yes")


@contextmanager
def generated_study(**kw: Any) -> Iterator[Path]:
    """A temporary folder holding a study from :func:`sim.images.write_study` (its keywords)."""
    from sim import images

    d = Path(tempfile.mkdtemp(prefix="mlimg"))
    try:
        images.write_study(d, **kw)
        yield d
    finally:
        shutil.rmtree(d, ignore_errors=True)


def need_tool(path: str) -> None:
    """Skip (outside CI) or fail (in CI) when a peer tool is missing."""
    if not Path(path).exists():
        if IN_CI:
            pytest.fail(f"{path} is required in CI")
        pytest.skip(f"{path} not installed")


def make_home(**node_kw: Any) -> Home:
    """A home with a disk server on a free loopback port and, if given, node PACS."""
    nodes = {}
    if node_kw:
        defaults = dict(host="127.0.0.1", roles=["store", "commit"], retry_interval=0.2,
                        commit_wait=5.0, commit_timeout=10.0)
        nodes["PACS"] = config.Node(**(defaults | node_kw))
    return temporary_home(nodes=nodes)


def cleanup(home: Home) -> None:
    shutil.rmtree(home.root, ignore_errors=True)


def call(home: Home, method: str, **params: Any) -> Any:
    with IpcClient(home.socket_path) as c:
        return c.call(method, **params)


def wait_chain(home: Home, job_id: int, timeout: float = 60.0) -> dict[str, Any]:
    """Wait until the job and the jobs it queued (commit, resend) are all finished; return the last."""
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        job = call(home, "jobs.show", id=job_id)
        if job["state"] in ("done", "failed", "cancelled"):
            if not job["children"]:
                return job
            job_id = job["children"][-1]
            continue
        time.sleep(0.05)
    raise AssertionError(f"job {job_id} not finished in {timeout} s: {job}")
