"""Object storage: the rclone S3 server we develop and test against, the boto3 side, scoped keys."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import time
from http.server import BaseHTTPRequestHandler, HTTPServer
from pathlib import Path

import boto3
import pytest
from botocore.exceptions import ClientError
from django.conf import settings

from dumont.s3server import scope_secret_for, scoped_credentials
from machines.providers.local.sshd import free_port
from snapshots import services, storage
from snapshots.models import Snapshot
from tests.factories import make_instance, make_user
from tests.harness import REPO_ROOT
from tests.snapshots.conftest import BUCKET
from tests.snapshots.helpers import make_workspace, processes_in


def _client(key_id: str, secret: str):
    return boto3.client("s3", endpoint_url=settings.SNAPSHOT_S3_ENDPOINT, region_name="auto",
                        aws_access_key_id=key_id, aws_secret_access_key=secret)


def test_repository_size_and_delete_touch_exactly_the_prefix():
    storage.bucket_ensure()
    storage.bucket_ensure()  # idempotent
    s3 = storage.client()
    for key, size in [("users/7/ab/config", 10), ("users/7/ab/data/00/x", 1000), ("users/7/abc/config", 5)]:
        s3.put_object(Bucket=BUCKET, Key=key, Body=b"x" * size)

    assert storage.repository_size("users/7/ab") == 1010  # not the sibling users/7/abc
    assert storage.repository_delete("users/7/ab") == 2

    assert storage.repository_size("users/7/ab") == 0
    assert storage.repository_size("users/7/abc") == 5


def test_a_scoped_key_needs_its_own_secret_and_an_unknown_or_expired_key_opens_nothing():
    storage.bucket_ensure()
    scope_secret, soon = settings.SNAPSHOT_S3_SCOPE_SECRET, time.time() + 600
    key = scoped_credentials(f"{BUCKET}/users/8/cd", scope_secret, holder="k1", expires_at=soon)
    _client(key.access_key_id, key.secret_access_key).put_object(Bucket=BUCKET, Key="users/8/cd/data/00/x", Body=b"ok")
    assert storage.repository_size("users/8/cd") == 2
    assert _client(key.access_key_id, key.secret_access_key).get_object(
        Bucket=BUCKET, Key="users/8/cd/data/00/x")["Body"].read() == b"ok"

    forged = scoped_credentials(f"{BUCKET}/users/8/cd", "another scope secret", holder="k1", expires_at=soon)
    expired = scoped_credentials(f"{BUCKET}/users/8/cd", scope_secret, holder="k1", expires_at=time.time() - 1)
    for key_id, secret in [(forged.access_key_id, forged.secret_access_key), ("AKIAUNKNOWNKEY000000", "x" * 40),
                           (expired.access_key_id, expired.secret_access_key)]:
        with pytest.raises(ClientError, match="AccessDenied|SignatureDoesNotMatch|InvalidAccessKeyId"):
            _client(key_id, secret).get_object(Bucket=BUCKET, Key="users/8/cd/data/00/x")
    with pytest.raises(ValueError):  # a scope cannot climb out of the bucket
        scoped_credentials(f"{BUCKET}/users/../etc", "secret", holder="k1", expires_at=soon)


def test_the_development_entry_point_serves_s3_and_prints_no_secret(tmp_path):
    port, fast_port = free_port(), free_port()
    secret = "entry-point-secret-0123456789"
    env = {name: value for name, value in os.environ.items() if not name.startswith("SNAPSHOT_")}
    env.update(SNAPSHOT_S3_ACCESS_KEY_ID="entry-point-key", SNAPSHOT_S3_SECRET_ACCESS_KEY=secret,
               DJANGO_SETTINGS_MODULE="dumont.settings")
    process = subprocess.Popen(
        [sys.executable, "-m", "dumont.s3server", "--port", str(port), "--fast-port", str(fast_port),
         "--dir", str(tmp_path / "s3")],
        cwd=REPO_ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
    )
    try:
        line = process.stdout.readline()
        assert f"S3 on http://127.0.0.1:{port}," in line and f"fast path on http://127.0.0.1:{fast_port} " in line
        # no secret on a command line (rclone's auth key comes through its environment)
        started = processes_in(tmp_path / "s3")
        assert len(started) == 3  # the gated rclone, its gate, the fast rclone
        for pid in started:
            assert secret not in Path(f"/proc/{pid}/cmdline").read_text(errors="replace")
        s3 = boto3.client("s3", endpoint_url=f"http://127.0.0.1:{port}", region_name="auto",
                          aws_access_key_id="entry-point-key", aws_secret_access_key=secret)
        s3.create_bucket(Bucket="dev-bucket")
        assert [b["Name"] for b in s3.list_buckets()["Buckets"]] == ["dev-bucket"]
        assert (tmp_path / "s3" / "buckets" / "dev-bucket").is_dir()
        # with no SNAPSHOT_S3_SCOPE_SECRET, server and control plane derive the same one from SECRET_KEY
        scoped = scoped_credentials("dev-bucket/users/1/x", scope_secret_for("", settings.SECRET_KEY), holder="k1",
                                    expires_at=time.time() + 600)
        user = boto3.client("s3", endpoint_url=f"http://127.0.0.1:{port}", region_name="auto",
                            aws_access_key_id=scoped.access_key_id, aws_secret_access_key=scoped.secret_access_key)
        user.put_object(Bucket="dev-bucket", Key="users/1/x/data/00/ok", Body=b"ok")
        fast = boto3.client("s3", endpoint_url=f"http://127.0.0.1:{fast_port}", region_name="auto",
                            aws_access_key_id="entry-point-key", aws_secret_access_key=secret)
        assert fast.get_object(Bucket="dev-bucket", Key="users/1/x/data/00/ok")["Body"].read() == b"ok"
    finally:
        process.send_signal(signal.SIGTERM)
        output = line + process.communicate(timeout=20)[0]
    assert process.returncode == 0
    assert secret not in output and scoped.secret_access_key not in output
    assert processes_in(tmp_path / "s3") == []


class _FakeCloudflare(BaseHTTPRequestHandler):
    requests: list[dict] = []

    def do_POST(self):  # noqa: N802 (http.server's naming)
        body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
        _FakeCloudflare.requests.append({"path": self.path, "auth": self.headers["Authorization"], "body": body})
        answer = {"success": True, "result": {"accessKeyId": "tmp-id", "secretAccessKey": "tmp-secret",
                                              "sessionToken": "tmp-token"}}
        payload = json.dumps(answer).encode()
        self.send_response(200)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(payload)))
        self.end_headers()
        self.wfile.write(payload)

    def log_message(self, *args):
        pass


def test_r2_mode_asks_cloudflare_for_temporary_credentials_limited_to_the_prefix(settings):
    server = HTTPServer(("127.0.0.1", 0), _FakeCloudflare)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        settings.SNAPSHOT_MACHINE_CREDENTIALS = "r2"
        settings.SNAPSHOT_R2_API_URL = f"http://127.0.0.1:{server.server_port}/client/v4"
        settings.SNAPSHOT_R2_ACCOUNT_ID = "acct"
        settings.SNAPSHOT_R2_API_TOKEN = "parent-token"

        credentials = storage.machine_credentials("users/9/ef", holder="k1", ttl_seconds=3600)
    finally:
        server.shutdown()
    assert (credentials.access_key_id, credentials.secret_access_key, credentials.session_token) == (
        "tmp-id", "tmp-secret", "tmp-token")
    assert "tmp-secret" not in repr(credentials)
    request = _FakeCloudflare.requests[-1]
    assert request["path"] == "/client/v4/accounts/acct/r2/temp-access-credentials"
    assert request["auth"] == "Bearer parent-token"
    assert request["body"] == {"bucket": BUCKET, "parentAccessKeyId": settings.SNAPSHOT_S3_ACCESS_KEY_ID,
                               "permission": "object-read-write", "prefixes": ["users/9/ef/"], "ttlSeconds": 3600}


@pytest.mark.django_db
def test_storage_that_does_not_answer_fails_the_snapshot(machines, settings):
    owner = make_user()
    machine = machines.start()
    make_workspace(machine.workspace, weights_mb=0, source_files=1)
    services.repository_ensure(owner=owner)
    settings.SNAPSHOT_S3_ENDPOINT = f"http://127.0.0.1:{free_port()}"  # nothing listens there any more

    snapshot = services.snapshot_take(owner=owner, instance_id=make_instance(owner, status="running").pk,
                                      target=machine.target)

    assert snapshot.status == Snapshot.Status.FAILED and snapshot.verified_at is None
    # the machine's restic key is made first, on the control plane: that is what finds storage down
    assert "object storage" in snapshot.error and "Could not connect to the endpoint" in snapshot.error


def test_a_machine_key_deletes_only_the_restic_locks_its_own_holder_wrote():
    storage.bucket_ensure()
    scope_secret, soon = settings.SNAPSHOT_S3_SCOPE_SECRET, time.time() + 600
    mine, other = (scoped_credentials(f"{BUCKET}/users/10/gh", scope_secret, holder=holder, expires_at=soon)
                   for holder in ("k1", "k2"))
    as_mine = _client(mine.access_key_id, mine.secret_access_key)
    as_other = _client(other.access_key_id, other.secret_access_key)
    as_mine.put_object(Bucket=BUCKET, Key="users/10/gh/locks/mine", Body=b"lock")
    storage.client().put_object(Bucket=BUCKET, Key="users/10/gh/locks/control-plane", Body=b"lock")
    for key in ("users/10/gh/locks/mine", "users/10/gh/locks/control-plane"):
        with pytest.raises(ClientError, match="AccessDenied"):
            as_other.delete_object(Bucket=BUCKET, Key=key)
    with pytest.raises(ClientError, match="AccessDenied"):
        as_mine.delete_object(Bucket=BUCKET, Key="users/10/gh/locks/control-plane")
    as_mine.delete_object(Bucket=BUCKET, Key="users/10/gh/locks/mine")
    assert storage.repository_size("users/10/gh") == 4  # the control plane's lock only
