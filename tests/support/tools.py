"""Reference programs from Debian packages (DCMTK, dicom3tools, Orthanc, xorriso, python3-odil).

What a missing one means is decided here and only here: outside CI the test is skipped; in CI
(``CI=true``), where ``.ci/run`` installs every one of them, the test fails.
"""

from __future__ import annotations

import os
import re
from pathlib import Path
from typing import NoReturn

import pytest


def in_ci() -> bool:
    """True in CI: the environment variable ``CI`` is ``true`` (or ``1``, ``yes``)."""
    return os.environ.get("CI", "").strip().lower() in ("1", "true", "yes")


def missing(reason: str) -> NoReturn:
    """Something a test needs is not on this machine: fail the test in CI, skip it elsewhere."""
    if in_ci():
        pytest.fail(f"{reason}: required in CI (see .ci/run)")
    pytest.skip(reason)


def require_tool(name: str) -> str:
    """The absolute path of a program from a Debian package: a bare name is looked up in
    ``/usr/bin``, not on PATH (pynetdicom's apps shadow DCMTK's names there). Missing:
    :func:`missing`."""
    path = name if name.startswith("/") else f"/usr/bin/{name}"
    if not (os.path.isfile(path) and os.access(path, os.X_OK)):
        missing(f"{path} not installed")
    return path


def dcmtk_env() -> dict[str, str]:
    """The environment for a DCMTK tool: without TCP_NODELAY=1 it stalls ~40 ms per C-STORE."""
    return dict(os.environ, TCP_NODELAY="1")


def acknowledged(storescu_log: str) -> list[Path]:
    """Files DCMTK storescu (run with -v) sent and got a success response for ("Sending file"
    ... "Received Store Response (Success)")."""
    out, current = [], None
    for line in storescu_log.splitlines():
        m = re.match(r"I: Sending file: (.*)$", line)
        if m:
            current = Path(m.group(1))
        elif "Received Store Response (Success)" in line and current is not None:
            out.append(current)
            current = None
    return out
