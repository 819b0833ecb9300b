"""An image of >= 300 files is built with only 256 file descriptors allowed."""

from __future__ import annotations

import json
import resource
import subprocess
import sys
from pathlib import Path

from pydicom.uid import generate_uid

from tests.support.instances import ImplicitVRLittleEndian, make_series

ROOT = Path(__file__).resolve().parents[1]

SCRIPT = """
import json, sys
from pathlib import Path
from modality_link.media import MediaOptions, build_media
files = [Path(p) for p in json.loads(sys.stdin.read())]
results = build_media(files, Path(sys.argv[1]), MediaOptions())
print(json.dumps([len(r.instances) for r in results]))
"""


def _limit_fds() -> None:
    resource.setrlimit(resource.RLIMIT_NOFILE, (256, 256))


def test_build_under_ulimit_256(tmp_path):
    study = generate_uid()
    files = make_series(tmp_path / "src", 290, study_uid=study)
    files += make_series(tmp_path / "src", 20, modality="MR", study_uid=study, series_number=2,
                         transfer_syntax=ImplicitVRLittleEndian)
    proc = subprocess.run(
        [sys.executable, "-c", SCRIPT, str(tmp_path / "out")],
        input=json.dumps([str(p) for p in files]), capture_output=True, text=True, cwd=ROOT,
        preexec_fn=_limit_fds, timeout=120,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert json.loads(proc.stdout.strip().splitlines()[-1]) == [310]
    assert (tmp_path / "out" / "MODLINK_1.iso").stat().st_size > 310 * 2048
