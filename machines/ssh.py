"""The project's one SSH client (paramiko). Every SSH connection to a rented machine goes through here.

Security rules enforced in this module, so callers cannot get them wrong:
- Host keys are pinned. `connect` loads the recorded key into paramiko's host-key store and uses a
  RejectPolicy: a server presenting any other key raises HostKeyMismatch before we authenticate,
  so nothing runs. The key is read once at first contact (`fetch_host_key`) and recorded.
- Environment values never reach a command line. `run` starts a fixed `/bin/sh -s` and sends the
  `export K=V` lines plus the command as a script on the channel's stdin; the remote argv holds
  only the command, and we log variable names, never values. (sshd's `env` channel requests
  would be cleaner but only work for names the server lists in AcceptEnv, which rented images do
  not.)
- Commands given as a list are `shlex.quote`d argument by argument.

Django-free: imported by the marketplace, the launch race, the snapshot service and tests alike.
"""

from __future__ import annotations

import base64
import binascii
import dataclasses
import io
import logging
import os
import re
import select
import shlex
import socket
import time
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import IO

import paramiko
from cryptography.exceptions import UnsupportedAlgorithm
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import rsa
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

log = logging.getLogger(__name__)

PUBLIC_KEY_TYPES = (
    "ssh-ed25519",
    "ecdsa-sha2-nistp256",
    "ecdsa-sha2-nistp384",
    "ecdsa-sha2-nistp521",
    "ssh-rsa",
)
MIN_RSA_BITS = 2048
_ENV_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_]*\Z")
# Exit codes of coreutils `timeout` when it had to stop the command (TERM, then KILL).
_TIMEOUT_EXIT_CODES = (124, 137)
_KILL_AFTER_S = 2

PrivateKeyLike = paramiko.PKey | str | os.PathLike[str]
OutputCallback = Callable[[str], None]


# ---- errors -------------------------------------------------------------------------------


class SSHError(Exception):
    """Base of every SSH failure. `retryable` says whether the same call may succeed later."""

    retryable = False


class SSHConnectError(SSHError):
    """Refused, reset, timed out, handshake cut short, connection lost: the machine may still be booting."""

    retryable = True


class SSHAuthError(SSHError):
    """The server refused our key (on a booting machine the key may simply not be installed yet)."""


class HostKeyMismatch(SSHError):
    """The server did not present the pinned host key. Nothing was authenticated or run."""


class CommandTimeout(SSHError):
    """The command ran past its timeout; the remote process group was killed. Carries partial output."""

    def __init__(self, message: str, *, stdout: str = "", stderr: str = "", timeout: float | None = None):
        super().__init__(message)
        self.stdout = stdout
        self.stderr = stderr
        self.timeout = timeout


class CommandFailed(SSHError):
    """Raised by `run(..., check=True)` for a non-zero exit code."""

    def __init__(self, message: str, result: CommandResult):
        super().__init__(message)
        self.result = result


# ---- data ---------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class SSHTarget:
    host: str
    port: int = 22
    user: str = "root"
    host_key: str | None = None  # "ssh-ed25519 AAAA...", pinned at first contact

    @property
    def known_hosts_name(self) -> str:
        return self.host if self.port == 22 else f"[{self.host}]:{self.port}"

    def __str__(self) -> str:
        return f"{self.user}@{self.host}:{self.port}"


@dataclasses.dataclass(frozen=True)
class CommandResult:
    exit_code: int  # -1 when the command died from a signal (sshd then sends no exit status)
    stdout: str
    stderr: str
    duration: float

    @property
    def ok(self) -> bool:
        return self.exit_code == 0


# ---- keys ---------------------------------------------------------------------------------


def load_private_key(key: PrivateKeyLike) -> paramiko.PKey:
    """A paramiko key from a PKey, a file path, or the key text itself (OpenSSH/PEM, unencrypted)."""
    if isinstance(key, paramiko.PKey):
        return key
    if isinstance(key, str) and "-----BEGIN" in key:
        text, source = key, "key text"
    else:
        text, source = Path(key).read_text(), str(key)
    for cls in (paramiko.Ed25519Key, paramiko.ECDSAKey, paramiko.RSAKey):
        try:
            return cls.from_private_key(io.StringIO(text))
        except (paramiko.SSHException, ValueError):
            continue
    # Never echo the text: it is a private key.
    raise ValueError(f"not a supported unencrypted private key: {source}")


def public_key_of(key: PrivateKeyLike) -> str:
    pkey = load_private_key(key)
    return f"{pkey.get_name()} {pkey.get_base64()}"


def generate_keypair(path: str | os.PathLike[str], comment: str = "dumont-control-plane") -> str:
    """Create an Ed25519 key pair: `path` (OpenSSH private key, 0600) and `path`.pub.

    Refuses to overwrite an existing key (FileExistsError): replacing the control plane's key would
    lock it out of every running machine. Returns the public key line.
    """
    path = Path(path)
    key = Ed25519PrivateKey.generate()
    private = key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.OpenSSH, serialization.NoEncryption()
    )
    public = key.public_key().public_bytes(serialization.Encoding.OpenSSH, serialization.PublicFormat.OpenSSH)
    line = f"{public.decode()} {comment}".strip()
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "wb") as f:
        f.write(private)
    path.with_name(path.name + ".pub").write_text(line + "\n")
    return line


def _read_ssh_string(blob: bytes) -> tuple[bytes, bytes]:
    if len(blob) < 4:
        raise ValueError("truncated key")
    size = int.from_bytes(blob[:4], "big")
    if len(blob) < 4 + size:
        raise ValueError("truncated key")
    return blob[4 : 4 + size], blob[4 + size :]


def parse_public_key(text: str) -> tuple[str, str, str]:
    """Validate one OpenSSH public key line; return (type, base64, comment). ValueError otherwise.

    Accepts ssh-ed25519, ecdsa-sha2-nistp256/384/521 and ssh-rsa of at least 2048 bits. The base64 is
    decoded and must hold a real key of the announced type, encoded canonically (no trailing data).
    """
    if not isinstance(text, str):
        raise ValueError("a public key must be text")
    line = text.strip()
    if not line or any(c in line for c in "\r\n\0"):
        raise ValueError("expected exactly one key on one line")
    parts = line.split(None, 2)
    if len(parts) < 2:
        raise ValueError("expected '<type> <base64> [comment]'")
    key_type, b64 = parts[0], parts[1]
    comment = parts[2] if len(parts) == 3 else ""
    if key_type not in PUBLIC_KEY_TYPES:
        raise ValueError(f"unsupported key type {key_type[:40]!r}; use one of {', '.join(PUBLIC_KEY_TYPES)}")
    try:
        blob = base64.b64decode(b64, validate=True)
    except binascii.Error:
        raise ValueError("the key body is not valid base64") from None
    embedded, _ = _read_ssh_string(blob)
    if embedded != key_type.encode():
        raise ValueError(
            f"the key body is a {embedded[:40].decode(errors='replace')!r} key, not {key_type!r}"
        )
    try:
        key = serialization.load_ssh_public_key(f"{key_type} {b64}".encode())
    except (ValueError, UnsupportedAlgorithm):
        raise ValueError(f"not a valid {key_type} key") from None
    if isinstance(key, rsa.RSAPublicKey) and key.key_size < MIN_RSA_BITS:
        raise ValueError(f"RSA keys need at least {MIN_RSA_BITS} bits, this one has {key.key_size}")
    canonical = key.public_bytes(serialization.Encoding.OpenSSH, serialization.PublicFormat.OpenSSH)
    if canonical.split()[1].decode() != b64:
        raise ValueError("the key body has trailing or non-canonical data")
    return key_type, b64, comment


def _pinned_key(host_key: str) -> paramiko.PKey:
    try:
        key_type, b64, _ = parse_public_key(host_key)
    except ValueError as e:
        raise SSHError(f"bad pinned host key: {e}") from None
    return paramiko.PKey.from_type_string(key_type, base64.b64decode(b64))


# ---- connecting ---------------------------------------------------------------------------


class _PinnedKeyPolicy(paramiko.RejectPolicy):
    """RejectPolicy that says why: the server offered no key of the pinned type."""

    def missing_host_key(self, client: paramiko.SSHClient, hostname: str, key: paramiko.PKey) -> None:
        raise HostKeyMismatch(f"{hostname} presented a {key.get_name()} key, not the pinned one")


def _prefer_host_key_types(transport: paramiko.Transport) -> None:
    # Ask for the strongest, most common key first, so first contact and later pins agree.
    opts = transport.get_security_options()
    preferred = [t for t in ("ssh-ed25519", "ecdsa-sha2-nistp256") if t in opts.key_types]
    opts.key_types = preferred + [t for t in opts.key_types if t not in preferred]


def fetch_host_key(host: str, port: int = 22, timeout: float = 10.0) -> str:
    """First contact: the server's host key ("ssh-ed25519 AAAA..."), read without authenticating.

    The caller records it and passes it as SSHTarget.host_key from then on.
    """
    try:
        sock = socket.create_connection((host, port), timeout=timeout)
    except OSError as e:
        raise SSHConnectError(f"cannot reach {host}:{port}: {e}") from e
    transport = paramiko.Transport(sock)
    try:
        _prefer_host_key_types(transport)
        transport.banner_timeout = timeout
        transport.start_client(timeout=timeout)
        key = transport.get_remote_server_key()
        return f"{key.get_name()} {key.get_base64()}"
    except (paramiko.SSHException, EOFError, OSError) as e:
        raise SSHConnectError(f"SSH handshake with {host}:{port} failed: {e}") from e
    finally:
        transport.close()


def connect(
    target: SSHTarget,
    private_key: PrivateKeyLike,
    *,
    connect_timeout: float = 10.0,
    keepalive: int = 15,
) -> SSHSession:
    """An authenticated session to `target`, whose pinned host key must match."""
    if not target.host_key:
        raise SSHError(f"no pinned host key for {target}: record fetch_host_key() first")
    pinned = _pinned_key(target.host_key)
    pkey = load_private_key(private_key)
    client = paramiko.SSHClient()
    client.set_missing_host_key_policy(_PinnedKeyPolicy())
    client.get_host_keys().add(target.known_hosts_name, pinned.get_name(), pinned)
    try:
        client.connect(
            target.host,
            target.port,
            username=target.user,
            pkey=pkey,
            timeout=connect_timeout,
            banner_timeout=connect_timeout,
            auth_timeout=connect_timeout,
            allow_agent=False,
            look_for_keys=False,
        )
    except HostKeyMismatch:
        client.close()
        raise
    except paramiko.BadHostKeyException as e:
        client.close()
        raise HostKeyMismatch(
            f"{target} presented {e.key.get_name()} {e.key.get_base64()}, expected the pinned key"
        ) from None
    except paramiko.AuthenticationException as e:
        client.close()
        raise SSHAuthError(f"{target} refused our key: {e}") from None
    except (paramiko.SSHException, EOFError, OSError) as e:
        client.close()
        raise SSHConnectError(f"cannot connect to {target}: {e or type(e).__name__}") from e
    transport = client.get_transport()
    if transport is not None and keepalive:
        transport.set_keepalive(keepalive)
    return SSHSession(client, target)


def wait_for_ssh(
    target: SSHTarget,
    private_key: PrivateKeyLike,
    deadline: float,
    *,
    connect_timeout: float = 5.0,
) -> SSHSession:
    """Connect to a machine that may still be booting, retrying until `deadline` (a time.monotonic() value).

    Refused/reset connections, cut handshakes and refused keys (the boot script may install our key
    after sshd starts) are retried with growing pauses; a host-key mismatch is not. If the target has
    no pinned key yet, the key is read at first contact (fetch_host_key) and pinned: the returned
    session's `.target.host_key` is the key to record.
    """
    delay = 0.1
    while True:
        remaining = deadline - time.monotonic()
        try:
            pinned = target
            if not target.host_key:
                key = fetch_host_key(
                    target.host, target.port, timeout=max(0.1, min(connect_timeout, remaining))
                )
                pinned = dataclasses.replace(target, host_key=key)
            return connect(pinned, private_key, connect_timeout=max(0.1, min(connect_timeout, remaining)))
        except (SSHConnectError, SSHAuthError) as e:
            remaining = deadline - time.monotonic()
            if remaining <= delay:
                raise SSHConnectError(f"{target} did not accept SSH before the deadline: {e}") from e
            log.debug("ssh %s not ready (%s), retrying in %.1fs", target, e, delay)
            time.sleep(delay)
            delay = min(delay * 2, 2.0)


# ---- running ------------------------------------------------------------------------------


def build_script(
    command: Sequence[str] | str, *, cwd: str | None, env: Mapping[str, str], timeout: float | None
) -> str:
    """The script fed to the remote `/bin/sh -s`: exports, cd, then exec of the command."""
    if isinstance(command, str):
        argv = ["/bin/sh", "-c", command]  # a string is shell code, run as such
    else:
        argv = [str(a) for a in command]
        if not argv:
            raise ValueError("empty command")
    lines = []
    for name, value in env.items():
        if not _ENV_NAME.match(name):
            raise ValueError(f"bad environment variable name: {name!r}")
        if "\0" in str(value):
            raise ValueError(f"environment variable {name} contains a NUL byte")
        lines.append(f"export {name}={shlex.quote(str(value))}")
    if cwd is not None:
        lines.append(f"cd -- {shlex.quote(cwd)} || exit 1")
    quoted = " ".join(shlex.quote(a) for a in argv)
    # The command gets /dev/null as stdin (the script's stdin is this very text). Under `timeout`
    # it runs in its own process group, and the whole group is killed when time is up.
    if timeout is None:
        lines.append(f"exec {quoted} </dev/null")
    else:
        secs = f"{max(timeout, 0.01):.3f}".rstrip("0").rstrip(".")  # `timeout 0` would mean "never"
        lines.append(
            "if command -v timeout >/dev/null 2>&1; then "
            f"exec timeout -k {_KILL_AFTER_S} {secs} {quoted} </dev/null; "
            f"else exec {quoted} </dev/null; fi"
        )
    return "\n".join(lines) + "\n"


class _Lines:
    """Collects one output stream and hands complete lines to a callback as they arrive."""

    def __init__(self, callback: OutputCallback | None):
        self.callback = callback
        self.data = bytearray()
        self._pending = b""

    def feed(self, chunk: bytes) -> None:
        self.data += chunk
        if self.callback is None:
            return
        *lines, self._pending = (self._pending + chunk).split(b"\n")
        for line in lines:
            self.callback(line.decode(errors="replace"))

    def finish(self) -> str:
        if self.callback is not None and self._pending:
            self.callback(self._pending.decode(errors="replace"))
            self._pending = b""
        return self.data.decode(errors="replace")


class SSHSession:
    """One authenticated connection. Use as a context manager, or close() it."""

    def __init__(self, client: paramiko.SSHClient, target: SSHTarget):
        self._client = client
        self.target = target

    def __repr__(self) -> str:
        return f"SSHSession({self.target})"

    def __enter__(self) -> SSHSession:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        self._client.close()

    @property
    def active(self) -> bool:
        transport = self._client.get_transport()
        return transport is not None and transport.is_active()

    def _transport(self) -> paramiko.Transport:
        transport = self._client.get_transport()
        if transport is None or not transport.is_active():
            raise SSHConnectError(f"connection to {self.target} is closed")
        return transport

    def run(
        self,
        command: Sequence[str] | str,
        *,
        cwd: str | None = None,
        env: Mapping[str, str] | None = None,
        timeout: float | None = 300.0,
        on_output: OutputCallback | None = None,
        on_stderr: OutputCallback | None = None,
        check: bool = False,
    ) -> CommandResult:
        """Run a command and wait for it.

        `command`: a list is run as one program with exactly these arguments; a string is shell code.
        `env` values travel on stdin, never in argv or logs. `on_output` / `on_stderr` get each line
        (without its newline) as it arrives. Past `timeout` seconds CommandTimeout is raised and the
        remote process group is killed by coreutils/busybox `timeout` (on an image without it, only
        the channel is closed).
        """
        env = dict(env or {})
        script = build_script(command, cwd=cwd, env=env, timeout=timeout)
        shown = command if isinstance(command, str) else shlex.join(str(a) for a in command)
        log.debug("ssh %s: %s (env names: %s)", self.target, shown, ", ".join(sorted(env)) or "-")
        started = time.monotonic()
        try:
            channel = self._transport().open_session(timeout=30)
        except (paramiko.SSHException, EOFError, OSError) as e:
            raise SSHConnectError(f"cannot open a channel to {self.target}: {e}") from e
        out, err = _Lines(on_output), _Lines(on_stderr)
        try:
            channel.exec_command("/bin/sh -s")
            channel.sendall(script.encode())
            channel.shutdown_write()
            while True:
                while channel.recv_ready():
                    out.feed(channel.recv(65536))
                while channel.recv_stderr_ready():
                    err.feed(channel.recv_stderr(65536))
                if (
                    channel.exit_status_ready()
                    and not channel.recv_ready()
                    and not channel.recv_stderr_ready()
                ):
                    break
                wait = 0.2
                if timeout is not None:
                    left = started + timeout - time.monotonic()
                    if left <= 0:
                        raise CommandTimeout(
                            f"{shown!r} on {self.target} ran past {timeout}s",
                            stdout=out.finish(),
                            stderr=err.finish(),
                            timeout=timeout,
                        )
                    wait = min(wait, left)
                select.select([channel], [], [], wait)
            exit_code = channel.recv_exit_status()
        except (paramiko.SSHException, EOFError, OSError) as e:
            raise SSHConnectError(f"connection to {self.target} failed during {shown!r}: {e}") from e
        finally:
            channel.close()
        duration = time.monotonic() - started
        stdout, stderr = out.finish(), err.finish()
        if exit_code == -1 and not self.active:
            raise SSHConnectError(f"connection to {self.target} was lost during {shown!r}")
        if timeout is not None and exit_code in _TIMEOUT_EXIT_CODES and duration >= timeout:
            # Remote `timeout` fired just before our own deadline did.
            raise CommandTimeout(
                f"{shown!r} on {self.target} ran past {timeout}s",
                stdout=stdout,
                stderr=stderr,
                timeout=timeout,
            )
        result = CommandResult(exit_code, stdout, stderr, duration)
        if check and not result.ok:
            raise CommandFailed(f"{shown!r} on {self.target} exited {exit_code}: {stderr[-500:]}", result)
        return result

    def upload(self, local_path: str | os.PathLike[str], remote_path: str, mode: int = 0o644) -> None:
        """Copy a local file over SFTP; the remote file has `mode` before any byte is written."""
        with open(local_path, "rb") as src:
            self._write(src, remote_path, mode)

    def write_file(self, remote_path: str, data: bytes, mode: int = 0o600) -> None:
        """Write bytes to a remote file over SFTP (secrets: never through a command line)."""
        self._write(io.BytesIO(data), remote_path, mode)

    def _write(self, src: IO[bytes], remote_path: str, mode: int) -> None:
        try:
            with self._client.open_sftp() as sftp, sftp.open(remote_path, "wb") as dst:
                dst.chmod(mode)
                dst.set_pipelined(True)
                while chunk := src.read(1 << 20):
                    dst.write(chunk)
        except (paramiko.SSHException, EOFError, OSError) as e:
            # SFTP refusals (no such directory, permission denied) arrive as OSError too; only a
            # dead connection is worth retrying.
            error = SSHError if self.active else SSHConnectError
            raise error(f"upload to {self.target}:{remote_path} failed: {e}") from e
