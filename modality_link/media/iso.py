"""ISO 9660 mastering with pycdlib (PS3.12 Annex F: 120 mm CD-R, ISO 9660 Level 1).

Files are streamed into the image: pycdlib keeps every file object given to
``add_fp`` until ``write``, so each file is handed over as a
:class:`LazyFile` that opens its source on the first read and closes it as
soon as it has been read to the end. At most one source file is open at any
time, whatever the number of instances (``ulimit -n`` is no limit), and
nothing but the replaced File Meta is held in memory.

File IDs map to ISO 9660 Level 1 identifiers (PS3.12 F.3.2): directories
``NAME``, files ``NAME.;1`` (no extension); at most 8 characters each, depth
at most 8. No Joliet, Rock Ridge, UDF or El Torito (no autorun).
"""

from __future__ import annotations

import hashlib
import io
import os
import re
import stat
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, BinaryIO, cast

import pycdlib

from modality_link.media.options import MediaError

if TYPE_CHECKING:
    from _typeshed import WriteableBuffer

SECTOR = 2048
_D_CHARS = re.compile(r"^[A-Z0-9_]{1,8}$")
_FILE_83 = re.compile(r"^[A-Z0-9_]{1,8}(\.[A-Z0-9_]{0,3})?$")


class LazyFile(io.RawIOBase):
    """Read-only file object: `head` bytes followed by `path` from `offset`.

    The source is opened on the first read that needs it and closed when the
    last byte has been read, so pycdlib may hold thousands of these. The
    SHA-256 of the content is accumulated while it is read sequentially.
    """

    def __init__(self, path: Path | None, head: bytes = b"", offset: int = 0, length: int | None = None) -> None:
        super().__init__()
        self.path = path
        self.head = head
        self.offset = offset
        tail = 0 if path is None else (os.stat(path).st_size - offset if length is None else length)
        self.length = len(head) + tail
        self._pos = 0
        self._fp: io.BufferedReader | None = None
        self._hash = hashlib.sha256()
        self._hashed = 0
        self._digest: str | None = None

    def readable(self) -> bool:
        return True

    def seekable(self) -> bool:
        return True

    def tell(self) -> int:
        return self._pos

    def seek(self, pos: int, whence: int = 0) -> int:
        if whence == 1:
            pos += self._pos
        elif whence == 2:
            pos += self.length
        if pos < 0:
            raise ValueError("negative seek position")
        self._pos = pos
        return pos

    def readinto(self, buffer: WriteableBuffer) -> int:
        view = memoryview(buffer).cast("B")
        data = self.read(len(view))
        view[: len(data)] = data
        return len(data)

    def read(self, size: int | None = -1) -> bytes:
        if size is None or size < 0:
            size = self.length - self._pos
        size = min(size, self.length - self._pos)
        if size <= 0:
            self._release()
            return b""
        out = b""
        nhead = len(self.head)
        if self._pos < nhead:
            out = self.head[self._pos : min(nhead, self._pos + size)]
        rest = size - len(out)
        if rest and self.path is not None:  # (without a path the content is `head` alone)
            if self._fp is None:
                self._fp = open(self.path, "rb")
            src = self.offset + self._pos + len(out) - nhead
            if self._fp.tell() != src:
                self._fp.seek(src)
            out += self._fp.read(rest)
        start = self._pos
        self._pos += len(out)
        if start == self._hashed:  # sequential read: extend the digest
            self._hash.update(out)
            self._hashed = self._pos
        if self._pos >= self.length or len(out) < size:
            self._release()
        return out

    def _release(self) -> None:
        if self._fp is not None:
            self._fp.close()
            self._fp = None

    def close(self) -> None:
        self._release()
        super().close()

    @property
    def sha256(self) -> str:
        """Hex SHA-256 of the whole content (re-reads it if it was not read in order)."""
        if self._hashed != self.length:
            self._hash, self._hashed = hashlib.sha256(), 0
            self._pos = 0
            while self.read(1 << 20):
                pass
        if self._digest is None:
            self._digest = self._hash.hexdigest()
        return self._digest


@dataclass
class IsoFile:
    """One file of the image: its components and its content."""

    components: tuple[str, ...]
    content: LazyFile


def check_level1(components: Sequence[str], is_file: bool = True) -> None:
    """Raise :class:`MediaError` unless `components` is an ISO 9660 Level 1 path."""
    if len(components) > 8:
        raise MediaError(f"{'/'.join(components)}: deeper than 8 levels")
    dirs = components[:-1] if is_file else components
    for name in dirs:
        if not _D_CHARS.match(name):
            raise MediaError(f"{name!r} is not an ISO 9660 Level 1 directory name")
    if is_file and not _FILE_83.match(components[-1]):
        raise MediaError(f"{components[-1]!r} is not an ISO 9660 Level 1 file name")


def iso_path(components: Sequence[str]) -> str:
    """ISO 9660 path of a file: ``/A/B/NAME.;1`` or ``/A/NAME.EXT;1``."""
    name = components[-1]
    if "." not in name:
        name += "."
    return "/" + "/".join((*components[:-1], name)) + ";1"


def open_image(path: Path) -> BinaryIO:
    """`path` opened for writing as a new or emptied regular file (mode 0600): never through a
    symbolic link, never a FIFO or a device (an :class:`OSError` then names it)."""
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC, 0o600)
    try:
        if not stat.S_ISREG(os.fstat(fd).st_mode):
            raise IsADirectoryError(f"{path} is not a regular file")
        os.ftruncate(fd, 0)
        return os.fdopen(fd, "wb")
    except BaseException:
        os.close(fd)
        raise


def write_iso(
    files: Sequence[IsoFile],
    iso_file: Path,
    volume_id: str,
    set_size: int = 1,
    seqnum: int = 1,
    application: str = "",
    progress: Callable[[int, int], None] | None = None,
) -> dict[tuple[str, ...], str]:
    """Master `files` into the ISO 9660 Level 1 image `iso_file`.

    Returns the SHA-256 of each file, computed while it was streamed.
    """
    iso = pycdlib.PyCdlib()
    iso.new(
        interchange_level=1,
        vol_ident=volume_id,
        set_size=set_size,
        seqnum=seqnum,
        app_ident_str=application[:128],
    )
    try:
        made: set[tuple[str, ...]] = set()
        # Adding in sorted order keeps pycdlib's directory bookkeeping linear.
        for f in sorted(files, key=lambda f: f.components):
            check_level1(f.components)
            for depth in range(1, len(f.components)):
                parent = f.components[:depth]
                if parent not in made:
                    iso.add_directory("/" + "/".join(parent))
                    made.add(parent)
            # pycdlib annotates BinaryIO; it only reads, seeks and tells
            iso.add_fp(cast(BinaryIO, f.content), f.content.length, iso_path=iso_path(f.components))

        def cb(done: int, total: int, opaque: object) -> None:
            if progress is not None:
                progress(done, total)

        with open_image(iso_file) as out:
            iso.write_fp(out, blocksize=1 << 20, progress_cb=cb if progress else None)
    finally:
        iso.close()
        for f in files:
            f.content.close()
    return {f.components: f.content.sha256 for f in files}


# ---------------------------------------------------------------------------
# Size of an image, for disc spanning
# ---------------------------------------------------------------------------

#: System Area (16), Primary Volume Descriptor, Terminator and pycdlib's
#: version descriptor sectors.
_FIXED_SECTORS = 16 + 3


def record_length(identifier: str) -> int:
    """Length of an ISO 9660 Directory Record (ECMA-119 9.1) for `identifier`."""
    n = len(identifier)
    return 33 + n + (1 - n % 2)


def directory_sectors(record_lengths: Iterable[int]) -> int:
    """Sectors of a directory holding records of `record_lengths` (plus . and ..).

    A record never crosses a sector boundary (ECMA-119 6.8.1.1).
    """
    sectors, used = 1, 68
    for n in record_lengths:
        if used + n > SECTOR:
            sectors += 1
            used = 0
        used += n
    return sectors


def uniform_directory_sectors(count: int, length: int, other: Iterable[int] = ()) -> int:
    """:func:`directory_sectors` for `count` records of the same `length`, in O(1)."""
    sectors = directory_sectors(other)
    per_sector = SECTOR // length
    return sectors + (count + per_sector - 1) // per_sector  # upper bound: new sectors only


def path_table_sectors(directory_names: Iterable[str]) -> int:
    """Sectors of one Path Table (ECMA-119 9.4) for the root and `directory_names`."""
    size = 10 + sum(8 + len(n) + len(n) % 2 for n in directory_names)
    return (size + SECTOR - 1) // SECTOR


def estimate_iso_bytes(directory_sectors_total: int, path_table: int, file_bytes: Iterable[int]) -> int:
    """Upper bound of the image size: fixed area, four Path Tables (L, optional
    L, M, optional M, each rounded to a sector and then to 2 sectors as pycdlib
    does), the directories and every file rounded up to whole sectors."""
    tables = 4 * max(2, path_table + path_table % 2)
    data = sum((n + SECTOR - 1) // SECTOR for n in file_bytes)
    return (_FIXED_SECTORS + tables + directory_sectors_total + data) * SECTOR
