"""Verification Service Class SCU: C-ECHO (PS3.4 Annex A, PS3.7 §9.1.5), and the services a
node's roles need, proposed as presentation contexts (PS3.8 §9.3.2.2) to learn which it accepts."""

from __future__ import annotations

import dataclasses
import time
from dataclasses import dataclass
from typing import Any

from pydicom.uid import UID

# pynetdicom makes its SOP class names when it is imported: mypy cannot see them
from pynetdicom.sop_class import Verification  # type: ignore[attr-defined]

from modality_link.config import Node, Timeouts
from modality_link.net.association import (
    CONTEXT_RESULTS, PROPOSED_TRANSFER_SYNTAXES, AssociationFailed, NoContextAccepted, associate, make_ae,
)
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


#: The SOP classes each node role uses (PS3.4: B Storage, J Storage Commitment Push Model,
#: K.6 Modality Worklist FIND, F.7 Modality Performed Procedure Step, C.6.2 Study Root
#: Query/Retrieve FIND and MOVE); UIDs from PS3.6 Annex A.
ROLE_SOP_CLASSES: dict[str, tuple[str, ...]] = {
    "store": ("1.2.840.10008.5.1.4.1.1.2", "1.2.840.10008.5.1.4.1.1.4", "1.2.840.10008.5.1.4.1.1.7"),
    "commit": ("1.2.840.10008.1.20.1",),
    "worklist": ("1.2.840.10008.5.1.4.31",),
    "mpps": ("1.2.840.10008.3.1.2.3.3",),
    "qr": ("1.2.840.10008.5.1.4.1.2.2.1", "1.2.840.10008.5.1.4.1.2.2.2"),
}
VERIFICATION_UID = "1.2.840.10008.1.1"


@dataclass
class ServiceCheck:
    """One SOP class proposed for a role: accepted by the peer, or refused and why."""

    role: str
    sop_class: str
    name: str
    accepted: bool
    detail: str


@dataclass
class ServicesResult:
    """`echo --services`: the association's outcome and each proposed SOP class's."""

    node: str
    ok: bool
    rtt_ms: float
    message: str
    services: list[ServiceCheck]

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


def echo_services(name: str, node: Node, calling_ae: str, timeouts: Timeouts) -> ServicesResult:
    """Propose, in one association, Verification and the SOP classes of each of the node's roles
    (:data:`ROLE_SOP_CLASSES`) and report which the peer accepts (PS3.8 §9.3.3.2: an A-ASSOCIATE-AC
    result per presentation context); C-ECHO if Verification was accepted. A refused role's
    service would fail later (an MPPS N-CREATE to a RIS that only answers Verification)."""
    wanted = [("verification", VERIFICATION_UID)] + [
        (role, uid) for role in node.roles for uid in ROLE_SOP_CLASSES.get(role, ())]
    ae = make_ae(calling_ae, timeouts)
    for _, uid in wanted:
        ae.add_requested_context(uid, PROPOSED_TRANSFER_SYNTAXES)
    start = time.perf_counter()
    accepted: set[str] = set()
    refused: dict[str, str] = {}
    message = "association accepted"
    try:
        with associate(ae, node) as assoc:
            accepted = {str(cx.abstract_syntax) for cx in assoc.accepted_contexts}
            for cx in assoc.rejected_contexts:
                refused[str(cx.abstract_syntax)] = CONTEXT_RESULTS.get(cx.result or 0, f"result {cx.result}")
            if VERIFICATION_UID in accepted:
                rsp = assoc.send_c_echo()
                status = int(rsp.Status) if "Status" in rsp else None
                message += ", C-ECHO " + ("success" if status == SUCCESS else f"status {status}")
    except NoContextAccepted as exc:
        refused = {uid: CONTEXT_RESULTS.get(code, f"result {code}") for uid, _, code in exc.rejected}
        message = "the peer accepted the association but none of the proposed SOP classes"
    except AssociationFailed as exc:
        return ServicesResult(name, False, (time.perf_counter() - start) * 1000, str(exc), [])
    rtt = (time.perf_counter() - start) * 1000
    checks = []
    for role, uid in wanted:
        label = UID(uid).name if UID(uid).is_valid else uid
        ok = uid in accepted
        checks.append(ServiceCheck(role, uid, label, ok, "accepted" if ok else f"refused: {refused.get(uid, 'not accepted')}"))
    return ServicesResult(name, all(c.accepted for c in checks), rtt, message, checks)
