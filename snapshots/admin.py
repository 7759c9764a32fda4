from django.contrib import admin

from snapshots.models import Snapshot, SnapshotRepository, SnapshotRestore


@admin.register(Snapshot)
class SnapshotAdmin(admin.ModelAdmin):
    list_display = ["id", "instance", "owner", "reason", "status", "is_verified", "size_bytes", "added_bytes",
                    "file_count", "duration_seconds", "verified_at", "created_at"]
    list_filter = ["status", "reason"]
    search_fields = ["restic_snapshot_id", "instance__name", "owner__username"]
    readonly_fields = [field.name for field in Snapshot._meta.fields]

    @admin.display(boolean=True, description="verified")
    def is_verified(self, snapshot: Snapshot) -> bool:
        return snapshot.status == Snapshot.Status.VERIFIED

    def has_add_permission(self, request):
        return False


@admin.register(SnapshotRestore)
class SnapshotRestoreAdmin(admin.ModelAdmin):
    list_display = ["id", "snapshot", "instance", "owner", "status", "duration_seconds", "installed_restic",
                    "created_at", "finished_at"]
    list_filter = ["status"]
    search_fields = ["restic_snapshot_id", "instance__name", "owner__username"]
    readonly_fields = [field.name for field in SnapshotRestore._meta.fields]

    def has_add_permission(self, request):
        return False


@admin.register(SnapshotRepository)
class SnapshotRepositoryAdmin(admin.ModelAdmin):
    list_display = ["owner", "prefix", "initialized_at", "size_bytes", "size_measured_at", "pruned_at"]
    search_fields = ["owner__username", "prefix"]
    # never the password
    fields = ["owner", "prefix", "initialized_at", "size_bytes", "size_measured_at", "pruned_at", "created_at"]
    readonly_fields = fields

    def has_add_permission(self, request):
        return False
