#!/usr/bin/env python3
"""DumontAgent: the one program the control plane runs on every GPU machine.

    python3 dumont_agent.py /path/to/config.json

Standard library only, Python >= 3.8: it runs on whatever image the user chose, and it never imports
Django or the project (the control plane copies this one file over SFTP).

- Every `interval` seconds it reads the GPUs (NVML through `pynvml` when importable, else `nvidia-smi`,
  else the local marketplace's simulated source named by DUMONT_GPU_UTIL_FILE) and posts a signed
  heartbeat to POST /api/v1/agent/status. A source that fails is reported as a missing reading
  (`gpu_util: null` and `gpu_error`), never as 0%: a missing reading must never look like idleness.
- One heartbeat is in flight at a time. When the control plane is unreachable it retries with
  exponential backoff and jitter, taking a fresh reading before each try: stale readings are dropped,
  never queued.
- The sync service runs the command the control plane configured (an incremental backup of the
  workspace) every `sync.interval` seconds, never two at once, and reports the last run in the
  heartbeat's `sync` field (start, duration, exit code, the restic snapshot id parsed from `--json`
  output's `summary` message when there is one, error tail).
- It obeys the answer's `action`: `none`; `prepare_hibernate` (start no new sync; report
  `hibernate_ready` once none runs); `shutdown` (exit 0, which tells its supervisor not to restart it).

Wire protocol (the server checks the same base string; see `signature`):
    X-Dumont-Instance: <instance id>
    X-Dumont-Timestamp: <unix seconds>
    X-Dumont-Nonce: <32 hex digits, never reused>
    X-Dumont-Signature: hex HMAC-SHA256(secret, "dumont-agent-v1\\nPOST\\n/api/v1/agent/status\\n"
                                        "<instance>\\n<timestamp>\\n<nonce>\\n<hex sha256 of the body>")

The secret lives in the config file (0600) and in memory only: it is never logged, never in argv.
"""

from __future__ import annotations

import argparse
import email.utils
import fcntl
import hashlib
import hmac
import json
import logging
import logging.handlers
import math
import os
import random
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Callable
from typing import Any

VERSION = "1"
STATUS_PATH = "/api/v1/agent/status"
SYNC_CREDENTIALS_PATH = "/api/v1/agent/sync-credentials"
SIGNATURE_SCHEME = "dumont-agent-v1"
NVIDIA_SMI_QUERY = "index,utilization.gpu,memory.used,memory.total,temperature.gpu"
ERROR_TAIL_CHARS = 1000
EXIT_OK, EXIT_CONFIG, EXIT_LOCKED = 0, 2, 3

log = logging.getLogger("dumont-agent")


def signature(secret: str, instance_id: Any, timestamp: str, nonce: str, body: bytes, *, path: str,
              method: str = "POST") -> str:
    """The hex HMAC-SHA256 the server checks (agent.auth uses this very function). It names the method
    and the endpoint's path: a heartbeat captured on the wire cannot be replayed to another endpoint."""
    base = "\n".join(
        [SIGNATURE_SCHEME, method, path, str(instance_id), timestamp, nonce, hashlib.sha256(body).hexdigest()]
    )
    return hmac.new(secret.encode(), base.encode(), hashlib.sha256).hexdigest()


# ---- GPU readings -------------------------------------------------------------------------------


class GpuReadError(Exception):
    pass


def _number(text: str) -> float | None:
    """nvidia-smi prints "[N/A]" / "[Not Supported]" for what a GPU cannot tell."""
    text = text.strip()
    try:
        value = float(text)
    except ValueError:
        return None
    return value if math.isfinite(value) else None


def parse_nvidia_smi(output: str) -> list[dict[str, Any]]:
    gpus = []
    for line in output.splitlines():
        if not line.strip():
            continue
        fields = [f.strip() for f in line.split(",")]
        if len(fields) != 5:
            raise GpuReadError(f"unexpected nvidia-smi line: {line[:200]!r}")
        index = _number(fields[0])
        if index is None:
            raise GpuReadError(f"unexpected nvidia-smi line: {line[:200]!r}")
        gpus.append({
            "index": int(index), "util": _number(fields[1]), "mem_used_mb": _number(fields[2]),
            "mem_total_mb": _number(fields[3]), "temp_c": _number(fields[4]),
        })
    return gpus


class NvmlSource:
    name = "nvml"

    def __init__(self, pynvml: Any):
        self.nvml = pynvml
        self.ready = False

    def read(self) -> list[dict[str, Any]]:
        nvml = self.nvml
        try:
            if not self.ready:
                nvml.nvmlInit()
                self.ready = True
            gpus = []
            for index in range(nvml.nvmlDeviceGetCount()):
                handle = nvml.nvmlDeviceGetHandleByIndex(index)
                gpu: dict[str, Any] = {"index": index, "util": None, "mem_used_mb": None, "mem_total_mb": None,
                                       "temp_c": None}
                try:
                    gpu["util"] = float(nvml.nvmlDeviceGetUtilizationRates(handle).gpu)
                except nvml.NVMLError:
                    pass  # a GPU that cannot tell its utilization has no reading
                try:
                    memory = _memory_info(nvml, handle)
                    gpu["mem_used_mb"], gpu["mem_total_mb"] = memory.used / 2**20, memory.total / 2**20
                except nvml.NVMLError:
                    pass
                try:
                    gpu["temp_c"] = float(nvml.nvmlDeviceGetTemperature(handle, nvml.NVML_TEMPERATURE_GPU))
                except nvml.NVMLError:
                    pass
                gpus.append(gpu)
            return gpus
        except nvml.NVMLError as exc:
            self.ready = False  # initialise again next time (driver reloaded, GPU fell off the bus)
            raise GpuReadError(f"NVML: {exc}") from None


def _memory_info(nvml: Any, handle: Any) -> Any:
    """Memory in use as nvidia-smi counts it. NVML's first version counts the driver's reserved memory as
    used (615 MB on an idle H200, where nvidia-smi says 0); its v2 (driver 510+) keeps it apart."""
    v2 = getattr(nvml, "nvmlMemory_v2", None)
    if v2 is not None:
        try:
            return nvml.nvmlDeviceGetMemoryInfo(handle, version=v2)
        except (nvml.NVMLError, TypeError):
            pass  # an older driver, or an older binding without `version`
    return nvml.nvmlDeviceGetMemoryInfo(handle)


class NvidiaSmiSource:
    name = "nvidia-smi"

    def __init__(self, binary: str):
        self.binary = binary

    def read(self) -> list[dict[str, Any]]:
        command = [self.binary, "--query-gpu=" + NVIDIA_SMI_QUERY, "--format=csv,noheader,nounits"]
        try:
            done = subprocess.run(command, stdin=subprocess.DEVNULL, capture_output=True,
                                  timeout=10, check=False)
        except (OSError, subprocess.TimeoutExpired) as exc:
            raise GpuReadError(f"nvidia-smi: {exc}") from None
        if done.returncode != 0:
            tail = (done.stderr or done.stdout).decode(errors="replace").strip()[-300:]
            raise GpuReadError(f"nvidia-smi exited {done.returncode}: {tail}")
        return parse_nvidia_smi(done.stdout.decode(errors="replace"))


class UtilFileSource:
    """The local marketplace's simulated GPU: a file holding one number, 0..100."""

    name = "file"

    def __init__(self, path: str):
        self.path = path

    def read(self) -> list[dict[str, Any]]:
        try:
            with open(self.path) as f:
                text = f.read(64)
        except OSError as exc:
            raise GpuReadError(f"cannot read {self.path}: {exc.strerror or exc}") from None
        value = _number(text)
        if value is None or not 0 <= value <= 100:
            raise GpuReadError(f"{self.path} does not hold a number within 0..100")
        return [{"index": 0, "util": value, "mem_used_mb": None, "mem_total_mb": None, "temp_c": None}]


class NoSource:
    name = None

    def read(self) -> list[dict[str, Any]]:
        raise GpuReadError("no GPU source: no pynvml, no nvidia-smi, no DUMONT_GPU_UTIL_FILE")


def detect_gpu_source(preferred: str = "auto") -> Any:
    """`preferred`: auto, nvml, nvidia-smi or file.

    auto: the simulated file when DUMONT_GPU_UTIL_FILE is set (only a local-marketplace machine sets
    it, and on a GPU host its real GPUs are not that machine's), else NVML, else nvidia-smi.
    """
    util_file = os.environ.get("DUMONT_GPU_UTIL_FILE")
    if preferred in ("auto", "file") and util_file:
        return UtilFileSource(util_file)
    if preferred in ("auto", "nvml"):
        try:
            import pynvml  # nvidia-ml-py, when the image has it

            return NvmlSource(pynvml)
        except ImportError:
            pass
    if preferred in ("auto", "nvidia-smi"):
        binary = shutil.which("nvidia-smi")
        if binary:
            return NvidiaSmiSource(binary)
    return NoSource()


def take_reading(source: Any) -> dict[str, Any]:
    """One reading: per-GPU figures and the instance's value, the max over its GPUs.

    If any GPU has no utilization the instance has none either: the max over the others could hide
    a busy GPU and read as idleness.
    """
    reading: dict[str, Any] = {"time": time.time(), "gpu_source": source.name, "gpus": [], "gpu_util": None,
                               "gpu_error": None}
    try:
        gpus = source.read()
    except GpuReadError as exc:
        reading["gpu_error"] = str(exc)
        return reading
    except Exception as exc:  # a broken driver binding must not kill the agent
        reading["gpu_error"] = f"{type(exc).__name__}: {exc}"
        return reading
    reading["gpus"] = gpus
    utils = [gpu["util"] for gpu in gpus]
    if not gpus:
        reading["gpu_error"] = "no GPU found"
    elif any(util is None for util in utils):
        missing = ", ".join(str(gpu["index"]) for gpu in gpus if gpu["util"] is None)
        reading["gpu_error"] = f"no utilization for GPU {missing}"
    else:
        reading["gpu_util"] = max(utils)
    return reading


# ---- the sync service ---------------------------------------------------------------------------


def restic_snapshot_id(line: str) -> str | None:
    """The snapshot id of restic's `--json` summary message, if this output line is one."""
    if not line.startswith("{"):
        return None
    try:
        message = json.loads(line)
    except ValueError:
        return None
    if isinstance(message, dict) and message.get("message_type") == "summary":
        snapshot = message.get("snapshot_id")
        return snapshot if isinstance(snapshot, str) else None
    return None


class SyncService(threading.Thread):
    """Runs the configured command every `interval` seconds, one run at a time.

    A lock file (flock) keeps two agents (a redeploy's overlap) from syncing at once too.
    """

    def __init__(self, config: dict[str, Any], lock_path: str, stop: threading.Event,
                 renew: Callable[[], dict[str, Any]] | None = None):
        super().__init__(name="sync", daemon=True)
        self.command = config["command"]
        self.env = {str(k): str(v) for k, v in (config.get("env") or {}).items()}
        # temporary storage keys: renewed (`renew`, the control plane) once a quarter of their life is left
        self.env_expires_at = config.get("env_expires_at")
        self.env_lifetime = (self.env_expires_at - time.time()) if self.env_expires_at else None
        self.renew = renew
        self.interval = float(config.get("interval", 300))
        self.timeout = float(config.get("timeout", 6 * 3600))
        self.cwd = config.get("cwd") or None
        self.lock_path = lock_path
        self.stop = stop
        self.paused = threading.Event()  # prepare_hibernate: start no new run
        self.lock = threading.Lock()
        self.running_since: float | None = None
        self.last: dict[str, Any] | None = None
        self.runs = 0
        self.process: subprocess.Popen | None = None

    def run(self) -> None:
        while not self.stop.wait(self.interval):
            try:
                self.run_once()
            except Exception:
                log.exception("sync run failed to start")

    def report(self) -> dict[str, Any]:
        with self.lock:
            return {"state": "running" if self.running_since else ("paused" if self.paused.is_set() else "idle"),
                    "interval": self.interval, "runs": self.runs, "running_since": self.running_since,
                    "last": self.last}

    @property
    def busy(self) -> bool:
        return self.running_since is not None

    def terminate(self) -> None:
        process = self.process
        if process is not None and process.poll() is None:
            try:
                os.killpg(process.pid, signal.SIGTERM)
            except OSError:
                pass

    def pause(self, paused: bool) -> None:
        """Once pause(True) returns, either a run is already under way (`busy`) or none will start."""
        with self.lock:
            if paused:
                self.paused.set()
            else:
                self.paused.clear()

    def run_once(self) -> None:
        with open(self.lock_path, "a") as lock_file:
            try:
                fcntl.flock(lock_file, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except OSError:
                log.warning("sync skipped: another sync holds %s", self.lock_path)
                return
            started = time.time()
            with self.lock:
                if self.paused.is_set():
                    return
                self.running_since = started
            try:
                self._renew_keys()
                result = self._execute()
            finally:
                with self.lock:
                    self.running_since = None
        result.update(started_at=started, duration=round(time.time() - started, 3))
        with self.lock:
            self.last, self.runs = result, self.runs + 1
        log.info("sync finished: exit %s in %.1fs, snapshot %s", result["exit_code"], result["duration"],
                 result["snapshot_id"] or "-")

    def _renew_keys(self) -> None:
        """Before a run, if the storage keys are near their end. A failure is logged: the run goes on
        (the keys may still work; if not, restic's error is reported like any failed sync)."""
        if self.renew is None or not self.env_expires_at or not self.env_lifetime:
            return
        if time.time() < self.env_expires_at - max(self.env_lifetime / 4, 2 * self.interval):
            return
        try:
            answer = self.renew()
            env, expires_at = answer["env"], answer.get("expires_at")
            if not isinstance(env, dict) or not all(str(k).startswith("AWS_") for k in env):
                raise ValueError("unexpected keys")
        except (Unreachable, Refused, KeyError, TypeError, ValueError) as exc:
            log.warning("could not renew the sync's storage keys: %s", exc)
            return
        self.env = {k: v for k, v in self.env.items() if not k.startswith("AWS_")}
        self.env.update({str(k): str(v) for k, v in env.items()})
        self.env_expires_at = float(expires_at) if expires_at else None
        log.info("sync storage keys renewed")

    def _execute(self) -> dict[str, Any]:
        shell = isinstance(self.command, str)
        env = dict(os.environ, **self.env)  # secrets (repository password, keys) travel in env, never argv
        with tempfile.TemporaryFile() as stderr:
            try:
                self.process = subprocess.Popen(
                    self.command, shell=shell, cwd=self.cwd, env=env, stdin=subprocess.DEVNULL,
                    stdout=subprocess.PIPE, stderr=stderr, start_new_session=True,
                )
            except OSError as exc:
                return {"exit_code": None, "snapshot_id": None, "error_tail": f"cannot start: {exc}"}
            timer = threading.Timer(self.timeout, self._kill_after_timeout)
            timer.start()
            snapshot_id: str | None = None
            tail: list[str] = []
            try:
                assert self.process.stdout is not None
                for raw in self.process.stdout:  # restic --json prints a status line per second: stream it
                    line = raw.decode(errors="replace").strip()
                    snapshot_id = restic_snapshot_id(line) or snapshot_id
                    tail = (tail + [line])[-20:]
                exit_code = self.process.wait()
            finally:
                timer.cancel()
            stderr.seek(0)
            errors = stderr.read().decode(errors="replace").strip()
        error_tail = None
        if exit_code != 0:
            error_tail = (errors or "\n".join(tail))[-ERROR_TAIL_CHARS:] or None
        return {"exit_code": exit_code, "snapshot_id": snapshot_id, "error_tail": error_tail}

    def _kill_after_timeout(self) -> None:
        log.warning("sync ran past %.0fs: killing it", self.timeout)
        process = self.process
        if process is not None and process.poll() is None:
            try:
                os.killpg(process.pid, signal.SIGKILL)
            except OSError:
                pass


# ---- talking to the control plane ---------------------------------------------------------------


class Unreachable(Exception):
    """The heartbeat did not get an answer worth acting on: retry with backoff."""


class Refused(Exception):
    """The control plane refused our body (400): a bug to log, not a reason to retry faster."""


class Backoff:
    """Exponential backoff with jitter: each delay is 50-100% of initial * 2**n, capped."""

    def __init__(self, initial: float, maximum: float):
        self.initial, self.maximum, self.failures = initial, maximum, 0

    def next(self) -> float:
        ceiling = min(self.maximum, self.initial * 2 ** self.failures)
        self.failures += 1
        return ceiling * random.uniform(0.5, 1.0)

    def reset(self) -> None:
        self.failures = 0


class ControlPlane:
    def __init__(self, url: str, instance_id: int, secret: str, timeout: float = 10.0):
        self.base_url = url.rstrip("/")
        self.url = self.base_url + STATUS_PATH
        self.instance_id = instance_id
        self._secret = secret
        self.timeout = timeout
        self.clock_offset = 0.0  # server clock minus ours, from the Date header, when they disagree

    def __repr__(self) -> str:  # never the secret
        return f"ControlPlane({self.url!r}, instance {self.instance_id})"

    def sync_credentials(self) -> dict[str, Any]:
        """New storage keys for the sync service (signed like a heartbeat)."""
        return self.post({}, path=SYNC_CREDENTIALS_PATH)

    def post(self, payload: dict[str, Any], path: str = STATUS_PATH) -> dict[str, Any]:
        body = json.dumps(payload, separators=(",", ":")).encode()
        timestamp = str(int(time.time() + self.clock_offset))
        nonce = os.urandom(16).hex()
        request = urllib.request.Request(self.base_url + path, data=body, method="POST", headers={  # noqa: S310
            "Content-Type": "application/json",
            "User-Agent": "dumont-agent/" + VERSION,
            "X-Dumont-Instance": str(self.instance_id),
            "X-Dumont-Timestamp": timestamp,
            "X-Dumont-Nonce": nonce,
            "X-Dumont-Signature": signature(self._secret, self.instance_id, timestamp, nonce, body, path=path),
        })
        try:
            with urllib.request.urlopen(request, timeout=self.timeout) as response:  # noqa: S310 (our URL)
                self._learn_clock(response.headers.get("Date"))
                answer = json.loads(response.read().decode())
        except urllib.error.HTTPError as exc:
            self._learn_clock(exc.headers.get("Date") if exc.headers else None)
            detail = exc.read(500).decode(errors="replace")
            if exc.code == 400:
                raise Refused(detail) from None
            raise Unreachable(f"HTTP {exc.code}") from None
        except (OSError, ValueError) as exc:  # refused, reset, timeout, DNS, bad JSON
            raise Unreachable(f"{type(exc).__name__}: {exc}") from None
        if not isinstance(answer, dict):
            raise Unreachable("unexpected answer")
        return answer

    def _learn_clock(self, date: str | None) -> None:
        # A machine whose clock is off by more than the server's window would never authenticate.
        if not date:
            return
        try:
            offset = email.utils.parsedate_to_datetime(date).timestamp() - time.time()
        except (TypeError, ValueError):
            return
        self.clock_offset = offset if abs(offset) > 2 else 0.0


# ---- the agent ----------------------------------------------------------------------------------


class Agent:
    def __init__(self, config: dict[str, Any], state_dir: str):
        self.config = config
        self.state_dir = state_dir
        self.interval = float(config.get("interval", 10))
        self.control_plane = ControlPlane(config["control_plane_url"], int(config["instance_id"]),
                                          config["secret"], timeout=float(config.get("request_timeout", 10)))
        self.backoff = Backoff(float(config.get("backoff_initial", 1.0)), float(config.get("backoff_max", 60.0)))
        self.gpu_source = detect_gpu_source(config.get("gpu_source", "auto"))
        self.stop = threading.Event()
        self.started_at = time.time()
        self.preparing_hibernate = False
        self.sync: SyncService | None = None
        if config.get("sync") and config["sync"].get("command"):
            self.sync = SyncService(config["sync"], os.path.join(state_dir, "sync.lock"), self.stop,
                                    renew=self.control_plane.sync_credentials)

    def state(self) -> str:
        if not self.preparing_hibernate:
            return "running"
        return "preparing_hibernate" if self.sync is not None and self.sync.busy else "hibernate_ready"

    def payload(self) -> dict[str, Any]:
        payload = take_reading(self.gpu_source)
        payload.update(agent_version=VERSION, state=self.state(),
                       sync=self.sync.report() if self.sync is not None else None)
        return payload

    def run(self) -> int:
        log.info("agent %s for instance %s: GPU source %s, heartbeat every %ss, sync %s", VERSION,
                 self.control_plane.instance_id, self.gpu_source.name, self.interval,
                 f"every {self.sync.interval}s" if self.sync else "off")
        if self.sync is not None:
            self.sync.start()
        while not self.stop.is_set():
            try:
                answer = self.control_plane.post(self.payload())  # a fresh reading for every try
            except Unreachable as exc:
                delay = self.backoff.next()
                log.warning("heartbeat failed (%s); retry in %.2fs", exc, delay)
                self.stop.wait(delay)
                continue
            except Refused as exc:
                log.error("control plane refused the heartbeat: %s", exc)
                self.stop.wait(self.interval)
                continue
            self.backoff.reset()
            self._write_state(last_heartbeat_at=time.time(), action=answer.get("action"))
            self.obey(answer)
            if not self.stop.is_set():
                self.stop.wait(self.interval)
        if self.sync is not None:
            self.sync.terminate()
        log.info("agent stopped")
        return EXIT_OK

    def obey(self, answer: dict[str, Any]) -> None:
        interval = answer.get("interval")
        if isinstance(interval, (int, float)) and 0.1 <= interval <= 3600:
            self.interval = float(interval)
        action = answer.get("action", "none")
        if action == "shutdown":
            log.info("control plane says shutdown")
            self.stop.set()
        elif action == "prepare_hibernate":
            if not self.preparing_hibernate:
                log.info("control plane says prepare_hibernate: no new sync from now on")
            self.preparing_hibernate = True
        else:
            if self.preparing_hibernate:
                log.info("hibernation called off: syncing again")
            self.preparing_hibernate = False
        if self.sync is not None:
            self.sync.pause(self.preparing_hibernate)

    def _write_state(self, **fields: Any) -> None:
        """state.json: what `agent_deploy` checks, and what an operator reads first."""
        state = {"pid": os.getpid(), "version": VERSION, "deploy_id": self.config.get("deploy_id"),
                 "started_at": self.started_at, **fields}
        path = os.path.join(self.state_dir, "state.json")
        with open(path + ".tmp", "w") as f:
            json.dump(state, f)
        os.replace(path + ".tmp", path)


def load_config(path: str) -> dict[str, Any]:
    with open(path) as f:
        config = json.load(f)
    missing = [k for k in ("control_plane_url", "instance_id", "secret") if not config.get(k)]
    if missing:
        raise ValueError("config lacks " + ", ".join(missing))
    if os.stat(path).st_mode & 0o077:
        log.warning("%s is readable by others: it holds the agent's secret (want 0600)", path)
    return config


def setup_logging(path: str) -> None:
    handler = logging.handlers.RotatingFileHandler(path, maxBytes=2_000_000, backupCount=2)
    handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(message)s"))
    log.addHandler(handler)
    log.setLevel(logging.INFO)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="DumontAgent: GPU heartbeats and workspace sync.")
    parser.add_argument("config", help="JSON config file written by the control plane (0600)")
    args = parser.parse_args(argv)
    config_path = os.path.abspath(args.config)
    state_dir = os.path.dirname(config_path)
    try:
        with open(config_path) as f:
            log_file = json.load(f).get("log_file")
    except (OSError, ValueError):
        log_file = None
    setup_logging(log_file or os.path.join(state_dir, "agent.log"))
    try:
        config = load_config(config_path)
    except (OSError, ValueError) as exc:
        log.error("bad config %s: %s", config_path, exc)
        return EXIT_CONFIG

    # One agent per machine: a redeploy's new agent waits a little for the old one to be gone.
    lock_file = open(os.path.join(state_dir, "agent.lock"), "a")  # noqa: SIM115 (held until exit)
    deadline = time.monotonic() + 10
    while True:
        try:
            fcntl.flock(lock_file, fcntl.LOCK_EX | fcntl.LOCK_NB)
            break
        except OSError:
            if time.monotonic() > deadline:
                log.error("another agent holds %s", lock_file.name)
                return EXIT_LOCKED
            time.sleep(0.1)

    agent = Agent(config, state_dir)
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda *_: agent.stop.set())
    agent._write_state(last_heartbeat_at=None, action=None)
    return agent.run()


if __name__ == "__main__":
    sys.exit(main())
