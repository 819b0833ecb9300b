"""What a local attacker on the IPC socket tried, each answered now with a clear refusal or the
right error, and nothing written outside the home (docs/design.md "Who may do what", "Files and
permissions"; the config file's hostile strings are in tests/test_config_writes.py).

The service runs as root with the default configuration, as the tests do: every caller is an
engineer, so what is refused here is refused to everyone.
"""

from __future__ import annotations

import json
import os
import shutil
import socket
import stat
import tempfile
from pathlib import Path
from typing import Any, Iterator

import pytest

from modality_link.home import temporary_home
from modality_link.ipc import CONFLICT, INVALID_PARAMS, PARSE_ERROR, IpcClient, IpcError
from sim.images import write_study
from tests.support.service import ServiceProcess


@pytest.fixture(scope="module")
def svc() -> Iterator[dict[str, Any]]:
    root = Path(tempfile.mkdtemp(prefix="ml"))
    service = ServiceProcess.start(root / "home")
    try:
        write_study(root / "study", modality="CT", images=2, rows=16, columns=16, seed=51)
        assert service.cli("import", str(root / "study")).returncode == 0
        yield {"service": service, "root": root, "study": service.studies()[0]["study_uid"]}
    finally:
        service.stop()
        shutil.rmtree(root, ignore_errors=True)


def is_iso(path: Path) -> bool:
    with open(path, "rb") as f:
        f.seek(16 * 2048 + 1)
        return f.read(5) == b"CD001"


def test_burn_never_replaces_a_file_unasked_nor_follows_a_link(svc) -> None:
    service: ServiceProcess = svc["service"]
    root, study = svc["root"], svc["study"]
    victim = root / "victim.txt"
    victim.write_text("precious\n")

    proc = service.cli("burn", study, "--iso", str(victim), "--wait")
    assert proc.returncode == 1 and "exists" in proc.stderr and "--force" in proc.stderr
    with pytest.raises(IpcError) as exists:
        service.call("burn", study_uids=[study], iso=str(victim))
    assert exists.value.code == CONFLICT

    link = root / "link.iso"
    link.symlink_to(victim)
    for extra in ((), ("--force",)):
        proc = service.cli("burn", study, "--iso", str(link), *extra, "--wait")
        assert proc.returncode == 1 and "symbolic link" in proc.stderr, proc.stderr
        proc = service.cli("burn", study, "--drive", f"stdio:{link}", *extra, "--wait")
        assert proc.returncode == 1 and "symbolic link" in proc.stderr, proc.stderr

    fifo = root / "fifo.iso"
    os.mkfifo(fifo)
    for target in (("--iso", str(fifo)), ("--drive", f"stdio:{fifo}"), ("--iso", str(fifo), "--force")):
        proc = service.cli("burn", study, *target, "--wait", timeout=60)
        assert proc.returncode == 1 and "a FIFO" in proc.stderr, proc.stderr
    with pytest.raises(IpcError) as refused:
        service.call("burn", study_uids=[study], drive=f"stdio:{fifo}")
    assert refused.value.code == INVALID_PARAMS

    # a temporary planted beside the target is removed, never written through
    new = root / "new.iso"
    (root / ".new.iso.part").symlink_to(victim)
    proc = service.cli("burn", study, "--iso", str(new), "--wait")
    assert proc.returncode == 0, proc.stderr
    assert is_iso(new) and not (root / ".new.iso.part").exists()
    assert victim.read_text() == "precious\n"

    # asked to: the file is replaced (its name; a link there would be replaced, not followed)
    proc = service.cli("burn", study, "--iso", str(victim), "--force", "--wait")
    assert proc.returncode == 0, proc.stderr
    assert is_iso(victim) and not victim.is_symlink()
    assert os.readlink(link) == str(victim)


def test_home_files_are_private_and_an_old_home_is_tightened(tmp_path: Path) -> None:
    root = Path(tempfile.mkdtemp(prefix="ml"))
    try:
        home = temporary_home(root / "home")
        assert stat.S_IMODE(home.config_path.stat().st_mode) == 0o600
        # a home as the service made it before it had modes
        os.chmod(home.root, 0o755)
        os.chmod(home.config_path, 0o644)
        os.chmod(home.archive_dir, 0o755)
        os.chmod(home.log_dir, 0o755)
        old_log = home.log_dir / "modality-link.log.1"
        old_log.write_text("old\n")
        os.chmod(old_log, 0o644)
        service = ServiceProcess(home)
        try:
            mode = lambda p: stat.S_IMODE(os.lstat(p).st_mode)  # noqa: E731
            assert mode(home.root) == 0o700
            for path in (home.config_path, home.db_path, old_log, home.log_dir / "modality-link.log"):
                assert mode(path) == 0o600, path
            for path in (home.archive_dir, home.log_dir, home.tmp_dir, home.root / "export"):
                assert mode(path) == 0o700, path
            assert mode(home.socket_path) == 0o660
            assert "tightened" in service.log() and f"{home.config_path}: mode 0644 -> 0600" in service.log()
            write_study(tmp_path / "study", modality="CT", images=1, rows=16, columns=16, seed=52)
            assert service.cli("import", str(tmp_path / "study")).returncode == 0
            stored = [p for p in home.archive_dir.rglob("*.dcm")]
            assert stored and all(mode(p) == 0o600 for p in stored)
            assert all(mode(p.parent) == 0o700 and mode(p.parent.parent) == 0o700 for p in stored)
            proc = service.cli("config", "set", "station.name", "CT02")
            assert proc.returncode == 0 and mode(home.config_path) == 0o600
        finally:
            service.stop()
    finally:
        shutil.rmtree(root, ignore_errors=True)


def test_echo_to_a_host_that_does_not_resolve_says_so(svc) -> None:
    service: ServiceProcess = svc["service"]
    add = service.cli("node", "add", "NOWHERE", "--ae", "NOWHERE", "--host", "no-such-host.invalid", "--port", "104")
    assert add.returncode == 0, add.stderr
    try:
        [res] = service.call("nodes.echo", name="NOWHERE")
        assert res["ok"] is False and "unknown host no-such-host.invalid" in res["message"], res
        proc = service.cli("echo", "NOWHERE")
        assert proc.returncode == 1 and "NOWHERE: FAILED" in proc.stdout and "unknown host" in proc.stdout
    finally:
        assert service.cli("node", "remove", "NOWHERE").returncode == 0


@pytest.mark.parametrize(("method", "params", "words"), [
    ("jobs.show", {"id": 10**20}, ["id", "9223372036854775807"]),
    ("jobs.show", {"id": True}, ["id", "whole number"]),
    ("jobs.cancel", {"id": "3"}, ["id", "whole number"]),
    ("burn.status", {"id": 1.5}, ["id"]),
    ("burn.cancel", {"id": 0}, ["id"]),
    ("burn", {"study_uids": "1.2.3", "iso": "/tmp/x.iso"}, ["study_uids", "a list"]),
    ("burn", {"study_uids": [["1.2"]], "iso": "/tmp/x.iso"}, ["study_uids[0]", "text"]),
    ("burn", {"study_uids": ["1.2"], "iso": "/tmp/x.iso", "wait": "yes"}, ["wait", "true or false"]),
    ("send", {"study_uids": ["1.2"], "node": ["PACS"]}, ["node", "text"]),
    ("cleanup", {"dry_run": 1}, ["dry_run", "true or false"]),
    ("exam.show", {"exam_id": "1"}, ["exam_id", "whole number"]),
    ("memory.fetch", {"sop_instance_uid": ["1.2"]}, ["sop_instance_uid", "text"]),
    ("config.get", {"key": {"a": 1}}, ["key", "text"]),
    ("config.set", {"key": "station.name", "value": [1]}, ["value"]),
    ("query", {"node": "X", "keys": {"PatientName": 5}}, ["keys", "PatientName", "text"]),
    ("status", {"verbose": True}, ["verbose"]),
    ("studies.protect", {"study_uid": "1." * 40}, ["study_uid", "64"]),
    ("studies.protect", {}, ["study_uid"]),
    ("archive.import", {"paths": []}, ["paths"]),
    ("exam.add_image", {"exam_id": 1, "paths": ["/tmp/a\0b"]}, ["paths[0]", "NUL"]),
    ("retrieve", {"node": "X", "study_uid": 7}, ["study_uid", "text"]),
])
def test_ipc_parameters_are_checked_for_type_and_range(svc, method: str, params: dict, words: list[str]) -> None:
    with pytest.raises(IpcError) as err:
        svc["service"].call(method, **params)
    assert err.value.code == INVALID_PARAMS, err.value.message
    for w in words:
        assert w in err.value.message, err.value.message


def raw_lines(path: Path, *lines: bytes) -> list[dict[str, Any]]:
    """Each line on one connection, one reply read after each."""
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
        s.settimeout(30)
        s.connect(str(path))
        replies = s.makefile("rb")
        out = []
        for line in lines:
            s.sendall(line + b"\n")
            out.append(json.loads(replies.readline()))
        return out


def test_hostile_json_gets_a_reply_and_the_connection_stays(svc) -> None:
    path = svc["service"].home.socket_path
    deep = b'{"jsonrpc":"2.0","id":1,"method":"status","params":' + b"[" * 200_000 + b"]" * 200_000 + b"}"
    nested = b'{"jsonrpc":"2.0","id":2,"method":"archive.import","params":{"paths":' + b"[" * 500 + b"]" * 500 + b"}}"
    surrogate = b'{"jsonrpc":"2.0","id":3,"method":"studies.protect","params":{"study_uid":"\\ud800"}}'
    positional = b'{"jsonrpc":"2.0","id":4,"method":"jobs.show","params":[100000000000000000000]}'
    odd_id = b'{"jsonrpc":"2.0","id":{"a":[1]},"method":"status"}'
    status = b'{"jsonrpc":"2.0","id":5,"method":"status"}'
    deep_reply, nested_reply, surrogate_reply, positional_reply, odd_reply, status_reply = raw_lines(
        path, deep, nested, surrogate, positional, odd_id, status)
    assert deep_reply["error"]["code"] == PARSE_ERROR and "nested" in deep_reply["error"]["message"]
    assert nested_reply["error"]["code"] == INVALID_PARAMS and "paths[0]" in nested_reply["error"]["message"]
    assert surrogate_reply["error"]["code"] == INVALID_PARAMS and "study_uid" in surrogate_reply["error"]["message"]
    assert positional_reply["error"]["code"] == INVALID_PARAMS and "id" in positional_reply["error"]["message"]
    assert odd_reply["id"] is None and odd_reply["error"]["code"] == -32600
    assert status_reply["result"]["pid"] == svc["service"].proc.pid


def test_import_of_a_fifo_device_or_socket_is_refused_without_reading(svc) -> None:
    service: ServiceProcess = svc["service"]
    root = svc["root"]
    fifo = root / "in.fifo"
    os.mkfifo(fifo)
    listening = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    listening.bind(str(root / "in.sock"))
    try:
        for path, kind in ((fifo, "a FIFO"), (Path("/dev/null"), "a character device"),
                           (root / "in.sock", "a socket")):
            with IpcClient(service.home.socket_path, timeout=20) as client:  # a blocked read would time out
                with pytest.raises(IpcError) as err:
                    client.call("archive.import", paths=[str(path)])
            assert err.value.code == INVALID_PARAMS
            assert str(path) in err.value.message and kind in err.value.message, err.value.message
        # inside a folder: named among the refused files, the others imported
        folder = root / "mixed"
        write_study(folder, modality="MR", images=1, rows=16, columns=16, seed=53)
        os.mkfifo(folder / "pipe")
        (folder / "link.dcm").symlink_to(next(folder.glob("*.dcm")))
        with IpcClient(service.home.socket_path, timeout=20) as client:
            res = client.call("archive.import", paths=[str(folder)])
        assert res["imported"] == 1
        failed = {Path(f["path"]).name: f["error"] for f in res["failed"]}
        assert "a FIFO" in failed["pipe"] and "symbolic link" in failed["link.dcm"], failed
        assert service.call("status")["pid"] == service.proc.pid
    finally:
        listening.close()
