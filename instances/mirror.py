"""The standby's mirror: rsync between a GPU machine and its CPU standby, run on the GPU machine.

Machine to machine over SSH with a per-standby mirror key whose public half only the standby trusts,
and the standby's host key pinned (StrictHostKeyChecking=yes): the data never passes through the control
plane. Used by the periodic sync (push, instances/standby.py) and by a failback (pull, instances/relaunch.py).
"""

from __future__ import annotations

import shlex

from django.conf import settings

from dumont.core.errors import DomainError
from instances.models import StandbyMachine
from machines.ssh import SSHSession


class StandbyError(DomainError):
    """A standby step failed (no account, rsync error, ...): an event, never a crash of the GPU instance."""

    code = "standby_failed"
    http_status = 503


_INSTALL_RSYNC = ("command -v rsync >/dev/null 2>&1 || "
                  "{ apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq rsync openssh-client; }"
                  " >/dev/null 2>&1; command -v rsync >/dev/null")
_WORKSPACE = '"${DUMONT_WORKSPACE:-/workspace}"'
PREPARE_STANDBY = f"{_INSTALL_RSYNC} && mkdir -p {_WORKSPACE}"


def _known_host(standby: StandbyMachine) -> str:
    return f"{standby.ssh_target.known_hosts_name} {standby.ssh_host_key}"


def rsync_script(standby: StandbyMachine, *, pull: bool) -> str:
    """Shell run on the GPU machine: push its workspace to the standby, or (`pull`) the standby's back.

    The mirror key and the standby's pinned host key come in the environment (over stdin, never argv).
    """
    target = standby.ssh_target
    ssh = ("ssh -F /dev/null -i $d/key -o IdentitiesOnly=yes -o BatchMode=yes -o StrictHostKeyChecking=yes "
           f"-o UserKnownHostsFile=$d/known_hosts -o GlobalKnownHostsFile=/dev/null -o ConnectTimeout=15 "
           f"-o ServerAliveInterval=15 -p {int(target.port)}")
    remote_path = shlex.quote(f"mkdir -p {_WORKSPACE} && cd {_WORKSPACE} && rsync")
    remote = shlex.quote(f"{target.user}@{target.host}:./")
    source, destination = (remote, "./") if pull else ("./", remote)
    return "\n".join([
        "set -e",
        'd="$HOME/.dumont/standby"',
        'mkdir -p "$d" && chmod 700 "$d"',
        "umask 077",
        'printf "%s\\n" "$MIRROR_KEY" > "$d/key"',
        'printf "%s\\n" "$MIRROR_KNOWN_HOST" > "$d/known_hosts"',
        _INSTALL_RSYNC,
        f"mkdir -p {_WORKSPACE} && cd {_WORKSPACE}",
        f'rsync -a --delete --stats -e "{ssh}" --rsync-path={remote_path} {source} {destination}',
    ])


def mirror(session: SSHSession, standby: StandbyMachine, *, pull: bool = False) -> dict:
    """Run one rsync on the GPU machine of `session`. Returns its figures; raises StandbyError."""
    env = {"MIRROR_KEY": standby.mirror_private_key, "MIRROR_KNOWN_HOST": _known_host(standby)}
    result = session.run(rsync_script(standby, pull=pull), env=env, timeout=settings.STANDBY_SYNC_TIMEOUT_SECONDS)
    if not result.ok:
        raise StandbyError(f"rsync exited {result.exit_code}: {result.stderr.strip()[-500:]}")
    stats = {}
    for line in result.stdout.splitlines():
        name, _, value = line.partition(":")
        if name in ("Number of files", "Number of regular files transferred", "Total transferred file size"):
            stats[name.lower().replace(" ", "_")] = value.strip().split(" ")[0].replace(",", "")
    return stats
