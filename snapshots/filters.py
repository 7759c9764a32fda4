import django_filters

from snapshots.models import Snapshot


class SnapshotFilter(django_filters.FilterSet):
    status = django_filters.MultipleChoiceFilter(choices=Snapshot.Status.choices)

    class Meta:
        model = Snapshot
        fields = ["instance", "status", "reason"]
