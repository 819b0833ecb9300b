"""Listening AEs: the disk server (Storage SCP into the archive) with Verification SCP and the
Query/Retrieve SCP.

Storage Service Class SCP, PS3.4 Annex B; Verification SCP, PS3.4 Annex A; Query/Retrieve SCP,
PS3.4 Annex C (:mod:`modality_link.net.qr`).

Served by our own acceptor (`modality_link.net.acceptor`): each data set is written to its
archive file as its fragments arrive, without being decoded; only its header is parsed to
validate and index it. A dataset that cannot be parsed, is truncated, or whose UIDs are invalid
is refused with a failure status and one log line, and nothing of it enters the archive.
"""

from __future__ import annotations

import logging
import threading
from typing import Callable, TypeVar

from pydicom.uid import (
    DeflatedExplicitVRLittleEndian,
    ExplicitVRBigEndian,
    ExplicitVRLittleEndian,
    ImplicitVRLittleEndian,
    JPEG2000,
    JPEG2000Lossless,
    JPEGBaseline8Bit,
    JPEGExtended12Bit,
    JPEGLossless,
    JPEGLosslessSV1,
    JPEGLSLossless,
    JPEGLSNearLossless,
    RLELossless,
)
from pynetdicom.presentation import AllStoragePresentationContexts

from modality_link import audit
from modality_link.archive import Archive, ArchiveError, IncomingInstance
from modality_link.config import Listener, Node, Timeouts
from modality_link.db import InstanceRecord
from modality_link.net.acceptor import (
    C_ECHO_RQ,
    C_STORE_RQ,
    N_EVENT_REPORT_RQ,
    Acceptor,
    DataSetSink,
    Discard,
    Reply,
    Request,
    Service,
)
from modality_link.net.commitment import STORAGE_COMMITMENT_PUSH, Report, ReportHandler
from modality_link.net.qr import QrContext, qr_services
from modality_link.net.status import CANNOT_UNDERSTAND, PROCESSING_FAILURE, SUCCESS

LOG = logging.getLogger("modality_link.net.servers")

#: Transfer syntaxes the archive accepts, in our order of preference (docs/design.md
#: "Configuration defaults").
ARCHIVE_TRANSFER_SYNTAXES = [
    ExplicitVRLittleEndian,
    ImplicitVRLittleEndian,
    ExplicitVRBigEndian,
    DeflatedExplicitVRLittleEndian,
    JPEGLosslessSV1,
    JPEGLossless,  # Process 14 (any selection value): DCMTK dcmcjpeg +el writes it
    JPEGBaseline8Bit,
    JPEGExtended12Bit,
    JPEGLSLossless,
    JPEGLSNearLossless,
    JPEG2000Lossless,
    JPEG2000,
    RLELossless,
]

#: Transfer syntaxes of services whose data sets we decode (PS3.5 §10.1-10.3, A.5).
DECODED_TRANSFER_SYNTAXES = [
    ExplicitVRLittleEndian, ImplicitVRLittleEndian, DeflatedExplicitVRLittleEndian, ExplicitVRBigEndian,
]
VERIFICATION = "1.2.840.10008.1.1"
#: The Storage SOP classes both listening AEs accept (PS3.4 B.5): every one pynetdicom knows.
STORAGE_SOP_CLASSES = [str(cx.abstract_syntax) for cx in AllStoragePresentationContexts]


class EchoHandler:
    """Verification SCP (PS3.4 Annex A): C-ECHO-RQ -> success."""

    def sink(self, request: Request) -> DataSetSink:
        return Discard()

    def handle(self, request: Request, data: DataSetSink | None, reply: Reply) -> None:
        reply(SUCCESS, "", None, None)


T = TypeVar("T")


def finish_store(server: str, request: Request, finish: Callable[[], T], reply: Reply) -> T | None:
    """Complete a received C-STORE data set with `finish` (validate, keep); on a refusal answer
    its status (PS3.4 B.2.3) and log it, naming the peer, and return None. An unexpected fault is
    answered 0x0110 (processing failure) and logged with its traceback; the association goes on."""
    uid = request.affected_sop_instance[:64]
    try:
        return finish()
    except ArchiveError as exc:
        LOG.error("%s: C-STORE of %s from %s failed with status 0x%04X: %s", server, uid, request.peer,
                  exc.status, exc, extra={"status": exc.status})
        reply(exc.status, str(exc), None, None)
    except Exception as exc:
        LOG.exception("%s: C-STORE of %s from %s failed with status 0x0110", server, uid, request.peer,
                      extra={"status": PROCESSING_FAILURE})
        reply(PROCESSING_FAILURE, f"processing failure: {exc}", None, None)
    return None


class StoreHandler:
    """Storage SCP (PS3.4 Annex B): each data set streams into its archive file
    (:meth:`Archive.receive`); the response waits until that file is durable."""

    def __init__(self, server: "StorageServer") -> None:
        self.server = server

    def sink(self, request: Request) -> DataSetSink:
        return self.server.archive.receive(request.affected_sop_class, request.affected_sop_instance,
                                           request.transfer_syntax, request.peer.calling_ae)

    def handle(self, request: Request, data: DataSetSink | None, reply: Reply) -> None:
        server = self.server
        if not isinstance(data, IncomingInstance):  # a C-STORE-RQ announcing no data set
            reply(CANNOT_UNDERSTAND, "C-STORE-RQ without a data set", None, None)
            return
        rec = finish_store(server.name, request, data.finish, reply)
        if rec is None:
            return
        server.archive.index_later(rec, server.on_stored)
        audit.received(request.peer, rec)
        with server._count_lock:
            server.stored += 1
        reply(SUCCESS, "", None, None)


class StorageServer:
    """A Storage + Verification SCP (and Storage Commitment report receiver) on one acceptor
    that hands every received instance to `archive`."""

    def __init__(
        self,
        listener: Listener,
        timeouts: Timeouts,
        archive: Archive,
        on_stored: Callable[[InstanceRecord], None] | None = None,
        name: str = "disk server",
        on_report: Callable[[Report], None] | None = None,
        nodes: Callable[[], dict[str, Node]] | None = None,
    ) -> None:
        self.listener = listener
        self.archive = archive
        self.on_stored = on_stored
        self.name = name
        self.stored = 0
        self._count_lock = threading.Lock()
        services = [
            Service([VERIFICATION], DECODED_TRANSFER_SYNTAXES, {C_ECHO_RQ: EchoHandler()}),
            # requestor_scp: a C-GET requestor takes the SCP role to receive its sub-operations
            # (PS3.4 C.4.3.3, PS3.7 D.3.3.4)
            Service(STORAGE_SOP_CLASSES, ARCHIVE_TRANSFER_SYNTAXES, {C_STORE_RQ: StoreHandler(self)},
                    requestor_scp=nodes is not None),
        ]
        if nodes is not None:  # Query/Retrieve (PS3.4 Annex C), C-MOVE destinations from `nodes`
            services += qr_services(QrContext(archive, listener, timeouts, nodes))
        if on_report is not None:  # Storage Commitment reports on a new association (PS3.4 J.3.3)
            services.append(Service([STORAGE_COMMITMENT_PUSH], DECODED_TRANSFER_SYNTAXES,
                                    {N_EVENT_REPORT_RQ: ReportHandler(on_report)}, requestor_scp=True))
        self.acceptor = Acceptor(listener, timeouts, services, name, on_release=archive.wait_indexed)

    @property
    def port(self) -> int:
        return self.acceptor.port

    def start(self) -> None:
        self.acceptor.start()
        LOG.info(
            "%s %s listening on %s:%d",
            self.name,
            self.listener.ae_title,
            self.listener.bind_address or "*",
            self.port,
        )

    def stop(self) -> None:
        self.acceptor.stop()
        self.archive.wait_indexed()
