"""Every IPC method's real result, and every event seen meanwhile, held against the OpenRPC
document (docs/ipc.openrpc.json, made by :mod:`modality_link.ipc_schema`) with the
`jsonschema` validator: a field the document does not describe (its objects say
``additionalProperties: false``), a described field missing, or a wrong type or enumeration
value fails the test. The service runs in this process with the simulated PACS (store,
Storage Commitment, Query/Retrieve) and RIS (worklist, MPPS) of sim/ and a DCMTK storescp as
peers; the burn writes an ISO 9660 image (docs/ipc.md "Methods")."""

from __future__ import annotations

import json
import threading
from pathlib import Path
from typing import Any, Iterator

import jsonschema  # type: ignore[import-untyped]  # no stubs installed
import pytest
from pydicom import dcmread

from modality_link import config, ipc, ipc_schema
from modality_link.home import free_port, temporary_home
from modality_link.ipc import IpcClient
from sim.pacs import Pacs
from sim.ris import RIS
from tests.support.instances import spool_images
from tests.support.peers import start_storescp
from tests.support.service import InProcessService, cleanup, wait_chain
from tests.support.waiting import wait_until

DOC = ipc_schema.document()
RESULTS = {m["name"]: m["result"]["schema"] for m in DOC["methods"]}


def _validator(schema: dict[str, Any]) -> jsonschema.Draft202012Validator:
    """`schema` with the document's components beside it, so that its ``$ref`` resolve."""
    return jsonschema.Draft202012Validator(schema | {"components": DOC["components"]})


def check_result(method: str, result: Any) -> None:
    errors = [f"{'/'.join(map(str, e.absolute_path))}: {e.message}"
              for e in _validator(RESULTS[method]).iter_errors(result)]
    assert not errors, f"{method}: {errors}"


def check_event(event: dict[str, Any]) -> None:
    schema = DOC["x-events"].get(event.get("type"))
    assert schema is not None, f"an event the document does not describe: {event}"
    errors = [f"{'/'.join(map(str, e.absolute_path))}: {e.message}" for e in _validator(schema).iter_errors(event)]
    assert not errors, f"{event['type']}: {errors}"


class Events:
    """Every event of a subscribed connection, read on a thread until :meth:`close`."""

    def __init__(self, socket_path: Path) -> None:
        self.seen: list[dict[str, Any]] = []
        self._stop = threading.Event()
        self._client = IpcClient(socket_path)
        self._client.call("events.subscribe")
        self._thread = threading.Thread(target=self._read, daemon=True)
        self._thread.start()

    def _read(self) -> None:
        while not self._stop.is_set():
            event = self._client.next_event(0.2)
            if event is not None:
                self.seen.append(event)

    def close(self) -> None:
        self._stop.set()
        self._thread.join(10)
        self._client.close()


@pytest.fixture
def console(short_tmp: Path) -> Iterator[tuple[InProcessService, Pacs, RIS]]:
    """A service whose nodes are the simulated PACS and RIS, a DCMTK storescp and a node nobody
    listens on (its sends fail at once)."""
    store_port = free_port()
    (short_tmp / "scp").mkdir()
    storescp = start_storescp(short_tmp / "scp", store_port)
    ris = RIS(delay=0.0).start()
    pacs = Pacs(commit_mode="same").start()
    home = temporary_home(short_tmp / "h", nodes={
        "RIS": config.Node(ae_title="RIS", port=ris.port, roles=["worklist", "mpps"], worklist_date="",
                           worklist_modality="*", worklist_station_aet="*"),
        "PACS": config.Node(ae_title="SIMPACS", port=pacs.port, roles=["store", "commit", "qr"], retry_interval=0.2,
                            commit_wait=5.0, commit_timeout=10.0),
        "STORESCP": config.Node(ae_title="STORESCP", port=store_port, roles=["store"]),
        "DEAD": config.Node(ae_title="DEAD", port=free_port(), roles=["store"], retries=0),
        "LATER": config.Node(ae_title="LATER", port=free_port(), roles=["store"], retries=5,
                             retry_interval=3600.0),
    })
    cfg = config.load(home.config_path)
    pacs.move_destinations[cfg.memory_server.ae_title] = ("127.0.0.1", cfg.memory_server.port)
    svc = InProcessService(home)
    try:
        yield svc, pacs, ris
    finally:
        svc.stop()
        pacs.stop()
        ris.stop()
        storescp.terminate()
        storescp.wait(10)
        cleanup(home)


def test_every_result_and_event_keeps_the_schema(console: tuple[InProcessService, Pacs, RIS], tmp_path: Path) -> None:
    svc, pacs, ris = console
    events = Events(svc.home.socket_path)
    called: dict[str, Any] = {}

    def call(method: str, **params: Any) -> Any:
        result = svc.call(method, **params)
        called.setdefault(method, result)
        check_result(method, result)
        return result

    try:
        call("hello", protocol=ipc.PROTOCOL_VERSION, client="test")
        call("status")
        call("selftest")
        call("nodes.list")
        call("nodes.echo", name="PACS")
        call("nodes.echo", name="DEAD")
        call("nodes.echo", name="RIS", services=True)
        call("config.get")
        call("config.get", key="station.ae_title")
        call("config.set", key="timeouts.connect", value=5)
        call("config.reload")
        call("drives.list")

        # the acquisition sequence, with the RIS's worklist and MPPS
        items = call("worklist.query", node="RIS")
        ex = call("exam.start", patient_id="R1", patient_name="Results^Rita")
        paths = spool_images(tmp_path / "spool", 2)
        call("exam.add_image", exam_id=ex["exam_id"], paths=paths)
        series = call("exam.show", exam_id=ex["exam_id"])["series"][0]["series_uid"]
        call("exam.series_complete", exam_id=ex["exam_id"], series_uid=series)
        call("exam.end", exam_id=ex["exam_id"])
        call("exam.list")
        wait_until(lambda: all(m["state"] == "sent" for m in svc.call("exam.show", exam_id=ex["exam_id"])["mpps"]),
                   30, "the MPPS messages to be sent")
        assert items["items"] is not None

        # the archive
        imported = call("archive.import", paths=[str(p) for p in spool_images(tmp_path / "import", 1, seed=7)])
        assert imported["imported"] == 1
        studies = call("studies.list")
        study = studies[0]["study_uid"]
        call("studies.protect", study_uid=study)
        call("studies.unprotect", study_uid=study)
        call("cleanup", dry_run=True)

        # jobs: a send with its commitment, one that fails, one that waits and is cancelled
        sent = call("send", study_uids=[study], node="PACS", commit=True)
        wait_chain(svc.home, sent["job_id"])
        call("jobs.show", id=sent["job_id"])
        failed = svc.call("send", study_uids=[study], node="DEAD")["job_id"]
        wait_until(lambda: svc.call("jobs.show", id=failed)["state"] == "failed", 60, "the send to DEAD to fail")
        call("jobs.show", id=failed)
        call("jobs.retry", id=failed)
        waiting = svc.call("send", study_uids=[study], node="LATER")["job_id"]
        wait_until(lambda: svc.call("jobs.show", id=waiting)["attempts"] >= 1, 60, "the send to LATER to wait")
        call("jobs.cancel", id=waiting)
        call("send", study_uids=[study], node="STORESCP")
        call("jobs.list")

        # alerts: the failed send raised job-failed
        wait_until(lambda: svc.call("alerts.list"), 30, "an alert")
        alerts = call("alerts.list")
        call("alerts.ack", id=alerts[0]["id"])
        call("alerts.list", include_cleared=True)
        call("alerts.clear")

        # query and retrieve into the memory server
        prior = spool_images(tmp_path / "prior", 1, seed=9)
        pacs.preload(prior)
        matches = call("query", node="PACS", keys={"PatientID": ""})
        prior_uid = dcmread(prior[0], stop_before_pixels=True).StudyInstanceUID
        assert prior_uid in json.dumps(matches)
        job = call("retrieve", node="PACS", study_uid=prior_uid, to="memory")["job_id"]
        wait_chain(svc.home, job)
        memory = call("memory.list")
        call("memory.fetch", sop_instance_uid=memory["studies"][0]["series"][0]["sop_instance_uids"][0])
        call("memory.clear")

        # a burn to an ISO 9660 image
        burned = call("burn", study_uids=[study], iso=str(tmp_path / "out.iso"), wait=True)
        call("burn.status", id=burned["id"])
        call("burn.list")

        call("status")
        wait_until(lambda: any(e["type"] == "burn.done" for e in events.seen), 30, "the burn.done event")
    finally:
        events.close()
        (tmp_path / "seen.json").write_text(json.dumps({"results": called, "events": events.seen}, indent=1,
                                                       default=str))
        Path("/tmp/results_seen.json").write_text((tmp_path / "seen.json").read_text())
    for event in events.seen:
        check_event(event)
    missing = set(RESULTS) - set(called) - {"events.subscribe", "burn.disc_inserted", "burn.cancel"}
    assert not missing, f"methods not called: {missing}"
