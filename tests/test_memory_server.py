"""The memory server: Storage SCP into RAM, its cache, IPC memory.* and the `memory` command."""

from __future__ import annotations

import base64
import io
import subprocess
from pathlib import Path

import pytest
from pydicom import dcmread
from pynetdicom import AE
from pynetdicom.sop_class import CTImageStorage

from modality_link.db import InstanceRecord
from modality_link.ipc import INVALID_PARAMS, NOT_FOUND, IpcClient, IpcError
from modality_link.memory import CachedInstance, MemoryCache
from sim import images
from tests.support.acceptor import RELEASE_RQ, associate_rq, exchange, statuses, store_stream
from tests.support.instances import dataset_bytes
from tests.support.service import ServiceProcess
from tests.support.tools import dcmtk_env, require_tool


def _record(uid: str, study: str = "1.2.3", series: str = "1.2.3.4") -> InstanceRecord:
    return InstanceRecord(sop_instance_uid=uid, sop_class_uid=CTImageStorage, series_uid=series, study_uid=study,
                          transfer_syntax="1.2.840.10008.1.2.1", path="", size=0)


def _item(uid: str, data: bytes) -> CachedInstance:
    return CachedInstance(data, uid, _record(uid))


def test_cached_record_is_decoded_once_on_first_use() -> None:
    calls = []

    def decode() -> InstanceRecord:
        calls.append(1)
        return _record("9")

    item = CachedInstance(b"x", "9", decode)
    assert calls == []
    assert item.record.sop_instance_uid == "9" and item.record is item.record
    assert calls == [1]


def test_cache_evicts_least_recently_used_within_its_budget() -> None:
    cache = MemoryCache(1000)
    for uid in ("1", "2", "3"):
        assert cache.put(_item(uid, b"x" * 300)) == []
    assert cache.get("1") is not None  # "1" is now the most recently used
    evicted = cache.put(_item("4", b"x" * 300))
    assert [e.record.sop_instance_uid for e in evicted] == ["2"]
    assert (len(cache), cache.used_bytes) == (3, 900)
    # the same UID again replaces it, counted once
    assert cache.put(_item("4", b"y" * 100)) == []
    assert (len(cache), cache.used_bytes) == (3, 700)
    assert not cache.fits(1001) and cache.fits(1000)
    (study,) = cache.studies()
    assert study["instances"] == 3 and study["bytes"] == 700
    assert sorted(study["series"][0]["sop_instance_uids"]) == ["1", "3", "4"]
    assert cache.clear() == 3 and cache.used_bytes == 0 and cache.get("3") is None


@pytest.fixture(scope="module")
def ct20(tmp_path_factory: pytest.TempPathFactory) -> list[Path]:
    return images.write_study(tmp_path_factory.mktemp("ct20"), modality="CT", images=20, rows=256, columns=256, seed=3)


def _files(root: Path) -> set[Path]:
    return {p for p in root.rglob("*") if p.is_file()}


def test_storescu_into_memory_server_keeps_nothing_on_disk(short_tmp: Path, ct20: list[Path]) -> None:
    svc = ServiceProcess.start(short_tmp / "h")
    try:
        status = svc.call("status")["listeners"]["memory_server"]
        assert status["running"] and status["ae_title"] == "MODLINK_MEM"
        before = _files(svc.home.root) - {svc.home.log_dir / "modality-link.log"}
        with IpcClient(svc.home.socket_path, timeout=60) as sub:
            sub.call("events.subscribe")
            proc = subprocess.run(
                [require_tool("storescu"), "-aet", "VIEWER", "-aec", "MODLINK_MEM", "127.0.0.1", str(status["port"]),
                 *map(str, ct20)], env=dcmtk_env(), capture_output=True, text=True, timeout=120)
            assert proc.returncode == 0, proc.stderr
            stored = []
            while len(stored) < len(ct20):
                event = sub.next_event(30)
                assert event is not None, f"only {len(stored)} memory.stored events"
                if event["type"] == "memory.stored":
                    stored.append(event["sop_instance_uid"])
        sops = [dcmread(p, stop_before_pixels=True).SOPInstanceUID for p in ct20]
        assert sorted(stored) == sorted(sops)
        # nothing in the archive, its index or anywhere else in the home
        assert svc.call("studies.list") == []
        after = _files(svc.home.root) - {svc.home.log_dir / "modality-link.log"}
        assert after - before == set(), f"the memory server wrote files: {after - before}"
        listing = svc.call("memory.list")
        assert listing["instances"] == 20 and len(listing["studies"]) == 1
        fetched = 0
        for src, sop in zip(ct20, sops):
            got = svc.call("memory.fetch", sop_instance_uid=sop)
            fetched += got["bytes"]
            data = base64.b64decode(got["data"])
            ds = dcmread(io.BytesIO(data))
            assert ds.SOPInstanceUID == sop and ds.file_meta.SourceApplicationEntityTitle == "VIEWER"
            assert ds.PixelData == dcmread(src).PixelData
            assert data.endswith(dataset_bytes(src)) and len(data) == got["bytes"]
        assert listing["bytes"] == fetched
        # the command line: list, export to a new file, refuse an existing one, clear
        out = svc.cli("memory", check=True).stdout
        assert "20 instance(s)" in out and listing["studies"][0]["study_uid"] in out
        target = short_tmp / "export.dcm"
        assert svc.cli("memory", "export", sops[0], str(target), check=True).returncode == 0
        assert dataset_bytes(target) == dataset_bytes(ct20[0])
        again = svc.cli("memory", "export", sops[0], str(target))
        assert again.returncode == 1 and "exists" in again.stderr
        with pytest.raises(IpcError) as refused:
            svc.call("memory.fetch", sop_instance_uid=sops[0], path="relative.dcm")
        assert refused.value.code == INVALID_PARAMS and "absolute path" in refused.value.message
        assert svc.cli("memory", "clear", check=True).stdout.strip() == "cleared 20 instance(s)"
        assert svc.call("memory.list")["instances"] == 0
    finally:
        svc.stop()


def test_fetch_errors(service) -> None:
    with pytest.raises(IpcError) as e:
        service.call("memory.fetch", sop_instance_uid="1.2.3.4")
    assert e.value.code == NOT_FOUND
    with pytest.raises(IpcError) as e:
        service.call("memory.fetch", sop_instance_uid="")
    assert e.value.code == INVALID_PARAMS


@pytest.mark.parametrize("damage,status", [
    ("truncated", 0xC000),  # the data set ends inside an element
    ("other instance", 0xA900),  # its SOP Instance UID is not the C-STORE-RQ's
])
def test_refused_data_sets_are_not_kept(service, ct20: list[Path], damage: str, status: int) -> None:
    """The memory server validates as the archive does (docs/design.md "The listening side"):
    a refused data set answers its failure status and leaves nothing in the cache."""
    port = service.call("status")["listeners"]["memory_server"]["port"]
    body = dataset_bytes(ct20[0])
    sop = dcmread(ct20[0], stop_before_pixels=True).SOPInstanceUID
    if damage == "truncated":
        body = body[:-1000]
    else:
        sop = "1.2.3.999"
    out = exchange(port, associate_rq(called="MODLINK_MEM") + store_stream(body, sop) + RELEASE_RQ)
    assert statuses(out) == [status]
    assert service.call("memory.list")["instances"] == 0


def test_budget_evicts_and_refuses_what_never_fits(short_tmp: Path) -> None:
    svc = ServiceProcess.start(short_tmp / "h", memory_server__cache_mb=1)
    try:
        port = svc.call("status")["listeners"]["memory_server"]["port"]
        small = images.write_study(short_tmp / "small", modality="CT", images=5, rows=256, columns=256, seed=5)
        big = images.write_study(short_tmp / "big", modality="CT", images=1, rows=1024, columns=1024, seed=6)
        ae = AE(ae_title="VIEWER")
        ae.add_requested_context(CTImageStorage)
        assoc = ae.associate("127.0.0.1", port, ae_title="MODLINK_MEM")
        assert assoc.is_established
        try:
            for p in small:  # 5 x 128 KiB of pixels: all fit into 1 MiB
                assert assoc.send_c_store(dcmread(p)).Status == 0x0000
            more = images.write_study(short_tmp / "more", modality="CT", images=6, rows=256, columns=256, seed=8)
            for p in more:  # 11 x 128 KiB do not: the oldest go
                assert assoc.send_c_store(dcmread(p)).Status == 0x0000
            rsp = assoc.send_c_store(dcmread(big[0]))  # 2 MiB of pixels: larger than the whole cache
            assert rsp.Status == 0xA700, hex(rsp.Status)
            assert "larger than the whole memory cache" in rsp.ErrorComment
        finally:
            assoc.release()
        listing = svc.call("memory.list")
        assert listing["bytes"] <= 1 << 20
        cached = {u for st in listing["studies"] for se in st["series"] for u in se["sop_instance_uids"]}
        newest = {dcmread(p, stop_before_pixels=True).SOPInstanceUID for p in more}
        assert newest <= cached, "the newest instances are kept"
        assert dcmread(small[0], stop_before_pixels=True).SOPInstanceUID not in cached, "the oldest was evicted"
        assert "memory server" in svc.log() and "evicted" in svc.log()
        assert svc.call("studies.list") == []
    finally:
        svc.stop()


def test_each_listening_ae_has_its_own_allow_list_and_limit(short_tmp: Path) -> None:
    """The memory server's calling-AE allow-list and acceptor limit are its own (`[memory_server]`),
    independent of the disk server's."""
    svc = ServiceProcess.start(short_tmp / "h", memory_server__allowed_calling_aets=["VIEWER"],
                               memory_server__max_associations=1)
    try:
        mem = svc.call("status")["listeners"]["memory_server"]["port"]

        def echo(calling: str, called: str, port: int) -> subprocess.CompletedProcess:
            return subprocess.run([require_tool("echoscu"), "-aet", calling, "-aec", called, "127.0.0.1", str(port)],
                                  env=dcmtk_env(), capture_output=True, text=True, timeout=60)

        assert echo("VIEWER", "MODLINK_MEM", mem).returncode == 0
        refused = echo("INTRUDER", "MODLINK_MEM", mem)
        assert refused.returncode != 0 and "Calling AE Title Not Recognized" in refused.stdout + refused.stderr
        assert echo("INTRUDER", "MODLINK", svc.port).returncode == 0, "the disk server has no allow-list"
        ae = AE(ae_title="VIEWER")
        ae.add_requested_context(CTImageStorage)
        first = ae.associate("127.0.0.1", mem, ae_title="MODLINK_MEM")
        try:
            assert first.is_established
            second = ae.associate("127.0.0.1", mem, ae_title="MODLINK_MEM")
            assert second.is_rejected, "the memory server's acceptor limit of 1"
            other = ae.associate("127.0.0.1", svc.port, ae_title="MODLINK")
            assert other.is_established, "the disk server's limit is its own"
            other.release()
        finally:
            first.release()
    finally:
        svc.stop()
