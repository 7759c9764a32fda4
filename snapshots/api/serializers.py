from rest_framework import serializers

from snapshots.models import Snapshot


class SnapshotSerializer(serializers.ModelSerializer):
    verified = serializers.SerializerMethodField()

    class Meta:
        model = Snapshot
        fields = [
            "id", "instance", "restic_snapshot_id", "parent_restic_snapshot_id", "reason", "status", "verified",
            "error", "size_bytes", "added_bytes", "file_count", "duration_seconds", "verified_at",
            "created_at", "finished_at",
        ]
        read_only_fields = fields

    def get_verified(self, snapshot) -> bool:
        return snapshot.status == Snapshot.Status.VERIFIED
