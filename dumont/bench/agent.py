"""`python manage.py benchmark heartbeats [--rate 2000] [--seconds 20] [--instances 2000]`

Heartbeat ingestion as production runs it: gunicorn (DEBUG off) on loopback, the database the
settings point to, Redis, a Celery worker for size-triggered flushes and a flusher thread here in
the role of beat. A fleet of `--instances` instances with real credentials sends signed heartbeats
at a fixed rate (open loop: dumont.bench.loadgen), then every accepted heartbeat is looked up in
PostgreSQL by its nonce (none may be lost). The same load against the no-op `GET /api/v1/health` in
the same run is the framework's own cost; the ratios say what heartbeats add.

Everything it creates lives under its own user and its own Redis key prefix, and is removed at the end.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import math
import os
import random
import secrets
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path

from django.conf import settings
from django.contrib.auth import get_user_model
from django.db import connection, transaction
from django.test import override_settings

from agent import buffer, services
from agent.daemon.dumont_agent import STATUS_PATH, signature
from agent.models import AgentCredential, Heartbeat
from dumont.bench.loadgen import LoaderResult, run_load
from dumont.core.management.commands.benchmark import Benchmark
from dumont.processes import REPO_ROOT

SYNC_REPORT = {"state": "idle", "interval": 300.0, "runs": 12, "running_since": None,
               "last": {"exit_code": 0, "snapshot_id": "5f3c9a1e0b7d", "error_tail": None,
                        "started_at": 1767000000.5, "duration": 4.2}}


@dataclasses.dataclass
class Phase:
    name: str
    sent: int
    ok: int
    errors: dict[int, int]
    seconds: float
    p50_ms: float
    p99_ms: float
    max_ms: float
    server_cpu_ms: float  # gunicorn workers' CPU per answered request
    loader_cpu_ms: float
    machine_busy: float  # share of all cores busy during the phase
    accepted_nonces: list[str]

    @property
    def rate(self) -> float:
        return self.ok / self.seconds


def _cpu_ticks(pids: list[int]) -> int:
    total = 0
    for pid in pids:
        with contextlib.suppress(OSError):
            fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
            total += int(fields[11]) + int(fields[12])  # utime + stime
    return total


def _machine_ticks() -> tuple[int, int]:
    """(busy, total) jiffies over all cores."""
    values = [int(v) for v in Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:]]
    idle = values[3] + values[4]
    return sum(values) - idle, sum(values)


def _children(pid: int) -> list[int]:
    found = []
    for name in filter(str.isdigit, os.listdir("/proc")):
        with contextlib.suppress(OSError):
            if int(Path(f"/proc/{name}/stat").read_text().rsplit(")", 1)[1].split()[1]) == pid:
                found.append(int(name))
    return found


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _database_url() -> str:
    db = connection.settings_dict
    credentials = db["USER"] + (f":{db['PASSWORD']}" if db["PASSWORD"] else "")
    host = f"{db['HOST']}:{db['PORT'] or 5432}" if db["HOST"] else ""
    return f"postgres://{credentials}@{host}/{db['NAME']}"


def _stop(process: subprocess.Popen) -> None:
    with contextlib.suppress(ProcessLookupError):
        os.killpg(process.pid, signal.SIGTERM)
    try:
        process.wait(15)
    except subprocess.TimeoutExpired:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(process.pid, signal.SIGKILL)
        process.wait(5)


def _wait_for(predicate, timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise RuntimeError(f"timed out waiting for {what}")
        time.sleep(0.1)


class HeartbeatBenchmark(Benchmark):
    help = "signed heartbeats into gunicorn at a fixed rate vs the no-op /api/v1/health; none may be lost"

    def add_arguments(self, parser):
        parser.add_argument("--rate", type=float, default=2000, help="requests per second, both endpoints")
        parser.add_argument("--seconds", type=float, default=20)
        parser.add_argument("--instances", type=int, default=2000)
        parser.add_argument("--workers", type=int, default=2, help="gunicorn worker processes")
        parser.add_argument("--threads", type=int, default=2, help="threads per gunicorn worker (gthread)")
        parser.add_argument("--worker-class", default="uvicorn.workers.UvicornWorker",
                            help="the ingest tier's uvicorn worker (dumont.asgi), or gthread (dumont.wsgi, the API's)")
        parser.add_argument("--loaders", type=int, default=2, help="load generator processes")
        parser.add_argument("--connections", type=int, default=32, help="keep-alive sockets per loader, at most")
        parser.add_argument("--warmup", type=float, default=2.0, help="seconds of each load first, not counted")

    def run(self, *, rate, seconds, instances, workers, threads, worker_class, loaders, connections, warmup, **_):
        prefix = f"bench-agent-{os.getpid()}"
        with override_settings(REDIS_KEY_PREFIX=prefix):
            owner, fleet = self._fleet(instances)
            try:
                env = self._env(prefix)
                # the per-instance limit stays on (its check costs what it costs), set above this load's
                # per-instance rate: the benchmark's fleet beats faster than agents do
                per_interval = rate / instances * settings.AGENT_HEARTBEAT_INTERVAL_SECONDS
                env["AGENT_HEARTBEATS_PER_INTERVAL"] = str(max(settings.AGENT_HEARTBEATS_PER_INTERVAL,
                                                               math.ceil(per_interval * 2)))
                with self._gunicorn(env, workers, threads, worker_class) as (address, master):
                    with self._celery_worker(env), self._flusher():
                        load = {"address": address, "rate": rate, "loaders": loaders, "connections": connections,
                                "master": master}
                        self.stdout.write(f"warm-up: {warmup:.0f}s of each at {rate:.0f}/s")
                        warm = [self._phase("warm-up", self._heartbeats(fleet), seconds=warmup, **load),
                                self._phase("warm-up", self._noop(), seconds=warmup, **load)]
                        self.stdout.write(f"measuring: {seconds:.0f}s of each at {rate:.0f}/s")
                        noop = self._phase("no-op GET /api/v1/health", self._noop(), seconds=seconds, **load)
                        beats = self._phase(f"POST {STATUS_PATH}", self._heartbeats(fleet), seconds=seconds, **load)
                        flush_started = time.monotonic()
                        _wait_for(lambda: buffer.pending() == 0, 120, "the buffer to drain")
                        flush_lag = time.monotonic() - flush_started
                accepted = set(beats.accepted_nonces) | {n for p in warm for n in p.accepted_nonces}
                stored = set(Heartbeat.objects.filter(instance__owner=owner).values_list("nonce", flat=True))
                self._report(noop, beats, accepted, stored, flush_lag,
                             f"gunicorn {workers} x {worker_class}" + (f"/{threads} threads" if worker_class == "gthread" else ""),
                             instances, loaders, rate)
            finally:
                self._clean_up(owner, prefix)

    # ---- the fleet and the load ---------------------------------------------------------------

    def _fleet(self, count: int) -> tuple[object, list[tuple[int, str]]]:
        from instances.models import Instance

        owner = get_user_model().objects.create(username=f"__bench_agent_{os.getpid()}__")
        with transaction.atomic():
            instances = Instance.objects.bulk_create(
                Instance(owner=owner, name=f"bench-{i}", provider="local", status="running") for i in range(count)
            )
            fleet = [(instance.pk, secrets.token_urlsafe(32)) for instance in instances]
            AgentCredential.objects.bulk_create(AgentCredential(instance_id=i, secret=s) for i, s in fleet)
        return owner, fleet

    @staticmethod
    def _heartbeats(fleet: list[tuple[int, str]]):
        salt = secrets.token_hex(8)

        def build(i: int, due: float) -> tuple[bytes, str]:
            instance_id, secret = fleet[i % len(fleet)]
            nonce = f"{salt}{i:016x}"
            util = round(random.uniform(0, 100), 1)
            body = json.dumps({
                "gpu_util": util, "gpus": [{"index": 0, "util": util, "mem_used_mb": 20480.0,
                                            "mem_total_mb": 81559.0, "temp_c": 61.0}],
                "gpu_source": "nvml", "gpu_error": None, "time": due, "state": "running", "sync": SYNC_REPORT,
                "agent_version": "1",
            }, separators=(",", ":")).encode()
            timestamp = str(int(due))
            head = (f"POST {STATUS_PATH} HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n"
                    f"Content-Length: {len(body)}\r\nX-Dumont-Instance: {instance_id}\r\n"
                    f"X-Dumont-Timestamp: {timestamp}\r\nX-Dumont-Nonce: {nonce}\r\n"
                    f"X-Dumont-Signature: {signature(secret, instance_id, timestamp, nonce, body, path=STATUS_PATH)}\r\n\r\n")
            return head.encode() + body, nonce

        return build

    @staticmethod
    def _noop():
        request = b"GET /api/v1/health HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n"
        return lambda i, due: (request, "")

    def _phase(self, name, factory, *, address, rate, seconds, loaders, connections, master) -> Phase:
        start = time.perf_counter() + 1.5
        samples = {}

        def sample(at: str) -> None:
            samples[at] = (_cpu_ticks(_children(master)), _machine_ticks())

        def sample_at_start() -> None:
            time.sleep(max(0.0, start - time.perf_counter()))
            sample("start")

        sampler = threading.Thread(target=sample_at_start)
        sampler.start()
        results: list[LoaderResult] = run_load(address=address, factory=factory, rate=rate, seconds=seconds,
                                               start=start, loaders=loaders, connections_per_loader=connections)
        sample("end")
        sampler.join()
        latencies = sorted(latency for r in results for latency in r.latencies)
        statuses: dict[int, int] = {}
        for r in results:
            for status, count in r.statuses.items():
                statuses[status] = statuses.get(status, 0) + count
        ok = len(latencies)
        ticks = os.sysconf("SC_CLK_TCK")
        (server0, (busy0, total0)), (server1, (busy1, total1)) = samples["start"], samples["end"]

        def quantile(q: float) -> float:
            return latencies[min(ok - 1, int(q * ok))] * 1000 if ok else float("nan")

        return Phase(
            name=name, sent=sum(statuses.values()), ok=ok,
            errors={s: c for s, c in statuses.items() if not 200 <= s < 300},
            seconds=max(r.finished_at for r in results) - start,
            p50_ms=quantile(0.5), p99_ms=quantile(0.99), max_ms=latencies[-1] * 1000 if ok else float("nan"),
            server_cpu_ms=(server1 - server0) / ticks * 1000 / max(ok, 1),
            loader_cpu_ms=sum(r.cpu_seconds for r in results) * 1000 / max(ok, 1),
            machine_busy=(busy1 - busy0) / max(total1 - total0, 1),
            accepted_nonces=[n for r in results for n in r.accepted_nonces],
        )

    # ---- the processes ------------------------------------------------------------------------

    def _env(self, prefix: str) -> dict[str, str]:
        env = dict(os.environ, DJANGO_SETTINGS_MODULE="dumont.settings", DEBUG="false", LOG_LEVEL="WARNING",
                   DATABASE_URL=_database_url(), REDIS_URL=settings.REDIS_URL, REDIS_KEY_PREFIX=prefix,
                   SECRET_KEY=settings.SECRET_KEY, PYTHONUNBUFFERED="1")
        if settings.DUMONT_ENCRYPTION_KEYS:  # else derived from SECRET_KEY, as here
            env["DUMONT_ENCRYPTION_KEYS"] = ",".join(settings.DUMONT_ENCRYPTION_KEYS)
        return env

    @contextlib.contextmanager
    def _gunicorn(self, env, workers: int, threads: int, worker_class: str) -> Iterator[tuple[tuple[str, int], int]]:
        port = _free_port()
        # the ingest tier (uvicorn workers, dumont.asgi) or the API's WSGI server (gthread, dumont.wsgi)
        app = "dumont.asgi:application" if "uvicorn" in worker_class.lower() else "dumont.wsgi:application"
        command = [sys.executable, "-m", "gunicorn", app, "--bind", f"127.0.0.1:{port}",
                   "--workers", str(workers), "--worker-class", worker_class, "--threads", str(threads),
                   "--keep-alive", "75", "--backlog", "2048", "--log-level", "warning"]
        process = subprocess.Popen(command, cwd=REPO_ROOT, env=env, stdin=subprocess.DEVNULL, start_new_session=True)
        try:
            def answers() -> bool:
                with contextlib.suppress(OSError):
                    with urllib.request.urlopen(f"http://127.0.0.1:{port}/api/v1/health", timeout=2) as r:  # noqa: S310
                        return r.status == 200
                return False

            _wait_for(lambda: process.poll() is None and answers() and len(_children(process.pid)) >= workers,
                      90, "gunicorn")
            yield ("127.0.0.1", port), process.pid
        finally:
            _stop(process)

    @contextlib.contextmanager
    def _celery_worker(self, env) -> Iterator[None]:
        """Runs the flushes the API asks for when the buffer holds a batch (its own key prefix: it sees
        no other task)."""
        log = Path(f"/tmp/bench-agent-celery-{os.getpid()}.log")  # noqa: S108
        with open(log, "wb") as out:
            process = subprocess.Popen(
                [sys.executable, "-m", "celery", "-A", "dumont", "worker", "--pool=solo", "--without-gossip",
                 "--without-mingle", "--without-heartbeat", "--loglevel=INFO", "--queues=sweeps",
                 f"--hostname=bench-{os.getpid()}@%h"],
                cwd=REPO_ROOT, env=env, stdin=subprocess.DEVNULL, stdout=out, stderr=subprocess.STDOUT,
                start_new_session=True,
            )
        try:
            _wait_for(lambda: "ready." in log.read_text(errors="replace"), 90, "the celery worker")
            yield
        finally:
            _stop(process)
            log.unlink(missing_ok=True)

    @contextlib.contextmanager
    def _flusher(self) -> Iterator[None]:
        """Beat's part: a flush every AGENT_FLUSH_INTERVAL_SECONDS."""
        stop = threading.Event()

        def loop() -> None:
            while not stop.wait(settings.AGENT_FLUSH_INTERVAL_SECONDS):
                services.heartbeats_flush()
            connection.close()

        thread = threading.Thread(target=loop, daemon=True)
        thread.start()
        try:
            yield
        finally:
            stop.set()
            thread.join(60)

    def _clean_up(self, owner, prefix: str) -> None:
        from instances.models import Instance

        Heartbeat.objects.filter(instance__owner=owner).delete()
        Instance.objects.filter(owner=owner).delete()
        owner.delete()
        r = buffer.client()
        keys = list(r.scan_iter(match=f"{prefix}:*", count=1000))
        for i in range(0, len(keys), 1000):
            r.delete(*keys[i:i + 1000])

    # ---- report -------------------------------------------------------------------------------

    def _report(self, noop: Phase, beats: Phase, accepted: set[str], stored: set[str], flush_lag: float,
                server: str, instances: int, loaders: int, rate: float) -> None:
        w = self.stdout.write
        w("")
        w(f"{server}, {instances} instances, {loaders} loader processes, Redis buffer + batched flush, "
          f"{os.cpu_count()} cores")
        w(f"{'':30}{'no-op':>12}{'heartbeat':>12}{'ratio':>8}")
        rows = [
            ("sent", noop.sent, beats.sent, "{:>12d}"),
            ("answered 2xx", noop.ok, beats.ok, "{:>12d}"),
            ("achieved rate (/s)", noop.rate, beats.rate, "{:>12.0f}"),
            ("p50 latency (ms)", noop.p50_ms, beats.p50_ms, "{:>12.2f}"),
            ("p99 latency (ms)", noop.p99_ms, beats.p99_ms, "{:>12.2f}"),
            ("max latency (ms)", noop.max_ms, beats.max_ms, "{:>12.1f}"),
            ("server CPU per request (ms)", noop.server_cpu_ms, beats.server_cpu_ms, "{:>12.3f}"),
            ("loader CPU per request (ms)", noop.loader_cpu_ms, beats.loader_cpu_ms, "{:>12.3f}"),
            ("machine CPU busy", noop.machine_busy * 100, beats.machine_busy * 100, "{:>11.0f}%"),
        ]
        for label, a, b, fmt in rows:
            ratio = f"{b / a:>8.2f}" if a else ""
            w(f"{label:30}{fmt.format(a)}{fmt.format(b)}{ratio}")
        errors = {"no-op": noop.errors, "heartbeat": beats.errors}
        w(f"errors (status: count, 0 = connection): {errors}")
        lost, unexpected = accepted - stored, stored - accepted
        w(f"accepted heartbeats (with warm-up): {len(accepted)}; in PostgreSQL: {len(stored & accepted)}; "
          f"lost: {len(lost)}; unexpected rows: {len(unexpected)}; buffer drained {flush_lag:.1f}s after the load")
        met = beats.rate >= 0.98 * rate and beats.p99_ms < 50 and not lost and not beats.errors
        w(f"heartbeats: {beats.rate:.0f}/s of {rate:.0f}/s, p99 {beats.p99_ms:.1f} ms, {len(lost)} lost -> "
          f"{'meets' if met else 'misses'} the target (rate sustained, p99 < 50 ms, no error, none lost)")


BENCHMARKS = {"heartbeats": HeartbeatBenchmark}
