"""By hand, not a test: the fast-path restore's speed next to the raw GET ceiling on this machine.

    .venv/bin/python scripts/fastpath_speed.py [--size-gb 1] [--rounds 2] [--dir /tmp]

A workspace shaped like a GPU user's (dumont/bench/snapshots.generate_workspace) is snapshotted from one sshd
machine through the engine, then restored onto an empty second one, alternating with the ceiling (8 threads
GETting every object of the manifest to /dev/null: one keep-alive connection each, readinto a reused buffer)
and `cp -a` of the source workspace (the goal is >= 0.9 x min(cp -a, ceiling)).
Endpoint: the S3 server's `fast_endpoint` when it has one, else its rclone directly (the gate is a Python
relay: it would measure itself).
"""

from __future__ import annotations

import argparse
import http.client
import os
import queue
import re
import secrets
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from urllib.parse import urlsplit

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
os.environ.setdefault("DJANGO_SETTINGS_MODULE", "dumont.settings")

import django  # noqa: E402

django.setup()  # dumont.bench's package imports need the app registry

import boto3  # noqa: E402
from botocore.config import Config  # noqa: E402

from dumont.bench.snapshots import _Machine, generate_workspace, tree_bytes  # noqa: E402
from dumont.s3server import Credentials, start_s3_server  # noqa: E402
from machines.ssh import connect, generate_keypair  # noqa: E402
from snapshots import fastpath  # noqa: E402

BUCKET = "fastpath-speed"
PREFIX = "users/1/speed"


def ceiling(urls: list[str], threads: int = 8) -> tuple[float, int]:
    """Seconds and bytes to GET every URL to nowhere."""
    jobs: queue.Queue = queue.Queue()
    for url in urls:
        jobs.put(url)
    received = [0]
    lock = threading.Lock()

    def worker():
        view = memoryview(bytearray(4 << 20))
        connections = {}
        total = 0
        while True:
            try:
                url = jobs.get_nowait()
            except queue.Empty:
                break
            parts = urlsplit(url)
            conn = connections.get(parts.netloc) or http.client.HTTPConnection(parts.netloc, timeout=120)
            connections[parts.netloc] = conn
            conn.request("GET", f"{parts.path}?{parts.query}")
            response = conn.getresponse()
            assert response.status == 200, response.status
            while n := response.readinto(view):
                total += n
        with lock:
            received[0] += total

    started = time.monotonic()
    workers = [threading.Thread(target=worker) for _ in range(threads)]
    for thread in workers:
        thread.start()
    for thread in workers:
        thread.join()
    return time.monotonic() - started, received[0]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size-gb", type=float, default=1.0)
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--dir", default=None)
    options = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="fastpath-speed-", dir=options.dir) as scratch:
        run(Path(scratch), int(options.size_gb * 1e9), options.rounds)


def run(root: Path, size: int, rounds: int) -> None:
    key = root / "id_ed25519"
    public_key = generate_keypair(key)
    admin = Credentials("speed-" + secrets.token_hex(4), secrets.token_hex(20))
    server = start_s3_server(root / "s3", admin=admin, scope_secret=secrets.token_hex(20))
    machines = []
    try:
        endpoint = getattr(server, "fast_endpoint", None)
        if endpoint is None:
            endpoint = re.search(r"Starting s3 server on \[(http://[^\]/]+)/?\]", server.log()).group(1)
        s3 = boto3.client("s3", endpoint_url=endpoint, region_name="auto", aws_access_key_id=admin.access_key_id,
                          aws_secret_access_key=admin.secret_access_key, config=Config(s3={"addressing_style": "path"}))
        s3.create_bucket(Bucket=BUCKET)

        def urls(keys, method):
            return {k: s3.generate_presigned_url(method, Params={"Bucket": BUCKET,
                                                                 "Key": fastpath.object_name(PREFIX, k)},
                                                 ExpiresIn=3600) for k in keys}

        source = _Machine(root, "source", public_key)
        machines.append(source)
        generate_workspace(source.workspace, size)
        total = tree_bytes(source.workspace)
        with connect(source.target, key) as session:
            fastpath.program_ensure(session)
            scan = fastpath.scan(session, timeout=3600)
            uploaded = fastpath.upload(session, urls(scan.objects, "put_object"), timeout=3600)
            manifest = fastpath.manifest_build(scan, uploaded["objects"])
        stored = sum(r["stored_size"] for r in manifest["objects"].values())
        print(f"workspace {total / 1e6:.0f} MB in {scan.files} files, {len(scan.objects)} objects, "
              f"{stored / 1e6:.0f} MB stored; scan {scan.seconds:.1f}s, upload {uploaded['seconds']:.1f}s; "
              f"endpoint {endpoint}; {os.cpu_count()} CPUs, load {os.getloadavg()[0]:.1f}")

        target = _Machine(root, "target", public_key)
        machines.append(target)
        get_urls = urls(manifest["objects"], "get_object")
        with connect(target.target, key) as session:
            fastpath.program_ensure(session)
            for round_ in range(rounds):
                subprocess.run(["sync"], check=True)
                seconds, received = ceiling(list(get_urls.values()))
                assert received == stored, (received, stored)
                shutil.rmtree(target.workspace)
                target.workspace.mkdir()
                subprocess.run(["sync"], check=True)  # the previous round's dirty pages are not this one's cost
                stats = fastpath.restore(session, manifest, get_urls, timeout=3600)
                copy = root / "cp-a"
                subprocess.run(["sync"], check=True)
                started = time.monotonic()
                subprocess.run(["cp", "-a", str(source.workspace), str(copy)], check=True)
                copy_seconds = time.monotonic() - started
                shutil.rmtree(copy)
                ratio = seconds / stats["seconds"]
                print(f"round {round_ + 1}: GET ceiling {seconds:.2f}s = {total / 1e6 / seconds:.0f} MB/s "
                      f"(workspace bytes; {stored / 1e6 / seconds:.0f} MB/s stored) | restore {stats['seconds']:.2f}s "
                      f"= {total / 1e6 / stats['seconds']:.0f} MB/s, phases {stats['phases']} | "
                      f"restore / ceiling = {ratio:.2f} | cp -a {copy_seconds:.2f}s, restore / cp -a = "
                      f"{copy_seconds / stats['seconds']:.2f}")
            assert tree_bytes(target.workspace) == total
    finally:
        for machine in machines:
            machine.stop()
        server.stop()


if __name__ == "__main__":
    main()
