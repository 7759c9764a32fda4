"""Object storage (boto3, any S3-compatible store; Cloudflare R2 in production).

restic does the backups; this module does what restic does not: bucket setup, a repository's size
(cost accounting), deleting a user's whole repository or one key file, and the credentials a user's
machine gets, which open that user's prefix and nothing else (`machine_credentials`).
"""

from __future__ import annotations

import json
import logging
import time
from functools import cache

import boto3
import requests
from botocore.config import Config
from botocore.exceptions import BotoCoreError, ClientError
from django.conf import settings

from dumont.core.errors import ServiceUnavailable
from dumont.s3server import Credentials, scope_secret_for, scoped_credentials

_DELETE_BATCH = 1000  # the S3 DeleteObjects maximum
log = logging.getLogger(__name__)


class StorageError(ServiceUnavailable):
    code = "storage_unavailable"


def _configured() -> None:
    missing = [name for name in ("SNAPSHOT_S3_ENDPOINT", "SNAPSHOT_S3_ACCESS_KEY_ID", "SNAPSHOT_S3_SECRET_ACCESS_KEY")
               if not getattr(settings, name)]
    if missing:
        raise StorageError(f"object storage is not configured: set {', '.join(missing)}")


def admin_credentials() -> Credentials:
    _configured()
    return Credentials(settings.SNAPSHOT_S3_ACCESS_KEY_ID, settings.SNAPSHOT_S3_SECRET_ACCESS_KEY)


def scope_secret() -> str:
    return scope_secret_for(settings.SNAPSHOT_S3_SCOPE_SECRET, settings.SECRET_KEY)


@cache
def _client(endpoint: str, region: str, key_id: str, secret: str):
    return boto3.client(
        "s3",
        endpoint_url=endpoint,
        region_name=region,
        aws_access_key_id=key_id,
        aws_secret_access_key=secret,
        config=Config(
            s3={"addressing_style": "path"},
            retries={"max_attempts": 3, "mode": "standard"},
            connect_timeout=5,
            read_timeout=60,
        ),
    )


def client():
    credentials = admin_credentials()
    return _client(
        settings.SNAPSHOT_S3_ENDPOINT, settings.SNAPSHOT_S3_REGION, credentials.access_key_id,
        credentials.secret_access_key,
    )


def fast_endpoint() -> str:
    """Where the fast path's objects live: SNAPSHOT_FAST_S3_ENDPOINT, or SNAPSHOT_S3_ENDPOINT when it is empty."""
    _configured()
    return settings.SNAPSHOT_FAST_S3_ENDPOINT or settings.SNAPSHOT_S3_ENDPOINT


def fast_client():
    """The control plane's client for `{prefix}/fast/...` (and the presigned URLs machines get for it)."""
    credentials = admin_credentials()
    return _client(fast_endpoint(), settings.SNAPSHOT_S3_REGION, credentials.access_key_id,
                   credentials.secret_access_key)


def repository_url(prefix: str) -> str:
    """restic's name for a repository under `prefix` in the bucket."""
    _configured()
    return f"s3:{settings.SNAPSHOT_S3_ENDPOINT.rstrip('/')}/{settings.SNAPSHOT_S3_BUCKET}/{prefix.strip('/')}"


def _storage_call(what: str, call, *args, **kwargs):
    try:
        return call(*args, **kwargs)
    except (ClientError, BotoCoreError) as exc:
        raise StorageError(f"object storage: {what} failed: {exc}") from exc


def bucket_ensure() -> None:
    """The bucket exists, also as the fast-path endpoint sees it when it is another server (development: its
    own directory cache learns of the bucket only through its own CreateBucket)."""
    _bucket_ensure(client())
    if fast_endpoint() != settings.SNAPSHOT_S3_ENDPOINT:
        try:
            _bucket_ensure(fast_client())
        except StorageError as exc:  # restic's snapshots do not need it; the fast path then fails and says so
            log.warning("the fast-path endpoint: %s", exc)


def _bucket_ensure(s3) -> None:
    try:
        s3.head_bucket(Bucket=settings.SNAPSHOT_S3_BUCKET)
        return
    except ClientError as exc:
        if exc.response.get("Error", {}).get("Code") not in {"404", "NoSuchBucket", "NotFound"}:
            raise StorageError(f"object storage: bucket check failed: {exc}") from exc
    except BotoCoreError as exc:
        raise StorageError(f"object storage: bucket check failed: {exc}") from exc
    try:
        s3.create_bucket(Bucket=settings.SNAPSHOT_S3_BUCKET)
    except ClientError as exc:
        if exc.response.get("Error", {}).get("Code") not in {"BucketAlreadyOwnedByYou", "BucketAlreadyExists"}:
            raise StorageError(f"object storage: cannot create the bucket: {exc}") from exc


def _keys_under(prefix: str):
    paginator = client().get_paginator("list_objects_v2")
    pages = paginator.paginate(Bucket=settings.SNAPSHOT_S3_BUCKET, Prefix=prefix.strip("/") + "/")
    try:
        for page in pages:
            yield from page.get("Contents", [])
    except (ClientError, BotoCoreError) as exc:
        raise StorageError(f"object storage: listing {prefix} failed: {exc}") from exc


def has_objects(prefix: str) -> bool:
    """Whether anything is stored under the prefix."""
    return next(iter(_keys_under(prefix)), None) is not None


def repository_size(prefix: str) -> int:
    """Bytes stored under the prefix: what the user's snapshots cost."""
    return sum(item["Size"] for item in _keys_under(prefix))


def repository_delete(prefix: str) -> int:
    """Delete every object under the prefix; returns how many were deleted."""
    keys = [item["Key"] for item in _keys_under(prefix)]
    for start in range(0, len(keys), _DELETE_BATCH):
        batch = [{"Key": key} for key in keys[start : start + _DELETE_BATCH]]
        answer = _storage_call(
            "delete", client().delete_objects, Bucket=settings.SNAPSHOT_S3_BUCKET,
            Delete={"Objects": batch, "Quiet": True},
        )
        if answer.get("Errors"):
            raise StorageError(f"object storage: {len(answer['Errors'])} objects under {prefix} were not deleted")
    return len(keys)


def repository_keys(prefix: str) -> dict[str, str]:
    """The repository's restic key files: {key id: the host named in it}. restic stores that metadata in
    plain JSON beside the encrypted master key, so no password (and no restic KDF) is needed to read it."""
    keys = {}
    for item in _keys_under(f"{prefix}/keys"):
        body = _storage_call("read a key file", client().get_object, Bucket=settings.SNAPSHOT_S3_BUCKET,
                             Key=item["Key"])["Body"].read()
        try:
            keys[item["Key"].rsplit("/", 1)[-1]] = str(json.loads(body).get("hostname", ""))
        except (ValueError, AttributeError):
            continue  # not a key file restic wrote: it names no host of ours
    return keys


def object_delete(key: str) -> None:
    """Delete one object (the control plane's key: a removed machine's restic key file)."""
    _storage_call("delete", client().delete_object, Bucket=settings.SNAPSHOT_S3_BUCKET, Key=key)


def machine_credentials(prefix: str, *, holder: str, ttl_seconds: int) -> Credentials:
    """Credentials for a user's machine: they open `bucket/prefix/` only, for `ttl_seconds` (see
    SNAPSHOT_MACHINE_CREDENTIALS and README "Isolation"). `holder`: the machine's restic key label; on the
    embedded S3 server they may add objects but delete only the restic locks that holder wrote.
    """
    mode = settings.SNAPSHOT_MACHINE_CREDENTIALS
    scope = f"{settings.SNAPSHOT_S3_BUCKET}/{prefix.strip('/')}"
    if mode == "scoped":
        return scoped_credentials(scope, scope_secret(), holder=holder, expires_at=time.time() + ttl_seconds)
    if mode == "r2":
        return _r2_temporary_credentials(prefix, ttl_seconds)
    if mode == "shared":
        return admin_credentials()
    raise StorageError(f"SNAPSHOT_MACHINE_CREDENTIALS must be scoped, r2 or shared, not {mode!r}")


def machine_credentials_expire() -> bool:
    """Whether machine credentials expire (and an agent must renew its own): all but `shared` ones."""
    return settings.SNAPSHOT_MACHINE_CREDENTIALS != "shared"


def _r2_temporary_credentials(prefix: str, ttl_seconds: int) -> Credentials:
    """R2's temporary credentials, limited to object reads and writes under the user's prefix. R2 has no
    narrower permission than `object-read-write`: these can delete too (README "Isolation")."""
    url = f"{settings.SNAPSHOT_R2_API_URL.rstrip('/')}/accounts/{settings.SNAPSHOT_R2_ACCOUNT_ID}/r2/temp-access-credentials"
    body = {
        "bucket": settings.SNAPSHOT_S3_BUCKET,
        "parentAccessKeyId": settings.SNAPSHOT_S3_ACCESS_KEY_ID,
        "permission": "object-read-write",
        "prefixes": [prefix.strip("/") + "/"],
        "ttlSeconds": ttl_seconds,
    }
    try:
        response = requests.post(
            url, json=body, timeout=15, headers={"Authorization": f"Bearer {settings.SNAPSHOT_R2_API_TOKEN}"}
        )
        response.raise_for_status()
        result = response.json()["result"]
        return Credentials(result["accessKeyId"], result["secretAccessKey"], result["sessionToken"])
    except (requests.RequestException, ValueError, KeyError, TypeError) as exc:
        # the exception text names the URL and status, never the token
        raise StorageError(f"R2 temporary credentials: {type(exc).__name__}: {exc}") from None


# ---- the fast path's objects (snapshots/fastpath_services.py) ------------------------------------
# Only the control plane's key touches them: it lists, verifies and deletes them, and presigns the exact
# PUT/GET URLs a machine needs (that object only, short-lived).

_FAST_OBJECTS = "fast/objects"
_FAST_MANIFESTS = "fast/manifests"


def _fast_listing(prefix: str):
    paginator = fast_client().get_paginator("list_objects_v2")
    try:
        for page in paginator.paginate(Bucket=settings.SNAPSHOT_S3_BUCKET, Prefix=f"{prefix.strip('/')}/"):
            yield from page.get("Contents", [])
    except (ClientError, BotoCoreError) as exc:
        raise StorageError(f"object storage: listing {prefix} failed: {exc}") from exc


def fast_objects(prefix: str) -> dict[str, tuple[int, float]]:
    """The fast-path objects stored under a repository prefix: {key: (size, last modified, unix seconds)}."""
    found = {}
    for item in _fast_listing(f"{prefix.strip('/')}/{_FAST_OBJECTS}"):
        found[item["Key"].rsplit("/", 1)[-1]] = (item["Size"], item["LastModified"].timestamp())
    return found


def fast_manifests(prefix: str) -> dict[int, str]:
    """The stored manifests under a repository prefix: {manifest id: object name}."""
    found = {}
    for item in _fast_listing(f"{prefix.strip('/')}/{_FAST_MANIFESTS}"):
        stem = item["Key"].rsplit("/", 1)[-1].removesuffix(".json")
        if stem.isdigit():
            found[int(stem)] = item["Key"]
    return found


def fast_presign(operation: str, name: str, ttl_seconds: int) -> str:
    """A URL that lets its holder do `operation` (put_object, get_object) on that one object, for ttl_seconds."""
    return _storage_call("presign", fast_client().generate_presigned_url, operation,
                         Params={"Bucket": settings.SNAPSHOT_S3_BUCKET, "Key": name}, ExpiresIn=ttl_seconds)


def fast_put(name: str, body: bytes) -> None:
    _storage_call("write", fast_client().put_object, Bucket=settings.SNAPSHOT_S3_BUCKET, Key=name, Body=body)


def fast_get(name: str) -> bytes:
    answer = _storage_call("read", fast_client().get_object, Bucket=settings.SNAPSHOT_S3_BUCKET, Key=name)
    return _storage_call("read", answer["Body"].read)


def fast_delete(names: list[str]) -> None:
    for start in range(0, len(names), _DELETE_BATCH):
        batch = [{"Key": name} for name in names[start : start + _DELETE_BATCH]]
        answer = _storage_call("delete", fast_client().delete_objects, Bucket=settings.SNAPSHOT_S3_BUCKET,
                               Delete={"Objects": batch, "Quiet": True})
        if answer.get("Errors"):
            raise StorageError(f"object storage: {len(answer['Errors'])} fast-path objects were not deleted")
