"""The audit trail: DICOM audit messages (PS3.15 A.5, IHE ATNA) to a local log and a syslog collector.

This module owns the message format - the XML of the DICOM Audit Message Schema (PS3.15 A.5.1)
and the messages of PS3.15 A.5.3 the service reports - and their transport:

- every message is one line of ``logs/audit.log`` in the home (mode 0600), written when the
  event happens;
- with ``[audit] syslog_host`` set, it also goes to that collector as an RFC 5424 message
  (facility authpriv, 10, with a severity per message; APP-NAME ``modality-link``; MSGID the
  event type; PS3.15 A.6, A.7), over UDP (RFC 5426) or TCP with octet counting (RFC 6587). One
  sender thread takes the messages from a bounded queue: a DICOM operation never waits for the
  collector, and a message that finds the queue full is dropped, counted and logged.

The events (docs/design.md "Audit trail"): Application Activity (A.5.3.1), DICOM Instances
Transferred (A.5.3.7), Query (A.5.3.10), Export (A.5.3.4) and Security Alert (A.5.3.11).

The service installs its trail (:func:`install`); the event functions here report to it and do
nothing while none is installed (a part used without the service, as in a unit test). No event
function raises: a fault of the audit trail is logged and the operation goes on.
"""

from __future__ import annotations

import base64
import functools
import getpass
import ipaddress
import logging
import os
import queue
import re
import select
import socket
import threading
import time
import xml.etree.ElementTree as ET
from collections import Counter
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Callable, Collection, Iterable, Mapping, ParamSpec, Protocol, Sequence

from pydicom.dataset import Dataset
from pydicom.filebase import DicomBytesIO
from pydicom.filewriter import write_dataset

from modality_link import config

LOG = logging.getLogger("modality_link.audit")

# -- codes (PS3.15 A.5.3, PS3.16 CID 400-405) -------------------------------------------------------


@dataclass(frozen=True)
class Code:
    """A coded value of the schema's CodedValueType (PS3.15 A.5.1): code, scheme, meaning."""

    value: str
    scheme: str
    meaning: str


def _dcm(value: str, meaning: str) -> Code:
    return Code(value, "DCM", meaning)


# Event IDs (CID 400) and Event Type Codes (CID 401, 403)
APPLICATION_ACTIVITY = _dcm("110100", "Application Activity")
INSTANCES_TRANSFERRED = _dcm("110104", "DICOM Instances Transferred")
EXPORT = _dcm("110106", "Export")
QUERY = _dcm("110112", "Query")
SECURITY_ALERT = _dcm("110113", "Security Alert")
APPLICATION_START = _dcm("110120", "Application Start")
APPLICATION_STOP = _dcm("110121", "Application Stop")
#: Security Alert types (CID 403): a refused association or a TLS failure is a failed node
#: authentication; a configuration change is one of the three configuration types.
NODE_AUTHENTICATION = _dcm("110126", "Node Authentication")
NETWORK_CONFIGURATION = _dcm("110128", "Network Configuration")
SECURITY_CONFIGURATION = _dcm("110129", "Security Configuration")
SOFTWARE_CONFIGURATION = _dcm("110131", "Software Configuration")
# Active Participant roles (CID 402)
APPLICATION = _dcm("110150", "Application")
APPLICATION_LAUNCHER = _dcm("110151", "Application Launcher")
DESTINATION = _dcm("110152", "Destination Role ID")
SOURCE = _dcm("110153", "Source Role ID")
DESTINATION_MEDIA = _dcm("110154", "Destination Media")
# Participant Object ID types (CID 404, and RFC 3881's)
STUDY_INSTANCE_UID = _dcm("110180", "Study Instance UID")
SOP_CLASS_UID = _dcm("110181", "SOP Class UID")
NODE_ID = _dcm("110182", "Node ID")
PATIENT_NUMBER = Code("2", "RFC-3881", "Patient Number")
URI = Code("12", "RFC-3881", "URI")
# Media types (CID 405)
MEDIA_CD = _dcm("110032", "CD")
MEDIA_DVD = _dcm("110033", "DVD")
MEDIA_URI = _dcm("110037", "URI")

#: EventOutcomeIndicator (PS3.15 A.5.2): success, minor, serious, major failure.
SUCCESS, MINOR_FAILURE, SERIOUS_FAILURE, MAJOR_FAILURE = 0, 4, 8, 12
#: RFC 5424 severity of a message by its outcome: notice for a success (PS3.15 A.6: "most
#: messages should have the severity value of 5"), warning, error, critical for the failures.
SEVERITY = {SUCCESS: 5, MINOR_FAILURE: 4, SERIOUS_FAILURE: 3, MAJOR_FAILURE: 2}
#: Facility 10, security/authorization messages (PS3.15 A.6, A.7; RFC 5424 Table 1).
FACILITY = 10
APP_NAME = "modality-link"
#: Transfer syntax of a query we sent, as the audit message carries it (PS3.15 A.5.3.10).
IMPLICIT_VR_LITTLE_ENDIAN = "1.2.840.10008.1.2"
#: Messages waiting for the syslog collector at most; more are dropped (counted, logged).
QUEUE_SIZE = 2000
CONNECT_TIMEOUT = 5.0
SEND_TIMEOUT = 10.0
#: The longest wait between two connection attempts to a TCP collector (doubling from 1 s).
MAX_BACKOFF = 60.0
#: Least time between two log lines about dropped messages.
DROP_LOG_INTERVAL = 60.0
#: The largest UDP payload (RFC 5426 3.2: a message does not span datagrams).
MAX_DATAGRAM = 65507

# -- what the event functions are given -----------------------------------------------------------


@dataclass(frozen=True)
class Participant:
    """An application taking part in an event: its AE title and host (IP address or host
    name); the host is empty for this service itself."""

    ae_title: str
    host: str = ""

    @property
    def local(self) -> bool:
        return not self.host


class InstanceOf(Protocol):
    """An instance with its study and patient (an index record or row)."""

    @property
    def sop_class_uid(self) -> str: ...

    @property
    def study_uid(self) -> str: ...

    @property
    def accession(self) -> str: ...

    @property
    def patient_id(self) -> str: ...

    @property
    def patient_name(self) -> str: ...


@dataclass
class _Study:
    accession: str
    sop_classes: Counter[str] = field(default_factory=Counter)


#: Instances counted by (transferred, patient ID, patient's name), then Study Instance UID.
_Patients = dict[tuple[bool, str, str], dict[str, _Study]]


def _count(patients: _Patients, instance: InstanceOf, ok: bool) -> None:
    studies = patients.setdefault((ok, instance.patient_id, instance.patient_name), {})
    study = studies.setdefault(instance.study_uid, _Study(instance.accession))
    study.sop_classes[instance.sop_class_uid] += 1


class Transfer:
    """Instances moved from `source` to `destination` at the request of `requestor` (the source
    unless given), counted by patient, study and SOP class as they go; :func:`transferred`
    reports them (PS3.15 A.5.3.7)."""

    def __init__(self, source: Participant, destination: Participant, requestor: Participant | None = None) -> None:
        self.source = source
        self.destination = destination
        self.requestor = requestor or source
        self.patients: _Patients = {}
        #: Instances transferred whose keys are read only when reported (the memory server's).
        self.later: list[Callable[[], InstanceOf]] = []

    def add(self, instance: InstanceOf | Callable[[], InstanceOf] | None, ok: bool = True) -> None:
        """One instance transferred (`ok`) or not; a function giving it is called when the
        transfer is reported; None (no longer indexed) is left out."""
        if callable(instance):
            self.later.append(instance)
        elif instance is not None:
            _count(self.patients, instance, ok)

    def __bool__(self) -> bool:
        return bool(self.patients or self.later)


class AssociationPeer(Protocol):
    """The requestor of an association we accepted (:class:`modality_link.net.acceptor.Peer`)."""

    address: str
    calling_ae: str
    called_ae: str
    #: The transfers of the association, reported when it ends (:func:`association_ended`).
    transfers: dict[str, Transfer]


def remote(peer: AssociationPeer) -> Participant:
    """The requestor of an association, as an event participant."""
    return Participant(peer.calling_ae, peer.address)


# -- the trail --------------------------------------------------------------------------------------


class AuditTrail:
    """The audit log file of a home and, when configured, the syslog collector."""

    def __init__(self, log_path: Path, cfg: config.Config) -> None:
        self.log_path = Path(log_path)
        self.host = _hostname()
        self.pid = os.getpid()
        self._lock = threading.Lock()
        fd = os.open(self.log_path, os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_CLOEXEC, 0o600)
        os.fchmod(fd, 0o600)
        self._fd: int | None = fd
        self.sender: SyslogSender | None = None
        self.cfg = cfg
        self.configure(cfg)

    def configure(self, cfg: config.Config) -> None:
        """Take a new configuration: the station's identity, and the collector (a changed one is
        reconnected; messages still queued for the old one go to it first)."""
        self.cfg = cfg
        a = cfg.audit
        target = (a.syslog_host, a.syslog_port, a.syslog_transport)
        old = self.sender
        if old is not None and (old.host, old.port, old.transport) == target:
            return
        self.sender = SyslogSender(*target, hostname=self.host) if a.syslog_host else None
        if old is not None:
            old.close(timeout=1.0)

    @property
    def ae_titles(self) -> list[str]:
        """The AE titles of the service: the station's, and the listening AEs' that run."""
        cfg = self.cfg
        titles = [cfg.station.ae_title] + [lst.ae_title for lst in (cfg.disk_server, cfg.memory_server) if lst.enabled]
        return list(dict.fromkeys(t.strip() for t in titles))

    def emit(self, msgid: str, severity: int, xml: str) -> None:
        """One message: a line of the audit log, and (queued) the collector's."""
        with self._lock:
            if self._fd is not None:
                try:
                    os.write(self._fd, xml.encode("utf-8") + b"\n")
                except OSError as exc:
                    LOG.error("audit: cannot write %s: %s", self.log_path, exc)
            sender = self.sender
        if sender is not None:
            sender.submit(msgid, severity, xml)

    def close(self, timeout: float = 2.0) -> None:
        """Send what is queued within `timeout` seconds (the rest is dropped, counted), close the log."""
        if self.sender is not None:
            self.sender.close(timeout)
        with self._lock:
            if self._fd is not None:
                os.close(self._fd)
                self._fd = None


_trail: AuditTrail | None = None


def install(trail: AuditTrail | None) -> None:
    """Make `trail` the one the event functions report to (the service's; None: no trail)."""
    global _trail
    _trail = trail


def uninstall(trail: AuditTrail) -> None:
    """Stop reporting to `trail`, if it is the installed one."""
    global _trail
    if _trail is trail:
        _trail = None


P = ParamSpec("P")


class _NoTrail(Exception):
    """The trail was uninstalled while a message was being built (the service stops)."""


def _reported(fn: Callable[P, None]) -> Callable[P, None]:
    """`fn`, run only while a trail is installed, and never raising (a fault is logged)."""

    @functools.wraps(fn)
    def call(*args: P.args, **kwargs: P.kwargs) -> None:
        if _trail is None:
            return
        try:
            fn(*args, **kwargs)
        except _NoTrail:
            pass
        except Exception:
            LOG.exception("audit: %s failed; the operation goes on", fn.__name__)

    return call


# -- the events (PS3.15 A.5.3) ---------------------------------------------------------------------


@_reported
def application_activity(started: bool) -> None:
    """The service started or is stopping (Application Activity, PS3.15 A.5.3.1)."""
    m = _Message("ApplicationActivity", APPLICATION_ACTIVITY, "E", SUCCESS,
                 [APPLICATION_START if started else APPLICATION_STOP])
    m.participant(m.ours(), False, APPLICATION, ae_titles=m.trail.ae_titles)
    m.participant(Participant(_login()), True, APPLICATION_LAUNCHER, process=False)
    m.emit()


@_reported
def received(peer: AssociationPeer, instance: InstanceOf | Callable[[], InstanceOf]) -> None:
    """The requestor of an association stored `instance` with us (or the function that gives it,
    called only then); reported with the others of the association when it ends."""
    transfer = peer.transfers.get("received")
    if transfer is None:
        transfer = peer.transfers["received"] = Transfer(remote(peer), Participant(peer.called_ae))
    transfer.add(instance)


@_reported
def association_ended(peer: AssociationPeer) -> None:
    """Report what an association moved (:func:`received`)."""
    for transfer in peer.transfers.values():
        transferred(transfer)
    peer.transfers.clear()


@_reported
def transferred(transfer: Transfer) -> None:
    """DICOM Instances Transferred (PS3.15 A.5.3.7) for what `transfer` counted since the last
    report: one message per patient, those not transferred in one of their own (PS3.15 A.5.2:
    successes and failures are not mixed)."""
    for get in transfer.later:
        _count(transfer.patients, get(), True)
    patients, transfer.patients, transfer.later = transfer.patients, {}, []
    # C: the receiver did not hold them; R: we are not the receiver and cannot know
    action = "C" if transfer.destination.local and not transfer.source.local else "R"
    for (ok, patient_id, patient_name), studies in patients.items():
        count = sum(sum(s.sop_classes.values()) for s in studies.values())
        m = _Message("InstancesTransferred", INSTANCES_TRANSFERRED, action, SUCCESS if ok else MINOR_FAILURE,
                     description="" if ok else f"{count} instance(s) not transferred")
        third = transfer.requestor not in (transfer.source, transfer.destination)
        m.participant(transfer.source, transfer.requestor == transfer.source, SOURCE)
        m.participant(transfer.destination, transfer.requestor == transfer.destination, DESTINATION)
        if third:
            m.participant(transfer.requestor, True, None)
        for uid, study in studies.items():
            m.study(uid, study)
        m.patient(patient_id, patient_name)
        m.emit()


@_reported
def sent(source: Participant, destination: Participant, instances: Mapping[str, InstanceOf],
         failed: Collection[str] = (), requestor: Participant | None = None) -> None:
    """Instances `source` sent to `destination` at the request of `requestor` (a C-MOVE or C-GET):
    `instances` by SOP Instance UID, those in `failed` not transferred (PS3.15 A.5.3.7)."""
    transfer = Transfer(source, destination, requestor)
    for uid, instance in instances.items():
        transfer.add(instance, uid not in failed)
    transferred(transfer)


@_reported
def query_received(peer: AssociationPeer, sop_class: str, transfer_syntax: str, identifier: bytes) -> None:
    """A C-FIND the requestor of an association asked us (Query, PS3.15 A.5.3.10)."""
    m = _Message("Query", QUERY, "E", SUCCESS)
    m.participant(remote(peer), True, SOURCE)
    m.participant(Participant(peer.called_ae), False, DESTINATION)
    m.query(sop_class, transfer_syntax, identifier)
    m.emit()


@_reported
def query_sent(calling_ae: str, node: Participant, sop_class: str, identifier: Dataset) -> None:
    """A C-FIND we sent to `node` (worklist, Query/Retrieve; Query, PS3.15 A.5.3.10). The
    identifier is reported in Implicit VR Little Endian."""
    fp = DicomBytesIO()
    fp.is_little_endian, fp.is_implicit_VR = True, True
    write_dataset(fp, identifier)
    m = _Message("Query", QUERY, "E", SUCCESS)
    m.participant(Participant(calling_ae), True, SOURCE)
    m.participant(node, False, DESTINATION)
    m.query(sop_class, IMPLICIT_VR_LITTLE_ENDIAN, fp.getvalue())
    m.emit()


@_reported
def exported(target: str, image_file: bool, volume: str, medium: str, instances: Iterable[InstanceOf],
             ok: bool = True) -> None:
    """A disc of a burn was written (`ok`: and verified) to the drive `target`, or to the image
    file `target` (Export, PS3.15 A.5.3.4): the studies and patients on it. `volume` is its
    volume label, `medium` the profile's ("CD-R", "DVD")."""
    patients: _Patients = {}
    for instance in instances:
        _count(patients, instance, True)
    if image_file:
        where, kind = Path(target).absolute().as_uri(), MEDIA_URI
    else:
        kind = MEDIA_DVD if "DVD" in medium.upper() else MEDIA_CD
        where = f"{kind.meaning} in {target}, volume {volume}"
    m = _Message("Export", EXPORT, "R", SUCCESS if ok else MINOR_FAILURE,
                 description="" if ok else f"the disc in {target} failed or was stopped after it was written")
    m.participant(m.ours(), True, SOURCE, ae_titles=[m.trail.cfg.station.ae_title])
    m.participant(Participant(where), False, DESTINATION_MEDIA, process=False, alternative=volume, media=kind)
    for studies in patients.values():
        for uid, study in studies.items():
            m.study(uid, study)
    for _, patient_id, patient_name in patients:
        m.patient(patient_id, patient_name)
    m.emit()


@_reported
def security_alert(alert: Code, description: str, *, node: Participant | None = None, uri: str = "",
                   outcome: int = MINOR_FAILURE, types: Sequence[Code] = (), user: str = "") -> None:
    """A Security Alert (PS3.15 A.5.3.11) of type `alert` (:data:`NODE_AUTHENTICATION` for a
    refused association or a failed TLS handshake, the configuration types...), with
    `description` saying what happened. Its subject is `node` (the remote application) or the
    file at `uri`; `user` names the person who did it, when known (the IPC client's user).
    `outcome` :data:`SUCCESS` makes it informative; the failures say how severe it is (PS3.15
    A.5.3.11: minor or serious when the mitigation worked)."""
    m = _Message("SecurityAlert", SECURITY_ALERT, "E", outcome, [alert, *types])
    m.participant(m.ours(), not user, None, ae_titles=m.trail.ae_titles)
    if user:
        m.participant(Participant(user), True, None, process=False)
    if node is not None and not node.local:
        m.participant(node, False, None)
    if uri:
        m.alert_subject(URI, uri, Path(uri).name or uri, description, role="5")  # master file
    else:
        subject = node if node is not None and not node.local else Participant(m.ours().ae_title, m.trail.host)
        m.alert_subject(NODE_ID, subject.host, subject.ae_title or subject.host, description, role=None)
    m.emit()


def association_refused(peer: AssociationPeer, reason: str) -> None:
    """We rejected an association (PS3.8 A-ASSOCIATE-RJ): a failed node authentication."""
    security_alert(NODE_AUTHENTICATION, f"association from {peer.calling_ae or '?'}@{peer.address} to "
                   f"{peer.called_ae or '?'} refused: {reason}", node=remote(peer))


def tls_failure(node: Participant, cause: str, refused_by: str = "") -> None:
    """A TLS connection failed (PS3.15 B.10): one from `node` that our listening AE `refused_by`
    refused, or ours to `node` whose handshake failed; a failed node authentication."""
    what = (f"TLS connection from {node.host} refused by the {refused_by}" if refused_by
            else f"TLS handshake with {node.ae_title}@{node.host} failed")
    security_alert(NODE_AUTHENTICATION, f"{what}: {cause}", node=node)


#: Configuration keys whose change is a security matter, and those of the network's.
_SECURITY_KEYS = re.compile(r"^audit\.|\.(allowed_calling_aets|require_called_aet|tls_\w+)$")
_NETWORK_KEYS = re.compile(r"^(nodes\.|disk_server\.|memory_server\.|station\.ae_title$|timeouts\.)")


@_reported
def configuration_changed(old: config.Config, new: config.Config, path: Path, user: str = "") -> None:
    """The service took a new configuration (PS3.15 A.5.3.11: an informative Security Alert
    per change, naming the keys that changed, and `user` who changed them when known)."""
    keys = config.changed_keys(old, new)
    if not keys:
        return
    types = []
    if any(_SECURITY_KEYS.search(k) for k in keys):
        types.append(SECURITY_CONFIGURATION)
    if any(_NETWORK_KEYS.search(k) for k in keys):
        types.append(NETWORK_CONFIGURATION)
    if not types or any(not _SECURITY_KEYS.search(k) and not _NETWORK_KEYS.search(k) for k in keys):
        types.append(SOFTWARE_CONFIGURATION)
    security_alert(types[0], f"configuration changed: {', '.join(keys)}", uri=Path(path).absolute().as_uri(),
                   outcome=SUCCESS, types=types[1:], user=user)


# -- the message --------------------------------------------------------------------------------

#: Characters XML 1.0 cannot carry (2.2 Characters): replaced, so that any value makes a valid message.
_NOT_XML = re.compile("[^\t\n\r\x20-\ud7ff\ue000-\ufffd\U00010000-\U0010ffff]")


def _text(value: str) -> str:
    return _NOT_XML.sub("\ufffd", value)


def _b64(value: str | bytes) -> str:
    raw = value if isinstance(value, bytes) else value.encode("utf-8", "replace")
    return base64.b64encode(raw).decode("ascii")


def _now() -> str:
    """EventDateTime: the time with its UTC offset (PS3.15 A.5.2.5)."""
    return datetime.now(timezone.utc).astimezone().isoformat(timespec="milliseconds")


def _hostname() -> str:
    return socket.gethostname() or "localhost"


def _login() -> str:
    try:
        return getpass.getuser()
    except (KeyError, OSError):  # no passwd entry for the uid (a container)
        return str(os.getuid())


def _access_point(host: str) -> str:
    """NetworkAccessPointTypeCode: 2 for an IP address, 1 for a host name (PS3.15 A.5.1)."""
    try:
        ipaddress.ip_address(host)
        return "2"
    except ValueError:
        return "1"


class _Message:
    """One audit message being built: its parts in the order the schema wants them."""

    def __init__(self, msgid: str, event: Code, action: str, outcome: int, types: Sequence[Code] = (),
                 description: str = "") -> None:
        trail = _trail
        if trail is None:
            raise _NoTrail()
        self.trail = trail
        self.msgid = msgid
        self.outcome = outcome
        self.event = ET.Element("EventIdentification", EventActionCode=action, EventDateTime=_now(),
                                EventOutcomeIndicator=str(outcome))
        self._code(self.event, "EventID", event)
        for t in types:
            self._code(self.event, "EventTypeCode", t)
        if description:
            ET.SubElement(self.event, "EventOutcomeDescription").text = _text(description)
        self.participants: list[ET.Element] = []
        self.objects: list[ET.Element] = []

    def ours(self) -> Participant:
        return Participant(self.trail.cfg.station.ae_title)

    @staticmethod
    def _code(parent: ET.Element, tag: str, code: Code) -> ET.Element:
        return ET.SubElement(parent, tag, {"csd-code": code.value, "codeSystemName": code.scheme,
                                           "originalText": code.meaning})

    def participant(self, node: Participant, requestor: bool, role: Code | None, *, ae_titles: Sequence[str] = (),
                    process: bool = True, alternative: str = "", media: Code | None = None) -> None:
        """An ActiveParticipant: this service (UserID its process ID, PS3.15 A.5.2.1, and its
        AE titles) or a remote application (UserID its AE title) or, without `process`, a
        person or medium named by `node.ae_title`."""
        attrs: dict[str, str] = {}
        if not process:
            attrs["UserID"] = _text(node.ae_title)
            if alternative:
                attrs["AlternativeUserID"] = _text(alternative)
        elif node.local:
            attrs["UserID"] = str(self.trail.pid)
            attrs["AlternativeUserID"] = "AETITLES=" + ";".join(ae_titles or [node.ae_title])
            attrs["UserName"] = APP_NAME
        else:  # a remote application; its AE title is unknown before its A-ASSOCIATE-RQ
            attrs["UserID"] = _text(node.ae_title or node.host)
            if node.ae_title:
                attrs["AlternativeUserID"] = _text(f"AETITLES={node.ae_title}")
        attrs["UserIsRequestor"] = "true" if requestor else "false"
        host = node.host or (self.trail.host if process else "")
        if host:
            attrs["NetworkAccessPointID"] = _text(host)
            attrs["NetworkAccessPointTypeCode"] = _access_point(host)
        el = ET.Element("ActiveParticipant", attrs)
        if role is not None:
            self._code(el, "RoleIDCode", role)
        if media is not None:
            self._code(ET.SubElement(el, "MediaIdentifier"), "MediaType", media)
        self.participants.append(el)

    def _object(self, object_id: str, type_code: str, role: str | None, id_type: Code) -> ET.Element:
        attrs = {"ParticipantObjectID": _text(object_id), "ParticipantObjectTypeCode": type_code}
        if role is not None:
            attrs["ParticipantObjectTypeCodeRole"] = role
        el = ET.Element("ParticipantObjectIdentification", attrs)
        self._code(el, "ParticipantObjectIDTypeCode", id_type)
        self.objects.append(el)
        return el

    def study(self, uid: str, study: _Study) -> None:
        """A study (system object, report) with its accession number and SOP classes (PS3.15 A.5.2)."""
        el = self._object(uid, "2", "3", STUDY_INSTANCE_UID)
        ET.SubElement(el, "ParticipantObjectName").text = _text(uid)
        description = ET.SubElement(el, "ParticipantObjectDescription")
        if study.accession:
            ET.SubElement(description, "Accession", Number=_text(study.accession))
        for sop_class, n in study.sop_classes.items():
            ET.SubElement(description, "SOPClass", UID=_text(sop_class), NumberOfInstances=str(n))

    def patient(self, patient_id: str, name: str) -> None:
        """The patient (person, patient) by Patient ID and name."""
        el = self._object(patient_id, "1", "1", PATIENT_NUMBER)
        ET.SubElement(el, "ParticipantObjectName").text = _text(name)

    def query(self, sop_class: str, transfer_syntax: str, identifier: bytes) -> None:
        """The SOP class queried, and the query's identifier in its transfer syntax."""
        el = self._object(sop_class, "2", "3", SOP_CLASS_UID)
        ET.SubElement(el, "ParticipantObjectQuery").text = _b64(identifier)
        ET.SubElement(el, "ParticipantObjectDetail", type="TransferSyntax", value=_b64(transfer_syntax))

    def alert_subject(self, id_type: Code, object_id: str, name: str, description: str, role: str | None) -> None:
        """What a Security Alert is about, with its "Alert Description" detail."""
        el = self._object(object_id, "2", role, id_type)
        ET.SubElement(el, "ParticipantObjectName").text = _text(name)
        ET.SubElement(el, "ParticipantObjectDetail", type="Alert Description", value=_b64(description))

    def xml(self) -> str:
        """The message as one line of XML (line breaks in values become character references)."""
        root = ET.Element("AuditMessage")
        root.append(self.event)
        root.extend(self.participants)
        cfg = self.trail.cfg
        source = {"AuditSourceID": _text(cfg.station.ae_title)}
        if cfg.station.institution:
            source = {"AuditEnterpriseSiteID": _text(cfg.station.institution), **source}
        el = ET.SubElement(root, "AuditSourceIdentification", source)
        ET.SubElement(el, "AuditSourceTypeCode", {"csd-code": "2"})  # data acquisition device
        root.extend(self.objects)
        return ET.tostring(root, encoding="unicode").replace("\r", "&#13;").replace("\n", "&#10;")

    def emit(self) -> None:
        self.trail.emit(self.msgid, SEVERITY.get(self.outcome, 4), self.xml())


# -- syslog (RFC 5424) ----------------------------------------------------------------------------

_PRINTABLE = re.compile(r"[^\x21-\x7e]")


def syslog_message(severity: int, when: datetime, hostname: str, msgid: str, msg: str,
                   procid: int | None = None) -> bytes:
    """An RFC 5424 SYSLOG-MSG: PRI (facility authpriv), version 1, TIMESTAMP (UTC, microseconds),
    HOSTNAME, APP-NAME, PROCID, MSGID, no STRUCTURED-DATA, and MSG as UTF-8 after its BOM
    (RFC 5424 6.4)."""
    stamp = when.astimezone(timezone.utc).isoformat(timespec="microseconds").replace("+00:00", "Z")
    fields = [_PRINTABLE.sub("-", f)[:limit] or "-" for f, limit in
              ((hostname, 255), (APP_NAME, 48), (str(os.getpid() if procid is None else procid), 128), (msgid, 32))]
    header = f"<{FACILITY * 8 + severity}>1 {stamp} {' '.join(fields)} -"
    return header.encode("ascii") + b" \xef\xbb\xbf" + msg.encode("utf-8")


def octet_counted(frame: bytes) -> bytes:
    """RFC 6587 3.4.1 octet counting: MSG-LEN SP SYSLOG-MSG."""
    return b"%d " % len(frame) + frame


def open_stream(host: str, port: int) -> socket.socket:
    """A TCP connection to the collector (the place where a TLS transport, RFC 5425, would wrap it)."""
    sock = socket.create_connection((host, port), timeout=CONNECT_TIMEOUT)
    sock.settimeout(SEND_TIMEOUT)
    return sock


class SyslogSender:
    """RFC 5424 messages to one collector, from a bounded queue, by one thread of its own."""

    def __init__(self, host: str, port: int, transport: str, hostname: str, queue_size: int = QUEUE_SIZE) -> None:
        self.host, self.port, self.transport = host, port, transport
        self.hostname = hostname
        self.dropped = 0
        self.sent = 0
        self._queue: queue.Queue[bytes | None] = queue.Queue(queue_size)
        self._sock: socket.socket | None = None
        self._stopping = threading.Event()
        self._deadline = 0.0
        self._outage = False
        self._last_drop_log = -DROP_LOG_INTERVAL
        self._lock = threading.Lock()
        self._thread = threading.Thread(target=self._run, name=f"audit-syslog-{host}:{port}", daemon=True)
        self._thread.start()

    @property
    def target(self) -> str:
        return f"{self.host}:{self.port} ({self.transport})"

    def submit(self, msgid: str, severity: int, xml: str) -> None:
        """Queue a message; never waits (a full queue drops it)."""
        frame = syslog_message(severity, datetime.now(timezone.utc), self.hostname, msgid, xml)
        try:
            self._queue.put_nowait(frame)
        except queue.Full:
            self._drop("the queue is full: the collector is not keeping up or unreachable")

    def close(self, timeout: float = 2.0) -> None:
        """Send what is queued within `timeout` seconds; drop (and count) the rest."""
        self._deadline = time.monotonic() + timeout
        self._stopping.set()
        try:
            self._queue.put(None, timeout=timeout)
        except queue.Full:
            pass
        self._thread.join(timeout + CONNECT_TIMEOUT)
        if self.dropped:
            LOG.warning("audit: %d message(s) for the syslog collector %s were dropped; logs/audit.log has "
                        "every message", self.dropped, self.target)

    def _drop(self, why: str) -> None:
        with self._lock:
            self.dropped += 1
            now = time.monotonic()
            log = now - self._last_drop_log >= DROP_LOG_INTERVAL
            if log:
                self._last_drop_log = now
        if log:
            LOG.warning("audit: message for the syslog collector %s dropped (%d so far): %s; logs/audit.log "
                        "has every message", self.target, self.dropped, why)

    def _run(self) -> None:
        try:
            while True:
                try:
                    frame = self._queue.get(timeout=0.5)
                except queue.Empty:
                    if self._stopping.is_set():
                        break
                    continue
                if frame is None:
                    break
                if self._stopping.is_set() and time.monotonic() > self._deadline:
                    self._drop("the service stopped before it could be sent")
                    continue
                if self.transport == "udp":
                    self._send_datagram(frame)
                else:
                    self._send_stream(frame)
        finally:
            self._close_socket()

    def _send_datagram(self, frame: bytes) -> None:
        if len(frame) > MAX_DATAGRAM:
            self._drop(f"{len(frame)} bytes do not fit a UDP datagram")
            return
        try:
            if self._sock is None:
                family, kind, proto, _, address = socket.getaddrinfo(self.host, self.port, type=socket.SOCK_DGRAM)[0]
                sock = socket.socket(family, kind, proto)
                sock.connect(address)
                self._sock = sock
            self._sock.send(frame)
            self.sent += 1
        except OSError as exc:  # unknown host, ICMP port unreachable from an earlier datagram...
            self._close_socket()
            self._drop(f"{exc}")

    def _send_stream(self, frame: bytes) -> None:
        """Send one frame, reconnecting (back-off 1 s doubling to :data:`MAX_BACKOFF`) until it
        went or the service stops."""
        delay = 1.0
        while True:
            try:
                if self._sock is None or not _open(self._sock):
                    self._close_socket()
                    self._sock = open_stream(self.host, self.port)
                self._sock.sendall(octet_counted(frame))
                self.sent += 1
                if self._outage:
                    self._outage = False
                    LOG.info("audit: syslog collector %s reachable again", self.target)
                return
            except OSError as exc:
                self._close_socket()
                if not self._outage:
                    self._outage = True
                    LOG.warning("audit: syslog collector %s unreachable: %s; messages wait (at most %d) and are "
                                "sent again", self.target, exc, self._queue.maxsize)
            if self._stopping.is_set() and time.monotonic() + delay > self._deadline:
                self._drop("the collector was unreachable when the service stopped")
                return
            self._stopping.wait(delay)
            delay = min(delay * 2, MAX_BACKOFF)

    def _close_socket(self) -> None:
        if self._sock is not None:
            try:
                self._sock.close()
            except OSError:
                pass
            self._sock = None


def _open(sock: socket.socket) -> bool:
    """Whether a connection to a collector (which never sends) is still open: readable means closed."""
    try:
        readable, _, _ = select.select([sock], [], [], 0)
        return not readable or sock.recv(1, socket.MSG_PEEK | socket.MSG_DONTWAIT) != b""
    except OSError:
        return False
