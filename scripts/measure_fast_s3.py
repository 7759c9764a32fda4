"""GET throughput of the dev S3 server: the gated path (gate + 1 ms rclone) against the fast endpoint.

    .venv/bin/python scripts/measure_fast_s3.py [--objects 64] [--mib 16] [--threads 8] [--rounds 2]
        [--variant NAME=FLAGS ...]

Writes N objects of random bytes into the buckets directory, then each round fetches all of them (whole-object
GETs, presigned URLs, one keep-alive http.client connection per thread, bodies discarded) through each path
(with --put: also PUTs N new objects) and prints MB/s and the server's CPU seconds per GB (utime+stime of rclone and the gate, from /proc/PID/stat).
`--variant fast-nomod="--no-modtime"` measures the fast rclone with other flags (replacing FAST_SERVE_FLAGS).
"""

from __future__ import annotations

import argparse
import http.client
import os
import queue
import secrets
import shlex
import sys
import tempfile
import threading
import time
from pathlib import Path
from urllib.parse import urlsplit

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import boto3  # noqa: E402
from botocore.config import Config  # noqa: E402

from dumont import s3server  # noqa: E402

BUCKET = "bench"
CLOCK_TICKS = os.sysconf("SC_CLK_TCK")


def cpu_seconds(pids: list[int]) -> float:
    total = 0
    for pid in pids:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
        total += sum(int(value) for value in fields[11:15])  # utime stime cutime cstime
    return total / CLOCK_TICKS


def transfer(urls: list[str], threads: int, body: bytes | None = None) -> int:
    """GET every URL (bodies discarded), or PUT `body` to each; returns the bytes moved."""
    work: queue.Queue[str] = queue.Queue()
    for url in urls:
        work.put(url)
    received = [0] * threads
    errors: list[BaseException] = []

    def worker(n: int) -> None:
        buffer = bytearray(1 << 20)
        view = memoryview(buffer)
        connection = None
        try:
            while True:
                try:
                    url = work.get_nowait()
                except queue.Empty:
                    return
                split = urlsplit(url)
                if connection is None:
                    connection = http.client.HTTPConnection(split.netloc, timeout=60)
                connection.request("GET" if body is None else "PUT", f"{split.path}?{split.query}", body=body)
                response = connection.getresponse()
                if response.status != 200:
                    raise RuntimeError(f"{split.path}: {response.status} {response.read()[:200]!r}")
                while count := response.readinto(view):
                    received[n] += count
                received[n] += len(body or b"")
        except BaseException as exc:  # noqa: BLE001 (reported by the main thread)
            errors.append(exc)
        finally:
            if connection is not None:
                connection.close()

    workers = [threading.Thread(target=worker, args=(n,)) for n in range(threads)]
    for thread in workers:
        thread.start()
    for thread in workers:
        thread.join()
    if errors:
        raise errors[0]
    return sum(received)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--objects", type=int, default=64)
    parser.add_argument("--mib", type=int, default=16)
    parser.add_argument("--threads", type=int, default=8)
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--put", action="store_true", help="also PUT as many objects (presigned URLs)")
    parser.add_argument("--variant", action="append", default=[], help="NAME=FLAGS for the fast rclone")
    args = parser.parse_args()
    variants = {"fast": s3server.FAST_SERVE_FLAGS}
    for variant in args.variant:
        name, _, flags = variant.partition("=")
        variants[name] = tuple(shlex.split(flags))

    admin = s3server.Credentials(f"bench-{secrets.token_hex(4)}", secrets.token_hex(20))
    with tempfile.TemporaryDirectory(prefix="measure-fast-s3-") as tmp:
        root = Path(tmp)
        objects = root / "buckets" / BUCKET / "users/1/ab/fast/objects"
        objects.mkdir(parents=True)
        keys = []
        for n in range(args.objects):
            (objects / f"{n:04d}").write_bytes(os.urandom(args.mib << 20))
            keys.append(f"users/1/ab/fast/objects/{n:04d}")
        body = os.urandom(args.mib << 20)
        print(f"{args.objects} x {args.mib} MiB, {args.threads} threads, {os.cpu_count()} CPUs, "
              f"load {os.getloadavg()[0]:.2f}", flush=True)
        servers = {}
        try:
            for name, flags in variants.items():
                s3server.FAST_SERVE_FLAGS = flags
                servers[name] = s3server.start_s3_server(root, admin=admin, scope_secret="bench")
            for round_ in range(1, args.rounds + 1):
                paths = [("gated", servers["fast"].endpoint, [servers["fast"].gate, servers["fast"].process])]
                paths += [(name, server.fast_endpoint, [server.fast]) for name, server in servers.items()]
                for name, endpoint, processes in paths:
                    client = boto3.client("s3", endpoint_url=endpoint, region_name="auto",
                                          aws_access_key_id=admin.access_key_id,
                                          aws_secret_access_key=admin.secret_access_key,
                                          config=Config(s3={"addressing_style": "path"}))
                    for method in ("GET", "PUT") if args.put else ("GET",):
                        names = keys if method == "GET" else [f"{key}.{name}.{round_}" for key in keys]
                        urls = [client.generate_presigned_url(f"{method.lower()}_object", ExpiresIn=600,
                                                              Params={"Bucket": BUCKET, "Key": key})
                                for key in names]
                        pids = [process.pid for process in processes]
                        cpu_before, started = cpu_seconds(pids), time.monotonic()
                        moved = transfer(urls, args.threads, None if method == "GET" else body)
                        seconds, cpu = time.monotonic() - started, cpu_seconds(pids) - cpu_before
                        flags = "" if name == "gated" else " " + shlex.join(variants[name])
                        print(f"round {round_} {method} {name:<14} {moved / 1e6 / seconds:7.0f} MB/s  "
                              f"{cpu / (moved / 1e9):5.2f} CPU s/GB  ({seconds:.1f} s){flags}", flush=True)
        finally:
            for server in servers.values():
                server.stop()


if __name__ == "__main__":
    main()
