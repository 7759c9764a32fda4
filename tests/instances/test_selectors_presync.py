"""Which running instances get a fast-path presync after their periodic sync was recorded."""

from datetime import timedelta

import pytest
from django.utils import timezone

from instances.selectors import instances_to_presync
from snapshots.models import FastPathManifest, Snapshot
from tests.factories import make_instance, make_user

pytestmark = pytest.mark.django_db


def _periodic(instance, status=Snapshot.Status.VERIFIED) -> Snapshot:
    return Snapshot.objects.create(owner=instance.owner, instance=instance, reason=Snapshot.Reason.PERIODIC,
                                   status=status, restic_snapshot_id="ab" * 32)


def test_a_verified_sync_of_an_instance_whose_fast_path_is_old_or_missing_is_due(settings):
    settings.SNAPSHOT_FASTPATH_PRESYNC_SECONDS = 600
    owner = make_user()
    never, old, recent, failed_sync = (make_instance(owner, status="running") for _ in range(4))
    old_fast = FastPathManifest.objects.create(owner=owner, instance=old, status=FastPathManifest.Status.VERIFIED)
    FastPathManifest.objects.filter(pk=old_fast.pk).update(created_at=timezone.now() - timedelta(seconds=601))
    # a recent one counts whatever became of it: a failed presync is not retried at every sync
    FastPathManifest.objects.create(owner=owner, instance=recent, status=FastPathManifest.Status.FAILED)
    synced = [_periodic(never), _periodic(old), _periodic(recent), _periodic(failed_sync, Snapshot.Status.FAILED)]

    assert instances_to_presync([s.pk for s in synced]) == sorted([never.pk, old.pk])

    settings.SNAPSHOT_FASTPATH_PRESYNC_SECONDS = 0
    assert instances_to_presync([s.pk for s in synced]) == []
    settings.SNAPSHOT_FASTPATH_PRESYNC_SECONDS, settings.SNAPSHOT_FASTPATH = 600, False
    assert instances_to_presync([s.pk for s in synced]) == []
