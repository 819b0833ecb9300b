"""Discovery of optical drives and media-change events through udev.

The udev database is reached through a *probe*:

* :class:`UdevProbe` asks the real udev database with :mod:`pyudev`;
* :class:`RecordedProbe` serves recorded property dictionaries (tests, demo)
  and can replay recorded events.

Both return :class:`DeviceRecord` objects; :func:`find_optical_drives` turns
them into :class:`DriveSnapshot` objects (identity, capabilities and media as
udev's ``cdrom_id`` sees them), ignoring every block device that is not an
optical drive.

The udev properties used are those set by ``cdrom_id``: ``ID_CDROM`` and the
drive capability flags ``ID_CDROM_CD_R``, ``ID_CDROM_DVD_R`` ...; for the
medium ``ID_CDROM_MEDIA``, ``ID_CDROM_MEDIA_STATE`` (blank, appendable,
complete), ``ID_CDROM_MEDIA_CD_R`` ..., ``ID_CDROM_MEDIA_SESSION_COUNT`` and
``ID_CDROM_MEDIA_TRACK_COUNT``; for the identity ``DEVNAME``, ``ID_VENDOR``,
``ID_MODEL``, ``ID_REVISION`` and ``ID_SERIAL_SHORT``; the ``size`` sysfs
attribute (in 512-byte sectors) gives the recorded size of a closed medium.
"""

from __future__ import annotations

import threading
from dataclasses import dataclass, field
from typing import Any, Callable, Iterable, Mapping, Optional, Protocol, Union

from hw.drive import (
    BD_R, BD_RE, CD_R, CD_RW, DVD_PLUS_R, DVD_PLUS_R_DL, DVD_PLUS_RW, DVD_R,
    DVD_R_DL, DVD_RAM, DVD_RW, STATE_APPENDABLE, STATE_BLANK, STATE_COMPLETE,
    DriveInfo, MediaInfo,
)

__all__ = [
    "DeviceRecord", "DriveSnapshot", "MediaEvent", "MonitorHandle", "Probe",
    "UdevProbe", "RecordedProbe",
    "is_optical", "drive_info_from_properties", "capabilities_from_properties",
    "media_from_record", "snapshot_from_record", "find_optical_drives",
    "media_event_from_record",
]

#: Drive capability flags (``cdrom_id``) -> writable media kind.
CAPABILITY_FLAGS: tuple[tuple[str, str], ...] = (
    ("ID_CDROM_CD_R", CD_R),
    ("ID_CDROM_CD_RW", CD_RW),
    ("ID_CDROM_DVD_R", DVD_R),
    ("ID_CDROM_DVD_RW", DVD_RW),
    ("ID_CDROM_DVD_R_DL", DVD_R_DL),
    ("ID_CDROM_DVD_PLUS_R", DVD_PLUS_R),
    ("ID_CDROM_DVD_PLUS_RW", DVD_PLUS_RW),
    ("ID_CDROM_DVD_PLUS_R_DL", DVD_PLUS_R_DL),
    ("ID_CDROM_DVD_RAM", DVD_RAM),
    ("ID_CDROM_BD_R", BD_R),
    ("ID_CDROM_BD_RE", BD_RE),
)

#: Media flags (``cdrom_id``) -> media kind, most specific first.
MEDIA_FLAGS: tuple[tuple[str, str], ...] = (
    ("ID_CDROM_MEDIA_BD_RE", BD_RE),
    ("ID_CDROM_MEDIA_BD_R", BD_R),
    ("ID_CDROM_MEDIA_BD", "BD-ROM"),
    ("ID_CDROM_MEDIA_DVD_PLUS_R_DL", DVD_PLUS_R_DL),
    ("ID_CDROM_MEDIA_DVD_PLUS_RW_DL", "DVD+RW DL"),
    ("ID_CDROM_MEDIA_DVD_PLUS_RW", DVD_PLUS_RW),
    ("ID_CDROM_MEDIA_DVD_PLUS_R", DVD_PLUS_R),
    ("ID_CDROM_MEDIA_DVD_RW_RO", DVD_RW),
    ("ID_CDROM_MEDIA_DVD_RW_SEQ", DVD_RW),
    ("ID_CDROM_MEDIA_DVD_RW", DVD_RW),
    ("ID_CDROM_MEDIA_DVD_R_DL", DVD_R_DL),
    ("ID_CDROM_MEDIA_DVD_R", DVD_R),
    ("ID_CDROM_MEDIA_DVD_RAM", DVD_RAM),
    ("ID_CDROM_MEDIA_DVD", "DVD-ROM"),
    ("ID_CDROM_MEDIA_HDDVD", "HD DVD-ROM"),
    ("ID_CDROM_MEDIA_CD_RW", CD_RW),
    ("ID_CDROM_MEDIA_CD_R", CD_R),
    ("ID_CDROM_MEDIA_CD", "CD-ROM"),
)

_STATES = {"blank": STATE_BLANK, "appendable": STATE_APPENDABLE, "complete": STATE_COMPLETE}


@dataclass(frozen=True)
class DeviceRecord:
    """One block device as udev describes it.

    ``properties`` are the udev properties (``udevadm info --query=property``);
    ``attributes`` holds the sysfs attributes we use (only ``size``, in
    512-byte sectors).
    """

    properties: Mapping[str, str]
    attributes: Mapping[str, str] = field(default_factory=dict)

    @property
    def device(self) -> str:
        """The device node (``DEVNAME``), or ``""``."""
        return self.properties.get("DEVNAME", "")


@dataclass(frozen=True)
class DriveSnapshot:
    """An optical drive and its medium, as udev saw them at one moment."""

    info: DriveInfo
    capabilities: frozenset[str]
    media: MediaInfo


@dataclass(frozen=True)
class MediaEvent:
    """A medium was inserted, removed or changed in a drive."""

    action: str
    drive: DriveSnapshot


class MonitorHandle(Protocol):
    """Returned by :meth:`Probe.monitor`; ``stop()`` ends the monitoring."""

    def stop(self) -> None:
        """Stop delivering events."""
        ...


class Probe(Protocol):
    """A source of udev device records and media-change events."""

    def records(self) -> list[DeviceRecord]:
        """Block devices (at least all optical drives) known to udev."""
        ...

    def monitor(self, callback: Callable[[MediaEvent], None]) -> MonitorHandle:
        """Call *callback* for every media change until the handle is stopped."""
        ...


# Parsing ---------------------------------------------------------------------


def _flag(properties: Mapping[str, str], name: str) -> bool:
    return properties.get(name, "0") == "1"


def _int_or_none(value: Optional[str]) -> Optional[int]:
    try:
        return int(value) if value is not None else None
    except ValueError:
        return None


def is_optical(properties: Mapping[str, str]) -> bool:
    """``True`` for an optical drive's whole-disk device (``ID_CDROM=1``)."""
    return _flag(properties, "ID_CDROM") and properties.get("DEVTYPE", "disk") == "disk"


def drive_info_from_properties(properties: Mapping[str, str]) -> DriveInfo:
    """The :class:`DriveInfo` described by udev properties."""
    def text(name: str) -> str:
        return properties.get(name, "").replace("_", " ").strip()

    return DriveInfo(
        device=properties.get("DEVNAME", ""),
        vendor=text("ID_VENDOR"),
        model=text("ID_MODEL"),
        revision=properties.get("ID_REVISION") or None,
        serial=properties.get("ID_SERIAL_SHORT") or None,
    )


def capabilities_from_properties(properties: Mapping[str, str]) -> frozenset[str]:
    """The media kinds the drive can write, from ``ID_CDROM_*`` flags."""
    return frozenset(kind for name, kind in CAPABILITY_FLAGS if _flag(properties, name))


def media_from_record(record: DeviceRecord) -> MediaInfo:
    """The :class:`MediaInfo` described by a record.

    Capacity is known from udev only for a closed medium (the block device's
    ``size``); otherwise it is ``None`` and a burner backend must be asked.
    """
    properties = record.properties
    if not _flag(properties, "ID_CDROM_MEDIA"):
        return MediaInfo.absent()
    kind = next((kind for name, kind in MEDIA_FLAGS if _flag(properties, name)), None)
    # A medium without a state (pressed discs) cannot be written: complete.
    state = _STATES.get(properties.get("ID_CDROM_MEDIA_STATE", ""), STATE_COMPLETE)
    size_sectors = _int_or_none(record.attributes.get("size"))
    capacity = free = None
    if state == STATE_COMPLETE and size_sectors:
        capacity, free = size_sectors * 512, 0
    return MediaInfo(
        present=True,
        kind=kind,
        state=state,
        capacity_bytes=capacity,
        free_bytes=free,
        sessions=_int_or_none(properties.get("ID_CDROM_MEDIA_SESSION_COUNT")),
        track_count=_int_or_none(properties.get("ID_CDROM_MEDIA_TRACK_COUNT")),
    )


def snapshot_from_record(record: DeviceRecord) -> DriveSnapshot:
    """Parse one optical drive record."""
    return DriveSnapshot(
        info=drive_info_from_properties(record.properties),
        capabilities=capabilities_from_properties(record.properties),
        media=media_from_record(record),
    )


def find_optical_drives(probe: Probe) -> list[DriveSnapshot]:
    """All optical drives the probe knows, sorted by device name."""
    drives = [snapshot_from_record(record) for record in probe.records()
              if is_optical(record.properties)]
    return sorted(drives, key=lambda drive: drive.info.device)


def media_event_from_record(action: str, record: DeviceRecord) -> Optional[MediaEvent]:
    """A :class:`MediaEvent` if this udev event is a media change of an optical drive.

    Media changes are ``change`` events carrying ``DISK_MEDIA_CHANGE=1``
    (also ``DISK_EJECT_REQUEST=1``, sent when the eject button is pressed).
    """
    properties = record.properties
    if action != "change" or not is_optical(properties):
        return None
    if not (_flag(properties, "DISK_MEDIA_CHANGE") or _flag(properties, "DISK_EJECT_REQUEST")):
        return None
    return MediaEvent(action=action, drive=snapshot_from_record(record))


# The real probe --------------------------------------------------------------


class _ObserverHandle:
    """Stops a :class:`pyudev.MonitorObserver`."""

    def __init__(self, observer: Any) -> None:
        self._observer = observer

    def stop(self) -> None:
        self._observer.stop()


class UdevProbe:
    """The real udev database, through :mod:`pyudev`.

    Works without any optical drive (lists nothing) and without a running
    udev daemon (then no events arrive).
    """

    def __init__(self, context: Any = None) -> None:
        import pyudev  # imported here so that the recorded probe works without it

        self._pyudev = pyudev
        self._context = context if context is not None else pyudev.Context()

    def _record(self, device: Any) -> DeviceRecord:
        attributes: dict[str, str] = {}
        try:
            attributes["size"] = device.attributes.asstring("size")
        except (KeyError, UnicodeDecodeError, OSError):
            pass
        return DeviceRecord(properties=dict(device.properties), attributes=attributes)

    def records(self) -> list[DeviceRecord]:
        """The optical drives' block devices (``subsystem=block``, ``ID_CDROM=1``)."""
        devices = self._context.list_devices(subsystem="block").match_property("ID_CDROM", "1")
        return [self._record(device) for device in devices]

    def monitor(self, callback: Callable[[MediaEvent], None]) -> MonitorHandle:
        """Watch netlink for media changes; *callback* runs in a background thread."""
        monitor = self._pyudev.Monitor.from_netlink(self._context)
        monitor.filter_by(subsystem="block")

        def handle(device: Any) -> None:
            event = media_event_from_record(device.action or "", self._record(device))
            if event is not None:
                callback(event)

        observer = self._pyudev.MonitorObserver(monitor, callback=handle, name="hw-udev-monitor")
        observer.daemon = True
        observer.start()
        return _ObserverHandle(observer)


# The recorded probe ----------------------------------------------------------

RecordLike = Union[DeviceRecord, Mapping[str, str]]


def _as_record(item: RecordLike) -> DeviceRecord:
    return item if isinstance(item, DeviceRecord) else DeviceRecord(properties=dict(item))


class _RecordedHandle:
    def __init__(self, probe: "RecordedProbe", callback: Callable[[MediaEvent], None]) -> None:
        self._probe = probe
        self._callback = callback

    def stop(self) -> None:
        self._probe._unsubscribe(self._callback)


class RecordedProbe:
    """A probe serving recorded udev data.

    Parameters
    ----------
    records:
        Recorded devices: :class:`DeviceRecord` objects or plain property
        dicts.
    events:
        Recorded events as ``(action, record)`` pairs, delivered by
        :meth:`replay`.  Replaying a ``change`` event also updates the stored
        record of that device, so :meth:`records` then shows the new medium.
    """

    def __init__(self, records: Iterable[RecordLike] = (),
                 events: Iterable[tuple[str, RecordLike]] = ()) -> None:
        self._records = [_as_record(item) for item in records]
        self._events = [(action, _as_record(item)) for action, item in events]
        self._callbacks: list[Callable[[MediaEvent], None]] = []
        self._lock = threading.Lock()

    def records(self) -> list[DeviceRecord]:
        """The recorded devices (as updated by replayed events)."""
        with self._lock:
            return list(self._records)

    def monitor(self, callback: Callable[[MediaEvent], None]) -> MonitorHandle:
        """Register *callback* for events delivered by :meth:`replay`."""
        with self._lock:
            self._callbacks.append(callback)
        return _RecordedHandle(self, callback)

    def _unsubscribe(self, callback: Callable[[MediaEvent], None]) -> None:
        with self._lock:
            if callback in self._callbacks:
                self._callbacks.remove(callback)

    def replay(self) -> int:
        """Deliver the recorded events in order; return how many were media events."""
        delivered = 0
        for action, record in self._events:
            with self._lock:
                if action == "change":
                    self._records = [record if old.device == record.device else old
                                     for old in self._records]
                callbacks = list(self._callbacks)
            event = media_event_from_record(action, record)
            if event is None:
                continue
            delivered += 1
            for callback in callbacks:
                callback(event)
        return delivered
