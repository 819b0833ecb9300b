"""MWL SCU against the simulated RIS in each quirk mode, and the identifier builder."""

from __future__ import annotations

import pytest

from modality_link.config import Node, Timeouts
from modality_link.net.worklist import (
    SPS_KEYS, TOP_KEYS, WorklistError, WorklistQuery, build_identifier, find_worklist, resolve_date,
)
from sim.ris import RIS, demo_items


def _node(ris: RIS) -> Node:
    return Node(ae_title="RIS", host="127.0.0.1", port=ris.port, roles=["worklist"])


def test_identifier_requests_every_return_key_and_matching_types() -> None:
    ds = build_identifier(WorklistQuery(station_aet="MODLINK", date="20240101-20240102", modality="CT",
                                        patient_name="Mü*", patient_id="P1"))
    for kw, _ in TOP_KEYS:
        assert kw in ds, kw
    sps = ds.ScheduledProcedureStepSequence[0]
    for kw, _ in SPS_KEYS:
        assert kw in sps, kw
    assert sps.ScheduledStationAETitle == "MODLINK" and sps.ScheduledProcedureStepStartDate == "20240101-20240102"
    assert ds.PatientName == "Mü*" and ds.AccessionNumber == "" and ds.SpecificCharacterSet == "ISO_IR 192"
    assert resolve_date("20240101-") == "20240101-" and len(resolve_date("today")) == 8
    with pytest.raises(ValueError):
        resolve_date("2024-01-01")


def test_mode_001_quirks_are_tolerated() -> None:
    items = demo_items()
    with RIS(mode="001", items=[items[0], items[2]]) as ris:  # "ISO_IR100" can carry Latin-1 only
        res = find_worklist(_node(ris), "MODLINK", Timeouts(dimse=10), WorklistQuery(station_aet="MODLINK"))
    names = [str(i.PatientName) for i in res.items]
    assert names == ["Müller^Jürgen", "Smith^John^Q"]
    for item in res.items:
        assert item.SpecificCharacterSet == "ISO_IR 100"  # "ISO_IR100" repaired
        sps = item.ScheduledProcedureStepSequence[0]
        assert sps.ScheduledProcedureStepStatus == "INPROGRESS"
        assert item.ReferencedStudySequence[0].ReferencedSOPClassUID == "1.2.840.10008.3.1.2.3.1"
        assert item.RequestedProcedureID.startswith("RP")


def test_matching_single_value_wildcard_and_universal() -> None:
    with RIS() as ris:
        n = _node(ris)
        assert [i.PatientID for i in find_worklist(n, "M", Timeouts(), WorklistQuery(patient_id="PID0003")).items] == ["PID0003"]
        assert [i.PatientID for i in find_worklist(n, "M", Timeouts(), WorklistQuery(patient_name="Sm*")).items] == ["PID0003"]
        assert len(find_worklist(n, "M", Timeouts(), WorklistQuery()).items) == 3
        assert find_worklist(n, "M", Timeouts(), WorklistQuery(station_aet="OTHER")).items == []


def test_response_limit_sends_c_cancel() -> None:
    with RIS(items=demo_items(count=30)) as ris:
        res = find_worklist(_node(ris), "MODLINK", Timeouts(dimse=10), WorklistQuery(limit=5))
        assert len(res.items) == 5 and res.partial and res.status == 0xFE00
        assert "partial" in res.message and ris.cancels == 1


@pytest.mark.parametrize("mode,status", [("a700", "0xA700"), ("c000", "0xC000")])
def test_failure_statuses_are_reported(mode: str, status: str) -> None:
    with RIS(mode=mode) as ris:
        with pytest.raises(WorklistError, match=status):
            find_worklist(_node(ris), "MODLINK", Timeouts(), WorklistQuery())


def test_silent_peer_times_out_with_a_message() -> None:
    with RIS(mode="silent") as ris:
        with pytest.raises(WorklistError, match="failed"):
            find_worklist(_node(ris), "MODLINK", Timeouts(dimse=1), WorklistQuery())


def test_slow_peer_still_answers() -> None:
    with RIS(mode="slow", delay=0.3, items=demo_items(count=2)) as ris:
        res = find_worklist(_node(ris), "MODLINK", Timeouts(dimse=5), WorklistQuery())
    assert len(res.items) == 2 and res.status == 0


def test_unreachable_peer() -> None:
    from modality_link.home import free_port

    node = Node(ae_title="RIS", host="127.0.0.1", port=free_port())
    with pytest.raises(WorklistError, match="association"):
        find_worklist(node, "MODLINK", Timeouts(connect=2), WorklistQuery())
