"""The local marketplace's per-machine OpenSSH server: start, restart, stop, and killing a machine's processes."""

from __future__ import annotations

import socket
import subprocess
import threading
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest

from machines.providers.local.sshd import SshdError, SshdHandle, free_port, kill_machine_processes, start_sshd
from machines.ssh import SSHTarget, connect, generate_keypair


def _alive(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except (FileNotFoundError, ProcessLookupError):
        return False
    return state not in ("Z", "X")


def _wait_until(condition, timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, "condition not met before the deadline"
        time.sleep(0.02)


def _refused(port: int) -> bool:
    try:
        socket.create_connection(("127.0.0.1", port), timeout=1).close()
    except ConnectionRefusedError:
        return True
    return False


@pytest.fixture
def machine(tmp_path: Path) -> Iterator[dict]:
    key = tmp_path / "id_ed25519"
    authorized = tmp_path / "authorized_keys"
    authorized.write_text(generate_keypair(key) + "\n")
    info = {
        "id": f"m-{uuid.uuid4().hex[:8]}",
        "dir": tmp_path / "machine",
        "key": key,
        "authorized": authorized,
        "handles": [],
    }
    yield info
    kill_machine_processes(info["id"], info["dir"])
    for handle in info["handles"]:
        handle.stop()


def _start(machine: dict, env: dict[str, str] | None = None) -> SshdHandle:
    env = {"DUMONT_MACHINE_ID": machine["id"], **(env or {})}
    for _ in range(5):  # another test may grab the free port first
        try:
            handle = start_sshd(
                machine["dir"], port=free_port(), authorized_keys=machine["authorized"], env=env
            )
        except SshdError as e:
            if "Address already in use" not in str(e):
                raise
            continue
        machine["handles"].append(handle)
        return handle
    raise AssertionError("no free port after 5 tries")


def _target(handle: SshdHandle) -> SSHTarget:
    return SSHTarget("127.0.0.1", handle.port, "root", handle.host_public_key)


def test_sessions_get_the_machine_env_and_the_host_key_survives_a_restart(machine: dict) -> None:
    first = _start(machine, {"DUMONT_WORKSPACE": "/work space/x"})
    assert first.host_public_key.startswith("ssh-ed25519 AAAA")
    with connect(_target(first), machine["key"]) as ssh:
        result = ssh.run('printf "%s|%s" "$DUMONT_WORKSPACE" "$DUMONT_MACHINE_ID"')
    assert result.stdout == f"/work space/x|{machine['id']}"
    first.stop()

    second = _start(machine)
    assert second.port != first.port or second.pid != first.pid
    assert second.host_public_key == first.host_public_key
    with connect(_target(second), machine["key"]) as ssh:  # the pinned key is still valid
        assert ssh.run(["true"]).exit_code == 0


def test_stop_leaves_no_process_and_no_listener(machine: dict) -> None:
    handle = _start(machine)
    session = connect(_target(handle), machine["key"])
    pid_file = machine["dir"] / "sleeper.pid"
    outcome: list[object] = []

    def run_in_session() -> None:  # a command still running in a session: it hangs below the listener
        try:
            outcome.append(session.run(["sh", "-c", 'echo $$ > "$0"; exec sleep 300', str(pid_file)]))
        except Exception as e:
            outcome.append(e)

    thread = threading.Thread(target=run_in_session)
    thread.start()
    _wait_until(lambda: pid_file.exists() and pid_file.read_text().strip())
    sleeper = int(pid_file.read_text())
    assert _alive(sleeper)

    handle.stop()
    thread.join(10)
    session.close()
    assert outcome and not getattr(outcome[0], "ok", False)  # the session ended with the server
    assert not _alive(handle.pid)
    _wait_until(lambda: not _alive(sleeper))
    assert _refused(handle.port)
    assert not (machine["dir"] / "sshd.pid").exists()
    handle.stop()  # idempotent


def test_kill_machine_processes_kills_what_sessions_started(machine: dict, tmp_path: Path) -> None:
    handle = _start(machine)
    pid_files = [machine["dir"] / "detached.pid", machine["dir"] / "no-env.pid"]
    bystander = subprocess.Popen(["sleep", "300"], cwd=tmp_path)  # same parent dir, not the machine's
    try:
        with connect(_target(handle), machine["key"]) as ssh:
            # Escapes the sshd process tree (new session, reparented to init) but keeps the env.
            ssh.run(
                [
                    "sh",
                    "-c",
                    'setsid sh -c \'echo $$ > "$0"; exec sleep 300\' "$1" >/dev/null 2>&1 </dev/null &',
                    "sh",
                    str(pid_files[0]),
                ]
            )
            # Drops the marker variable but runs inside the machine directory.
            ssh.run(
                "env -u DUMONT_MACHINE_ID setsid sh -c 'echo $$ > no-env.pid; exec sleep 300' "
                ">/dev/null 2>&1 </dev/null &",
                cwd=str(machine["dir"]),
            )
        _wait_until(lambda: all(p.exists() and p.read_text().strip() for p in pid_files))
        victims = [int(p.read_text()) for p in pid_files]
        assert all(_alive(pid) for pid in victims)

        killed = kill_machine_processes(machine["id"], machine["dir"])

        assert set(victims) <= set(killed)
        assert handle.pid in killed  # the machine's own sshd, found through its pid file
        handle.process.wait(5)
        _wait_until(lambda: not any(_alive(pid) for pid in victims))
        assert bystander.poll() is None
        assert kill_machine_processes(machine["id"], machine["dir"]) == []
    finally:
        bystander.kill()
        bystander.wait()


def test_a_taken_port_is_reported_with_sshds_own_words(machine: dict) -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        with pytest.raises(SshdError, match="Address already in use"):
            start_sshd(machine["dir"], port=port, authorized_keys=machine["authorized"], env={})
    assert not (machine["dir"] / "sshd.pid").exists()


def test_env_names_and_values_that_would_break_the_config_are_refused(machine: dict) -> None:
    for env in ({"BAD NAME": "x"}, {"OK": 'quote"'}, {"OK": "new\nline"}):
        with pytest.raises(ValueError):
            start_sshd(machine["dir"], port=free_port(), authorized_keys=machine["authorized"], env=env)
