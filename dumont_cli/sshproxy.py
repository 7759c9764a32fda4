"""`ssh dumont-NAME` for an instance in any state: an OpenSSH `ProxyCommand` that wakes (or resumes) the
instance, waits until it runs, pins its host key and joins stdin/stdout to the machine's SSH port.

The host key comes from the control plane (which pinned it at first contact), written into the CLI's
own known_hosts under the alias `dumont-NAME` (`HostKeyAlias`), with `StrictHostKeyChecking yes`: a wake
onto a new host never prompts, and a machine presenting any other key is refused by ssh itself."""

from __future__ import annotations

import os
import shlex
import shutil
import socket
import sys
import threading
from pathlib import Path

from dumont_cli.client import Api, ApiError, CliError
from dumont_cli.config import ConfigDir, write_private
from dumont_cli.output import err

ALIAS_PREFIX = "dumont-"
CONNECTABLE = {"running", "failover", "failback"}  # the `ssh` endpoint is the GPU machine or the standby
PASSING = {"pending", "launching", "waking", "recovering", "hibernating", "pausing"}  # wait, they end on their own
GONE = {"failed", "destroying", "destroyed"}
INCLUDE_MARK = "# dumont: instances as `ssh dumont-NAME` (dumont ssh-config --write)"


def host_alias(name: str) -> str:
    return f"{ALIAS_PREFIX}{name}"


def dumont_command(config: ConfigDir) -> str:
    """How ssh should start this very CLI (absolute, so a ProxyCommand works whatever ssh's PATH)."""
    script = Path(sys.argv[0])
    if script.name == "dumont" and script.exists():
        program = shlex.quote(str(script.resolve()))
    elif shutil.which("dumont"):
        program = shlex.quote(shutil.which("dumont"))
    else:  # from a checkout: python -m, with the checkout on the path whatever ssh's working directory
        package_parent = shlex.quote(str(Path(__file__).resolve().parent.parent))
        program = f"env PYTHONPATH={package_parent} {shlex.quote(sys.executable)} -m dumont_cli"
    return f"{program} --config-dir {shlex.quote(str(config.path))}"


def ssh_options(config: ConfigDir, name: str | None) -> dict[str, str]:
    """The options of one `dumont-NAME` host (`name` None: the wildcard block, ssh's %n is the alias)."""
    return {
        "ProxyCommand": f"{dumont_command(config)} proxy {shlex.quote(name) if name else '%n'}",
        "HostKeyAlias": host_alias(name) if name else None,
        "UserKnownHostsFile": shlex.quote(str(config.known_hosts)),
        "GlobalKnownHostsFile": "/dev/null",
        "StrictHostKeyChecking": "yes",
        "CheckHostIP": "no",
        "ServerAliveInterval": "30",
    }


def ssh_user(instance: dict) -> str | None:
    """Who to log in as: the machine's user, kept while the instance hibernates (none before a first launch)."""
    if instance.get("ssh"):
        return instance["ssh"]["user"]
    if instance["status"] in ("pending", "launching", "failed"):
        return None
    return instance.get("ssh_user") or None


def ssh_config_text(config: ConfigDir, instances: list[dict]) -> str:
    lines = ["# Written by `dumont ssh-config`: every instance is `ssh dumont-NAME`, in any state", ""]
    for instance in instances:
        lines.append(f"Host {host_alias(instance['name'])}")
        if user := ssh_user(instance):
            lines.append(f"    User {user}")
        lines += [f"    {key} {value}" for key, value in ssh_options(config, instance["name"]).items() if value]
        lines.append("")
    # instances created later: %n is the alias typed, so the known_hosts name is the alias itself
    lines.append(f"Host {ALIAS_PREFIX}*")
    lines += [f"    {key} {value}" for key, value in ssh_options(config, None).items() if value]
    return "\n".join(lines) + "\n"


def include_in(ssh_config: Path, included: Path) -> bool:
    """Add `Include <included>` at the top of the user's ssh config (at the top: an Include after a `Host`
    line would apply to that host only). Returns False when it is there already."""
    line = f"Include {shlex.quote(str(included))}"
    current = ssh_config.read_text() if ssh_config.exists() else ""
    if line in current.splitlines():
        return False
    ssh_config.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
    write_private(ssh_config, f"{INCLUDE_MARK}\n{line}\n\n{current}")
    return True


def pin_host_key(config: ConfigDir, alias: str, host_key: str) -> None:
    """The alias's line in our known_hosts is the control plane's key, and only it."""
    parts = host_key.split()
    if len(parts) < 2:
        raise CliError(f"{alias}: the control plane has no pinned host key for this machine yet")
    with config.locked():
        try:
            lines = config.known_hosts.read_text().splitlines()
        except FileNotFoundError:
            lines = []
        kept = [line for line in lines if line.split(" ", 1)[0] != alias]
        wanted = f"{alias} {parts[0]} {parts[1]}"
        if kept + [wanted] != lines:
            write_private(config.known_hosts, "\n".join([*kept, wanted]) + "\n")


def instance_reachable(api: Api, name: str) -> dict:
    """The instance, once it runs: hibernated -> wake, paused -> resume, passing states -> wait.
    A running instance costs exactly one API call."""
    instance = api.instance(name)
    while instance["status"] not in CONNECTABLE or not instance.get("ssh"):
        status, until, fails = instance["status"], set(CONNECTABLE), set(GONE)
        if status in ("hibernated", "paused"):
            action = "wake" if status == "hibernated" else "resume"
            err.print(f"dumont: {name} is {status}: {action} (progress below)")
            try:
                instance = api.post(f"/api/v1/instances/{instance['id']}/{action}")
            except ApiError as exc:
                if exc.status != 409:  # 409: someone else acted first; look again
                    raise
                instance = api.instance(name)
                continue
            fails.add(status)  # a failed wake goes back to hibernated, a failed resume stays paused
        elif status in PASSING:
            until |= {"hibernated", "paused"}
        else:
            raise CliError(f"{name} is {status}: nothing to connect to ({instance.get('status_reason') or ''})")
        from dumont_cli.progress import Follower

        Follower(api, instance).wait(until=until, fails=fails, console=err.real, title=name,
                                     errors_fail=status == "paused")
        instance = api.instance(name)
        if instance["status"] in CONNECTABLE:
            err.print(f"dumont: {name} is {instance['status']}; connecting")
    return instance


def join(sock: socket.socket) -> None:
    """stdin -> socket and socket -> stdout until the server closes (ssh then closes our stdin)."""

    def upstream() -> None:
        while data := os.read(0, 65536):
            sock.sendall(data)
        sock.shutdown(socket.SHUT_WR)

    threading.Thread(target=upstream, daemon=True).start()
    while data := sock.recv(65536):
        os.write(1, data)


def proxy(api: Api, config: ConfigDir, name: str) -> None:
    name = name.removeprefix(ALIAS_PREFIX)
    instance = instance_reachable(api, name)
    endpoint = instance["ssh"]
    pin_host_key(config, host_alias(name), endpoint["host_key"])
    try:
        sock = socket.create_connection((endpoint["host"], endpoint["port"]), timeout=30)
    except OSError as exc:
        raise CliError(f"{name}: cannot reach {endpoint['host']}:{endpoint['port']}: {exc}") from exc
    sock.settimeout(None)
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    with sock:
        join(sock)
