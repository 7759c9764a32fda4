import django_filters

from snapshots.models import Snapshot, SnapshotRestore


def _id_filter(field: str) -> django_filters.NumberFilter:
    # by id, not by a choice among every row: another user's id and an id that does not exist answer
    # alike (an empty list), so the filter reveals nothing about which ids exist
    return django_filters.NumberFilter(field_name=field, min_value=0)


class SnapshotFilter(django_filters.FilterSet):
    status = django_filters.MultipleChoiceFilter(choices=Snapshot.Status.choices)
    instance = _id_filter("instance_id")

    class Meta:
        model = Snapshot
        fields = ["instance", "status", "reason"]


class SnapshotRestoreFilter(django_filters.FilterSet):
    instance = _id_filter("instance_id")
    snapshot = _id_filter("snapshot_id")

    class Meta:
        model = SnapshotRestore
        fields = ["instance", "snapshot", "status"]
