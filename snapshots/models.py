from django.conf import settings
from django.db import models

from dumont.core.fields import EncryptedTextField
from machines.ssh import SSHTarget


class MachineAddress(models.Model):
    """The machine a snapshot is taken from or restored to, recorded when it is requested.

    A task then works on that very machine even if the instance has moved on (hibernated, woke
    elsewhere). The host key is public: it pins the machine, it does not open it.
    """

    ssh_host = models.CharField(max_length=255, blank=True)
    ssh_port = models.PositiveIntegerField(null=True, blank=True)
    ssh_user = models.CharField(max_length=32, blank=True, default="root")
    ssh_host_key = models.TextField(blank=True)

    class Meta:
        abstract = True

    @property
    def ssh_target(self) -> SSHTarget:
        return SSHTarget(self.ssh_host, self.ssh_port or 22, self.ssh_user or "root", self.ssh_host_key or None)

    def set_ssh_target(self, target: SSHTarget) -> None:
        self.ssh_host, self.ssh_port, self.ssh_user = target.host, target.port, target.user
        self.ssh_host_key = target.host_key or ""


class SnapshotRepository(models.Model):
    """A user's own restic repository: own prefix in the bucket, own password (encrypted at rest).

    The password is the control plane's alone (retention, prune, verification): a machine receives its own
    key instead (MachineKey) and storage keys that cannot delete.
    """

    owner = models.OneToOneField(settings.AUTH_USER_MODEL, on_delete=models.CASCADE, related_name="snapshot_repository")
    prefix = models.CharField(max_length=200, unique=True, help_text="Key prefix in the bucket, e.g. users/42")
    password = EncryptedTextField()
    # the key file the control plane's password opens (the repository's first key): restic's key hint
    control_key_id = models.CharField(max_length=64, blank=True)
    initialized_at = models.DateTimeField(null=True, blank=True)
    size_bytes = models.BigIntegerField(null=True, blank=True, help_text="Last measured size in object storage.")
    size_measured_at = models.DateTimeField(null=True, blank=True)
    pruned_at = models.DateTimeField(null=True, blank=True)
    created_at = models.DateTimeField(auto_now_add=True)

    class Meta:
        verbose_name_plural = "snapshot repositories"

    def __str__(self) -> str:
        return f"repository {self.prefix}"


class MachineKey(models.Model):
    """One machine's own restic key (password) to its owner's repository, added by the control plane
    (`restic key add`) the first time the machine backs up, restores or syncs, and removed when the machine
    goes (destroyed, hibernated, replaced): `revoked_at` at once (it is never handed out again), `removed_at`
    once its key file is gone from the repository (the password then opens nothing).

    The machine is named by its pinned SSH host key: a new machine has a new one.
    """

    repository = models.ForeignKey(SnapshotRepository, on_delete=models.CASCADE, related_name="machine_keys")
    instance = models.ForeignKey("instances.Instance", on_delete=models.CASCADE, related_name="machine_keys")
    machine = models.CharField(max_length=64, help_text="sha256 of the machine's SSH host key.")
    password = EncryptedTextField()
    restic_key_id = models.CharField(max_length=64, blank=True, help_text="The key file's id in the repository.")
    created_at = models.DateTimeField(auto_now_add=True)
    revoked_at = models.DateTimeField(null=True, blank=True, help_text="Its machine went: never handed out again.")
    removed_at = models.DateTimeField(null=True, blank=True, help_text="Its key file is gone from the repository.")

    class Meta:
        constraints = [
            models.UniqueConstraint(fields=["instance", "machine"], condition=models.Q(revoked_at__isnull=True),
                                    name="one_live_machine_key_per_machine"),
        ]
        indexes = [models.Index(fields=["revoked_at", "removed_at"], name="machine_key_to_remove")]

    def __str__(self) -> str:
        state = "removed" if self.removed_at else "revoked" if self.revoked_at else "live"
        return f"restic key of instance {self.instance_id} on machine {self.machine[:12]} ({state})"

    LABEL_PREFIX = "dumont-key-"

    @property
    def label(self) -> str:
        """Its name in the repository (`restic key list`'s host) and its holder name on storage keys."""
        return f"{self.LABEL_PREFIX}{self.pk}"


class Snapshot(MachineAddress):
    class Status(models.TextChoices):
        PENDING = "pending"
        RUNNING = "running"
        VERIFIED = "verified"  # restic exited 0, id parsed, listed in the repository
        FAILED = "failed"
        DELETED = "deleted"  # deleted by the user or expired by retention (forgotten_at: gone from restic)

    class Reason(models.TextChoices):
        MANUAL = "manual"
        PERIODIC = "periodic"
        HIBERNATE = "hibernate"
        FAILOVER = "failover"
        UNREACHABLE = "unreachable"  # an unreachable machine that answered again: saved before anything else

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
    progress = models.JSONField(default=dict, blank=True, help_text="Last backup progress: percent, bytes, files.")
    stats = models.JSONField(default=dict, blank=True, help_text="restic's backup summary.")
    created_at = models.DateTimeField(auto_now_add=True)
    started_at = models.DateTimeField(null=True, blank=True)
    finished_at = models.DateTimeField(null=True, blank=True)
    captured_at = models.DateTimeField(
        null=True, blank=True, db_index=True,
        help_text="When the backup captured the workspace (restic's snapshot time): what `latest` sorts on.")
    deleted_at = models.DateTimeField(null=True, blank=True)
    forgotten_at = models.DateTimeField(null=True, blank=True, help_text="Removed from the restic repository.")

    ACTIVE = frozenset({Status.PENDING, Status.RUNNING})
    # newest first by what the backup captured (rows from before captured_at existed: by when they finished)
    NEWEST_FIRST = (models.F("captured_at").desc(nulls_last=True), models.F("finished_at").desc(nulls_last=True), "-id")

    class Meta:
        ordering = ["-id"]
        indexes = [models.Index(fields=["instance", "status", "-created_at"])]
        constraints = [
            # one backup of a workspace at a time
            models.UniqueConstraint(
                fields=["instance"], condition=models.Q(status__in=["pending", "running"]),
                name="one_active_snapshot_per_instance",
            )
        ]

    def __str__(self) -> str:
        return f"snapshot #{self.pk} of instance {self.instance_id} ({self.status})"

    @property
    def tags(self) -> list[str]:
        return [f"instance={self.instance_id}", f"reason={self.reason}", f"snapshot={self.pk}"]


class SnapshotRestore(MachineAddress):
    """One restore of a snapshot into an instance's workspace (a wake, or a user's request)."""

    class Status(models.TextChoices):
        PENDING = "pending"
        RUNNING = "running"
        SUCCEEDED = "succeeded"
        FAILED = "failed"

    ACTIVE = frozenset({Status.PENDING, Status.RUNNING})

    owner = models.ForeignKey(settings.AUTH_USER_MODEL, on_delete=models.PROTECT, related_name="snapshot_restores")
    snapshot = models.ForeignKey(Snapshot, on_delete=models.PROTECT, related_name="restores")
    instance = models.ForeignKey("instances.Instance", on_delete=models.PROTECT, related_name="snapshot_restores")
    restic_snapshot_id = models.CharField(max_length=64)
    status = models.CharField(max_length=16, choices=Status.choices, default=Status.PENDING, db_index=True)
    error = models.TextField(blank=True)
    installed_restic = models.BooleanField(default=False, help_text="restic had to be copied to the machine first.")
    method = models.CharField(max_length=16, blank=True, help_text="What wrote the workspace: fastpath or restic.")
    stats = models.JSONField(default=dict, blank=True, help_text="Bytes, MB/s, phases; why the fast path was not used.")
    duration_seconds = models.FloatField(null=True, blank=True)
    created_at = models.DateTimeField(auto_now_add=True)
    started_at = models.DateTimeField(null=True, blank=True)
    finished_at = models.DateTimeField(null=True, blank=True)

    class Meta:
        ordering = ["-id"]
        indexes = [models.Index(fields=["instance", "status", "-finished_at"])]
        constraints = [
            models.UniqueConstraint(
                fields=["instance"], condition=models.Q(status__in=["pending", "running"]),
                name="one_active_restore_per_instance",
            )
        ]

    def __str__(self) -> str:
        return f"restore #{self.pk} of snapshot {self.snapshot_id} into instance {self.instance_id} ({self.status})"


class FastPathManifest(models.Model):
    """The restore-optimised copy of a snapshot's workspace (snapshots/fastpath_services.py): content-addressed
    objects under `{prefix}/fast/objects/`, named by a manifest at `{prefix}/fast/manifests/{id}.json` that the
    control plane writes last (the commit point) once every object it names is in storage.

    `object_keys` lists every object key the manifest names (set before any upload: what the garbage collector keeps
    while the snapshot is being written); `manifest_sha256` pins the stored manifest (a wake refuses another one).
    """

    class Status(models.TextChoices):
        PENDING = "pending"  # objects being uploaded
        VERIFIED = "verified"  # the manifest and every object it names are in storage
        FAILED = "failed"
        DELETED = "deleted"  # retention dropped it: its objects may go (unless another manifest names them)

    # null: a presync (after a periodic sync, while the machine runs): never restored from, only what the next
    # hibernation's fast path reuses, so that it uploads only what changed since
    snapshot = models.OneToOneField(Snapshot, on_delete=models.CASCADE, related_name="fastpath", null=True, blank=True)
    owner = models.ForeignKey(settings.AUTH_USER_MODEL, on_delete=models.CASCADE, related_name="fastpath_manifests")
    instance = models.ForeignKey("instances.Instance", on_delete=models.CASCADE, related_name="fastpath_manifests")
    status = models.CharField(max_length=16, choices=Status.choices, default=Status.PENDING, db_index=True)
    object_keys = models.JSONField(default=list, blank=True, help_text="Every object key the manifest names.")
    manifest_sha256 = models.CharField(max_length=64, blank=True)
    workspace_bytes = models.BigIntegerField(null=True, blank=True)
    stored_bytes = models.BigIntegerField(null=True, blank=True, help_text="Bytes of all its objects in storage.")
    uploaded_bytes = models.BigIntegerField(null=True, blank=True, help_text="What this snapshot uploaded.")
    file_count = models.PositiveIntegerField(null=True, blank=True)
    duration_seconds = models.FloatField(null=True, blank=True)
    stats = models.JSONField(default=dict, blank=True)
    error = models.TextField(blank=True)
    created_at = models.DateTimeField(auto_now_add=True)
    verified_at = models.DateTimeField(null=True, blank=True)
    deleted_at = models.DateTimeField(null=True, blank=True)

    LIVE = frozenset({Status.PENDING, Status.VERIFIED})

    class Meta:
        ordering = ["-id"]
        indexes = [models.Index(fields=["owner", "status"]), models.Index(fields=["instance", "status"])]

    def __str__(self) -> str:
        of = f"snapshot {self.snapshot_id}" if self.snapshot_id else f"instance {self.instance_id} (presync)"
        return f"fast path of {of} ({self.status})"
