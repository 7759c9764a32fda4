"""The launch race: rent several machines at once and keep the first that really works.

- Offers are searched, filtered (spec, price, blacklisted hosts, hosts already tried for this instance),
  ranked (price per expected success, machines/reliability.py) and taken `batch_size` at a time, one per host.
- An attempt row is written *before* each create; the creates of a batch run in parallel.
- Every machine of the current and earlier batches is watched (one `list` call per poll for all of
  them, which also spares the provider's rate limit). The winner is the first that is running with SSH
  details *and* answers a real command over SSH with the host key we pin. Every other machine is
  destroyed the moment the winner is committed, in parallel.
- A batch without a winner after `batch_timeout` starts the next round (at most `max_rounds`);
  machines that fail (exited/offline, SSH never answers, not ready within `machine_timeout`) are
  destroyed as they fail. If every round fails the instance is `failed` and nothing stays rented.

State lives in PostgreSQL (the attempts), not in the worker: a race whose worker died is resumed from
its attempts by the next delivery of the task (the reconcile task re-enqueues it). One race per
instance at a time is guaranteed by an advisory lock; two deliveries of the task produce one race.
Threads only talk to the provider and SSH; every database write happens on the race's own thread.
"""

from __future__ import annotations

import concurrent.futures as futures
import dataclasses
import logging
import threading
import time
from decimal import Decimal

from django.conf import settings
from django.db import transaction
from django.utils import timezone

from dumont.core.locks import advisory_lock
from instances.events import instance_event_add
from instances.locks import LOCK_NAMESPACE
from instances.models import Instance, InstanceEvent
from instances.states import IllegalTransition, Status, machine_assign, transition
from machines import reliability
from machines.clients import provider_client
from machines.keys import control_plane_key_path, control_plane_public_key
from machines.models import MachineAttempt, SSHKey
from machines.providers.base import (
    STATUS_FAILED,
    STATUS_GONE,
    LaunchRequest,
    OfferQuery,
    ProviderError,
    ProviderInstance,
)
from machines.ssh import HostKeyMismatch, SSHError, SSHTarget, connect, fetch_host_key

log = logging.getLogger(__name__)
Outcome = MachineAttempt.Outcome
Stage = MachineAttempt.Stage
LIVE_OUTCOMES = (Outcome.PENDING, Outcome.BOOTING)
# a machine just created may take a moment to show up in the provider's list
LIST_GRACE_SECONDS = 30.0


@dataclasses.dataclass(frozen=True)
class RaceConfig:
    batch_size: int
    max_rounds: int
    batch_timeout: float
    machine_timeout: float
    poll_interval: float
    ssh_timeout: float

    @classmethod
    def from_settings(cls) -> RaceConfig:
        return cls(
            batch_size=settings.RACE_BATCH_SIZE,
            max_rounds=settings.RACE_MAX_ROUNDS,
            batch_timeout=settings.RACE_BATCH_TIMEOUT_SECONDS,
            machine_timeout=settings.RACE_MACHINE_TIMEOUT_SECONDS,
            poll_interval=settings.RACE_POLL_INTERVAL_SECONDS,
            ssh_timeout=settings.RACE_SSH_TIMEOUT_SECONDS,
        )


@dataclasses.dataclass(frozen=True)
class SSHReady:
    target: SSHTarget  # with the host key to pin
    answered_at: float  # time.time() of the first command's answer


def attempt_label(instance: Instance, attempt_id: int) -> str:
    return f"{instance.label}-{attempt_id}"


# the statuses an instance races in: a launch; or a wake, a recovery or a failback, which then bring the
# workspace to the winner themselves
RACING = (Status.LAUNCHING, Status.WAKING, Status.RECOVERING, Status.FAILBACK)
# where each kind of race goes when no machine comes up: a launch fails; a wake or a recovery leaves the
# workspace in its snapshot (hibernated); a failback leaves the user on the standby
FAILED_RACE_STATUS = {Status.LAUNCHING: Status.FAILED, Status.WAKING: Status.HIBERNATED,
                      Status.RECOVERING: Status.HIBERNATED, Status.FAILBACK: Status.FAILOVER}


def race_run(instance_id: int, *, config: RaceConfig | None = None) -> str:
    """Run (or resume) the race of one instance. Returns how it ended: won, failed, cancelled, busy, skipped."""
    with advisory_lock(LOCK_NAMESPACE, instance_id) as acquired:
        if not acquired:
            return "busy"  # another delivery of this task is racing right now
        return race_locked(instance_id, config=config)


def race_locked(instance_id: int, *, config: RaceConfig | None = None, prefer_host: str = "",
                avoid_hosts: tuple[str, ...] = ()) -> str:
    """The race, for a caller that already holds the instance's lifecycle lock (wake, recovery, failback).

    A launch race ends with the instance `running` (or `failed`); the others give the instance its
    machine and leave the status to their caller (or, if no machine comes up, move it as
    FAILED_RACE_STATUS says). `avoid_hosts`: never rent from these (a recovery avoids the lost host).
    """
    return _Race(instance_id, config or RaceConfig.from_settings(), prefer_host=prefer_host,
                 avoid_hosts=avoid_hosts).run()


class _Race:
    def __init__(self, instance_id: int, config: RaceConfig, *, prefer_host: str = "",
                 avoid_hosts: tuple[str, ...] = ()):
        self.instance = Instance.objects.select_related("provider_account").get(pk=instance_id)
        # resolved once, here: the race's threads build adapters from these and must not query the database
        self.provider_name, self.account = self.instance.provider, self.instance.provider_account
        self.config = config
        self.prefer_host = prefer_host
        self.avoid_hosts = set(avoid_hosts)
        self.pool = futures.ThreadPoolExecutor(max_workers=2 * config.batch_size + 4, thread_name_prefix="race")
        self.stop = threading.Event()
        self.creating: dict[futures.Future, MachineAttempt] = {}
        self.checking: dict[futures.Future, MachineAttempt] = {}
        self.checked: set[int] = set()  # attempts whose SSH check has started
        self._thread_clients = threading.local()

    # ---- top level ------------------------------------------------------------------------

    def run(self) -> str:
        status = self.instance.status
        if status == Status.PENDING:
            self.instance = transition(self.instance.pk, Status.LAUNCHING, expected=Status.PENDING,
                                       message="launch race started")
        elif status not in RACING or self.instance.provider_instance_id:
            return "skipped"  # nothing to race for (or a wake whose race already won)
        elif MachineAttempt.objects.filter(instance=self.instance,
                                           created_at__gte=self.instance.status_changed_at).exists():
            self._event(InstanceEvent.Kind.RACE, "race resumed (its previous worker stopped)")
        self.status = self.instance.status
        # this race's attempts are those made since the instance entered launching/waking
        self.started_at = self.instance.status_changed_at
        try:
            self.provider = self._client()
            self.key_path = control_plane_key_path()
            return self._loop()
        except Exception as exc:
            log.exception("race of instance %s crashed", self.instance.pk)
            # the exception's text can name hosts, URLs or a provider's raw answer: it goes to the log
            # (above); the owner reads a clear reason
            reason = f"the launch race stopped on an internal error ({type(exc).__name__}); operators have the details"
            self._end_everything(Outcome.ABANDONED, reason)
            self._fail(reason)
            raise
        finally:
            self.stop.set()
            self.pool.shutdown(wait=False, cancel_futures=True)

    def _loop(self) -> str:
        cfg = self.config
        round_no, round_started = self._resume()
        while True:
            if self._cancelled():
                self._end_everything(Outcome.ABANDONED, "instance destroyed during the race")
                self._event(InstanceEvent.Kind.RACE, "race cancelled: the instance is being destroyed")
                return "cancelled"
            self._collect_creates()
            elapsed = time.monotonic() - round_started
            if round_no == 0 or elapsed >= cfg.batch_timeout or not (self._live() or self.creating):
                if round_no > 0:
                    self._event(InstanceEvent.Kind.RACE, f"round {round_no} produced no winner after {elapsed:.0f}s",
                                {"round": round_no})
                if round_no >= cfg.max_rounds:
                    return self._give_up(f"no machine became ready in {cfg.max_rounds} rounds")
                round_no += 1
                round_started = time.monotonic()
                if not self._start_round(round_no) and not (self._live() or self.creating):
                    return self._give_up(
                        "no offer matches the request" if round_no == 1 else "no more offers to try"
                    )
            platform_fault = self._poll()
            if platform_fault:
                # the provider cannot boot any machine (sshd missing, ...): renting more would fail the same way
                return self._give_up(platform_fault, outcome=Outcome.ABANDONED)
            ready = self._wait(cfg.poll_interval)
            if ready is not None:
                self._declare_winner(*ready)
                return "won"

    def _client(self):
        """This thread's adapter (an adapter's HTTP session is not shared between threads)."""
        client = getattr(self._thread_clients, "client", None)
        if client is None:
            client = provider_client(self.provider_name, self.account)
            self._thread_clients.client = client
        return client

    def _create(self, offer, launch) -> ProviderInstance:
        return self._client().create(offer, launch)

    def _destroy(self, machine_id: str) -> None:
        self._client().destroy(machine_id)

    # ---- rounds and creates ------------------------------------------------------------------

    def _attempts(self):
        return MachineAttempt.objects.filter(instance=self.instance, created_at__gte=self.started_at)

    def _resume(self) -> tuple[int, float]:
        """Pick up the attempts of an earlier delivery: confirm unconfirmed creates by their label."""
        attempts = list(self._attempts().order_by("id"))
        if not attempts:
            return 0, time.monotonic()
        unconfirmed = [a for a in attempts if a.outcome == Outcome.PENDING]
        if unconfirmed:
            found = self._list_machines()
            by_label = {m.label: m for m in (found or {}).values()}
            for attempt in unconfirmed:
                machine = by_label.get(attempt.label)
                if machine:
                    attempt.provider_instance_id = machine.instance_id
                    attempt.outcome = Outcome.BOOTING
                    attempt.save(update_fields=["provider_instance_id", "outcome"])
                elif found is not None:
                    self._finish(attempt, Outcome.ABANDONED, Stage.CREATE, "create not confirmed before the restart")
        round_no = max(a.round for a in attempts)
        round_start_at = min(a.created_at for a in attempts if a.round == round_no)
        elapsed = (timezone.now() - round_start_at).total_seconds()
        return round_no, time.monotonic() - elapsed

    def _start_round(self, round_no: int) -> int:
        instance = self.instance
        tried = set(self._attempts().values_list("host_id", flat=True)) | self.avoid_hosts
        banned = reliability.blacklisted_hosts(instance.provider, owner=instance.owner_id)
        query = OfferQuery(
            gpu_name=instance.gpu_name or None,
            num_gpus=instance.num_gpus,
            max_price_per_hour=instance.max_price_per_hour,
            region=instance.region or None,
            min_disk_gb=instance.disk_gb,
            exclude_host_ids=tuple(sorted(tried | banned)),
            interruptible=instance.interruptible,
        )
        try:
            offers = self.provider.search_offers(query)
        except ProviderError as exc:
            self._event(InstanceEvent.Kind.RACE, f"round {round_no}: offer search failed: {exc}", {"round": round_no})
            return 0
        chosen, hosts = [], set()
        rated_offers = reliability.rate_offers(instance.provider, offers, owner=instance.owner_id)
        # a wake prefers the machine it hibernated from, if that host is still offered
        rated_offers.sort(key=lambda r: r.offer.host_id != self.prefer_host)
        for rated in rated_offers:
            host = rated.offer.host_id
            if rated.blacklisted or host in tried or host in hosts:
                continue
            chosen.append(rated.offer)
            hosts.add(host)
            if len(chosen) == self.config.batch_size:
                break
        if not chosen:
            return 0
        with transaction.atomic():  # the intent, written before any provider call
            attempts = [
                MachineAttempt.objects.create(
                    provider=instance.provider, host_id=offer.host_id, offer_id=offer.offer_id, instance=instance,
                    round=round_no, gpu_name=offer.gpu_name, price_per_hour=offer.price_per_hour,
                )
                for offer in chosen
            ]
            for attempt in attempts:
                attempt.label = attempt_label(instance, attempt.pk)
                attempt.save(update_fields=["label"])
        keys = self._ssh_public_keys()
        for attempt, offer in zip(attempts, chosen, strict=True):
            launch = LaunchRequest(
                label=attempt.label, image=instance.image, disk_gb=instance.disk_gb, ssh_public_keys=keys,
                interruptible=instance.interruptible,
            )
            self.creating[self.pool.submit(self._create, offer, launch)] = attempt
        self._event(
            InstanceEvent.Kind.RACE,
            f"round {round_no}: renting {len(attempts)} machines",
            {"round": round_no, "attempts": [
                {"attempt": a.pk, "host": a.host_id, "offer": a.offer_id, "price": str(a.price_per_hour)}
                for a in attempts
            ]},
        )
        return len(attempts)

    def _ssh_public_keys(self) -> tuple[str, ...]:
        owner_keys = SSHKey.objects.filter(owner_id=self.instance.owner_id).values_list("public_key", flat=True)
        return (control_plane_public_key(), *owner_keys)

    def _collect_creates(self) -> None:
        for future in [f for f in self.creating if f.done()]:
            attempt = self.creating.pop(future)
            try:
                machine: ProviderInstance = future.result()
            except ProviderError as exc:
                self._finish(attempt, Outcome.PROVIDER_ERROR, Stage.CREATE, str(exc))
                continue
            attempt.provider_instance_id = machine.instance_id
            attempt.outcome = Outcome.BOOTING
            attempt.save(update_fields=["provider_instance_id", "outcome"])

    # ---- watching ----------------------------------------------------------------------------

    def _live(self) -> list[MachineAttempt]:
        return list(self._attempts().filter(outcome=Outcome.BOOTING).order_by("id"))

    def _list_machines(self) -> dict[str, ProviderInstance] | None:
        try:
            return {m.instance_id: m for m in self.provider.list(label_prefix=f"{self.instance.label}-")}
        except ProviderError as exc:
            log.warning("race %s: listing machines failed: %s", self.instance.pk, exc)
            return None

    def _poll(self) -> str | None:
        """Watch the live machines; returns the provider's message when a failure was its own platform's."""
        live = self._live()
        if not live:
            return None
        machines = self._list_machines()
        if machines is None:
            return None  # a passing provider error: the next poll tries again
        now = timezone.now()
        for attempt in live:
            if attempt.pk in self.checked:
                continue  # its SSH check decides
            age = (now - attempt.created_at).total_seconds()
            machine = machines.get(attempt.provider_instance_id)
            if machine is None or machine.status == STATUS_GONE:
                if age > LIST_GRACE_SECONDS:
                    self._finish(attempt, Outcome.PROVIDER_ERROR, Stage.BOOT, "machine vanished from the provider")
            elif machine.status == STATUS_FAILED:
                detail = f"provider reports {machine.raw_status}" + (
                    f": {machine.status_message}" if machine.status_message else "")
                if machine.platform_fault:  # not the host's fault: never counted against it
                    self._destroy_and_finish(attempt, Outcome.ABANDONED, Stage.BOOT, detail)
                    self._event(InstanceEvent.Kind.ATTEMPT, f"{attempt.host_id}: {detail}",
                                {"attempt": attempt.pk, "round": attempt.round, "outcome": Outcome.ABANDONED,
                                 "stage": Stage.BOOT, "platform_fault": True})
                    return machine.status_message or detail
                self._destroy_and_finish(attempt, Outcome.FAILED_STATUS, Stage.BOOT, detail)
            elif machine.ssh_ready:
                self.checked.add(attempt.pk)
                self.checking[self.pool.submit(self._ssh_check, machine)] = attempt
            elif age > self.config.machine_timeout:
                self._destroy_and_finish(attempt, Outcome.BOOT_TIMEOUT, Stage.BOOT,
                                         f"not running after {age:.0f}s ({machine.raw_status})")
        return None

    def _ssh_check(self, machine: ProviderInstance) -> SSHReady:
        """Runs in a thread: the first command answered over SSH, with the host key pinned at first contact."""
        deadline = time.monotonic() + self.config.ssh_timeout
        target = SSHTarget(machine.ssh_host, machine.ssh_port, machine.ssh_user or "root", machine.ssh_host_key)
        last_error: Exception | None = None
        while not self.stop.is_set() and time.monotonic() < deadline:
            try:
                if not target.host_key:
                    target = dataclasses.replace(target, host_key=fetch_host_key(target.host, target.port, timeout=5))
                with connect(target, self.key_path, connect_timeout=5) as session:
                    if session.run(["true"], timeout=10).ok:
                        return SSHReady(target=target, answered_at=time.time())
            except HostKeyMismatch:
                raise  # someone else answers on that port: never retry into it
            except SSHError as exc:
                last_error = exc
            self.stop.wait(0.2)
        raise SSHError(f"SSH did not answer within {self.config.ssh_timeout:.0f}s: {last_error}")

    def _wait(self, timeout: float) -> tuple[MachineAttempt, SSHReady] | None:
        """Wait up to `timeout` for an SSH check to finish; return the winner if one answered."""
        pending = list(self.checking) + list(self.creating)
        if pending:
            futures.wait(pending, timeout=timeout, return_when=futures.FIRST_COMPLETED)
        else:
            self.stop.wait(timeout)
        winners = []
        for future in [f for f in self.checking if f.done()]:
            attempt = self.checking.pop(future)
            try:
                winners.append((attempt, future.result()))
            except Exception as exc:  # any failure of the check loses the machine
                self._destroy_and_finish(attempt, Outcome.SSH_FAILED, Stage.SSH, str(exc))
        if not winners:
            return None
        return min(winners, key=lambda pair: pair[1].answered_at)

    # ---- ending ------------------------------------------------------------------------------

    def _declare_winner(self, winner: MachineAttempt, ready: SSHReady) -> None:
        ready_at = timezone.now()
        seconds = (ready_at - winner.created_at).total_seconds()
        machine = {
            "provider_instance_id": winner.provider_instance_id, "host_id": winner.host_id,
            "ssh_host": ready.target.host, "ssh_port": ready.target.port, "ssh_user": ready.target.user,
            "ssh_host_key": ready.target.host_key, "price_per_hour": winner.price_per_hour,
            "machine_started_at": ready_at,
        }
        message = f"machine {winner.host_id} ready after {seconds:.1f}s (round {winner.round})"
        data = {"attempt": winner.pk, "host": winner.host_id, "seconds_to_ready": round(seconds, 3),
                "price_per_hour": str(winner.price_per_hour), "gpu_name": winner.gpu_name}
        with transaction.atomic():
            if self.status == Status.LAUNCHING:
                self.instance = transition(self.instance.pk, Status.RUNNING, expected=Status.LAUNCHING,
                                           message=message, data=data, **machine)
            else:  # the machine is the instance's now; the wake/recovery/failback brings the workspace, then running
                machine_assign(self.instance.pk, expected=self.status, **machine)
                self._event(InstanceEvent.Kind.WAKE if self.status == Status.WAKING else InstanceEvent.Kind.RACE,
                            message, data)
            winner.outcome = Outcome.WON
            winner.ready_at = ready_at
            winner.seconds_to_ready = seconds
            winner.finished_at = ready_at
            winner.cost = _cost(winner.price_per_hour, seconds)
            winner.save(update_fields=["outcome", "ready_at", "seconds_to_ready", "finished_at", "cost"])
        # the losers go at once, all together
        self.stop.set()
        issued = time.monotonic()
        losers = self._live()
        destroys = {self.pool.submit(self._destroy, a.provider_instance_id): a for a in losers}
        for future in futures.as_completed(destroys):
            attempt = destroys[future]
            error = future.exception()
            self._finish(attempt, Outcome.LOST, Stage.NONE, "another machine won" + (f"; destroy: {error}" if error else ""),
                         destroyed=error is None)
        issue_ms = (time.monotonic() - issued) * 1000
        self._drain_creates()
        self._event(
            InstanceEvent.Kind.RACE, f"race won by {winner.host_id}; {len(losers)} other machines destroyed",
            {"winner": winner.pk, "losers": [a.pk for a in losers], "destroy_ms": round(issue_ms, 1)},
        )
        self._update_stats()

    def _give_up(self, reason: str, *, outcome: str = Outcome.BOOT_TIMEOUT) -> str:
        self._end_everything(outcome, reason)
        self._fail(reason)
        return "failed"

    def _fail(self, reason: str) -> None:
        target = FAILED_RACE_STATUS[self.status]
        try:
            transition(self.instance.pk, target, expected=self.status, message=reason)
        except IllegalTransition:
            pass  # destroyed meanwhile: nothing to fail
        self._update_stats()

    def _end_everything(self, outcome: str, reason: str) -> None:
        """Destroy every machine of this race that is still rented, in parallel."""
        self.stop.set()
        live = self._live()
        destroys = {self.pool.submit(self._destroy, a.provider_instance_id): a for a in live}
        for future in futures.as_completed(destroys):
            attempt = destroys[future]
            self._finish(attempt, outcome, Stage.BOOT if outcome == Outcome.BOOT_TIMEOUT else Stage.NONE, reason,
                         destroyed=future.exception() is None)
        self._drain_creates()

    def _drain_creates(self) -> None:
        """Creates still in flight: wait for them, then destroy what they made (reconcile covers a hang)."""
        for future in futures.as_completed(list(self.creating), timeout=None):
            attempt = self.creating.pop(future)
            if future.exception() is None:
                attempt.provider_instance_id = future.result().instance_id
                self._destroy_and_finish(attempt, Outcome.ABANDONED, Stage.NONE, "created after the race ended")
            else:
                self._finish(attempt, Outcome.PROVIDER_ERROR, Stage.CREATE, str(future.exception()))

    def _destroy_and_finish(self, attempt: MachineAttempt, outcome: str, stage: str, detail: str) -> None:
        try:
            self.provider.destroy(attempt.provider_instance_id)
            destroyed = True
        except ProviderError as exc:
            detail += f"; destroy failed ({exc}), the reconcile task retries"
            destroyed = False
        self._finish(attempt, outcome, stage, detail, destroyed=destroyed)

    def _finish(self, attempt: MachineAttempt, outcome: str, stage: str, detail: str, *, destroyed: bool = False):
        now = timezone.now()
        attempt.outcome = outcome
        attempt.failure_stage = stage
        attempt.detail = detail[:2000]
        attempt.finished_at = now
        if destroyed:
            attempt.destroyed_at = now
        attempt.cost = _cost(attempt.price_per_hour, (now - attempt.created_at).total_seconds())
        attempt.save(update_fields=["outcome", "failure_stage", "detail", "finished_at", "destroyed_at", "cost",
                                    "provider_instance_id"])
        if outcome not in (Outcome.LOST, Outcome.ABANDONED):
            self._event(InstanceEvent.Kind.ATTEMPT, f"{attempt.host_id}: {outcome} ({detail})",
                        {"attempt": attempt.pk, "round": attempt.round, "outcome": outcome, "stage": stage})

    def _update_stats(self) -> None:
        hosts = self._attempts().values_list("provider", "host_id").distinct()
        for provider, host_id in hosts:
            reliability.host_stats_update(provider=provider, host_id=host_id)

    def _cancelled(self) -> bool:
        status = Instance.objects.filter(pk=self.instance.pk).values_list("status", flat=True).first()
        return status != self.status

    def _event(self, kind: str, message: str, data: dict | None = None) -> None:
        instance_event_add(instance=self.instance, kind=kind, message=message, data=data)


def _cost(price_per_hour: Decimal | None, seconds: float) -> Decimal:
    """What a machine cost while in the race: its price for the seconds from create to its end
    (an upper bound: vast.ai bills GPU time from running, storage from creation)."""
    if price_per_hour is None:
        return Decimal(0)
    return (price_per_hour * Decimal(str(max(seconds, 0.0))) / Decimal(3600)).quantize(Decimal("0.000001"))

