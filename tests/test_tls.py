"""TLS (PS3.15 B.10, docs/design.md "TLS") against DCMTK's TLS tools, both directions.

DCMTK storescu and echoscu ``+tls`` into our disk and memory servers; our send job and our
C-ECHO to storescp ``+tls``. Refused, each with its cause named: a plain-TCP storescu, a client
without a certificate, a client certificate of another CA, an expired one (our listener's
log); a server certificate that expired, of another CA, for another host (our job's and echo's
failure). A slow TLS handshake does not hold up other requestors, and ARTIM ends it. The
configuration refuses TLS files that are missing, do not load, or do not belong together.
Certificates are made by the tests with openssl (:mod:`tests.support.certificates`).
"""

from __future__ import annotations

import re
import shutil
import socket
import subprocess
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator

import pytest

from modality_link import config
from modality_link.home import Home, free_port, temporary_home
from modality_link.net import tls
from sim import images
from tests.support.certificates import KeyPair, TestCA
from tests.support.peers import start_orthanc, start_storescp
from tests.support.service import InProcessService, call, wait_chain
from tests.support.tools import dcmtk_env, require_tool
from tests.support.waiting import wait_until

pytestmark = pytest.mark.interop

LOCAL = "IP:127.0.0.1,DNS:localhost"


@dataclass(frozen=True)
class Pki:
    """A CA and the certificates it issued; another CA unrelated to it, and one of its."""

    ca: Path
    other_ca: Path
    server: KeyPair  # 127.0.0.1 and localhost
    client: KeyPair
    expired: KeyPair  # 127.0.0.1 and localhost, January 2020
    wronghost: KeyPair  # pacs.invalid only
    stranger: KeyPair  # 127.0.0.1 and localhost, from the other CA


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> Pki:
    require_tool("openssl")
    root = tmp_path_factory.mktemp("pki")
    ca, other = TestCA(root / "ca", "modality_link test CA"), TestCA(root / "other", "unrelated CA")
    return Pki(
        ca=ca.cert, other_ca=other.cert,
        server=ca.issue("server", san=LOCAL), client=ca.issue("client", client=True),
        expired=ca.issue("expired", san=LOCAL, start="20200101000000Z", end="20200201000000Z"),
        wronghost=ca.issue("wronghost", san="DNS:pacs.invalid"), stranger=other.issue("stranger", san=LOCAL),
    )


@pytest.fixture(scope="module")
def study(tmp_path_factory: pytest.TempPathFactory) -> list[Path]:
    return images.write_study(tmp_path_factory.mktemp("ct"), modality="CT", images=3, rows=64, columns=64, seed=5)


def dcmtk_tls(pair: KeyPair, ca: Path) -> list[str]:
    """DCMTK's TLS options: our key and certificate, the CA the peer's certificate is verified
    against (DCMTK's default: a peer certificate is required)."""
    return ["+tls", str(pair.key), str(pair.cert), "+cf", str(ca)]


def run(tool: str, *args: Any) -> subprocess.CompletedProcess:
    return subprocess.run([require_tool(tool), *map(str, args)], env=dcmtk_env(), capture_output=True,
                          text=True, timeout=60)


def tls_listeners(pki: Pki) -> dict[str, Any]:
    """Settings for temporary_home: both listening AEs in TLS, client certificates required."""
    settings: dict[str, Any] = {}
    for section in ("disk_server", "memory_server"):
        settings |= {f"{section}__tls_cert": str(pki.server.cert), f"{section}__tls_key": str(pki.server.key),
                     f"{section}__tls_ca": str(pki.ca)}
    return settings


@pytest.fixture
def tls_service(short_tmp: Path, pki: Pki) -> Iterator[InProcessService]:
    svc = InProcessService(temporary_home(short_tmp / "home", **tls_listeners(pki)))
    yield svc
    svc.stop()


def log_of(home: Home) -> str:
    return (home.log_dir / "modality-link.log").read_text(encoding="utf-8")


def wait_logged(home: Home, pattern: str) -> str:
    """The first line of the service's log matching `pattern` (waited for, 10 s)."""
    def found() -> str:
        match = re.search(pattern, log_of(home))
        return match.group(0) if match else ""

    return wait_until(found, 10, f"a log line matching {pattern!r}")


# -- our listening AEs --------------------------------------------------------------------------


def test_dcmtk_tls_into_disk_and_memory_server(tls_service: InProcessService, pki: Pki, study: list[Path]) -> None:
    cfg = config.load(tls_service.home.config_path)
    client = dcmtk_tls(pki.client, pki.ca)
    disk, mem = cfg.disk_server.port, cfg.memory_server.port
    store = run("storescu", *client, "-aec", "MODLINK", "127.0.0.1", disk, *study)
    assert store.returncode == 0, store.stderr
    (row,) = call(tls_service.home, "studies.list")
    assert row["instances"] == len(study)
    store = run("storescu", *client, "-aec", "MODLINK_MEM", "127.0.0.1", mem, *study)
    assert store.returncode == 0, store.stderr
    assert call(tls_service.home, "memory.list")["instances"] == len(study)
    echo = run("echoscu", *client, "-aec", "MODLINK", "127.0.0.1", disk)
    assert echo.returncode == 0, echo.stderr
    assert "refused" not in log_of(tls_service.home)


def test_refused_clients_are_logged_with_their_cause(tls_service: InProcessService, pki: Pki,
                                                     study: list[Path]) -> None:
    home = tls_service.home
    port = config.load(home.config_path).disk_server.port
    peer = r"TLS connection from 127\.0\.0\.1:\d+ refused: "

    plain = run("storescu", "-aec", "MODLINK", "127.0.0.1", port, *study)
    assert plain.returncode != 0
    wait_logged(home, peer + r"not a TLS handshake \(the requestor speaks plain TCP\)")

    stranger = run("storescu", *dcmtk_tls(pki.stranger, pki.ca), "-aec", "MODLINK", "127.0.0.1", port, *study)
    assert stranger.returncode != 0
    wait_logged(home, peer + r"the peer's certificate was refused: unknown CA")

    expired = run("storescu", *dcmtk_tls(pki.expired, pki.ca), "-aec", "MODLINK", "127.0.0.1", port, *study)
    assert expired.returncode != 0
    wait_logged(home, peer + r"the peer's certificate was refused: the certificate has expired")

    # DCMTK that does not trust our certificate: its alert is the cause we log
    distrust = run("echoscu", *dcmtk_tls(pki.client, pki.other_ca), "-aec", "MODLINK", "127.0.0.1", port)
    assert distrust.returncode != 0
    wait_logged(home, peer + r"the peer refused our certificate")

    # requestors without a certificate: DCMTK's anonymous TLS, and our own C-ECHO with a CA but
    # no tls_cert, which names the cause the port's alert gives
    anonymous = run("echoscu", "+tla", "-ic", "-aec", "MODLINK", "127.0.0.1", port)
    assert anonymous.returncode != 0
    wait_logged(home, peer + r"no client certificate \(this port requires one\)")
    node = config.Node(ae_title="MODLINK", host="127.0.0.1", port=port, tls_ca=str(pki.ca))
    result = _echo(node)
    assert not result.ok and "requires a client certificate" in result.message, result.message

    assert call(home, "studies.list") == []
    assert tls_service.service.disk_server is not None and tls_service.service.disk_server.acceptor.faults == 0


def test_a_slow_handshake_holds_up_no_one_and_artim_ends_it(short_tmp: Path, pki: Pki) -> None:
    svc = InProcessService(temporary_home(short_tmp / "home", timeouts__artim=5.0, **tls_listeners(pki)))
    try:
        port = config.load(svc.home.config_path).disk_server.port
        ended = r"TLS connection from 127\.0\.0\.1:\d+ refused: TLS handshake not complete within ARTIM \(5 s\)"
        with socket.create_connection(("127.0.0.1", port)) as stalled:
            stalled.sendall(b"\x16\x03\x01")  # the start of a TLS record, then nothing
            echo = run("echoscu", *dcmtk_tls(pki.client, pki.ca), "-aec", "MODLINK", "127.0.0.1", port)
            assert echo.returncode == 0, echo.stderr
            assert not re.search(ended, log_of(svc.home)), "the echo waited for the stalled handshake to end"
            wait_logged(svc.home, ended)
    finally:
        svc.stop()


# -- our requestors -----------------------------------------------------------------------------


def _echo(node: config.Node) -> Any:
    from modality_link.net.echo import echo

    return echo("PACS", node, "MODLINK", config.Timeouts(connect=5, acse=5))


@pytest.fixture
def storescp_tls(tmp_path: Path) -> Iterator[Any]:
    """Start DCMTK storescp +tls with a server key pair (a peer certificate signed by `ca`
    required): (port, output folder)."""
    procs: list[subprocess.Popen] = []

    def start(pair: KeyPair, ca: Path) -> tuple[int, Path]:
        out = tmp_path / f"scp{len(procs)}"
        out.mkdir()
        port = free_port()
        procs.append(start_storescp(out, port, *dcmtk_tls(pair, ca)))
        return port, out

    yield start
    for proc in procs:
        proc.terminate()
        proc.wait()


def test_send_and_echo_to_storescp_tls(short_tmp: Path, pki: Pki, study: list[Path], storescp_tls: Any) -> None:
    port, out = storescp_tls(pki.server, pki.ca)
    node = config.Node(ae_title="STORESCP", host="127.0.0.1", port=port, roles=["store"], retries=0,
                       tls_cert=str(pki.client.cert), tls_key=str(pki.client.key), tls_ca=str(pki.ca))
    home = temporary_home(short_tmp / "home", nodes={"PACS": node}, logging__level="DEBUG")
    svc = InProcessService(home)
    try:
        (echo,) = call(home, "nodes.echo", name="PACS")
        assert echo["ok"], echo
        call(home, "archive.import", paths=[str(p) for p in study])
        uid = call(home, "studies.list")[0]["study_uid"]
        job = wait_chain(home, call(home, "send", study_uids=[uid], node="PACS")["job_id"], 60)
        assert job["state"] == "done" and job["done"] == len(study), job
        assert len([f for f in out.iterdir() if f.is_file()]) == len(study)
        # the TLS association kept open after the job (idle_release) serves the next one
        job = wait_chain(home, call(home, "send", study_uids=[uid], node="PACS")["job_id"], 60)
        assert job["state"] == "done" and job["done"] == len(study), job
        assert "reusing the open association to STORESCP@127.0.0.1" in log_of(home)
    finally:
        svc.stop()
        shutil.rmtree(home.root, ignore_errors=True)


@pytest.mark.parametrize(("server", "ours", "cause"), [
    ("expired", "client", "the peer's certificate was refused: the certificate has expired"),
    ("stranger", "client", "the peer's certificate was refused: unknown CA"),
    ("wronghost", "client", "the peer's certificate was refused: host name mismatch"),
    ("server", "stranger", "the peer refused our certificate"),
])
def test_requestor_failures_name_the_cause(short_tmp: Path, pki: Pki, study: list[Path], storescp_tls: Any,
                                           server: str, ours: str, cause: str) -> None:
    """Our send job and our C-ECHO against storescp +tls that we must refuse, or that refuses us."""
    port, out = storescp_tls(getattr(pki, server), pki.ca)
    pair = getattr(pki, ours)
    node = config.Node(ae_title="STORESCP", host="127.0.0.1", port=port, roles=["store"], retries=0,
                       tls_cert=str(pair.cert), tls_key=str(pair.key), tls_ca=str(pki.ca))
    result = _echo(node)
    assert not result.ok and cause in result.message, result.message
    home = temporary_home(short_tmp / "home", nodes={"PACS": node})
    svc = InProcessService(home)
    try:
        call(home, "archive.import", paths=[str(p) for p in study])
        uid = call(home, "studies.list")[0]["study_uid"]
        job = wait_chain(home, call(home, "send", study_uids=[uid], node="PACS")["job_id"], 60)
        assert job["state"] == "failed" and cause in job["last_error"], job
        assert not [f for f in out.iterdir() if f.is_file()]
    finally:
        svc.stop()
        shutil.rmtree(home.root, ignore_errors=True)


def test_commitment_with_orthanc_in_tls_both_ways(short_tmp: Path, pki: Pki, study: list[Path]) -> None:
    """Send and Storage Commitment to Orthanc in TLS; its N-EVENT-REPORT comes back on an
    association of its own to our disk server, in TLS because the disk server is (PS3.4 J.3.3)."""
    orthanc = start_orthanc(short_tmp / "orthanc", settings={
        "DicomTlsEnabled": True, "DicomTlsCertificate": str(pki.server.cert),
        "DicomTlsPrivateKey": str(pki.server.key), "DicomTlsTrustedCertificates": str(pki.ca),
        "DicomTlsRemoteCertificateRequired": True,
    })
    node = config.Node(ae_title="ORTHANC", host="127.0.0.1", port=orthanc.dicom_port, roles=["store", "commit"],
                       retries=0, commit_wait=0.5, commit_timeout=30.0, tls_cert=str(pki.client.cert),
                       tls_key=str(pki.client.key), tls_ca=str(pki.ca))
    home = temporary_home(short_tmp / "home", nodes={"PACS": node}, logging__level="DEBUG", **tls_listeners(pki))
    cfg = config.load(home.config_path)
    orthanc.allow(cfg.disk_server.ae_title, cfg.disk_server.port, tls=True)
    svc = InProcessService(home)
    try:
        call(home, "archive.import", paths=[str(p) for p in study])
        uid = call(home, "studies.list")[0]["study_uid"]
        job = wait_chain(home, call(home, "send", study_uids=[uid], node="PACS", commit=True)["job_id"], 60)
        assert job["kind"] == "commit" and job["state"] == "done", job
        assert call(home, "studies.list")[0]["nodes"]["PACS"] == {"sent": len(study), "committed": len(study)}
        assert "refused" not in log_of(home)
        # the only association the disk server had: Orthanc's report, with Orthanc's certificate
        assert re.search(r"disk server: TLS from 127\.0\.0\.1:\d+ \(TLSv1\.[23]\), client certificate .*server",
                         log_of(home))
    finally:
        svc.stop()
        orthanc.stop()


# -- configuration ------------------------------------------------------------------------------


def test_configuration_refuses_tls_files_that_do_not_fit(tmp_path: Path, pki: Pki) -> None:
    def listener(**tls: Any) -> None:
        config.Listener(**tls).validate("disk_server")

    def node(**tls: Any) -> None:
        config.Node(ae_title="PACS", **tls).validate("nodes.PACS")

    server, client = pki.server, pki.client
    with pytest.raises(config.ConfigError, match=r"^disk_server\.tls_key: .* is not the private key of "):
        listener(tls_cert=str(server.cert), tls_key=str(client.key))
    with pytest.raises(config.ConfigError, match=r"^disk_server\.tls_cert: /nowhere/cert\.pem: no such file"):
        listener(tls_cert="/nowhere/cert.pem", tls_key=str(server.key))
    with pytest.raises(config.ConfigError, match=r"^disk_server\.tls_cert: an absolute path"):
        listener(tls_cert="cert.pem", tls_key=str(server.key))
    with pytest.raises(config.ConfigError, match=r"^disk_server\.tls_cert: set tls_key .* first"):
        listener(tls_cert=str(server.cert))
    with pytest.raises(config.ConfigError, match=r"^disk_server\.tls_cert: .* holds no PEM certificate"):
        listener(tls_cert=str(server.key), tls_key=str(server.key))
    with pytest.raises(config.ConfigError, match=r"^nodes\.PACS\.tls_ca: .* holds no PEM certificate"):
        node(tls_ca=str(client.key))
    with pytest.raises(config.ConfigError, match=r"^nodes\.PACS\.tls_cert: set tls_ca .* first"):
        node(tls_cert=str(client.cert), tls_key=str(client.key))
    open_key = tmp_path / "open.key"
    shutil.copy(client.key, open_key)
    open_key.chmod(0o644)
    with pytest.raises(config.ConfigError, match=r"^nodes\.PACS\.tls_key: .* is open to every user \(mode 0644\)"):
        node(tls_cert=str(client.cert), tls_key=str(open_key), tls_ca=str(pki.ca))
    with pytest.raises(config.ConfigError, match=r"^disk_server\.tls_key: .* is open to every user"):
        listener(tls_key=str(open_key))  # checked before its certificate is set, too
    encrypted = tmp_path / "encrypted.key"
    subprocess.run([require_tool("openssl"), "pkey", "-in", str(client.key), "-aes256", "-passout", "pass:secret",
                    "-out", str(encrypted)], check=True, capture_output=True)
    encrypted.chmod(0o600)
    with pytest.raises(config.ConfigError, match=r"^nodes\.PACS\.tls_key: the private key is encrypted"):
        node(tls_cert=str(client.cert), tls_key=str(encrypted), tls_ca=str(pki.ca))
    # the valid combinations
    listener(tls_cert=str(server.cert), tls_key=str(server.key))
    listener(tls_cert=str(server.cert), tls_key=str(server.key), tls_ca=str(pki.ca))
    node(tls_ca=str(pki.ca))
    node(tls_cert=str(client.cert), tls_key=str(client.key), tls_ca=str(pki.ca))


def test_config_set_enables_tls_one_key_at_a_time(tmp_path: Path, pki: Pki) -> None:
    """`config set` changes one key at a time: the certificate comes last, and a refused value
    leaves the file as it was."""
    path = tmp_path / "config.toml"
    config.save(config.Config(), path)
    before = path.read_bytes()
    with pytest.raises(config.ConfigError, match=r"^memory_server\.tls_cert: set tls_key"):
        config.set_value(path, "memory_server.tls_cert", str(pki.server.cert))
    with pytest.raises(config.ConfigError, match=r"^memory_server\.tls_key: /nowhere\.key: no such file"):
        config.set_value(path, "memory_server.tls_key", "/nowhere.key")
    assert path.read_bytes() == before
    config.set_value(path, "memory_server.tls_key", str(pki.server.key))
    config.set_value(path, "memory_server.tls_ca", str(pki.ca))
    assert config.load(path).memory_server.tls() is None  # plain TCP until the certificate is set
    with pytest.raises(config.ConfigError, match=r"^memory_server\.tls_key: .* is not the private key of "):
        config.set_value(path, "memory_server.tls_cert", str(pki.client.cert))
    config.set_value(path, "memory_server.tls_cert", str(pki.server.cert))
    assert config.load(path).memory_server.tls() == tls.Credentials(
        str(pki.server.cert), str(pki.server.key), str(pki.ca))
