"""Drive discovery from udev: recorded data, event replay, and the real probe."""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import hw
from hw.drive import BD_R, CD_R, CD_RW, DVD_PLUS_R, DVD_R, DVD_RW
from hw.udev import (
    DeviceRecord, RecordedProbe, UdevProbe, capabilities_from_properties,
    find_optical_drives, media_event_from_record,
)

# Recorded with `udevadm info --query=property` (serials and paths altered).

#: Internal SATA burner with a blank CD-R.
SR0_BLANK_CD_R = {
    "DEVPATH": "/devices/pci0000:00/0000:00:17.0/ata2/host1/target1:0:0/1:0:0:0/block/sr0",
    "DEVNAME": "/dev/sr0", "DEVTYPE": "disk", "DISKSEQ": "12", "MAJOR": "11", "MINOR": "0",
    "SUBSYSTEM": "block", "USEC_INITIALIZED": "5102933",
    "ID_CDROM": "1", "SYSTEMD_MOUNT_DEVICE_BOUND": "1",
    "ID_CDROM_CD": "1", "ID_CDROM_CD_R": "1", "ID_CDROM_CD_RW": "1",
    "ID_CDROM_DVD": "1", "ID_CDROM_DVD_R": "1", "ID_CDROM_DVD_RW": "1",
    "ID_CDROM_DVD_RAM": "1", "ID_CDROM_DVD_PLUS_R": "1", "ID_CDROM_DVD_PLUS_RW": "1",
    "ID_CDROM_DVD_PLUS_R_DL": "1", "ID_CDROM_MRW": "1", "ID_CDROM_MRW_W": "1",
    "ID_CDROM_MEDIA": "1", "ID_CDROM_MEDIA_CD_R": "1", "ID_CDROM_MEDIA_STATE": "blank",
    "ID_CDROM_MEDIA_SESSION_COUNT": "1", "ID_CDROM_MEDIA_TRACK_COUNT": "1",
    "ID_ATA": "1", "ID_TYPE": "cd", "ID_BUS": "ata",
    "ID_MODEL": "HL-DT-ST_DVDRAM_GH24NSD1", "ID_MODEL_ENC": "HL-DT-ST\\x20DVDRAM\\x20GH24NSD1\\x20\\x20",
    "ID_REVISION": "LG00", "ID_SERIAL": "HL-DT-ST_DVDRAM_GH24NSD1_K1RF7KL0001",
    "ID_SERIAL_SHORT": "K1RF7KL0001", "ID_PATH": "pci-0000:00:17.0-ata-2",
    "ID_PATH_TAG": "pci-0000_00_17_0-ata-2", "TAGS": ":systemd:uaccess:seat:",
}

#: USB BD burner with a closed (complete) DVD holding an ISO 9660 file system.
SR1_COMPLETE_DVD = {
    "DEVPATH": "/devices/pci0000:00/0000:00:14.0/usb2/2-3/2-3:1.0/host6/target6:0:0/6:0:0:0/block/sr1",
    "DEVNAME": "/dev/sr1", "DEVTYPE": "disk", "DISKSEQ": "19", "MAJOR": "11", "MINOR": "1",
    "SUBSYSTEM": "block", "ID_CDROM": "1",
    "ID_CDROM_CD": "1", "ID_CDROM_CD_R": "1", "ID_CDROM_CD_RW": "1",
    "ID_CDROM_DVD": "1", "ID_CDROM_DVD_R": "1", "ID_CDROM_DVD_RW": "1",
    "ID_CDROM_DVD_PLUS_R": "1", "ID_CDROM_DVD_PLUS_RW": "1",
    "ID_CDROM_BD": "1", "ID_CDROM_BD_R": "1", "ID_CDROM_BD_RE": "1",
    "ID_CDROM_MEDIA": "1", "ID_CDROM_MEDIA_DVD": "1", "ID_CDROM_MEDIA_STATE": "complete",
    "ID_CDROM_MEDIA_SESSION_COUNT": "1", "ID_CDROM_MEDIA_TRACK_COUNT": "1",
    "ID_CDROM_MEDIA_TRACK_COUNT_DATA": "1",
    "ID_FS_TYPE": "iso9660", "ID_FS_LABEL": "PATIENT_CD", "ID_FS_USAGE": "filesystem",
    "ID_VENDOR": "ASUS", "ID_VENDOR_ENC": "ASUS\\x20\\x20\\x20\\x20", "ID_MODEL": "BW-16D1X-U",
    "ID_REVISION": "A201", "ID_SERIAL": "ASUS_BW-16D1X-U_E3D0CL012345-0:0",
    "ID_SERIAL_SHORT": "E3D0CL012345", "ID_TYPE": "cd", "ID_BUS": "usb", "ID_USB_DRIVER": "usb-storage",
}
SR1_SIZE_SECTORS = "8388608"  # 4 GiB recorded

#: Laptop-style drive, tray closed, no disc.
SR2_NO_MEDIUM = {
    "DEVPATH": "/devices/pci0000:00/0000:00:1f.2/ata4/host3/target3:0:0/3:0:0:0/block/sr2",
    "DEVNAME": "/dev/sr2", "DEVTYPE": "disk", "MAJOR": "11", "MINOR": "2", "SUBSYSTEM": "block",
    "ID_CDROM": "1", "ID_CDROM_CD": "1", "ID_CDROM_CD_R": "1", "ID_CDROM_CD_RW": "1",
    "ID_CDROM_DVD": "1", "ID_CDROM_DVD_R": "1", "ID_CDROM_DVD_RW": "1",
    "ID_CDROM_DVD_PLUS_R": "1", "ID_CDROM_DVD_PLUS_RW": "1",
    "ID_MODEL": "TSSTcorp_CDDVDW_SN-208FB", "ID_REVISION": "TS02", "ID_TYPE": "cd", "ID_BUS": "ata",
    "ID_SERIAL": "TSSTcorp_CDDVDW_SN-208FB_R8PD6GDF1234", "ID_SERIAL_SHORT": "R8PD6GDF1234",
}

#: A SATA SSD: a block device, but not optical; must be ignored.
SDA_DISK = {
    "DEVPATH": "/devices/pci0000:00/0000:00:17.0/ata1/host0/target0:0:0/0:0:0:0/block/sda",
    "DEVNAME": "/dev/sda", "DEVTYPE": "disk", "MAJOR": "8", "MINOR": "0", "SUBSYSTEM": "block",
    "ID_ATA": "1", "ID_TYPE": "disk", "ID_BUS": "ata", "ID_MODEL": "Samsung_SSD_870_EVO_500GB",
    "ID_REVISION": "SVT02B6Q", "ID_SERIAL_SHORT": "S6PXNM0T123456", "ID_PART_TABLE_TYPE": "gpt",
}

#: udev change event: a blank DVD-R was inserted into /dev/sr2.
SR2_INSERTED_DVD_R = dict(SR2_NO_MEDIUM, ACTION="change", DISK_MEDIA_CHANGE="1",
                          ID_CDROM_MEDIA="1", ID_CDROM_MEDIA_DVD_R="1",
                          ID_CDROM_MEDIA_STATE="blank", ID_CDROM_MEDIA_SESSION_COUNT="1",
                          ID_CDROM_MEDIA_TRACK_COUNT="1")
#: udev change event: the disc in /dev/sr0 was removed.
SR0_REMOVED = {key: value for key, value in SR0_BLANK_CD_R.items()
               if not key.startswith("ID_CDROM_MEDIA")}
SR0_REMOVED.update(ACTION="change", DISK_MEDIA_CHANGE="1")


def recorded_probe(events=()) -> RecordedProbe:
    return RecordedProbe(
        [SR0_BLANK_CD_R,
         DeviceRecord(SR1_COMPLETE_DVD, {"size": SR1_SIZE_SECTORS}),
         SR2_NO_MEDIUM,
         SDA_DISK],
        events=events)


def test_recorded_drives_are_found_and_disks_ignored():
    drives = find_optical_drives(recorded_probe())
    assert [drive.info.device for drive in drives] == ["/dev/sr0", "/dev/sr1", "/dev/sr2"]


def test_identity_from_udev_properties():
    sr0, sr1, _ = find_optical_drives(recorded_probe())
    assert sr0.info.model == "HL-DT-ST DVDRAM GH24NSD1"
    assert sr0.info.revision == "LG00"
    assert sr0.info.serial == "K1RF7KL0001"
    assert sr1.info.vendor == "ASUS"
    assert sr1.info.model == "BW-16D1X-U"
    assert sr1.info.description == "ASUS BW-16D1X-U (/dev/sr1)"


def test_capabilities_from_id_cdrom_flags():
    sr0, sr1, sr2 = find_optical_drives(recorded_probe())
    assert {CD_R, CD_RW, DVD_R, DVD_RW, DVD_PLUS_R} <= sr0.capabilities
    assert BD_R not in sr0.capabilities
    assert BD_R in sr1.capabilities
    assert sr2.capabilities == capabilities_from_properties(SR2_NO_MEDIUM)
    assert capabilities_from_properties(SDA_DISK) == frozenset()


def test_media_blank_cd_r():
    media = find_optical_drives(recorded_probe())[0].media
    assert media.present and media.is_blank
    assert media.kind == CD_R
    assert media.state == hw.STATE_BLANK
    assert media.track_count == 1


def test_media_complete_dvd_with_size():
    media = find_optical_drives(recorded_probe())[1].media
    assert media.present
    assert media.kind == "DVD-ROM"
    assert media.state == hw.STATE_COMPLETE
    assert media.capacity_bytes == int(SR1_SIZE_SECTORS) * 512
    assert media.free_bytes == 0


def test_media_absent():
    media = find_optical_drives(recorded_probe())[2].media
    assert not media.present
    assert media.state == hw.STATE_NONE
    assert media.kind is None


def test_monitor_replays_media_changes():
    unrelated = dict(SDA_DISK, ACTION="change")
    no_media_change = dict(SR0_BLANK_CD_R, ACTION="change")
    probe = recorded_probe(events=[("change", unrelated), ("change", no_media_change),
                                   ("change", SR2_INSERTED_DVD_R), ("change", SR0_REMOVED)])
    seen = []
    handle = probe.monitor(seen.append)
    assert probe.replay() == 2
    assert [(event.drive.info.device, event.drive.media.state) for event in seen] == [
        ("/dev/sr2", "blank"), ("/dev/sr0", "none")]
    assert seen[0].drive.media.kind == DVD_R
    # The device table follows the events.
    by_device = {drive.info.device: drive for drive in find_optical_drives(probe)}
    assert by_device["/dev/sr2"].media.is_blank
    assert not by_device["/dev/sr0"].media.present
    # After stop() nothing more is delivered.
    handle.stop()
    probe.replay()
    assert len(seen) == 2


def test_event_filter():
    record = DeviceRecord(SR2_INSERTED_DVD_R)
    assert media_event_from_record("change", record) is not None
    assert media_event_from_record("add", record) is None
    assert media_event_from_record("change", DeviceRecord(dict(SDA_DISK, DISK_MEDIA_CHANGE="1"))) is None


def test_discover_with_recorded_probe_gives_xorriso_drives():
    drives = hw.discover(recorded_probe(), xorriso="/usr/bin/xorriso")
    assert [drive.identity.device for drive in drives] == ["/dev/sr0", "/dev/sr1", "/dev/sr2"]
    assert all(isinstance(drive, hw.Drive) for drive in drives)
    assert CD_R in drives[0].capabilities()  # from udev, no xorriso run needed


def test_real_udev_probe_lists_without_error():
    probe = UdevProbe()
    drives = find_optical_drives(probe)
    assert isinstance(drives, list)
    assert all(drive.info.device.startswith("/dev/") for drive in drives)
    assert isinstance(hw.discover(probe), list)


def test_real_udev_monitor_starts_and_stops():
    handle = UdevProbe().monitor(lambda event: None)
    handle.stop()


def test_hw_does_not_import_modality_link():
    package = Path(hw.__file__).parent
    for source in package.glob("*.py"):
        tree = ast.parse(source.read_text(), filename=str(source))
        for node in ast.walk(tree):
            names = []
            if isinstance(node, ast.Import):
                names = [alias.name for alias in node.names]
            elif isinstance(node, ast.ImportFrom):
                names = [node.module or ""]
            assert not any(name.split(".")[0] == "modality_link" for name in names), source
    code = "import sys, hw; assert 'modality_link' not in sys.modules"
    subprocess.run([sys.executable, "-c", code], check=True, cwd=package.parent)
