"""Why a request to the service cannot be done, in the domain's own words.

Domain modules (exam, jobs, burns, archive...) raise these; they know nothing of the IPC
protocol. `modality_link.api` maps each class to its IPC error code (docs/ipc.md "Errors") and
puts the DICOM status, where one applies, into the error's data.
"""

from __future__ import annotations


class RequestError(Exception):
    """A request that cannot be done; the message is a sentence for the user.

    `status` is the DICOM status behind it when a peer or the archive gave one (PS3.7 Annex C),
    else None; `param` the request's parameter at fault, where there is one; `details` more
    facts a program may act on (e.g. the exam that holds a SOP Instance UID already)."""

    def __init__(self, message: str, status: int | None = None, param: str | None = None,
                 details: dict[str, object] | None = None) -> None:
        super().__init__(message)
        self.status = status
        self.param = param
        self.details = details or {}


class NotFound(RequestError):
    """What the request names does not exist: an exam, a job, a study, a node, a file."""


class UnknownNode(NotFound):
    """The request names a node that is not configured; `node` is the name asked for (the
    command line exits 2 for it, as for any invalid usage: docs/cli.md "Exit codes")."""

    def __init__(self, message: str, node: str) -> None:
        super().__init__(message, details={"node": node})
        self.node = node


def missing_role(node: str, role: str, roles: list[str], what: str = "") -> str:
    """The sentence for a node without the role a request needs, with the command that adds it."""
    wanted = ",".join([*roles, role])
    return (f"nodes.{node}: this node has no '{role}' role{f' ({what})' if what else ''}; add it with: "
            f"modality-link node edit {node} --roles {wanted}")


class Conflict(RequestError):
    """The request does not fit the current state (an exam that has ended, a job still running)."""


class Invalid(RequestError):
    """The request itself is wrong: a missing or malformed parameter, a node without the role."""


class DicomFailure(RequestError):
    """A DICOM peer could not be reached or refused the request; the message says which."""
