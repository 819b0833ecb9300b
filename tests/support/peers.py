"""DICOM peers that are not ours, as processes on loopback: DCMTK storescp (Storage SCP),
Orthanc (Storage and Storage Commitment SCP), DCMTK dcmqrscp (Query/Retrieve SCP) and the
python3-odil MPPS SCP of ``odil_mpps_scp.py`` (run with Debian's /usr/bin/python3)."""

from __future__ import annotations

import io
import json
import subprocess
import urllib.request
from pathlib import Path

from pydicom import dcmread
from pydicom.dataset import Dataset

from modality_link import config
from modality_link.home import free_port
from tests.support.tools import dcmtk_env, require_tool
from tests.support.waiting import wait_port, wait_until

#: An MPPS SCP of python3-odil: ``/usr/bin/python3 ODIL_MPPS_SCP PORT OUTDIR``.
ODIL_MPPS_SCP = Path(__file__).with_name("odil_mpps_scp.py")


def start_storescp(out: Path, port: int, *options: str) -> subprocess.Popen:
    """DCMTK storescp (AE STORESCP, more `options` if given) writing into `out`; it listens on
    `port` when this returns. The caller terminates it."""
    proc = subprocess.Popen([require_tool("storescp"), "-od", str(out), "-aet", "STORESCP", *options, str(port)],
                            env=dcmtk_env(), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    wait_port(port)
    return proc


ORTHANC = "/usr/sbin/Orthanc"


class Orthanc:
    """Orthanc (AE ORTHANC) on free loopback ports in `work`: a Storage and Storage Commitment
    SCP that sends its reports on a separate association (PS3.4 J.3.3). Started by
    :func:`start_orthanc`; :meth:`allow` adds the AE its reports go to, through its REST API.
    `settings` are more of its configuration options (its DICOM TLS: ``DicomTlsEnabled``...)."""

    def __init__(self, work: Path, overwrite: bool = False, settings: dict | None = None) -> None:
        self.work = work
        self.dicom_port, self.http_port = free_port(), free_port()
        work.mkdir(parents=True, exist_ok=True)
        (work / "orthanc.json").write_text(json.dumps({
            "Name": "mltest", "StorageDirectory": str(work / "storage"), "IndexDirectory": str(work / "index"),
            "DicomAet": "ORTHANC", "DicomPort": self.dicom_port, "HttpPort": self.http_port,
            "RemoteAccessAllowed": False, "AuthenticationEnabled": False, "DicomCheckCalledAet": False,
            "DicomServerEnabled": True, "HttpServerEnabled": True, "Plugins": [],
            "OverwriteInstances": overwrite, "DicomModalities": {}, **(settings or {}),
        }))
        self.log = work / "orthanc.log"  # Orthanc's own account of what it refused, for a failing test
        with open(self.log, "wb") as log:
            self.proc = subprocess.Popen([require_tool(ORTHANC), str(work / "orthanc.json")], cwd=work,
                                         stdout=log, stderr=subprocess.STDOUT)
        wait_port(self.dicom_port, 30)
        wait_port(self.http_port, 30)

    def _rest(self, method: str, path: str, body: bytes | None = None) -> bytes:
        req = urllib.request.Request(f"http://127.0.0.1:{self.http_port}{path}", data=body, method=method)
        with urllib.request.urlopen(req, timeout=30) as rsp:
            return rsp.read()

    def allow(self, ae_title: str, port: int, name: str = "modlink", tls: bool = False) -> None:
        """Let Orthanc send Storage Commitment reports to `ae_title` on loopback `port` (in TLS)."""
        modality = {"AET": ae_title, "Host": "127.0.0.1", "Port": port} | ({"UseDicomTls": True} if tls else {})
        self._rest("PUT", f"/modalities/{name}", json.dumps(modality).encode())

    def instance(self, sop_instance_uid: str) -> Dataset:
        """The stored instance with that SOP Instance UID, read with pydicom."""
        found = json.loads(self._rest("POST", "/tools/lookup", sop_instance_uid.encode()))
        (oid,) = [f["ID"] for f in found if f["Type"] == "Instance"]
        return dcmread(io.BytesIO(self._rest("GET", f"/instances/{oid}/file")))

    def stop(self) -> None:
        self.proc.terminate()
        self.proc.wait()


def start_orthanc(work: Path, overwrite: bool = False, settings: dict | None = None) -> Orthanc:
    return Orthanc(work, overwrite, settings)


class Qrscp:
    """DCMTK dcmqrscp on a free port, its storage area in `root`, our AEs in its host table."""

    def __init__(self, root: Path, destinations: dict[str, int]) -> None:
        self.port = free_port()
        db = root / "db"
        db.mkdir(parents=True)
        hosts = "\n".join(f"dest{i} = ({aet}, 127.0.0.1, {port})" for i, (aet, port) in enumerate(destinations.items()))
        cfg = root / "dcmqrscp.cfg"
        cfg.write_text(f"""NetworkTCPPort = {self.port}
MaxPDUSize = 65536
MaxAssociations = 16
HostTable BEGIN
{hosts}
HostTable END
VendorTable BEGIN
VendorTable END
AETable BEGIN
QRSCP {db} RW (200, 1024mb) ANY
AETable END
""")
        self.proc = subprocess.Popen([require_tool("dcmqrscp"), "-c", str(cfg)],
                                     env=dcmtk_env(), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
        self._wait_ready()
        self.node = config.Node(ae_title="QRSCP", host="127.0.0.1", port=self.port, roles=["qr"])

    def _wait_ready(self) -> None:
        """Until a C-ECHO succeeds (deadline 10 s). dcmqrscp forks a process per association (in
        its --single-process mode the Debian build crashes after the first one)."""
        def echoes() -> bool:
            assert self.proc.poll() is None, self.proc.stderr.read() if self.proc.stderr else ""
            return subprocess.run([require_tool("echoscu"), "-aec", "QRSCP", "127.0.0.1", str(self.port)],
                                  env=dcmtk_env(), capture_output=True).returncode == 0

        wait_until(echoes, 10, "dcmqrscp to answer a C-ECHO", interval=0.1)

    def store(self, files: list[Path]) -> None:
        proc = subprocess.run([require_tool("storescu"), "-aec", "QRSCP", "127.0.0.1", str(self.port),
                               *map(str, files)], env=dcmtk_env(), capture_output=True, text=True, timeout=120)
        assert proc.returncode == 0, proc.stderr

    def stop(self) -> None:
        self.proc.terminate()
        self.proc.wait(10)
