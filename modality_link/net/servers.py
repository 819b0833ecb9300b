"""Listening AEs: the disk server (Storage SCP into the archive) with Verification SCP.

Storage Service Class SCP, PS3.4 Annex B; Verification SCP, PS3.4 Annex A.

Datasets are received in chunks straight to a temporary file (pynetdicom's
``STORE_RECV_CHUNKED_DATASET``) and copied into the archive without being decoded; only their
header is parsed to index them. A dataset that cannot be parsed, is truncated, or whose UIDs are
invalid is refused with a failure status and one log line, and nothing of it enters the archive.
"""

from __future__ import annotations

import logging
import threading
from typing import Callable

from pydicom.dataset import Dataset
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
from pynetdicom import evt
from pynetdicom.presentation import AllStoragePresentationContexts
from pynetdicom.sop_class import Verification
from pynetdicom.transport import ThreadedAssociationServer

from modality_link.archive import Archive, ArchiveError
from modality_link.config import Listener, Timeouts
from modality_link.db import InstanceRecord
from modality_link.net.association import COMMON_HANDLERS, describe_reject, make_ae, peer_of

LOG = logging.getLogger("modality_link.net.servers")

#: Transfer syntaxes the archive accepts, in our order of preference (REQUIREMENTS A11).
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

STATUS_PROCESSING_FAILURE = 0x0110


def _status(code: int, comment: str) -> Dataset:
    """A status dataset with an Error Comment (0000,0902), at most 64 characters (VR LO)."""
    ds = Dataset()
    ds.Status = code
    ds.ErrorComment = comment[:64]
    return ds


class StorageServer:
    """A Storage + Verification SCP that hands every received instance to `archive`."""

    def __init__(
        self,
        listener: Listener,
        timeouts: Timeouts,
        archive: Archive,
        on_stored: Callable[[InstanceRecord], None] | None = None,
        name: str = "disk server",
        on_event_report: Callable[[evt.Event], object] | None = None,
    ) -> None:
        self.listener = listener
        self.archive = archive
        self.on_stored = on_stored
        self.name = name
        self.ae = make_ae(listener.ae_title, timeouts, listener.max_pdu)
        self.ae.maximum_associations = listener.max_associations
        self.ae.require_called_aet = listener.require_called_aet
        self.ae.require_calling_aet = list(listener.allowed_calling_aets)
        self.ae.add_supported_context(Verification)
        for cx in AllStoragePresentationContexts:
            self.ae.add_supported_context(cx.abstract_syntax, ARCHIVE_TRANSFER_SYNTAXES)
        #: EVT_N_EVENT_REPORT handler for Storage Commitment reports on a new association (E5).
        self.on_event_report = on_event_report
        if on_event_report is not None:
            from modality_link.net.commitment import accept_reports

            accept_reports(self.ae)
        self._server: ThreadedAssociationServer | None = None
        self.stored = 0
        self._count_lock = threading.Lock()

    @property
    def port(self) -> int:
        assert self._server is not None
        return int(self._server.server_address[1])

    def start(self) -> None:
        handlers = [
            *COMMON_HANDLERS,
            (evt.EVT_C_STORE, self._on_store),
            (evt.EVT_C_ECHO, self._on_echo),
            (evt.EVT_REJECTED, self._on_rejected),
            (evt.EVT_ABORTED, self._on_aborted),
        ]
        if self.on_event_report is not None:
            handlers.append((evt.EVT_N_EVENT_REPORT, self.on_event_report))
        address = (self.listener.bind_address, self.listener.port)
        self._server = self.ae.start_server(address, block=False, evt_handlers=handlers)
        LOG.info(
            "%s %s listening on %s:%d",
            self.name,
            self.listener.ae_title,
            self.listener.bind_address or "*",
            self.port,
        )

    def stop(self) -> None:
        if self._server is not None:
            self._server.shutdown()
            self._server = None

    # -- handlers -------------------------------------------------------------------------------

    def _on_echo(self, event: evt.Event) -> int:
        return 0x0000

    def _on_rejected(self, event: evt.Event) -> None:
        prim = event.assoc.acceptor.primitive
        why = describe_reject(prim) if prim is not None else "rejected"
        LOG.warning("%s: association from %s refused: %s", self.name, peer_of(event.assoc), why)

    def _on_aborted(self, event: evt.Event) -> None:
        LOG.warning("%s: association from %s aborted", self.name, peer_of(event.assoc))

    def _on_store(self, event: evt.Event) -> int | Dataset:
        peer = peer_of(event.assoc)
        calling = event.assoc.requestor.ae_title.strip()
        uid = str(event.request.AffectedSOPInstanceUID)
        try:
            rec = self.archive.store_part10(event.dataset_path, calling, expected_uid=uid)
        except ArchiveError as exc:
            LOG.error(
                "%s: C-STORE of %s from %s failed with status 0x%04X: %s",
                self.name, uid[:64], peer, exc.status, exc,
            )
            return _status(exc.status, str(exc))
        except Exception as exc:  # an unexpected fault: answer, log, keep the association
            LOG.exception("%s: C-STORE of %s from %s failed with status 0x0110", self.name, uid[:64], peer)
            return _status(STATUS_PROCESSING_FAILURE, f"processing failure: {exc}")
        with self._count_lock:
            self.stored += 1
        if self.on_stored is not None:
            self.on_stored(rec)
        return 0x0000

