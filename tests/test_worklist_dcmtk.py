"""MWL SCU against DCMTK wlmscpfs (a real peer) in each character-set mode."""

from __future__ import annotations

import subprocess
from pathlib import Path

import pytest
from pydicom.charset import convert_encodings
from pydicom.valuerep import PersonName

from modality_link.config import Node, Timeouts
from modality_link.home import free_port
from modality_link.net.worklist import WorklistQuery, find_worklist
from tests.support.tools import dcmtk_env, require_tool
from tests.support.waiting import wait_port

GERMAN = "Müller^Jürgen"
JAPANESE = "ﾔﾏﾀﾞ^ﾀﾛｳ=山田^太郎=やまだ^たろう"

DUMP = """(0008,0005) CS [{charset}]
(0008,0050) SH [ACC{n}]
(0010,0010) PN [@@NAME@@]
(0010,0020) LO [PID{n}]
(0010,0030) DA [19600101]
(0010,0040) CS [M]
(0020,000d) UI [1.2.3.4.5.6.{n}]
(0032,1060) LO [CT Thorax]
(0040,0100) SQ
(fffe,e000) -
(0008,0060) CS [CT]
(0040,0001) AE [MODLINK]
(0040,0002) DA [20240101]
(0040,0003) TM [0800]
(0040,0007) LO [Thorax nativ]
(0040,0009) SH [SPS{n}]
(fffe,e00d) -
(fffe,e0dd) -
(0040,1001) SH [RP{n}]
"""


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    dump2dcm = require_tool("/usr/bin/dump2dcm")
    root = tmp_path_factory.mktemp("wl")
    aet = root / "MODLINK"
    aet.mkdir()
    (aet / "lockfile").touch()
    for n, (name, charset, terms) in enumerate(
        [(GERMAN, "ISO_IR 100", ["ISO_IR 100"]),
         (JAPANESE, "ISO 2022 IR 13\\ISO 2022 IR 87", ["ISO 2022 IR 13", "ISO 2022 IR 87"])], start=1
    ):
        raw = PersonName(name).encode(convert_encodings(terms))
        text = DUMP.format(charset=charset, n=n).encode("ascii").replace(b"@@NAME@@", raw)
        dump = root / f"{n}.dump"
        dump.write_bytes(text)
        subprocess.run([dump2dcm, "-q", str(dump), str(aet / f"{n}.wl")], check=True)
    return root


@pytest.mark.parametrize("mode", ["-cs0", "-cs1", "-csk"])
def test_names_decode_in_every_charset_mode(data_dir: Path, mode: str) -> None:
    exe = require_tool("/usr/bin/wlmscpfs")
    port = free_port()
    proc = subprocess.Popen([exe, "-q", mode, "-dfp", str(data_dir), str(port)], env=dcmtk_env())
    try:
        wait_port(port)
        node = Node(ae_title="MODLINK", host="127.0.0.1", port=port, roles=["worklist"])
        res = find_worklist(node, "MODLINK", Timeouts(dimse=10), WorklistQuery(station_aet="MODLINK", date="20240101", modality="CT"))
        names = {str(i.ScheduledProcedureStepSequence[0].ScheduledProcedureStepID): str(i.PatientName) for i in res.items}
        assert names == {"SPS1": GERMAN, "SPS2": JAPANESE}
        # wildcard matching on the name and a date range
        res = find_worklist(node, "MODLINK", Timeouts(dimse=10), WorklistQuery(patient_name="M?ller*", date="20231231-20240102"))
        assert [str(i.PatientName) for i in res.items] == [GERMAN]
        res = find_worklist(node, "MODLINK", Timeouts(dimse=10), WorklistQuery(date="20250101"))
        assert res.items == [] and res.status == 0
    finally:
        proc.terminate()
        proc.wait(5)
