"""The IPC protocol: JSON-RPC 2.0, one JSON object per line, over a Unix domain socket.

This is the one module that knows the wire format between the service and its local clients
(the acquisition software, the technologist's buttons, the CLI). docs/ipc.md documents it for
the acquisition software's authors; a test keeps the two in step.

- Requests and responses follow JSON-RPC 2.0 (https://www.jsonrpc.org/specification), each
  encoded as UTF-8 JSON on one line terminated by ``\\n``.
- ``events.subscribe`` turns a connection into an event stream: the server then sends
  notifications ``{"jsonrpc": "2.0", "method": "event", "params": {"type": ..., "seq": N, ...}}``.
  With a :class:`Journal`, every event gets a sequence number and ``events.subscribe {since: N}``
  first replays the journaled events after N (docs/ipc.md "Events").
- Every error carries a code (below) and a human sentence in ``message``.
- Each connection knows its peer (:class:`Peer`: process, user and groups, from ``SO_PEERCRED``
  and ``SO_PEERGROUPS``, unix(7)); the server's `check` sees it with every request and may
  refuse it (docs/ipc.md "Roles").
"""

from __future__ import annotations

import json
import logging
import os
import queue
import select
import socket
import socketserver
import struct
import threading
import time
from collections import deque
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterator, Protocol

LOG = logging.getLogger("modality_link.ipc")

#: The protocol's version, MAJOR.MINOR (docs/ipc.md "Versions"): a client of another major is
#: refused by ``hello``; a minor adds methods, parameters, result fields or events only.
PROTOCOL_VERSION = "1.0"

# JSON-RPC 2.0 codes
PARSE_ERROR = -32700
INVALID_REQUEST = -32600
METHOD_NOT_FOUND = -32601
INVALID_PARAMS = -32602
INTERNAL_ERROR = -32603
# Application codes (docs/ipc.md "Errors")
CONFIG_INVALID = -32001
NOT_FOUND = -32002
DICOM_FAILURE = -32003
CONFLICT = -32004
#: The caller's role may not do this (docs/ipc.md "Roles").
FORBIDDEN = -32010
#: The client speaks a major version of the protocol the service does not (``hello``).
PROTOCOL_MISMATCH = -32011

#: Longest request line the server accepts (bytes).
MAX_LINE = 1 << 20

#: getsockopt(2) option of Linux (since 4.13) giving the peer's supplementary groups.
SO_PEERGROUPS = getattr(socket, "SO_PEERGROUPS", 59)


@dataclass(frozen=True)
class Peer:
    """The process at the other end of a connection, as the kernel saw it when it connected."""

    pid: int
    uid: int
    gid: int
    #: Its supplementary groups (and its primary group).
    groups: frozenset[int]


def peer_of(sock: socket.socket) -> Peer:
    """The credentials of a Unix socket's peer (``SO_PEERCRED``, ``SO_PEERGROUPS``)."""
    pid, uid, gid = struct.unpack("3i", sock.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, struct.calcsize("3i")))
    try:
        raw = sock.getsockopt(socket.SOL_SOCKET, SO_PEERGROUPS, 4 * 65536)
        groups = frozenset(struct.unpack(f"{len(raw) // 4}I", raw[: len(raw) // 4 * 4]))
    except OSError:  # a kernel without it: the groups of the user's account
        groups = frozenset(_account_groups(uid, gid))
    return Peer(pid, uid, gid, groups | {gid})


def _account_groups(uid: int, gid: int) -> list[int]:
    import pwd

    try:
        return os.getgrouplist(pwd.getpwuid(uid).pw_name, gid)
    except KeyError:  # a user id without an account
        return [gid]


class IpcError(Exception):
    """An error with a JSON-RPC code and a sentence for the user."""

    def __init__(self, code: int, message: str, data: Any = None) -> None:
        super().__init__(message)
        self.code = code
        self.message = message
        self.data = data

    def to_json(self) -> dict[str, Any]:
        err: dict[str, Any] = {"code": self.code, "message": self.message}
        if self.data is not None:
            err["data"] = self.data
        return err


class NotRunning(Exception):
    """No service listens on the home folder's socket."""


class Replayed(Protocol):
    """One journaled event (``seq``, ``type``, ``params``)."""

    seq: int
    type: str
    params: dict[str, Any]


class Replay(Protocol):
    """What a journal gives back for ``events.subscribe {since}``."""

    @property
    def events(self) -> "list[Any]": ...  # of Replayed
    @property
    def complete(self) -> bool: ...
    @property
    def last_seq(self) -> int: ...


class Journal(Protocol):
    """Where the server numbers and keeps its events (the service's SQLite, `db.events`)."""

    def append(self, event_type: str, params: dict[str, Any]) -> int: ...
    def replay(self, since: int) -> Replay: ...
    def last_seq(self) -> int: ...


def _encode(obj: dict[str, Any]) -> bytes:
    return json.dumps(obj, ensure_ascii=False, separators=(",", ":")).encode("utf-8") + b"\n"


class _Handler(socketserver.BaseRequestHandler):
    """One client connection: requests read a line at a time, responses written in order, and,
    once subscribed, events written by a thread of its own from a bounded queue (so that a
    client that stops reading never holds up the thread that publishes)."""

    server: "_UnixServer"

    def setup(self) -> None:
        self.subscribed = False
        #: Replayed events, written before any event of the queue.
        self.backlog: list[bytes] = []
        self._writer: threading.Thread | None = None
        self.write_lock = threading.Lock()
        self.events: queue.Queue["bytes | _LaterEvent | None"] = queue.Queue(self.server.ipc.event_queue)
        self._closed = False
        self.request.settimeout(None)
        self.peer = peer_of(self.request)
        # a write that cannot go on for this long means the client stopped reading (SO_SNDTIMEO)
        self.request.setsockopt(socket.SOL_SOCKET, socket.SO_SNDTIMEO,
                                struct.pack("ll", int(self.server.ipc.send_timeout), 0))

    def handle(self) -> None:
        if not self.server.ipc.admit(self):
            self.send(self._error(None, IpcError(
                CONFLICT, f"too many IPC connections (at most {self.server.ipc.max_connections}); try again"
            )))
            return
        buf = b""
        idle = self.server.ipc.idle_timeout
        while not self._closed:
            if b"\n" not in buf:
                # a client with nothing to say for `idle` seconds is closed, unless it waits
                # for events; a line begun but not finished within `idle` seconds is too
                ready, _, _ = select.select([self.request], [], [], idle)
                if not ready:
                    if buf or not self.subscribed:
                        LOG.info("ipc: closing a connection idle for %g s", idle)
                        return
                    continue
                try:
                    chunk = self.request.recv(65536)
                except OSError:
                    return
                if not chunk:
                    return
                buf += chunk
                if len(buf) > MAX_LINE and b"\n" not in buf:
                    self.send(self._error(None, IpcError(INVALID_REQUEST, "request line too long")))
                    return
                continue
            line, _, buf = buf.partition(b"\n")
            if not line.strip():
                continue
            reply = self.server.ipc.dispatch(line, self)
            if reply is not None and not self.send(reply):
                return
            if self.subscribed and self._writer is None:  # events only after the subscribe reply
                self._writer = threading.Thread(target=self._write_events, name="ipc-events", daemon=True)
                self._writer.start()

    def finish(self) -> None:
        self.server.ipc.unsubscribe(self)
        self.close()

    def close(self) -> None:
        """Close the connection; a writer blocked on it returns at once."""
        try:
            self.request.shutdown(socket.SHUT_RDWR)  # first: a blocked write then fails at once
        except OSError:
            pass
        with self.write_lock:
            self._closed = True
        try:  # wake an event writer waiting for work; a busy one fails on the closed socket
            self.events.put_nowait(None)
        except queue.Full:
            pass
        self.server.ipc.leave(self)

    def subscribe(self) -> None:
        """Queue events from now on; they are written once the reply to the request that
        subscribed has been (a client reading that reply must not meet an event first)."""
        self.subscribed = True

    def _write_events(self) -> None:
        backlog, self.backlog = self.backlog, []
        for line in backlog:
            if not self._write(line):
                self.server.ipc.unsubscribe(self)
                return
        while True:
            item = self.events.get()
            data = item.encode() if isinstance(item, _LaterEvent) else item
            if data is None and item is not None:  # its parameters could not be made: skipped
                continue
            if data is None or not self._write(data):
                self.server.ipc.unsubscribe(self)
                return

    def queue_event(self, data: "bytes | _LaterEvent") -> bool:
        """Queue an encoded event; False when its queue is full (the client does not read)."""
        try:
            self.events.put_nowait(data)
            return True
        except queue.Full:
            return False

    @staticmethod
    def _error(req_id: Any, err: IpcError) -> dict[str, Any]:
        return {"jsonrpc": "2.0", "id": req_id, "error": err.to_json()}

    def send(self, obj: dict[str, Any]) -> bool:
        """Write one message; False when the client is gone."""
        return self._write(_encode(obj))

    def _write(self, data: bytes) -> bool:
        """False when the client is gone (its socket reset or closed, or a write stalled for the
        send timeout): that is how clients leave, not an error."""
        try:
            with self.write_lock:
                if self._closed:
                    raise ConnectionAbortedError("the connection was closed")
                self.request.sendall(data)
            return True
        except OSError as exc:  # EAGAIN after SO_SNDTIMEO; ssl.SSLError is an OSError too
            LOG.debug("ipc: client gone (%s: %s)", type(exc).__name__, exc)
            return False


class _LaterEvent:
    """An event whose parameters are made, and the event encoded, by the first subscriber's
    writer thread that gets to it (not by the thread that published it)."""

    def __init__(self, event_type: str, make: Callable[[], dict[str, Any]]) -> None:
        self.event_type = event_type
        self._make: Callable[[], dict[str, Any]] | None = make
        self._data: bytes | None = None
        self._lock = threading.Lock()

    def encode(self) -> bytes | None:
        with self._lock:
            if self._make is not None:
                make, self._make = self._make, None
                try:
                    self._data = _encode({"jsonrpc": "2.0", "method": "event",
                                          "params": {"type": self.event_type, "seq": None, **make()}})
                except Exception:
                    LOG.exception("ipc: the %s event could not be made; not sent", self.event_type)
            return self._data


class _UnixServer(socketserver.ThreadingMixIn, socketserver.UnixStreamServer):
    daemon_threads = True
    request_queue_size = 128  # the listen backlog: a burst of clients is queued, not refused
    ipc: "IpcServer"


class IpcServer:
    """Serve `methods` (name → callable taking keyword parameters) on the socket at `path`.

    `check(peer, method, params)`, when given, sees every request with its parameters by name
    (once they fit the method's signature) before it runs, and refuses it by raising
    :class:`IpcError`. `group` is the group id the socket is given (mode 0660), else the
    service's own group."""

    def __init__(
        self, path: Path, methods: dict[str, Callable[..., Any]], *, max_connections: int = 64,
        idle_timeout: float = 120.0, event_queue: int = 1000, send_timeout: float = 10.0,
        check: Callable[[Peer, str, dict[str, Any]], None] | None = None, group: int | None = None,
        journal: Journal | None = None,
    ) -> None:
        self.path = Path(path)
        self.methods = dict(methods)
        self.methods["events.subscribe"] = self._subscribe_placeholder
        self.check = check
        self.group = group
        #: Numbers and keeps the events for replay; None: events carry no ``seq``.
        self.journal = journal
        # a published event is journaled and queued, and a subscriber replays and joins, in one
        # order: nothing replayed is also queued live, nothing is missed between the two
        self._publish_lock = threading.Lock()
        #: Connections served at once; one more is told so and closed.
        self.max_connections = max_connections
        #: Seconds a connection may stay silent (or leave a line unfinished) unless subscribed.
        self.idle_timeout = idle_timeout
        #: Events queued for a subscriber that has not read them yet; one more and it is dropped.
        self.event_queue = event_queue
        #: Seconds a write may stall before the client counts as gone.
        self.send_timeout = send_timeout
        self._subscribers: set[_Handler] = set()
        self._connections: set[_Handler] = set()
        self._lock = threading.Lock()
        self._server: _UnixServer | None = None
        self._thread: threading.Thread | None = None

    @staticmethod
    def _subscribe_placeholder(since: int | None = None) -> None:  # dispatch handles it with the connection
        return None

    def start(self) -> None:
        if len(os.fsencode(self.path)) >= 108:
            raise OSError(f"IPC socket path too long for a Unix socket (max 107 bytes): {self.path}")
        if self.path.exists():
            # A stale socket from a killed service; refuse if another service answers on it.
            try:
                with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
                    s.connect(str(self.path))
                raise OSError(f"another service is already running on {self.path}")
            except (ConnectionRefusedError, FileNotFoundError):
                self.path.unlink(missing_ok=True)
        old = os.umask(0o117)
        try:
            self._server = _UnixServer(str(self.path), _Handler)
        finally:
            os.umask(old)
        if self.group is not None:
            try:
                os.chown(self.path, -1, self.group)
            except PermissionError as exc:
                LOG.error("ipc: the socket cannot be given group %d (%s): only the service's own user "
                          "and group can connect", self.group, exc.strerror)
        os.chmod(self.path, 0o660)
        self._server.ipc = self
        self._thread = threading.Thread(target=self._server.serve_forever, name="ipc", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()
            self._server = None
        self.path.unlink(missing_ok=True)

    def admit(self, handler: _Handler) -> bool:
        """Count a new connection in; False when there are already :attr:`max_connections`."""
        with self._lock:
            if len(self._connections) >= self.max_connections:
                LOG.warning("ipc: connection refused: %d connections open already", len(self._connections))
                return False
            self._connections.add(handler)
            return True

    def leave(self, handler: _Handler) -> None:
        with self._lock:
            self._connections.discard(handler)

    def unsubscribe(self, handler: _Handler) -> None:
        with self._lock:
            self._subscribers.discard(handler)

    def publish(self, event_type: str, **params: Any) -> None:
        """Queue the notification ``event`` with ``type`` = `event_type` for every subscriber.

        Never waits for a client: each subscriber has a bounded queue that a thread of its own
        writes out. A subscriber whose queue is full does not read its events; it is dropped
        (its connection closed, one log line) rather than waited for. With a :attr:`journal` the
        event is journaled first and carries its sequence number ``seq``."""
        with self._publish_lock:
            if self.journal is None:
                fields = {"type": event_type, **params}
            else:
                try:
                    seq: int | None = self.journal.append(event_type, params)
                except Exception:  # the database is unwell: the live event still goes out
                    LOG.exception("ipc: the %s event could not be journaled", event_type)
                    seq = None
                fields = {"type": event_type, "seq": seq, **params}
            self._queue(_encode({"jsonrpc": "2.0", "method": "event", "params": fields}))

    def publish_later(self, event_type: str, make: Callable[[], dict[str, Any]]) -> None:
        """:meth:`publish` an event whose parameters `make` gives, called (once) by a subscriber's
        writer thread, never when nobody subscribes: for an event that is costly to make on a
        thread that serves a peer (the memory server's ``memory.stored``). Such an event is not
        journaled: its ``seq`` is null and it is never replayed."""
        self._queue(_LaterEvent(event_type, make))

    def _queue(self, data: "bytes | _LaterEvent") -> None:
        with self._lock:
            subscribers = list(self._subscribers)
        for handler in subscribers:
            if not handler.queue_event(data):
                LOG.warning("ipc: a subscriber left %d events unread; dropped", self.event_queue)
                self.unsubscribe(handler)
                handler.close()

    def dispatch(self, line: bytes, handler: _Handler) -> dict[str, Any] | None:
        """Run one request line; return the response object (None for a notification)."""
        try:
            req = json.loads(line)
        except (ValueError, UnicodeDecodeError) as exc:
            return _Handler._error(None, IpcError(PARSE_ERROR, f"not valid JSON: {exc}"))
        except RecursionError:
            return _Handler._error(None, IpcError(PARSE_ERROR, "not valid JSON: nested too deeply"))
        if (
            not isinstance(req, dict)
            or req.get("jsonrpc") != "2.0"
            or not isinstance(req.get("method"), str)
            or not isinstance(req.get("id"), (str, int, float, type(None)))
        ):
            req_id = req.get("id") if isinstance(req, dict) else None
            return _Handler._error(
                req_id if isinstance(req_id, (str, int, float)) else None,
                IpcError(INVALID_REQUEST, "a request is an object with jsonrpc '2.0', a method and "
                                          "a string or number as its id"),
            )
        req_id = req.get("id")
        is_notification = "id" not in req
        method = req["method"]
        params = req.get("params", {})
        try:
            if method not in self.methods:
                raise IpcError(METHOD_NOT_FOUND, f"no such method: {method}")
            if method == "events.subscribe":
                result: Any = self._subscribe(handler, params)
            elif isinstance(params, dict):
                result = self._call(handler.peer, method, **params)
            elif isinstance(params, list):
                result = self._call(handler.peer, method, *params)
            else:
                raise IpcError(INVALID_PARAMS, "params must be an object or an array")
        except IpcError as err:
            if err.code in (INTERNAL_ERROR, DICOM_FAILURE):
                LOG.error("ipc: %s failed: %s", method, err.message)
            return None if is_notification else _Handler._error(req_id, err)
        except Exception as exc:  # a bug: report it, keep serving
            LOG.exception("ipc: %s raised", method)
            internal = IpcError(INTERNAL_ERROR, f"internal error in {method}: {exc}")
            return None if is_notification else _Handler._error(req_id, internal)
        return None if is_notification else {"jsonrpc": "2.0", "id": req_id, "result": result}

    def _subscribe(self, handler: _Handler, params: Any) -> dict[str, Any]:
        """Subscribe `handler`; with ``since``, the journaled events after it are written first.

        The result says how many were replayed and whether they are all that happened since
        (``complete``: false when `since` is older than the journal keeps, or newer than its
        last number, e.g. another home's; the client then resynchronises with ``jobs.list``,
        ``exam.show``...)."""
        if isinstance(params, list):
            params = dict(zip(["since"], params))
        if not isinstance(params, dict) or set(params) - {"since"}:
            raise IpcError(INVALID_PARAMS, "events.subscribe: it takes only since", {"param": "since"})
        if self.check is not None:
            self.check(handler.peer, "events.subscribe", params)
        since = params.get("since")
        with self._publish_lock:
            result: dict[str, Any] = {"subscribed": True}
            if self.journal is not None:
                last = self.journal.last_seq()
                result |= {"last_seq": last, "replayed": 0, "complete": True}
                if since is not None:
                    replay = self.journal.replay(since)
                    handler.backlog = [_encode({"jsonrpc": "2.0", "method": "event",
                                                "params": {"type": e.type, "seq": e.seq, **e.params}})
                                       for e in replay.events]
                    result |= {"last_seq": replay.last_seq, "replayed": len(replay.events),
                               "complete": replay.complete}
            with self._lock:
                self._subscribers.add(handler)
            handler.subscribe()
        return result

    def _call(self, peer: Peer, method: str, *args: Any, **kwargs: Any) -> Any:
        import inspect  # the server only (clients start without it); loaded there already

        func = self.methods[method]
        signature = inspect.signature(func)
        try:
            bound = signature.bind(*args, **kwargs)
        except TypeError as exc:
            unknown = sorted(set(kwargs) - set(signature.parameters))
            raise IpcError(INVALID_PARAMS, f"{method}: {exc}", {"param": unknown[0]} if unknown else None) from None
        if self.check is not None:
            self.check(peer, method, dict(bound.arguments))
        return func(*bound.args, **bound.kwargs)


class IpcClient:
    """A connection to the service of a home folder."""

    def __init__(self, path: Path, timeout: float | None = 600.0) -> None:
        self.path = Path(path)
        self._sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self._sock.settimeout(timeout)
        try:
            self._sock.connect(str(self.path))
        except (FileNotFoundError, ConnectionRefusedError):
            self._sock.close()
            raise NotRunning(
                f"no modality-link service is running (no one answers on {self.path}); "
                f"start it with `modality-link serve`"
            ) from None
        self._buf = b""
        self._next_id = 0
        #: Events read while :meth:`call` waited for its reply, for :meth:`next_event`.
        self._events: deque[dict[str, Any]] = deque()

    def close(self) -> None:
        self._sock.close()

    def __enter__(self) -> "IpcClient":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def call(self, method: str, **params: Any) -> Any:
        """Call `method`; return its result or raise :class:`IpcError`."""
        self._next_id += 1
        req_id = self._next_id
        self._sock.sendall(_encode({"jsonrpc": "2.0", "id": req_id, "method": method, "params": params}))
        while True:
            msg = self._read()
            if msg is not None and msg.get("id") == req_id:
                break
            if msg is not None and msg.get("method") == "event":  # kept for next_event
                self._events.append(msg.get("params", {}))
        if "error" in msg:
            e = msg["error"]
            raise IpcError(e.get("code", INTERNAL_ERROR), e.get("message", "unknown error"), e.get("data"))
        return msg.get("result")

    def _read(self, timeout: float | None = None) -> dict[str, Any] | None:
        """The next message; None when `timeout` (seconds) passes first."""
        while b"\n" not in self._buf:
            if timeout is not None:
                ready, _, _ = select.select([self._sock], [], [], max(timeout, 0.0))
                if not ready:
                    return None
            chunk = self._sock.recv(65536)
            if not chunk:
                raise NotRunning(f"the service closed the connection on {self.path}")
            self._buf += chunk
        line, _, self._buf = self._buf.partition(b"\n")
        return json.loads(line)

    def next_event(self, timeout: float) -> dict[str, Any] | None:
        """The next event's params on a subscribed connection; None after `timeout` seconds."""
        if self._events:  # arrived while a call waited for its reply
            return self._events.popleft()
        end = time.monotonic() + timeout
        while True:
            msg = self._read(end - time.monotonic())
            if msg is None:
                return None
            if msg.get("method") == "event":
                return msg.get("params", {})

    def follow_job(
        self, job_id: int, on_update: Callable[[dict[str, Any]], None] | None = None,
        timeout: float | None = None,
    ) -> dict[str, Any]:
        """Follow a job and the jobs it queues (commit, resend) until the last one ends; return
        that one. ``job.progress`` events wake us and ``jobs.show`` gives the state, which
        `on_update` sees each time it is read. Raises TimeoutError after `timeout` seconds."""
        self.call("events.subscribe")
        end = None if timeout is None else time.monotonic() + timeout
        while True:
            job = self.call("jobs.show", id=job_id)
            if on_update is not None:
                on_update(job)
            if job["state"] in ("done", "failed", "cancelled"):
                if not job["children"]:
                    return job
                job_id = job["children"][-1]
                continue
            if end is not None and time.monotonic() >= end:
                raise TimeoutError(f"job {job_id} not finished within {timeout:g} s: {job}")
            wake = time.monotonic() + (1.0 if end is None else min(1.0, end - time.monotonic()))
            while time.monotonic() < wake:
                event = self.next_event(wake - time.monotonic())
                if event is None or (event.get("type") == "job.progress" and event.get("job_id") == job_id):
                    break

    def events(self, since: int | None = None) -> Iterator[dict[str, Any]]:
        """Subscribe and yield each event's params (``type``, ``seq`` and its fields); with
        `since`, the events after that sequence number come first (replayed)."""
        if since is None:
            self.call("events.subscribe")
        else:
            self.call("events.subscribe", since=since)
        while True:
            while self._events:
                yield self._events.popleft()
            msg = self._read()
            if msg is not None and msg.get("method") == "event":
                yield msg.get("params", {})
