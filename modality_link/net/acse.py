"""A-ASSOCIATE-RQ decoding, presentation context negotiation and A-ASSOCIATE-AC encoding for the
acceptor (PS3.8 §9.3.2, §9.3.3, Annex D; PS3.7 Annex D.3.3).

pynetdicom's PDU classes validate every UID of a proposal through pydicom: a storescu proposal of
~120 presentation contexts (9.6 kB) took 7 ms to decode and 6 ms more to negotiate and answer.
The items are simple (type, reserved, length, value), so the acceptor reads and writes them
here; UIDs are taken as the bytes say (trailing NULs and spaces dropped), since a UID we do not
support is simply not accepted.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass, field
from typing import Mapping, Sequence

#: Item types of PS3.8 Tables 9-11 to 9-16 and Annex D.
_APPLICATION_CONTEXT, _PRESENTATION_CONTEXT_RQ, _PRESENTATION_CONTEXT_AC = 0x10, 0x20, 0x21
_ABSTRACT_SYNTAX, _TRANSFER_SYNTAX, _USER_INFORMATION = 0x30, 0x40, 0x50
_MAXIMUM_LENGTH, _IMPLEMENTATION_CLASS, _ASYNC_WINDOW = 0x51, 0x52, 0x53
_ROLE_SELECTION, _IMPLEMENTATION_VERSION, _EXTENDED_NEGOTIATION = 0x54, 0x55, 0x56
_ITEM = struct.Struct(">BBH")
_FIXED = struct.Struct(">HH16s16s32s")  # protocol version, reserved, called AE, calling AE, reserved

#: Presentation context results (PS3.8 Table 9-18).
ACCEPTANCE, USER_REJECTION, ABSTRACT_SYNTAX_NOT_SUPPORTED, TRANSFER_SYNTAXES_NOT_SUPPORTED = 0, 1, 3, 4


class MalformedPdu(ValueError):
    """An A-ASSOCIATE-RQ whose items do not follow PS3.8 §9.3.2."""


@dataclass
class ProposedContext:
    """A presentation context item of an A-ASSOCIATE-RQ (PS3.8 §9.3.2.2)."""

    context_id: int
    abstract_syntax: str
    transfer_syntaxes: list[str]


@dataclass
class AssociateRq:
    """The parts of an A-ASSOCIATE-RQ the acceptor acts on (PS3.8 §9.3.2, Annex D.3.3)."""

    protocol_version: int
    called_ae: str
    calling_ae: str
    application_context: str = ""
    contexts: list[ProposedContext] = field(default_factory=list)
    max_length: int = 0
    implementation_class_uid: str = ""
    implementation_version_name: str = ""
    #: SOP Class UID -> (SCU role, SCP role) proposed (PS3.7 D.3.3.4).
    roles: dict[str, tuple[bool, bool]] = field(default_factory=dict)
    #: SOP Class UID -> Service-Class-Application-Information (PS3.7 D.3.3.5).
    extended: dict[str, bytes] = field(default_factory=dict)
    #: The called and calling AE title fields as sent, returned as they are in the answer.
    raw_titles: bytes = b""


def _uid(value: bytes) -> str:
    return value.rstrip(b"\x00 ").decode("latin-1")  # kept byte for byte: answered as received


def _items(data: bytes, start: int, end: int) -> list[tuple[int, int, int]]:
    """(type, value start, value end) of the items (or sub-items) in data[start:end]."""
    out = []
    pos = start
    while pos < end:
        if pos + 4 > end:
            raise MalformedPdu(f"item header cut at byte {pos}")
        kind, _, length = _ITEM.unpack_from(data, pos)
        if pos + 4 + length > end:
            raise MalformedPdu(f"item 0x{kind:02X} of {length} bytes runs past its container")
        out.append((kind, pos + 4, pos + 4 + length))
        pos += 4 + length
    return out


def _uid_with_length(data: bytes, start: int, end: int, what: str) -> tuple[str, int]:
    """A sub-item value that starts with a 2-byte UID length (PS3.7 D.3.3.4, D.3.3.5): (UID, where
    the rest starts)."""
    if start + 2 > end:
        raise MalformedPdu(f"{what} item too short")
    (n,) = struct.unpack_from(">H", data, start)
    if start + 2 + n > end:
        raise MalformedPdu(f"{what} item: UID of {n} bytes runs past the item")
    return _uid(data[start + 2:start + 2 + n]), start + 2 + n


def decode_associate_rq(pdu: bytes) -> AssociateRq:
    """Decode a whole A-ASSOCIATE-RQ PDU (header included); :class:`MalformedPdu` says what is
    wrong with one that does not follow PS3.8 §9.3.2."""
    if len(pdu) < 6 + _FIXED.size:
        raise MalformedPdu(f"A-ASSOCIATE-RQ of {len(pdu)} bytes, shorter than its fixed fields")
    version, _, called, calling, _ = _FIXED.unpack_from(pdu, 6)
    rq = AssociateRq(version, called.decode("ascii", "replace").strip(), calling.decode("ascii", "replace").strip(),
                     raw_titles=pdu[10:42])
    for kind, start, end in _items(pdu, 6 + _FIXED.size, len(pdu)):
        if kind == _APPLICATION_CONTEXT:
            rq.application_context = _uid(pdu[start:end])
        elif kind == _PRESENTATION_CONTEXT_RQ:
            if end - start < 4:
                raise MalformedPdu("presentation context item too short")
            abstract, syntaxes = None, []
            for sub, s, e in _items(pdu, start + 4, end):
                if sub == _ABSTRACT_SYNTAX:
                    abstract = _uid(pdu[s:e])
                elif sub == _TRANSFER_SYNTAX:
                    syntaxes.append(_uid(pdu[s:e]))
            if pdu[start] % 2 == 0:
                raise MalformedPdu(f"presentation context ID {pdu[start]} is not odd (PS3.8 9.3.2.2)")
            if not abstract or not syntaxes:
                raise MalformedPdu(f"presentation context {pdu[start]} without an abstract syntax or a "
                                   f"transfer syntax")
            rq.contexts.append(ProposedContext(pdu[start], abstract, syntaxes))
        elif kind == _USER_INFORMATION:
            _user_information(pdu, start, end, rq)
        # other item types are ignored (PS3.8 §9.3.1: reserved fields and unknown items)
    if not rq.application_context:
        raise MalformedPdu("A-ASSOCIATE-RQ without an application context item")
    return rq


def _user_information(pdu: bytes, start: int, end: int, rq: AssociateRq) -> None:
    for kind, s, e in _items(pdu, start, end):
        if kind == _MAXIMUM_LENGTH:
            if e - s != 4:
                raise MalformedPdu("maximum length item of other than 4 bytes")
            (rq.max_length,) = struct.unpack_from(">L", pdu, s)
        elif kind == _IMPLEMENTATION_CLASS:
            rq.implementation_class_uid = _uid(pdu[s:e])
        elif kind == _IMPLEMENTATION_VERSION:
            rq.implementation_version_name = pdu[s:e].decode("ascii", "replace").strip()
        elif kind == _ROLE_SELECTION:
            uid, rest = _uid_with_length(pdu, s, e, "SCP/SCU role selection")
            if rest + 2 != e:
                raise MalformedPdu("SCP/SCU role selection item of the wrong length")
            rq.roles[uid] = (bool(pdu[rest]), bool(pdu[rest + 1]))
        elif kind == _EXTENDED_NEGOTIATION:
            uid, rest = _uid_with_length(pdu, s, e, "SOP class extended negotiation")
            rq.extended[uid] = pdu[rest:e]
        # asynchronous operations window, user identity, common extended negotiation: not
        # negotiated (PS3.7 D.3.3.3: their absence in the answer means the default)


@dataclass(frozen=True)
class Supported:
    """What the acceptor offers for one SOP class: transfer syntaxes in order of preference and,
    for a SOP class the requestor may take the SCP role of (C-GET storage), both roles."""

    transfer_syntaxes: Sequence[str]
    requestor_scp: bool = False


@dataclass
class ContextResult:
    context_id: int
    abstract_syntax: str
    result: int
    transfer_syntax: str
    #: The requestor takes the SCP role on this context (PS3.7 D.3.3.4).
    reversed_role: bool = False


def negotiate(rq: AssociateRq, supported: Mapping[str, Supported]) -> tuple[list[ContextResult], dict[str, tuple[bool, bool]]]:
    """Each proposed context's result (PS3.8 §9.3.3.2) and the SCP/SCU role selection answers
    (PS3.7 D.3.3.4), as pynetdicom's acceptor negotiates them: our transfer syntax order decides,
    a SOP class with both roles answers a role proposal, a context where no role is left is
    rejected by the user."""
    results, answers = [], {}
    for cx in rq.contexts:
        offer = supported.get(cx.abstract_syntax)
        if offer is None:
            results.append(ContextResult(cx.context_id, cx.abstract_syntax, ABSTRACT_SYNTAX_NOT_SUPPORTED,
                                         cx.transfer_syntaxes[0]))
            continue
        chosen = next((ts for ts in offer.transfer_syntaxes if ts in cx.transfer_syntaxes), None)
        if chosen is None:
            results.append(ContextResult(cx.context_id, cx.abstract_syntax, TRANSFER_SYNTAXES_NOT_SUPPORTED,
                                         cx.transfer_syntaxes[0]))
            continue
        proposed = rq.roles.get(cx.abstract_syntax)
        if not offer.requestor_scp or proposed is None:  # default roles: requestor SCU, acceptor SCP
            results.append(ContextResult(cx.context_id, cx.abstract_syntax, ACCEPTANCE, chosen))
            continue
        # both roles offered (pynetdicom's SCP_SCU_ROLES with acceptor roles (True, True)): the
        # requestor keeps the roles it proposes; proposing neither leaves no role (user rejection)
        scu, scp = proposed
        if not scu and not scp:
            results.append(ContextResult(cx.context_id, cx.abstract_syntax, USER_REJECTION, chosen))
            continue
        results.append(ContextResult(cx.context_id, cx.abstract_syntax, ACCEPTANCE, chosen, reversed_role=scp))
        answers[cx.abstract_syntax] = (scu, scp)
    return results, answers


def _item(kind: int, value: bytes) -> bytes:
    return _ITEM.pack(kind, 0, len(value)) + value


def _with_uid(kind: int, uid: str, rest: bytes) -> bytes:
    raw = uid.encode("latin-1")
    return _item(kind, struct.pack(">H", len(raw)) + raw + rest)


def encode_associate_ac(
    rq: AssociateRq,
    results: Sequence[ContextResult],
    max_length: int,
    implementation_class_uid: str,
    implementation_version_name: str,
    roles: Mapping[str, tuple[bool, bool]],
    extended: Mapping[str, bytes],
) -> bytes:
    """The A-ASSOCIATE-AC PDU (PS3.8 §9.3.3): the AE title fields as received, one result item per
    proposed context, and the user information (maximum length, implementation class UID and
    version name, role selection and extended negotiation answers)."""
    body = [struct.pack(">HH", 1, 0), rq.raw_titles, b"\x00" * 32,
            _item(_APPLICATION_CONTEXT, rq.application_context.encode("latin-1"))]
    for cx in results:
        body.append(_item(_PRESENTATION_CONTEXT_AC, bytes([cx.context_id, 0, cx.result, 0])
                          + _item(_TRANSFER_SYNTAX, cx.transfer_syntax.encode("latin-1"))))
    user = [_item(_MAXIMUM_LENGTH, struct.pack(">L", max_length)),
            _item(_IMPLEMENTATION_CLASS, implementation_class_uid.encode("latin-1"))]
    user += [_with_uid(_ROLE_SELECTION, uid, bytes([scu, scp])) for uid, (scu, scp) in roles.items()]
    user.append(_item(_IMPLEMENTATION_VERSION, implementation_version_name.encode("latin-1")))
    user += [_with_uid(_EXTENDED_NEGOTIATION, uid, info) for uid, info in extended.items()]
    body.append(_item(_USER_INFORMATION, b"".join(user)))
    data = b"".join(body)
    return struct.pack(">BBL", 0x02, 0, len(data)) + data
