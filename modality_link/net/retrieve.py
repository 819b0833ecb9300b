"""Query/Retrieve SCU (PS3.4 Annex C): browse a remote archive with C-FIND and pull studies with
C-MOVE to one of our own listening AEs (the memory server or the disk server).

Study Root and Patient Root Information Models (PS3.4 C.6.1, C.6.2). A C-MOVE is watched: when no
response (pending or final) has arrived for `move_timeout` seconds, or the caller asks to stop,
a C-CANCEL-RQ is sent (PS3.7 §9.3.4.3) and the SCP's final response awaited a little longer
before the association is aborted.
"""

from __future__ import annotations

import logging
import threading
import time
from dataclasses import dataclass, field
from typing import Callable

from pydicom.dataset import Dataset

from modality_link import audit
from modality_link.config import Node, Timeouts
from modality_link.net.association import PROPOSED_TRANSFER_SYNTAXES, AssociationFailed, associate, make_ae
from modality_link.net import status
from modality_link.net.charset import repair_charset

LOG = logging.getLogger("modality_link.net.retrieve")

#: Information models: name -> (FIND SOP class, MOVE SOP class), PS3.4 C.6 (UIDs of PS3.6 Annex A).
MODELS = {
    "study": ("1.2.840.10008.5.1.4.1.2.2.1", "1.2.840.10008.5.1.4.1.2.2.2"),
    "patient": ("1.2.840.10008.5.1.4.1.2.1.1", "1.2.840.10008.5.1.4.1.2.1.2"),
}
LEVELS = ("PATIENT", "STUDY", "SERIES", "IMAGE")
#: Seconds to wait for the final response after our C-CANCEL-RQ before aborting.
CANCEL_GRACE = 10.0
PENDING = (status.PENDING, status.PENDING_WARNING)


class QueryError(Exception):
    """A query or retrieve failed; the message names the peer and the reason. `status` is the
    peer's DICOM status when it answered one."""

    def __init__(self, message: str, status: int | None = None) -> None:
        super().__init__(message)
        self.status = status


def _failure(target: str, what: str, status_ds: Dataset, service: status.Service) -> QueryError:
    code = int(status_ds.Status)
    comment = str(status_ds.get("ErrorComment", "") or "")
    return QueryError(f"{what} at {target} failed with status 0x{code:04X} ({service.text(code)})"
                      + (f": {comment}" if comment else ""), code)


def find(node: Node, calling_ae: str, timeouts: Timeouts, identifier: Dataset, model: str = "study",
         limit: int = 0) -> list[Dataset]:
    """C-FIND `identifier` (its Query/Retrieve Level and keys, PS3.4 C.4.1.1) at `node`; the
    matches decoded to Unicode. With `limit`, a C-CANCEL-RQ follows the limit-th match."""
    find_uid = MODELS[model][0]
    ae = make_ae(calling_ae, timeouts, node.max_pdu)
    ae.add_requested_context(find_uid, PROPOSED_TRANSFER_SYNTAXES)
    target = f"{node.ae_title}@{node.host}:{node.port}"
    matches: list[Dataset] = []
    try:
        with associate(ae, node) as assoc:
            cancelled = False
            audit.query_sent(calling_ae, audit.Participant(node.ae_title, node.host), find_uid, identifier)
            for status_ds, ident in assoc.send_c_find(identifier, find_uid, msg_id=1):
                if "Status" not in status_ds:
                    raise QueryError(f"query at {target}: no response within the DIMSE timeout "
                                     f"({len(matches)} match(es) received)")
                code = int(status_ds.Status)
                if code in PENDING:
                    if ident is not None and not cancelled:
                        matches.append(repair_charset(ident))
                        if limit and len(matches) >= limit:
                            assoc.send_c_cancel(1, query_model=find_uid)
                            cancelled = True
                    continue
                if code not in (status.SUCCESS, status.CANCEL):
                    raise _failure(target, "query", status_ds, status.QR_FIND)
                break
    except AssociationFailed as exc:
        raise QueryError(f"query failed: {exc}") from None
    LOG.info("query at %s (%s level): %d match(es)", target, identifier.get("QueryRetrieveLevel"), len(matches))
    return matches[:limit] if limit else matches


@dataclass
class MoveProgress:
    """Sub-operation counts of a C-MOVE as its pending responses give them (PS3.4 C.4.2.1.5)."""

    remaining: int | None = None
    completed: int = 0
    failed: int = 0
    warning: int = 0


@dataclass
class MoveResult:
    """How a C-MOVE ended: the final status and counts, the Failed SOP Instance UID List."""

    status: int
    progress: MoveProgress
    failed_uids: list[str] = field(default_factory=list)
    cancelled: str = ""  # why we cancelled it ("" when we did not)
    comment: str = ""

    @property
    def message(self) -> str:
        p = self.progress
        text = f"{p.completed} completed, {p.failed} failed, {p.warning} warning(s)"
        if self.cancelled:
            text += f"; cancelled: {self.cancelled}"
        return text


def move(node: Node, calling_ae: str, timeouts: Timeouts, destination_ae: str, identifier: Dataset,
         model: str = "study", move_timeout: float = 600.0,
         on_progress: Callable[[MoveProgress], None] | None = None,
         should_stop: Callable[[], bool] | None = None, cancel_grace: float = CANCEL_GRACE) -> MoveResult:
    """C-MOVE what `identifier` names (PS3.4 C.4.2) from `node` to `destination_ae`.

    Returns the final status with the counts (0x0000, 0xB000 with failures, 0xFE00 when
    cancelled); raises :class:`QueryError` when the association fails, the SCP refuses
    (A801 unknown destination, A7xx, A9xx, Cxxx) or does not answer our C-CANCEL-RQ."""
    move_uid = MODELS[model][1]
    ae = make_ae(calling_ae, timeouts, node.max_pdu)
    # our watchdog decides (move_timeout, then CANCEL_GRACE); pynetdicom's own abort only backs it up
    ae.dimse_timeout = move_timeout + 2 * cancel_grace
    ae.add_requested_context(move_uid, PROPOSED_TRANSFER_SYNTAXES)
    target = f"{node.ae_title}@{node.host}:{node.port}"
    progress = MoveProgress()
    last = [time.monotonic()]
    why: list[str] = []
    done = threading.Event()

    try:
        with associate(ae, node) as assoc:
            def watchdog() -> None:
                cancelled_at = None
                while not done.wait(0.2):
                    now = time.monotonic()
                    if cancelled_at is None:
                        if should_stop is not None and should_stop():
                            why.append("stopped by the operator")
                        elif now - last[0] > move_timeout:
                            why.append(f"no response for {move_timeout:g} s (move_timeout)")
                        if why:
                            LOG.warning("retrieve from %s: %s; sending C-CANCEL-RQ", target, why[0])
                            assoc.send_c_cancel(1, query_model=move_uid)
                            cancelled_at = now
                    elif now - cancelled_at > cancel_grace:
                        LOG.error("retrieve from %s: no final response %g s after C-CANCEL-RQ; aborting",
                                  target, cancel_grace)
                        why.append("no final response after C-CANCEL-RQ")
                        assoc.abort()
                        # wake send_c_move, which otherwise waits out its DIMSE timeout:
                        # (None, None) is what pynetdicom's DIMSE queue yields for a lost association
                        assoc.dimse.msg_queue.put((None, None))
                        return

            guard = threading.Thread(target=watchdog, name="c-move-watchdog", daemon=True)
            guard.start()
            try:
                final = None
                for status_ds, ident in assoc.send_c_move(identifier, destination_ae, move_uid, msg_id=1):
                    last[0] = time.monotonic()
                    if "Status" not in status_ds:
                        raise QueryError(f"retrieve from {target}: the association ended without a final "
                                         f"response ({progress.completed} completed)"
                                         + (f"; {why[-1]}" if why else ""))
                    progress.remaining = status_ds.get("NumberOfRemainingSuboperations", progress.remaining)
                    progress.completed = int(status_ds.get("NumberOfCompletedSuboperations", progress.completed) or 0)
                    progress.failed = int(status_ds.get("NumberOfFailedSuboperations", progress.failed) or 0)
                    progress.warning = int(status_ds.get("NumberOfWarningSuboperations", progress.warning) or 0)
                    if int(status_ds.Status) in PENDING:
                        if on_progress is not None:
                            on_progress(progress)
                        continue
                    final = (status_ds, ident)
                    break
            finally:
                done.set()
                guard.join(5)
    except AssociationFailed as exc:
        raise QueryError(f"retrieve failed: {exc}") from None
    if final is None:
        raise QueryError(f"retrieve from {target}: no final response")
    status_ds, ident = final
    code = int(status_ds.Status)
    failed_uids: list[str] = []
    if ident is not None and "FailedSOPInstanceUIDList" in ident:
        value = ident.FailedSOPInstanceUIDList
        failed_uids = [str(u) for u in (value if isinstance(value, (list, tuple)) or
                                        type(value).__name__ == "MultiValue" else [value]) if u]
    if status.category(code) not in (status.Category.SUCCESS, status.Category.WARNING, status.Category.CANCEL):
        raise _failure(target, "retrieve", status_ds, status.QR_MOVE)
    result = MoveResult(code, progress, failed_uids, why[0] if why else "",
                        str(status_ds.get("ErrorComment", "") or ""))
    LOG.info("retrieve from %s to %s: status 0x%04X, %s", target, destination_ae, code, result.message)
    return result
