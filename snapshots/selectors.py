from snapshots.models import Snapshot


def snapshots_of(user):
    return Snapshot.objects.filter(owner=user).exclude(status=Snapshot.Status.DELETED)
