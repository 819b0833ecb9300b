"""The service engineer's tools and identity (docs/cli.md): the listener follows the station's
AE title, settings that make a commitment report or a C-MOVE unreachable are warned about,
errors name the fix, one exit-code table, node show/edit, config unset/export/import/validate,
echo --services, logs and alerts. Real service processes and DCMTK peers on loopback."""

from __future__ import annotations

import argparse
import re
import socket
import subprocess
import sys
import tomllib
from pathlib import Path
from typing import Iterator

import pytest

from modality_link import cli, config
from modality_link.home import Home, free_port
from tests.support.peers import start_storescp
from tests.support.service import ServiceProcess
from tests.support.tools import dcmtk_env, require_tool
from tests.support.waiting import wait_until

REPO = Path(__file__).resolve().parents[1]


def run(home: Path, *args: str, timeout: float = 60) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "modality_link", "--home", str(home), *args],
                          capture_output=True, text=True, timeout=timeout)


@pytest.fixture
def home(short_tmp: Path) -> Path:
    Home(short_tmp / "h").ensure()
    return short_tmp / "h"


@pytest.fixture
def service(short_tmp: Path) -> Iterator[ServiceProcess]:
    svc = ServiceProcess.start(short_tmp / "h")
    yield svc
    svc.stop()


def echoscu(port: int, called: str) -> subprocess.CompletedProcess:
    return subprocess.run([require_tool("echoscu"), "-aet", "PACS", "-aec", called, "127.0.0.1", str(port)],
                          capture_output=True, text=True, env=dcmtk_env(), timeout=30)


# -- one identity -------------------------------------------------------------------------------


def test_the_listener_follows_the_station_ae_title_and_a_refusal_names_both_titles(service: ServiceProcess) -> None:
    assert service.cli("config", "set", "station.ae_title", "CT_ROOM_1").returncode == 0
    assert service.cli("config", "get", "disk_server.ae_title").stdout.strip() == "CT_ROOM_1"
    text = (service.home.config_path).read_text(encoding="utf-8")
    assert "CT_ROOM_1" in text and "ae_title = \"MODLINK\"" not in text
    # the running service restarted its listener: DCMTK reaches it by the station's title
    ok = wait_until(lambda: echoscu(service.port, "CT_ROOM_1").returncode == 0, 20, "the listener to answer CT_ROOM_1")
    assert ok
    refused = echoscu(service.port, "MODLINK")
    assert refused.returncode != 0
    line = wait_until(lambda: next((ln for ln in service.log().splitlines() if "called AE title not recognized" in ln),
                                   None), 10, "the refusal in the log")
    assert "'MODLINK' was asked for" in line and "answers to 'CT_ROOM_1'" in line, line
    # set on its own it stays; unset it follows again
    assert service.cli("config", "set", "disk_server.ae_title", "LISTENER").returncode == 0
    assert service.cli("config", "set", "station.ae_title", "CT_ROOM_2").returncode == 0
    assert service.cli("config", "get", "disk_server.ae_title").stdout.strip() == "LISTENER"
    assert service.cli("config", "unset", "disk_server.ae_title").returncode == 0
    assert service.cli("config", "get", "disk_server.ae_title").stdout.strip() == "CT_ROOM_2"
    wait_until(lambda: echoscu(service.port, "CT_ROOM_2").returncode == 0, 20, "the listener to answer CT_ROOM_2")


def test_unreachable_commitment_is_warned_by_validate_status_and_selftest(service: ServiceProcess) -> None:
    assert service.cli("node", "add", "PACS", "--ae", "PACS", "--host", "10.0.0.5", "--port", "104",
                       "--roles", "store,commit").returncode == 0
    setting = service.cli("config", "set", "disk_server.ae_title", "OTHER")
    assert setting.returncode == 0 and "differs from station.ae_title" in setting.stderr
    valid = service.cli("config", "validate")
    assert valid.returncode == 0 and "valid" in valid.stdout
    assert "disk_server.ae_title 'OTHER' differs" in valid.stderr and "config unset disk_server.ae_title" in valid.stderr
    # the test home binds 127.0.0.1: the PACS at 10.0.0.5 cannot connect back
    assert "disk_server.bind_address 127.0.0.1" in valid.stderr
    status = service.cli("status")
    assert status.returncode == 0 and "WARNING disk_server.ae_title 'OTHER' differs" in status.stdout
    selftest = service.cli("selftest")
    assert selftest.returncode == 1
    assert re.search(r"identity\s+FAIL", selftest.stdout) and "differs from station.ae_title" in selftest.stdout


# -- errors that name the fix -------------------------------------------------------------------


def test_a_busy_port_names_the_key_and_the_command(short_tmp: Path) -> None:
    from modality_link.home import temporary_home

    home = temporary_home(short_tmp / "h")
    port = config.load(home.config_path).disk_server.port
    with socket.socket() as taken:
        taken.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        taken.bind(("127.0.0.1", port))
        taken.listen()
        proc = run(home.root, "serve", timeout=60)
    assert proc.returncode == 1
    assert (f"port {port} is in use by another program: change disk_server.port "
            f"(modality-link config set disk_server.port N)") in proc.stderr, proc.stderr


def test_unknown_host_and_missing_role_name_the_fix_before_any_association(service: ServiceProcess) -> None:
    assert service.cli("node", "add", "GONE", "--ae", "GONE", "--host", "no-such-host.invalid", "--port", "104").returncode == 0
    echo = service.cli("echo", "GONE")
    assert echo.returncode == 1 and "unknown host no-such-host.invalid" in echo.stdout
    assert "node edit NAME --host" in echo.stdout
    assert service.cli("node", "add", "RIS", "--ae", "RIS", "--host", "127.0.0.1", "--port", "9",
                       "--roles", "worklist,mpps").returncode == 0
    send = service.cli("send", "1.2.3.4", "--to", "RIS")
    assert send.returncode == 1
    assert "no 'store' role; add it with: modality-link node edit RIS --roles worklist,mpps,store" in send.stderr
    assert service.call("jobs.list") == [] and "association to RIS" not in service.log()


UNKNOWN_NODE = [
    ("echo", "NOPE"), ("echo", "--services", "NOPE"), ("send", "1.2.3", "--to", "NOPE"),
    ("query", "--from", "NOPE"), ("retrieve", "--from", "NOPE", "--study", "1.2.3"),
    ("worklist", "--node", "NOPE"), ("node", "show", "NOPE"), ("node", "edit", "NOPE", "--port", "104"),
    ("node", "remove", "NOPE"), ("config", "get", "nodes.NOPE.host"), ("config", "set", "nodes.NOPE.port", "1"),
    ("config", "unset", "nodes.NOPE.port"),
]


def test_an_unknown_node_exits_2_for_every_command(service: ServiceProcess) -> None:
    for args in UNKNOWN_NODE:
        proc = service.cli(*args)
        assert proc.returncode == cli.EXIT_USAGE, (args, proc.stdout, proc.stderr)
        assert "NOPE" in proc.stderr and "no such node" in proc.stderr, (args, proc.stderr)


def test_the_exit_code_table_is_documented_and_no_service_is_3(home: Path) -> None:
    doc = (REPO / "docs" / "cli.md").read_text(encoding="utf-8")
    for code in cli.EXIT_CODES:
        assert re.search(rf"^\| {code} \|", doc, re.M), code
    readme = (REPO / "README.md").read_text(encoding="utf-8")
    assert "docs/cli.md" in readme and "shared/" not in readme
    assert run(home, "echo", "NOPE").returncode == cli.EXIT_NOT_RUNNING


# -- the engineer's tools -------------------------------------------------------------------------


def test_node_show_and_edit(home: Path) -> None:
    assert run(home, "node", "add", "PACS", "--ae", "PACS", "--host", "10.0.0.5", "--port", "104").returncode == 0
    edit = run(home, "node", "edit", "PACS", "--host", "10.0.0.6", "--port", "11112", "--roles", "store,commit")
    assert edit.returncode == 0, edit.stderr
    shown = run(home, "node", "show", "PACS").stdout
    assert 'host = "10.0.0.6"' in shown and "port = 11112" in shown and 'roles = ["store", "commit"]' in shown
    assert "retries = 3" in shown  # every setting, defaults too
    bad = run(home, "node", "edit", "PACS", "--roles", "store,bogus")
    assert bad.returncode == 2 and "nodes.PACS.roles" in bad.stderr
    assert config.load(home / "config.toml").nodes["PACS"].roles == ["store", "commit"]


def test_config_unset_keeps_only_changed_values_and_comments(home: Path) -> None:
    path = home / "config.toml"
    path.write_text("# console CT-3: call 555-0100\n[timeouts]\ndimse = 90.0  # slow PACS\nacse = 45.0\n",
                    encoding="utf-8")
    assert run(home, "config", "unset", "timeouts.acse").returncode == 0
    text = path.read_text(encoding="utf-8")
    assert "acse" not in text and "# console CT-3: call 555-0100" in text and "dimse = 90.0  # slow PACS" in text
    assert config.load(path).timeouts.acse == config.Timeouts().acse
    fresh = home.parent / "fresh"
    Home(fresh).ensure()
    assert run(fresh, "config", "set", "timeouts.dimse", "90").returncode == 0
    assert tomllib.loads((fresh / "config.toml").read_text(encoding="utf-8")) == {"timeouts": {"dimse": 90.0}}


def test_config_export_import_and_validate_list_every_error(home: Path) -> None:
    assert run(home, "config", "set", "station.ae_title", "CT_ROOM_1").returncode == 0
    assert run(home, "node", "add", "PACS", "--ae", "PACS", "--host", "10.0.0.5", "--port", "104").returncode == 0
    exported = home.parent / "console.toml"
    assert run(home, "config", "export", str(exported)).returncode == 0
    clone = home.parent / "clone"
    Home(clone).ensure()
    assert run(clone, "config", "import", str(exported)).returncode == 0
    assert config.load(clone / "config.toml") == config.load(home / "config.toml")
    bad = home.parent / "bad.toml"
    bad.write_text('[station]\nae_title = "A\\\\B"\nmodality = "XX"\n[disk_server]\nport = 0\n'
                   '[nodes.R]\nhost = "10.0.0.9"\nport = 0\n[bogus]\n', encoding="utf-8")
    before = (clone / "config.toml").read_bytes()
    imported = run(clone, "config", "import", str(bad))
    assert imported.returncode == 2
    for key in ("station.ae_title", "station.modality", "disk_server.port", "nodes.R.ae_title", "nodes.R.port",
                "bogus"):
        assert key in imported.stderr, (key, imported.stderr)
    assert (clone / "config.toml").read_bytes() == before
    (clone / "config.toml").write_bytes(bad.read_bytes())
    valid = run(clone, "config", "validate")
    assert valid.returncode == 2 and "6 error(s)" in valid.stderr, valid.stderr


def test_echo_services_reports_each_role_accepted_or_refused(service: ServiceProcess, short_tmp: Path) -> None:
    port = free_port()
    (short_tmp / "in").mkdir()
    scp = start_storescp(short_tmp / "in", port)  # Storage and Verification only: no MPPS
    try:
        assert service.cli("node", "add", "RIS", "--ae", "STORESCP", "--host", "127.0.0.1", "--port", str(port),
                           "--roles", "store,mpps").returncode == 0
        plain = service.cli("echo", "RIS")
        assert plain.returncode == 0, plain.stdout  # Verification alone passes
        proc = service.cli("echo", "--services", "RIS")
    finally:
        scp.terminate()
        scp.wait()
    assert proc.returncode == 1, proc.stdout + proc.stderr
    lines = proc.stdout.splitlines()
    assert lines[0].startswith("RIS: FAILED")
    assert any(ln.split()[0] == "store" and "1.2.840.10008.5.1.4.1.1.2)" in ln and "accepted" in ln for ln in lines[1:])
    assert any(ln.split()[0] == "mpps" and "1.2.840.10008.3.1.2.3.3" in ln and "refused" in ln for ln in lines[1:])


def test_a_failed_job_in_logs_and_alerts_then_acknowledged(service: ServiceProcess, short_tmp: Path) -> None:
    from sim import images

    images.write_study(short_tmp / "study", modality="CT", images=2, seed=3)
    assert service.cli("import", str(short_tmp / "study")).returncode == 0
    study = service.studies()[0]["study_uid"]
    assert service.cli("node", "add", "DEAD", "--ae", "DEAD", "--host", "127.0.0.1", "--port", "9").returncode == 0
    assert service.cli("config", "set", "nodes.DEAD.retries", "0").returncode == 0
    sent = service.cli("send", study, "--to", "DEAD", "--wait")
    assert sent.returncode == 1
    job = int(re.search(r"job (\d+) queued", sent.stdout).group(1))  # type: ignore[union-attr]
    # logs: by job, by level
    lines = service.cli("logs", "--job", str(job)).stdout.splitlines()
    assert lines and all(re.search(rf"\bjob {job}\b", ln) for ln in lines if re.match(r"\d{4}-", ln))
    assert any("queued" in ln for ln in lines) and any(" ERROR " in ln for ln in lines)
    errors = [ln for ln in service.cli("logs", "--level", "error").stdout.splitlines() if re.match(r"\d{4}-", ln)]
    assert errors and all(" ERROR " in ln for ln in errors)
    # alerts: listed with their id, acknowledged by it
    listed = service.cli("alerts")
    found = re.search(r"^\s*(\d+) .* job-failed: send job %d to DEAD failed" % job, listed.stdout, re.M)
    assert listed.returncode == 0 and found, listed.stdout
    ack = service.cli("alerts", "ack", found.group(1))
    assert ack.returncode == 0, ack.stderr
    assert "job-failed" not in service.cli("alerts").stdout
    assert "(acknowledged)" in service.cli("alerts", "--all").stdout
    missing = service.cli("alerts", "ack", "99999")
    assert missing.returncode == 1 and "no alert 99999" in missing.stderr
    # logs --follow prints what is written from now on
    follow = subprocess.Popen([sys.executable, "-m", "modality_link", "--home", str(service.home.root), "logs",
                               "--follow", "--level", "info"], stdout=subprocess.PIPE, text=True)
    try:
        assert follow.stdout is not None
        wait_until(lambda: service.cli("config", "set", "timeouts.dimse", "61").returncode == 0, 10, "config set")
        line = follow.stdout.readline()
        while "config reloaded" not in line:  # the test's timeout bounds it
            line = follow.stdout.readline()
    finally:
        follow.terminate()
        follow.wait()


def test_every_option_has_help_and_help_lists_roles_and_keys() -> None:
    def walk(parser: argparse.ArgumentParser, where: str) -> Iterator[str]:
        for action in parser._actions:
            if isinstance(action, argparse._SubParsersAction):
                for name, sub in action.choices.items():
                    yield from walk(sub, f"{where} {name}")
            elif not action.help and not isinstance(action, argparse._HelpAction):
                yield f"{where} {'/'.join(action.option_strings) or action.dest}"

    assert list(walk(cli.build_parser(), "modality-link")) == []
    text = subprocess.run([sys.executable, "-m", "modality_link", "config", "--help"], capture_output=True,
                          text=True, check=True).stdout
    assert "worklist, mpps, store, commit, qr" in text
    for key in ("station.ae_title", "disk_server.port", "nodes.NAME.auto_send", "logging.format"):
        assert key in text, key
