"""Burns as persistent jobs (docs/design.md "Jobs and failures"): queued per drive, resumed
after SIGKILL without burning a verified disc again, cancelled at safe points, discs shown while
they run.

Real service processes, a real SQLite job queue, discs written by xorriso to a ``stdio:``
pseudo-drive or mastered as ISO files and read back (dciodvfy, pydicom); ``sim:slow`` is the
simulated burner writing at 4x CD speed, to catch a burn in the middle of a write.
"""

from __future__ import annotations

import os
import shutil
import signal
import tempfile
import threading
from pathlib import Path
from typing import Any, Iterator

import pytest
from pydicom import dcmread

from modality_link.ipc import CONFLICT, IpcClient, IpcError
from modality_link.media import MediaOptions
from modality_link.media.burn import burn_studies, iso_part, iso_target
from sim.images import PatientSpec, write_study
from tests.support.discs import check_against_archive, check_disc
from tests.support.service import ServiceProcess
from tests.support.waiting import wait_until

SPAN_CAPACITY = "3000000"  # the 10 x 512 x 512 CT study needs two or three discs
FINAL = ("done", "failed", "cancelled")
#: Seconds a burn may take to reach the state a test waits for, on a loaded machine.
BURN_WAIT = 90.0

#: name -> (patient id, write_study arguments)
STUDIES = {
    "big": ("PID3", dict(modality="CT", images=10, rows=512, columns=512, seed=13)),
    "small": ("PID1", dict(modality="CT", images=6, rows=64, columns=64, seed=11)),
    "slow": ("PID4", dict(modality="MR", images=8, rows=256, columns=256, seed=14)),
}


def import_studies(service: ServiceProcess, root: Path, names: tuple[str, ...]) -> tuple[dict[str, str], dict]:
    """Import the named studies; return name -> Study Instance UID and the archive sources."""
    for name in names:
        pid, kwargs = STUDIES[name]
        write_study(root / "src" / name, patient=PatientSpec(pid, f"{name.upper()}^TEST"), **kwargs)
        assert service.cli("import", str(root / "src" / name)).returncode == 0
    by_pid = {s["patient_id"]: s["study_uid"] for s in service.studies()}
    studies = {name: by_pid[STUDIES[name][0]] for name in names}
    sources = {}
    for f in service.home.archive_dir.rglob("*.dcm"):
        ds = dcmread(f, stop_before_pixels=True)
        sources[ds.SOPInstanceUID] = (f, ds.StudyInstanceUID)
    return studies, sources


def status(service: ServiceProcess, burn_id: int) -> dict[str, Any]:
    return service.call("burn.status", id=burn_id)


def ended(service: ServiceProcess, burn_id: int) -> dict[str, Any]:
    """Wait for the burn to end (cancelled burns: until they have really stopped)."""
    def check() -> dict[str, Any] | None:
        st = status(service, burn_id)
        return st if st["state"] in FINAL and not st["stopping"] else None
    return wait_until(check, BURN_WAIT, f"burn {burn_id} to end")


def feed_discs(service: ServiceProcess, burn_id: int, disc: Path, kept: list[Path]) -> dict[str, Any]:
    """Answer every insert-disc prompt of a burn to ``stdio:disc`` until it ends.

    "Ejecting" a disc moves the pseudo-drive's file to ``kept`` (in order); the drive then holds
    no medium, which xorriso treats as a blank one.
    """
    def fed() -> dict[str, Any] | None:
        st = status(service, burn_id)
        if st["state"] in FINAL and not st["stopping"]:
            return st
        if st["waiting_for_disc"] is not None:
            eject(disc, kept)
            service.call("burn.disc_inserted", id=burn_id)
        return None
    return wait_until(fed, 240, f"burn {burn_id} to end, every disc it asked for inserted")


def eject(disc: Path, kept: list[Path]) -> None:
    kept.append(disc.with_name(f"kept{len(kept) + 1}.iso"))
    disc.rename(kept[-1])


def sigkill_and_restart(service: ServiceProcess) -> ServiceProcess:
    os.kill(service.proc.pid, signal.SIGKILL)
    service.proc.wait(timeout=10)
    return ServiceProcess.start(service.home.root)


def leftovers(service: ServiceProcess, *folders: Path) -> list[Path]:
    """Temporary files of burns: staging folders and partly written images."""
    found = list((service.home.tmp_dir / "burn").glob("*"))
    for folder in folders:
        found += list(folder.glob(".*.part"))
    return found


def check_set(images: list[Path], out: Path, study: str, sources: dict, tools: dict[str, str]) -> None:
    """Read every disc back; together they hold each instance of `study` exactly once."""
    uids: list[str] = []
    for k, image in enumerate(images, 1):
        found = check_disc(image, out / f"x{k}", tools)
        check_against_archive(found, sources)
        uids += found
    expected = {uid for uid, (_, s) in sources.items() if s == study}
    assert sorted(uids) == sorted(expected)


class EventLog:
    """Every event of a service, collected by a background reader."""

    def __init__(self, service: ServiceProcess) -> None:
        self._client = IpcClient(service.home.socket_path, timeout=None)
        self._client.call("events.subscribe")
        self.events: list[dict[str, Any]] = []
        self._thread = threading.Thread(target=self._read, daemon=True)
        self._thread.start()

    def _read(self) -> None:
        try:
            while True:
                msg = self._client._read()
                if msg.get("method") == "event":
                    self.events.append(msg["params"])
        except Exception:
            return

    def of(self, burn_id: int, kind: str) -> list[dict[str, Any]]:
        return [e for e in list(self.events) if e.get("id") == burn_id and e["type"] == kind]

    def done(self, burn_id: int) -> dict[str, Any]:
        """The burn.done event of `burn_id` without its journal number (``seq``, checked here)."""
        event = dict(wait_until(lambda: self.of(burn_id, "burn.done"), BURN_WAIT, f"burn.done of {burn_id}")[0])
        assert isinstance(event.pop("seq"), int)
        return event

    def close(self) -> None:
        import socket

        self._client._sock.shutdown(socket.SHUT_RDWR)
        self._client.close()


# -- persistence: SIGKILL and restart ---------------------------------------------------------------


def test_spanned_burn_resumes_after_sigkill_and_the_queued_burn_follows(short_tmp, tools):
    root = short_tmp
    service = ServiceProcess.start(root / "home")
    try:
        studies, sources = import_studies(service, root, ("big", "small"))
        service.call("config.set", key="media.capacity_bytes", value=SPAN_CAPACITY)
        disc = root / "disc.iso"
        kept: list[Path] = []
        a = service.call("burn", study_uids=[studies["big"]], drive=f"stdio:{disc}")["id"]
        st = wait_until(lambda: (s := status(service, a))["waiting_for_disc"] == 2 and s, BURN_WAIT,
                        "disc 2 prompt")
        # the discs are shown while the burn runs: disc 1 written and verified, the others planned
        assert st["state"] == "running" and st["started"] is not None and st["finished"] is None
        n = len(st["discs"])
        assert n >= 2
        first = st["discs"][0]
        assert first["state"] == "done" and first["medium_verified"] and first["files_checked"] > 0
        assert [d["state"] for d in st["discs"][1:]] == ["pending"] * (n - 1)
        job = service.call("jobs.show", id=a)
        assert (job["kind"], job["node"], job["state"]) == ("burn", f"drive:stdio:{disc}", "running")
        assert job["done"] == first["instances"] and job["total"] == 10
        eject(disc, kept)  # disc 1 out of the drive; disc 2 not yet in
        # a second burn to the same drive is queued behind the first, not refused
        b = service.call("burn", study_uids=[studies["small"]], drive=f"stdio:{disc}")
        assert b["state"] == "queued" and "another burn" in b["detail"], b
        b = b["id"]

        service = sigkill_and_restart(service)

        # the running burn resumes: disc 1 is kept as it was, the set goes on with disc 2
        st = feed_discs(service, a, disc, kept)
        assert st["state"] == "done", st
        assert st["discs"][0] == first
        assert [d["state"] for d in st["discs"]] == ["done"] * n
        assert f"burn job {a}: resumed" in service.log()
        assert "1 job(s) interrupted by an earlier stop queued again" in service.log()
        # the queued burn waited for the drive, which holds the last disc of the first burn:
        # it asks for a blank disc instead of failing
        wait_until(lambda: status(service, b)["waiting_for_disc"] == 1, BURN_WAIT, "burn 2 to ask for a blank disc")
        st_b = feed_discs(service, b, disc, kept)
        assert st_b["state"] == "done", st_b
        assert len(kept) == n
        check_set(kept, root / "a", studies["big"], sources, tools)
        check_set([disc], root / "b", studies["small"], sources, tools)
        job = service.call("jobs.show", id=a)
        assert job["state"] == "done" and job["done"] == job["total"] == 10 and not job["failed_items"]
        assert not leftovers(service, root)
    finally:
        service.stop()


def test_burn_killed_during_a_write_burns_that_disc_again(short_tmp):
    root = short_tmp
    service = ServiceProcess.start(root / "home")
    try:
        studies, _ = import_studies(service, root, ("slow",))
        service.call("config.set", key="media.drives", value="sim:slow")
        burn = service.call("burn", study_uids=[studies["slow"]], drive="sim:slow")["id"]
        st = wait_until(lambda: (s := status(service, burn))["discs"] and s["discs"][0]["state"] == "writing" and s,
                        BURN_WAIT, "the disc to be written")
        assert st["state"] == "running"
        drives = {d["device"]: d for d in service.call("drives.list")}
        assert drives["sim:slow"]["busy"] is True

        service = sigkill_and_restart(service)

        st = ended(service, burn)
        assert st["state"] == "done", st
        [d] = st["discs"]
        assert d["state"] == "done" and d["medium_verified"] and d["instances"] == 8
        assert f"burn job {burn}: resumed" in service.log()
        assert service.call("jobs.show", id=burn)["done"] == 8
        assert not {d["device"]: d for d in service.call("drives.list")}["sim:slow"]["busy"]
        assert not leftovers(service)
    finally:
        service.stop()


# -- cancel, disc states ---------------------------------------------------------------------------


@pytest.fixture(scope="module")
def svc(tools) -> Iterator[dict[str, Any]]:
    root = Path(tempfile.mkdtemp(prefix="mlj"))
    service = ServiceProcess.start(root / "home")
    events = EventLog(service)
    try:
        studies, sources = import_studies(service, root, ("big", "small", "slow"))
        yield {"service": service, "root": root, "studies": studies, "sources": sources, "events": events}
    finally:
        events.close()
        service.stop()
        shutil.rmtree(root, ignore_errors=True)


def test_cancel_a_queued_burn_and_one_being_written(svc):
    service: ServiceProcess = svc["service"]
    events: EventLog = svc["events"]
    a = service.call("burn", study_uids=[svc["studies"]["slow"]], drive="sim:slow")["id"]
    b = service.call("burn", study_uids=[svc["studies"]["small"]], drive="sim:slow")["id"]
    wait_until(lambda: (s := status(service, a))["discs"] and s["discs"][0]["state"] == "writing", BURN_WAIT,
               "the write")
    res = service.call("burn.cancel", id=a)  # being written: the write is finished first
    assert res["state"] == "cancelled" and res["stopping"] is True and res["finished"] is None

    assert status(service, b)["state"] == "queued"  # the drive is still busy with the write
    res = service.call("burn.cancel", id=b)  # queued: cancelled at once
    assert res["state"] == "cancelled" and not res["stopping"] and res["finished"] is not None
    assert events.done(b) == {"type": "burn.done", "id": b, "state": "cancelled", "error": "cancelled by the operator"}

    done = events.done(a)
    assert done["state"] == "cancelled" and "do not use" in done["error"]
    st = ended(service, a)
    [d] = st["discs"]
    assert d["state"] == "stopped" and not d["medium_verified"] and "not verified" in d["message"]
    assert all(e["fraction"] < 1.0 for e in events.of(a, "burn.progress") if e["phase"] == "verify")
    st_b = status(service, b)
    assert st_b["discs"] == [] and st_b["started"] is None  # never ran
    assert service.call("jobs.show", id=a)["state"] == "cancelled"
    with pytest.raises(IpcError) as err:
        service.call("burn.cancel", id=a)
    assert err.value.code == CONFLICT
    assert not leftovers(service)


def test_cancel_while_waiting_for_a_disc_then_retry_resumes(svc, tools):
    service: ServiceProcess = svc["service"]
    events: EventLog = svc["events"]
    root: Path = svc["root"] / "cancel_wait"
    root.mkdir()
    disc = root / "disc.iso"
    kept: list[Path] = []
    service.call("config.set", key="media.capacity_bytes", value=SPAN_CAPACITY)
    try:
        burn = service.call("burn", study_uids=[svc["studies"]["big"]], drive=f"stdio:{disc}")["id"]
        wait_until(lambda: status(service, burn)["waiting_for_disc"] == 2, BURN_WAIT, "disc 2 prompt")
        eject(disc, kept)
        proc = service.cli("burn", "--cancel", str(burn))
        assert proc.returncode == 0 and f"burn {burn}: cancelled" in proc.stdout, proc.stdout + proc.stderr
        assert events.done(burn)["state"] == "cancelled"
        st = ended(service, burn)
        assert st["discs"][0]["state"] == "done" and st["discs"][1]["state"] == "pending"
        assert st["waiting_for_disc"] is None
        proc = service.cli("job", "show", str(burn))
        assert proc.returncode == 0, proc.stderr
        assert "burn" in proc.stdout and "cancelled" in proc.stdout and "disc 1 of" in proc.stdout
        assert not leftovers(service, root)

        # retried, the burn goes on with disc 2: disc 1 is not burned again
        seen = len(events.events)
        service.call("jobs.retry", id=burn)
        st = feed_discs(service, burn, disc, kept)
        assert st["state"] == "done", st
        after = [e for e in events.events[seen:] if e.get("id") == burn and e["type"] == "burn.progress"]
        assert after and all(e["disc"] >= 2 for e in after)
        check_set([*kept, disc], root, svc["studies"]["big"], svc["sources"], tools)
        assert not leftovers(service, root)
        proc = service.cli("job", "cancel", str(burn))
        assert proc.returncode == 1 and "only a queued or running job" in proc.stderr
        proc = service.cli("burn", "--cancel", "99999")
        assert proc.returncode == 1 and "no burn 99999" in proc.stderr
        assert service.cli("burn", "--iso", str(root / "x.iso")).returncode == 2  # no study
        assert service.cli("burn", svc["studies"]["big"], "--cancel", str(burn)).returncode == 2
    finally:
        service.call("config.set", key="media.capacity_bytes", value=str(700 * 1024 * 1024))


def test_iso_export_shows_each_disc_state_and_leaves_no_temporary_file(svc, tools):
    service: ServiceProcess = svc["service"]
    events: EventLog = svc["events"]
    image = svc["root"] / "small.iso"
    st = service.call("burn", study_uids=[svc["studies"]["small"]], iso=str(image), wait=True)
    assert st["state"] == "done" and st["finished"] is not None, st
    states = [e["disc"]["state"] for e in events.of(st["id"], "burn.disc")]
    assert states == ["pending", "building", "verifying", "done"]
    check_set([image], svc["root"] / "xs", svc["studies"]["small"], svc["sources"], tools)
    assert not leftovers(service, svc["root"])
    lines = [line for line in service.cli("jobs").stdout.splitlines() if line.split()[0] == str(st["id"])]
    assert lines and "burn" in lines[0] and f"iso:{image}" in lines[0] and "6/6" in lines[0]
    assert [b["id"] for b in service.call("burn.list")][-1] == st["id"]


# -- burn_studies itself: stop points and resumption --------------------------------------------------


def test_stop_while_mastering_leaves_neither_image_nor_staging(tmp_path):
    files = write_study(tmp_path / "src", modality="CT", images=4, rows=64, columns=64, seed=1)
    states: list[str] = []
    image = tmp_path / "out.iso"
    report = burn_studies(files, None, image, MediaOptions(), tmp_path / "staging",
                          on_disc=lambda d, uids: states.append(d.state),
                          should_stop=lambda: "building" in states)
    assert report.stopped and not report.ok and not report.error
    assert states == ["pending", "building", "stopped"]
    assert report.discs[0].message == "disc 1 of 1: stopped before anything was written"
    assert not image.exists() and not iso_part(image).exists()
    assert not any((tmp_path / "staging").rglob("*"))


def test_a_verified_disc_is_not_burned_again_unless_the_set_changed(tmp_path):
    files = sorted(write_study(tmp_path / "src", modality="CT", images=10, rows=512, columns=512, seed=13))
    options = MediaOptions(capacity_bytes=int(SPAN_CAPACITY))
    image = tmp_path / "set.iso"
    first = burn_studies(files, None, image, options, tmp_path / "staging")
    assert first.ok and len(first.discs) >= 2
    n = len(first.discs)
    before = image.stat().st_mtime_ns
    iso_target(image, 2, n).unlink()  # "the crash happened while disc 2 was made"
    phases: list[tuple[str, int]] = []
    again = burn_studies(files, None, image, options, tmp_path / "staging", earlier={1: first.discs[0]},
                         progress=lambda phase, k, count, f: phases.append((phase, k)))
    assert again.ok and again.discs[0] == first.discs[0]
    assert phases and all(k >= 2 for _, k in phases)
    assert image.stat().st_mtime_ns == before and iso_target(image, 2, n).is_file()
    # another set of instances (the first image, on disc 1, is gone): disc 1 does not belong to it
    files.remove(min(files, key=lambda f: int(dcmread(f, stop_before_pixels=True).InstanceNumber)))
    changed = burn_studies(files, None, image, options, tmp_path / "staging", earlier={1: first.discs[0]})
    assert not changed.ok and "start a new burn" in changed.error
