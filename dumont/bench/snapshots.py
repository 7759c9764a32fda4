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


class SnapshotBenchmark(Benchmark):
    help = "restic backup/restore through our engine vs cp -a and tar|zstd, against the local S3 server"

    def add_arguments(self, parser) -> None:
        parser.add_argument("--size-gb", type=float, default=2.0, help="workspace size (default 2)")
        parser.add_argument("--connections", type=int, default=32, help="restic -o s3.connections")
        parser.add_argument("--restore-connections", type=int, nargs="*", default=[],
                            help="extra restores with these s3.connections (restic restores with one worker each)")
        parser.add_argument("--pack-size-mb", type=int, default=16, help="restic --pack-size (MiB)")
        parser.add_argument("--compression", default="auto", choices=["auto", "off", "max"])
        parser.add_argument("--gomaxprocs", type=int, nargs="*", default=[],
                            help="extra restores with GOMAXPROCS set to these values")
        parser.add_argument("--dir", type=Path, default=None, help="scratch directory (default: system temp)")
        parser.add_argument("--restic", default=shutil.which("restic") or "/usr/bin/restic")
        parser.add_argument("--read-subsets", nargs="*", default=["64M", "10%", "100%"],
                            help="`restic check --read-data-subset` sizes to time on the control plane (the "
                                 "hibernation read-back, SNAPSHOT_VERIFY_READ_SUBSET)")

    def run(self, **options) -> None:
        size = int(options["size_gb"] * 1e9)
        tuning = restic.Tuning(connections=options["connections"], pack_size_mb=options["pack_size_mb"],
                               compression=options["compression"], command_timeout=3600)
        self.stdout.write(f"restic {restic.local_version(options['restic'])}, {os.cpu_count()} CPUs, "
                          f"workspace {size / 1e9:.2f} GB, {tuning}")
        self.stdout.write(f"load average before: {_load()}")
        with tempfile.TemporaryDirectory(prefix="dumont-bench-", dir=options["dir"]) as scratch:
            self._run(Path(scratch), size, tuning, options)
        # the figures mean little on a shared machine: say how busy it was
        self.stdout.write(f"load average after: {_load()}")

    def _run(self, root: Path, size: int, tuning: restic.Tuning, options: dict) -> None:
        key = root / "id_ed25519"
        public_key = generate_keypair(key)
        admin = Credentials("bench-admin-" + secrets.token_hex(4), secrets.token_hex(20))
        scope_secret = secrets.token_hex(20)
        server = start_s3_server(root / "s3", admin=admin, scope_secret=scope_secret)
        machines: list[_Machine] = []
        rows: list[Row] = []
        try:
            import boto3

            boto3.client("s3", endpoint_url=server.endpoint, region_name="auto", aws_access_key_id=admin.access_key_id,
                         aws_secret_access_key=admin.secret_access_key).create_bucket(Bucket=BUCKET)
            prefix = f"users/1/{secrets.token_hex(4)}"
            repository = restic.Repository(
                f"s3:{server.endpoint}/{BUCKET}/{prefix}", secrets.token_urlsafe(32),
                scoped_credentials(f"{BUCKET}/{prefix}", scope_secret, holder="bench", expires_at=time.time() + 86400),
                "auto",
            )
            # the control plane creates it (machine keys cannot write a repository's config or keys)
            restic.init(restic.LocalRunner(options["restic"], cache_dir=root / "cp-cache"),
                        dataclasses.replace(repository, credentials=admin), tuning)

            source = _Machine(root, "source", public_key)
            machines.append(source)
            started = time.monotonic()
            shape = generate_workspace(source.workspace, size)
            total = tree_bytes(source.workspace)
            self.stdout.write(f"generated {total / 1e9:.2f} GB ({shape['small_files']} small files) in "
                              f"{time.monotonic() - started:.0f}s")

            with connect(source.target, key) as session:
                restic.restic_ensure(session, local_binary=options["restic"])
                run = restic.RemoteRunner(session)
                first = restic.backup(run, repository, tuning, host="bench", tags=["reason=manual"])
                rows.append(Row("restic backup, first", first.duration, total))
                changed = change_one_percent(source.workspace, size)
                second = restic.backup(run, repository, tuning, host="bench", tags=["reason=periodic"],
                                       parent_id=first.snapshot_id)
                rows.append(Row("restic backup, after a 1% change", second.duration, changed,
                                f"{second.files_changed + second.files_new} files re-read"))
            total = tree_bytes(source.workspace)

            # what the control plane adds before a hibernation's destroy: its own listing, and a read-back
            control_plane = restic.LocalRunner(options["restic"], cache_dir=root / "cp-cache")
            started = time.monotonic()
            restic.snapshot_info(control_plane, repository, tuning, second.snapshot_id)
            rows.append(Row("control plane: restic snapshots <id>", time.monotonic() - started, 0, "the listing check"))
            for subset in options["read_subsets"]:
                seconds = restic.check_read_data(control_plane, repository, tuning, subset=subset)
                rows.append(Row(f"control plane: restic check --read-data-subset={subset}", seconds,
                                total if subset == "100%" else 0, "read back and hashed"))

            target = _Machine(root, "target", public_key)
            machines.append(target)
            with connect(target.target, key) as session:
                restic.restic_ensure(session, local_binary=options["restic"])
                variants = [("", tuning, {})]
                variants += [(f"connections={n}", dataclasses.replace(tuning, connections=n), {})
                             for n in options["restore_connections"]]
                variants += [(f"GOMAXPROCS={n}", tuning, {"GOMAXPROCS": str(n)}) for n in options["gomaxprocs"]]
                for label, variant, env in variants:
                    shutil.rmtree(target.workspace)
                    target.workspace.mkdir()
                    subprocess.run(["sync"], check=True)
                    result = restic.restore(_with_env(restic.RemoteRunner(session), env), repository, variant,
                                            snapshot_id=second.snapshot_id)
                    rows.append(Row(f"restic restore to an empty dir {label}".strip(), result.duration, total))
                    if tree_bytes(target.workspace) != total:
                        raise RuntimeError("the restored tree differs in size from the source")

            copy_dir = root / "cp-a"
            rows.append(Row("cp -a (reference)", _timed("cp -a {} {}", source.workspace, copy_dir), total))
            shutil.rmtree(copy_dir)
            archive = root / "workspace.tar.zst"
            seconds = _timed("tar -C {} -cf - . | zstd -q -T0 -1 -o {}", source.workspace, archive)
            rows.append(Row("tar | zstd -T0 -1, create", seconds, total,
                            f"archive {archive.stat().st_size / 1e9:.2f} GB"))
            extract_dir = root / "untar"
            extract_dir.mkdir()
            rows.append(Row("zstd -d -T0 | tar -x (reference)",
                            _timed("zstd -q -dc -T0 {} | tar -C {} -xf -", archive, extract_dir), total))
        finally:
            for machine in machines:
                machine.stop()
            server.stop()
        self._print(rows)

    def _print(self, rows: list[Row]) -> None:
        cp = next(row for row in rows if row.what.startswith("cp -a"))
        self.stdout.write(f"\n{'measure':<44} {'seconds':>8} {'MB/s':>8} {'x cp -a':>8}  note")
        for row in rows:
            ratio = row.mb_per_second / cp.mb_per_second if cp.mb_per_second else 0
            self.stdout.write(f"{row.what:<44} {row.seconds:>8.2f} {row.mb_per_second:>8.0f} {ratio:>8.2f}  {row.note}")
        restores = [row for row in rows if row.what.startswith("restic restore")]
        best = max(restores, key=lambda row: row.mb_per_second)
        self.stdout.write(f"\nrestore / cp -a = {best.mb_per_second / cp.mb_per_second:.2f} (best: {best.what}); "
                          "goal >= 0.90")


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
