"""Association set-up shared by every DICOM service (PS3.8 §7 and §9).

- every AE carries our Implementation Class UID and Version Name (PS3.7 D.3.3.2);
- every DICOM socket, requestor or acceptor, gets TCP_NODELAY when it opens;
- the timeouts of the config map onto pynetdicom's (docs/design.md "Configuration defaults");
- a failed set-up becomes one sentence that names the peer and the reason:
  - no TCP connection: "connection refused", "timed out", "host unreachable" (the errno);
  - connected, but no A-ASSOCIATE-AC/RJ within the ACSE timeout (PS3.8 §9.1.5, ARTIM);
  - A-ASSOCIATE-RJ: result, source and reason (PS3.8 §9.3.4, Table 9-21);
  - A-ABORT during set-up (PS3.8 §9.3.8, Table 9-26);
  - a TLS handshake that fails, or a peer that refuses our certificate right after it: the
    cause (expired, unknown CA, host name mismatch, ...; docs/design.md "TLS");
  - an A-ASSOCIATE-AC that accepts none of the proposed presentation contexts: pynetdicom
    aborts such an association itself (a DICOM association needs at least one accepted context);
    the sentence lists each rejected abstract syntax by name with its result/reason from PS3.8
    Table 9-18 (:class:`NoContextAccepted`).

pynetdicom does not hand the TCP connect error to the caller (it only logs it), so when no
connection opened, :func:`associate` tells a timeout by the time spent, and otherwise connects
once more itself to learn the error (refused, unreachable, unknown host); it does not hand
over a TLS error either, so :func:`describe_tls_failure` makes one more handshake to learn it.
"""

from __future__ import annotations

import logging
import socket
import ssl
import time
from contextlib import contextmanager
from typing import Any, Iterator, Sequence

from pydicom.uid import (
    UID,
    DeflatedExplicitVRLittleEndian,
    ExplicitVRBigEndian,
    ExplicitVRLittleEndian,
    ImplicitVRLittleEndian,
)
from pynetdicom import AE, Association, _config, evt
from pynetdicom.pdu_primitives import A_ABORT, A_ASSOCIATE, A_P_ABORT

from modality_link import IMPLEMENTATION_CLASS_UID, IMPLEMENTATION_VERSION_NAME, audit
from modality_link.config import Node, Timeouts
from modality_link.net.tls import TlsFileError, client_context, handshake_failure

LOG = logging.getLogger("modality_link.net")

# pynetdicom's process-wide settings, set here, once, for every service of ours:
# - do not pretty-print C-FIND response identifiers: that converts their raw elements with the
#   default character set before the worklist SCU could repair (0008,0005).
_config.LOG_RESPONSE_IDENTIFIERS = False

#: The transfer syntaxes our SCUs propose for each of their presentation contexts, in this order
#: (the native ones, PS3.5 A.1-A.5; pynetdicom's default): Verification, Modality Worklist, MPPS,
#: Storage Commitment and the Query/Retrieve SCU. The Storage SCU proposes a node's own list.
PROPOSED_TRANSFER_SYNTAXES = [
    ImplicitVRLittleEndian, ExplicitVRLittleEndian, DeflatedExplicitVRLittleEndian, ExplicitVRBigEndian,
]

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


#: PS3.8 Table 9-18: Result/Reason of a presentation context in the A-ASSOCIATE-AC.
CONTEXT_RESULTS = {
    1: "user rejection",
    2: "no reason (provider rejection)",
    3: "abstract syntax not supported (provider rejection)",
    4: "transfer syntaxes not supported (provider rejection)",
}


class AssociationFailed(Exception):
    """The association could not be established or was lost; the message says why.

    `reason` is a word for programs: ``refused``, ``timeout``, ``unreachable`` (no TCP
    connection), ``no-answer`` (no A-ASSOCIATE response), ``rejected``, ``aborted``,
    ``no-context`` (see :class:`NoContextAccepted`), ``tls`` (the TLS handshake failed or the
    peer refused our certificate), or ``failed``.
    """

    def __init__(self, message: str, reason: str = "failed") -> None:
        super().__init__(message)
        self.reason = reason


class NoContextAccepted(AssociationFailed):
    """The peer sent an A-ASSOCIATE-AC that accepts none of the proposed presentation contexts.

    A configuration matter on one side or the other (the peer does not offer this service, or
    not in these transfer syntaxes): trying again unchanged will fail the same way.
    `rejected` holds ``(abstract syntax UID, its name, PS3.8 Table 9-18 result)`` per context.
    """

    def __init__(self, message: str, rejected: list[tuple[str, str, int]]) -> None:
        super().__init__(message, "no-context")
        self.rejected = rejected


def set_tcp_nodelay(event: evt.Event) -> None:
    """EVT_CONN_OPEN handler: disable Nagle's algorithm on the association's socket."""
    sock = getattr(getattr(event.assoc.dul, "socket", None), "socket", None)
    if sock is not None:
        try:
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        except OSError:  # already closed
            pass


#: Handlers every association of ours binds.
COMMON_HANDLERS: list[evt.EventHandlerType] = [(evt.EVT_CONN_OPEN, set_tcp_nodelay)]


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
    """An A-ASSOCIATE-RJ in words: its result, source and reason (PS3.8 Table 9-21)."""
    result, source, diagnostic = primitive.result, primitive.result_source, primitive.diagnostic
    result_text = REJECT_RESULTS[result] if result in REJECT_RESULTS else f"result {result}"
    if source is not None and diagnostic is not None and (source, diagnostic) in REJECT_REASONS:
        reason = REJECT_REASONS[(source, diagnostic)]
    else:
        reason = f"source {source}, reason {diagnostic}"
    return f"rejected ({result_text}): {reason}"


def describe_abort(primitive: A_ABORT | A_P_ABORT) -> str:
    """An A-ABORT or A-P-ABORT in words: who aborted (PS3.8 Table 9-26)."""
    if isinstance(primitive, A_P_ABORT):
        return f"aborted by the network provider ({primitive.provider_reason})"
    src = primitive.abort_source
    source = ABORT_SOURCES[src] if src in ABORT_SOURCES else str(src)
    return f"aborted by the {source}"


def peer_of(assoc: Association) -> str:
    """'AE@host:port' of the remote end of `assoc`."""
    remote = assoc.acceptor if assoc.is_requestor else assoc.requestor
    return f"{remote.ae_title.strip()}@{remote.address}:{remote.port}"


def describe_rejected_contexts(contexts: Sequence[Any]) -> tuple[str, list[tuple[str, str, int]]]:
    """Name each rejected abstract syntax with its PS3.8 Table 9-18 result (contexts proposing
    the same abstract syntax with other transfer syntaxes are told once)."""
    results: dict[str, list[int]] = {}
    for cx in contexts:
        got = results.setdefault(str(cx.abstract_syntax), [])
        if cx.result not in got:
            got.append(cx.result)
    rejected, parts = [], []
    for uid, codes in results.items():
        name = UID(uid).name if UID(uid).is_valid else uid
        name = name.removesuffix(" SOP Class")
        rejected += [(uid, name, code) for code in codes]
        why = ", ".join(CONTEXT_RESULTS.get(code, f"result {code}") for code in codes)
        parts.append(f"{name} ({uid}): {why}")
    return "; ".join(parts), rejected


def describe_connect_failure(host: str, port: int, elapsed: float, connect_timeout: float | None,
                             tls: ssl.SSLContext | None = None) -> tuple[str, str]:
    """Why no connection opened: (reason word, sentence). A connect that lasted the whole
    connect timeout timed out; otherwise one more connect attempt tells the error, and with
    `tls` one more TLS handshake on it."""
    if connect_timeout is not None and elapsed >= connect_timeout * 0.95:
        return "timeout", f"timed out: no TCP connection within {connect_timeout:g} s"
    try:
        with socket.create_connection((host, port), timeout=2.0) as sock:
            why = handshake_failure(sock, tls, host) if tls is not None else None
            if why is not None:
                return "tls", why
    except ConnectionRefusedError:
        return "refused", f"connection refused (nothing listens on {host}:{port})"
    except socket.gaierror as exc:
        return "unreachable", unknown_host(host, exc)
    except TimeoutError:
        return "timeout", "timed out: no TCP connection"
    except OSError as exc:
        return "unreachable", f"no TCP connection ({exc.strerror or exc})"
    return "failed", "the TCP connection failed, but the port answers now (the peer may have just started)"


def unknown_host(host: str, exc: socket.gaierror) -> str:
    """A host name that does not resolve, and the fix: the node's host (an IP address, or a
    name DNS or /etc/hosts knows)."""
    return (f"unknown host {host} ({exc.strerror or exc}): give the node's IP address or a name DNS or "
            f"/etc/hosts knows (modality-link node edit NAME --host ADDRESS)")


def describe_tls_failure(host: str, port: int, tls: ssl.SSLContext) -> str | None:
    """Why a TLS connection to host:port fails, from one more connection and handshake of our
    own (an association lost at once after connecting); None when there is no TCP connection
    (:func:`describe_connect_failure` tells why) or TLS works."""
    try:
        sock = socket.create_connection((host, port), timeout=2.0)
    except OSError:
        return None
    with sock:
        return handshake_failure(sock, tls, host)


@contextmanager
def associate(
    ae: AE,
    node: Node,
    *,
    ext_neg: Sequence[Any] | None = None,
    evt_handlers: Sequence[evt.EventHandlerType] = (),
) -> Iterator[Association]:
    """Open an association to `node`, yield it, and release it afterwards.

    Raises :class:`AssociationFailed` with a sentence naming the peer and the reason when the
    peer cannot be reached, does not answer, rejects, aborts during set-up, or accepts none of
    the presentation contexts (:class:`NoContextAccepted`).
    """
    seen: dict[str, Any] = {}

    def on_acse(event: evt.Event) -> None:
        prim = getattr(event, "primitive", None)  # set from the event's keyword arguments
        if isinstance(prim, A_ASSOCIATE) and prim.result is not None:
            seen["accept" if prim.result == 0 else "reject"] = prim
        elif isinstance(prim, (A_ABORT, A_P_ABORT)):
            seen["abort"] = prim

    def on_open(event: evt.Event) -> None:
        seen["connected"] = True

    handlers: list[evt.EventHandlerType] = [
        *COMMON_HANDLERS, (evt.EVT_CONN_OPEN, on_open), (evt.EVT_ACSE_RECV, on_acse), *evt_handlers,
    ]
    target = f"{node.ae_title}@{node.host}:{node.port}"
    started = time.monotonic()
    credentials = node.tls()
    try:
        tls_context = client_context(credentials) if credentials is not None else None
    except TlsFileError as exc:  # changed on disk since the configuration was validated
        LOG.error("association to %s failed: %s: %s", target, exc.key, exc)
        raise AssociationFailed(f"association to {target} failed: {exc.key}: {exc}", "tls") from None
    try:
        assoc = ae.associate(
            node.host,
            node.port,
            ae_title=node.ae_title,
            ext_neg=list(ext_neg) if ext_neg else None,
            evt_handlers=handlers,
            max_pdu=node.max_pdu,
            tls_args=(tls_context, node.host) if tls_context is not None else None,
        )
    except socket.gaierror as exc:  # pynetdicom resolves the name before it connects
        why = unknown_host(node.host, exc)
        LOG.error("association to %s failed: %s", target, why)
        raise AssociationFailed(f"association to {target} failed: {why}", "unreachable") from None
    if not assoc.is_established:
        reason = "failed"
        if "accept" in seen:
            what, rejected = describe_rejected_contexts(assoc.rejected_contexts)
            why = f"the peer accepted the association but none of the proposed presentation contexts: {what}"
            LOG.error("association to %s failed: %s", target, why)
            raise NoContextAccepted(f"association to {target} failed: {why}", rejected)
        tls_why = None
        if tls_context is not None and seen.get("connected") and "reject" not in seen \
                and not isinstance(seen.get("abort"), A_ABORT):  # lost without an answer: TLS?
            tls_why = describe_tls_failure(node.host, node.port, tls_context)
        if "reject" in seen:
            reason, why = "rejected", describe_reject(seen["reject"])
        elif tls_why is not None:
            reason, why = "tls", tls_why
        elif "abort" in seen:
            reason, why = "aborted", describe_abort(seen["abort"])
        elif assoc.is_rejected:
            reason, why = "rejected", "rejected"
        elif not seen.get("connected"):
            reason, why = describe_connect_failure(
                node.host, node.port, time.monotonic() - started, ae.connection_timeout, tls_context
            )
        else:
            reason = "no-answer"
            limit = f" within {ae.acse_timeout:g} s (ACSE timeout)" if ae.acse_timeout else ""
            why = f"connected, but no answer to the association request{limit}"
        LOG.error("association to %s failed: %s", target, why)
        if reason == "tls":
            audit.tls_failure(audit.Participant(node.ae_title, node.host), why)
        raise AssociationFailed(f"association to {target} failed: {why}", reason)
    try:
        yield assoc
    finally:
        if assoc.is_established:
            assoc.release()
