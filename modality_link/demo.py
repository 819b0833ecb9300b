"""`modality-link demo`: the service and a simulated hospital in a temporary home, end to end.

1. The service starts in a temporary home (`modality_link.home.temporary_home`, free loopback
   ports); the scanner simulator stores a CT series into its disk server by C-STORE.
2. A simulated RIS (worklist + MPPS SCP) and a simulated PACS (Storage + Storage Commitment SCP,
   reporting on a new association with role selection) are configured as nodes; the PACS node
   has ``auto_send = "exam"``.
3. One exam: worklist query → exam start (MPPS N-CREATE) → images → exam end (N-SET). No `send`
   is asked for: the exam end queues the auto-send to the PACS (the node's ``auto_send`` rule),
   and Storage Commitment follows once every instance is stored (docs/design.md "Storage
   Commitment"). Before the exam, the patient's prior study is loaded from the PACS into the
   memory server for comparison (C-FIND, then C-MOVE: docs/design.md "Loading priors"). The demo
   prints what the RIS and the PACS received, what the PACS committed and what the memory server
   holds.
"""

from __future__ import annotations

import shutil
import time
from pathlib import Path
from typing import Any

from modality_link import config
from modality_link.home import Home, temporary_home
from modality_link.ipc import IpcClient
from modality_link.service import Service


def _print_end(job: dict[str, Any]) -> None:
    if job["state"] in ("done", "failed", "cancelled"):
        print(f"demo: {job['kind']} job {job['id']} to {job['node']} {job['state']}: "
              f"{job['last_error'] or job['detail']}")


def _demo_exam(home: Home, root: Path, images: int) -> bool:
    """Worklist → exam start → images → exam end; auto-send and commitment to the PACS."""
    from sim import images as sim_images
    from sim.pacs import Pacs
    from sim.ris import RIS

    cfg = config.load(home.config_path)
    pacs = Pacs(ae_title="SIMPACS", commit_mode="new-role",
                report_to=(cfg.disk_server.ae_title, "127.0.0.1", cfg.disk_server.port),
                move_destinations={cfg.memory_server.ae_title: ("127.0.0.1", cfg.memory_server.port)})
    with RIS() as ris, pacs:
        cfg.nodes["ris"] = config.Node(ae_title="RIS", host="127.0.0.1", port=ris.port,
                                       roles=["worklist", "mpps"], retry_interval=1.0)
        cfg.nodes["PACS"] = config.Node(ae_title="SIMPACS", host="127.0.0.1", port=pacs.port,
                                        roles=["store", "commit", "qr"], auto_send="exam", commit_wait=1.0)
        config.save(cfg, home.config_path)
        with IpcClient(home.socket_path) as client:
            client.call("config.reload")
            items = client.call("worklist.query")["items"]
            print(f"demo: worklist has {len(items)} item(s): "
                  + ", ".join(f"{i['sps_id']} {i['patient_name']}" for i in items))
            prior_ok = _demo_prior(client, pacs, items[0], root)
            exam = client.call("exam.start", item=items[0]["sps_id"])
            spool = root / "spool"
            spool.mkdir()
            paths = []
            for n, ds in enumerate(sim_images.make_study("CT", images=images, seed=2)):
                p = spool / f"{n}.dcm"
                ds.save_as(p, enforce_file_format=True)
                paths.append(str(p))
            added = client.call("exam.add_image", exam_id=exam["exam_id"], paths=paths)["added"]
            ended = client.call("exam.end", exam_id=exam["exam_id"])
            print(f"demo: exam {exam['exam_id']} {ended['state']} with {len(added)} images; "
                  f"auto-send to PACS queued as job(s) {ended['jobs']}")
            try:
                last = client.follow_job(ended["jobs"][0], _print_end, timeout=60) if ended["jobs"] else {}
            except TimeoutError as exc:
                print(f"demo: {exc}")
                last = {}
            study = next(s for s in client.call("studies.list") if s["study_uid"] == exam["study_uid"])
            counts = study["nodes"].get("PACS", {"sent": 0, "committed": 0})
            deadline = time.time() + 15
            while time.time() < deadline and len(ris.mpps_messages) < 2:
                time.sleep(0.1)
        received = sum(1 for uid in added if uid in pacs.received)
        print(f"demo: PACS received study {exam['study_uid']}: {received}/{len(added)} instances, "
              f"committed {counts['committed']}/{len(added)}")
        states = [(m["kind"], m["status"]) for m in ris.mpps_messages]
        print(f"demo: exam {exam['exam_id']} of {items[0]['patient_name']}: RIS received MPPS {states}")
    committed = last.get("kind") == "commit" and last.get("state") == "done"
    return (states == [("create", 0), ("set", 0)] and committed and prior_ok
            and received == counts["committed"] == len(added) == images)


def _demo_prior(client: IpcClient, pacs: Any, item: dict[str, Any], root: Path) -> bool:
    """The PACS holds a prior study of the worklist patient; load it into the memory server."""
    from sim import images as sim_images

    patient = sim_images.PatientSpec(item["patient_id"], item["patient_name"])
    prior = sim_images.write_study(root / "prior", modality="CT", images=5, patient=patient, seed=7)
    pacs.preload(prior)
    job = client.call("retrieve", node="PACS", patient_id=item["patient_id"], to="memory")["job_id"]
    try:
        client.follow_job(job, _print_end, timeout=60)
    except TimeoutError as exc:
        print(f"demo: {exc}")
    held = client.call("memory.list")
    for st in held["studies"]:
        print(f"demo: memory server holds the prior study {st['study_uid']} of {st['patient_name']}: "
              f"{st['instances']} instances")
    return held["instances"] == len(prior)


def run_demo(images: int = 20, keep: bool = False) -> int:
    from sim import images as sim_images
    from sim.sender import send

    home = temporary_home(prefix="ml-demo-")
    root = home.root
    cfg = config.load(home.config_path)
    service = Service(home)
    service.start(log_to_stderr=False)
    try:
        print(f"demo: service started in {root} (disk server port {cfg.disk_server.port})")
        study = sim_images.make_study("CT", images=images, rows=256, columns=256, seed=1)
        t0 = time.perf_counter()
        statuses = send(study, "127.0.0.1", cfg.disk_server.port, cfg.disk_server.ae_title)
        dt = time.perf_counter() - t0
        ok = sum(1 for s in statuses if s == 0)
        print(f"demo: scanner simulator stored {ok}/{len(statuses)} CT images by C-STORE in {dt:.2f} s")
        with IpcClient(home.socket_path) as client:
            for s in client.call("studies.list"):
                print(
                    f"demo: archive holds study {s['study_uid']} of {s['patient_name']} "
                    f"({s['patient_id']}), {s['instances']} instances"
                )
        exam_ok = _demo_exam(home, root, images)
        return 0 if ok == len(statuses) == images and exam_ok else 1
    finally:
        service.stop()
        if keep:
            print(f"demo: home kept in {root}")
        else:
            shutil.rmtree(root, ignore_errors=True)
