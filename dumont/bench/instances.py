"""`python manage.py benchmark race`: the launch race against single launch with sequential failover.

Both run on a private local marketplace whose hosts boot like vast.ai's (lognormal, median ~60 s, a
long tail, ~20% never ready), scaled down in time by `--time-scale`. The race is our real code
(`instances.race.race_run`, in this process); the baseline is what SkyPilot/dstack do: rent the best
offer, wait for it (up to the same machine timeout), destroy it and try the next one if it fails.

Figures: median / p90 time-to-ready, failure rate, cost of the machines that did not win (race
losers, baseline failures), and the race's own overhead: time-to-ready minus the winning machine's
own boot (until the marketplace brought it up) and minus one SSH command's round trip on it.
"""

from __future__ import annotations

import contextlib
import dataclasses
import os
import random
import signal
import statistics
import sys
import tempfile
import time
from datetime import datetime
from decimal import Decimal
from pathlib import Path

import yaml
from django.contrib.auth import get_user_model
from django.db import transaction
from django.test import override_settings
from django.utils import timezone

from dumont.core.management.commands.benchmark import Benchmark
from instances import lifecycle
from instances.models import Instance
from instances.race import RaceConfig, race_run
from instances.states import Status, transition
from machines.keys import control_plane_key_path, control_plane_public_key
from machines.models import MachineAttempt, MachineBlacklist, MachineStats
from machines.providers.base import LaunchRequest, OfferQuery, ProviderError
from machines.ssh import SSHError, SSHTarget, connect, wait_for_ssh

GPU = "BENCH-4090"
FIRST_MACHINE_ID = 80001


@dataclasses.dataclass
class Launch:
    seconds: float | None  # None: no machine became ready
    loser_cost: Decimal
    machines: int
    overhead: float | None = None


def clean_up(user) -> None:
    """Remove the benchmark user's rows (and the stats of the benchmark's own hosts)."""
    from snapshots.models import Snapshot, SnapshotRepository, SnapshotRestore

    with transaction.atomic():
        instances = Instance.objects.filter(owner=user)
        touched = set(MachineAttempt.objects.filter(instance__in=instances).values_list("provider", "host_id"))
        for provider, host_id in touched:  # stats are derived from attempts: the benchmark's must not stay
            MachineStats.objects.filter(provider=provider, host_id=host_id).delete()
            MachineBlacklist.objects.filter(provider=provider, host_id=host_id, source=MachineBlacklist.Source.AUTOMATIC).delete()
        MachineAttempt.objects.filter(instance__in=instances).delete()
        SnapshotRestore.objects.filter(owner=user).delete()
        Snapshot.objects.filter(owner=user).delete()
        SnapshotRepository.objects.filter(owner=user).delete()
        instances.delete()
        bench_hosts = [str(FIRST_MACHINE_ID + i) for i in range(1000)]
        MachineStats.objects.filter(provider="local", host_id__in=bench_hosts).delete()
        MachineBlacklist.objects.filter(provider="local", host_id__in=bench_hosts).delete()
        user.delete()


def vast_like_catalogue(hosts: int, seed: int) -> dict:
    """Hosts whose boots look like vast.ai's: median ~60 s, heavy tail, ~20% never ready."""
    rng = random.Random(seed)
    entries = []
    for i in range(hosts):
        roll = rng.random()
        entries.append({
            "name": f"bench-{i}", "machine_id": FIRST_MACHINE_ID + i, "gpu_name": GPU, "gpu_ram_gb": 24,
            "price_per_hour": round(rng.uniform(0.30, 0.60), 3), "region": "Anywhere, US",
            "reliability": round(rng.uniform(0.85, 0.99), 3),
            "boot": {"median": round(rng.lognormvariate(4.1, 0.35), 1), "sigma": 0.6},
            # each host has its own odds of never becoming ready (about 20% of rentals overall)
            "p_stuck_loading": 0.10 if roll < 0.5 else 0.05,
            "p_exited": 0.05,
            "p_ssh_never_answers": 0.05 if roll < 0.5 else 0.02,
            "capacity": 6,
        })
    return {"hosts": entries}


def percentile(values: list[float], fraction: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(fraction * (len(ordered) - 1)))]


class RaceBenchmark(Benchmark):
    help = "launch race vs sequential failover on a vast-like local marketplace"

    def add_arguments(self, parser):
        parser.add_argument("--launches", type=int, default=12, help="launches per method")
        parser.add_argument("--hosts", type=int, default=40)
        parser.add_argument("--time-scale", type=float, default=0.05, help="boot times x this (0.05: 60 s -> 3 s)")
        parser.add_argument("--poll-interval", type=float, default=0.25, help="seconds between provider polls")
        parser.add_argument("--seed", type=int, default=7)

    def run(self, *, launches, hosts, time_scale, poll_interval, seed, **_):
        from dumont.bench.marketplace import running_marketplace

        config = RaceConfig(
            batch_size=5, max_rounds=3, batch_timeout=90 * time_scale, machine_timeout=180 * time_scale,
            poll_interval=poll_interval, ssh_timeout=max(5.0, 60 * time_scale),
        )
        with tempfile.TemporaryDirectory(prefix="bench-race-") as tmp:
            catalogue = Path(tmp) / "catalogue.yaml"
            catalogue.write_text(yaml.safe_dump(vast_like_catalogue(hosts, seed)))
            with running_marketplace(tmp, time_scale=time_scale, catalogue=catalogue, seed=seed) as market:
                overrides = {"LOCAL_MARKETPLACE_ENABLED": True, "LOCAL_MARKETPLACE_URL": market.url,
                             "DUMONT_SSH_KEY_PATH": Path(tmp) / "ssh" / "id_ed25519"}
                with override_settings(**overrides):
                    user, _ = get_user_model().objects.get_or_create(username="__benchmark__")
                    try:
                        self.stdout.write(f"{launches} launches per method, {hosts} hosts, time scale {time_scale} "
                                          f"(a 60 s boot takes {60 * time_scale:.1f} s), poll {poll_interval}s")
                        sequential = [self._sequential(market, config) for _ in range(launches)]
                        race = [self._race(user, market, config, i) for i in range(launches)]
                    finally:
                        clean_up(user)
        self._report(race, sequential, time_scale)

    # ---- the two methods --------------------------------------------------------------------

    def _race(self, user, market, config: RaceConfig, index: int) -> Launch:
        instance = Instance.objects.create(owner=user, name=f"bench-{index}-{time.time_ns()}", provider="local",
                                           gpu_name=GPU, disk_gb=10)
        started = time.monotonic()
        outcome = race_run(instance.pk, config=config)
        seconds = time.monotonic() - started
        instance.refresh_from_db()
        attempts = list(MachineAttempt.objects.filter(instance=instance))
        loser_cost = sum((a.cost for a in attempts if a.outcome != MachineAttempt.Outcome.WON), Decimal(0))
        launch = Launch(seconds=seconds if outcome == "won" else None, loser_cost=loser_cost, machines=len(attempts))
        if outcome == "won":
            winner = next(a for a in attempts if a.outcome == MachineAttempt.Outcome.WON)
            boot_at = market.control.instance(winner.provider_instance_id)["boot_at"]
            probe = self._ssh_round_trip(instance)
            launch.overhead = winner.ready_at.timestamp() - boot_at - probe
        transition(instance.pk, Status.DESTROYING, message="benchmark done")
        lifecycle.instance_destroy_run(instance.pk)
        return launch

    def _sequential(self, market, config: RaceConfig) -> Launch:
        provider = market.provider()
        offers = provider.search_offers(OfferQuery(gpu_name=GPU))  # cheapest first, as the peers do
        keys = (control_plane_public_key(),)
        started = time.monotonic()
        loser_cost = Decimal(0)
        for tries, offer in enumerate(offers[: config.batch_size * config.max_rounds], start=1):
            rented_at = time.monotonic()
            try:
                machine = provider.create(offer, LaunchRequest(label=f"bench-seq-{time.time_ns()}", image="bench",
                                                               disk_gb=10, ssh_public_keys=keys))
            except ProviderError:
                continue
            ready = self._wait_ready(provider, machine.instance_id, rented_at + config.machine_timeout, config)
            provider.destroy(machine.instance_id)
            if ready:
                return Launch(seconds=time.monotonic() - started, loser_cost=loser_cost, machines=tries)
            loser_cost += offer.price_per_hour * Decimal(str(time.monotonic() - rented_at)) / 3600
        return Launch(seconds=None, loser_cost=loser_cost, machines=config.batch_size * config.max_rounds)

    def _wait_ready(self, provider, machine_id: str, deadline: float, config: RaceConfig) -> bool:
        while time.monotonic() < deadline:
            machine = provider.get(machine_id)
            if machine.status in ("failed", "gone"):
                return False
            if machine.ssh_ready:
                target = SSHTarget(machine.ssh_host, machine.ssh_port, machine.ssh_user, machine.ssh_host_key)
                try:
                    with wait_for_ssh(target, control_plane_key_path(), min(deadline, time.monotonic()
                                                                             + config.ssh_timeout)) as session:
                        return session.run(["true"], timeout=10).ok
                except SSHError:
                    return False
            time.sleep(config.poll_interval)
        return False

    def _ssh_round_trip(self, instance: Instance) -> float:
        target = SSHTarget(instance.ssh_host, instance.ssh_port, instance.ssh_user, instance.ssh_host_key)
        started = time.monotonic()
        with connect(target, control_plane_key_path()) as session:
            session.run(["true"], timeout=10)
        return time.monotonic() - started

    # ---- report ---------------------------------------------------------------------------

    def _report(self, race: list[Launch], sequential: list[Launch], time_scale: float) -> None:
        def figures(launches: list[Launch]) -> dict:
            ready = [launch.seconds for launch in launches if launch.seconds is not None]
            return {
                "median": statistics.median(ready) if ready else float("nan"),
                "p90": percentile(ready, 0.9) if ready else float("nan"),
                "failed": 1 - len(ready) / len(launches),
                "loser_cost": sum((launch.loser_cost for launch in launches), Decimal(0)) / len(launches),
                "machines": statistics.mean(launch.machines for launch in launches),
            }

        r, s = figures(race), figures(sequential)
        w = self.stdout.write
        w("")
        w(f"{'':28}{'race':>12}{'sequential':>12}{'ratio':>9}")
        w(f"{'median time-to-ready (s)':28}{r['median']:>12.2f}{s['median']:>12.2f}{r['median'] / s['median']:>9.2f}")
        w(f"{'p90 time-to-ready (s)':28}{r['p90']:>12.2f}{s['p90']:>12.2f}{r['p90'] / s['p90']:>9.2f}")
        w(f"{'failed launches':28}{r['failed']:>12.0%}{s['failed']:>12.0%}")
        w(f"{'machines rented per launch':28}{r['machines']:>12.1f}{s['machines']:>12.1f}")
        w(f"{'non-winner cost per launch':28}{'$' + format(r['loser_cost'], '.5f'):>12}"
          f"{'$' + format(s['loser_cost'], '.5f'):>12}")
        overheads = [launch.overhead for launch in race if launch.overhead is not None]
        if overheads:
            w(f"race overhead over the winner's own boot + first SSH answer: median {statistics.median(overheads):.3f}s"
              f", p90 {percentile(overheads, 0.9):.3f}s (goal: median < 1 s)")
        w(f"in vast.ai time (/ {time_scale}): race median {r['median'] / time_scale:.0f}s, "
          f"sequential median {s['median'] / time_scale:.0f}s (the overhead above is not scaled)")


class WakeBenchmark(Benchmark):
    help = "hibernate then wake an instance on the local marketplace: race, restore, agent, total"

    def add_arguments(self, parser):
        parser.add_argument("--size-gb", type=float, default=0.5, help="workspace size")
        parser.add_argument("--wakes", type=int, default=3)
        parser.add_argument("--time-scale", type=float, default=0.05, help="marketplace boot times x this")

    def run(self, *, size_gb, wakes, time_scale, **_):
        import secrets

        from dumont.bench.marketplace import running_marketplace
        from dumont.bench.snapshots import generate_workspace
        from dumont.s3server import Credentials, start_s3_server
        from instances import hibernation

        size = int(size_gb * 1e9)
        with tempfile.TemporaryDirectory(prefix="bench-wake-") as tmp:
            admin = Credentials(f"bench-{secrets.token_hex(4)}", secrets.token_hex(20))
            scope_secret = secrets.token_hex(20)
            s3 = start_s3_server(Path(tmp) / "s3", admin=admin, scope_secret=scope_secret)
            try:
                with running_marketplace(tmp, time_scale=time_scale) as market, override_settings(
                    LOCAL_MARKETPLACE_ENABLED=True, LOCAL_MARKETPLACE_URL=market.url,
                    DUMONT_DATA_DIR=Path(tmp) / "data", DUMONT_SSH_KEY_PATH=Path(tmp) / "ssh" / "id_ed25519",
                    AGENT_CONTROL_PLANE_URL="http://127.0.0.1:9", SNAPSHOT_S3_ENDPOINT=s3.endpoint,
                    SNAPSHOT_FAST_S3_ENDPOINT=s3.fast_endpoint,
                    SNAPSHOT_S3_BUCKET="bench", SNAPSHOT_S3_ACCESS_KEY_ID=admin.access_key_id,
                    SNAPSHOT_S3_SECRET_ACCESS_KEY=admin.secret_access_key, SNAPSHOT_MACHINE_CREDENTIALS="scoped",
                    SNAPSHOT_S3_SCOPE_SECRET=scope_secret,
                    # the agents post nowhere here: no `hibernate_ready` to wait for, the two passes at once
                    HIBERNATE_AGENT_READY_SECONDS=0,
                ):
                    user, _ = get_user_model().objects.get_or_create(username="__benchmark__")
                    try:
                        self._run(user, market, size, wakes, hibernation, generate_workspace)
                    finally:
                        clean_up(user)
            finally:
                s3.stop()

    def _run(self, user, market, size, wakes, hibernation, generate_workspace):
        instance = Instance.objects.create(owner=user, name=f"wake-{time.time_ns()}", provider="local",
                                           gpu_name="RTX 4090", disk_gb=50)
        if race_run(instance.pk) != "won":
            raise RuntimeError("no machine for the benchmark")
        instance.refresh_from_db()
        workspace = Path(market.control.instance(instance.provider_instance_id)["workspace"])
        generate_workspace(workspace, size)
        self.stdout.write(f"workspace {size / 1e9:.2f} GB, marketplace time scale {time_scale_of(market)}")
        self.stdout.write(f"{'':8}{'hibernate':>11}{'race':>8}{'restore':>9}{'MB/s':>7}{'agent':>8}{'total':>8}")
        for n in range(1, wakes + 1):
            started = time.monotonic()
            if hibernation.instance_hibernate_run(instance.pk, reason="benchmark") != "hibernated":
                raise RuntimeError("hibernation failed")
            hibernate_s = time.monotonic() - started
            transition(instance.pk, Status.WAKING, expected=Status.HIBERNATED, message="benchmark wake")
            if hibernation.instance_wake_run(instance.pk) != "running":
                raise RuntimeError("wake failed")
            timings = instance.events.filter(kind="wake", data__has_key="timings").order_by("-id").first().data["timings"]
            self.stdout.write(
                f"wake {n:<3}{hibernate_s:>10.1f}s{timings['race']:>7.1f}s{timings['restore']:>8.1f}s"
                f"{size / 1e6 / timings['restore']:>7.0f}{timings['agent']:>7.1f}s{timings['total']:>7.1f}s"
            )
        transition(instance.pk, Status.DESTROYING, message="benchmark done")
        lifecycle.instance_destroy_run(instance.pk)



class FailoverBenchmark(Benchmark):
    help = ("a failover drill on the local marketplace with the real stack (worker, beat, web, S3): crash the GPU "
            "machine, measure detection, failover, recovery point and failback")

    def add_arguments(self, parser):
        parser.add_argument("--size-mb", type=int, default=200, help="workspace size (MB)")
        parser.add_argument("--lost-after", type=float, default=60.0, help="LOST_MACHINE_SECONDS")
        parser.add_argument("--heartbeat", type=int, default=10, help="AGENT_HEARTBEAT_INTERVAL_SECONDS")
        parser.add_argument("--sweep", type=float, default=10.0, help="LOST_SWEEP_SECONDS and STANDBY_SWEEP_SECONDS")
        parser.add_argument("--sync-interval", type=int, default=60, help="the standby's sync interval")
        parser.add_argument("--time-scale", type=float, default=0.05, help="marketplace boot times x this")

    def run(self, *, size_mb, lost_after, heartbeat, sweep, sync_interval, time_scale, **_):
        import secrets

        from dumont import processes
        from dumont.bench.marketplace import running_marketplace
        from dumont.celery import app
        from dumont.s3server import Credentials, start_s3_server

        with tempfile.TemporaryDirectory(prefix="bench-failover-") as tmp_name:
            tmp = Path(tmp_name)
            admin = Credentials(f"bench-{secrets.token_hex(4)}", secrets.token_hex(20))
            scope_secret = secrets.token_hex(20)
            s3 = start_s3_server(tmp / "s3", admin=admin, scope_secret=scope_secret)
            web_port = processes.free_port()
            overrides = {
                "DUMONT_DATA_DIR": tmp / "data", "DUMONT_SSH_KEY_PATH": tmp / "ssh" / "id_ed25519",
                "AGENT_CONTROL_PLANE_URL": f"http://127.0.0.1:{web_port}", "SNAPSHOT_S3_ENDPOINT": s3.endpoint,
                "SNAPSHOT_FAST_S3_ENDPOINT": s3.fast_endpoint,
                "SNAPSHOT_S3_BUCKET": "bench", "SNAPSHOT_S3_ACCESS_KEY_ID": admin.access_key_id,
                "SNAPSHOT_S3_SECRET_ACCESS_KEY": admin.secret_access_key, "SNAPSHOT_MACHINE_CREDENTIALS": "scoped",
                "SNAPSHOT_S3_SCOPE_SECRET": scope_secret, "AGENT_HEARTBEAT_INTERVAL_SECONDS": heartbeat,
                "LOST_MACHINE_SECONDS": lost_after, "LOST_SWEEP_SECONDS": sweep, "STANDBY_SWEEP_SECONDS": sweep,
            }
            # its own queue, apart from a running `make run` (whose worker would take these tasks)
            prefix = f"bench-failover-{secrets.token_hex(3)}"
            overrides["REDIS_KEY_PREFIX"] = prefix
            app.conf.broker_transport_options = {**app.conf.broker_transport_options, "global_keyprefix": f"{prefix}:"}
            # stopped from outside (SIGTERM): still stop the worker, beat, web server and marketplace
            signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
            try:
                with running_marketplace(tmp, time_scale=time_scale) as market, contextlib.ExitStack() as stack:
                    overrides.update(LOCAL_MARKETPLACE_ENABLED=True, LOCAL_MARKETPLACE_URL=market.url)
                    stack.enter_context(override_settings(**overrides))
                    env = processes.subprocess_env(**{k: str(v) for k, v in overrides.items()})
                    stack.enter_context(processes.web_server(tmp, env=env, port=web_port))
                    stack.enter_context(processes.celery_worker(tmp, env=env, concurrency=3))
                    stack.enter_context(processes.celery_beat(tmp, env=env))
                    user, _ = get_user_model().objects.get_or_create(username="__benchmark__")
                    try:
                        self._drill(user, market, size_mb, sync_interval, processes.wait_until)
                    finally:
                        self._destroy_all(user, market, processes.wait_until)
                        clean_up(user)
            finally:
                s3.stop()

    def _drill(self, user, market, size_mb, sync_interval, wait_until):
        import hashlib

        from dumont.bench.snapshots import generate_workspace
        from instances import services
        from instances.models import StandbyConfig, StandbyMachine

        def status(*wanted: str, timeout: float = 600) -> Instance:
            def settled():
                instance.refresh_from_db()
                return instance.status in wanted
            wait_until(settled, timeout=timeout, what=f"the instance to be {'/'.join(wanted)}")
            return instance

        def synced_after(moment) -> StandbyMachine:
            return wait_until(lambda: StandbyMachine.objects.filter(instance=instance, status="ready",
                                                                    last_sync_at__gt=moment).first(),
                              timeout=600, what="a standby sync")

        StandbyConfig.objects.update_or_create(owner=user, defaults={
            "enabled": True, "provider": "local", "sync_interval_seconds": sync_interval, "disk_gb": 10,
            "auto_failover": True, "auto_recovery": False})
        instance = services.instance_create(owner=user, name=f"drill-{time.time_ns()}", gpu_name="RTX 4090")
        status("running", "failed")
        if instance.status != "running":
            raise RuntimeError(f"no machine for the drill: {instance.status_reason}")
        market.control.set_gpu_util(instance.provider_instance_id, 80)  # busy: never hibernated meanwhile
        workspace = Path(market.control.instance(instance.provider_instance_id)["workspace"])
        generated = timezone.now()
        generate_workspace(workspace, size_mb * 10**6)
        mirrored = synced_after(generated)
        self.stdout.write(f"workspace {size_mb} MB; standby {mirrored.ssh_host}:{mirrored.ssh_port} "
                          f"(${mirrored.price_per_hour}/h); first full mirror {mirrored.last_sync_seconds:.1f}s")
        # crash halfway through a sync interval: a typical recovery point, not a best case
        last = synced_after(timezone.now())
        wait_until(lambda: (timezone.now() - last.last_sync_at).total_seconds() >= sync_interval / 2,
                   timeout=sync_interval, interval=0.1, what="half a sync interval")
        crashed_at = timezone.now()
        market.control.crash(instance.provider_instance_id)
        status("failover")
        usable_at = instance.status_changed_at
        lost = instance.events.filter(kind="lost", data__lost=True).latest("id")
        failover = instance.events.filter(kind="standby", data__has_key="failover_seconds").latest("id")
        detected_at = datetime.fromisoformat(lost.data["detected_at"])
        rows = [
            ("detection (crash -> lost verdict)", (detected_at - crashed_at).total_seconds()),
            ("failover (lost verdict -> standby endpoint)", failover.data["failover_seconds"]),
            ("crash -> working on the standby", (usable_at - crashed_at).total_seconds()),
            ("recovery point (work lost)", failover.data["work_lost_seconds"]),
        ]
        marker = Path(market.control.instance(mirrored.provider_instance_id)["workspace"]) / "written-on-the-standby.bin"
        marker.write_bytes(os.urandom(1 << 20))
        digest = hashlib.sha256(marker.read_bytes()).hexdigest()
        services.instance_failback_request(instance=instance)
        status("running", "failover")
        if instance.status != "running":
            raise RuntimeError(f"failback failed: {instance.status_reason}")
        timings = instance.events.filter(kind="status", data__to="running").latest("id").data["timings"]
        back = Path(market.control.instance(instance.provider_instance_id)["workspace"]) / marker.name
        carried = back.exists() and hashlib.sha256(back.read_bytes()).hexdigest() == digest
        rows += [(f"failback: {name}", timings[name]) for name in ("race", "restore", "agent", "last_pass", "total")]
        for name, seconds in rows:
            self.stdout.write(f"{name:<46}{seconds:>8.2f}s")
        self.stdout.write(f"file written on the standby is on the new GPU machine: {carried}")

    def _destroy_all(self, user, market, wait_until):
        for instance in Instance.objects.filter(owner=user).exclude(status__in=[Status.DESTROYED, Status.FAILED]):
            if instance.status != Status.DESTROYING:
                transition(instance.pk, Status.DESTROYING, message="benchmark done")
            lifecycle.instance_destroy_run(instance.pk)
        left = [m for m in market.control.state()["instances"] if m["status"] != "destroyed"]
        self.stdout.write(f"machines left at the marketplace after destroy: {len(left)}")


def time_scale_of(market) -> float:
    return market.control.state()["time_scale"]


BENCHMARKS = {"race": RaceBenchmark, "wake": WakeBenchmark, "failover": FailoverBenchmark}
