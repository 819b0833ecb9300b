"""The service's configuration: one TOML file in the home folder, validated by dataclasses.

Every value a service engineer may set lives here with its default and its rule. A value that
breaks a rule is refused with a sentence naming the key and the rule (:class:`ConfigError`), and
the file on disk is never changed by a refused edit. Why each default is what it is:
docs/design.md "Configuration defaults".

AE titles follow PS3.5 §6.2 (VR AE): at most 16 characters of the default character repertoire,
no backslash, no control characters, not all spaces. Values that go into DICOM text (the station's
name, VR SH; its institution, VR LO) follow their VR; host names follow RFC 1123 or are IP
addresses. Every other text (a folder, a drive) may hold any Unicode character but NUL: the file
is written by `tomlkit`, which escapes what TOML must escape and keeps the service engineer's
comments and layout (docs/design.md "Files and permissions").
"""

from __future__ import annotations

import dataclasses
import grp
import ipaddress
import os
import re
import tomllib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import tomlkit

from modality_link.home import CONFIG_FILE  # noqa: F401 (the home folder layout owns the name)
from modality_link.net.tls import Credentials, TlsFileError, client_context, server_context

ROLES = ("worklist", "mpps", "store", "commit", "qr")
#: Transfer syntaxes a node may be configured to receive (PS3.5 §10; UIDs from PS3.6 Annex A).
KNOWN_TRANSFER_SYNTAXES = (
    "1.2.840.10008.1.2.1", "1.2.840.10008.1.2", "1.2.840.10008.1.2.2", "1.2.840.10008.1.2.1.99",
    "1.2.840.10008.1.2.5", "1.2.840.10008.1.2.4.50", "1.2.840.10008.1.2.4.51",
    "1.2.840.10008.1.2.4.57", "1.2.840.10008.1.2.4.70", "1.2.840.10008.1.2.4.80",
    "1.2.840.10008.1.2.4.81", "1.2.840.10008.1.2.4.90", "1.2.840.10008.1.2.4.91",
)
FAILURE_POLICIES = ("stop", "continue")
AUTO_SEND_RULES = ("none", "exam", "series")
MODALITIES = ("CT", "MR")
_NODE_NAME = re.compile(r"^[A-Za-z0-9_.-]{1,32}$")


class ConfigError(ValueError):
    """A configuration value broke a rule; the message names the key and the rule."""


def check_ae_title(key: str, value: Any) -> str:
    """Return `value` if it is a valid AE title (PS3.5 §6.2, VR AE), else raise ConfigError."""
    if not isinstance(value, str):
        raise ConfigError(f"{key}: an AE title must be a string, not {value!r}")
    if not value.strip():
        raise ConfigError(f"{key}: an AE title must not be empty or all spaces")
    if len(value) > 16:
        raise ConfigError(f"{key}: an AE title has at most 16 characters, {value!r} has {len(value)}")
    if "\\" in value:
        raise ConfigError(f"{key}: an AE title must not contain a backslash")
    if any(ord(c) < 0x20 or ord(c) > 0x7E for c in value):
        raise ConfigError(f"{key}: an AE title uses printable ASCII only (no control characters)")
    return value


def check_text(key: str, value: Any) -> str:
    """Every text value: a string of Unicode characters that UTF-8 can hold (no lone
    surrogates, which a command line gives for bytes that are not UTF-8), without NUL."""
    if not isinstance(value, str):
        raise ConfigError(f"{key}: must be text, not {value!r}")
    try:
        value.encode("utf-8")
    except UnicodeEncodeError:
        raise ConfigError(f"{key}: {value!r} is not valid Unicode text (bytes that are not UTF-8?)") from None
    if "\0" in value:
        raise ConfigError(f"{key}: must not contain a NUL character")
    return value


def _check_dicom_text(key: str, value: Any, vr: str, max_length: int) -> str:
    """A value that goes into a DICOM element of VR SH or LO (PS3.5 §6.2): at most `max_length`
    characters, no backslash (the value delimiter), no control characters (below 0x20, DEL,
    0x80-0x9F)."""
    check_text(key, value)
    if len(value) > max_length:
        raise ConfigError(f"{key}: at most {max_length} characters (VR {vr}), {value!r} has {len(value)}")
    if "\\" in value:
        raise ConfigError(f"{key}: must not contain a backslash (VR {vr})")
    if any(ord(c) < 0x20 or 0x7F <= ord(c) <= 0x9F for c in value):
        raise ConfigError(f"{key}: must not contain control characters (VR {vr}), not {value!r}")
    return value


_HOST_LABEL = re.compile(r"[A-Za-z0-9_](?:[A-Za-z0-9_-]{0,61}[A-Za-z0-9_])?")


def check_host(key: str, value: Any) -> str:
    """A host name (RFC 1123: labels of letters, digits and '-', at most 253 characters) or an
    IPv4 or IPv6 address."""
    check_text(key, value)
    try:
        ipaddress.ip_address(value)
        return value
    except ValueError:
        pass
    labels = value.removesuffix(".").split(".")
    if not value or len(value) > 253 or not all(_HOST_LABEL.fullmatch(label) for label in labels):
        raise ConfigError(f"{key}: a host name (letters, digits, '-' and '.') or an IP address, not {value!r}")
    return value


def _check_group(key: str, value: Any) -> str:
    """'' or the name of a Unix group of this machine."""
    check_text(key, value)
    if value:
        try:
            grp.getgrnam(value)
        except KeyError:
            raise ConfigError(f"{key}: no group {value!r} on this machine (create it, or leave the key empty)") from None
    return value


def _check_strings(key: str, value: Any) -> None:
    """:func:`check_text` for every text of a value (a string or a list of strings)."""
    if isinstance(value, str):
        check_text(key, value)
    elif isinstance(value, list):
        for i, item in enumerate(value):
            if isinstance(item, str):
                check_text(f"{key}[{i}]", item)


def _check_port(key: str, value: Any) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or not 1 <= value <= 65535:
        raise ConfigError(f"{key}: a TCP port is a whole number from 1 to 65535, not {value!r}")
    return value


def _check_range(key: str, value: Any, low: float, high: float, kind: type = int) -> Any:
    ok = isinstance(value, (int, float) if kind is float else int) and not isinstance(value, bool)
    if not ok or not low <= value <= high:
        what = "a number" if kind is float else "a whole number"
        raise ConfigError(f"{key}: must be {what} from {low} to {high}, not {value!r}")
    return value


def _check_max_pdu(key: str, value: Any) -> int:
    """0 means unlimited (PS3.8 D.1); otherwise at least 2048 (docs/design.md "Configuration
    defaults")."""
    if isinstance(value, bool) or not isinstance(value, int) or not (
        value == 0 or 2048 <= value <= 0xFFFFFFFF
    ):
        raise ConfigError(
            f"{key}: the maximum PDU length is 0 (unlimited) or from 2048 to 4294967295, not {value!r}"
        )
    return value


def _check_tls(prefix: str, cert: Any, key: Any, ca: Any, listening: bool) -> None:
    """TLS files of a listening AE or of a node (docs/design.md "TLS"): absolute paths; a
    certificate only with its private key, a node's only with the CA its peer is verified
    against (so that `config set` enables TLS by setting tls_cert last); each file set exists
    and loads, the key matches the certificate and is not open to every user."""
    for name, path in (("tls_cert", cert), ("tls_key", key), ("tls_ca", ca)):
        if not isinstance(path, str):
            raise ConfigError(f"{prefix}.{name}: the path of a PEM file ('' for none), not {path!r}")
        if path and not os.path.isabs(path):
            raise ConfigError(f"{prefix}.{name}: an absolute path, not {path!r}")
    if cert and not key:
        raise ConfigError(f"{prefix}.tls_cert: set tls_key (the certificate's private key) first")
    if cert and not ca and not listening:
        raise ConfigError(f"{prefix}.tls_cert: set tls_ca (the CA certificates the node's certificate is "
                          "verified against) first")
    if not (cert or key or ca):
        return
    try:
        (server_context if listening else client_context)(Credentials(cert, key, ca))
    except TlsFileError as exc:
        raise ConfigError(f"{prefix}.{exc.key}: {exc}") from None


@dataclass
class Station:
    """The scanner itself: the calling AE title of every SCU and the modality it acquires."""

    ae_title: str = "MODLINK"
    modality: str = "CT"
    name: str = "CT01"
    institution: str = ""

    def validate(self, prefix: str) -> None:
        check_ae_title(f"{prefix}.ae_title", self.ae_title)
        if self.modality not in MODALITIES:
            raise ConfigError(f"{prefix}.modality: one of {', '.join(MODALITIES)}, not {self.modality!r}")
        _check_dicom_text(f"{prefix}.name", self.name, "SH", 16)
        _check_dicom_text(f"{prefix}.institution", self.institution, "LO", 64)


@dataclass
class Listener:
    """A listening AE (PS3.8 §9): disk server or memory server.

    The disk server answers to the station's AE title unless ``disk_server.ae_title`` is set
    on its own (docs/design.md "One identity"): a Storage Commitment report (PS3.4 J.3.3) and a
    C-MOVE (PS3.4 C.4.2) are addressed to the AE title the peers know the console by, which is
    the calling AE title of our requests. In the file an empty or absent value means "the
    station's"; loaded, the field holds the title in effect."""

    ae_title: str = "MODLINK"
    port: int = 11112
    bind_address: str = ""
    enabled: bool = True
    #: Maximum PDU length we receive (PS3.8 D.1); 0 is unlimited.
    max_pdu: int = 1048576
    #: Acceptor limit: associations beyond it get A-ASSOCIATE-RJ transient, reason 2.
    max_associations: int = 100
    #: Calling AE titles allowed to associate; empty allows any.
    allowed_calling_aets: list[str] = field(default_factory=list)
    #: Reject an A-ASSOCIATE-RQ whose called AE title is not ours (reason 7).
    require_called_aet: bool = True
    #: Connections without an association (before their A-ASSOCIATE-RQ is complete, or after
    #: the release) allowed at once, overall and from one peer address; a new connection beyond
    #: a cap closes the oldest of them (docs/design.md "The listening side").
    max_pending: int = 64
    max_pending_per_address: int = 16
    #: TLS (docs/design.md "TLS"): our certificate and private key, absolute paths of PEM files;
    #: with `tls_cert` set the port speaks only TLS. With the CA certificates of `tls_ca` too,
    #: every requestor must present a certificate they verify.
    tls_cert: str = ""
    tls_key: str = ""
    tls_ca: str = ""

    def tls(self) -> Credentials | None:
        """The port's TLS files; None when it speaks plain TCP."""
        return Credentials(self.tls_cert, self.tls_key, self.tls_ca) if self.tls_cert else None

    def validate(self, prefix: str) -> None:
        check_ae_title(f"{prefix}.ae_title", self.ae_title)
        _check_port(f"{prefix}.port", self.port)
        if not isinstance(self.bind_address, str):
            raise ConfigError(f"{prefix}.bind_address: an address string, '' for all interfaces")
        if self.bind_address:
            check_host(f"{prefix}.bind_address", self.bind_address)
        _check_max_pdu(f"{prefix}.max_pdu", self.max_pdu)
        _check_range(f"{prefix}.max_associations", self.max_associations, 1, 1000)
        _check_range(f"{prefix}.max_pending", self.max_pending, 1, 1000)
        _check_range(f"{prefix}.max_pending_per_address", self.max_pending_per_address, 1, 1000)
        if not isinstance(self.allowed_calling_aets, list):
            raise ConfigError(f"{prefix}.allowed_calling_aets: a list of AE titles")
        for i, aet in enumerate(self.allowed_calling_aets):
            check_ae_title(f"{prefix}.allowed_calling_aets[{i}]", aet)
        _check_tls(prefix, self.tls_cert, self.tls_key, self.tls_ca, listening=True)


@dataclass
class MemoryServer(Listener):
    """The memory server's listening AE and the byte budget of its RAM cache
    (docs/design.md "The memory server")."""

    ae_title: str = "MODLINK_MEM"
    port: int = 11113
    #: Mebibytes of received instances kept in RAM; the least recently used go first.
    cache_mb: int = 512

    def validate(self, prefix: str) -> None:
        super().validate(prefix)
        _check_range(f"{prefix}.cache_mb", self.cache_mb, 1, 1 << 20)


@dataclass
class Timeouts:
    """Timeouts in seconds (defaults: docs/design.md "Configuration defaults")."""

    connect: float = 30.0
    acse: float = 30.0
    dimse: float = 60.0
    network: float = 60.0
    #: ARTIM (PS3.8 §9.1.5): a connection must complete its A-ASSOCIATE-RQ within it, and the
    #: peer close the connection within it after a reject, release or abort.
    artim: float = 10.0

    def validate(self, prefix: str) -> None:
        for f in dataclasses.fields(self):
            _check_range(f"{prefix}.{f.name}", getattr(self, f.name), 0.1, 3600, float)


@dataclass
class Archive:
    """The local disk archive."""

    #: Free space (MiB) to keep on the archive's file system; below it C-STORE answers A700.
    min_free_mb: int = 512
    #: The most the archive should hold (MiB); 0: no quota, only the file system's space counts.
    quota_mb: int = 0
    #: Disk clean-up (docs/design.md "Disk clean-up"): above `cleanup_high` percent of the quota
    #: (or of the file system, less the reserve) used, delete least recently used studies that
    #: are safe to delete until `cleanup_low` percent is reached.
    cleanup_high: int = 90
    cleanup_low: int = 75

    def validate(self, prefix: str) -> None:
        _check_range(f"{prefix}.min_free_mb", self.min_free_mb, 0, 10**9)
        _check_range(f"{prefix}.quota_mb", self.quota_mb, 0, 10**9)
        _check_range(f"{prefix}.cleanup_high", self.cleanup_high, 1, 100)
        _check_range(f"{prefix}.cleanup_low", self.cleanup_low, 0, 99)
        if self.cleanup_low >= self.cleanup_high:
            raise ConfigError(f"{prefix}.cleanup_low: must be below cleanup_high ({self.cleanup_high}), "
                              f"not {self.cleanup_low}")


LOG_FORMATS = ("text", "json")


@dataclass
class Logging:
    level: str = "INFO"
    max_bytes: int = 10 * 1024 * 1024
    backups: int = 5
    #: "text" (one line per record, for people) or "json" (one JSON object per line with peer,
    #: AE titles, status and job id, for a log collector: docs/design.md "Unattended operation").
    format: str = "text"

    def validate(self, prefix: str) -> None:
        if self.level not in ("DEBUG", "INFO", "WARNING", "ERROR"):
            raise ConfigError(f"{prefix}.level: one of DEBUG, INFO, WARNING, ERROR, not {self.level!r}")
        if self.format not in LOG_FORMATS:
            raise ConfigError(f"{prefix}.format: one of {', '.join(LOG_FORMATS)}, not {self.format!r}")
        _check_range(f"{prefix}.max_bytes", self.max_bytes, 4096, 10**10)
        _check_range(f"{prefix}.backups", self.backups, 0, 100)


@dataclass
class Media:
    """DICOM media export (PS3.11 application profiles, PS3.12 media formats)."""

    #: Application profile used when a burn request names none.
    profile: str = "STD-GEN-CD"
    #: File-set ID (0004,1130) and ISO 9660 volume identifier: 1-16 of A-Z, 0-9, _.
    fileset_id: str = "MODLINK"
    #: Usable bytes of one disc; larger sets span several discs (700 MiB CD-R by default).
    capacity_bytes: int = 700 * 1024 * 1024
    #: Drives offered besides those udev finds: "/dev/srN", "stdio:/path" (an xorriso
    #: pseudo-drive writing a file), "sim:NAME" (a simulated burner, for demos and tests).
    drives: list[str] = field(default_factory=list)
    #: Seconds a burn waits for the next blank disc of a spanned set.
    disc_timeout_s: float = 600.0
    #: The export folder: image files (`burn --iso`) and ``stdio:`` drives inside it are the
    #: technologist's, anywhere else the service engineer's (docs/design.md "Who may do what").
    #: A relative path is relative to the home folder.
    export_dir: str = "export"
    #: Folders a technologist may import from (where removable media are mounted); any other
    #: path is the service engineer's.
    import_dirs: list[str] = field(default_factory=lambda: ["/media", "/run/media"])

    def validate(self, prefix: str) -> None:
        if not isinstance(self.profile, str) or not self.profile:
            raise ConfigError(f"{prefix}.profile: an application profile name such as STD-GEN-CD")
        if not isinstance(self.fileset_id, str) or not re.match(r"^[A-Z0-9_]{1,16}$", self.fileset_id):
            raise ConfigError(f"{prefix}.fileset_id: 1-16 characters from A-Z, 0-9 and _, not {self.fileset_id!r}")
        _check_range(f"{prefix}.capacity_bytes", self.capacity_bytes, 1024 * 1024, 10**13)
        if not isinstance(self.drives, list) or not all(isinstance(d, str) and d for d in self.drives):
            raise ConfigError(f"{prefix}.drives: a list of device names, not {self.drives!r}")
        _check_range(f"{prefix}.disc_timeout_s", self.disc_timeout_s, 1, 86400, float)
        if not check_text(f"{prefix}.export_dir", self.export_dir):
            raise ConfigError(f"{prefix}.export_dir: a folder (relative to the home folder, or absolute)")
        if not isinstance(self.import_dirs, list) or not all(
            isinstance(d, str) and os.path.isabs(d) for d in self.import_dirs
        ):
            raise ConfigError(f"{prefix}.import_dirs: a list of absolute folder paths, not {self.import_dirs!r}")


@dataclass
class Ipc:
    """Who may do what over the IPC socket (docs/design.md "Who may do what"): Unix group names.

    With no `engineer_group` every local user who can open the socket is a service engineer.
    With one, only its members (and root and the service's own user) are; the others who can
    open the socket are technologists. With a `technologist_group`, the socket belongs to that
    group and only its members and the engineers are served.
    """

    engineer_group: str = ""
    technologist_group: str = ""

    def validate(self, prefix: str) -> None:
        _check_group(f"{prefix}.engineer_group", self.engineer_group)
        _check_group(f"{prefix}.technologist_group", self.technologist_group)


#: How audit messages reach a syslog collector: UDP (RFC 5426) or TCP with octet counting
#: (RFC 6587); TLS (RFC 5425) is not offered yet.
SYSLOG_TRANSPORTS = ("udp", "tcp")
_SYSLOG_HOST = re.compile(r"[A-Za-z0-9._:%-]{0,253}")


@dataclass
class Audit:
    """Where the audit trail goes besides ``logs/audit.log`` (docs/design.md "Audit trail"): a
    syslog collector (PS3.15 A.6, A.7), none while `syslog_host` is empty."""

    #: The syslog collector (host name or IP address) that gets a copy of every audit message;
    #: "" sends none.
    syslog_host: str = ""
    #: Its port: 514, the syslog port PS3.15 A.7 names as the default.
    syslog_port: int = 514
    #: "udp" (RFC 5426, one datagram per message) or "tcp" (RFC 6587 octet counting).
    syslog_transport: str = "udp"

    def validate(self, prefix: str) -> None:
        if not isinstance(self.syslog_host, str) or not _SYSLOG_HOST.fullmatch(self.syslog_host):
            raise ConfigError(f"{prefix}.syslog_host: a host name or IP address ('' for none), "
                              f"not {self.syslog_host!r}")
        _check_port(f"{prefix}.syslog_port", self.syslog_port)
        if self.syslog_transport not in SYSLOG_TRANSPORTS:
            raise ConfigError(f"{prefix}.syslog_transport: one of {', '.join(SYSLOG_TRANSPORTS)}, "
                              f"not {self.syslog_transport!r}")


@dataclass
class Node:
    """A remote DICOM node: its address, its roles and how we talk to it."""

    ae_title: str = ""
    host: str = "127.0.0.1"
    port: int = 104
    roles: list[str] = field(default_factory=lambda: ["store"])
    #: Max PDU we announce when we are the requestor; 0 is unlimited.
    max_pdu: int = 262144
    #: Worklist query defaults (docs/design.md "Worklist"): Scheduled Station AE Title ("" = ours,
    #: "*" = any), SPS Start Date ("today", YYYYMMDD[-YYYYMMDD], "" = any), Modality ("" = ours,
    #: "*" = any), and the response limit after which the query is cancelled (0 = none).
    worklist_station_aet: str = ""
    worklist_date: str = "today"
    worklist_modality: str = ""
    response_limit: int = 200
    #: MPPS: let the SCP assign the SOP Instance UID (N-CREATE without one, PS3.7 10.1.5).
    mpps_scp_assigns_uid: bool = False
    #: Transfer syntaxes proposed when sending, in order: ELE, ILE by default.
    transfer_syntaxes: list[str] = field(
        default_factory=lambda: ["1.2.840.10008.1.2.1", "1.2.840.10008.1.2"]
    )
    #: Simultaneous associations we open to this node.
    max_associations: int = 1
    #: Seconds a send association stays open after its job, for the next job to the same node;
    #: 0 releases it when the job ends.
    idle_release: float = 60.0
    #: Send jobs: attempts after the first, and the first wait in seconds (doubled each time).
    retries: int = 3
    retry_interval: float = 30.0
    #: On a failed C-STORE: "stop" the batch, or "continue" with the next instance.
    failure_policy: str = "continue"
    #: Storage Commitment (docs/design.md "Storage Commitment"): seconds to wait for the
    #: N-EVENT-REPORT on the N-ACTION's association (0 releases at once), seconds to wait for a
    #: report at all, N-ACTION retries.
    commit_wait: float = 60.0
    commit_timeout: float = 600.0
    commit_retries: int = 3
    #: Retrieve (C-MOVE from this node): seconds without any response after which the move is
    #: cancelled (C-CANCEL-RQ, PS3.7 9.3.4.3) and the attempt fails.
    move_timeout: float = 600.0
    #: Send automatically: "none", every completed "exam", or every completed "series".
    auto_send: str = "none"
    #: TLS (docs/design.md "TLS"): with `tls_ca` set, associations to the node use TLS and its
    #: certificate must be issued by one of these CA certificates, for `host`; `tls_cert` and
    #: `tls_key` are the certificate we present (absolute paths of PEM files).
    tls_cert: str = ""
    tls_key: str = ""
    tls_ca: str = ""

    def tls(self) -> Credentials | None:
        """Our TLS files for associations to the node; None when they use plain TCP."""
        return Credentials(self.tls_cert, self.tls_key, self.tls_ca) if self.tls_ca else None

    def validate(self, prefix: str) -> None:
        check_ae_title(f"{prefix}.ae_title", self.ae_title)
        check_host(f"{prefix}.host", self.host)
        _check_port(f"{prefix}.port", self.port)
        if not isinstance(self.roles, list) or not all(r in ROLES for r in self.roles):
            raise ConfigError(f"{prefix}.roles: a list drawn from {', '.join(ROLES)}, not {self.roles!r}")
        _check_max_pdu(f"{prefix}.max_pdu", self.max_pdu)
        if self.worklist_station_aet not in ("", "*"):
            check_ae_title(f"{prefix}.worklist_station_aet", self.worklist_station_aet)
        if not isinstance(self.worklist_date, str) or not re.fullmatch(
            r"|today|\d{8}|\d{8}-\d{8}|-\d{8}|\d{8}-", self.worklist_date
        ):
            raise ConfigError(
                f"{prefix}.worklist_date: 'today', YYYYMMDD, YYYYMMDD-YYYYMMDD or '' (any date), "
                f"not {self.worklist_date!r}"
            )
        if not isinstance(self.worklist_modality, str) or not re.fullmatch(r"|\*|[A-Z0-9_]{1,16}", self.worklist_modality):
            raise ConfigError(
                f"{prefix}.worklist_modality: a modality code such as CT or MR, '*' (any) or '' "
                f"(the station's), not {self.worklist_modality!r}"
            )
        _check_range(f"{prefix}.response_limit", self.response_limit, 0, 100000)
        if not isinstance(self.mpps_scp_assigns_uid, bool):
            raise ConfigError(f"{prefix}.mpps_scp_assigns_uid: true or false")
        ts = self.transfer_syntaxes
        if not isinstance(ts, list) or not ts:
            raise ConfigError(f"{prefix}.transfer_syntaxes: a non-empty list of transfer syntax UIDs")
        for i, uid in enumerate(ts):
            if uid not in KNOWN_TRANSFER_SYNTAXES:
                raise ConfigError(
                    f"{prefix}.transfer_syntaxes[{i}]: {uid!r} is not a transfer syntax UID this "
                    f"module sends (known: {', '.join(KNOWN_TRANSFER_SYNTAXES)})"
                )
        _check_range(f"{prefix}.max_associations", self.max_associations, 1, 16)
        _check_range(f"{prefix}.idle_release", self.idle_release, 0, 3600, float)
        _check_range(f"{prefix}.retries", self.retries, 0, 1000)
        _check_range(f"{prefix}.retry_interval", self.retry_interval, 0, 86400, float)
        if self.failure_policy not in FAILURE_POLICIES:
            raise ConfigError(
                f"{prefix}.failure_policy: one of {', '.join(FAILURE_POLICIES)}, not {self.failure_policy!r}"
            )
        _check_range(f"{prefix}.commit_wait", self.commit_wait, 0, 3600, float)
        _check_range(f"{prefix}.commit_timeout", self.commit_timeout, 0.1, 7 * 86400, float)
        _check_range(f"{prefix}.move_timeout", self.move_timeout, 1, 86400, float)
        _check_range(f"{prefix}.commit_retries", self.commit_retries, 0, 1000)
        if self.auto_send not in AUTO_SEND_RULES:
            raise ConfigError(
                f"{prefix}.auto_send: one of {', '.join(AUTO_SEND_RULES)}, not {self.auto_send!r}"
            )
        _check_tls(prefix, self.tls_cert, self.tls_key, self.tls_ca, listening=False)


@dataclass
class Config:
    station: Station = field(default_factory=Station)
    disk_server: Listener = field(default_factory=Listener)
    memory_server: MemoryServer = field(default_factory=MemoryServer)
    timeouts: Timeouts = field(default_factory=Timeouts)
    archive: Archive = field(default_factory=Archive)
    logging: Logging = field(default_factory=Logging)
    media: Media = field(default_factory=Media)
    audit: Audit = field(default_factory=Audit)
    ipc: Ipc = field(default_factory=Ipc)
    nodes: dict[str, Node] = field(default_factory=dict)

    def validate(self) -> None:
        """Raise :class:`ConfigError` on the first value that breaks a rule."""
        for f in dataclasses.fields(self):
            if f.name != "nodes":
                section = getattr(self, f.name)
                for g in dataclasses.fields(section):
                    _check_strings(f"{f.name}.{g.name}", getattr(section, g.name))
                section.validate(f.name)
        seen: dict[str, str] = {}
        for name, node in self.nodes.items():
            if not _NODE_NAME.match(name):
                raise ConfigError(
                    f"nodes.{name}: a node name is 1-32 letters, digits, '_', '-' or '.'"
                )
            if name.lower() in seen:
                raise ConfigError(f"nodes.{name}: duplicate node name (also {seen[name.lower()]!r})")
            seen[name.lower()] = name
            for g in dataclasses.fields(node):
                _check_strings(f"nodes.{name}.{g.name}", getattr(node, g.name))
            node.validate(f"nodes.{name}")
        used: dict[int, str] = {}
        for key in ("disk_server", "memory_server"):
            lst: Listener = getattr(self, key)
            if lst.enabled and lst.port in used:
                raise ConfigError(f"{key}.port: port {lst.port} is already used by {used[lst.port]}")
            used[lst.port] = key

    def node(self, name: str) -> Node:
        try:
            return self.nodes[name]
        except KeyError:
            known = ", ".join(sorted(self.nodes)) or "none"
            raise ConfigError(f"nodes.{name}: no such node (configured: {known})") from None


# -- reading ------------------------------------------------------------------------------------


def _build(cls: type, data: Any, prefix: str) -> Any:
    if not isinstance(data, dict):
        raise ConfigError(f"{prefix}: must be a table")
    names = {f.name: f for f in dataclasses.fields(cls)}
    for key in data:
        if key not in names:
            raise ConfigError(f"{prefix}.{key}: unknown key (known: {', '.join(names)})")
    obj = cls()
    for key, value in data.items():
        setattr(obj, key, value)
    return obj


def from_dict(data: dict[str, Any]) -> Config:
    """Build and validate a :class:`Config` from parsed TOML."""
    cfg = Config()
    sections = {f.name: f for f in dataclasses.fields(Config)}
    for key, value in data.items():
        if key not in sections:
            raise ConfigError(f"{key}: unknown section (known: {', '.join(sections)})")
        if key == "nodes":
            if not isinstance(value, dict):
                raise ConfigError("nodes: must be a table of [nodes.NAME] tables")
            cfg.nodes = {n: _build(Node, v, f"nodes.{n}") for n, v in value.items()}
        else:
            if not isinstance(value, dict):
                raise ConfigError(f"{key}: must be a table [{key}]")
            base = getattr(cfg, key)
            merged = dataclasses.asdict(base) | value
            setattr(cfg, key, _build(type(base), merged, key))
    listener = data.get("disk_server")
    if not (isinstance(listener, dict) and listener.get("ae_title")):
        cfg.disk_server.ae_title = cfg.station.ae_title  # "" or absent: the station's
    cfg.validate()
    return cfg


def load(path: Path) -> Config:
    """Read and validate the config file; a missing file gives the defaults."""
    if not path.exists():
        return Config()
    try:
        data = tomllib.loads(path.read_text(encoding="utf-8"))
    except tomllib.TOMLDecodeError as exc:
        msg = str(exc)
        if "twice" in msg or "overwrite" in msg.lower():
            raise ConfigError(f"{path.name}: a key or node is defined twice ({msg})") from None
        raise ConfigError(f"{path.name}: not valid TOML ({msg})") from None
    return from_dict(data)


# -- writing ------------------------------------------------------------------------------------


HEADER = "modality_link configuration (edit with `modality-link config set`)"


def _table(values: dict[str, Any]) -> Any:
    table = tomlkit.table()
    for key, value in values.items():
        table.add(key, value)
    return table


def _section(cfg: Config, name: str) -> tuple[dict[str, Any], dict[str, Any]]:
    """A section's values as the file holds them, and their defaults: the disk server's AE
    title is "" (the station's) while it is the station's (:class:`Listener`)."""
    section = getattr(cfg, name)
    values, defaults = dataclasses.asdict(section), dataclasses.asdict(type(section)())
    if name == "disk_server":
        defaults["ae_title"] = ""
        if values["ae_title"] == cfg.station.ae_title:
            values["ae_title"] = ""
    return values, defaults


#: The keys a node's table always shows, default or not: where it is and what it does.
NODE_ADDRESS = ("ae_title", "host", "port", "roles")


def _node_values(node: Node) -> dict[str, Any]:
    """A new node's table: its address and roles, and the values that differ from the defaults."""
    defaults = dataclasses.asdict(Node())
    return {k: v for k, v in dataclasses.asdict(node).items() if k in NODE_ADDRESS or v != defaults[k]}


def _document(cfg: Config, every_key: bool = False) -> tomlkit.TOMLDocument:
    """The configuration as a new TOML document: the values that differ from the defaults
    (what an absent key means), or `every_key`."""
    doc = tomlkit.document()
    doc.add(tomlkit.comment(HEADER))
    for f in dataclasses.fields(cfg):
        if f.name != "nodes":
            values, defaults = _section(cfg, f.name) if not every_key else (
                dataclasses.asdict(getattr(cfg, f.name)), {})
            changed = {k: v for k, v in values.items() if every_key or v != defaults[k]}
            if changed:
                doc.add(f.name, _table(changed))
    if cfg.nodes:
        nodes = tomlkit.table(is_super_table=True)
        for name, node in cfg.nodes.items():
            nodes.add(name, _table(dataclasses.asdict(node) if every_key else _node_values(node)))
        doc.add("nodes", nodes)
    return doc


def _plain(item: Any) -> Any:
    return item.unwrap() if hasattr(item, "unwrap") else item


def _merge_table(parent: Any, name: str, values: dict[str, Any], defaults: dict[str, Any]) -> None:
    """Write into ``parent[name]`` the values that differ from the file; a key the file does
    not have is added only when its value is not the default (which is what its absence means)."""
    table = parent.get(name)
    for key, value in values.items():
        if table is not None and key in table:
            if _plain(table[key]) != value:
                table[key] = value
        elif value != defaults[key]:
            if table is None:
                table = parent[name] = tomlkit.table()
            table[key] = value


def _merged(doc: tomlkit.TOMLDocument, cfg: Config) -> tomlkit.TOMLDocument:
    """`doc` (the file as it is) changed only where `cfg` differs from it: comments, order and
    layout of everything else stay."""
    for f in dataclasses.fields(cfg):
        if f.name != "nodes":
            _merge_table(doc, f.name, *_section(cfg, f.name))
    nodes = doc.get("nodes")
    if nodes is None:
        if not cfg.nodes:
            return doc
        nodes = doc["nodes"] = tomlkit.table(is_super_table=True)
    for name in [n for n in nodes if n not in cfg.nodes]:
        del nodes[name]
    defaults = dataclasses.asdict(Node())
    for name, node in cfg.nodes.items():
        if name in nodes:
            _merge_table(nodes, name, dataclasses.asdict(node), defaults)
        else:
            nodes[name] = _table(_node_values(node))
    return doc


def dumps(cfg: Config) -> str:
    """Serialise `cfg` as a new TOML file, every key written."""
    return tomlkit.dumps(_document(cfg, every_key=True))


def write_private(path: Path, data: bytes) -> None:
    """Replace the file `path` with `data` atomically: a new temporary beside it (mode 0600,
    never an existing file or a symbolic link), flushed, renamed over `path`, the folder
    flushed. A replaced file's owner is kept when we may (root editing the service's file)."""
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    tmp.unlink(missing_ok=True)
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC, 0o600)
    try:
        try:
            old = os.stat(path)
            if (old.st_uid, old.st_gid) != (os.geteuid(), os.getegid()):
                os.fchown(fd, old.st_uid, old.st_gid)
        except (FileNotFoundError, PermissionError):
            pass
        with os.fdopen(fd, "wb", closefd=False) as fh:
            fh.write(data)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    finally:
        os.close(fd)
    dirfd = os.open(path.parent, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(dirfd)
    finally:
        os.close(dirfd)


def save(cfg: Config, path: Path) -> None:
    """Validate, then write the file: an existing file keeps its comments and layout and only
    the values that changed are rewritten; a new one gets the values that differ from the
    defaults (:func:`write_private`)."""
    cfg.validate()
    try:
        doc = _merged(tomlkit.parse(path.read_text(encoding="utf-8")), cfg)
    except (FileNotFoundError, tomlkit.exceptions.ParseError):
        doc = _document(cfg)
    text = tomlkit.dumps(doc)
    if from_dict(tomllib.loads(text)) != cfg:  # what is written reads back as what was validated
        raise ConfigError(f"{path.name}: the file would not read back as the configuration set")
    write_private(path, text.encode("utf-8"))


# -- dotted keys (the CLI's `config get|set`) ---------------------------------------------------


def _locate(cfg: Config, key: str) -> tuple[Any, str, dataclasses.Field]:
    parts = key.split(".")
    if parts[0] == "nodes":
        if len(parts) != 3:
            raise ConfigError(f"{key}: a node key is nodes.NAME.FIELD")
        obj: Any = cfg.node(parts[1])
    else:
        if len(parts) != 2:
            raise ConfigError(f"{key}: a key is SECTION.FIELD, e.g. station.ae_title")
        sections = [f.name for f in dataclasses.fields(cfg) if f.name != "nodes"]
        if parts[0] not in sections:
            raise ConfigError(f"{key}: unknown section {parts[0]!r} (known: {', '.join(sections)})")
        obj = getattr(cfg, parts[0])
    fields = {f.name: f for f in dataclasses.fields(obj)}
    if parts[-1] not in fields:
        raise ConfigError(f"{key}: unknown key (known in this section: {', '.join(fields)})")
    return obj, parts[-1], fields[parts[-1]]


def changed_keys(old: Config, new: Config) -> list[str]:
    """The dotted keys whose values differ between `old` and `new` (a node added or removed
    counts as ``nodes.NAME``), in the order of the file."""
    def flat(cfg: Config) -> dict[str, Any]:
        out: dict[str, Any] = {}
        for f in dataclasses.fields(cfg):
            if f.name != "nodes":
                out |= {f"{f.name}.{k}": v for k, v in dataclasses.asdict(getattr(cfg, f.name)).items()}
        for name, node in cfg.nodes.items():
            out |= {f"nodes.{name}.{k}": v for k, v in dataclasses.asdict(node).items()}
        return out

    before, after = flat(old), flat(new)
    changed = [k for k in after if k in before and before[k] != after[k]]
    nodes = [f"nodes.{n}" for n in list(old.nodes) + list(new.nodes) if (n in old.nodes) != (n in new.nodes)]
    return changed + nodes


def get_value(cfg: Config, key: str) -> Any:
    obj, name, _ = _locate(cfg, key)
    return getattr(obj, name)


def parse_value(key: str, text: str, current: Any) -> Any:
    """Convert command-line text to the type of the key's current value."""
    if isinstance(current, bool):
        if text.lower() in ("true", "yes", "on", "1"):
            return True
        if text.lower() in ("false", "no", "off", "0"):
            return False
        raise ConfigError(f"{key}: true or false, not {text!r}")
    if isinstance(current, int):
        try:
            return int(text)
        except ValueError:
            raise ConfigError(f"{key}: a whole number, not {text!r}") from None
    if isinstance(current, float):
        try:
            return float(text)
        except ValueError:
            raise ConfigError(f"{key}: a number, not {text!r}") from None
    if isinstance(current, list):
        return [p.strip() for p in text.split(",") if p.strip()]
    return text


def _assign(cfg: Config, key: str, value: Any) -> None:
    """Set one dotted key; the disk server's AE title follows a new station AE title while it
    was the station's (:class:`Listener`)."""
    obj, name, _ = _locate(cfg, key)
    if key == "station.ae_title" and cfg.disk_server.ae_title == cfg.station.ae_title:
        cfg.disk_server.ae_title = value
    setattr(obj, name, value)


def set_value(path: Path, key: str, text: str) -> Config:
    """Set one dotted key in the file at `path`; the file is untouched if the result is invalid."""
    cfg = load(path)
    _assign(cfg, key, parse_value(key, text, get_value(cfg, key)))
    save(cfg, path)
    return cfg


def unset_value(path: Path, key: str) -> Config:
    """Remove one dotted key from the file at `path`: it is back to its default (the disk
    server's AE title: the station's). Comments and layout stay; an invalid result (a node's
    AE title has no default) leaves the file untouched."""
    cfg = load(path)
    _locate(cfg, key)  # a known key, or ConfigError naming the known ones
    default = Node() if key.startswith("nodes.") else getattr(Config(), key.split(".")[0])
    value = getattr(default, key.split(".")[-1])
    if key == "disk_server.ae_title":
        value = cfg.station.ae_title
    _assign(cfg, key, value)
    try:
        doc = tomlkit.parse(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        return cfg
    *tables, name = key.split(".")
    table: Any = doc
    for part in tables:
        table = table.get(part) if table is not None else None
    if table is not None and name in table:
        del table[name]
        if len(tables) == 1 and not table.as_string().strip():  # an empty section without comments goes
            del doc[tables[0]]
    text = tomlkit.dumps(doc)
    if from_dict(tomllib.loads(text)) != cfg:
        raise ConfigError(f"{key}: the file would not read back as the configuration set")
    write_private(path, text.encode("utf-8"))
    return cfg


# -- every error at once, and warnings (`config validate`, `config import`) --------------------


def _table_problems(cls: type, table: Any, prefix: str, found: list[str]) -> dict[str, Any] | None:
    """Append to `found` every rule `table` breaks as a `cls` section; return the table less
    its faulty keys (None if it is no table). A section's `validate` stops at its first
    fault, so each fault's key is dropped (back to its default) and the rest checked again."""
    if not isinstance(table, dict):
        found.append(f"{prefix}: must be a table")
        return None
    names = [f.name for f in dataclasses.fields(cls)]
    kept = {}
    for key, value in table.items():
        if key not in names:
            found.append(f"{prefix}.{key}: unknown key (known: {', '.join(names)})")
        elif not (cls is Listener and key == "ae_title" and value == ""):  # "": the station's
            kept[key] = value
    for _ in range(len(names) + 1):
        obj = cls()
        for key, value in kept.items():
            setattr(obj, key, value)
        try:
            for name in names:
                _check_strings(f"{prefix}.{name}", getattr(obj, name))
            obj.validate(prefix)
            return kept
        except ConfigError as exc:
            found.append(str(exc))
            fault = str(exc).split(":", 1)[0].removeprefix(prefix + ".").split("[")[0]
            if fault in kept:
                del kept[fault]
            elif cls is Node and fault == "ae_title":  # required: a stand-in to check the rest
                kept[fault] = "UNSET"
            else:
                return kept
    return kept


def problems(data: Any) -> list[str]:
    """Every rule the parsed configuration `data` breaks, one sentence each naming its key
    (:func:`from_dict` stops at the first)."""
    found: list[str] = []
    sections = {f.name: f for f in dataclasses.fields(Config)}
    clean: dict[str, Any] = {}
    for key, value in data.items():
        if key not in sections:
            found.append(f"{key}: unknown section (known: {', '.join(sections)})")
        elif key != "nodes":
            kept = _table_problems(type(getattr(Config(), key)), value, key, found)
            if kept is not None:
                clean[key] = kept
        elif not isinstance(value, dict):
            found.append("nodes: must be a table of [nodes.NAME] tables")
        else:
            clean["nodes"] = {}
            for name, table in value.items():
                kept = _table_problems(Node, table, f"nodes.{name}", found)
                if kept is not None:
                    clean["nodes"][name] = kept
    try:
        from_dict(clean)  # the rules across sections: node names, two listeners on one port
    except ConfigError as exc:
        if str(exc) not in found:
            found.append(str(exc))
    return found


def read_file(path: Path) -> tuple[str, list[str]]:
    """A configuration file's text and every rule it breaks (TOML syntax first)."""
    text = path.read_text(encoding="utf-8")
    try:
        data = tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        return text, [f"{path.name}: not valid TOML ({exc})"]
    return text, problems(data)


#: Host names and addresses that only this machine reaches.
_LOOPBACK = ("localhost", "ip6-localhost")


def _loopback(host: str) -> bool:
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return host.lower().removesuffix(".") in _LOOPBACK


def warnings(cfg: Config) -> list[str]:
    """Valid settings that make a Storage Commitment report (PS3.4 J.3.3: the SCP associates
    to the AE that asked) or a C-MOVE (PS3.4 C.4.2: to a destination AE the SCP knows by its
    title and address) unreachable; each sentence names the key and the fix."""
    out: list[str] = []
    disk, station = cfg.disk_server, cfg.station
    callers = {name: n for name, n in cfg.nodes.items() if {"commit", "qr"} & set(n.roles)}
    commit = [name for name, n in cfg.nodes.items() if "commit" in n.roles]
    if commit and disk.enabled and disk.ae_title != station.ae_title:
        out.append(
            f"disk_server.ae_title {disk.ae_title!r} differs from station.ae_title {station.ae_title!r}: "
            f"{', '.join(commit)} (role commit) send their Storage Commitment reports to the AE title that "
            f"asked, {station.ae_title!r}, which the disk server refuses; let the listener follow the "
            f"station (modality-link config unset disk_server.ae_title)")
    if commit and not disk.enabled:
        out.append(f"disk_server.enabled is false: {', '.join(commit)} (role commit) cannot deliver their "
                   f"Storage Commitment reports (modality-link config set disk_server.enabled true)")
    for key in ("disk_server", "memory_server"):
        lst: Listener = getattr(cfg, key)
        remote = [name for name, n in callers.items() if not _loopback(n.host)]
        if lst.enabled and lst.bind_address and _loopback(lst.bind_address) and remote:
            out.append(
                f"{key}.bind_address {lst.bind_address} accepts connections from this machine only: "
                f"{', '.join(remote)} (roles commit or qr) cannot connect to {lst.ae_title} for Storage "
                f"Commitment reports or C-MOVE (modality-link config unset {key}.bind_address)")
    return out
