"""`modality-link demo`: the service and a simulated hospital in a temporary home, end to end.

For now: start the service, generate a CT study with the scanner simulator, store it with a real
C-STORE into the disk server, and list it over IPC.
"""

from __future__ import annotations

import shutil
import socket
import tempfile
import time
from pathlib import Path

from modality_link import config
from modality_link.home import Home
from modality_link.ipc import IpcClient
from modality_link.service import Service


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _demo_exam(service: Service, home: Home, root: Path) -> bool:
    """Worklist query → exam start → images → exam end against the simulated RIS."""
    from sim import images as sim_images
    from sim.ris import RIS

    with RIS() as ris:
        service.config.nodes["ris"] = config.Node(
            ae_title="RIS", host="127.0.0.1", port=ris.port, roles=["worklist", "mpps"], retry_interval=1.0
        )
        with IpcClient(home.socket_path) as client:
            items = client.call("worklist.query")["items"]
            print(f"demo: worklist has {len(items)} item(s): " + ", ".join(f"{i['sps_id']} {i['patient_name']}" for i in items))
            exam = client.call("exam.start", item=items[0]["sps_id"])
            spool = root / "spool"
            spool.mkdir()
            paths = []
            for n, ds in enumerate(sim_images.make_study("CT", images=5, seed=2)):
                p = spool / f"{n}.dcm"
                ds.save_as(p, enforce_file_format=True)
                paths.append(str(p))
            client.call("exam.add_image", exam_id=exam["exam_id"], paths=paths)
            client.call("exam.end", exam_id=exam["exam_id"])
            deadline = time.time() + 15
            while time.time() < deadline and len(ris.mpps_messages) < 2:
                time.sleep(0.1)
        states = [(m["kind"], m["status"]) for m in ris.mpps_messages]
        print(f"demo: exam {exam['exam_id']} of {items[0]['patient_name']}: RIS received MPPS {states}")
        return states == [("create", 0), ("set", 0)]


def _demo_send_and_commit(home: Home, cfg: config.Config) -> bool:
    """Send the archived study to a simulated PACS and get Storage Commitment."""
    from sim.pacs import Pacs

    pacs = Pacs(ae_title="SIMPACS", commit_mode="new-role",
                report_to=(cfg.disk_server.ae_title, "127.0.0.1", cfg.disk_server.port)).start()
    try:
        with IpcClient(home.socket_path) as client:
            cfg2 = config.load(home.config_path)
            cfg2.nodes["PACS"] = config.Node(ae_title="SIMPACS", host="127.0.0.1", port=pacs.port,
                                             roles=["store", "commit"], commit_wait=1.0)
            config.save(cfg2, home.config_path)
            client.call("config.reload")
            study = client.call("studies.list")[0]["study_uid"]
            job_id = client.call("send", study_uids=[study], node="PACS", commit=True)["job_id"]
            deadline = time.monotonic() + 60
            while time.monotonic() < deadline:
                job = client.call("jobs.show", id=job_id)
                if job["state"] in ("done", "failed", "cancelled"):
                    print(f"demo: {job['kind']} job {job_id} {job['state']}: {job['last_error'] or job['detail']}")
                    if not job["children"]:
                        break
                    job_id = job["children"][-1]
                time.sleep(0.1)
            nodes = client.call("studies.list")[0]["nodes"]
            print(f"demo: PACS holds {len(pacs.received)} instances; per node: {nodes}")
            return job["state"] == "done" and job["kind"] == "commit"
    finally:
        pacs.stop()


def run_demo(images: int = 20, keep: bool = False) -> int:
    from sim import images as sim_images
    from sim.sender import send

    root = Path(tempfile.mkdtemp(prefix="ml-demo-"))
    home = Home(root)
    home.ensure()
    cfg = config.load(home.config_path)
    cfg.disk_server.port = free_port()
    cfg.disk_server.bind_address = "127.0.0.1"
    config.save(cfg, home.config_path)
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
        sent_ok = _demo_send_and_commit(home, cfg)
        exam_ok = _demo_exam(service, home, root)
        return 0 if ok == len(statuses) == images and sent_ok and exam_ok else 1
    finally:
        service.stop()
        if keep:
            print(f"demo: home kept in {root}")
        else:
            shutil.rmtree(root, ignore_errors=True)
