"""Storage SCU: many C-STOREs on one association (PS3.4 Annex B, PS3.7 §9.1.1).

- presentation contexts are built from the SOP classes of the instances to send and the
  destination's transfer-syntax list (REQUIREMENTS A10, D4), one context per (SOP class,
  transfer syntax) pair so that the peer can accept each syntax we may send natively;
- a file whose stored transfer syntax was accepted is sent from disk in chunks, never decoded
  (pynetdicom ``STORE_SEND_CHUNKED_DATASET``); otherwise it is converted to an accepted syntax
  (ILE / ELE / EBE between each other, compressed to uncompressed when pydicom can decode it:
  A12, D9) through a temporary file;
- every response status is classified by the matrix of REQUIREMENTS D5 (PS3.4 B.2.3).
"""

from __future__ import annotations

import logging
import os
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Sequence

from pydicom import dcmread
from pydicom.uid import UID, ExplicitVRBigEndian, ExplicitVRLittleEndian, ImplicitVRLittleEndian
from pynetdicom import AE, Association, _config, build_context

LOG = logging.getLogger("modality_link.net.storage")

# Send files from disk without decoding them (pynetdicom >= 2.0).
_config.STORE_SEND_CHUNKED_DATASET = True

#: PS3.4 B.2.3 warning statuses: the instance was stored (REQUIREMENTS D5).
WARNING_STATUSES = {0xB000: "coercion of data elements", 0xB006: "elements discarded",
                    0xB007: "data set does not match SOP class"}
UNCOMPRESSED = (ExplicitVRLittleEndian, ImplicitVRLittleEndian, ExplicitVRBigEndian)
MAX_CONTEXTS = 128  # PS3.8 §9.3.2.2: presentation context IDs are odd numbers 1-255


@dataclass
class Outcome:
    """The result of one C-STORE, classified (REQUIREMENTS D5)."""

    state: str  # done | warning | failed
    status: int | None
    detail: str = ""
    #: A failure that may succeed later (A7xx out of resources, A9xx mismatch, lost association).
    retryable: bool = False


def classify(status: int) -> Outcome:
    """Map a C-STORE status (PS3.4 Table B.2-1, PS3.7 Annex C) onto an :class:`Outcome`."""
    if status == 0x0000:
        return Outcome("done", status)
    if status in WARNING_STATUSES:
        return Outcome("warning", status, f"warning 0x{status:04X}: {WARNING_STATUSES[status]}")
    if status & 0xFF00 == 0xA700:
        return Outcome("failed", status, f"refused 0x{status:04X}: out of resources", True)
    if status & 0xFF00 == 0xA900:
        return Outcome("failed", status, f"refused 0x{status:04X}: data set does not match SOP class", True)
    if status & 0xF000 == 0xC000:
        return Outcome("failed", status, f"refused 0x{status:04X}: cannot understand")
    if status == 0x0122:
        return Outcome("failed", status, "refused 0x0122: SOP class not supported")
    if status & 0xF000 == 0xB000:  # other warnings: stored
        return Outcome("warning", status, f"warning 0x{status:04X}")
    return Outcome("failed", status, f"refused 0x{status:04X}")


@dataclass
class Instance:
    """One instance to send: its UIDs, stored transfer syntax and absolute file path."""

    sop_instance_uid: str
    sop_class_uid: str
    transfer_syntax: str
    path: Path


class AssociationLost(Exception):
    """The association was aborted or the connection lost during the transfer (D7)."""


def build_contexts(sop_classes: Sequence[str], transfer_syntaxes: Sequence[str]) -> list:
    """Requested presentation contexts: one per (SOP class, transfer syntax), or one per SOP
    class with every syntax when that would exceed the 128 contexts PS3.8 allows."""
    classes = list(dict.fromkeys(sop_classes))
    if len(classes) * len(transfer_syntaxes) <= MAX_CONTEXTS:
        return [build_context(c, [ts]) for c in classes for ts in transfer_syntaxes]
    return [build_context(c, list(transfer_syntaxes)) for c in classes[:MAX_CONTEXTS]]


def accepted_syntaxes(assoc: Association) -> dict[str, list[str]]:
    """{SOP class UID: [accepted transfer syntaxes, in our proposal order]}."""
    out: dict[str, list[str]] = {}
    for cx in assoc.accepted_contexts:
        out.setdefault(str(cx.abstract_syntax), []).append(str(cx.transfer_syntax[0]))
    return out


def _convert(inst: Instance, target: str, tmp_dir: Path) -> Path:
    """Write `inst` re-encoded in the uncompressed syntax `target` to a temporary file."""
    ds = dcmread(inst.path)
    if ds.file_meta.TransferSyntaxUID.is_compressed:
        ds.decompress()  # raises when no pixel data handler can decode it
    target_uid = UID(target)
    ds.file_meta.TransferSyntaxUID = target_uid
    fd, name = tempfile.mkstemp(suffix=".dcm", dir=tmp_dir)
    os.close(fd)
    ds.save_as(
        name,
        implicit_vr=target_uid.is_implicit_VR,
        little_endian=target_uid.is_little_endian,
        enforce_file_format=True,
    )
    return Path(name)


def choose_syntax(inst: Instance, accepted: dict[str, list[str]]) -> str | None:
    """The syntax to send `inst` in: as stored if accepted, else an accepted uncompressed one."""
    syntaxes = accepted.get(inst.sop_class_uid, [])
    if inst.transfer_syntax in syntaxes:
        return inst.transfer_syntax
    for ts in syntaxes:
        if ts in UNCOMPRESSED:
            return ts
    return None


def store_instances(
    assoc: Association,
    instances: Sequence[Instance],
    on_result: Callable[[Instance, Outcome], bool],
    tmp_dir: Path,
    should_stop: Callable[[], bool] = lambda: False,
) -> None:
    """C-STORE each instance on `assoc`; call ``on_result(instance, outcome)`` after each.

    `on_result` returns False to stop the batch (failure policy "stop", D6). Raises
    :class:`AssociationLost` when the association is aborted or the connection lost (D7).
    """
    accepted = accepted_syntaxes(assoc)
    for inst in instances:
        if should_stop():
            return
        ts = choose_syntax(inst, accepted)
        if ts is None:
            if inst.sop_class_uid not in accepted:
                why = "the peer rejected its SOP class (presentation context not accepted)"
            else:
                why = (f"the peer accepts none of the transfer syntaxes it can be sent in "
                       f"(stored as {inst.transfer_syntax})")
            if not on_result(inst, Outcome("failed", None, f"not sent: {why}")):
                return
            continue
        path, temporary = inst.path, False
        if ts != inst.transfer_syntax:
            try:
                path, temporary = _convert(inst, ts, tmp_dir), True
            except Exception as exc:  # an undecodable compressed file
                outcome = Outcome("failed", None, f"not sent: cannot convert to {UID(ts).name}: {exc}")
                if not on_result(inst, outcome):
                    return
                continue
        try:
            rsp = assoc.send_c_store(path)
        finally:
            if temporary:
                os.unlink(path)
        status = getattr(rsp, "Status", None)
        if status is None:
            if assoc.is_aborted or not assoc.is_established:
                raise AssociationLost("association aborted or connection lost during C-STORE")
            raise AssociationLost("no C-STORE response (DIMSE timeout); association aborted")
        outcome = classify(int(status))
        comment = getattr(rsp, "ErrorComment", None)
        if comment and outcome.state != "done":
            outcome.detail += f" ({comment})"
        if not on_result(inst, outcome):
            return


def requested_ae(ae: AE, sop_classes: Sequence[str], transfer_syntaxes: Sequence[str]) -> None:
    """Put the requested contexts for these SOP classes on `ae` (replacing earlier ones)."""
    ae.requested_contexts = []
    for cx in build_contexts(sop_classes, transfer_syntaxes):
        ae.add_requested_context(cx.abstract_syntax, cx.transfer_syntax)
