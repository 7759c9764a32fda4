"""The control plane's own SSH key: generated once under DUMONT_DATA_DIR, installed on every machine."""

from __future__ import annotations

import fcntl
from pathlib import Path

from django.conf import settings

from machines.ssh import generate_keypair


def control_plane_key_path() -> Path:
    """Path of the private key, created on first use (under a file lock: workers start together)."""
    path = Path(settings.DUMONT_SSH_KEY_PATH)
    if not path.exists():
        path.parent.mkdir(parents=True, exist_ok=True)
        with open(path.parent / ".keygen.lock", "w") as lock:
            fcntl.flock(lock, fcntl.LOCK_EX)
            if not path.exists():
                generate_keypair(path)
    return path


def control_plane_public_key() -> str:
    path = control_plane_key_path()
    return path.with_name(path.name + ".pub").read_text().strip()
