"""The generated DICOM Conformance Statement (PS3.2 Annex A): its sections, its presentation
context tables against the running service's listening AEs, and the configuration it shows."""

from __future__ import annotations

import re
import subprocess
import sys
import xml.etree.ElementTree as ET
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from pynetdicom import AE, build_role
from pynetdicom.sop_class import Verification  # type: ignore[attr-defined]
from pynetdicom import evt

from modality_link import IMPLEMENTATION_CLASS_UID, config
from modality_link.config import Node, Timeouts
from modality_link.home import Home, free_port, temporary_home
from modality_link.net.echo import echo
from tests.support.certificates import TestCA
from tests.support.service import InProcessService

MWL_FIND = "1.2.840.10008.5.1.4.31"
#: A transfer syntax none of our lists has (High-Throughput JPEG 2000, lossless).
UNLISTED_SYNTAX = "1.2.840.10008.1.2.4.201"
CT_IMAGE_STORAGE = "1.2.840.10008.5.1.4.1.1.2"
#: The sections PS3.2 Annex A asks for, by title, in this order.
SECTIONS = [
    "Conformance Statement Overview", "Table of Contents", "Introduction", "Revision History", "Networking",
    "Implementation Model", "Application Data Flow", "Functional Definition of AEs",
    "Sequencing of Real-World Activities", "AE Specifications", "SOP Classes", "Association Policies",
    "General", "Number of Associations", "Asynchronous Nature", "Implementation Identifying Information",
    "Association Initiation Policy", "Association Acceptance Policy", "Network Interfaces",
    "Physical Network Interface", "Additional Protocols", "IPv4 and IPv6 Support", "Configuration",
    "AE Title/Presentation Address Mapping", "Local AE Titles", "Remote AE Title/Presentation Address Mapping",
    "Parameters", "Media Interchange", "File Meta Information for Implementation Class and Version",
    "Augmented and Private Application Profiles", "Media Configuration", "Support of Character Sets",
    "Security", "Security Profiles", "Association Level Security", "Application Level Security", "Annexes",
]


# -- reading the statement back ---------------------------------------------------------------------


@dataclass
class Section:
    number: str
    title: str
    text: list[str] = field(default_factory=list)


@dataclass
class Table:
    number: str
    caption: str
    section: str  # number of the section it is in
    header: list[str]
    rows: list[list[str]]


@dataclass
class Parsed:
    sections: list[Section]
    tables: list[Table]

    def section(self, prefix: str) -> Section:
        return next(s for s in self.sections if s.title.startswith(prefix))

    def within(self, section: Section) -> list[Table]:
        """The tables of `section` and its subsections."""
        return [t for t in self.tables if t.section == section.number or t.section.startswith(section.number + ".")]

    def table(self, caption: str) -> Table:
        return next(t for t in self.tables if t.caption == caption)


def cells(line: str) -> list[str]:
    parts = re.split(r"(?<!\\)\|", line.strip())[1:-1]
    return [p.strip().replace("\\|", "|").replace("\\\\", "\\") for p in parts]


def parse(markdown: str) -> Parsed:
    """Sections and tables of the Markdown statement."""
    sections: list[Section] = []
    tables: list[Table] = []
    lines = markdown.splitlines()
    i = 0
    while i < len(lines):
        line = lines[i]
        heading = re.match(r"^#{2,6} (\d+(?:\.\d+)*) (.+)$", line)
        caption = re.match(r"^\*\*Table (\S+)\. (.+)\*\*$", line)
        if heading:
            sections.append(Section(heading.group(1), heading.group(2)))
        elif caption:
            header = cells(lines[i + 2])
            assert set(lines[i + 3].replace("|", "").split()) == {"---"}, lines[i + 3]
            rows = []
            i += 4
            while i < len(lines) and lines[i].startswith("|"):
                rows.append(cells(lines[i]))
                assert len(rows[-1]) == len(header), lines[i]
                i += 1
            tables.append(Table(caption.group(1), caption.group(2), sections[-1].number, header, rows))
            continue
        elif sections and line:
            sections[-1].text.append(line)
        i += 1
    return Parsed(sections, tables)


def conformance(home: Home, *args: str) -> str:
    proc = subprocess.run([sys.executable, "-m", "modality_link", "--home", str(home.root), "conformance", *args],
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    return proc.stdout


def cli(home: Home, *args: str) -> None:
    proc = subprocess.run([sys.executable, "-m", "modality_link", "--home", str(home.root), *args],
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr


@dataclass
class Listed:
    """What the statement says one listening AE accepts."""

    ae_title: str
    port: int
    pairs: set[tuple[str, str]]  # (SOP class, transfer syntax)
    roles: dict[str, str]  # SOP class -> our role


def listening_aes(doc: Parsed) -> dict[str, Listed]:
    """The accepted presentation contexts of each listening AE, read from its section."""
    lists = {t.caption.removeprefix("Transfer Syntax List "): [row[1] for row in t.rows]
             for t in doc.tables if t.caption.startswith("Transfer Syntax List ")}
    found = {}
    for section in doc.sections:
        m = re.match(r"^(Disk server AE|Memory server AE): (\S+) on port (\d+)$", section.title)
        if not m:
            continue
        pairs, roles = set(), {}
        for t in doc.within(section):
            if not t.caption.startswith("Accepted Presentation Contexts"):
                continue
            assert t.header[1:4] == ["Abstract Syntax UID", "Transfer Syntax List", "Role"]
            for row in t.rows:
                pairs |= {(row[1], ts) for ts in lists[row[2]]}
                roles[row[1]] = row[3]
        found[m.group(1)] = Listed(m.group(2), int(m.group(3)), pairs, roles)
    return found


# -- the tests --------------------------------------------------------------------------------------


def test_the_statement_has_every_section_in_markdown_and_in_xhtml(short_tmp: Path) -> None:
    home = temporary_home(short_tmp / "h")
    doc = parse(conformance(home))
    titles = [s.title for s in doc.sections]
    at = 0
    for title in SECTIONS:  # in the order of PS3.2 Annex A
        assert title in titles[at:], f"no section {title!r} after {titles[at - 1] if at else 'the start'}"
        at = titles.index(title, at) + 1
    for ae in ("Station AE", "Disk server AE", "Memory server AE"):
        spec = doc.section(ae + ":")
        captions = [t.caption for t in doc.within(spec)]
        assert any(c.startswith("SOP Classes for") for c in captions), ae
        assert any(c.startswith("DICOM Implementation Class and Version") for c in captions), ae
        assert any(c.startswith("Number of Associations") for c in captions), ae
        if ae == "Station AE":  # what it proposes, and how it handles each status it receives
            assert any(c.startswith("Proposed Presentation Contexts") for c in captions)
            assert any(c.startswith("Response Status Handling Behavior") for c in captions)
        else:  # what it accepts, and the statuses it answers
            assert any(c.startswith("Accepted Presentation Contexts") for c in captions)
            assert any(c.startswith("Response Statuses of") for c in captions)
    assert doc.table("DICOM Implementation Class and Version for Disk server AE").rows[0] == [
        "Implementation Class UID", IMPLEMENTATION_CLASS_UID]
    storage = doc.table("Response Status Handling Behavior for Station AE: Storage")
    a7xx = next(row for row in storage.rows if "A700-A7FF" in row[2])
    # out of resources is retried, a data set the peer cannot take is not (docs/design.md "Jobs and failures")
    assert a7xx[3].startswith("failed for now")
    assert not next(row for row in storage.rows if "A900-A9FF" in row[2])[3].startswith("failed for now")
    returned = doc.table("Response Statuses of Disk server AE: Storage")
    assert {row[2] for row in returned.rows} == {"0000", "0110", "A700", "A900", "C000"}
    assert [row[0] for row in doc.table("Media Services").rows if not row[0].startswith("*")] == [
        "STD-GEN-CD", "STD-CTMR-CD", "STD-GEN-DVD-JPEG", "STD-GEN-DVD-J2K"]
    charsets = [row[0] for row in doc.table("Supported Specific Character Set Defined Terms").rows]
    assert {"ISO_IR 100", "ISO_IR 192", "ISO 2022 IR 87", "GB18030"} <= set(charsets)
    parameters = {row[0]: row for row in doc.table("Configuration Parameters: memory_server").rows}
    assert parameters["`memory_server.max_pdu`"][2] == "1048576"
    assert "PS3.8 D.1" in parameters["`memory_server.max_pdu`"][4]  # the field's comment, inherited
    assert parameters["`memory_server.max_pending_per_address`"][4] == parameters["`memory_server.max_pending`"][4] != ""
    assert "RAM" in parameters["`memory_server.cache_mb`"][4]

    page = short_tmp / "statement.html"
    cli(home, "conformance", "--format", "html", "--output", str(page))
    root = ET.parse(page).getroot()  # well-formed XHTML
    ns = {"h": "http://www.w3.org/1999/xhtml"}
    html_titles = [" ".join("".join(h.itertext()).split()[1:]) for h in root.iter()
                   if h.tag in {f"{{{ns['h']}}}h{n}" for n in range(2, 7)}]
    assert html_titles == titles
    assert len(root.findall(".//h:table", ns)) == len(doc.tables)
    assert root.find(".//h:title", ns) is not None and root.find(".//h:script", ns) is None


def test_every_listed_context_is_accepted_and_unlisted_ones_are_refused(service_in_process: InProcessService) -> None:
    svc = service_in_process
    doc = parse(conformance(svc.home))
    listed = listening_aes(doc)
    assert set(listed) == {"Disk server AE", "Memory server AE"}
    servers = {"Disk server AE": svc.service.disk_server, "Memory server AE": svc.service.memory_server}
    for name, aes in listed.items():
        server = servers[name]
        assert server is not None
        assert (aes.ae_title, aes.port) == (server.listener.ae_title, server.port)
        # the statement is the acceptor's own table: nothing more, nothing less
        offered = {(uid, ts) for s in server.acceptor.services for uid in s.sop_classes for ts in s.transfer_syntaxes}
        assert aes.pairs == offered, name
        for s in server.acceptor.services:
            for uid in s.sop_classes:
                assert ("SCU" in aes.roles[uid]) == s.requestor_scp, (name, uid, aes.roles[uid])
        # every listed (SOP class, transfer syntax) is accepted on a real association, in the
        # listed roles: one context each, at most 128 per association (PS3.8 9.3.2.2)
        pairs = sorted(aes.pairs)
        for start in range(0, len(pairs), 128):
            chunk = pairs[start:start + 128]
            requestor = AE(ae_title="CONFORMANCE")
            roles: list[Any] = []  # SCP/SCU Role Selection items (PS3.7 D.3.3.4)
            for uid, ts in chunk:
                requestor.add_requested_context(uid, ts)
                role = aes.roles[uid]
                if "SCU" in role and uid not in [r.sop_class_uid for r in roles]:  # we may be the SCU
                    roles.append(build_role(uid, scu_role=not role.startswith("SCU"), scp_role=True))
            assoc = requestor.associate("127.0.0.1", aes.port, ae_title=aes.ae_title, ext_neg=roles)
            assert assoc.is_established, f"{name} refused the association"
            try:
                accepted = {(str(cx.abstract_syntax), str(cx.transfer_syntax[0])): cx for cx in assoc.accepted_contexts}
                assert set(chunk) <= set(accepted), f"{name} refused {sorted(set(chunk) - set(accepted))[:5]}"
                for (uid, ts), cx in accepted.items():
                    if "SCU" in aes.roles[uid]:
                        assert cx.as_scp, f"{name}: the requestor may take the SCP role for {uid}"
            finally:
                assoc.release()
        # a SOP class the statement does not list, and a listed one in a syntax it does not list
        assert (MWL_FIND, "1.2.840.10008.1.2.1") not in aes.pairs
        assert (CT_IMAGE_STORAGE, UNLISTED_SYNTAX) not in aes.pairs
        requestor = AE(ae_title="CONFORMANCE")
        requestor.add_requested_context(Verification, "1.2.840.10008.1.2.1")
        requestor.add_requested_context(MWL_FIND, "1.2.840.10008.1.2.1")
        requestor.add_requested_context(CT_IMAGE_STORAGE, UNLISTED_SYNTAX)
        assoc = requestor.associate("127.0.0.1", aes.port, ae_title=aes.ae_title)
        assert assoc.is_established
        try:
            assert [str(cx.abstract_syntax) for cx in assoc.accepted_contexts] == [Verification]
            refused = {str(cx.abstract_syntax): cx.result for cx in assoc.rejected_contexts}
            assert refused == {MWL_FIND: 3, CT_IMAGE_STORAGE: 4}  # PS3.8 Table 9-18
        finally:
            assoc.release()


def test_the_station_proposes_what_the_statement_lists(short_tmp: Path) -> None:
    """The Verification SCU's proposal, as a peer sees it, is the statement's row."""
    home = temporary_home(short_tmp / "h")
    doc = parse(conformance(home))
    row = doc.table("Proposed Presentation Contexts for Station AE: Verification").rows[0]
    listed = [r[1] for r in doc.table(f"Transfer Syntax List {row[2]}").rows]
    seen: list[tuple[str, list[str]]] = []

    def requested(event: evt.Event) -> None:
        seen.extend((str(cx.abstract_syntax), [str(t) for t in cx.transfer_syntax])
                    for cx in event.assoc.requestor.requested_contexts)

    peer = AE(ae_title="PEER")
    peer.add_supported_context(Verification)
    port = free_port()
    scp = peer.start_server(("127.0.0.1", port), block=False, evt_handlers=[(evt.EVT_REQUESTED, requested)])
    assert scp is not None
    try:
        result = echo("PEER", Node(ae_title="PEER", host="127.0.0.1", port=port), "MODLINK", Timeouts())
        assert result.ok, result.message
    finally:
        scp.shutdown()
    assert seen == [(row[1], listed)]


def test_a_configuration_change_shows_in_the_statement(short_tmp: Path) -> None:
    home = temporary_home(short_tmp / "h")
    port = free_port()
    cli(home, "config", "set", "station.ae_title", "CT_ROOM_7")
    cli(home, "config", "set", "disk_server.max_pdu", "65536")
    cli(home, "config", "set", "disk_server.allowed_calling_aets", "PACS_SCU,VIEWER")
    cli(home, "config", "set", "memory_server.port", str(port))
    cli(home, "node", "add", "PACS", "--ae", "PACS_AE", "--host", "10.0.0.5", "--port", "104", "--roles", "store,commit")
    cli(home, "config", "set", "nodes.PACS.transfer_syntaxes", "1.2.840.10008.1.2.4.70,1.2.840.10008.1.2.1")
    doc = parse(conformance(home))
    assert doc.section("Station AE:").title == "Station AE: CT_ROOM_7"
    assert doc.section("Memory server AE:").title == f"Memory server AE: MODLINK_MEM on port {port}"
    general = next(s for s in doc.sections if s.number == doc.section("Disk server AE:").number + ".2.1")
    assert "Maximum PDU length received: 65536 bytes" in " ".join(general.text)
    row = {r[0]: r for r in doc.table("Configuration Parameters: disk_server").rows}["`disk_server.max_pdu`"]
    assert row[2:4] == ["1048576", "65536"]
    rules = doc.table("Association Acceptance Rules").rows[0]
    assert rules[:2] == ["Disk server AE", "PACS_SCU, VIEWER"]
    assert doc.table("Configured Remote AEs").rows == [
        ["PACS", '"PACS_AE"', "10.0.0.5", "104", "store, commit", "TS-NODE-PACS"]]
    assert [r[1] for r in doc.table("Transfer Syntax List TS-NODE-PACS").rows] == [
        "1.2.840.10008.1.2.4.70", "1.2.840.10008.1.2.1"]
    node_rows = {r[0]: r for r in doc.table("Configuration Parameters: nodes").rows}
    assert "PACS:" in node_rows["`nodes.NAME.transfer_syntaxes`"][3]
    assert "no syslog collector is configured" in " ".join(doc.section("Audit Trail").text)

    cli(home, "config", "set", "audit.syslog_host", "syslog.hospital.example")
    cli(home, "config", "set", "audit.syslog_transport", "tcp")
    audit_text = " ".join(parse(conformance(home)).section("Audit Trail").text)
    assert "syslog collector syslog.hospital.example:514 (TCP, RFC 5424)" in audit_text

    cli(home, "config", "set", "memory_server.enabled", "false")
    doc = parse(conformance(home))
    assert not any(s.title.startswith("Memory server AE:") for s in doc.sections)
    assert config.load(home.config_path).memory_server.enabled is False


def test_tls_settings_show_in_the_security_section(short_tmp: Path) -> None:
    ca = TestCA(short_tmp / "ca", "modality_link test CA")
    server = ca.issue("server", san="IP:127.0.0.1")
    home = temporary_home(short_tmp / "h")
    for key, path in (("tls_key", server.key), ("tls_ca", ca.cert), ("tls_cert", server.cert)):
        cli(home, "config", "set", f"disk_server.{key}", str(path))
    cli(home, "node", "add", "PACS", "--ae", "PACS_AE", "--host", "127.0.0.1", "--port", "104", "--roles", "store")
    cli(home, "config", "set", "nodes.PACS.tls_ca", str(ca.cert))
    doc = parse(conformance(home))
    profiles = {row[0]: row[1] for row in doc.table("Communication Profiles").rows}
    assert profiles["Disk server AE"].startswith("Non-downgrading BCP 195 TLS")
    assert f"requestor certificates required and verified against {ca.cert}" in profiles["Disk server AE"]
    assert profiles["Memory server AE"].startswith("TCP/IP without TLS")
    assert f"the node's certificate verified against {ca.cert} for host 127.0.0.1" in profiles["node PACS"]
    acceptance = doc.section("Disk server AE:").number + ".4"
    policy = next(s for s in doc.sections if s.number == acceptance)
    assert policy.title == "Association Acceptance Policy"
    assert any("speaks TLS only" in line for line in policy.text)
