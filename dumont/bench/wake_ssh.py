"""`python manage.py benchmark wake-ssh`: `ssh dumont-NAME true` on a hibernated instance, driven through the
real `dumont` command line and a real OpenSSH client, beside the same wake through the API (POST /wake, poll,
then ssh); and the latency `dumont proxy` adds to an ssh of a running instance (median of --runs).

The stack is real: web server, Celery worker, the local marketplace (boot times x --time-scale), restic to a
local S3 server. The split of a wake: the client's request, the server's race / restore / agent (the wake
event's own timings), the worker's queueing, then running -> the command has run (the client noticing, the
host key pinned, the SSH handshake and the command)."""

from __future__ import annotations

import contextlib
import secrets
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import requests
from django.contrib.auth import get_user_model
from django.test import override_settings

from dumont.core.management.commands.benchmark import Benchmark
from instances.models import Instance

PASSWORD = "bench-" + secrets.token_hex(8)
POLL_SECONDS = 0.5  # the API client polls as often as the CLI's proxy does


class WakeOnSSHBenchmark(Benchmark):
    help = "ssh into a hibernated instance through `dumont proxy` (wake on SSH) vs the API; proxy overhead"

    def add_arguments(self, parser):
        parser.add_argument("--size-mb", type=int, default=200, help="workspace size (MB)")
        parser.add_argument("--wakes", type=int, default=3, help="wakes of each kind")
        parser.add_argument("--runs", type=int, default=20, help="ssh runs to a running instance, each way")
        parser.add_argument("--time-scale", type=float, default=0.05, help="marketplace boot times x this")
        parser.add_argument("--transcript", type=Path, help="also write what `dumont up` and the first wake on "
                                                            "ssh printed into this directory")

    def run(self, *, size_mb, wakes, runs, time_scale, transcript=None, **_):
        from machines.providers.local.testing import running_marketplace

        from dumont import processes
        from dumont.bench.instances import clean_up
        from dumont.celery import app
        from dumont.s3server import Credentials, start_s3_server

        with tempfile.TemporaryDirectory(prefix="bench-wake-ssh-") as tmp_name:
            tmp = Path(tmp_name)
            admin = Credentials(f"bench-{secrets.token_hex(4)}", secrets.token_hex(20))
            scope_secret = secrets.token_hex(20)
            s3 = start_s3_server(tmp / "s3", admin=admin, scope_secret=scope_secret)
            web_port = processes.free_port()
            prefix = f"bench-wake-ssh-{secrets.token_hex(3)}"  # its own queue, apart from a `make run`
            overrides = {
                "DUMONT_DATA_DIR": tmp / "data", "DUMONT_SSH_KEY_PATH": tmp / "ssh" / "id_ed25519",
                "AGENT_CONTROL_PLANE_URL": f"http://127.0.0.1:{web_port}", "SNAPSHOT_S3_ENDPOINT": s3.endpoint,
                "SNAPSHOT_FAST_S3_ENDPOINT": s3.fast_endpoint,
                "SNAPSHOT_S3_BUCKET": "bench", "SNAPSHOT_S3_ACCESS_KEY_ID": admin.access_key_id,
                "SNAPSHOT_S3_SECRET_ACCESS_KEY": admin.secret_access_key, "SNAPSHOT_MACHINE_CREDENTIALS": "scoped",
                "SNAPSHOT_S3_SCOPE_SECRET": scope_secret, "REDIS_KEY_PREFIX": prefix,
            }
            app.conf.broker_transport_options = {**app.conf.broker_transport_options, "global_keyprefix": f"{prefix}:"}
            signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
            try:
                with running_marketplace(tmp, time_scale=time_scale) as market, contextlib.ExitStack() as stack:
                    overrides.update(LOCAL_MARKETPLACE_ENABLED=True, LOCAL_MARKETPLACE_URL=market.url)
                    stack.enter_context(override_settings(**overrides))
                    env = processes.subprocess_env(**{k: str(v) for k, v in overrides.items()})
                    url = stack.enter_context(processes.web_server(tmp, env=env, port=web_port))
                    stack.enter_context(processes.celery_worker(tmp, env=env, concurrency=3))
                    user, _ = get_user_model().objects.get_or_create(username="__benchmark__")
                    user.set_password(PASSWORD)
                    user.save()
                    session = _Session(tmp, url, env, transcript)
                    try:
                        self._measure(session, market, size_mb, wakes, runs)
                    finally:
                        session.down_all()
                        clean_up(user)
            finally:
                s3.stop()

    def _measure(self, session: _Session, market, size_mb, wakes, runs):
        from snapshots.benchmarks import generate_workspace

        name = f"bench-{secrets.token_hex(2)}"
        session.cli("up", name, "--gpu", "RTX 4090")
        instance = Instance.objects.get(name=name, owner__username="__benchmark__")
        generate_workspace(Path(market.control.instance(instance.provider_instance_id)["workspace"]),
                           size_mb * 10**6)
        session.write_ssh_config()
        self.stdout.write(f"workspace {size_mb} MB, marketplace time scale {market.control.state()['time_scale']}")

        # the proxy's extra latency on a running instance: the same ssh, direct and through `dumont proxy`
        direct, proxied = [], []
        for _ in range(runs):
            direct.append(session.timed_ssh(session.direct_args(name)))
            proxied.append(session.timed_ssh(session.proxy_args(name)))
        d, p = statistics.median(direct), statistics.median(proxied)
        self.stdout.write(f"ssh ... true to a running instance, median of {runs}: direct {d * 1000:.0f} ms, "
                          f"through dumont proxy {p * 1000:.0f} ms: +{(p - d) * 1000:.0f} ms")

        header = f"{'':20}{'request':>8}{'queue':>7}{'race':>7}{'restore':>8}{'agent':>7}{'-> ssh ran':>11}{'total':>8}"
        rows = []
        for n in range(1, wakes + 1):
            for how in ("ssh dumont-NAME", "API + ssh"):
                session.cli("hibernate", name)
                rows.append((f"{how} #{n}", session.wake(instance.pk, name, through_ssh=how.startswith("ssh"))))
        self.stdout.write(header if rows else "")
        for label, split in rows:
            self.stdout.write(f"{label:<20}" + "".join(f"{split[k]:>{w}.1f}s" for k, w in (
                ("request", 7), ("queue", 6), ("race", 6), ("restore", 7), ("agent", 6), ("ssh", 10), ("total", 7))))
        for how in ("ssh dumont-NAME", "API + ssh") if rows else ():
            totals = [split["total"] for label, split in rows if label.startswith(how)]
            self.stdout.write(f"median total, {how}: {statistics.median(totals):.1f}s")


class _Session:
    """A user's laptop: the CLI with its own config dir, an SSH key, an ssh config."""

    def __init__(self, tmp: Path, url: str, env: dict, transcript: Path | None = None):
        from dumont.processes import REPO_ROOT

        self.transcript = transcript
        self.tmp, self.url, self.repo = tmp, url, REPO_ROOT
        self.env = {**env, "DUMONT_CONFIG_DIR": str(tmp / "cli"), "DUMONT_PASSWORD": PASSWORD, "TERM": "dumb"}
        self.key = tmp / "id_ed25519"
        subprocess.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-f", str(self.key)], check=True)
        self.cli("login", "--url", url, "--username", "__benchmark__")
        self.cli("ssh-key", "add", f"{self.key}.pub")
        self.token = requests.post(f"{url}/api/v1/auth/login", json={"username": "__benchmark__",
                                                                     "password": PASSWORD}, timeout=30).json()["access"]

    def cli(self, *args: str) -> str:
        done = subprocess.run([sys.executable, "-m", "dumont_cli", *args], cwd=self.repo, env=self.env,
                              capture_output=True, text=True, timeout=900)
        if done.returncode:
            raise RuntimeError(f"dumont {' '.join(args)}: {done.stderr}")
        if self.transcript and args[0] == "up":
            self._record("up", f"$ dumont {' '.join(args)}", done)
        return done.stdout

    def _record(self, what: str, command: str, done: subprocess.CompletedProcess) -> None:
        self.transcript.mkdir(parents=True, exist_ok=True)
        path = self.transcript / f"{what}.txt"
        if not path.exists():
            path.write_text(f"{command}\n{done.stderr}{done.stdout}")

    def write_ssh_config(self) -> None:
        (self.tmp / "ssh_config").write_text(self.cli("ssh-config"))

    def proxy_args(self, name: str) -> list[str]:
        return ["ssh", "-F", str(self.tmp / "ssh_config"), *self._identity(), f"dumont-{name}", "true"]

    def direct_args(self, name: str) -> list[str]:
        """The same ssh without the proxy: endpoint and pinned host key from the API, no config file."""
        ssh = requests.get(f"{self.url}/api/v1/instances", params={"name": name}, headers=self._auth(),
                           timeout=30).json()["results"][0]["ssh"]
        known = self.tmp / "api_known_hosts"
        known.write_text(f"dumont-{name} {ssh['host_key']}\n")
        return ["ssh", "-F", "/dev/null", *self._identity(), "-o", f"UserKnownHostsFile={known}",
                "-o", "StrictHostKeyChecking=yes", "-o", f"HostKeyAlias=dumont-{name}", "-p", str(ssh["port"]),
                f"{ssh['user']}@{ssh['host']}", "true"]

    def _identity(self) -> list[str]:
        return ["-i", str(self.key), "-o", "IdentitiesOnly=yes", "-o", "BatchMode=yes"]

    def _auth(self) -> dict:
        return {"Authorization": f"Bearer {self.token}"}

    def timed_ssh(self, args: list[str], record: str | None = None) -> float:
        started = time.monotonic()
        done = subprocess.run(args, capture_output=True, text=True, timeout=900, stdin=subprocess.DEVNULL)
        if done.returncode:
            raise RuntimeError(f"{' '.join(args)}: {done.stderr}")
        if self.transcript and record:
            self._record(record, f"$ ssh {args[-2]} {args[-1]}", done)
        return time.monotonic() - started

    def wake(self, instance_id: int, name: str, *, through_ssh: bool) -> dict[str, float]:
        started = time.time()
        if through_ssh:
            self.timed_ssh(self.proxy_args(name), record="wake-on-ssh")
        else:
            response = requests.post(f"{self.url}/api/v1/instances/{instance_id}/wake", headers=self._auth(), timeout=30)
            response.raise_for_status()
            while requests.get(f"{self.url}/api/v1/instances/{instance_id}", headers=self._auth(),
                               timeout=30).json()["status"] != "running":
                time.sleep(POLL_SECONDS)
            self.timed_ssh(self.direct_args(name))
        ran = time.time()
        instance = Instance.objects.get(pk=instance_id)
        waking = instance.events.filter(kind="status", data__to="waking").latest("id").created_at.timestamp()
        running = instance.events.filter(kind="status", data__to="running").latest("id")
        timings = running.data["timings"]
        at_running = running.created_at.timestamp()
        server = timings["race"] + timings["restore"] + timings["agent"]
        return {"request": waking - started, "queue": timings["total"] - server, "race": timings["race"],
                "restore": timings["restore"], "agent": timings["agent"], "ssh": ran - at_running,
                "total": ran - started}

    def down_all(self) -> None:
        for instance in Instance.objects.filter(owner__username="__benchmark__").exclude(
                status__in=["destroyed", "failed", "destroying"]):
            with contextlib.suppress(RuntimeError):
                self.cli("down", instance.name)


BENCHMARKS = {"wake-ssh": WakeOnSSHBenchmark}
