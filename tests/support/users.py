"""Other Unix users and groups, for the tests of who may do what (docs/design.md "Who may do what").

The tests need root: they make groups with ``groupadd`` and run code as other users in a forked
child (``os.setgroups``, ``os.setgid``, ``os.setuid``). Outside CI a test is skipped when it is
not root or ``groupadd`` is missing; in CI, where the tests run as root, it fails.
"""

from __future__ import annotations

import contextlib
import io
import json
import os
import select
import signal
import subprocess
import time
import traceback
from typing import Any, Callable, Iterator

from modality_link.home import Home
from modality_link.ipc import IpcClient, IpcError
from tests.support.tools import missing


def require_root() -> None:
    """Skip (outside CI) or fail (in CI) unless this process may change its user."""
    if os.geteuid() != 0:
        missing("the role tests run other users' processes: they need root")


@contextlib.contextmanager
def unix_groups(*names: str) -> Iterator[dict[str, tuple[str, int]]]:
    """New Unix groups called ``NAME<pid>`` for each name, removed afterwards; name -> (the
    group's name, its id)."""
    require_root()
    if not os.path.exists("/usr/sbin/groupadd"):
        missing("/usr/sbin/groupadd not installed")
    made: dict[str, str] = {}
    try:
        for name in names:
            unique = f"{name}{os.getpid()}"
            subprocess.run(["/usr/sbin/groupadd", unique], check=True, capture_output=True, timeout=30)
            made[name] = unique
        import grp

        yield {n: (made[n], grp.getgrnam(made[n]).gr_gid) for n in names}
    finally:
        for unique in made.values():
            subprocess.run(["/usr/sbin/groupdel", unique], capture_output=True, timeout=30)


def run_as(uid: int, gids: list[int], fn: Callable[[], Any], timeout: float = 120.0) -> Any:
    """``fn()`` in a forked child running as user `uid` with groups `gids` (the first is its
    primary group); its value must be JSON. An exception in the child is raised here as an
    AssertionError with the child's traceback."""
    read_fd, write_fd = os.pipe()
    pid = os.fork()
    if pid == 0:  # the child: no return from here
        try:
            os.close(read_fd)
            os.setgroups(gids)
            os.setgid(gids[0] if gids else uid)
            os.setuid(uid)
            out = {"value": fn()}
        except BaseException:
            out = {"raised": traceback.format_exc()}
        try:
            data = json.dumps(out).encode()
            while data:
                data = data[os.write(write_fd, data):]
        finally:
            os._exit(0)
    os.close(write_fd)
    chunks, end = [], time.monotonic() + timeout
    try:
        while True:
            ready, _, _ = select.select([read_fd], [], [], max(0.0, end - time.monotonic()))
            if not ready:
                os.kill(pid, signal.SIGKILL)
                raise AssertionError(f"the child running as user {uid} did not finish within {timeout:g} s")
            chunk = os.read(read_fd, 65536)
            if not chunk:
                break
            chunks.append(chunk)
    finally:
        os.close(read_fd)
        os.waitpid(pid, 0)
    result = json.loads(b"".join(chunks) or b'{"raised": "the child wrote nothing"}')
    if "raised" in result:
        raise AssertionError(f"as user {uid}: {result['raised']}")
    return result["value"]


def cli_as(uid: int, gids: list[int], *argv: str) -> tuple[int, str, str]:
    """The command line (``modality_link.cli.main``) run as user `uid`: exit code, stdout, stderr."""
    def run() -> tuple[int, str, str]:
        from modality_link.cli import main

        out, err = io.StringIO(), io.StringIO()
        with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
            code = main(list(argv))
        return code, out.getvalue(), err.getvalue()

    code, out, err = run_as(uid, gids, run)
    return code, out, err


def ipc_as(uid: int, gids: list[int], home: Home, method: str, **params: Any) -> dict[str, Any]:
    """One IPC request as user `uid`: ``{"result": ...}``, ``{"error": {"code", "message"}}``, or
    ``{"refused": why}`` when the socket cannot even be opened."""
    def call() -> dict[str, Any]:
        try:
            with IpcClient(home.socket_path, timeout=60) as client:
                return {"result": client.call(method, **params)}
        except IpcError as exc:
            return {"error": {"code": exc.code, "message": exc.message}}
        except PermissionError as exc:
            return {"refused": str(exc)}

    return run_as(uid, gids, call)
