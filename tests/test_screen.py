"""The technologist's screen (docs/design.md "The command line"), through the command line in a
pseudo-terminal where the screen matters: one progress style for jobs and imports, the reason and
next attempt of a job that waits, Ctrl-C that leaves the job to the service, `job follow`, `job
retry` of a waiting job, `exam list`/`exam show`/`exam start` with the MPPS outcome, and the lists
that stay readable while the service is stopped."""

from __future__ import annotations

import json
import re
from pathlib import Path

from modality_link import config
from modality_link.home import free_port
from tests.support.peers import start_storescp
from tests.support.service import ServiceProcess
from tests.support.terminal import Terminal
from tests.support.waiting import wait_until


def _service(short_tmp: Path, pacs_port: int, ris_port: int) -> ServiceProcess:
    nodes = {
        "PACS": config.Node(ae_title="STORESCP", host="127.0.0.1", port=pacs_port, roles=["store"],
                            retries=3, retry_interval=60.0),
        "RIS": config.Node(ae_title="RIS", host="127.0.0.1", port=ris_port, roles=["mpps"], retry_interval=60.0),
    }
    return ServiceProcess.start(short_tmp / "home", nodes=nodes)


def test_send_waits_with_its_reason_then_follow_and_retry_now(short_tmp: Path) -> None:
    from sim import images

    pacs_port, ris_port = free_port(), free_port()  # nothing listens on either yet
    svc = _service(short_tmp, pacs_port, ris_port)
    storescp = None
    try:
        images.write_study(short_tmp / "in", modality="CT", images=5, seed=3)
        (short_tmp / "in" / "notes.txt").write_text("not DICOM")

        # import: progress files done/total, and a sentence for the file that is no DICOM file
        term = Terminal(svc.home.root, "import", str(short_tmp / "in"))
        assert term.wait() == 1, term.text
        assert re.search(r"import .*6/6", term.text), term.text
        assert "5 imported, 1 refused" in term.text and "imported 5 file(s)" in term.text
        assert "notes.txt: not a DICOM file (no DICM prefix" in term.text and "force=True" not in term.text
        [study] = svc.studies()

        # send --wait on a terminal: a bar with counts, the reason and the next attempt
        term = Terminal(svc.home.root, "send", study["study_uid"], "--to", "PACS", "--wait")
        job_id = int(term.expect(r"job (\d+) queued").group(1))
        term.expect(r"send job \d+ .*0/5")
        term.expect(r"attempt 1 of 4 failed; retrying; .*[Cc]onnection refused.*; next attempt at \d\d:\d\d:\d\d")
        assert "/s" in term.text, "the rate column"
        # Ctrl-C: the job goes on in the service, and how to follow it again
        term.interrupt()
        assert term.wait() == 130, term.text
        assert f"it goes on in the service" in term.text and f"modality-link job follow {job_id}" in term.text
        job = svc.call("jobs.show", id=job_id)
        assert job["state"] == "queued" and job["next_attempt_at"] > job["updated_at"] + 30
        assert re.fullmatch(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d[+-]\d\d:\d\d", job["next_attempt"]), job
        [attempt] = job["attempt_history"]
        assert attempt["outcome"] == "retry" and "refused" in attempt["error"].lower(), attempt

        # plain lines when not a terminal: the same reason in `jobs`
        jobs = svc.cli("jobs")
        assert re.search(rf"{job_id} send .*queued .*attempt 1 of 4 failed.*next attempt at", jobs.stdout), jobs.stdout

        # the PACS is back: `job retry` of the waiting job tries it now; `job follow` re-attaches
        (short_tmp / "pacs").mkdir()
        storescp = start_storescp(short_tmp / "pacs", pacs_port)
        retried = svc.cli("job", "retry", str(job_id))
        assert retried.returncode == 0, retried.stderr
        term = Terminal(svc.home.root, "job", "follow", str(job_id))
        assert term.wait(60) == 0, term.text
        final = term.expect(rf"job {job_id} \(send to PACS\): done: (.*)").group(1)
        assert "refused" not in final.lower(), "no stale error on a finished job"
        term.expect(r"5/5")
        shown = svc.cli("job", "show", str(job_id))
        assert re.search(r"created \d{4}-\d\d-\d\dT", shown.stdout), shown.stdout
        assert re.search(r"attempt .*: retry: .*[Rr]efused", shown.stdout) and ": done" in shown.stdout, shown.stdout
        assert "refused" not in shown.stdout.splitlines()[0].lower(), shown.stdout
        as_json = json.loads(svc.cli("job", "show", str(job_id), "--json").stdout)
        assert [a["outcome"] for a in as_json["attempt_history"]] == ["retry", "done"]
        assert isinstance(as_json["created"], str) and as_json["created"][10] == "T"

        # a retry of a finished job is still refused
        again = svc.cli("job", "retry", str(job_id))
        assert again.returncode == 1 and "only a failed, cancelled or queued job" in again.stderr

        # exam start reports the MPPS N-CREATE's outcome: the RIS is down, queued for retry
        started = svc.cli("exam", "start", "--patient-id", "P1", "--patient-name", "DOE^JANE")
        assert started.returncode == 0, started.stderr
        exam_id = int(started.stdout.split()[0])
        assert re.search(r"MPPS N-CREATE to RIS: queued for retry \(.*[Rr]efused.*next attempt at", started.stdout), \
            started.stdout
        listed = svc.cli("exam", "list")
        assert re.search(rf"{exam_id} IN PROGRESS +P1 +DOE\^JANE .*N-CREATE queued", listed.stdout), listed.stdout
        shown = svc.cli("exam", "show", str(exam_id))
        assert "MPPS N-CREATE to RIS: queued for retry" in shown.stdout, shown.stdout
    finally:
        svc.stop()
        if storescp is not None:
            storescp.terminate()
            storescp.wait()

    # the service is stopped: jobs, studies and exam list read the database, and say so
    before = sorted(p.name for p in svc.home.root.iterdir())
    for args, expected in ((("jobs",), rf"{job_id} send .*done +5/5"), (("studies",), study["study_uid"]),
                           (("exam", "list"), rf"{exam_id} IN PROGRESS")):
        proc = svc.cli(*args)
        assert proc.returncode == 0, proc.stderr
        assert re.search(expected, proc.stdout), proc.stdout
        assert "the service is not running" in proc.stderr, proc.stderr
    assert json.loads(svc.cli("jobs", "--json").stdout)[0]["id"] in (job_id, job_id + 1)
    assert sorted(p.name for p in svc.home.root.iterdir()) == before, "nothing created in the home"
    assert svc.cli("send", study["study_uid"], "--to", "PACS").returncode == 3  # the rest needs the service


def test_burn_iso_on_the_progress_screen_refuses_to_overwrite(short_tmp: Path) -> None:
    from sim import images

    svc = ServiceProcess.start(short_tmp / "home")
    try:
        images.write_study(short_tmp / "in", modality="CT", images=3, seed=4)
        assert svc.cli("import", str(short_tmp / "in")).returncode == 0
        [study] = svc.studies()
        image = short_tmp / "out.iso"
        term = Terminal(svc.home.root, "burn", study["study_uid"], "--iso", str(image), "--wait")
        assert term.wait(120) == 0, term.text
        term.expect(r"burn \d+ disc 1 of 1 (build|write|verify) .*100/100")
        size = image.stat().st_size
        image.write_bytes(b"precious")
        proc = svc.cli("burn", study["study_uid"], "--iso", str(image), "--wait")
        assert proc.returncode == 1 and "exists" in proc.stderr and "--force" in proc.stderr
        assert image.read_bytes() == b"precious"
        proc = svc.cli("burn", study["study_uid"], "--iso", str(image), "--force", "--wait")
        assert proc.returncode == 0, proc.stderr
        assert image.stat().st_size == size
        wait_until(lambda: svc.call("burn.list")[-1]["state"] == "done", 10, "the burn's row")
    finally:
        svc.stop()
