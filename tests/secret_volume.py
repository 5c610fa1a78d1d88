"""A Kubernetes Secret volume on a local directory, updated the way the kubelet updates one.

The kubelet's atomic writer keeps each version of the Secret in its own hidden timestamped
directory, points the ``..data`` symlink at the current one, and makes every key a symlink
``KEY -> ..data/KEY``. An update writes a new directory, points a temporary symlink at it and
renames that over ``..data``: one rename, so a reader sees the old set or the new set, never
a mix. pqproxy's config names ``DIR/tls.crt``; its target changes without the path changing.
"""

from __future__ import annotations

import os
import shutil
from collections.abc import Mapping
from pathlib import Path

DATA = "..data"


class SecretVolume:
    """``SecretVolume(dir).update({"tls.crt": pem, "tls.key": pem})`` swaps in a new version."""

    def __init__(self, directory: Path) -> None:
        self.directory = directory
        self.version = 0
        directory.mkdir(parents=True, exist_ok=True)

    def path(self, key: str) -> Path:
        return self.directory / key

    def update(self, files: Mapping[str, bytes]) -> None:
        self.version += 1
        new_dir = self.directory / f"..{self.version:04d}_version"
        new_dir.mkdir()
        for key, content in files.items():
            (new_dir / key).write_bytes(content)
            os.chmod(new_dir / key, 0o600)
        old_target = os.readlink(self.directory / DATA) if self._has_data() else None
        tmp_link = self.directory / "..data_tmp"
        os.symlink(new_dir.name, tmp_link)
        os.replace(tmp_link, self.directory / DATA)  # the one atomic step
        for key in files:
            link = self.directory / key
            if not link.is_symlink():
                os.symlink(f"{DATA}/{key}", link)
        if old_target is not None:
            shutil.rmtree(self.directory / old_target)

    def update_from(self, cert: Path, key: Path) -> None:
        self.update({"tls.crt": cert.read_bytes(), "tls.key": key.read_bytes()})

    def _has_data(self) -> bool:
        return (self.directory / DATA).is_symlink()
