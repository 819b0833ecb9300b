"""A full exam against an MPPS SCP that is not ours: python3-odil (Debian), as a process."""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

from modality_link.config import Node
from modality_link.home import free_port
from sim.ris import RIS
from tests.support.instances import spool_images
from tests.support.peers import ODIL_MPPS_SCP
from tests.support.service import InProcessService, cleanup, exam_home
from tests.support.tools import missing, require_tool
from tests.support.waiting import wait_port, wait_until


def test_full_exam_against_odil(tmp_path: Path) -> None:
    python = require_tool("/usr/bin/python3")
    odil = "/usr/lib/python3/dist-packages/odil/__init__.py"
    if subprocess.run([python, "-c", "import odil"], capture_output=True).returncode != 0 and not Path(odil).is_file():
        missing(f"python3-odil not installed ({odil})")
    port = free_port()
    out = tmp_path / "odil"
    out.mkdir()
    proc = subprocess.Popen([python, str(ODIL_MPPS_SCP), str(port), str(out)],
                            stdout=subprocess.PIPE, text=True)
    try:
        assert proc.stdout is not None and proc.stdout.readline().strip() == "ready"
        wait_port(port)
        with RIS() as ris:  # the worklist comes from the simulated RIS, the MPPS goes to odil
            home = exam_home({
                "ris": Node(ae_title="RIS", host="127.0.0.1", port=ris.port, roles=["worklist"], worklist_date=""),
                "odil": Node(ae_title="ODIL", host="127.0.0.1", port=port, roles=["mpps"], retry_interval=0.5),
            })
            svc = InProcessService(home)
            try:
                svc.call("worklist.query")
                ex = svc.call("exam.start", item="SPS0002")
                added = svc.call("exam.add_image", exam_id=ex["exam_id"], paths=spool_images(tmp_path / "s", 3))["added"]
                svc.call("exam.end", exam_id=ex["exam_id"])
                # odil writes its file before it answers: wait for our side to have the answers
                def both_sent() -> bool:
                    return [m["state"] for m in svc.call("exam.show", exam_id=ex["exam_id"])["mpps"]] == ["sent", "sent"]

                wait_until(both_sent, 15, "the N-CREATE and the N-SET answered")
                files = sorted(out.glob("*.json"))
                assert len(files) == 2, files
            finally:
                svc.stop()
                cleanup(home)
    finally:
        proc.terminate()
        proc.wait(5)
    create, nset = (json.loads(f.read_text()) for f in files)
    assert files[0].name.endswith("create.json") and files[1].name.endswith("set.json")
    assert create["uid"] == nset["uid"] == ex["mpps_uid"]
    c = create["dataset"]
    assert c["00400252"]["Value"] == ["IN PROGRESS"]
    assert c["00100010"]["Value"][0]["Ideographic"] == "山田^太郎"
    ssa = c["00400270"]["Value"][0]
    assert ssa["00400009"]["Value"] == ["SPS0002"] and ssa["00401001"]["Value"] == ["RP0002"]
    assert ssa["00080050"]["Value"] == ["ACC0002"]
    for tag in ("00400250", "00400251", "00200010", "00400241", "00400253"):
        assert tag in c, tag
    s = nset["dataset"]
    assert s["00400252"]["Value"] == ["COMPLETED"] and s["00400250"]["Value"]
    refs = s["00400340"]["Value"][0]["00081140"]["Value"]
    assert sorted(r["00081155"]["Value"][0] for r in refs) == sorted(added)
