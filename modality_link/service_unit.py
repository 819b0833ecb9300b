"""`modality-link install-service`: the systemd unit that starts the service with the OS, and
the system user it runs as (docs/design.md "Unattended operation").

The unit (systemd.service(5), systemd.exec(5)) is ``Type=notify``: the service says when it
serves and pings the watchdog (:mod:`modality_link.systemd`); ``Restart=on-failure`` brings it
back after a crash or a missed ping; ``TimeoutStopSec=`` bounds the drain after SIGTERM. It runs
as its own unprivileged user, may write only its home, and may bind the DICOM port 104 through
``CAP_NET_BIND_SERVICE`` and nothing else.

:func:`plan` says what an installation does, :func:`install` does it; ``--root DIR`` writes
the unit and the home below DIR without touching users or systemd (packaging, tests), and
``--dry-run`` only says what would be done.
"""

from __future__ import annotations

import grp
import os
import pwd
import re
import subprocess
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Sequence

UNIT_NAME = "modality-link.service"
UNIT_DIR = Path("etc/systemd/system")
DEFAULT_USER = "modality-link"
DEFAULT_HOME = Path("/var/lib/modality-link")
#: systemd restarts the service when no keep-alive came for this long (the service pings at
#: half of it).
WATCHDOG_SEC = 60
#: The drain after SIGTERM ends well within this; then systemd kills what is left.
TIMEOUT_STOP_SEC = 90
#: Start-up includes the archive's reconcile, which reads every unindexed file once.
TIMEOUT_START_SEC = 300
#: The group that may open the optical drives on Debian and its derivatives (burning).
DRIVE_GROUP = "cdrom"
#: Folders that ProtectHome= hides: a home or an interpreter below them needs "read-only".
_HOME_TREES = (Path("/home"), Path("/root"), Path("/run/user"))
#: Homes refused outright: handing one of them to the service user would break the system.
_SYSTEM_FOLDERS = {Path(p) for p in ("/", "/bin", "/boot", "/dev", "/etc", "/home", "/lib", "/opt", "/proc",
                                      "/root", "/run", "/sbin", "/srv", "/sys", "/tmp", "/usr", "/var",
                                      "/var/lib", "/var/log")}


class InstallError(Exception):
    """The installation cannot go on; the message says why."""


@dataclass
class Installation:
    """What `install-service` installs, and where."""

    user: str = DEFAULT_USER
    home: Path = DEFAULT_HOME
    #: Everything is written below this folder; "/" is the running system.
    root: Path = Path("/")
    #: The interpreter that runs ``-m modality_link`` (the one installing, by default).
    python: str = sys.executable
    #: Supplementary groups of the service (the optical drives' group, when the system has it).
    groups: list[str] = field(default_factory=list)

    @property
    def system(self) -> bool:
        """Whether this installs into the running system (users, ownership, systemctl)."""
        return self.root.resolve() == Path("/")

    @property
    def unit_path(self) -> Path:
        return self.root / UNIT_DIR / UNIT_NAME

    @property
    def home_path(self) -> Path:
        return self.root / self.home.relative_to("/")


def _quoted(arg: str) -> str:
    """An ExecStart= word (systemd.syntax(7)): quoted when it holds a space, a quote or a
    backslash; a "%" (a specifier) doubled."""
    arg = arg.replace("%", "%%")
    if any(c in arg for c in " \t\"'\\"):
        return '"' + arg.replace("\\", "\\\\").replace('"', '\\"') + '"'
    return arg


def _protect_home(inst: Installation) -> str:
    paths = (inst.home, Path(inst.python))
    below = any(p == tree or tree in p.parents for p in paths for tree in _HOME_TREES)
    return "read-only" if below else "yes"


def render_unit(inst: Installation) -> str:
    """The unit file's text."""
    home = str(inst.home)
    exec_start = " ".join(_quoted(a) for a in (inst.python, "-m", "modality_link", "--home", home, "serve"))
    groups = f"SupplementaryGroups={' '.join(inst.groups)}\n" if inst.groups else ""
    return f"""\
# modality_link: DICOM connectivity service of the scanner console.
# Written by `modality-link install-service`; docs/design.md "Unattended operation".
[Unit]
Description=modality_link DICOM connectivity service
After=network-online.target
Wants=network-online.target
StartLimitIntervalSec=600
StartLimitBurst=5

[Service]
Type=notify
NotifyAccess=main
User={inst.user}
Group={inst.user}
{groups}Environment=MODALITY_LINK_HOME={_quoted(home)}
Environment=PYTHONUNBUFFERED=1
ExecStart={exec_start}
WorkingDirectory={_quoted(home)}
UMask=0077
Restart=on-failure
RestartSec=5
WatchdogSec={WATCHDOG_SEC}
TimeoutStartSec={TIMEOUT_START_SEC}
TimeoutStopSec={TIMEOUT_STOP_SEC}
# SIGTERM to the service only; its helpers (xorriso) are stopped by the service's drain
KillMode=mixed

# Hardening (systemd.exec(5)): the home is the only place it writes.
NoNewPrivileges=yes
ProtectSystem=strict
ReadWritePaths={_quoted(home)}
ProtectHome={_protect_home(inst)}
PrivateTmp=yes
ProtectKernelTunables=yes
ProtectKernelModules=yes
ProtectKernelLogs=yes
ProtectControlGroups=yes
ProtectClock=yes
ProtectHostname=yes
RestrictNamespaces=yes
RestrictRealtime=yes
RestrictSUIDSGID=yes
LockPersonality=yes
SystemCallArchitectures=native
# IPC socket and sd_notify, DICOM over IPv4/IPv6, udev's netlink (optical drives)
RestrictAddressFamilies=AF_UNIX AF_INET AF_INET6 AF_NETLINK
# DICOM's registered port 104 is below 1024
CapabilityBoundingSet=CAP_NET_BIND_SERVICE
AmbientCapabilities=CAP_NET_BIND_SERVICE

[Install]
WantedBy=multi-user.target
"""


def default_groups() -> list[str]:
    """The supplementary groups the running system has for the service (the drives' group)."""
    try:
        grp.getgrnam(DRIVE_GROUP)
    except KeyError:
        return []
    return [DRIVE_GROUP]


def _user_exists(name: str) -> bool:
    try:
        pwd.getpwnam(name)
    except KeyError:
        return False
    return True


#: Runs one command; raises :class:`subprocess.CalledProcessError` when it fails.
Runner = Callable[[Sequence[str]], None]


def _run(cmd: Sequence[str]) -> None:
    subprocess.run(list(cmd), check=True, capture_output=True, text=True)


def check(inst: Installation, as_root: bool = True) -> None:
    """Refuse what cannot be installed: a relative or system folder as home, a user name
    useradd(8) refuses by default, a system install without root, a home that holds something
    else (it is handed to the service user). `as_root` False: a dry run, which needs no root."""
    if not inst.home.is_absolute():
        raise InstallError(f"--home {inst.home}: give an absolute path")
    if inst.home.resolve() in _SYSTEM_FOLDERS or inst.home in _SYSTEM_FOLDERS:
        raise InstallError(f"--home {inst.home}: a system folder cannot be the service's home")
    if not re.fullmatch(r"[a-z_][a-z0-9_-]{0,31}", inst.user):
        raise InstallError(f"--user {inst.user!r}: a system user name is 1-32 of a-z, 0-9, '_' and '-', "
                           "not starting with a digit or '-'")
    if as_root and inst.system and os.geteuid() != 0:
        raise InstallError("installing a system service needs root: run it with sudo (or use --dry-run)")
    home = inst.home_path
    if home.is_dir() and any(home.iterdir()) and not (home / "config.toml").exists():
        raise InstallError(f"{inst.home} is not empty and not a modality-link home; choose another --home")


def plan(inst: Installation) -> list[str]:
    """What :func:`install` will do, one sentence each."""
    steps = []
    if not inst.system:
        steps.append(f"skip the system user {inst.user} (not the running system: --root {inst.root})")
    elif _user_exists(inst.user):
        steps.append(f"use the existing system user {inst.user}")
    else:
        steps.append(f"create the system user {inst.user} (its own group, no login shell, home {inst.home})")
    steps.append(f"create the home {inst.home_path} (mode 0700"
                 + (f", owned by {inst.user})" if inst.system else ")"))
    steps.append(f"write {inst.unit_path} (mode 0644)")
    if inst.system:
        steps.append(f"systemctl daemon-reload; systemctl enable {UNIT_NAME}")
    else:
        steps.append("skip systemctl (not the running system)")
    return steps


def install(inst: Installation, run: Runner = _run) -> list[str]:
    """Install: the user, the home, the unit, systemd told. Returns what was done, one
    sentence each; raises :class:`InstallError` (nothing more done) when a step fails."""
    check(inst)
    done = []
    try:
        if inst.system and not _user_exists(inst.user):
            run(["useradd", "--system", "--user-group", "--home-dir", str(inst.home), "--no-create-home",
                 "--shell", "/usr/sbin/nologin", "--comment", "modality_link DICOM service", inst.user])
            done.append(f"created the system user {inst.user}")
        done.append(_make_home(inst))
        done.append(_write_unit(inst))
        if inst.system:
            run(["systemctl", "daemon-reload"])
            run(["systemctl", "enable", UNIT_NAME])
            done.append(f"enabled {UNIT_NAME}: it starts with the system")
    except subprocess.CalledProcessError as exc:
        out = (exc.stderr or exc.stdout or "").strip()
        raise InstallError(f"{' '.join(exc.cmd)} failed (exit {exc.returncode}): {out}") from None
    except OSError as exc:
        raise InstallError(str(exc)) from None
    return done


def _make_home(inst: Installation) -> str:
    home = inst.home_path
    new = not home.exists()
    home.mkdir(mode=0o700, parents=True, exist_ok=True)
    os.chmod(home, 0o700)
    if not inst.system:
        return f"{'created' if new else 'kept'} the home {home} (mode 0700)"
    user = pwd.getpwnam(inst.user)
    for folder, dirs, files in os.walk(home):
        for name in (folder, *(os.path.join(folder, n) for n in (*dirs, *files))):
            os.chown(name, user.pw_uid, user.pw_gid, follow_symlinks=False)
    return f"{'created' if new else 'kept'} the home {home} (mode 0700), owned by {inst.user}"


def _write_unit(inst: Installation) -> str:
    path = inst.unit_path
    text = render_unit(inst)
    if path.exists() and path.read_text(encoding="utf-8") == text:
        return f"{path} is up to date"
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "w", encoding="utf-8") as fh:
        fh.write(text)
        fh.flush()
        os.fsync(fh.fileno())
    os.chmod(tmp, 0o644)
    os.replace(tmp, path)
    return f"wrote {path}"
