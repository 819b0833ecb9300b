"""The service as a whole: the demo, TCP_NODELAY on both ends, log rotation."""

from __future__ import annotations

import logging
import re
import socket
import subprocess
import sys
from pathlib import Path

from pynetdicom import AE
from pynetdicom.sop_class import Verification

from modality_link import config
from modality_link.config import Node
from modality_link.home import Home
from modality_link.net.association import associate, make_ae
from modality_link.service import setup_logging
from tests.support.service import InProcessService


def test_demo_runs_end_to_end() -> None:
    proc = subprocess.run(
        [sys.executable, "-m", "modality_link", "demo", "--images", "5"],
        capture_output=True, text=True, timeout=300,
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "stored 5/5 CT images by C-STORE" in proc.stdout
    assert "5 instances" in proc.stdout
    # the patient's prior is loaded from the PACS into the memory server first (job 1)
    assert "retrieve job 1 to PACS done: 1 study(ies) retrieved to MODLINK_MEM" in proc.stdout
    assert re.search(r"memory server holds the prior study [0-9.]+ of .+: 5 instances", proc.stdout), proc.stdout
    # the exam end auto-sends to the simulated PACS (no explicit send) and commitment follows
    assert "COMPLETED with 5 images; auto-send to PACS queued as job(s) [2]" in proc.stdout
    assert re.search(r"PACS received study [0-9.]+: 5/5 instances, committed 5/5", proc.stdout), proc.stdout
    assert "commit job 3 to PACS done" in proc.stdout
    assert "RIS received MPPS [('create', 0), ('set', 0)]" in proc.stdout


def _nodelay(sock: socket.socket) -> int:
    return sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY)


def test_tcp_nodelay_on_acceptor_and_requestor_sockets(service_in_process: InProcessService) -> None:
    cfg = config.load(service_in_process.home.config_path)
    service = service_in_process.service
    ae = make_ae("TESTER", cfg.timeouts)
    ae.add_requested_context(Verification)
    node = Node(ae_title="MODLINK", host="127.0.0.1", port=cfg.disk_server.port)
    with associate(ae, node) as assoc:
        assert _nodelay(assoc.dul.socket.socket) == 1
        (server_side,) = service.disk_server.acceptor.association_sockets()
        assert _nodelay(server_side) == 1
        assert assoc.send_c_echo().Status == 0
    # A plain pynetdicom requestor (no handlers of ours) still gets NODELAY on our side.
    plain = AE(ae_title="PLAIN")
    plain.add_requested_context(Verification)
    a2 = plain.associate("127.0.0.1", cfg.disk_server.port, ae_title="MODLINK")
    (server_side,) = service.disk_server.acceptor.association_sockets()
    assert _nodelay(server_side) == 1
    a2.release()


def test_log_rotates(short_tmp: Path) -> None:
    home = Home(short_tmp)
    home.ensure()
    cfg = config.Config()
    cfg.logging.max_bytes = 4096
    cfg.logging.backups = 2
    setup_logging(home, cfg, to_stderr=False)
    log = logging.getLogger("modality_link.test")
    for i in range(200):
        log.warning("line %d of a long enough log message to fill the file quickly", i)
    files = sorted(p.name for p in home.log_dir.iterdir())
    assert files == ["modality-link.log", "modality-link.log.1", "modality-link.log.2"]
    assert all((home.log_dir / f).stat().st_size <= 4096 for f in files)
    setup_logging(home, cfg, to_stderr=False)  # idempotent: no duplicate handlers
    root_handlers = [h for h in logging.getLogger().handlers if getattr(h, "_modality_link", False)]
    assert len(root_handlers) == 1
    for h in root_handlers:
        logging.getLogger().removeHandler(h)
        h.close()
