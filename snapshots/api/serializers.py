from rest_framework import serializers

from snapshots.models import Snapshot, SnapshotRestore


class SnapshotSerializer(serializers.ModelSerializer):
    verified = serializers.SerializerMethodField()
    fastpath = serializers.SerializerMethodField(help_text="Its fast path: pending, verified, failed, deleted, or null.")

    class Meta:
        model = Snapshot
        fields = [
            "id", "instance", "restic_snapshot_id", "parent_restic_snapshot_id", "reason", "status", "verified",
            "error", "size_bytes", "added_bytes", "file_count", "duration_seconds", "progress", "verified_at",
            "created_at", "started_at", "finished_at", "fastpath",
        ]
        read_only_fields = fields

    def get_verified(self, snapshot) -> bool:
        return snapshot.status == Snapshot.Status.VERIFIED

    def get_fastpath(self, snapshot) -> str | None:
        manifest = getattr(snapshot, "fastpath", None)
        return manifest.status if manifest is not None else None


class SnapshotOptionsSerializer(serializers.Serializer):
    fast = serializers.BooleanField(
        default=False, help_text="Also store the fast path (what a wake restores fastest from); a hibernation always "
        "does.")


class SnapshotCreateSerializer(SnapshotOptionsSerializer):
    instance = serializers.IntegerField(min_value=1, help_text="A running instance of yours.")


class SnapshotRestoreRequestSerializer(serializers.Serializer):
    instance = serializers.IntegerField(
        min_value=1, help_text="A running instance of yours whose workspace receives the snapshot."
    )


class SnapshotRestoreSerializer(serializers.ModelSerializer):
    class Meta:
        model = SnapshotRestore
        fields = [
            "id", "snapshot", "instance", "restic_snapshot_id", "status", "error", "installed_restic", "method",
            "stats", "duration_seconds", "created_at", "started_at", "finished_at",
        ]
        read_only_fields = fields
