"""Conversions end to end, against real peers: every case of tests/support/transcode (one line
of VARIANTS per conversion path, made by DCMTK dcmconv/dcmcjpeg/dcmcjpls/dcmcrle from pydicom's
CT_small.dcm and MR_small.dcm and a simulated CT) is

* imported, then sent by the service's Storage SCU to DCMTK storescp (uncompressed only), once
  per node transfer-syntax list (ELE+ILE, ILE, EBE, Deflated): the RECEIVED SOP Instance UID is
  the source's, the pixel data are equal after a lossless conversion, and a lossy source arrives
  decompressed with (0028,2110) "01" and a job warning that says so;
* sent by DCMTK storescu (in its own syntax, and deflated with -xd) to the disk server, and
  imported: stored as received, and the stored file re-reads with the same data set;
* burned (STD-GEN-CD, Explicit VR Little Endian only): same UIDs and pixels, and a lossy source
  fails the burn with a message naming the instance.
"""

from __future__ import annotations

import shutil
import subprocess
import tempfile
from pathlib import Path

import numpy as np
import pytest
from pydicom import dcmread
from pydicom.uid import (UID, JPEG2000, DeflatedExplicitVRLittleEndian, ExplicitVRBigEndian, ExplicitVRLittleEndian,
                         ImplicitVRLittleEndian, JPEG2000Lossless, JPEGBaseline8Bit, JPEGExtended12Bit,
                         JPEGLosslessSV1, JPEGLSLossless, JPEGLSNearLossless, RLELossless)

from modality_link import config
from modality_link.config import Timeouts
from modality_link.home import free_port, temporary_home
from modality_link.media import MediaError, MediaOptions, build_disc, build_media, plan_discs
from modality_link.net import storage, upper_layer
from tests.support.peers import start_storescp
from tests.support.service import InProcessService, call, cleanup, wait_chain
from tests.support.tools import dcmtk_env, require_tool
from tests.support.transcode import DECODABLE, PIXEL_MODULE, Case, Cases, differences, make_cases

#: Node transfer-syntax lists -> the syntax storescp receives when the stored one is not in the
#: list (the first of it) and the storescp options that make it accept that.
NODES = {
    "ELEILE": ([ExplicitVRLittleEndian, ImplicitVRLittleEndian], ExplicitVRLittleEndian, ()),
    "ILE": ([ImplicitVRLittleEndian], ImplicitVRLittleEndian, ()),
    "EBE": ([ExplicitVRBigEndian], ExplicitVRBigEndian, ()),
    "DEFL": ([DeflatedExplicitVRLittleEndian], DeflatedExplicitVRLittleEndian, ("+xd",)),
}


@pytest.fixture(scope="module")
def cases(tmp_path_factory) -> Cases:
    for tool in ("dcmconv", "dcmcjpeg", "dcmcjpls", "dcmcrle", "storescp", "storescu"):
        require_tool(tool)
    return make_cases(tmp_path_factory.mktemp("cases"), DECODABLE)


@pytest.fixture(scope="module")
def sent(cases: Cases):
    """Every case imported into one service and sent to four storescp, one per node."""
    work = Path(tempfile.mkdtemp(prefix="mltc"))
    peers, nodes = {}, {}
    for name, (syntaxes, _, options) in NODES.items():
        port = free_port()
        out = work / name
        out.mkdir()
        peers[name] = (start_storescp(out, port, *options), out)
        nodes[name] = config.Node(ae_title="STORESCP", host="127.0.0.1", port=port, roles=["store"],
                                  transfer_syntaxes=list(syntaxes), retries=0, retry_interval=0.2)
    home = temporary_home(work / "home", nodes=nodes)
    service = InProcessService(home)
    try:
        imported = call(home, "archive.import", paths=[str(c.path) for c in cases.all])
        assert not imported.get("failed"), imported
        studies = [s["study_uid"] for s in call(home, "studies.list")]
        jobs = {}
        for name in NODES:
            job_id = call(home, "send", study_uids=studies, node=name)["job_id"]
            wait_chain(home, job_id, 120)
            jobs[name] = call(home, "jobs.show", id=job_id)
        received = {name: {dcmread(f).SOPInstanceUID: f for f in out.iterdir()} for name, (_, out) in peers.items()}
        yield {"jobs": jobs, "received": received, "log": (home.log_dir / "modality-link.log").read_text()}
    finally:
        service.stop()
        for proc, _ in peers.values():
            proc.terminate()
            proc.wait()
        cleanup(home)
        shutil.rmtree(work, ignore_errors=True)


def check_received(case: Case, got_path: Path, expected_ts: str) -> None:
    got, source, plain = dcmread(got_path), dcmread(case.path), dcmread(case.plain)
    assert got.file_meta.TransferSyntaxUID == expected_ts, case.name
    assert got.SOPInstanceUID == source.SOPInstanceUID == case.uid
    decompressed = UID(source.file_meta.TransferSyntaxUID).is_compressed
    assert differences(source, got, PIXEL_MODULE if decompressed else set()) == [], case.name
    if case.lossy:
        assert got.LossyImageCompression == "01", case.name
        return
    assert np.array_equal(got.pixel_array, plain.pixel_array), case.name
    if UID(expected_ts).is_little_endian:
        assert got.PixelData == plain.PixelData, case.name


@pytest.mark.interop
@pytest.mark.parametrize("node", list(NODES))
@pytest.mark.parametrize("variant", [v.name for v in DECODABLE])
def test_sent_to_storescp_keeps_identity(cases: Cases, sent, node: str, variant: str):
    job = sent["jobs"][node]
    assert job["state"] == "done" and job["done"] == job["total"] == len(cases.all), job
    for case in cases.of(variant):
        received = sent["received"][node]
        assert case.uid in received, f"{case.name}: no instance with its SOP Instance UID reached {node}"
        stored = dcmread(case.path, stop_before_pixels=True).file_meta.TransferSyntaxUID
        syntaxes, first, _ = NODES[node]
        check_received(case, received[case.uid], stored if stored in syntaxes else first)
        warning = [w for w in job["warning_items"] if w["item"] == case.uid]
        if case.lossy:
            assert warning and "lossy" in warning[0]["detail"] and "0028,2110" in warning[0]["detail"], job
        else:
            assert not warning


#: storescu's option to propose a compressed syntax (it proposes the uncompressed ones anyway).
STORESCU_PROPOSE = {RLELossless: "-xr", JPEGLosslessSV1: "-xs", JPEGBaseline8Bit: "-xy", JPEGExtended12Bit: "-xx",
                    JPEGLSLossless: "-xt", JPEGLSNearLossless: "-xu", JPEG2000Lossless: "-xv", JPEG2000: "-xw"}


def send_with_storescu(files: list[Path], port: int, ae: str, deflate: bool) -> list[Path]:
    """Send each file in its own syntax (or, `deflate`, an uncompressed one deflated) with DCMTK
    storescu; return the files storescu has no option for (JPEG Process 14 without SV1)."""
    storescu = require_tool("storescu")
    left = []
    for f in files:
        ts = dcmread(f, stop_before_pixels=True).file_meta.TransferSyntaxUID
        if ts.is_compressed and ts not in STORESCU_PROPOSE:
            left.append(f)
            continue
        option = ["-xd"] if (deflate and not ts.is_compressed) or ts.is_deflated else [STORESCU_PROPOSE.get(ts, "-x=")]
        if ts == ExplicitVRBigEndian and not deflate:
            option = ["-xb"]
        proc = subprocess.run([storescu, *option, "-aec", ae, "127.0.0.1", str(port), str(f)],
                              env=dcmtk_env(), capture_output=True, text=True, timeout=60)
        assert proc.returncode == 0 and "Failed" not in proc.stderr, (f.name, proc.stdout + proc.stderr)
    return left


def send_with_our_scu(files: list[Path], port: int, ae: str) -> None:
    """Send each file in its own syntax with our Storage SCU (the one syntax proposed)."""
    for f in files:
        ds = dcmread(f, stop_before_pixels=True)
        ts = ds.file_meta.TransferSyntaxUID
        assoc = upper_layer.Requestor("127.0.0.1", port, "TESTSCU", ae, storage.build_contexts([ds.SOPClassUID], [ts]),
                                      Timeouts(), 262144).open()
        outcomes = []
        storage.store_instances(assoc, [storage.Instance(ds.SOPInstanceUID, ds.SOPClassUID, ts, f)],
                                lambda _, o: outcomes.append(o) or True)
        assoc.release()
        assert outcomes[0].state == "done", (f.name, outcomes)


@pytest.mark.interop
@pytest.mark.parametrize("mode", ["storescu", "storescu -xd", "import"])
def test_disk_server_and_import_store_every_syntax(cases: Cases, service_in_process: InProcessService, mode: str):
    """DCMTK storescu sends each case in its own syntax (-xd: an uncompressed one deflated, the
    rest as they are); `import` takes the same files. Each stored file re-reads with the data set
    that was sent, under the same SOP Instance UID."""
    home = service_in_process.home
    files = [c.path for c in cases.all]
    if mode == "import":
        result = call(home, "archive.import", paths=[str(f) for f in files])
        assert not result.get("failed"), result
    else:
        cfg = config.load(home.config_path)
        left = send_with_storescu(files, cfg.disk_server.port, cfg.disk_server.ae_title, mode.endswith("-xd"))
        send_with_our_scu(left, cfg.disk_server.port, cfg.disk_server.ae_title)
    stored = {dcmread(f).SOPInstanceUID: f for f in home.archive_dir.rglob("*.dcm")}
    for case in cases.all:
        assert case.uid in stored, (mode, case.name)
        got, source = dcmread(stored[case.uid]), dcmread(case.path)
        src_ts = UID(source.file_meta.TransferSyntaxUID)
        got_ts = UID(got.file_meta.TransferSyntaxUID)
        if mode == "storescu -xd" and not src_ts.is_compressed:
            assert got_ts == DeflatedExplicitVRLittleEndian, case.name
        else:
            assert got_ts == src_ts, (mode, case.name)
        assert differences(source, got) == [], (mode, case.name)
        if got_ts.is_little_endian == src_ts.is_little_endian:
            assert got.PixelData == source.PixelData, (mode, case.name)
        if not case.lossy:
            assert np.array_equal(got.pixel_array, dcmread(case.plain).pixel_array), (mode, case.name)


def test_burn_converts_to_explicit_little_endian_keeping_identity(cases: Cases, tmp_path: Path):
    lossless = [c for c in cases.all if not c.lossy]
    options = MediaOptions(fileset_id="TRANSCODE", profile="STD-GEN-CD")
    found = {}
    for plan in plan_discs([c.path for c in lossless], options):
        result = build_disc(plan, tmp_path / f"disc{plan.index}", None, options)  # the file-set, no image
        for f in result.staging.rglob("IM*"):
            ds = dcmread(f)
            found[ds.SOPInstanceUID] = ds
    for case in lossless:
        got = found[case.uid]
        source = dcmread(case.path)
        assert got.file_meta.TransferSyntaxUID == ExplicitVRLittleEndian, case.name
        assert got.file_meta.MediaStorageSOPInstanceUID == case.uid
        decompressed = UID(source.file_meta.TransferSyntaxUID).is_compressed
        assert differences(source, got, PIXEL_MODULE if decompressed else set()) == [], case.name
        assert got.PixelData == dcmread(case.plain).PixelData, case.name


@pytest.mark.parametrize("variant", [v.name for v in DECODABLE if v.lossy])
def test_burn_of_a_lossy_source_fails_naming_it(cases: Cases, variant: str, tmp_path: Path):
    made = cases.of(variant)
    if not made:
        pytest.skip(f"no source could be made as {variant}")
    case = made[0]
    plain = [c.path for c in cases.of("ele")]
    with pytest.raises(MediaError) as err:
        build_media([*plain, case.path], tmp_path / "out", MediaOptions(fileset_id="LOSSY", profile="STD-GEN-CD"))
    message = str(err.value)
    assert case.uid in message and "lossy" in message and "STD-GEN-CD" in message, message
