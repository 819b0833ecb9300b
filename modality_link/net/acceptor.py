"""The association acceptor of our listening AEs: DICOM Upper Layer (PS3.8 §9) on plain sockets.

One acceptor serves every DIMSE service of a port. The A-ASSOCIATE PDUs are decoded and encoded
with pynetdicom's PDU classes and negotiated with its `negotiate_as_acceptor` (presentation
contexts in our order of transfer syntax preference, SCP/SCU Role Selection, PS3.7 D.3.3.4);
the rest is done here: P-DATA-TF reassembly (PS3.8 §9.3.5, Annex E), command sets (PS3.7 §6.3),
data sets handed to the service fragment by fragment as they arrive (a C-STORE's goes straight
into its archive file), responses, A-RELEASE (§9.3.6-7) and A-ABORT (§9.3.8).

Defences (docs/design.md "The listening side"):

- ARTIM (PS3.8 §9.1.5): a connection must complete its A-ASSOCIATE-RQ within
  ``timeouts.artim`` seconds in total, however slowly it trickles; after A-ASSOCIATE-RJ,
  A-RELEASE-RP or A-ABORT the peer has as long to close.
- Connections that are not (or no longer) associations are "pending": they do not count toward
  ``max_associations`` but have their own caps, overall and per peer address. A new connection
  beyond a cap closes the oldest pending one, so idle or trickling connections cannot lock out
  a sender that completes its A-ASSOCIATE-RQ at once.
- Before negotiation no PDU may exceed :data:`MAX_ASSOCIATE_RQ`; after it, no P-DATA-TF may
  exceed the maximum length we announced (PS3.8 D.1). Either aborts the association at once,
  before its body is read.
- A data set is never held in memory by the acceptor; command sets are capped.
- TLS (PS3.15 B.10, docs/design.md "TLS"): on a port with a certificate every connection is a
  TLS server handshake before any PDU is read, in its connection's thread, within the same
  ARTIM as the A-ASSOCIATE-RQ; with a CA configured the requestor's certificate is required
  and verified. A connection that is not TLS, or whose handshake fails, is closed and reported
  by :meth:`Acceptor.tls_refused`.

One thread per connection; the caps bound them (``max_associations`` + ``max_pending``).
"""

from __future__ import annotations

import errno
import logging
import select
import socket
import ssl
import struct
import threading
import time
from dataclasses import dataclass, field
from typing import Callable, Protocol, Sequence

from pynetdicom.pdu import A_ABORT_RQ, A_ASSOCIATE_RJ
from pynetdicom.pdu_primitives import A_ASSOCIATE

from modality_link import IMPLEMENTATION_CLASS_UID, IMPLEMENTATION_VERSION_NAME, audit, jsonlog
from modality_link.config import ConfigError, Listener, Timeouts
from modality_link.net.acse import (
    AssociateRq, MalformedPdu, Supported, decode_associate_rq, encode_associate_ac, negotiate,
)
from modality_link.net.association import REJECT_REASONS, REJECT_RESULTS, describe_abort
from modality_link.fileformat import padded
from modality_link.net.command import encode_command, parse_command
from modality_link.net.status import PROCESSING_FAILURE, SUCCESS, UNRECOGNIZED_OPERATION
from modality_link.net.storage import c_store_command, move_originator_elements
from modality_link.net.tls import TlsFileError, describe_error, server_context
from modality_link.net.upper_layer import (
    A_ABORT_TYPE,
    A_ASSOCIATE_RQ_TYPE,
    A_RELEASE_RP_TYPE,
    A_RELEASE_RQ_TYPE,
    APPLICATION_CONTEXT,
    P_DATA_TF_TYPE,
    PDU_HEADER,
    PDV_HEADER,
    UNLIMITED_PDU,
    AssociationLost,
    p_data_tf,
)

LOG = logging.getLogger("modality_link.net.acceptor")

#: The largest PDU accepted before an association exists: an A-ASSOCIATE-RQ with 128
#: presentation contexts of one abstract and several transfer syntaxes of 64 characters each
#: stays well below it (PS3.8 §9.3.2).
MAX_ASSOCIATE_RQ = 128 << 10
#: The smallest maximum PDU length we honour when we send (a peer announcing less gets this).
MIN_PEER_PDU = 1024
#: The largest command set (PS3.7 §6.3.1): a few dozen group 0000 elements.
MAX_COMMAND = 64 << 10
#: Bytes a peer may still send after our last PDU before we close without waiting for it.
LINGER_BYTES = 256 << 10
#: PDU types we know (PS3.8 Table 9-1): anything else is an unrecognized PDU.
_KNOWN_PDUS = range(0x01, 0x08)
#: A-ABORT source 2 (service provider) reasons, PS3.8 Table 9-26.
UNRECOGNIZED_PDU, UNEXPECTED_PDU, INVALID_PARAMETER = 1, 2, 6
#: The first byte of a TLS record carrying a handshake message (RFC 8446 §5.1): a ClientHello.
TLS_HANDSHAKE_RECORD = b"\x16"
#: Command Field values, PS3.7 Annex E.
C_STORE_RQ, C_GET_RQ, C_FIND_RQ, C_MOVE_RQ, C_ECHO_RQ = 0x0001, 0x0010, 0x0020, 0x0021, 0x0030
N_EVENT_REPORT_RQ, C_CANCEL_RQ, C_STORE_RSP = 0x0100, 0x0FFF, 0x8001
NO_DATA_SET = 0x0101  # Command Data Set Type (0000,0800), PS3.7 §9.3 / §10.3


class _Closed(Exception):
    """The peer closed the TCP connection, or we did."""


class _Abort(Exception):
    """Abort the association: A-ABORT with this provider reason, and this log line."""

    def __init__(self, reason: int, message: str) -> None:
        super().__init__(message)
        self.reason = reason


@dataclass
class Peer:
    """Who is on the other end of an association."""

    address: str
    port: int
    calling_ae: str = ""
    called_ae: str = ""
    #: What the association moved, reported to the audit trail when it ends (PS3.15 A.5.3.7).
    transfers: dict[str, audit.Transfer] = field(default_factory=dict, repr=False, compare=False)

    def __str__(self) -> str:
        return f"{self.calling_ae or '?'}@{self.address}:{self.port}"


@dataclass
class Request:
    """A DIMSE request as received: its command set and presentation context."""

    peer: Peer
    context_id: int
    abstract_syntax: str
    transfer_syntax: str
    command: dict[int, bytes]

    def _us(self, element: int) -> int | None:
        raw = self.command.get(element, b"")
        return struct.unpack("<H", raw[:2])[0] if len(raw) >= 2 else None

    def _ui(self, element: int) -> str:
        return self.command.get(element, b"").rstrip(b"\x00 ").decode("ascii", "replace")

    @property
    def command_field(self) -> int | None:
        return self._us(0x0100)

    @property
    def message_id(self) -> int:
        return self._us(0x0110) or 0

    @property
    def has_data_set(self) -> bool:
        return self._us(0x0800) not in (None, NO_DATA_SET)

    @property
    def affected_sop_class(self) -> str:
        return self._ui(0x0002)

    @property
    def affected_sop_instance(self) -> str:
        return self._ui(0x1000)

    @property
    def event_type(self) -> int | None:
        return self._us(0x1002)


class DataSetSink(Protocol):
    """Where the fragments of a request's data set go as they arrive."""

    def write(self, data: memoryview) -> None: ...

    def discard(self) -> None: ...


class Discard:
    """A sink that drops what it gets (a data set nobody will read)."""

    def write(self, data: memoryview) -> None:
        pass

    def discard(self) -> None:
        pass


class InMemory:
    """A small data set kept in memory (an N-EVENT-REPORT's Event Information), capped."""

    def __init__(self, limit: int = 16 << 20) -> None:
        self.data = bytearray()
        self.limit = limit

    def write(self, data: memoryview) -> None:
        if len(self.data) + len(data) > self.limit:
            raise _Abort(INVALID_PARAMETER, f"a data set larger than {self.limit} bytes where a small one belongs")
        self.data += data

    def discard(self) -> None:
        self.data = bytearray()


class Reply:
    """How a handler answers its request (PS3.7 §9.1.2, §9.3).

    Calling it sends one response: (status, Error Comment, extra command elements
    {element: value}, encoded data set or None); a C-FIND, C-GET or C-MOVE SCP calls it for each
    pending response, then for the final one. While the handler runs, the association's
    requestor may send only a C-CANCEL-RQ for this request (one outstanding operation, PS3.7
    D.3.3.3) and the responses to our sub-operations: :meth:`cancelled` reads what arrived
    without waiting, :meth:`store` sends a C-STORE sub-operation on this association (C-GET,
    PS3.4 C.4.3.3) and waits for its response.
    """

    def __init__(self, association: "_Association", request: Request) -> None:
        self._assoc = association
        self.request = request
        self._cancelled = False
        self._response: dict[int, bytes] | None = None
        self._next_id = 1

    def __call__(self, status: int, comment: str = "", extra: dict[int, bytes] | None = None,
                 dataset: bytes | None = None) -> None:
        self._assoc._respond(self.request, status, comment, extra or {}, dataset)

    def cancelled(self) -> bool:
        """Whether the requestor sent a C-CANCEL-RQ for this request (PS3.7 §9.3.2.3, 9.3.3.3,
        9.3.4.3); reads what has arrived, never waits for more."""
        while not self._cancelled and self._assoc._pending_input():
            self._assoc._read_pdu_while_busy()
        return self._cancelled

    def extended_negotiation(self) -> bytes:
        """The SOP Class Extended Negotiation we answered for this request's SOP class (PS3.7
        D.3.3.5); empty when there was none."""
        return self._assoc.extended.get(self.request.abstract_syntax, b"")

    def storage_contexts(self, sop_class: str) -> list[tuple[int, str]]:
        """(context ID, transfer syntax) of the accepted contexts of `sop_class` on which we may
        send a C-STORE-RQ: the requestor took the SCP role (SCP/SCU Role Selection, PS3.7 D.3.3.4)."""
        return [(cid, ts) for cid, (abstract, ts) in self._assoc.contexts.items()
                if abstract == sop_class and cid in self._assoc.reversed_roles]

    def store(self, context_id: int, sop_instance: str, dataset: bytes,
              move_originator: tuple[str, int] | None = None) -> tuple[int, str]:
        """Send a C-STORE-RQ (PS3.7 §9.3.1.1) with `dataset`, encoded in the context's transfer
        syntax, and wait (network timeout) for its C-STORE-RSP: (status, Error Comment). A
        C-CANCEL-RQ arriving meanwhile is remembered for :meth:`cancelled`."""
        sop_class, _ = self._assoc.contexts[context_id]
        message_id = self._next_id
        self._next_id = (self._next_id % 0xFFFF) + 1
        self._response = None
        command = c_store_command(message_id, sop_class, sop_instance, move_originator_elements(move_originator))
        self._assoc._send_request(context_id, command, dataset)
        while self._response is None:
            self._assoc._read_pdu_while_busy()
        rsp, self._response = self._response, None
        answered = rsp.get(0x0120, b"")
        if answered[:2] != struct.pack("<H", message_id):
            raise _Abort(INVALID_PARAMETER, "C-STORE-RSP for another message than our C-STORE-RQ")
        status = struct.unpack("<H", rsp.get(0x0900, b"\xff\xff")[:2])[0]
        return status, rsp.get(0x0902, b"").decode("ascii", "replace").strip(" \x00")

    def _command(self, command: dict[int, bytes], field: int) -> None:
        """A command set that arrived while the handler runs."""
        if field == C_CANCEL_RQ:
            if command.get(0x0120, b"")[:2] == struct.pack("<H", self.request.message_id):
                self._cancelled = True
            return  # a C-CANCEL-RQ for no outstanding request is ignored (PS3.7 §9.3.2.3)
        if field == C_STORE_RSP:
            self._response = command
            return
        raise _Abort(UNEXPECTED_PDU, f"command 0x{field:04X} while request {self.request.message_id} is "
                                     "outstanding (no asynchronous operations were negotiated, PS3.7 D.3.3.3)")


class Handler(Protocol):
    """The service side of one DIMSE-C or DIMSE-N operation (PS3.7 §9, §10).

    :meth:`sink` is asked where the data set of a request goes (only when one follows);
    :meth:`handle` runs once the request is complete and answers through `reply` (:class:`Reply`)."""

    def sink(self, request: Request) -> DataSetSink: ...

    def handle(self, request: Request, data: DataSetSink | None, reply: Reply) -> None: ...


@dataclass
class Service:
    """A DIMSE service an acceptor offers: the SOP classes it negotiates (in our order of
    transfer syntax preference) and the handler per Command Field."""

    sop_classes: Sequence[str]
    transfer_syntaxes: Sequence[str]
    handlers: dict[int, Handler]
    #: The requestor may take the SCP role by SCP/SCU Role Selection (PS3.7 D.3.3.4), as a
    #: Storage Commitment SCP does to send its N-EVENT-REPORT on a new association (PS3.4 J.3.3).
    requestor_scp: bool = False
    #: Our Service-Class-Application-Information for a requestor's SOP Class Extended
    #: Negotiation (PS3.7 D.3.3.5) of one of `sop_classes`, given what it proposed.
    extended_negotiation: Callable[[bytes], bytes] | None = None


@dataclass
class _Connection:
    sock: socket.socket
    address: str
    port: int
    pending: bool = True  # no association (yet, or any more): counts toward the pending caps
    #: When the connection was accepted (time.monotonic()): ARTIM runs from here (PS3.8 §9.1.5).
    opened: float = field(default_factory=time.monotonic)


@dataclass
class Acceptor:
    """Listens on the listener's address and serves `services` on every association."""

    listener: Listener
    timeouts: Timeouts
    services: list[Service]
    name: str = "acceptor"
    #: Called before an A-RELEASE-RP is sent: what the association's requests left to finish
    #: (the disk server's index rows) is done when the requestor learns it is released.
    on_release: Callable[[], object] | None = None
    #: Unexpected faults caught in a connection thread (a bug: tests require zero).
    faults: int = field(default=0, init=False)
    #: Associations open now (connections past their A-ASSOCIATE-AC, before release or abort).
    associations: int = field(default=0, init=False)
    #: :meth:`stop` has begun: connections closing now are closed by us.
    stopping: bool = field(default=False, init=False)
    _conns: list[_Connection] = field(default_factory=list, init=False)  # oldest first
    _lock: threading.Lock = field(default_factory=threading.Lock, init=False)
    _sock: socket.socket | None = field(default=None, init=False)
    _thread: threading.Thread | None = field(default=None, init=False)
    _threads: set[threading.Thread] = field(default_factory=set, init=False)

    # -- life cycle --------------------------------------------------------------------------------

    @property
    def port(self) -> int:
        assert self._sock is not None
        return int(self._sock.getsockname()[1])

    def start(self) -> None:
        self.stopping = False
        self._supported = {uid: Supported(service.transfer_syntaxes, service.requestor_scp)
                           for service in self.services for uid in service.sop_classes}
        self._dispatch = {
            (uid, field): handler
            for service in self.services for uid in service.sop_classes
            for field, handler in service.handlers.items()
        }
        self._extended = {uid: service.extended_negotiation for service in self.services
                          for uid in service.sop_classes if service.extended_negotiation is not None}
        credentials = self.listener.tls()
        try:
            self._tls = server_context(credentials) if credentials is not None else None
        except TlsFileError as exc:  # changed on disk since the configuration was validated
            raise ConfigError(f"{self.name}: {exc.key}: {exc}") from None
        sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind((self.listener.bind_address, self.listener.port))
        sock.listen(128)
        self._sock = sock
        self._thread = threading.Thread(target=self._accept_loop, name=f"{self.name}-accept", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        """Stop listening, close every connection, wait for their threads."""
        if self._sock is None:
            return
        self.stopping = True
        try:
            self._sock.shutdown(socket.SHUT_RDWR)  # wakes accept()
        except OSError:
            pass
        self._sock.close()
        if self._thread is not None:
            self._thread.join(10)
        with self._lock:
            conns, threads = list(self._conns), list(self._threads)
        for conn in conns:
            _shutdown(conn.sock)
        for t in threads:
            t.join(10)
        self._sock = None

    def association_sockets(self) -> list[socket.socket]:
        """The sockets of the associations open now."""
        with self._lock:
            return [c.sock for c in self._conns if not c.pending]

    # -- connections -------------------------------------------------------------------------------

    def _accept_loop(self) -> None:
        assert self._sock is not None
        while True:
            try:
                sock, (address, port) = self._sock.accept()
            except OSError as exc:
                if self._sock is None or self._sock.fileno() < 0 or exc.errno in (errno.EINVAL, errno.EBADF):
                    return  # stop() shut the listening socket
                LOG.warning("%s: accept failed: %s", self.name, exc)  # EMFILE...: keep listening
                time.sleep(0.05)
                continue
            self._admit(sock, address, port)

    def _admit(self, sock: socket.socket, address: str, port: int) -> None:
        """Register a new pending connection; close the oldest pending ones beyond the caps."""
        conn = _Connection(sock, address, port)
        evicted = []
        with self._lock:
            pending = [c for c in self._conns if c.pending]
            same = [c for c in pending if c.address == address]
            if len(same) >= self.listener.max_pending_per_address:
                evicted.append(same[0])
            elif len(pending) >= self.listener.max_pending:
                evicted.append(pending[0])
            for c in evicted:
                c.pending = False
                self._conns.remove(c)
            self._conns.append(conn)
            t = threading.Thread(target=self._serve, args=(conn,), name=f"{self.name}-{address}:{port}",
                                 daemon=True)
            self._threads.add(t)
        for c in evicted:
            LOG.warning("%s: connection from %s:%d closed: too many connections without an association "
                        "(pending cap)", self.name, c.address, c.port)
            _shutdown(c.sock)
        t.start()

    def _forget(self, conn: _Connection) -> None:
        with self._lock:
            if conn in self._conns:
                self._conns.remove(conn)
            self._threads.discard(threading.current_thread())

    def _serve(self, conn: _Connection) -> None:
        try:
            conn.sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            if self._tls is None or self._handshake(conn):
                _Association(self, conn).run()
        except _Closed:
            pass
        except Exception:  # a bug: log it, count it, keep serving others
            with self._lock:
                self.faults += 1
            LOG.exception("%s: unexpected fault on the connection from %s:%d", self.name, conn.address, conn.port)
            _send_quietly(conn.sock, _abort_pdu(2, 0))
        finally:
            _close(conn.sock)
            self._forget(conn)

    def _handshake(self, conn: _Connection) -> bool:
        """The TLS server handshake (PS3.15 B.10) of a new connection, within ARTIM from its
        opening; whether it succeeded (`conn.sock` is then the TLS socket). A connection closed
        before its first byte is not reported (a port check); any other failure is."""
        assert self._tls is not None
        artim = self.timeouts.artim
        try:
            conn.sock.settimeout(max(conn.opened + artim - time.monotonic(), 0.001))
            first = conn.sock.recv(1, socket.MSG_PEEK)
        except socket.timeout:
            LOG.warning("%s: %s:%d sent no TLS handshake within ARTIM (%g s); connection closed",
                        self.name, conn.address, conn.port, artim)
            return False
        except OSError:
            return False
        if not first:
            return False
        if first != TLS_HANDSHAKE_RECORD:
            self.tls_refused(conn.address, conn.port, "not a TLS handshake (the requestor speaks plain TCP)")
            _linger(conn.sock, artim)
            return False
        with self._lock:  # stop() and the pending caps shut conn.sock down: never a detached one
            conn.sock = self._tls.wrap_socket(conn.sock, server_side=True, do_handshake_on_connect=False)
        try:
            conn.sock.settimeout(max(conn.opened + artim - time.monotonic(), 0.001))
            conn.sock.do_handshake()
        except socket.timeout:
            self.tls_refused(conn.address, conn.port, f"TLS handshake not complete within ARTIM ({artim:g} s)")
            return False
        except OSError as exc:  # ssl.SSLError included
            self.tls_refused(conn.address, conn.port, describe_error(exc))
            _linger(conn.sock, artim)  # our alert reaches the requestor before the close
            return False
        assert isinstance(conn.sock, ssl.SSLSocket)
        LOG.debug("%s: TLS from %s:%d (%s), client certificate %s", self.name, conn.address, conn.port,
                  conn.sock.version(), (conn.sock.getpeercert() or {}).get("subject", "none"))
        return True

    def tls_refused(self, address: str, port: int, cause: str) -> None:
        """A connection to a TLS port refused: the one place every such refusal is reported, a
        log line naming the peer and the cause and a Security Alert of the audit trail (PS3.15
        A.5.3.11)."""
        LOG.warning("%s: TLS connection from %s:%d refused: %s", self.name, address, port, cause)
        audit.tls_failure(audit.Participant("", address), cause, refused_by=self.name)

    def _associate(self, conn: _Connection) -> bool:
        """Turn a pending connection into an association, if the acceptor limit allows."""
        with self._lock:
            if self.associations >= self.listener.max_associations:
                return False
            self.associations += 1
            conn.pending = False
            return True

    def _dissociate(self, conn: _Connection) -> None:
        """The association is over; its connection is pending (evictable) until closed."""
        with self._lock:
            self.associations -= 1
            if conn in self._conns:
                conn.pending = True


def _shutdown(sock: socket.socket) -> None:
    """Shut the TCP connection down from another thread (it wakes the connection's thread); the
    plain socket's method, which leaves a TLS socket's state alone while that thread uses it."""
    try:
        socket.socket.shutdown(sock, socket.SHUT_RDWR)
    except OSError:
        pass


def _close(sock: socket.socket) -> None:
    try:
        sock.close()
    except OSError:
        pass


def _send_quietly(sock: socket.socket, data: bytes) -> None:
    try:
        sock.settimeout(1.0)
        sock.sendall(data)
    except OSError:
        pass


def _abort_pdu(source: int, reason: int) -> bytes:
    """A-ABORT (PS3.8 §9.3.8): source 0 service user, 2 service provider."""
    return PDU_HEADER.pack(A_ABORT_TYPE, 0, 4) + bytes([0, 0, source, reason if source == 2 else 0])


_RELEASE_RP = PDU_HEADER.pack(A_RELEASE_RP_TYPE, 0, 4) + b"\x00" * 4


class _Reader:
    """Buffered reads from the socket into one preallocated buffer (recv_into)."""

    def __init__(self, sock: socket.socket, size: int = 1 << 20) -> None:
        self.sock = sock
        self.buf = bytearray(size)
        self.view = memoryview(self.buf)
        self.pos = self.end = 0
        #: When set (time.monotonic()), every read must complete by then (ARTIM).
        self.deadline: float | None = None

    def _fill(self) -> None:
        if self.deadline is not None:
            left = self.deadline - time.monotonic()
            if left <= 0:
                raise socket.timeout("ARTIM expired")
            self.sock.settimeout(left)
        if self.pos == self.end:
            self.pos = self.end = 0
        elif self.end == len(self.buf):
            unread = bytes(self.view[self.pos:self.end])
            self.buf[:len(unread)] = unread
            self.pos, self.end = 0, len(unread)
        try:
            n = self.sock.recv_into(self.view[self.end:])
        except (ConnectionError, OSError) as exc:
            if isinstance(exc, socket.timeout):
                raise
            raise _Closed() from None
        if n == 0:
            raise _Closed()
        self.end += n

    def exact(self, n: int) -> bytes:
        out = bytearray()
        while len(out) < n:
            if self.pos == self.end:
                self._fill()
            k = min(n - len(out), self.end - self.pos)
            out += self.view[self.pos:self.pos + k]
            self.pos += k
        return bytes(out)

    def pipe(self, n: int, write: Callable[[memoryview], None]) -> None:
        """Pass the next `n` bytes to `write`, a buffer at a time."""
        while n > 0:
            if self.pos == self.end:
                self._fill()
            k = min(n, self.end - self.pos)
            write(self.view[self.pos:self.pos + k])
            self.pos += k
            n -= k


class _Association:
    """One connection from accept to close (PS3.8 §9.2 state machine, acceptor side)."""

    def __init__(self, acceptor: Acceptor, conn: _Connection) -> None:
        self.acceptor = acceptor
        self.conn = conn
        self.sock = conn.sock
        self.reader = _Reader(conn.sock)
        self.peer = Peer(conn.address, conn.port)
        self.name = acceptor.name
        self.contexts: dict[int, tuple[str, str]] = {}  # id -> (abstract syntax, transfer syntax)
        #: SOP class -> the Service-Class-Application-Information we answered (PS3.7 D.3.3.5).
        self.extended: dict[str, bytes] = {}
        self.peer_max_pdu = 0
        self.associated = False
        #: Contexts on which the requestor took the SCP role (we may send C-STORE-RQs there).
        self.reversed_roles: set[int] = set()
        #: The request whose handler runs now (its Reply), while the socket is read for it.
        self.busy: Reply | None = None
        self._ready: list[tuple[Request, DataSetSink | None]] = []

    # -- establishment (Sta2 -> Sta6) --------------------------------------------------------------

    def run(self) -> None:
        jsonlog.bind(peer=f"{self.conn.address}:{self.conn.port}")  # this thread serves this connection only
        try:
            rq = self._read_associate_rq()
        except socket.timeout:
            LOG.warning("%s: %s:%d sent no complete A-ASSOCIATE-RQ within ARTIM (%g s); connection closed",
                        self.name, self.conn.address, self.conn.port, self.acceptor.timeouts.artim)
            return
        except _Abort as exc:
            self._abort(exc)
            return
        self.peer.calling_ae, self.peer.called_ae = rq.calling_ae, rq.called_ae
        jsonlog.bind(calling_ae=self.peer.calling_ae, called_ae=self.peer.called_ae)
        why = self._refusal(rq)
        if why is None and not self.acceptor._associate(self.conn):
            why = (2, 3, 2)  # transient, service provider (presentation), local limit exceeded
        if why is not None:
            self._reject(*why)
            return
        self.associated = True
        try:
            self._send(self._negotiate(rq))
            self._serve_data()
        except socket.timeout:
            LOG.warning("%s: association from %s idle for %g s (network timeout); aborted",
                        self.name, self.peer, self.acceptor.timeouts.network)
            _send_quietly(self.sock, _abort_pdu(2, 0))
        except _Abort as exc:
            self._abort(exc)
        finally:
            if self.associated:
                self.acceptor._dissociate(self.conn)
                self.associated = False
            audit.association_ended(self.peer)

    def _read_associate_rq(self) -> AssociateRq:
        """Read the first PDU within ARTIM; it must be an A-ASSOCIATE-RQ of bounded size."""
        self.reader.deadline = self.conn.opened + self.acceptor.timeouts.artim
        header = self.reader.exact(6)
        kind, _, length = PDU_HEADER.unpack(header)
        if kind not in _KNOWN_PDUS:
            raise _Abort(UNRECOGNIZED_PDU, f"unrecognized PDU type 0x{kind:02X} where an A-ASSOCIATE-RQ belongs")
        if kind != A_ASSOCIATE_RQ_TYPE:
            raise _Abort(UNEXPECTED_PDU, f"PDU type 0x{kind:02X} before any A-ASSOCIATE-RQ")
        if length > MAX_ASSOCIATE_RQ:
            raise _Abort(INVALID_PARAMETER, f"A-ASSOCIATE-RQ of {length} bytes declared "
                                            f"(at most {MAX_ASSOCIATE_RQ} accepted before negotiation)")
        body = self.reader.exact(length)
        self.reader.deadline = None
        try:
            return decode_associate_rq(header + body)
        except MalformedPdu as exc:
            raise _Abort(INVALID_PARAMETER, f"malformed A-ASSOCIATE-RQ: {exc}") from None

    def _refusal(self, rq: AssociateRq) -> tuple[int, int, int] | None:
        """(result, source, reason) of PS3.8 Table 9-21 to reject with, or None."""
        lst = self.acceptor.listener
        if rq.protocol_version != 1:
            return 1, 2, 2  # permanent, service provider (ACSE), protocol version not supported
        if rq.application_context != APPLICATION_CONTEXT:
            return 1, 1, 2  # permanent, service user, application context name not supported
        if lst.allowed_calling_aets and self.peer.calling_ae not in [a.strip() for a in lst.allowed_calling_aets]:
            return 1, 1, 3  # calling AE title not recognized
        if lst.require_called_aet and self.peer.called_ae != lst.ae_title.strip():
            return 1, 1, 7  # called AE title not recognized
        return None

    def _refusal_detail(self, source: int, reason: int) -> str:
        """What an AE title refusal was asked and what we answer to (PS3.8 Table 9-21), with the
        key that changes it: the log line names the fix."""
        lst = self.acceptor.listener
        if (source, reason) == (1, 7):
            return (f": {self.peer.called_ae!r} was asked for, this listener answers to {lst.ae_title.strip()!r} "
                    f"(its ae_title; the disk server's follows station.ae_title unless set on its own)")
        if (source, reason) == (1, 3):
            return (f": calling AE title {self.peer.calling_ae!r} is not among allowed_calling_aets "
                    f"({', '.join(a.strip() for a in lst.allowed_calling_aets)})")
        return ""

    def _reject(self, result: int, source: int, reason: int) -> None:
        prim = A_ASSOCIATE()
        prim.result, prim.result_source, prim.diagnostic = result, source, reason
        pdu = A_ASSOCIATE_RJ()
        pdu.from_primitive(prim)
        LOG.warning("%s: association from %s refused: rejected (%s): %s%s", self.name, self.peer,
                    REJECT_RESULTS.get(result), REJECT_REASONS.get((source, reason)),
                    self._refusal_detail(source, reason))
        audit.association_refused(self.peer, f"{REJECT_REASONS.get((source, reason))} ({self.name})")
        _send_quietly(self.sock, pdu.encode())
        self._linger()

    def _negotiate(self, rq: AssociateRq) -> bytes:
        """The A-ASSOCIATE-AC (PS3.8 §9.3.3): contexts, roles and extended negotiation."""
        results, roles = negotiate(rq, self.acceptor._supported)
        for cx in results:
            if cx.result == 0:
                self.contexts[cx.context_id] = (cx.abstract_syntax, cx.transfer_syntax)
                if cx.reversed_role:
                    self.reversed_roles.add(cx.context_id)
        self.peer_max_pdu = rq.max_length
        LOG.debug("%s: association from %s accepted: %d of %d context(s)", self.name, self.peer,
                  len(self.contexts), len(results))
        return encode_associate_ac(rq, results, self.acceptor.listener.max_pdu, IMPLEMENTATION_CLASS_UID,
                                   IMPLEMENTATION_VERSION_NAME, roles, self._extended_negotiation(rq))

    def _extended_negotiation(self, rq: AssociateRq) -> dict[str, bytes]:
        """Answers to the SOP Class Extended Negotiation items of accepted SOP classes whose
        service negotiates (PS3.7 D.3.3.5); the others get none (not supported)."""
        accepted = {abstract for abstract, _ in self.contexts.values()}
        for uid, proposed in rq.extended.items():
            answer = self.acceptor._extended.get(uid)
            if uid in accepted and answer is not None:
                self.extended[uid] = answer(proposed)
        return dict(self.extended)

    # -- data transfer (Sta6) ----------------------------------------------------------------------

    def _serve_data(self) -> None:
        self.sock.settimeout(self.acceptor.timeouts.network)
        self.command = bytearray()
        self.request: Request | None = None  # the request whose data set is arriving
        self.sink: DataSetSink | None = None
        try:
            while True:
                kind, _, length = PDU_HEADER.unpack(self.reader.exact(6))
                if kind == P_DATA_TF_TYPE:
                    self._p_data(length)
                elif kind == A_RELEASE_RQ_TYPE:
                    self._small_body(length)
                    self._drop_partial()
                    if self.acceptor.on_release is not None:
                        self.acceptor.on_release()
                    # no longer counted toward max_associations before the requestor learns it is
                    # released: its next association must not find this one still counted
                    self.acceptor._dissociate(self.conn)
                    self.associated = False
                    self._send(_RELEASE_RP)
                    self._linger()
                    return
                elif kind == A_ABORT_TYPE:
                    body = self._small_body(length)
                    pdu = A_ABORT_RQ()
                    try:
                        pdu.decode(PDU_HEADER.pack(kind, 0, len(body)) + body)
                        why = describe_abort(pdu.to_primitive())
                    except Exception:
                        why = "aborted"
                    LOG.warning("%s: association from %s %s", self.name, self.peer, why)
                    return
                elif kind in _KNOWN_PDUS:
                    raise _Abort(UNEXPECTED_PDU, f"unexpected PDU type 0x{kind:02X} during the association")
                else:
                    raise _Abort(UNRECOGNIZED_PDU, f"unrecognized PDU type 0x{kind:02X}")
        except _Closed:
            if self.acceptor.stopping:
                LOG.info("%s: association from %s closed: the service stops%s", self.name, self.peer,
                         "; the data set being received was discarded" if self.sink is not None else "")
            elif self.sink is not None or self.command:
                LOG.warning("%s: connection from %s lost in the middle of a message; nothing of it kept",
                            self.name, self.peer)
            else:
                LOG.warning("%s: connection from %s closed without A-RELEASE", self.name, self.peer)
            raise
        finally:
            self._drop_partial()

    def _small_body(self, length: int) -> bytes:
        if length > 64:
            raise _Abort(INVALID_PARAMETER, f"A-RELEASE/A-ABORT PDU of {length} bytes")
        return self.reader.exact(length)

    def _drop_partial(self) -> None:
        """Discard a message cut short (its partial file removed at once)."""
        if self.sink is not None:
            self.sink.discard()
            self.sink = None
        self.request = None
        self.command = bytearray()

    def _p_data(self, length: int) -> None:
        """The PDV items of one P-DATA-TF (PS3.8 §9.3.5.1, Annex E.2)."""
        max_pdu = self.acceptor.listener.max_pdu
        if max_pdu and length > max_pdu:
            raise _Abort(INVALID_PARAMETER, f"P-DATA-TF of {length} bytes, above the negotiated "
                                            f"maximum of {max_pdu} (PS3.8 D.1)")
        left = length
        while left > 0:
            if left < 6:
                raise _Abort(INVALID_PARAMETER, "P-DATA-TF with a truncated PDV item")
            item_length, context_id, control = PDV_HEADER.unpack(self.reader.exact(6))
            value = item_length - 2
            if item_length < 2 or item_length + 4 > left:
                raise _Abort(INVALID_PARAMETER, f"PDV item of {item_length} bytes in a P-DATA-TF of {length}")
            left -= item_length + 4
            if context_id not in self.contexts:
                raise _Abort(INVALID_PARAMETER, f"PDV on presentation context {context_id}, not accepted")
            last = bool(control & 0x02)
            if control & 0x01:  # command fragment
                if self.request is not None:
                    raise _Abort(UNEXPECTED_PDU, "command fragment in the middle of a data set")
                if len(self.command) + value > MAX_COMMAND:
                    raise _Abort(INVALID_PARAMETER, f"command set above {MAX_COMMAND} bytes")
                self.reader.pipe(value, self.command.extend)
                if last:
                    self._command_complete(context_id)
            else:
                request = self.request
                if request is None or request.context_id != context_id:
                    raise _Abort(UNEXPECTED_PDU, "data set fragment without its command")
                assert self.sink is not None
                self.reader.pipe(value, self.sink.write)
                if last:
                    self._ready.append((request, self.sink))
                    self.sink, self.request = None, None
        # Requests are served once their PDU is read whole: a handler may read the next PDUs
        # (C-CANCEL-RQ, sub-operation responses) while it runs.
        while self._ready and self.busy is None:
            self._dispatch(*self._ready.pop(0))

    def _command_complete(self, context_id: int) -> None:
        raw, self.command = bytes(self.command), bytearray()
        try:
            command = parse_command(raw)
        except AssociationLost as exc:
            raise _Abort(INVALID_PARAMETER, str(exc)) from None
        abstract, ts = self.contexts[context_id]
        request = Request(self.peer, context_id, abstract, ts, command)
        if request.command_field is None:
            raise _Abort(INVALID_PARAMETER, "command set without a Command Field (0000,0100)")
        if self.busy is not None:
            self.busy._command(command, request.command_field)
            return
        if request.command_field == C_CANCEL_RQ:  # for a request already answered: ignored
            LOG.debug("%s: C-CANCEL-RQ from %s for no outstanding request", self.name, self.peer)
            return
        if request.command_field & 0x8000:  # a response: we have no request outstanding
            raise _Abort(UNEXPECTED_PDU, f"response 0x{request.command_field:04X} with no request outstanding")
        if not request.has_data_set:
            self._ready.append((request, None))
            return
        handler = self._handler(request)
        sink: DataSetSink = Discard()
        if handler is not None:
            try:
                sink = handler.sink(request)
            except Exception as exc:  # e.g. disk full before the first byte: answered when complete
                sink = _Refused(exc)
        self.request, self.sink = request, sink

    def _handler(self, request: Request) -> Handler | None:
        return self.acceptor._dispatch.get((request.abstract_syntax, request.command_field or 0))

    def _dispatch(self, request: Request, data: DataSetSink | None) -> None:
        reply = Reply(self, request)
        if isinstance(data, _Refused):
            exc = data.error
            status = getattr(exc, "status", PROCESSING_FAILURE)
            LOG.error("%s: request 0x%04X of %s from %s failed with status 0x%04X: %s", self.name,
                      request.command_field, request.affected_sop_instance[:64], self.peer, status, exc,
                      extra={"status": status})
            reply(status, str(exc))
            return
        handler = self._handler(request)
        if handler is None:
            LOG.warning("%s: %s sent command 0x%04X on %s: unrecognized operation (0x0211)",
                        self.name, self.peer, request.command_field, request.abstract_syntax)
            reply(UNRECOGNIZED_OPERATION, "unrecognized operation")
            return
        self.busy = reply
        try:
            handler.handle(request, data, reply)
        finally:
            self.busy = None

    def _pending_input(self) -> bool:
        """Whether the requestor sent something not read yet (without waiting)."""
        if self.reader.pos < self.reader.end:
            return True
        if isinstance(self.sock, ssl.SSLSocket) and self.sock.pending():  # decrypted, not read yet
            return True
        ready, _, _ = select.select([self.sock], [], [], 0)
        return bool(ready)

    def _read_pdu_while_busy(self) -> None:
        """Read one PDU while a handler runs (network timeout): a P-DATA-TF whose commands go to
        the handler's :class:`Reply`; an A-ABORT or a lost connection ends the association."""
        kind, _, length = PDU_HEADER.unpack(self.reader.exact(6))
        if kind == P_DATA_TF_TYPE:
            self._p_data(length)
        elif kind == A_ABORT_TYPE:
            self._small_body(length)
            LOG.warning("%s: association from %s aborted by the requestor while request %d was served",
                        self.name, self.peer, self.busy.request.message_id if self.busy else 0)
            raise _Closed()
        elif kind in _KNOWN_PDUS:
            raise _Abort(UNEXPECTED_PDU, f"PDU type 0x{kind:02X} while a request is outstanding")
        else:
            raise _Abort(UNRECOGNIZED_PDU, f"unrecognized PDU type 0x{kind:02X}")

    def _send_request(self, context_id: int, command: bytes, dataset: bytes) -> None:
        """A request command set and its data set, as P-DATA-TF PDUs (PS3.8 §9.3.5)."""
        limit = max(self.peer_max_pdu or UNLIMITED_PDU, MIN_PEER_PDU) - 6
        parts: list = []
        p_data_tf(parts, context_id, memoryview(command), 0x01, limit)
        p_data_tf(parts, context_id, memoryview(dataset), 0x00, limit)
        self._send(b"".join(parts))

    def _respond(self, request: Request, status: int, comment: str, extra: dict[int, bytes],
                 dataset: bytes | None) -> None:
        """A response command set (PS3.7 §9.3, §10.3) and its data set, if any."""
        elements = {
            0x0002: padded(request.command.get(0x0002) or request.abstract_syntax.encode("ascii"), "UI"),
            0x0100: struct.pack("<H", (request.command_field or 0) | 0x8000),
            0x0120: struct.pack("<H", request.message_id),
            0x0800: struct.pack("<H", NO_DATA_SET if dataset is None else 0x0000),
            0x0900: struct.pack("<H", status),
        }
        if comment and status != SUCCESS:
            elements[0x0902] = padded(comment[:64].encode("ascii", "replace"), "LO")  # Error Comment
        if request.command.get(0x1000):
            elements[0x1000] = padded(request.command[0x1000], "UI")
        elements.update(extra)
        command = encode_command(elements)
        limit = max(self.peer_max_pdu or UNLIMITED_PDU, MIN_PEER_PDU) - 6
        parts: list = []
        p_data_tf(parts, request.context_id, memoryview(command), 0x01, limit)
        if dataset is not None:
            p_data_tf(parts, request.context_id, memoryview(dataset), 0x00, limit)
        self._send(b"".join(parts))

    def _send(self, data: bytes) -> None:
        """Write PDUs to the requestor. A connection closed under the write - by the requestor,
        or by :meth:`Acceptor.stop` while the service drains - is a lost connection, not a fault."""
        try:
            self.sock.sendall(data)
        except socket.timeout:
            raise
        except OSError:
            raise _Closed() from None

    # -- release and abort -------------------------------------------------------------------------

    def _abort(self, exc: _Abort) -> None:
        """A-ABORT (service provider) with a log line naming the peer; then wait for the close."""
        LOG.error("%s: association from %s aborted: %s", self.name, self.peer, exc)
        _send_quietly(self.sock, _abort_pdu(2, exc.reason))
        self._linger()

    def _linger(self) -> None:
        _linger(self.sock, self.acceptor.timeouts.artim)


class _Refused:
    """The sink of a request refused before its data set arrived (its error is the answer)."""

    def __init__(self, error: Exception) -> None:
        self.error = error

    def write(self, data: memoryview) -> None:
        pass

    def discard(self) -> None:
        pass


def _linger(sock: socket.socket, artim: float) -> None:
    """Wait (ARTIM, PS3.8 §9.1.5) for the peer to close the connection after our last PDU (or
    TLS alert); what it still sends is dropped, up to :data:`LINGER_BYTES` (then we close
    first). Closing with its data unread would reset the connection, and the peer might lose
    what we sent last."""
    _shutdown_write(sock)
    deadline = time.monotonic() + artim
    drained = 0
    try:
        while (left := deadline - time.monotonic()) > 0 and drained < LINGER_BYTES:
            sock.settimeout(left)
            n = len(sock.recv(65536))
            if not n:
                return
            drained += n
    except OSError:
        return


def _shutdown_write(sock: socket.socket) -> None:
    try:
        sock.shutdown(socket.SHUT_WR)
    except OSError:
        pass
