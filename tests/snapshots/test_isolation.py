"""Each user's snapshots are theirs alone: own repository, own password, own storage key."""

from __future__ import annotations

import re
import shutil

import boto3
import pytest
from botocore.exceptions import ClientError
from django.conf import settings

from dumont.core.errors import NotFound
from dumont.s3server import machine_key_of
from snapshots import selectors, services, storage
from snapshots.models import MachineKey, Snapshot, SnapshotRepository
from tests.factories import make_instance, make_user
from tests.snapshots.conftest import BUCKET
from tests.snapshots.helpers import install_restic_wrapper, make_workspace

pytestmark = pytest.mark.django_db


def _running_instance(owner):
    return make_instance(owner, status="running")


def test_a_user_machine_sees_only_its_owners_repository_and_storage_key(machines):
    alice, bob = make_user(), make_user()
    services.repository_ensure(owner=alice)
    alice_snapshot = Snapshot.objects.create(owner=alice, instance=_running_instance(alice), status="verified",
                                             restic_snapshot_id="ab" * 32)
    bob_machine = machines.start()
    make_workspace(bob_machine.workspace, weights_mb=1, source_files=3)
    # everything restic receives on bob's machine, argv and environment, is written down
    install_restic_wrapper(bob_machine, '{ printf "ARGV"; printf " %s" "$@"; echo; env; } >> "$HOME/restic-calls.log"\n'
                                        f'exec {shutil.which("restic")} "$@"')
    bob_instance = _running_instance(bob)
    bob_snapshot = services.snapshot_take(owner=bob, instance_id=bob_instance.pk, target=bob_machine.target)
    assert bob_snapshot.status == Snapshot.Status.VERIFIED

    alice_repo, bob_repo = (SnapshotRepository.objects.get(owner=user) for user in (alice, bob))
    bob_machine_key = MachineKey.objects.get(instance=bob_instance)
    seen = (bob_machine.home / "restic-calls.log").read_text()
    argv = [line for line in seen.splitlines() if line.startswith("ARGV")]
    key_ids = set(re.findall(r"^AWS_ACCESS_KEY_ID=(\S+)$", seen, re.MULTILINE))
    bob_key = machine_key_of(key_ids.pop())
    assert not key_ids and (bob_key.scope, bob_key.holder) == (f"{BUCKET}/{bob_repo.prefix}", bob_machine_key.label)
    # the machine's own restic key, never the repository's password (the control plane's alone)
    assert f"RESTIC_PASSWORD={bob_machine_key.password}" in seen
    assert not any(bob_machine_key.password in line for line in argv)
    for never_seen in (bob_repo.password, alice_repo.password, alice_repo.prefix, settings.SNAPSHOT_S3_ACCESS_KEY_ID,
                       settings.SNAPSHOT_S3_SECRET_ACCESS_KEY):
        assert never_seen not in seen

    # bob's storage key opens bob's prefix and nothing else
    bob_key = storage.machine_credentials(bob_repo.prefix, holder=bob_machine_key.label, ttl_seconds=60)
    s3 = boto3.client("s3", endpoint_url=settings.SNAPSHOT_S3_ENDPOINT, region_name="auto",
                      aws_access_key_id=bob_key.access_key_id, aws_secret_access_key=bob_key.secret_access_key)
    bucket = settings.SNAPSHOT_S3_BUCKET
    assert s3.list_objects_v2(Bucket=bucket, Prefix=f"{bob_repo.prefix}/").get("Contents")
    assert not s3.list_objects_v2(Bucket=bucket, Prefix=f"{alice_repo.prefix}/").get("Contents")
    with pytest.raises(ClientError):
        s3.get_object(Bucket=bucket, Key=f"{alice_repo.prefix}/config")
    with pytest.raises(ClientError):
        s3.delete_object(Bucket=bucket, Key=f"{alice_repo.prefix}/config")
    assert storage.client().head_object(Bucket=bucket, Key=f"{alice_repo.prefix}/config")["ContentLength"] > 0

    # and bob's requests for alice's snapshot are refused as if it did not exist
    with pytest.raises(NotFound):
        services.restore_create(owner=bob, snapshot_id=alice_snapshot.pk, instance_id=bob_instance.pk,
                                target=bob_machine.target)
    with pytest.raises(NotFound):
        services.snapshot_delete(owner=bob, snapshot_id=alice_snapshot.pk)
    assert list(selectors.snapshots_of(bob)) == [bob_snapshot]

    # a user who leaves takes their repository along, and nobody else's
    deleted = services.repository_delete(owner=alice)
    assert deleted > 0 and storage.repository_size(alice_repo.prefix) == 0
    assert storage.repository_size(bob_repo.prefix) > 0
    assert not SnapshotRepository.objects.filter(owner=alice).exists()
    assert Snapshot.objects.get(pk=alice_snapshot.pk).status == Snapshot.Status.DELETED
