"""The IPC protocol: JSON-RPC 2.0, one JSON object per line, over a Unix domain socket.

This is the one module that knows the wire format between the service and its local clients
(the acquisition software, the technologist's buttons, the CLI). docs/ipc.md documents it for
the acquisition software's authors; a test keeps the two in step.

- Requests and responses follow JSON-RPC 2.0 (https://www.jsonrpc.org/specification), each
  encoded as UTF-8 JSON on one line terminated by ``\\n``.
- ``events.subscribe`` turns a connection into an event stream: the server then sends
  notifications ``{"jsonrpc": "2.0", "method": "event", "params": {"type": ..., ...}}``.
- Every error carries a code (below) and a human sentence in ``message``.
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
from pathlib import Path
from typing import Any, Callable, Iterator

LOG = logging.getLogger("modality_link.ipc")

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

#: Longest request line the server accepts (bytes).
MAX_LINE = 1 << 20


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


def _encode(obj: dict[str, Any]) -> bytes:
    return json.dumps(obj, ensure_ascii=False, separators=(",", ":")).encode("utf-8") + b"\n"


class _Handler(socketserver.BaseRequestHandler):
    """One client connection: requests read a line at a time, responses written in order, and,
    once subscribed, events written by a thread of its own from a bounded queue (so that a
    client that stops reading never holds up the thread that publishes)."""

    server: "_UnixServer"

    def setup(self) -> None:
        self.subscribed = False
        self._writer: threading.Thread | None = None
        self.write_lock = threading.Lock()
        self.events: queue.Queue["bytes | _LaterEvent | None"] = queue.Queue(self.server.ipc.event_queue)
        self._closed = False
        self.request.settimeout(None)
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
                                          "params": {"type": self.event_type, **make()}})
                except Exception:
                    LOG.exception("ipc: the %s event could not be made; not sent", self.event_type)
            return self._data


class _UnixServer(socketserver.ThreadingMixIn, socketserver.UnixStreamServer):
    daemon_threads = True
    request_queue_size = 128  # the listen backlog: a burst of clients is queued, not refused
    ipc: "IpcServer"


class IpcServer:
    """Serve `methods` (name → callable taking keyword parameters) on the socket at `path`."""

    def __init__(
        self, path: Path, methods: dict[str, Callable[..., Any]], *, max_connections: int = 64,
        idle_timeout: float = 120.0, event_queue: int = 1000, send_timeout: float = 10.0,
    ) -> None:
        self.path = Path(path)
        self.methods = dict(methods)
        self.methods["events.subscribe"] = self._subscribe_placeholder
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
    def _subscribe_placeholder() -> None:  # dispatch handles it with the connection
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
        (its connection closed, one log line) rather than waited for."""
        self._queue(_encode({"jsonrpc": "2.0", "method": "event", "params": {"type": event_type, **params}}))

    def publish_later(self, event_type: str, make: Callable[[], dict[str, Any]]) -> None:
        """:meth:`publish` an event whose parameters `make` gives, called (once) by a subscriber's
        writer thread, never when nobody subscribes: for an event that is costly to make on a
        thread that serves a peer (the memory server's ``memory.stored``)."""
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
        if (
            not isinstance(req, dict)
            or req.get("jsonrpc") != "2.0"
            or not isinstance(req.get("method"), str)
        ):
            return _Handler._error(
                req.get("id") if isinstance(req, dict) else None,
                IpcError(INVALID_REQUEST, "a request is an object with jsonrpc '2.0' and a method"),
            )
        req_id = req.get("id")
        is_notification = "id" not in req
        method = req["method"]
        params = req.get("params", {})
        try:
            if method not in self.methods:
                raise IpcError(METHOD_NOT_FOUND, f"no such method: {method}")
            if method == "events.subscribe":
                with self._lock:
                    self._subscribers.add(handler)
                handler.subscribe()
                result: Any = {"subscribed": True}
            elif isinstance(params, dict):
                result = self._call(method, **params)
            elif isinstance(params, list):
                result = self._call(method, *params)
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

    def _call(self, method: str, *args: Any, **kwargs: Any) -> Any:
        import inspect  # the server only (clients start without it); loaded there already

        func = self.methods[method]
        try:
            inspect.signature(func).bind(*args, **kwargs)
        except TypeError as exc:
            raise IpcError(INVALID_PARAMS, f"{method}: {exc}") from None
        return func(*args, **kwargs)


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

    def events(self) -> Iterator[dict[str, Any]]:
        """Subscribe and yield each event's params (``type`` and its fields)."""
        self.call("events.subscribe")
        while True:
            msg = self._read()
            if msg is not None and msg.get("method") == "event":
                yield msg.get("params", {})
