from django.contrib import admin

from snapshots.models import Snapshot, SnapshotRepository


@admin.register(Snapshot)
class SnapshotAdmin(admin.ModelAdmin):
    list_display = ["id", "instance", "owner", "reason", "status", "size_bytes", "file_count",
                    "duration_seconds", "verified_at", "created_at"]
    list_filter = ["status", "reason"]
    search_fields = ["restic_snapshot_id", "instance__name", "owner__username"]
    readonly_fields = [field.name for field in Snapshot._meta.fields]

    def has_add_permission(self, request):
        return False


@admin.register(SnapshotRepository)
class SnapshotRepositoryAdmin(admin.ModelAdmin):
    list_display = ["owner", "prefix", "initialized_at", "size_bytes", "size_measured_at"]
    search_fields = ["owner__username", "prefix"]
    fields = ["owner", "prefix", "initialized_at", "size_bytes", "size_measured_at", "created_at"]  # no password
    readonly_fields = fields

    def has_add_permission(self, request):
        return False
