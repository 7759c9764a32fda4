"""machines.ssh against a real OpenSSH server (one per module, from the local marketplace's sshd.py)."""

from __future__ import annotations

import base64
import hashlib
import logging
import os
import stat
import threading
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, ed25519

from machines.providers.local.sshd import SshdError, SshdHandle, free_port, kill_machine_processes, start_sshd
from machines.ssh import (
    CommandFailed,
    CommandTimeout,
    HostKeyMismatch,
    SSHConnectError,
    SSHError,
    SSHTarget,
    connect,
    fetch_host_key,
    generate_keypair,
    load_private_key,
    parse_public_key,
    public_key_of,
    wait_for_ssh,
)


def _start_sshd(
    machine_dir: Path, authorized: Path, env: dict[str, str], port: int | None = None
) -> SshdHandle:
    for _ in range(5):  # another test may grab the free port first
        try:
            return start_sshd(machine_dir, port=port or free_port(), authorized_keys=authorized, env=env)
        except SshdError as e:
            if port is not None or "Address already in use" not in str(e):
                raise
    raise AssertionError("no free port after 5 tries")


def _wait_until(condition, timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, "condition not met before the deadline"
        time.sleep(0.02)


def _cmdlines() -> list[bytes]:
    found = []
    for pid in filter(str.isdigit, os.listdir("/proc")):
        try:
            found.append(Path(f"/proc/{pid}/cmdline").read_bytes())
        except OSError:
            continue
    return found


def _fingerprint(public_line: str) -> str:
    blob = base64.b64decode(public_line.split()[1])
    return "SHA256:" + base64.b64encode(hashlib.sha256(blob).digest()).decode().rstrip("=")


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict]:
    root = tmp_path_factory.mktemp("ssh")
    key = root / "id_ed25519"
    authorized = root / "authorized_keys"
    authorized.write_text(generate_keypair(key) + "\n")
    machine_id = f"ssh-{uuid.uuid4().hex[:8]}"
    machine_dir = root / "machine"
    handle = _start_sshd(machine_dir, authorized, {"DUMONT_MACHINE_ID": machine_id})
    info = {"root": root, "key": key, "authorized": authorized, "handle": handle, "machine_dir": machine_dir}
    try:
        yield info
    finally:
        kill_machine_processes(machine_id, machine_dir)
        handle.stop()


@pytest.fixture(scope="module")
def target(server: dict) -> SSHTarget:
    return SSHTarget("127.0.0.1", server["handle"].port, "root", server["handle"].host_public_key)


@pytest.fixture
def ssh(server: dict, target: SSHTarget) -> Iterator:
    with connect(target, server["key"]) as session:
        yield session


# ---- running commands ---------------------------------------------------------------------


def test_runs_in_the_given_directory_and_reports_exit_code_and_both_streams(ssh, tmp_path: Path) -> None:
    workdir = tmp_path / "work dir"
    workdir.mkdir()
    result = ssh.run(["sh", "-c", "pwd; echo to-stderr >&2; exit 7"], cwd=str(workdir))
    assert result.exit_code == 7
    assert not result.ok
    assert result.stdout == f"{workdir}\n"
    assert result.stderr == "to-stderr\n"
    assert result.duration > 0
    assert ssh.run(["true"]).ok


def test_check_raises_with_the_result(ssh) -> None:
    with pytest.raises(CommandFailed) as failed:
        ssh.run("echo boom >&2; exit 3", check=True)
    assert failed.value.result.exit_code == 3
    assert "boom" in str(failed.value)


def test_output_lines_arrive_while_the_command_still_runs(ssh, tmp_path: Path) -> None:
    # The command only finishes once our callback has seen its first line: no streaming, no finish.
    go = tmp_path / "go"
    lines: list[str] = []
    errors: list[str] = []

    def on_line(line: str) -> None:
        lines.append(line)
        if line == "waiting":
            go.touch()

    script = 'echo waiting; while [ ! -e "$0" ]; do sleep 0.02; done; printf "done\\nno-newline"; echo e1 >&2'
    result = ssh.run(["sh", "-c", script, str(go)], timeout=10, on_output=on_line, on_stderr=errors.append)
    assert result.exit_code == 0
    assert lines == ["waiting", "done", "no-newline"]
    assert errors == ["e1"]
    assert result.stdout == "waiting\ndone\nno-newline"


def test_a_command_past_its_timeout_is_killed_with_its_children(ssh) -> None:
    token = f"31.{uuid.uuid4().int % 10**6}"  # a unique sleep duration to find the processes by
    started = time.monotonic()
    # 5 s, not 1: ten xdist workers on two cores can take over a second to open the channel and
    # start the shell, and the output printed before the deadline is part of what is checked.
    with pytest.raises(CommandTimeout) as timed_out:
        ssh.run(f"echo started; sleep {token} & sleep {token}; wait", timeout=5)
    assert 5 <= time.monotonic() - started < 20
    assert timed_out.value.stdout == "started\n"
    _wait_until(lambda: not any(f"sleep\0{token}".encode() in c for c in _cmdlines()))
    assert ssh.run(["true"]).ok  # the session is still usable


def test_env_reaches_the_command_but_never_its_argv_nor_our_logs(
    ssh, server: dict, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    secret = f"s3cr3t-{uuid.uuid4().hex}"
    tricky = 'it\'s "quoted" $HOME `id`\nsecond line'
    out, go = tmp_path / "out", tmp_path / "go"
    script = 'printf "%s|%s" "$API_TOKEN" "$TRICKY" > "$0"; while [ ! -e "$1" ]; do sleep 0.02; done'
    outcome: list = []
    caplog.set_level(logging.DEBUG)

    def run() -> None:
        outcome.append(
            ssh.run(["sh", "-c", script, str(out), str(go)], env={"API_TOKEN": secret, "TRICKY": tricky})
        )

    thread = threading.Thread(target=run)
    thread.start()
    try:
        _wait_until(lambda: out.exists() and out.stat().st_size > 0)
        # While the command runs, no process on the machine carries the secret in its argv.
        assert not [c for c in _cmdlines() if secret.encode() in c]
        assert any(b"while [ ! -e" in c for c in _cmdlines())  # the scan does see the command itself
    finally:
        go.touch()
        thread.join(10)
    assert outcome[0].ok
    assert out.read_text() == f"{secret}|{tricky}"
    assert secret not in caplog.text
    assert "API_TOKEN" in caplog.text  # names are logged, values are not
    assert secret not in (server["machine_dir"] / "sshd.log").read_text()


@pytest.mark.parametrize(
    "argument",
    [
        "a b",
        "x; touch INJECTED",
        "$(touch INJECTED)",
        "'; touch INJECTED; '",
        'quote"s `touch INJECTED`',
        "*",
    ],
)
def test_each_list_item_arrives_as_exactly_one_argument(ssh, tmp_path: Path, argument: str) -> None:
    result = ssh.run(["sh", "-c", 'printf "%s|" "$#" "$@"', "sh", argument, "second"], cwd=str(tmp_path))
    assert result.stdout == f"2|{argument}|second|"
    assert not (tmp_path / "INJECTED").exists()


def test_a_path_with_spaces_and_semicolons_is_one_path(ssh, tmp_path: Path) -> None:
    odd = tmp_path / "my dir; rm -rf x" / "file $(name).txt"
    odd.parent.mkdir()
    result = ssh.run(["touch", str(odd)], cwd=str(odd.parent))
    assert result.ok, result.stderr
    assert odd.exists()
    assert sorted(p.name for p in tmp_path.rglob("*")) == ["file $(name).txt", "my dir; rm -rf x"]


def test_a_missing_directory_fails_the_command_without_running_it(ssh, tmp_path: Path) -> None:
    result = ssh.run(["touch", "ran"], cwd=str(tmp_path / "missing"))
    assert result.exit_code != 0
    assert not list(tmp_path.iterdir())


# ---- files --------------------------------------------------------------------------------


def test_upload_copies_bytes_and_sets_the_mode(ssh, tmp_path: Path) -> None:
    local = tmp_path / "agent.bin"
    payload = os.urandom(3 * 1024 * 1024 + 17)
    local.write_bytes(payload)
    remote = tmp_path / "remote dir" / "agent.bin"
    remote.parent.mkdir()
    ssh.upload(local, str(remote), mode=0o750)
    assert remote.read_bytes() == payload
    assert stat.S_IMODE(remote.stat().st_mode) == 0o750

    ssh.write_file(str(remote), b"secret=1\n")  # overwrite: shorter content, secret mode
    assert remote.read_bytes() == b"secret=1\n"
    assert stat.S_IMODE(remote.stat().st_mode) == 0o600


def test_upload_into_a_missing_directory_is_a_non_retryable_error(ssh, tmp_path: Path) -> None:
    with pytest.raises(SSHError) as failed:
        ssh.write_file(str(tmp_path / "nope" / "f"), b"x")
    assert not failed.value.retryable


# ---- host keys ----------------------------------------------------------------------------


def test_fetch_host_key_reads_the_servers_key(server: dict) -> None:
    assert fetch_host_key("127.0.0.1", server["handle"].port, timeout=5) == server["handle"].host_public_key


def _other_host_keys() -> list[str]:
    ed = ed25519.Ed25519PrivateKey.generate().public_key()
    ecdsa = ec.generate_private_key(ec.SECP256R1()).public_key()
    fmt = (serialization.Encoding.OpenSSH, serialization.PublicFormat.OpenSSH)
    return [ed.public_bytes(*fmt).decode(), ecdsa.public_bytes(*fmt).decode()]


@pytest.mark.parametrize("wrong_key", _other_host_keys(), ids=["other-ed25519", "ecdsa"])
def test_a_host_key_mismatch_refuses_before_authenticating(
    server: dict, tmp_path: Path, wrong_key: str
) -> None:
    # A key of our own, so sshd's log tells whether *this* client ever authenticated.
    key = tmp_path / "id"
    public = generate_keypair(key, comment="mismatch-test")
    with server["authorized"].open("a") as f:
        f.write(public + "\n")
    marker = tmp_path / "marker"
    port = server["handle"].port

    with pytest.raises(HostKeyMismatch):
        with connect(SSHTarget("127.0.0.1", port, "root", wrong_key), key) as session:
            session.run(["touch", str(marker)])
    with pytest.raises(HostKeyMismatch):  # never retried, even with time left
        wait_for_ssh(SSHTarget("127.0.0.1", port, "root", wrong_key), key, time.monotonic() + 30)
    assert not marker.exists()
    log = server["machine_dir"] / "sshd.log"
    assert _fingerprint(public) not in log.read_text()

    # Control: with the right pin the same key authenticates, and sshd logs its fingerprint.
    with connect(SSHTarget("127.0.0.1", port, "root", server["handle"].host_public_key), key) as session:
        session.run(["touch", str(marker)], check=True)
    assert marker.exists()
    _wait_until(lambda: _fingerprint(public) in log.read_text())


def test_connect_without_a_pinned_key_is_refused(server: dict) -> None:
    with pytest.raises(SSHError, match="no pinned host key"):
        connect(SSHTarget("127.0.0.1", server["handle"].port), server["key"])


# ---- waiting for a booting machine --------------------------------------------------------


class _Retries(logging.Handler):
    def __init__(self) -> None:
        super().__init__(logging.DEBUG)
        self.seen = threading.Event()

    def emit(self, record: logging.LogRecord) -> None:
        if "not ready" in record.getMessage():
            self.seen.set()


def test_wait_for_ssh_retries_while_the_port_is_closed_then_pins_and_connects(
    server: dict, tmp_path: Path
) -> None:
    port = free_port()
    retries = _Retries()
    logger = logging.getLogger("machines.ssh")
    logger.addHandler(retries)
    old_level = logger.level
    logger.setLevel(logging.DEBUG)
    outcome: list = []

    def wait() -> None:
        try:
            outcome.append(wait_for_ssh(SSHTarget("127.0.0.1", port), server["key"], time.monotonic() + 30))
        except Exception as e:
            outcome.append(e)

    thread = threading.Thread(target=wait)
    thread.start()
    handle = None
    try:
        assert retries.seen.wait(10), "wait_for_ssh never reported a refused connection"
        assert not outcome  # still waiting: the port is closed
        handle = _start_sshd(tmp_path / "booting", server["authorized"], {}, port=port)
        thread.join(30)
        session = outcome[0]
        assert not isinstance(session, Exception), session
        with session:
            assert session.target.host_key == handle.host_public_key  # pinned at first contact
            assert session.run(["echo", "up"]).stdout == "up\n"
    finally:
        logger.removeHandler(retries)
        logger.setLevel(old_level)
        thread.join(30)
        if handle:
            handle.stop()


def test_wait_for_ssh_gives_up_at_the_deadline() -> None:
    started = time.monotonic()
    with pytest.raises(SSHConnectError) as gave_up:
        wait_for_ssh(SSHTarget("127.0.0.1", free_port(), "root"), generate_key_text(), started + 0.8)
    assert gave_up.value.retryable
    assert 0.5 < time.monotonic() - started < 5


def test_a_closed_session_raises_a_retryable_error(server: dict, target: SSHTarget) -> None:
    session = connect(target, server["key"])
    session.close()
    with pytest.raises(SSHConnectError):
        session.run(["true"])


# ---- keys ---------------------------------------------------------------------------------


def generate_key_text() -> str:
    key = ed25519.Ed25519PrivateKey.generate()
    return key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.OpenSSH, serialization.NoEncryption()
    ).decode()


def test_generate_keypair_writes_a_private_key_and_refuses_to_overwrite(tmp_path: Path) -> None:
    path = tmp_path / "control"
    public = generate_keypair(path, comment="dumont cp")
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert (tmp_path / "control.pub").read_text() == public + "\n"
    assert parse_public_key(public)[2] == "dumont cp"
    assert public.startswith(public_key_of(path) + " ")
    assert public_key_of(path.read_text()) == public_key_of(path)  # PEM text or a path
    with pytest.raises(FileExistsError):
        generate_keypair(path)


def test_load_private_key_rejects_garbage_without_echoing_it(tmp_path: Path) -> None:
    text = "-----BEGIN OPENSSH PRIVATE KEY-----\nc2VjcmV0LWtleS1tYXRlcmlhbA==\n-----END OPENSSH PRIVATE KEY-----\n"
    with pytest.raises(ValueError) as bad:
        load_private_key(text)
    assert "c2VjcmV0" not in str(bad.value)


def _body(line: str) -> bytes:
    return base64.b64decode(line.split()[1])


def _line(key_type: str, blob: bytes) -> str:
    return f"{key_type} {base64.b64encode(blob).decode()}"


# Real public keys, generated once with `cryptography` (fixed so that test ids are the same in every
# xdist worker).
ED25519 = "ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIKGDiSX6cPJbk8Q2vN0NEIrPOtLNO2oflCrkGzVDVhXW"
P256 = "ecdsa-sha2-nistp256 AAAAE2VjZHNhLXNoYTItbmlzdHAyNTYAAAAIbmlzdHAyNTYAAABBBH5se7aUJcB3Nxt0WXk1EzYdAdHpGSXXkFFh3e0z/ZKrgPSLv0vAx7iX3AjlLT7XkgYLXq8cooEnrKmMxEDszag="
P384 = "ecdsa-sha2-nistp384 AAAAE2VjZHNhLXNoYTItbmlzdHAzODQAAAAIbmlzdHAzODQAAABhBDnx6lBxFiQIXzC1MpSKEX/cX57I0/bUukw/acVJdruzRHM0Mxa8Bq3B3z6ffDLAzPm7Ve7cksMqhBPpXG1Zt/ZeAAb7uHXIG4vweJ2fV7kIU+f2Fjzr884zez9/MO1zlA=="
P521 = "ecdsa-sha2-nistp521 AAAAE2VjZHNhLXNoYTItbmlzdHA1MjEAAAAIbmlzdHA1MjEAAACFBAAMnpJ4loIS5NeNe5umIB43piET6rp8cGRg8Vwd0vvUwEHGhIqyi6kcOun62O7yxfGTpVnUSgI1IcXnreg5AoZS0gHKajBzshsEyhJ2XBBkiUPKb9/w890FS6UQqI6LRJojCRlBQf42v7+ULyaFDKrHLKzKa939Cv000lmnNQGpVQDRqA=="
RSA_2048 = "ssh-rsa AAAAB3NzaC1yc2EAAAADAQABAAABAQCsxccHZdgUiuzQqC5nWDjwouPwVk1HekDBPsFLjuRY7TIeCRcGJlNjS4knlb+DaNeZWEW+c6VMevvKDc79hiSMwdwJTCqpqzKVpbXDGlbrzZy/iCQTqdWGbbuVx/pMY0le04ifXK/T6cfowa3dvxH6xIaR9KGZefiOq2MMXb9jMh5SqPS0hAjB9QTvStMFGWwNArl28XwB158hdDrO1Z9xGkexZc6+8P4wAJ/EZNdDA980L1njLLBCCLfEimy6WQPrrOG4GmcmjcrbccilYrMsbRJmKixtKP4yBrB0XTEyrPmdWHgAQ8mUiReg4qtMHL7+66hP3+Lm2Xbr0NNQrkfL"
RSA_1024 = "ssh-rsa AAAAB3NzaC1yc2EAAAADAQABAAAAgQDfc38ZjsN4Te3l02gatr/TdVIbeS+YzcHDLWRerfQB0CpqiiXSKSG2T+SnU4qj5OvrWz56iwi38NmGswgfJgW/97WC68efxKFDSbYTbbJ3hJ29OY19KrdoBbHGjNOlsn6bpB2jyZ8hsg4yq31bfuBOixcUf8q41OUzm+VWt2hMYw=="


ACCEPTED = {
    "ed25519": ED25519,
    "ed25519-comment": ED25519 + " alice@laptop",
    "p256": P256,
    "p384": P384,
    "p521": P521,
    "rsa-2048": RSA_2048,
    "padded-with-spaced-comment": "  " + RSA_2048 + " with a comment  \n",
}

REJECTED = {
    "empty": "",
    "garbage": "hello world",
    "type-only": "ssh-ed25519",
    "not-base64": "ssh-ed25519 not*base64",
    "bad-padding": ED25519[:-8],
    "truncated-body": _line("ssh-ed25519", _body(ED25519)[:-4]),
    "trailing-data": _line("ssh-ed25519", _body(ED25519) + b"\0\0\0\0"),
    "type-mismatch": _line("ssh-rsa", _body(ED25519)),
    "curve-mismatch": _line("ecdsa-sha2-nistp384", _body(P256)),
    "off-curve": _line("ecdsa-sha2-nistp256", _body(P256)[:-1] + bytes([_body(P256)[-1] ^ 1])),
    "rsa-1024": RSA_1024,
    "dsa": "ssh-dss AAAAB3NzaC1kc3MAAACBAP",
    "certificate": "ssh-ed25519-cert-v01@openssh.com " + ED25519.split()[1],
    "authorized-keys-options": 'command="rm -rf /" ' + ED25519,
    "two-keys": ED25519 + "\n" + P256,
}


@pytest.mark.parametrize("line", list(ACCEPTED.values()), ids=list(ACCEPTED))
def test_parse_public_key_accepts_real_keys(line: str) -> None:
    key_type, b64, comment = parse_public_key(line)
    assert f"{key_type} {b64}" == " ".join(line.split()[:2])
    assert comment == " ".join(line.split()[2:])


@pytest.mark.parametrize("line", list(REJECTED.values()), ids=list(REJECTED))
def test_parse_public_key_rejects_anything_else(line: str) -> None:
    with pytest.raises(ValueError):
        parse_public_key(line)
