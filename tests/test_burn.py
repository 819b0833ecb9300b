"""The burn flow through a real service: --iso export, stdio: pseudo-drive, verification
failures, spanning with the insert-next-disc prompt answered over IPC.

Each disc is read back with xorriso and checked with dicom3tools (dciodvfy, dcdirdmp) and
pydicom: a valid DICOMDIR (PS3.10 §8, PS3.3 F), ISO 9660 Level 1 names (PS3.12 Annex F),
every instance present once and equal to its archive source in its pixel data.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any, Iterator

import pycdlib
import pytest
from pydicom import dcmread
from pydicom.uid import ImplicitVRLittleEndian

import hw
from modality_link.ipc import IpcClient
from modality_link.media import MediaOptions
from modality_link.media.burn import burn_studies, iso_target
from modality_link.media.iso import iso_path
from sim.images import PatientSpec, write_study
from tests.support.discs import check_against_archive, check_disc
from tests.support.service import ServiceProcess

@pytest.fixture(scope="module")
def svc(tools) -> Iterator[dict[str, Any]]:
    root = Path(tempfile.mkdtemp(prefix="mlb"))
    service = ServiceProcess.start(root / "home")
    try:
        src = root / "src"
        write_study(src / "ct", modality="CT", images=6, seed=11, patient=PatientSpec("PID1", "DOE^JANE"))
        write_study(src / "mr", modality="MR", images=5, seed=12, patient=PatientSpec("PID2", "ROE^RICHARD"),
                    transfer_syntax=ImplicitVRLittleEndian)
        write_study(src / "big", modality="CT", images=10, rows=512, columns=512, seed=13,
                    patient=PatientSpec("PID3", "BIG^BOB"))
        for name in ("ct", "mr", "big"):
            assert service.cli("import", str(src / name)).returncode == 0
        studies = {s["patient_id"]: s["study_uid"] for s in service.studies()}
        sources = {}
        for f in service.home.archive_dir.rglob("*.dcm"):
            ds = dcmread(f, stop_before_pixels=True)
            sources[ds.SOPInstanceUID] = (f, ds.StudyInstanceUID)
        yield {"service": service, "root": root, "studies": studies, "sources": sources}
    finally:
        service.stop()
        shutil.rmtree(root, ignore_errors=True)


def test_burn_ct_and_mr_to_iso(svc, tools):
    service: ServiceProcess = svc["service"]
    root: Path = svc["root"]
    ct, mr = svc["studies"]["PID1"], svc["studies"]["PID2"]
    image = root / "export.iso"
    proc = service.cli("burn", ct, mr, "--iso", str(image), "--wait")
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "done" in proc.stdout
    found = check_disc(image, root / "x_iso", tools)
    expected = {uid for uid, (_, study) in svc["sources"].items() if study in (ct, mr)}
    assert set(found) == expected and len(expected) == 11
    check_against_archive(found, svc["sources"])
    # the implicit VR study really was converted
    mr_uids = {uid for uid, (_, study) in svc["sources"].items() if study == mr}
    assert all(dcmread(svc["sources"][u][0]).file_meta.TransferSyntaxUID == ImplicitVRLittleEndian
               for u in mr_uids)


def test_burn_to_stdio_pseudo_drive(svc, tools):
    service: ServiceProcess = svc["service"]
    root: Path = svc["root"]
    disc = root / "stdio_disc.iso"
    disc.touch()  # empty file: a blank medium
    res = service.call("burn", study_uids=[svc["studies"]["PID1"]], drive=f"stdio:{disc}", wait=True)
    assert res["state"] == "done", res
    status = service.call("burn.status", id=res["id"])
    [d] = status["discs"]
    assert d["state"] == "done" and d["medium_verified"] and d["files_checked"] == 6 + 3
    found = check_disc(disc, root / "x_stdio", tools)
    assert len(found) == 6
    check_against_archive(found, svc["sources"])
    # the disc is no longer blank: a second burn is refused with a clear sentence
    proc = service.cli("burn", svc["studies"]["PID1"], "--drive", f"stdio:{disc}", "--wait")
    assert proc.returncode == 1
    assert "not blank" in proc.stderr


def test_corrupted_disc_is_a_failure(svc):
    service: ServiceProcess = svc["service"]
    proc = service.cli("burn", svc["studies"]["PID2"], "--drive", "sim:corrupt", "--wait")
    assert proc.returncode == 1, proc.stdout
    assert "Verification failed" in proc.stderr
    burns = [b for b in service.call("burn.list") if b["target"] == "sim:corrupt"]
    assert burns[-1]["state"] == "failed"
    assert burns[-1]["discs"][0]["state"] == "failed" and not burns[-1]["discs"][0]["medium_verified"]
    assert any(a["code"] == "burn-failed" for a in service.call("alerts.list"))


class FlippingDrive(hw.XorrisoDrive):
    """A stdio: pseudo-drive whose disc is damaged inside a DICOM file after writing."""

    def write(self, image: Path, progress=None) -> None:
        super().write(image, progress)
        iso = pycdlib.PyCdlib()
        iso.open(str(self.readback_path))
        try:
            rec = iso.get_record(iso_path=iso_path(("DICOM", "PAT00001", "STU00001", "SER00001", "IM000002")))
            offset = rec.extent_location() * 2048 + rec.get_data_length() - 100  # pixel data
        finally:
            iso.close()
        with open(self.readback_path, "r+b") as fp:
            fp.seek(offset)
            byte = fp.read(1)[0]
            fp.seek(offset)
            fp.write(bytes([byte ^ 0xFF]))


def test_flipped_byte_on_xorriso_disc_fails_verification(svc, tools, tmp_path):
    files = [f for f, study in svc["sources"].values() if study == svc["studies"]["PID1"]]
    drive = FlippingDrive(f"stdio:{tmp_path / 'disc.iso'}", xorriso=tools["xorriso"])
    report = burn_studies(files, drive, None, MediaOptions(), tmp_path / "staging")
    assert not report.ok
    assert report.discs[0].state == "failed" and not report.discs[0].medium_verified
    assert "Verification failed" in report.error
    # the same disc written without damage passes
    good = burn_studies(files, hw.XorrisoDrive(f"stdio:{tmp_path / 'good.iso'}", xorriso=tools["xorriso"]),
                        None, MediaOptions(), tmp_path / "staging")
    assert good.ok and good.discs[0].medium_verified and good.discs[0].files_checked == len(files) + 3


def test_spanning_with_insert_disc_over_ipc(svc, tools):
    service: ServiceProcess = svc["service"]
    root: Path = svc["root"]
    service.call("config.set", key="media.capacity_bytes", value="3000000")
    try:
        disc = root / "span.iso"
        written: list[Path] = []

        def swap_disc(ev: dict[str, Any]) -> None:
            # "eject" the written disc (keep it for checking) and insert a blank one
            kept = root / f"span_disc{ev['disc'] - 1}.iso"
            disc.rename(kept)
            written.append(kept)
            service.call("burn.disc_inserted", id=ev["id"])

        box: list[str] = []
        with IpcClient(service.home.socket_path, timeout=60) as events:
            events.call("events.subscribe")
            res = service.call("burn", study_uids=[svc["studies"]["PID3"], svc["studies"]["PID1"]],
                               drive=f"stdio:{disc}")
            box.append(res["id"])
            seen = []
            while True:
                msg = events._read()
                ev = msg.get("params", {})
                if msg.get("method") != "event" or ev.get("id") != box[0]:
                    continue
                seen.append(ev)
                if ev["type"] == "burn.insert_disc":
                    swap_disc(ev)
                elif ev["type"] == "burn.done":
                    break
        written.append(disc)
        status = service.call("burn.status", id=box[0])
        assert status["state"] == "done", status
        n = len(status["discs"])
        assert n >= 2 and len(written) == n
        assert [e["disc"] for e in seen if e["type"] == "burn.insert_disc"] == list(range(2, n + 1))
        assert {e["phase"] for e in seen if e["type"] == "burn.progress"} == {"build", "write", "verify"}
        all_found: list[str] = []
        for k, image in enumerate(written, 1):
            assert image.stat().st_size <= 3000000 + 300 * 1024  # xorriso pads 300k
            found = check_disc(image, root / f"x_span{k}", tools)
            check_against_archive(found, svc["sources"])
            all_found.extend(found)
        expected = {uid for uid, (_, study) in svc["sources"].items()
                    if study in (svc["studies"]["PID3"], svc["studies"]["PID1"])}
        assert sorted(all_found) == sorted(expected)  # each instance exactly once
    finally:
        service.call("config.set", key="media.capacity_bytes", value=str(700 * 1024 * 1024))


def test_spanned_iso_export_names(svc, tools):
    service: ServiceProcess = svc["service"]
    root: Path = svc["root"]
    service.call("config.set", key="media.capacity_bytes", value="3000000")
    try:
        image = root / "big.iso"
        proc = service.cli("burn", svc["studies"]["PID3"], "--iso", str(image), "--wait")
        assert proc.returncode == 0, proc.stderr
        status = [b for b in service.call("burn.list") if b["target"] == str(image)][-1]
        n = len(status["discs"])
        assert n >= 2
        names = [Path(d["target"]) for d in status["discs"]]
        assert names == [iso_target(image, k, n) for k in range(1, n + 1)]
        assert names[1].name == "big_2.iso"
        total = 0
        for k, name in enumerate(names, 1):
            total += len(check_disc(name, root / f"x_big{k}", tools))
        assert total == 10
    finally:
        service.call("config.set", key="media.capacity_bytes", value=str(700 * 1024 * 1024))


def test_drives_list_shows_configured_drives(svc, tmp_path):
    service: ServiceProcess = svc["service"]
    service.call("config.set", key="media.drives", value=f"sim:demo,stdio:{tmp_path / 'd.iso'}")
    try:
        proc = service.cli("drives", "--json")
        assert proc.returncode == 0, proc.stderr
        drives = {d["device"]: d for d in json.loads(proc.stdout)}
        assert drives["sim:demo"]["media"]["state"] == "blank"
        assert drives[f"stdio:{tmp_path / 'd.iso'}"]["media"]["state"] == "blank"
        text = service.cli("drives").stdout
        assert "sim:demo" in text and "blank" in text
    finally:
        service.call("config.set", key="media.drives", value="")


def test_burn_errors(svc):
    service: ServiceProcess = svc["service"]
    proc = service.cli("burn", "1.2.3.4", "--iso", str(svc["root"] / "none.iso"))
    assert proc.returncode == 1 and "no study 1.2.3.4" in proc.stderr
    proc = service.cli("burn", svc["studies"]["PID1"], "--iso", "x.iso", "--drive", "sim:0")
    assert proc.returncode == 2
    proc = service.cli("burn", svc["studies"]["PID1"], "--iso", "x.iso", "--profile", "NOPE")
    assert proc.returncode == 1 and "NOPE" in proc.stderr


def test_cli_wait_yes_answers_disc_prompts(svc):
    service: ServiceProcess = svc["service"]
    service.call("config.set", key="media.capacity_bytes", value="3000000")
    try:
        proc = service.cli("burn", svc["studies"]["PID3"], "--drive", "sim:span", "--wait", "--yes")
        assert proc.returncode == 0, proc.stdout + proc.stderr
        assert "Insert blank disc 2 of" in proc.stdout
        assert "disc 2 of" in proc.stdout and proc.stdout.rstrip().endswith("done")
        # without --yes and without a terminal the prompt cannot be answered: a clear failure
        proc = subprocess.run(
            [sys.executable, "-m", "modality_link", "--home", str(service.home.root),
             "burn", svc["studies"]["PID3"], "--drive", "sim:span2", "--wait"],
            stdin=subprocess.DEVNULL, capture_output=True, text=True, timeout=60)
        assert proc.returncode == 1 and "--yes" in proc.stderr
    finally:
        service.call("config.set", key="media.capacity_bytes", value=str(700 * 1024 * 1024))
