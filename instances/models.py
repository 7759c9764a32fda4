from django.conf import settings
from django.core.validators import MaxValueValidator, MinValueValidator
from django.db import models

from dumont.core.fields import EncryptedTextField
from instances.choices import NAME_TAKEN, Status
from machines.ssh import SSHTarget


class Instance(models.Model):
    """A user's GPU workspace. Its machine comes and goes (races, hibernation, wake); the instance stays.

    `status` is changed only by `instances.states.transition`.
    """

    owner = models.ForeignKey(settings.AUTH_USER_MODEL, on_delete=models.PROTECT, related_name="instances")
    name = models.CharField(max_length=100)
    provider = models.CharField(max_length=32, help_text="Provider adapter name (local, vastai, runpod).")
    provider_account = models.ForeignKey(
        "machines.ProviderAccount", null=True, blank=True, on_delete=models.PROTECT, related_name="instances"
    )

    # requested GPU spec
    gpu_name = models.CharField(max_length=64, blank=True, help_text="Empty: any GPU model.")
    num_gpus = models.PositiveSmallIntegerField(default=1, validators=[MaxValueValidator(16)])
    max_price_per_hour = models.DecimalField(
        max_digits=8, decimal_places=4, null=True, blank=True, validators=[MinValueValidator(0)]
    )
    disk_gb = models.PositiveIntegerField(default=50, validators=[MinValueValidator(1), MaxValueValidator(8192)])
    image = models.CharField(max_length=255, default="pytorch/pytorch:latest")
    region = models.CharField(max_length=64, blank=True)
    interruptible = models.BooleanField(default=False)

    status = models.CharField(max_length=16, choices=Status.choices, default=Status.PENDING, db_index=True)
    status_reason = models.TextField(blank=True)
    status_changed_at = models.DateTimeField(auto_now_add=True)

    # the current machine (empty while none is rented)
    provider_instance_id = models.CharField(max_length=64, blank=True, db_index=True)
    host_id = models.CharField(max_length=64, blank=True)
    ssh_host = models.CharField(max_length=255, blank=True)
    ssh_port = models.PositiveIntegerField(null=True, blank=True)
    ssh_user = models.CharField(max_length=32, blank=True, default="root")
    ssh_host_key = models.TextField(blank=True, help_text="Pinned host key: connections with any other key are refused.")
    price_per_hour = models.DecimalField(max_digits=8, decimal_places=4, null=True, blank=True)
    machine_started_at = models.DateTimeField(null=True, blank=True)

    keep_awake_until = models.DateTimeField(null=True, blank=True, help_text="No auto-hibernation until then.")
    released_at = models.DateTimeField(
        null=True, blank=True, help_text="When a hibernated instance's reservation was released (storage only)."
    )
    created_at = models.DateTimeField(auto_now_add=True)
    updated_at = models.DateTimeField(auto_now=True)

    class Meta:
        ordering = ["-id"]
        indexes = [models.Index(fields=["owner", "status"])]
        constraints = [
            models.UniqueConstraint(
                fields=["owner", "name"],
                condition=models.Q(status__in=sorted(NAME_TAKEN)),
                name="unique_active_instance_name_per_owner",
            )
        ]

    def __str__(self) -> str:
        return f"{self.name} (#{self.pk}, {self.status})"

    @property
    def ssh_target(self) -> SSHTarget:
        """The current machine's SSH address, with its pinned host key."""
        return SSHTarget(self.ssh_host, self.ssh_port or 22, self.ssh_user or "root", self.ssh_host_key or None)

    @property
    def label(self) -> str:
        """What we put in the provider's label field so orphans can be found by it."""
        return f"{settings.DUMONT_LABEL_PREFIX}{self.pk}"


class InstanceEvent(models.Model):
    """Append-only: the audit log, the progress feed for clients, and the data for metrics."""

    class Kind(models.TextChoices):
        STATUS = "status"
        RACE = "race"
        ATTEMPT = "attempt"
        SNAPSHOT = "snapshot"
        RESTORE = "restore"
        AGENT = "agent"
        HIBERNATE = "hibernate"
        WAKE = "wake"
        ERROR = "error"
        INFO = "info"
        LOST = "lost"  # a lost machine: detection and its verdict
        RECOVERY = "recovery"  # recovery from a lost machine: recovery point and duration
        STANDBY = "standby"  # the CPU standby: provisioning, mirror, failover, failback

    instance = models.ForeignKey(Instance, on_delete=models.CASCADE, related_name="events")
    kind = models.CharField(max_length=16, choices=Kind.choices)
    message = models.TextField()
    data = models.JSONField(default=dict, blank=True)
    created_at = models.DateTimeField(auto_now_add=True, db_index=True)

    class Meta:
        ordering = ["id"]
        indexes = [models.Index(fields=["instance", "id"])]

    def __str__(self) -> str:
        return f"[{self.kind}] {self.message}"

    def save(self, *args, **kwargs):
        if self.pk is not None:
            raise ValueError("InstanceEvent is append-only")
        super().save(*args, **kwargs)


class StandbyConfig(models.Model):
    """Per-user CPU standby / failover settings (the behaviour: instances/standby.py)."""

    owner = models.OneToOneField(settings.AUTH_USER_MODEL, on_delete=models.CASCADE, related_name="standby_config")
    enabled = models.BooleanField(default=False)
    provider = models.CharField(max_length=32, default="gcp")
    zone = models.CharField(max_length=64, default="us-central1-a")
    machine_type = models.CharField(max_length=64, default="e2-standard-4")
    disk_gb = models.PositiveIntegerField(default=100, validators=[MinValueValidator(10), MaxValueValidator(8192)])
    spot = models.BooleanField(default=True)
    sync_interval_seconds = models.PositiveIntegerField(
        default=300, validators=[MinValueValidator(10), MaxValueValidator(86400)],
        help_text="The mirror on the standby is never older than this (plus one sync's duration).",
    )
    auto_failover = models.BooleanField(default=True)
    auto_recovery = models.BooleanField(default=True)
    updated_at = models.DateTimeField(auto_now=True)

    def __str__(self) -> str:
        return f"standby for {self.owner} ({'on' if self.enabled else 'off'})"


class StandbyMachine(models.Model):
    """The CPU machine that mirrors one GPU instance's workspace (instances/standby.py).

    Written (status `provisioning`) before the provider is asked for the machine: its label,
    `<instance label>-s<id>`, is how the reconcile sweep tells it from an orphan. The mirror key is the
    one the GPU machine's rsync uses to reach it; secret, so encrypted at rest and never serialised.
    """

    class Status(models.TextChoices):
        PROVISIONING = "provisioning"
        READY = "ready"
        FAILED = "failed"  # could not be provisioned, or lost: its machine is destroyed
        DESTROYED = "destroyed"

    ACTIVE = (Status.PROVISIONING, Status.READY)

    instance = models.ForeignKey(Instance, on_delete=models.CASCADE, related_name="standbys")
    provider = models.CharField(max_length=32)
    provider_account = models.ForeignKey(
        "machines.ProviderAccount", null=True, blank=True, on_delete=models.PROTECT, related_name="standbys"
    )
    zone = models.CharField(max_length=64, blank=True)
    machine_type = models.CharField(max_length=64, blank=True)
    spot = models.BooleanField(default=True)
    status = models.CharField(max_length=16, choices=Status.choices, default=Status.PROVISIONING, db_index=True)
    error = models.TextField(blank=True)
    label = models.CharField(max_length=100, blank=True)
    provider_instance_id = models.CharField(max_length=128, blank=True, db_index=True)
    ssh_host = models.CharField(max_length=255, blank=True)
    ssh_port = models.PositiveIntegerField(null=True, blank=True)
    ssh_user = models.CharField(max_length=32, blank=True, default="root")
    ssh_host_key = models.TextField(blank=True)
    price_per_hour = models.DecimalField(max_digits=8, decimal_places=4, null=True, blank=True)
    mirror_private_key = EncryptedTextField(blank=True)
    mirror_public_key = models.TextField(blank=True)
    last_sync_at = models.DateTimeField(
        null=True, blank=True, help_text="When the last successful sync started: the mirror holds the workspace as of then."
    )
    last_sync_seconds = models.FloatField(null=True, blank=True)
    synced_from = models.CharField(
        max_length=128, blank=True,
        help_text="The GPU machine the mirror was last synced with (pushed from or pulled onto).")
    last_sync_error = models.TextField(blank=True)
    syncs = models.PositiveIntegerField(default=0)
    created_at = models.DateTimeField(auto_now_add=True)
    ready_at = models.DateTimeField(null=True, blank=True)
    destroyed_at = models.DateTimeField(null=True, blank=True)

    class Meta:
        ordering = ["-id"]
        constraints = [
            models.UniqueConstraint(fields=["instance"], condition=models.Q(status__in=["provisioning", "ready"]),
                                    name="one_active_standby_per_instance")
        ]

    def __str__(self) -> str:
        return f"standby #{self.pk} of instance {self.instance_id} ({self.status})"

    @property
    def ssh_target(self) -> SSHTarget:
        return SSHTarget(self.ssh_host, self.ssh_port or 22, self.ssh_user or "root", self.ssh_host_key or None)


class UnreachableMachine(models.Model):
    """A GPU machine that went silent while its provider still reported it (running or stopped with its
    disk): it may hold unsaved work, so it is kept and re-checked every lost sweep (instances/lost.py)
    until it answers (its workspace is saved first), the provider says it is gone, or an operator acts.
    While open, reconcile counts its machine as owned."""

    class State(models.TextChoices):
        OPEN = "open"
        SAVED = "saved"  # answered again: its workspace was snapshotted (or it simply went back to work)
        GONE = "gone"  # the provider says the machine is gone or failed for good
        RELEASED = "released"  # an operator released it by hand

    instance = models.ForeignKey(Instance, on_delete=models.CASCADE, related_name="unreachable_machines")
    provider = models.CharField(max_length=32)
    provider_account = models.ForeignKey(
        "machines.ProviderAccount", null=True, blank=True, on_delete=models.PROTECT, related_name="+"
    )
    provider_instance_id = models.CharField(max_length=128, db_index=True)
    host_id = models.CharField(max_length=64, blank=True)
    ssh_host = models.CharField(max_length=255, blank=True)
    ssh_port = models.PositiveIntegerField(null=True, blank=True)
    ssh_user = models.CharField(max_length=32, blank=True, default="root")
    ssh_host_key = models.TextField(blank=True)
    price_per_hour = models.DecimalField(max_digits=8, decimal_places=4, null=True, blank=True)
    state = models.CharField(max_length=16, choices=State.choices, default=State.OPEN, db_index=True)
    reason = models.TextField(blank=True)
    checks = models.PositiveIntegerField(default=0)
    last_checked_at = models.DateTimeField(null=True, blank=True)
    flagged_at = models.DateTimeField(null=True, blank=True, help_text="When it was flagged for the operator.")
    created_at = models.DateTimeField(auto_now_add=True)
    resolved_at = models.DateTimeField(null=True, blank=True)

    class Meta:
        ordering = ["-id"]
        constraints = [
            models.UniqueConstraint(fields=["provider", "provider_instance_id"], condition=models.Q(state="open"),
                                    name="one_open_unreachable_row_per_machine")
        ]

    def __str__(self) -> str:
        return f"unreachable {self.provider}:{self.provider_instance_id} of instance {self.instance_id} ({self.state})"

    @property
    def ssh_target(self) -> SSHTarget:
        return SSHTarget(self.ssh_host, self.ssh_port or 22, self.ssh_user or "root", self.ssh_host_key or None)


class OperatorAlert(models.Model):
    """Something only an operator can judge (fleet-wide silence, a machine unreachable past its grace, a
    hibernation that keeps failing). Listed in the admin; one open alert per `key`."""

    class Kind(models.TextChoices):
        FLEET_SILENT = "fleet_silent"
        UNREACHABLE = "unreachable"
        HIBERNATION_FAILING = "hibernation_failing"

    kind = models.CharField(max_length=32, choices=Kind.choices)
    key = models.CharField(max_length=100, help_text="What the alert is about: one open alert per key.")
    message = models.TextField()
    data = models.JSONField(default=dict, blank=True)
    instance = models.ForeignKey(Instance, null=True, blank=True, on_delete=models.CASCADE, related_name="alerts")
    created_at = models.DateTimeField(auto_now_add=True, db_index=True)
    resolved_at = models.DateTimeField(null=True, blank=True)

    class Meta:
        ordering = ["-id"]
        constraints = [
            models.UniqueConstraint(fields=["key"], condition=models.Q(resolved_at__isnull=True),
                                    name="one_open_operator_alert_per_key")
        ]

    def __str__(self) -> str:
        return f"[{self.kind}] {self.message}"
