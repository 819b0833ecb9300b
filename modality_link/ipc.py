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
import select
import socket
import socketserver
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


class _Handler(socketserver.StreamRequestHandler):
    server: "_UnixServer"

    def handle(self) -> None:
        self.subscribed = False
        self.write_lock = threading.Lock()
        while True:
            try:
                line = self.rfile.readline(MAX_LINE + 1)
            except OSError:
                return
            if not line:
                return
            if len(line) > MAX_LINE:
                self.send(self._error(None, IpcError(INVALID_REQUEST, "request line too long")))
                return
            if not line.strip():
                continue
            reply = self.server.ipc.dispatch(line, self)
            if reply is not None:
                self.send(reply)

    def finish(self) -> None:
        self.server.ipc.unsubscribe(self)
        with self.write_lock:  # not while a publisher writes to it
            super().finish()

    @staticmethod
    def _error(req_id: Any, err: IpcError) -> dict[str, Any]:
        return {"jsonrpc": "2.0", "id": req_id, "error": err.to_json()}

    def send(self, obj: dict[str, Any]) -> bool:
        """Write one message; False when the client is gone (its socket reset, closed, or the
        stream already closed by :meth:`finish`): that is how clients leave, not an error."""
        try:
            with self.write_lock:
                self.wfile.write(_encode(obj))
                self.wfile.flush()
            return True
        except (OSError, ValueError) as exc:  # ssl.SSLError is an OSError
            LOG.debug("ipc: client gone (%s: %s)", type(exc).__name__, exc)
            return False


class _UnixServer(socketserver.ThreadingMixIn, socketserver.UnixStreamServer):
    daemon_threads = True
    ipc: "IpcServer"


class IpcServer:
    """Serve `methods` (name → callable taking keyword parameters) on the socket at `path`."""

    def __init__(self, path: Path, methods: dict[str, Callable[..., Any]]) -> None:
        self.path = Path(path)
        self.methods = dict(methods)
        self.methods["events.subscribe"] = self._subscribe_placeholder
        self._subscribers: set[_Handler] = set()
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

    def unsubscribe(self, handler: _Handler) -> None:
        with self._lock:
            self._subscribers.discard(handler)

    def publish(self, event_type: str, **params: Any) -> None:
        """Send the notification ``event`` with ``type`` = `event_type` to every subscriber."""
        note = {"jsonrpc": "2.0", "method": "event", "params": {"type": event_type, **params}}
        with self._lock:
            subscribers = list(self._subscribers)
        for handler in subscribers:
            if not handler.send(note):
                self.unsubscribe(handler)

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
            err = IpcError(INTERNAL_ERROR, f"internal error in {method}: {exc}")
            return None if is_notification else _Handler._error(req_id, err)
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
