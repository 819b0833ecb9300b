"""Who may do what: the service engineer and the technologist (docs/design.md "Who may do what").

A local client's role follows from its Unix user and groups (which the IPC server learns from the
kernel) and the ``[ipc]`` configuration; this module knows nothing of the IPC protocol. Which
method needs which role is listed next to the method table (`modality_link.api`).
"""

from __future__ import annotations

import grp
import os
from pathlib import Path
from typing import Iterable

from modality_link.config import Ipc

ENGINEER = "engineer"
TECHNOLOGIST = "technologist"


def group_id(name: str) -> int | None:
    """The id of the group `name`; None for '' (no group configured) or a group that is gone."""
    if not name:
        return None
    try:
        return grp.getgrnam(name).gr_gid
    except KeyError:
        return None


def role_of(uid: int, groups: Iterable[int], ipc: Ipc) -> str | None:
    """The role of a local user: :data:`ENGINEER`, :data:`TECHNOLOGIST`, or None (not served).

    root and the service's own user are engineers, and so is everyone in
    ``ipc.engineer_group``; with no engineer group, everyone served is. With a
    ``ipc.technologist_group``, only its members (and the engineers) are served."""
    if uid in (0, os.geteuid()):
        return ENGINEER
    gids = set(groups)
    engineers, technologists = group_id(ipc.engineer_group), group_id(ipc.technologist_group)
    if engineers is not None and engineers in gids:
        return ENGINEER
    if ipc.technologist_group and technologists not in gids:
        return None
    return TECHNOLOGIST if ipc.engineer_group else ENGINEER


def socket_group(ipc: Ipc) -> int | None:
    """The group the IPC socket (and the home folder's search right) belongs to: the
    technologists', else the engineers'; None when neither is configured."""
    for name in (ipc.technologist_group, ipc.engineer_group):
        gid = group_id(name)
        if gid is not None:
            return gid
    return None


def inside(path: str | Path, folder: Path) -> bool:
    """Whether the absolute `path` names an entry inside `folder` (at any depth) once the
    symbolic links of both are resolved; a `path` that is itself a symbolic link counts where
    the link leads."""
    p = Path(path)
    if not p.is_absolute():
        return False
    real, base = Path(os.path.realpath(p)), Path(os.path.realpath(folder))
    return base in real.parents
