"""Storage SCU: many C-STOREs on one association (PS3.4 Annex B, PS3.7 §9.1.1).

- presentation contexts are built from the SOP classes of the instances to send and the
  destination's transfer-syntax list (the node's ``transfer_syntaxes``), one context per (SOP
  class, transfer syntax) pair so that the peer can accept each syntax we may send natively;
- a file whose stored transfer syntax was accepted is sent as its bytes on disk, never decoded;
  otherwise it is converted in memory by :func:`modality_link.transcode.transcode` to an accepted
  native syntax (ILE, ELE, EBE, Deflated; compressed to uncompressed), keeping its SOP Instance
  UID and every attribute; a lossy source is sent decompressed with Lossy Image Compression
  (0028,2110) "01", and its outcome is a warning that says so (docs/design.md, "Identity and
  transfer syntaxes");
- every response status is classified by :func:`classify` (PS3.4 B.2.3; what is retried:
  docs/design.md "Jobs and failures");
- an association stays open after its job for the next job to the same node, and is released
  after ``idle_release`` seconds without work (docs/design.md "Sending and commitment").

The association itself is :class:`modality_link.net.upper_layer.Requestor`, not pynetdicom's
(the module docstring there says why).
"""

from __future__ import annotations

import logging
import os
import struct
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO, Callable, Sequence

from pydicom.uid import UID

from modality_link import transcode
from modality_link.config import Timeouts
from modality_link.fileformat import Part10Error, dataset_offset, padded
from modality_link.net.command import encode_command, parse_command
from modality_link.net.status import STORAGE, SUCCESS, Category, category
from modality_link.net.tls import Credentials
from modality_link.net.upper_layer import AssociationLost, Requestor

LOG = logging.getLogger("modality_link.net.storage")

MAX_CONTEXTS = 128  # PS3.8 §9.3.2.2: presentation context IDs are odd numbers 1-255
#: Files up to this size are read whole and sent from memory; larger ones are streamed.
IN_MEMORY = 32 << 20


@dataclass
class Outcome:
    """The result of one C-STORE, classified (docs/design.md "Jobs and failures")."""

    state: str  # done | warning | failed
    status: int | None
    detail: str = ""
    #: A failure that may succeed on a later attempt (:meth:`modality_link.net.status.Service.is_retryable`).
    retryable: bool = False


def classify(status: int) -> Outcome:
    """Map a C-STORE status (PS3.4 B.2.3 Table B.2-1, PS3.7 Annex C) onto an :class:`Outcome`.

    Category, meaning and retry come from :data:`modality_link.net.status.STORAGE`: a warning
    (0001, 0107, 0116, Bxxx such as B000, B006, B007) means the instance was stored; a failure
    is retryable only for the few statuses that blame the peer's state, not the request; a
    status in no table is a failure that is not retried.
    """
    if status == SUCCESS:
        return Outcome("done", status)
    meaning = STORAGE.text(status)
    if category(status) == Category.WARNING:
        return Outcome("warning", status, f"warning 0x{status:04X}: {meaning}")
    return Outcome("failed", status, f"failed 0x{status:04X}: {meaning}", STORAGE.is_retryable(status))


@dataclass
class Instance:
    """One instance to send: its UIDs, stored transfer syntax and absolute file path."""

    sop_instance_uid: str
    sop_class_uid: str
    transfer_syntax: str
    path: Path


def build_contexts(sop_classes: Sequence[str], transfer_syntaxes: Sequence[str]) -> list[tuple[str, list[str]]]:
    """Requested presentation contexts as (abstract syntax, [transfer syntaxes]): one per
    (SOP class, transfer syntax), or one per SOP class with every syntax when that would
    exceed the 128 contexts PS3.8 §9.3.2.2 allows."""
    classes = list(dict.fromkeys(sop_classes))
    if len(classes) * len(transfer_syntaxes) <= MAX_CONTEXTS:
        return [(c, [ts]) for c in classes for ts in transfer_syntaxes]
    return [(c, list(transfer_syntaxes)) for c in classes[:MAX_CONTEXTS]]


def choose_syntax(stored: str, syntaxes: Sequence[str]) -> str | None:
    """The syntax to send an instance stored in `stored` in, given the syntaxes accepted for its
    SOP class (in the node's order of preference): as stored if accepted, else the first accepted
    one it can be converted to (:data:`modality_link.transcode.TARGETS`)."""
    if stored in syntaxes:
        return stored
    for ts in syntaxes:
        if transcode.can_convert(stored, ts):
            return ts
    return None


def c_store_rq(message_id: int, sop_class: str, sop_instance: str) -> bytes:
    """A C-STORE-RQ command set, Implicit VR Little Endian (PS3.7 §9.3.1.1, Table 9.3-1)."""
    return c_store_command(message_id, sop_class, sop_instance, {})


def c_store_command(message_id: int, sop_class: str, sop_instance: str, extra: dict[int, bytes]) -> bytes:
    """A C-STORE-RQ command set with `extra` elements {element: value}, e.g. the Move Originator
    of a C-MOVE or C-GET sub-operation (PS3.7 Table 9.3-1)."""
    return encode_command({
        0x0002: padded(sop_class.encode("ascii"), "UI"),
        0x0100: struct.pack("<H", 0x0001),  # Command Field: C-STORE-RQ
        0x0110: struct.pack("<H", message_id),
        0x0700: struct.pack("<H", 0x0000),  # Priority: medium
        0x0800: struct.pack("<H", 0x0000),  # a data set follows
        0x1000: padded(sop_instance.encode("ascii"), "UI"),
        **extra,
    })


def move_originator_elements(move_originator: tuple[str, int] | None) -> dict[int, bytes]:
    """Move Originator Application Entity Title and Message ID (PS3.7 Table 9.3-1), if any."""
    if move_originator is None:
        return {}
    title, message_id = move_originator
    return {0x1030: title.encode("ascii", "replace").ljust(16), 0x1031: struct.pack("<H", message_id)}


class AssociationPool:
    """Send associations kept open between jobs to the same destination (docs/design.md "Sending
    and commitment").

    :meth:`acquire` hands out an idle association of the node that was opened with the same
    settings and proposed every (SOP class, transfer syntax) the job needs, if the peer has not
    closed or aborted it meanwhile; otherwise it opens a new one. :meth:`give_back` keeps it for
    `idle` seconds, after which a reaper thread releases it (A-RELEASE, PS3.8 §7.2).
    :meth:`release_idle` and :meth:`close` release those of one node, or all.
    """

    def __init__(self) -> None:
        self._idle: dict[str, list[tuple[Requestor, float]]] = {}
        self._cond = threading.Condition()
        self._reaper: threading.Thread | None = None
        self._closed = False

    def acquire(
        self, node: str, host: str, port: int, calling_ae: str, called_ae: str,
        sop_classes: Sequence[str], transfer_syntaxes: Sequence[str], timeouts: Timeouts,
        max_pdu: int, tls: Credentials | None = None,
    ) -> Requestor:
        """An open association to `node` at (host, port) proposing these SOP classes, in TLS
        with these files when given."""
        new = Requestor(host, port, calling_ae, called_ae, build_contexts(sop_classes, transfer_syntaxes),
                        timeouts, max_pdu, tls=tls)
        needed = {(a, ts) for a, syntaxes in new.proposed for ts in syntaxes}
        found = None
        with self._cond:
            kept = self._idle.pop(node, [])
            for i, (assoc, _) in enumerate(kept):
                settings = (assoc.host, assoc.port, assoc.calling_ae, assoc.called_ae, assoc.timeouts, assoc.max_pdu,
                            assoc.tls)
                offered = {(a, ts) for a, syntaxes in assoc.proposed for ts in syntaxes}
                if settings == (host, port, calling_ae, called_ae, timeouts, max_pdu, tls) and needed <= offered \
                        and assoc.is_open:
                    found = kept.pop(i)[0]
                    break
            if found is not None and kept:
                self._idle[node] = kept  # the others stay for the node's next jobs
                kept = []
        # none fits: release them, so that no more than the node's limit are open
        self._release([a for a, _ in kept])
        if found is not None:
            LOG.debug("reusing the open association to %s", found.peer)
            found.reused = True
            return found
        return new.open()

    def give_back(self, node: str, assoc: Requestor, idle: float) -> None:
        """Keep `assoc` open for `idle` seconds for the next job to `node` (0: release)."""
        if idle <= 0 or self._closed or not assoc.is_open:
            assoc.release()
            return
        with self._cond:
            self._idle.setdefault(node, []).append((assoc, time.monotonic() + idle))
            if self._reaper is None:
                self._reaper = threading.Thread(target=self._reap, name="send-idle-release", daemon=True)
                self._reaper.start()
            self._cond.notify_all()

    def _reap(self) -> None:
        while True:
            with self._cond:
                if self._closed:
                    return
                now = time.monotonic()
                expired = [a for kept in self._idle.values() for a, t in kept if t <= now]
                for kept in self._idle.values():
                    kept[:] = [(a, t) for a, t in kept if t > now]
                deadlines = [t for kept in self._idle.values() for _, t in kept]
                if not expired:
                    self._cond.wait(min(deadlines) - now if deadlines else None)
                    continue
            LOG.info("releasing %d idle send association(s): no more work for them", len(expired))
            self._release(expired)

    def release_idle(self, node: str) -> None:
        """Release the kept associations of `node`: another kind of job is about to open one,
        and the node's association limit holds for all."""
        with self._cond:
            kept = self._idle.pop(node, [])
        self._release([a for a, _ in kept])

    def close(self) -> None:
        """Release every kept association."""
        with self._cond:
            self._closed = True
            kept = [a for lst in self._idle.values() for a, _ in lst]
            self._idle.clear()
            self._cond.notify_all()
        self._release(kept)

    @staticmethod
    def _release(assocs: list[Requestor]) -> None:
        """A-RELEASE those still open; close the sockets of those the peer already dropped."""
        for assoc in assocs:
            if assoc.is_open:
                assoc.release()
            else:
                assoc.close()


@dataclass
class Ready:
    """An instance ready to go: its presentation context and its data set, in memory or as an
    open file positioned at the data set with `size` bytes to send."""

    context_id: int
    data: memoryview | BinaryIO
    size: int = 0
    #: Said in the outcome of a successful C-STORE (a lossy source sent decompressed).
    note: str = ""

    def close(self) -> None:
        if not isinstance(self.data, memoryview):
            self.data.close()


def prepare(inst: Instance, contexts: Sequence[tuple[int, str]], rejected: Callable[[], str]) -> Ready | Outcome:
    """Choose the context among the (context ID, transfer syntax) accepted for the instance's
    SOP class, convert when needed and read the file; an Outcome when it cannot be sent
    (`rejected` says why its SOP class has no context)."""
    ts = choose_syntax(inst.transfer_syntax, [t for _, t in contexts])
    if ts is None:
        if not contexts:
            why = f"the peer rejected its SOP class (presentation context: {rejected()})"
        else:
            why = (f"the peer accepts none of the transfer syntaxes it can be sent in "
                   f"(stored as {inst.transfer_syntax})")
        return Outcome("failed", None, f"not sent: {why}")
    context_id = next(cid for cid, t in contexts if t == ts)
    if ts != inst.transfer_syntax:
        return _converted(inst, ts, context_id)
    try:
        fp = open(inst.path, "rb")
    except OSError as exc:
        return Outcome("failed", None, f"not sent: cannot read {inst.path.name}: {exc}")
    try:
        size = os.fstat(fp.fileno()).st_size
        start = dataset_offset(fp)
        fp.seek(start)
        if size <= IN_MEMORY or (size - start) % 2:
            data = fp.read()
            fp.close()
            if len(data) % 2:  # a deflated data set of odd length (DCMTK's dcmconv +td writes
                data += b"\x00"  # them) gets a pad byte: DCMTK's storescp refuses an odd PDV
            return Ready(context_id, memoryview(data))
        return Ready(context_id, fp, size - start)
    except (OSError, Part10Error, struct.error) as exc:
        fp.close()
        return Outcome("failed", None, f"not sent: cannot read {inst.path.name}: {exc}")


def _converted(inst: Instance, ts: str, context_id: int) -> Ready | Outcome:
    """`inst` converted to `ts` in memory (a decompressed image is in memory anyway)."""
    try:
        out = transcode.transcode(inst.path, ts)
    except transcode.TranscodeError as exc:  # no decoder, or a decoder failed
        return Outcome("failed", None, f"not sent: cannot convert from {UID(inst.transfer_syntax).name} "
                                       f"to {UID(ts).name}: {exc}")
    note = ""
    if out.lossy:
        note = (f"lossy source ({out.lossy}) sent decompressed as {out.transfer_syntax.name}, the peer "
                f"accepting no syntax it is stored in; Lossy Image Compression (0028,2110) 01 kept")
        LOG.warning("%s: %s", inst.sop_instance_uid, note)
    else:
        LOG.info("%s: converted from %s to %s for the peer", inst.sop_instance_uid,
                 out.source_syntax.name, out.transfer_syntax.name)
    return Ready(context_id, memoryview(out.data), note=note)


def store_instances(
    assoc: Requestor,
    instances: Sequence[Instance],
    on_result: Callable[[Instance, Outcome], bool],
    should_stop: Callable[[], bool] = lambda: False,
    move_originator: tuple[str, int] | None = None,
) -> None:
    """C-STORE each instance on `assoc`; call ``on_result(instance, outcome)`` after each, in order.

    A file whose transfer syntax was accepted goes out as its bytes on disk after the File
    Meta Information, never decoded; the next file is read while the peer stores the current
    one. `on_result` returns False to stop the batch (the node's failure policy "stop"). The
    C-STORE-RQs of a C-MOVE name its `move_originator` (AE title, Message ID; PS3.7 Table 9.3-1).
    Raises :class:`AssociationLost` when the association is aborted or the connection lost.
    """
    accepted = assoc.accepted()
    queue = ((inst, prepare(inst, accepted.get(inst.sop_class_uid, []),
                            lambda: assoc.rejected().get(inst.sop_class_uid, "not proposed")))
             for inst in instances)
    ahead = next(queue, None)
    try:
        while ahead is not None:
            if should_stop():
                return
            (inst, ready), ahead = ahead, None
            if isinstance(ready, Ready):
                try:
                    command = c_store_command(assoc.next_message_id(), inst.sop_class_uid, inst.sop_instance_uid,
                                              move_originator_elements(move_originator))
                    assoc.send_message(ready.context_id, command, ready.data, ready.size)
                finally:
                    ready.close()
                ahead = next(queue, None)  # read the next file while the peer stores this one
                outcome = _response(assoc)
                if ready.note and outcome.state == "done":
                    outcome = Outcome("warning", outcome.status, ready.note)
            else:
                outcome = ready
                ahead = next(queue, None)
            if not on_result(inst, outcome):
                return
    finally:
        if ahead is not None and isinstance(ahead[1], Ready):
            ahead[1].close()


def _response(assoc: Requestor) -> Outcome:
    """Wait for the C-STORE-RSP (PS3.7 §9.3.1.2) and classify its status."""
    rsp = parse_command(assoc.receive_command(assoc.timeouts.dimse))
    if rsp.get(0x0100) != b"\x01\x80" or 0x0900 not in rsp:  # C-STORE-RSP with a Status
        assoc.abort()
        raise AssociationLost(f"{assoc.peer} answered a C-STORE-RQ with something else than a C-STORE-RSP")
    (status,) = struct.unpack("<H", rsp[0x0900])
    outcome = classify(status)
    comment = rsp.get(0x0902, b"").rstrip(b"\x00 ").decode("latin-1")
    if comment and outcome.state != "done":
        outcome.detail += f" ({comment})"
    return outcome
