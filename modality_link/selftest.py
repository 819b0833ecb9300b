"""`modality-link selftest`: a pass/fail table a service engineer shows to prove the console
works (docs/design.md "Self-test").

The checks, one row each (several for the listeners, nodes and drives):

- **service**: the running service answered the request (or: none runs);
- **home permissions**: folders 0700, files 0600, the IPC socket at most 0660 (patient data
  readable by no other local user);
- **free space**: the archive's file system has more than the ``archive.min_free_mb`` reserve
  (below it C-STOREs are refused with A700, PS3.4 B.2.3);
- **database integrity**: SQLite's ``PRAGMA integrity_check``;
- **archive files**: every indexed file exists with the size the index holds, and every file
  in the archive is indexed;
- **listener** (disk and memory server): an association and a C-ECHO (PS3.4 Annex A) to
  ourselves on the port;
- **identity**: no setting makes a Storage Commitment report or a C-MOVE unreachable (the
  listener's AE title is the station's, it listens where the nodes can reach it);
- **node** (each configured node): C-ECHO with the function the `echo` command uses;
- **drive** (each optical drive): it answers and says what medium it holds.

With a service running the checks run inside it (IPC ``selftest``), as its user, against its
bound listeners and its drives. Without one they run in the command itself (:func:`run_directly`):
the listeners are opened for the C-ECHO only (which shows the ports can be bound), and the row
``service`` fails - a console whose service does not run is not working.
"""

from __future__ import annotations

import dataclasses
import fcntl
import os
import stat
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterable

from modality_link.config import Config, Listener, Node, warnings
from modality_link.db.check import DatabaseUnreadable, indexed_files, integrity_problems
from modality_link.home import Home
from modality_link.net.acceptor import C_ECHO_RQ, Acceptor, Service
from modality_link.net.echo import echo
from modality_link.net.servers import DECODED_TRANSFER_SYNTAXES, VERIFICATION, EchoHandler

#: How many offending paths a row names.
EXAMPLES = 3
#: The listening AEs of the configuration (section names) and how a row calls them.
LISTENERS = {"disk_server": "disk server", "memory_server": "memory server"}


@dataclass
class Check:
    """One row of the table."""

    name: str
    ok: bool
    detail: str


@dataclass
class Report:
    """The table, and where it was made: ``service`` (in the running service) or ``direct``."""

    mode: str
    checks: list[Check]

    @property
    def ok(self) -> bool:
        return all(c.ok for c in self.checks)

    def to_dict(self) -> dict[str, Any]:
        return {"ok": self.ok, "mode": self.mode, "checks": [dataclasses.asdict(c) for c in self.checks]}


#: What the listing of the drives gives (``drives.list``, docs/ipc.md).
DriveList = Callable[[], list[dict[str, Any]]]


def run(home: Home, cfg: Config, service: Check, listening: dict[str, int] | None, drives: DriveList,
        settle: Callable[[], object] | None = None) -> Report:
    """Every check, in the order of the table. `listening`: the port each running listener is
    bound to (None: no service runs; each enabled listener is opened for its check); `settle`
    waits until what has been received is indexed (a running service's archive)."""
    entries = scan(home.root)
    checks = [
        service,
        check_permissions(home.root, entries),
        check_free_space(home.archive_dir, cfg),
        check_database(home.db_path),
        check_files(home, archive_files(home, entries), settle),
    ]
    for key, label in LISTENERS.items():
        listener: Listener = getattr(cfg, key)
        port = None if listening is None else listening.get(key, 0)
        checks.append(check_listener(label, listener, port, cfg))
    checks.append(check_identity(cfg))
    checks += [check_node(name, node, cfg) for name, node in cfg.nodes.items()]
    checks += check_drives(drives)
    return Report("direct" if listening is None else "service", checks)


def check_identity(cfg: Config) -> Check:
    """The AE titles and addresses peers answer to: a Storage Commitment report or a C-MOVE
    that cannot reach us fails here (:func:`modality_link.config.warnings`)."""
    found = warnings(cfg)
    if found:
        return Check("identity", False, "; ".join(found))
    return Check("identity", True, f"the disk server answers to {cfg.disk_server.ae_title}, the AE title "
                                   f"of our requests (station.ae_title)" if cfg.disk_server.enabled
                 else "no disk server; no node sends to us")


def run_directly(home: Home) -> Report:
    """The checks without a running service, in this process (see the module docstring)."""
    from modality_link.burns import list_drives

    cfg = home.load_config()
    service = Check("service", False, _not_running(home))
    return run(home, cfg, service, None, lambda: list_drives(cfg.media.drives, set()))


def _not_running(home: Home) -> str:
    lock = home.root / "service.lock"
    if lock.exists():
        with open(lock, "rb") as fh:
            try:
                fcntl.flock(fh, fcntl.LOCK_SH | fcntl.LOCK_NB)
            except BlockingIOError:
                return (f"a service holds {lock} but does not answer on {home.socket_path}: "
                        "hung or still starting")
    return (f"not running (no answer on {home.socket_path}); the other checks ran in this command "
            f"as uid {os.geteuid()}")


# -- the home -------------------------------------------------------------------------------------


def scan(root: Path) -> dict[str, os.stat_result]:
    """Every entry below `root` (and `root` itself, as "."), not following links: relative
    path -> lstat."""
    out = {".": os.lstat(root)}
    for folder, dirs, files in os.walk(root):
        for name in (*dirs, *files):
            path = os.path.join(folder, name)
            try:
                out[os.path.relpath(path, root)] = os.lstat(path)
            except FileNotFoundError:  # removed meanwhile (a temporary)
                pass
    return out


def _too_open(st: os.stat_result) -> bool:
    mode = stat.S_IMODE(st.st_mode)
    if stat.S_ISLNK(st.st_mode):
        return False
    if stat.S_ISSOCK(st.st_mode):  # the IPC socket: its group may connect
        return bool(mode & 0o007)
    return bool(mode & 0o077)


def check_permissions(root: Path, entries: dict[str, os.stat_result]) -> Check:
    """Folders 0700, files 0600, the IPC socket at most 0660: nothing for other users."""
    bad = sorted(path for path, st in entries.items() if _too_open(st))
    if not bad:
        return Check("home permissions", True, f"{len(entries)} entries: folders 0700, files 0600, "
                                               "socket at most 0660")
    shown = ", ".join(f"{'home' if p == '.' else p} {stat.S_IMODE(entries[p].st_mode):04o}" for p in bad[:EXAMPLES])
    return Check("home permissions", False, f"{len(bad)} of {len(entries)} entries readable or writable by "
                                            f"other users (expected folders 0700, files 0600): {shown}"
                                            + (", ..." if len(bad) > EXAMPLES else ""))


def check_free_space(archive_dir: Path, cfg: Config) -> Check:
    """More free space than the ``archive.min_free_mb`` reserve."""
    st = os.statvfs(archive_dir)
    free_mb = st.f_bavail * st.f_frsize >> 20
    total_mb = st.f_blocks * st.f_frsize >> 20
    reserve = cfg.archive.min_free_mb
    detail = f"{free_mb} MiB free of {total_mb} MiB; reserve archive.min_free_mb = {reserve} MiB"
    if cfg.archive.quota_mb:
        detail += f", quota archive.quota_mb = {cfg.archive.quota_mb} MiB"
    if free_mb <= reserve:
        return Check("free space", False, detail + ": C-STOREs are refused (A700, out of resources)")
    return Check("free space", True, detail)


def check_database(db_path: Path) -> Check:
    problems = integrity_problems(db_path)
    if problems:
        return Check("database integrity", False, "; ".join(problems[:EXAMPLES]))
    return Check("database integrity", True, "PRAGMA integrity_check: ok")


def archive_files(home: Home, entries: dict[str, os.stat_result]) -> dict[str, int]:
    """The archive's files (STUDY/SERIES/SOP.dcm, as the index names them) and their sizes."""
    prefix = os.path.relpath(home.archive_dir, home.root) + os.sep
    out = {}
    for path, st in entries.items():
        if path.startswith(prefix) and path.endswith(".dcm") and stat.S_ISREG(st.st_mode):
            rel = Path(path[len(prefix):])
            if len(rel.parts) == 3 and not rel.parts[0].startswith("."):
                out[rel.as_posix()] = st.st_size
    return out


def _differences(indexed: dict[str, int], on_disk: dict[str, int]) -> list[str]:
    missing = sorted(indexed.keys() - on_disk.keys())
    unindexed = sorted(on_disk.keys() - indexed.keys())
    resized = sorted(p for p in indexed.keys() & on_disk.keys() if indexed[p] != on_disk[p])
    out = []
    for paths, what in ((missing, "indexed but missing"), (resized, "not of their indexed size"),
                        (unindexed, "in the archive but not indexed")):
        if paths:
            out.append(f"{len(paths)} file(s) {what} ({', '.join(paths[:EXAMPLES])}"
                       + (", ...)" if len(paths) > EXAMPLES else ")"))
    return out


def check_files(home: Home, on_disk: dict[str, int], settle: Callable[[], object] | None) -> Check:
    """Index rows against files. In a running service a file may be between its rename and its
    row, or a study between its files and its rows being deleted: after `settle` the archive is
    looked at once more before a difference counts."""
    try:
        indexed = indexed_files(home.db_path)
        problems = _differences(indexed, on_disk)
        if problems and settle is not None:
            settle()
            indexed = indexed_files(home.db_path)
            problems = _differences(indexed, archive_files(home, scan(home.root)))
    except DatabaseUnreadable as exc:
        return Check("archive files", False, f"cannot read the index: {exc}")
    if problems:
        return Check("archive files", False, "; ".join(problems))
    return Check("archive files", True, f"{len(indexed)} indexed file(s), each present with its size; "
                                        "no unindexed file")


# -- DICOM ----------------------------------------------------------------------------------------


def self_node(listener: Listener, port: int) -> Node:
    """The node that reaches our own listening AE on `port` (its bind address, else loopback)."""
    host = listener.bind_address
    if host in ("", "0.0.0.0"):
        host = "127.0.0.1"
    elif host == "::":
        host = "::1"
    return Node(ae_title=listener.ae_title, host=host, port=port, roles=[])


def _calling_ae(listener: Listener, cfg: Config) -> str:
    """Our station's AE title, or the first the listener allows when it does not allow ours."""
    allowed = [a.strip() for a in listener.allowed_calling_aets]
    if allowed and cfg.station.ae_title.strip() not in allowed:
        return allowed[0]
    return cfg.station.ae_title


def check_listener(label: str, listener: Listener, port: int | None, cfg: Config) -> Check:
    """C-ECHO to our own listening AE: bound to `port` by the service, 0 when the service
    does not run it, None when no service runs (then it is opened for the C-ECHO only)."""
    name = f"listener {label}"
    if not listener.enabled:
        return Check(name, True, "disabled in the configuration")
    if port == 0:
        return Check(name, False, f"{listener.ae_title} is enabled but not listening")
    acceptor = None
    if port is None:
        acceptor = Acceptor(listener, cfg.timeouts,
                            [Service([VERIFICATION], DECODED_TRANSFER_SYNTAXES, {C_ECHO_RQ: EchoHandler()})],
                            f"selftest {label}")
        try:
            acceptor.start()
        except OSError as exc:
            return Check(name, False, f"cannot listen on port {listener.port}: {exc.strerror or exc}")
        port = acceptor.port
    try:
        node = self_node(listener, port)
        return _echo_row(name, label, node, _calling_ae(listener, cfg), cfg)
    finally:
        if acceptor is not None:
            acceptor.stop()


def check_node(name: str, node: Node, cfg: Config) -> Check:
    """C-ECHO to a configured node, as the `echo` command does."""
    return _echo_row(f"node {name}", name, node, cfg.station.ae_title, cfg)


def _echo_row(row: str, name: str, node: Node, calling_ae: str, cfg: Config) -> Check:
    where = f"{node.ae_title}@{node.host}:{node.port}"
    try:
        res = echo(name, node, calling_ae, cfg.timeouts)
    except Exception as exc:  # an echo that raises (an address it cannot resolve...) fails its row only
        return Check(row, False, f"{where}: {type(exc).__name__}: {exc}")
    return Check(row, res.ok, f"{where}: C-ECHO {res.message} ({res.rtt_ms:.0f} ms)")


# -- drives ---------------------------------------------------------------------------------------


def check_drives(drives: DriveList) -> list[Check]:
    """One row per optical drive: it answers and says what it holds."""
    try:
        found = drives()
    except Exception as exc:  # a configured drive name that cannot be opened
        return [Check("drives", False, f"{type(exc).__name__}: {exc}")]
    if not found:
        return [Check("drives", True, "no drive found or configured")]
    return [_drive_row(d) for d in found]


def _drive_row(drive: dict[str, Any]) -> Check:
    name = f"drive {drive['device']}"
    media = drive.get("media")
    if media is None:
        return Check(name, False, f"{drive.get('description', '')}: {drive.get('error', 'no answer')}")
    if not media.get("present"):
        held = "no disc"
    else:
        held = f"{media.get('kind') or 'disc'} {media.get('state')}"
    busy = ", burning" if drive.get("busy") else ""
    return Check(name, True, f"{drive.get('description', '')}: {held}{busy}")


def table(checks: Iterable[Check]) -> list[str]:
    """The rows as text lines: CHECK, PASS or FAIL, DETAIL."""
    rows = list(checks)
    width = max([len("CHECK"), *(len(c.name) for c in rows)])
    lines = [f"{'CHECK':<{width}}  RESULT  DETAIL"]
    lines += [f"{c.name:<{width}}  {'PASS' if c.ok else 'FAIL':<6}  {c.detail}" for c in rows]
    return lines
