"""Put DumontAgent on a machine and keep it running there.

The daemon (one stdlib-only file) and its config travel over SFTP; the config holds the instance's
secret and the sync command's environment (repository password, storage keys), so it is written 0600
and never appears on a command line. The agent survives the SSH session:
- under systemd (Restart=on-failure) when PID 1 is systemd, systemctl exists and we are root;
- else under a tiny restart loop started with `setsid nohup` (exit 0 means "told to stop": no restart).
A redeploy stops the running agent first, so there is never more than one (the daemon also holds a
lock file). `agent_deploy` returns once the new agent is up, or raises AgentDeployError with its log.
"""

from __future__ import annotations

import json
import shlex
import time
import uuid
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from django.conf import settings

from machines.ssh import PrivateKeyLike, SSHError, SSHSession, SSHTarget, connect

DAEMON_PATH = Path(__file__).resolve().parent / "daemon" / "dumont_agent.py"
AGENT_DIR = ".dumont-agent"  # under the remote user's $HOME
SYSTEMD_UNIT = "dumont-agent.service"
START_TIMEOUT_SECONDS = 20.0


class AgentDeployError(SSHError):
    pass


@dataclass(frozen=True)
class SyncConfig:
    """What the agent's sync service runs periodically (the agent knows nothing of restic)."""

    command: Sequence[str] | str
    env: Mapping[str, str] = field(default_factory=dict)
    interval_seconds: float | None = None  # default: AGENT_SYNC_INTERVAL_SECONDS
    timeout_seconds: float = 6 * 3600
    cwd: str | None = None
    env_expires_at: float | None = None  # the env's storage keys expire then: the agent renews them before


# The restart loop. `exec` keeps nothing between the supervisor and the agent but the loop itself.
_SUPERVISOR = """#!/bin/sh
# DumontAgent's supervisor: restart the agent when it crashes; exit 0 means it was told to stop.
cd "$(dirname "$0")" || exit 1
echo $$ > supervisor.pid
while :; do
  python3 dumont_agent.py config.json
  [ $? -eq 0 ] && break
  sleep 2
done
rm -f supervisor.pid
"""

# Prints key=value lines: the agent directory, and how to keep the agent running.
_PROBE = f"""set -e
dir="$HOME/{AGENT_DIR}"
mkdir -p "$dir" && chmod 700 "$dir"
echo "dir=$dir"
command -v python3 >/dev/null 2>&1 || {{ echo "error=python3 not found"; exit 0; }}
python3 -c 'import sys; sys.exit(sys.version_info < (3, 8))' || {{ echo "error=python3 is older than 3.8"; exit 0; }}
echo "python=$(command -v python3)"
# A local-marketplace machine (DUMONT_MACHINE_ID) shares its host's init: a unit there would outlive the machine.
if [ "$(cat /proc/1/comm 2>/dev/null)" = systemd ] && command -v systemctl >/dev/null 2>&1 \\
   && [ "$(id -u)" = 0 ] && [ -z "${{DUMONT_MACHINE_ID:-}}" ]; then
  echo "init=systemd"
else
  echo "init=nohup"
fi
"""

# Stops the supervisor's whole process group; the pid file is checked first (a reused pid is someone else).
_STOP_NOHUP = """dir="$1"
pid=$(cat "$dir/supervisor.pid" 2>/dev/null) || exit 0
case "$pid" in ''|*[!0-9]*) exit 0 ;; esac
grep -q "$dir/run.sh" "/proc/$pid/cmdline" 2>/dev/null || exit 0
kill -TERM -"$pid" 2>/dev/null || kill -TERM "$pid" 2>/dev/null
alive() { case "$(cat "/proc/$1/stat" 2>/dev/null)" in ''|*") Z "*) return 1 ;; esac; }  # zombies are gone
i=0
while alive "$pid" && [ $i -lt 50 ]; do sleep 0.1; i=$((i + 1)); done
kill -KILL -"$pid" 2>/dev/null || true
"""

_START_NOHUP = """dir="$1"
cd "$dir" || exit 1
if command -v setsid >/dev/null 2>&1; then
  setsid nohup /bin/sh "$dir/run.sh" >/dev/null 2>&1 </dev/null &
else
  nohup /bin/sh "$dir/run.sh" >/dev/null 2>&1 </dev/null &
fi
"""


def _unit(python: str, directory: str) -> str:
    return f"""[Unit]
Description=DumontAgent (GPU heartbeats, workspace sync)
After=network-online.target

[Service]
ExecStart={python} {directory}/dumont_agent.py {directory}/config.json
WorkingDirectory={directory}
Restart=on-failure
RestartSec=5

[Install]
WantedBy=multi-user.target
"""


def agent_config(*, instance_id: int, secret: str, control_plane_url: str, sync: SyncConfig | None,
                 deploy_id: str) -> dict:
    config = {
        "control_plane_url": control_plane_url,
        "instance_id": instance_id,
        "secret": secret,
        "interval": settings.AGENT_HEARTBEAT_INTERVAL_SECONDS,
        "deploy_id": deploy_id,
        "sync": None,
    }
    if sync is not None:
        config["sync"] = {
            "command": sync.command if isinstance(sync.command, str) else list(sync.command),
            "env": dict(sync.env),
            "interval": sync.interval_seconds or settings.AGENT_SYNC_INTERVAL_SECONDS,
            "timeout": sync.timeout_seconds,
            "cwd": sync.cwd,
            "env_expires_at": sync.env_expires_at,
        }
    return config


def _probe(session: SSHSession) -> dict[str, str]:
    result = session.run(_PROBE, timeout=30)
    facts = dict(line.split("=", 1) for line in result.stdout.splitlines() if "=" in line)
    if "error" in facts or not result.ok:
        raise AgentDeployError(f"cannot run the agent on {session.target}: {facts.get('error') or result.stderr[-300:]}")
    return facts


def _script(session: SSHSession, script: str, *args: str, timeout: float = 30) -> None:
    command = f"set -- {' '.join(shlex.quote(a) for a in args)}\n{script}"
    result = session.run(command, timeout=timeout)
    if not result.ok:
        raise AgentDeployError(f"agent deploy step failed on {session.target}: {result.stderr[-500:]}")


def agent_deploy(
    *,
    target: SSHTarget,
    private_key: PrivateKeyLike,
    instance_id: int,
    secret: str,
    control_plane_url: str,
    sync: SyncConfig | None = None,
) -> None:
    """Install (or replace) the machine's agent and return once it runs. Idempotent."""
    deploy_id = uuid.uuid4().hex
    config = agent_config(instance_id=instance_id, secret=secret, control_plane_url=control_plane_url,
                          sync=sync, deploy_id=deploy_id)
    with connect(target, private_key) as session:
        facts = _probe(session)
        directory, systemd = facts["dir"], facts.get("init") == "systemd"
        if systemd:
            session.run(["systemctl", "stop", SYSTEMD_UNIT], timeout=60)
        else:
            _script(session, _STOP_NOHUP, directory)
        session.upload(DAEMON_PATH, f"{directory}/dumont_agent.py", mode=0o644)
        session.write_file(f"{directory}/config.json", json.dumps(config).encode(), mode=0o600)
        if systemd:
            session.write_file(f"/etc/systemd/system/{SYSTEMD_UNIT}", _unit(facts["python"], directory).encode(),
                               mode=0o644)
            result = session.run(f"systemctl daemon-reload && systemctl enable --now {SYSTEMD_UNIT} "
                                 f"&& systemctl restart {SYSTEMD_UNIT}", timeout=60)
            if not result.ok:
                raise AgentDeployError(f"systemctl failed on {target}: {result.stderr[-500:]}")
        else:
            session.write_file(f"{directory}/run.sh", _SUPERVISOR.encode(), mode=0o700)
            _script(session, _START_NOHUP, directory)
        _wait_started(session, directory, deploy_id)


def _wait_started(session: SSHSession, directory: str, deploy_id: str) -> None:
    """The new agent writes state.json (with our deploy id and its pid) once it holds its lock."""
    deadline = time.monotonic() + START_TIMEOUT_SECONDS
    delay = 0.1
    while time.monotonic() < deadline:
        result = session.run(["cat", f"{directory}/state.json"], timeout=15)
        try:
            state = json.loads(result.stdout) if result.ok else {}
        except ValueError:  # read while being replaced
            state = {}
        if state.get("deploy_id") == deploy_id and session.run(["kill", "-0", str(state["pid"])], timeout=15).ok:
            return
        time.sleep(delay)
        delay = min(delay * 2, 1.0)
    log_tail = session.run(["tail", "-n", "20", f"{directory}/agent.log"], timeout=15).stdout
    raise AgentDeployError(f"the agent did not start on {session.target} within {START_TIMEOUT_SECONDS:.0f}s:\n"
                           f"{log_tail}")
