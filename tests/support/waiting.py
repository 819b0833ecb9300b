"""Polling with a deadline: the tests never sleep for a fixed time in the hope that something
has happened by then; they ask again until it has, or until the deadline says it never will."""

from __future__ import annotations

import socket
import time
from typing import Callable, TypeVar

T = TypeVar("T")


def wait_until(condition: Callable[[], T], deadline: float, message: str, interval: float = 0.05) -> T:
    """Call `condition` every `interval` seconds until it returns a true value, and return that
    value; if `deadline` seconds pass first, fail with "timed out ... waiting for `message`"."""
    end = time.monotonic() + deadline
    while True:
        value = condition()
        if value:
            return value
        if time.monotonic() > end:
            raise AssertionError(f"timed out after {deadline:g} s waiting for {message}")
        time.sleep(interval)


def wait_port(port: int, deadline: float = 10.0) -> None:
    """Wait until something accepts TCP connections on loopback `port`."""
    def listening() -> bool:
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=0.5):
                return True
        except OSError:
            return False

    wait_until(listening, deadline, f"a listener on port {port}")
