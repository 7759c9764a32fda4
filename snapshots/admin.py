from django.contrib import admin

from snapshots.models import FastPathManifest, Snapshot, SnapshotRepository, SnapshotRestore


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
    list_display = ["id", "snapshot", "instance", "owner", "status", "method", "duration_seconds", "installed_restic",
                    "created_at", "finished_at"]
    list_filter = ["status", "method"]
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


@admin.register(FastPathManifest)
class FastPathManifestAdmin(admin.ModelAdmin):
    """The fast paths (README "Fast wake"): a snapshot's, or a presync's (no snapshot)."""

    list_display = ["id", "snapshot", "instance", "owner", "status", "workspace_bytes", "uploaded_bytes",
                    "stored_bytes", "file_count", "duration_seconds", "created_at", "verified_at"]
    list_filter = ["status"]
    search_fields = ["instance__name", "owner__username", "manifest_sha256"]
    # the object keys are long and many: the row's figures and stats say what matters
    exclude = ["object_keys"]
    readonly_fields = [field.name for field in FastPathManifest._meta.fields if field.name != "object_keys"]

    def has_add_permission(self, request):
        return False
