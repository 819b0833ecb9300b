"""Association set-up shared by every DICOM service (PS3.8 §7 and §9).

- every AE carries our Implementation Class UID and Version Name (PS3.7 D.3.3.2);
- every DICOM socket, requestor or acceptor, gets TCP_NODELAY when it opens;
- the timeouts of the config map onto pynetdicom's (REQUIREMENTS §12);
- a rejection or abort becomes one sentence that names the peer and the reason (PS3.8 §9.3.4
  Table 9-21 for A-ASSOCIATE-RJ, §9.3.8 Table 9-26 for A-ABORT).
"""

from __future__ import annotations

import logging
import socket
from contextlib import contextmanager
from typing import Any, Iterator, Sequence

from pynetdicom import AE, Association, evt
from pynetdicom.pdu_primitives import A_ABORT, A_ASSOCIATE, A_P_ABORT

from modality_link import IMPLEMENTATION_CLASS_UID, IMPLEMENTATION_VERSION_NAME
from modality_link.config import Node, Timeouts

LOG = logging.getLogger("modality_link.net")

#: PS3.8 Table 9-21: (source, reason) of an A-ASSOCIATE-RJ.
REJECT_REASONS = {
    (1, 1): "no reason given (service user)",
    (1, 2): "application context name not supported",
    (1, 3): "calling AE title not recognized",
    (1, 7): "called AE title not recognized",
    (2, 1): "no reason given (service provider, ACSE)",
    (2, 2): "protocol version not supported",
    (3, 1): "temporary congestion",
    (3, 2): "local limit exceeded",
}
REJECT_RESULTS = {1: "permanent", 2: "transient"}
#: PS3.8 Table 9-26: A-ABORT source and (for the provider) reason.
ABORT_SOURCES = {0: "service user", 1: "reserved", 2: "service provider"}
ABORT_REASONS = {
    0: "reason not specified",
    1: "unrecognized PDU",
    2: "unexpected PDU",
    4: "unrecognized PDU parameter",
    5: "unexpected PDU parameter",
    6: "invalid PDU parameter value",
}


class AssociationFailed(Exception):
    """The association could not be established or was lost; the message says why."""


def set_tcp_nodelay(event: evt.Event) -> None:
    """EVT_CONN_OPEN handler: disable Nagle's algorithm on the association's socket."""
    sock = getattr(getattr(event.assoc.dul, "socket", None), "socket", None)
    if sock is not None:
        try:
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        except OSError:  # already closed
            pass


#: Handlers every association of ours binds.
COMMON_HANDLERS: list[tuple[Any, Any]] = [(evt.EVT_CONN_OPEN, set_tcp_nodelay)]


def make_ae(ae_title: str, timeouts: Timeouts, max_pdu: int = 0) -> AE:
    """An AE with our identity and the configured timeouts."""
    ae = AE(ae_title=ae_title)
    ae.implementation_class_uid = IMPLEMENTATION_CLASS_UID
    ae.implementation_version_name = IMPLEMENTATION_VERSION_NAME
    ae.connection_timeout = timeouts.connect
    ae.acse_timeout = timeouts.acse
    ae.dimse_timeout = timeouts.dimse
    ae.network_timeout = timeouts.network
    ae.maximum_pdu_size = max_pdu
    return ae


def describe_reject(primitive: A_ASSOCIATE) -> str:
    result = REJECT_RESULTS.get(primitive.result, f"result {primitive.result}")
    reason = REJECT_REASONS.get(
        (primitive.result_source, primitive.diagnostic),
        f"source {primitive.result_source}, reason {primitive.diagnostic}",
    )
    return f"rejected ({result}): {reason}"


def describe_abort(primitive: A_ABORT | A_P_ABORT) -> str:
    if isinstance(primitive, A_P_ABORT):
        return f"aborted by the network provider ({primitive.provider_reason})"
    source = ABORT_SOURCES.get(primitive.abort_source, str(primitive.abort_source))
    return f"aborted by the {source}"


def peer_of(assoc: Association) -> str:
    """'AE@host:port' of the remote end of `assoc`."""
    remote = assoc.acceptor if assoc.is_requestor else assoc.requestor
    return f"{remote.ae_title.strip()}@{remote.address}:{remote.port}"


@contextmanager
def associate(
    ae: AE,
    node: Node,
    *,
    ext_neg: Sequence[Any] | None = None,
    evt_handlers: Sequence[tuple[Any, Any]] = (),
) -> Iterator[Association]:
    """Open an association to `node`, yield it, and release it afterwards.

    Raises :class:`AssociationFailed` with a sentence naming the peer and the reason when the
    peer cannot be reached, rejects, or aborts during set-up.
    """
    seen: dict[str, Any] = {}

    def on_acse(event: evt.Event) -> None:
        prim = event.primitive
        if isinstance(prim, A_ASSOCIATE) and prim.result not in (None, 0):
            seen["reject"] = prim
        elif isinstance(prim, (A_ABORT, A_P_ABORT)):
            seen["abort"] = prim

    handlers = [*COMMON_HANDLERS, (evt.EVT_ACSE_RECV, on_acse), *evt_handlers]
    target = f"{node.ae_title}@{node.host}:{node.port}"
    assoc = ae.associate(
        node.host,
        node.port,
        ae_title=node.ae_title,
        ext_neg=list(ext_neg) if ext_neg else None,
        evt_handlers=handlers,
        max_pdu=node.max_pdu,
    )
    if not assoc.is_established:
        if "reject" in seen:
            why = describe_reject(seen["reject"])
        elif "abort" in seen:
            why = describe_abort(seen["abort"])
        elif assoc.is_rejected:
            why = "rejected"
        else:
            why = "no answer (connection refused or timed out)"
        LOG.error("association to %s failed: %s", target, why)
        raise AssociationFailed(f"association to {target} failed: {why}")
    try:
        yield assoc
    finally:
        if assoc.is_established:
            assoc.release()
