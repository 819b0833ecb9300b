"""The scanner side of a C-STORE: sends files or datasets to a Storage SCP (PS3.4 Annex B).

Used by the demo and the tests to play a sender that is not the service itself.
"""

from __future__ import annotations

from pathlib import Path
from typing import Iterable, Sequence

from pydicom import Dataset, dcmread
from pynetdicom import AE, evt
# pynetdicom makes its SOP class names when it is imported: mypy cannot see them
from pynetdicom.sop_class import Verification  # type: ignore[attr-defined]


def _nodelay(event: evt.Event) -> None:
    import socket

    transport = event.assoc.dul.socket  # connected: EVT_CONN_OPEN comes after the connect
    assert transport is not None and transport.socket is not None
    transport.socket.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)


def send(
    items: Iterable[Path | Dataset],
    host: str,
    port: int,
    called_ae: str = "MODLINK",
    calling_ae: str = "SIM_SCANNER",
) -> list[int]:
    """C-STORE every item on one association; return the status of each."""
    datasets: Sequence[Dataset] = [i if isinstance(i, Dataset) else dcmread(i) for i in items]
    ae = AE(ae_title=calling_ae)
    pairs = sorted({(str(ds.SOPClassUID), str(ds.file_meta.TransferSyntaxUID)) for ds in datasets})
    for sop_class, ts in pairs:
        ae.add_requested_context(sop_class, ts)
    ae.add_requested_context(Verification)
    assoc = ae.associate(host, port, ae_title=called_ae, evt_handlers=[(evt.EVT_CONN_OPEN, _nodelay)])
    if not assoc.is_established:
        raise ConnectionError(f"association to {called_ae}@{host}:{port} was not established")
    statuses = []
    try:
        for ds in datasets:
            rsp = assoc.send_c_store(ds)
            statuses.append(int(rsp.Status) if "Status" in rsp else -1)
    finally:
        assoc.release()
    return statuses
