"""The restic engine: backup, restore, verification, forget. Django-free and instance-free.

It runs restic on the user's machine over SSH (`RemoteRunner`, the workspace is
`${DUMONT_WORKSPACE:-/workspace}` there) or on the control plane (`LocalRunner`: repository
init, forget and prune, which need no workspace and must work while no machine exists).

Everything it needs comes in as arguments: a runner, a `Repository` (url, password, storage
credentials) and `Tuning`. Secrets travel only in the command's environment (machines/ssh.py sends
it on stdin): never in argv, never in a log line, never in an error message.
"""

from __future__ import annotations

import ctypes
import dataclasses
import functools
import json
import os
import re
import secrets
import shlex
import signal
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Protocol

from dumont.s3server import Credentials
from machines.ssh import CommandResult, SSHSession

REMOTE_BIN_DIR = "$HOME/.dumont/bin"
REMOTE_RESTIC = f"{REMOTE_BIN_DIR}/restic"
WORKSPACE = "${DUMONT_WORKSPACE:-/workspace}"
_VERSION = re.compile(r"^restic (\d+\.\d+\.\d+)", re.MULTILINE)
_SNAPSHOT_ID = re.compile(r"[0-9a-f]{8,64}\Z")
# restic's exit codes (0.14): 1 fatal, 3 "snapshot saved but some source files could not be read".
EXIT_INCOMPLETE = 3

OutputCallback = Callable[[str], None]


class ResticError(Exception):
    """restic failed. `reason` is fit for a user (no secret: restic never prints the password)."""

    def __init__(self, reason: str, *, exit_code: int | None = None, snapshot_id: str = ""):
        super().__init__(reason)
        self.reason = reason
        self.exit_code = exit_code
        self.snapshot_id = snapshot_id  # set when restic saved a snapshot that must not count (exit 3)


class EmptyWorkspace(ResticError):
    """restic refuses to save a snapshot of an empty workspace ("snapshot is empty"): nothing to keep."""


@dataclasses.dataclass(frozen=True)
class Repository:
    url: str  # "s3:https://endpoint/bucket/prefix"
    password: str
    credentials: Credentials
    region: str = "auto"
    # the key file the password opens: restic tries it first (each other key costs a ~0.5 s KDF, and
    # restic gives up after 20 keys, while a repository holds one key per live machine of its user)
    key_hint: str = ""

    def __repr__(self) -> str:
        return f"Repository({self.url!r}, key {self.credentials.access_key_id!r})"

    def env(self) -> dict[str, str]:
        env = {"RESTIC_REPOSITORY": self.url, "RESTIC_PASSWORD": self.password, **self.credentials.aws_env()}
        if self.key_hint:
            env["RESTIC_KEY_HINT"] = self.key_hint
        return env


@dataclasses.dataclass(frozen=True)
class Tuning:
    connections: int = 32  # parallel S3 connections; restore also uses one worker per connection
    pack_size_mb: int = 16  # restic's default; bigger packs mean fewer, larger objects
    compression: str = "auto"  # auto | off | max (repository format 2)
    command_timeout: float = 3000.0

    def global_args(self, repository: Repository) -> list[str]:
        return [
            "-o", f"s3.connections={self.connections}",
            # a region skips the GetBucketLocation round trip (R2 and the dev server take "auto")
            "-o", f"s3.region={repository.region}",
            f"--pack-size={self.pack_size_mb}",
            f"--compression={self.compression}",
        ]


@dataclasses.dataclass(frozen=True)
class Progress:
    percent: float  # 0..100
    bytes_done: int
    total_bytes: int
    files_done: int
    total_files: int
    seconds: float


@dataclasses.dataclass(frozen=True)
class BackupResult:
    snapshot_id: str  # the full id, as listed by `restic snapshots`
    captured_at: str  # restic's snapshot time (RFC 3339): when the backup captured the workspace
    parent_id: str
    files_new: int
    files_changed: int
    files_unmodified: int
    total_files: int
    total_bytes: int
    data_added: int
    duration: float
    summary: dict

    @property
    def short_id(self) -> str:
        return self.snapshot_id[:8]


@dataclasses.dataclass(frozen=True)
class RestoreResult:
    snapshot_id: str
    duration: float


class Runner(Protocol):
    def __call__(
        self,
        args: Sequence[str],
        *,
        env: Mapping[str, str],
        in_workspace: bool = False,
        timeout: float | None = None,
        on_stdout: OutputCallback | None = None,
    ) -> CommandResult: ...


# ---- runners --------------------------------------------------------------------------------


class RemoteRunner:
    """restic on a user's machine, through one SSH session, as `$HOME/.dumont/bin/restic`."""

    def __init__(self, session: SSHSession):
        self.session = session

    def __call__(self, args, *, env, in_workspace=False, timeout=None, on_stdout=None) -> CommandResult:
        command = f'exec "{REMOTE_RESTIC}" ' + " ".join(shlex.quote(str(a)) for a in args)
        if in_workspace:
            # the workspace may not exist yet on a fresh machine (a restore target)
            command = f'mkdir -p "{WORKSPACE}" && cd "{WORKSPACE}" && {command}'
        return self.session.run(command, env=env, timeout=timeout, on_output=on_stdout)


class LocalRunner:
    """restic on the control plane (repository maintenance): a subprocess with a clean environment."""

    def __init__(self, binary: str, *, cache_dir: Path | None = None):
        self.binary = binary
        self.cache_dir = cache_dir

    def __call__(self, args, *, env, in_workspace=False, timeout=None, on_stdout=None) -> CommandResult:
        if in_workspace:
            raise ValueError("the control plane has no workspace")
        full_env = {"PATH": os.environ.get("PATH", "/usr/bin:/bin"), "HOME": os.environ.get("HOME", "/tmp"), **env}
        if self.cache_dir is not None:
            full_env["RESTIC_CACHE_DIR"] = str(self.cache_dir)
        started = time.monotonic()
        process = subprocess.Popen(
            [self.binary, *args], env=full_env, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
            stderr=subprocess.PIPE, start_new_session=True, preexec_fn=_die_with_parent,
        )
        stderr_chunks: list[bytes] = []
        reader = threading.Thread(target=lambda: stderr_chunks.append(process.stderr.read()), daemon=True)
        reader.start()
        stdout_lines: list[str] = []
        timer = None
        if timeout is not None:
            timer = threading.Timer(timeout, lambda: _kill_group(process))
            timer.start()
        try:
            for raw in process.stdout:
                line = raw.decode(errors="replace").rstrip("\n")
                stdout_lines.append(line)
                if on_stdout is not None:
                    on_stdout(line)
            exit_code = process.wait()
        finally:
            if timer is not None:
                timer.cancel()
            if process.poll() is None:
                _kill_group(process)
                process.wait()
            reader.join(5)
        stderr = b"".join(stderr_chunks).decode(errors="replace")
        return CommandResult(exit_code, "\n".join(stdout_lines), stderr, time.monotonic() - started)


_LIBC = ctypes.CDLL(None, use_errno=True) if sys.platform == "linux" else None
_PR_SET_PDEATHSIG = 1


def _die_with_parent() -> None:
    """In the child, before exec: SIGKILL it when the worker that started it dies. A killed worker must
    not leave a restic behind (its own session escapes the worker's process group): an orphaned `init`
    racing the retried one would store two master keys."""
    if _LIBC is not None:
        _LIBC.prctl(_PR_SET_PDEATHSIG, signal.SIGKILL)


def _kill_group(process: subprocess.Popen) -> None:
    try:
        os.killpg(process.pid, signal.SIGKILL)
    except ProcessLookupError:
        pass


# ---- the binary on the machine --------------------------------------------------------------


@functools.cache
def local_version(binary: str) -> str:
    """"0.14.0": the version of the control plane's restic, the one every machine must run."""
    result = subprocess.run([binary, "version"], capture_output=True, text=True, timeout=30, check=False)
    match = _VERSION.search(result.stdout)
    if result.returncode != 0 or not match:
        raise ResticError(f"{binary} is not a working restic: {result.stdout or result.stderr}".strip())
    return match.group(1)


def restic_ensure(session: SSHSession, *, local_binary: str) -> bool:
    """Make sure the machine runs our restic version as $HOME/.dumont/bin/restic.

    GPU machines may have no route to a download site (or an old distribution restic), so when it is
    missing or another version, the control plane's own binary is copied over SFTP, under a temporary
    name then renamed (two sessions may install at once), and checked with `restic version`.
    Returns True when it had to copy.
    """
    wanted = local_version(local_binary)
    if _remote_version(session) == wanted:
        return False
    bin_dir = session.run(f'mkdir -p "{REMOTE_BIN_DIR}" && cd "{REMOTE_BIN_DIR}" && pwd', timeout=30, check=True)
    remote_dir = bin_dir.stdout.strip()  # SFTP does not expand $HOME: it needs the absolute path
    temporary = f"{remote_dir}/.restic-{secrets.token_hex(4)}"
    session.upload(local_binary, temporary, mode=0o755)
    session.run(["mv", "-f", temporary, f"{remote_dir}/restic"], timeout=30, check=True)
    found = _remote_version(session)
    if found != wanted:
        raise ResticError(f"restic {wanted} was copied to the machine but it reports {found or 'nothing'}")
    return True


def _remote_version(session: SSHSession) -> str | None:
    result = session.run(f'"{REMOTE_RESTIC}" version 2>/dev/null', timeout=30)
    match = _VERSION.search(result.stdout)
    return match.group(1) if result.ok and match else None


# ---- operations -----------------------------------------------------------------------------


def _reason(result: CommandResult, what: str) -> str:
    """A short, user-fit reason from restic's stderr (Fatal line first)."""
    lines = [line.strip() for line in result.stderr.splitlines() if line.strip()]
    fatal = [line for line in lines if line.startswith("Fatal:")]
    detail = fatal[-1] if fatal else (lines[-1] if lines else "no output")
    if result.exit_code == -1:
        detail = f"killed by a signal; {detail}"
    return f"{what} failed (restic exit {result.exit_code}): {detail[:500]}"


def wait_for_config(run: Runner, repository: Repository, tuning: Tuning, *, timeout: float = 60) -> None:
    """A repository whose key is stored: wait until its config reads (an init may be finishing)."""
    deadline = time.monotonic() + timeout
    while True:
        probe = run([*tuning.global_args(repository), "cat", "config"], env=repository.env(), timeout=120)
        if probe.ok:
            return
        if "wrong password" in probe.stderr or time.monotonic() > deadline:
            raise ResticError(_reason(probe, "opening the repository"), exit_code=probe.exit_code)
        time.sleep(1.0)


def init(run: Runner, repository: Repository, tuning: Tuning) -> bool:
    """Create the repository if it does not exist yet (format 2: compression). True when created.

    An existing repository with another password is an error, never overwritten.
    """
    env = repository.env()
    probe = run([*tuning.global_args(repository), "cat", "config"], env=env, timeout=120)
    if probe.ok:
        return False
    if "wrong password" in probe.stderr:
        raise ResticError(_reason(probe, "opening the repository"), exit_code=probe.exit_code)
    created = run([*tuning.global_args(repository), "init", "--repository-version", "2"], env=env, timeout=120)
    if not created.ok:
        raise ResticError(_reason(created, "creating the repository"), exit_code=created.exit_code)
    return True


def key_add(run: Runner, repository: Repository, tuning: Tuning, *, new_password: str, label: str) -> None:
    """Add a key (password) to the repository, its key file naming `label` as its host (key files keep
    that in plain JSON: storage.repository_keys finds it without restic). The new password goes through a
    0600 file that is removed at once, never argv."""
    with tempfile.TemporaryDirectory(prefix="dumont-key-") as directory:
        password_file = Path(directory) / "password"
        password_file.touch(mode=0o600)
        password_file.write_text(new_password)
        added = run([*tuning.global_args(repository), "key", "add", "--new-password-file", str(password_file),
                     "--host", label, "--user", "dumont"], env=repository.env(), timeout=300)
    if not added.ok:
        raise ResticError(_reason(added, "adding a machine key"), exit_code=added.exit_code)


def _progress(message: dict) -> Progress:
    return Progress(
        percent=round(100 * float(message.get("percent_done", 0.0)), 1),
        bytes_done=int(message.get("bytes_done", 0)),
        total_bytes=int(message.get("total_bytes", 0)),
        files_done=int(message.get("files_done", 0)),
        total_files=int(message.get("total_files", 0)),
        seconds=float(message.get("seconds_elapsed", 0)),
    )


def backup_args(repository: Repository, tuning: Tuning, *, host: str, tags: Sequence[str], parent_id: str = "",
                after_restore: bool = False) -> list[str]:
    """restic's arguments for a backup of the workspace (the current directory, as `.`): the one builder, for
    a snapshot over SSH (`backup`) and for the agent's periodic sync (snapshots.services.sync_config).
    Without `parent_id` restic picks the previous snapshot of the same host and path as the parent."""
    args = [*tuning.global_args(repository), "backup", "--json", "--host", host]
    for tag in tags:
        args += ["--tag", tag]
    if parent_id:
        args += ["--parent", parent_id]
        if after_restore:
            args += ["--ignore-inode", "--ignore-ctime"]
    return [*args, "."]


def backup(
    run: Runner,
    repository: Repository,
    tuning: Tuning,
    *,
    host: str,
    tags: Sequence[str],
    parent_id: str = "",
    after_restore: bool = False,
    on_progress: Callable[[Progress], None] | None = None,
    listed_by: Runner | None = None,
    listed_repository: Repository | None = None,
) -> BackupResult:
    """Back up the workspace (as `.`, so a snapshot restores into any workspace path) and verify it.

    `parent_id`: the snapshot this workspace was last backed up as, or restored from. Right after a
    restore (`after_restore`) the inodes and ctimes are all new, so restic is told to ignore them:
    otherwise it re-reads every file (5.5 s instead of 1.3 s on 1.8 GB).

    Counts only when restic exited 0, printed its summary with a snapshot id, and that snapshot is
    listed in the repository by `listed_by` (the control plane's own restic and repository credentials:
    the machine's restic could lie). Anything else raises ResticError (exit 3: the snapshot is
    incomplete); an empty workspace raises EmptyWorkspace.
    """
    args = backup_args(repository, tuning, host=host, tags=tags, parent_id=parent_id, after_restore=after_restore)
    summary: dict = {}

    def on_line(line: str) -> None:
        nonlocal summary
        if not line.startswith("{"):
            return
        try:
            message = json.loads(line)
        except ValueError:
            return
        kind = message.get("message_type")
        if kind == "summary":
            summary = message
        elif kind == "status" and on_progress is not None:
            on_progress(_progress(message))

    # RESTIC_PROGRESS_FPS: a status line twice a second is plenty through SSH
    env = {**repository.env(), "RESTIC_PROGRESS_FPS": "2"}
    result = run(args, env=env, in_workspace=True, timeout=tuning.command_timeout, on_stdout=on_line)
    short_id = str(summary.get("snapshot_id", ""))
    if result.exit_code == EXIT_INCOMPLETE:
        raise ResticError(
            _reason(result, "backup") + " (incomplete snapshot: some files could not be read)",
            exit_code=result.exit_code, snapshot_id=short_id,
        )
    if not result.ok:
        if "snapshot is empty" in result.stderr:
            raise EmptyWorkspace("the workspace is empty", exit_code=result.exit_code)
        raise ResticError(_reason(result, "backup"), exit_code=result.exit_code, snapshot_id=short_id)
    if not _SNAPSHOT_ID.match(short_id):
        raise ResticError("backup exited 0 but reported no snapshot id", exit_code=0)
    listed = snapshot_info(listed_by or run, listed_repository or repository, tuning, short_id)
    if listed is None:
        raise ResticError(f"snapshot {short_id} is not listed in the repository", exit_code=0, snapshot_id=short_id)
    return BackupResult(
        snapshot_id=listed["id"],
        captured_at=str(listed.get("time") or ""),
        parent_id=parent_id,
        files_new=int(summary.get("files_new", 0)),
        files_changed=int(summary.get("files_changed", 0)),
        files_unmodified=int(summary.get("files_unmodified", 0)),
        total_files=int(summary.get("total_files_processed", 0)),
        total_bytes=int(summary.get("total_bytes_processed", 0)),
        data_added=int(summary.get("data_added", 0)),
        duration=float(summary.get("total_duration", result.duration)),
        summary=summary,
    )


def is_snapshot_id(value: str) -> bool:
    """A restic snapshot id, full or short (hex, 8 to 64 digits)."""
    return bool(_SNAPSHOT_ID.match(value))


def snapshots(run: Runner, repository: Repository, tuning: Tuning, *ids: str) -> list[dict]:
    """`restic snapshots --json [ids]`: what the repository lists (all snapshots without ids)."""
    for snapshot_id in ids:
        if not _SNAPSHOT_ID.match(snapshot_id):
            raise ValueError(f"not a restic snapshot id: {snapshot_id!r}")
    result = run([*tuning.global_args(repository), "snapshots", "--json", *ids], env=repository.env(), timeout=300)
    if not result.ok and not (ids and "no matching ID found" in result.stderr):
        raise ResticError(_reason(result, "listing snapshots"), exit_code=result.exit_code)
    try:
        listed = json.loads(result.stdout or "[]")
    except ValueError as exc:
        raise ResticError(f"listing snapshots: restic printed no JSON ({exc})") from None
    return listed or []


def snapshot_info(run: Runner, repository: Repository, tuning: Tuning, snapshot_id: str) -> dict | None:
    """What the repository lists for `snapshot_id` (id, time, hostname, tags, ...), or None."""
    for item in snapshots(run, repository, tuning, snapshot_id):
        if str(item.get("id", "")).startswith(snapshot_id):
            return item
    return None


def snapshot_listed(run: Runner, repository: Repository, tuning: Tuning, snapshot_id: str) -> str | None:
    """The full id of `snapshot_id` if the repository lists it, else None."""
    item = snapshot_info(run, repository, tuning, snapshot_id)
    return item["id"] if item else None


def check_read_data(run: Runner, repository: Repository, tuning: Tuning, *, subset: str) -> float:
    """`restic check --read-data-subset=<subset>`: the repository's structure, and a random sample of its
    packs read back and hashed. Returns the seconds it took; raises ResticError on any damage.

    `--no-lock`: a read-only verification must not wait on (or fail at) another process's lock: a backup whose
    worker was killed leaves its restic running on the machine (or a stale lock that restic, on another
    host, keeps honouring for 30 minutes), and that failed every resumed hibernation. Without a lock a
    concurrent prune could make it report damage that is not there: a failed verification, retried, never
    a destroy (and retention never prunes while a snapshot of the user runs)."""
    if not re.fullmatch(r"\d+(\.\d+)?%|\d+/\d+|\d+[kKmMgGtT]?", subset):
        raise ValueError(f"not a restic --read-data-subset: {subset!r}")
    result = run([*tuning.global_args(repository), "--no-lock", "check", f"--read-data-subset={subset}"],
                 env=repository.env(), timeout=tuning.command_timeout)
    if not result.ok:
        raise ResticError(_reason(result, "check"), exit_code=result.exit_code)
    return result.duration


def restore(
    run: Runner, repository: Repository, tuning: Tuning, *, snapshot_id: str
) -> RestoreResult:
    """Restore a snapshot into the workspace (created if missing). Files absent from the snapshot stay."""
    if not _SNAPSHOT_ID.match(snapshot_id):
        raise ValueError(f"not a restic snapshot id: {snapshot_id!r}")
    args = [*tuning.global_args(repository), "restore", snapshot_id, "--target", "."]
    result = run(args, env=repository.env(), in_workspace=True, timeout=tuning.command_timeout)
    if not result.ok:
        raise ResticError(_reason(result, "restore"), exit_code=result.exit_code)
    return RestoreResult(snapshot_id=snapshot_id, duration=result.duration)


def forget(run: Runner, repository: Repository, tuning: Tuning, ids: Sequence[str], *, prune: bool) -> None:
    """Forget these snapshots (and prune unreferenced data). Ids the repository no longer lists are skipped."""
    listed = {item["id"] for item in snapshots(run, repository, tuning)}
    present = [full for full in listed if any(full.startswith(i) for i in ids)]
    if present:
        args = [*tuning.global_args(repository), "forget", *sorted(present)]
        if prune:
            args.append("--prune")
        result = run(args, env=repository.env(), timeout=tuning.command_timeout)
        if not result.ok:
            raise ResticError(_reason(result, "forget"), exit_code=result.exit_code)
    elif prune:
        result = run([*tuning.global_args(repository), "prune"], env=repository.env(), timeout=tuning.command_timeout)
        if not result.ok:
            raise ResticError(_reason(result, "prune"), exit_code=result.exit_code)
