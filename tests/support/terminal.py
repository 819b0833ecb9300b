"""The command line in a pseudo-terminal (Python's `pty`), the way a technologist sees it: what
it draws, read as it comes, and Ctrl-C sent as a terminal sends it (SIGINT to its process group)."""

from __future__ import annotations

import os
import pty
import re
import select
import signal
import subprocess
import sys
import time
from pathlib import Path

#: Terminal control sequences (colours, cursor moves) that rich draws around the text.
_CONTROL = re.compile(r"\x1b\[[0-9;?]*[A-Za-z]|\x1b\][^\x07]*\x07|\r")


class Terminal:
    """``modality-link --home HOME args...`` with a pseudo-terminal as its stdin, stdout and stderr."""

    def __init__(self, home: Path, *args: str, columns: int = 160) -> None:
        self._master, slave = pty.openpty()
        os.set_blocking(self._master, False)
        env = os.environ | {"COLUMNS": str(columns), "LINES": "40", "TERM": "xterm"}
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "modality_link", "--home", str(home), *args],
            stdin=slave, stdout=slave, stderr=slave, env=env, start_new_session=True,
        )
        os.close(slave)
        self.raw = ""

    @property
    def text(self) -> str:
        """What it printed so far, without the control sequences, each run of white space as one
        space (a long reason wraps within its column)."""
        return " ".join(_CONTROL.sub("", self.raw).split())

    def _read(self, timeout: float) -> None:
        ready, _, _ = select.select([self._master], [], [], timeout)
        if ready:
            try:
                self.raw += os.read(self._master, 65536).decode("utf-8", "replace")
            except OSError:  # EIO: the process closed the terminal
                pass

    def expect(self, pattern: str, deadline: float = 30.0) -> re.Match[str]:
        """Read until `pattern` (a regular expression) appears in :attr:`text`."""
        end = time.monotonic() + deadline
        while True:
            found = re.search(pattern, self.text)
            if found:
                return found
            if time.monotonic() > end:
                raise AssertionError(f"timed out after {deadline:g} s waiting for {pattern!r} in:\n{self.text[-3000:]}")
            self._read(0.1)

    def interrupt(self) -> None:
        """Ctrl-C: SIGINT to the foreground process group."""
        os.killpg(self.proc.pid, signal.SIGINT)

    def wait(self, deadline: float = 30.0) -> int:
        """Its exit code, reading what it prints until it ends."""
        end = time.monotonic() + deadline
        while self.proc.poll() is None:
            if time.monotonic() > end:
                self.proc.kill()
                raise AssertionError(f"still running after {deadline:g} s:\n{self.text}")
            self._read(0.1)
        self._read(0.1)
        os.close(self._master)
        return self.proc.returncode
