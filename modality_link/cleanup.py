"""The disk clean-up: a console's archive that never fills (docs/design.md "Disk clean-up").

Above the high mark (``archive.cleanup_high`` percent of ``archive.quota_mb``, or without a
quota of the file system's space less the ``min_free_mb`` reserve) the least recently used
studies are deleted until the low mark (``cleanup_low``) is reached - but only a study that
exists somewhere else and that nobody is using: every instance committed at every node with the
``commit`` role (where no node has it: sent to every node with an auto-send rule; where there is
neither, no study is ever deleted), no queued or running job naming it, no exam of it IN
PROGRESS, and not protected by the operator. When the archive stays above the high mark, one
``disk-cleanup-blocked`` alert says how much data holds it and why, until that is resolved.

The service runs the policy at start, every 10 minutes, after stores (a poke that costs one
event, checked at most every few seconds), after commitment reports and after a new
configuration; ``cleanup`` over IPC runs it at once, or only says what it would delete (a dry
run).
"""

from __future__ import annotations

import logging
import shutil
import threading
import time
from dataclasses import asdict, dataclass
from typing import Any, Callable

from modality_link.archive import Archive
from modality_link.config import Config
from modality_link.db import StudyFacts

LOG = logging.getLogger("modality_link.cleanup")

ALERT = "disk-cleanup-blocked"
#: Seconds between two runs when nothing pokes the cleaner.
INTERVAL = 600.0
#: The least seconds between two checks that stores asked for.
DEBOUNCE = 5.0
#: Why a study may not be deleted, in the order they are told.
REASONS = ("protected", "open-exam", "active-job", "uncommitted", "unsent", "no-copy")


@dataclass(frozen=True)
class Usage:
    """How full the archive is: `used_bytes` of `capacity_bytes` (the quota, or the file
    system's space less the reserve)."""

    used_bytes: int
    capacity_bytes: int
    quota: bool

    @property
    def percent(self) -> float:
        return 100.0 * self.used_bytes / self.capacity_bytes

    def freed(self, size: int) -> Usage:
        return Usage(max(self.used_bytes - size, 0), self.capacity_bytes, self.quota)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self) | {"percent": round(self.percent, 2)}


def copy_nodes(cfg: Config) -> tuple[list[str], bool]:
    """The nodes whose copies make a study safe to delete, and whether a copy there must be
    committed (nodes with the commit role) or only sent (no such node: those with an auto-send
    rule)."""
    commit = [name for name, node in cfg.nodes.items() if "commit" in node.roles]
    if commit:
        return commit, True
    return [name for name, node in cfg.nodes.items() if node.auto_send != "none" and "store" in node.roles], False


def blocker(study: StudyFacts, nodes: list[str], committed: bool) -> str | None:
    """The first of :data:`REASONS` that keeps `study`, or None when it may be deleted."""
    if study.protected:
        return "protected"
    if study.open_exam:
        return "open-exam"
    if study.active_job:
        return "active-job"
    if not nodes:
        return "no-copy"
    if any(study.copies.get(node, 0) < study.instances for node in nodes):
        return "uncommitted" if committed else "unsent"
    return None


def _mb(size: int) -> str:
    return f"{size / 1e6:.1f} MB"


def _study(study: StudyFacts) -> dict[str, Any]:
    return {"study_uid": study.study_uid, "patient_id": study.patient_id, "patient_name": study.patient_name,
            "study_date": study.study_date, "instances": study.instances, "bytes": study.bytes,
            "last_used": study.last_used}


class Cleaner:
    """The clean-up policy over one archive, and the thread that runs it."""

    def __init__(self, archive: Archive, get_config: Callable[[], Config], alert: Callable[..., None]) -> None:
        self.archive = archive
        self.db = archive.db
        self.get_config = get_config
        self.alert = alert
        self._lock = threading.Lock()  # one run at a time
        self._wake = threading.Event()
        self._changed = False
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        #: the alert is raised: not again until the archive was below the high mark
        self._blocked = self.db.alerts.raised(ALERT)

    # -- life cycle -------------------------------------------------------------------------------

    def start(self) -> None:
        self._stop.clear()
        self._thread = threading.Thread(target=self._loop, name="disk-cleanup", daemon=True)
        self._thread.start()

    def stop(self, timeout: float = 30.0) -> None:
        """Stop after the study being deleted, if any."""
        self._stop.set()
        self._wake.set()
        if self._thread is not None:
            self._thread.join(timeout)
            self._thread = None

    def poke(self) -> None:
        """Something was stored: check the space soon (cheap; called for every instance)."""
        self._wake.set()

    def reconsider(self) -> None:
        """Something happened that may let studies go (a commitment report, a new configuration):
        run soon, also while the alert is raised."""
        self._changed = True
        self._wake.set()

    def _loop(self) -> None:
        due = time.monotonic()  # a first run at start
        while not self._stop.is_set():
            self._wake.wait(max(due - time.monotonic(), 0.0))
            if self._stop.is_set():
                break
            self._wake.clear()
            full, self._changed = self._changed, False
            if time.monotonic() >= due:
                due, full = time.monotonic() + INTERVAL, True
            try:
                # while the alert is raised, stores only add data that may not go either: the
                # policy waits for the period or a change instead of reading every study again
                if full or not self._blocked:
                    self.run(automatic=True)
            except Exception:  # a bug must not end the thread: the next run tries again
                LOG.exception("disk clean-up failed")
            self._stop.wait(DEBOUNCE)

    # -- the policy -------------------------------------------------------------------------------

    def usage(self) -> Usage:
        """How full the archive is now."""
        cfg = self.get_config().archive
        if cfg.quota_mb:
            return Usage(self.db.retention.archive_bytes(), cfg.quota_mb << 20, True)
        disk = shutil.disk_usage(self.archive.root)
        return Usage(disk.used, max(disk.used + disk.free - (cfg.min_free_mb << 20), 1), False)

    def run(self, dry_run: bool = False, automatic: bool = False) -> dict[str, Any]:
        """Apply the policy now: above the high mark delete (or, in a dry run, list) the least
        recently used studies that may go until the low mark; the studies, and what keeps the
        others (``cleanup`` in docs/ipc.md). `automatic` (the service's own runs): nothing more
        than measuring when below the high mark and no alert is to be cleared, and a stop of
        the service ends the run after the study being deleted."""
        with self._lock:
            cfg = self.get_config()
            high, low = cfg.archive.cleanup_high, cfg.archive.cleanup_low
            before = self.usage()
            above = before.percent > high
            if automatic and not above and not self._blocked:
                return {}
            nodes, committed = copy_nodes(cfg)
            studies = sorted(self.db.retention.studies(nodes, committed), key=lambda s: (s.last_used, s.study_uid))
            reasons = {s.study_uid: blocker(s, nodes, committed) for s in studies}
            after, chosen = before, []
            for study in studies:
                if not above or after.percent <= low or (automatic and self._stop.is_set()):
                    break
                if reasons[study.study_uid] is not None:
                    continue
                if not dry_run and not self._delete(study, nodes, committed):
                    continue
                chosen.append(study)
                after = after.freed(study.bytes)
            if not dry_run and chosen:
                after = self.usage()
            blocked: dict[str, dict[str, int]] = {}
            for study in studies:
                reason = reasons[study.study_uid]
                if reason is not None:
                    entry = blocked.setdefault(reason, {"studies": 0, "bytes": 0})
                    entry["studies"] += 1
                    entry["bytes"] += study.bytes
            blocked = {r: blocked[r] for r in REASONS if r in blocked}
            if not dry_run:
                self._tell(after, high, blocked, nodes)
            return {
                "dry_run": dry_run, "high": high, "low": low, "above_high": above,
                "before": before.to_dict(), "after": after.to_dict(),
                "deleted": [_study(s) for s in chosen], "deleted_bytes": sum(s.bytes for s in chosen),
                "blocked": blocked, "nodes": nodes, "copies": "committed" if committed else "sent",
            }

    def _delete(self, study: StudyFacts, nodes: list[str], committed: bool) -> bool:
        """Delete one study if it still may go (a job, an exam or a protection may have come
        meanwhile: the check is repeated in the transaction that marks it)."""
        def mark() -> list[str] | None:
            return self.db.retention.mark_deleting(study.study_uid, nodes, committed,
                                                   lambda now: blocker(now, nodes, committed) is None)

        if not self.archive.delete_study(study.study_uid, mark):
            LOG.info("cleanup: study %s stays (in use since it was chosen)", study.study_uid)
            return False
        LOG.info("cleanup: deleted study %s (%s, %d instance(s), %s, last used %s)", study.study_uid,
                 study.patient_id or study.patient_name, study.instances, _mb(study.bytes),
                 time.strftime("%Y-%m-%d %H:%M", time.localtime(study.last_used)))
        return True

    def _tell(self, after: Usage, high: int, blocked: dict[str, dict[str, int]], nodes: list[str]) -> None:
        """Raise the alert once when the archive stays above the high mark; clear it below."""
        if after.percent <= high:
            if self._blocked:
                LOG.info("cleanup: the archive is below its high mark again (%.1f %%)", after.percent)
                self.db.alerts.clear(ALERT)
                self._blocked = False
            return
        if self._blocked:
            return
        self._blocked = True
        held = {
            "protected": "protected",
            "open-exam": "of an exam in progress",
            "active-job": "named by a queued or running job",
            "uncommitted": f"not committed at {', '.join(nodes)}",
            "unsent": f"not sent to {', '.join(nodes)}",
            "no-copy": "with no copy elsewhere (no node has the commit role or an auto-send rule)",
        }
        parts = [f"{v['studies']} study(ies) ({_mb(v['bytes'])}) {held[r]}" for r, v in blocked.items()]
        why = "; ".join(parts) if parts else "the archive holds nothing more that may be deleted"
        self.alert(ALERT, f"archive {after.percent:.0f} % full (high mark {high} %) and nothing more may be "
                          f"deleted: {why}", "warning")
