"""The service under test, in either of its two forms, and the homes it runs on.

* :class:`ServiceProcess`: ``modality-link serve`` as a subprocess, the way the console runs it
  (a SIGKILL is a real crash; the command line talks to it);
* :class:`InProcessService`: a :class:`~modality_link.service.Service` in the test's process,
  whose parts the test can reach (``svc.service.exams``, ``svc.service.db``...).

Both are driven over the IPC socket of their home (docs/ipc.md) with :meth:`call`.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
from pathlib import Path
from typing import Any

from modality_link import config
from modality_link.home import Home, temporary_home
from modality_link.ipc import IpcClient, NotRunning
from modality_link.service import Service
from tests.support.waiting import wait_until


def call(home: Home, method: str, **params: Any) -> Any:
    """One IPC request to the service of `home`; its result."""
    with IpcClient(home.socket_path) as client:
        return client.call(method, **params)


def wait_chain(home: Home, job_id: int, timeout: float = 60.0) -> dict[str, Any]:
    """Wait until the job and the jobs it queued (commit, resend) are all finished; return the last."""
    with IpcClient(home.socket_path) as client:
        try:
            return client.follow_job(job_id, timeout=timeout)
        except TimeoutError as exc:
            raise AssertionError(str(exc)) from None


def make_home(**node_kw: Any) -> Home:
    """A home with a disk server on a free loopback port and, if `node_kw` are given, node PACS
    (a Storage and Storage Commitment SCP on loopback, quick retries)."""
    nodes = {}
    if node_kw:
        defaults: dict[str, Any] = dict(host="127.0.0.1", roles=["store", "commit"], retry_interval=0.2,
                                        commit_wait=5.0, commit_timeout=10.0)
        nodes["PACS"] = config.Node(**(defaults | node_kw))
    return temporary_home(nodes=nodes)


def exam_home(nodes: dict[str, config.Node], **timeouts: float) -> Home:
    """A home without a disk server, with these nodes and timeouts (connect=1.0 ...)."""
    settings: dict[str, Any] = {f"timeouts__{k}": v for k, v in timeouts.items()}
    return temporary_home(nodes=nodes, disk_server=False, **settings)


def cleanup(home: Home) -> None:
    shutil.rmtree(home.root, ignore_errors=True)


class ServiceProcess:
    """``modality-link serve`` as a subprocess on `home`; `port` is its disk server's. Its
    stderr goes to ``serve-stderr.log`` in the home, shown when it does not start."""

    def __init__(self, home: Home, env: dict[str, str] | None = None) -> None:
        self.home = home
        self.port = config.load(home.config_path).disk_server.port
        self._stderr = home.root / "serve-stderr.log"
        with open(self._stderr, "ab") as stderr:
            self.proc = subprocess.Popen(
                [sys.executable, "-m", "modality_link", "--home", str(home.root), "serve"],
                stdout=subprocess.DEVNULL, stderr=stderr, env=None if env is None else os.environ | env,
            )
        try:
            wait_until(self._answers, 20, "the service to answer on its IPC socket")
        except AssertionError as exc:
            self.proc.kill()
            self.proc.wait()
            raise RuntimeError(f"service did not start ({exc}): {self._stderr.read_text()}") from None

    @classmethod
    def start(cls, root: Path, nodes: dict[str, config.Node] | None = None, env: dict[str, str] | None = None,
              **settings: Any) -> ServiceProcess:
        """Serve a temporary home at `root` (made, or its listeners moved to free ports);
        `settings` are dotted config keys (``disk_server__port=...``), `env` more environment
        variables of the process."""
        return cls(temporary_home(root, nodes=nodes, **settings), env)

    def _answers(self) -> bool:
        try:
            self.call("status")
            return True
        except (NotRunning, OSError):
            if self.proc.poll() is not None:
                raise AssertionError(f"it exited with {self.proc.returncode}") from None
            return False

    def call(self, method: str, **params: Any) -> Any:
        return call(self.home, method, **params)

    def cli(self, *args: str, check: bool = False, timeout: float = 120) -> subprocess.CompletedProcess:
        """``modality-link --home HOME args...``: exit code, stdout and stderr as text."""
        return subprocess.run(
            [sys.executable, "-m", "modality_link", "--home", str(self.home.root), *args],
            capture_output=True, text=True, timeout=timeout, check=check,
        )

    def studies(self) -> list[dict[str, Any]]:
        return json.loads(self.cli("studies", "--json", check=True).stdout)

    def log(self) -> str:
        return (self.home.log_dir / "modality-link.log").read_text(encoding="utf-8")

    def alive(self) -> bool:
        return self.proc.poll() is None

    def stop(self) -> None:
        """SIGTERM, the way a console stops it; SIGKILL if it has not ended 15 s later."""
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout=15)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()


class InProcessService:
    """A :class:`~modality_link.service.Service` started in this process on `home`, its log
    in the home only (not on stderr)."""

    def __init__(self, home: Home) -> None:
        self.home = home
        self.service = Service(home)
        self.service.start(log_to_stderr=False)

    def call(self, method: str, **params: Any) -> Any:
        return call(self.home, method, **params)

    def stop(self) -> None:
        self.service.stop()
