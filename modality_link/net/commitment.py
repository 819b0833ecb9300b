"""Storage Commitment Push Model SCU (PS3.4 Annex J; DIMSE-N PS3.7 §10.1.4, §10.1.1).

The request is an N-ACTION (Action Type ID 1, "Request Storage Commitment", PS3.4 J.3.2) on the
well-known SOP Instance 1.2.840.10008.1.20.1.1 carrying a Transaction UID (0008,1195) and a
Referenced SOP Sequence (0008,1199) of (Referenced SOP Class UID, Referenced SOP Instance UID).

The result is an N-EVENT-REPORT (PS3.4 J.3.3) from the SCP: Event Type ID 1 "Storage
Commitment Request Successful" (every instance in the Referenced SOP Sequence) or 2 "Storage
Commitment Request Complete - Failures Exist" (a Failed SOP Sequence (0008,1198) whose items
carry a Failure Reason (0008,1197), PS3.4 J.3.3.1.1). It may arrive on the N-ACTION's own
association or on a new association the SCP opens to our listening AE, with or without an
SCP/SCU Role Selection item (PS3.7 D.3.3.4) in which the SCP proposes the SCP role (J.3.3).
"""

from __future__ import annotations

import logging
import struct
import threading
import time
from dataclasses import dataclass, field
from io import BytesIO
from typing import Callable, Sequence, cast

from pydicom.dataset import Dataset
from pydicom.uid import UID, generate_uid
from pynetdicom import Association, evt
from pynetdicom.dimse_primitives import N_EVENT_REPORT
from pynetdicom.dsutils import decode

from modality_link.config import Node, Timeouts
from modality_link.net.acceptor import DataSetSink, InMemory, Reply, Request
from modality_link.net.association import PROPOSED_TRANSFER_SYNTAXES, associate, make_ae
from modality_link.net.status import (
    COMMITMENT, INVALID_ARGUMENT_VALUE, NO_SUCH_EVENT_TYPE, PROCESSING_FAILURE, SUCCESS,
)

LOG = logging.getLogger("modality_link.net.commitment")

STORAGE_COMMITMENT_PUSH = "1.2.840.10008.1.20.1"
STORAGE_COMMITMENT_INSTANCE = "1.2.840.10008.1.20.1.1"
ACTION_REQUEST = 1  # PS3.4 Table J.3-1
EVENT_SUCCESS, EVENT_FAILURES = 1, 2  # PS3.4 Table J.3-2


@dataclass
class Report:
    """A decoded N-EVENT-REPORT (PS3.4 J.3.3)."""

    transaction_uid: str
    committed: list[tuple[str, str]] = field(default_factory=list)  # (class, instance)
    failed: list[tuple[str, str, int]] = field(default_factory=list)  # (class, instance, reason)
    calling_ae: str = ""

    def failure_text(self) -> str:
        reasons: dict[int, int] = {}
        for _, _, r in self.failed:
            reasons[r] = reasons.get(r, 0) + 1
        return ", ".join(
            f"{n} x 0x{r:04X} {COMMITMENT.text(r)}" for r, n in sorted(reasons.items())
        )


class ReportError(ValueError):
    """The N-EVENT-REPORT cannot be processed; `status` is our answer (PS3.7 Annex C)."""

    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status


def new_transaction_uid() -> str:
    return str(generate_uid())


def action_dataset(transaction_uid: str, refs: Sequence[tuple[str, str]]) -> Dataset:
    """The N-ACTION Action Information (PS3.4 Table J.3-1), without the optional Storage Media
    File-Set ID and UID (docs/design.md "Storage Commitment")."""
    ds = Dataset()
    ds.TransactionUID = transaction_uid
    items = []
    for sop_class, sop_instance in refs:
        item = Dataset()
        item.ReferencedSOPClassUID = sop_class
        item.ReferencedSOPInstanceUID = sop_instance
        items.append(item)
    ds.ReferencedSOPSequence = items
    return ds


def parse_report(event_type: int | None, info: Dataset | None, calling_ae: str = "") -> Report:
    """Decode the Event Information of an N-EVENT-REPORT, or raise :class:`ReportError`."""
    if event_type not in (EVENT_SUCCESS, EVENT_FAILURES):
        raise ReportError(NO_SUCH_EVENT_TYPE, f"unknown Event Type ID {event_type}")
    if info is None or not info.get("TransactionUID"):
        raise ReportError(INVALID_ARGUMENT_VALUE, "the report has no Transaction UID (0008,1195)")
    rep = Report(str(info.TransactionUID), calling_ae=calling_ae)
    for item in info.get("ReferencedSOPSequence", []):
        rep.committed.append((str(item.get("ReferencedSOPClassUID", "")), str(item.ReferencedSOPInstanceUID)))
    for item in info.get("FailedSOPSequence", []):
        reason = int(item.get("FailureReason", PROCESSING_FAILURE))
        rep.failed.append(
            (str(item.get("ReferencedSOPClassUID", "")), str(item.ReferencedSOPInstanceUID), reason)
        )
    return rep


def answer_report(sop_class: str, event_type: int | None, info: Dataset | None, calling: str,
                  on_report: Callable[[Report], None]) -> int:
    """Decode an N-EVENT-REPORT-RQ, hand the report to `on_report`, return our status.

    `on_report` raises :class:`ReportError` to answer with a failure status (PS3.7 Annex C).
    """
    if sop_class != STORAGE_COMMITMENT_PUSH:
        LOG.error("N-EVENT-REPORT for SOP class %s refused", sop_class)
        return PROCESSING_FAILURE
    try:
        rep = parse_report(event_type, info, calling)
        on_report(rep)
    except ReportError as exc:
        LOG.error("N-EVENT-REPORT from %s refused with 0x%04X: %s", calling, exc.status, exc)
        return exc.status
    except Exception:
        LOG.exception("N-EVENT-REPORT from %s: processing failure", calling)
        return PROCESSING_FAILURE
    return SUCCESS


def report_handler(on_report: Callable[[Report], None]) -> Callable[[evt.Event], tuple[int, None]]:
    """An EVT_N_EVENT_REPORT handler (a pynetdicom association of ours) for :func:`answer_report`."""

    def handle(event: evt.Event) -> tuple[int, None]:
        calling = event.assoc.requestor.ae_title.strip() if not event.assoc.is_requestor else (
            event.assoc.acceptor.ae_title.strip())
        req = cast(N_EVENT_REPORT, event.request)  # the request of an EVT_N_EVENT_REPORT
        info = event.event_information if str(req.AffectedSOPClassUID) == STORAGE_COMMITMENT_PUSH else None
        return answer_report(str(req.AffectedSOPClassUID), req.EventTypeID, info, calling, on_report), None

    return handle


class ReportHandler:
    """N-EVENT-REPORT on our acceptor (`modality_link.net.acceptor`): a Storage Commitment SCP
    that reports on a new association (PS3.4 J.3.3, PS3.7 §10.1.1)."""

    def __init__(self, on_report: Callable[[Report], None]) -> None:
        self.on_report = on_report

    def sink(self, request: Request) -> DataSetSink:
        return InMemory()

    def handle(self, request: Request, data: DataSetSink | None, reply: Reply) -> None:
        info = None
        raw = bytes(data.data) if isinstance(data, InMemory) else b""
        if raw and request.affected_sop_class == STORAGE_COMMITMENT_PUSH:
            ts = UID(request.transfer_syntax)
            try:
                info = decode(BytesIO(raw), ts.is_implicit_VR, ts.is_little_endian, ts.is_deflated)
            except Exception as exc:
                LOG.error("N-EVENT-REPORT from %s: Event Information cannot be decoded: %s", request.peer, exc)
                reply(INVALID_ARGUMENT_VALUE, "the Event Information cannot be decoded", None, None)
                return
        status = answer_report(request.affected_sop_class, request.event_type, info,
                               request.peer.calling_ae, self.on_report)
        extra = {0x1002: struct.pack("<H", request.event_type)} if request.event_type is not None else None
        reply(status, "", extra, None)


def request(assoc: Association, transaction_uid: str, refs: Sequence[tuple[str, str]]) -> int:
    """Send the N-ACTION; return the response status (None -> raise ConnectionError)."""
    status, _ = assoc.send_n_action(
        action_dataset(transaction_uid, refs),
        ACTION_REQUEST,
        STORAGE_COMMITMENT_PUSH,
        STORAGE_COMMITMENT_INSTANCE,
    )
    code = getattr(status, "Status", None)
    if code is None:
        raise ConnectionError("no N-ACTION response (association aborted or DIMSE timeout)")
    return int(code)


class ReportWaiter:
    """Waits on a requestor association for the report of given transactions (the report on
    the N-ACTION's own association, PS3.4 J.3.3)."""

    def __init__(self) -> None:
        self._cond = threading.Condition()
        self._seen: set[str] = set()

    def seen(self, transaction_uid: str) -> None:
        with self._cond:
            self._seen.add(transaction_uid)
            self._cond.notify_all()

    def wait(self, transaction_uid: str, timeout: float, assoc: Association) -> bool:
        """True once the report of `transaction_uid` arrived; False on timeout or lost link."""
        with self._cond:
            return self._cond.wait_for(
                lambda: transaction_uid in self._seen or not assoc.is_established, timeout
            ) and transaction_uid in self._seen


class Refused(Exception):
    """The SCP answered the N-ACTION with a failure status (PS3.4 J.3.2, PS3.7 Annex C)."""

    def __init__(self, status: int) -> None:
        super().__init__(f"N-ACTION status 0x{status:04X}")
        self.status = status


def request_commitment(
    node: Node,
    calling_ae: str,
    timeouts: Timeouts,
    transaction_uid: str,
    refs: Sequence[tuple[str, str]],
    on_report: Callable[[Report], None],
    waiter: ReportWaiter,
    wait: float,
    should_stop: Callable[[], bool] = lambda: False,
) -> None:
    """Ask `node` to commit `refs` (SOP Class, SOP Instance UIDs) under `transaction_uid` and keep
    the association open up to `wait` seconds for the report (PS3.4 J.3.2, J.3.3).

    The association proposes Storage Commitment Push as SCU. An N-EVENT-REPORT that comes on it
    goes to `on_report` and is answered there; `waiter` ends the wait as soon as the report of
    this transaction arrived, on this association or on another one. When it came on this one,
    our N-EVENT-REPORT-RSP has left before the association is released. Raises
    :class:`~modality_link.net.association.AssociationFailed` (its subclass
    ``NoContextAccepted`` when the node does not offer Storage Commitment), ConnectionError when
    no N-ACTION response came, :class:`Refused` for a failure status (the association is then
    aborted: the SCP will not report on a request it refused).
    """
    ae = make_ae(calling_ae, timeouts, node.max_pdu)
    ae.add_requested_context(STORAGE_COMMITMENT_PUSH, PROPOSED_TRANSFER_SYNTAXES)
    handler = report_handler(on_report)
    answered = threading.Event()  # our N-EVENT-REPORT-RSP left: safe to release
    got_here = threading.Event()  # a report came on this association

    def on_sent(event: evt.Event) -> None:
        if type(event.message).__name__ == "N_EVENT_REPORT_RSP":
            answered.set()

    def on_event_report(event: evt.Event) -> tuple[int, None]:
        got_here.set()
        return handler(event)

    handlers: list[evt.EventHandlerType] = [
        (evt.EVT_N_EVENT_REPORT, on_event_report), (evt.EVT_DIMSE_SENT, on_sent),
    ]
    with associate(ae, node, evt_handlers=handlers) as assoc:
        status = request(assoc, transaction_uid, refs)
        if status != SUCCESS:
            assoc.abort()
            raise Refused(status)
        LOG.info("commitment of %d instance(s) requested from %s, transaction %s",
                 len(refs), node.ae_title, transaction_uid)
        end = time.monotonic() + wait
        while time.monotonic() < end and assoc.is_established and not should_stop():
            if waiter.wait(transaction_uid, min(0.2, end - time.monotonic()), assoc):
                if got_here.is_set():
                    answered.wait(5.0)
                break
