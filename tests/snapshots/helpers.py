"""Machines (real sshd), workspaces that look like a user's, and manifests to compare them."""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import os
import stat
import uuid
from pathlib import Path

from machines.providers.local.sshd import SshdError, SshdHandle, free_port, kill_machine_processes, start_sshd
from machines.ssh import SSHTarget, public_key_of

UNICODE_NAME = "données d'été ✓ (final).txt"


@dataclasses.dataclass
class Machine:
    id: str
    dir: Path
    handle: SshdHandle

    @property
    def workspace(self) -> Path:
        return self.dir / "workspace"

    @property
    def home(self) -> Path:
        return self.dir / "home"

    @property
    def restic(self) -> Path:
        return self.home / ".dumont" / "bin" / "restic"

    @property
    def target(self) -> SSHTarget:
        return SSHTarget("127.0.0.1", self.handle.port, "root", self.handle.host_public_key)

    def stop(self) -> None:
        with contextlib.suppress(TimeoutError):
            kill_machine_processes(self.id, self.dir)
        self.handle.stop()


class Machines:
    """Starts machines like the local marketplace does: own sshd, HOME and DUMONT_WORKSPACE."""

    def __init__(self, root: Path, control_key: Path):
        self.root = root
        self.control_key = control_key
        self.started: list[Machine] = []

    def start(self) -> Machine:
        machine_id = f"snap-{uuid.uuid4().hex[:8]}"
        machine_dir = self.root / machine_id
        (machine_dir / "workspace").mkdir(parents=True)
        ssh_dir = machine_dir / "home" / ".ssh"
        ssh_dir.mkdir(parents=True)
        (ssh_dir / "authorized_keys").write_text(public_key_of(self.control_key) + "\n")
        env = {"HOME": str(machine_dir / "home"), "DUMONT_WORKSPACE": str(machine_dir / "workspace"),
               "DUMONT_MACHINE_ID": machine_id}
        for _ in range(5):  # another process may take the free port first
            try:
                handle = start_sshd(machine_dir, port=free_port(), authorized_keys=ssh_dir / "authorized_keys",
                                    env=env)
                break
            except SshdError as exc:
                if "Address already in use" not in str(exc):
                    raise
        else:
            raise AssertionError("no free port for sshd after 5 tries")
        machine = Machine(machine_id, machine_dir, handle)
        self.started.append(machine)
        return machine

    def stop_all(self) -> None:
        for machine in self.started:
            machine.stop()


def make_workspace(root: Path, *, weights_mb: int = 2, source_files: int = 40) -> None:
    """A small GPU user's workspace: weights, data, logs, sources, and the awkward cases."""
    (root / "models").mkdir(parents=True, exist_ok=True)
    (root / "models" / "weights.bin").write_bytes(os.urandom(weights_mb << 20))
    (root / "data").mkdir(exist_ok=True)
    (root / "data" / "train.csv").write_text("".join(f"{i},{i * 0.5},label{i % 7}\n" for i in range(20000)))
    (root / "logs").mkdir(exist_ok=True)
    (root / "logs" / "run.log").write_text("step loss\n" * 5000)
    src = root / "src" / "pkg"
    src.mkdir(parents=True, exist_ok=True)
    for i in range(source_files):
        (src / f"module_{i}.py").write_text(f"def f{i}():\n    return {i}\n")
    script = root / "train.sh"
    script.write_text("#!/bin/sh\npython -m pkg\n")
    script.chmod(0o755)
    secret = root / ".netrc"
    secret.write_text("machine example.com login me password nope\n")
    secret.chmod(0o600)
    (root / UNICODE_NAME).write_text("unicode and spaces survive\n")
    (root / "empty dir" / "nested empty").mkdir(parents=True, exist_ok=True)
    (root / "latest.bin").symlink_to("models/weights.bin")
    (root / "dangling").symlink_to("does/not/exist")


def manifest(root: Path) -> dict[str, tuple]:
    """Every entry under root: kind, mode, and content hash (files), target (symlinks), mtime (files)."""
    entries: dict[str, tuple] = {}
    for dirpath, dirnames, filenames in os.walk(root):
        for name in dirnames + filenames:
            path = Path(dirpath) / name
            rel = str(path.relative_to(root))
            info = path.lstat()
            mode = stat.S_IMODE(info.st_mode)
            if stat.S_ISLNK(info.st_mode):
                entries[rel] = ("symlink", os.readlink(path))
            elif stat.S_ISDIR(info.st_mode):
                entries[rel] = ("dir", mode)
            else:
                digest = hashlib.sha256(path.read_bytes()).hexdigest()
                entries[rel] = ("file", mode, digest, int(info.st_mtime))
    return entries


def install_restic_wrapper(machine: Machine, body: str) -> None:
    """Put a shell script in front of the real restic on a machine (it still answers `version`)."""
    machine.restic.parent.mkdir(parents=True, exist_ok=True)
    machine.restic.write_text(f"#!/bin/sh\n{body}\n")
    machine.restic.chmod(0o755)


def processes_in(root: Path) -> list[int]:
    """Every process whose working directory is `root` (the dev S3 server starts all of its own there)."""
    root = root.resolve()
    found = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                if Path(os.readlink(entry / "cwd")) == root:
                    found.append(int(entry.name))
            except OSError:
                continue  # gone, or not ours to read
    return found
