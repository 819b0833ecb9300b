"""The home folder: config, database, archive, IPC socket and logs of one service."""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

from modality_link import config


@dataclass(frozen=True)
class Home:
    root: Path

    @classmethod
    def resolve(cls, arg: str | os.PathLike | None = None) -> "Home":
        """`--home`, else ``$MODALITY_LINK_HOME``, else ``~/.local/share/modality-link``."""
        if arg is None:
            arg = os.environ.get("MODALITY_LINK_HOME") or Path.home() / ".local/share/modality-link"
        return cls(Path(arg).expanduser().absolute())

    @property
    def config_path(self) -> Path:
        return self.root / config.CONFIG_FILE

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
        """Create the folders, and a default config file on first use."""
        for d in (self.root, self.archive_dir, self.tmp_dir, self.log_dir):
            d.mkdir(parents=True, exist_ok=True)
        if not self.config_path.exists():
            config.save(config.Config(), self.config_path)

    def load_config(self) -> config.Config:
        self.ensure()
        return config.load(self.config_path)
