"""The memory server: a Storage SCP (PS3.4 Annex B) with Verification (Annex A) into RAM.

Its own AE title and port (``[memory_server]``). Each data set streams, as it arrives, into an
anonymous memory file behind a File Meta group built from the C-STORE-RQ, exactly as the disk
server writes its archive files; it is checked by
the archive's own validation (complete, the File Meta's UIDs are the data set's, valid UIDs) and
then kept in the :class:`~modality_link.memory.MemoryCache`. Nothing reaches the archive, the
index or the disk. A data set larger than the whole cache is refused with 0xA700 (Out of
Resources, PS3.4 B.2.3) as soon as it outgrows it.
"""

from __future__ import annotations

import logging
import mmap
import os
import threading
from dataclasses import replace
from io import BytesIO
from typing import Callable

from modality_link import audit
from modality_link.archive import ArchiveError, CannotUnderstand, header_record, header_uid, lean_header, pydicom_record
from modality_link.config import Listener, Timeouts
from modality_link.fileformat import encode_file_meta
from modality_link.memory import CachedInstance, MemoryCache
from modality_link.net.acceptor import C_ECHO_RQ, C_STORE_RQ, Acceptor, DataSetSink, Reply, Request, Service
from modality_link.net.servers import (
    ARCHIVE_TRANSFER_SYNTAXES,
    DECODED_TRANSFER_SYNTAXES,
    STORAGE_SOP_CLASSES,
    VERIFICATION,
    EchoHandler,
    finish_store,
)
from modality_link.net.status import CANNOT_UNDERSTAND, OUT_OF_RESOURCES, SUCCESS

LOG = logging.getLogger("modality_link.net.memory_server")


class OutOfMemory(ArchiveError):
    status = OUT_OF_RESOURCES


#: Smaller instances are kept as ``bytes``; larger ones stay in their memory file, mapped.
MAPPED_FROM = 64 << 10


class IncomingMemoryInstance:
    """A C-STORE data set being received into an anonymous memory file (memfd_create(2): RAM,
    no name on any file system), behind its File Meta group.

    The file's pages are given by the kernel as it writes them, as a RAM folder's are; the
    complete file is then mapped read-only and its descriptor closed, so the cache holds the
    pages themselves and no file descriptor."""

    def __init__(self, cache: MemoryCache, sop_class: str, sop_instance: str, transfer_syntax: str,
                 source_ae: str) -> None:
        self.cache = cache
        self.source_ae = source_ae
        self.error: ArchiveError | None = None
        self._fd = os.memfd_create("modality-link-memory", os.MFD_CLOEXEC)
        self._size = 0
        self.write(encode_file_meta(sop_class, sop_instance, transfer_syntax, source_ae))

    def write(self, data: bytes | memoryview) -> None:
        """Append a fragment; past the cache's whole budget (or when RAM runs out) the rest is
        dropped and :meth:`finish` refuses the instance."""
        if self._fd < 0:
            return
        self._size += len(data)
        if not self.cache.fits(self._size):
            self.error = OutOfMemory(f"the data set is larger than the whole memory cache "
                                     f"({self.cache.budget >> 20} MiB, memory_server.cache_mb)")
            self.discard()
            return
        view = memoryview(data)
        try:
            while view:
                view = view[os.write(self._fd, view):]
        except OSError as exc:
            self.error = OutOfMemory(f"no memory left for the data set: {exc.strerror}")
            self.discard()

    def discard(self) -> None:
        if self._fd >= 0:
            os.close(self._fd)
            self._fd = -1

    def finish(self) -> CachedInstance:
        """Validate the complete data set and return it for the cache; raise
        :class:`ArchiveError` (nothing kept) when it is refused.

        Only the validation is done here, before the response: the text of the index attributes
        is decoded when first asked for (:attr:`CachedInstance.record`, docs/design.md "The memory
        server")."""
        if self.error is not None or self._fd < 0:
            self.discard()
            raise self.error or CannotUnderstand("the data set was discarded")
        try:
            data: bytes | mmap.mmap = os.pread(self._fd, self._size, 0) if self._size < MAPPED_FROM \
                else mmap.mmap(self._fd, self._size, prot=mmap.PROT_READ)
        finally:
            self.discard()
        header = lean_header(data if isinstance(data, mmap.mmap) else BytesIO(data))
        if header is None:  # irregular, Big Endian, Deflated...: pydicom reads it, or says why not
            rec = pydicom_record(data if isinstance(data, bytes) else data[:], self.source_ae)
            return CachedInstance(data, rec.sop_instance_uid, replace(rec, size=len(data)))
        source_ae, size = self.source_ae, len(data)
        return CachedInstance(data, str(header_uid(header, "SOPInstanceUID")),
                              lambda: replace(header_record(header, source_ae), size=size))


class MemoryStoreHandler:
    """Storage SCP into the memory cache; the response follows the cache's update."""

    def __init__(self, server: MemoryServer) -> None:
        self.server = server

    def sink(self, request: Request) -> DataSetSink:
        return IncomingMemoryInstance(self.server.cache, request.affected_sop_class, request.affected_sop_instance,
                                      request.transfer_syntax, request.peer.calling_ae)

    def handle(self, request: Request, data: DataSetSink | None, reply: Reply) -> None:
        server = self.server
        if not isinstance(data, IncomingMemoryInstance):
            reply(CANNOT_UNDERSTAND, "C-STORE-RQ without a data set", None, None)
            return
        item = finish_store("memory server", request, data.finish, reply)
        if item is None:
            return
        evicted = server.cache.put(item)
        audit.received(request.peer, lambda: item.record)  # decoded when the association ends
        if evicted:
            LOG.info("memory server: %d instance(s) evicted (least recently used) for %s",
                     len(evicted), request.affected_sop_instance[:64])
        with server._count_lock:
            server.stored += 1
        reply(SUCCESS, "", None, None)
        if server.on_stored is not None:
            server.on_stored(item)


class MemoryServer:
    """Storage + Verification SCP on its own acceptor, into `cache`."""

    def __init__(
        self,
        listener: Listener,
        timeouts: Timeouts,
        cache: MemoryCache,
        on_stored: Callable[[CachedInstance], None] | None = None,
    ) -> None:
        self.listener = listener
        self.cache = cache
        self.on_stored = on_stored
        self.stored = 0
        self._count_lock = threading.Lock()
        services = [
            Service([VERIFICATION], DECODED_TRANSFER_SYNTAXES, {C_ECHO_RQ: EchoHandler()}),
            Service(STORAGE_SOP_CLASSES, ARCHIVE_TRANSFER_SYNTAXES, {C_STORE_RQ: MemoryStoreHandler(self)}),
        ]
        self.acceptor = Acceptor(listener, timeouts, services, "memory server")

    @property
    def port(self) -> int:
        return self.acceptor.port

    def start(self) -> None:
        self.acceptor.start()
        LOG.info("memory server %s listening on %s:%d (cache %d MiB)", self.listener.ae_title,
                 self.listener.bind_address or "*", self.port, self.cache.budget >> 20)

    def stop(self) -> None:
        self.acceptor.stop()
