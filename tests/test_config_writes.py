"""Config writes cannot break the service (docs/design.md "Files and permissions"): hostile text
round-trips through `config set`, the file, `serve` and `config get`; values DICOM forbids are
refused naming the key; the service engineer's comments and layout survive."""

from __future__ import annotations

import os
import shutil
import stat
import subprocess
import sys
import tempfile
import tomllib
from pathlib import Path
from typing import Iterator

import pytest

from modality_link import config
from modality_link.home import Home
from tests.support.service import ServiceProcess

#: Text a TOML writer must escape, and text it must keep as it is.
HOSTILE = "we\"ird' \\back\\slash \x7f del \x01\x1b\x1f ctl\ttab\nnew line\r ü 漢字 😀 [x] = # \u2028"


def cli(home: Path, *args: str | bytes) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "modality_link", "--home", str(home), *args],
        capture_output=True, text=True, timeout=60,
    )


@pytest.fixture
def home() -> Iterator[Path]:
    root = Path(tempfile.mkdtemp(prefix="ml"))  # short: the service's socket goes in it
    Home(root / "home").ensure()
    yield root / "home"
    shutil.rmtree(root, ignore_errors=True)


def test_hostile_text_round_trips_through_set_file_serve_and_get(home: Path) -> None:
    values = {
        "media.export_dir": HOSTILE,                 # a folder: any character but NUL
        "station.name": "CT \"1\" ü'#",              # VR SH: quotes and Unicode, no backslash
        "station.institution": "St. Mary's \"Ost\" Klinik ÄÖÜ 漢字 # [x]",  # VR LO
        "media.drives": "sim:a\"b,stdio:/tmp/d\\e \x7f.iso",
    }
    for key, value in values.items():
        proc = cli(home, "config", "set", key, value)
        assert proc.returncode == 0, proc.stderr
    text = (home / "config.toml").read_text(encoding="utf-8")
    parsed = tomllib.loads(text)  # valid TOML
    assert parsed["media"]["export_dir"] == HOSTILE
    assert stat.S_IMODE((home / "config.toml").stat().st_mode) == 0o600
    expected = {**values, "media.drives": ["sim:a\"b", "stdio:/tmp/d\\e \x7f.iso"]}
    service = ServiceProcess.start(home)
    try:
        for key, value in expected.items():
            assert service.call("config.get", key=key) == value, key
        got = subprocess.run([sys.executable, "-m", "modality_link", "--home", str(home), "config", "get",
                              "media.export_dir"], capture_output=True, timeout=60)  # bytes: no newline translation
        assert got.returncode == 0 and got.stdout == (HOSTILE + "\n").encode("utf-8")
        assert (home / HOSTILE).is_dir()  # the service made its export folder by that name
        # the running service writes the file too, and reads it back
        assert service.call("config.set", key="station.name", value="CT 'Two' é") == "CT 'Two' é"
        assert service.call("config.reload")["reloaded"] is True
        assert config.load(home / "config.toml").media.export_dir == HOSTILE
    finally:
        service.stop()
    again = ServiceProcess(Home(home))  # serve starts again on the file it wrote
    try:
        assert again.call("config.get", key="station.name") == "CT 'Two' é"
    finally:
        again.stop()


@pytest.mark.parametrize(("key", "value", "words"), [
    ("station.name", "CT\x7f01", ["station.name", "control characters", "SH"]),
    ("station.name", "CT\\01", ["station.name", "backslash"]),
    ("station.name", "CT\n01", ["station.name", "control characters"]),
    ("station.institution", "A\x1bB", ["station.institution", "control characters", "LO"]),
    ("station.ae_title", "CT\x7f", ["station.ae_title", "control characters"]),
    ("disk_server.bind_address", "127.0.0.1\x7f", ["disk_server.bind_address", "host name"]),
    ("ipc.engineer_group", "no-such-group-here", ["ipc.engineer_group", "no group"]),
    ("media.import_dirs", "relative/dir", ["media.import_dirs", "absolute"]),
])
def test_values_dicom_or_the_system_forbid_are_refused_naming_the_key(home: Path, key: str, value: str,
                                                                      words: list[str]) -> None:
    before = (home / "config.toml").read_bytes()
    proc = cli(home, "config", "set", key, value)
    assert proc.returncode == 2, proc.stdout
    for w in words:
        assert w in proc.stderr, proc.stderr
    assert (home / "config.toml").read_bytes() == before


def test_a_node_host_with_del_and_text_that_is_not_utf8_are_refused(home: Path) -> None:
    before = (home / "config.toml").read_bytes()
    proc = cli(home, "node", "add", "PACS", "--ae", "PACS", "--host", "pacs\x7f.example", "--port", "104")
    assert proc.returncode == 2 and "nodes.PACS.host" in proc.stderr, proc.stderr
    proc = subprocess.run(  # bytes that are not UTF-8 reach Python as lone surrogates
        [os.fsencode(sys.executable), b"-m", b"modality_link", b"--home", os.fsencode(home), b"config", b"set",
         b"media.export_dir", b"bad\xff"], capture_output=True, timeout=60)
    assert proc.returncode == 2 and b"media.export_dir" in proc.stderr and b"Unicode" in proc.stderr
    assert (home / "config.toml").read_bytes() == before


def test_comments_and_layout_survive(home: Path) -> None:
    path = home / "config.toml"
    path.write_text(
        "# Console CT-3, configured by the service engineer\n"
        "# call 555-0100 before changing anything\n"
        "\n"
        "[disk_server]\n"
        "port = 11112          # the PACS sends here\n"
        "# allowed_calling_aets = [\"PACS\"]\n"
        "\n"
        "[station]\n"
        "name = \"CT3\"  # shown on the PACS\n"
        "ae_title = \"CT_3\"\n"
        "\n"
        "[nodes.PACS]   # the hospital PACS\n"
        "ae_title = \"PACS\"\n"
        "host = \"10.0.0.5\"\n"
        "roles = [\"store\", \"commit\"]\n",
        encoding="utf-8",
    )
    assert cli(home, "config", "set", "station.ae_title", "CT_THREE").returncode == 0
    assert cli(home, "config", "set", "timeouts.dimse", "90").returncode == 0
    assert cli(home, "node", "add", "RIS", "--ae", "RIS", "--host", "ris", "--port", "104",
               "--roles", "worklist").returncode == 0
    text = path.read_text(encoding="utf-8")
    for kept in ("# Console CT-3, configured by the service engineer\n# call 555-0100 before changing anything\n",
                 "port = 11112          # the PACS sends here\n# allowed_calling_aets = [\"PACS\"]\n",
                 "name = \"CT3\"  # shown on the PACS\n",
                 "[nodes.PACS]   # the hospital PACS\n"):
        assert kept in text, text
    assert "ae_title = \"CT_THREE\"" in text and "dimse = 90" in text
    assert text.index("[disk_server]") < text.index("[station]") < text.index("[nodes.PACS]")
    cfg = config.load(path)
    assert (cfg.station.ae_title, cfg.timeouts.dimse, cfg.nodes["RIS"].roles) == ("CT_THREE", 90, ["worklist"])
    assert cli(home, "node", "remove", "RIS").returncode == 0
    text = path.read_text(encoding="utf-8")
    assert "RIS" not in text and "[nodes.PACS]   # the hospital PACS\n" in text


def test_the_file_keeps_its_owner_when_root_edits_it(home: Path) -> None:
    if os.geteuid() != 0:
        pytest.skip("only root can give the file another owner")
    path = home / "config.toml"
    os.chown(path, 4242, 4242)
    assert cli(home, "config", "set", "station.name", "CT9").returncode == 0
    st = path.stat()
    assert (st.st_uid, st.st_gid, stat.S_IMODE(st.st_mode)) == (4242, 4242, 0o600)
