"""Verification Service Class SCU: C-ECHO (PS3.4 Annex A, PS3.7 §9.1.5)."""

from __future__ import annotations

import time
from dataclasses import dataclass

# pynetdicom makes its SOP class names when it is imported: mypy cannot see them
from pynetdicom.sop_class import Verification  # type: ignore[attr-defined]

from modality_link.config import Node, Timeouts
from modality_link.net.association import PROPOSED_TRANSFER_SYNTAXES, AssociationFailed, associate, make_ae
from modality_link.net.status import SUCCESS


@dataclass
class EchoResult:
    node: str
    ok: bool
    status: int | None
    rtt_ms: float
    message: str


def echo(name: str, node: Node, calling_ae: str, timeouts: Timeouts) -> EchoResult:
    """C-ECHO `node`; the round-trip time covers association, C-ECHO and release."""
    ae = make_ae(calling_ae, timeouts)
    ae.add_requested_context(Verification, PROPOSED_TRANSFER_SYNTAXES)
    start = time.perf_counter()
    try:
        with associate(ae, node) as assoc:
            rsp = assoc.send_c_echo()
            status = int(rsp.Status) if "Status" in rsp else None
    except AssociationFailed as exc:
        return EchoResult(name, False, None, (time.perf_counter() - start) * 1000, str(exc))
    rtt = (time.perf_counter() - start) * 1000
    if status is None:
        return EchoResult(name, False, None, rtt, "no C-ECHO response (timeout or abort)")
    ok = status == SUCCESS
    msg = "success" if ok else f"C-ECHO failed with status 0x{status:04X}"
    return EchoResult(name, ok, status, rtt, msg)
