"""DIMSE command sets: the group 0000 elements of a message, Implicit VR Little Endian (PS3.7 §6.3.1).

The Storage SCU (:mod:`modality_link.net.storage`) writes its C-STORE-RQs and reads their
responses with these, and the acceptor (:mod:`modality_link.net.acceptor`) reads every request and
writes every response: a command set is a few dozen bytes, which pydicom's general encoder and
decoder would cost more than the rest of the message.
"""

from __future__ import annotations

import struct
from collections.abc import Mapping

from modality_link.net.upper_layer import AssociationLost

_ELEMENT_HEAD = struct.Struct("<HHL")  # group, element, value length (PS3.5 §7.1.3)


def encode_command(elements: Mapping[int, bytes]) -> bytes:
    """A command set: the Command Group Length (0000,0000), then `elements` ({element number:
    value, encoded and padded}) in ascending order (PS3.7 §6.3.1, Table E.1-1)."""
    body = b"".join(_ELEMENT_HEAD.pack(0x0000, e, len(elements[e])) + elements[e] for e in sorted(elements))
    return _ELEMENT_HEAD.pack(0x0000, 0x0000, 4) + struct.pack("<L", len(body)) + body


def parse_command(data: bytes) -> dict[int, bytes]:
    """{element number: value} of a command set. Raises :class:`AssociationLost` for an element
    outside group 0000: the peer sent something that is not a command set."""
    out, pos = {}, 0
    while pos + 8 <= len(data):
        group, element, length = _ELEMENT_HEAD.unpack_from(data, pos)
        if group != 0x0000:
            raise AssociationLost(f"malformed command set (group {group:04X} at byte {pos})")
        out[element] = data[pos + 8:pos + 8 + length]
        pos += 8 + length
    return out
