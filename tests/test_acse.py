"""The acceptor's A-ASSOCIATE-RQ decoding, negotiation and A-ASSOCIATE-AC encoding (net/acse.py)
give what pynetdicom's PDU classes and negotiate_as_acceptor give, for every role proposal."""

from __future__ import annotations

import itertools

import pytest
from pynetdicom.pdu import A_ASSOCIATE_AC, A_ASSOCIATE_RQ
from pynetdicom.pdu_primitives import (
    A_ASSOCIATE,
    ImplementationClassUIDNotification,
    MaximumLengthNotification,
    SCP_SCU_RoleSelectionNegotiation,
    SOPClassExtendedNegotiation,
)
from pynetdicom.presentation import PresentationContext, negotiate_as_acceptor

from modality_link.net.acse import MalformedPdu, Supported, decode_associate_rq, encode_associate_ac, negotiate

CT, MR, ECHO, FIND = ("1.2.840.10008.5.1.4.1.1.2", "1.2.840.10008.5.1.4.1.1.4", "1.2.840.10008.1.1",
                      "1.2.840.10008.5.1.4.1.2.2.1")
EXPLICIT, IMPLICIT, JPEG = "1.2.840.10008.1.2.1", "1.2.840.10008.1.2", "1.2.840.10008.1.2.4.50"


def _rq(contexts: list[tuple[str, list[str]]], roles: dict[str, tuple[bool, bool]], max_length: int = 16384,
        extended: dict[str, bytes] | None = None) -> bytes:
    prim = A_ASSOCIATE()
    prim.application_context_name = "1.2.840.10008.3.1.1.1"
    prim.calling_ae_title, prim.called_ae_title = "STORESCU", "MODLINK"
    pcs = []
    for n, (abstract, syntaxes) in enumerate(contexts):
        cx = PresentationContext()
        cx.context_id, cx.abstract_syntax, cx.transfer_syntax = 2 * n + 1, abstract, syntaxes
        pcs.append(cx)
    prim.presentation_context_definition_list = pcs
    ml = MaximumLengthNotification()
    ml.maximum_length_received = max_length
    ic = ImplementationClassUIDNotification()
    ic.implementation_class_uid = "1.2.3.4"
    items: list = [ml, ic]
    for uid, (scu, scp) in roles.items():
        role = SCP_SCU_RoleSelectionNegotiation()
        role.sop_class_uid, role.scu_role, role.scp_role = uid, scu, scp
        items.append(role)
    for uid, info in (extended or {}).items():
        ext = SOPClassExtendedNegotiation()
        ext.sop_class_uid, ext.service_class_application_information = uid, info
        items.append(ext)
    prim.user_information = items
    pdu = A_ASSOCIATE_RQ()
    pdu.from_primitive(prim)
    return pdu.encode()


def _theirs(raw: bytes, supported: dict[str, Supported]):
    pdu = A_ASSOCIATE_RQ()
    pdu.decode(raw)
    prim = pdu.to_primitive()
    ours = []
    for uid, offer in supported.items():
        cx = PresentationContext()
        cx.abstract_syntax, cx.transfer_syntax = uid, list(offer.transfer_syntaxes)
        if offer.requestor_scp:
            cx.scu_role, cx.scp_role = True, True
        ours.append(cx)
    roles = {item.sop_class_uid: (item.scu_role, item.scp_role) for item in prim.user_information
             if isinstance(item, SCP_SCU_RoleSelectionNegotiation)}
    results, replies = negotiate_as_acceptor(prim.presentation_context_definition_list, ours, roles or None)
    return ([(int(cx.context_id), str(cx.abstract_syntax), int(cx.result), str(cx.transfer_syntax[0]),
              bool(cx.result == 0 and cx.as_scu)) for cx in results],
            {str(r.sop_class_uid): (bool(r.scu_role), bool(r.scp_role)) for r in replies})


ROLES = [None, (True, True), (True, False), (False, True)]  # (False, False): pynetdicom cannot encode it


@pytest.mark.parametrize(("role", "requestor_scp"), list(itertools.product(ROLES, [False, True])))
def test_negotiation_is_pynetdicoms(role, requestor_scp: bool) -> None:
    contexts = [(CT, [JPEG, IMPLICIT, EXPLICIT]), (CT, [JPEG]), (MR, [EXPLICIT]), (ECHO, [IMPLICIT]),
                ("1.2.3.999", [EXPLICIT])]
    raw = _rq(contexts, {} if role is None else {CT: role})
    supported = {CT: Supported([EXPLICIT, IMPLICIT], requestor_scp), MR: Supported([EXPLICIT]),
                 ECHO: Supported([EXPLICIT, IMPLICIT])}
    rq = decode_associate_rq(raw)
    assert (rq.calling_ae, rq.called_ae, rq.max_length) == ("STORESCU", "MODLINK", 16384)
    assert [(c.context_id, c.abstract_syntax, c.transfer_syntaxes) for c in rq.contexts] == \
        [(2 * n + 1, a, t) for n, (a, t) in enumerate(contexts)]
    results, replies = negotiate(rq, supported)
    mine = [(r.context_id, r.abstract_syntax, r.result, r.transfer_syntax, r.reversed_role) for r in results]
    assert (mine, replies) == _theirs(raw, supported)


def test_proposing_neither_role_rejects_the_context() -> None:
    """SCU and SCP roles both 0 leave no role to act in (PS3.7 D.3.3.4): the context is rejected
    by the user, as pynetdicom's table has it; a SOP class offered with one role keeps the
    default roles."""
    raw = _rq([(CT, [EXPLICIT]), (MR, [EXPLICIT])], {CT: (True, False), MR: (True, False)})
    for uid in (CT, MR):
        raw = raw.replace(uid.encode() + b"\x01\x00", uid.encode() + b"\x00\x00")
    rq = decode_associate_rq(raw)
    assert rq.roles == {CT: (False, False), MR: (False, False)}
    results, replies = negotiate(rq, {CT: Supported([EXPLICIT], True), MR: Supported([EXPLICIT])})
    assert [(r.abstract_syntax, r.result) for r in results] == [(CT, 1), (MR, 0)] and replies == {}


def test_the_answer_decodes_as_pynetdicom_reads_it() -> None:
    raw = _rq([(CT, [EXPLICIT]), (FIND, [IMPLICIT]), ("1.2.3.999", [EXPLICIT])], {CT: (True, True)},
              extended={FIND: b"\x01\x01", CT: b"\x02"})
    rq = decode_associate_rq(raw)
    assert rq.extended == {FIND: b"\x01\x01", CT: b"\x02"} and rq.roles == {CT: (True, True)}
    results, roles = negotiate(rq, {CT: Supported([EXPLICIT], True), FIND: Supported([IMPLICIT])})
    ac = A_ASSOCIATE_AC()
    ac.decode(encode_associate_ac(rq, results, 1 << 20, "1.2.826.0.1", "ML_1", roles, {FIND: b"\x01"}))
    prim = ac.to_primitive()
    assert (prim.calling_ae_title, prim.called_ae_title) == ("STORESCU", "MODLINK")
    assert [(int(cx.context_id), int(cx.result)) for cx in prim.presentation_context_definition_results_list] == \
        [(1, 0), (3, 0), (5, 3)]
    assert prim.maximum_length_received == 1 << 20
    kinds = {type(item).__name__: item for item in prim.user_information}
    assert kinds["ImplementationClassUIDNotification"].implementation_class_uid == "1.2.826.0.1"
    assert kinds["ImplementationVersionNameNotification"].implementation_version_name == "ML_1"
    role = kinds["SCP_SCU_RoleSelectionNegotiation"]
    assert (role.sop_class_uid, role.scu_role, role.scp_role) == (CT, True, True)
    ext = kinds["SOPClassExtendedNegotiation"]
    assert (ext.sop_class_uid, ext.service_class_application_information) == (FIND, b"\x01")


@pytest.mark.parametrize(("edit", "why"), [
    (lambda raw: raw[:60], "fixed fields|runs past"),
    (lambda raw: raw[:6 + 68] + b"\x10\x00\xff\xff" + raw[6 + 72:], "runs past"),
    (lambda raw: raw[:raw.index(b"\x20\x00", 74) + 4] + b"\x02" + raw[raw.index(b"\x20\x00", 74) + 5:], "not odd"),
], ids=["cut", "item-length", "even-context-id"])
def test_malformed_requests_say_why(edit, why: str) -> None:
    raw = _rq([(CT, [EXPLICIT])], {})
    broken = edit(raw)
    with pytest.raises(MalformedPdu, match=why):
        decode_associate_rq(broken[:2] + (len(broken) - 6).to_bytes(4, "big") + broken[6:])
