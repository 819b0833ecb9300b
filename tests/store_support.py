"""Helpers for the storage, commitment and job tests: a service in a temporary home, peers."""

from __future__ import annotations

import shutil
import subprocess
import tempfile
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Iterator


from modality_link import config
from modality_link.home import Home, free_port, temporary_home  # noqa: F401 (free_port: bench/send.py)
from modality_link.ipc import IpcClient
from tests.conftest import dcmtk_env, require_tool, wait_port



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


def start_storescp(out: Path, port: int, *options: str) -> subprocess.Popen:
    """DCMTK storescp (AE STORESCP, more `options` if given) writing into `out`; it listens on
    `port` when this returns. The caller terminates it."""
    proc = subprocess.Popen([require_tool("storescp"), "-od", str(out), "-aet", "STORESCP", *options, str(port)],
                            env=dcmtk_env(), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    wait_port(port)
    return proc


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
    with IpcClient(home.socket_path) as client:
        try:
            return client.follow_job(job_id, timeout=timeout)
        except TimeoutError as exc:
            raise AssertionError(str(exc)) from None

