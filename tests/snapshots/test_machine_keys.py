"""Each machine gets its own restic key and storage keys that can add but never destroy; the key goes
with its machine. Real restic against the real (gated) S3 server, as a hostile host would use them."""

from __future__ import annotations

import filecmp
import shutil

import boto3
import pytest
from botocore.exceptions import ClientError
from django.conf import settings

from snapshots import restic, services, storage
from snapshots.models import MachineKey, Snapshot, SnapshotRepository, SnapshotRestore
from tests.factories import make_instance, make_user
from tests.snapshots.helpers import make_workspace

pytestmark = pytest.mark.django_db


def _as_the_host(repository: SnapshotRepository, key: MachineKey) -> tuple[restic.LocalRunner, restic.Repository]:
    """restic with exactly the secrets that host received (its key's password, its storage keys)."""
    return (restic.LocalRunner(shutil.which("restic")),
            services._machine_repository(repository, key, ttl_seconds=600))


def test_a_host_can_back_up_and_restore_but_not_forget_delete_or_overwrite_and_its_key_dies_with_it(machines):
    owner = make_user()
    first, second = make_instance(owner, status="running"), make_instance(owner, status="running")
    source, target = machines.start(), machines.start()
    make_workspace(source.workspace, weights_mb=2, source_files=10)
    snapshot = services.snapshot_take(owner=owner, instance_id=first.pk, target=source.target)
    assert snapshot.status == Snapshot.Status.VERIFIED, snapshot.error
    restore = services.snapshot_restore(owner=owner, instance_id=second.pk, snapshot_id=snapshot.pk,
                                        target=target.target)
    assert restore.status == SnapshotRestore.Status.SUCCEEDED, restore.error
    assert not filecmp.dircmp(source.workspace, target.workspace).diff_files

    repository = SnapshotRepository.objects.get(owner=owner)
    source_key, target_key = MachineKey.objects.get(instance=first), MachineKey.objects.get(instance=second)
    assert len({source_key.restic_key_id, target_key.restic_key_id, repository.control_key_id}) == 3
    assert repository.password not in {source_key.password, target_key.password}

    # the source host, hostile: its restic cannot forget the snapshot (that deletes), nor can boto3 delete
    # or overwrite a pack, nor write itself a key that would outlive its own
    run, as_host = _as_the_host(repository, source_key)
    forgotten = run([*services.tuning().global_args(as_host), "forget", snapshot.restic_snapshot_id],
                    env=as_host.env(), timeout=300)
    assert not forgotten.ok
    control = services._control_plane_repository(repository)
    assert restic.snapshot_listed(services._local_runner(), control, services.tuning(), snapshot.restic_snapshot_id)
    s3 = boto3.client("s3", endpoint_url=settings.SNAPSHOT_S3_ENDPOINT, region_name="auto",
                      **{name: value for name, value in zip(
                          ("aws_access_key_id", "aws_secret_access_key"),
                          (as_host.credentials.access_key_id, as_host.credentials.secret_access_key), strict=True)})
    bucket = settings.SNAPSHOT_S3_BUCKET
    pack = next(item["Key"] for item in s3.list_objects_v2(Bucket=bucket, Prefix=f"{repository.prefix}/data/")["Contents"])
    size = storage.client().head_object(Bucket=bucket, Key=pack)["ContentLength"]
    for attempt in (lambda: s3.delete_object(Bucket=bucket, Key=pack),
                    lambda: s3.delete_objects(Bucket=bucket, Delete={"Objects": [{"Key": pack}]}),
                    lambda: s3.put_object(Bucket=bucket, Key=pack, Body=b"garbage"),
                    lambda: s3.put_object(Bucket=bucket, Key=f"{repository.prefix}/keys/{'ab' * 32}", Body=b"{}")):
        with pytest.raises(ClientError, match="AccessDenied"):
            attempt()
    assert storage.client().head_object(Bucket=bucket, Key=pack)["ContentLength"] == size

    # its machine goes: its key file is deleted, and its password opens nothing any more
    assert services.machine_keys_revoke(instance_id=first.pk) == 1
    assert services.machine_keys_remove() == 1
    listed = run([*services.tuning().global_args(as_host), "snapshots"], env=as_host.env(), timeout=300)
    assert not listed.ok and "wrong password or no key found" in listed.stderr
    # the other machine's key and the control plane's still open the repository
    run, as_target = _as_the_host(repository, target_key)
    assert restic.snapshot_listed(run, as_target, services.tuning(), snapshot.restic_snapshot_id)
    assert services.snapshots_apply_retention(owner=owner).skipped == ""
    source_key.refresh_from_db()
    assert source_key.removed_at is not None
