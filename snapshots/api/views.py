from rest_framework import mixins, viewsets

from snapshots import selectors
from snapshots.api.serializers import SnapshotSerializer
from snapshots.filters import SnapshotFilter


class SnapshotViewSet(mixins.ListModelMixin, mixins.RetrieveModelMixin, viewsets.GenericViewSet):
    serializer_class = SnapshotSerializer
    filterset_class = SnapshotFilter

    def get_queryset(self):
        return selectors.snapshots_of(self.request.user)
