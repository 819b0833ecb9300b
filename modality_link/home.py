"""The home folder: config, database, archive, IPC socket and logs of one service.

Only the service's user may read it (docs/design.md "Files and permissions"): folders 0700,
files 0600, the IPC socket 0660 for the group that may use it (the home folder then 0710 of that
group, so that its members reach the socket and nothing else). :meth:`Home.secure` tightens a
home made before these modes.

:func:`temporary_home` builds a throw-away home with its listeners on free loopback ports, for
the demo, the tests and the benchmarks (one helper, so that they all get short socket paths and
the same defaults).
"""

from __future__ import annotations

import os
import socket
import stat
from pathlib import Path
from typing import TYPE_CHECKING, Any, Mapping, NamedTuple

if TYPE_CHECKING:
    from modality_link import config

#: The config file's name in a home (``modality_link.config`` reads and writes it). The config
#: module is imported where it is used, not here: every CLI command starts with a Home, and the
#: thin IPC clients should not pay for loading the TOML and dataclass machinery they never use.
CONFIG_FILE = "config.toml"

#: The mode of the home's folders and of its files (docs/design.md "Files and permissions").
DIR_MODE = 0o700
FILE_MODE = 0o600


class Home(NamedTuple):
    """The folder of one service (``--home``)."""

    root: Path

    @classmethod
    def resolve(cls, arg: str | os.PathLike | None = None) -> "Home":
        """`--home`, else ``$MODALITY_LINK_HOME``, else ``~/.local/share/modality-link``."""
        if arg is None:
            arg = os.environ.get("MODALITY_LINK_HOME") or Path.home() / ".local/share/modality-link"
        return cls(Path(arg).expanduser().absolute())

    @property
    def config_path(self) -> Path:
        return self.root / CONFIG_FILE

    @property
    def db_path(self) -> Path:
        return self.root / "index.sqlite"

    @property
    def archive_dir(self) -> Path:
        return self.root / "archive"

    @property
    def tmp_dir(self) -> Path:
        """Received and imported files are written here first, on the archive's file system."""
        return self.root / "archive" / ".tmp"

    @property
    def socket_path(self) -> Path:
        return self.root / "ipc.sock"

    @property
    def log_dir(self) -> Path:
        return self.root / "logs"

    def ensure(self) -> None:
        """Create the folders (0700), and a default config file (0600) on first use."""
        for d in (self.root, self.archive_dir, self.tmp_dir, self.log_dir):
            d.mkdir(mode=DIR_MODE, parents=True, exist_ok=True)
        if not self.config_path.exists():
            from modality_link import config

            config.save(config.Config(), self.config_path)

    def secure(self, group: int | None = None) -> list[str]:
        """Give the home the modes of docs/design.md "Files and permissions"; one sentence per
        change. The home folder is 0700, or 0710 of `group` (the IPC socket's) when one is
        given; its folders (archive, logs, the archive's temporaries) 0700; the files in it and
        in the logs folder 0600. Inside the archive, reachable only through its 0700 folder,
        nothing is walked. Symbolic links are left alone (never followed)."""
        changes: list[str] = []

        def fix(path: Path, mode: int, gid: int | None = None) -> None:
            try:
                st = os.lstat(path)
            except FileNotFoundError:
                return
            if stat.S_ISLNK(st.st_mode) or stat.S_ISSOCK(st.st_mode):
                return
            try:
                if gid is not None and st.st_gid != gid:
                    os.chown(path, -1, gid, follow_symlinks=False)
                    changes.append(f"tightened {path}: group {st.st_gid} -> {gid}")
                if stat.S_IMODE(st.st_mode) != mode:
                    os.chmod(path, mode)
                    changes.append(f"tightened {path}: mode {stat.S_IMODE(st.st_mode):04o} -> {mode:04o}")
            except PermissionError as exc:  # another user's file: said, not fatal
                changes.append(f"could not tighten {path} (mode {stat.S_IMODE(st.st_mode):04o}): {exc.strerror}")

        fix(self.root, DIR_MODE if group is None else 0o710, group)
        for folder in (self.root, self.log_dir):
            for entry in sorted(folder.iterdir()) if folder.is_dir() else []:
                st = os.lstat(entry)
                if stat.S_ISDIR(st.st_mode):
                    fix(entry, DIR_MODE)
                elif stat.S_ISREG(st.st_mode):
                    fix(entry, FILE_MODE)
        fix(self.tmp_dir, DIR_MODE)
        return changes

    def load_config(self) -> "config.Config":
        from modality_link import config

        self.ensure()
        return config.load(self.config_path)


#: The archive quota of a demo's or a test's home (MiB).
TEMPORARY_QUOTA_MB = 10240


def free_port(host: str = "127.0.0.1") -> int:
    """A TCP port that nothing listens on at the moment (the OS picks it)."""
    with socket.socket() as s:
        s.bind((host, 0))
        return int(s.getsockname()[1])


def temporary_home(
    root: str | os.PathLike | None = None,
    *,
    nodes: Mapping[str, config.Node] | None = None,
    disk_server: bool = True,
    prefix: str = "ml",
    **settings: Any,
) -> Home:
    """A home for a demo or a test: listeners on free loopback ports, the given nodes.

    `root` defaults to a new folder from ``tempfile.mkdtemp(prefix=prefix)``: keep `prefix`
    short, the IPC socket path must stay under the 108 bytes of ``sun_path`` (unix(7)).
    `disk_server` False disables the disk server. `settings` are further config values named
    ``section__key`` (``timeouts__connect=1.0``). The caller removes the folder.

    A new home's archive gets a quota (:data:`TEMPORARY_QUOTA_MB`): the disk clean-up then
    measures the archive itself, not the machine's disk, which may happen to be nearly full
    (docs/design.md "Disk clean-up").
    """
    import tempfile

    from modality_link import config

    home = Home(Path(root) if root is not None else Path(tempfile.mkdtemp(prefix=prefix)))
    new = not home.config_path.exists()
    home.ensure()
    if len(bytes(home.socket_path)) >= 108:
        raise ValueError(f"{home.socket_path}: a Unix socket path must be shorter than 108 bytes")
    cfg = config.load(home.config_path)
    cfg.disk_server.enabled = disk_server
    cfg.disk_server.port = free_port()
    cfg.disk_server.bind_address = "127.0.0.1"
    cfg.memory_server.port = free_port()
    cfg.memory_server.bind_address = "127.0.0.1"
    cfg.nodes.update(nodes or {})
    if new:
        cfg.archive.quota_mb = TEMPORARY_QUOTA_MB
    for key, value in settings.items():
        section, name = key.split("__")
        setattr(getattr(cfg, section), name, value)
    config.save(cfg, home.config_path)
    return home
