"""Query/Retrieve SCP benchmark: C-FIND at study level against our disk server and Orthanc (and
DCMTK dcmqrscp up to the 500 studies it keeps), all holding the same studies of one small image
each (10 000 by default), each query timed with DCMTK findscu (its start included, the same for
all).

Queries: a patient-name wildcard (about one study in twenty), a study-date range (about one in
ten) and a universal query returning every study; the runs alternate ours / the others and the
ratio ours / theirs is taken run by run, its median printed. Also the time to the first pending
response of the universal query. Targets: every ratio <= 1.0, the first
response within 100 ms (docs/design.md "Query/Retrieve SCP").
Usage: python bench/qr.py [--studies 10000] [--runs 3]   (--studies 500: with dcmqrscp)
"""

from __future__ import annotations

import argparse
import json
import shutil
import statistics
import struct
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from pydicom import dcmread  # noqa: E402
from pydicom.uid import UID  # noqa: E402

from bench.receive import ENV, serving, wait_port  # noqa: E402
from modality_link.home import free_port  # noqa: E402
from modality_link.ipc import IpcClient  # noqa: E402

FINDSCU, STORESCU, ORTHANC = "/usr/bin/findscu", "/usr/bin/storescu", "/usr/sbin/Orthanc"
DCMQRSCP = "/usr/bin/dcmqrscp"
STUDY_ROOT_FIND = "1.2.840.10008.5.1.4.1.2.2.1"
SURNAMES = ["SMITH", "JONES", "TAYLOR", "BROWN", "WILSON", "DAVIES", "EVANS", "THOMAS", "JOHNSON", "ROBERTS",
            "WALKER", "WRIGHT", "ROBINSON", "THOMPSON", "WHITE", "HUGHES", "EDWARDS", "GREEN", "HALL", "WOOD"]
QUERIES = {
    "name wildcard": ["PatientName=SMITH*"],
    "date range": ["StudyDate=20200101-20201231"],
    "universal": [],
}


def make_studies(out: Path, count: int) -> None:
    """`count` studies of one 8x8 CT image, patients named after SURNAMES, dates over ten years."""
    from sim import images

    (template,) = images.write_study(out / "template", modality="CT", images=1, rows=8, columns=8, seed=1)
    ds = dcmread(template)
    root = "1.2.826.0.1.3680043.10.543.9"
    for i in range(count):
        ds.PatientName = f"{SURNAMES[i % len(SURNAMES)]}^PATIENT{i}"
        ds.PatientID = f"ID{i}"
        ds.StudyInstanceUID = f"{root}.{i}"
        ds.SeriesInstanceUID = f"{root}.{i}.1"
        ds.SOPInstanceUID = ds.file_meta.MediaStorageSOPInstanceUID = UID(f"{root}.{i}.1.1")
        ds.StudyDate = f"{2015 + i % 10}{1 + i % 12:02d}{1 + i % 28:02d}"
        ds.AccessionNumber = f"A{i}"
        ds.save_as(out / f"{i}.dcm", enforce_file_format=True)
    shutil.rmtree(out / "template")


def store(folder: Path, port: int, called: str) -> None:
    subprocess.run([STORESCU, "-aec", called, "+sd", "+r", "127.0.0.1", str(port), str(folder)], env=ENV,
                   check=True, capture_output=True)


def findscu(port: int, called: str, keys: list[str]) -> tuple[float, int]:
    """(seconds, number of matches) of one findscu run."""
    args = [FINDSCU, "-v", "-S", "-aec", called, "-k", "QueryRetrieveLevel=STUDY", "-k", "StudyInstanceUID",
            "-k", "PatientName", "-k", "StudyDate", "-k", "PatientID", "-k", "AccessionNumber"]
    for key in keys:
        args += ["-k", key]
    t0 = time.perf_counter()
    proc = subprocess.run([*args, "127.0.0.1", str(port)], env=ENV, capture_output=True, text=True, errors="replace")
    seconds = time.perf_counter() - t0
    if proc.returncode != 0:
        raise RuntimeError(proc.stderr[-500:])
    return seconds, (proc.stdout + proc.stderr).count("Find Response: ")


def first_response(port: int, called: str) -> float:
    """Seconds from the C-FIND-RQ of the universal study query to its first pending response,
    measured with our own lean requestor (net/upper_layer.py: no SCU-side machinery to wait for)."""
    from pydicom.dataset import Dataset
    from pydicom.filebase import DicomBytesIO
    from pydicom.filewriter import write_dataset

    from modality_link.config import Timeouts
    from modality_link.net.command import encode_command, parse_command
    from modality_link.net.upper_layer import Requestor

    query = Dataset()
    query.QueryRetrieveLevel = "STUDY"
    query.StudyInstanceUID = ""
    query.PatientName = ""
    fp = DicomBytesIO()
    fp.is_little_endian, fp.is_implicit_VR = True, False
    write_dataset(fp, query)
    assoc = Requestor("127.0.0.1", port, "BENCH", called, [(STUDY_ROOT_FIND, ["1.2.840.10008.1.2.1"])],
                      Timeouts(), 0).open()
    uid = STUDY_ROOT_FIND.encode() + (b"\0" if len(STUDY_ROOT_FIND) % 2 else b"")
    command = encode_command({0x0002: uid, 0x0100: struct.pack("<H", 0x0020), 0x0110: struct.pack("<H", 1),
                              0x0700: struct.pack("<H", 0), 0x0800: struct.pack("<H", 0)})
    try:
        t0 = time.perf_counter()
        assoc.send_message(1, command, fp.getvalue())
        status = struct.unpack("<H", parse_command(assoc.receive_command(60))[0x0900])[0]
        seconds = time.perf_counter() - t0
        while status in (0xFF00, 0xFF01):
            status = struct.unpack("<H", parse_command(assoc.receive_command(60))[0x0900])[0]
    finally:
        assoc.release()
    return seconds


class Orthanc:
    def __init__(self, work: Path) -> None:
        self.port, http = free_port(), free_port()
        work.mkdir(parents=True)
        (work / "orthanc.json").write_text(json.dumps({
            "Name": "mlbench", "StorageDirectory": str(work / "storage"), "IndexDirectory": str(work / "index"),
            "DicomAet": "ORTHANC", "DicomPort": self.port, "HttpPort": http, "RemoteAccessAllowed": False,
            "AuthenticationEnabled": False, "DicomCheckCalledAet": False, "DicomAlwaysAllowFind": True,
            "DicomAlwaysAllowStore": True, "LimitFindResults": 0, "LimitFindInstances": 0, "Plugins": [],
        }))
        self.proc = subprocess.Popen([ORTHANC, str(work / "orthanc.json")], cwd=work,
                                     stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        wait_port(self.port)

    def stop(self) -> None:
        self.proc.terminate()
        self.proc.wait()


class DcmQrScp:
    """DCMTK dcmqrscp (AE QRSCP), its storage area in `work`: it keeps at most 500 studies per
    area, so it takes part only up to that many."""

    def __init__(self, work: Path) -> None:
        self.port = free_port()
        (work / "db").mkdir(parents=True)
        (work / "dcmqrscp.cfg").write_text(f"""NetworkTCPPort = {self.port}
MaxPDUSize = 65536
MaxAssociations = 16
HostTable BEGIN
HostTable END
VendorTable BEGIN
VendorTable END
AETable BEGIN
QRSCP {work / "db"} RW (500, 1024mb) ANY
AETable END
""")
        self.proc = subprocess.Popen([DCMQRSCP, "-c", str(work / "dcmqrscp.cfg")], env=ENV,
                                     stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        wait_port(self.port)

    def stop(self) -> None:
        self.proc.terminate()
        self.proc.wait()


def compare(name: str, keys: list[str], peers: dict[str, tuple[int, str]], port: int, runs: int) -> None:
    """Time the query against each peer and ours, alternately; print the medians and ratios."""
    times: dict[str, list[float]] = {peer: [] for peer in peers}
    mine: list[float] = []
    ratios: dict[str, list[float]] = {peer: [] for peer in peers}
    count = 0
    for _ in range(runs):
        o, count = findscu(port, "MODLINK", keys)
        mine.append(o)
        for peer, (peer_port, aet) in peers.items():
            t, t_count = findscu(peer_port, aet, keys)
            assert t_count == count, (name, peer, t_count, count)
            times[peer].append(t)
            ratios[peer].append(o / t)
    against = ", ".join(f"{peer} {statistics.median(times[peer]):.3f} s (ratio {statistics.median(ratios[peer]):.2f})"
                        for peer in peers)
    print(f"{name} ({count} matches): ours {statistics.median(mine):.3f} s; {against} (target <= 1.0)")


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--studies", type=int, default=10000)
    ap.add_argument("--runs", type=int, default=3)
    args = ap.parse_args()
    work = Path(tempfile.mkdtemp(prefix="mlbench"))
    try:
        make_studies(work / "studies", args.studies)
        orthanc = Orthanc(work / "orthanc")
        qrscp = DcmQrScp(work / "dcmqrscp") if args.studies <= 500 else None
        port = free_port()
        with serving(port) as (home, _proc):
            try:
                peers = {"Orthanc": (orthanc.port, "ORTHANC")}
                if qrscp is not None:
                    peers["dcmqrscp"] = (qrscp.port, "QRSCP")
                for name, (peer_port, aet) in [("ours", (port, "MODLINK")), *peers.items()]:
                    t0 = time.perf_counter()
                    store(work / "studies", peer_port, aet)
                    print(f"{args.studies} studies stored into {name}: {time.perf_counter() - t0:.1f} s")
                with IpcClient(home / "ipc.sock") as client:
                    held = client.call("status")["archive"]["instances"]
                assert held == args.studies, held
                for name, keys in QUERIES.items():
                    compare(name, keys, peers, port, args.runs)
                for name, (peer_port, aet) in [("ours", (port, "MODLINK")), *peers.items()]:
                    firsts = [first_response(peer_port, aet) for _ in range(args.runs)]
                    print(f"universal query, first response: {name} {statistics.median(firsts) * 1000:.0f} ms"
                          + (" (target <= 100 ms)" if name == "ours" else ""))
            finally:
                orthanc.stop()
                if qrscp is not None:
                    qrscp.stop()
    finally:
        shutil.rmtree(work, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
