"""Who may do what over the IPC socket (docs/design.md "Who may do what", docs/ipc.md "Roles").

A real ``modality-link serve`` with ``ipc.engineer_group`` and ``ipc.technologist_group`` set
to groups made for the test; its clients run as other Unix users in forked children
(:mod:`tests.support.users`), so the service learns their roles from the kernel as it would on a
console.
"""

from __future__ import annotations

import grp
import base64
import os
import re
import shutil
import stat
import tempfile
from pathlib import Path
from typing import Any, Iterator

import pytest

from modality_link import access, config
from modality_link.api import ENGINEER_METHODS, SCHEMAS
from modality_link.ipc import FORBIDDEN
from sim.images import write_study
from tests.support import REPO
from tests.support.service import ServiceProcess
from tests.support.users import cli_as, ipc_as, unix_groups

TECH, ENG, STRANGER = 4242, 4243, 4244


@pytest.fixture(scope="module")
def roles() -> Iterator[dict[str, Any]]:
    """A service whose technologists and engineers are groups of their own, one study in its
    archive, a folder for imports a technologist may use, and one outside everything."""
    with unix_groups("mlt", "mle") as groups:
        (tech_group, tech_gid), (eng_group, eng_gid) = groups["mlt"], groups["mle"]
        root = Path(tempfile.mkdtemp(prefix="ml"))
        os.chmod(root, 0o711)  # other users reach the socket below it
        media = root / "media"
        write_study(media / "usb", modality="CT", images=2, rows=16, columns=16, seed=41)
        write_study(root / "private", modality="MR", images=1, rows=16, columns=16, seed=42)
        (root / "out").mkdir()
        os.chmod(root / "out", 0o777)
        svc = ServiceProcess.start(root / "home", ipc__engineer_group=eng_group,
                                   ipc__technologist_group=tech_group, media__import_dirs=[str(media)])
        try:
            study = write_study(root / "study", modality="CT", images=2, rows=16, columns=16, seed=43)
            assert svc.cli("import", str(root / "study")).returncode == 0
            uid = svc.studies()[0]["study_uid"]
            yield {"service": svc, "root": root, "study": uid, "files": study, "media": media,
                   "tech": [tech_gid], "eng": [eng_gid, tech_gid], "tech_group": tech_group,
                   "eng_group": eng_group, "tech_gid": tech_gid}
        finally:
            svc.stop()
            shutil.rmtree(root, ignore_errors=True)


def forbidden(reply: dict[str, Any], *words: str) -> str:
    assert "error" in reply, reply
    assert reply["error"]["code"] == FORBIDDEN, reply
    message = reply["error"]["message"]
    for w in words:
        assert w in message, message
    return message


def test_a_technologist_scans_and_exports_but_does_not_configure_or_delete(roles) -> None:
    svc: ServiceProcess = roles["service"]
    home, tech, root = svc.home, roles["tech"], roles["root"]
    assert ipc_as(TECH, tech, home, "status")["result"]["version"]
    assert ipc_as(TECH, tech, home, "studies.list")["result"][0]["study_uid"] == roles["study"]

    before = home.config_path.read_bytes()
    msg = forbidden(ipc_as(TECH, tech, home, "config.set", key="station.name", value="X"),
                    "service engineer", roles["eng_group"], "ipc.engineer_group", "configuration")
    assert f"user {TECH} is a technologist" in msg
    assert home.config_path.read_bytes() == before
    # the refusal is in the audit trail (PS3.15 A.5.3.11), naming the user and saying why
    alerts = [line for line in (home.log_dir / "audit.log").read_text().splitlines()
              if "Use of Restricted Function" in line]
    assert len(alerts) == 1 and f'UserID="uid {TECH}"' in alerts[0]
    why = re.search(r'type="Alert Description" value="([^"]+)"', alerts[0])
    assert why is not None and base64.b64decode(why.group(1)).decode() == msg
    forbidden(ipc_as(TECH, tech, home, "cleanup", dry_run=True), "deletes studies")
    forbidden(ipc_as(TECH, tech, home, "memory.clear"), "memory server")
    forbidden(ipc_as(TECH, tech, home, "nodes.echo", all=True), "network")

    # files: only into the export folder
    outside = root / "out" / "tech.iso"
    forbidden(ipc_as(TECH, tech, home, "burn", study_uids=[roles["study"]], iso=str(outside)),
              "export folder", "media.export_dir")
    forbidden(ipc_as(TECH, tech, home, "burn", study_uids=[roles["study"]], drive=f"stdio:{outside}"),
              "export folder")
    forbidden(ipc_as(TECH, tech, home, "burn", study_uids=[roles["study"]], drive="/dev/sda"),
              "not an optical drive")
    forbidden(ipc_as(TECH, tech, home, "memory.fetch", sop_instance_uid="1.2.3", path=str(outside)),
              "export folder")
    # a link in the export folder counts where it leads
    sneaky = home.root / "export" / "sneaky.iso"
    sneaky.symlink_to(outside)
    forbidden(ipc_as(TECH, tech, home, "burn", study_uids=[roles["study"]], iso=str(sneaky)), "export folder")
    assert not outside.exists()
    inside = home.root / "export" / "tech.iso"
    done = ipc_as(TECH, tech, home, "burn", study_uids=[roles["study"]], iso=str(inside), wait=True)
    assert done["result"]["state"] == "done", done
    assert stat.S_IMODE(inside.stat().st_mode) == 0o600

    # imports: only from the folders of removable media
    forbidden(ipc_as(TECH, tech, home, "archive.import", paths=[str(root / "private")]), "media.import_dirs")
    imported = ipc_as(TECH, tech, home, "archive.import", paths=[str(roles["media"] / "usb")])
    assert imported["result"]["imported"] == 2, imported

    # the command line says the same
    code, _, err = cli_as(TECH, tech, "--home", str(home.root), "burn", roles["study"], "--iso", str(outside))
    assert code == 1 and "service engineer" in err and "export folder" in err
    assert not outside.exists()


def test_an_engineer_configures_and_writes_anywhere(roles) -> None:
    svc: ServiceProcess = roles["service"]
    home, eng = svc.home, roles["eng"]
    assert ipc_as(ENG, eng, home, "config.set", key="station.name", value="CT_ENG")["result"] == "CT_ENG"
    assert ipc_as(ENG, eng, home, "config.get", key="station.name")["result"] == "CT_ENG"
    target = roles["root"] / "out" / "eng.iso"
    done = ipc_as(ENG, eng, home, "burn", study_uids=[roles["study"]], iso=str(target), wait=True)
    assert done["result"]["state"] == "done", done
    assert ipc_as(ENG, eng, home, "cleanup", dry_run=True)["result"]["dry_run"] is True
    # root is an engineer too
    assert svc.call("config.get", key="station.name") == "CT_ENG"


def test_a_user_in_neither_group_cannot_open_the_socket(roles) -> None:
    svc: ServiceProcess = roles["service"]
    sock = svc.home.socket_path.stat()
    assert (stat.S_IMODE(sock.st_mode), sock.st_gid) == (0o660, roles["tech_gid"])
    top = svc.home.root.stat()
    assert (stat.S_IMODE(top.st_mode), top.st_gid) == (0o710, roles["tech_gid"])
    assert "refused" in ipc_as(STRANGER, [STRANGER], svc.home, "status")
    code, _, err = cli_as(STRANGER, [STRANGER], "--home", str(svc.home.root), "status")
    assert code == 1 and "permission denied" in err
    # nor read its files
    code, _, err = cli_as(STRANGER, [STRANGER], "--home", str(svc.home.root), "config", "get", "station.name")
    assert code == 1 and "permission denied" in err


def test_roles_from_user_and_groups(roles) -> None:
    tech, eng = roles["tech_gid"], grp.getgrnam(roles["eng_group"]).gr_gid
    both = config.Ipc(engineer_group=roles["eng_group"], technologist_group=roles["tech_group"])
    assert access.role_of(0, [], both) == access.ENGINEER
    assert access.role_of(os.geteuid(), [], both) == access.ENGINEER
    assert access.role_of(TECH, [tech], both) == access.TECHNOLOGIST
    assert access.role_of(ENG, [eng], both) == access.ENGINEER
    assert access.role_of(STRANGER, [STRANGER], both) is None
    assert access.role_of(STRANGER, [STRANGER], config.Ipc()) == access.ENGINEER  # no groups: as before roles
    only_eng = config.Ipc(engineer_group=roles["eng_group"])
    assert access.role_of(STRANGER, [STRANGER], only_eng) == access.TECHNOLOGIST
    assert access.socket_group(both) == tech and access.socket_group(config.Ipc()) is None


def test_every_method_has_a_schema_and_its_role_documented() -> None:
    from unittest import mock

    from modality_link.api import Api

    table = Api(mock.MagicMock()).methods()
    assert set(SCHEMAS) == set(table) | {"events.subscribe"}
    doc = (REPO / "docs" / "ipc.md").read_text(encoding="utf-8")
    roles_table = doc[doc.index("## Roles"):doc.index("## Events")]
    engineer_rows = [line for line in roles_table.splitlines() if line.endswith("| engineer |")]
    documented = set(re.findall(r"`([a-z_.]+)`", "\n".join(engineer_rows)))
    assert documented == set(ENGINEER_METHODS)
    every = set(re.findall(r"^\| (`.*`) \|", roles_table, flags=re.M))
    named = set(re.findall(r"`([a-z_.]+)`", "\n".join(every)))
    assert named == set(SCHEMAS)
