"""The integrator's kit (docs/sim.md, docs/client.md): the RIS and PACS simulators and the image
generator run as programs on their own, DCMTK talks to them, and the worked example of the
acquisition sequence (examples/acquisition.py, on modality_link.client) runs against them and a
service."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path
from typing import Iterator

import pytest

from modality_link.client import Client, IpcError
from modality_link.config import Node
from modality_link.home import free_port
from tests.support import REPO
from tests.support.service import ServiceProcess, cleanup
from tests.support.tools import dcmtk_env, require_tool
from tests.support.waiting import wait_until


def _started(*args: str) -> subprocess.Popen:
    """A simulator as a program; returns once it printed that it listens."""
    proc = subprocess.Popen([sys.executable, "-m", *args], cwd=REPO, stdout=subprocess.PIPE,
                            stderr=subprocess.DEVNULL, text=True)
    assert proc.stdout is not None
    first = proc.stdout.readline()
    assert first.startswith(f"{args[0]}: "), first
    return proc


@pytest.fixture
def hospital() -> Iterator[tuple[int, int, subprocess.Popen]]:
    """``python -m sim.ris`` and ``python -m sim.pacs`` on free ports: (ris port, pacs port, ris)."""
    ris_port, pacs_port = free_port(), free_port()
    ris = _started("sim.ris", "--port", str(ris_port), "--station", "MODLINK", "--items", "2")
    pacs = _started("sim.pacs", "--port", str(pacs_port), "--ae", "SIMPACS")
    try:
        yield ris_port, pacs_port, ris
    finally:
        for proc in (ris, pacs):
            proc.terminate()
            proc.wait(10)


@pytest.mark.parametrize("module", ["sim.ris", "sim.pacs", "sim.images"])
def test_each_simulator_has_help(module: str) -> None:
    out = subprocess.run([sys.executable, "-m", module, "--help"], cwd=REPO, capture_output=True, text=True,
                         timeout=60, check=True).stdout
    assert out.startswith(f"usage: python -m {module}") and "  -h, --help" in out
    options = [line.split()[0] for line in out.splitlines() if line.startswith("  -") and "--help" not in line]
    assert options and all(f"{o}" in out for o in options)
    assert ("--port" in out) == (module != "sim.images")


def test_the_simulators_answer_dcmtk(hospital: tuple[int, int, subprocess.Popen], tmp_path: Path) -> None:
    ris_port, pacs_port, _ = hospital
    echoscu, findscu = require_tool("echoscu"), require_tool("findscu")
    for aec, port in (("RIS", ris_port), ("SIMPACS", pacs_port)):
        echo = subprocess.run([echoscu, "-to", "10", "-aec", aec, "127.0.0.1", str(port)],
                              capture_output=True, text=True, timeout=30, env=dcmtk_env())
        assert echo.returncode == 0, echo.stderr
    found = subprocess.run([findscu, "-W", "-to", "10", "-aec", "RIS", "-k", "PatientName", "-k",
                            "ScheduledProcedureStepSequence[0].ScheduledStationAETitle=MODLINK",
                            "-X", "-od", str(tmp_path), "127.0.0.1", str(ris_port)],
                           capture_output=True, text=True, timeout=30, env=dcmtk_env())
    assert found.returncode == 0, found.stderr
    assert len(list(tmp_path.glob("rsp*.dcm"))) == 2


def test_the_worked_example_runs_the_acquisition_sequence(hospital: tuple[int, int, subprocess.Popen],
                                                        short_tmp: Path, tmp_path: Path) -> None:
    ris_port, pacs_port, ris = hospital
    images = tmp_path / "images"
    made = subprocess.run([sys.executable, "-m", "sim.images", str(images), "--images", "3", "--series", "2",
                           "--rows", "32", "--columns", "32", "--seed", "15"],
                          cwd=REPO, capture_output=True, text=True, timeout=120, check=True)
    assert "wrote 6 files" in made.stdout
    nodes = {
        "ris": Node(ae_title="RIS", host="127.0.0.1", port=ris_port, roles=["worklist", "mpps"], worklist_date="",
                    retry_interval=0.5),
        "PACS": Node(ae_title="SIMPACS", host="127.0.0.1", port=pacs_port, roles=["store", "commit"],
                     auto_send="exam", retry_interval=0.5, commit_wait=10.0, commit_timeout=30.0),
    }
    svc = ServiceProcess.start(short_tmp / "home", nodes=nodes, disk_server=False)
    try:
        run = subprocess.run([sys.executable, str(REPO / "examples" / "acquisition.py"), "--home",
                              str(svc.home.root), str(images)], cwd=tmp_path, capture_output=True, text=True,
                             timeout=300)
        assert run.returncode == 0, run.stdout + run.stderr
        out = run.stdout
        assert "protocol 1.0" in out and "worklist: 2 item(s)" in out and "added 6 image(s)" in out
        assert "(commit) done" in out and "complete: True" in out
        studies = svc.call("studies.list")
        assert [s["instances"] for s in studies] == [6]
        assert studies[0]["nodes"]["PACS"] == {"sent": 6, "committed": 6}
        # the RIS saw the exam's N-CREATE and N-SET (printed by sim.ris as JSON lines)
        assert ris.stdout is not None
        lines = [json.loads(ris.stdout.readline()) for _ in range(2)]
        assert len(lines) == 2
        # the library refuses what the protocol refuses, with the parameter named
        with Client.connect(home=svc.home.root) as ml:
            with pytest.raises(IpcError) as wrong:
                ml.call("exam.start", patient_id=12345, patient_name="Doe^Jane")
            assert wrong.value.data == {"param": "patient_id"}
            assert wait_until(lambda: ml.exam(1).state == "COMPLETED", 10, "the exam")
    finally:
        svc.proc.terminate()
        svc.proc.wait(30)
        cleanup(svc.home)
