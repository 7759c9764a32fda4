"""Snapshot routes: list, read, delete; restores: list, read. Taking a snapshot and restoring one need an
instance, so those routes live in the instances API (`POST /instances/{id}/snapshots`, `POST
/instances/{id}/restore`, and the older `POST /snapshots`, `POST /snapshots/{id}/restore`, routed by
instances.api.urls over this app's SnapshotViewSet)."""

from django.db import transaction
from drf_spectacular.utils import extend_schema
from rest_framework import mixins, status, viewsets
from rest_framework.response import Response

from snapshots import selectors, services, tasks
from snapshots.api.serializers import SnapshotRestoreSerializer, SnapshotSerializer
from snapshots.filters import SnapshotFilter, SnapshotRestoreFilter


class SnapshotViewSet(mixins.ListModelMixin, mixins.RetrieveModelMixin, viewsets.GenericViewSet):
    serializer_class = SnapshotSerializer
    filterset_class = SnapshotFilter

    def get_queryset(self):
        return selectors.snapshots_of(self.request.user)

    @extend_schema(request=None, responses={204: None})
    def destroy(self, request, pk=None):
        """Delete a finished snapshot: gone from the API at once, removed from storage by retention."""
        services.snapshot_delete(owner=request.user, snapshot_id=int(pk))
        transaction.on_commit(lambda: tasks.apply_retention.delay(request.user.pk))
        return Response(status=status.HTTP_204_NO_CONTENT)


class SnapshotRestoreViewSet(mixins.ListModelMixin, mixins.RetrieveModelMixin, viewsets.GenericViewSet):
    serializer_class = SnapshotRestoreSerializer
    filterset_class = SnapshotRestoreFilter

    def get_queryset(self):
        return selectors.restores_of(self.request.user)
