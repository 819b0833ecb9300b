"""The memory server's cache: received instances kept in RAM only, within a byte budget.

Images pulled for viewing (a prior study moved to us, a colleague's push) do not belong in the
archive: they are kept as PS3.10 bytes in memory, least recently used evicted first when the
budget (`memory_server.cache_mb`) would be exceeded, and are gone when the service stops
(docs/design.md "The memory server").
"""

from __future__ import annotations

import mmap
import threading
import time
from collections import OrderedDict
from typing import Any, Callable

from modality_link.db import InstanceRecord


class CachedInstance:
    """One instance in the cache: its PS3.10 file bytes (as received: never changed) and its
    index attributes.

    The attributes may be given as a function that decodes them: the memory server answers a
    C-STORE once the data set is validated and decodes its text on first use (docs/design.md
    "The memory server")."""

    def __init__(self, data: bytes | mmap.mmap, sop_instance_uid: str,
                 record: InstanceRecord | Callable[[], InstanceRecord]) -> None:
        self.data = data
        self.sop_instance_uid = sop_instance_uid
        self.stored_at = time.time()
        self._record = record
        self._lock = threading.Lock()

    @property
    def record(self) -> InstanceRecord:
        with self._lock:
            if not isinstance(self._record, InstanceRecord):
                self._record = self._record()
            return self._record

    @property
    def size(self) -> int:
        return len(self.data)


class MemoryCache:
    """A byte-budgeted LRU of :class:`CachedInstance` keyed by SOP Instance UID; thread-safe.

    Storing an instance whose UID is cached replaces it (PS3.4 B.4.1.3 leaves a duplicate's
    handling to the SCP; the newest copy is what a viewer wants)."""

    def __init__(self, budget_bytes: int) -> None:
        self.budget = budget_bytes
        self._items: OrderedDict[str, CachedInstance] = OrderedDict()
        self._bytes = 0
        self._lock = threading.Lock()

    def fits(self, size: int) -> bool:
        """Whether an instance of `size` bytes can be kept at all (alone in the cache)."""
        return size <= self.budget

    def put(self, item: CachedInstance) -> list[CachedInstance]:
        """Keep `item` as the most recently used; return the instances evicted to make room.
        The caller checked :meth:`fits`."""
        uid = item.sop_instance_uid
        evicted: list[CachedInstance] = []
        with self._lock:
            old = self._items.pop(uid, None)
            if old is not None:
                self._bytes -= old.size
            while self._items and self._bytes + item.size > self.budget:
                _, gone = self._items.popitem(last=False)
                self._bytes -= gone.size
                evicted.append(gone)
            self._items[uid] = item
            self._bytes += item.size
        return evicted

    def get(self, sop_instance_uid: str) -> CachedInstance | None:
        """The instance, now the most recently used; None when not (or no longer) cached."""
        with self._lock:
            item = self._items.get(sop_instance_uid)
            if item is not None:
                self._items.move_to_end(sop_instance_uid)
            return item

    def clear(self) -> int:
        """Drop everything; the number of instances dropped."""
        with self._lock:
            count = len(self._items)
            self._items.clear()
            self._bytes = 0
            return count

    @property
    def used_bytes(self) -> int:
        with self._lock:
            return self._bytes

    def __len__(self) -> int:
        with self._lock:
            return len(self._items)

    def studies(self) -> list[dict[str, Any]]:
        """What the cache holds, study by study and series by series (oldest study first), with
        instance counts and bytes: the result of IPC ``memory.list`` (docs/ipc.md)."""
        with self._lock:
            items = list(self._items.values())
        studies: dict[str, dict[str, Any]] = {}
        for it in sorted(items, key=lambda i: i.stored_at):
            rec = it.record
            study = studies.setdefault(rec.study_uid, {
                "study_uid": rec.study_uid, "patient_id": rec.patient_id, "patient_name": rec.patient_name,
                "study_date": rec.study_date, "accession": rec.accession,
                "study_description": rec.study_description, "instances": 0, "bytes": 0, "series": {},
            })
            series = study["series"].setdefault(rec.series_uid, {
                "series_uid": rec.series_uid, "modality": rec.modality, "series_number": rec.series_number,
                "series_description": rec.series_description, "instances": 0, "bytes": 0,
                "sop_instance_uids": [],
            })
            for node in (study, series):
                node["instances"] += 1
                node["bytes"] += it.size
            series["sop_instance_uids"].append(rec.sop_instance_uid)
        out = []
        for study in studies.values():
            study["series"] = list(study["series"].values())
            out.append(study)
        return out
