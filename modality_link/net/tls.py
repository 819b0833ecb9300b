"""TLS for DICOM associations: the Non-downgrading BCP 195 TLS Secure Transport Connection
Profile (PS3.15 B.10, after B.9), with Python's `ssl` (OpenSSL).

- TLS 1.2 or later; in TLS 1.2 only the cipher suites RFC 9325 §4.2 (BCP 195) recommends:
  ephemeral (EC)DH key exchange with AES-GCM or ChaCha20-Poly1305 (TLS 1.3 has no others);
  no compression, no renegotiation.
- A listening AE presents its certificate; with a CA configured it requires the requestor's
  certificate and verifies it against that CA (PS3.15 B.10: "the peer's certificate").
- A requestor verifies the acceptor's certificate against the node's CA and the node's host
  name or IP address (RFC 9525), and presents its own certificate when it has one.
- Failures are told in one phrase naming the cause (:func:`describe_error`): an expired
  certificate, an unknown CA, a host name mismatch, a missing client certificate, a peer that
  does not speak TLS.

Where the files live and who may read them: docs/design.md "TLS".
"""

from __future__ import annotations

import os
import socket
import ssl
from dataclasses import dataclass
from pathlib import Path

#: TLS 1.2 cipher suites of RFC 9325 §4.2 (and their ChaCha20 siblings, RFC 7905); OpenSSL
#: syntax. TLS 1.3 suites are all AEAD and are not restricted by this string.
BCP195_CIPHERS = "ECDHE+AESGCM:ECDHE+CHACHA20:DHE+AESGCM:DHE+CHACHA20:!aNULL:!eNULL"

#: OpenSSL X509_V_ERR_* codes (x509_vfy.h) of a certificate that failed verification.
_VERIFY_CAUSES = {
    9: "the certificate is not yet valid",
    10: "the certificate has expired",
    18: "unknown CA (a self-signed certificate)",
    19: "unknown CA (the chain ends in a CA that is not trusted)",
    20: "unknown CA (the certificate's issuer is not trusted)",
    21: "unknown CA (the certificate's issuer is not trusted)",
    62: "host name mismatch (the certificate is not for this host name)",
    64: "host name mismatch (the certificate is not for this IP address)",
}
#: OpenSSL reason codes of an alert the peer sent, or of a handshake that could not start.
_REASON_CAUSES = {
    "SSLV3_ALERT_CERTIFICATE_EXPIRED": "the peer refused our certificate: it has expired",
    "TLSV1_ALERT_UNKNOWN_CA": "the peer refused our certificate: unknown CA",
    "SSLV3_ALERT_BAD_CERTIFICATE": "the peer refused our certificate (bad certificate)",
    "SSLV3_ALERT_UNSUPPORTED_CERTIFICATE": "the peer refused our certificate (unsupported certificate)",
    "SSLV3_ALERT_CERTIFICATE_UNKNOWN": "the peer refused our certificate (certificate unknown)",
    "TLSV13_ALERT_CERTIFICATE_REQUIRED": "the peer requires a client certificate and we have none "
                                         "(set tls_cert and tls_key)",
    "PEER_DID_NOT_RETURN_A_CERTIFICATE": "no client certificate (this port requires one)",
    "WRONG_VERSION_NUMBER": "not a TLS handshake (the peer speaks plain TCP, or an old TLS version)",
    "HTTP_REQUEST": "not a TLS handshake (an HTTP request)",
    "UNSUPPORTED_PROTOCOL": "the peer offers only a TLS version below 1.2",
    "TLSV1_ALERT_PROTOCOL_VERSION": "no common TLS version (1.2 or later required)",
    "NO_SHARED_CIPHER": "no common cipher suite (BCP 195)",
    "SSLV3_ALERT_HANDSHAKE_FAILURE": "the peer ended the handshake (no common cipher suite or certificate refused)",
}


@dataclass(frozen=True)
class Credentials:
    """One AE's TLS files, absolute paths of PEM files: its certificate (chain), its private key,
    and the CA certificates it verifies peers against ("" = none)."""

    cert: str = ""
    key: str = ""
    ca: str = ""


class TlsFileError(Exception):
    """A TLS file is missing, unreadable or wrong; `key` names the setting (tls_cert, tls_key
    or tls_ca)."""

    def __init__(self, key: str, message: str) -> None:
        super().__init__(message)
        self.key = key


def _encrypted_key() -> str:
    raise TlsFileError("tls_key", "the private key is encrypted: the service reads it unattended, "
                                  "so it must be unencrypted and protected by the file's permissions")


def _context(purpose: int, cred: Credentials) -> ssl.SSLContext:
    ctx = ssl.SSLContext(purpose)
    ctx.minimum_version = ssl.TLSVersion.TLSv1_2
    ctx.set_ciphers(BCP195_CIPHERS)
    ctx.options |= ssl.OP_NO_COMPRESSION | ssl.OP_NO_RENEGOTIATION
    if cred.cert:
        _load_identity(ctx, cred)
    elif cred.key:  # not in use before its certificate is set: checked on its own
        _private_key_file(cred.key)
    if cred.ca:
        _readable("tls_ca", cred.ca)
        try:
            ctx.load_verify_locations(cafile=cred.ca)
        except ssl.SSLError:
            raise TlsFileError("tls_ca", f"{cred.ca} holds no PEM certificate") from None
    return ctx


def _readable(key: str, path: str) -> None:
    if not Path(path).is_file():
        raise TlsFileError(key, f"{path}: no such file")
    if not os.access(path, os.R_OK):
        raise TlsFileError(key, f"{path}: cannot read it (permission denied)")


def _private_key_file(path: str) -> None:
    """A private key file exists, can be read, and is not open to every user."""
    _readable("tls_key", path)
    mode = os.stat(path).st_mode & 0o777
    if mode & 0o007:
        raise TlsFileError("tls_key", f"{path} is open to every user (mode {mode:04o}): make it 0600, "
                                      "or 0640 with the service's group")


def _load_identity(ctx: ssl.SSLContext, cred: Credentials) -> None:
    """Our certificate and private key into `ctx`, each file checked on its own first."""
    _readable("tls_cert", cred.cert)
    _private_key_file(cred.key)
    try:  # in a context of its own: the certificate must not become a trusted CA of `ctx`
        ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT).load_verify_locations(cafile=cred.cert)
    except ssl.SSLError:
        raise TlsFileError("tls_cert", f"{cred.cert} holds no PEM certificate") from None
    try:
        ctx.load_cert_chain(cred.cert, cred.key, password=_encrypted_key)
    except ssl.SSLError as exc:
        if exc.reason == "KEY_VALUES_MISMATCH":
            raise TlsFileError("tls_key", f"{cred.key} is not the private key of {cred.cert}") from None
        raise TlsFileError("tls_key", f"{cred.key} holds no PEM private key ({exc.reason})") from None


def server_context(cred: Credentials) -> ssl.SSLContext:
    """The context of a listening AE: our certificate; with a CA, a client certificate is
    required and verified against it."""
    ctx = _context(ssl.PROTOCOL_TLS_SERVER, cred)
    ctx.verify_mode = ssl.CERT_REQUIRED if cred.ca else ssl.CERT_NONE
    ctx.num_tickets = 0  # no session resumption: nothing is sent after the handshake unasked
    return ctx


def client_context(cred: Credentials) -> ssl.SSLContext:
    """The context of a requestor: the peer's certificate verified against the CA and the host
    name (``server_hostname`` when wrapping); ours presented when we have one."""
    ctx = _context(ssl.PROTOCOL_TLS_CLIENT, cred)
    ctx.check_hostname = True
    ctx.verify_mode = ssl.CERT_REQUIRED
    return ctx


def describe_error(exc: BaseException) -> str:
    """The cause of a failed TLS handshake (or of an alert right after it) in one phrase."""
    if isinstance(exc, ssl.SSLCertVerificationError):
        cause = _VERIFY_CAUSES.get(exc.verify_code or 0)
        if cause is not None:
            return f"the peer's certificate was refused: {cause}"
        return f"the peer's certificate was refused: {exc.verify_message}"
    if isinstance(exc, ssl.SSLError):
        if exc.reason in _REASON_CAUSES:
            return _REASON_CAUSES[exc.reason]
        if exc.reason:
            return f"TLS handshake failed ({exc.reason.lower().replace('_', ' ')})"
        if isinstance(exc, ssl.SSLEOFError):
            return "the peer closed the connection during the TLS handshake (it may have refused our certificate)"
        return f"TLS handshake failed ({exc})"
    if isinstance(exc, socket.timeout):
        return "no TLS handshake in time"
    if isinstance(exc, OSError):
        return f"the connection was lost during the TLS handshake ({exc.strerror or exc})"
    return f"TLS handshake failed ({exc})"


def handshake_failure(sock: socket.socket, context: ssl.SSLContext, host: str) -> str | None:
    """Why a TLS handshake as requestor on the connected `sock` fails, or why the peer refuses
    us right after it (a TLS 1.3 server sends its verdict on our certificate after the
    handshake: a short read waits for it); None when neither happens. `sock` is used up."""
    try:
        with context.wrap_socket(sock, server_hostname=host) as tls_sock:
            tls_sock.settimeout(0.5)
            try:
                if tls_sock.recv(1) == b"":
                    return "the peer closed the connection right after the TLS handshake " \
                           "(it may have refused our certificate)"
            except socket.timeout:
                pass
    except OSError as exc:  # ssl.SSLError included
        return describe_error(exc)
    return None
