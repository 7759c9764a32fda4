"""Snapshot routes. Views are glue: they resolve the user's instance (instances.selectors), check it
is running, record the request in its event feed, call one snapshots service and queue its task."""

from django.db import transaction
from drf_spectacular.utils import extend_schema
from rest_framework import mixins, status, viewsets
from rest_framework.decorators import action
from rest_framework.response import Response

from dumont.core.errors import Conflict
from instances.models import InstanceEvent
from instances.selectors import instance_of
from instances.services import instance_event_add
from instances.states import Status as InstanceStatus
from snapshots import selectors, services, tasks
from snapshots.api.serializers import (
    SnapshotCreateSerializer,
    SnapshotRestoreRequestSerializer,
    SnapshotRestoreSerializer,
    SnapshotSerializer,
)
from snapshots.filters import SnapshotFilter


def _running_instance(user, instance_id: int):
    """The user's instance (404 for anyone else's) with its machine's address; 409 unless running."""
    instance = instance_of(user=user, instance_id=instance_id)
    if instance.status != InstanceStatus.RUNNING:
        raise Conflict(f"instance {instance.pk} is {instance.status}, not running", data={"status": instance.status})
    return instance, instance.ssh_target


class SnapshotViewSet(mixins.ListModelMixin, mixins.RetrieveModelMixin, viewsets.GenericViewSet):
    serializer_class = SnapshotSerializer
    filterset_class = SnapshotFilter

    def get_queryset(self):
        return selectors.snapshots_of(self.request.user)

    @extend_schema(request=SnapshotCreateSerializer, responses={202: SnapshotSerializer})
    def create(self, request):
        """Snapshot a running instance now; follow it here (status, progress) or in the instance's events."""
        serializer = SnapshotCreateSerializer(data=request.data)
        serializer.is_valid(raise_exception=True)
        instance, target = _running_instance(request.user, serializer.validated_data["instance"])
        snapshot = services.snapshot_create(owner=request.user, instance_id=instance.pk, target=target)
        instance_event_add(instance=instance, kind=InstanceEvent.Kind.SNAPSHOT,
                           message=f"snapshot {snapshot.pk} requested", data={"snapshot": snapshot.pk})
        transaction.on_commit(lambda: tasks.take_snapshot.delay(snapshot.pk))
        return Response(SnapshotSerializer(snapshot).data, status=status.HTTP_202_ACCEPTED)

    @extend_schema(request=None, responses={204: None})
    def destroy(self, request, pk=None):
        """Delete a finished snapshot: gone from the API at once, removed from storage by retention."""
        services.snapshot_delete(owner=request.user, snapshot_id=int(pk))
        transaction.on_commit(lambda: tasks.apply_retention.delay(request.user.pk))
        return Response(status=status.HTTP_204_NO_CONTENT)

    @extend_schema(request=SnapshotRestoreRequestSerializer, responses={202: SnapshotRestoreSerializer})
    @action(detail=True, methods=["post"])
    def restore(self, request, pk=None):
        """Restore this snapshot into a running instance's workspace (files not in the snapshot stay)."""
        snapshot = selectors.snapshot_of(user=request.user, snapshot_id=int(pk))
        serializer = SnapshotRestoreRequestSerializer(data=request.data)
        serializer.is_valid(raise_exception=True)
        instance, target = _running_instance(request.user, serializer.validated_data["instance"])
        restore = services.restore_create(owner=request.user, snapshot_id=snapshot.pk, instance_id=instance.pk,
                                          target=target)
        instance_event_add(instance=instance, kind=InstanceEvent.Kind.RESTORE,
                           message=f"restore of snapshot {snapshot.pk} requested",
                           data={"restore": restore.pk, "snapshot": snapshot.pk})
        transaction.on_commit(lambda: tasks.restore_snapshot.delay(restore.pk))
        return Response(SnapshotRestoreSerializer(restore).data, status=status.HTTP_202_ACCEPTED)


class SnapshotRestoreViewSet(mixins.ListModelMixin, mixins.RetrieveModelMixin, viewsets.GenericViewSet):
    serializer_class = SnapshotRestoreSerializer
    filterset_fields = ["instance", "snapshot", "status"]

    def get_queryset(self):
        return selectors.restores_of(self.request.user)
