"""`modality-link logs`: the service's log file read back, filtered by level and job.

The service writes ``logs/modality-link.log`` (rotated to ``.1``, ``.2``... by size) as text
lines ``TIME LEVEL LOGGER: MESSAGE`` or as JSON lines (``logging.format``, docs/design.md
"Unattended operation"). A record's job is its ``job_id`` field in JSON, and "job N" in its
message in either format.
"""

from __future__ import annotations

import json
import os
import re
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable, Iterator

LEVELS = ("DEBUG", "INFO", "WARNING", "ERROR", "CRITICAL")
LOG_NAME = "modality-link.log"


@dataclass(frozen=True)
class Filter:
    """Which records to show: at least `level`, and only those of `job` (None: every job)."""

    level: str = "DEBUG"
    job: int | None = None

    def keeps(self, line: str) -> bool:
        level, message, job = _parse(line)
        if level is not None and LEVELS.index(level) < LEVELS.index(self.level):
            return False
        if self.job is None:
            return True
        return job == self.job or re.search(rf"\bjob {self.job}\b", message) is not None


def _parse(line: str) -> tuple[str | None, str, int | None]:
    """(level, message, job id) of one line; a line of no record (a traceback's) has no level."""
    if line.startswith("{"):
        try:
            rec = json.loads(line)
            job = rec.get("job_id")
            return rec.get("level"), str(rec.get("message", "")), job if isinstance(job, int) else None
        except ValueError:
            pass
    parts = line.split(" ", 3)
    if len(parts) == 4 and parts[2] in LEVELS:
        return parts[2], parts[3], None
    return None, line, None


def files(log_dir: Path) -> list[Path]:
    """The log file and its rotated copies, oldest first."""
    rotated = [p for p in log_dir.glob(f"{LOG_NAME}.*") if p.suffix[1:].isdigit()]
    rotated.sort(key=lambda p: int(p.suffix[1:]), reverse=True)  # .5 is the oldest
    current = log_dir / LOG_NAME
    return rotated + ([current] if current.exists() else [])


def read(log_dir: Path, keep: Filter) -> Iterator[str]:
    """The kept lines of every log file, oldest first; a traceback goes with its record."""
    for path in files(log_dir):
        with open(path, encoding="utf-8", errors="replace") as fh:
            yield from _kept(fh, keep)


def _kept(lines: Iterable[str], keep: Filter) -> Iterator[str]:
    showing = False
    for line in lines:
        line = line.rstrip("\n")
        if _parse(line)[0] is not None:
            showing = keep.keeps(line)
        if showing:
            yield line


def follow(log_dir: Path, keep: Filter, poll: float = 0.5) -> Iterator[str]:
    """The kept lines written from now on, as `tail -F` does: a rotated file is reopened."""
    path = log_dir / LOG_NAME
    fh = open(path, encoding="utf-8", errors="replace") if path.exists() else None
    if fh is not None:
        fh.seek(0, 2)
    showing = False
    pending = ""
    while True:
        chunk = fh.read() if fh is not None else ""
        if chunk:
            pending += chunk
            *complete, pending = pending.split("\n")
            for line in complete:
                if _parse(line)[0] is not None:
                    showing = keep.keeps(line)
                if showing:
                    yield line
            continue
        try:
            rotated = fh is None or path.stat().st_ino != os.fstat(fh.fileno()).st_ino
        except FileNotFoundError:
            rotated = False
        if rotated and path.exists():
            if fh is not None:
                fh.close()
            fh = open(path, encoding="utf-8", errors="replace")
            continue
        time.sleep(poll)

