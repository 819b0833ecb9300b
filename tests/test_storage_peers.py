"""Storage SCU against real peers: DCMTK storescp (300 CT images, pixel data identical),
Storage Commitment against Orthanc (report on a separate association), and SIGKILL of the
service mid-send (the job resumes and completes after a restart)."""

from __future__ import annotations

import hashlib
import shutil
import signal
import tempfile
from pathlib import Path

import pytest
from pydicom import dcmread

from modality_link import config
from modality_link.home import free_port
from sim import images
from tests.support.instances import generated_study
from tests.support.peers import start_orthanc, start_storescp
from tests.support.service import InProcessService, ServiceProcess, call, cleanup, make_home, wait_chain
from tests.support.waiting import wait_until


@pytest.fixture(scope="module")
def ct300():
    with generated_study(modality="CT", images=300, rows=512, columns=512, seed=7) as d:
        yield d


def pixel_hashes(folder: Path) -> dict[str, str]:
    out = {}
    for f in folder.iterdir():
        if f.is_file():
            ds = dcmread(f)
            out[ds.SOPInstanceUID] = hashlib.sha256(ds.PixelData).hexdigest()
    return out


def test_300_ct_images_to_dcmtk_storescp(ct300):
    out = Path(tempfile.mkdtemp(prefix="mlout"))
    port = free_port()
    scp = start_storescp(out, port)
    home = make_home(ae_title="STORESCP", port=port, roles=["store"])
    service = InProcessService(home)
    try:
        call(home, "archive.import", paths=[str(ct300)])
        study = call(home, "studies.list")[0]["study_uid"]
        job = wait_chain(home, call(home, "send", study_uids=[study], node="PACS")["job_id"], 90)
        assert job["state"] == "done" and job["done"] == 300, job
        assert pixel_hashes(out) == pixel_hashes(ct300)
        assert call(home, "studies.list")[0]["nodes"]["PACS"]["sent"] == 300
    finally:
        service.stop()
        scp.terminate()
        scp.wait()
        cleanup(home)
        shutil.rmtree(out, ignore_errors=True)


def test_commitment_against_orthanc():
    work = Path(tempfile.mkdtemp(prefix="mlorth"))
    study_dir = work / "study"
    images.write_study(study_dir, modality="CT", images=5, rows=64, columns=64, seed=11)
    orthanc = start_orthanc(work / "orthanc")
    home = make_home(ae_title="ORTHANC", port=orthanc.dicom_port, commit_wait=0.5, commit_timeout=30.0)
    cfg = config.load(home.config_path)
    orthanc.allow(cfg.disk_server.ae_title, cfg.disk_server.port)
    service = InProcessService(home)
    try:
        call(home, "archive.import", paths=[str(study_dir)])
        study = call(home, "studies.list")[0]["study_uid"]
        job = wait_chain(home, call(home, "send", study_uids=[study], node="PACS", commit=True)["job_id"], 60)
        assert job["kind"] == "commit" and job["state"] == "done", job
        assert call(home, "studies.list")[0]["nodes"]["PACS"] == {"sent": 5, "committed": 5}
    finally:
        service.stop()
        orthanc.stop()
        cleanup(home)
        shutil.rmtree(work, ignore_errors=True)


def test_sigkill_mid_send_resumes(ct300):
    out = Path(tempfile.mkdtemp(prefix="mlout"))
    port = free_port()
    scp = start_storescp(out, port)
    home = make_home(ae_title="STORESCP", port=port, roles=["store"])
    proc = ServiceProcess(home).proc
    try:
        call(home, "archive.import", paths=[str(ct300)])
        study = call(home, "studies.list")[0]["study_uid"]
        job_id = call(home, "send", study_uids=[study], node="PACS")["job_id"]
        wait_until(lambda: call(home, "jobs.show", id=job_id)["done"] >= 60, 60, "60 images sent", interval=0.02)
        proc.send_signal(signal.SIGKILL)
        proc.wait()
        killed_at = len(list(out.iterdir()))
        assert killed_at < 300
        proc = ServiceProcess(home).proc
        job = wait_chain(home, job_id, 90)
        assert job["state"] == "done" and job["done"] == 300, job
        assert set(pixel_hashes(out)) == set(pixel_hashes(ct300))
    finally:
        proc.kill()
        proc.wait()
        scp.terminate()
        scp.wait()
        cleanup(home)
        shutil.rmtree(out, ignore_errors=True)
