"""The dev S3 server's fast-path endpoint: a second rclone over the same buckets, no gate, rclone's default
directory cache, the control plane's key only (machines get presigned URLs). See dumont/s3server.py."""

from __future__ import annotations

import http.client
import os
import secrets
import socket
import time
from urllib.parse import urlsplit

import boto3
import pytest
from botocore.exceptions import ClientError
from django.conf import settings

from dumont.s3server import Credentials, S3ServerError, scoped_credentials, start_s3_server
from snapshots import storage
from tests.snapshots.conftest import BUCKET
from tests.snapshots.helpers import processes_in


def _request(method: str, url: str, body: bytes | None = None) -> tuple[int, bytes]:
    """What a machine does with a URL: plain HTTP, no key (dumont_fastpath.py uses http.client too)."""
    split = urlsplit(url)
    connection = http.client.HTTPConnection(split.netloc, timeout=30)
    try:
        connection.request(method, split.path + (f"?{split.query}" if split.query else ""), body=body,
                           headers={"Content-Length": str(len(body or b""))} if method == "PUT" else {})
        response = connection.getresponse()
        return response.status, response.read()
    finally:
        connection.close()


def _presigned(method: str, key: str) -> str:
    operation = {"PUT": "put_object", "GET": "get_object"}[method]
    return storage.fast_client().generate_presigned_url(operation, Params={"Bucket": BUCKET, "Key": key},
                                                        ExpiresIn=300)


def _listed(client, prefix: str) -> list[str]:
    return [item["Key"] for item in client.list_objects_v2(Bucket=BUCKET, Prefix=prefix).get("Contents", [])]


def test_an_object_put_with_a_presigned_fast_url_is_listed_and_read_at_once_through_both_endpoints():
    storage.bucket_ensure()
    prefix = f"users/1/{secrets.token_hex(4)}/fast/"
    key = f"{prefix}objects/ab/{'ab' * 32}"
    fast, gated = storage.fast_client(), storage.client()
    assert fast.meta.endpoint_url == settings.SNAPSHOT_FAST_S3_ENDPOINT != settings.SNAPSHOT_S3_ENDPOINT
    # both have looked (and cached what they saw) before the write: neither may go on showing that
    assert _listed(fast, prefix) == [] and _listed(gated, prefix) == []
    body = os.urandom(3 << 20)
    assert _request("PUT", _presigned("PUT", key), body)[0] == 200

    assert _listed(fast, prefix) == [key] and _listed(gated, prefix) == [key]
    assert _request("GET", _presigned("GET", key)) == (200, body)
    assert gated.get_object(Bucket=BUCKET, Key=key)["Body"].read() == body
    # the fast server's own rewrite and delete are seen at once by itself (its cache is of its own writes)
    fast.put_object(Bucket=BUCKET, Key=key, Body=b"rewritten")
    assert _request("GET", _presigned("GET", key)) == (200, b"rewritten")
    fast.delete_object(Bucket=BUCKET, Key=key)
    assert _listed(fast, prefix) == [] and _request("GET", _presigned("GET", key))[0] == 404


def test_the_fast_endpoint_takes_the_control_planes_key_only():
    storage.bucket_ensure()
    prefix = f"users/2/{secrets.token_hex(4)}"
    key = f"{prefix}/fast/objects/cd/{'cd' * 32}"
    storage.fast_client().put_object(Bucket=BUCKET, Key=key, Body=b"secret")
    # a machine's key opens its own prefix on the gated endpoint, and nothing on the fast one
    machine = scoped_credentials(f"{BUCKET}/{prefix}", settings.SNAPSHOT_S3_SCOPE_SECRET, holder="k1",
                                 expires_at=time.time() + 600)
    gated_as_machine, fast_as_machine = (
        boto3.client("s3", endpoint_url=endpoint, region_name="auto", aws_access_key_id=machine.access_key_id,
                     aws_secret_access_key=machine.secret_access_key)
        for endpoint in (settings.SNAPSHOT_S3_ENDPOINT, settings.SNAPSHOT_FAST_S3_ENDPOINT))
    assert gated_as_machine.get_object(Bucket=BUCKET, Key=key)["Body"].read() == b"secret"
    for attempt in (lambda: fast_as_machine.get_object(Bucket=BUCKET, Key=key),
                    lambda: fast_as_machine.put_object(Bucket=BUCKET, Key=f"{key}x", Body=b"x"),
                    lambda: fast_as_machine.list_objects_v2(Bucket=BUCKET, Prefix=prefix)):
        with pytest.raises(ClientError, match="InvalidAccessKeyId|AccessDenied"):
            attempt()
    # unsigned requests, and a URL signed with the right key id but another secret
    fast = settings.SNAPSHOT_FAST_S3_ENDPOINT
    forged = boto3.client("s3", endpoint_url=fast, region_name="auto",
                          aws_access_key_id=settings.SNAPSHOT_S3_ACCESS_KEY_ID,
                          aws_secret_access_key="not-the-secret-0123456789"
                          ).generate_presigned_url("get_object", Params={"Bucket": BUCKET, "Key": key})
    for method, url, body in [("GET", f"{fast}/{BUCKET}/{key}", None), ("GET", forged, None),
                              ("GET", f"{fast}/{BUCKET}?prefix={prefix}", None),
                              ("PUT", f"{fast}/{BUCKET}/{prefix}/fast/unsigned", b"x")]:
        status, answer = _request(method, url, body)
        assert 400 <= status < 500 and b"secret" not in answer, (method, url, status)
    assert _listed(storage.client(), f"{prefix}/") == [key]


def _admin() -> Credentials:
    return Credentials(f"test-{secrets.token_hex(4)}", secrets.token_hex(20))


def test_stop_ends_both_servers_and_the_gate(tmp_path):
    root = (tmp_path / "s3").resolve()
    server = start_s3_server(root, admin=_admin(), scope_secret="scope")
    try:
        assert server.running and len(server.processes) == 3
        assert sorted(processes_in(root)) == sorted(process.pid for process in server.processes)
    finally:
        server.stop()
    assert all(process.poll() is not None for process in server.processes)
    assert processes_in(root) == []


def test_a_start_that_fails_halfway_leaves_nothing_running(tmp_path):
    root = (tmp_path / "s3").resolve()
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen(1)
        # the gated server and its gate come up, the fast one cannot bind
        with pytest.raises(S3ServerError, match="fast") as failed:
            start_s3_server(root, admin=_admin(), scope_secret="scope", fast_port=taken.getsockname()[1])
    assert "address already in use" in str(failed.value)
    assert processes_in(root) == []


def test_the_fast_client_is_the_main_endpoint_when_no_fast_one_is_set(settings):
    settings.SNAPSHOT_FAST_S3_ENDPOINT = ""
    assert storage.fast_endpoint() == settings.SNAPSHOT_S3_ENDPOINT
    assert storage.fast_client().meta.endpoint_url == settings.SNAPSHOT_S3_ENDPOINT
    settings.SNAPSHOT_S3_ENDPOINT = ""
    with pytest.raises(storage.StorageError, match="not configured"):
        storage.fast_client()
