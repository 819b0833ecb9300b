"""The fixtures every test module may use; what they are made of is in :mod:`tests.support`."""

from __future__ import annotations

import shutil
import tempfile
from pathlib import Path
from typing import Iterator

import pytest

from modality_link.archive import Archive
from modality_link.db import Database
from modality_link.home import temporary_home
from tests.support.service import InProcessService, ServiceProcess
from tests.support.tools import require_tool


@pytest.fixture
def short_tmp() -> Iterator[Path]:
    """A temporary folder with a short path (Unix socket paths have at most 107 bytes)."""
    d = Path(tempfile.mkdtemp(prefix="ml"))
    yield d
    shutil.rmtree(d, ignore_errors=True)


@pytest.fixture
def archive(tmp_path: Path) -> Archive:
    """An archive in a temporary folder with its SQLite index, no free-space reserve."""
    root = tmp_path / "archive"
    (root / ".tmp").mkdir(parents=True)
    return Archive(root, Database(tmp_path / "db.sqlite"), min_free_mb=0)


@pytest.fixture
def service(short_tmp: Path) -> Iterator[ServiceProcess]:
    """``modality-link serve`` as a subprocess on a new home, defaults, disk server on loopback."""
    svc = ServiceProcess.start(short_tmp / "home")
    yield svc
    svc.stop()


@pytest.fixture
def service_in_process(short_tmp: Path) -> Iterator[InProcessService]:
    """The service in this process on a new home, defaults, disk server on loopback."""
    svc = InProcessService(temporary_home(short_tmp / "home"))
    yield svc
    svc.stop()


@pytest.fixture(scope="session")
def tools() -> dict[str, str]:
    """The programs that read a disc back: xorriso extracts it, dciodvfy and dcdirdmp
    (dicom3tools) check its DICOMDIR."""
    return {name: require_tool(name) for name in ("xorriso", "dciodvfy", "dcdirdmp")}
