"""Certificates for the TLS tests, made with the `openssl` command line (OpenSSL's own CA tool,
``openssl ca``, so that validity dates in the past can be set): two unrelated CAs, and
certificates they issue for a host name, an IP address or a client."""

from __future__ import annotations

import os
import subprocess
from dataclasses import dataclass
from pathlib import Path

from tests.support.tools import require_tool

_CA_CONFIG = """\
[ca]
default_ca = test
[test]
database = {db}/index.txt
new_certs_dir = {db}
serial = {db}/serial
default_md = sha256
policy = any
unique_subject = no
[any]
commonName = supplied
[server]
basicConstraints = critical, CA:FALSE
keyUsage = critical, digitalSignature, keyEncipherment
extendedKeyUsage = serverAuth, clientAuth
subjectAltName = {san}
[client]
basicConstraints = critical, CA:FALSE
keyUsage = critical, digitalSignature, keyEncipherment
extendedKeyUsage = clientAuth
"""


@dataclass(frozen=True)
class KeyPair:
    """A certificate and its private key (PEM files, the key 0600)."""

    cert: Path
    key: Path


def _openssl(*args: str) -> None:
    proc = subprocess.run([require_tool("openssl"), *args], capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stderr


class TestCA:
    """A certification authority in `folder`: its certificate is ``ca.pem``."""

    __test__ = False  # not a test class for pytest

    def __init__(self, folder: Path, name: str) -> None:
        self.folder = folder
        folder.mkdir(parents=True)
        (folder / "db").mkdir()
        (folder / "db" / "index.txt").write_text("")
        (folder / "db" / "serial").write_text("1000\n")
        self.cert, self.key = folder / "ca.pem", folder / "ca.key"
        _openssl("req", "-x509", "-newkey", "rsa:2048", "-nodes", "-keyout", str(self.key), "-out",
                 str(self.cert), "-days", "30", "-subj", f"/CN={name}",
                 "-addext", "basicConstraints=critical,CA:TRUE", "-addext", "keyUsage=critical,keyCertSign,cRLSign")

    def issue(self, name: str, *, san: str = "", client: bool = False,
              start: str | None = None, end: str | None = None) -> KeyPair:
        """A certificate for CN `name`: a server's (and client's) with subjectAltName `san`
        ("IP:127.0.0.1,DNS:localhost"), or a client's only; valid 30 days from now, or from
        `start` to `end` (YYYYMMDDHHMMSSZ)."""
        key, csr, cert = (self.folder / f"{name}.{ext}" for ext in ("key", "csr", "pem"))
        _openssl("req", "-new", "-newkey", "rsa:2048", "-nodes", "-keyout", str(key), "-out", str(csr),
                 "-subj", f"/CN={name}")
        os.chmod(key, 0o600)
        config = self.folder / f"{name}.cnf"
        config.write_text(_CA_CONFIG.format(db=self.folder / "db", san=san or f"DNS:{name}"))
        dates = ["-startdate", start, "-enddate", end] if start and end else ["-days", "30"]
        _openssl("ca", "-batch", "-notext", "-config", str(config), "-cert", str(self.cert), "-keyfile",
                 str(self.key), "-in", str(csr), "-out", str(cert), "-extensions", "client" if client else "server",
                 *dates)
        return KeyPair(cert, key)
