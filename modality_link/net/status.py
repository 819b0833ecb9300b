"""What a DIMSE status means: its category, its text, whether asking again may help, and when
our SCPs answer it.

The tables are pynetdicom's (`pynetdicom.status`): the category of a code by the ranges of PS3.7
Annex C (success, warning, failure, cancel, pending) and, per service, the meaning of each code
PS3.7 Annex C and the service's section of PS3.4 define. This module adds what those tables leave
to us: names for the codes this package answers with or looks for, per service which failures
may end otherwise when the same request is sent again (docs/design.md "Jobs and failures"), and
which codes our SCP of the service answers and when (the conformance statement's status tables,
PS3.2 A.4.2.1.4.1.3).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field

from pynetdicom.status import (
    MODALITY_WORKLIST_SERVICE_CLASS_STATUS,
    VERIFICATION_SERVICE_CLASS_STATUS,
    QR_FIND_SERVICE_CLASS_STATUS,
    QR_GET_SERVICE_CLASS_STATUS,
    QR_MOVE_SERVICE_CLASS_STATUS,
    PROCEDURE_STEP_STATUS,
    STATUS_CANCEL,
    STATUS_FAILURE,
    STATUS_PENDING,
    STATUS_SUCCESS,
    STATUS_UNKNOWN,
    STATUS_WARNING,
    STORAGE_COMMITMENT_SERVICE_CLASS_STATUS,
    STORAGE_SERVICE_CLASS_STATUS,
    code_to_category,
)

# Codes (PS3.7 Annex C unless a PS3.4 section is named).
SUCCESS = 0x0000
ATTRIBUTE_LIST_ERROR = 0x0107  # warning
PROCESSING_FAILURE = 0x0110
NO_SUCH_EVENT_TYPE = 0x0113
INVALID_ARGUMENT_VALUE = 0x0115
ATTRIBUTE_VALUE_OUT_OF_RANGE = 0x0116  # warning
DUPLICATE_INVOCATION = 0x0210
UNRECOGNIZED_OPERATION = 0x0211
RESOURCE_LIMITATION = 0x0213
#: Storage (PS3.4 B.2.3): A7xx Refused: Out of Resources, A9xx Data Set Does Not Match SOP Class,
#: Cxxx Cannot Understand; the first code of each range.
OUT_OF_RESOURCES = 0xA700
DATA_SET_MISMATCH = 0xA900
CANNOT_UNDERSTAND = 0xC000
CANCEL = 0xFE00
#: C-FIND (PS3.4 K.4.1.1.4): a match follows; FF01 also says optional keys were not supported.
PENDING = 0xFF00
PENDING_WARNING = 0xFF01
#: Query/Retrieve (PS3.4 C.4.1.1.4, C.4.2.1.5, C.4.3.1.4): A702 no sub-operation could be done,
#: A801 unknown move destination, A900 identifier does not match the SOP class, C000 unable to
#: process (C001: a unique key is missing), B000 sub-operations complete with failures.
SUB_OPERATIONS_IMPOSSIBLE = 0xA702
MOVE_DESTINATION_UNKNOWN = 0xA801
IDENTIFIER_MISMATCH = 0xA900
UNABLE_TO_PROCESS = 0xC000
MISSING_UNIQUE_KEYS = 0xC001
SOME_SUB_OPERATIONS_FAILED = 0xB000


class Category:
    """The categories of PS3.7 Annex C, as `pynetdicom.status` names them."""

    SUCCESS = STATUS_SUCCESS
    WARNING = STATUS_WARNING
    FAILURE = STATUS_FAILURE
    CANCEL = STATUS_CANCEL
    PENDING = STATUS_PENDING
    #: A code no range of PS3.7 Annex C covers (vendor codes).
    UNKNOWN = STATUS_UNKNOWN


def category(code: int) -> str:
    """The :class:`Category` of `code` (PS3.7 Annex C)."""
    return code_to_category(code)


@dataclass(frozen=True)
class Service:
    """The statuses of one DIMSE service: pynetdicom's table of their meanings, which failures
    we send again later, and what our SCP of it answers."""

    #: Where the standard defines the codes, for a code it does not ("a status ... do not define").
    standard: str
    table: Mapping[int, tuple[str, str]]
    retryable: frozenset[int] = frozenset()
    #: Meanings the standard gives that pynetdicom's table lacks.
    more: Mapping[int, str] = field(default_factory=dict)
    #: The codes our SCP of this service answers, each with when (empty: we are no SCP of it).
    answered: Mapping[int, str] = field(default_factory=dict)

    def text(self, code: int) -> str:
        """The meaning of `code` for this service: the standard's words, else its category."""
        words = self.table.get(code, ("", ""))[1] or self.more.get(code, "")
        if words:
            return words
        found = category(code)
        return f"a status {self.standard} do not define" if found == Category.UNKNOWN else found

    def is_retryable(self, code: int) -> bool:
        """True for a failure that sending the same request again later may turn into a success:
        the peer lacked something at the time, nothing in the status blames the request."""
        return code in self.retryable

    def codes(self, *categories: str) -> frozenset[int]:
        """The codes this service's table puts in `categories`."""
        return frozenset(code for code, (cat, _) in self.table.items() if cat in categories)


#: Storage (C-STORE, PS3.4 B.2.3 Table B.2-1). Retried: A7xx, 0213, 0210 (a Message ID clash on the
#: peer's side) and 0110 (the peer failed internally); every other failure gets the same answer.
STORAGE = Service(
    "PS3.4 B.2.3 and PS3.7 Annex C",
    STORAGE_SERVICE_CLASS_STATUS,
    frozenset({PROCESSING_FAILURE, DUPLICATE_INVOCATION, RESOURCE_LIMITATION, *range(0xA700, 0xA800)}),
    answered={
        SUCCESS: "the data set is durable in the archive file (disk server) or held in the memory "
                 "cache (memory server)",
        OUT_OF_RESOURCES: "the archive's file system has less free space than archive.min_free_mb, or is "
                          "full; the memory server: the data set is larger than the whole cache",
        DATA_SET_MISMATCH: "the data set lacks its SOP Class, SOP Instance, Study or Series Instance UID, "
                           "a UID is not valid (PS3.5 9.1), or it is not the UID the C-STORE-RQ names",
        CANNOT_UNDERSTAND: "the data set cannot be parsed, is truncated, has bytes after its last "
                           "element, is Implicit VR under an explicit transfer syntax, or is missing",
        PROCESSING_FAILURE: "an unexpected fault while storing (logged with its traceback)",
    },
)
#: Modality Performed Procedure Step (N-CREATE, N-SET; PS3.4 F.7.2.1.2, F.8.2.1.2). Retried: A700
#: and 0213, the SCP out of resources.
MPPS = Service(
    "PS3.4 F.7.2 and PS3.7 Annex C",
    PROCEDURE_STEP_STATUS,
    frozenset({OUT_OF_RESOURCES, RESOURCE_LIMITATION}),
)
#: Modality Worklist (C-FIND, PS3.4 K.4.1.1.4).
WORKLIST = Service("PS3.4 K.4.1.1.4 and PS3.7 Annex C", MODALITY_WORKLIST_SERVICE_CLASS_STATUS)
#: Storage Commitment (N-ACTION, N-EVENT-REPORT; and the Failure Reasons of a report, PS3.4 J.3.3.1.1).
COMMITMENT = Service(
    "PS3.4 J.3 and PS3.7 Annex C",
    STORAGE_COMMITMENT_SERVICE_CLASS_STATUS,
    more={0x0131: "Duplicate Transaction UID"},
    # our N-EVENT-REPORT-RSP to a commitment report (we are the SCU taking the report)
    answered={
        SUCCESS: "the report was read and recorded",
        NO_SUCH_EVENT_TYPE: "the Event Type ID is neither 1 (success) nor 2 (failures exist)",
        INVALID_ARGUMENT_VALUE: "the Event Information cannot be decoded or has no Transaction UID",
        PROCESSING_FAILURE: "the report is for another SOP class, or recording it failed (logged)",
    },
)
#: What the Query/Retrieve SCP answers to any request it refuses (docs/design.md "Query/Retrieve SCP").
_QR_REFUSALS = {
    OUT_OF_RESOURCES: "out of resources (memory, the file system) while answering",
    IDENTIFIER_MISMATCH: "no identifier, Query/Retrieve Level missing or not of the model, or a key of "
                         "a level below the query level",
    UNABLE_TO_PROCESS: "no single value in the unique key of a level above, an identifier that "
                       "cannot be read, or an unexpected fault (logged)",
    CANCEL: "a C-CANCEL-RQ, read between two responses",
}
#: What the C-MOVE and C-GET SCP answers once its sub-operations are done, or cannot start.
_QR_RETRIEVE = _QR_REFUSALS | {
    PENDING: "after each C-STORE sub-operation, with the four counts",
    SUCCESS: "every sub-operation succeeded",
    SOME_SUB_OPERATIONS_FAILED: "some sub-operations failed: Failed SOP Instance UID List (0008,0058) "
                                "in the identifier",
    SUB_OPERATIONS_IMPOSSIBLE: "no sub-operation succeeded (no association to the destination, or "
                               "every one failed)",
    MISSING_UNIQUE_KEYS: "the unique keys of the level and the levels above are missing",
}
#: Query/Retrieve (PS3.4 C.4.1.1.4 C-FIND, C.4.2.1.5 C-MOVE, C.4.3.1.4 C-GET).
QR_FIND = Service("PS3.4 C.4.1.1.4 and PS3.7 Annex C", QR_FIND_SERVICE_CLASS_STATUS, answered=_QR_REFUSALS | {
    PENDING: "a match follows",
    PENDING_WARNING: "a match follows; the identifier has keys we do not support (neither matched nor "
                     "returned)",
    SUCCESS: "matching is complete",
})
#: A C-MOVE is asked again when the SCP was out of resources (A7xx); an unknown destination
#: (A801), a bad identifier (A900) or "unable to process" (Cxxx) get the same answer again.
QR_MOVE = Service("PS3.4 C.4.2.1.5 and PS3.7 Annex C", QR_MOVE_SERVICE_CLASS_STATUS,
                  frozenset(range(0xA700, 0xA800)), answered=_QR_RETRIEVE | {
                      MOVE_DESTINATION_UNKNOWN: "the Move Destination is no configured node (any role)",
                  })
QR_GET = Service("PS3.4 C.4.3.1.4 and PS3.7 Annex C", QR_GET_SERVICE_CLASS_STATUS, answered=_QR_RETRIEVE)
#: Verification (C-ECHO, PS3.4 A.4): our SCP always answers success; as SCU anything else fails the echo.
VERIFICATION = Service("PS3.4 A.4 and PS3.7 Annex C", VERIFICATION_SERVICE_CLASS_STATUS,
                       answered={SUCCESS: "always"})
