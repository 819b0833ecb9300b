"""A simulated RIS: Modality Worklist SCP (PS3.4 Annex K) and MPPS SCP (PS3.4 Annex F), with
quirk modes: what real worklist and MPPS servers do that a reading of the standard alone would
not expect (docs/design.md says which of these the service tolerates, and why).

- ``standard``: returns every requested key, standard values.
- ``001``: the worklist and MPPS server of a PACS product: returns **only the requested keys**;
  SPS Status "INPROGRESS" (not a defined term); Specific Character Set "ISO_IR100" (misspelled);
  zero-length Contrast Allergies; Referenced Study SOP Class 1.2.840.10008.3.1.2.3.1 (the retired
  Detached Study Management); refuses with 0x0121 an N-CREATE missing one of
  :data:`REQUIRED_CREATE` / :data:`REQUIRED_IN_0270`, or an N-SET missing PPS End Date/Time/Status.
- ``slow``: waits ``delay`` seconds before each response.
- ``a700`` / ``c000``: the C-FIND fails with that status.
- ``silent``: never answers a C-FIND, N-CREATE or N-SET (the SCU's DIMSE timeout fires).
- ``mpps-assigns-uid``: accepts N-CREATE without an Affected SOP Instance UID and assigns one.

Every MPPS message received is recorded in :attr:`RIS.mpps_messages` (and, run as a program,
printed as a JSON line), so tests assert what the SCP saw. Run: ``python -m sim.ris --port P
--mode MODE``.
"""

from __future__ import annotations

import argparse
import fnmatch
import json
import threading
import time
from dataclasses import dataclass, field
from typing import Any, Iterator

from pydicom.dataset import Dataset
from pydicom.sequence import Sequence
from pydicom.uid import generate_uid
from pynetdicom import AE, evt
from pynetdicom.dimse_primitives import N_CREATE, N_SET
# pynetdicom makes its SOP class names when it is imported: mypy cannot see them
from pynetdicom.sop_class import (  # type: ignore[attr-defined]
    ModalityPerformedProcedureStep,
    ModalityWorklistInformationFind,
    Verification,
)
from pynetdicom.transport import ThreadedAssociationServer

MODES = ("standard", "001", "slow", "a700", "c000", "silent", "mpps-assigns-uid")

#: Mode 001: attributes an N-CREATE must contain, else 0x0121. That server's document lists them
#: all at the top level; PS3.3 C.4.14 puts the four of REQUIRED_IN_0270 in the Scheduled Step
#: Attributes Sequence (0040,0270), where they are checked.
REQUIRED_CREATE = (
    "Modality", "PatientName", "PatientID", "PatientBirthDate", "StudyID",
    "PerformedStationAETitle", "PerformedProcedureStepStartDate", "PerformedProcedureStepStartTime",
    "PerformedProcedureStepEndDate", "PerformedProcedureStepEndTime", "PerformedProcedureStepStatus",
    "PerformedProcedureStepID", "ScheduledStepAttributesSequence",
)
REQUIRED_IN_0270 = ("AccessionNumber", "StudyInstanceUID", "ScheduledProcedureStepID", "RequestedProcedureID")
REQUIRED_SET = ("PerformedProcedureStepEndDate", "PerformedProcedureStepEndTime", "PerformedProcedureStepStatus")


def demo_items(station_aet: str = "MODLINK", modality: str = "CT", date: str | None = None, count: int = 3) -> list[Dataset]:
    """Worklist items for today on `station_aet`: German, Japanese and plain names."""
    date = date or time.strftime("%Y%m%d")
    names = ["Müller^Jürgen", "ﾔﾏﾀﾞ^ﾀﾛｳ=山田^太郎=やまだ^たろう", "Smith^John^Q"]
    items = []
    for i in range(count):
        ds = Dataset()
        ds.SpecificCharacterSet = "ISO_IR 192"
        ds.PatientName = names[i % len(names)]
        ds.PatientID = f"PID{i + 1:04d}"
        ds.IssuerOfPatientID = "HOSP"
        ds.PatientBirthDate = "19600101"
        ds.PatientSex = "MO"[i % 2]
        ds.PatientWeight = "72"
        ds.MedicalAlerts = ""
        ds.Allergies = ""
        ds.PregnancyStatus = 4
        ds.AccessionNumber = f"ACC{i + 1:04d}"
        ds.ReferringPhysicianName = "Doe^Jane"
        ds.StudyInstanceUID = generate_uid()
        ref = Dataset()
        ref.ReferencedSOPClassUID = "1.2.840.10008.3.1.2.3.1"
        ref.ReferencedSOPInstanceUID = ds.StudyInstanceUID
        ds.ReferencedStudySequence = Sequence([ref])
        ds.RequestedProcedureID = f"RP{i + 1:04d}"
        ds.RequestedProcedureDescription = "CT Thorax"
        code = Dataset()
        code.CodeValue, code.CodingSchemeDesignator, code.CodeMeaning = "RPID1", "L", "CT Thorax"
        ds.RequestedProcedureCodeSequence = Sequence([code])
        ds.RequestedProcedurePriority = "ROUTINE"
        sps = Dataset()
        sps.Modality = modality
        sps.ScheduledStationAETitle = station_aet
        sps.ScheduledProcedureStepStartDate = date
        sps.ScheduledProcedureStepStartTime = f"{8 + i % 10:02d}{i // 10:02d}00"
        sps.ScheduledProcedureStepDescription = "Thorax nativ"
        proto = Dataset()
        proto.CodeValue, proto.CodingSchemeDesignator, proto.CodeMeaning = "P1", "L", "Thorax protocol"
        sps.ScheduledProtocolCodeSequence = Sequence([proto])
        sps.ScheduledProcedureStepID = f"SPS{i + 1:04d}"
        sps.ScheduledProcedureStepStatus = "SCHEDULED"
        ds.ScheduledProcedureStepSequence = Sequence([sps])
        items.append(ds)
    return items


def _match_value(pattern: Any, value: Any, vr: str) -> bool:
    """PS3.4 C.2.2.2: universal, single value, wildcard and (DA/TM) range matching."""
    pattern = "" if pattern is None else str(pattern)
    value = "" if value is None else str(value)
    if pattern in ("", "*"):
        return True
    if vr in ("DA", "TM", "DT") and "-" in pattern:
        low, high = pattern.split("-", 1)
        return (not low or value >= low) and (not high or value <= high)
    if "*" in pattern or "?" in pattern:
        return fnmatch.fnmatchcase(value, pattern)
    if vr == "PN":
        return value.split("=")[0] == pattern.split("=")[0] or value == pattern
    return value == pattern


def matches(query: Dataset, item: Dataset) -> bool:
    for elem in query:
        if elem.keyword in ("SpecificCharacterSet", "TimezoneOffsetFromUTC") or elem.VR == "SQ" and elem.keyword != "ScheduledProcedureStepSequence":
            continue
        if elem.keyword == "ScheduledProcedureStepSequence":
            if not elem.value:
                continue
            q = elem.value[0]
            sps = item.ScheduledProcedureStepSequence[0]
            for e in q:
                if e.VR != "SQ" and not _match_value(e.value, sps.get(e.keyword), e.VR):
                    return False
            continue
        if not _match_value(elem.value, item.get(elem.keyword), elem.VR):
            return False
    return True


def _only_requested(query: Dataset, item: Dataset) -> Dataset:
    """Mode 001: keys that are not in the request are not returned (that server answers with the
    keys a query names and no others)."""
    out = Dataset()
    for elem in query:
        if elem.keyword == "SpecificCharacterSet":
            continue
        if elem.tag in item:
            src = item[elem.tag]
            if elem.VR == "SQ" and src.value and elem.value:
                out[elem.tag] = src.__class__(src.tag, "SQ", Sequence([_only_requested(elem.value[0], i) for i in src.value]))
            else:
                out[elem.tag] = src
        elif elem.VR == "SQ":
            out[elem.tag] = elem.__class__(elem.tag, "SQ", Sequence())
        else:
            out[elem.tag] = elem.__class__(elem.tag, elem.VR, None)
    return out


@dataclass
class RIS:
    """A worklist + MPPS SCP on 127.0.0.1:`port`; `port=0` picks a free one."""

    port: int = 0
    mode: str = "standard"
    ae_title: str = "RIS"
    items: list[Dataset] = field(default_factory=demo_items)
    delay: float = 2.0
    mpps_messages: list[dict[str, Any]] = field(default_factory=list)
    #: Instances by SOP Instance UID: their current attributes and state history.
    instances: dict[str, dict[str, Any]] = field(default_factory=dict)
    cancels: int = 0

    def __post_init__(self) -> None:
        if self.mode not in MODES:
            raise ValueError(f"mode: one of {', '.join(MODES)}")
        self._ae = AE(ae_title=self.ae_title)
        for sop in (ModalityWorklistInformationFind, ModalityPerformedProcedureStep, Verification):
            self._ae.add_supported_context(sop)
        self._ae.network_timeout = 60
        self._server: ThreadedAssociationServer | None = None
        self._lock = threading.Lock()
        self._silent = threading.Event()

    # -- life cycle -----------------------------------------------------------------------------

    def start(self) -> "RIS":
        handlers: list[evt.EventHandlerType] = [
            (evt.EVT_C_FIND, self._on_find),
            (evt.EVT_N_CREATE, self._on_create),
            (evt.EVT_N_SET, self._on_set),
        ]
        server = self._ae.start_server(("127.0.0.1", self.port), block=False, evt_handlers=handlers)
        assert server is not None  # not blocking: the server is returned
        self._server = server
        self.port = server.server_address[1]
        return self

    def stop(self) -> None:
        self._silent.set()
        if self._server is not None:
            self._server.shutdown()
            self._server = None

    def __enter__(self) -> "RIS":
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    # -- MWL ------------------------------------------------------------------------------------

    def _on_find(self, event: evt.Event) -> Iterator[tuple[int, Dataset | None]]:
        query = event.identifier
        if self.mode == "silent":
            self._silent.wait(120)
            return
        if self.mode in ("a700", "c000"):
            yield (0xA700 if self.mode == "a700" else 0xC000), None
            return
        for item in self.items:
            if not matches(query, item):
                continue
            if event.is_cancelled:
                self.cancels += 1
                yield 0xFE00, None
                return
            if self.mode == "slow":
                time.sleep(self.delay)
            if self.mode == "001":
                out = _only_requested(query, item)
                out.SpecificCharacterSet = "ISO_IR100"
                sps = out.get("ScheduledProcedureStepSequence")
                if sps and "ScheduledProcedureStepStatus" in sps[0]:
                    sps[0].ScheduledProcedureStepStatus = "INPROGRESS"
                if "Allergies" in out:
                    out.Allergies = None
                # Patient's Name: first, middle and last name only (no prefix/suffix groups)
                yield 0xFF00, out
            else:
                out = Dataset()
                out.update(item)
                yield 0xFF00, out
            time.sleep(0.01)  # let a C-CANCEL arrive between matches
        if event.is_cancelled:
            self.cancels += 1
            yield 0xFE00, None
            return
        yield 0x0000, None

    # -- MPPS -----------------------------------------------------------------------------------

    def _record(self, kind: str, uid: str | None, ds: Dataset, status: int) -> None:
        with self._lock:
            self.mpps_messages.append({
                "kind": kind, "uid": uid, "status": status, "time": time.time(),
                "dataset": ds.to_json_dict(),
            })

    def _on_create(self, event: evt.Event) -> tuple[int, Dataset | None]:
        if self.mode == "silent":
            self._silent.wait(120)
            return 0x0110, None
        req = event.request
        assert isinstance(req, N_CREATE)
        ds = event.attribute_list
        uid = req.AffectedSOPInstanceUID
        assigned = uid is None
        if uid is None:
            uid = generate_uid()
        if self.mode == "001":
            missing = [k for k in REQUIRED_CREATE if k not in ds]
            ssa = ds.get("ScheduledStepAttributesSequence") or []
            for item in ssa[:1]:
                missing += [k for k in REQUIRED_IN_0270 if k not in item]
            if missing or not ssa:
                self._record("create", uid, ds, 0x0121)
                return 0x0121, None
        if ds.get("PerformedProcedureStepStatus") != "IN PROGRESS":
            self._record("create", uid, ds, 0x0106)
            return 0x0106, None
        with self._lock:
            if uid in self.instances:
                status = 0x0111
            else:
                self.instances[uid] = {"attributes": ds, "states": ["IN PROGRESS"]}
                status = 0x0000
        self._record("create", uid, ds, status)
        if status != 0:
            return status, None
        rsp = Dataset()
        rsp.update(ds)
        if assigned:  # pynetdicom moves it into the N-CREATE-RSP command (PS3.7 10.1.5.1.2)
            rsp.AffectedSOPInstanceUID = uid
        return status, rsp

    def _on_set(self, event: evt.Event) -> tuple[int, Dataset | None]:
        if self.mode == "silent":
            self._silent.wait(120)
            return 0x0110, None
        req = event.request
        assert isinstance(req, N_SET)
        uid = req.RequestedSOPInstanceUID
        mod = event.modification_list
        with self._lock:
            inst = self.instances.get(uid) if uid is not None else None
        if inst is None:
            status = 0x0112
        elif inst["states"][-1] != "IN PROGRESS":
            status = 0xC310  # PS3.4 F.7.2.2.2: no longer updatable
        elif self.mode == "001" and any(k not in mod for k in REQUIRED_SET):
            status = 0x0121
        else:
            status = 0x0000
            inst["attributes"].update({e.tag: e for e in mod if e.keyword != "SpecificCharacterSet"})
            if "PerformedProcedureStepStatus" in mod:
                inst["states"].append(str(mod.PerformedProcedureStepStatus))
        self._record("set", uid, mod, status)
        return status, (inst["attributes"] if status == 0 and inst else None)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(
        prog="python -m sim.ris", description=__doc__.splitlines()[0],
        epilog="Prints one line 'sim.ris: AE on HOST:PORT, mode MODE' once it listens, then each MPPS message "
               "received as a JSON line (DICOM JSON model); Ctrl-C stops it (docs/sim.md).")
    p.add_argument("--port", type=int, default=11114, help="TCP port on 127.0.0.1 (default 11114; 0: any free one)")
    p.add_argument("--mode", choices=MODES, default="standard", help="quirk mode (default standard; see docs/sim.md)")
    p.add_argument("--ae", default="RIS", help="its AE title (default RIS)")
    p.add_argument("--station", default="MODLINK", help="Scheduled Station AE Title of the demo items")
    p.add_argument("--items", type=int, default=3, help="worklist items scheduled for today (default 3)")
    args = p.parse_args(argv)
    ris = RIS(port=args.port, mode=args.mode, ae_title=args.ae, items=demo_items(args.station, count=args.items))
    ris.start()
    print(f"sim.ris: {args.ae} on 127.0.0.1:{ris.port}, mode {args.mode}", flush=True)
    seen = 0
    try:
        while True:
            time.sleep(0.2)
            while seen < len(ris.mpps_messages):
                print(json.dumps(ris.mpps_messages[seen], ensure_ascii=False), flush=True)
                seen += 1
    except KeyboardInterrupt:
        pass
    finally:
        ris.stop()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
