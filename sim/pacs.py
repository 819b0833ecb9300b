"""A simulated PACS: Storage SCP + Storage Commitment Push SCP with quirk modes.

PS3.4 Annex B (Storage) and Annex J (Storage Commitment), with the ways real archives
report commitment. Quirks (all keyword arguments of :class:`Pacs`):

- ``commit_mode``: "same" (N-EVENT-REPORT on the N-ACTION's association; on a new one if that
  is gone by then), "new" (a new association without role selection), "new-role" (a new
  association proposing the SCP role by SCP/SCU Role Selection), "multi" (hold reports until
  ``multi_count`` transactions are pending, then send them all on one new association),
  "never" (no report at all);
- ``commit_delay``: seconds before the report; ``fail_commit``: report the last N referenced
  instances of a request as failed (Failure Reason 0x0110) in the first ``fail_commit_rounds``
  requests; an instance not received before the N-ACTION is failed with 0x0112 (No Such
  Object Instance, as an archive that commits only what it already holds does);
- ``action_status``: the N-ACTION response status;
- ``store_status``: a status for every C-STORE, or a function (call index, SOP Instance UID) ->
  status; failures are not kept, warnings (B000/B006/B007) are;
- ``abort_after``: abort the association once, after this many C-STOREs were received;
- ``ack_delay``: seconds before each C-STORE response; ``transfer_syntaxes`` accepted;
  ``reject_sop_classes``: SOP classes refused at negotiation.

As a Query/Retrieve SCP (PS3.4 Annex C; Patient Root and Study Root, FIND and MOVE) it answers
from what it holds: what it received, and what :meth:`Pacs.preload` gave it (priors). Matching
is simple (single value, ``*``/``?`` wildcards, ``a-b`` ranges, UID lists, universal), the
hierarchical keys of each level only. C-MOVE destinations are ``move_destinations`` (AE title ->
(host, port)); unknown ones get 0xA801. ``move_delay``: seconds before each sub-operation (a
slow archive, to watch progress or time out); ``move_fail_every``: every N-th sub-operation fails
(partial failure, final 0xB000).

Usable in-process (tests) or as ``python -m sim.pacs``.
"""

from __future__ import annotations

import argparse
import copy
import fnmatch
import hashlib
import logging
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterable, Iterator

from pydicom import dcmread
from pydicom.dataset import Dataset
from pydicom.uid import ExplicitVRBigEndian, ExplicitVRLittleEndian, ImplicitVRLittleEndian
from pynetdicom import AE, build_role, evt
from pynetdicom.association import Association
from pynetdicom.dimse_primitives import C_STORE
from pynetdicom.presentation import AllStoragePresentationContexts
# pynetdicom makes its SOP class names when it is imported: mypy cannot see them
from pynetdicom.sop_class import StorageCommitmentPushModel, Verification  # type: ignore[attr-defined]
from pynetdicom.transport import ThreadedAssociationServer

LOG = logging.getLogger("sim.pacs")
COMMIT_MODES = ("same", "new", "new-role", "multi", "never")
#: Query/Retrieve SOP classes, PS3.4 C.6 (UIDs of PS3.6 Annex A).
QR_FIND = {"patient": "1.2.840.10008.5.1.4.1.2.1.1", "study": "1.2.840.10008.5.1.4.1.2.2.1"}
QR_MOVE = {"patient": "1.2.840.10008.5.1.4.1.2.1.2", "study": "1.2.840.10008.5.1.4.1.2.2.2"}
LEVELS = ("PATIENT", "STUDY", "SERIES", "IMAGE")
#: The keys matched at each level (PS3.4 C.6.1.1, C.6.2.1: the unique key and a few required ones).
LEVEL_KEYS = {
    "PATIENT": ("PatientID", "PatientName", "PatientBirthDate", "PatientSex"),
    "STUDY": ("StudyInstanceUID", "StudyDate", "StudyTime", "AccessionNumber", "StudyID", "StudyDescription"),
    "SERIES": ("SeriesInstanceUID", "Modality", "SeriesNumber"),
    "IMAGE": ("SOPInstanceUID", "InstanceNumber", "SOPClassUID"),
}
LEVEL_UNIQUE = {"PATIENT": "PatientID", "STUDY": "StudyInstanceUID", "SERIES": "SeriesInstanceUID",
                "IMAGE": "SOPInstanceUID"}
#: A SOP class no sub-operation association proposes (``move_fail_every``).
UNPROPOSED_SOP_CLASS = "1.2.826.0.1.3680043.9.7433.99.1"


def _match(query: str, value: str) -> bool:
    """Single value, wildcard, range and UID-list matching, simplified (PS3.4 C.2.2.2)."""
    query = query.strip()
    if query in ("", "*"):
        return True
    if "\\" in query:
        return value in query.split("\\")
    if "-" in query and query.replace("-", "").replace(".", "").isdigit():
        low, _, high = query.partition("-")
        return (not low or value >= low) and (not high or value <= high)
    if "*" in query or "?" in query:
        return fnmatch.fnmatchcase(value.upper(), query.upper())
    return value == query


@dataclass
class Received:
    transfer_syntax: str
    pixel_sha256: str
    sop_class_uid: str


@dataclass
class Pacs:
    ae_title: str = "SIMPACS"
    port: int = 0
    host: str = "127.0.0.1"
    #: Where to open the report association: (AE title, host, port) of the modality's AE.
    report_to: tuple[str, str, int] | None = None
    commit_mode: str = "same"
    commit_delay: float = 0.0
    multi_count: int = 2
    fail_commit: int = 0
    fail_commit_rounds: int = 1
    action_status: int = 0x0000
    store_status: int | Callable[[int, str], int] = 0x0000
    abort_after: int | None = None
    ack_delay: float = 0.0
    transfer_syntaxes: list[str] = field(
        default_factory=lambda: [ExplicitVRLittleEndian, ImplicitVRLittleEndian, ExplicitVRBigEndian]
    )
    reject_sop_classes: tuple[str, ...] = ()
    move_destinations: dict[str, tuple[str, int]] = field(default_factory=dict)
    move_delay: float = 0.0
    move_fail_every: int = 0

    def __post_init__(self) -> None:
        if self.commit_mode not in COMMIT_MODES:
            raise ValueError(f"commit_mode: one of {COMMIT_MODES}")
        self.received: dict[str, Received] = {}
        #: Every instance held, by SOP Instance UID: what the Q/R SCP answers from.
        self.stored: dict[str, Dataset] = {}
        self.moves = 0
        self.store_calls = 0
        self.actions: list[Dataset] = []
        #: (tx, how, committed, failed), recorded as each report leaves (dropped if unanswered).
        self.reports_sent: list[tuple[str, str, int, int]] = []
        self.report_associations = 0
        #: Associations we accepted, and of those the ones the requestor released (A-RELEASE).
        self.associations = 0
        self.released = 0
        #: Associations open to us now, and the most that were open at once.
        self.open = 0
        self.max_open = 0
        self._lock = threading.Lock()
        self._pending: list[Dataset] = []
        self._aborted = False
        self._server: ThreadedAssociationServer | None = None
        #: The associations counted in `open`, and for each association that received an
        #: N-ACTION, set once our N-ACTION-RSP has left.
        self._counted: set[Association] = set()
        self._answered: dict[Association, threading.Event] = {}
        self.ae = AE(self.ae_title)
        self.ae.maximum_pdu_size = 0
        self.ae.add_supported_context(Verification)
        for cx in AllStoragePresentationContexts:
            syntax = cx.abstract_syntax
            if syntax is not None and syntax not in self.reject_sop_classes:
                self.ae.add_supported_context(syntax, self.transfer_syntaxes)
        self.ae.add_supported_context(StorageCommitmentPushModel)
        for uid in (*QR_FIND.values(), *QR_MOVE.values()):
            self.ae.add_supported_context(uid)

    # -- life cycle -----------------------------------------------------------------------------

    def start(self) -> "Pacs":
        handlers: list[evt.EventHandlerType] = [
            (evt.EVT_C_STORE, self._on_store),
            (evt.EVT_C_ECHO, lambda e: 0),
            (evt.EVT_N_ACTION, self._on_action),
            (evt.EVT_C_FIND, self._on_find),
            (evt.EVT_C_MOVE, self._on_move),
            (evt.EVT_DIMSE_SENT, self._on_sent),
            (evt.EVT_ACCEPTED, self._on_accepted),
            (evt.EVT_RELEASED, self._on_released),
            (evt.EVT_ABORTED, self._on_closed),
            (evt.EVT_CONN_CLOSE, self._on_closed),
        ]
        server = self.ae.start_server((self.host, self.port), block=False, evt_handlers=handlers)
        assert server is not None  # not blocking: the server is returned
        self._server = server
        self.port = int(server.server_address[1])
        LOG.info("simulated PACS %s on %s:%d (commit mode %s)", self.ae_title, self.host, self.port, self.commit_mode)
        return self

    def stop(self) -> None:
        if self._server is not None:
            self._server.shutdown()
            self._server = None

    def abort_associations(self) -> int:
        """A-ABORT every association open to us now (a PACS closing idle connections)."""
        assocs: list[Association] = list(self._server.active_associations) if self._server is not None else []
        for assoc in assocs:
            assoc.abort()
        return len(assocs)

    def _on_accepted(self, event: evt.Event) -> None:
        with self._lock:
            self.associations += 1
            self.open += 1
            self.max_open = max(self.max_open, self.open)
            self._counted.add(event.assoc)

    def _on_released(self, event: evt.Event) -> None:
        with self._lock:
            self.released += 1
        self._on_closed(event)

    def _on_closed(self, event: evt.Event) -> None:
        with self._lock:
            if event.assoc in self._counted:
                self._counted.discard(event.assoc)
                self.open -= 1
            self._answered.pop(event.assoc, None)

    def __enter__(self) -> "Pacs":
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    # -- Storage SCP ----------------------------------------------------------------------------

    def _on_store(self, event: evt.Event) -> int:
        with self._lock:
            index = self.store_calls
            self.store_calls += 1
        request = event.request
        assert isinstance(request, C_STORE)
        uid = str(request.AffectedSOPInstanceUID)
        if self.ack_delay:
            time.sleep(self.ack_delay)
        status = self.store_status(index, uid) if callable(self.store_status) else self.store_status
        if status == 0 or status in (0xB000, 0xB006, 0xB007):
            ds = event.dataset
            ds.file_meta = event.file_meta
            self.stored[uid] = ds
            pixels = ds.get("PixelData", b"") or b""
            self.received[uid] = Received(
                str(event.context.transfer_syntax), hashlib.sha256(pixels).hexdigest(), str(ds.SOPClassUID)
            )
        if self.abort_after is not None and not self._aborted and self.store_calls >= self.abort_after:
            self._aborted = True
            LOG.info("simulated PACS: aborting the association after %d C-STORE(s)", self.store_calls)
            event.assoc.abort()
        return status

    # -- Query/Retrieve SCP (PS3.4 Annex C) --------------------------------------------------------

    def preload(self, paths: Iterable[str | Path]) -> int:
        """Hold these PS3.10 files as if they had been stored (priors to query and move)."""
        count = 0
        for path in paths:
            ds = dcmread(path)
            self.stored[str(ds.SOPInstanceUID)] = ds
            count += 1
        return count

    def _matches(self, identifier: Dataset, level: str) -> list[Dataset]:
        """The held instances whose keys of `level` and above match `identifier`, one per
        entity of that level (the first instance of each)."""
        keys = [k for lv in LEVELS[:LEVELS.index(level) + 1] for k in LEVEL_KEYS[lv]]
        wanted = {k: str(identifier.get(k, "") or "") for k in keys if k in identifier}
        seen: dict[str, Dataset] = {}
        for ds in list(self.stored.values()):
            if all(_match(value, str(ds.get(k, "") or "")) for k, value in wanted.items()):
                seen.setdefault(str(ds.get(LEVEL_UNIQUE[level], "")), ds)
        return list(seen.values())

    def _on_find(self, event: evt.Event) -> Iterator[tuple[int, Dataset | None]]:
        identifier = event.identifier
        level = str(identifier.get("QueryRetrieveLevel", ""))
        if level not in LEVELS:
            yield 0xC000, None
            return
        for ds in self._matches(identifier, level):
            if event.is_cancelled:
                yield 0xFE00, None
                return
            rsp = Dataset()
            rsp.QueryRetrieveLevel = level
            for elem in identifier:
                if elem.keyword not in ("QueryRetrieveLevel", "SpecificCharacterSet"):
                    setattr(rsp, elem.keyword, ds.get(elem.keyword, ""))
            rsp.RetrieveAETitle = self.ae_title
            if "SpecificCharacterSet" in ds:
                rsp.SpecificCharacterSet = ds.SpecificCharacterSet
            yield 0xFF00, rsp
        yield 0x0000, None

    def _on_move(self, event: evt.Event) -> Iterator[Any]:
        self.moves += 1
        destination = self.move_destinations.get(str(event.move_destination).strip())
        if destination is None:
            yield None, None  # pynetdicom answers 0xA801, move destination unknown
            return
        identifier = event.identifier
        level = str(identifier.get("QueryRetrieveLevel", ""))
        if level not in LEVELS:
            yield destination
            yield 0
            yield 0xC000, None
            return
        unique = LEVEL_UNIQUE[level]
        picked = {str(ds.get(unique, "")) for ds in self._matches(identifier, level)}
        instances = [ds for ds in list(self.stored.values()) if str(ds.get(unique, "")) in picked]
        # the sub-operation association proposes the SOP classes to send (at most 128, PS3.8 9.3.2.2)
        self.ae.requested_contexts = []
        for sop_class in sorted({str(ds.SOPClassUID) for ds in instances} or {"1.2.840.10008.5.1.4.1.1.2"})[:128]:
            self.ae.add_requested_context(sop_class, [ExplicitVRLittleEndian, ImplicitVRLittleEndian])
        yield destination
        yield len(instances)
        for n, ds in enumerate(instances, start=1):
            # pynetdicom's event.is_cancelled answers True once per C-CANCEL-RQ: asked once a round
            ready = time.monotonic() + self.move_delay
            cancelled = event.is_cancelled
            while not cancelled and time.monotonic() < ready:
                time.sleep(min(0.05, self.move_delay))
                cancelled = event.is_cancelled
            if cancelled:
                yield 0xFE00, None
                return
            if self.move_fail_every and n % self.move_fail_every == 0:
                failing = copy.copy(ds)
                failing.SOPClassUID = UNPROPOSED_SOP_CLASS  # no context for it: the sub-operation fails
                yield 0xFF00, failing
                continue
            yield 0xFF00, ds

    # -- Storage Commitment SCP -----------------------------------------------------------------

    def _on_sent(self, event: evt.Event) -> None:
        if type(event.message).__name__ == "N_ACTION_RSP":
            answered = self._answered.get(event.assoc)
            if answered is not None:
                answered.set()

    def _on_action(self, event: evt.Event) -> tuple[int, None]:
        answered = self._answered.setdefault(event.assoc, threading.Event())
        answered.clear()
        info = event.action_information
        self.actions.append(info)
        if self.action_status != 0:
            return self.action_status, None
        round_no = len(self.actions)
        report = Dataset()
        report.TransactionUID = info.TransactionUID
        ok, failed = [], []
        refs = list(info.ReferencedSOPSequence)
        n_fail = self.fail_commit if round_no <= self.fail_commit_rounds else 0
        for i, ref in enumerate(refs):
            item = Dataset()
            item.ReferencedSOPClassUID = ref.ReferencedSOPClassUID
            item.ReferencedSOPInstanceUID = ref.ReferencedSOPInstanceUID
            if str(ref.ReferencedSOPInstanceUID) not in self.received:
                item.FailureReason = 0x0112
                failed.append(item)
            elif i >= len(refs) - n_fail:
                item.FailureReason = 0x0110
                failed.append(item)
            else:
                ok.append(item)
        if ok:
            report.ReferencedSOPSequence = ok
        if failed:
            report.FailedSOPSequence = failed
        if self.commit_mode != "never":
            threading.Thread(target=self._report, args=(event.assoc, report, answered), daemon=True).start()
        return 0x0000, None

    def _report(self, assoc: Association, report: Dataset, answered: threading.Event) -> None:
        # send nothing on the association before our N-ACTION-RSP has left (pynetdicom's
        # reactor is not safe against a concurrent send while it answers)
        answered.wait(5.0)
        time.sleep(max(self.commit_delay, 0.05))
        if self.commit_mode == "same" and assoc.is_established:
            if self._send_report(assoc, report, "same"):
                return
        if self.commit_mode == "multi":
            with self._lock:
                self._pending.append(report)
                if len(self._pending) < self.multi_count:
                    return
                reports, self._pending = self._pending, []
        else:
            reports = [report]
        self._new_association(reports, role=self.commit_mode == "new-role")

    def _send_report(self, assoc: Association, report: Dataset, how: str) -> bool:
        event_type = 2 if "FailedSOPSequence" in report else 1
        n_ok = len(report.get("ReferencedSOPSequence", []))
        n_failed = len(report.get("FailedSOPSequence", []))
        # recorded before it leaves: the receiver may finish its job (and a test look here)
        # before the N-EVENT-REPORT-RSP comes back to us
        sent = (str(report.TransactionUID), how, n_ok, n_failed)
        with self._lock:
            self.reports_sent.append(sent)
        status, _ = assoc.send_n_event_report(
            report, event_type, StorageCommitmentPushModel, "1.2.840.10008.1.20.1.1"
        )
        code = getattr(status, "Status", None)
        LOG.info("simulated PACS: report %s sent (%s), answer %s", report.TransactionUID, how, code)
        if code is None:  # not delivered: the caller tries another association
            with self._lock:
                self.reports_sent.remove(sent)
        return code is not None

    def _new_association(self, reports: list[Dataset], role: bool) -> None:
        if self.report_to is None:
            LOG.error("simulated PACS: no report_to configured; report dropped")
            return
        aet, host, port = self.report_to
        ae = AE(self.ae_title)
        ae.add_requested_context(StorageCommitmentPushModel)
        assoc = ae.associate(host, port, ae_title=aet,
                             ext_neg=[build_role(StorageCommitmentPushModel, scp_role=True)] if role else None)
        if not assoc.is_established:
            LOG.error("simulated PACS: report association to %s refused", self.report_to)
            return
        self.report_associations += 1
        for rep in reports:
            self._send_report(assoc, rep, "new-role" if role else "new")
        assoc.release()


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(
        prog="python -m sim.pacs", description=__doc__.splitlines()[0],
        epilog="Prints one line 'sim.pacs: AE on HOST:PORT, ...' once it listens and logs what it receives "
               "on stderr; Ctrl-C stops it (docs/sim.md).")
    p.add_argument("--ae", default="SIMPACS", help="its AE title (default SIMPACS)")
    p.add_argument("--port", type=int, default=11115, help="TCP port on 127.0.0.1 (default 11115; 0: any free one)")
    p.add_argument("--report-to", help="AE@HOST:PORT of the modality's listening AE, for commitment reports "
                                       "on a new association")
    p.add_argument("--commit-mode", choices=COMMIT_MODES, default="same",
                   help="how it reports Storage Commitment (default same: on the N-ACTION's association)")
    p.add_argument("--commit-delay", type=float, default=0.0, help="seconds before each commitment report")
    p.add_argument("--fail-commit", type=int, default=0, help="report the last N instances of a request failed")
    p.add_argument("--store-status", type=lambda s: int(s, 16), default=0,
                   help="the status of every C-STORE response, hex, e.g. A700 (default 0000)")
    p.add_argument("--abort-after", type=int, help="abort the association once after N C-STOREs")
    p.add_argument("--ack-delay", type=float, default=0.0, help="seconds before each C-STORE response")
    p.add_argument("--preload", nargs="*", default=[], help="PS3.10 files or folders to hold as priors")
    p.add_argument("--move-dest", action="append", default=[], help="AE@HOST:PORT a C-MOVE may send to")
    p.add_argument("--move-delay", type=float, default=0.0, help="seconds before each C-MOVE sub-operation")
    p.add_argument("--move-fail-every", type=int, default=0, help="every N-th C-MOVE sub-operation fails")
    a = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO)
    report_to = None
    if a.report_to:
        aet, rest = a.report_to.split("@", 1)
        host, port = rest.rsplit(":", 1)
        report_to = (aet, host, int(port))
    destinations = {}
    for dest in a.move_dest:
        aet, rest = dest.split("@", 1)
        host, port = rest.rsplit(":", 1)
        destinations[aet] = (host, int(port))
    pacs = Pacs(a.ae, a.port, report_to=report_to, commit_mode=a.commit_mode,
                commit_delay=a.commit_delay, fail_commit=a.fail_commit, store_status=a.store_status,
                abort_after=a.abort_after, ack_delay=a.ack_delay, move_destinations=destinations,
                move_delay=a.move_delay, move_fail_every=a.move_fail_every)
    files = [f for p in map(Path, a.preload) for f in (sorted(p.rglob("*.dcm")) if p.is_dir() else [p])]
    pacs.preload(files)
    pacs.start()
    print(f"sim.pacs: {a.ae} on {pacs.host}:{pacs.port}, commit mode {a.commit_mode}, {len(files)} prior(s)",
          flush=True)
    try:
        while True:
            time.sleep(3600)
    except KeyboardInterrupt:
        pacs.stop()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
