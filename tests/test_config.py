"""Config validation: every rule refuses with a sentence naming the key, and the file is untouched."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from modality_link import config
from modality_link.config import ConfigError
from modality_link.home import Home


def cli(home: Path, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "modality_link", "--home", str(home), *args],
        capture_output=True, text=True, timeout=60,
    )


@pytest.fixture
def home(tmp_path: Path) -> Path:
    Home(tmp_path / "home").ensure()
    return tmp_path / "home"


@pytest.mark.parametrize(
    ("key", "value", "words"),
    [
        ("disk_server.port", "99999", ["disk_server.port", "1 to 65535"]),
        ("disk_server.port", "0", ["disk_server.port", "1 to 65535"]),
        ("disk_server.port", "abc", ["disk_server.port", "whole number"]),
        ("station.ae_title", "A" * 17, ["station.ae_title", "at most 16 characters"]),
        ("station.ae_title", "BAD\\AE", ["station.ae_title", "backslash"]),
        ("station.ae_title", "   ", ["station.ae_title", "empty"]),
        ("station.modality", "XA", ["station.modality", "CT, MR"]),
        ("disk_server.max_pdu", "1000", ["disk_server.max_pdu", "2048"]),
        ("timeouts.dimse", "0", ["timeouts.dimse"]),
        ("station.colour", "red", ["station.colour", "unknown key"]),
        ("nowhere.port", "1", ["nowhere.port", "unknown section"]),
        ("disk_server.allowed_calling_aets", "OK,WAY_TOO_LONG_AE_TITLE", ["allowed_calling_aets[1]", "16"]),
    ],
)
def test_config_set_refuses_and_leaves_file_untouched(home: Path, key: str, value: str, words: list[str]) -> None:
    path = home / "config.toml"
    before = path.read_bytes()
    proc = cli(home, "config", "set", key, value)
    assert proc.returncode == 2
    for w in words:
        assert w in proc.stderr, proc.stderr
    assert path.read_bytes() == before


def test_config_set_get_roundtrip(home: Path) -> None:
    assert cli(home, "config", "set", "station.ae_title", "CT_ROOM_2").returncode == 0
    assert cli(home, "config", "set", "disk_server.port", "4242").returncode == 0
    assert cli(home, "config", "set", "disk_server.allowed_calling_aets", "PACS,RIS").returncode == 0
    assert cli(home, "config", "get", "station.ae_title").stdout.strip() == "CT_ROOM_2"
    assert cli(home, "config", "get", "disk_server.port").stdout.strip() == "4242"
    cfg = config.load(home / "config.toml")
    assert cfg.disk_server.allowed_calling_aets == ["PACS", "RIS"]
    assert cli(home, "config", "validate").returncode == 0
    assert "[station]" in cli(home, "config", "show").stdout


def test_unknown_key_in_file_is_named(tmp_path: Path) -> None:
    p = tmp_path / "config.toml"
    p.write_text('[station]\nae_title = "X"\ncolor = "red"\n')
    with pytest.raises(ConfigError, match=r"station\.color: unknown key"):
        config.load(p)


def test_duplicate_node_in_file_and_by_cli(home: Path) -> None:
    ok = cli(home, "node", "add", "PACS", "--ae", "PACS_AE", "--host", "127.0.0.1", "--port", "104", "--roles", "store,commit")
    assert ok.returncode == 0, ok.stderr
    path = home / "config.toml"
    before = path.read_bytes()
    dup = cli(home, "node", "add", "pacs", "--ae", "OTHER", "--host", "127.0.0.1", "--port", "105")
    assert dup.returncode == 2
    assert "nodes.pacs" in dup.stderr and "duplicate node name" in dup.stderr
    assert path.read_bytes() == before
    # The same table twice in a hand-edited file.
    path.write_text(path.read_text() + '\n[nodes."PACS"]\nae_title = "X"\n')
    with pytest.raises(ConfigError, match="defined twice"):
        config.load(path)
    # Two names that differ only by case.
    path.write_bytes(before + b'\n[nodes."Pacs"]\nae_title = "X"\n')
    with pytest.raises(ConfigError, match="duplicate node name"):
        config.load(path)


def test_node_add_validates_and_lists_and_removes(home: Path) -> None:
    bad = cli(home, "node", "add", "RIS", "--ae", "R" * 17, "--host", "ris", "--port", "104")
    assert bad.returncode == 2 and "nodes.RIS.ae_title" in bad.stderr
    bad = cli(home, "node", "add", "RIS", "--ae", "RIS", "--host", "ris", "--port", "104", "--roles", "print")
    assert bad.returncode == 2 and "nodes.RIS.roles" in bad.stderr
    assert cli(home, "node", "add", "RIS", "--ae", "RIS", "--host", "ris", "--port", "104", "--roles", "worklist,mpps").returncode == 0
    listed = cli(home, "node", "list")
    assert "RIS: RIS@ris:104 roles=worklist,mpps" in listed.stdout
    assert cli(home, "node", "remove", "RIS").returncode == 0
    gone = cli(home, "node", "remove", "RIS")
    assert gone.returncode == 2 and "no such node" in gone.stderr


def test_same_port_for_two_listeners_is_refused(home: Path) -> None:
    cli(home, "config", "set", "memory_server.enabled", "true")
    proc = cli(home, "config", "set", "memory_server.port", "11112")
    assert proc.returncode == 2 and "memory_server.port" in proc.stderr and "already used" in proc.stderr


def test_defaults_match_the_design(tmp_path: Path) -> None:
    cfg = config.Config()
    assert cfg.station.ae_title == "MODLINK"
    assert cfg.station.modality == "CT"
    assert cfg.disk_server.port == 11112
    assert (cfg.memory_server.ae_title, cfg.memory_server.port) == ("MODLINK_MEM", 11113)
    config.save(cfg, tmp_path / "c.toml")
    assert config.load(tmp_path / "c.toml") == cfg
