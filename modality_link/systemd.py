"""The service manager's notification protocol, sd_notify(3), with the standard library
(docs/design.md "Unattended operation").

Under a unit with ``Type=notify`` systemd passes the path of a datagram socket in
``$NOTIFY_SOCKET`` (a file name, or an abstract socket name written with a leading ``@``);
each datagram is newline-separated ``KEY=VALUE`` assignments: ``READY=1`` once the service
serves, ``STOPPING=1`` when it begins to stop, ``STATUS=...`` a line ``systemctl status``
shows, ``WATCHDOG=1`` a keep-alive. With ``WatchdogSec=`` set, systemd passes the interval in
``$WATCHDOG_USEC`` (and the process meant in ``$WATCHDOG_PID``) and restarts a service that
has not pinged within it; :class:`Watchdog` pings at half of it, and only while the service's
own check says it is alive, so a hung service is restarted rather than pinged for forever.

Without ``$NOTIFY_SOCKET`` (the service run by hand, or by the tests) every call does nothing.
"""

from __future__ import annotations

import logging
import os
import socket
import threading
from typing import Callable

LOG = logging.getLogger("modality_link.systemd")


def _address(value: str) -> str | None:
    """The socket address of `value`: a path, or an abstract name ("@name" -> "\\0name")."""
    if value.startswith("@"):
        return "\0" + value[1:]
    if value.startswith("/"):
        return value
    return None  # vsock and other kinds systemd may pass: not used by this service


def notify(*assignments: str) -> bool:
    """Send `assignments` ("READY=1", "STATUS=...") in one datagram to ``$NOTIFY_SOCKET``;
    whether one was sent. A failure is logged, never raised: the service serves on without it."""
    target = os.environ.get("NOTIFY_SOCKET", "")
    address = _address(target) if target else None
    if address is None:
        return False
    message = "\n".join(a.replace("\n", " ") for a in assignments).encode("utf-8")
    try:
        with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC) as sock:
            sock.connect(address)
            sock.sendall(message)
    except OSError as exc:
        LOG.warning("systemd: cannot notify %s: %s", target, exc)
        return False
    return True


def watchdog_interval() -> float | None:
    """Seconds between keep-alive pings: half of ``$WATCHDOG_USEC``, or None when the service
    manager asks for none (or asks another process, ``$WATCHDOG_PID``)."""
    pid = os.environ.get("WATCHDOG_PID", "")
    if pid and pid != str(os.getpid()):
        return None
    try:
        usec = int(os.environ.get("WATCHDOG_USEC", ""))
    except ValueError:
        return None
    return usec / 2e6 if usec > 0 else None


class Watchdog:
    """A thread that sends ``WATCHDOG=1`` every :func:`watchdog_interval` seconds while
    `check()` returns None; a sentence from it (or an exception) means the service is not well:
    no ping, one log line, and the sentence as ``STATUS=``. A check that hangs sends nothing
    either, which is what makes systemd restart the service."""

    def __init__(self, check: Callable[[], str | None], status: str = "serving",
                 interval: float | None = None) -> None:
        self.check = check
        #: The ``STATUS=`` line sent again once a failed check passes again.
        self.status = status
        self.interval = interval if interval is not None else watchdog_interval()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def start(self) -> None:
        if self.interval is None:
            return
        LOG.info("systemd: watchdog keep-alive every %.1f s", self.interval)
        self._thread = threading.Thread(target=self._run, name="systemd-watchdog", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(5)
            self._thread = None

    def _run(self) -> None:
        assert self.interval is not None
        unwell = False
        while True:
            try:
                problem = self.check()
            except Exception as exc:  # the check itself failed: that is a sick service too
                problem = f"{type(exc).__name__}: {exc}"
            if self._stop.is_set():
                return
            if problem is None:
                notify("WATCHDOG=1", *([f"STATUS={self.status}"] if unwell else []))
                unwell = False
            else:
                if not unwell:
                    LOG.error("systemd: watchdog check failed, no keep-alive sent: %s", problem)
                notify(f"STATUS=not answering: {problem}")
                unwell = True
            if self._stop.wait(self.interval):
                return
