"""The acceptor of the listening AEs (modality_link.net.acceptor) against hostile peers: PDU
lengths, ARTIM, pending-connection caps, unknown commands and a fuzzer. Real sockets, real files."""

from __future__ import annotations

import logging
import random
import socket
import subprocess
import threading
import time
import warnings
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

import pytest
from pydicom import dcmread
from pydicom.uid import ExplicitVRLittleEndian
from pynetdicom import AE
from pynetdicom.sop_class import CTImageStorage, Verification

from sim import images
from tests.support.acceptor import (
    RELEASE_RQ,
    LocalServer,
    associate_rq,
    c_echo_rq,
    exchange,
    local_server,
    p_data,
    pdu_types,
    rss_kib,
    statuses,
    store_stream,
)
from tests.support.instances import dataset_bytes
from tests.support.service import ServiceProcess
from tests.support.tools import dcmtk_env, require_tool
from tests.support.waiting import wait_until

A_ASSOCIATE_AC, A_RELEASE_RP, A_ABORT = 0x02, 0x06, 0x07


@pytest.fixture
def server(short_tmp: Path) -> Iterator[LocalServer]:
    srv = local_server(short_tmp)
    yield srv
    srv.stop()


@pytest.fixture(scope="module")
def small_ct(tmp_path_factory: pytest.TempPathFactory) -> list[Path]:
    return images.write_study(tmp_path_factory.mktemp("ct"), modality="CT", images=4, rows=64, columns=64, seed=21)


def test_a_4_gib_pdu_before_association_is_aborted_at_once(server: LocalServer, caplog) -> None:
    """A PDU header declaring 4 GiB where the A-ASSOCIATE-RQ belongs: A-ABORT before its body
    is read, whatever follows; memory does not grow with what is streamed."""
    caplog.set_level(logging.WARNING)
    before = rss_kib()
    block = b"\xa5" * (1 << 20)
    sent = 0
    started = time.monotonic()
    with socket.create_connection(("127.0.0.1", server.port), timeout=5) as s:
        s.sendall(b"\x01\x00\xff\xff\xff\xff")
        try:
            while sent < 256 << 20:  # keep streaming until the acceptor closes on us
                s.sendall(block)
                sent += len(block)
        except OSError:
            pass
        answer = b""
        try:
            answer = s.recv(10)
        except OSError:
            pass
    assert sent < 64 << 20, f"the acceptor kept reading ({sent >> 20} MiB)"
    assert time.monotonic() - started < 5
    assert answer == b"" or answer[0] == A_ABORT
    assert rss_kib() - before < 32 << 10
    assert any("aborted" in r.getMessage() and "127.0.0.1" in r.getMessage() and "4294967295" in r.getMessage()
               for r in caplog.records)
    assert server.faults == 0


def test_pdu_above_the_negotiated_maximum_aborts(server: LocalServer, caplog) -> None:
    caplog.set_level(logging.WARNING)
    too_long = b"\x04\x00" + (server.server.listener.max_pdu + 1).to_bytes(4, "big") + b"\x00" * 64
    got = exchange(server.port, associate_rq() + too_long)
    assert pdu_types(got) == [A_ASSOCIATE_AC, A_ABORT]
    assert any("above the negotiated maximum" in r.getMessage() for r in caplog.records)


def test_echo_unknown_command_and_release_on_raw_stream(server: LocalServer) -> None:
    """C-ECHO answered 0x0000; a command no service knows (C-FIND-RQ here) gets 0x0211 with its
    data set discarded; A-RELEASE-RQ gets A-RELEASE-RP."""
    find = bytearray(c_echo_rq(2))
    at = bytes(find).index(b"\x00\x00\x00\x01\x02\x00\x00\x00") + 8
    find[at:at + 2] = b"\x20\x00"  # C-FIND-RQ
    at = bytes(find).index(b"\x00\x00\x00\x08\x02\x00\x00\x00") + 8
    find[at:at + 2] = b"\x00\x00"  # a data set follows
    stream = (associate_rq() + p_data(1, c_echo_rq(1), True) + p_data(1, bytes(find), True)
              + p_data(1, b"\x08\x00\x52\x00\x06\x00\x00\x00STUDY ", False) + RELEASE_RQ)
    got = exchange(server.port, stream)
    assert pdu_types(got) == [A_ASSOCIATE_AC, 0x04, 0x04, A_RELEASE_RP]
    assert statuses(got) == [0x0000, 0x0211]


def test_abort_mid_data_set_leaves_nothing(server: LocalServer, small_ct: list[Path]) -> None:
    data = dataset_bytes(small_ct[0])
    uid = dcmread(small_ct[0], stop_before_pixels=True).SOPInstanceUID
    half = store_stream(data, uid)[: len(data) // 2]
    got = exchange(server.port, associate_rq() + half + b"\x07\x00\x00\x00\x00\x04\x00\x00\x00\x00")
    assert pdu_types(got) == [A_ASSOCIATE_AC]
    wait_until(lambda: not server.stray_files(), 5, "no stray file", interval=0.02)
    assert server.stray_files() == []
    assert server.archive.db.index.instance(uid) is None


def test_stored_over_raw_stream_is_durable_and_indexed(server: LocalServer, small_ct: list[Path]) -> None:
    stream = associate_rq()
    for i, f in enumerate(small_ct, 1):
        stream += store_stream(dataset_bytes(f), dcmread(f, stop_before_pixels=True).SOPInstanceUID, i)
    got = exchange(server.port, stream + RELEASE_RQ)
    assert statuses(got) == [0] * len(small_ct)
    assert pdu_types(got)[-1] == A_RELEASE_RP
    for f in small_ct:  # indexed by the time the release was answered
        row = server.archive.db.index.instance(dcmread(f, stop_before_pixels=True).SOPInstanceUID)
        assert row is not None
        assert dataset_bytes(server.archive.root / row.path) == dataset_bytes(f)
    assert server.stray_files() == []


def _trickle(port: int, stop: threading.Event, count: int, period: float) -> None:
    """`count` connections that send one byte every `period` s and never complete an
    A-ASSOCIATE-RQ; a dropped one is opened again (as a security scanner does)."""
    socks: list[socket.socket | None] = [None] * count
    while not stop.is_set():
        for i in range(count):
            s = socks[i]
            try:
                if s is None:
                    s = socks[i] = socket.create_connection(("127.0.0.1", port), timeout=1)
                s.send(b"\x01")
            except OSError:
                if s is not None:
                    s.close()
                socks[i] = None
        stop.wait(period)
    for s in socks:
        if s is not None:
            s.close()


def test_trickling_connections_do_not_lock_out_senders(short_tmp: Path, small_ct: list[Path]) -> None:
    """110 connections trickling a byte a second (never an A-ASSOCIATE-RQ) while DCMTK echoscu
    and storescu must be served: ARTIM drops them, the pending caps evict the oldest."""
    echoscu, storescu = require_tool("echoscu"), require_tool("storescu")
    svc = ServiceProcess.start(short_tmp / "h", timeouts__artim=2.0)
    stop = threading.Event()
    attacker = threading.Thread(target=_trickle, args=(svc.port, stop, 110, 1.0))
    attacker.start()
    try:
        # the trickling connections are up and ARTIM has dropped some
        wait_until(lambda: "within ARTIM" in svc.log(), 30, "ARTIM to drop a trickling connection")
        for _ in range(5):
            echo = subprocess.run([echoscu, "-to", "10", "-aec", "MODLINK", "127.0.0.1", str(svc.port)],
                                  env=dcmtk_env(), capture_output=True, text=True, timeout=60)
            assert echo.returncode == 0, echo.stdout + echo.stderr
        store = subprocess.run([storescu, "-aec", "MODLINK", "127.0.0.1", str(svc.port), *map(str, small_ct)],
                               env=dcmtk_env(), capture_output=True, text=True, timeout=60)
        assert store.returncode == 0, store.stdout + store.stderr
        assert svc.call("status")["archive"]["instances"] == len(small_ct)
    finally:
        stop.set()
        attacker.join(30)
        log = svc.log()
        svc.stop()
    assert "within ARTIM" in log
    assert "unexpected fault" not in log


def _mutate(rng: random.Random, stream: bytes) -> bytes:
    """One to four random edits of a valid stream: flipped or random bytes, extreme length
    fields, cut, duplicated or dropped spans, inserted noise."""
    data = bytearray(stream)
    for _ in range(rng.randint(1, 4)):
        op = rng.randrange(7)
        at = rng.randrange(len(data)) if data else 0
        if op == 0 and data:
            data[at] ^= 1 << rng.randrange(8)
        elif op == 1 and data:
            data[at] = rng.randrange(256)
        elif op == 2:
            data[at:at + 4] = rng.choice([b"\xff\xff\xff\xff", b"\x00\x00\x00\x00", b"\x7f\xff\xff\xff",
                                          b"\x00\x01\x00\x00", b"\x00\x00\x00\x01"])
        elif op == 3:
            del data[at:]
        elif op == 4:
            n = rng.randint(1, 512)
            data[at:at] = data[at:at + n]
        elif op == 5:
            del data[at:at + rng.randint(1, 512)]
        else:
            data[at:at] = rng.randbytes(rng.randint(1, 64))
    return bytes(data)


def _fuzz(server: LocalServer, small_ct: list[Path], count: int, seed: int) -> None:
    ds = dataset_bytes(small_ct[0])
    uid = dcmread(small_ct[0], stop_before_pixels=True).SOPInstanceUID
    seeds = [
        associate_rq() + p_data(1, c_echo_rq(), True) + RELEASE_RQ,
        associate_rq() + store_stream(ds, uid) + RELEASE_RQ,
        associate_rq(max_pdu=0) + store_stream(ds, uid) + p_data(1, c_echo_rq(2), True) + RELEASE_RQ,
    ]
    before = rss_kib()
    failures: list[str] = []
    completed: list[int] = []  # associations the well-behaved peer finished
    stop = threading.Event()
    good = images.make_study("CT", images=1, rows=32, columns=32, seed=22)[0]

    def well_behaved() -> None:  # a parallel association that must not notice the fuzzer
        ae = AE(ae_title="GOOD")
        ae.add_requested_context(Verification)
        ae.add_requested_context(CTImageStorage, ExplicitVRLittleEndian)
        while not stop.is_set():
            assoc = ae.associate("127.0.0.1", server.port, ae_title="MODLINK")
            if not assoc.is_established:
                failures.append("association refused")
                return
            for _ in range(5):
                if int(assoc.send_c_echo().Status) != 0 or int(assoc.send_c_store(good).Status) != 0:
                    failures.append("an operation failed")
            assoc.release()
            completed.append(1)

    t = threading.Thread(target=well_behaved)
    t.start()
    rng = random.Random(seed)
    try:
        for _ in range(count):
            exchange(server.port, _mutate(rng, rng.choice(seeds)), timeout=3)
    finally:
        stop.set()
        t.join(60)
    assert failures == []
    assert len(completed) >= 2, "the well-behaved association made no progress"
    assert server.faults == 0
    wait_until(lambda: not server.stray_files(), 10, "no stray file")
    assert server.stray_files() == []
    assert rss_kib() - before < 64 << 10
    # Still serving afterwards.
    assert statuses(exchange(server.port, associate_rq() + p_data(1, c_echo_rq(), True) + RELEASE_RQ)) == [0]


@contextmanager
def _quiet() -> Iterator[None]:
    """Thousands of refusals: no log records and no warnings are kept (pytest holds every record
    in memory, which the RSS bound would count)."""
    logging.disable(logging.CRITICAL)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            yield
    finally:
        logging.disable(logging.NOTSET)


def test_fuzz_the_acceptor(server: LocalServer, small_ct: list[Path]) -> None:
    with _quiet():
        _fuzz(server, small_ct, 2500, seed=1)


@pytest.mark.slow
def test_fuzz_the_acceptor_long(server: LocalServer, small_ct: list[Path]) -> None:
    with _quiet():
        _fuzz(server, small_ct, 20000, seed=2)


def test_parallel_associations_into_one_series(server: LocalServer, tmp_path: Path) -> None:
    """Three associations store instances of one series at once: they share the series
    folder's directory fsync (group commit) and every C-STORE succeeds."""
    study = images.write_study(tmp_path / "s", modality="CT", images=90, rows=256, columns=256, seed=23)
    results: list[list[int]] = []

    def sender(files: list[Path]) -> None:
        stream = associate_rq()
        for i, f in enumerate(files, 1):
            stream += store_stream(dataset_bytes(f), dcmread(f, stop_before_pixels=True).SOPInstanceUID, i)
        results.append(statuses(exchange(server.port, stream + RELEASE_RQ, timeout=30)))

    threads = [threading.Thread(target=sender, args=(study[i::3],)) for i in range(3)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    assert sorted(results) == [[0] * 30] * 3
    assert len(server.archive.db.index.studies()) == 1
    assert server.archive.db.index.studies()[0].instances == 90
    assert server.stray_files() == []


def test_artim_closes_a_peer_that_stays_after_release(server: LocalServer) -> None:
    """After A-RELEASE-RP the requestor must close (PS3.8 §9.1.5); one that stays is closed by
    us when ARTIM (1 s here) expires, and meanwhile it holds no association."""
    acceptor = server.server.acceptor
    with socket.create_connection(("127.0.0.1", server.port), timeout=5) as s:
        s.sendall(associate_rq() + RELEASE_RQ)
        got = b""
        while chunk := s.recv(65536):  # we half-close after A-RELEASE-RP
            got += chunk
        released = time.monotonic()
        assert pdu_types(got) == [A_ASSOCIATE_AC, A_RELEASE_RP]
        assert acceptor.associations == 0
        assert len(acceptor._conns) == 1  # still waiting for the peer's close
        wait_until(lambda: not acceptor._conns, 5, "ARTIM to close the connection", interval=0.02)
        waited = time.monotonic() - released
    assert acceptor._conns == []
    assert 0.7 < waited < 2.5


@pytest.mark.parametrize(("edit", "rj"), [
    (lambda rq: rq[:6] + b"\x00\x02" + rq[8:], (1, 2, 2)),  # protocol version 2
    (lambda rq: rq.replace(b"1.2.840.10008.3.1.1.1", b"1.2.840.10008.3.1.1.2"), (1, 1, 2)),  # app context
    (lambda rq: rq.replace(b"MODLINK ", b"SOMEONE "), (1, 1, 7)),  # called AE title
], ids=["protocol-version", "application-context", "called-ae"])
def test_reject_reasons(server: LocalServer, edit, rj: tuple[int, int, int]) -> None:
    """A-ASSOCIATE-RJ with the result, source and reason of PS3.8 Table 9-21."""
    got = exchange(server.port, edit(associate_rq()))
    assert pdu_types(got) == [0x03]
    assert tuple(got[7:10]) == rj
    assert server.server.acceptor.associations == 0


def test_a_released_association_no_longer_counts_toward_the_limit(short_tmp: Path) -> None:
    """With max_associations = 1, the next association right after an A-RELEASE-RP is accepted:
    the released one stops counting before the requestor learns it is released."""
    server = local_server(short_tmp / "s", max_associations=1)
    try:
        ae = AE(ae_title="AGAIN")
        ae.add_requested_context(Verification)
        for n in range(100):
            assoc = ae.associate("127.0.0.1", server.port, ae_title="MODLINK")
            assert assoc.is_established, f"association {n + 1} refused after the previous one's release"
            assoc.release()
    finally:
        server.stop()
