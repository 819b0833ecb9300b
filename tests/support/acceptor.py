"""Helpers for the acceptor tests: a disk server in this process on a temporary archive, and
raw DICOM Upper Layer streams (PS3.8 §9.3) built byte by byte."""

from __future__ import annotations

import socket
import struct
import time
from dataclasses import dataclass
from pathlib import Path

from pydicom.uid import ExplicitVRLittleEndian, ImplicitVRLittleEndian
from pynetdicom.sop_class import CTImageStorage, Verification

from modality_link import config
from modality_link.archive import Archive
from modality_link.db import Database
from modality_link.home import free_port
from modality_link.net.servers import StorageServer
from modality_link.net.storage import c_store_rq
from modality_link.net.upper_layer import Requestor, p_data_tf


@dataclass
class LocalServer:
    """A disk server (our acceptor) in this process, archiving into `root`."""

    root: Path
    archive: Archive
    server: StorageServer

    @property
    def port(self) -> int:
        return self.server.port

    @property
    def faults(self) -> int:
        return self.server.acceptor.faults

    def stray_files(self) -> list[Path]:
        """Temporaries left behind, and archive files without an index row."""
        self.archive.wait_indexed()
        stray = list(self.archive.tmp_dir.iterdir())
        known = self.archive.db.index.paths()
        stray += [f for f in self.archive.root.glob("*/*/*.dcm")
                  if f.relative_to(self.archive.root).as_posix() not in known]
        return stray

    def stop(self) -> None:
        self.server.stop()
        self.archive.db.close()


def local_server(root: Path, **listener: object) -> LocalServer:
    """Start a disk server on a free loopback port; ARTIM 1 s, network timeout 5 s."""
    (root / "archive" / ".tmp").mkdir(parents=True)
    archive = Archive(root / "archive", Database(root / "index.sqlite"), min_free_mb=0)
    lst = config.Listener(port=free_port(), bind_address="127.0.0.1", **listener)  # type: ignore[arg-type]
    timeouts = config.Timeouts(acse=5.0, network=5.0, artim=1.0)
    server = StorageServer(lst, timeouts, archive)
    server.start()
    return LocalServer(root, archive, server)


def rss_kib() -> int:
    """Resident set size of this process (VmRSS, KiB)."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    raise AssertionError("no VmRSS")


def associate_rq(calling: str = "FUZZER", called: str = "MODLINK", max_pdu: int = 16384) -> bytes:
    """An A-ASSOCIATE-RQ proposing Verification (context 1) and CT Image Storage (context 3)."""
    req = Requestor("127.0.0.1", 0, calling, called,
                    [(Verification, [ImplicitVRLittleEndian]), (CTImageStorage, [ExplicitVRLittleEndian])],
                    config.Timeouts(), max_pdu=max_pdu)
    return req._associate_rq()


def p_data(context_id: int, data: bytes, command: bool, fragment: int = 4096) -> bytes:
    """P-DATA-TF PDUs carrying `data` as command or data set fragments (PS3.8 §9.3.5, E.2)."""
    parts: list = []
    p_data_tf(parts, context_id, memoryview(data), 0x01 if command else 0x00, fragment)
    return b"".join(bytes(p) for p in parts)


def c_echo_rq(message_id: int = 1) -> bytes:
    """A C-ECHO-RQ command set (PS3.7 §9.3.5), Implicit VR Little Endian."""
    uid = Verification.encode() + b"\x00"
    body = b"".join(struct.pack("<HHL", 0, e, len(v)) + v for e, v in (
        (0x0002, uid), (0x0100, struct.pack("<H", 0x0030)), (0x0110, struct.pack("<H", message_id)),
        (0x0800, struct.pack("<H", 0x0101)),
    ))
    return struct.pack("<HHL", 0, 0, 4) + struct.pack("<L", len(body)) + body


RELEASE_RQ = b"\x05\x00\x00\x00\x00\x04\x00\x00\x00\x00"


def store_stream(dataset: bytes, sop_instance: str, message_id: int = 1) -> bytes:
    """P-DATA-TF of a C-STORE-RQ and its data set on context 3."""
    return (p_data(3, c_store_rq(message_id, CTImageStorage, sop_instance), True)
            + p_data(3, dataset, False))


def exchange(port: int, stream: bytes, timeout: float = 5.0) -> bytes:
    """Send `stream`, half-close, and return all the acceptor sent until it closed."""
    out = bytearray()
    with socket.create_connection(("127.0.0.1", port), timeout=timeout) as s:
        try:
            s.sendall(stream)
            s.shutdown(socket.SHUT_WR)
        except OSError:
            pass
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            try:
                chunk = s.recv(65536)
            except OSError:
                break
            if not chunk:
                break
            out += chunk
    return bytes(out)


def pdu_types(data: bytes) -> list[int]:
    """The PDU types in a byte stream from the acceptor."""
    kinds, pos = [], 0
    while pos + 6 <= len(data):
        kind, _, length = struct.unpack_from(">BBL", data, pos)
        kinds.append(kind)
        pos += 6 + length
    return kinds


def statuses(data: bytes) -> list[int]:
    """The Status (0000,0900) of every response command set in a byte stream from the acceptor."""
    out, pos = [], 0
    while pos + 6 <= len(data):
        kind, _, length = struct.unpack_from(">BBL", data, pos)
        if kind == 0x04:
            body = data[pos + 6:pos + 6 + length]
            at = body.find(b"\x00\x00\x00\x09\x02\x00\x00\x00")
            if at >= 0:
                out.append(struct.unpack_from("<H", body, at + 8)[0])
        pos += 6 + length
    return out
