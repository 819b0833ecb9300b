"""C-STORE response statuses classified by PS3.4 B.2.3 Table B.2-1 and PS3.7 Annex C."""

from __future__ import annotations

import pytest

from modality_link.net.storage import classify

# (status, state, retryable, words of the meaning shown to the operator)
TABLE = [
    (0x0000, "done", False, ""),
    (0xB000, "warning", False, "Coercion of Data Elements"),
    (0xB006, "warning", False, "Element Discarded"),
    (0xB007, "warning", False, "Data Set Does Not Match SOP Class"),
    (0x0107, "warning", False, "Attribute List Error"),
    (0x0116, "warning", False, "Attribute Value Out of Range"),
    (0xA700, "failed", True, "Out of Resources"),
    (0xA701, "failed", True, "Out of Resources"),
    (0xA7FF, "failed", True, "Out of Resources"),
    (0x0213, "failed", True, "Resource Limitation"),
    (0x0210, "failed", True, "Duplicate Invocation"),
    (0x0110, "failed", True, "Processing Failure"),
    (0xA900, "failed", False, "Data Set Does Not Match SOP Class"),
    (0xA9FF, "failed", False, "Data Set Does Not Match SOP Class"),
    (0xC000, "failed", False, "Cannot Understand"),
    (0xC006, "failed", False, "Cannot Understand"),
    (0xCFFF, "failed", False, "Cannot Understand"),
    (0x0122, "failed", False, "SOP Class Not Supported"),
    (0x0124, "failed", False, "Not Authorised"),
    (0x0117, "failed", False, "Invalid Object Instance"),
    (0x0111, "failed", False, "Duplicat"),
    (0xD000, "failed", False, "do not define"),
]


@pytest.mark.parametrize("status,state,retryable,words", TABLE)
def test_classify(status: int, state: str, retryable: bool, words: str) -> None:
    out = classify(status)
    assert (out.state, out.status, out.retryable) == (state, status, retryable)
    if state != "done":
        assert f"0x{status:04X}" in out.detail and words in out.detail, out.detail
