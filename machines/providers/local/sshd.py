"""A real OpenSSH server per local machine: what makes a local-marketplace instance reachable over SSH.

Each machine directory gets its own host key (generated once, reused on restart, so the key the
control plane pinned stays valid), its own sshd_config and its own `sshd -D` child listening on
127.0.0.1. Django-free: the marketplace service imports this directly.
"""

from __future__ import annotations

import contextlib
import os
import re
import shutil
import signal
import socket
import subprocess
import time
from pathlib import Path

from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

SBIN_DIRS = ("/usr/local/sbin", "/usr/sbin", "/sbin")  # as dumont/preflight.py looks
INSTALL_HINT = "install openssh-server (sudo apt-get install -y openssh-server), or run `make run`, whose preflight does"
HOST_KEY_NAME = "ssh_host_ed25519_key"
_ENV_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_]*\Z")


class SshdError(RuntimeError):
    """sshd did not come up (bad config, port taken, ...). The message carries sshd's own log."""


class SshdMissing(SshdError):
    """No sshd on this machine: no local machine can boot until it is installed."""


def sshd_binary() -> str:
    """sshd must be started by its absolute path (it re-executes itself). DUMONT_SSHD_BINARY overrides."""
    configured = os.environ.get("DUMONT_SSHD_BINARY")
    if configured:
        return configured
    dirs = [d for d in os.environ.get("PATH", "").split(os.pathsep) if d] + list(SBIN_DIRS)
    found = shutil.which("sshd", path=os.pathsep.join(dirs))
    if found is None:
        raise SshdMissing(f"sshd is not installed on the marketplace's machine: {INSTALL_HINT}")
    return str(Path(found).resolve())


def free_port() -> int:
    """A loopback port the kernel says is free now (another process may still take it first)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class SshdHandle:
    def __init__(self, process: subprocess.Popen[bytes], port: int, host_public_key: str, machine_dir: Path):
        self.process = process
        self.pid = process.pid
        self.port = port
        self.host_public_key = host_public_key
        self.machine_dir = machine_dir

    def __repr__(self) -> str:
        return f"SshdHandle(pid={self.pid}, port={self.port}, dir={str(self.machine_dir)!r})"

    @property
    def running(self) -> bool:
        return self.process.poll() is None

    def stop(self, timeout: float = 5.0) -> None:
        """Stop the listener and every per-connection sshd it forked (they outlive a killed parent)."""
        children: list[tuple[int, str]] = []
        if self.process.poll() is None:  # once reaped, the pid may belong to someone else
            children = [(p, _start_time(p)) for p in _descendants(self.pid)]
            for pid in [self.pid, *(p for p, _ in children)]:
                _signal(pid, signal.SIGTERM)
        try:
            self.process.wait(timeout)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait(timeout)
        _wait_gone(children, time.monotonic() + timeout, escalate=True)
        with contextlib.suppress(FileNotFoundError):
            (self.machine_dir / "sshd.pid").unlink()


def ensure_host_key(machine_dir: Path) -> str:
    """The machine's ed25519 host key: created on first start, reused afterwards. Returns the public line."""
    key_path = machine_dir / HOST_KEY_NAME
    pub_path = machine_dir / f"{HOST_KEY_NAME}.pub"
    if not key_path.exists():
        key = Ed25519PrivateKey.generate()
        private = key.private_bytes(
            serialization.Encoding.PEM, serialization.PrivateFormat.OpenSSH, serialization.NoEncryption()
        )
        public = key.public_key().public_bytes(
            serialization.Encoding.OpenSSH, serialization.PublicFormat.OpenSSH
        )
        tmp = key_path.with_suffix(".tmp")
        # sshd refuses host keys readable by others, so the file is born 0600.
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(fd, "wb") as f:
            f.write(private)
        pub_path.write_bytes(public + b"\n")
        tmp.replace(key_path)  # the private key appears last, so a present key implies a present .pub
    return " ".join(pub_path.read_text().split()[:2])


def _quote_config(value: str) -> str:
    if any(c in value for c in '"\n\r\0'):
        raise ValueError(f"sshd_config value cannot contain quotes or newlines: {value!r}")
    return f'"{value}"'


def write_config(machine_dir: Path, *, port: int, authorized_keys: Path, env: dict[str, str]) -> Path:
    lines = [
        f"ListenAddress 127.0.0.1:{port}",
        f"HostKey {_quote_config(str(machine_dir / HOST_KEY_NAME))}",
        f"PidFile {_quote_config(str(machine_dir / 'sshd.pid'))}",
        f"AuthorizedKeysFile {_quote_config(str(authorized_keys))}",
        "PubkeyAuthentication yes",
        "PasswordAuthentication no",
        "KbdInteractiveAuthentication no",
        "PermitRootLogin prohibit-password",
        "UsePAM no",
        "StrictModes no",  # key files live in temp dirs with whatever modes the test gave them
        "UseDNS no",
        "PrintMotd no",
        "PrintLastLog no",
        "X11Forwarding no",
        "MaxStartups 200:30:400",  # parallel tests open many connections at once
        "MaxSessions 64",
        "LoginGraceTime 30",
        "LogLevel INFO",
        "Subsystem sftp internal-sftp",
    ]
    for name in env:
        if not _ENV_NAME.match(name):
            raise ValueError(f"bad environment variable name: {name!r}")
    if env:
        # One line: like most sshd options, only the first SetEnv directive counts.
        lines.append("SetEnv " + " ".join(_quote_config(f"{k}={v}") for k, v in env.items()))
    config = machine_dir / "sshd_config"
    config.write_text("\n".join(lines) + "\n")
    return config


def start_sshd(
    machine_dir: Path, *, port: int, authorized_keys: Path, env: dict[str, str], timeout: float = 10.0
) -> SshdHandle:
    """Start `sshd -D` for one machine and return once it listens on 127.0.0.1:`port`.

    Raises SshdError (with sshd's log) if it exits or does not listen within `timeout`, e.g. when
    another process took the port between free_port() and now: the caller picks a new port.
    """
    machine_dir = Path(machine_dir).resolve()
    machine_dir.mkdir(parents=True, exist_ok=True)
    host_public_key = ensure_host_key(machine_dir)
    config = write_config(machine_dir, port=port, authorized_keys=Path(authorized_keys).resolve(), env=env)
    if os.geteuid() == 0:
        # The privilege-separation chroot; Debian creates it from a unit file we do not run.
        Path("/run/sshd").mkdir(mode=0o755, exist_ok=True)

    binary = sshd_binary()
    log_path = machine_dir / "sshd.log"
    with open(log_path, "ab") as log:
        log_start = log.tell()
        try:
            process = subprocess.Popen(
                [binary, "-D", "-e", "-f", str(config)],
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=log,
                cwd=machine_dir,
                env={"PATH": "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"},
                start_new_session=True,  # a Ctrl-C to the marketplace must not reach the machines' sshd
            )
        except (FileNotFoundError, PermissionError) as exc:
            raise SshdMissing(f"cannot run sshd ({exc}): {INSTALL_HINT}") from exc
    handle = SshdHandle(process, port, host_public_key, machine_dir)
    listening = f"Server listening on 127.0.0.1 port {port}."
    deadline = time.monotonic() + timeout
    delay = 0.005
    while True:
        log_text = _read_from(log_path, log_start)
        if listening in log_text and _accepts(port):
            return handle
        if process.poll() is not None or time.monotonic() > deadline:
            handle.stop()
            reason = "exited" if process.returncode is not None else f"did not listen within {timeout}s"
            raise SshdError(f"sshd on port {port} {reason}: {_read_from(log_path, log_start).strip()}")
        time.sleep(delay)
        delay = min(delay * 2, 0.05)


def kill_machine_processes(machine_id: str, machine_dir: Path, timeout: float = 5.0) -> list[int]:
    """SIGKILL every process of a machine: DUMONT_MACHINE_ID=<id> in its environment, cwd under
    machine_dir, or the machine's own sshd (found through its pid file, so a marketplace that lost its
    SshdHandle in a restart still cleans up).

    Loops until none is left (a process may fork while we kill), never touching this process or its
    ancestors. Returns the pids it killed.
    """
    machine_dir = Path(machine_dir).resolve()
    marker = f"DUMONT_MACHINE_ID={machine_id}".encode()
    root = str(machine_dir)
    spared = _ancestors(os.getpid())
    killed: list[int] = []
    deadline = time.monotonic() + timeout
    while True:
        sshd_pid = _sshd_pid(machine_dir)
        victims = [
            pid
            for pid in _all_pids()
            if pid not in spared and (pid == sshd_pid or _belongs(pid, marker, root))
        ]
        if not victims:
            return killed
        for pid in victims:
            if _signal(pid, signal.SIGKILL) and pid not in killed:
                killed.append(pid)
        if time.monotonic() > deadline:
            raise TimeoutError(f"processes of machine {machine_id} survived SIGKILL: {victims}")
        time.sleep(0.01)


# ---- /proc helpers ------------------------------------------------------------------------


def _belongs(pid: int, marker: bytes, root: str) -> bool:
    if _is_zombie(pid):
        return False  # already dead; its parent reaps it
    try:
        cwd = os.readlink(f"/proc/{pid}/cwd")
        if cwd == root or cwd.startswith(root + "/"):
            return True
    except OSError:
        pass
    try:
        with open(f"/proc/{pid}/environ", "rb") as f:
            return marker in f.read().split(b"\0")
    except OSError:
        return False


def _sshd_pid(machine_dir: Path) -> int | None:
    """The pid in machine_dir/sshd.pid if that process really is the sshd running this dir's config."""
    try:
        pid = int((machine_dir / "sshd.pid").read_text().strip())
        with open(f"/proc/{pid}/cmdline", "rb") as f:
            cmdline = f.read()
    except (OSError, ValueError):
        return None
    # sshd retitles itself ("sshd: /usr/sbin/sshd -D -e -f <config> [listener] ..."): match a substring.
    config = f" -f {machine_dir / 'sshd_config'}".encode()
    return pid if config in cmdline and not _is_zombie(pid) else None


def _all_pids() -> list[int]:
    return [int(name) for name in os.listdir("/proc") if name.isdigit()]


def _stat_fields(pid: int) -> list[str] | None:
    try:
        with open(f"/proc/{pid}/stat") as f:
            stat = f.read()
    except OSError:
        return None
    # The command name (field 2) may contain spaces and parentheses: split after the last ')'.
    return stat[stat.rindex(")") + 2 :].split()


def _is_zombie(pid: int) -> bool:
    fields = _stat_fields(pid)
    return fields is None or fields[0] in ("Z", "X")


def _ppid(pid: int) -> int | None:
    fields = _stat_fields(pid)
    return int(fields[1]) if fields else None


def _ancestors(pid: int) -> set[int]:
    chain = {pid}
    parent = _ppid(pid)
    while parent and parent not in chain:
        chain.add(parent)
        parent = _ppid(parent)
    return chain


def _descendants(pid: int) -> list[int]:
    children: dict[int, list[int]] = {}
    for p in _all_pids():
        parent = _ppid(p)
        if parent is not None:
            children.setdefault(parent, []).append(p)
    found: list[int] = []
    todo = list(children.get(pid, []))
    while todo:
        p = todo.pop()
        found.append(p)
        todo.extend(children.get(p, []))
    return found


def _signal(pid: int, sig: int) -> bool:
    try:
        os.kill(pid, sig)
        return True
    except (ProcessLookupError, PermissionError):
        return False


def _start_time(pid: int) -> str:
    fields = _stat_fields(pid)
    return fields[19] if fields else ""  # field 22 of /proc/<pid>/stat: tells a reused pid apart


def _wait_gone(procs: list[tuple[int, str]], deadline: float, *, escalate: bool) -> None:
    def alive(proc: tuple[int, str]) -> bool:
        return not _is_zombie(proc[0]) and _start_time(proc[0]) == proc[1]

    pending = [p for p in procs if alive(p)]
    while pending:
        if time.monotonic() > deadline:
            if not escalate:
                return
            for pid, _ in pending:
                _signal(pid, signal.SIGKILL)
            deadline, escalate = time.monotonic() + 2.0, False
        time.sleep(0.01)
        pending = [p for p in pending if alive(p)]


def _accepts(port: int) -> bool:
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=0.5):
            return True
    except OSError:
        return False


def _read_from(path: Path, offset: int) -> str:
    with open(path, "rb") as f:
        f.seek(offset)
        return f.read().decode(errors="replace")
