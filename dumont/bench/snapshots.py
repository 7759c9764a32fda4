"""`python manage.py benchmark snapshot [--size-gb 2] [--connections 32] ...`: how fast restic backs up and
restores a GPU user's workspace, next to the physical references (`cp -a`, `tar | zstd -T0`).

Everything is real and local: a workspace generated to look like a user's, the development S3 server
(rclone) on loopback, and two machines (sshd) reached over SSH by the same engine code the tasks run
(snapshots/restic.py), with a user's scoped storage key. The workspace is restored onto the second,
empty machine, as a wake does. Figures are printed as a table; nothing is asserted.
"""

from __future__ import annotations

import dataclasses
import os
import random
import secrets
import shlex
import shutil
import subprocess
import tempfile
import time
from pathlib import Path

from dumont.core.management.commands.benchmark import Benchmark
from dumont.s3server import Credentials, scoped_credentials, start_s3_server
from machines.providers.local.sshd import SshdError, free_port, kill_machine_processes, start_sshd
from machines.ssh import SSHTarget, connect, generate_keypair
from snapshots import restic

BUCKET = "dumont-benchmark"
MB = 1_000_000


def generate_workspace(root: Path, size_bytes: int, *, seed: int = 42) -> dict[str, int]:
    """About `size_bytes` shaped like a GPU user's workspace.

    ~80% incompressible weights in a few large files, ~15% compressible datasets and logs,
    ~20,000 small source files (~3 KB) across a package tree, plus a git-like object store.
    """
    rng = random.Random(seed)
    small_files = 20_000
    small_bytes = small_files * 3_000
    weights = int(size_bytes * 0.80)
    text = max(size_bytes - weights - small_bytes, 0)

    models = root / "models"
    models.mkdir(parents=True, exist_ok=True)
    shard = 256 * MB
    written, index = 0, 0
    while written < weights:
        size = min(shard, weights - written)
        with open(models / f"model-{index:05d}.safetensors", "wb") as f:
            for offset in range(0, size, 16 * MB):
                f.write(rng.randbytes(min(16 * MB, size - offset)))
        written += size
        index += 1

    data = root / "data"
    data.mkdir(exist_ok=True)
    words = [f"token{i}" for i in range(5000)]
    line_count = 0
    for name, share in (("train.jsonl", 0.6), ("eval.jsonl", 0.1), ("../logs/train.log", 0.3)):
        path = (data / name).resolve()
        path.parent.mkdir(parents=True, exist_ok=True)
        target = int(text * share)
        with open(path, "w") as f:
            size = 0
            while size < target:
                chunk = "".join(
                    f'{{"id": {line_count + i}, "text": "{" ".join(rng.choices(words, k=12))}", '
                    f'"loss": {rng.random():.6f}}}\n'
                    for i in range(2000)
                )
                line_count += 2000
                f.write(chunk)
                size += len(chunk)

    per_dir = 200
    body = "".join(f"    value_{i} = compute(x, {i})  # step {i}\n" for i in range(60))
    for i in range(small_files):
        package = root / "src" / f"pkg_{i // per_dir:03d}"
        if i % per_dir == 0:
            package.mkdir(parents=True, exist_ok=True)
        (package / f"module_{i:05d}.py").write_text(f'"""Module {i}."""\n\n\ndef run_{i}(x):\n{body}    return x\n')
    return {"weights": weights, "text": text, "small_files": small_files}


def change_one_percent(root: Path, size_bytes: int, *, seed: int = 7) -> int:
    """Rewrite ~1% of the workspace the way training does: a new checkpoint shard and touched sources."""
    rng = random.Random(seed)
    new = max(size_bytes // 100 - 200 * 3_000, MB)
    (root / "models" / "checkpoint-new.safetensors").write_bytes(rng.randbytes(new))
    sources = sorted((root / "src").rglob("*.py"))[:200]
    for path in sources:
        path.write_text(path.read_text() + f"# edited {rng.random()}\n")
    return new + 200 * 3_000


def tree_bytes(root: Path) -> int:
    total = 0
    for dirpath, _, filenames in os.walk(root):
        for name in filenames:
            total += os.lstat(os.path.join(dirpath, name)).st_size
    return total


@dataclasses.dataclass
class Row:
    what: str
    seconds: float
    bytes: int
    note: str = ""

    @property
    def mb_per_second(self) -> float:
        return self.bytes / MB / self.seconds if self.seconds else 0.0


def _timed(command: str, *paths: Path) -> float:
    """Wall time of a shell pipeline; `{}` placeholders take the (quoted) paths. Dirty pages are flushed first."""
    subprocess.run(["sync"], check=True)
    started = time.monotonic()
    subprocess.run(["/bin/bash", "-o", "pipefail", "-c", command.format(*(shlex.quote(str(p)) for p in paths))],
                   check=True)
    return time.monotonic() - started


class _Machine:
    def __init__(self, root: Path, name: str, public_key: str):
        self.id = f"bench-{name}-{secrets.token_hex(3)}"
        self.dir = root / name
        self.workspace = self.dir / "workspace"
        self.workspace.mkdir(parents=True)
        home = self.dir / "home"
        (home / ".ssh").mkdir(parents=True)
        keys = home / ".ssh" / "authorized_keys"
        keys.write_text(public_key + "\n")
        env = {"HOME": str(home), "DUMONT_WORKSPACE": str(self.workspace), "DUMONT_MACHINE_ID": self.id}
        for _ in range(5):
            try:
                self.sshd = start_sshd(self.dir, port=free_port(), authorized_keys=keys, env=env)
                break
            except SshdError as exc:
                if "Address already in use" not in str(exc):
                    raise
        else:
            raise RuntimeError("no free port for sshd")

    @property
    def target(self) -> SSHTarget:
        return SSHTarget("127.0.0.1", self.sshd.port, "root", self.sshd.host_public_key)

    def stop(self) -> None:
        kill_machine_processes(self.id, self.dir)
        self.sshd.stop()


class _Cpu:
    """CPU seconds this whole machine spent (every process: the S3 server, sshd, restic, the fast path), from
    /proc/stat: the honest cost on a box where client and server share the cores."""

    def __init__(self):
        self.started = self._busy()

    @staticmethod
    def _busy() -> float:
        fields = [int(v) for v in Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:]]
        idle = fields[3] + (fields[4] if len(fields) > 4 else 0)
        return (sum(fields[:8]) - idle) / os.sysconf("SC_CLK_TCK")

    def seconds(self) -> float:
        return self._busy() - self.started


def _drop_caches() -> bool:
    """Flush and drop the page cache (root on Linux), so every measure reads from the disk; False if not allowed."""
    subprocess.run(["sync"], check=True)
    try:
        Path("/proc/sys/vm/drop_caches").write_text("3\n")
        return True
    except OSError:
        return False


def _get_ceiling(urls: list[str], threads: int) -> int:
    """Every object GET to nowhere, `threads` keep-alive connections: what the store can serve. Returns bytes."""
    import http.client
    import queue
    import threading
    from urllib.parse import urlsplit

    work: queue.SimpleQueue = queue.SimpleQueue()
    for url in urls:
        work.put(url)
    totals = [0] * threads

    def worker(index: int) -> None:
        connection, buffer = None, memoryview(bytearray(1 << 20))
        while True:
            try:
                url = work.get_nowait()
            except queue.Empty:
                break
            parts = urlsplit(url)
            if connection is None:
                connection = http.client.HTTPConnection(parts.hostname, parts.port, timeout=120)
            connection.request("GET", f"{parts.path}?{parts.query}")
            response = connection.getresponse()
            if response.status != 200:
                raise RuntimeError(f"GET answered {response.status}")
            while count := response.readinto(buffer):
                totals[index] += count
        if connection is not None:
            connection.close()

    pool = [threading.Thread(target=worker, args=(i,)) for i in range(threads)]
    for thread in pool:
        thread.start()
    for thread in pool:
        thread.join()
    return sum(totals)


@dataclasses.dataclass
class Measure:
    what: str
    seconds: float
    bytes: int
    cpu_seconds: float = 0.0
    note: str = ""

    @property
    def mb_per_second(self) -> float:
        return self.bytes / MB / self.seconds if self.seconds else 0.0

    @property
    def cpu_per_gb(self) -> float:
        return self.cpu_seconds / (self.bytes / 1e9) if self.bytes else 0.0


class SnapshotBenchmark(Benchmark):
    help = ("restore a workspace with the fast path and with restic, against cp -a and the S3 GET ceiling (alternating "
            "rounds, caches dropped); the snapshot side (fresh, 1% changed, both at once as a hibernation) too")

    def add_arguments(self, parser) -> None:
        parser.add_argument("--size-gb", type=float, default=1.8, help="workspace size (default 1.8)")
        parser.add_argument("--rounds", type=int, default=3, help="alternating restore rounds (default 3)")
        parser.add_argument("--connections", type=int, default=32, help="restic -o s3.connections")
        parser.add_argument("--threads", type=int, default=8, help="GET ceiling connections (the fast path's 8)")
        parser.add_argument("--skip-restic-restore", action="store_true", help="restore rounds without restic")
        parser.add_argument("--dir", type=Path, default=None, help="scratch directory (default: system temp)")
        parser.add_argument("--restic", default=shutil.which("restic") or "/usr/bin/restic")

    def run(self, **options) -> None:
        size = int(options["size_gb"] * 1e9)
        tuning = restic.Tuning(connections=options["connections"], command_timeout=3600)
        self.stdout.write(f"restic {restic.local_version(options['restic'])}, {os.cpu_count()} CPUs, "
                          f"workspace {size / 1e9:.2f} GB, {options['rounds']} rounds")
        self.stdout.write(f"load average before: {_load()}")
        with tempfile.TemporaryDirectory(prefix="dumont-bench-", dir=options["dir"]) as scratch:
            self._run(Path(scratch), size, tuning, options)
        self.stdout.write(f"load average after: {_load()}")

    def _run(self, root: Path, size: int, tuning: restic.Tuning, options: dict) -> None:
        from django.test import override_settings

        key = root / "id_ed25519"
        public_key = generate_keypair(key)
        admin = Credentials("bench-admin-" + secrets.token_hex(4), secrets.token_hex(20))
        scope_secret = secrets.token_hex(20)
        server = start_s3_server(root / "s3", admin=admin, scope_secret=scope_secret)
        fast_endpoint = getattr(server, "fast_endpoint", server.endpoint)
        self.stdout.write(f"S3: restic through {server.endpoint} (rclone behind the machine-key gate, 1 ms dir "
                          f"cache); fast path through {fast_endpoint} (rclone, admin key and presigned URLs only, "
                          "default dir cache)")
        machines: list[_Machine] = []
        snapshot_rows: list[Measure] = []
        restore_rounds: list[dict[str, Measure]] = []
        stack = override_settings(
            SNAPSHOT_S3_ENDPOINT=server.endpoint, SNAPSHOT_FAST_S3_ENDPOINT=fast_endpoint, SNAPSHOT_S3_BUCKET=BUCKET,
            SNAPSHOT_S3_REGION="auto", SNAPSHOT_S3_ACCESS_KEY_ID=admin.access_key_id,
            SNAPSHOT_S3_SECRET_ACCESS_KEY=admin.secret_access_key, SNAPSHOT_COMMAND_TIMEOUT_SECONDS=3600)
        stack.enable()
        try:
            from snapshots import fastpath, fastpath_services, storage

            storage.bucket_ensure()
            prefix = f"users/1/{secrets.token_hex(4)}"
            repository = restic.Repository(
                f"s3:{server.endpoint}/{BUCKET}/{prefix}", secrets.token_urlsafe(32),
                scoped_credentials(f"{BUCKET}/{prefix}", scope_secret, holder="bench", expires_at=time.time() + 86400),
                "auto",
            )
            restic.init(restic.LocalRunner(options["restic"], cache_dir=root / "cp-cache"),
                        dataclasses.replace(repository, credentials=admin), tuning)

            source = _Machine(root, "source", public_key)
            target = _Machine(root, "target", public_key)
            machines += [source, target]
            started = time.monotonic()
            shape = generate_workspace(source.workspace, size)
            total = tree_bytes(source.workspace)
            self.stdout.write(f"generated {total / 1e9:.2f} GB ({shape['small_files']} small files) in "
                              f"{time.monotonic() - started:.0f}s")
            manifests: list[tuple[int, str]] = []

            def fast_take(session) -> fastpath_services.FastTaken:
                manifest_id = len(manifests) + 1
                reusable = frozenset(k for k in storage.fast_objects(prefix))
                taken = fastpath_services.take_run(session, fastpath_services.FastTake(
                    manifest_id, prefix, reusable, tuple(reversed(manifests))))
                manifests.append((manifest_id, taken.manifest_sha256))
                return taken

            def restic_backup(session, parent: str = ""):
                return restic.backup(restic.RemoteRunner(session), repository, tuning, host="bench",
                                     tags=["reason=hibernate"], parent_id=parent)

            with connect(source.target, key) as session:
                restic.restic_ensure(session, local_binary=options["restic"])
                fastpath.program_ensure(session)
                _drop_caches()
                cpu = _Cpu()
                first = restic_backup(session)
                snapshot_rows.append(Measure("restic backup, fresh", first.duration, total, cpu.seconds()))
                _drop_caches()
                cpu, started = _Cpu(), time.monotonic()
                taken = fast_take(session)
                snapshot_rows.append(Measure("fast path snapshot, fresh", time.monotonic() - started, total,
                                             cpu.seconds(), f"{taken.uploaded_bytes / 1e9:.2f} GB uploaded"))

                changed = change_one_percent(source.workspace, size, seed=7)
                _drop_caches()
                cpu = _Cpu()
                second = restic_backup(session, first.snapshot_id)
                restic_incremental = second.duration
                snapshot_rows.append(Measure("restic backup, 1% changed", second.duration, changed, cpu.seconds(),
                                             f"{second.files_changed + second.files_new} files re-read"))
                _drop_caches()
                cpu, started = _Cpu(), time.monotonic()
                taken = fast_take(session)
                snapshot_rows.append(Measure("fast path snapshot, 1% changed", time.monotonic() - started, changed,
                                             cpu.seconds(), f"{taken.stats['objects_uploaded']} objects, "
                                             f"{taken.uploaded_bytes / 1e6:.0f} MB uploaded"))

                # a hibernation: both at once, as snapshots.services.snapshot_run does
                changed = change_one_percent(source.workspace, size, seed=8)
                _drop_caches()
                cpu, started = _Cpu(), time.monotonic()
                running = fastpath_services.FastTakeRunning(0, *_start(fast_take, session))
                third = restic_backup(session, second.snapshot_id)
                taken = running.future.result()
                running.executor.shutdown()
                both = time.monotonic() - started
                snapshot_rows.append(Measure("hibernation: restic + fast path at once, 1% changed", both, changed,
                                             cpu.seconds(), f"restic {third.duration:.2f}s; goal <= restic "
                                             f"incremental + 2 s = {restic_incremental + 2:.2f}s"))
                if taken.error:
                    raise RuntimeError(f"fast path snapshot failed: {taken.error}")
            total = tree_bytes(source.workspace)
            newest_id, newest_sha = manifests[-1]
            manifest = fastpath_services.manifest_read(prefix, newest_id, newest_sha)
            row = fastpath_services.FastPathManifest(pk=newest_id, manifest_sha256=newest_sha)
            urls = [storage.fast_presign("get_object", fastpath.object_name(prefix, k), 3600)
                    for k in manifest["objects"]]
            stored = sum(record["stored_size"] for record in manifest["objects"].values())

            copy_dir = root / "cp-a"
            with connect(target.target, key) as session:
                restic.restic_ensure(session, local_binary=options["restic"])
                fastpath.program_ensure(session)
                for round_number in range(options["rounds"]):
                    measures: dict[str, Measure] = {}
                    dropped = _drop_caches()
                    cpu, started = _Cpu(), time.monotonic()
                    subprocess.run(["cp", "-a", str(source.workspace), str(copy_dir)], check=True)
                    measures["cp"] = Measure("cp -a", time.monotonic() - started, total, cpu.seconds())
                    shutil.rmtree(copy_dir)

                    _drop_caches()
                    cpu, started = _Cpu(), time.monotonic()
                    got = _get_ceiling(urls, options["threads"])
                    measures["get"] = Measure(f"S3 GET ceiling ({options['threads']} connections, to /dev/null)",
                                              time.monotonic() - started, total, cpu.seconds(),
                                              f"{got / 1e9:.2f} GB stored bytes served")

                    _empty(target.workspace)
                    _drop_caches()
                    cpu, started = _Cpu(), time.monotonic()
                    figures = fastpath_services.restore(session, row, prefix)
                    measures["fast"] = Measure("fast path restore", time.monotonic() - started, total, cpu.seconds(),
                                               f"machine side {figures.get('seconds', 0):.2f}s")
                    if tree_bytes(target.workspace) != total:
                        raise RuntimeError("the fast path restored a tree of another size")

                    if not options["skip_restic_restore"]:
                        _empty(target.workspace)
                        _drop_caches()
                        cpu = _Cpu()
                        result = restic.restore(restic.RemoteRunner(session), repository, tuning,
                                                snapshot_id=third.snapshot_id)
                        measures["restic"] = Measure("restic restore", result.duration, total, cpu.seconds())
                        if tree_bytes(target.workspace) != total:
                            raise RuntimeError("restic restored a tree of another size")
                    restore_rounds.append(measures)
                    self.stdout.write(f"round {round_number + 1}: " + ", ".join(
                        f"{m.what.split(' (')[0]} {m.seconds:.2f}s" for m in measures.values())
                        + ("" if dropped else " (page cache NOT dropped: not root?)"))
        finally:
            stack.disable()
            for machine in machines:
                machine.stop()
            server.stop()
        self._print(snapshot_rows, restore_rounds, total, stored)

    def _print(self, snapshot_rows: list[Measure], rounds: list[dict[str, Measure]], total: int, stored: int) -> None:
        write = self.stdout.write
        write(f"\nSnapshot side ({total / 1e9:.2f} GB workspace; fast path objects stored: {stored / 1e9:.2f} GB)")
        write(f"{'measure':<54} {'seconds':>8} {'MB/s':>8} {'CPU s/GB':>9}  note")
        for row in snapshot_rows:
            write(f"{row.what:<54} {row.seconds:>8.2f} {row.mb_per_second:>8.0f} {row.cpu_per_gb:>9.2f}  {row.note}")
        write(f"\nRestore side, {len(rounds)} alternating rounds (median; MB/s of the workspace's bytes)")
        write(f"{'measure':<54} {'seconds':>8} {'MB/s':>8} {'CPU s/GB':>9} {'x cp -a':>8} {'x GET':>7}")
        median = {name: _median_measure([r[name] for r in rounds if name in r]) for name in rounds[0]}
        for m in median.values():
            write(f"{m.what:<54} {m.seconds:>8.2f} {m.mb_per_second:>8.0f} {m.cpu_per_gb:>9.2f} "
                  f"{m.mb_per_second / median['cp'].mb_per_second:>8.2f} "
                  f"{m.mb_per_second / median['get'].mb_per_second:>7.2f}")
        ratios = [r["fast"].mb_per_second / min(r["cp"].mb_per_second, r["get"].mb_per_second) for r in rounds]
        write("\nfast path restore / min(cp -a, GET ceiling), per round: "
              + ", ".join(f"{x:.2f}" for x in ratios) + f"; median {sorted(ratios)[len(ratios) // 2]:.2f} (goal >= 0.90)")
        if "restic" in median:
            write(f"fast path / restic restore: {median['fast'].mb_per_second / median['restic'].mb_per_second:.1f}x")


def _median_measure(measures: list[Measure]) -> Measure:
    ordered = sorted(measures, key=lambda m: m.seconds)
    return ordered[len(ordered) // 2]


def _empty(workspace: Path) -> None:
    shutil.rmtree(workspace)
    workspace.mkdir()


def _start(function, *args):
    from concurrent.futures import ThreadPoolExecutor

    executor = ThreadPoolExecutor(max_workers=1)
    return executor, executor.submit(function, *args)


def _load() -> str:
    one, five, fifteen = os.getloadavg()
    pressure = Path("/proc/pressure/cpu")
    busy = f", CPU pressure {pressure.read_text().split()[1]}" if pressure.exists() else ""
    return f"{one:.1f} {five:.1f} {fifteen:.1f}{busy}"


def _with_env(run: restic.Runner, extra: dict[str, str]) -> restic.Runner:
    """The runner, with non-secret tuning variables (GOMAXPROCS) added to restic's environment."""
    if not extra:
        return run

    def wrapped(args, *, env, **kwargs):
        return run(args, env={**env, **extra}, **kwargs)

    return wrapped


BENCHMARKS = {"snapshot": SnapshotBenchmark}
