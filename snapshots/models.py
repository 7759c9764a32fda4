from django.conf import settings
from django.db import models

from dumont.core.fields import EncryptedTextField


class SnapshotRepository(models.Model):
    """A user's own restic repository: own prefix in the bucket, own password (encrypted at rest).

    A machine only ever receives its owner's repository credentials.
    """

    owner = models.OneToOneField(settings.AUTH_USER_MODEL, on_delete=models.CASCADE, related_name="snapshot_repository")
    prefix = models.CharField(max_length=200, unique=True, help_text="Key prefix in the bucket, e.g. users/42")
    password = EncryptedTextField()
    initialized_at = models.DateTimeField(null=True, blank=True)
    size_bytes = models.BigIntegerField(null=True, blank=True, help_text="Last measured size in object storage.")
    size_measured_at = models.DateTimeField(null=True, blank=True)
    created_at = models.DateTimeField(auto_now_add=True)

    class Meta:
        verbose_name_plural = "snapshot repositories"

    def __str__(self) -> str:
        return f"repository {self.prefix}"


class Snapshot(models.Model):
    class Status(models.TextChoices):
        PENDING = "pending"
        RUNNING = "running"
        VERIFIED = "verified"  # restic exited 0, id parsed, listed in the repository
        FAILED = "failed"
        DELETED = "deleted"  # forgotten by retention or by the user

    class Reason(models.TextChoices):
        MANUAL = "manual"
        PERIODIC = "periodic"
        HIBERNATE = "hibernate"
        FAILOVER = "failover"

    owner = models.ForeignKey(settings.AUTH_USER_MODEL, on_delete=models.PROTECT, related_name="snapshots")
    instance = models.ForeignKey("instances.Instance", on_delete=models.PROTECT, related_name="snapshots")
    restic_snapshot_id = models.CharField(max_length=64, blank=True, db_index=True)
    parent_restic_snapshot_id = models.CharField(max_length=64, blank=True)
    reason = models.CharField(max_length=16, choices=Reason.choices, default=Reason.MANUAL)
    status = models.CharField(max_length=16, choices=Status.choices, default=Status.PENDING, db_index=True)
    error = models.TextField(blank=True)
    size_bytes = models.BigIntegerField(null=True, blank=True, help_text="Total size of the files in the snapshot.")
    added_bytes = models.BigIntegerField(null=True, blank=True, help_text="New data this snapshot stored.")
    file_count = models.PositiveIntegerField(null=True, blank=True)
    duration_seconds = models.FloatField(null=True, blank=True)
    verified_at = models.DateTimeField(null=True, blank=True)
    created_at = models.DateTimeField(auto_now_add=True)
    finished_at = models.DateTimeField(null=True, blank=True)

    class Meta:
        ordering = ["-id"]
        indexes = [models.Index(fields=["instance", "status", "-created_at"])]

    def __str__(self) -> str:
        return f"snapshot #{self.pk} of instance {self.instance_id} ({self.status})"
