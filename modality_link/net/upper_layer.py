"""A lean association requestor for the send path (PS3.8 §9, DICOM Upper Layer protocol).

pynetdicom runs every PDU through its state machine, event queue and reactor thread and
decodes every command set with pydicom: 300 CT images of 512 KB took 1.6-2.1 s against DCMTK's
0.5 s on the same machine, before any work of ours. The Storage SCU needs little of that: an
A-ASSOCIATE negotiation (encoded and decoded with pynetdicom's own PDU classes), P-DATA-TF
framing (PS3.8 §9.3.5) of a command set and of a data set that is already encoded on disk,
the response command set, A-RELEASE (§9.3.6, §9.3.7) and A-ABORT (§9.3.8). This module does
just that, on one blocking socket, one operation outstanding at a time (no asynchronous
operations window is proposed, PS3.7 D.3.3.3), in TLS when the node has it (PS3.15 B.10,
docs/design.md "TLS"). Every other service keeps pynetdicom.
"""

from __future__ import annotations

import logging
import select
import socket
import ssl
import struct
from dataclasses import dataclass, field
from typing import BinaryIO, Sequence

from pynetdicom.pdu import A_ABORT_RQ, A_ASSOCIATE_AC, A_ASSOCIATE_RJ, A_ASSOCIATE_RQ
from pynetdicom.pdu_primitives import (
    A_ASSOCIATE,
    ImplementationClassUIDNotification,
    ImplementationVersionNameNotification,
    MaximumLengthNotification,
)
from pynetdicom.presentation import PresentationContext

from modality_link import IMPLEMENTATION_CLASS_UID, IMPLEMENTATION_VERSION_NAME, audit
from modality_link.config import Timeouts
from modality_link.net.association import (
    CONTEXT_RESULTS,
    AssociationFailed,
    describe_abort,
    describe_reject,
    describe_tls_failure,
)
from modality_link.net.tls import Credentials, TlsFileError, client_context, describe_error

LOG = logging.getLogger("modality_link.net")

APPLICATION_CONTEXT = "1.2.840.10008.3.1.1.1"  # PS3.7 Annex A.2.1
#: PDU types, PS3.8 Table 9-1 (and §9.3.1).
A_ASSOCIATE_RQ_TYPE, A_ASSOCIATE_AC_TYPE, A_ASSOCIATE_RJ_TYPE = 0x01, 0x02, 0x03
P_DATA_TF_TYPE, A_RELEASE_RQ_TYPE, A_RELEASE_RP_TYPE, A_ABORT_TYPE = 0x04, 0x05, 0x06, 0x07
#: The largest P-DATA-TF we send when the peer sets no limit (maximum length 0, PS3.8 D.1).
UNLIMITED_PDU = 1 << 20
#: Bytes read from a file at a time when a data set is streamed rather than read whole.
STREAM_BLOCK = 4 << 20
_IOV_MAX = 1024  # buffers per sendmsg() call (Linux UIO_MAXIOV)
#: PDU header: type, reserved, length (PS3.8 §9.3.1).
PDU_HEADER = struct.Struct(">BBL")
#: PDV item header: item length, presentation context ID, message control header (PS3.8 §9.3.5.1, E.2).
PDV_HEADER = struct.Struct(">LBB")
_RELEASE_RQ = PDU_HEADER.pack(A_RELEASE_RQ_TYPE, 0, 4) + b"\x00" * 4
_RELEASE_RP = PDU_HEADER.pack(A_RELEASE_RP_TYPE, 0, 4) + b"\x00" * 4
_ABORT = PDU_HEADER.pack(A_ABORT_TYPE, 0, 4) + b"\x00\x00\x00\x00"  # service user, no reason


def p_data_tf(parts: list, context_id: int, data: memoryview, control: int, limit: int, final: bool = True) -> None:
    """Append to `parts` the P-DATA-TF PDUs that carry `data` (PS3.8 §9.3.5, Annex E): one PDV
    of at most `limit` bytes each, `control` 0x01 for a command, 0x00 for a data set; bit 1 of
    the message control header marks the last fragment when `final`."""
    n = len(data)
    for start in range(0, max(n, 1), limit):
        chunk = data[start:start + limit]
        last = 0x02 if final and start + limit >= n else 0x00
        parts.append(PDU_HEADER.pack(P_DATA_TF_TYPE, 0, len(chunk) + 6))
        parts.append(PDV_HEADER.pack(len(chunk) + 2, context_id, control | last))
        parts.append(chunk)


class AssociationLost(Exception):
    """The association was aborted or the connection lost while it was in use (PS3.8 §7.3-7.4);
    the send job is tried again later."""


@dataclass
class Context:
    """A negotiated presentation context (PS3.8 §9.3.3.2)."""

    id: int
    abstract_syntax: str
    transfer_syntax: str | None  # None when the peer rejected it
    result: int


@dataclass
class Requestor:
    """One association we requested; :meth:`open` negotiates it, PS3.8 §9.3.2-9.3.3."""

    host: str
    port: int
    calling_ae: str
    called_ae: str
    #: (abstract syntax, [transfer syntaxes]) in proposal order; context IDs 1, 3, 5...
    proposed: Sequence[tuple[str, Sequence[str]]]
    timeouts: Timeouts
    #: The largest P-DATA-TF PDU we receive (0: no limit).
    max_pdu: int = 16384
    contexts: list[Context] = field(default_factory=list)
    peer_max_pdu: int = 0
    #: TLS files (the node's): the peer's certificate verified against their CA and `host`.
    tls: Credentials | None = None
    sock: socket.socket | None = field(default=None, repr=False)
    #: True once it was kept open after a job and handed to another (``idle_release``).
    reused: bool = False
    _message_id: int = 0

    @property
    def peer(self) -> str:
        return f"{self.called_ae}@{self.host}:{self.port}"

    # -- association establishment ---------------------------------------------------------------

    def open(self) -> "Requestor":
        """Connect, send A-ASSOCIATE-RQ and read the answer; raise :class:`AssociationFailed`
        with a sentence naming the peer and the reason when it is not accepted."""
        try:
            self.sock = socket.create_connection((self.host, self.port), timeout=self.timeouts.connect)
        except socket.timeout:
            raise self._failed(f"no answer within {self.timeouts.connect:g} s (connect timeout)") from None
        except OSError as exc:
            raise self._failed(f"cannot connect ({exc.strerror or exc})") from None
        self.sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        context = self._tls_handshake()
        try:
            self.sock.settimeout(self.timeouts.acse)
            self.sock.sendall(self._associate_rq())
            kind, body = self._read_pdu()
        except (OSError, AssociationLost) as exc:
            self.close()
            if isinstance(exc, socket.timeout):
                raise self._failed("no A-ASSOCIATE response within the ACSE timeout") from None
            # a TLS 1.3 peer refuses our certificate after the handshake: its alert, or a reset
            tls_why = describe_tls_failure(self.host, self.port, context) if context is not None else None
            raise self._failed(tls_why or str(exc), "tls" if tls_why else "failed") from None
        if kind == A_ASSOCIATE_AC_TYPE:
            pdu = A_ASSOCIATE_AC()
            pdu.decode(PDU_HEADER.pack(kind, 0, len(body)) + body)
            prim = pdu.to_primitive()
            names = dict(self._numbered())
            for cx in prim.presentation_context_definition_results_list:
                cid, result = cx.context_id, cx.result
                if cid is None or result is None:  # pynetdicom decodes both from every item
                    continue
                ts = str(cx.transfer_syntax[0]) if result == 0 and cx.transfer_syntax else None
                self.contexts.append(Context(cid, names.get(cid, ""), ts, result))
            self.peer_max_pdu = prim.maximum_length_received or 0
            LOG.debug("association to %s accepted: %d of %d context(s)", self.peer,
                      len(self.accepted()), len(self.contexts))
            return self
        self.close()
        if kind == A_ASSOCIATE_RJ_TYPE:
            rj = A_ASSOCIATE_RJ()
            rj.decode(PDU_HEADER.pack(kind, 0, len(body)) + body)
            raise self._failed(describe_reject(rj.to_primitive()))
        raise self._failed(f"unexpected answer (PDU type 0x{kind:02X}) to the A-ASSOCIATE-RQ")

    def _tls_handshake(self) -> ssl.SSLContext | None:
        """With :attr:`tls`: the TLS handshake on the new connection (connect timeout) and its
        context; a failure closes the connection and names the cause."""
        if self.tls is None:
            return None
        assert self.sock is not None
        try:
            context = client_context(self.tls)
            self.sock = context.wrap_socket(self.sock, server_hostname=self.host)
        except TlsFileError as exc:  # changed on disk since the configuration was validated
            self.close()
            raise self._failed(f"{exc.key}: {exc}", "tls") from None
        except OSError as exc:  # ssl.SSLError included
            self.close()
            raise self._failed(describe_error(exc), "tls") from None
        return context

    def _numbered(self) -> list[tuple[int, str]]:
        return [(2 * i + 1, abstract) for i, (abstract, _) in enumerate(self.proposed)]

    def _associate_rq(self) -> bytes:
        prim = A_ASSOCIATE()
        prim.application_context_name = APPLICATION_CONTEXT
        prim.calling_ae_title = self.calling_ae
        prim.called_ae_title = self.called_ae
        ml = MaximumLengthNotification()
        ml.maximum_length_received = self.max_pdu
        ic = ImplementationClassUIDNotification()
        ic.implementation_class_uid = IMPLEMENTATION_CLASS_UID
        iv = ImplementationVersionNameNotification()
        iv.implementation_version_name = IMPLEMENTATION_VERSION_NAME
        prim.user_information = [ml, ic, iv]
        for (cid, _), (abstract, syntaxes) in zip(self._numbered(), self.proposed):
            cx = PresentationContext()
            cx.context_id = cid
            cx.abstract_syntax = abstract
            cx.transfer_syntax = list(syntaxes)
            prim.presentation_context_definition_list.append(cx)
        pdu = A_ASSOCIATE_RQ()
        pdu.from_primitive(prim)
        return pdu.encode()

    def _failed(self, why: str, reason: str = "failed") -> AssociationFailed:
        LOG.error("association to %s failed: %s", self.peer, why)
        if reason == "tls":
            audit.tls_failure(audit.Participant(self.called_ae, self.host), why)
        return AssociationFailed(f"association to {self.peer} failed: {why}", reason)

    def accepted(self) -> dict[str, list[tuple[int, str]]]:
        """{abstract syntax: [(context ID, transfer syntax)]} of the accepted contexts."""
        out: dict[str, list[tuple[int, str]]] = {}
        for cx in self.contexts:
            if cx.transfer_syntax is not None:
                out.setdefault(cx.abstract_syntax, []).append((cx.id, cx.transfer_syntax))
        return out

    def rejected(self) -> dict[str, str]:
        """{abstract syntax: reason (PS3.8 Table 9-18)} of those no context was accepted for."""
        accepted = self.accepted()
        return {cx.abstract_syntax: CONTEXT_RESULTS.get(cx.result, f"result {cx.result}")
                for cx in self.contexts if cx.abstract_syntax not in accepted}

    # -- data transfer ------------------------------------------------------------------------------

    def next_message_id(self) -> int:
        self._message_id = self._message_id % 0xFFFF + 1
        return self._message_id

    def send_message(
        self, context_id: int, command: bytes, dataset: bytes | memoryview | BinaryIO | None = None,
        size: int = 0,
    ) -> None:
        """Send a DIMSE message: the command set, then the data set fragmented to the peer's
        maximum PDU length (PS3.8 §9.3.5, Annex E; PS3.7 §6.3.1).

        `dataset` is the encoded data set in memory, or a binary file positioned at its start
        with `size` bytes to send, read a block at a time (a large multi-frame object)."""
        assert self.sock is not None
        limit = (self.peer_max_pdu or UNLIMITED_PDU) - 6  # PDV item header: length, ID, control
        parts: list[bytes | memoryview] = []
        p_data_tf(parts, context_id, memoryview(command), 0x01, limit)
        try:
            self.sock.settimeout(self.timeouts.network)
            if dataset is None or isinstance(dataset, (bytes, bytearray, memoryview)):
                if dataset is not None:
                    p_data_tf(parts, context_id, memoryview(dataset), 0x00, limit)
                self._send_vectored(parts)
                return
            self._send_vectored(parts)
            block = limit * max(1, STREAM_BLOCK // limit)
            left = size
            while left > 0:
                chunk = dataset.read(min(block, left))
                if not chunk:
                    self.abort()
                    raise AssociationLost(f"the file ended {left} bytes early while it was being sent; "
                                          f"association aborted")
                left -= len(chunk)
                parts = []
                p_data_tf(parts, context_id, memoryview(chunk), 0x00, limit, final=left == 0)
                self._send_vectored(parts)
        except OSError as exc:
            self.close()
            raise AssociationLost(self._lost_reason(exc)) from None

    def _send_vectored(self, parts: list) -> None:
        """sendall() for a list of buffers, without joining them into one copy (sendmsg). TLS
        has no sendmsg: there they are joined, one copy beside the encryption's, rather than
        each small header becoming a TLS record of its own."""
        assert self.sock is not None
        if isinstance(self.sock, ssl.SSLSocket):
            self.sock.sendall(b"".join(parts))
            return
        views = [memoryview(p).cast("B") for p in parts]
        while views:
            sent = self.sock.sendmsg(views[:_IOV_MAX])
            while views and sent >= len(views[0]):
                sent -= len(views[0])
                views.pop(0)
            if sent:
                views[0] = views[0][sent:]

    def receive_command(self, timeout: float) -> bytes:
        """The next complete command set from the peer (its data set, if any, is skipped).

        Raises :class:`AssociationLost` on A-ABORT, on a closed connection, or when nothing
        arrives within `timeout` (the DIMSE timeout, PS3.7 §9.1.1.1)."""
        assert self.sock is not None
        command = bytearray()
        self.sock.settimeout(timeout)
        while True:
            try:
                kind, body = self._read_pdu()
            except socket.timeout:
                self.abort()
                raise AssociationLost(f"no response within the DIMSE timeout ({timeout:g} s); association aborted") from None
            except OSError as exc:
                self.close()
                raise AssociationLost(self._lost_reason(exc)) from None
            if kind == A_ABORT_TYPE:
                self.close()
                pdu = A_ABORT_RQ()
                pdu.decode(PDU_HEADER.pack(kind, 0, len(body)) + body)
                raise AssociationLost(describe_abort(pdu.to_primitive()))
            if kind != P_DATA_TF_TYPE:
                self.abort()
                raise AssociationLost(f"unexpected PDU type 0x{kind:02X} from {self.peer}; association aborted")
            pos = 0
            while pos + 6 <= len(body):
                length, _cid, control = PDV_HEADER.unpack_from(body, pos)
                if control & 0x01:
                    command += body[pos + 6:pos + 4 + length]
                    if control & 0x02:
                        return bytes(command)
                pos += 4 + length

    def _read_pdu(self) -> tuple[int, bytes]:
        header = self._read_exactly(6)
        kind, _, length = PDU_HEADER.unpack(header)
        return kind, self._read_exactly(length)

    def _read_exactly(self, n: int) -> bytes:
        assert self.sock is not None
        buf = bytearray()
        while len(buf) < n:
            chunk = self.sock.recv(n - len(buf))
            if not chunk:
                raise AssociationLost(f"{self.peer} closed the connection")
            buf += chunk
        return bytes(buf)

    def _lost_reason(self, exc: OSError) -> str:
        if isinstance(exc, socket.timeout):
            return f"{self.peer} stopped reading for {self.timeouts.network:g} s (network timeout)"
        return f"connection to {self.peer} lost ({exc.strerror or exc})"

    # -- release and abort -----------------------------------------------------------------------------

    @property
    def is_open(self) -> bool:
        """True while the connection is up and the peer has sent nothing unasked: an A-ABORT,
        or a closed connection, waiting in the socket means the association is gone."""
        if self.sock is None:
            return False
        try:
            readable, _, _ = select.select([self.sock], [], [], 0)
        except (OSError, ValueError):
            return False
        if isinstance(self.sock, ssl.SSLSocket):
            return self._tls_still_open(readable)
        return not readable

    def _tls_still_open(self, readable: list) -> bool:
        """:attr:`is_open` in TLS: readable may only be a TLS record that is not data (a session
        ticket, RFC 8446 §4.6.1); a read without waiting tells."""
        assert isinstance(self.sock, ssl.SSLSocket)
        if self.sock.pending():
            return False
        if not readable:
            return True
        try:
            self.sock.settimeout(0)
            self.sock.recv(1)  # data unasked, or the end of the connection: gone either way
        except ssl.SSLWantReadError:
            return True  # only a record that is not data
        except OSError:
            pass
        return False

    def release(self) -> None:
        """A-RELEASE-RQ and wait for A-RELEASE-RP (PS3.8 §7.2); abort if the peer does not answer."""
        if self.sock is None:
            return
        try:
            self.sock.settimeout(self.timeouts.acse)
            self.sock.sendall(_RELEASE_RQ)
            while True:
                kind, _ = self._read_pdu()
                if kind == A_RELEASE_RP_TYPE:
                    break
                if kind == A_RELEASE_RQ_TYPE:  # release collision, PS3.8 §7.2.2: requestor answers
                    self.sock.sendall(_RELEASE_RP)
                    break
                if kind == A_ABORT_TYPE:
                    break
        except (OSError, AssociationLost):
            LOG.warning("association to %s: no A-RELEASE-RP; connection closed", self.peer)
        self.close()

    def abort(self) -> None:
        """A-ABORT (service user, PS3.8 §7.3) and close."""
        if self.sock is None:
            return
        try:
            self.sock.settimeout(1.0)
            self.sock.sendall(_ABORT)
        except OSError:
            pass
        self.close()

    def close(self) -> None:
        if self.sock is not None:
            try:
                self.sock.close()
            finally:
                self.sock = None
