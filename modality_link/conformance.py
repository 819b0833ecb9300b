"""The product's DICOM Conformance Statement, in the layout of PS3.2 Annex A, generated.

Nothing in it is a hand-kept copy of what the code does: the presentation contexts are read from
the tables the acceptors and requestors negotiate with (``net/servers.py``, ``net/qr.py``,
``net/commitment.py``, ``net/association.py``, ``net/tls.py``), the statuses from ``net/status.py``, the media
profiles from ``media/profiles.py``, the character sets from ``net/charset.py`` and pydicom's own
mapping, and every AE title, port, limit and parameter from the configuration given (the running
configuration of a home: ``modality-link conformance``). docs/design.md "Conformance statement".

The statement is built once as a list of blocks (:class:`Heading`, :class:`Text`, :class:`Items`,
:class:`Table`, :class:`Contents`) and rendered as Markdown (:func:`to_markdown`) or as a
standalone XHTML page (:func:`to_html`); both number the sections and tables the same way.
"""

from __future__ import annotations

import dataclasses
import datetime
import html
import inspect
import json
import re
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from pydicom.charset import python_encoding
from pydicom.uid import UID

from modality_link import IMPLEMENTATION_CLASS_UID, IMPLEMENTATION_VERSION_NAME, __version__
from modality_link.config import Config, Listener, Node
from modality_link.media.profiles import PROFILES, Profile
from modality_link.net import status
from modality_link.net.association import PROPOSED_TRANSFER_SYNTAXES
from modality_link.net.charset import ALIASES
from modality_link.net.commitment import STORAGE_COMMITMENT_PUSH
from modality_link.net.mpps import DISCONTINUATION_REASONS
from modality_link.net.qr import (
    PATIENT_ROOT_FIND,
    PATIENT_ROOT_GET,
    PATIENT_ROOT_MOVE,
    QR_TRANSFER_SYNTAXES,
    STUDY_ROOT_FIND,
    STUDY_ROOT_GET,
    STUDY_ROOT_MOVE,
)
from modality_link.net.retrieve import MODELS
from modality_link.net.servers import (
    ARCHIVE_TRANSFER_SYNTAXES,
    DECODED_TRANSFER_SYNTAXES,
    STORAGE_SOP_CLASSES,
    VERIFICATION,
)
from modality_link.net.tls import BCP195_CIPHERS
from modality_link.net.upper_layer import APPLICATION_CONTEXT

MWL_FIND = "1.2.840.10008.5.1.4.31"
MPPS = "1.2.840.10008.3.1.2.3.3"
FORMATS = ("md", "html")

# -- the document ---------------------------------------------------------------------------------


@dataclass
class Heading:
    """A section; `level` 1 is a chapter (PS3.2 A.1, A.3-A.9), 2 its sections, and so on."""

    level: int
    title: str


@dataclass
class Text:
    """A paragraph; `code` spans in backticks."""

    text: str


@dataclass
class Items:
    """A bulleted list."""

    items: list[str]


@dataclass
class Table:
    """A numbered table with its caption (PS3.2 gives most sections one)."""

    caption: str
    header: list[str]
    rows: list[list[str]]


@dataclass
class Contents:
    """The table of contents (PS3.2 A.2): the chapters and their sections."""


Block = Heading | Text | Items | Table | Contents


@dataclass(frozen=True)
class Contexts:
    """The presentation contexts of one activity of an AE: its SOP classes, the transfer syntax
    list they are negotiated with (a key of the statement's transfer syntax lists), our role, the
    statuses of the service, what the activity does and the extended negotiation."""

    service: str
    sop_classes: Sequence[str]
    syntaxes: str
    role: str
    statuses: status.Service
    description: str
    extended: str = "None"
    #: How an SCU activity treats a received status of a category, where it differs from
    #: :data:`RECEIVED`; and a failure the service's table marks retryable.
    behaviour: Mapping[str, str] = dataclasses.field(default_factory=dict)
    retried: str = ""


@dataclass(frozen=True)
class LocalAE:
    """One of our network AEs: its name in the statement, its configuration section (``station``
    for the AE of the SCUs), its AE title, its listener (None: it only initiates) and contexts."""

    name: str
    key: str
    ae_title: str
    listener: Listener | None
    contexts: list[Contexts]


#: Our role on a context where the requestor may take the SCP role by SCP/SCU Role Selection
#: (PS3.7 D.3.3.4): we are then the SCU (a C-GET's C-STORE sub-operations, a commitment report).
EITHER_ROLE = "SCP, or SCU by Role Selection"


def transfer_syntax_lists(cfg: Config) -> dict[str, list[str]]:
    """The transfer syntax lists the statement's presentation context tables refer to, by name:
    those of the acceptors and requestors, and each configured node's (a send proposes it)."""
    lists: dict[str, list[str]] = {
        "TS-NATIVE": list(DECODED_TRANSFER_SYNTAXES),
        "TS-ARCHIVE": list(ARCHIVE_TRANSFER_SYNTAXES),
        "TS-QR": list(QR_TRANSFER_SYNTAXES),
        "TS-SCU": list(PROPOSED_TRANSFER_SYNTAXES),
        "TS-NODE-DEFAULT": Node().transfer_syntaxes,
    }
    for name, node in cfg.nodes.items():
        lists[f"TS-NODE-{name}"] = list(node.transfer_syntaxes)
    return lists


def disk_server_contexts() -> list[Contexts]:
    """What the disk server's acceptor offers (``StorageServer``, as the service builds it:
    Query/Retrieve and commitment reports included), one entry per service."""
    return [
        Contexts("Verification", [VERIFICATION], "TS-NATIVE", "SCP", status.VERIFICATION, VERIFIED),
        Contexts("Storage", STORAGE_SOP_CLASSES, "TS-ARCHIVE", EITHER_ROLE, status.STORAGE,
                 "A remote AE sends instances. Each data set is written to its archive file as it arrives "
                 "and checked (File Meta and UIDs, completeness, encoding); the response follows once it is "
                 "durable. A C-STORE-RQ may name a Move Originator; it is not used."),
        Contexts("Query", [PATIENT_ROOT_FIND, STUDY_ROOT_FIND], "TS-QR", "SCP", status.QR_FIND,
                 "A remote AE searches the archive (hierarchical C-FIND of the Patient and Study Root "
                 "models, answered from the index; matching rules of PS3.4 C.2.2.2). Each answer has "
                 "Retrieve AE Title = this AE's title.",
                 "Relational queries: no; combined date and time matching: as requested; fuzzy "
                 "semantic matching of person names: no; timezone adjustment: no (PS3.4 C.5.1.1)"),
        Contexts("Retrieve (C-MOVE)", [PATIENT_ROOT_MOVE, STUDY_ROOT_MOVE], "TS-QR", "SCP", status.QR_MOVE,
                 "A remote AE moves instances to a configured node (see the association initiation "
                 "policy above)."),
        Contexts("Retrieve (C-GET)", [PATIENT_ROOT_GET, STUDY_ROOT_GET], "TS-QR", "SCP", status.QR_GET,
                 "A remote AE retrieves instances on its own association: they are sent on the Storage "
                 "contexts where it took the SCP role by Role Selection, converted to the context's "
                 "transfer syntax when needed."),
        Contexts("Storage Commitment report", [STORAGE_COMMITMENT_PUSH], "TS-NATIVE",
                 "SCU (the reporting SCP takes the SCP role, with or without Role Selection)",
                 status.COMMITMENT,
                 "A PACS that did not report on the N-ACTION's association sends its N-EVENT-REPORT on a "
                 "new association; the report is matched to its request by the Transaction UID, also "
                 "after a restart."),
    ]


VERIFIED = "A remote AE verifies the connection: C-ECHO is answered with success."


def memory_server_contexts() -> list[Contexts]:
    """What the memory server's acceptor offers (``MemoryServer``)."""
    return [
        Contexts("Verification", [VERIFICATION], "TS-NATIVE", "SCP", status.VERIFICATION, VERIFIED),
        Contexts("Storage", STORAGE_SOP_CLASSES, "TS-ARCHIVE", "SCP", status.STORAGE,
                 "A remote AE sends instances. Each data set is held in memory and checked like the disk "
                 "server's; the response follows once it is in the cache. A data set larger than the "
                 "whole cache is refused with A700. A C-STORE-RQ may name a Move Originator; it is not used."),
    ]


def station_contexts() -> list[Contexts]:
    """What the station AE proposes, per activity (the Storage SCU: the node's own list), and how
    it treats what it receives (docs/design.md "Jobs and failures")."""
    return [
        Contexts("Verification", [VERIFICATION], "TS-SCU", "SCU", status.VERIFICATION,
                 "`modality-link echo` (or the IPC call) opens an association to a node, sends C-ECHO and "
                 "releases it; the result shows status and round-trip time.",
                 behaviour={FAILURE: "the echo reports failure with the status"}),
        Contexts("Modality Worklist", [MWL_FIND], "TS-SCU", "SCU", status.WORKLIST,
                 "A worklist query (`worklist`, exam start) asks every return key with zero length; the "
                 "default matching keys are Scheduled Station AE Title = ours, SPS Start Date = today and "
                 "Modality = ours, inside the Scheduled Procedure Step Sequence. After `response_limit` "
                 "matches a C-CANCEL-RQ ends the query."),
        Contexts("Modality Performed Procedure Step", [MPPS], "TS-SCU", "SCU", status.MPPS,
                 "One N-CREATE (IN PROGRESS) at exam start and one N-SET (COMPLETED or DISCONTINUED) at "
                 "exam end, each a queued job that survives a restart; the N-SET waits for its N-CREATE.",
                 behaviour={
            FAILURE: "the message fails, the operator is alerted (mpps-refused); the exam's later "
                     "messages are not sent",
            status.Category.UNKNOWN: "below 0100 the message is done; any other: a failure",
        }, retried="tried again with the job back-off for as long as it takes; the operator is alerted "
                   "after the third attempt (mpps-unreachable)"),
        Contexts("Storage", STORAGE_SOP_CLASSES, "TS-NODE-NAME", "SCU", status.STORAGE,
                 "A send job (the Send button or an auto-send rule) proposes one context per (SOP class "
                 "of its instances, transfer syntax of the node's list); beyond 128 contexts one per SOP "
                 "class with the whole list. A file whose syntax was accepted goes out as stored; "
                 "otherwise it is converted to an accepted native syntax (a lossy source sent "
                 "decompressed keeps Lossy Image Compression 01 and is reported as a warning). The SOP "
                 "Class UID of an instance is never changed. The association stays open `idle_release` "
                 "seconds for the next job to the same node.",
                 behaviour={
            status.Category.WARNING: "the instance counts as sent; the warning is kept on it and shown",
            FAILURE: "the instance fails (with failure_policy stop the attempt ends there); the job "
                     "fails with the status in its error, not retried",
        }, retried=RETRIED),
        Contexts("Storage Commitment", [STORAGE_COMMITMENT_PUSH], "TS-SCU", "SCU", status.COMMITMENT,
                 "Once every instance of a send with commitment is stored, an N-ACTION names them in a "
                 "new transaction; the report is awaited `commit_wait` seconds on this association, then "
                 "on a new association to the disk server AE; without a report in `commit_timeout` the "
                 "request is repeated `commit_retries` times. Failed instances are sent again and "
                 "committed once more.",
                 behaviour={
            FAILURE: "the N-ACTION is refused: the association is aborted, the operator alerted "
                     "(commit-refused) and the job fails",
        }),
        Contexts("Query", [MODELS["patient"][0], MODELS["study"][0]], "TS-SCU", "SCU", status.QR_FIND,
                 "`modality-link query` and `retrieve` search a node with the qr role (Study Root by "
                 "default) at any level, hierarchically."),
        Contexts("Retrieve (C-MOVE)", [MODELS["patient"][1], MODELS["study"][1]], "TS-SCU", "SCU",
                 status.QR_MOVE,
                 "`modality-link retrieve` moves each study to our memory server AE (default) or disk "
                 "server AE; with no response for the node's `move_timeout` a C-CANCEL-RQ is sent, and "
                 "after 10 s more the association is aborted.",
                 behaviour={
                     status.Category.WARNING: "some sub-operations failed: the study is moved again at the "
                                              "job's next attempt",
                     status.Category.CANCEL: "cancelled by our watchdog or the operator: moved again at the "
                                             "next attempt, unless the job was cancelled",
                 }, retried=RETRIED),
    ]


# -- helpers --------------------------------------------------------------------------------------


def uid_name(uid: str) -> str:
    """The name PS3.6 gives `uid` (pydicom's registry), else the UID itself."""
    name = UID(uid).name
    return name if name != uid else uid


def value(v: Any) -> str:
    """A configuration value as it is written in the config file (TOML and JSON agree here)."""
    return json.dumps(v, ensure_ascii=False)


def field_comments(cls: type) -> dict[str, str]:
    """The ``#:`` comments above the fields of a configuration dataclass and its bases: a comment
    describes the fields that follow it up to a blank line or the next comment."""
    comments: dict[str, str] = {}
    for klass in reversed(cls.__mro__):
        if not dataclasses.is_dataclass(klass):
            continue
        try:
            lines = inspect.getsource(klass).splitlines()
        except (OSError, TypeError):  # no source (a frozen build): no comments
            continue
        names = {f.name for f in dataclasses.fields(klass)}
        block: list[str] = []
        current = ""
        for line in lines:
            text = line.strip()
            declared = re.match(r"([a-z_][a-z0-9_]*)\s*:", text)
            if text.startswith("#:"):
                if current:
                    block, current = [], ""
                block.append(text[2:].strip())
            elif declared and declared.group(1) in names:
                if block:
                    current, block = " ".join(block), []
                if current:
                    comments[declared.group(1)] = current
            else:
                block, current = [], ""
    return comments


def code_ranges(codes: Mapping[int, Any]) -> list[tuple[int, int, Any]]:
    """Runs of consecutive codes with the same value: (first, last, value)."""
    runs: list[tuple[int, int, Any]] = []
    for code in sorted(codes):
        if runs and runs[-1][1] == code - 1 and runs[-1][2] == codes[code]:
            runs[-1] = (runs[-1][0], code, codes[code])
        else:
            runs.append((code, code, codes[code]))
    return runs


def hex_range(first: int, last: int) -> str:
    return f"{first:04X}" if first == last else f"{first:04X}-{last:04X}"


FAILURE = status.Category.FAILURE
#: How the SCU activities treat a received status, per category (PS3.7 Annex C), unless an
#: activity says otherwise (:attr:`Contexts.behaviour`).
RECEIVED = {
    status.Category.SUCCESS: "done",
    status.Category.WARNING: "done; the warning is kept and shown with the result",
    status.Category.PENDING: "the operation continues (a match, or the sub-operation counts)",
    status.Category.CANCEL: "the operation was cancelled (our C-CANCEL-RQ after the response limit): the "
                            "result says it is partial",
    FAILURE: "failed at once: the job or command fails, its error names the status and the Error Comment",
    status.Category.UNKNOWN: "by its PS3.7 Annex C range; outside every range a failure, not retried",
}
RETRIED = ("failed for now: the job is queued again after the node's retry_interval (doubled each "
           "time, at most an hour), at most retries times")


def received_rows(cx: Contexts) -> list[list[str]]:
    """The DICOM Command Response Status Handling Behavior table (PS3.2 A.4.2.1.3.1.3) of an
    SCU activity, from the service's status table: one row per category and behaviour, with the
    meanings and codes it covers."""
    service = cx.statuses
    behaviour = dict(RECEIVED) | dict(cx.behaviour)
    keyed = {code: (cat, words, cx.retried if cx.retried and service.is_retryable(code) else behaviour[cat])
             for code, (cat, words) in service.table.items()}
    groups: dict[tuple[str, str], tuple[list[str], list[str]]] = {}
    for first, last, (cat, words, does) in code_ranges(keyed):
        meanings, codes = groups.setdefault((cat, does), ([], []))
        if words and words not in meanings:
            meanings.append(words)
        codes.append(hex_range(first, last))
    order = list(RECEIVED)
    rows = [[cat, "; ".join(meanings) or "-", ", ".join(codes), does]
            for (cat, does), (meanings, codes) in sorted(groups.items(), key=lambda g: order.index(g[0][0]))]
    rows.append([status.Category.UNKNOWN, f"a code {service.standard} do not define", "other",
                 behaviour[status.Category.UNKNOWN]])
    return rows


def answered_rows(service: status.Service) -> list[list[str]]:
    """The statuses our SCP answers (PS3.2 A.4.2.1.4.1.3), with when."""
    return [[status.category(code), service.table.get(code, ("", ""))[1] or service.text(code) if code else "-",
             f"{code:04X}", when]
            for code, when in sorted(service.answered.items(), key=lambda item: (item[0] != 0, item[0]))]


STATUS_HEADER = ["Service Status", "Further Meaning", "Error Code", "Behavior"]
FAILURE_HEADER = ["Exception", "Behavior"]


PLAIN = "TCP/IP without TLS (DICOM Upper Layer, PS3.8)"
#: What our TLS is (``net/tls.py``).
TLS_PROFILE = ("Non-downgrading BCP 195 TLS Secure Transport Connection Profile (PS3.15 B.10): TLS 1.2 "
               f"or later, TLS 1.2 cipher suites {BCP195_CIPHERS}")


def listener_security(lst: Listener) -> str:
    """How a listening AE's port is secured: plain TCP, or TLS with its certificate and, with a CA,
    the requestors' certificates required and verified."""
    cred = lst.tls()
    if cred is None:
        return PLAIN
    peers = (f"requestor certificates required and verified against {cred.ca}" if cred.ca
             else "no requestor certificate asked")
    return f"{TLS_PROFILE}; our certificate {cred.cert}; {peers}; a plain TCP connection is refused and logged"


def node_security(node: Node) -> str:
    """How associations to a node are secured: plain TCP, or TLS verifying its certificate."""
    cred = node.tls()
    if cred is None:
        return PLAIN
    ours = f"our certificate {cred.cert}" if cred.cert else "no certificate of ours"
    return f"{TLS_PROFILE}; the node's certificate verified against {cred.ca} for host {node.host}; {ours}"


# -- the statement --------------------------------------------------------------------------------


class Statement:
    """Builds the blocks of the statement for one configuration."""

    def __init__(self, cfg: Config, today: datetime.date | None = None) -> None:
        self.cfg = cfg
        self.today = today or datetime.date.today()
        self.blocks: list[Block] = []
        self.lists = transfer_syntax_lists(cfg)
        disk, mem = cfg.disk_server, cfg.memory_server
        self.aes = [LocalAE("Station AE", "station", cfg.station.ae_title, None, station_contexts())]
        if disk.enabled:
            self.aes.append(LocalAE("Disk server AE", "disk_server", disk.ae_title, disk, disk_server_contexts()))
        if mem.enabled:
            self.aes.append(LocalAE("Memory server AE", "memory_server", mem.ae_title, mem, memory_server_contexts()))

    # -- output helpers

    def h(self, level: int, title: str) -> None:
        self.blocks.append(Heading(level, title))

    def p(self, text: str) -> None:
        self.blocks.append(Text(text))

    def items(self, *items: str) -> None:
        self.blocks.append(Items(list(items)))

    def table(self, caption: str, header: list[str], rows: list[list[str]]) -> None:
        self.blocks.append(Table(caption, header, rows))

    def build(self) -> list[Block]:
        self.overview()
        self.h(1, "Table of Contents")
        self.blocks.append(Contents())
        self.introduction()
        self.networking()
        self.media()
        self.character_sets()
        self.security()
        self.annexes()
        return self.blocks

    # -- 1 overview

    def overview(self) -> None:
        self.h(1, "Conformance Statement Overview")
        self.p(f"modality_link {__version__} connects a CT or MR scanner console to the hospital: it "
               "asks the hospital's worklist which patients and procedures are scheduled, reports the "
               "progress of each procedure, sends the images to the archive and asks the archive to "
               "take responsibility for them. It receives images from other systems into its own "
               "archive or, for priors looked at once, into memory; other systems may search its "
               "archive and retrieve from it. It writes studies to CD and DVD for the patient or "
               "another hospital.")
        roles: dict[str, dict[str, set[str]]] = {}  # category -> SOP class -> our roles
        for ae in self.aes:
            for cx in ae.contexts:
                if cx.service == "Verification":  # not in the overview (PS3.2 A.1)
                    continue
                scu, scp = role_columns(cx.role)
                for uid in cx.sop_classes:
                    mine = roles.setdefault(category_of(cx.service), {}).setdefault(uid, set())
                    mine.update({"SCU"} if scu == "Yes" else set(), {"SCP"} if scp == "Yes" else set())
        rows: list[list[str]] = []
        for cat in ("Transfer", "Query/Retrieve", "Workflow Management"):
            rows.append([f"*{cat}*", "", ""])
            found = roles.get(cat, {})
            if cat == "Transfer":  # the Storage SOP classes are listed in the AE specifications
                either = set().union(*found.values())
                rows.append([f"Every Storage SOP Class of the tables \"Storage SOP Classes\" (section 4.2: "
                             f"{len(STORAGE_SOP_CLASSES)})", yes("SCU" in either), yes("SCP" in either)])
                continue
            rows += [[uid_name(uid), yes("SCU" in r), yes("SCP" in r)] for uid, r in found.items()]
        self.table("Network Services", ["SOP Classes", "User of Service (SCU)", "Provider of Service (SCP)"], rows)
        media_rows = []
        for medium in sorted({p.medium for p in PROFILES.values()}):
            media_rows.append([f"*{medium}*", "", ""])
            media_rows += [[p.name, "Yes", "No"] for p in PROFILES.values() if p.medium == medium]
        self.table("Media Services", ["Media Storage Application Profile", "Write Files (FSC or FSU)",
                                      "Read Files (FSR)"], media_rows)

    # -- 3 introduction

    def introduction(self) -> None:
        self.h(1, "Introduction")
        self.h(2, "Revision History")
        self.table("Revision History", ["Document Version", "Date of Issue", "Implementation Version Name",
                                        "Description"],
                   [[__version__, self.today.isoformat(), IMPLEMENTATION_VERSION_NAME,
                     "Generated by `modality-link conformance` from the code's negotiation tables and "
                     "this installation's configuration"]])
        self.h(2, "Audience")
        self.p("The hospital's biomedical, PACS and network teams and the integrators who connect "
               "the console to worklist, procedure step, archive and review systems.")
        self.h(2, "Remarks")
        self.p("This statement is generated from the tables the software negotiates with and from the "
               "configuration it runs with: AE titles, ports, limits and remote nodes are those of this "
               "installation when it was generated; the defaults are given beside them. DICOM by "
               "itself does not guarantee interoperability; this statement allows a first-level "
               "comparison, to be followed by tests with the peer systems.")
        self.h(2, "Terms and Definitions")
        self.p("The terms of PS3.2 A.3.4 apply: Application Entity (AE), AE Title, Association, "
               "Presentation Context, Abstract and Transfer Syntax, SCU, SCP, SOP Class and Instance, "
               "Protocol Data Unit (PDU).")
        self.h(2, "Abbreviations")
        self.table("Abbreviations", ["Abbreviation", "Meaning"], [
            ["AE", "Application Entity"], ["AET", "Application Entity Title"], ["CD-R", "Compact Disk Recordable"],
            ["DVD", "Digital Versatile Disc"], ["FSC", "File-Set Creator"], ["FSR", "File-Set Reader"],
            ["IHE", "Integrating the Healthcare Enterprise"], ["IOD", "Information Object Definition"],
            ["MPPS", "Modality Performed Procedure Step"], ["MWL", "Modality Worklist"],
            ["PACS", "Picture Archiving and Communication System"], ["PDU", "Protocol Data Unit"],
            ["PDI", "Portable Data for Imaging (IHE)"], ["Q/R", "Query/Retrieve"],
            ["SCP", "Service Class Provider"], ["SCU", "Service Class User"], ["SOP", "Service-Object Pair"],
            ["TCP/IP", "Transmission Control Protocol/Internet Protocol"], ["TLS", "Transport Layer Security"],
            ["TS", "Transfer Syntax"], ["UID", "Unique Identifier"], ["VR", "Value Representation"],
        ])
        self.h(2, "References")
        self.p("NEMA PS3, Digital Imaging and Communications in Medicine (DICOM) Standard, "
               "https://www.dicomstandard.org/current; IHE Radiology Technical Framework "
               "(Scheduled Workflow, Portable Data for Imaging); this product's docs/design.md.")

    # -- 4 networking

    def networking(self) -> None:
        cfg = self.cfg
        self.h(1, "Networking")
        self.h(2, "Implementation Model")
        self.h(3, "Application Data Flow")
        flows = [
            ["Technologist selects a patient", "Station AE", "Worklist server returns the scheduled procedures"],
            ["Exam starts / ends", "Station AE", "Procedure step manager (RIS) learns IN PROGRESS, "
                                                 "COMPLETED or DISCONTINUED"],
            ["Send button, or an auto-send rule at series or exam end", "Station AE", "Archive stores the images"],
            ["A send with commitment ends", "Station AE (N-ACTION); Disk server AE (a report on a new "
                                            "association)", "Archive commits the images"],
            ["Technologist loads a prior", "Station AE (C-FIND, C-MOVE)", "Archive sends the study to "
                                                                          "the memory or disk server AE"],
        ]
        if cfg.disk_server.enabled:
            flows.append(["Images arrive in the local archive", "Disk server AE",
                          "A modality, workstation or archive sends (C-STORE)"])
            flows.append(["Local archive is searched and retrieved", "Disk server AE",
                          "A workstation queries (C-FIND) and retrieves (C-MOVE, C-GET)"])
        if cfg.memory_server.enabled:
            flows.append(["Images arrive in memory for review", "Memory server AE",
                          "An archive or workstation sends (C-STORE)"])
        self.table("Application Data Flow", ["Local Real-World Activity", "Application Entity",
                                             "Remote Real-World Activity"], flows)
        self.h(3, "Functional Definition of AEs")
        for ae in self.aes:
            self.h(4, f"Functional Definition of {ae.name}")
            self.p(self.function_of(ae))
        self.h(3, "Sequencing of Real-World Activities")
        self.items(
            "Worklist query (MWL C-FIND): the technologist picks the scheduled procedure step; an "
            "unscheduled exam needs none.",
            "Exam start: MPPS N-CREATE with status IN PROGRESS.",
            "Images are acquired into the local archive; a series rule sends each completed series.",
            "Exam end: MPPS N-SET with COMPLETED (or DISCONTINUED with a reason); an exam rule then "
            "sends the exam's images, also those of a discontinued exam.",
            "Storage Commitment is asked (N-ACTION) once every instance of a send is stored, never before.",
            "Burning a disc and loading priors are independent of these steps.",
        )
        self.h(2, "AE Specifications")
        self.p("The presentation context tables below name a transfer syntax list each; the lists are, "
               "in our order of preference:")
        for name, uids in self.lists.items():
            self.table(f"Transfer Syntax List {name}", ["Transfer Syntax Name", "Transfer Syntax UID"],
                       [[uid_name(u), u] for u in uids])
        for ae in self.aes:
            self.ae_specification(ae)
        self.h(2, "Network Interfaces")
        self.h(3, "Physical Network Interface")
        self.p("The operating system's TCP/IP stack on the console's network interfaces (DICOM Upper "
               "Layer over TCP/IP, PS3.8).")
        self.h(3, "Additional Protocols")
        self.p("Node host names are resolved through the operating system (DNS or hosts file). No "
               "System Management Profile (PS3.15 Annex C) is supported; time synchronisation is the "
               "operating system's.")
        self.h(3, "IPv4 and IPv6 Support")
        self.p("The listening AEs accept IPv4 connections (`bind_address`, empty for every interface). "
               "Nodes are reached by IPv4 address or host name.")
        self.h(2, "Configuration")
        self.h(3, "AE Title/Presentation Address Mapping")
        self.h(4, "Local AE Titles")
        rows = [["Station AE (every SCU)", value(cfg.station.ae_title), value(Config().station.ae_title), "-", "-"]]
        for key, label in (("disk_server", "Disk server AE"), ("memory_server", "Memory server AE")):
            lst, default = getattr(cfg, key), getattr(Config(), key)
            state = "" if lst.enabled else " (disabled)"
            rows.append([label + state, value(lst.ae_title), value(default.ae_title), str(lst.port), str(default.port)])
        self.table("AE Title Configuration", ["Application Entity", "AE Title", "Default AE Title", "TCP/IP Port",
                                              "Default TCP/IP Port"], rows)
        self.h(4, "Remote AE Title/Presentation Address Mapping")
        self.p("Remote AEs are the configured nodes (`modality-link node add`); a node's roles say "
               "which activities use it. A C-MOVE destination must be a configured node.")
        self.table("Configured Remote AEs", ["Node", "AE Title", "Host", "Port", "Roles", "Transfer Syntax List"],
                   [[name, value(n.ae_title), n.host, str(n.port), ", ".join(n.roles), f"TS-NODE-{name}"]
                    for name, n in cfg.nodes.items()] or [["(none configured)", "", "", "", "", ""]])
        self.h(3, "Parameters")
        self.parameters()

    def function_of(self, ae: LocalAE) -> str:
        services = ", ".join(cx.service for cx in ae.contexts)
        if ae.listener is None:
            return (f"The Station AE ({value(ae.ae_title)}) is the calling AE of every association the console "
                    f"opens: {services}. It acts on the technologist's commands and on the persistent job "
                    "queue, which retries what a peer could not do yet.")
        where = f"{value(ae.ae_title)} on port {ae.listener.port}"
        if ae.key == "disk_server":
            return (f"The disk server AE ({where}) accepts associations for {services}. Received "
                    "instances are written, as received, to the local archive and indexed; queries are "
                    "answered from the index; C-MOVE opens an association to the destination node with "
                    "this AE's title as calling AE title. It also takes Storage Commitment reports "
                    "that a PACS sends on a new association.")
        return (f"The memory server AE ({where}) accepts associations for {services}. Received "
                f"instances are held in memory (at most memory_server.cache_mb = "
                f"{self.cfg.memory_server.cache_mb} MiB, least recently used first out) for the "
                "console's viewer; nothing is written to disk, and the cache is empty after a restart.")

    # -- 4.2 one AE

    def ae_specification(self, ae: LocalAE) -> None:
        cfg, name, listener, contexts, key = self.cfg, ae.name, ae.listener, ae.contexts, ae.key
        heading = f"{name}: {ae.ae_title}" + (f" on port {listener.port}" if listener else "")
        self.h(3, heading)
        self.h(4, "SOP Classes")
        self.p("This Application Entity provides Standard Conformance to the following SOP Classes:")
        sop_rows = []
        for cx in contexts:
            scu, scp = role_columns(cx.role)
            if cx.service == "Storage" and listener is None:
                sop_rows.append(["Every Storage SOP Class (the SOP class of each instance sent; the "
                                 "listening AEs' tables \"Storage SOP Classes\")", "-", scu, scp])
                continue
            if cx.service == "Storage":
                continue  # its own table below
            sop_rows += [[uid_name(uid), uid, scu, scp] for uid in cx.sop_classes]
        self.table(f"SOP Classes for {name}", ["SOP Class Name", "SOP Class UID", "SCU", "SCP"], sop_rows)
        storage = next((cx for cx in contexts if cx.service == "Storage" and listener is not None), None)
        if storage is not None:
            scu, scp = role_columns(storage.role)
            self.table(f"Storage SOP Classes for {name}", ["SOP Class Name", "SOP Class UID", "SCU", "SCP"],
                       [[uid_name(uid), uid, scu, scp] for uid in storage.sop_classes])
        self.h(4, "Association Policies")
        self.h(5, "General")
        max_pdu = listener.max_pdu if listener else Node().max_pdu
        pdu_text = (f"{max_pdu} bytes" if max_pdu else "unlimited") + (
            f" (`{key}.max_pdu`)" if listener else " (`nodes.NAME.max_pdu`, default; per node in the configuration)")
        self.table(f"DICOM Application Context for {name}", ["Application Context Name", "Value"],
                   [["Application Context Name", APPLICATION_CONTEXT]])
        self.p(f"Maximum PDU length received: {pdu_text}. The PDUs we send are no longer than the peer's "
               "maximum (at least 1024 bytes; 1 MiB when the peer sets no limit).")
        self.h(5, "Number of Associations")
        if listener is None:
            per_node = "; ".join(f"{n}: {node.max_associations}" for n, node in cfg.nodes.items()) or "no node configured"
            self.table(f"Number of Associations as an Association Initiator for {name}",
                       ["Parameter", "Value"],
                       [["Maximum number of simultaneous associations per node (`nodes.NAME.max_associations`)",
                         f"{Node().max_associations} by default ({per_node})"],
                        ["MPPS messages", "one at a time over all nodes, besides the above"]])
        else:
            self.table(f"Number of Associations as an Association Acceptor for {name}", ["Parameter", "Value"],
                       [["Maximum number of simultaneous associations", f"{listener.max_associations} "
                         f"(`{key}.max_associations`); beyond it A-ASSOCIATE-RJ transient, local limit exceeded"],
                        ["Connections without an association", f"{listener.max_pending} overall, "
                         f"{listener.max_pending_per_address} per peer address; a new one beyond a cap "
                         "closes the oldest"]])
            if key == "disk_server":
                self.table(f"Number of Associations as an Association Initiator for {name}", ["Parameter", "Value"],
                           [["Maximum number of simultaneous associations",
                             "one per C-MOVE being served (to its destination)"]])
        self.h(5, "Asynchronous Nature")
        self.table(f"Asynchronous Nature for {name}", ["Parameter", "Value"],
                   [["Maximum number of outstanding asynchronous transactions", "1 (no Asynchronous Operations "
                     "Window is negotiated, PS3.7 D.3.3.3)"]])
        self.h(5, "Implementation Identifying Information")
        self.table(f"DICOM Implementation Class and Version for {name}", ["Parameter", "Value"],
                   [["Implementation Class UID", IMPLEMENTATION_CLASS_UID],
                    ["Implementation Version Name", IMPLEMENTATION_VERSION_NAME]])
        self.h(4, "Association Initiation Policy")
        if listener is None:
            for cx in contexts:
                self.initiated_activity(name, cx)
        elif key == "disk_server":
            self.move_sub_operations(name)
        else:
            self.p(f"The {name} initiates no association.")
        self.h(4, "Association Acceptance Policy")
        if listener is None:
            self.p("The Station AE accepts no association. A Storage Commitment report on a new "
                   "association is taken by the disk server AE.")
            return
        self.items(
            ("The port speaks TLS only (section \"Security Profiles\")" if listener.tls() is not None
             else "The port speaks plain TCP (section \"Security Profiles\")"),
            "The called AE title must be ours" if listener.require_called_aet
            else f"Any called AE title is accepted (`{key}.require_called_aet` = false)",
            (f"Only these calling AE titles are accepted: {', '.join(listener.allowed_calling_aets)} "
             "(others: rejected, calling AE title not recognized)") if listener.allowed_calling_aets
            else f"Any calling AE title is accepted (`{key}.allowed_calling_aets` is empty)",
            f"The A-ASSOCIATE-RQ must be complete within ARTIM ({cfg.timeouts.artim:g} s) and at most 128 KiB; "
            "a P-DATA-TF longer than our maximum PDU aborts the association",
            f"An association idle for the network timeout ({cfg.timeouts.network:g} s) is aborted",
            "A request on a presentation context whose service has no handler for it is answered "
            "0211 (unrecognized operation)",
            "The transfer syntax of a context is the first of our list that the requestor proposed",
        )
        for cx in contexts:
            self.accepted_activity(name, cx)

    def activity(self, title: str, description: str, kind: str) -> None:
        """The headings of one activity (PS3.2 A.4.2.1.3.1, A.4.2.1.4.1) up to its presentation
        context table, `kind` "Proposed" or "Accepted"."""
        self.h(5, f"Activity - {title}")
        self.h(6, "Description and Sequencing of Activities")
        self.p(description)
        self.h(6, f"{kind} Presentation Contexts")

    def initiated_activity(self, name: str, cx: Contexts) -> None:
        self.activity(cx.service, cx.description, "Proposed")
        if cx.service == "Storage":
            self.table(f"Proposed Presentation Contexts for {name}: {cx.service}", CONTEXT_HEADER,
                       [["Any Storage SOP Class (of each instance sent)", "-", f"{cx.syntaxes} of the destination "
                         "node (TS-NODE-DEFAULT when not configured)", cx.role, cx.extended]])
            self.p("When several transfer syntaxes are accepted for a SOP class, an instance goes out in "
                   "its stored syntax if accepted, else in the first accepted syntax of the node's list.")
        else:
            self.table(f"Proposed Presentation Contexts for {name}: {cx.service}", CONTEXT_HEADER, context_rows(cx))
        self.h(6, f"SOP Specific Conformance for {cx.service}")
        self.table(f"Response Status Handling Behavior for {name}: {cx.service}", STATUS_HEADER,
                   received_rows(cx))
        self.table(f"Communication Failure Behavior for {name}: {cx.service}", FAILURE_HEADER, [
            ["No TCP connection, association rejected or aborted during set-up",
             "the attempt fails with a sentence naming the peer and the reason; a queued job is tried again "
             "(a node that accepts none of the contexts fails at once)"],
            [f"Timeout (connect {self.cfg.timeouts.connect:g} s, ACSE {self.cfg.timeouts.acse:g} s, DIMSE "
             f"{self.cfg.timeouts.dimse:g} s)", "the association is aborted; the attempt fails and a queued job "
             "is tried again"],
            ["Association aborted by the peer", "the attempt fails; what was not acknowledged is not counted as done"],
        ])

    def move_sub_operations(self, name: str) -> None:
        self.activity("C-MOVE sub-operations",
                      "For each C-MOVE it accepts, the disk server AE opens one association to the destination "
                      "node (a configured node, any role) with its own AE title as calling AE title and sends "
                      "each instance as the Storage SCU of a send job does; a pending C-MOVE response with the "
                      "counts follows every sub-operation.", "Proposed")
        self.table(f"Proposed Presentation Contexts for {name}: C-MOVE sub-operations", CONTEXT_HEADER,
                   [["Any Storage SOP Class (of each instance moved)", "-", "TS-NODE-NAME of the destination",
                     "SCU", "None"]])
        self.h(6, "SOP Specific Conformance for C-MOVE sub-operations")
        self.p("A failed or refused C-STORE counts as a failed sub-operation (its SOP Instance UID goes to "
               "the Failed SOP Instance UID List); a lost association counts what was not acknowledged as "
               "failed.")

    def accepted_activity(self, name: str, cx: Contexts) -> None:
        self.activity(cx.service, cx.description, "Accepted")
        self.table(f"Accepted Presentation Contexts for {name}: {cx.service}", CONTEXT_HEADER, context_rows(cx))
        self.h(6, f"SOP Specific Conformance for {cx.service}")
        self.table(f"Response Statuses of {name}: {cx.service}", STATUS_HEADER, answered_rows(cx.statuses))

    # -- 4.4.2 parameters

    def parameters(self) -> None:
        cfg, defaults = self.cfg, Config()
        self.p("Every parameter is set with `modality-link config set SECTION.KEY VALUE` (nodes: "
               "`nodes.NAME.KEY`); values are in the configuration file's notation, times in seconds.")
        for f in dataclasses.fields(Config):
            if f.name == "nodes":
                continue
            section, default = getattr(cfg, f.name), getattr(defaults, f.name)
            comments = field_comments(type(section))
            about = inspect.getdoc(type(section))
            if about and not about.startswith(type(section).__name__ + "("):  # not a generated one
                self.p(f"`[{f.name}]`: {' '.join(about.split())}")
            rows = [[f"`{f.name}.{k.name}`", "Yes", value(getattr(default, k.name)),
                     value(getattr(section, k.name)), comments.get(k.name, "")]
                    for k in dataclasses.fields(section)]
            self.table(f"Configuration Parameters: {f.name}", PARAMETER_HEADER, rows)
        node_default = Node()
        comments = field_comments(Node)
        self.p(f"`[nodes.NAME]`: {' '.join((inspect.getdoc(Node) or '').split())}")
        rows = []
        for k in dataclasses.fields(Node):
            set_here = [f"{n}: {value(getattr(node, k.name))}" for n, node in cfg.nodes.items()
                        if getattr(node, k.name) != getattr(node_default, k.name)]
            rows.append([f"`nodes.NAME.{k.name}`", "Yes", value(getattr(node_default, k.name)),
                         "; ".join(set_here) or "(default)", comments.get(k.name, "")])
        self.table("Configuration Parameters: nodes", PARAMETER_HEADER, rows)

    # -- 5 media

    def media(self) -> None:
        cfg = self.cfg
        self.h(1, "Media Interchange")
        self.h(2, "Implementation Model")
        self.h(3, "Application Data Flow")
        self.p("The technologist burns studies of the local archive (`modality-link burn`): the Media AE "
               "creates a File-set with its DICOMDIR on a CD-R or DVD (ISO 9660, PS3.12), or an ISO "
               "image file; a remote workstation reads the disc.")
        self.h(3, "Functional Definition of AEs")
        self.p("The Media AE is a File-Set Creator (FSC): it writes the instances, converted where the "
               "profile requires, their DICOMDIR and the IHE PDI files README.TXT and INDEX.HTM, spanning "
               f"several discs when a set exceeds `media.capacity_bytes` ({cfg.media.capacity_bytes} bytes).")
        self.h(3, "Sequencing of Real-World Activities")
        self.p("A burn is a queued job; a spanned set waits up to `media.disc_timeout_s` "
               f"({cfg.media.disc_timeout_s:g} s) for each next blank disc.")
        self.h(3, "File Meta Information for Implementation Class and Version")
        self.table("File Meta Information", ["Attribute", "Value"],
                   [["File Meta Information Version", "00\\01"],
                    ["Implementation Class UID", IMPLEMENTATION_CLASS_UID],
                    ["Implementation Version Name", IMPLEMENTATION_VERSION_NAME]])
        self.h(2, "AE Specifications")
        self.h(3, "Media AE - Specification")
        self.table("AE Related Application Profiles, Real-World Activities, and Roles",
                   ["Supported Application Profile", "Real-World Activity", "Roles"],
                   [[p.name, "Burn studies (disc or ISO image)", "FSC"] for p in PROFILES.values()])
        self.h(4, "File Meta Information for the Media AE")
        self.p(f"Source Application Entity Title (0002,0016): the station AE title, {value(cfg.station.ae_title)}.")
        self.h(4, "Real-World Activities")
        self.p("The Media AE is an FSC of each profile below; it does not update or read discs.")
        for profile in PROFILES.values():
            self.profile(profile)
        self.h(2, "Augmented and Private Application Profiles")
        self.p("None.")
        self.h(2, "Media Configuration")
        self.p(f"The profile of a burn that names none is `media.profile` ({value(cfg.media.profile)}); the File-set "
               f"ID and volume label is `media.fileset_id` ({value(cfg.media.fileset_id)}); the other `media.*` "
               "parameters are in the configuration parameters tables (section 4).")

    def profile(self, profile: Profile) -> None:
        self.h(5, f"Media Storage Application Profile {profile.name}")
        classes = ("every composite SOP Class (a class without a standard record type gets a PRIVATE record)"
                   if profile.sop_classes is None else
                   ", ".join(sorted(uid_name(u) for u in profile.sop_classes)) + "; any other class fails the burn")
        syntaxes = ", ".join(uid_name(u) for u in sorted(profile.transfer_syntaxes - profile.image_only_syntaxes))
        extra = (f" and, for images only, {', '.join(uid_name(u) for u in sorted(profile.image_only_syntaxes))}"
                 if profile.image_only_syntaxes else "")
        self.items(
            f"Medium: {profile.medium}",
            f"SOP Classes: {classes}",
            f"Transfer syntaxes written as stored: {syntaxes}{extra}; any other is converted to Explicit VR "
            "Little Endian, except a lossy compressed source, which fails the burn naming the instance",
            "The DICOMDIR is Explicit VR Little Endian (PS3.11 D.3.2)",
        )

    # -- 6 character sets

    def character_sets(self) -> None:
        self.h(1, "Support of Character Sets")
        self.p("Received data sets (C-STORE, worklist and query answers, imported files) may use any "
               "Specific Character Set (0008,0005) defined term below, code extensions (PS3.5 6.1.2.5) "
               "and several values included. The bytes are stored as received; text is decoded when it is "
               "read. A term not in the list is read as the default repertoire, with a log line.")
        self.table("Supported Specific Character Set Defined Terms", ["Defined Term", "Character Set (codec)"],
                   [[term or "(none: default repertoire)", codec] for term, codec in sorted(python_encoding.items())])
        self.p("Terms seen misspelt in the field are read as the defined term (case, spaces, hyphens and "
               "underscores ignored):")
        self.table("Repaired Specific Character Set Terms", ["Received", "Read as"],
                   [[alias, term] for alias, term in ALIASES.items()])
        self.items(
            "A data set without (0008,0005) is read by its bytes: ASCII is the default repertoire, ISO "
            "2022 escapes mean Japanese, valid UTF-8 means ISO_IR 192, other bytes above 7F ISO_IR 100.",
            "Data sets we write (MPPS, acquired images completed with worklist data) declare ISO_IR 100 "
            "when every value fits Latin-1, else ISO_IR 192.",
            "A worklist query declares ISO_IR 192, so that a name in any script can be a matching key.",
            "The Query/Retrieve SCP decodes a query in its own character set; Person Name matching is "
            "case-insensitive (Unicode case folding) on any component group; an answer declares ISO_IR 192 "
            "when a value is not ASCII.",
            "Media: a DICOMDIR keeps its sources' bytes when they share one character set, else re-encodes "
            "every record in ISO_IR 192; README.TXT and INDEX.HTM are UTF-8.",
        )

    # -- 7 security

    def security(self) -> None:
        cfg = self.cfg
        self.h(1, "Security")
        self.h(2, "Security Profiles")
        rows = [[ae.name, listener_security(ae.listener)] for ae in self.aes if ae.listener is not None]
        rows += [[f"node {name}", node_security(node)] for name, node in cfg.nodes.items()]
        self.table("Communication Profiles", ["Connection", "Profile"], rows)
        self.p("TLS is set per listening AE and per node with `tls_cert`, `tls_key` and `tls_ca` (absolute "
               "paths of PEM files); a handshake failure is logged and reported with its cause (expired "
               "certificate, unknown CA, host name mismatch, missing client certificate).")
        self.p("The implementation is bit-preserving for received instances (they are stored as received) "
               "and does not create, verify or replace Digital Signatures.")
        self.h(2, "Association Level Security")
        rows = []
        for label, key in (("Disk server AE", "disk_server"), ("Memory server AE", "memory_server")):
            lst: Listener = getattr(cfg, key)
            rows.append([label, ", ".join(lst.allowed_calling_aets) or "any",
                         "yes" if lst.require_called_aet else "no", str(lst.max_associations)])
        self.table("Association Acceptance Rules", ["Application Entity", "Accepted calling AE titles",
                                                    "Called AE title must match", "Maximum associations"], rows)
        self.h(2, "Application Level Security")
        self.p("Commands reach the service only through its local IPC socket in the home folder; no DICOM "
               "service changes the configuration. With `ipc.engineer_group` and `ipc.technologist_group` "
               "set, the configuration, deletions and file targets outside `media.export_dir` are the "
               "service engineer's.")
        self.h(2, "Audit Trail")
        audit = cfg.audit
        collector = (f"and to the syslog collector {audit.syslog_host}:{audit.syslog_port} "
                     f"({audit.syslog_transport.upper()}, RFC 5424)" if audit.syslog_host else
                     "(no syslog collector is configured: `audit.syslog_host`)")
        self.p("DICOM audit messages (PS3.15 A.5: Application Activity, DICOM Instances Transferred, Query, "
               "Export, Security Alert) are written to `logs/audit.log` in the home folder " + collector + ".")

    # -- 8 annexes

    def annexes(self) -> None:
        self.h(1, "Annexes")
        self.h(2, "IOD Contents")
        self.h(3, "Coerced/Modified Fields")
        self.items(
            "Received and imported instances are stored unchanged.",
            "An image added to an exam gets the worklist item's patient attributes, Study Instance UID, "
            "Study ID, Accession Number, Referring Physician, Referenced Study Sequence, requested "
            "procedure and a Request Attributes Sequence (IHE Scheduled Workflow), and a reference to the "
            "exam's MPPS instance.",
            "A conversion of transfer syntax keeps the SOP Instance UID and every attribute.",
        )
        self.h(2, "Data Dictionary of Private Attributes")
        self.p("None are created.")
        self.h(2, "Coded Terminology and Templates")
        self.table("Context Groups", ["Context Group", "Default Value Set", "Configurable", "Use"],
                   [["CID 9300 Procedure Discontinuation Reasons",
                     "; ".join(f"{code} {meaning}" for code, meaning in DISCONTINUATION_REASONS.items()),
                     "No", "MPPS N-SET DISCONTINUED: Performed Procedure Step Discontinuation Reason Code Sequence"]])
        self.h(2, "Standard Extended, Specialized and Private SOP Classes")
        self.p("None.")
        self.h(2, "Private Transfer Syntaxes")
        self.p("None.")


CONTEXT_HEADER = ["Abstract Syntax Name", "Abstract Syntax UID", "Transfer Syntax List", "Role",
                  "Extended Negotiation"]
PARAMETER_HEADER = ["Parameter", "Configurable", "Default Value", "This Configuration", "Meaning"]


def context_rows(cx: Contexts) -> list[list[str]]:
    """The rows of a presentation context table (PS3.2 A.4.2.1.3.1.2, A.4.2.1.4.1.2): one per SOP class."""
    return [[uid_name(u), u, cx.syntaxes, cx.role, cx.extended] for u in cx.sop_classes]


def category_of(service: str) -> str:
    """The PS3.2 A.1 category of a service."""
    if service == "Storage":
        return "Transfer"
    if service.startswith(("Query", "Retrieve")):
        return "Query/Retrieve"
    return "Workflow Management"


def role_columns(role: str) -> tuple[str, str]:
    """The SCU and SCP columns of a SOP Classes table for our role on a context."""
    if role.startswith("SCU"):
        return "Yes", "No"
    return ("Yes" if "SCU" in role else "No"), "Yes"


def yes(flag: bool) -> str:
    return "Yes" if flag else "No"


def statement(cfg: Config, today: datetime.date | None = None) -> list[Block]:
    """The blocks of the conformance statement for `cfg`."""
    return Statement(cfg, today).build()


# -- rendering ------------------------------------------------------------------------------------


def numbered(blocks: Sequence[Block]) -> Iterator[tuple[Block, str]]:
    """Each block with its label: a section number ("4.2.1") or a table number ("4-12")."""
    counters: list[int] = []
    tables = 0
    for block in blocks:
        if isinstance(block, Heading):
            del counters[block.level:]
            while len(counters) < block.level:
                counters.append(0)
            counters[-1] += 1
            if block.level == 1:
                tables = 0
            yield block, ".".join(map(str, counters))
        elif isinstance(block, Table):
            tables += 1
            yield block, f"{counters[0] if counters else 0}-{tables}"
        else:
            yield block, ""


def contents(blocks: Sequence[Block]) -> list[tuple[int, str, str]]:
    """(level, number, title) of the chapters and their sections."""
    return [(b.level, label, b.title) for b, label in numbered(blocks) if isinstance(b, Heading) and b.level <= 2]


def document_title(cfg: Config) -> str:
    return f"DICOM Conformance Statement: modality_link {__version__} ({cfg.station.name}, {cfg.station.ae_title})"


def _md_cell(text: str) -> str:
    return text.replace("\\", "\\\\").replace("|", "\\|").replace("\n", " ")


def to_markdown(blocks: Sequence[Block], heading: str) -> str:
    """The statement as Markdown (GitHub tables); section and table numbers in the text."""
    out = [f"# {heading}", ""]
    toc = contents(blocks)
    for block, label in numbered(blocks):
        if isinstance(block, Heading):
            out += [f"{'#' * min(block.level + 1, 6)} {label} {block.title}", ""]
        elif isinstance(block, Text):
            out += [block.text, ""]
        elif isinstance(block, Items):
            out += [f"- {item}" for item in block.items] + [""]
        elif isinstance(block, Table):
            out.append(f"**Table {label}. {block.caption}**")
            out.append("")
            out.append("| " + " | ".join(_md_cell(c) for c in block.header) + " |")
            out.append("|" + "|".join(" --- " for _ in block.header) + "|")
            out += ["| " + " | ".join(_md_cell(c) for c in row) + " |" for row in block.rows]
            out.append("")
        elif isinstance(block, Contents):
            out += [f"{'  ' * (level - 1)}- {number} {text}" for level, number, text in toc] + [""]
    return "\n".join(out)


def _inline(text: str) -> str:
    """Escaped text with its `code` spans and *emphasis* as XHTML."""
    escaped = html.escape(text, quote=False)
    escaped = re.sub(r"`([^`]+)`", r"<code>\1</code>", escaped)
    return re.sub(r"^\*([^*]+)\*$", r"<em>\1</em>", escaped)


_STYLE = """body { font-family: sans-serif; margin: 2em; max-width: 80em; }
table { border-collapse: collapse; margin: 0.5em 0 1.5em; }
th, td { border: 1px solid #999; padding: 0.2em 0.5em; text-align: left; vertical-align: top; }
caption { font-weight: bold; text-align: left; padding: 0.3em 0; }
code { font-size: 0.95em; }"""


def to_html(blocks: Sequence[Block], heading: str) -> str:
    """The statement as one standalone XHTML page (well-formed XML, no script, no external file)."""
    out = ['<?xml version="1.0" encoding="UTF-8"?>', "<!DOCTYPE html>",
           '<html xmlns="http://www.w3.org/1999/xhtml" lang="en">',
           f'<head><meta charset="UTF-8"/><title>{html.escape(heading)}</title><style>{_STYLE}</style></head>',
           f"<body><h1>{html.escape(heading)}</h1>"]
    toc = contents(blocks)
    for block, label in numbered(blocks):
        if isinstance(block, Heading):
            tag = f"h{min(block.level + 1, 6)}"
            out.append(f'<{tag} id="s{label}">{label} {html.escape(block.title)}</{tag}>')
        elif isinstance(block, Text):
            out.append(f"<p>{_inline(block.text)}</p>")
        elif isinstance(block, Items):
            out.append("<ul>" + "".join(f"<li>{_inline(i)}</li>" for i in block.items) + "</ul>")
        elif isinstance(block, Table):
            out.append(f'<table id="t{label}"><caption>Table {label}. {html.escape(block.caption)}</caption>')
            out.append("<thead><tr>" + "".join(f"<th>{html.escape(c)}</th>" for c in block.header) + "</tr></thead>")
            out.append("<tbody>" + "".join(
                "<tr>" + "".join(f"<td>{_inline(c)}</td>" for c in row) + "</tr>" for row in block.rows) + "</tbody>")
            out.append("</table>")
        elif isinstance(block, Contents):
            out.append("<ul>" + "".join(
                f'<li class="toc{level}"><a href="#s{number}">{number} {html.escape(text)}</a></li>'
                for level, number, text in toc) + "</ul>")
    out.append("</body></html>")
    return "\n".join(out) + "\n"


def render(cfg: Config, fmt: str = "md", today: datetime.date | None = None) -> str:
    """The conformance statement of `cfg` as Markdown (``md``) or a standalone XHTML page (``html``)."""
    if fmt not in FORMATS:
        raise ValueError(f"unknown format {fmt!r} (known: {', '.join(FORMATS)})")
    blocks = statement(cfg, today)
    heading = document_title(cfg)
    return to_markdown(blocks, heading) if fmt == "md" else to_html(blocks, heading)
