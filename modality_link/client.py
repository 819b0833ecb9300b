"""The supported client library of the IPC protocol (docs/client.md, docs/ipc.md): typed,
blocking, the standard library only.

For the acquisition software: the acquisition sequence (worklist query, exam start, images,
series complete, exam end, send, follow the job chain) and the events with their replay after a
reconnection. It wraps :class:`modality_link.ipc.IpcClient`, the protocol's one implementation;
errors are :class:`~modality_link.ipc.IpcError` (``code``, ``message``, ``data``), a service that
does not run is :class:`~modality_link.ipc.NotRunning`.

    with Client.connect() as ml:            # $MODALITY_LINK_HOME, else ~/.local/share/modality-link
        item = ml.worklist()[0]
        exam = ml.start_exam(item=item["sps_id"])
        ml.add_images(exam.exam_id, ["/data/acq/1.dcm"])
        ended = ml.end_exam(exam.exam_id)
        for job_id in ended.jobs:
            ml.follow_job(job_id)
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterator

from modality_link.ipc import PROTOCOL_VERSION, IpcClient, IpcError, NotRunning

__all__ = ["Client", "Event", "Exam", "IpcError", "Job", "NotRunning", "PROTOCOL_VERSION", "default_socket"]


def default_socket(home: str | os.PathLike[str] | None = None) -> Path:
    """The service's socket: ``HOME/ipc.sock`` of `home`, else ``$MODALITY_LINK_HOME``, else
    ``~/.local/share/modality-link`` (docs/ipc.md "Transport")."""
    root = home or os.environ.get("MODALITY_LINK_HOME") or Path.home() / ".local/share/modality-link"
    return Path(root) / "ipc.sock"


@dataclass(frozen=True)
class Exam:
    """An exam as ``exam.start``, ``exam.show`` and ``exam.end`` give it; `raw` is the whole result."""

    exam_id: int
    state: str  # IN PROGRESS | COMPLETED | DISCONTINUED
    study_uid: str
    jobs: list[int] = field(default_factory=list)  # the send jobs exam.end queued
    raw: dict[str, Any] = field(default_factory=dict)

    @classmethod
    def of(cls, result: dict[str, Any]) -> "Exam":
        return cls(result["exam_id"], result["state"], result["study_uid"], list(result.get("jobs", [])), result)


@dataclass(frozen=True)
class Job:
    """A job as ``jobs.show`` gives it; `raw` is the whole result."""

    id: int
    kind: str  # send | commit | retrieve | burn
    state: str  # queued | running | done | failed | cancelled
    total: int
    done: int
    failed: int
    last_error: str
    children: list[int]
    raw: dict[str, Any]

    @classmethod
    def of(cls, result: dict[str, Any]) -> "Job":
        return cls(result["id"], result["kind"], result["state"], result["total"], result["done"], result["failed"],
                   result["last_error"], list(result.get("children", [])), result)

    @property
    def succeeded(self) -> bool:
        return self.state == "done"


@dataclass(frozen=True)
class Event:
    """One event: its type, its sequence number (None: not journaled) and its other fields."""

    type: str
    seq: int | None
    fields: dict[str, Any]


class Client:
    """One connection to the service; :meth:`connect` says hello (docs/ipc.md "Versions")."""

    def __init__(self, ipc: IpcClient) -> None:
        self.ipc = ipc
        #: The service's answer to ``hello``: protocol, service, version.
        self.server: dict[str, Any] = {}
        #: The result of the last :meth:`events` subscription: last_seq, replayed, complete.
        self.subscription: dict[str, Any] = {}

    @classmethod
    def connect(cls, socket: str | os.PathLike[str] | None = None, *, home: str | os.PathLike[str] | None = None,
                name: str = "modality_link.client", timeout: float | None = 600.0) -> "Client":
        """Connect to the service's socket (`socket`, else that of `home`, see
        :func:`default_socket`) and say hello; raises :class:`NotRunning`, or
        :class:`IpcError` -32011 when the service speaks another major version."""
        client = cls(IpcClient(Path(socket) if socket is not None else default_socket(home), timeout))
        try:
            client.server = client.ipc.call("hello", client=name, protocol=PROTOCOL_VERSION)
        except BaseException:
            client.close()
            raise
        return client

    def close(self) -> None:
        self.ipc.close()

    def __enter__(self) -> "Client":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def call(self, method: str, **params: Any) -> Any:
        """Any method of docs/ipc.md by name; parameters left None are not sent."""
        return self.ipc.call(method, **{k: v for k, v in params.items() if v is not None})

    # -- the acquisition sequence ---------------------------------------------------------------

    def status(self) -> dict[str, Any]:
        result: dict[str, Any] = self.call("status")
        return result

    def last_event_seq(self) -> int:
        """The sequence number of the service's last event: note it, and after a reconnection
        :meth:`events` ``since`` it replays what came after."""
        seq: int = self.status()["last_event_seq"]
        return seq

    def worklist(self, *, node: str | None = None, date: str | None = None, patient_id: str | None = None,
                 patient_name: str | None = None, accession: str | None = None,
                 modality: str | None = None) -> list[dict[str, Any]]:
        """C-FIND the Modality Worklist: its items (``sps_id`` is what :meth:`start_exam` takes)."""
        result = self.call("worklist.query", node=node, date=date, patient_id=patient_id, patient_name=patient_name,
                           accession=accession, modality=modality)
        items: list[dict[str, Any]] = result["items"]
        return items

    def start_exam(self, *, item: str | None = None, patient_id: str | None = None,
                   patient_name: str | None = None, birth_date: str | None = None, sex: str | None = None) -> Exam:
        """Start an exam of a worklist item (`item` = its SPS ID) or of a patient (unscheduled);
        the MPPS N-CREATE goes out in the background (``mpps.sent``/``mpps.failed``)."""
        return Exam.of(self.call("exam.start", item=item, patient_id=patient_id, patient_name=patient_name,
                                 birth_date=birth_date, sex=sex))

    def add_images(self, exam_id: int, paths: list[str | os.PathLike[str]]) -> list[str]:
        """Archive images of the exam, as one group (absolute paths, copied: docs/ipc.md
        ``exam.add_image``); their SOP Instance UIDs."""
        result = self.call("exam.add_image", exam_id=exam_id, paths=[os.path.abspath(p) for p in paths])
        added: list[str] = result["added"]
        return added

    def series_complete(self, exam_id: int, series_uid: str) -> list[int]:
        """The series has all its images: the send jobs its auto-send queued."""
        jobs: list[int] = self.call("exam.series_complete", exam_id=exam_id, series_uid=series_uid)["jobs"]
        return jobs

    def end_exam(self, exam_id: int, discontinue: str | None = None) -> Exam:
        """End the exam (MPPS N-SET; `discontinue` a CID 9300 code); ``jobs`` are the send jobs
        its auto-send queued."""
        return Exam.of(self.call("exam.end", exam_id=exam_id, discontinue=discontinue))

    def exam(self, exam_id: int) -> Exam:
        return Exam.of(self.call("exam.show", exam_id=exam_id))

    def send(self, study_uids: list[str], node: str, commit: bool = False) -> int:
        """Queue a send (and, with `commit`, its Storage Commitment): the job id."""
        job_id: int = self.call("send", study_uids=study_uids, node=node, commit=commit)["job_id"]
        return job_id

    def job(self, job_id: int) -> Job:
        return Job.of(self.call("jobs.show", id=job_id))

    def follow_job(self, job_id: int, on_update: Callable[[Job], None] | None = None,
                   timeout: float | None = None) -> Job:
        """Wait until the job chain is finished (docs/ipc.md "Job chains"):
        the last job of it, whose ``succeeded`` says how it went. Uses its own connection (the
        events it waits on would otherwise interleave with this one's replies)."""
        with IpcClient(self.ipc.path) as ipc:
            last = ipc.follow_job(job_id, None if on_update is None else (lambda j: on_update(Job.of(j))), timeout)
        return Job.of(last)

    # -- events ---------------------------------------------------------------------------------

    def events(self, since: int | None = None, timeout: float | None = None) -> Iterator[Event]:
        """The events on a connection of their own: first those after `since` that the service
        kept (remember the last ``seq`` you handled and pass it after a reconnection), then the
        live ones. With `timeout`, the iteration ends after that many seconds without an event.
        The subscription's result (``complete``: nothing was lost) is in :attr:`subscription`."""
        ipc = IpcClient(self.ipc.path, timeout=None)
        try:
            self.subscription = ipc.call("events.subscribe", **({} if since is None else {"since": since}))
            while True:
                params = ipc.next_event(3600.0 if timeout is None else timeout)
                if params is None:
                    if timeout is not None:
                        return
                    continue
                kind, seq = params.pop("type"), params.pop("seq", None)
                yield Event(kind, seq, params)
        finally:
            ipc.close()
