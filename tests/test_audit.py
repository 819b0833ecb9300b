"""The audit trail (modality_link/audit.py, docs/design.md "Audit trail").

Every message the trail emits is validated against the DICOM audit message schema (PS3.15
A.5.1.1, tests/data/dicom-audit-message.rnc) by lxml's RELAX NG validator; the syslog copies are
received by collectors on loopback (a UDP socket, a TCP listener reading RFC 6587 octet-counted
frames) and parsed as RFC 5424 messages. The end-to-end tests drive a real ``modality-link serve``
with DCMTK's storescu, echoscu, findscu, movescu and getscu and the service's own command line.
"""

from __future__ import annotations

import base64
import functools
import logging
import re
import socket
import subprocess
import threading
import time
import tomllib
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Any, Iterator

import pytest
from lxml import etree
from pydicom.dataset import Dataset
from pydicom.uid import CTImageStorage, generate_uid

from modality_link import audit, config
from modality_link.db import InstanceStudy
from modality_link.home import Home, free_port
from tests.support.certificates import TestCA
from tests.support.instances import make_instance
from tests.support.service import ServiceProcess
from tests.support.tools import dcmtk_env, require_tool
from tests.support.waiting import wait_until

SCHEMA = Path(__file__).parent / "data" / "dicom-audit-message.rnc"
MSGIDS = {"ApplicationActivity", "InstancesTransferred", "Query", "Export", "SecurityAlert"}


@functools.cache
def schema() -> etree.RelaxNG:
    """The schema of PS3.15 A.5.1.1. Its ``##`` documentation lines follow the values they
    describe, where RELAX NG compact syntax (and so rnc2rng) wants them before one: as plain
    comments they say the same and the patterns are untouched."""
    return etree.RelaxNG.from_rnc_string(SCHEMA.read_text(encoding="utf-8").replace("##", "#"))


def valid(xml: str | bytes) -> Any:
    """The message parsed, after the schema accepted it."""
    doc = etree.fromstring(xml.encode("utf-8") if isinstance(xml, str) else xml)
    assert schema().validate(doc), f"{schema().error_log}\n{xml!r}"
    return doc


def audit_log(home_or_log: Home | Path) -> list[Any]:
    """Every message of an audit log, each validated."""
    path = home_or_log.log_dir / "audit.log" if isinstance(home_or_log, Home) else home_or_log
    if not path.exists():
        return []
    return [valid(line) for line in path.read_text(encoding="utf-8").splitlines()]


def event(doc: Any) -> str:
    return str(doc.find("EventIdentification/EventID").get("originalText"))


def types(doc: Any) -> list[str]:
    return [str(e.get("originalText")) for e in doc.findall("EventIdentification/EventTypeCode")]


def participant(doc: Any, role: str) -> Any:
    found = [p for p in doc.findall("ActiveParticipant") if p.find(f"RoleIDCode[@originalText='{role}']") is not None]
    assert len(found) == 1, etree.tostring(doc)
    return found[0]


def objects(doc: Any, id_type: str) -> list[Any]:
    return [o for o in doc.findall("ParticipantObjectIdentification")
            if o.find("ParticipantObjectIDTypeCode").get("originalText") == id_type]


def detail(obj: Any, kind: str) -> str:
    return base64.b64decode(obj.find(f"ParticipantObjectDetail[@type='{kind}']").get("value")).decode()


def sop_classes(study: Any) -> dict[str, int]:
    return {c.get("UID"): int(c.get("NumberOfInstances")) for c in study.findall("ParticipantObjectDescription/SOPClass")}


def transfers(docs: list[Any], study_uid: str) -> list[Any]:
    return [d for d in docs if event(d) == "DICOM Instances Transferred"
            and any(o.get("ParticipantObjectID") == study_uid for o in objects(d, "Study Instance UID"))]


# -- syslog collectors ----------------------------------------------------------------------------

SYSLOG = re.compile(rb"<(\d{1,3})>1 (\S+) (\S+) (\S+) (\S+) (\S+) (-) \xef\xbb\xbf(.*)", re.DOTALL)
RFC3339 = re.compile(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d(\.\d{1,6})?(Z|[+-]\d\d:\d\d)")


@dataclass
class Frame:
    """One RFC 5424 message as a collector received it."""

    facility: int
    severity: int
    timestamp: datetime
    hostname: str
    app_name: str
    procid: str
    msgid: str
    message: Any  # the audit message, validated


def parse(frame: bytes, validate: bool = True) -> Frame:
    """An RFC 5424 message: its header fields checked, its MSG validated as an audit message."""
    m = SYSLOG.fullmatch(frame)
    assert m, frame[:200]
    pri, stamp, host, app, procid, msgid, _, msg = m.groups()
    assert RFC3339.fullmatch(stamp.decode()), stamp
    when = datetime.fromisoformat(stamp.decode().replace("Z", "+00:00"))
    assert when.tzinfo is not None
    return Frame(int(pri) // 8, int(pri) % 8, when, host.decode(), app.decode(), procid.decode(), msgid.decode(),
                 valid(msg) if validate else etree.fromstring(msg))


@dataclass
class Collector:
    """A syslog collector on loopback: the frames it received, parsed."""

    frames: list[Frame] = field(default_factory=list)
    raw: list[bytes] = field(default_factory=list)
    lock: threading.Lock = field(default_factory=threading.Lock)
    port: int = 0
    validate: bool = True

    def close(self) -> None:
        raise NotImplementedError

    def got(self, frame: bytes) -> None:
        with self.lock:
            self.raw.append(frame)
            self.frames.append(parse(frame, self.validate))

    def of(self, msgid: str) -> list[Frame]:
        with self.lock:
            return [f for f in self.frames if f.msgid == msgid]


class UdpCollector(Collector):
    """RFC 5426: one message per datagram."""

    def __init__(self) -> None:
        super().__init__()
        self.sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        self.sock.bind(("127.0.0.1", 0))
        self.port = self.sock.getsockname()[1]
        self.thread = threading.Thread(target=self._run, daemon=True)
        self.thread.start()

    def _run(self) -> None:
        while True:
            try:
                data = self.sock.recv(65535)
            except OSError:
                return
            self.got(data)

    def close(self) -> None:
        self.sock.close()


class TcpCollector(Collector):
    """RFC 6587 octet counting (MSG-LEN SP SYSLOG-MSG) on every connection it accepts."""

    def __init__(self, port: int = 0, validate: bool = True) -> None:
        super().__init__(validate=validate)
        self.server = socket.create_server(("127.0.0.1", port))
        self.port = self.server.getsockname()[1]
        self.connections = 0
        self.thread = threading.Thread(target=self._accept, daemon=True)
        self.thread.start()

    def _accept(self) -> None:
        while True:
            try:
                conn, _ = self.server.accept()
            except OSError:
                return
            self.connections += 1
            threading.Thread(target=self._read, args=(conn,), daemon=True).start()

    def _read(self, conn: socket.socket) -> None:
        buf = b""
        with conn:
            while True:
                while b" " in buf:
                    length, _, rest = buf.partition(b" ")
                    assert length.isdigit() and not length.startswith(b"0"), buf[:40]
                    if len(rest) < int(length):
                        break
                    self.got(rest[:int(length)])
                    buf = rest[int(length):]
                data = conn.recv(65536)
                if not data:
                    return
                buf += data

    def close(self) -> None:
        self.server.close()


def check_frames(collector: Collector) -> None:
    """What every frame must be: facility authpriv (10), our APP-NAME, a known MSGID that is the
    message's event, a severity by its outcome (notice for a success, warning for a minor failure)."""
    names = {"ApplicationActivity": "Application Activity", "InstancesTransferred": "DICOM Instances Transferred",
             "Query": "Query", "Export": "Export", "SecurityAlert": "Security Alert"}
    for f in collector.frames:
        assert (f.facility, f.app_name) == (10, "modality-link")
        assert f.msgid in MSGIDS and event(f.message) == names[f.msgid]
        outcome = f.message.find("EventIdentification").get("EventOutcomeIndicator")
        assert f.severity == {"0": 5, "4": 4}[outcome]


# -- the messages, one trail in this process --------------------------------------------------------


@dataclass
class FakePeer:
    """The requestor of an association as the acceptor describes it."""

    address: str = "192.0.2.7"
    calling_ae: str = "CT_SCANNER"
    called_ae: str = "MODLINK"
    transfers: dict[str, audit.Transfer] = field(default_factory=dict)


@pytest.fixture
def trail(tmp_path: Path) -> Iterator[audit.AuditTrail]:
    cfg = config.Config()
    cfg.station.institution = "St. Elsewhere"
    t = audit.AuditTrail(tmp_path / "audit.log", cfg)
    audit.install(t)
    yield t
    audit.uninstall(t)
    t.close()


def instance(study: str = "1.2.3.4", patient: str = "PID1", name: str = "DOE^JANE", sop_class: str = CTImageStorage,
             accession: str = "ACC1") -> InstanceStudy:
    return InstanceStudy(generate_uid(), sop_class, study, accession, patient, name)


def test_every_message_type_is_valid_dicom_audit_xml(trail: audit.AuditTrail, tmp_path: Path) -> None:
    peer = FakePeer()
    audit.application_activity(started=True)
    # received: two studies of one patient and one of another; reported when the association ends
    for inst in [instance("1.2.3.4")] * 3 + [instance("1.2.3.5"), instance("1.2.3.6", "PID2", "ROE^RICHARD")]:
        audit.received(peer, inst)
    assert audit_log(tmp_path / "audit.log")[1:] == []  # nothing before the association ends
    audit.association_ended(peer)
    assert peer.transfers == {}
    # sent by a send job: one failed instance gets a message of its own
    sent = audit.Transfer(audit.Participant("MODLINK"), audit.Participant("PACS", "pacs.hospital.example"))
    sent.add(instance("1.2.3.4"))
    sent.add(instance("1.2.3.4"), ok=False)
    audit.transferred(sent)
    # a C-MOVE: a third party asked for it
    moved = instance("1.2.3.4")
    audit.sent(audit.Participant("MODLINK"), audit.Participant("VIEWER", "192.0.2.9"),
               {moved.sop_instance_uid: moved}, (), audit.remote(peer))
    audit.query_received(peer, "1.2.840.10008.5.1.4.1.2.2.1", "1.2.840.10008.1.2", b"\x08\x00\x52\x00")
    query = Dataset()
    query.QueryRetrieveLevel = "STUDY"
    query.PatientName = "DOE*"
    audit.query_sent("MODLINK", audit.Participant("RIS", "192.0.2.8"), "1.2.840.10008.5.1.4.31", query)
    audit.exported(str(tmp_path / "out.iso"), True, "MODLINK", "CD-R", [instance("1.2.3.4"), instance("1.2.3.6", "PID2")])
    audit.exported("/dev/sr0", False, "MODLINK_2", "DVD", [instance("1.2.3.4")], ok=False)
    audit.association_refused(peer, "calling AE title not recognized (disk server)")
    new = config.Config()
    new.station.name = "CT02"
    new.audit.syslog_host = "192.0.2.10"
    new.nodes["PACS"] = config.Node(ae_title="PACS")
    audit.configuration_changed(config.Config(), new, tmp_path / "config.toml", user="engineer")
    audit.configuration_changed(config.Config(), config.Config(), tmp_path / "config.toml")  # no change: nothing
    audit.tls_failure(audit.Participant("PACS", "192.0.2.11"), "certificate verify failed: unknown CA")
    audit.tls_failure(audit.Participant("", "192.0.2.12"), "not a TLS handshake", refused_by="disk server")
    # values no XML can carry as they are
    audit.received(peer, instance("1.2.3.7", "P\x01\n3", "BAD\x00^NAME\ud800\r\nX", accession="<&>\x7f"))
    audit.association_ended(peer)
    audit.application_activity(started=False)

    docs = audit_log(tmp_path / "audit.log")
    kinds = [(event(d), *types(d)) for d in docs]
    assert kinds == [
        ("Application Activity", "Application Start"),
        *[("DICOM Instances Transferred",)] * 5,
        ("Query",), ("Query",), ("Export",), ("Export",),
        ("Security Alert", "Node Authentication"),
        ("Security Alert", "Security Configuration", "Network Configuration", "Software Configuration"),
        ("Security Alert", "Node Authentication"),
        ("Security Alert", "Node Authentication"),
        ("DICOM Instances Transferred",),
        ("Application Activity", "Application Stop"),
    ]
    assert oct((tmp_path / "audit.log").stat().st_mode & 0o777) == "0o600"

    start = docs[0]
    app = participant(start, "Application")
    assert app.get("AlternativeUserID") == "AETITLES=MODLINK;MODLINK_MEM" and app.get("UserIsRequestor") == "false"
    assert participant(start, "Application Launcher").get("UserIsRequestor") == "true"
    source_id = start.find("AuditSourceIdentification")
    assert (source_id.get("AuditSourceID"), source_id.get("AuditEnterpriseSiteID")) == ("MODLINK", "St. Elsewhere")

    first, second = docs[1], docs[2]  # one message per patient
    assert first.find("EventIdentification").get("EventActionCode") == "C"
    src, dst = participant(first, "Source Role ID"), participant(first, "Destination Role ID")
    assert (src.get("UserID"), src.get("NetworkAccessPointID"), src.get("NetworkAccessPointTypeCode"),
            src.get("UserIsRequestor")) == ("CT_SCANNER", "192.0.2.7", "2", "true")
    assert dst.get("AlternativeUserID") == "AETITLES=MODLINK" and dst.get("UserIsRequestor") == "false"
    assert {o.get("ParticipantObjectID"): sop_classes(o) for o in objects(first, "Study Instance UID")} == {
        "1.2.3.4": {CTImageStorage: 3}, "1.2.3.5": {CTImageStorage: 1}}
    assert [(o.get("ParticipantObjectID"), o.findtext("ParticipantObjectName")) for o in objects(first, "Patient Number")] \
        == [("PID1", "DOE^JANE")]
    assert [o.get("ParticipantObjectID") for o in objects(second, "Patient Number")] == ["PID2"]

    ok, failed = docs[3], docs[4]
    assert [d.find("EventIdentification").get("EventOutcomeIndicator") for d in (ok, failed)] == ["0", "4"]
    assert failed.findtext("EventIdentification/EventOutcomeDescription") == "1 instance(s) not transferred"
    assert ok.find("EventIdentification").get("EventActionCode") == "R"
    assert participant(ok, "Destination Role ID").get("NetworkAccessPointTypeCode") == "1"  # a host name

    move = docs[5]
    requestors = [p.get("UserID") for p in move.findall("ActiveParticipant") if p.get("UserIsRequestor") == "true"]
    assert requestors == ["CT_SCANNER"] and len(move.findall("ActiveParticipant")) == 3

    received_query, sent_query = docs[6], docs[7]
    q = objects(received_query, "SOP Class UID")[0]
    assert base64.b64decode(q.findtext("ParticipantObjectQuery")) == b"\x08\x00\x52\x00"
    assert detail(q, "TransferSyntax") == "1.2.840.10008.1.2"
    q = objects(sent_query, "SOP Class UID")[0]
    assert q.get("ParticipantObjectID") == "1.2.840.10008.5.1.4.31"
    assert b"DOE*" in base64.b64decode(q.findtext("ParticipantObjectQuery"))
    assert participant(sent_query, "Source Role ID").get("UserIsRequestor") == "true"

    iso, disc = docs[8], docs[9]
    media = participant(iso, "Destination Media")
    assert media.get("UserID") == (tmp_path / "out.iso").as_uri() and media.get("AlternativeUserID") == "MODLINK"
    assert media.find("MediaIdentifier/MediaType").get("originalText") == "URI"
    assert sorted(o.get("ParticipantObjectID") for o in objects(iso, "Patient Number")) == ["PID1", "PID2"]
    assert participant(disc, "Destination Media").find("MediaIdentifier/MediaType").get("originalText") == "DVD"
    assert disc.find("EventIdentification").get("EventOutcomeIndicator") == "4"

    refused = docs[10]
    subject = objects(refused, "Node ID")[0]
    assert (subject.get("ParticipantObjectID"), subject.findtext("ParticipantObjectName")) == ("192.0.2.7", "CT_SCANNER")
    assert "calling AE title not recognized" in detail(subject, "Alert Description")
    changed = docs[11]
    assert changed.find("EventIdentification").get("EventOutcomeIndicator") == "0"  # informative
    subject = objects(changed, "URI")[0]
    assert subject.get("ParticipantObjectID") == (tmp_path / "config.toml").as_uri()
    assert detail(subject, "Alert Description") == \
        "configuration changed: station.name, audit.syslog_host, nodes.PACS"
    assert [(p.get("UserID"), p.get("UserIsRequestor")) for p in changed.findall("ActiveParticipant")][1:] == [
        ("engineer", "true")]
    ours, theirs = docs[12], docs[13]
    assert objects(ours, "Node ID")[0].get("ParticipantObjectID") == "192.0.2.11"
    assert detail(objects(ours, "Node ID")[0], "Alert Description") == \
        "TLS handshake with PACS@192.0.2.11 failed: certificate verify failed: unknown CA"
    peer = theirs.findall("ActiveParticipant")[1]  # before its A-ASSOCIATE-RQ: no AE title yet
    assert (peer.get("UserID"), peer.get("AlternativeUserID")) == ("192.0.2.12", None)
    assert detail(objects(theirs, "Node ID")[0], "Alert Description") == \
        "TLS connection from 192.0.2.12 refused by the disk server: not a TLS handshake"

    hostile = docs[14]
    assert objects(hostile, "Patient Number")[0].findtext("ParticipantObjectName") == "BAD\ufffd^NAME\ufffd\r\nX"


def test_nothing_is_reported_without_a_trail(tmp_path: Path) -> None:
    peer = FakePeer()
    audit.received(peer, instance())
    audit.application_activity(started=True)
    assert peer.transfers == {}


def test_audit_settings_are_validated() -> None:
    for bad in ({"syslog_transport": "tls"}, {"syslog_host": "a host"}, {"syslog_port": 0},
                {"syslog_host": "x\x7f"}):
        with pytest.raises(config.ConfigError, match="audit.syslog_"):
            config.from_dict({"audit": bad})
    cfg = config.from_dict({"audit": {"syslog_host": "::1", "syslog_transport": "tcp", "syslog_port": 6514}})
    assert config.from_dict(tomllib.loads(config.dumps(cfg))) == cfg


# -- the collector ------------------------------------------------------------------------------------


@pytest.mark.parametrize("transport", ["udp", "tcp"])
def test_rfc5424_frames_reach_a_collector(tmp_path: Path, transport: str) -> None:
    collector: Collector = UdpCollector() if transport == "udp" else TcpCollector()
    cfg = config.Config()
    cfg.audit = config.Audit(syslog_host="127.0.0.1", syslog_port=collector.port, syslog_transport=transport)
    t = audit.AuditTrail(tmp_path / "audit.log", cfg)
    audit.install(t)
    try:
        audit.application_activity(started=True)
        audit.association_refused(FakePeer(), "local limit exceeded")
        for _ in range(20):
            audit.query_received(FakePeer(), "1.2.840.10008.5.1.4.1.2.2.1", "1.2.840.10008.1.2", b"\x08\x00\x52\x00")
        wait_until(lambda: len(collector.frames) == 22, 10, "22 frames")
    finally:
        audit.uninstall(t)
        t.close()
        collector.close()
    check_frames(collector)
    assert [f.msgid for f in collector.frames[:3]] == ["ApplicationActivity", "SecurityAlert", "Query"]
    assert [f.severity for f in collector.frames[:2]] == [5, 4]  # notice; a refusal is a warning
    assert {f.hostname for f in collector.frames} == {socket.gethostname()}
    assert collector.frames[0].timestamp.timestamp() == pytest.approx(time.time(), abs=30)
    # the log holds the same messages
    logged = (tmp_path / "audit.log").read_text(encoding="utf-8").splitlines()
    assert [raw.split(b"\xef\xbb\xbf", 1)[1].decode() for raw in collector.raw] == logged
    if isinstance(collector, TcpCollector):
        assert collector.connections == 1


def test_an_unreachable_collector_never_holds_up_a_caller_and_drops_are_counted(caplog: pytest.LogCaptureFixture) -> None:
    port = free_port()  # nothing listens there
    caplog.set_level(logging.WARNING, logger="modality_link.audit")
    sender = audit.SyslogSender("127.0.0.1", port, "tcp", "console", queue_size=5)
    try:
        started = time.monotonic()
        for _ in range(50):
            sender.submit("Query", 5, "<AuditMessage/>")
        assert time.monotonic() - started < 1.0
        assert sender.dropped >= 44  # the queue holds 5, the sender thread may hold one more
    finally:
        sender.close(timeout=0.2)
    assert (sender.sent, sender.dropped) == (0, 50)
    log = caplog.text
    assert f"127.0.0.1:{port} (tcp) unreachable" in log
    assert "dropped" in log and "logs/audit.log has every message" in log


def test_a_collector_that_comes_back_gets_what_waited(caplog: pytest.LogCaptureFixture) -> None:
    port = free_port()
    caplog.set_level(logging.INFO, logger="modality_link.audit")
    sender = audit.SyslogSender("127.0.0.1", port, "tcp", "console")
    collector = None
    try:
        sender.submit("Query", 5, "<AuditMessage/>")
        wait_until(lambda: "unreachable" in caplog.text, 10, "the sender to find the collector down")
        sender.submit("Export", 5, "<AuditMessage/>")
        collector = TcpCollector(port, validate=False)  # the messages are placeholders
        wait_until(lambda: len(collector.raw) == 2, 15, "both messages once the collector listens")
    finally:
        sender.close(timeout=0.5)
        if collector is not None:
            collector.close()
    assert [SYSLOG.fullmatch(r).group(6) for r in collector.raw] == [b"Query", b"Export"]  # type: ignore[union-attr]
    assert sender.dropped == 0 and "reachable again" in caplog.text


# -- the service --------------------------------------------------------------------------------------


def storescu(port: int, files: list[Path], called: str = "MODLINK", calling: str = "CT_SCANNER") -> None:
    proc = subprocess.run([require_tool("storescu"), "-aet", calling, "-aec", called, "127.0.0.1", str(port),
                           *map(str, files)], env=dcmtk_env(), capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stdout + proc.stderr


def dcmtk(tool: str, *args: str, cwd: Path | None = None) -> str:
    proc = subprocess.run([require_tool(tool), *args], env=dcmtk_env(), capture_output=True, text=True,
                          errors="replace", timeout=120, cwd=cwd)
    return proc.stdout + proc.stderr


def make_study(root: Path, n: int, patient_id: str = "PID001") -> tuple[str, list[Path]]:
    root.mkdir(parents=True, exist_ok=True)
    study, series = generate_uid(), generate_uid()
    return study, [make_instance(root / f"{i}.dcm", study_uid=study, series_uid=series, instance_number=i + 1, seed=i,
                                 patient_id=patient_id) for i in range(n)]


def test_storescu_into_the_servers_refusals_and_config_changes_reach_the_log_and_a_udp_collector(
        short_tmp: Path) -> None:
    study, files = make_study(short_tmp / "in", 3)
    memory_study, memory_files = make_study(short_tmp / "mem", 1, "PID002")
    collector = UdpCollector()
    svc = ServiceProcess.start(short_tmp / "home", audit__syslog_host="127.0.0.1", audit__syslog_port=collector.port)
    try:
        home = svc.home
        storescu(svc.port, files)
        received = wait_until(lambda: transfers(audit_log(home), study), 20, "the Instances Transferred message")
        doc = received[0]
        assert len(received) == 1 and doc.find("EventIdentification").get("EventActionCode") == "C"
        src = participant(doc, "Source Role ID")
        assert (src.get("UserID"), src.get("NetworkAccessPointID"), src.get("UserIsRequestor")) == (
            "CT_SCANNER", "127.0.0.1", "true")
        assert participant(doc, "Destination Role ID").get("AlternativeUserID") == "AETITLES=MODLINK"
        assert [sop_classes(o) for o in objects(doc, "Study Instance UID")] == [{CTImageStorage: 3}]
        assert [o.get("ParticipantObjectID") for o in objects(doc, "Patient Number")] == ["PID001"]

        memory_port = config.load(home.config_path).memory_server.port
        storescu(memory_port, memory_files, called="MODLINK_MEM")
        doc = wait_until(lambda: transfers(audit_log(home), memory_study), 20, "the memory server's message")[0]
        assert participant(doc, "Destination Role ID").get("AlternativeUserID") == "AETITLES=MODLINK_MEM"

        log = dcmtk("echoscu", "-aet", "INTRUDER", "-aec", "SOMEONE", "127.0.0.1", str(svc.port))
        assert "Called AE Title Not Recognized" in log, log
        refused = wait_until(lambda: [d for d in audit_log(home) if "Node Authentication" in types(d)], 20,
                             "the refusal's Security Alert")
        assert "called AE title not recognized" in detail(objects(refused[0], "Node ID")[0], "Alert Description")

        assert svc.cli("config", "set", "station.name", "CT02").returncode == 0
        changed = wait_until(lambda: [d for d in audit_log(home) if "Software Configuration" in types(d)], 20,
                             "the configuration change's Security Alert")
        assert detail(objects(changed[0], "URI")[0], "Alert Description") == "configuration changed: station.name"
        wait_until(lambda: len(collector.frames) >= 5, 10, "the collector to receive every message so far")
    finally:
        svc.stop()
    docs = audit_log(svc.home)
    assert [types(d) for d in docs if event(d) == "Application Activity"] == [["Application Start"],
                                                                               ["Application Stop"]]
    wait_until(lambda: len(collector.frames) == len(docs), 10, "the collector to receive the stop")
    collector.close()
    check_frames(collector)
    assert [f.msgid for f in collector.frames] == [
        "ApplicationActivity", "InstancesTransferred", "InstancesTransferred", "SecurityAlert", "SecurityAlert",
        "ApplicationActivity"]
    assert oct((svc.home.log_dir / "audit.log").stat().st_mode & 0o777) == "0o600"


def test_queries_retrieves_sends_and_burns_reach_the_log_and_a_tcp_collector(short_tmp: Path) -> None:
    study, files = make_study(short_tmp / "in", 2)
    collector = TcpCollector()
    svc = ServiceProcess.start(short_tmp / "home", audit__syslog_host="127.0.0.1", audit__syslog_port=collector.port,
                               audit__syslog_transport="tcp")
    try:
        home = svc.home
        memory_port = config.load(home.config_path).memory_server.port
        for name, title, port, roles in (("SELF", "MODLINK", svc.port, "store,qr"),
                                         ("MEM", "MODLINK_MEM", memory_port, "store")):
            assert svc.cli("node", "add", name, "--ae", title, "--host", "127.0.0.1", "--port", str(port),
                           "--roles", roles).returncode == 0
        # the send job releases its association at once: the received side is reported when it ends
        assert svc.cli("config", "set", "nodes.SELF.idle_release", "0").returncode == 0
        assert svc.cli("import", str(short_tmp / "in")).returncode == 0

        log = dcmtk("findscu", "-S", "-aet", "FINDSCU", "-aec", "MODLINK", "-k", "QueryRetrieveLevel=STUDY",
                    "-k", f"StudyInstanceUID={study}", "127.0.0.1", str(svc.port))
        assert "Find Response: 1 (Pending)" in log, log
        out = svc.cli("query", "--from", "SELF", "-k", "PatientID=PID001")
        assert out.returncode == 0, out.stderr
        out = svc.cli("send", study, "--to", "SELF", "--wait")
        assert out.returncode == 0, out.stdout + out.stderr
        log = dcmtk("movescu", "-d", "-S", "-aet", "MOVESCU", "-aec", "MODLINK", "-aem", "MODLINK_MEM", "-k",
                    "QueryRetrieveLevel=STUDY", "-k", f"StudyInstanceUID={study}", "127.0.0.1", str(svc.port))
        assert re.search(r"Completed Suboperations +: 2", log), log[-1500:]
        (short_tmp / "get").mkdir()
        log = dcmtk("getscu", "-S", "-aet", "GETSCU", "-aec", "MODLINK", "-od", str(short_tmp / "get"), "-k",
                    "QueryRetrieveLevel=STUDY", "-k", f"StudyInstanceUID={study}", "127.0.0.1", str(svc.port))
        assert len(list((short_tmp / "get").iterdir())) == 2, log
        out = svc.cli("burn", study, "--iso", str(short_tmp / "out.iso"), "--wait")
        assert out.returncode == 0, out.stdout + out.stderr

        seen: list[tuple[int, int, int]] = []

        def everything() -> list[Any]:
            docs = audit_log(home)
            seen[:] = [(len(transfers(docs, study)), [event(d) for d in docs].count("Query"),
                        [event(d) for d in docs].count("Export"))]
            return docs if seen[0] == (5, 3, 1) else []

        try:
            docs = wait_until(everything, 30, "every message of the scenario")
        except AssertionError as exc:
            raise AssertionError(f"{exc}: (transfers, queries, exports) {seen[0]} of (5, 3, 1)") from None
    finally:
        svc.stop()

    def ae(p: Any) -> str:
        return str(p.get("AlternativeUserID")).removeprefix("AETITLES=")

    queries = [d for d in docs if event(d) == "Query"]
    # findscu's, and the one we sent to ourselves, as we sent it and as our Q/R SCP received it
    assert sorted((ae(participant(d, "Source Role ID")), ae(participant(d, "Destination Role ID"))) for d in queries) \
        == [("FINDSCU", "MODLINK"), ("MODLINK", "MODLINK"), ("MODLINK", "MODLINK")]
    routes = sorted((ae(participant(d, "Source Role ID")), ae(participant(d, "Destination Role ID")),
                     d.find("EventIdentification").get("EventActionCode"),
                     [ae(p) for p in d.findall("ActiveParticipant") if p.get("UserIsRequestor") == "true"])
                    for d in transfers(docs, study))
    assert routes == sorted([
        ("MODLINK", "MODLINK", "R", ["MODLINK"]),  # the send job
        ("MODLINK", "MODLINK", "C", ["MODLINK"]),  # ... as our disk server received it
        ("MODLINK", "MODLINK_MEM", "R", ["MOVESCU"]),  # the C-MOVE movescu asked for
        ("MODLINK", "MODLINK_MEM", "C", ["MODLINK"]),  # ... as the memory server received it
        ("MODLINK", "GETSCU", "R", ["GETSCU"]),  # the C-GET
    ])
    for d in transfers(docs, study):
        assert [sop_classes(o) for o in objects(d, "Study Instance UID")] == [{CTImageStorage: 2}]
    export = next(d for d in docs if event(d) == "Export")
    assert participant(export, "Destination Media").get("UserID") == (short_tmp / "out.iso").as_uri()
    assert [sop_classes(o) for o in objects(export, "Study Instance UID")] == [{CTImageStorage: 2}]

    docs = audit_log(svc.home)  # with the stop's
    wait_until(lambda: len(collector.frames) == len(docs), 15, "the collector to receive every message")
    collector.close()
    check_frames(collector)
    assert {f.msgid for f in collector.frames} == MSGIDS
    assert [etree.tostring(f.message) for f in collector.frames] == [etree.tostring(d) for d in docs]
    assert collector.connections == 1


def test_tls_failures_both_ways_are_security_alerts(short_tmp: Path) -> None:
    require_tool("openssl")
    ca, other = TestCA(short_tmp / "ca", "audit test CA"), TestCA(short_tmp / "other", "unrelated CA")
    server = ca.issue("server", san="IP:127.0.0.1,DNS:localhost")
    svc = ServiceProcess.start(short_tmp / "home", disk_server__tls_cert=str(server.cert),
                               disk_server__tls_key=str(server.key))
    try:
        home = svc.home
        dcmtk("echoscu", "-aec", "MODLINK", "127.0.0.1", str(svc.port))  # plain TCP on the TLS port
        assert svc.cli("node", "add", "SELF", "--ae", "MODLINK", "--host", "127.0.0.1", "--port",
                       str(svc.port)).returncode == 0
        assert svc.cli("config", "set", "nodes.SELF.tls_ca", str(other.cert)).returncode == 0
        assert svc.cli("echo", "SELF").returncode == 1  # our C-ECHO trusts another CA

        def alerts() -> list[str]:
            found = [detail(objects(d, "Node ID")[0], "Alert Description") for d in audit_log(home)
                     if "Node Authentication" in types(d)]
            plain = [a for a in found if a.startswith("TLS connection from 127.0.0.1 refused by the disk server: "
                                                      "not a TLS handshake")]
            ours = [a for a in found if a.startswith("TLS handshake with MODLINK@127.0.0.1 failed: ")]
            return found if plain and ours else []

        found = wait_until(alerts, 20, "the Security Alerts of both TLS failures")
    finally:
        svc.stop()
    ours = next(a for a in found if a.startswith("TLS handshake with"))
    assert "certificate" in ours.lower(), ours  # the cause as the TLS code names it
