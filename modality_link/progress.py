"""The technologist's screen: one progress style for send, commit, retrieve, burn and import.

On a terminal each job is a bar with its counts, rate and time left (`rich`'s progress display,
imported only when a bar is drawn, so that the thin IPC clients start as fast as before); when
standard output is not a terminal (a script, a log) the same updates are plain lines, one when
the job's state or its reason changes and one per tenth of its items. Beside the counts the
screen says what the job does or waits for: while it is queued or retrying, the reason (the last
attempt's error) and when the next attempt is due; a finished job shows its outcome, never the
error of an attempt that an attempt after it made good (docs/design.md "The command line").
"""

from __future__ import annotations

import sys
import time
from dataclasses import dataclass, field
from typing import IO, Any

FINAL = ("done", "failed", "cancelled")


def clock(t: float) -> str:
    """`t` as the time of day (the date too when it is not today)."""
    if time.strftime("%Y-%m-%d", time.localtime(t)) == time.strftime("%Y-%m-%d"):
        return time.strftime("%H:%M:%S", time.localtime(t))
    return time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(t))


def job_status(job: dict[str, Any], now: float | None = None) -> str:
    """What a job (a ``jobs.show`` row) does or waits for, in words.

    Queued after a failed attempt: "attempt 1 of 4 failed; retrying: <error>; next attempt at
    14:03:22"; waiting (a commitment report, a disc): its detail and when it is looked at again;
    done: its detail only (the error of an earlier attempt is history, see ``job show``);
    failed: the error that ended it."""
    now = time.time() if now is None else now
    state, detail, error = job["state"], job.get("detail") or "", job.get("last_error") or ""
    if state == "queued":
        words = "; ".join(w for w in (detail, error) if w) or "waiting for a free association"
        due = job.get("next_attempt_at") or 0.0
        if due > now + 0.5:
            words += f"; next attempt at {clock(due)}"
        return words
    if state == "failed":
        return error or detail
    return detail


@dataclass
class _Task:
    label: str
    done: int = 0
    total: int = 0
    status: str = ""
    shown_tenth: int = -1
    key: Any = None


@dataclass
class Screen:
    """Progress of one or more jobs on `out`: a `rich` bar per job on a terminal, plain lines
    otherwise (`tty` None: whether `out` is a terminal)."""

    out: IO[str] = field(default_factory=lambda: sys.stdout)
    tty: bool | None = None
    unit: str = "items"
    _tasks: dict[str, _Task] = field(default_factory=dict)
    _bars: Any = None

    def __post_init__(self) -> None:
        if self.tty is None:
            self.tty = self.out.isatty()

    def update(self, key: str, label: str, done: int, total: int, status: str) -> None:
        """Job `key` (its label, e.g. "send job 4") has `done` of `total` items; `status` says
        what it does or waits for."""
        task = self._tasks.get(key)
        new = task is None
        if task is None:
            task = self._tasks[key] = _Task(label)
        changed = new or status != task.status
        task.done, task.total, task.status = done, total, status
        if self.tty:
            self._draw(task)
            return
        tenth = 10 * done // total if total else 0
        if changed or tenth > task.shown_tenth:
            task.shown_tenth = tenth
            counts = f" {done}/{total}" if total else ""
            print(f"{label}:{counts} {status}".rstrip(), file=self.out, flush=True)

    def _draw(self, task: _Task) -> None:
        if self._bars is None:
            self._bars = _rich_progress(self.out, self.unit)
            self._bars.start()
        if task.key is None:
            task.key = self._bars.add_task(task.label, total=task.total or None, status=task.status)
        self._bars.update(task.key, completed=task.done, total=task.total or None, status=task.status)

    def say(self, line: str) -> None:
        """A line above the bars (or a plain line)."""
        if self._bars is not None:
            self._bars.console.print(line, markup=False, highlight=False)
        else:
            print(line, file=self.out, flush=True)

    def close(self) -> None:
        """Leave the bars as they are last drawn."""
        if self._bars is not None:
            self._bars.stop()
            self._bars = None


def _rich_progress(out: IO[str], unit: str) -> Any:
    """A `rich` progress display: label, bar, done/total, rate, time left, status."""
    from rich.console import Console
    from rich.table import Column
    from rich.progress import (
        BarColumn, MofNCompleteColumn, Progress, ProgressColumn, TextColumn, TimeRemainingColumn,
    )
    from rich.text import Text

    class RateColumn(ProgressColumn):  # items per second (rich's own columns count bytes)
        def render(self, task: Any) -> Text:
            speed = task.finished_speed or task.speed
            return Text(f"{speed:.1f} {unit}/s" if speed else f"- {unit}/s")

    return Progress(
        TextColumn("{task.description}"), BarColumn(bar_width=24), MofNCompleteColumn(), RateColumn(),
        TimeRemainingColumn(),
        # the reason may be long (a peer's error): it wraps in its column, the bar keeps its place
        TextColumn("{task.fields[status]}", table_column=Column(ratio=1, overflow="fold", no_wrap=False)),
        console=Console(file=out, force_terminal=True), transient=False,
    )


def went_on(what: str, job_id: int) -> str:
    """What Ctrl-C on ``--wait`` or ``job follow`` prints: the job goes on without us."""
    return (f"stopped following {what} {job_id}; it goes on in the service. "
            f"Follow it again with: modality-link job follow {job_id}")
