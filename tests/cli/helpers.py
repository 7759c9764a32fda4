"""Running the `dumont` command line as a user would: a subprocess from the checkout, its own config dir."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

from tests.harness import REPO_ROOT

CLI = [sys.executable, "-m", "dumont_cli"]


def dumont(*args: str, env: dict, timeout: float = 300, check: bool = True) -> subprocess.CompletedProcess:
    done = subprocess.run([*CLI, *args], cwd=REPO_ROOT, env=env, capture_output=True, text=True, timeout=timeout)
    if check:
        assert done.returncode == 0, f"dumont {' '.join(args)} exited {done.returncode}:\n{done.stdout}\n{done.stderr}"
    return done


def ssh_keypair(directory: Path) -> Path:
    key = directory / "id_ed25519"
    subprocess.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-f", str(key)], check=True)
    return key


def ssh(config: Path, key: Path, host: str, *command: str, timeout: float = 300) -> subprocess.CompletedProcess:
    """A real OpenSSH client, with only the given config (not the machine's own or ~/.ssh/config)."""
    return subprocess.run(
        ["ssh", "-F", str(config), "-i", str(key), "-o", "IdentitiesOnly=yes", "-o", "BatchMode=yes", host,
         *command],
        capture_output=True, text=True, timeout=timeout, stdin=subprocess.DEVNULL,
    )
