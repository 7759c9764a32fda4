"""The local GPU marketplace's world: hosts, rentals and the real machines behind them.

Every rental is a directory under `<state>/machines/<id>/` (home, workspace, gpu_util file, host
key) that becomes a real OpenSSH server on a loopback port once its boot time has passed.

Locking: `self._lock` guards the in-memory world and every status write (short, never held
while waiting on a process); a rental's own `rt.lock` serialises the slow side effects on its
machine (boot, stop, destroy, crash), and is always taken before `self._lock`.

Billing: GPU time is `dph_total` x seconds in `running` (vast bills GPU from running); storage
is `storage_cost` $/GB/month x disk GB x seconds from create to destroy. Both in wall-clock
seconds: time_scale only compresses boot times, never money.
"""

from __future__ import annotations

import collections
import concurrent.futures
import contextlib
import dataclasses
import logging
import os
import pwd
import random
import shutil
import signal
import socket
import subprocess
import threading
import time
from pathlib import Path
from typing import Any

from machines.providers.local import sshd
from machines.providers.local.catalogue import (
    FATE_EXITED,
    FATE_OK,
    FATE_SSH_DEAD,
    HostSpec,
    load_catalogue,
)
from machines.providers.local.store import Store

log = logging.getLogger(__name__)

ONSTART_LIMIT_BYTES = 4096
ONSTART_WAIT_S = 3.0  # a boot waits this long for onstart (it installs the keys) before going running
SECONDS_PER_MONTH = 30 * 86400
SYSTEM_PATH = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"
CAPACITY_STATUSES = ("loading", "running")  # stopped/failed rentals give their GPU back
DEFAULT_FAULTS: dict[str, Any] = {
    "rate_429": 0.0,
    "rate_500": 0.0,
    "rate_slow": 0.0,
    "slow_seconds": 2.0,
    "min_gap_s": 0.0,  # vast-style rate limit: minimum gap between two calls to one endpoint
    "next": [],  # deterministic faults served in order: 429, 500, 502, 503, 504, "slow", "drop"
}
FAULT_KINDS = {429, 500, 502, 503, 504, "slow", "drop"}


class ApiError(Exception):
    """A vast-style refusal: HTTP status plus `{"success": false, "error": ..., "msg": ...}`."""

    def __init__(self, status: int, error: str, msg: str):
        super().__init__(msg)
        self.status, self.error, self.msg = status, error, msg

    def body(self) -> dict[str, Any]:
        return {"success": False, "error": self.error, "msg": self.msg}


@dataclasses.dataclass
class Rental:
    """One instance, as persisted. `status` is vast's actual_status, plus "destroyed"."""

    id: int
    host: str
    machine_id: int
    ask_id: int
    label: str | None
    image: str
    disk_gb: float
    env: dict[str, str]
    onstart: str
    bid_price: float | None
    dph_total: float
    storage_cost: float
    fate: str
    status: str
    intended_status: str
    created_at: float
    boot_at: float | None  # when "loading" ends; None = never (stuck)
    machine_dir: str
    start_date: float | None = None
    running_since: float | None = None
    running_seconds: float = 0.0
    ended_at: float | None = None
    ssh_port: int | None = None
    host_key: str | None = None
    status_msg: str = ""
    platform_fault: bool = False  # the boot failed for a reason of this marketplace's, not the host's

    @property
    def dir(self) -> Path:
        return Path(self.machine_dir)

    def gpu_seconds(self, now: float) -> float:
        return self.running_seconds + (now - self.running_since if self.running_since else 0.0)

    def billing(self, now: float) -> dict[str, float]:
        gpu_s = self.gpu_seconds(now)
        storage_s = (self.ended_at or now) - self.created_at
        gpu_usd = self.dph_total * gpu_s / 3600
        storage_usd = self.storage_cost * self.disk_gb * storage_s / SECONDS_PER_MONTH
        return {
            "gpu_seconds": round(gpu_s, 3),
            "storage_seconds": round(storage_s, 3),
            "gpu_usd": round(gpu_usd, 8),
            "storage_usd": round(storage_usd, 8),
            "total_usd": round(gpu_usd + storage_usd, 8),
        }


@dataclasses.dataclass
class _Runtime:
    """What lives only in this process for one rental: its processes and sockets."""

    lock: threading.Lock = dataclasses.field(default_factory=threading.Lock)
    booting: bool = False
    sshd: sshd.SshdHandle | None = None
    silent: socket.socket | None = None  # the "SSH port that never answers"
    onstart: subprocess.Popen[bytes] | None = None
    partitioned: list[int] = dataclasses.field(default_factory=list)  # SIGSTOPped pids (sshd, agent group)


class Marketplace:
    def __init__(
        self,
        state_dir: Path,
        *,
        catalogue: Path | None = None,
        time_scale: float | None = None,
        seed: int | None = None,
    ):
        self.state_dir = Path(state_dir).resolve()
        (self.state_dir / "machines").mkdir(parents=True, exist_ok=True)
        self._store = Store(self.state_dir / "market.sqlite3")
        self._lock = threading.RLock()
        self._rng = random.Random(seed)
        self._wake = threading.Event()
        self._stopping = threading.Event()
        self._pool = concurrent.futures.ThreadPoolExecutor(max_workers=16, thread_name_prefix="boot")
        self._reconciler: threading.Thread | None = None
        self._runtime: dict[int, _Runtime] = {}
        self._last_call: dict[str, float] = {}
        self.api_calls: dict[str, int] = {}
        self.faults_served: collections.deque[str] = collections.deque(maxlen=1000)

        if catalogue is not None or not self._store.hosts():
            self._store.replace_hosts([dataclasses.asdict(h) for h in load_catalogue(catalogue)])
        self._hosts = {h["name"]: HostSpec(**h) for h in self._store.hosts()}
        if time_scale is not None:
            self._store.set_setting("time_scale", time_scale)
        self.time_scale = float(self._store.get_setting("time_scale", 1.0))
        self.faults = {**DEFAULT_FAULTS, **self._store.get_setting("faults", {})}
        if self._store.get_setting("next_id") is None:
            # Ids are unique across marketplaces too: DUMONT_MACHINE_ID finds a machine's processes.
            self._store.set_setting("next_id", random.SystemRandom().randrange(1_000, 90_000) * 1000)
        self._rentals = {r["id"]: Rental(**r) for r in self._store.instances()}

    # ---- lifecycle of the service -----------------------------------------------------------

    def start(self) -> None:
        """Bring back the machines that were running before a restart, then start the clock."""
        for r in list(self._rentals.values()):
            if r.status == "running":
                rt = self._rt(r.id)
                with rt.lock:
                    try:
                        self._bring_up(r, rt)
                    except Exception as exc:
                        log.exception("could not revive machine %s", r.id)
                        with self._lock:
                            self._leave_running(r, time.time())
                            r.status, r.status_msg = "offline", f"lost on restart: {exc}"
                            self._save(r)
        self._reconciler = threading.Thread(target=self._reconcile_forever, name="reconciler", daemon=True)
        self._reconciler.start()

    def shutdown(self) -> None:
        """Stop serving: every sshd stops (statuses stay, so a restart brings machines back)."""
        self._stopping.set()
        self._wake.set()
        if self._reconciler:
            self._reconciler.join(timeout=5)
        self._pool.shutdown(wait=True, cancel_futures=True)
        for rental_id, rt in list(self._runtime.items()):
            with rt.lock:
                self._take_down(rt)
                if rt.onstart is not None and rt.onstart.poll() is None:
                    log.info("machine %s: onstart still running at shutdown", rental_id)
        self._store.close()

    # ---- vast.ai API --------------------------------------------------------------------------

    def search(self, query: dict[str, Any]) -> list[dict[str, Any]]:
        interruptible = query.get("type") == "bid"
        with self._lock:
            offers = [
                h.offer_json(free_slots=self._free_slots(h), interruptible=interruptible)
                for h in self._hosts.values()
                if self._free_slots(h) > 0
            ]
        offers = [o for o in offers if _matches(o, query)]
        for field, direction in query.get("order") or [["dph_total", "asc"]]:
            offers.sort(key=lambda o, f=field: _sort_key(o.get(f)), reverse=direction == "desc")
        return offers[: int(query.get("limit") or 64)]

    def create(self, ask_id: int, body: dict[str, Any]) -> int:
        image = body.get("image")
        onstart = body.get("onstart") or ""
        if not image or not isinstance(image, str):
            raise ApiError(400, "invalid_args", "image is required")
        if len(onstart.encode()) > ONSTART_LIMIT_BYTES:
            raise ApiError(400, "invalid_args", f"onstart is limited to {ONSTART_LIMIT_BYTES} bytes")
        if "ssh" not in str(body.get("runtype") or ""):
            raise ApiError(400, "invalid_args", "only ssh runtypes are offered here")
        env = {str(k): str(v) for k, v in (body.get("env") or {}).items() if not str(k).startswith("-")}
        with self._lock:
            host = next((h for h in self._hosts.values() if h.ask_id == ask_id), None)
            if host is None or self._free_slots(host) <= 0:
                raise ApiError(410, "no_such_ask", f"Instance type by id {ask_id} is not available.")
            bid = body.get("price")
            if bid is not None and float(bid) < host.price_per_hour * host.min_bid_ratio:
                raise ApiError(400, "invalid_args", "bid price is below min_bid")
            rental_id = int(self._store.get_setting("next_id"))
            self._store.set_setting("next_id", rental_id + 1)
            now = time.time()
            fate = host.sample_fate(self._rng)
            machine_dir = self.state_dir / "machines" / str(rental_id)
            r = Rental(
                id=rental_id,
                host=host.name,
                machine_id=host.machine_id,
                ask_id=ask_id,
                label=body.get("label"),
                image=image,
                disk_gb=float(body.get("disk") or 10),
                env=env,
                onstart=onstart,
                bid_price=None if bid is None else float(bid),
                dph_total=float(bid) if bid is not None else host.price_per_hour,
                storage_cost=host.storage_cost,
                fate=fate,
                status="loading",
                intended_status="running",
                created_at=now,
                boot_at=self._boot_deadline(host, fate, now),
                machine_dir=str(machine_dir),
                status_msg="pulling image",
            )
            self._prepare_dir(r)
            self._rentals[rental_id] = r
            self._save(r)
        self._wake.set()
        log.info(
            "created %s on %s (fate %s, boots at +%.2fs)",
            rental_id,
            host.name,
            fate,
            (r.boot_at or now) - now,
        )
        return rental_id

    def instance(self, rental_id: int) -> dict[str, Any]:
        with self._lock:
            r = self._rentals.get(rental_id)
            if r is None or r.status == "destroyed":
                raise ApiError(404, "no_such_instance", f"Instance {rental_id} not found.")
            return self._instance_json(r)

    def instances(self) -> list[dict[str, Any]]:
        with self._lock:
            return [self._instance_json(r) for r in self._rentals.values() if r.status != "destroyed"]

    def set_state(self, rental_id: int, state: str) -> None:
        if state not in ("running", "stopped"):
            raise ApiError(400, "invalid_args", "state must be 'running' or 'stopped'")
        r, rt = self._existing(rental_id)
        with rt.lock:
            with self._lock:
                if r.status == "destroyed":
                    raise ApiError(404, "no_such_instance", f"Instance {rental_id} not found.")
                r.intended_status = state
                was = r.status
                if state == "stopped" and was in ("loading", "scheduling"):
                    r.status, r.status_msg = "stopped", "stopped by user"
                elif state == "running" and was == "stopped":
                    r.status, r.status_msg = "scheduling", "waiting for the GPU"
                    self._schedule(r)  # -> loading at once when the host has a free GPU
                self._save(r)
                if not (state == "stopped" and was == "running"):
                    return  # done, already there, or failed (exited/offline never come back)
            self._take_down(rt)
            self._kill_processes(r, rt)
            with self._lock:
                self._leave_running(r, time.time())
                r.status, r.status_msg = "stopped", "stopped by user"
                self._save(r)
        self._wake.set()

    def destroy(self, rental_id: int) -> None:
        r, rt = self._existing(rental_id)
        with rt.lock:
            with self._lock:
                if r.status == "destroyed":
                    raise ApiError(404, "no_such_instance", f"Instance {rental_id} not found.")
            self._take_down(rt)
            self._kill_processes(r, rt)
            shutil.rmtree(r.dir, ignore_errors=True)
            with self._lock:
                now = time.time()
                self._leave_running(r, now)
                r.status, r.ended_at, r.ssh_port, r.status_msg = "destroyed", now, None, "destroyed"
                self._save(r)
                self._runtime.pop(rental_id, None)
        self._wake.set()  # a GPU came free: a "scheduling" rental may start
        log.info("destroyed %s", rental_id)

    # ---- control ------------------------------------------------------------------------------

    def crash(self, rental_id: int) -> None:
        """The machine vanishes: sshd and every process die at once, the API says `offline`."""
        self._end_running(rental_id, "offline", "host went offline")

    def partition(self, rental_id: int, on: bool = True) -> None:
        """A network partition between this machine and the control plane: the machine runs on (its
        workspace, its user's processes), but its SSH port accepts connections and never answers (sshd is
        frozen) and its agent's heartbeats stop (the agent's process group is frozen). `on=False` heals."""
        r, rt = self._existing(rental_id)
        with rt.lock:
            with self._lock:
                if on and r.status != "running":
                    raise ApiError(409, "invalid_state", f"instance {rental_id} is {r.status}, not running")
            if not on:
                _heal(rt)
                return
            if rt.partitioned:
                return
            if rt.sshd is not None:
                os.kill(rt.sshd.pid, signal.SIGSTOP)
                rt.partitioned.append(rt.sshd.pid)
            agent_group = _read_int(r.dir / "home" / ".dumont-agent" / "supervisor.pid")
            if agent_group:
                with contextlib.suppress(ProcessLookupError, PermissionError):
                    os.killpg(agent_group, signal.SIGSTOP)
                    rt.partitioned.append(-agent_group)
            log.info("machine %s partitioned", rental_id)

    def partition_all(self, on: bool = True) -> list[int]:
        with self._lock:
            ids = [r.id for r in self._rentals.values() if r.status == "running"]
        done = []
        for rental_id in ids:
            with contextlib.suppress(ApiError):
                self.partition(rental_id, on)
                done.append(rental_id)
        return done

    def host_stop(self, rental_id: int) -> None:
        """The provider stops a running machine on its own (vast: a host maintenance): every process ends,
        the disk (workspace) is kept; it runs again when its renter starts it."""
        self._end_running(rental_id, "stopped", "stopped by the host")

    def _end_running(self, rental_id: int, status: str, message: str) -> None:
        """Every process of a running machine ends at once; the API then reports `status`."""
        r, rt = self._existing(rental_id)
        with rt.lock:
            with self._lock:
                if r.status != "running":
                    raise ApiError(409, "invalid_state", f"instance {rental_id} is {r.status}, not running")
            self._take_down(rt)
            self._kill_processes(r, rt)
            with self._lock:
                self._leave_running(r, time.time())
                r.status, r.status_msg = status, message
                self._save(r)
        self._wake.set()

    def set_gpu_util(self, rental_id: int, value: float) -> None:
        if not 0 <= value <= 100:
            raise ApiError(400, "invalid_args", "gpu_util must be within 0..100")
        r, _ = self._existing(rental_id)
        if r.status == "destroyed" or not r.dir.exists():
            raise ApiError(404, "no_such_instance", f"Instance {rental_id} not found.")
        _write_atomic(r.dir / "gpu_util", f"{value:g}\n")

    def set_host(self, name: str, changes: dict[str, Any]) -> dict[str, Any]:
        with self._lock:
            host = self._hosts.get(name)
            if host is None:
                raise ApiError(404, "no_such_host", f"no host named {name!r}")
            try:
                updated = host.updated(dict(changes))
            except (TypeError, ValueError) as exc:
                raise ApiError(400, "invalid_args", str(exc)) from None
            # Behaviour changes apply to rentals created from now on.
            self._hosts[name] = updated
            self._store.save_host(dataclasses.asdict(updated))
            return self._host_json(updated)

    def set_faults(self, changes: dict[str, Any]) -> dict[str, Any]:
        unknown = set(changes) - set(DEFAULT_FAULTS)
        if unknown:
            raise ApiError(400, "invalid_args", f"unknown fault settings {sorted(unknown)}")
        for entry in changes.get("next") or []:
            kind = entry.get("fault") if isinstance(entry, dict) else entry
            if kind not in FAULT_KINDS:
                raise ApiError(
                    400, "invalid_args", f"unknown fault {kind!r}; one of {sorted(map(str, FAULT_KINDS))}"
                )
        with self._lock:
            self.faults.update(changes)
            self._store.set_setting("faults", self.faults)
            return dict(self.faults)

    def set_time_scale(self, value: float) -> None:
        if value <= 0:
            raise ApiError(400, "invalid_args", "time_scale must be > 0")
        with self._lock:
            self.time_scale = float(value)
            self._store.set_setting("time_scale", self.time_scale)

    def destroy_all(self) -> list[int]:
        with self._lock:
            ids = [r.id for r in self._rentals.values() if r.status != "destroyed"]
        for rental_id in ids:
            with contextlib.suppress(ApiError):
                self.destroy(rental_id)
        return ids

    def pick_fault(self, endpoint: str) -> str | int | None:
        """The fault to serve for this API call, if any (deterministic queue first, then rates)."""
        with self._lock:
            self.api_calls[endpoint] = self.api_calls.get(endpoint, 0) + 1
            fault = self._pick_fault(endpoint)
            if fault is not None:
                self.faults_served.append(f"{fault} {endpoint}")
            return fault

    def _pick_fault(self, endpoint: str) -> str | int | None:
        queue = self.faults["next"]
        for i, entry in enumerate(queue):
            match = entry.get("match", "") if isinstance(entry, dict) else ""
            if endpoint.startswith(match):
                del queue[i]
                self._store.set_setting("faults", self.faults)
                return entry["fault"] if isinstance(entry, dict) else entry
        now = time.monotonic()
        last = self._last_call.get(endpoint)
        if last is not None and now - last < float(self.faults["min_gap_s"]):
            return 429  # refused calls do not restart the gap: a backing-off client gets through
        roll = self._rng.random()
        for fault, rate in ((429, "rate_429"), (500, "rate_500"), ("slow", "rate_slow")):
            if roll < float(self.faults[rate]):
                return fault
            roll -= float(self.faults[rate])
        self._last_call[endpoint] = now
        return None

    def state(self) -> dict[str, Any]:
        now = time.time()
        with self._lock:
            rentals = []
            for r in self._rentals.values():
                rt = self._runtime.get(r.id)
                rentals.append(
                    {
                        "id": r.id,
                        "host": r.host,
                        "label": r.label,
                        "status": r.status,
                        "fate": r.fate,
                        "machine_dir": r.machine_dir,
                        "workspace": str(r.dir / "workspace"),
                        "ssh_port": r.ssh_port,
                        "sshd_pid": rt.sshd.pid if rt and rt.sshd else None,
                        "partitioned": bool(rt and rt.partitioned),
                        "created_at": r.created_at,
                        "boot_at": r.boot_at,
                        "ended_at": r.ended_at,
                        "dph_total": r.dph_total,
                        "billing": r.billing(now),
                    }
                )
            totals = {
                k: round(sum(x["billing"][k] for x in rentals), 8)
                for k in ("gpu_usd", "storage_usd", "total_usd")
            }
            return {
                "time_scale": self.time_scale,
                "faults": dict(self.faults),
                "faults_served": list(self.faults_served),
                "api_calls": dict(self.api_calls),
                "state_dir": str(self.state_dir),
                "hosts": [self._host_json(h) for h in self._hosts.values()],
                "instances": rentals,
                "billing": totals,
            }

    def hosts(self) -> list[dict[str, Any]]:
        with self._lock:
            return [self._host_json(h) for h in self._hosts.values()]

    # ---- the clock ----------------------------------------------------------------------------

    def _reconcile_forever(self) -> None:
        while not self._stopping.is_set():
            try:
                delay = self._reconcile_once()
            except Exception:
                log.exception("reconciler")
                delay = 0.5
            self._wake.wait(timeout=delay)
            self._wake.clear()

    def _reconcile_once(self) -> float:
        now = time.time()
        due: list[int] = []
        next_at = now + 0.5
        with self._lock:
            for r in self._rentals.values():
                if r.status == "scheduling":
                    self._schedule(r)
                if r.status == "loading" and r.boot_at is not None:
                    rt = self._rt(r.id)
                    if r.boot_at <= now and not rt.booting:
                        rt.booting = True
                        due.append(r.id)
                    elif r.boot_at > now:
                        next_at = min(next_at, r.boot_at)
            for rt in self._runtime.values():
                onstart = rt.onstart
                if onstart is not None:
                    onstart.poll()  # reaps it once it has exited: no zombie machines
        for rental_id in due:
            self._pool.submit(self._boot, rental_id)
        return max(0.005, next_at - time.time())

    def _schedule(self, r: Rental) -> None:
        """A start that waits for a free GPU on its host (vast's "scheduling")."""
        host = self._hosts.get(r.host)
        if host is not None and self._free_slots(host) > 0:
            now = time.time()
            fate = r.fate if r.fate != FATE_EXITED else FATE_OK
            r.status, r.boot_at, r.status_msg = "loading", self._boot_deadline(host, fate, now), "starting"
            self._save(r)
            self._wake.set()

    def _boot(self, rental_id: int) -> None:
        with self._lock:
            rt = self._runtime.get(rental_id)
        if rt is None:
            return  # destroyed before its boot came up
        try:
            with rt.lock:
                with self._lock:
                    r = self._rentals.get(rental_id)
                    if r is None or r.status != "loading" or r.boot_at is None or r.boot_at > time.time():
                        return  # stopped, destroyed or rescheduled meanwhile
                    if r.fate == FATE_EXITED:
                        r.status, r.status_msg = "exited", "container exited during start"
                        self._save(r)
                        return
                self._run_onstart(r, rt)
                self._bring_up(r, rt)
                with self._lock:
                    now = time.time()
                    r.status, r.status_msg = "running", "success, running"
                    r.start_date = r.start_date or now
                    r.running_since = now
                    self._save(r)
                log.info("machine %s running on port %s", rental_id, r.ssh_port)
        except Exception as exc:
            # sshd missing or crashing, no free port, a full disk: this machine's environment, not the host's
            # fate, so every other machine would fail the same way; the message says what to fix
            log.error("machine %s could not boot: %s", rental_id, exc)
            with self._lock:
                r = self._rentals[rental_id]
                if r.status == "loading":
                    r.status, r.platform_fault = "exited", True
                    r.status_msg = f"the local marketplace could not boot the machine: {exc}"
                    self._save(r)
        finally:
            rt.booting = False

    # ---- machines -----------------------------------------------------------------------------

    def _prepare_dir(self, r: Rental) -> None:
        for sub in ("home/.ssh", "workspace"):
            (r.dir / sub).mkdir(parents=True, exist_ok=True)
        (r.dir / "home" / ".ssh").chmod(0o700)
        _write_atomic(r.dir / "gpu_util", "0\n")
        (r.dir / "onstart.sh").write_text(r.onstart)
        r.host_key = sshd.ensure_host_key(r.dir)  # reported from create on: clients can pin it

    def _machine_env(self, r: Rental) -> dict[str, str]:
        """What every process of the machine sees (onstart and SSH sessions alike)."""
        return {
            "HOME": str(r.dir / "home"),
            "DUMONT_WORKSPACE": str(r.dir / "workspace"),
            "DUMONT_GPU_UTIL_FILE": str(r.dir / "gpu_util"),
            "DUMONT_MACHINE_ID": str(r.id),
            "CONTAINER_ID": str(r.id),
            "VAST_CONTAINERLABEL": f"C.{r.id}",
        }

    def _run_onstart(self, r: Rental, rt: _Runtime) -> None:
        """Run the create's onstart the way vast does: at every boot, as the machine's user, in its
        workspace. It installs the SSH keys, so boot waits a little for it."""
        if not r.onstart.strip():
            return
        env = {**r.env, "PATH": SYSTEM_PATH, **self._machine_env(r)}
        with open(r.dir / "onstart.log", "ab") as out:
            rt.onstart = subprocess.Popen(
                ["/bin/sh", str(r.dir / "onstart.sh")],
                cwd=r.dir / "workspace",
                env=env,
                stdin=subprocess.DEVNULL,
                stdout=out,
                stderr=out,
                start_new_session=True,
            )
        with contextlib.suppress(subprocess.TimeoutExpired):
            code = rt.onstart.wait(ONSTART_WAIT_S)
            if code:
                log.warning("machine %s: onstart exited %s (see %s)", r.id, code, r.dir / "onstart.log")

    def _bring_up(self, r: Rental, rt: _Runtime) -> None:
        """Open the machine's SSH port: a real sshd, or a socket that never speaks (fate)."""
        preferred = r.ssh_port
        if r.fate == FATE_SSH_DEAD:
            rt.silent = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
            try:
                rt.silent.bind(("127.0.0.1", preferred or 0))
            except OSError:
                rt.silent.bind(("127.0.0.1", 0))
            rt.silent.listen(1)  # the kernel completes handshakes; nobody ever sends a banner
            port = rt.silent.getsockname()[1]
        else:
            env = {k: v for k, v in self._machine_env(r).items() if k.startswith("DUMONT_") or k == "HOME"}
            for attempt in range(3):
                port = preferred if attempt == 0 and preferred and _port_free(preferred) else sshd.free_port()
                try:
                    rt.sshd = sshd.start_sshd(
                        r.dir, port=port, authorized_keys=r.dir / "home" / ".ssh" / "authorized_keys", env=env
                    )
                    break
                except sshd.SshdMissing:
                    raise  # no other port will help
                except sshd.SshdError:
                    if attempt == 2:
                        raise
                    log.warning("machine %s: sshd on %s failed, trying another port", r.id, port)
        with self._lock:
            r.ssh_port = port
            self._save(r)

    def _take_down(self, rt: _Runtime) -> None:
        _heal(rt)  # frozen processes would not see SIGTERM
        if rt.sshd is not None:
            rt.sshd.stop()
            rt.sshd = None
        if rt.silent is not None:
            rt.silent.close()
            rt.silent = None

    def _kill_processes(self, r: Rental, rt: _Runtime) -> None:
        killed = sshd.kill_machine_processes(str(r.id), r.dir)
        if rt.onstart is not None:
            with contextlib.suppress(subprocess.TimeoutExpired):
                rt.onstart.wait(5)  # reap it; it was killed above
            rt.onstart = None
        if killed:
            log.info("machine %s: killed %d processes", r.id, len(killed))

    # ---- helpers ------------------------------------------------------------------------------

    def _existing(self, rental_id: int) -> tuple[Rental, _Runtime]:
        with self._lock:
            r = self._rentals.get(rental_id)
            if r is None or r.status == "destroyed":
                raise ApiError(404, "no_such_instance", f"Instance {rental_id} not found.")
            return r, self._rt(rental_id)

    def _rt(self, rental_id: int) -> _Runtime:
        with self._lock:
            return self._runtime.setdefault(rental_id, _Runtime())

    def _save(self, r: Rental) -> None:
        self._store.save_instance(dataclasses.asdict(r))

    def _leave_running(self, r: Rental, now: float) -> None:
        if r.running_since is not None:
            r.running_seconds += now - r.running_since
            r.running_since = None

    def _free_slots(self, host: HostSpec) -> int:
        used = sum(1 for r in self._rentals.values() if r.host == host.name and r.status in CAPACITY_STATUSES)
        return host.capacity - used

    def _boot_deadline(self, host: HostSpec, fate: str, now: float) -> float | None:
        if fate == "stuck_loading":
            return None
        return now + host.sample_boot_seconds(self._rng) * self.time_scale

    def _host_json(self, h: HostSpec) -> dict[str, Any]:
        rented = sum(1 for r in self._rentals.values() if r.host == h.name and r.status in CAPACITY_STATUSES)
        return {
            **dataclasses.asdict(h),
            "ask_id": h.ask_id,
            "rented": rented,
            "free_slots": h.capacity - rented,
        }

    def _instance_json(self, r: Rental) -> dict[str, Any]:
        """The instance as vast.ai's /instances/ reports it, plus `ssh_user` and `ssh_host_key`."""
        host = self._hosts.get(r.host)
        reachable = r.status == "running" and r.ssh_port is not None
        gpu_util = _read_float(r.dir / "gpu_util") if r.status == "running" else None
        return {
            "id": r.id,
            "machine_id": r.machine_id,
            "host_id": 90000 + r.machine_id % 1000,
            "label": r.label,
            "actual_status": r.status,
            "intended_status": r.intended_status,
            "cur_state": "running" if r.status in ("loading", "running") else "stopped",
            "next_state": r.intended_status,
            "status_msg": r.status_msg,
            "platform_fault": r.platform_fault,
            "image_uuid": r.image,
            "disk_space": r.disk_gb,
            "gpu_name": host.gpu_name if host else None,
            "num_gpus": host.num_gpus if host else None,
            "gpu_ram": int(host.gpu_ram_gb * 1024) if host else None,
            "gpu_util": gpu_util,
            "geolocation": host.region if host else None,
            "reliability2": host.reliability if host else None,
            "dph_total": r.dph_total,
            "dph_base": r.dph_total,
            "storage_cost": r.storage_cost,
            "is_bid": r.bid_price is not None,
            "min_bid": r.bid_price,
            "start_date": r.start_date,
            "duration": round(r.gpu_seconds(time.time()), 3),
            "ssh_idx": "0",
            "ssh_host": "127.0.0.1" if reachable else None,
            "ssh_port": r.ssh_port if reachable else None,
            "public_ipaddr": "127.0.0.1" if reachable else None,
            "ports": {"22/tcp": [{"HostIp": "127.0.0.1", "HostPort": str(r.ssh_port)}]} if reachable else {},
            "direct_port_count": 8,
            "ssh_user": _current_user(),
            "ssh_host_key": r.host_key,
        }


# ---- offer filters (vast's operators) ---------------------------------------------------------

_CONTROL_KEYS = {"order", "type", "limit", "allocated_storage", "disable_bundling", "extra_ids"}


def _matches(offer: dict[str, Any], query: dict[str, Any]) -> bool:
    for field, condition in query.items():
        if field in _CONTROL_KEYS:
            continue
        if not isinstance(condition, dict):
            condition = {"eq": condition}
        value = offer.get(field)
        for op, arg in condition.items():
            if not _compare(field, value, op, arg):
                return False
    return True


def _compare(field: str, value: Any, op: str, arg: Any) -> bool:
    if field == "geolocation" and op in ("eq", "neq", "in", "notin"):
        # "California, US" matches "US" as well as itself.
        names = {value, str(value).rsplit(",", 1)[-1].strip()} if value else set()
        wanted = set(arg) if op in ("in", "notin") else {arg}
        hit = bool(names & wanted)
        return hit if op in ("eq", "in") else not hit
    if op == "eq":
        return value == arg
    if op == "neq":
        return value != arg
    if op == "in":
        return value in arg
    if op == "notin":
        return value not in arg
    if value is None or arg is None:
        return False
    try:
        if op == "gt":
            return value > arg
        if op == "gte":
            return value >= arg
        if op == "lt":
            return value < arg
        if op == "lte":
            return value <= arg
    except TypeError:
        return False
    raise ApiError(400, "invalid_args", f"unknown operator {op!r} on {field}")


def _sort_key(value: Any) -> tuple[int, Any]:
    return (1, 0) if value is None else (0, value)


def _port_free(port: int) -> bool:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        try:
            s.bind(("127.0.0.1", port))
            return True
        except OSError:
            return False


def _read_float(path: Path) -> float | None:
    try:
        return float(path.read_text().strip())
    except (OSError, ValueError):
        return None


def _heal(rt: _Runtime) -> None:
    """End a partition: SIGCONT what it froze (a negative pid is a process group)."""
    for pid in rt.partitioned:
        with contextlib.suppress(ProcessLookupError, PermissionError):
            if pid < 0:
                os.killpg(-pid, signal.SIGCONT)
            else:
                os.kill(pid, signal.SIGCONT)
    rt.partitioned.clear()


def _read_int(path: Path) -> int | None:
    try:
        return int(path.read_text().strip())
    except (OSError, ValueError):
        return None


def _write_atomic(path: Path, text: str) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(text)
    tmp.replace(path)


def _current_user() -> str:
    return pwd.getpwuid(os.geteuid()).pw_name
