from django.conf import settings
from django.db import models
from django.utils import timezone

from dumont.core.fields import EncryptedTextField


class ProviderAccount(models.Model):
    """A user's credentials for one provider. The key is encrypted at rest and never leaves the server."""

    owner = models.ForeignKey(settings.AUTH_USER_MODEL, on_delete=models.CASCADE, related_name="provider_accounts")
    provider = models.CharField(max_length=32)
    name = models.CharField(max_length=100)
    api_key = EncryptedTextField()
    key_hint = models.CharField(max_length=8, blank=True, help_text="Last characters of the key, to tell keys apart.")
    created_at = models.DateTimeField(auto_now_add=True)

    class Meta:
        ordering = ["id"]
        constraints = [models.UniqueConstraint(fields=["owner", "name"], name="unique_provider_account_name")]

    def __str__(self) -> str:
        return f"{self.provider}:{self.name}"


class SSHKey(models.Model):
    """A user's public key, installed on every machine of that user so they can SSH in."""

    owner = models.ForeignKey(settings.AUTH_USER_MODEL, on_delete=models.CASCADE, related_name="ssh_keys")
    name = models.CharField(max_length=100)
    public_key = models.TextField()
    fingerprint = models.CharField(max_length=80, help_text="SHA256 fingerprint, as ssh-keygen -l prints it.")
    created_at = models.DateTimeField(auto_now_add=True)

    class Meta:
        ordering = ["id"]
        constraints = [
            models.UniqueConstraint(fields=["owner", "name"], name="unique_ssh_key_name"),
            models.UniqueConstraint(fields=["owner", "fingerprint"], name="unique_ssh_key_fingerprint"),
        ]

    def __str__(self) -> str:
        return f"{self.name} ({self.fingerprint})"


class MachineAttempt(models.Model):
    """One machine rented (or tried) for an instance. Written *before* the provider is called."""

    class Outcome(models.TextChoices):
        PENDING = "pending"  # intent written, create not yet confirmed
        BOOTING = "booting"  # created, waiting for running + SSH
        WON = "won"
        LOST = "lost"  # was fine, another machine won first
        BOOT_TIMEOUT = "boot_timeout"
        SSH_FAILED = "ssh_failed"
        PROVIDER_ERROR = "provider_error"
        FAILED_STATUS = "failed_status"  # exited / unknown / offline
        ABANDONED = "abandoned"  # the race ended (cancelled, crashed worker) before this one finished
        MACHINE_LOST = "machine_lost"  # a running machine vanished (instances/lost.py): a failure of its host
        UNREACHABLE = "unreachable"  # running, but neither SSH nor agent answers: its tenant may have caused it

    class Stage(models.TextChoices):
        NONE = ""
        CREATE = "create"
        BOOT = "boot"
        SSH = "ssh"
        SETUP = "setup"
        RUNTIME = "runtime"

    provider = models.CharField(max_length=32)
    host_id = models.CharField(max_length=64, db_index=True)
    offer_id = models.CharField(max_length=64)
    instance = models.ForeignKey(
        "instances.Instance", null=True, on_delete=models.SET_NULL, related_name="machine_attempts"
    )
    round = models.PositiveSmallIntegerField(default=1)
    label = models.CharField(max_length=100, blank=True)
    provider_instance_id = models.CharField(max_length=64, blank=True, db_index=True)
    gpu_name = models.CharField(max_length=64, blank=True)
    price_per_hour = models.DecimalField(max_digits=8, decimal_places=4, null=True)
    outcome = models.CharField(max_length=16, choices=Outcome.choices, default=Outcome.PENDING, db_index=True)
    failure_stage = models.CharField(max_length=16, choices=Stage.choices, default=Stage.NONE, blank=True)
    detail = models.TextField(blank=True)
    seconds_to_ready = models.FloatField(null=True, blank=True)
    cost = models.DecimalField(max_digits=10, decimal_places=6, default=0)
    created_at = models.DateTimeField(auto_now_add=True, db_index=True)
    ready_at = models.DateTimeField(null=True, blank=True)
    finished_at = models.DateTimeField(null=True, blank=True)
    destroyed_at = models.DateTimeField(null=True, blank=True)
    host_fault_confirmed = models.BooleanField(
        default=True, help_text="False: a failure its tenant may have caused (it counts only in that owner's view).")

    class Meta:
        db_table = "machine_attempts"
        ordering = ["-id"]
        indexes = [models.Index(fields=["provider", "host_id", "created_at"])]

    def __str__(self) -> str:
        return f"attempt #{self.pk} {self.provider}:{self.host_id} {self.outcome}"


class MachineStats(models.Model):
    """Per provider+host reliability, recomputed from attempts after each race."""

    provider = models.CharField(max_length=32)
    host_id = models.CharField(max_length=64)
    attempts = models.PositiveIntegerField(default=0)
    successes = models.PositiveIntegerField(default=0)
    failures = models.PositiveIntegerField(default=0)
    consecutive_failures = models.PositiveIntegerField(default=0)
    success_rate = models.FloatField(null=True, blank=True, help_text="successes / judged attempts, 0..1")
    median_seconds_to_ready = models.FloatField(null=True, blank=True)
    last_attempt_at = models.DateTimeField(null=True, blank=True)
    last_success_at = models.DateTimeField(null=True, blank=True)
    updated_at = models.DateTimeField(auto_now=True)

    class Meta:
        db_table = "machine_stats"
        ordering = ["provider", "host_id"]
        constraints = [models.UniqueConstraint(fields=["provider", "host_id"], name="unique_machine_stats_host")]
        verbose_name_plural = "machine stats"

    def __str__(self) -> str:
        return f"{self.provider}:{self.host_id}"


class BlacklistQuerySet(models.QuerySet):
    def active(self, now=None):
        now = now or timezone.now()
        return self.filter(lifted_at__isnull=True).filter(models.Q(until__isnull=True) | models.Q(until__gt=now))


class MachineBlacklist(models.Model):
    class Source(models.TextChoices):
        AUTOMATIC = "automatic"
        MANUAL = "manual"

    provider = models.CharField(max_length=32)
    host_id = models.CharField(max_length=64)
    reason = models.TextField()
    source = models.CharField(max_length=16, choices=Source.choices, default=Source.AUTOMATIC)
    until = models.DateTimeField(null=True, blank=True, help_text="Empty: until lifted by hand.")
    owner = models.ForeignKey(
        settings.AUTH_USER_MODEL, null=True, blank=True, on_delete=models.CASCADE, related_name="own_blacklist",
        help_text="Set: the host is avoided only for this user (failures the provider did not confirm).")
    created_by = models.ForeignKey(settings.AUTH_USER_MODEL, null=True, blank=True, on_delete=models.SET_NULL)
    created_at = models.DateTimeField(auto_now_add=True)
    lifted_at = models.DateTimeField(null=True, blank=True)
    lifted_by = models.ForeignKey(
        settings.AUTH_USER_MODEL, null=True, blank=True, on_delete=models.SET_NULL, related_name="+"
    )

    objects = BlacklistQuerySet.as_manager()

    class Meta:
        db_table = "machine_blacklist"
        ordering = ["-id"]
        indexes = [models.Index(fields=["provider", "host_id"])]
        verbose_name_plural = "machine blacklist"

    def __str__(self) -> str:
        return f"{self.provider}:{self.host_id} ({self.source})"
