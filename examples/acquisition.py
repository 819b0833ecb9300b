"""The whole acquisition sequence through modality_link's client library (docs/client.md).

What the scanner's acquisition software does for one exam, against a running service:

1. query the Modality Worklist and pick the first item (or start an unscheduled exam);
2. start the exam (the service sends the MPPS N-CREATE);
3. add the acquired images (PS3.10 files, absolute paths; the service copies them and fills
   in the patient and study from the worklist item);
4. declare each series complete, then end the exam (MPPS N-SET COMPLETED);
5. follow the send and commitment jobs the auto-send rule queued (or, with ``--send NODE``,
   queue the send with Storage Commitment itself) until each job chain is finished;
6. read the events it missed while it was busy, replayed from the sequence number it noted
   before it started (as after a reconnection).

Run: ``python examples/acquisition.py --home HOME IMAGES...`` (images e.g. from
``python -m sim.images OUT``). It prints one line per step and exits 0 when every image was
stored and committed.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from modality_link.client import Client, IpcError


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("images", nargs="+", type=Path, help="PS3.10 files or folders of them (*.dcm)")
    p.add_argument("--home", help="the service's home (default $MODALITY_LINK_HOME)")
    p.add_argument("--send", metavar="NODE", help="send with Storage Commitment to NODE (default: the auto-send rule)")
    args = p.parse_args(argv)
    files = [f for path in args.images for f in (sorted(path.rglob("*.dcm")) if path.is_dir() else [path])]

    with Client.connect(home=args.home, name="examples/acquisition.py") as ml:
        print(f"connected: {ml.server['service']} {ml.server['version']}, protocol {ml.server['protocol']}")
        start_seq = ml.last_event_seq()  # after a reconnection, events.subscribe {since} starts here

        items = ml.worklist()
        if items:
            item = items[0]
            print(f"worklist: {len(items)} item(s); taking {item['sps_id']} for {item['patient_name']}")
            exam = ml.start_exam(item=item["sps_id"])
        else:
            exam = ml.start_exam(patient_id="EXAMPLE1", patient_name="Example^Patient")
        print(f"exam {exam.exam_id} {exam.state}, study {exam.study_uid}")

        try:
            added = ml.add_images(exam.exam_id, [str(f.resolve()) for f in files])
        except IpcError as exc:
            print(f"images refused: {exc.message} ({exc.code}, {exc.data})", file=sys.stderr)
            ml.end_exam(exam.exam_id, discontinue="110514")  # incorrect worklist entry selected
            return 1
        print(f"added {len(added)} image(s)")
        for series in ml.exam(exam.exam_id).raw["series"]:
            ml.series_complete(exam.exam_id, series["series_uid"])
        ended = ml.end_exam(exam.exam_id)
        jobs = ended.jobs or ([ml.send([exam.study_uid], args.send, commit=True)] if args.send else [])
        print(f"exam {ended.state}; jobs {jobs}")

        ok = True
        for job_id in jobs:
            last = ml.follow_job(job_id, timeout=120)
            print(f"job chain {job_id}: last job {last.id} ({last.kind}) {last.state}"
                  f"{': ' + last.last_error if last.last_error else ''}")
            ok = ok and last.succeeded and last.kind == "commit"

        missed = list(ml.events(since=start_seq, timeout=0.5))
        kinds = sorted({e.type for e in missed})
        print(f"events since {start_seq}: {len(missed)} ({', '.join(kinds)}), complete: "
              f"{ml.subscription['complete']}")
        mpps = [e.fields["kind"] for e in missed if e.type == "mpps.sent"]
        print(f"MPPS sent: {', '.join(mpps) or 'none yet'}")
    return 0 if ok and jobs else 1


if __name__ == "__main__":
    raise SystemExit(main())
